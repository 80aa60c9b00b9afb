"""Box exemplars with SAM 3 (issue 23), on a reduced SAM 3 of the real classes (random weights).

Fidelity: the instances of an exemplar pass equal transformers' own pipeline (``Sam3Processor``
with ``input_boxes`` / ``input_boxes_labels`` -> ``Sam3Model`` ->
``post_process_instance_segmentation``) with the same boxes, labels, phrase and threshold, while
the backend runs them on the image state the click model cached (no new encode).

Protocol, through the Flask app and ``xml_templates/exemplars.xml``: a box drawn with the
``Exemplar`` tool comes back as every instance under its label in the output controls; a box of
the ``NotExemplar`` tool changes the answer; several exemplars accumulate; bad coordinates, and
an exemplar on a backend without SAM 3's concept model, are a 400 naming what to do, and the
server keeps serving.

Random weights score nearly every query just above 0.25, so the threshold is 0.25 and
``max_instances`` / ``concept_nms_iou`` are opened wide: the answer is the library's, instance for
instance.
"""
from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest
import torch

from sam_backend.assembly import prediction_service
from sam_backend.concepts.base import Exemplars, Selection
from sam_backend.models.base import Prompt
from sam_backend.server.app import create_app
from sam_backend.settings import Settings
from tests.support.payloads import H, W, decode_brush, exemplar, payload
from tests.support.random_weights import cached_random_sam3, synthetic_image, write_test_tokenizer
from tests.support.server_utils import REPO

THRESHOLD = 0.25  # random weights: low enough to give instances
TEMPLATE = (REPO / "xml_templates" / "exemplars.xml").read_text()
OUTPUTS = {"BrushLabels": "brushlabels", "RectangleLabels": "rectanglelabels"}


@pytest.fixture(scope="module")
def sam3_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sam3") / "sam3"
    shutil.copytree(cached_random_sam3(reduced=True), directory)
    return write_test_tokenizer(directory)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """The document root holding pics/scene.png (the payloads' task image), and its pixels."""
    root = tmp_path_factory.mktemp("docroot")
    image = synthetic_image(H, W, seed=3)
    (root / "pics").mkdir()
    cv2.imwrite(str(root / "pics" / "scene.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return root, image


MAX_INSTANCES = 20  # of the protocol tests' backend (every NMS off: concept_nms_iou=1.0)


def settings_for(sam3_dir, scene, tmp_path_factory, **options):
    return Settings.load({
        "model_name": "sam3", "sam_checkpoint_file": str(sam3_dir), "device": "cpu",
        "embedding_dtype": "float32", "concept_model": "sam3",
        "concept_threshold": str(THRESHOLD), "concept_nms_iou": "1.0",
        "max_instances": str(MAX_INSTANCES), "local_files_document_root": str(scene[0]),
        "image_cache_dir": str(tmp_path_factory.mktemp("imgcache")), **options}, environ={})


@pytest.fixture(scope="module")
def service(sam3_dir, scene, tmp_path_factory):
    return prediction_service(settings_for(sam3_dir, scene, tmp_path_factory))


@pytest.fixture(scope="module")
def client(service):
    app = create_app(service)
    app.testing = True
    return app.test_client()


@pytest.fixture(scope="module")
def library(sam3_dir, scene):
    """``library(text, boxes, labels)``: transformers' own exemplar pipeline on the same weights
    and the scene's image -> scores (N,), boxes (N, 4) xyxy pixels, masks (N, H, W) bool, best
    first (each answer computed once per module)."""
    from transformers import Sam3Model, Sam3Processor

    model = Sam3Model.from_pretrained(str(sam3_dir)).eval()
    processor = Sam3Processor.from_pretrained(str(sam3_dir))
    image = scene[1]
    answers = {}

    def run(text, boxes, labels):
        key = (text, tuple(map(tuple, boxes)), tuple(labels))
        if key not in answers:
            answers[key] = compute(text, boxes, labels)
        return answers[key]

    def compute(text, boxes, labels):
        inputs = processor(images=image, text=text, input_boxes=[boxes],
                           input_boxes_labels=[labels], return_tensors="pt")
        with torch.no_grad():
            outputs = model(**inputs)
        ref = processor.post_process_instance_segmentation(
            outputs, threshold=THRESHOLD, mask_threshold=0.5,
            target_sizes=inputs["original_sizes"].tolist())[0]
        order = torch.argsort(ref["scores"], descending=True, stable=True)
        return (ref["scores"][order].numpy(), ref["boxes"][order].numpy(),
                ref["masks"][order].numpy().astype(bool))

    return run


def pixels(box_percent):
    """(x, y, w, h) percent of the payloads' image -> [x0, y0, x1, y1] pixels."""
    x, y, w, h = box_percent
    return [x * W / 100, y * H / 100, (x + w) * W / 100, (y + h) * H / 100]


CAT = (10, 15, 30, 35)  # (x, y, w, h) percent
OTHER = (55, 40, 25, 30)
NOT = (60, 5, 20, 20)


def test_exemplar_instances_equal_the_libraries_pipeline_on_the_cached_click_state(
        service, scene, library):
    image = scene[1]
    key = "exemplar-fidelity"
    # a click first: the exemplar passes then encode nothing again
    service.segmenter.segment(key, lambda: image,
                              Prompt(np.array([[50.0, 60.0]], np.float32), np.array([1])))
    misses, encodes = service.segmenter.cache.misses, service.segmenter.encodes
    engine = service.exemplar_annotator().engine
    cases = [("red car", [CAT], [True]),  # a box with the label's phrase
             # boxes alone (the processor's "visual" prompt), positives and a negative
             (None, [CAT, NOT, OTHER], [True, False, True])]
    for phrase, boxes, positive in cases:
        asked = Exemplars("cat", "image", np.array([[x, y, x + w, y + h] for x, y, w, h in boxes]),
                          np.array(positive), phrase)
        found = engine.detect_exemplars(key, lambda: image, asked, THRESHOLD, Selection(1.0, 1000))
        scores, ref_boxes, masks = library(phrase, [pixels(b) for b in boxes],
                                           [int(p) for p in positive])
        assert len(scores) > 0 and len(found) == len(scores), (phrase, positive)
        np.testing.assert_allclose(found.scores, scores, atol=1e-4)
        np.testing.assert_allclose(found.boxes, ref_boxes, atol=1e-2)
        same = (found.masks == masks).mean(axis=(1, 2))
        assert same.min() > 0.999
    assert service.segmenter.cache.misses == misses  # the cached click state was reused
    assert service.segmenter.encodes == encodes


def ask(client, regions, config=TEMPLATE):
    return client.post("/predict", json=payload(regions, config))


def answer(client, regions, config=TEMPLATE):
    response = ask(client, regions, config)
    assert response.status_code == 200, response.get_json()
    (prediction,) = response.get_json()["results"]
    return prediction


def instances(prediction, label="cat"):
    """The (score, brush mask) of every instance in an answer, best first; checks that each
    region sits in an output control of the template under ``label``, as a brush + its box."""
    by_type = {}
    for region in prediction["result"]:
        assert OUTPUTS[region["from_name"]] == region["type"], region["from_name"]
        assert region["to_name"] == "image"
        assert region["value"][region["type"]] == [label]
        by_type.setdefault(region["type"], []).append(region)
    brush, boxes = by_type.get("brushlabels", []), by_type.get("rectanglelabels", [])
    assert len(brush) == len(boxes)
    return [(r["score"], decode_brush(r)) for r in brush]


def expected(library, text, boxes, labels, max_instances=MAX_INSTANCES, nms_iou=1.0):
    """The scores of the instances the backend should answer: the library's, duplicates above
    ``nms_iou`` suppressed, the best ``max_instances``, those with a non-empty mask (an empty
    one makes no region)."""
    scores, ref_boxes, masks = library(text, [pixels(b) for b in boxes], labels)
    keep = Selection(nms_iou, max_instances).keep(ref_boxes, scores)
    scores, masks = scores[keep], masks[keep]
    return scores[masks.reshape(len(masks), -1).any(axis=1)]


def test_an_exemplar_comes_back_as_every_instance_under_its_label(client, library):
    prediction = answer(client, [exemplar(*CAT)])
    found = instances(prediction)
    assert prediction["model_version"].startswith("sam_backend-")
    # the template's hint for cat ("a cat") is sent with the box
    ref = expected(library, "a cat", [CAT], [1])
    assert len(found) == len(ref) > 1
    np.testing.assert_allclose([s for s, _ in found], ref, atol=1e-4)
    assert all(s >= THRESHOLD for s, _ in found)
    assert prediction["score"] == pytest.approx(float(np.mean(ref)), abs=1e-4)
    # the other label: its own output regions
    assert instances(answer(client, [exemplar(*CAT, label="dog")]), "dog")


def test_a_negative_exemplar_changes_the_answer_and_exemplars_accumulate(client, library):
    alone = expected(library, "a cat", [CAT], [1])  # what the test above got for the box alone
    # as Label Studio sends it: every exemplar box of the label so far, the newest last
    regions = [exemplar(*CAT), exemplar(*NOT, from_name="NotExemplar")]
    with_negative = [s for s, _ in instances(answer(client, regions))]
    np.testing.assert_allclose(with_negative, expected(library, "a cat", [CAT, NOT], [1, 0]),
                               atol=1e-4)
    assert len(with_negative) != len(alone) or not np.allclose(with_negative, alone, atol=1e-4)

    regions.append(exemplar(*OTHER))
    three = [s for s, _ in instances(answer(client, regions))]
    np.testing.assert_allclose(three, expected(library, "a cat", [CAT, NOT, OTHER], [1, 0, 1]),
                               atol=1e-4)
    # boxes of another label on the same image are not this label's exemplars
    noise = [exemplar(5, 60, 20, 20, label="dog"),
             exemplar(40, 60, 20, 20, label="dog", from_name="NotExemplar")]
    mixed = [s for s, _ in instances(answer(client, noise[:1] + regions[:2] + noise[1:2]
                                            + regions[2:]))]
    np.testing.assert_allclose(mixed, three, atol=1e-6)


def test_exemplar_answers_respect_max_instances_and_nms(sam3_dir, scene, tmp_path_factory,
                                                        library):
    narrow = prediction_service(settings_for(sam3_dir, scene, tmp_path_factory,
                                             max_instances="3", concept_nms_iou="0.5"))
    app = create_app(narrow)
    app.testing = True
    found = [s for s, _ in instances(answer(app.test_client(), [exemplar(*CAT)]))]
    assert 0 < len(found) <= 3 < len(expected(library, "a cat", [CAT], [1]))
    np.testing.assert_allclose(found, expected(library, "a cat", [CAT], [1], 3, 0.5),
                               atol=1e-4)


BAD = [
    ([exemplar(250, 5, 10, 10)], "context.result[0]: value.x=250.0 is outside the image"),
    ([exemplar(5, 5, 10, 10), exemplar(5, 80, 10, 40)],
     "context.result[1]: value.y + value.height=120.0 is outside"),
    ([exemplar(5, 5, 0, 10)], "context.result[0]: the rectangle has no area"),
    ([exemplar(5, 5, 10, 10, label="bird")],
     "label 'bird' is not in the labeling config's 'Exemplar' control"),
    ([dict(exemplar(5, 5, 10, 10), from_name=None, to_name=None)],
     "3 rectanglelabels controls with the label 'cat' (Exemplar, NotExemplar, "
     "RectangleLabels): send from_name"),
]


def test_bad_exemplars_are_a_400_naming_the_field_and_the_server_keeps_serving(client,
                                                                               library):
    for regions, needle in BAD:
        response = ask(client, regions)
        assert response.status_code == 400, response.get_json()
        message = response.get_json()["errors"][0]
        assert needle in message, message
    assert client.get("/health").status_code == 200
    found = [s for s, _ in instances(answer(client, [exemplar(*CAT)]))]
    np.testing.assert_allclose(found, expected(library, "a cat", [CAT], [1]), atol=1e-4)


def test_exemplars_without_sam3s_concept_model_are_a_400_naming_it(checkpoint_factory,
                                                                   dino_dir, scene,
                                                                   tmp_path_factory):
    for options in ({}, {"concept_model": "grounding_dino", "concept_checkpoint": str(dino_dir)}):
        settings = Settings.load(dict(
            model_name="mobile_sam", sam_checkpoint_file=str(checkpoint_factory("mobile_sam")),
            device="cpu", runtime="torch", local_files_document_root=str(scene[0]),
            image_cache_dir=str(tmp_path_factory.mktemp("imgcache")), **options), environ={})
        service = prediction_service(settings)
        app = create_app(service)
        app.testing = True
        plain = app.test_client()
        response = ask(plain, [exemplar(*CAT)])
        assert response.status_code == 400
        message = response.get_json()["errors"][0]
        assert "box exemplars need SAM 3's concept model" in message
        assert "model_name=sam3 concept_model=sam3" in message
        assert (options.get("concept_model", "without a concept model")) in message
        if options:  # refused from the option: the phrase-only engine was not loaded for it
            assert service.concepts._engine is None
        # the same backend still answers a click (the plain box tool of full.xml)
        box = dict(exemplar(*CAT, from_name="RectangleLabels"))
        full = (REPO / "xml_templates" / "full.xml").read_text()
        assert ask(plain, [box], full).status_code == 200


# -- full size (slow lane) --------------------------------------------------------------------------
# transformers' exemplar pipeline in a separate process (the two ~3.4 GB models are never in one
# process): the image encoded once (get_vision_features, as the library documents its reuse),
# then each case's processor -> model -> post-processing; scores, boxes and masks to an .npz
REFERENCE = r"""
import json, sys
import numpy as np, torch, cv2
from transformers import Sam3Model, Sam3Processor
directory, image_path, out, threshold, cases = sys.argv[1:6]
model = Sam3Model.from_pretrained(directory).eval()
processor = Sam3Processor.from_pretrained(directory)
image = cv2.cvtColor(cv2.imread(image_path), cv2.COLOR_BGR2RGB)
pixels = processor(images=image, return_tensors="pt")
with torch.no_grad():
    vision = model.get_vision_features(pixel_values=pixels["pixel_values"])
found = {}
for i, (text, boxes, labels) in enumerate(json.loads(cases)):
    inputs = processor(text=text, input_boxes=[boxes], input_boxes_labels=[labels],
                       original_sizes=pixels["original_sizes"], return_tensors="pt")
    with torch.no_grad():
        outputs = model(vision_embeds=vision, input_ids=inputs["input_ids"],
                        attention_mask=inputs["attention_mask"], input_boxes=inputs["input_boxes"],
                        input_boxes_labels=inputs["input_boxes_labels"])
    ref = processor.post_process_instance_segmentation(
        outputs, threshold=float(threshold), mask_threshold=0.5,
        target_sizes=pixels["original_sizes"].tolist())[0]
    found[f"scores{i}"] = ref["scores"].numpy()  # query order
    found[f"boxes{i}"] = ref["boxes"].numpy()
    found[f"masks{i}"] = ref["masks"].numpy().astype(bool)
np.savez_compressed(out, **found)
"""


def library_in_a_process(directory, image_path, out, threshold, cases):
    """REFERENCE on ``cases`` ([(text, pixel boxes, labels)]) -> {name: array}."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", REFERENCE, str(directory), str(image_path),
                           str(out), str(threshold), json.dumps(cases)],
                          capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(np.load(out))


@pytest.mark.slow
def test_full_size_exemplar_instances_equal_the_libraries_pipeline(tmp_path):
    """SAM 3 at its published size (random weights, ~3.4 GB directory, built once): the instances
    of exemplar passes on the click model's cached state equal transformers' pipeline, the
    reference run first in its own process. Threshold 0: every query is compared, in query
    order (random full-size weights score few instances above the usual thresholds, and many
    nearly alike)."""
    source = cached_random_sam3(reduced=False)
    directory = tmp_path / "sam3"
    directory.mkdir()
    for item in source.iterdir():  # linked, not copied
        (directory / item.name).symlink_to(item)
    write_test_tokenizer(directory)
    image = synthetic_image(360, 480, seed=4)
    path = tmp_path / "scene.png"
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    h, w = image.shape[:2]
    boxes = [[0.1 * w, 0.2 * h, 0.4 * w, 0.6 * h], [0.6 * w, 0.1 * h, 0.9 * w, 0.5 * h]]
    cases = [("red car", boxes[:1], [1]), (None, boxes, [1, 0])]
    ref = library_in_a_process(directory, path, tmp_path / "ref.npz", 0.0, cases)

    settings = Settings.load({"model_name": "sam3", "sam_checkpoint_file": str(directory),
                              "device": "cpu", "embedding_dtype": "float32",
                              "concept_model": "sam3"}, environ={})
    service = prediction_service(settings)
    engine = service.exemplar_annotator().engine
    state, _ = engine.image_state("full-size", lambda: image)
    for i, (text, pixel_boxes, labels) in enumerate(cases):
        found = engine.find_exemplars(state, text, np.array(pixel_boxes, np.float32),
                                      np.array(labels), 0.0)
        assert len(found) == len(ref[f"scores{i}"]) > 0
        np.testing.assert_allclose(found.scores, ref[f"scores{i}"], atol=1e-3)
        np.testing.assert_allclose(found.boxes, ref[f"boxes{i}"], atol=0.5)
        assert (found.masks == ref[f"masks{i}"]).mean() > 0.999
    assert service.segmenter.cache.misses == 1  # one encode for both passes
