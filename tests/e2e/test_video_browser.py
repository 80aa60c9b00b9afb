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

The backend of that test is the recording stand-in of tests/support/capture_backend.py. The
second test, :func:`test_the_backends_track_is_drawn_in_the_editor_and_stored`, runs the whole
loop with the real sam_backend server (SAM 2.1 on random weights): the box submitted in the
editor, the backend's track asked for the ways Label Studio asks (the editor's reload after
Submit, *Retrieve Predictions*), drawn by the editor on later frames, duplicated into an
annotation and stored.

Needs Chromium and playwright (``bash scripts/setup_browser.sh``); ``SAM_BACKEND_SKIP_BROWSER=1``
skips them. Selectors and timings: tests/e2e/README.md.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time

import pytest
import requests

from sam_backend.labelstudio.label_config import parse_label_config
from sam_backend.labelstudio.video_regions import (VideoObject, prompts_from_regions,
                                                   task_box_regions, track_regions,
                                                   video_controls)
from sam_backend.video.base import ClipInfo, Track
from tests.e2e.test_browser import (CHROMIUM, CHROMIUM_ARGS, VIEWPORT, Steps, _require_browser,
                                    backend_env, in_browser)
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


# ------------------------------------------------------------------------------------------------
# The backend's own tracks, end to end: the real sam_backend server (SAM 2.1 on random weights)

TRACK_FPS, TRACK_CLIP_FRAMES = 12.0, 24
TRACK_FRAMES = 4   # max_track_frames: frames tracked from the first box
ANSWER_FRAMES = 2  # video_answer_frames: the first answer (partial), the rest in the background
TRACK_TIMEOUT = 300  # s: the whole background pass of TRACK_FRAMES frames on a busy CPU

_JS_PREDICTIONS = """() => window.Htx.annotationStore.predictions.map(p => String(p.pk))"""
# the region of prediction `pk` as the editor draws it: for each frame, whether it is shown
# (the editor's own isInLifespan) and its shape there (getShape: keyframe or interpolation)
_JS_DRAWN = """([pk, frames]) => { const s = window.Htx.annotationStore;
  const p = s.predictions.find(q => String(q.pk) === pk); s.selectPrediction(p.id);
  const rs = p.regionStore.regions; const r = rs[0]; const out = {};
  for (let f = 1; f <= frames; f++) { const sh = r.getShape(f);
    out[f] = [r.isInLifespan(f), sh ? [sh.x, sh.y, sh.width, sh.height] : null]; }
  return {n: rs.length, type: r.type, labels: r.labels, frames: out}; }"""


def _log_in(page, ls):
    page.goto(f"{ls.url}/user/login/")
    page.fill("#email", ls.username)
    page.fill("#password", ls.password)
    page.click("button.login-button")
    page.wait_for_url(lambda url: "/user/login" not in url)


def _open_video_task(page, ls, pid, tid):
    page.goto(f"{ls.url}/projects/{pid}/data?task={tid}")
    page.wait_for_function(_JS_VIDEO_READY, timeout=EDITOR_TIMEOUT)


def _retrieve_predictions(page, ls, pid, tid, steps):
    """The data manager's *Retrieve Predictions* for task ``tid``, as an annotator runs it."""
    steps("log in")
    _log_in(page, ls)
    steps("retrieve predictions")
    page.goto(f"{ls.url}/projects/{pid}/data")
    page.get_by_label(f"Select Task {tid}").wait_for(state="attached")
    # the row's checkbox <input> is styled away: click the box drawn for it
    page.locator('[data-testid="table-row"] .lsf-select-row').first.locator(
        "[class*=checkbox__box]").click()
    # the Actions button is enabled once a task is selected (it then reads "1 Task")
    page.locator('button[aria-label="Tasks Actions"]:not([disabled])').click()
    page.get_by_text("Retrieve Predictions", exact=True).click()
    with page.expect_response(lambda r: "/api/dm/actions" in r.url
                              and "retrieve_tasks_predictions" in r.url,
                              timeout=EDITOR_TIMEOUT) as done:
        page.locator('[data-testid="dialog-ok-button"]').click()  # the dialog's OK
    assert done.value.status == 200, done.value.text()[:500]


def _backend_lines(backend, pattern):
    try:
        text = backend.log_path.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if pattern in line]


def _shown_by_editor_rule(sequence, frames):
    """Frames (1-based) on which Label Studio's editor shows a region with these keyframes
    (docs/video-protocol.md, "Keyframes as the editor reads them")."""
    shown = []
    for f in range(1, frames + 1):
        before = [k for k in sequence if k["frame"] <= f]
        if before and (before[-1]["enabled"] or before[-1]["frame"] == f):
            shown.append(f)
    return shown


def test_the_backends_track_is_drawn_in_the_editor_and_stored(
        label_studio, backend_process, sam2_file, tmp_path):
    """The annotator boxes the red square on frame 1 and submits; the real backend (SAM 2.1
    hiera_tiny, seeded random weights, cpu) tracks it when the editor reloads the task after the
    submit (its first ANSWER_FRAMES frames, under ``<version>:partial``); when the rest is
    tracked the backend replaces that prediction with the whole track itself (video_deliver);
    the editor draws the backend's keyframes on the later frames; the annotator
    duplicates the prediction into an annotation and submits it; Label Studio stores those
    keyframes. Also checked: when Label Studio asks and when it does not (opening a task that
    holds a prediction, Retrieve with a prediction of the backend's version, after Delete
    Predictions), as docs/video-protocol.md says.

    Random weights do not follow the square: checked is what the code guarantees (a keyframe per
    tracked frame, the answer equal to the backend's, drawn and stored as answered)."""
    steps = Steps()
    steps("start backend")
    port = free_port()
    backend = backend_process(
        ["label-studio-ml", "start", "sam", "--with", "model_name=sam2", "sam_config=hiera_tiny",
         f"sam_checkpoint_file={sam2_file}", "device=cpu", "runtime=torch",
         f"max_track_frames={TRACK_FRAMES}", f"video_answer_frames={ANSWER_FRAMES}",
         "video_answer_timeout=60", "-p", str(port), "--host", "127.0.0.1"],
        port, env=backend_env(label_studio, tmp_path), cwd=REPO, timeout=240,
        name="sam-backend")
    version = requests.get(f"{backend.url}/health", timeout=10).json()["model_version"]

    steps("create project")
    api = label_studio.api
    config = (REPO / "xml_templates" / "video.xml").read_text().replace(
        'framerate="25.0"', f'framerate="{TRACK_FPS}"')
    config = config.replace('"Person"', '"square"').replace('"Car"', '"disc"')
    project = api.create_project("e2e video tracks", config)
    pid = project["id"]
    clip = tmp_path / "shapes.webm"
    truth = write_shapes_clip(clip, frames=TRACK_CLIP_FRAMES, fps=TRACK_FPS, width=W, height=H)
    [task] = api.import_image(pid, clip, content_type="video/webm")
    tid = task["id"]
    ml = api.add_ml_backend(pid, backend.url, is_interactive=False)
    assert ml["state"] == "CO", ml
    asked = lambda: len(_backend_lines(backend, "predict: "))  # noqa: E731  /predict answered

    # 1. the annotator boxes the square on frame 1 and submits; the editor then reloads the task
    #    (GET /api/tasks/<id>), which makes Label Studio ask the backend (the task has no
    #    prediction yet): the first frames of the track come back into the same editor
    seen: dict = {}
    posted: list = []

    def draw_and_submit(page):
        page.on("request", lambda r: posted.append(f"{r.method} {r.url}")
                if "/api/" in r.url and r.method != "OPTIONS" else None)
        steps("log in")
        _log_in(page, label_studio)
        steps("open task")
        _open_video_task(page, label_studio, pid, tid)
        seen["asked_on_open"] = asked()
        steps("draw box on frame 1")
        page.locator(".lsf-label", has_text="square").first.click()
        stage = page.locator(".konvajs-content").first.bounding_box()
        ox = stage["x"] + (stage["width"] - W) / 2
        oy = stage["y"] + (stage["height"] - H) / 2
        x0, y0, x1, y1 = truth[0]["square"]
        _drag(page, (ox + x0, oy + y0), (ox + x1, oy + y1))
        page.wait_for_function("() => window.Htx.annotationStore.selected.regionStore"
                               ".regions.length === 1")
        steps("submit")
        with page.expect_response(lambda r: f"/api/tasks/{tid}/annotations" in r.url
                                  and r.request.method == "POST") as sub:
            page.locator('[data-testid="bottombar-submit-button"]').click()
        assert sub.value.status == 201, sub.value.text()[:500]
        steps("the first frames of the track")
        page.wait_for_function("() => window.Htx.annotationStore.predictions.length >= 1",
                               timeout=EDITOR_TIMEOUT)
        seen["pks"] = page.evaluate(_JS_PREDICTIONS)
        seen["partial"] = page.evaluate(_JS_DRAWN, [seen["pks"][0], TRACK_CLIP_FRAMES])

    in_browser(tmp_path, steps, seen, draw_and_submit)
    assert seen["asked_on_open"] >= 1  # the task opened without a box: asked, nothing stored
    # after the submit the editor reloaded the task: that GET is what asked the backend
    submitted = [i for i, r in enumerate(posted) if r.startswith("POST ")
                 and f"/api/tasks/{tid}/annotations" in r]
    assert submitted and [r for r in posted[submitted[0]:]
                          if r.startswith("GET ") and f"/api/tasks/{tid}?" in r], posted
    [boxed] = api.list_annotations(tid)
    [drawn] = boxed["result"]
    assert [k["frame"] for k in drawn["value"]["sequence"]] == [1]
    [key] = drawn["value"]["sequence"]
    assert (key["x"] / 100 * W, key["y"] / 100 * H) == pytest.approx(truth[0]["square"][:2],
                                                                       abs=10)
    [partial] = api.get(f"/api/predictions?task={tid}")
    assert partial["model_version"] == f"{version}:partial"
    assert seen["pks"] == [str(partial["id"])]
    [region] = partial["result"]
    assert (region["type"], region["from_name"], region["to_name"], region["value"]["labels"]) \
        == ("videorectangle", "box", "video", ["square"])
    sequence = region["value"]["sequence"]
    # the first ANSWER_FRAMES frames, a keyframe each (the seeded random tracker's masks are never
    # empty here); the last one disabled: tracking stopped there, so far
    assert [k["frame"] for k in sequence] == list(range(1, ANSWER_FRAMES + 1))
    assert [k["enabled"] for k in sequence] == [True] * (ANSWER_FRAMES - 1) + [False]
    _assert_drawn(seen["partial"], sequence)

    # 2. the rest is tracked in the background; when it is done the backend itself replaces the
    #    partial prediction with the whole track (video_deliver: Label Studio would not ask again
    #    on open, the task holds a prediction). Opening the task does not ask; neither does
    #    Retrieve predictions now (the task holds a prediction of the backend's version)
    steps("background pass, delivered")
    deadline = time.monotonic() + TRACK_TIMEOUT
    predictions = []
    while time.monotonic() < deadline:
        predictions = api.get(f"/api/predictions?task={tid}")
        # the backend logs the write once Label Studio has answered it
        if [p["model_version"] for p in predictions] == [version] and \
                _backend_lines(backend, "finished track written in Label Studio"):
            break
        time.sleep(1)
    assert [p["model_version"] for p in predictions] == [version], backend.log_tail()
    assert _backend_lines(backend, "finished track written in Label Studio")
    before = asked()
    sent = api.get_task(tid)  # what opening the task in the editor does (GET /api/tasks/<id>)
    assert asked() == before, "opening a task that holds a prediction asked the backend"
    in_browser(tmp_path, steps, seen, lambda page: _retrieve_predictions(
        page, label_studio, pid, tid, steps))
    assert asked() == before
    assert api.get(f"/api/predictions?task={tid}") == predictions
    [done] = [p for p in predictions if p["model_version"] == version]
    [track] = done["result"]
    assert track["value"]["labels"] == ["square"] and track["type"] == "videorectangle"
    sequence = track["value"]["sequence"]
    assert [k["frame"] for k in sequence] == list(range(1, TRACK_FRAMES + 1))
    assert [k["enabled"] for k in sequence] == [True] * (TRACK_FRAMES - 1) + [False]
    # what Label Studio stored is what the backend answers for this task
    answer = requests.post(f"{backend.url}/predict", timeout=60, json={
        "tasks": [sent], "label_config": config, "project": f"{pid}.1",
        "params": {"context": None}}).json()["results"][0]
    assert answer["model_version"] == version
    assert [r["value"] for r in answer["result"]] == [track["value"]]

    # 2b. a correction: the annotator moves their box on frame 3 and updates the annotation
    #    (a keyframe more). Label Studio's webhook (ANNOTATION_UPDATED, auto-created with the
    #    backend) makes the backend track from both boxes and, when done, replace its prediction;
    #    no Delete/Retrieve Predictions. (The update goes through the API the editor's Update
    #    button calls: the same webhook.)
    steps("correction on frame 3")
    corrected = json.loads(json.dumps(drawn))
    cx0, cy0, cx1, cy1 = truth[2]["square"]
    corrected["value"]["sequence"].append(
        {**corrected["value"]["sequence"][0], "frame": 3, "time": 2 / TRACK_FPS,
         "x": 100 * cx0 / W, "y": 100 * cy0 / H, "width": 100 * (cx1 - cx0) / W,
         "height": 100 * (cy1 - cy0) / H})
    api.request("PATCH", f"/api/annotations/{boxed['id']}/", json={"result": [corrected]})
    deadline = time.monotonic() + TRACK_TIMEOUT
    while time.monotonic() < deadline:
        predictions = api.get(f"/api/predictions?task={tid}")
        if [p["model_version"] for p in predictions] == [version] and \
                predictions[0]["id"] != done["id"]:
            break
        time.sleep(1)
    assert [p["model_version"] for p in predictions] == [version], backend.log_tail()
    assert predictions[0]["id"] != done["id"], backend.log_tail()  # replaced
    assert _backend_lines(backend, "tracking the annotation's 2 box(es)")
    [done] = predictions
    [track] = done["result"]
    sequence = track["value"]["sequence"]
    assert [k["frame"] for k in sequence] == list(range(1, TRACK_FRAMES + 1))
    # what was written is what the backend answers for the task as it is now (both boxes)
    sent = api.get_task(tid)
    answer = requests.post(f"{backend.url}/predict", timeout=60, json={
        "tasks": [sent], "label_config": config, "project": f"{pid}.1",
        "params": {"context": None}}).json()["results"][0]
    assert answer["model_version"] == version
    assert [r["value"] for r in answer["result"]] == [track["value"]]

    # 3. the annotator opens the task: the track is drawn on the later frames; they duplicate
    #    the prediction into an annotation (its menu in the annotations bar) and submit it
    def accept(page):
        steps("open task: the whole track")
        _log_in(page, label_studio)
        _open_video_task(page, label_studio, pid, tid)
        page.wait_for_function("() => window.Htx.annotationStore.predictions.length === 1")
        seen["done"] = page.evaluate(_JS_DRAWN, [str(done["id"]), TRACK_CLIP_FRAMES])
        steps("duplicate the prediction")
        button = page.locator(f'.lsf-annotation-button[data-annotation-id="{done["id"]}"]',
                              has=page.locator(".lsf-annotation-button__userpic_prediction"))
        button.click()
        button.locator(".lsf-annotation-button__trigger").click()
        page.get_by_text("Duplicate Annotation", exact=True).click()
        page.wait_for_function("""() => { const a = window.Htx.annotationStore.selected;
            return a.type === 'annotation' && !a.pk && a.regionStore.regions.length === 1; }""")
        seen["copy"] = page.evaluate(_JS_DRAWN_SELECTED, TRACK_CLIP_FRAMES)
        steps("submit")
        with page.expect_response(lambda r: f"/api/tasks/{tid}/annotations" in r.url
                                  and r.request.method == "POST") as sub:
            page.locator('[data-testid="bottombar-submit-button"]').click()
        assert sub.value.status == 201, sub.value.text()[:500]

    in_browser(tmp_path, steps, seen, accept)
    _assert_drawn(seen["done"], sequence)
    _assert_drawn(seen["copy"], sequence)

    steps("check stored annotation")
    annotations = api.list_annotations(tid)
    assert len(annotations) == 2
    [stored] = [a for a in annotations if a["id"] != boxed["id"]]
    [result] = stored["result"]
    assert (result["type"], result["from_name"], result["to_name"], result["value"]["labels"]) \
        == ("videorectangle", "box", "video", ["square"])
    keys = ("frame", "enabled", "x", "y", "width", "height")
    assert [tuple(k[n] for n in keys) for k in result["value"]["sequence"]] == \
        [tuple(k[n] for n in keys) for k in sequence]
    assert [k["frame"] for k in result["value"]["sequence"]][1:]  # later frames are stored
    # the task holds a prediction of the backend's version: Label Studio asks no more for it,
    # not even on Retrieve predictions (new boxes need its predictions deleted first)
    before = asked()
    api.post(f"/api/dm/actions?id=retrieve_tasks_predictions&project={pid}",
             {"ordering": [], "selectedItems": {"all": False, "included": [tid]},
              "filters": {"conjunction": "and", "items": []}, "project": str(pid)})
    assert asked() == before
    # ... until they are deleted (the data manager's Delete Predictions): then Retrieve
    # predictions asks again, with the boxes of the latest annotation (the accepted track)
    steps("delete predictions, retrieve again")
    for action in ("delete_tasks_predictions", "retrieve_tasks_predictions"):
        api.post(f"/api/dm/actions?id={action}&project={pid}",
                 {"ordering": [], "selectedItems": {"all": False, "included": [tid]},
                  "filters": {"conjunction": "and", "items": []}, "project": str(pid)})
    assert asked() == before + 1
    [again] = api.get(f"/api/predictions?task={tid}")
    assert again["model_version"] in (version, f"{version}:partial")
    steps("done")
    sys.stderr.write(f"[video tracks] timings: {steps.summary()}\n")


_JS_DRAWN_SELECTED = """(frames) => { const a = window.Htx.annotationStore.selected;
  const rs = a.regionStore.regions; const r = rs[0]; const out = {};
  for (let f = 1; f <= frames; f++) { const sh = r.getShape(f);
    out[f] = [r.isInLifespan(f), sh ? [sh.x, sh.y, sh.width, sh.height] : null]; }
  return {n: rs.length, type: r.type, labels: r.labels, frames: out}; }"""


def _assert_drawn(drawn, sequence):
    """The editor's store shows one square region on the frames the keyframes say (its own
    isInLifespan), with each keyframe's box on its frame (its own getShape), later frames too."""
    assert drawn["n"] == 1 and drawn["type"] == "videorectangleregion", drawn
    assert drawn["labels"] == ["square"], drawn
    frames = len(drawn["frames"])
    shown = [int(f) for f, (on, _shape) in drawn["frames"].items() if on]
    assert sorted(shown) == _shown_by_editor_rule(sequence, frames)
    assert max(shown) > 1
    for k in sequence:
        assert drawn["frames"][str(k["frame"])][1] == pytest.approx(
            [k["x"], k["y"], k["width"], k["height"]], abs=1e-6)
