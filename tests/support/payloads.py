"""/predict payloads as Label Studio 1.23 sends them, and the brush masks in its answers."""
from __future__ import annotations

from label_studio_converter.brush import decode_rle

FULL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <KeyPointLabels name="KeyPointLabels" toName="image" smart="true">
    <Label value="cat" smart="true"/><Label value="dog" smart="true"/>
  </KeyPointLabels>
  <RectangleLabels name="RectangleLabels" toName="image" smart="true">
    <Label value="cat"/><Label value="dog"/>
  </RectangleLabels>
  <PolygonLabels name="PolygonLabels" toName="image"><Label value="cat"/><Label value="dog"/></PolygonLabels>
  <BrushLabels name="BrushLabels" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels>
</View>"""

# Another project: other control names, another data key, and no polygon control.
H, W = 360, 540


def keypoint(x, y, label="cat", positive=True, from_name="KeyPointLabels", to_name="image"):
    return {"original_width": W, "original_height": H, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": [label]},
            "is_positive": positive, "id": f"kp{x}{y}", "from_name": from_name,
            "to_name": to_name, "type": "keypointlabels", "origin": "manual"}


def rectangle(x, y, w, h, label="cat"):
    return {"original_width": W, "original_height": H, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0,
                      "rectanglelabels": [label]},
            "id": "rect1", "from_name": "RectangleLabels", "to_name": "image",
            "type": "rectanglelabels", "origin": "manual"}


def exemplar(x, y, w, h, label="cat", from_name="Exemplar", region_id=None):
    """A box drawn with an exemplar tool of ``xml_templates/exemplars.xml`` (``Exemplar``: find
    all like this; ``NotExemplar``: not like this), as Label Studio 1.23.2 serialises a smart
    rectangle: no ``is_positive``."""
    return {"original_width": W, "original_height": H, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0,
                      "rectanglelabels": [label]},
            "id": region_id or f"{from_name}{x}{y}", "from_name": from_name, "to_name": "image",
            "type": "rectanglelabels", "origin": "manual"}


def payload(regions, config=FULL_CONFIG, data=None, project="1.1700000000", task_id=1):
    return {"tasks": [{"id": task_id, "data": data or {"image": "/data/local-files/?d=pics/scene.png"},
                       "annotations": [], "drafts": [], "predictions": [], "project": 1}],
            "project": project, "label_config": config,
            "params": {"login": None, "password": None, "context": {"result": regions}}}


def decode_brush(region):
    value = region["value"]
    height, width = region["original_height"], region["original_width"]
    flat = decode_rle(value["rle"])
    assert flat.size == width * height * 4
    return flat.reshape(height, width, 4)[:, :, 3] > 0
