"""Typed concept prompts within bounds (issue 21, defect 4, and the TextArea part of 8).

A typed prompt is refused on a backend without a concept model before anything of it or of the
config is read; its size is bounded (``max_phrases``, ``max_phrase_chars``) and so are the labels
of one pass (``max_concept_labels``); matching phrases to labels is linear; the whole parse and
pass run under the request's scope (deadline, client still there), and a background pass under
its own; a phrase longer than the engine's text encoder takes is a 400 naming it and the limit
(read from the engine's config); duplicate suppression and ``max_instances`` hold per label
across its phrases; a TextArea region whose ``to_name`` is not a string is a 400 naming it.

Random weights of the real architectures (Grounding DINO reduced, with a word tokenizer; a reduced
SAM 3; MobileSAM for clicks) as in test_concepts.py."""
from __future__ import annotations

import itertools
import shutil
import time

import cv2
import pytest

from tests.support.random_weights import cached_random_sam3, synthetic_image
from tests.support.random_weights import write_test_tokenizer
from sam_backend.common.deadline import ClientGone, WorkScope
from sam_backend.concepts.phrases import Concept, PhraseLimits, parse_text_prompt
from sam_backend.errors import BusyError, ConfigError, RequestError
from sam_backend.images.config import ImageAccessSettings
from sam_backend.images.loader import ImageLoader
from sam_backend.labelstudio.label_config import parse_label_config
from sam_backend.assembly import prediction_service
from sam_backend.settings import Settings
from tests.concepts.conftest import H, W, make_service
from tests.support.concept_server import many_labels_config, text_prompt

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <TextArea name="phrase" toName="image" editable="true" rows="1" maxSubmissions="1"/>
  <BrushLabels name="brush" toName="image"><Label value="cat" hint="small cat"/><Label value="dog"/><Label value="car" hint="red car"/></BrushLabels>
  <RectangleLabels name="boxes" toName="image"><Label value="cat"/><Label value="dog"/><Label value="car"/></RectangleLabels>
</View>"""
LOW = 0.3  # random weights: a threshold low enough to give instances
HUGE = "x_l1," * 200_000  # a 1 MB typed prompt


@pytest.fixture(scope="module")
def many_labels():
    """40 000 labels, each with a hint (Control.hint() is linear in the hints)."""
    return parse_label_config(many_labels_config(40_000, hints=True))


def dino_service(checkpoint_factory, tmp_path, dino_dir, **options):
    return make_service(checkpoint_factory, tmp_path, concept_model="grounding_dino",
                        concept_checkpoint=str(dino_dir), concept_threshold=LOW, **options)


def iou(a, b):
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


# -- reading the prompt: bounded, linear ----------------------------------------------------------

def test_a_huge_prompt_is_refused_from_its_size_naming_the_bounds(many_labels):
    started = time.perf_counter()
    with pytest.raises(RequestError, match=r"max_phrases.*max_phrase_chars"):
        parse_text_prompt(text_prompt(HUGE), many_labels)
    assert time.perf_counter() - started < 0.5
    limits = PhraseLimits(max_phrases=4, max_phrase_chars=10)
    with pytest.raises(RequestError, match=r"5 phrases, more than the limit of 4 \(max_phrases\)"):
        parse_text_prompt(text_prompt("l1, l2, l3, l4, l5"), many_labels, limits)
    with pytest.raises(RequestError, match=r"'a long phrase_l1' has 16 characters, more than "
                                           r"the limit of 10 \(max_phrase_chars\)"):
        parse_text_prompt(text_prompt("l1, a   long   phrase_l1"), many_labels, limits)
    entries = {"result": [{"type": "textarea", "to_name": "image", "value": {"text": [""] * 5}}]}
    with pytest.raises(RequestError, match=r"value.text has 5 entries.*max_phrases"):
        parse_text_prompt(entries, many_labels, limits)
    # at the bounds: taken
    assert len(parse_text_prompt(text_prompt("l1, l2, l3, l4"), many_labels, limits)) == 4


def test_matching_phrases_to_labels_is_linear(many_labels):
    """32 phrases on 40 000 labels with hints: one pass over the labels, then a lookup each
    (phrases x labels, and hints x labels, took minutes)."""
    phrases = [f"striped thing_l{39_999 - i}" for i in range(16)] + \
              [f"THING {i}" for i in range(8)] + [f"L{i * 5000}" for i in range(8)]
    started = time.perf_counter()
    concepts = parse_text_prompt(text_prompt(", ".join(phrases)), many_labels)
    assert time.perf_counter() - started < 3
    assert concepts[0] == Concept("l39999", "striped thing", "image")
    assert concepts[16] == Concept("l0", "thing 0", "image")
    # "L0" asks for what "THING 0" asked for (the label's hint): asked once
    assert len(concepts) == 31 and [c.label for c in concepts[24:]] == [
        f"l{i * 5000}" for i in range(1, 8)]
    with pytest.raises(RequestError, match=r"which label is 'tree'.*\.\.\. \(40000 in all\)"):
        parse_text_prompt(text_prompt("tree"), many_labels)


@pytest.mark.parametrize("to_name", [["image"], {"name": "image"}, 7, True])
def test_a_textarea_to_name_that_is_not_a_string_is_a_400_naming_it(to_name):
    config = parse_label_config(CONFIG)
    with pytest.raises(RequestError, match=r"context.result\[0\].to_name must be a string"):
        parse_text_prompt(text_prompt("dog", to_name=to_name), config)
    prompt = text_prompt("dog")
    prompt["result"][0]["from_name"] = ["phrase"]
    with pytest.raises(RequestError, match=r"context.result\[0\].from_name must be a string"):
        parse_text_prompt(prompt, config)


def test_without_a_concept_model_a_typed_prompt_is_refused_before_it_or_the_config_is_read(
        checkpoint_factory, image_path, tmp_path):
    service = make_service(checkpoint_factory, tmp_path)
    tasks = [{"id": 1, "data": {"image": str(image_path)}}]
    big_config = many_labels_config(40_000)
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="without a concept model"):
        service.predict(tasks, big_config, text_prompt(HUGE))
    # not even the config is read: a broken one gets the same answer
    with pytest.raises(ConfigError, match="without a concept model"):
        service.predict(tasks, "<View><not xml", text_prompt(HUGE))
    assert time.perf_counter() - started < 1.0
    with pytest.raises(RequestError, match=r"to_name must be a string"):
        service.predict(tasks, CONFIG, text_prompt("dog", to_name=["image"]))


# -- the request's scope ------------------------------------------------------------------------

def test_the_parse_and_the_pass_stop_at_the_deadline_or_when_the_client_leaves(
        checkpoint_factory, dino_dir, image_path, tmp_path):
    service = dino_service(checkpoint_factory, tmp_path, dino_dir)
    tasks = [{"id": 1, "data": {"image": str(image_path)}}]
    expired = WorkScope(0.0, None, "predict_timeout")
    with pytest.raises(BusyError, match="predict_timeout"):
        service.predict(tasks, CONFIG, text_prompt("cat, dog, car"), scope=expired)

    checks = itertools.count()
    leaves = WorkScope(60, lambda: next(checks) >= 4, "predict_timeout")  # gone after 4 checks
    with pytest.raises(ClientGone):
        service.predict(tasks * 3, CONFIG, text_prompt("cat, dog, car"), scope=leaves)
    assert next(checks) <= 6  # stopped at the check that saw it, not after every phrase

    # with time left, the same request is answered
    (answer,) = service.predict(tasks, CONFIG, text_prompt("cat"), scope=WorkScope(600))
    assert answer["model_version"] == service.model_version


def test_a_background_pass_has_its_own_deadline(checkpoint_factory, dino_dir, image_path,
                                                tmp_path):
    """auto_annotate goes on after concept_timeout by design, but never past predict_timeout
    from its own start."""
    service = dino_service(checkpoint_factory, tmp_path, dino_dir, auto_annotate=True,
                           predict_timeout=0.001, concept_timeout=30)
    tasks = [{"id": 4, "data": {"image": str(image_path)}}]
    assert service.predict(tasks, CONFIG, None) == [[]]
    assert not service.concepts._results and not service.concepts._pending


def test_labels_per_pass_are_bounded(checkpoint_factory, dino_dir, image_path, tmp_path):
    service = dino_service(checkpoint_factory, tmp_path, dino_dir, auto_annotate=True,
                           max_concept_labels=2)
    tasks = [{"id": 4, "data": {"image": str(image_path)}}]
    with pytest.raises(RequestError, match=r"3 labels, more than the limit of 2 "
                                           r"\(max_concept_labels\).*concept_labels"):
        service.predict(tasks, CONFIG, None)
    with pytest.raises(RequestError, match="max_concept_labels"):
        service.predict(tasks, CONFIG, text_prompt("cat, dog, car"))
    service = dino_service(checkpoint_factory, tmp_path, dino_dir, auto_annotate=True,
                           max_concept_labels=2, concept_labels="cat,dog", concept_timeout=120)
    (prediction,) = service.predict(tasks, CONFIG, None)
    assert {r["value"][r["type"]][0] for r in prediction["result"]} <= {"cat", "dog"}


# -- phrases the text encoder cannot take ---------------------------------------------------------

def test_grounding_dino_refuses_a_phrase_longer_than_its_text_encoder(
        checkpoint_factory, dino_dir, image_path, tmp_path):
    service = dino_service(checkpoint_factory, tmp_path, dino_dir)
    engine = service.concept_annotator().engine
    limit = engine.model.config.max_text_len  # 32 in the reduced test configuration
    assert engine.max_phrase_tokens == limit
    tasks = [{"id": 1, "data": {"image": str(image_path)}}]
    # "a a ... a." with [CLS] and [SEP]: words + 3 tokens
    with pytest.raises(RequestError, match=rf"is {limit + 1} tokens long; grounding_dino's text "
                                           rf"encoder takes at most {limit}"):
        service.predict(tasks, CONFIG, text_prompt("a " * (limit - 2) + "_cat"))
    (answer,) = service.predict(tasks, CONFIG, text_prompt("a " * (limit - 3) + "_cat"))
    assert answer["model_version"] == service.model_version


def test_sam3_refuses_a_phrase_longer_than_its_text_encoder(tmp_path):
    directory = tmp_path / "sam3"
    shutil.copytree(cached_random_sam3(reduced=True), directory)
    write_test_tokenizer(directory)
    settings = Settings.load({"model_name": "sam3", "sam_checkpoint_file": str(directory),
                              "device": "cpu", "embedding_dtype": "float32",
                              "concept_model": "sam3", "concept_threshold": "0.25"}, environ={})
    service = prediction_service(settings, images=ImageLoader(
        ImageAccessSettings.from_settings(settings, cache_dir=str(tmp_path / "cache"),
                                          local_files_document_root=str(tmp_path))))
    path = tmp_path / "scene.png"
    cv2.imwrite(str(path), synthetic_image(180, 260, seed=2))
    engine = service.concept_annotator().engine
    # read from the loaded model's config: the published SAM 3 has 32 text positions (the reduced
    # test model keeps CLIP's default, 77)
    from transformers import Sam3VideoConfig

    assert Sam3VideoConfig().detector_config.text_config.max_position_embeddings == 32
    limit = engine.detector.config.text_config.max_position_embeddings
    assert engine.max_phrase_tokens == limit
    tasks = [{"id": 1, "data": {"image": str(path)}}]
    # words + the start and end tokens
    with pytest.raises(RequestError, match=rf"is {limit + 1} tokens long; sam3's text encoder "
                                           rf"takes at most {limit}"):
        service.predict(tasks, CONFIG, text_prompt("a " * (limit - 1) + "_car"))
    (answer,) = service.predict(tasks, CONFIG, text_prompt("a " * (limit - 2) + "_car"))
    assert answer["model_version"] == service.model_version


# -- one selection per label ----------------------------------------------------------------------

def boxes_of(prediction):
    return [(r["value"]["x"], r["value"]["y"], r["value"]["width"], r["value"]["height"])
            for r in prediction["result"] if r["type"] == "rectanglelabels"]


def test_duplicate_suppression_and_max_instances_hold_per_label_across_its_phrases(
        checkpoint_factory, dino_dir, image_path, tmp_path):
    service = dino_service(checkpoint_factory, tmp_path, dino_dir, max_instances=3,
                           concept_nms_iou=0.5)
    tasks = [{"id": 1, "data": {"image": str(image_path)}}]
    (once,) = service.predict(tasks, CONFIG, text_prompt("cat"))
    (twice,) = service.predict(tasks, CONFIG, text_prompt("cat, cat, Cat"))
    assert boxes_of(once) and boxes_of(twice) == boxes_of(once)  # asked once, not 3 times

    # two phrases of one label: one selection over both
    (both,) = service.predict(tasks, CONFIG, text_prompt("striped animal_cat, big dog_cat"))
    boxes = boxes_of(both)
    assert 0 < len(boxes) <= 3
    assert all(iou(a, b) <= 0.5 + 1e-6 for a, b in itertools.combinations(boxes, 2))
    # each phrase alone finds as many: the cap is per label, not per phrase
    alone = [len(boxes_of(service.predict(tasks, CONFIG, text_prompt(p))[0]))
             for p in ("striped animal_cat", "big dog_cat")]
    assert sum(alone) > len(boxes)
    scores = [r["score"] for r in both["result"] if r["type"] == "rectanglelabels"]
    assert scores == sorted(scores, reverse=True)


def test_background_passes_waiting_at_once_are_bounded(checkpoint_factory, dino_dir, tmp_path):
    """At most max_tasks passes wait or run in the background; a task beyond them is answered
    [] at once (Label Studio asks again later) and nothing is queued for it."""
    paths = []
    for seed in (21, 22, 23):
        path = tmp_path / f"scene{seed}.png"
        cv2.imwrite(str(path), synthetic_image(720, 960, seed=seed))
        paths.append(path)
    service = dino_service(checkpoint_factory, tmp_path, dino_dir, auto_annotate=True,
                           concept_timeout=0.001, max_tasks=2)
    tasks = [{"id": i, "data": {"image": str(p)}} for i, p in enumerate(paths)]
    assert service.predict(tasks[:2], CONFIG, None) == [[], []]  # two passes: the bound
    assert service.predict(tasks[2:], CONFIG, None) == [[]]
    pending = list(service.concepts._pending.values())
    assert len(pending) <= 2
    for future in pending:
        future.result(timeout=300)
    assert len(service.concepts._results) == 2  # the third task was not queued


# -- memory: a concept pass's masks and regions count in image_memory_mb ---------------------------

def test_a_typed_pass_counts_its_masks_and_regions_in_the_memory_budget(
        checkpoint_factory, dino_dir, image_path, tmp_path):
    """The instances' full-size masks are counted while their regions are made, the regions for
    as long as the request's reservation lives; with no room left in image_memory_mb the pass
    gets a 503 after memory_wait instead of growing the process past the budget."""
    service = dino_service(checkpoint_factory, tmp_path, dino_dir, max_instances=20,
                           concept_nms_iou=1, memory_wait=1)
    tasks = [{"id": i, "data": {"image": str(image_path)}} for i in range(2)]

    # without a reservation of the caller's, the pass's own is given back when it returns
    (alone,) = service.predict(tasks[:1], CONFIG, text_prompt("cat, dog, car"))
    assert sum(1 for r in alone["result"] if r["type"] == "brushlabels") >= 2, \
        "random weights at a low threshold give instances"
    assert service.memory.used == 0
    assert service.memory.peak >= service.result_bytes(alone["result"]) + H * W  # + a mask

    # the request's reservation keeps every task's regions counted until it is released
    held = service.memory.hold(5)
    answers = service.predict(tasks, CONFIG, text_prompt("cat, dog, car"), held=held)
    assert held.held >= service.result_bytes([r for a in answers for r in a["result"]])
    assert service.memory.used == held.held  # nothing else is left counted
    held.release()
    assert service.memory.used == 0

    # room for the image's load but not for the masks: the pass waits memory_wait, then 503
    masks = sum(1 for r in alone["result"] if r["type"] == "brushlabels")
    service.memory.peak = 0
    with service.memory.reservation(5):
        service.images.locate(str(image_path)).load()
    load = service.memory.peak
    blocker = service.memory.hold(1)
    blocker.grow(service.memory.max_bytes - load - masks * H * W // 2, "other requests")
    try:
        with pytest.raises(BusyError, match=r"image_memory_mb=\d+\), no room for the masks "
                                            r"of \d+ instance\(s\) of task 0"):
            service.predict(tasks[:1], CONFIG, text_prompt("cat, dog, car"))
        assert service.memory.used == blocker.held  # the failed pass gave back what it held
    finally:
        blocker.release()
