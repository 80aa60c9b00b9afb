"""Label Studio layer: the parts of a labeling config this backend needs, its controls by type,
and where a task's image URL is (:meth:`LabelConfig.image_url`).

Controls are always found by their tag type (``KeyPointLabels``, ``RectangleLabels``,
``BrushLabels``, ``PolygonLabels``), never by their ``name``: every project names them freely.
A smart ``RectangleLabels`` with ``exemplar="positive"`` (or ``"negative"``) is a box-exemplar tool
(:attr:`Control.exemplar`): its boxes ask SAM 3 for every instance like (or unlike) the boxed one,
and it never receives the model's regions. Label Studio 1.23.2 keeps the attribute (its config
schema allows any attribute on a control) and sends it back in the ``label_config`` of /predict.
Parsed configs are memoised by their text (:class:`LabelConfigCache`, bounded in bytes), so a
config arriving with every click costs nothing after the first. DTDs and entities are refused
(Label Studio configs have none; entity expansion would let a small config grow large).
"""
from __future__ import annotations

import threading
import xml.etree.ElementTree as ET
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring as defused_fromstring

from sam_backend.common.limits import shown
from sam_backend.common.text import is_true
from sam_backend.errors import ImageError, RequestError

PROMPT_TYPES = ("keypointlabels", "rectanglelabels")
# controls of a video (``<VideoRectangle>`` draws boxes, ``<Labels>`` names them): kept apart from
# the image controls above, which every image path iterates
VIDEO_CONTROL_TYPES = frozenset(("videorectangle", "labels"))
OUTPUT_TYPES = ("brushlabels", "polygonlabels", "rectanglelabels")
CONTROL_TYPES = frozenset(PROMPT_TYPES + OUTPUT_TYPES)
# exemplar="..." on a smart RectangleLabels: which kind of box exemplar its boxes are
EXEMPLAR_KINDS = {"positive": "positive", "true": "positive", "yes": "positive", "1": "positive",
                  "negative": "negative"}


@dataclass(frozen=True)
class Control:
    """A labels control: ``type`` is the lower-case tag (e.g. ``brushlabels``), ``name`` its
    ``name``, ``to_name`` the object (image) it labels, ``labels`` its label values."""

    type: str
    name: str
    to_name: str
    labels: Tuple[str, ...]
    smart: bool
    hints: Tuple[Tuple[str, str], ...] = ()  # (label, its ``hint`` attribute), where given
    exemplar: Optional[str] = None  # "positive" / "negative": a box-exemplar tool; None otherwise

    def has_label(self, label: str) -> bool:
        return label in self.labels

    @property
    def is_output(self) -> bool:
        """Whether the model's regions may go under it (brush, polygon, rectangle; never an
        exemplar tool, whose boxes are prompts)."""
        return self.type in OUTPUT_TYPES and self.exemplar is None

    def hint(self, label: str) -> Optional[str]:
        """The label's ``hint`` attribute (``<Label value="Car" hint="red car"/>``), if any."""
        return dict(self.hints).get(label)


@dataclass(frozen=True)
class TextInput:
    """A ``TextArea`` on an image: where an annotator can type a concept phrase."""

    name: str
    to_name: str


@dataclass(frozen=True)
class VideoTag:
    """A ``<Video name=... value="$key" framerate=...>`` object: ``framerate`` is the attribute
    as written (a number, or ``$key`` read from the task's data; Label Studio's default is 24)."""

    name: str
    data_key: str
    framerate: Optional[str]


@dataclass(frozen=True)
class LabelConfig:
    controls: Tuple[Control, ...]
    images: Dict[str, str]  # Image tag name -> task data key ($image -> "image")
    text_inputs: Tuple[TextInput, ...] = ()
    videos: Tuple[VideoTag, ...] = ()
    video_controls: Tuple[Control, ...] = ()  # VideoRectangle and Labels controls (any object)

    def control(self, name: str) -> Optional[Control]:
        for control in self.controls:
            if control.name == name:
                return control
        return None

    def outputs_for(self, kind: str, to_name: str) -> List[Control]:
        """Controls of type ``kind`` that label the object ``to_name`` and may receive the
        model's regions (exemplar tools never do)."""
        return [c for c in self.controls if c.type == kind and c.to_name == to_name
                and c.exemplar is None]

    def hint_for(self, to_name: str, label: str, prefer: Optional[str] = None) -> Optional[str]:
        """The ``hint`` of ``label`` on ``to_name``: the one on the control named ``prefer``
        when it gives one, else the first control (config order) that does; None without."""
        controls = sorted((c for c in self.controls if c.to_name == to_name),
                          key=lambda c: c.name != prefer)  # stable: config order otherwise
        for control in controls:
            hint = control.hint(label)
            if hint:
                return hint
        return None

    def output_for(self, kind: str, to_name: str, label: str) -> Optional[Control]:
        """The control of type ``kind`` on ``to_name`` that has ``label`` (the first, if
        several). Prefers a non-smart control (a smart one is a prompt tool)."""
        candidates = [c for c in self.outputs_for(kind, to_name) if c.has_label(label)]
        candidates.sort(key=lambda c: c.smart)
        return candidates[0] if candidates else None

    def data_key(self, to_name: str) -> str:
        try:
            return self.images[to_name]
        except KeyError:
            raise RequestError(
                f"the labeling config has no <Image name=... value=\"$...\"> for the "
                f"prompt's to_name {shown(to_name)}") from None

    def image_url(self, task: Dict[str, Any], to_name: str,
                  item_index: Optional[int] = None) -> str:
        """The URL (or path) of the image ``to_name`` in ``task["data"]``: the value under the
        Image tag's ``$key``, or its ``item_index``-th entry when the task holds a list."""
        key = self.data_key(to_name)
        url = task["data"].get(key)
        if isinstance(url, list):
            if not url:
                raise RequestError(f"task {shown(task.get('id'))}: data.{shown(key)} is an "
                                   f"empty list")
            url = url[item_index or 0] if (item_index or 0) < len(url) else None
        if not isinstance(url, str) or not url.strip():
            raise ImageError(f"task {shown(task.get('id'))} has no image in data.{shown(key)}: "
                             f"the labeling config's Image tag reads ${shown(key)}")
        return url


def _exemplar(element, tag: str, smart: bool) -> Optional[str]:
    """The control's ``exemplar`` attribute as "positive" / "negative" (None when absent or
    false). A value it cannot mean, or one on a control whose boxes Label Studio would never send
    (not a smart RectangleLabels), is a RequestError naming the control: silently ignoring it
    would turn a typo into boxes that find nothing, or negatives into positives."""
    value = element.get("exemplar")
    if value is None or value.strip().lower() in ("", "false", "no", "0"):
        return None
    name = shown(element.get("name", ""))
    kind = EXEMPLAR_KINDS.get(value.strip().lower())
    if kind is None:
        raise RequestError(f"the labeling config's control {name} has exemplar={shown(value)}: "
                           f"use exemplar=\"positive\" (find all like this box) or "
                           f"exemplar=\"negative\" (not like this box)")
    if tag != "rectanglelabels" or not smart:
        raise RequestError(f"the labeling config's control {name} has exemplar={shown(value)}, "
                           f"which only a <RectangleLabels smart=\"true\"> can have (Label Studio "
                           f"sends the boxes of smart tools only)")
    return kind


def parse_label_config(text: str) -> LabelConfig:
    """Parse the labeling-config XML. Raises RequestError on XML that does not parse, or that
    has a DTD or entities."""
    if not isinstance(text, str):
        raise RequestError(f"label_config must be the labeling config XML (a string), got "
                           f"{type(text).__name__}")
    if not text or not text.strip():
        raise RequestError("the request has no label_config: Label Studio sends the project's "
                           "labeling config with every /predict; is the backend attached to a "
                           "project?")
    try:
        root = defused_fromstring(text, forbid_dtd=True)
    except ET.ParseError as exc:
        raise RequestError(f"the label_config is not valid XML: {exc}") from None
    except DefusedXmlException:
        raise RequestError("the label_config has a DTD or entities, which labeling configs "
                           "never need: remove the <!DOCTYPE ...>") from None
    except RecursionError:
        raise RequestError("the label_config is not valid XML: nested too deeply") from None
    controls: List[Control] = []
    images: Dict[str, str] = {}
    text_inputs: List[TextInput] = []
    videos: List[VideoTag] = []
    video_controls: List[Control] = []
    for element in root.iter():
        tag = element.tag.lower() if isinstance(element.tag, str) else ""
        if tag == "video" and element.get("name"):
            videos.append(VideoTag(element.get("name"), (element.get("value") or "").lstrip("$"),
                                   element.get("framerate") or element.get("frameRate")))
        elif tag in VIDEO_CONTROL_TYPES:
            labels = tuple(child.get("value") for child in element
                           if isinstance(child.tag, str) and child.tag.lower() == "label"
                           and child.get("value") is not None)
            video_controls.append(Control(tag, element.get("name", ""),
                                          element.get("toName", ""), labels, False))
        elif tag == "image":
            value = element.get("value") or element.get("valueList") or ""
            if element.get("name"):
                images[element.get("name")] = value.lstrip("$")
        elif tag in CONTROL_TYPES:
            label_tags = [child for child in element
                          if isinstance(child.tag, str) and child.tag.lower() == "label"
                          and child.get("value") is not None]
            labels = tuple(child.get("value") for child in label_tags)
            hints = tuple((child.get("value"), child.get("hint").strip()) for child in label_tags
                          if (child.get("hint") or "").strip())
            smart = is_true(element.get("smart")) or is_true(element.get("smartOnly"))
            controls.append(Control(tag, element.get("name", ""), element.get("toName", ""),
                                    labels, smart, hints, _exemplar(element, tag, smart)))
        elif tag == "textarea":
            text_inputs.append(TextInput(element.get("name", ""), element.get("toName", "")))
    return LabelConfig(tuple(controls), images, tuple(text_inputs), tuple(videos),
                       tuple(video_controls))


class LabelConfigCache:
    """Parsed configs by text, least recently used first out, bounded by the configs' text size
    (a parsed config holds a subset of its text's strings, so it is counted twice)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._items: "OrderedDict[str, LabelConfig]" = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def cost(text: str) -> int:
        return 3 * len(text) + 1024

    def parse(self, text: str) -> LabelConfig:
        with self._lock:
            config = self._items.get(text) if isinstance(text, str) else None
            if config is not None:
                self._items.move_to_end(text)
                return config
        config = parse_label_config(text)
        cost = self.cost(text)
        if cost > self.max_bytes:
            return config
        with self._lock:
            if text not in self._items:
                self._items[text] = config
                self.nbytes += cost
            while self.nbytes > self.max_bytes:
                old, _ = self._items.popitem(last=False)
                self.nbytes -= self.cost(old)
        return config

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
