"""Label by concept in a real browser: what an annotator does in Label Studio 1.23.2's labeling page
(headless Chromium driven by Playwright, as in test_browser.py), not only what the API is told.

- *The typed phrase* (``xml_templates/concepts.xml``): with Auto-Annotation on, type a phrase into
  the TextArea and press Enter. The editor adds a text region, which is dynamic, so the data manager
  posts ``/api/ml/<id>/interactive-annotating {"task", "context": {"result": [<textarea region>]}}``
  at once; Label Studio forwards it to /predict and hands the backend's regions back to the editor
  as suggestions ("N suggestions"); accepted, they are drawn on the image and listed in the Regions
  panel; Submit stores them.

The backend is the one test_concepts_with_label_studio.py runs: random-weight MobileSAM for the
masks and the reduced random-weight Grounding DINO (seed 7) for the phrase, with
``concept_threshold=0.3`` (random weights score every box near 0.5, below the 0.5 default) and
``max_instances=3``.
"""
from __future__ import annotations

import os
import re
import sys

import pytest
from PIL import Image

from sam_backend.labelstudio.rle import rle_to_mask
from tests.e2e.test_browser import (REPO, SUGGESTION_TIMEOUT, REQUEST_TIMEOUT, Steps,
                                    _require_browser, _wait_until, backend_env, in_browser,
                                    open_task_with_auto_annotation)
from tests.support.ls_harness import free_port
from tests.support.random_weights import make_random_grounding_dino, synthetic_image

H, W = 240, 320
PHRASE = "a cat_cat"    # the phrase "a cat", for the label cat
LABEL = "cat"
THRESHOLD = 0.3
MAX_INSTANCES = 3

pytestmark = [
    pytest.mark.e2e,
    # a guard against a hung browser; generous because a cold session installs Label Studio here
    pytest.mark.timeout(900),
    pytest.mark.skipif(bool(os.environ.get("SAM_BACKEND_SKIP_BROWSER")),
                       reason="SAM_BACKEND_SKIP_BROWSER is set"),
]

# the editor's store (window.Htx): regions, suggestions, and what Submit would store
_JS_STATE = """() => {
  const a = window.Htx.annotationStore.selected;
  return {regions: a.regions.map(r => ({type: r.type, label: r.labelName || null,
                                         dynamic: !!r.dynamic, control: r.from_name ? r.from_name.name : null})),
          suggestions: Array.from(a.suggestions.values()).map(r => [r.type, r.labelName || null]),
          result: a.serializeAnnotation().map(r => ({type: r.type, from_name: r.from_name,
                   value: r.value}))};
}"""


def _watch_interactive(page) -> tuple[list, list]:
    sent, answered = [], []
    is_call = lambda req: "/interactive-annotating" in req.url and req.method == "POST"  # noqa: E731
    page.on("request", lambda req: sent.append(req) if is_call(req) else None)
    page.on("response", lambda r: answered.append(r) if is_call(r.request) else None)
    return sent, answered


def _answer(page, sent, answered, exchange: dict, steps: Steps, what: str) -> tuple[dict, dict]:
    """Wait for the browser's /interactive-annotating and Label Studio's answer to it."""
    assert _wait_until(page, lambda: sent, REQUEST_TIMEOUT), \
        f"the editor never sent /interactive-annotating after {what}"
    steps("interactive-annotating sent")
    assert _wait_until(page, lambda: answered, SUGGESTION_TIMEOUT), \
        f"no answer to /interactive-annotating within {SUGGESTION_TIMEOUT / 1000:.0f} s"
    resp = answered[-1]
    body = resp.request.post_data_json
    try:
        answer = resp.json()
    except Exception:
        answer = {"<not JSON>": resp.text()[:1000]}
    exchange.update(status=resp.status, answer=answer, request=body)
    steps("interactive-annotating answered")
    assert resp.status == 200 and "errors" not in answer, answer
    return body, answer


def test_typed_phrase_in_browser_draws_every_instance(label_studio, backend_process,
                                                      checkpoint_factory, tmp_path):
    _require_browser()
    steps = Steps()

    steps("start backend")
    dino = make_random_grounding_dino(tmp_path / "grounding-dino", "tiny", seed=7)
    port = free_port()
    backend = backend_process(
        ["label-studio-ml", "start", "sam", "--with", "model_name=mobile_sam",
         f"sam_checkpoint_file={checkpoint_factory('mobile_sam')}", "device=cpu",
         "concept_model=grounding_dino", f"concept_checkpoint={dino}",
         f"concept_threshold={THRESHOLD}", f"max_instances={MAX_INSTANCES}",
         "concept_timeout=60", "-p", str(port), "--host", "127.0.0.1"],
        port, env=backend_env(label_studio, tmp_path), cwd=REPO, timeout=240, name="sam-backend")

    steps("create project")
    api = label_studio.api
    project = api.create_project("browser typed phrase",
                                 (REPO / "xml_templates" / "concepts.xml").read_text())
    pid = project["id"]
    image = tmp_path / "scene.png"
    Image.fromarray(synthetic_image(H, W, seed=20)).save(image)
    tid = api.import_image(pid, image)[0]["id"]
    ml = api.add_ml_backend(pid, backend.url, is_interactive=True)
    assert ml["is_interactive"] and ml["state"] == "CO", ml

    exchange: dict = {}
    seen: dict = {}

    def work(page):
        open_task_with_auto_annotation(page, label_studio, pid, tid, steps)
        sent, answered = _watch_interactive(page)

        # type the phrase into the text box, key by key, and press Enter
        steps("type the phrase, Enter")
        box = page.locator('[data-testid="textarea-input"]')
        box.click()
        box.press_sequentially(PHRASE, delay=20)
        assert not sent, "the editor asked the backend before Enter"
        box.press("Enter")
        body, answer = _answer(page, sent, answered, exchange, steps, "Enter in the text box")

        # what the browser sent: the typed phrase, as the TextArea's region
        assert body["task"] == tid, body
        [prompt] = body["context"]["result"]
        assert (prompt["type"], prompt["from_name"], prompt["to_name"]) == \
            ("textarea", "concept", "image"), prompt
        assert prompt["value"]["text"] == [PHRASE], prompt
        # what Label Studio handed back from the backend: every instance, mask and box, as cat
        results = answer["data"]["result"]
        brush = [r for r in results if r["type"] == "brushlabels"]
        boxes = [r for r in results if r["type"] == "rectanglelabels"]
        assert 0 < len(brush) == len(boxes) <= MAX_INSTANCES, [r["type"] for r in results]
        assert len(results) == 2 * len(brush), [r["type"] for r in results]
        assert {r["value"][r["type"]][0] for r in results} == {LABEL}
        seen["answer"] = results

        # the editor shows them as suggestions; accept -> regions drawn and listed
        steps("accept suggestions")
        n = len(results)
        page.locator(".lsf-auto-accept__info").filter(
            has_text=re.compile(rf"^\s*{n} suggestions?")).wait_for()
        page.locator('[data-testid="bottombar-accept-suggestions-button"]').click()
        listed_brush = page.locator(".lsf-tree__node_type_brushregion").filter(has_text=LABEL)
        listed_boxes = page.locator(".lsf-tree__node_type_rectangleregion").filter(has_text=LABEL)
        assert _wait_until(page, lambda: listed_brush.count() == len(brush)
                           and listed_boxes.count() == len(boxes), 30_000), \
            (listed_brush.count(), listed_boxes.count(), page.evaluate(_JS_STATE))
        steps("regions shown")
        state = page.evaluate(_JS_STATE)
        exchange["editor"] = {k: state[k] for k in ("regions", "suggestions")}
        seen["state"] = state
        assert state["suggestions"] == [], state["suggestions"]
        drawn = sorted(r["type"] for r in state["regions"]
                       if r["type"] in ("brushregion", "rectangleregion"))
        assert drawn == sorted(["brushregion"] * len(brush) + ["rectangleregion"] * len(boxes)), \
            state["regions"]
        # the typed phrase stays as the TextArea's text region (the editor gives it no type name)
        others = [r for r in state["regions"] if r["type"] not in ("brushregion", "rectangleregion")]
        assert len(others) == 1, state["regions"]

        steps("submit")
        with page.expect_response(lambda r: re.search(rf"/api/tasks/{tid}/annotations", r.url)
                                  and r.request.method == "POST") as sub:
            page.locator('[data-testid="bottombar-submit-button"]').click()
        assert sub.value.status == 201, (sub.value.status, sub.value.text()[:500])

    in_browser(tmp_path, steps, exchange, work)

    steps("check stored annotation")
    [annotation] = api.list_annotations(tid)
    stored = annotation["result"]
    answer = seen["answer"]
    assert len(stored) == len(answer) + 1, [(r["type"], r["from_name"]) for r in stored]
    [phrase] = [r for r in stored if r["type"] == "textarea"]
    assert phrase["from_name"] == "concept" and phrase["value"]["text"] == [PHRASE], phrase
    for kind, control in (("brushlabels", "BrushLabels"), ("rectanglelabels", "RectangleLabels")):
        got = [r for r in stored if r["type"] == kind]
        want = [r for r in answer if r["type"] == kind]
        assert len(got) == len(want), (kind, len(got), len(want))
        assert all(r["from_name"] == control and r["to_name"] == "image"
                   and r["value"][kind] == [LABEL] for r in got), got
    masks = sorted(rle_to_mask(r["value"]["rle"], H, W).tobytes()
                   for r in stored if r["type"] == "brushlabels")
    assert masks == sorted(rle_to_mask(r["value"]["rle"], H, W).tobytes()
                           for r in answer if r["type"] == "brushlabels")
    assert all(0 < rle_to_mask(r["value"]["rle"], H, W).sum() < H * W
               for r in stored if r["type"] == "brushlabels")
    boxes = sorted((round(r["value"]["x"], 3), round(r["value"]["y"], 3),
                    round(r["value"]["width"], 3), round(r["value"]["height"], 3))
                   for r in stored if r["type"] == "rectanglelabels")
    assert boxes == sorted((round(r["value"]["x"], 3), round(r["value"]["y"], 3),
                            round(r["value"]["width"], 3), round(r["value"]["height"], 3))
                           for r in answer if r["type"] == "rectanglelabels")
    steps("done")
    sys.stderr.write(f"[browser] timings: {steps.summary()}\n")
