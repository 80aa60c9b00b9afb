"""Grounding DINO asks for every label of a pass in one joined caption (issue 23, part 1).

Fidelity: the instances (boxes, scores, labels) of a joined caption equal what the library's own
pipeline (``GroundingDinoProcessor`` -> ``GroundingDinoForObjectDetection`` ->
``post_process_grounded_object_detection``) gives on the same caption and weights, each box going
to the phrase whose tokens hold its most probable word token. The expected token positions are
laid out here by hand from the word-level tokenizer (``[CLS] car . red car . [SEP]``), not taken
from the engine. Protocol: labels come back right when one phrase contains another ("car", "red
car") or repeats one of its words ("red"); more phrases than one caption holds take several
captions and every label is answered.

Random weights of the real architecture: a reduced Grounding DINO (max_text_len 32) with a
word-level tokenizer laid out like BERT's (so the periods are the model's delimiters), MobileSAM
for the masks. The detector input is 200 px on the shorter side (``concept_image_size``) to keep
the suite fast; the full-size check is in the slow lane."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np
import pytest
import torch

from sam_backend.concepts.base import Selection
from sam_backend.concepts.grounding_dino import image_size_kwargs
from sam_backend.concepts.phrases import concepts_of
from sam_backend.errors import ConfigError
from sam_backend.labelstudio.label_config import parse_label_config
from sam_backend.settings import Settings
from tests.concepts.conftest import H, W, make_service

LOW = 0.3  # random weights: a threshold low enough to give instances
SIZE = 200  # concept_image_size of these tests
ALL = Selection(1.0, 10_000)  # keep every instance: compare them all


def dino(checkpoint_factory, tmp_path, directory, **options):
    options = {"concept_threshold": LOW, "concept_image_size": SIZE, **options}
    return make_service(checkpoint_factory, tmp_path, concept_model="grounding_dino",
                        concept_checkpoint=str(directory), **options)


@pytest.fixture(scope="module")
def engine(checkpoint_factory, dino_bert_dir, tmp_path_factory):
    """The joined-caption engine (the default), loaded as the backend loads it."""
    service = dino(checkpoint_factory, tmp_path_factory.mktemp("joined"), dino_bert_dir)
    return service.concept_annotator().engine


def load_rgb(path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def reference(directory, image: np.ndarray, phrases: Sequence[str], threshold: float,
              size: int = SIZE) -> Tuple[List[Tuple[np.ndarray, np.ndarray]], List[str]]:
    """The library's pipeline on the joined caption of ``phrases`` (words of the test
    tokenizer's vocabulary): per phrase, the (N, 4) boxes (clipped, empty ones dropped) and (N,)
    scores of the boxes whose most probable word token is one of its words; and the caption's
    tokens. Positions are laid out from the words: ``[CLS]``, each phrase's words then ``.``,
    ``[SEP]``."""
    from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

    processor = GroundingDinoProcessor.from_pretrained(str(directory))
    model = GroundingDinoForObjectDetection.from_pretrained(str(directory)).eval()
    caption = " ".join(p + "." for p in phrases)
    tokens, positions = ["[CLS]"], []
    for phrase in phrases:
        words = phrase.split()
        positions.append(list(range(len(tokens), len(tokens) + len(words))))
        tokens += words + ["."]
    tokens.append("[SEP]")
    kwargs = image_size_kwargs(processor.image_processor, size)
    inputs = processor(images=image, text=caption, return_tensors="pt", **kwargs)
    assert processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0]) == tokens
    with torch.no_grad():
        outputs = model(**inputs)
    ref = processor.post_process_grounded_object_detection(
        outputs, inputs["input_ids"], threshold=threshold, text_threshold=threshold,
        target_sizes=[image.shape[:2]])[0]
    probs = torch.sigmoid(outputs.logits[0])
    probs = probs[probs.max(-1).values > threshold]  # the queries the post-processing kept
    assert len(probs) == len(ref["scores"])
    word_probs = torch.stack([probs[:, p].max(-1).values for p in positions], dim=1)
    owner = word_probs.argmax(1).numpy()
    height, width = image.shape[:2]
    boxes = ref["boxes"].numpy().clip(0, [width, height, width, height])
    scores = ref["scores"].numpy()
    area = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return [(boxes[(owner == i) & area], scores[(owner == i) & area])
            for i in range(len(phrases))], tokens


def rows(boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(score, box) rows in a fixed order (score, then box), for comparing two sets."""
    table = np.concatenate([np.asarray(scores, np.float64).reshape(-1, 1),
                            np.asarray(boxes, np.float64).reshape(-1, 4)], axis=1)
    return table[np.lexsort(table.T[::-1])]


def assert_same(found, expected, label):
    got, want = rows(found.boxes, found.scores), rows(*expected)
    assert got.shape == want.shape, f"{label}: {len(got)} instances, the library {len(want)}"
    np.testing.assert_allclose(got[:, 0], want[:, 0], rtol=0, atol=1e-6, err_msg=label)
    np.testing.assert_allclose(got[:, 1:], want[:, 1:], rtol=0, atol=1e-3, err_msg=label)


# -- fidelity and the token spans ----------------------------------------------------------------

def test_joined_caption_instances_equal_the_library_with_labels_by_token_span(
        engine, dino_bert_dir, image_path):
    """"car" is a word of "red car", "red" another: each box goes to the phrase whose own
    tokens hold its best word token, so the "car" of "red car" never gives "car" a box."""
    image = load_rgb(image_path)
    phrases = ["car", "red car", "red", "dog"]
    (caption,) = engine.captions(phrases)
    assert caption.text == "car. red car. red. dog." and len(caption.spans) == 4
    found = engine.detect("joined", lambda: image, [[p] for p in phrases], LOW, ALL)
    expected, tokens = reference(dino_bert_dir, image, phrases, LOW)
    assert tokens[caption.spans[0][0]:caption.spans[0][1]] == ["car"]
    assert tokens[caption.spans[1][0]:caption.spans[1][1]] == ["red", "car"]
    for phrase, instances, want in zip(phrases, found, expected):
        assert_same(instances, want, phrase)
        assert instances.masks.shape == (len(instances), H, W)  # the kept boxes' masks
    # the random weights spread the boxes over several phrases, "red car" among them, so the
    # attribution is really exercised
    assert len(found[1]) > 0 and sum(len(f) > 0 for f in found) >= 3, [len(f) for f in found]


def test_one_label_with_several_phrases_pools_them_and_a_phrase_is_asked_once(
        engine, dino_bert_dir, image_path):
    image = load_rgb(image_path)
    # label 0 asks "car" and "red"; label 1 "Dog." and "dog" (one query form); label 2 "car"
    entries = [["car", "red"], ["Dog.", "dog"], ["car"]]
    assert [c.phrases for c in engine.captions([p for e in entries for p in e])] == [
        ("car.", "red.", "dog.")]
    first, second, third = engine.detect("joined", lambda: image, entries, LOW, ALL)
    expected, _ = reference(dino_bert_dir, image, ["car", "red", "dog"], LOW)
    pooled = (np.concatenate([expected[0][0], expected[1][0]]),
              np.concatenate([expected[0][1], expected[1][1]]))
    assert_same(first, pooled, "car + red")
    assert_same(second, expected[2], "dog")  # once, not twice
    assert_same(third, expected[0], "car")
    assert len(first) > len(third) > 0 and len(second) > 0, (len(first), len(second), len(third))


def test_more_phrases_than_one_caption_holds_take_several_captions(
        engine, dino_bert_dir, image_path):
    words = ["car", "cat", "dog", "person", "tree", "house", "disc", "square", "bird", "bike",
             "boat", "road", "sky", "window", "red", "blue", "green", "big", "small", "circle"]
    captions = engine.captions(words)
    limit = engine.max_phrase_tokens
    assert limit == 32  # the reduced config's max_text_len: 15 one-word phrases a caption
    assert [len(c.phrases) for c in captions] == [15, 5]
    assert [p for c in captions for p in c.phrases] == [w + "." for w in words]
    assert all(len(c.input_ids) <= limit for c in captions)
    assert len(captions[0].input_ids) + 2 > limit  # full: the next phrase did not fit

    image = load_rgb(image_path)
    state, _ = engine.image_state("joined", lambda: image)
    found = dict(engine.find_all(state, words, LOW))  # the boxes, before any mask
    assert list(found) == words  # every label answered, each once
    for caption in (words[:15], words[15:]):
        expected, _ = reference(dino_bert_dir, image, caption, LOW)
        for word, want in zip(caption, expected):
            assert_same(found[word], want, word)
    assert any(len(found[w]) for w in words[:15]) and any(len(found[w]) for w in words[15:])


def test_per_label_passes_ask_each_phrase_alone(checkpoint_factory, dino_bert_dir, image_path,
                                                tmp_path):
    """``concept_passes=per_label`` (the way before, kept to compare): each phrase is its own
    caption, so a box of one phrase is never another's."""
    service = dino(checkpoint_factory, tmp_path, dino_bert_dir, concept_passes="per_label")
    engine = service.concept_annotator().engine
    image = load_rgb(image_path)
    state, _ = engine.image_state("per-label", lambda: image)
    found = dict(engine.find_all(state, ["car", "red car"], LOW))
    for phrase, instances in found.items():
        (alone,), _ = reference(dino_bert_dir, image, [phrase], LOW)
        # alone, every kept box is the phrase's (its best word token is one of its words)
        assert_same(instances, alone, phrase)


@pytest.mark.slow
def test_full_size_joined_caption_equals_the_library(checkpoint_factory, image_path, tmp_path):
    """The ``grounding-dino-tiny`` architecture (Swin-T + BERT-base, 256 text tokens) at the
    processor's own input size: the same fidelity as the reduced model's."""
    from tests.support.random_weights import CACHE_DIR, make_random_grounding_dino

    directory = CACHE_DIR / "grounding-dino-full-bert-seed0"  # shared with the benchmark
    if not (directory / "config.json").is_file():
        make_random_grounding_dino(directory, "full", seed=0, bert_layout=True)
    engine = dino(checkpoint_factory, tmp_path, directory,
                  concept_image_size=0).concept_annotator().engine
    assert engine.max_phrase_tokens == 256 and engine.image_kwargs == {}
    image = load_rgb(image_path)
    phrases = ["car", "red car", "red", "dog"]
    state, _ = engine.image_state("full", lambda: image)
    found = dict(engine.find_all(state, phrases, LOW))
    expected, _ = reference(directory, image, phrases, LOW, size=0)
    for phrase, want in zip(phrases, expected):
        assert_same(found[phrase], want, phrase)
    assert sum(len(f) for f in found.values()) > 0


# -- the protocol: regions under the right labels -------------------------------------------------

SUBSTRING_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="boxes" toName="image"><Label value="Car"/><Label value="Sports car" hint="red car"/><Label value="Red thing" hint="red"/></RectangleLabels>
</View>"""


def test_regions_come_back_under_the_label_whose_phrase_found_them(
        checkpoint_factory, dino_bert_dir, image_path, tmp_path):
    """A pass over a config whose labels ask "car", "red car" and "red": each label's regions
    (its best 4) are among the library's boxes of its own phrase (a phrase inside another one
    steals nothing)."""
    service = dino(checkpoint_factory, tmp_path, dino_bert_dir, concept_nms_iou=1.0,
                   max_instances=4, out_mask=False)
    config = parse_label_config(SUBSTRING_CONFIG)
    concepts = concepts_of(config)
    assert [c.phrase for c in concepts] == ["Car", "red car", "red"]
    prediction = service.concept_annotator().annotate_task(
        {"id": 1, "data": {"image": str(image_path)}}, config, concepts)
    by_label: Dict[str, List[List[float]]] = {"Car": [], "Sports car": [], "Red thing": []}
    for region in prediction["result"]:
        assert region["type"] == "rectanglelabels"
        value = region["value"]
        (label,) = value["rectanglelabels"]
        by_label[label].append([value["x"] * W / 100, value["y"] * H / 100,
                                (value["x"] + value["width"]) * W / 100,
                                (value["y"] + value["height"]) * H / 100])
    expected, _ = reference(dino_bert_dir, load_rgb(image_path), ["car", "red car", "red"], LOW)
    # every region's box is one of its own label's boxes in the library's answer, not another's
    # (a box whose mask is empty gets no region, so each label has at most its boxes)
    owners = [(label, box) for label, (boxes, _) in zip(by_label, expected) for box in boxes]
    for label, got in by_label.items():
        assert len(got) <= len(expected[list(by_label).index(label)][0]), label
        for box in got:
            nearest = min(owners, key=lambda owner: np.abs(owner[1] - box).max())
            assert np.abs(nearest[1] - box).max() < 0.05 and nearest[0] == label, (label, box)
    assert by_label["Sports car"], "the random weights gave 'red car' no box: nothing checked"


# -- the options ----------------------------------------------------------------------------------

def test_the_detector_input_size_option():
    from transformers import GroundingDinoImageProcessor

    default = GroundingDinoImageProcessor()  # grounding-dino-tiny's: 800, at most 1333
    assert image_size_kwargs(default, 0) == {}
    assert image_size_kwargs(default, 512) == {"size": {"shortest_edge": 512,
                                                        "longest_edge": 853}}
    square = GroundingDinoImageProcessor(size={"height": 160, "width": 160})  # a trained one
    assert image_size_kwargs(square, 100) == {"size": {"height": 100, "width": 100}}
    inputs = default(np.zeros((1080, 1920, 3), np.uint8), return_tensors="pt",
                     **image_size_kwargs(default, 512))
    assert tuple(inputs["pixel_values"].shape[-2:]) == (480, 853)  # 1920 capped at 853
    with pytest.raises(ConfigError, match="concept_image_size"):
        Settings.load({"concept_image_size": "-1"}, environ={})
    with pytest.raises(ConfigError, match="concept_passes"):
        Settings.load({"concept_passes": "together"}, environ={})
    assert Settings.load({}, environ={}).concept_passes == "joined"
