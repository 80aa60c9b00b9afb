"""The held-out split, by task: which tasks a model is evaluated on and never trained on.

Each task gets a **score** in [0, 1) from its id and a seed alone (:func:`task_score`: the first
8 bytes of SHA-256 of ``"<seed>:<task id>"``), never from Python's random order or the order of
the tasks. A task is held out when:

1. its score is below ``fraction`` (default :data:`HELD_OUT_FRACTION`, 0.2: about one task in
   five), or
2. it is among the ``min_held_out`` lowest-scoring tasks (default :data:`MIN_HELD_OUT`, 2): a
   small project still has a held-out set to measure;

but never all tasks: at least one task is always trained on (the lowest-scoring ``n - 1`` at
most are held out). There must be at least ``min_held_out + 1`` tasks.

**Stable as the project grows**: a task's side by rule 1 depends only on its id and the seed, so
a task held out by its score stays held out however many tasks are added, and a task trained on
is never moved to the held-out set by tasks added later (adding tasks only pushes it further from
the lowest scores; the one exception is the task kept for training when every task scored below
the fraction). Only the tasks added by rule 2 in a small project may move to training once
enough tasks score below the fraction. A task id compares as its text (``5`` and ``"5"`` are one
task). Change the seed to draw another split.
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterable, List, Sequence, Set, Tuple, TypeVar

#: the share of tasks held out for evaluation
HELD_OUT_FRACTION = 0.2
#: the fewest tasks held out
MIN_HELD_OUT = 2

T = TypeVar("T")


def task_score(task_id: Any, seed: int = 0) -> float:
    """The task's score in [0, 1): a function of its id (as text) and the seed only."""
    digest = hashlib.sha256(f"{seed}:{task_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def _check(fraction: float, min_held_out: int) -> None:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in [0, 1), got {fraction}")
    if min_held_out < 1:
        raise ValueError(f"at least one task must be held out, got min_held_out={min_held_out}")


def held_out_ids(task_ids: Iterable[Any], seed: int = 0, fraction: float = HELD_OUT_FRACTION,
                 min_held_out: int = MIN_HELD_OUT) -> Set[Any]:
    """The ids of the held-out tasks among ``task_ids`` (see the module docstring). Raises
    ValueError for duplicate ids or fewer than ``min_held_out + 1`` tasks."""
    _check(fraction, min_held_out)
    ids = list(task_ids)
    keys = [str(t) for t in ids]
    if len(set(keys)) != len(keys):
        raise ValueError("task ids must be unique to split by task")
    if len(ids) < min_held_out + 1:
        raise ValueError(f"{len(ids)} tasks cannot be split: {min_held_out} are held out for "
                         f"evaluation and at least one is trained on ({min_held_out + 1} needed)")
    ranked = sorted(ids, key=lambda t: (task_score(t, seed), str(t)))
    chosen = {str(t) for t in ranked[:min_held_out]}
    chosen |= {str(t) for t in ranked if task_score(t, seed) < fraction}
    if len(chosen) >= len(ids):  # never all: the highest-scoring task is trained on
        chosen.discard(str(ranked[-1]))
    return {t for t in ids if str(t) in chosen}


def split(items: Sequence[T], seed: int = 0, fraction: float = HELD_OUT_FRACTION,
          min_held_out: int = MIN_HELD_OUT, task_id=lambda item: item.task_id
          ) -> Tuple[List[T], List[T]]:
    """``(train, held_out)``: ``items`` (samples, by default anything with a ``task_id``) split by
    :func:`held_out_ids`, each list in the items' order."""
    held = {str(t) for t in held_out_ids([task_id(i) for i in items], seed, fraction,
                                         min_held_out)}
    train = [i for i in items if str(task_id(i)) not in held]
    return train, [i for i in items if str(task_id(i)) in held]


__all__ = ["HELD_OUT_FRACTION", "MIN_HELD_OUT", "held_out_ids", "split", "task_score"]
