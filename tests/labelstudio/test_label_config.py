"""Labeling-config parsing (labelstudio/label_config.py), without a server."""
from __future__ import annotations

import pytest

from sam_backend.errors import ImageError, RequestError
from sam_backend.labelstudio.label_config import LabelConfigCache, parse_label_config

CONFIG = """<View>
  <Image name="photo" value="$img"/>
  <Image name="pages" valueList="$pages"/>
  <KeyPointLabels name="clicks" toName="photo" smart="true">
    <Label value="car" hint="a red car"/><Label value="tree"/>
  </KeyPointLabels>
  <RectangleLabels name="boxes" toName="photo" smartOnly="true"><Label value="car"/></RectangleLabels>
  <RectangleLabels name="plain_boxes" toName="photo"><Label value="car"/></RectangleLabels>
  <View><BrushLabels name="masks" toName="photo"><Label value="car"/><Label value="tree"/>
  </BrushLabels></View>
  <PolygonLabels name="outlines" toName="pages"><Label value="car"/></PolygonLabels>
  <Choices name="weather" toName="photo"><Choice value="sunny"/></Choices>
  <TextArea name="concept" toName="photo"/>
</View>"""


def test_controls_are_found_by_type_with_their_target_and_labels():
    config = parse_label_config(CONFIG)
    assert [(c.type, c.name, c.to_name, c.labels) for c in config.controls] == [
        ("keypointlabels", "clicks", "photo", ("car", "tree")),
        ("rectanglelabels", "boxes", "photo", ("car",)),
        ("rectanglelabels", "plain_boxes", "photo", ("car",)),
        ("brushlabels", "masks", "photo", ("car", "tree")),  # nested in a View: still found
        ("polygonlabels", "outlines", "pages", ("car",)),
    ]  # Choices is no labels control of this backend
    assert config.images == {"photo": "img", "pages": "pages"}
    assert [(t.name, t.to_name) for t in config.text_inputs] == [("concept", "photo")]
    assert config.control("clicks").hint("car") == "a red car"
    assert config.control("clicks").hint("tree") is None


def test_tag_names_are_matched_whatever_their_case():
    config = parse_label_config('<View><image name="i" value="$x"/><brushlabels name="b" '
                                'toName="i"><label value="a"/></brushlabels></View>')
    assert config.images == {"i": "x"} and config.control("b").type == "brushlabels"


def test_smart_and_smart_only_mark_a_prompt_tool_and_outputs_prefer_the_plain_control():
    config = parse_label_config(CONFIG)
    assert config.control("clicks").smart and config.control("boxes").smart
    assert not config.control("plain_boxes").smart and not config.control("masks").smart
    # the box output goes to the control the annotator draws with by hand
    assert config.output_for("rectanglelabels", "photo", "car").name == "plain_boxes"
    assert config.output_for("brushlabels", "photo", "tree").name == "masks"
    assert config.output_for("brushlabels", "photo", "bird") is None
    assert config.output_for("polygonlabels", "photo", "car") is None  # it labels "pages"


def test_smart_false_is_not_smart():
    config = parse_label_config('<View><Image name="i" value="$x"/><KeyPointLabels name="k" '
                                'toName="i" smart="false"><Label value="a"/></KeyPointLabels>'
                                '</View>')
    assert not config.control("k").smart


def test_the_image_url_of_a_task_comes_from_the_image_tags_key():
    config = parse_label_config(CONFIG)
    task = {"id": 7, "data": {"img": "s3://b/a.png", "pages": ["p0.png", "p1.png"]}}
    assert config.image_url(task, "photo") == "s3://b/a.png"
    assert config.image_url(task, "pages", 1) == "p1.png"
    assert config.image_url(task, "pages") == "p0.png"
    with pytest.raises(ImageError, match=r"task 7 has no image in data\.'pages'"):
        config.image_url(task, "pages", 5)
    with pytest.raises(ImageError, match=r"task 8 has no image in data\.'img'"):
        config.image_url({"id": 8, "data": {"image": "a.png"}}, "photo")
    with pytest.raises(RequestError, match="no <Image name=... value=\"\\$...\"> for the prompt's "
                                           "to_name 'image'"):
        config.image_url(task, "image")


@pytest.mark.parametrize("text, message", [
    ("", "the request has no label_config"),
    (None, "label_config must be the labeling config XML (a string), got NoneType"),
    ("<View><Image", "the label_config is not valid XML"),
    ('<?xml version="1.0"?><!DOCTYPE v [<!ENTITY a "aaaa">]><View>&a;</View>',
     "the label_config has a DTD or entities"),
    ('<!DOCTYPE View SYSTEM "http://127.0.0.1:9/x.dtd"><View/>',
     "the label_config has a DTD or entities"),
    ("<View></Image>", "the label_config is not valid XML: mismatched tag"),
])
def test_bad_configs_are_refused_with_a_clear_message(text, message):
    with pytest.raises(RequestError) as err:
        parse_label_config(text)
    assert message in str(err.value)


def test_the_cache_is_bounded_in_bytes_and_returns_the_same_parse():
    cache = LabelConfigCache(max_bytes=2 * LabelConfigCache.cost(CONFIG))
    first = cache.parse(CONFIG)
    assert cache.parse(CONFIG) is first and len(cache) == 1
    other = CONFIG.replace("photo", "image")
    cache.parse(other)
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes
    cache.parse(CONFIG.replace("photo", "third"))  # the least recently used goes
    assert len(cache) == 2 and cache.parse(other) is cache.parse(other)
    assert cache.parse(CONFIG) is not first  # it was evicted: parsed again
    # a config larger than the whole budget is parsed, not kept
    oversized = CONFIG + " " * (2 * cache.max_bytes)
    assert cache.parse(oversized).images == first.images
    assert oversized not in cache._items
