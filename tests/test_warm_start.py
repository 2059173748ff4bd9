"""The supervised warm start's Countdown fields: reference answers, failing attempts and the
reflection hints that episode rows teach."""

from __future__ import annotations

import random
import re

from reflax.tasks.countdown import CountdownTask
from reflax.warm_start import _countdown_fields, _pair_fields

WORDS = {"plus": "+", "minus": "-", "times": "*", "over": "/"}


def _task(counts: tuple[int, ...]) -> CountdownTask:
    return CountdownTask(
        counts=counts, num_range=(1, 30), target_range=(1, 99), answer_fallback=True
    )


def test_pair_fields_answer_passes_wrong_fails_and_hint_avoids_the_failure():
    task = _task((2,))
    rng = random.Random(0)
    hint_ops = set()
    for ex in task.load("train", num=300, seed=0):
        f = _pair_fields(ex, rng, task.verify, gold_fraction=0.0)
        assert task.verify(ex, f["expression"])
        if f["wrong_op"] != f["op"]:  # equal only when no operator fails
            assert not task.verify(ex, f["wrong"])
        assert f["hint_op"] != f["wrong_op"]
        assert WORDS[f["hint_word"]] == f["hint_op"] and WORDS[f["wrong_word"]] == f["wrong_op"]
        assert f["hint_op"] in f["hint"]
        assert sorted(map(int, re.findall(r"\d+", f["hint"]))) == sorted(ex["nums"])
        hint_ops.add(f["hint_op"])
    assert hint_ops == set("+-*/")  # uninformed hints range over every operator


def test_pair_fields_gold_hint_names_the_solution():
    task = _task((2,))
    rng = random.Random(1)
    for ex in task.load("train", num=100, seed=1):
        f = _pair_fields(ex, rng, task.verify, gold_fraction=1.0)
        assert f["hint_op"] == f["op"] and task.verify(ex, f["hint"])


def test_countdown_fields_for_three_numbers():
    task = _task((3,))
    rng = random.Random(2)
    for ex in task.load("train", num=50, seed=2):
        f = _countdown_fields(ex, rng, task.verify)
        assert task.verify(ex, f["expression"])
        assert " " not in f["expression"] and f["step"].count("=") == 1
        assert sorted(map(int, re.findall(r"\d+", f["wrong"]))) == sorted(ex["nums"])
