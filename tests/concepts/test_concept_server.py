"""Typed concept prompts against a real ``sam-backend serve`` under a memory watchdog (issue 21,
defect 4 and the TextArea part of 8): a 1 MB prompt on a 40 000-label config is refused within a
couple of seconds, with or without a concept model; a phrase longer than the text encoder takes
is a 400, never a 500; the server keeps serving and its memory stays put."""
from __future__ import annotations

import time

import cv2
import pytest
import requests

from tests.support.random_weights import make_random_grounding_dino, synthetic_image
from tests.support.concept_server import (MIB, many_labels_config, predict_body, serve_backend,
                                    text_prompt)

HUGE = "x_l1," * 200_000  # 1 MB
LABELS = many_labels_config(40_000)  # ~0.9 MB, under max_label_config_kb
FAST = 2.0  # seconds: refused from the prompt's size, not after reading it
MEMORY = 300 * MIB  # growth allowed while answering (the 2 MB body, parsed once)


@pytest.fixture(scope="module")
def docroot(tmp_path_factory):
    root = tmp_path_factory.mktemp("docroot")
    cv2.imwrite(str(root / "scene.png"), synthetic_image(240, 320, seed=3))
    return root


def env_for(docroot, tmp_path_factory):
    return {"LOCAL_FILES_DOCUMENT_ROOT": str(docroot),
            "SAM_BACKEND_IMAGE_CACHE_DIR": str(tmp_path_factory.mktemp("imgcache"))}


@pytest.fixture(scope="module")
def plain(checkpoint_factory, docroot, tmp_path_factory):
    """No concept model."""
    with serve_backend(["model_name=mobile_sam", "device=cpu",
                        f"sam_checkpoint_file={checkpoint_factory('mobile_sam')}"],
                       tmp_path_factory.mktemp("plain"), env_for(docroot, tmp_path_factory)) as run:
        yield run


@pytest.fixture(scope="module")
def dino(checkpoint_factory, docroot, tmp_path_factory):
    """Grounding DINO (reduced, random weights: its text encoder takes 32 tokens); phrases up to
    1000 characters, so that the text encoder's own limit is reached."""
    directory = make_random_grounding_dino(tmp_path_factory.mktemp("gd") / "gd", "tiny", seed=7)
    with serve_backend(["model_name=mobile_sam", "device=cpu",
                        f"sam_checkpoint_file={checkpoint_factory('mobile_sam')}",
                        "concept_model=grounding_dino", f"concept_checkpoint={directory}",
                        "concept_threshold=0.3", "max_phrase_chars=1000"],
                       tmp_path_factory.mktemp("dino"), env_for(docroot, tmp_path_factory)) as run:
        yield run


def ask(process, context, config=LABELS, timeout=30.0):
    started = time.monotonic()
    response = requests.post(process.url + "/predict",
                             json=predict_body("scene.png", config, context), timeout=timeout)
    return response, time.monotonic() - started


def refused(response, *needles):
    assert response.status_code == 400, (response.status_code, response.text[:500])
    message = response.json()["errors"][0]
    for needle in needles:
        assert needle in message, message
    return message


def still_serving(process, watch):
    assert process.running
    assert requests.get(process.url + "/health", timeout=5).status_code == 200
    assert watch.growth < MEMORY, f"RSS grew by {watch.growth / MIB:.0f} MiB"


def test_without_a_concept_model_a_huge_prompt_is_refused_at_once(plain):
    process, watch = plain
    watch.mark()
    response, seconds = ask(process, text_prompt(HUGE))
    refused(response, "without a concept model", "concept_model=grounding_dino")
    assert seconds < FAST, seconds
    # a TextArea region whose to_name is a list: a 400 naming the field, not a 500
    response, _ = ask(process, text_prompt("cat", to_name=["image"]))
    refused(response, "context.result[0].to_name must be a string")
    still_serving(process, watch)


def test_with_a_concept_model_a_huge_prompt_is_refused_naming_the_bound(dino):
    process, watch = dino
    watch.mark()
    response, seconds = ask(process, text_prompt(HUGE))
    refused(response, "max_phrases")
    assert seconds < FAST, seconds
    response, seconds = ask(process, text_prompt("x_l1, " * 33))
    refused(response, "33 phrases", "max_phrases")
    assert seconds < FAST, seconds
    response, _ = ask(process, text_prompt("cat", to_name=["image"]))
    refused(response, "context.result[0].to_name must be a string")
    still_serving(process, watch)


@pytest.mark.parametrize("phrase", ["a " * 300 + "_l1", "a " * 40 + "_l1"],
                         ids=["300 words", "40 words"])
def test_a_phrase_longer_than_the_text_encoder_takes_is_a_400(dino, phrase):
    process, watch = dino
    watch.mark()
    response, seconds = ask(process, text_prompt(phrase))
    refused(response, "tokens long", "takes at most 32")
    assert seconds < 10, seconds  # refused before the image is read
    still_serving(process, watch)
