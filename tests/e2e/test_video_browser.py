"""The video protocol in a real browser: Label Studio 1.23.2's editor in headless Chromium.

An annotator switches Auto-Annotation on, picks the label "square", drags a box around the red
square on frame 1 of a synthetic clip, moves it onto the square on frame 20 (a correction
keyframe) and submits. Checked (docs/video-protocol.md):

* the editor never posts ``/api/ml/<id>/interactive-annotating`` for video (the backend gets no
  request with a context), so tracking cannot be interactive in the OSS editor;
* the stored annotation is one ``videorectangle`` with keyframes 1 and 20 whose boxes, read by
  :func:`prompts_from_regions`, are the square's true boxes on clip frames 0 and 19;
* a prediction made of tracks (:func:`track_regions`), answered on *Retrieve predictions*, is
  what the editor loads: the region is shown on the tracked frames and hidden where the object
  is gone and after tracking stopped (the editor's own ``isInLifespan`` / ``getShape``).

Needs Chromium and playwright (``bash scripts/setup_browser.sh``); ``SAM_BACKEND_SKIP_BROWSER=1``
skips it. The backend is the recording stand-in of tests/support/capture_backend.py.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time

import pytest

from sam_backend.labelstudio.label_config import parse_label_config
from sam_backend.labelstudio.video_regions import (VideoObject, prompts_from_regions,
                                                   task_box_regions, track_regions,
                                                   video_controls)
from sam_backend.video.base import ClipInfo, Track
from tests.e2e.test_browser import CHROMIUM, CHROMIUM_ARGS, VIEWPORT, _require_browser
from tests.support.capture_backend import serve
from tests.support.ls_harness import free_port
from tests.support.server_utils import REPO
from tests.support.videos import write_shapes_clip

FPS, FRAMES, W, H = 12.0, 48, 320, 240
EDITOR_TIMEOUT = 90_000

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(900),
    pytest.mark.skipif(bool(os.environ.get("SAM_BACKEND_SKIP_BROWSER")),
                       reason="SAM_BACKEND_SKIP_BROWSER is set"),
]

_JS_VIDEO_READY = """() => { const s = window.Htx && window.Htx.annotationStore;
  const a = s && s.selected; const v = a && a.names.get('video');
  return !!(v && v.length > 1); }"""


def _drag(page, start, end, steps=10):
    page.mouse.move(*start)
    page.mouse.down()
    for k in range(1, steps + 1):
        page.mouse.move(start[0] + (end[0] - start[0]) * k / steps,
                        start[1] + (end[1] - start[1]) * k / steps)
        time.sleep(0.03)
    page.mouse.up()


def _set_frame(page, frame):
    page.evaluate(f"() => window.Htx.annotationStore.selected.names.get('video').setFrame({frame})")
    page.wait_for_function(
        f"() => window.Htx.annotationStore.selected.names.get('video').frame === {frame}")
    time.sleep(0.8)  # the video element seeks


def test_the_video_editor_sends_no_click_and_draws_a_tracked_prediction(label_studio, tmp_path):
    _require_browser()
    from playwright.sync_api import sync_playwright

    api = label_studio.api
    config = (REPO / "xml_templates" / "video.xml").read_text().replace(
        'framerate="25.0"', f'framerate="{FPS}"')
    config = config.replace('"Person"', '"square"').replace('"Car"', '"disc"')
    project = api.create_project("e2e video browser", config)
    clip = tmp_path / "shapes.webm"
    truth = write_shapes_clip(clip, frames=FRAMES, fps=FPS, width=W, height=H)
    [task] = api.import_image(project["id"], clip, content_type="video/webm")
    port = free_port()
    log, answer = tmp_path / "requests.jsonl", tmp_path / "answer.json"
    server = serve(port, log, answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    api.add_ml_backend(project["id"], f"http://127.0.0.1:{port}", is_interactive=True)
    [c] = video_controls(parse_label_config(config))
    info = ClipInfo(FRAMES, FPS, W, H)

    posted = []
    console = []
    profile = tmp_path / "chromium-profile"
    try:
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                viewport=VIEWPORT, timeout=60_000)
            page = ctx.new_page()
            page.set_default_timeout(30_000)
            page.on("request", lambda r: posted.append(r.url)
                    if r.method == "POST" and "/api/" in r.url else None)
            page.on("console", lambda m: console.append(m.text[:300])
                    if m.type == "error" else None)
            try:
                page.goto(f"{label_studio.url}/user/login/")
                page.fill("#email", label_studio.username)
                page.fill("#password", label_studio.password)
                page.click("button.login-button")
                page.wait_for_url(lambda url: "/user/login" not in url)

                # 1. the annotator boxes the square on frame 1 and corrects it on frame 20
                page.goto(f"{label_studio.url}/projects/{project['id']}/data?task={task['id']}")
                page.wait_for_function(_JS_VIDEO_READY, timeout=EDITOR_TIMEOUT)
                assert page.evaluate("() => window.Htx.annotationStore.selected.names"
                                     ".get('video').length") == FRAMES
                toggle = page.locator('[data-testid="bottombar-auto-annotation-toggle"]')
                toggle.click(force=True)
                page.wait_for_function("() => window.Htx.autoAnnotation === true")
                page.locator(".lsf-label", has_text="square").first.click()
                # the video is drawn at its natural size in the middle of the Konva stage
                stage = page.locator(".konvajs-content").first.bounding_box()
                ox = stage["x"] + (stage["width"] - W) / 2
                oy = stage["y"] + (stage["height"] - H) / 2
                x0, y0, x1, y1 = truth[0]["square"]
                _drag(page, (ox + x0, oy + y0), (ox + x1, oy + y1))
                page.wait_for_function("() => window.Htx.annotationStore.selected.regionStore"
                                       ".regions.length === 1")
                _set_frame(page, 20)
                grab = ((x0 + x1) / 2, (y0 + y1) / 2)
                dx = truth[19]["square"][0] - x0
                _drag(page, (ox + grab[0], oy + grab[1]), (ox + grab[0] + dx, oy + grab[1]))
                page.wait_for_function("() => window.Htx.annotationStore.selected.regionStore"
                                       ".regions[0].sequence.length === 2")
                time.sleep(2)  # an interactive request would go now
                page.locator('[data-testid="bottombar-submit-button"]').click()
                page.wait_for_function("() => window.Htx.annotationStore.selected.pk")
            finally:
                ctx.close()

        assert not [u for u in posted if "interactive-annotating" in u], posted
        sent = [json.loads(line) for line in log.read_text().splitlines()]
        assert not [r for r in sent if r["path"] == "/predict"
                    and (r["body"]["params"] or {}).get("context")]

        [stored] = api.list_annotations(task["id"])
        [region] = stored["result"]
        assert (region["type"], region["from_name"], region["to_name"]) == (
            "videorectangle", "box", "video")
        assert region["value"]["labels"] == ["square"]
        assert region["value"]["framesCount"] == FRAMES
        assert [k["frame"] for k in region["value"]["sequence"]] == [1, 20]
        prompts, objects = prompts_from_regions(task_box_regions({"annotations": [stored]}, c),
                                                info, c.framerate(task))
        assert objects == [VideoObject(0, region["id"], "square")]
        assert [p.frame for p in prompts] == [0, 19]
        for p in prompts:
            assert p.box == pytest.approx(truth[p.frame]["square"], abs=1.5)

        # 2. the tracked answer, on Retrieve predictions, as the editor loads it
        track = Track(0)
        for i in range(0, 40):
            track.boxes[i] = None if 25 <= i < 30 else tuple(map(float, truth[i]["square"]))
        regions = track_regions({0: track}, objects, c, info, FPS)
        answer.write_text(json.dumps({"results": [{"result": regions, "score": 0.5}]}))
        api.post(f"/api/dm/actions?id=retrieve_tasks_predictions&project={project['id']}",
                 {"ordering": [], "selectedItems": {"all": False, "included": [task["id"]]},
                  "filters": {"conjunction": "and", "items": []},
                  "project": str(project["id"])})
        [prediction] = api.get(f"/api/predictions?task={task['id']}")
        assert prediction["result"][0]["value"] == regions[0]["value"]

        shutil.rmtree(profile, ignore_errors=True)
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                viewport=VIEWPORT, timeout=60_000)
            page = ctx.new_page()
            page.set_default_timeout(30_000)
            try:
                page.goto(f"{label_studio.url}/user/login/")
                page.fill("#email", label_studio.username)
                page.fill("#password", label_studio.password)
                page.click("button.login-button")
                page.wait_for_url(lambda url: "/user/login" not in url)
                page.goto(f"{label_studio.url}/projects/{project['id']}/data?task={task['id']}")
                page.wait_for_function(_JS_VIDEO_READY, timeout=EDITOR_TIMEOUT)
                page.wait_for_function("() => window.Htx.annotationStore.predictions.length === 1")
                seen = page.evaluate("""() => { const s = window.Htx.annotationStore;
                    const p = s.predictions[0]; s.selectPrediction(p.id);
                    const r = p.regionStore.regions[0]; const out = {};
                    for (let f = 1; f <= 48; f++) {
                      const shape = r.getShape(f);
                      out[f] = [r.isInLifespan(f), shape ? shape.x : null]; }
                    return {n: p.regionStore.regions.length, labels: r.labels, frames: out}; }""")
            finally:
                ctx.close()
        assert seen["n"] == 1 and seen["labels"] == ["square"]
        shown = sorted(int(f) for f, (on, _x) in seen["frames"].items() if on)
        # tracked on clip frames 0..39 (Label Studio 1..40), gone on 25..29 (26..30)
        assert shown == list(range(1, 26)) + list(range(31, 41))
        for f in shown:
            x = seen["frames"][str(f)][1]
            assert x / 100 * W == pytest.approx(truth[f - 1]["square"][0], abs=0.01)
    except BaseException:
        sys.stderr.write(f"\n[video browser] POSTs: {posted}\nconsole errors: {console[-20:]}\n")
        raise
    finally:
        server.shutdown()
        server.server_close()
        shutil.rmtree(profile, ignore_errors=True)
