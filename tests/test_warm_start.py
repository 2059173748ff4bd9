"""The supervised warm start: Countdown's warm-start fields (reference answers, failing
attempts, the reflection hints that episode rows teach), the warm-start/RL split of the
problems and the warm-start keys' validation."""

from __future__ import annotations

import importlib.util
import random
import re
import types
from pathlib import Path

import pytest
from ml_collections import ConfigDict

from reflax.config import validate
from reflax.tasks.countdown import CountdownTask
from reflax.warm_start import split_families, train_problems

WORDS = {"plus": "+", "minus": "-", "times": "*", "over": "/"}
_spec = importlib.util.spec_from_file_location(
    "countdown_toy", Path(__file__).resolve().parents[1] / "configs" / "countdown_toy.py"
)
_toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_toy)
toy_config = _toy.get_config


def _task(counts: tuple[int, ...], gold: float = 1.0) -> CountdownTask:
    return CountdownTask(
        counts=counts,
        num_range=(1, 30),
        target_range=(1, 99),
        answer_fallback=True,
        hint_gold_fraction=gold,
    )


def test_pair_fields_answer_passes_wrong_fails_and_hint_avoids_the_failure():
    task = _task((2,), gold=0.0)
    rng = random.Random(0)
    hint_ops = set()
    for ex in task.load("train", num=300, seed=0):
        f = task.warm_start_fields(ex, rng)
        assert task.verify(ex, f["expression"])
        if f["wrong_op"] != f["op"]:  # equal only when no operator fails
            assert not task.verify(ex, f["wrong"])
        assert f["hint_op"] != f["wrong_op"]
        assert WORDS[f["hint_word"]] == f["hint_op"] and WORDS[f["wrong_word"]] == f["wrong_op"]
        assert f["hint_op"] in f["hint"]
        assert sorted(map(int, re.findall(r"\d+", f["hint"]))) == sorted(ex["nums"])
        hint_ops.add(f["hint_op"])
        x, op, y = re.fullmatch(r"(\d+)([-+*/])(\d+)", f["wrong"]).groups()
        value = {"+": int(x) + int(y), "-": int(x) - int(y), "*": int(x) * int(y)}.get(
            op, int(x) / int(y)
        )
        assert f["wrong_side"] == ("high" if value > ex["target"] else "low")
    assert hint_ops == set("+-*/")  # uninformed hints range over every operator


def test_pair_fields_gold_hint_names_the_solution():
    task = _task((2,), gold=1.0)
    rng = random.Random(1)
    for ex in task.load("train", num=100, seed=1):
        f = task.warm_start_fields(ex, rng)
        assert f["hint_op"] == f["op"] and task.verify(ex, f["hint"])


def test_pair_fields_miscopied_numbers():
    # the failed attempt keeps the solution's operator on one miscopied number; its hint
    # may name any operator, the attempt's included, and always uses the prompt's numbers
    task = CountdownTask(
        counts=(2,),
        num_range=(1, 30),
        answer_fallback=True,
        hint_gold_fraction=0.0,
        wrong_numbers_fraction=0.5,
    )
    rng = random.Random(3)
    miscopied, repeated = 0, 0
    for ex in task.load("train", num=400, seed=3):
        f = task.warm_start_fields(ex, rng)
        assert not task.verify(ex, f["wrong"]) or f["wrong_op"] == f["op"]
        written = sorted(map(int, re.findall(r"\d+", f["wrong"])))
        assert sorted(map(int, re.findall(r"\d+", f["hint"]))) == sorted(ex["nums"])
        if written != sorted(ex["nums"]):
            miscopied += 1
            assert f["wrong_op"] == f["op"] and not task.verify(ex, f["wrong"])
            assert len(set(written) ^ set(ex["nums"])) <= 2 and max(written) <= 30
            repeated += f["hint_op"] == f["wrong_op"]
        else:
            assert f["hint_op"] != f["wrong_op"]
    assert 150 < miscopied < 250 and 20 < repeated < 90  # about 1/2, and 1/4 of those
    with pytest.raises(ValueError, match="wrong_numbers_fraction"):
        CountdownTask(counts=(2,), wrong_numbers_fraction=-0.1)


def test_countdown_fields_for_three_numbers():
    task = _task((3,))
    rng = random.Random(2)
    for ex in task.load("train", num=50, seed=2):
        f = task.warm_start_fields(ex, rng)
        assert task.verify(ex, f["expression"])
        assert " " not in f["expression"] and f["step"].count("=") == 1
        assert sorted(map(int, re.findall(r"\d+", f["wrong"]))) == sorted(ex["nums"])


def test_loaded_rows_have_no_warm_start_fields(tmp_path):
    # Hub rows carry no solution: nothing to teach, and no task-specific key is invented
    task = _task((3,))
    assert task.warm_start_fields({"target": 24, "nums": [2, 3, 4]}, random.Random(0)) == {}
    with pytest.raises(ValueError, match="hint_gold_fraction"):
        _task((2,), gold=1.5)


def _rt(task, fraction: float, steps: int = 1, num_train: int = 0):
    cfg = ConfigDict(
        {
            "seed": 0,
            "warm_start": {"holdout_fraction": fraction, "steps": steps},
            "task": {"num_train": num_train, "train_source": ""},
        }
    )
    return types.SimpleNamespace(config=cfg, task=task)


def test_split_families_keeps_each_number_set_on_one_side_and_loses_nothing():
    task = _task((2,))
    examples = task.load("train", num=2000, seed=3)
    warm, rl = split_families(_rt(task, 0.5), examples)
    assert len(warm) + len(rl) == len(examples)
    assert sorted(map(repr, warm + rl)) == sorted(map(repr, examples))
    fw = {task.family_key(ex) for ex in warm}
    fr = {task.family_key(ex) for ex in rl}
    assert not fw & fr  # the same numbers never teach the warm start and meet RL
    assert 0.4 < len(fr) / len(fw | fr) < 0.6
    # the split is a property of the problem, not of the draw or the order
    again = split_families(_rt(task, 0.5), list(reversed(examples)))[1]
    assert {task.family_key(ex) for ex in again} == fr
    assert split_families(_rt(task, 0.0), examples) == (examples, examples)
    with pytest.raises(ValueError, match="holdout_fraction"):
        split_families(_rt(task, 0.5), examples[:1])


def test_train_problems_gives_rl_the_families_the_warm_start_never_saw():
    task = _task((2,))
    rt = _rt(task, 0.5, num_train=1000)
    warm, rl = train_problems(rt, "warm_start"), train_problems(rt, "rl")
    assert warm and rl
    assert not {task.family_key(ex) for ex in warm} & {task.family_key(ex) for ex in rl}
    # without a warm start RL gets every train problem
    assert len(train_problems(_rt(task, 0.5, steps=0, num_train=1000), "rl")) == 1000
    with pytest.raises(ValueError, match="stage"):
        train_problems(rt, "eval")


def test_new_warm_start_and_anchor_keys_are_validated():
    c = toy_config()
    validate(c)
    c.warm_start.holdout_fraction = 1.0
    with pytest.raises(ValueError, match="holdout_fraction"):
        validate(c)
    c = toy_config()
    c.grpo.anchor_beta = -1.0
    with pytest.raises(ValueError, match="anchor_beta"):
        validate(c)


def test_every_warm_start_key_is_declared_and_validated():
    c = toy_config()
    c.warm_start.episode_fraction = 1.5
    with pytest.raises(ValueError, match="episode_fraction must be in"):
        validate(c)
    c = toy_config()
    c.warm_start.retry_template = ""
    with pytest.raises(ValueError, match="retry_template"):
        validate(c)
    c = toy_config()
    c.warm_start.reflection_gold_fraction = 0.0  # undeclared keys are typos, not defaults
    with pytest.raises(ValueError, match=r"not declared.*warm_start.reflection_gold_fraction"):
        validate(c)
