"""Label Studio's interactive context -> a prompt (labelstudio/prompts.py), without a server."""
from __future__ import annotations

import numpy as np
import pytest

from sam_backend.concepts.base import Exemplars
from sam_backend.errors import RequestError
from sam_backend.labelstudio.label_config import parse_label_config
from sam_backend.labelstudio.prompts import parse_context
from tests.support.payloads import FULL_CONFIG, H, W, exemplar, keypoint, rectangle
from tests.support.server_utils import REPO

CONFIG = parse_label_config(FULL_CONFIG)


def context(*regions):
    return {"result": list(regions)}


def test_no_context_or_an_empty_result_is_no_prompt():
    # a task opened, not clicked
    assert parse_context(None, CONFIG) is None
    assert parse_context({"result": []}, CONFIG) is None
    assert parse_context({}, CONFIG) is None


def test_a_keypoint_is_a_positive_point_in_percent_and_in_pixels():
    prompt = parse_context(context(keypoint(40.0, 50.0)), CONFIG)
    assert (prompt.kind, prompt.from_name, prompt.to_name, prompt.label) == \
        ("keypointlabels", "KeyPointLabels", "image", "cat")
    assert prompt.points.tolist() == [[40.0, 50.0]] and prompt.point_labels.tolist() == [1]
    assert prompt.box is None
    assert (prompt.original_width, prompt.original_height) == (W, H)
    pixels = prompt.to_prompt(W, H)
    assert pixels.points.dtype == np.float32 and pixels.labels.tolist() == [1]
    assert pixels.points.tolist() == [[0.40 * W, 0.50 * H]]


def test_negative_points_keep_their_order_and_sign():
    prompt = parse_context(context(keypoint(10, 10), keypoint(20, 30, positive=False),
                                   keypoint(50, 60, positive="false")), CONFIG)
    assert prompt.points.tolist() == [[10, 10], [20, 30], [50, 60]]
    assert prompt.point_labels.tolist() == [1, 0, 0]


def test_points_of_another_label_belong_to_another_object():
    # the last region decides the label: the dog's point is not part of the cat's prompt
    prompt = parse_context(context(keypoint(5, 5, label="dog"), keypoint(10, 10),
                                   keypoint(20, 20)), CONFIG)
    assert prompt.label == "cat" and prompt.points.tolist() == [[10, 10], [20, 20]]


def test_a_rectangle_is_a_box_and_the_last_one_drawn_wins():
    prompt = parse_context(context(rectangle(1, 1, 5, 5), rectangle(10, 20, 30, 40, "dog")),
                           CONFIG)
    assert (prompt.kind, prompt.from_name, prompt.label) == \
        ("rectanglelabels", "RectangleLabels", "dog")
    assert prompt.box.tolist() == [10, 20, 40, 60] and len(prompt.points) == 0
    assert prompt.to_prompt(200, 100).box.tolist() == [20, 20, 80, 60]


def test_a_click_on_the_edge_is_clamped_into_the_image():
    prompt = parse_context(context(keypoint(100.0004, -0.0004)), CONFIG)
    assert prompt.points.tolist() == [[100.0, 0.0]]


@pytest.mark.parametrize("value, field", [
    ({"x": 150.0, "y": 10.0}, "value.x=150.0 is outside the image"),
    ({"x": 10.0, "y": -3.0}, "value.y=-3.0 is outside the image"),
    ({"x": "1e400", "y": 10.0}, "value.x is '1e400', not a finite number"),
    ({"x": float("nan"), "y": 10.0}, "value.x is nan, not a finite number"),
    ({"x": [1], "y": 10.0}, "value.x must be a number"),
    ({"x": True, "y": 10.0}, "value.x must be a number"),
])
def test_absurd_coordinates_are_refused_naming_the_field(value, field):
    region = keypoint(0, 0)
    region["value"].update(value)
    with pytest.raises(RequestError, match=r"context\.result\[0\]") as err:
        parse_context(context(region), CONFIG)
    assert field in str(err.value)


def test_a_rectangle_without_area_or_past_the_edge_is_refused():
    with pytest.raises(RequestError, match=r"context\.result\[0\]: the rectangle has no area"):
        parse_context(context(rectangle(10, 10, 0, 5)), CONFIG)
    with pytest.raises(RequestError, match=r"value\.x \+ value\.width=130.0 is outside"):
        parse_context(context(rectangle(80, 10, 50, 5)), CONFIG)


@pytest.mark.parametrize("ctx, message", [
    ("clicks", "context must be an object with a 'result' list"),
    ({"result": {"x": 1}}, "context.result must be a list of regions"),
    ({"result": ["point"]}, "context.result[0] is not a region object with a 'value'"),
    ({"result": [{"type": "keypointlabels", "value": 5}]},
     "context.result[0] is not a region object with a 'value'"),
    ({"result": [dict(keypoint(1, 1), type="polygonlabels")]},
     "context.result[0] has type 'polygonlabels'"),
    ({"result": [dict(keypoint(1, 1), from_name=7)]},
     "context.result[0].from_name must be a string, got int"),
    ({"result": [dict(keypoint(1, 1), item_index=-1)]},
     "context.result[0].item_index must be a non-negative integer"),
    ({"result": [dict(keypoint(1, 1), original_width="wide")]},
     "context.result[0].original_width must be a positive integer"),
])
def test_bad_shapes_are_refused_naming_the_field(ctx, message):
    with pytest.raises(RequestError) as err:
        parse_context(ctx, CONFIG)
    assert message in str(err.value)


def test_a_region_without_a_label_asks_for_one():
    region = keypoint(1, 1)
    region["value"]["keypointlabels"] = []
    with pytest.raises(RequestError, match=r"context\.result\[0\] has no label: pick a label"):
        parse_context(context(region), CONFIG)


def test_a_label_or_control_the_config_does_not_have_is_refused():
    with pytest.raises(RequestError, match="label 'bird' is not in the labeling config's "
                                           "'KeyPointLabels' control"):
        parse_context(context(keypoint(1, 1, label="bird")), CONFIG)
    with pytest.raises(RequestError, match="from_name 'Clicks' is not a keypointlabels control"):
        parse_context(context(keypoint(1, 1, from_name="Clicks")), CONFIG)


def test_too_many_regions_are_refused_with_the_option_to_raise():
    regions = [keypoint(i % 100, 1) for i in range(5)]
    with pytest.raises(RequestError, match=r"context\.result has 5 regions, more than the limit "
                                           r"of 4 \(max_points\)"):
        parse_context(context(*regions), CONFIG, max_points=4)
    assert len(parse_context(context(*regions), CONFIG, max_points=5).points) == 5


def test_a_region_without_from_name_finds_the_only_candidate_control():
    region = rectangle(10, 10, 20, 20)
    del region["from_name"], region["to_name"]
    prompt = parse_context(context(region), CONFIG)
    assert (prompt.from_name, prompt.to_name) == ("RectangleLabels", "image")

    two = parse_label_config("""<View><Image name="image" value="$image"/>
      <RectangleLabels name="a" toName="image"><Label value="cat"/></RectangleLabels>
      <RectangleLabels name="b" toName="image"><Label value="cat"/></RectangleLabels></View>""")
    with pytest.raises(RequestError, match=r"2 rectanglelabels controls with the label 'cat' "
                                           r"\(a, b\): send from_name"):
        parse_context(context(region), two)


def test_the_image_of_a_multi_image_task_comes_from_item_index():
    prompt = parse_context(context(dict(keypoint(1, 1), item_index=2)), CONFIG)
    assert prompt.item_index == 2


# -- box exemplars (xml_templates/exemplars.xml) ----------------------------------------------------
EXEMPLARS = parse_label_config((REPO / "xml_templates" / "exemplars.xml").read_text())


def test_the_exemplar_template_marks_a_positive_and_a_negative_tool_that_get_no_regions():
    kinds = {c.name: c.exemplar for c in EXEMPLARS.controls}
    assert kinds == {"Exemplar": "positive", "NotExemplar": "negative", "BrushLabels": None,
                     "RectangleLabels": None}
    # the model's boxes go to the plain RectangleLabels, never to an exemplar tool
    assert EXEMPLARS.output_for("rectanglelabels", "image", "cat").name == "RectangleLabels"
    assert [c.name for c in EXEMPLARS.controls if c.is_output] == ["BrushLabels",
                                                                    "RectangleLabels"]


def test_an_exemplar_box_is_an_exemplar_request_in_percent_and_in_pixels():
    found = parse_context(context(exemplar(10, 20, 30, 40)), EXEMPLARS)
    assert isinstance(found, Exemplars)
    assert (found.label, found.to_name, found.item_index) == ("cat", "image", None)
    assert found.boxes.tolist() == [[10, 20, 40, 60]] and found.positive.tolist() == [True]
    assert found.phrase == "a cat"  # the label's hint, from the output control
    assert found.pixel_boxes(100, 200).tolist() == [[20, 20, 80, 60]]
    assert found.pixel_boxes(100, 200).dtype == np.float32
    assert found.box_labels.tolist() == [1]


def test_exemplars_of_a_label_accumulate_negatives_from_the_second_tool_included():
    # Label Studio re-sends every smart rectangle of the label on the image, the newest last
    regions = [exemplar(5, 5, 10, 10), exemplar(50, 5, 10, 10, "dog"),
               exemplar(30, 30, 20, 20, from_name="NotExemplar"),
               exemplar(60, 60, 10, 10, label="dog", from_name="NotExemplar"),
               rectangle(70, 70, 5, 5),  # a box of another tool (the click tool of FULL_CONFIG)
               exemplar(1, 60, 30, 30)]
    found = parse_context(context(*regions), EXEMPLARS)
    assert found.label == "cat"
    assert found.boxes.tolist() == [[5, 5, 15, 15], [30, 30, 50, 50], [1, 60, 31, 90]]
    assert found.positive.tolist() == [True, False, True]
    assert found.box_labels.tolist() == [1, 0, 1]
    # the newest a negative: still the label's exemplars, all of them
    last_negative = parse_context(context(*regions[:1], regions[2]), EXEMPLARS)
    assert last_negative.positive.tolist() == [True, False]


def test_an_exemplar_sent_with_is_positive_false_is_negative():
    # Label Studio 1.23.2 never sends it for a rectangle (Alt is not read); a later one might
    found = parse_context(context(exemplar(5, 5, 10, 10), dict(exemplar(30, 30, 5, 5),
                                                                is_positive=False)), EXEMPLARS)
    assert found.positive.tolist() == [True, False]


def test_only_negative_exemplars_without_a_hint_ask_for_a_positive_one():
    config = parse_label_config("""<View><Image name="image" value="$image"/>
      <RectangleLabels name="No" toName="image" smart="true" exemplar="negative">
        <Label value="cat"/></RectangleLabels>
      <BrushLabels name="BrushLabels" toName="image"><Label value="cat"/></BrushLabels></View>""")
    with pytest.raises(RequestError, match="only negative exemplars of 'cat'.*"
                                           "exemplar=\"positive\" tool first"):
        parse_context(context(exemplar(5, 5, 10, 10, from_name="No")), config)
    # with a hint the text says what to find, and the negatives remove look-alikes
    found = parse_context(context(exemplar(5, 5, 10, 10, from_name="NotExemplar")), EXEMPLARS)
    assert found.positive.tolist() == [False] and found.phrase == "a cat"


def test_absurd_exemplar_coordinates_are_refused_naming_the_region():
    with pytest.raises(RequestError, match=r"context\.result\[1\]: value\.x=250.0 is outside"):
        parse_context(context(exemplar(5, 5, 10, 10), exemplar(250, 5, 10, 10)), EXEMPLARS)
    with pytest.raises(RequestError, match=r"context\.result\[0\]: the rectangle has no area"):
        parse_context(context(exemplar(5, 5, -10, 10), exemplar(10, 5, 10, 10)), EXEMPLARS)
    with pytest.raises(RequestError, match=r"context\.result\[0\]: value\.y \+ value\.height="
                                           r"120.0 is outside"):
        parse_context(context(exemplar(5, 90, 10, 30)), EXEMPLARS)


def test_an_exemplar_label_without_an_output_control_is_refused():
    config = parse_label_config("""<View><Image name="image" value="$image"/>
      <RectangleLabels name="Exemplar" toName="image" smart="true" exemplar="positive">
        <Label value="cat"/><Label value="bird"/></RectangleLabels>
      <BrushLabels name="BrushLabels" toName="image"><Label value="cat"/></BrushLabels></View>""")
    with pytest.raises(RequestError, match="no BrushLabels, PolygonLabels or RectangleLabels "
                                           "control on 'image' has the exemplar's label 'bird'"):
        parse_context(context(exemplar(5, 5, 10, 10, label="bird")), config)


@pytest.mark.parametrize("attributes, message", [
    ('smart="true" exemplar="negativ"', "has exemplar='negativ': use exemplar=\"positive\""),
    ('exemplar="positive"', "which only a <RectangleLabels smart=\"true\"> can have"),
])
def test_an_exemplar_attribute_it_cannot_mean_is_refused_naming_the_control(attributes,
                                                                             message):
    with pytest.raises(RequestError) as err:
        parse_label_config(f"""<View><Image name="image" value="$image"/>
          <RectangleLabels name="Ex" toName="image" {attributes}><Label value="cat"/>
          </RectangleLabels></View>""")
    assert "control 'Ex'" in str(err.value) and message in str(err.value)


def test_exemplar_false_is_no_exemplar_tool():
    config = parse_label_config("""<View><Image name="image" value="$image"/>
      <RectangleLabels name="Box" toName="image" smart="true" exemplar="false">
      <Label value="cat"/></RectangleLabels></View>""")
    assert config.controls[0].exemplar is None and config.controls[0].is_output
