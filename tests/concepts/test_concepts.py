"""Label by concept: label config -> concepts, phrase parsing, duplicate suppression, the
Grounding DINO engine against the library's own pipeline, and the protocol over HTTP.

Random weights of the real architectures: Grounding DINO in a reduced configuration of the same
classes with a small word-level tokenizer (no download), MobileSAM for the masks."""
from __future__ import annotations


import cv2
import numpy as np
import pytest
import requests
import torch

from sam_backend.concepts.base import Selection
from sam_backend.concepts.phrases import Concept, concepts_of, parse_text_prompt
from sam_backend.errors import ConfigError, RequestError
from sam_backend.concepts.grounding_dino import query_text
from sam_backend.labelstudio.label_config import parse_label_config
from tests.support.random_weights import synthetic_image
from sam_backend.models.registry import get_variant
from sam_backend.settings import Settings
from tests.concepts.conftest import H, W, make_service
from tests.support.server_utils import BackendProcess, free_port

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <TextArea name="phrase" toName="image" editable="true" rows="1" maxSubmissions="1"/>
  <KeyPointLabels name="clicks" toName="image" smart="true"><Label value="cat" smart="true"/><Label value="dog" smart="true"/></KeyPointLabels>
  <BrushLabels name="brush" toName="image"><Label value="cat" hint="small cat"/><Label value="dog"/><Label value="car" hint="red car"/></BrushLabels>
  <RectangleLabels name="boxes" toName="image"><Label value="cat"/><Label value="dog"/><Label value="car"/></RectangleLabels>
</View>"""
LOW = 0.3  # random weights: a threshold low enough to give instances


def textarea(text, to_name="image"):
    return {"result": [{"type": "textarea", "from_name": "phrase", "to_name": to_name,
                        "value": {"text": [text]}}]}


# -- the label config ---------------------------------------------------------------------------

def test_each_output_label_is_a_concept_with_its_hint_as_phrase():
    config = parse_label_config(CONFIG)
    assert concepts_of(config) == [Concept("cat", "small cat", "image"),
                                   Concept("dog", "dog", "image"),
                                   Concept("car", "red car", "image")]
    assert [c.label for c in concepts_of(config, ["car", "dog"])] == ["dog", "car"]


def test_a_typed_phrase_finds_its_label():
    config = parse_label_config(CONFIG)
    assert parse_text_prompt(textarea("Dog"), config) == [Concept("dog", "dog", "image")]
    assert parse_text_prompt(textarea("red car"), config) == [Concept("car", "red car", "image")]
    assert parse_text_prompt(textarea("striped cat_cat, big dog_dog"), config) == [
        Concept("cat", "striped cat", "image"), Concept("dog", "big dog", "image")]
    assert parse_text_prompt({"result": []}, config) is None
    with pytest.raises(RequestError, match="which label"):
        parse_text_prompt(textarea("tree"), config)
    with pytest.raises(RequestError, match="empty"):
        parse_text_prompt(textarea(" , "), config)
    single = parse_label_config(CONFIG.replace('<Label value="dog"/><Label value="car" hint="red car"/>', "")
                                .replace('<Label value="dog"/><Label value="car"/>', ""))
    assert parse_text_prompt(textarea("tree"), single) == [Concept("cat", "tree", "image")]


def test_selection_suppresses_overlapping_duplicates_and_caps_the_count():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60], [0, 0, 10, 10.5]],
                     np.float32)
    scores = np.array([0.6, 0.9, 0.7, 0.5], np.float32)
    assert Selection(0.7, 50).keep(boxes, scores).tolist() == [1, 2]   # IoU(0,1) = 0.82
    assert Selection(1.0, 50).keep(boxes, scores).tolist() == [1, 2, 0, 3]
    assert Selection(1.0, 2).keep(boxes, scores).tolist() == [1, 2]


# -- the engine and the service in-process --------------------------------------------------------

def test_instances_equal_the_libraries_own_pipeline(checkpoint_factory, dino_dir, image_path,
                                                    tmp_path):
    """Grounding DINO's processor + model + post-processing for the boxes and scores, then
    segment_anything's SamPredictor for each box's mask, on the same weights and threshold."""
    from segment_anything import SamPredictor
    from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

    service = make_service(checkpoint_factory, tmp_path, concept_model="grounding_dino",
                           concept_checkpoint=str(dino_dir), concept_threshold=LOW,
                           concept_nms_iou=1.0, max_instances=1000)
    image = cv2.cvtColor(cv2.imread(str(image_path)), cv2.COLOR_BGR2RGB)
    found = service.concept_annotator().engine.detect(
        "fidelity", lambda: image, ["red car"], LOW, Selection(1.0, 1000))[0]

    processor = GroundingDinoProcessor.from_pretrained(str(dino_dir))
    detector = GroundingDinoForObjectDetection.from_pretrained(str(dino_dir)).eval()
    inputs = processor(images=image, text="red car.", return_tensors="pt")
    with torch.no_grad():
        outputs = detector(**inputs)
    ref = processor.post_process_grounded_object_detection(
        outputs, inputs["input_ids"], threshold=LOW, text_threshold=LOW, target_sizes=[(H, W)])[0]
    order = torch.argsort(ref["scores"], descending=True, stable=True)
    ref_scores = ref["scores"][order].numpy()
    ref_boxes = ref["boxes"][order].numpy().clip(0, [W, H, W, H])
    assert len(ref_scores) > 0 and len(found) == len(ref_scores)
    np.testing.assert_allclose(found.scores, ref_scores, rtol=0, atol=1e-6)
    np.testing.assert_allclose(found.boxes, ref_boxes, rtol=0, atol=1e-3)

    sam = get_variant("mobile_sam").builder()
    sam.load_state_dict(torch.load(checkpoint_factory("mobile_sam"), map_location="cpu"))
    predictor = SamPredictor(sam.eval())
    predictor.set_image(image)
    for box, mask in zip(ref_boxes, found.masks):
        expected, _, _ = predictor.predict(box=box, multimask_output=False)
        assert (expected[0] == mask).mean() > 0.999


def test_no_instance_is_an_empty_result_not_an_error(checkpoint_factory, dino_dir, image_path,
                                                     tmp_path):
    service = make_service(checkpoint_factory, tmp_path, concept_model="grounding_dino",
                           concept_checkpoint=str(dino_dir), concept_threshold=1.0)
    answer = service.predict([{"id": 1, "data": {"image": str(image_path)}}], CONFIG,
                             textarea("dog"))
    assert answer == [{"result": [], "score": 0.0, "model_version": service.model_version}]


def test_absent_concept_model_is_a_clear_error_and_clicks_keep_working(
        checkpoint_factory, image_path, tmp_path):
    click = {"result": [{"type": "keypointlabels", "from_name": "clicks", "to_name": "image",
                         "value": {"x": 40, "y": 50, "keypointlabels": ["cat"]}}]}
    tasks = [{"id": 1, "data": {"image": str(image_path)}}]
    for options, message in [({}, "without a concept model"),
                             ({"concept_model": "grounding_dino",
                               "concept_checkpoint": str(tmp_path / "nowhere")},
                              "huggingface-cli download")]:
        service = make_service(checkpoint_factory, tmp_path, **options)
        with pytest.raises(ConfigError, match=message):
            service.predict(tasks, CONFIG, textarea("dog"))
        result = service.predict(tasks, CONFIG, click)[0]["result"]
        assert {r["type"] for r in result} == {"brushlabels", "rectanglelabels"}
    with pytest.raises(ConfigError, match="concept_model=grounding_dino"):
        Settings.load({"auto_annotate": "true"}, environ={})


def test_a_pass_slower_than_the_bound_answers_nothing_then_the_next_ask_is_instant(
        checkpoint_factory, dino_dir, image_path, tmp_path):
    service = make_service(checkpoint_factory, tmp_path, concept_model="grounding_dino",
                           concept_checkpoint=str(dino_dir), concept_threshold=LOW,
                           auto_annotate=True, concept_timeout=0.001)
    tasks = [{"id": 4, "data": {"image": str(image_path)}}]
    assert service.predict(tasks, CONFIG, None) == [[]]  # Label Studio stores nothing
    for future in list(service.concepts._pending.values()):
        future.result(timeout=300)  # the pass went on in the background
    (prediction,) = service.predict(tasks, CONFIG, None)
    assert prediction["model_version"] == service.model_version
    assert {r["value"][r["type"]][0] for r in prediction["result"]} <= {"cat", "dog", "car"}
    assert len(prediction["result"]) > 0


def test_query_text():
    assert query_text("  Red  Car. ") == "red car."


# -- over HTTP ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def backend(checkpoint_factory, dino_dir, image_path, tmp_path_factory):
    port = free_port()
    process = BackendProcess(
        ["label-studio-ml", "start", "sam", "--with", "model_name=mobile_sam",
         f"sam_checkpoint_file={checkpoint_factory('mobile_sam')}", "device=cpu",
         "concept_model=grounding_dino", f"concept_checkpoint={dino_dir}",
         f"concept_threshold={LOW}", "auto_annotate=true", "max_instances=5",
         "concept_timeout=90",  # a shared 2-core machine: the bound itself is tested in-process
         "-p", str(port), "--host", "127.0.0.1"], port,
        {"SAM_BACKEND_IMAGE_CACHE_DIR": str(tmp_path_factory.mktemp("imgcache")),
         "LOCAL_FILES_DOCUMENT_ROOT": str(image_path.parent)},
        tmp_path_factory.mktemp("logs") / "backend.log")
    process.start()
    yield process
    process.stop()


def post(backend, tasks, context=None):
    body = {"tasks": tasks, "label_config": CONFIG, "project": "7.1"}
    if context is not None:
        body["params"] = {"context": context}
    return requests.post(f"{backend.url}/predict", json=body, timeout=120)


def by_type(result):
    counts = {}
    for region in result:
        counts.setdefault(region["type"], []).append(region)
    return counts


@pytest.mark.process
def test_typed_phrase_gives_every_instance_in_each_output_control(backend, image_path):
    response = post(backend, [{"id": 3, "data": {"image": str(image_path)}}],
                    textarea("striped animal_dog"))
    assert response.status_code == 200, response.text
    (prediction,) = response.json()["results"]
    regions = by_type(prediction["result"])
    n = len(regions["brushlabels"])
    assert 0 < n <= 5 and len(regions["rectanglelabels"]) == n
    for region in prediction["result"]:
        assert region["value"][region["type"]] == ["dog"] and region["to_name"] == "image"
        assert LOW < region["score"] <= 1
    assert {r["from_name"] for r in prediction["result"]} == {"brush", "boxes"}
    assert prediction["model_version"].endswith("+grounding_dino")


@pytest.mark.process
def test_task_open_gives_a_prediction_and_a_click_after_it_encodes_nothing(backend, image_path):
    path = image_path.parent / "other.png"  # inside the backend's LOCAL_FILES_DOCUMENT_ROOT
    cv2.imwrite(str(path), synthetic_image(200, 260, seed=11))
    task = {"id": 9, "data": {"image": str(path)}}
    response = post(backend, [task])
    assert response.status_code == 200, response.text
    (prediction,) = response.json()["results"]
    labels = {r["value"][r["type"]][0] for r in prediction["result"]}
    assert labels and labels <= {"cat", "dog", "car"}
    misses = requests.get(f"{backend.url}/metrics", timeout=10).json()["embedding_cache_misses"]
    click = {"result": [{"type": "keypointlabels", "from_name": "clicks", "to_name": "image",
                         "value": {"x": 30, "y": 30, "keypointlabels": ["cat"]}}]}
    assert post(backend, [task], click).status_code == 200
    after = requests.get(f"{backend.url}/metrics", timeout=10).json()["embedding_cache_misses"]
    assert after == misses
    # asked again (Retrieve predictions), the finished pass answers as is
    again = post(backend, [task]).json()["results"][0]
    assert [r["value"] for r in again["result"]] == [r["value"] for r in prediction["result"]]


@pytest.mark.process
def test_bad_text_prompt_is_a_400_and_the_server_keeps_serving(backend, image_path):
    response = post(backend, [{"id": 3, "data": {"image": str(image_path)}}], textarea("tree"))
    assert response.status_code == 400 and "which label" in response.json()["errors"][0]
    health = requests.get(f"{backend.url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["concept_model"] == "grounding_dino"
