"""An annotator's click, in a real browser: headless Chromium (Debian's package) driven by Playwright
opens Label Studio 1.23.2's labeling page, switches Auto-Annotation on, picks the smart KeyPoint
tool and the label "cat", clicks on a red disc, and sees the backend's brush region appear.

What happens on the way (all checked):
  browser --POST /api/ml/<id>/interactive-annotating {"task", "context": {"result": [keypoint]}}-->
  Label Studio --POST /predict--> backend (downloads the uploaded image from Label Studio with the
  legacy token it was given) --brushlabels--> Label Studio --{"data": {"result": [...]}}--> browser,
  which shows it as a suggestion ("1 suggestions"); accepting it turns it into a Brush region in the
  regions list; Submit stores it as an annotation.

Needs Chromium and the Python `playwright` client: ``bash scripts/setup_browser.sh``.
``SAM_BACKEND_SKIP_BROWSER=1`` skips this test. Timings and selectors: tests/e2e/README.md.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.ls_harness import free_port

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "xml_templates" / "point_to_brush.xml"
CHROMIUM = os.environ.get("SAM_BACKEND_CHROMIUM", "/usr/bin/chromium")
# Without the background-networking flags Chromium keeps trying to reach Google, and on a machine
# with a closed network those refused connections get in the way.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1400, "height": 900}

# the image: a big red disc on a plain pale background
W, H = 360, 240
CX, CY, R = 180, 120, 80
LABEL = "cat"

# explicit waits (ms)
PAGE_TIMEOUT = 30_000        # default for every Playwright action / wait
EDITOR_TIMEOUT = 90_000      # labeling page up: the editor's toolbar is rendered, image loaded
REQUEST_TIMEOUT = 15_000     # click -> the browser sends /interactive-annotating (immediate)
SUGGESTION_TIMEOUT = 90_000  # -> Label Studio answers with the backend's regions (the first click
                             #    may include downloading and encoding the image)

pytestmark = [
    pytest.mark.e2e,
    # a guard against a hung browser; generous because a cold session installs Label Studio here
    pytest.mark.timeout(900),
    pytest.mark.skipif(bool(os.environ.get("SAM_BACKEND_SKIP_BROWSER")),
                       reason="SAM_BACKEND_SKIP_BROWSER is set"),
]


def _disc_png(path: Path) -> Path:
    yy, xx = np.mgrid[0:H, 0:W]
    img = np.empty((H, W, 3), np.uint8)
    img[:] = (210, 220, 200)
    img[(xx - CX) ** 2 + (yy - CY) ** 2 <= R ** 2] = (200, 40, 40)
    Image.fromarray(img).save(path)
    return path


def _require_browser():
    """Fail (not skip) with the fix when the browser pieces are missing: CI must run this test."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail("the Python package `playwright` is not installed in this venv: run "
                    "`bash scripts/setup_browser.sh` (or set SAM_BACKEND_SKIP_BROWSER=1)")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"no Chromium at {CHROMIUM}: run `bash scripts/setup_browser.sh` (Debian's "
                    "`chromium` package) or set SAM_BACKEND_CHROMIUM (or SAM_BACKEND_SKIP_BROWSER=1)")


class Steps:
    """Named, timed steps; remembers which one was running when something failed."""

    def __init__(self):
        self.t0 = time.monotonic()
        self.current = "start"
        self.times: list[tuple[str, float]] = []

    def __call__(self, name: str) -> None:
        now = time.monotonic()
        self.times.append((name, now - self.t0))
        self.current = name
        sys.stderr.write(f"[browser {now - self.t0:6.1f} s] {name}\n")

    def summary(self) -> str:
        return ", ".join(f"{n} @{t:.1f}s" for n, t in self.times)


def _wait_until(page, condition, timeout_ms: float, poll_ms: int = 100) -> bool:
    """Poll ``condition()`` while letting Playwright deliver events (a short page wait each time)."""
    deadline = time.monotonic() + timeout_ms / 1000
    while not condition():
        if time.monotonic() > deadline:
            return False
        page.wait_for_timeout(poll_ms)
    return True


def _predict_lines(backend, pattern: str = r"predict: 1 result\(s\)") -> list[str]:
    try:
        text = backend.log_path.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if re.search(pattern, line)]


def backend_env(label_studio, tmp_path: Path) -> dict:
    """The environment the backend runs in: told where Label Studio is (the legacy token) for the
    uploaded image, a fresh image cache, this venv's ``label-studio-ml`` first on PATH."""
    return {**os.environ,
            "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
            "LABEL_STUDIO_URL": label_studio.url,
            "LABEL_STUDIO_API_KEY": label_studio.token,
            "SAM_BACKEND_IMAGE_CACHE_DIR": str(tmp_path / "image-cache")}


def in_browser(tmp_path: Path, steps: Steps, exchange: dict, work) -> None:
    """Launch headless Chromium (a fresh profile in ``tmp_path``) and run ``work(page)``; on any
    failure print the step that was running, a screenshot's path, the ``exchange`` (what the page
    sent and got back) and the browser console, then re-raise."""
    _require_browser()
    from playwright.sync_api import sync_playwright

    console: list[str] = []
    shot = tmp_path / "browser-failure.png"
    with sync_playwright() as pw:
        steps("launch chromium")
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport=VIEWPORT, timeout=60_000)
        page = ctx.new_page()
        page.set_default_timeout(PAGE_TIMEOUT)
        page.on("console", lambda m: console.append(f"console.{m.type}: {m.text[:300]}")
                if m.type in ("error", "warning", "log") else None)
        page.on("pageerror", lambda e: console.append(f"pageerror: {str(e)[:500]}"))
        try:
            work(page)
        except BaseException:
            try:
                page.screenshot(path=str(shot))
                where = f"screenshot: {shot}"
            except Exception as exc:  # the page may be gone
                where = f"no screenshot ({exc})"
            sys.stderr.write(
                f"\n===== browser test failed during step '{steps.current}' =====\n{where}\n"
                f"steps: {steps.summary()}\nurl: {page.url}\n"
                f"interactive-annotating: {_describe(exchange)}\n"
                "browser console (errors/warnings/logs, last 30):\n  "
                + "\n  ".join(console[-30:]) + "\n")
            raise
        finally:
            ctx.close()
    if not os.environ.get("SAM_BACKEND_E2E_KEEP"):
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def test_click_in_browser_shows_brush_region(label_studio, backend_process, checkpoint_factory,
                                             tmp_path):
    _require_browser()
    steps = Steps()

    # --- the backend, told how to reach Label Studio for the uploaded image -------------------
    steps("start backend")
    port = free_port()
    env = backend_env(label_studio, tmp_path)
    backend = backend_process(
        ["label-studio-ml", "start", "sam", "--with", "model_name=mobile_sam",
         f"sam_checkpoint_file={checkpoint_factory('mobile_sam')}", "device=cpu",
         "-p", str(port), "--host", "127.0.0.1"],
        port, env=env, cwd=REPO, timeout=240, name="sam-backend")

    # --- project, task, backend registration (API) --------------------------------------------
    steps("create project")
    api = label_studio.api
    project = api.create_project("browser click", TEMPLATE.read_text())
    pid = project["id"]
    task = api.import_image(pid, _disc_png(tmp_path / "disc.png"))[0]
    tid = task["id"]
    ml = api.add_ml_backend(pid, backend.url, is_interactive=True)
    assert ml["is_interactive"] and ml["state"] == "CO", ml
    predicts_before = len(_predict_lines(backend))

    # --- the browser ----------------------------------------------------------------------------
    exchange: dict = {}
    in_browser(tmp_path, steps, exchange,
               lambda page: _annotate(page, label_studio, pid, tid, steps, exchange))

    # --- what the backend and Label Studio saw --------------------------------------------------
    steps("check backend log")
    deadline = time.monotonic() + 15
    while len(_predict_lines(backend)) <= predicts_before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(_predict_lines(backend)) > predicts_before, (
        "the backend never logged 'predict: 1 result(s)' for the click:\n" + backend.log_tail())

    steps("check stored annotation")
    annotations = api.list_annotations(tid)
    assert len(annotations) == 1, annotations
    brush = [r for r in annotations[0]["result"] if r["type"] == "brushlabels"]
    assert len(brush) == 1, annotations[0]["result"]
    assert brush[0]["from_name"] == "BrushLabels" and brush[0]["to_name"] == "image"
    assert brush[0]["value"]["brushlabels"] == [LABEL]
    assert (brush[0]["original_width"], brush[0]["original_height"]) == (W, H)
    assert brush[0]["value"]["rle"], "empty RLE"
    assert not [r for r in annotations[0]["result"] if r["type"] == "keypointlabels"], \
        "the keypoint prompt should be gone once the suggestion is accepted"
    steps("done")
    sys.stderr.write(f"[browser] timings: {steps.summary()}\n")


def _describe(exchange: dict) -> str:
    """The click's request/answer for a failure message: answer first, long RLE cut short."""
    order = ["status", "answer", "editor", "lost_clicks", "request"]
    parts = [f"{k}={json.dumps(exchange[k])[:1200]}" for k in order if k in exchange]
    return "; ".join(parts) or "(no request seen)"


# JS helpers reading the editor's MobX store (window.Htx is Label Studio Frontend's root store)
_JS_EDITOR_READY = """() => {
  const a = window.Htx && window.Htx.annotationStore && window.Htx.annotationStore.selected;
  const img = a && a.names.get('image');
  return !!(img && img.imageIsLoaded);
}"""
_JS_TOOL_STATE = """() => {
  const a = window.Htx.annotationStore.selected;
  const tool = a.names.get('image').getToolsManager().findSelectedTool();
  const kp = a.names.get('KeyPointLabels');
  return {tool: tool ? tool.fullName : null, dynamic: !!(tool && tool.dynamic),
          label: kp ? kp.selectedLabels.map(l => l.value) : null,
          autoAnnotation: window.Htx.autoAnnotation};
}"""
_JS_REGIONS = """() => {
  const a = window.Htx.annotationStore.selected;
  return {regions: a.regions.map(r => [r.type, r.labelName || null, !!r.dynamic]),
          suggestions: Array.from(a.suggestions.values()).map(r => r.type),
          result: a.serializeAnnotation().map(r => ({type: r.type, from_name: r.from_name,
                   labels: r.value[r.type], rle: r.value.rle ? r.value.rle.length : 0}))};
}"""


def open_task_with_auto_annotation(page, ls, pid: int, tid: int, steps: Steps) -> None:
    """Log in through the form, open the task in the labeling page, switch Auto-Annotation on."""
    from playwright.sync_api import TimeoutError as PWTimeout

    # log in through the form, as a person would
    steps("log in")
    page.goto(f"{ls.url}/user/login/")
    page.fill("#email", ls.username)
    page.fill("#password", ls.password)
    page.click("button.login-button")
    page.wait_for_url(lambda url: "/user/login" not in url and "/user/signup" not in url)

    # the labeling page: the data manager with the task open in the editor
    steps("open labeling page")
    page.goto(f"{ls.url}/projects/{pid}/data?task={tid}")
    page.locator('button[aria-label="brush-tool"]').first.wait_for(timeout=EDITOR_TIMEOUT)
    page.wait_for_function(_JS_EDITOR_READY, timeout=EDITOR_TIMEOUT)

    # Auto-Annotation on: only then are the smart tools shown (a click right after the editor
    # renders is sometimes lost, so click until the smart tool group shows up)
    steps("switch on Auto-Annotation")
    toggle = page.locator('[data-testid="bottombar-auto-annotation-toggle"]')
    smart_group = page.locator(".lsf-toolbar__group > button.lsf-tool_smart")
    for attempt in range(5):
        if not toggle.is_checked():
            toggle.click(force=True)  # the <input> is styled away behind the switch
        try:
            smart_group.wait_for(timeout=3_000)
            break
        except PWTimeout:
            if attempt == 4:
                raise


def _annotate(page, ls, pid: int, tid: int, steps: Steps, exchange: dict) -> None:
    open_task_with_auto_annotation(page, ls, pid, tid, steps)
    smart_group = page.locator(".lsf-toolbar__group > button.lsf-tool_smart")

    # the smart KeyPoint tool sits in the "Auto-Detect" group, which opens on hover; then the
    # label of the KeyPointLabels control (the first labels row; its hotkey is 1)
    steps("pick smart keypoint tool and label")
    smart_group.hover()
    page.locator('.lsf-toolbar__smart button[aria-label="key-point-tool"]').click()
    label = page.locator(".lsf-labels").nth(0).locator(".lsf-label", has_text=LABEL)
    if "lsf-label_selected" not in (label.get_attribute("class") or ""):
        label.click()  # (a click on a selected label unselects it)
    page.wait_for_function(
        f"""() => {{ const s = ({_JS_TOOL_STATE})();
                    return s.tool === 'KeyPointTool-dynamic' && s.dynamic && s.autoAnnotation
                           && s.label && s.label.includes('{LABEL}'); }}""")
    assert "lsf-label_selected" in (label.get_attribute("class") or "")

    # click the middle of the disc (the stage is the image, scaled to fit)
    steps("click on the disc")
    stage = page.locator(".konvajs-content").first.bounding_box()
    assert stage and abs(stage["width"] / stage["height"] - W / H) < 0.02, stage
    x = stage["x"] + stage["width"] * (CX + 10) / W
    y = stage["y"] + stage["height"] * (CY - 5) / H
    sent, answered = [], []
    is_click = lambda req: "/interactive-annotating" in req.url and req.method == "POST"  # noqa: E731
    page.on("request", lambda req: sent.append(req) if is_click(req) else None)
    page.on("response", lambda r: answered.append(r) if is_click(r.request) else None)
    for attempt in (1, 2):
        page.mouse.click(x, y)
        # the editor sends the click at once (a dynamic keypoint region -> regionFinishedDrawing)
        if _wait_until(page, lambda: sent, REQUEST_TIMEOUT):
            break
        exchange.setdefault("lost_clicks", []).append(page.evaluate(_JS_REGIONS))
        if attempt == 2:
            raise AssertionError("the editor never sent /interactive-annotating after a click: "
                                 f"{exchange['lost_clicks']}")
        # seen once while exploring (not reproduced since): undo the point, click again
        sys.stderr.write("[browser] no interactive-annotating request after the click; undo, retry\n")
        if page.evaluate("() => window.Htx.annotationStore.selected.regions.length"):
            page.locator('[data-testid="bottombar-undo-button"]').click()
            page.wait_for_function("() => !window.Htx.annotationStore.selected.regions.length")
    steps("interactive-annotating sent")
    assert _wait_until(page, lambda: answered, SUGGESTION_TIMEOUT), \
        f"no answer to /interactive-annotating within {SUGGESTION_TIMEOUT / 1000:.0f} s"
    resp = answered[0]
    body = resp.request.post_data_json
    try:
        answer = resp.json()
    except Exception:
        answer = {"<not JSON>": resp.text()[:1000]}
    exchange.update(status=resp.status, answer=answer, request=body)
    steps("interactive-annotating answered")

    # what the browser sent: exactly one positive keypoint on the disc, labelled cat
    assert resp.url.startswith(f"{ls.url}/api/ml/") and body["task"] == tid, body
    [kp] = body["context"]["result"]
    assert kp["type"] == "keypointlabels" and kp["from_name"] == "KeyPointLabels", kp
    assert kp["value"]["keypointlabels"] == [LABEL] and kp["is_positive"] is True, kp
    px, py = kp["value"]["x"] / 100 * W, kp["value"]["y"] / 100 * H
    assert (px - CX) ** 2 + (py - CY) ** 2 < (R * 0.8) ** 2, (px, py)
    # what Label Studio handed back from the backend
    assert resp.status == 200 and "errors" not in answer, answer
    results = (answer.get("data") or {}).get("result") or []
    assert results, f"the backend returned nothing for the click: {answer}"
    assert [r["type"] for r in results] == ["brushlabels"], [r.get("type") for r in results]
    assert results[0]["from_name"] == "BrushLabels" and results[0]["value"]["brushlabels"] == [LABEL]

    # the editor shows it as a suggestion; accept it -> a Brush region in the regions list
    steps("accept suggestion")
    page.locator(".lsf-auto-accept__info").filter(has_text=re.compile(r"^\s*1 suggestions?")).wait_for()
    page.locator('[data-testid="bottombar-accept-suggestions-button"]').click()
    region = page.locator(".lsf-tree__node_type_brushregion").filter(has_text=LABEL)
    region.wait_for()
    steps("brush region shown")
    state = page.evaluate(_JS_REGIONS)
    exchange["editor"] = state
    assert [r[0] for r in state["regions"]] == ["brushregion"], state
    assert state["suggestions"] == [], state
    [res] = state["result"]
    assert res["type"] == "brushlabels" and res["from_name"] == "BrushLabels", res
    assert res["labels"] == [LABEL] and res["rle"] > 0, res

    # Submit: Label Studio stores it (checked through the API by the caller)
    steps("submit")
    with page.expect_response(lambda r: re.search(rf"/api/tasks/{tid}/annotations", r.url)
                              and r.request.method == "POST") as sub:
        page.locator('[data-testid="bottombar-submit-button"]').click()
    assert sub.value.status == 201, (sub.value.status, sub.value.text()[:500])
