"""The held-out split by task: deterministic, the documented fraction and minimum, never all
tasks, and the same tasks held out as the project grows."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from sam_backend.training.split import (HELD_OUT_FRACTION, MIN_HELD_OUT, held_out_ids, split,
                                        task_score)


def test_the_documented_defaults():
    assert (HELD_OUT_FRACTION, MIN_HELD_OUT) == (0.2, 2)


def test_deterministic_and_independent_of_the_tasks_order():
    ids = list(range(1, 301))
    first = held_out_ids(ids)
    shuffled = ids[:]
    random.Random(4).shuffle(shuffled)
    assert held_out_ids(shuffled) == first
    assert held_out_ids(ids, seed=0) == first
    assert held_out_ids(ids, seed=1) != first  # another seed, another split
    # a function of the id and the seed only (a fixed value: the hash never changes)
    assert task_score(1, 0) == task_score("1", 0) == pytest.approx(0.93389, abs=1e-5)


def test_about_the_fraction_is_held_out():
    held = held_out_ids(range(1, 2001))
    assert 0.17 < len(held) / 2000 < 0.23
    assert 0.45 < len(held_out_ids(range(1, 2001), fraction=0.5)) / 2000 < 0.55


def test_small_projects_hold_out_the_minimum_and_never_all():
    for n in range(3, 12):
        held = held_out_ids(range(n))
        assert MIN_HELD_OUT <= len(held) < n
    assert len(held_out_ids(range(3), min_held_out=2, fraction=0.99)) == 2  # one is trained on
    with pytest.raises(ValueError, match="3 needed"):
        held_out_ids([1, 2])
    with pytest.raises(ValueError, match="unique"):
        held_out_ids([1, 2, 3, "3"])


def test_the_same_tasks_stay_held_out_as_the_project_grows():
    seed = 7
    previous = None
    for n in (10, 40, 100, 400, 1000):
        ids = list(range(1, n + 1))
        held = held_out_ids(ids, seed=seed)
        by_score = {t for t in ids if task_score(t, seed) < HELD_OUT_FRACTION}
        assert by_score <= held  # a task scored below the fraction is always held out
        if previous is not None:
            old_ids, old_held = previous
            old_train = set(old_ids) - old_held
            # a task trained on is never moved to the held-out set by tasks added later
            assert not old_train & held
            # held out by its score in the small project: still held out
            assert {t for t in old_held if task_score(t, seed) < HELD_OUT_FRACTION} <= held
        previous = (ids, held)
    # once enough tasks score below the fraction the split is exactly the scores' rule
    ids = list(range(1, 1001))
    assert held_out_ids(ids, seed=seed) == {t for t in ids
                                            if task_score(t, seed) < HELD_OUT_FRACTION}


def test_split_of_samples_keeps_their_order():
    samples = [SimpleNamespace(task_id=t) for t in range(1, 51)]
    train, held = split(samples)
    assert len(train) + len(held) == 50 and held
    assert [s.task_id for s in held] == sorted(held_out_ids(range(1, 51)))
    assert [s.task_id for s in train] == sorted({*range(1, 51)} - held_out_ids(range(1, 51)))
