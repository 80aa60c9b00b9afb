"""``video_deliver`` without a Label Studio to write to (down, its address unknown), and with a
failed or unfinished pass: the delivery is dropped with a message that says what to do (the track
is still fetched by Retrieve Predictions), the loop goes on, nothing is raised into the server.
And which of Label Studio's annotation webhooks are tracked. (Writing to a real Label Studio:
tests/e2e/test_video_with_label_studio.py and test_video_browser.py.)"""
from __future__ import annotations

import logging
import socket
import time

import pytest

from sam_backend.errors import ConfigError, SamBackendError
from sam_backend.images.config import ImageAccessSettings
from sam_backend.images.loader import ImageLoader
from sam_backend.labelstudio.api import LabelStudioAPI
from sam_backend.labelstudio.deliveries import ATTEMPTS, TrackDeliveries
from sam_backend.video.base import BoxPrompt
from sam_backend.video.jobs import TrackingJobs, TrackRequest, TrackResult

REQUEST = TrackRequest("/data/upload/1/a.mp4", 7, "clip-a", (BoxPrompt(0, 0, (0.1, 0.1, 0.5, 0.5)),),
                       "sam2:test", answer_frames=2)
PREDICTION = {"result": [], "score": 0.0, "model_version": "v1"}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def no_tracking() -> TrackingJobs:
    """Jobs whose results the test writes: no tracker is loaded, no clip opened."""
    return TrackingJobs(lambda: pytest.fail("no tracker is loaded"),
                        lambda url, task_id: pytest.fail("no clip is opened"))


def deliveries(tmp_path, url=None) -> TrackDeliveries:
    images = ImageLoader(ImageAccessSettings(label_studio_url=url, api_key="k" * 40,
                                             cache_dir=str(tmp_path / "cache")))
    return TrackDeliveries(no_tracking(), lambda: LabelStudioAPI(images), "v1", poll_s=0.02,
                           settle_s=0.0)


def test_label_studio_down_is_a_clear_error_then_the_delivery_is_dropped(tmp_path, caplog):
    url = f"http://127.0.0.1:{closed_port()}"
    d = deliveries(tmp_path, url)
    with pytest.raises(SamBackendError) as raised:
        d.deliver(7, PREDICTION)
    assert "127.0.0.1" in str(raised.value)
    d.jobs.results.put(REQUEST.key, TrackResult("done", {}, 3, 3, 3, (96, 64)))
    with caplog.at_level(logging.WARNING, "sam_backend.labelstudio.deliveries"):
        d.watch(7, REQUEST, lambda result: PREDICTION)
        d.watch(7, REQUEST, lambda result: PREDICTION)  # the same pass for the same task: once
        assert d.watching == 1
        assert d.wait(10)  # tried ATTEMPTS times with a growing pause, then dropped
    [line] = [r.getMessage() for r in caplog.records if r.name.endswith(".deliveries")]
    assert "could not be written to Label Studio" in line and "Retrieve Predictions" in line
    assert d.delivered == 0 and ATTEMPTS > 1
    d.close()


def test_without_label_studio_s_address_nothing_is_retried(tmp_path, caplog):
    d = deliveries(tmp_path, url=None)
    with pytest.raises(ConfigError, match="LABEL_STUDIO_URL"):
        d.deliver(7, PREDICTION)
    d.jobs.results.put(REQUEST.key, TrackResult("done", {}, 3, 3, 3, (96, 64)))
    with caplog.at_level(logging.WARNING, "sam_backend.labelstudio.deliveries"):
        d.watch(7, REQUEST, lambda result: PREDICTION)
        assert d.wait(5)
    [line] = [r.getMessage() for r in caplog.records if r.name.endswith(".deliveries")]
    assert "LABEL_STUDIO_URL" in line and "Retrieve Predictions fetches it" in line
    d.close()


def test_an_unfinished_pass_is_waited_for_and_a_failed_one_dropped(tmp_path, caplog):
    d = deliveries(tmp_path, url=None)
    d.jobs.results.put(REQUEST.key, TrackResult("partial", {}, 1, 3, 3, (96, 64)))
    built = []
    with caplog.at_level(logging.WARNING, "sam_backend.labelstudio.deliveries"):
        d.watch(7, REQUEST, lambda result: built.append(result) or PREDICTION)
        time.sleep(0.3)  # many polls: partial is not delivered
        assert d.watching == 1 and not built
        d.jobs.results.put(REQUEST.key, TrackResult("failed", {}, error="the video is corrupt"))
        assert d.wait(5)
    assert not built
    [line] = [r.getMessage() for r in caplog.records if r.name.endswith(".deliveries")]
    assert "tracking failed (the video is corrupt)" in line
    d.close()


# -- Label Studio's annotation webhooks: which ones are tracked ------------------------------------

VIDEO_CONFIG = """<View>
  <Labels name="videoLabels" toName="video"><Label value="car"/></Labels>
  <Video name="video" value="$video" framerate="25"/>
  <VideoRectangle name="box" toName="video"/>
</View>"""
IMAGE_CONFIG = '<View><Image name="i" value="$image"/><RectangleLabels name="r" toName="i">' \
               '<Label value="car"/></RectangleLabels></View>'


def event(config=VIDEO_CONFIG, origin="manual", **annotation):
    """An ANNOTATION_UPDATED body as Label Studio 1.23.2 sends it (the keys that matter)."""
    region = {"id": "a", "type": "videorectangle", "from_name": "box", "to_name": "video",
              "origin": origin,
              "value": {"framesCount": 50, "duration": 2.0, "labels": ["car"],
                        "sequence": [{"frame": 1, "enabled": True, "rotation": 0, "x": 10,
                                      "y": 10, "width": 20, "height": 20, "time": 0.04}]}}
    return {"action": "ANNOTATION_UPDATED",
            "project": {"id": 3, "label_config": config},
            "task": {"id": 7, "data": {"video": "/data/upload/3/a.mp4"}, "project": 3},
            "annotation": {"id": 70, "result": [region], "was_cancelled": False,
                           "parent_prediction": None, **annotation}}


def video_side(tmp_path):
    from sam_backend.errors import VideoError
    from sam_backend.labelstudio.video_service import VideoPredictions
    from sam_backend.settings import Settings

    def no_clip(url, task_id):
        raise VideoError(f"{url}: no clip in this test")

    images = ImageLoader(ImageAccessSettings(label_studio_url=None,
                                             cache_dir=str(tmp_path / "cache")))
    jobs = TrackingJobs(lambda: pytest.fail("no tracker is loaded"), no_clip)
    d = TrackDeliveries(jobs, lambda: LabelStudioAPI(images), "v1", poll_s=0.02, settle_s=0.0)
    settings = Settings.load({"model_name": "sam2"}, environ={})
    return VideoPredictions(settings, images, jobs, "sam2:test", "v1", d), d


def test_which_annotation_events_are_tracked(tmp_path, caplog):
    videos, d = video_side(tmp_path)
    assert videos.track_annotation(event(config=IMAGE_CONFIG)) is None  # not a video task
    assert videos.track_annotation({"action": "ANNOTATION_UPDATED"}) is None  # no payload
    assert "comes from a prediction" in videos.track_annotation(event(parent_prediction=12))
    assert "comes from a prediction" in videos.track_annotation(event(origin="prediction-changed"))
    assert "skipped" in videos.track_annotation(event(was_cancelled=True))
    assert "no videorectangle" in videos.track_annotation(event(result=[]))
    assert d.watching == 0
    # an annotator's own boxes: tracked (here the clip cannot be opened: the pass fails, the
    # delivery is dropped with that reason, nothing is raised)
    with caplog.at_level(logging.WARNING, "sam_backend.labelstudio.deliveries"):
        assert videos.track_annotation(event()) == "tracking (started)"
        assert d.watching == 1
        assert d.wait(10)
    [line] = [r.getMessage() for r in caplog.records if r.name.endswith(".deliveries")]
    assert "tracking failed" in line and "no clip in this test" in line
    d.close()
    videos.jobs.close()
