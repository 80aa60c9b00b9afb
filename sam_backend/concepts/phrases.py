"""Label by concept, the text side: which labels are concepts, and what an annotator typed into
a ``TextArea`` -> (label, phrase) pairs.

Everything here costs time linear in the labeling config and in the (bounded) prompt: a typed
prompt is refused from its size before it is split (``max_phrases``, ``max_phrase_chars``), the
labels of the image are indexed once (dicts by value, lower-cased value and hint), and each
phrase is then one lookup — never phrases x labels.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from sam_backend.common.deadline import UNBOUNDED, WorkScope
from sam_backend.common.limits import check_count, shown
from sam_backend.errors import RequestError

if TYPE_CHECKING:  # the parsed config is handed in (sam_backend.labelstudio.label_config)
    from sam_backend.labelstudio.label_config import LabelConfig

# labels named in a "which label is ...?" message (a config may have thousands)
_LABELS_SHOWN = 20


@dataclass(frozen=True)
class Concept:
    """One label on one image, and the phrase the model is asked for."""

    label: str
    phrase: str
    to_name: str


@dataclass(frozen=True)
class PhraseLimits:
    """Bounds of one typed prompt (README "Limits"): ``max_phrases`` phrases of at most
    ``max_phrase_chars`` characters each; ``max_regions`` regions in ``context.result``."""

    max_phrases: int = 32
    max_phrase_chars: int = 200
    max_regions: int = 512

    @classmethod
    def from_settings(cls, settings) -> "PhraseLimits":
        return cls(settings.max_phrases, settings.max_phrase_chars, settings.max_points)


def concepts_of(config: LabelConfig, only_labels: Optional[Sequence[str]] = None) -> List[Concept]:
    """Every label of the config's output controls, once per image (config order).

    ``only_labels``: keep these labels only (``concept_labels``); None keeps all."""
    wanted = set(only_labels) if only_labels else None
    found: "OrderedDict[Tuple[str, str], str]" = OrderedDict()
    for control in config.controls:
        if not control.is_output or control.to_name not in config.images:
            continue
        hints = dict(control.hints)  # once per control: Control.hint() is linear in its hints
        for label in control.labels:
            if wanted is not None and label not in wanted:
                continue
            key = (control.to_name, label)
            hint = hints.get(label)
            if key not in found or (hint and found[key] == label):
                found[key] = hint or label
    return [Concept(label, phrase, to_name) for (to_name, label), phrase in found.items()]


class LabelIndex:
    """The concepts of one image, indexed for typed phrases: built in one pass over the labels,
    then each phrase costs a dict lookup."""

    def __init__(self, concepts: Sequence[Concept], to_name: str):
        self.to_name = to_name
        self.concepts = [c for c in concepts if c.to_name == to_name]
        self.by_label: Dict[str, Concept] = {}
        self.by_label_lower: Dict[str, Concept] = {}
        self.by_text: Dict[str, Concept] = {}  # a label's value or phrase, lower case
        for concept in self.concepts:
            self.by_label.setdefault(concept.label, concept)
            self.by_label_lower.setdefault(concept.label.lower(), concept)
            # config order: the first concept whose value or hint matches wins
            self.by_text.setdefault(concept.label.lower(), concept)
            self.by_text.setdefault(concept.phrase.lower(), concept)

    def resolve(self, text: str) -> Concept:
        """What an annotator typed -> (label, phrase).

        ``phrase_Label`` names the label explicitly (the part after the last ``_`` is a label of
        the image's output controls); otherwise a phrase equal to a label's value or hint
        (case-insensitive) takes that label; a config with a single label takes any phrase under
        it."""
        text = " ".join(text.split())
        if not self.concepts:
            raise RequestError(f"the labeling config has no BrushLabels, PolygonLabels or "
                               f"RectangleLabels control on {shown(self.to_name)}: nowhere to put "
                               f"instances")
        if "_" in text:
            phrase, _, label = text.rpartition("_")
            label = label.strip()
            matched = self.by_label.get(label) or self.by_label_lower.get(label.lower())
            if matched and phrase.strip():
                return Concept(matched.label, phrase.strip(), self.to_name)
        concept = self.by_text.get(text.lower())
        if concept is not None:
            return concept
        if len(self.concepts) == 1:
            return Concept(self.concepts[0].label, text, self.to_name)
        labels = ", ".join(shown(c.label, 40) for c in self.concepts[:_LABELS_SHOWN])
        more = (f" ... ({len(self.concepts)} in all)" if len(self.concepts) > _LABELS_SHOWN
                else "")
        raise RequestError(
            f"which label is {shown(text)}? Type a label's name, or phrase_label (e.g. "
            f"'{shown(text, 40)[1:-1]}_{shown(self.concepts[0].label, 40)[1:-1]}'); labels: "
            f"{labels}{more}")


def text_prompt_region(context: Any, max_regions: int = 512) -> Optional[Tuple[int, dict]]:
    """``(index, region)`` of the last ``textarea`` region of ``context`` (``params.context`` of
    /predict), or None when it holds none (then it is a click, or no prompt). Cheap: nothing of
    the typed text is read here, so a backend without a concept model refuses a typed prompt
    before any work that grows with it. ``from_name``/``to_name`` must be strings (as Label
    Studio sends them, and as for clicks): anything else is a 400 naming the field."""
    if not isinstance(context, dict) or not isinstance(context.get("result"), list):
        return None
    items = context["result"]
    found = None
    for index, item in enumerate(items):
        if isinstance(item, dict) and item.get("type") == "textarea":
            found = index
    if found is None:
        return None
    check_count(items, max_regions, "context.result", "regions", "max_points")
    region = items[found]
    for name in ("from_name", "to_name"):
        value = region.get(name)
        if value is not None and not isinstance(value, str):
            raise RequestError(f"context.result[{found}].{name} must be a string (the name of "
                               f"a tag of the labeling config), got {type(value).__name__} "
                               f"{shown(value)}")
    return found, region


def _phrases(text: Any, index: int, limits: PhraseLimits) -> List[str]:
    """``value.text`` of a textarea region -> its phrases (split at commas and line breaks,
    whitespace collapsed), refused past the limits before the text is split."""
    if isinstance(text, str):
        text = [text]
    if not isinstance(text, list) or not all(isinstance(t, str) for t in text):
        raise RequestError(f"context.result[{index}]: a textarea region needs value.text, a list "
                           f"of strings")
    check_count(text, limits.max_phrases, f"context.result[{index}].value.text", "entries",
                "max_phrases")
    chars = sum(len(t) for t in text)
    # a comma or a line break between phrases, and a little whitespace, is allowed for
    budget = limits.max_phrases * (limits.max_phrase_chars + 3)
    if chars > budget:
        raise RequestError(
            f"the text prompt has {chars:,} characters: at most {limits.max_phrases} phrases "
            f"(max_phrases) of at most {limits.max_phrase_chars} characters (max_phrase_chars) "
            f"are taken")
    phrases: List[str] = []
    for entry in text:
        for line in entry.splitlines():
            for part in line.split(","):
                phrase = " ".join(part.split())
                if not phrase:
                    continue
                if len(phrase) > limits.max_phrase_chars:
                    raise RequestError(
                        f"the phrase {shown(phrase)} has {len(phrase)} characters, more than the "
                        f"limit of {limits.max_phrase_chars} (max_phrase_chars)")
                phrases.append(phrase)
    check_count(phrases, limits.max_phrases, "the text prompt", "phrases", "max_phrases")
    if not phrases:
        raise RequestError("the text prompt is empty: type a phrase (e.g. 'car', or 'red car_Car')")
    return phrases


def concepts_of_region(region: Tuple[int, dict], config: LabelConfig,
                       limits: PhraseLimits = PhraseLimits(),
                       scope: WorkScope = UNBOUNDED) -> List[Concept]:
    """The concepts a textarea region (from :func:`text_prompt_region`) asks for, in the
    order typed, each (label, phrase) once."""
    index, item = region
    value = item.get("value") if isinstance(item.get("value"), dict) else {}
    phrases = _phrases(value.get("text"), index, limits)
    to_name = item.get("to_name")
    if not to_name:
        inputs = [t for t in config.text_inputs if t.name == item.get("from_name")]
        to_name = inputs[0].to_name if inputs else next(iter(config.images), None)
    if to_name not in config.images:
        raise RequestError(f"the text prompt's to_name {shown(to_name)} is not an Image of the "
                           f"labeling config")
    scope.check("reading the text prompt")
    labels = LabelIndex(concepts_of(config), to_name)
    scope.check("reading the text prompt")
    # "cat, cat" (or "cat, Cat") asks once
    return list(OrderedDict.fromkeys(labels.resolve(phrase) for phrase in phrases))


def parse_text_prompt(context: Any, config: LabelConfig, limits: PhraseLimits = PhraseLimits(),
                      scope: WorkScope = UNBOUNDED) -> Optional[List[Concept]]:
    """The concepts typed into a ``TextArea`` (``params.context`` of /predict), or None when the
    context holds no text region. Label Studio sends ``{"result": [{"type": "textarea",
    "from_name": ..., "to_name": "image", "value": {"text": ["red car"]}}]}``; several phrases
    may be separated by commas or lines."""
    region = text_prompt_region(context, limits.max_regions)
    return None if region is None else concepts_of_region(region, config, limits, scope)
