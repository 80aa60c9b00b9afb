"""SAM 3 video tracking (model_name=sam3) against transformers' own documented video pipeline
(``Sam3TrackerVideoModel.from_pretrained`` + ``Sam3TrackerVideoProcessor``: init_video_session
with the whole video, add_inputs_to_inference_session, model(frame_idx), propagate_in_video_iterator,
post_process_masks) on the same random weights (the reduced SAM 3 of the fast suite: a 2-layer
ViT; input size, FPN, prompt encoder, mask decoder and memory modules at their published shapes),
the same frames (a synthetic clip of moving shapes) and the same boxes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sam_backend.video.base import BoxPrompt
from tests.support.video import (JpegFolderClip, assert_same_tracks, moving_shapes,
                                 write_jpeg_folder)

FRAMES, HEIGHT, WIDTH = 3, 180, 240


@pytest.fixture(scope="module")
def clip_and_boxes(tmp_path_factory):
    frames, boxes = moving_shapes(FRAMES, HEIGHT, WIDTH)
    folder = write_jpeg_folder(tmp_path_factory.mktemp("clip") / "frames", frames)
    return JpegFolderClip(folder), boxes


@pytest.fixture(scope="module")
def settings(official_dir):
    from sam_backend.settings import Settings

    return Settings(model_name="sam3", sam_checkpoint_file=str(official_dir), device="cpu",
                    offline=True)


@pytest.fixture(scope="module")
def tracker(settings):
    """Built the way the backend builds it: assembly.create_tracker from the settings."""
    from sam_backend.assembly import create_tracker

    return create_tracker(settings)


@pytest.fixture(scope="module")
def library(official_dir):
    from transformers import Sam3TrackerVideoModel

    from sam_backend.video.sam3_tracker import video_processor

    model, info = Sam3TrackerVideoModel.from_pretrained(str(official_dir), output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    return model.eval(), video_processor(None)


def library_run(library, clip, steps):
    """``steps``: a list of rounds, each ``[(object_id, frame, box), ...]`` added (each then run
    on its frame) before propagating through the clip; the last round's masks (HxW bool) and
    scores (sigmoid of the object score logit) by (object, frame)."""
    from PIL import Image

    model, processor = library
    video = [np.array(Image.open(p).convert("RGB")) for p in clip.paths]
    session = processor.init_video_session(video=video, inference_device="cpu")
    size = [[session.video_height, session.video_width]]
    masks, scores = {}, {}
    with torch.inference_mode():
        for round_ in steps:
            for object_id, frame, box in round_:
                processor.add_inputs_to_inference_session(
                    inference_session=session, frame_idx=frame, obj_ids=object_id,
                    input_boxes=[[list(box)]])
                model(inference_session=session, frame_idx=frame)
            masks, scores = {}, {}
            for out in model.propagate_in_video_iterator(session):
                logits = processor.post_process_masks([out.pred_masks], original_sizes=size,
                                                      binarize=False)[0]
                for i, object_id in enumerate(out.object_ids):
                    masks[(object_id, out.frame_idx)] = (logits[i, 0] > 0).numpy()
                    scores[(object_id, out.frame_idx)] = float(
                        torch.sigmoid(out.object_score_logits.flatten()[i]))
    return masks, scores


def ours(session, prompts):
    masks = {}
    session.on_mask = lambda o, f, m: masks.__setitem__((o, f), m)
    try:
        return session.track(prompts), masks
    finally:
        session.on_mask = None


def test_one_object_then_two_at_once_equal_the_library_run_separately(tracker, library,
                                                                      clip_and_boxes):
    clip, boxes = clip_and_boxes
    session = tracker.session(clip)
    first = BoxPrompt(1, 0, boxes[1][0])
    tracks, masks = ours(session, [first])
    one = library_run(library, clip, [[(1, 0, boxes[1][0])]])
    assert_same_tracks(masks, tracks, one, "one")
    assert tracker.features.encoded == FRAMES

    other = BoxPrompt(2, 0, boxes[2][0])
    tracks, masks = ours(tracker.session(clip), [first, other])
    alone = library_run(library, clip, [[(2, 0, boxes[2][0])]])
    alone = ({**alone[0], **one[0]}, {**alone[1], **one[1]})
    assert_same_tracks(masks, tracks, alone, "two at once")
    assert tracker.features.encoded == FRAMES  # the second object reused every frame's features


def test_a_correction_is_kept_as_a_conditioning_frame_like_the_library_given_both_boxes(
        tracker, library, clip_and_boxes):
    clip, boxes = clip_and_boxes
    session = tracker.session(clip)
    first = BoxPrompt(3, 0, boxes[1][0])
    before = session.track([first])[3]
    calls = []
    hook = tracker.model.vision_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        correction = BoxPrompt(3, 2, boxes[1][2])
        tracks, masks = ours(session, [first, correction])
    finally:
        hook.remove()
    assert calls == []  # every frame's features were cached
    expected = library_run(library, clip, [[(3, 0, boxes[1][0]), (3, 2, boxes[1][2])]])
    assert_same_tracks(masks, tracks, expected, "corrected")
    assert before.scores != tracks[3].scores, \
        "the correction changed nothing: the test would not see it ignored"


def test_stop_and_the_tracker_table(tracker, clip_and_boxes):
    from sam_backend.errors import ConfigError
    from sam_backend.video.trackers import tracker_factory

    clip, boxes = clip_and_boxes
    tracks = tracker.session(clip).track([BoxPrompt(1, 1, boxes[1][1])], stop=3)
    assert sorted(tracks[1].boxes) == [1, 2]
    with pytest.raises(ConfigError, match="model_name=sam2/sam3"):
        tracker_factory("mobile_sam")
    with pytest.raises(ValueError, match="frame 9, outside the clip's 3 frames"):
        tracker.session(clip).track([BoxPrompt(1, 9, boxes[1][0])])


def test_a_request_out_of_time_stops_between_frames(tracker, clip_and_boxes):
    from sam_backend.common.deadline import WorkScope
    from sam_backend.errors import BusyError

    clip, boxes = clip_and_boxes
    done = []
    with pytest.raises(BusyError, match="tracking frame 1"):
        # a deadline that expires after the first frame: frame 0 is done, frame 1 is not started
        scope = WorkScope(3600)
        tracker.session(clip).track([BoxPrompt(5, 0, boxes[1][0])], scope=scope,
                                    progress=lambda d, t: (done.append(d),
                                                           setattr(scope, "deadline", 0)))
    assert done == [1]


def test_the_tracker_shares_the_click_models_weights(settings):
    from sam_backend.assembly import create_tracker, segmenter_for

    segmenter = segmenter_for(settings)
    tracker = create_tracker(settings, segmenter)
    click = dict(segmenter.model.model.named_parameters())
    video = dict(tracker.model.named_parameters())
    shared = [k for k in click if video[k].data_ptr() == click[k].data_ptr()]
    assert len(shared) == len(click) and len(video) > len(click)
