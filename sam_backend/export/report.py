"""What an export did and what went wrong: :class:`ExportError` (the export as a whole cannot be
done), :class:`Problem` (one task, annotation or region that could not be exported, by task id)
and :class:`ExportReport` (counts, categories and every problem, with a printable summary)."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from sam_backend.errors import SamBackendError

logger = logging.getLogger(__name__)


class ExportError(SamBackendError):
    """The export as a whole cannot be done (unreadable export file, bad --classes, ...)."""


@dataclass
class Problem:
    """Something of one task that could not be exported."""

    task_id: Any  # the task's ``id`` (None if the task has none)
    message: str
    position: Optional[int] = None  # index of the task in the export
    annotation_id: Any = None
    region_id: Any = None

    @property
    def where(self) -> str:
        if self.task_id is not None:
            text = f"task {self.task_id}"
        else:
            text = f"task #{self.position} (no id)"
        if self.annotation_id is not None:
            text += f", annotation {self.annotation_id}"
        if self.region_id is not None:
            text += f", region {self.region_id}"
        return text

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class TaskProblems:
    """Where the problems of one task (``position`` in the export) go: into ``report``'s
    ``problems`` (logged as warnings), and its id into ``skipped_tasks`` when the task is
    dropped."""

    report: Any  # an ExportReport, or a report with the same problems / skipped_tasks lists
    task_id: Any
    position: int

    def problem(self, message: str, annotation_id: Any = None, region_id: Any = None) -> None:
        p = Problem(self.task_id, message, self.position, annotation_id, region_id)
        self.report.problems.append(p)
        logger.warning("%s", p)

    def skip(self, message: str) -> None:
        """A problem that drops the whole task."""
        self.problem(message + "; task skipped")
        self.report.skipped_tasks.append(self.task_id if self.task_id is not None
                                         else f"#{self.position}")


@dataclass
class ExportReport:
    """What an export did: counts, categories, and every problem by task id."""

    tasks: int = 0  # tasks in the export
    images: int = 0  # images exported
    annotations: Counter = field(default_factory=Counter)  # "mask" / "polygon" / "box" -> count
    problems: List[Problem] = field(default_factory=list)
    skipped_tasks: List[Any] = field(default_factory=list)  # task ids not exported (problems)
    unlabelled_tasks: List[Any] = field(default_factory=list)  # no submitted annotation
    multi_annotation_tasks: List[Any] = field(default_factory=list)  # > 1 annotation used
    skipped_labels: Dict[str, List[Any]] = field(default_factory=dict)  # label -> task ids
    ignored_results: Counter = field(default_factory=Counter)  # result type -> count
    categories: List[dict] = field(default_factory=list)
    regions: int = 0  # regions (one per label) that went into objects
    objects: int = 0  # objects exported (= annotations)
    merged_regions: int = 0  # regions merged into objects made of several regions
    merged_objects: int = 0  # objects made of several regions
    keep_all_regions: bool = False
    ann_file: Optional[str] = None
    images_dir: Optional[str] = None
    split: Dict[str, int] = field(default_factory=dict)  # "train"/"val" -> images
    annotation_kinds: Dict[int, str] = field(default_factory=dict)  # annotation id -> its kind
    config_file: Optional[str] = None  # the MMDetection config written, if any

    @property
    def problem_task_ids(self) -> List[Any]:
        seen: Dict[Any, None] = {}
        for p in self.problems:
            seen.setdefault(p.task_id if p.task_id is not None else f"#{p.position}")
        return list(seen)

    @property
    def total_annotations(self) -> int:
        return sum(self.annotations.values())

    def summary(self) -> str:
        kinds = ", ".join(plural(n, k) for k, n in sorted(self.annotations.items()))
        lines = [
            f"{plural(self.tasks, 'task')}: {plural(self.images, 'image')} and "
            f"{plural(self.total_annotations, 'annotation')} exported ({kinds or 'none'}), "
            f"{len(self.categories)} {'category' if len(self.categories) == 1 else 'categories'}"
        ]
        if self.keep_all_regions:
            lines.append(f"--keep-all-regions: every region exported as its own object "
                         f"({plural(self.regions, 'region')})")
        elif self.regions:
            lines.append(f"one object, one annotation: {plural(self.regions, 'region')} -> "
                         f"{plural(self.objects, 'object')} ({self.merged_regions} regions merged "
                         f"into {plural(self.merged_objects, 'object')}, "
                         f"{self.objects - self.merged_objects} single-region)")
        lines += [
            _listed("split by image", [f"{name} {plural(n, 'image')}"
                                       for name, n in self.split.items()]),
            _tasks(self.unlabelled_tasks, "without a submitted annotation left out"),
            _tasks(self.multi_annotation_tasks,
                   "with several annotations, all exported (check for duplicate objects)"),
        ]
        lines += [f"label {label!r} is not in --classes: {plural(len(ids), 'region')} skipped "
                  f"(tasks {id_list(sorted(set(ids), key=str))})"
                  for label, ids in self.skipped_labels.items()]
        lines.append(_listed("ignored results (not objects)",
                             [f"{n} {t}" for t, n in sorted(self.ignored_results.items())]))
        if self.problems:
            lines.append(f"{plural(len(self.problems), 'problem')} in "
                         f"{plural(len(self.problem_task_ids), 'task')} "
                         f"({plural(len(self.skipped_tasks), 'task')} skipped):")
            lines.extend(f"  {p}" for p in self.problems)
        return "\n".join(line for line in lines if line)


def _listed(title: str, items: Sequence[str]) -> str:
    return f"{title}: {', '.join(items)}" if items else ""


def _tasks(ids: Sequence[Any], what: str) -> str:
    return f"{plural(len(ids), 'task')} {what}: {id_list(ids)}" if ids else ""


def plural(count: int, word: str) -> str:
    """``"1 task"``, ``"2 tasks"``, ``"3 boxes"``."""
    if count == 1:
        return f"{count} {word}"
    return f"{count} {word}{'es' if word.endswith(('x', 's')) else 's'}"


def id_list(ids: Sequence[Any], limit: int = 20) -> str:
    """The first ``limit`` ids, comma-separated, and how many more there are."""
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


__all__ = ["ExportError", "ExportReport", "Problem", "id_list", "plural"]
