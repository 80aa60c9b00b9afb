"""SAM 2.1 video tracking (model_name=sam2) against the sam2 package's own SAM2VideoPredictor
(build_sam2_video_predictor with the same checkpoint; init_state on a JPEG folder of the same
frames, add_new_points_or_box, propagate_in_video) on seeded random weights, with the same boxes.
hiera_tiny in the fast suite; the other hiera sizes build and track in the slow lane."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sam_backend.video.base import BoxPrompt
from tests.support.video import (JpegFolderClip, assert_same_tracks, moving_shapes,
                                 write_jpeg_folder)

FRAMES, HEIGHT, WIDTH = 3, 120, 160


@pytest.fixture(scope="module")
def clip_and_boxes(tmp_path_factory):
    frames, boxes = moving_shapes(FRAMES, HEIGHT, WIDTH)
    folder = write_jpeg_folder(tmp_path_factory.mktemp("clip") / "frames", frames)
    return JpegFolderClip(folder), boxes


def settings_for(checkpoint, config="hiera_tiny"):
    from sam_backend.settings import Settings

    return Settings(model_name="sam2", sam_config=config, sam_checkpoint_file=str(checkpoint),
                    device="cpu", offline=True)


@pytest.fixture(scope="module")
def tracker(sam2_file):
    from sam_backend.assembly import create_tracker

    return create_tracker(settings_for(sam2_file))


@pytest.fixture(scope="module")
def library(sam2_file):
    from sam2.build_sam import build_sam2_video_predictor

    return build_sam2_video_predictor("configs/sam2.1/sam2.1_hiera_t.yaml", str(sam2_file),
                                      device="cpu")


def library_run(predictor, clip, steps):
    """``steps``: rounds of ``[(object_id, frame, box), ...]`` added before propagating; the
    last round's masks (HxW bool) and scores (sigmoid of the object score logit) by
    (object, frame)."""
    state = predictor.init_state(str(clip.paths[0].parent))
    masks, scores = {}, {}
    for round_ in steps:
        for object_id, frame, box in round_:
            predictor.add_new_points_or_box(state, frame_idx=frame, obj_id=object_id,
                                            box=np.asarray(box, np.float32))
        masks, scores = {}, {}
        for frame, object_ids, logits in predictor.propagate_in_video(state):
            for i, object_id in enumerate(object_ids):
                masks[(object_id, frame)] = (logits[i, 0] > 0).numpy()
                outputs = state["output_dict_per_obj"][i]
                out = outputs["cond_frame_outputs"].get(frame) or \
                    outputs["non_cond_frame_outputs"][frame]
                scores[(object_id, frame)] = float(torch.sigmoid(out["object_score_logits"]).flatten()[0])
    return masks, scores


def ours(session, prompts):
    masks = {}
    session.on_mask = lambda o, f, m: masks.__setitem__((o, f), m)
    try:
        return session.track(prompts), masks
    finally:
        session.on_mask = None


def test_our_state_is_the_one_init_state_builds(tracker, library, clip_and_boxes):
    clip, _ = clip_and_boxes
    ours_state = tracker.session(clip)._new_state()
    theirs = library.init_state(str(clip.paths[0].parent))
    assert set(ours_state) - {"feature_cache"} == set(theirs)


def test_two_objects_at_once_equal_the_library_run_separately(tracker, library, clip_and_boxes):
    clip, boxes = clip_and_boxes
    prompts = [BoxPrompt(1, 0, boxes[1][0]), BoxPrompt(2, 0, boxes[2][0])]
    tracks, masks = ours(tracker.session(clip), prompts)
    assert tracker.features.encoded == FRAMES  # each frame encoded once for both objects
    one = library_run(library, clip, [[(1, 0, boxes[1][0])]])
    two = library_run(library, clip, [[(2, 0, boxes[2][0])]])
    expected = ({**one[0], **two[0]}, {**one[1], **two[1]})
    assert_same_tracks(masks, tracks, expected, "two at once")
    assert set(tracks[1].scores) == set(range(FRAMES))


def test_a_correction_is_kept_as_a_conditioning_frame_like_the_library_given_both_boxes(
        tracker, library, clip_and_boxes):
    clip, boxes = clip_and_boxes
    session = tracker.session(clip)
    first = BoxPrompt(1, 0, boxes[1][0])
    before = session.track([first])[1]  # features cached by the previous test
    calls = []
    hook = tracker.predictor.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        tracks, masks = ours(session, [first, BoxPrompt(1, 2, boxes[1][2])])
    finally:
        hook.remove()
    assert calls == []
    expected = library_run(library, clip, [[(1, 0, boxes[1][0]), (1, 2, boxes[1][2])]])
    assert_same_tracks(masks, tracks, expected, "corrected")
    assert before.boxes != tracks[1].boxes or before.scores != tracks[1].scores, \
        "the correction changed nothing: the test would not see it ignored"


def test_the_tracker_shares_the_click_models_weights(sam2_file):
    from sam_backend.assembly import create_tracker, segmenter_for

    settings = settings_for(sam2_file)
    segmenter = segmenter_for(settings)
    tracker = create_tracker(settings, segmenter)
    click = segmenter.model.model.state_dict()
    video = tracker.predictor.state_dict()
    assert set(click) == set(video)
    assert all(video[k].data_ptr() == click[k].data_ptr() for k in click)


def test_a_click_model_loaded_under_inference_mode_is_shared_too(sam2_file, clip_and_boxes):
    """A server may load the click model inside ``torch.inference_mode()`` (when a request needs
    it first): its tensors are inference tensors, which the tracker takes as they are."""
    from sam_backend.models.checkpoints import infer_variant
    from sam_backend.models.loading import read_state_dict
    from sam_backend.video.sam2_tracker import build_video_predictor, load_video_predictor

    variant = infer_variant("sam2", "hiera_tiny", str(sam2_file))
    click = build_video_predictor(variant)  # a SAM2Base, as the click model's module is
    with torch.inference_mode():
        click.load_state_dict(read_state_dict(sam2_file), assign=True)
    assert all(p.is_inference() for p in click.parameters())
    predictor = load_video_predictor(variant, click_model=click)
    assert all(p.data_ptr() == q.data_ptr()
               for p, q in zip(predictor.parameters(), click.parameters()))
    clip, boxes = clip_and_boxes
    from sam_backend.video.sam2_tracker import Sam2Tracker

    tracks = Sam2Tracker(predictor).session(clip).track([BoxPrompt(1, 0, boxes[1][0])])
    assert sorted(tracks[1].boxes) == list(range(FRAMES))


@pytest.mark.slow
@pytest.mark.parametrize("config", ["hiera_small", "hiera_base_plus", "hiera_large"])
def test_every_hiera_size_builds_and_tracks(config, checkpoint_factory, clip_and_boxes,
                                            release_memory):
    from sam_backend.assembly import create_tracker

    clip, boxes = clip_and_boxes
    tracker = create_tracker(settings_for(checkpoint_factory("sam2", config), config))
    tracks = tracker.session(clip).track([BoxPrompt(1, 0, boxes[1][0])], stop=2)
    assert sorted(tracks[1].boxes) == [0, 1]
