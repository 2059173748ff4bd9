"""Supervised warm start: next-token training on the task's reference answers.

For models with no pretraining (the CPU toy runs), a short supervised phase
gives basic competence before Reflect-Retry-Reward. It reuses the GRPO step:
with advantage 1 on every answer token, ratio 1 and no KL, the policy-gradient
loss has exactly the gradient of the answer tokens' negative log-likelihood.
The result is checkpointed in <workdir>/warm_start, so a resumed run (and its
KL reference) starts from the same weights.

Two kinds of rows (keys of `warm_start`; templates are str.format over the example
plus `derived_fields`):

  answer   prompt -> `answer_template` (a first attempt)
  episode  prompt -> a wrong attempt (`wrong_template`, context only) -> reflection
           instruction -> `reflection_template` -> retry instruction ->
           `retry_template`; loss on the reflection and the retry. This teaches the
           reflect/retry format, and that a retry follows its reflection, so that
           RL on the reflection tokens has something to steer. A fraction
           `episode_fraction` of the rows are episodes (0 = answers only).

With `holdout_fraction` > 0 the warm start sees only part of the train problem
families and online RL the rest, as a pretrained model meets its failure set:
problems it was never taught.
"""

from __future__ import annotations

import ast
import logging
import os
import random
from fractions import Fraction
from typing import Any

import jax
import numpy as np

from reflax import data, optim
from reflax.checkpoint import Checkpointer, CheckpointError, abstract_like
from reflax.episodes import Group, Segment, _after_sampled, build_batch, prompt_ids
from reflax.metrics import MetricsWriter, Progress
from reflax.runtime import Runtime, load_examples
from reflax.tasks import splits
from reflax.trainer import StepConfig, init_state, jit_train_step, make_train_step, shard_batch

log = logging.getLogger(__name__)
_FAMILY_SALT = "reflax-warm-start-families"


def _ended(rt: Runtime, text: str) -> list[int]:
    """`text` as a complete assistant turn's sampled ids, ending in the stop id."""
    end = rt.tok.turn_suffix_ids[:1]
    if not end or end[0] not in rt.tok.stop_ids:
        end = rt.tok.stop_ids[:1]
    return rt.tok.encode(text) + end


def answer_ids(rt: Runtime, example: dict) -> list[int]:
    """The reference answer as a complete assistant turn ending in the stop id."""
    return _ended(rt, rt.config.warm_start.answer_template.format(**example))


_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def _countdown_fields(example: dict, rng: random.Random, verify: Any) -> dict[str, str]:
    """`expression`: the solution without spaces; `step`: its first operation on two given
    numbers, as `a*b=v`; `wrong`: a random expression over the numbers that fails."""
    expression = example["solution"].replace(" ", "")
    stack = [ast.parse(expression, mode="eval").body]
    step = expression
    while stack:  # the first binary operation whose operands are both given numbers
        node = stack.pop()
        if isinstance(node, ast.BinOp):
            if isinstance(node.left, ast.Constant) and isinstance(node.right, ast.Constant):
                a, b = Fraction(node.left.value), Fraction(node.right.value)
                op = _OPS[type(node.op)]
                v = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else a}[op]
                step = f"{a}{op}{b}={v}"
                break
            stack += [node.right, node.left]
    wrong = expression
    for _ in range(20):  # left-to-right expressions in the answer format; a few may pass
        nums = list(example["nums"])
        rng.shuffle(nums)
        cand = str(nums[0]) + "".join(rng.choice("+-*") + str(n) for n in nums[1:])
        if not verify(example, cand):
            wrong = cand
            break
    return {"expression": expression, "step": step, "wrong": wrong}


def _pair_expression(op: str, nums: list[int]) -> str:
    """Two numbers joined by `op`; `-` and `/` put the larger first (targets are positive)."""
    x, y = nums
    if op in "-/":
        x, y = max(x, y), min(x, y)
    return f"{x}{op}{y}"


OP_WORDS = {"+": "plus", "-": "minus", "*": "times", "/": "over"}


def solving_operators(example: dict, verify: Any) -> list[str]:
    """The operators `op` for which `x op y` (as `_pair_expression` writes it) passes."""
    return [o for o in "+-*/" if verify(example, _pair_expression(o, list(example["nums"])))]


def _pair_fields(
    example: dict, rng: random.Random, verify: Any, gold_fraction: float
) -> dict[str, str]:
    """Two-number countdown: the answer is `x op y`, so the choice is the operator.

    `expression`: the solution (`op`) written by `_pair_expression`; `wrong`: the same
    numbers with an operator that fails (`wrong_op`); `hint_op`: the operator a reflection
    names, the solution's with probability `gold_fraction`, otherwise a random operator
    other than `wrong_op` (which may pass too); `hint`: the expression that follows it;
    `hint_word` / `wrong_word`: those operators as words (plus, minus, times, over).
    """
    nums = list(example["nums"])
    op = next(ch for ch in "+-*/" if ch in example["solution"])
    solving = solving_operators(example, verify)
    fails = [o for o in "+-*/" if o not in solving]
    wrong_op = rng.choice(fails) if fails else op
    others = [o for o in "+-*/" if o != wrong_op]
    hint_op = op if rng.random() < gold_fraction else rng.choice(others)
    return {
        "expression": _pair_expression(op, nums),
        "op": op,
        "wrong": _pair_expression(wrong_op, nums),
        "wrong_op": wrong_op,
        "hint_op": hint_op,
        "hint": _pair_expression(hint_op, nums),
        "hint_word": OP_WORDS[hint_op],
        "wrong_word": OP_WORDS[wrong_op],
    }


def derived_fields(rt: Runtime, example: dict, rng: random.Random) -> dict[str, str]:
    """Extra template fields for the task (countdown: expression, step, wrong; with two
    numbers also op, wrong_op, hint_op, hint, hint_word, wrong_word; see `_pair_fields`)."""
    if rt.config.task.name == "countdown" and "solution" in example:
        if len(example["nums"]) == 2:
            gold = rt.config.warm_start.get("reflection_gold_fraction", 1.0)
            return _pair_fields(example, rng, rt.task.verify, gold)
        return _countdown_fields(example, rng, rt.task.verify)
    return {}


def episode_segments(rt: Runtime, example: dict) -> list[Segment]:
    """A supervised reflect/retry episode: loss on the reflection and the retry."""
    c, tok, task = rt.config.warm_start, rt.tok, rt.task
    wrong = tok.encode(c.wrong_template.format(**example))
    refl = _ended(rt, c.reflection_template.format(**example))
    retry = _ended(rt, c.retry_template.format(**example))
    prefix = (
        prompt_ids(tok, task, example)
        + tok.close_assistant(wrong)
        + tok.user_turn_ids(task.reflection_instruction(example))
    )
    turn = tok.close_assistant(refl) + tok.user_turn_ids(task.retry_instruction(example))
    return [
        Segment(prefix),
        Segment(refl, True),
        Segment(_after_sampled(tok, refl, turn)),
        Segment(retry, True),
    ]


def split_families(rt: Runtime, examples: list[dict]) -> tuple[list[dict], list[dict]]:
    """`(warm start's, RL's)` train problems: `warm_start.holdout_fraction` of the families
    (`task.family_key`, by a stable salted hash) go to RL only; with 0 both get all."""
    fraction = rt.config.warm_start.holdout_fraction
    if not fraction:
        return examples, examples
    warm, rl = [], []
    for ex in examples:
        key = rt.task.family_key(ex)
        held = splits.in_test_bucket(key, fraction=fraction, salt=_FAMILY_SALT)
        (rl if held else warm).append(ex)
    if not warm or not rl:
        raise ValueError(
            f"warm_start.holdout_fraction={fraction} leaves {len(warm)} warm-start and "
            f"{len(rl)} RL problems of {len(examples)}; raise task.num_train or change it"
        )
    return warm, rl


def warm_start(
    rt: Runtime, workdir: str, writer: MetricsWriter, *, restore_only: bool = False
) -> Any:
    """Parameters after the supervised phase (trained now, or restored from the workdir)."""
    c = rt.config.warm_start
    ckpt = Checkpointer(os.path.join(workdir, "warm_start"), keep=1)
    if ckpt.latest_step() is not None:
        restored, _ = ckpt.restore(abstract_like({"params": rt.params}))
        ckpt.close()
        log.info("warm start restored from %s", ckpt.directory)
        return restored["params"]
    if restore_only:
        raise CheckpointError(
            f"{ckpt.directory} is missing: the run's checkpoints need the warm start they began "
            "from; start a fresh workdir"
        )
    examples = load_examples(rt, "train", rt.config.task.num_train, seed=rt.config.seed + 1)
    examples, _ = split_families(rt, examples)
    rng = random.Random(rt.config.seed + 1)
    episode_fraction = c.get("episode_fraction", 0.0)
    answers, episodes = [], []
    for ex in examples:
        ex = {**ex, **derived_fields(rt, ex, rng)}
        try:
            answers.append(
                [Segment(prompt_ids(rt.tok, rt.task, ex)), Segment(answer_ids(rt, ex), True)]
            )
            if episode_fraction > 0:
                episodes.append(episode_segments(rt, ex))
        except KeyError as e:
            raise ValueError(
                f"a warm_start template needs field {e} which the examples lack"
            ) from None
    # Answer rows and (longer) episode rows go in separate batches, each padded only to its
    # own length (a multiple of 32, at most seq_len): two compiled shapes, far fewer pad tokens.
    kinds = [(answers, data.Cursor(len(answers), rt.config.seed + 1))]
    if episodes:
        kinds.append((episodes, data.Cursor(len(episodes), rt.config.seed + 2)))
    lengths = [
        min(c.seq_len, -(-max(sum(len(sg.ids) for sg in r) for r in rows) // 32) * 32)
        for rows, _ in kinds
    ]
    tx = optim.make_optimizer(
        total_steps=c.steps,
        learning_rate=c.learning_rate,
        warmup_ratio=c.warmup_ratio,
        max_grad_norm=1.0,
    )
    state = init_state(rt.params, tx, rt.mesh)
    step_fn = make_train_step(rt.graphdef, tx, StepConfig(temperature=1.0, beta=0.0))
    compiled: dict[int, Any] = {}
    progress = Progress(c.steps, desc="warm start")
    with jax.set_mesh(rt.mesh):
        for step in range(c.steps):
            # an episode step whenever the running share of episode steps falls behind
            k = int(
                bool(episodes) and int((step + 1) * episode_fraction) > int(step * episode_fraction)
            )
            rows, cursor = kinds[k]
            groups = [Group(None, [r], [1.0]) for r in data.select(rows, cursor.take(c.batch_size))]
            host, stats = build_batch(
                groups,
                num_groups=c.batch_size,
                group_size=1,
                seq_len=lengths[k],
                pad_id=rt.tok.pad_id,
            )
            # group_size 1 gives zero advantages; supervised rows all get advantage 1
            host = host.replace(
                advantages=np.ones_like(host.advantages) * (host.loss_mask.sum(1) > 0)
            )
            batch = shard_batch(host, rt.mesh)
            if k not in compiled:
                compiled[k] = jit_train_step(step_fn, state, batch, rt.mesh, with_ref=False)
            state, m = compiled[k](state, batch, None)
            nll = -float(m["logprob"])
            if not np.isfinite(nll):
                raise FloatingPointError(f"warm start diverged at step {step} (nll={nll})")
            progress.update(1, nll=nll)
            writer.write_scalars(
                step + 1,
                {
                    f"warm_start/nll_{('answer', 'episode')[k]}": nll,
                    "warm_start/dropped": stats.dropped_too_long,
                },
            )
    progress.close()
    ckpt.save(c.steps, {"params": state.params}, {"steps": c.steps})
    ckpt.wait()
    ckpt.close()
    return state.params
