"""The supervised warm start: Countdown's warm-start fields (reference answers, failing
attempts, the reflection hints that episode rows teach), the warm-start/RL split of the
problems and the warm-start keys' validation."""

from __future__ import annotations

import importlib.util
import random
import re
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from reflax.config import validate
from reflax.episodes import Group, build_batch, retry_turn
from reflax.metrics import MetricsWriter
from reflax.runtime import build, load_examples
from reflax.sampling import SamplingSpec
from reflax.tasks.countdown import CountdownTask
from reflax.warm_start import (
    REFLECTIONS_FILE,
    answer_ids,
    cached_reflections,
    reflection_prefix,
    retry_rows,
    split_families,
    step_kinds,
    train_problems,
    warm_start,
)

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


def test_step_kinds_spread_each_share_and_keep_the_episode_schedule():
    kinds = step_kinds(30, 0.0, 1 / 3)
    assert kinds.count("reflection") == 10 and kinds.count("episode") == 0
    assert kinds[:3] == ["answer", "answer", "reflection"]  # spread, not bunched
    mixed = step_kinds(40, 0.5, 0.25)
    assert (mixed.count("episode"), mixed.count("reflection")) == (20, 10)
    # without reflection rows the episode steps fall where they always did
    old = [int((s + 1) * 0.8) > int(s * 0.8) for s in range(25)]
    assert [k == "episode" for k in step_kinds(25, 0.8, 0.0)] == old
    # retry steps come out of the answer steps only: the other kinds fall where they did
    both = step_kinds(40, 0.0, 0.25, 0.25)
    assert (both.count("reflection"), both.count("retry"), both.count("answer")) == (10, 10, 20)
    assert [k == "reflection" for k in both] == [k == "reflection" for k in step_kinds(40, 0, 0.25)]
    assert "retry" in both[:4]  # spread, not bunched at the end
    # shares whose quotient rounds below a half in floats still get their steps
    assert step_kinds(3, 0.0, 1 / 3, 1 / 3) == ["answer", "retry", "reflection"]


def test_reflection_rows_are_the_initial_models_samples_with_loss_on_them_alone(tmp_path):
    c = toy_config("smoke")
    c.task.kwargs.synthetic_size = 64
    c.task.num_train = 64
    c.warm_start.update(
        steps=3, batch_size=2, episode_fraction=0.0, reflection_fraction=1 / 3, reflection_rows=3
    )
    validate(c)
    rt, params = build(c)
    examples = [
        {**ex, **rt.task.warm_start_fields(ex, random.Random(0))}
        for ex in load_examples(rt, "train", 3)
    ]
    rows = cached_reflections(rt, params, examples, str(tmp_path))
    prefixes = [reflection_prefix(rt, ex) for ex in examples]
    # the targets are what the initial model samples after that context at the run's settings
    direct = rt.sampler.sample(
        params,
        prefixes,
        SamplingSpec.from_config(c, rt.tok),
        max_new_tokens=c.rollout.max_reflection_tokens,
        rng=jax.random.key(c.seed + 3),
        keep_cache=False,
    ).completions()
    assert [[sg.ids for sg in r] for r in rows] == [[p, d] for p, d in zip(prefixes, direct)]
    assert [[sg.trainable for sg in r] for r in rows] == [[False, True]] * 3
    # the wrong attempt is context: the answer template's text is not a target
    assert all(
        c.warm_start.wrong_template.format(**ex) in rt.tok.decode(p)
        for ex, p in zip(examples, prefixes)
    )
    host, _ = build_batch(
        [Group(None, [r], [1.0]) for r in rows],
        num_groups=3,
        group_size=1,
        seq_len=128,
        pad_id=rt.tok.pad_id,
    )
    for b, (p, d) in enumerate(zip(prefixes, direct)):
        n = len(p) + len(d)
        assert np.asarray(host.tokens[b][:n]).tolist() == p + d
        loss = np.flatnonzero(np.asarray(host.loss_mask[b]))
        assert loss.tolist() == list(range(len(p), n))  # the reflection's tokens, only them
    # retry rows: the same context and sampled reflection, then the retry turn and the
    # reference answer, the only loss
    retries = retry_rows(rt, examples, rows)
    for ex, (prefix, refl), row in zip(examples, rows, retries):
        assert [sg.ids for sg in row[:2]] == [prefix.ids, refl.ids]
        assert [sg.trainable for sg in row] == [False, False, False, True]
        assert row[3].ids == answer_ids(rt, ex)
        assert rt.task.retry_instruction(ex) in rt.tok.decode(row[2].ids)
        assert row[2].ids == retry_turn(rt.tok, rt.task, ex, refl.ids)  # as the rollout builds it
    # cached: another model (or a resumed run) reads the same rows back
    other = jax.tree.map(lambda x: x + 1.0, params)
    again = cached_reflections(rt, other, examples, str(tmp_path))
    assert [[sg.ids for sg in r] for r in again] == [[sg.ids for sg in r] for r in rows]
    # the warm start trains on them: its reflection step's nll is logged, the file stays
    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    warm_start(rt, params, str(tmp_path), writer)
    writer.close()
    logged = (tmp_path / "metrics.jsonl").read_text()
    assert "warm_start/nll_reflection" in logged and "warm_start/nll_answer" in logged
    assert (tmp_path / "warm_start" / REFLECTIONS_FILE).exists()
    # a step whose every row is too long is an error, not a step that trains nothing
    rt.config.warm_start.seq_len = 16
    with pytest.raises(ValueError, match="longer than warm_start.seq_len=16; raise it"):
        warm_start(rt, params, str(tmp_path / "short"), MetricsWriter(str(tmp_path / "short")))


def test_reflection_keys_are_validated():
    c = toy_config()
    c.warm_start.reflection_fraction = 0.3  # with episode_fraction 0.8: more than all steps
    with pytest.raises(ValueError, match="reflection_fraction must be in"):
        validate(c)
    c.warm_start.update(episode_fraction=0.0, wrong_template="")
    with pytest.raises(ValueError, match="reflection_fraction > 0 needs"):
        validate(c)
    c.warm_start.update(wrong_template="{wrong}", reflection_rows=0)
    with pytest.raises(ValueError, match="reflection_rows >= 1"):
        validate(c)
    c.warm_start.update(reflection_rows=4, reflection_fraction=0.5, retry_fraction=0.6)
    with pytest.raises(ValueError, match="retry_fraction must be in"):
        validate(c)
