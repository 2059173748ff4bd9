"""Supervised warm start: next-token training on the task's reference answers.

For models with no pretraining (the CPU toy runs), a short supervised phase
gives basic competence before Reflect-Retry-Reward. It reuses the GRPO step:
with advantage 1 on every answer token, ratio 1 and no KL, the policy-gradient
loss has exactly the gradient of the answer tokens' negative log-likelihood.
The result is checkpointed in <workdir>/warm_start, so a resumed run (and its
KL reference) starts from the same weights.

Two kinds of rows (keys of `warm_start`; templates are str.format over the example
plus the task's `Task.warm_start_fields`, e.g. Countdown's `expression`, `wrong`, `hint`):

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

import logging
import os
import random
from typing import Any

import jax
import numpy as np

from reflax import data, optim
from reflax.batch import shard_batch
from reflax.checkpoint import Checkpointer, CheckpointError, abstract_like
from reflax.episodes import Group, Segment, _after_sampled, build_batch, prompt_ids
from reflax.metrics import MetricsWriter, Progress
from reflax.runtime import Runtime, load_examples
from reflax.tasks import splits
from reflax.trainer import StepConfig, init_state, jit_train_step, make_train_step

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


def train_problems(rt: Runtime, stage: str) -> list[dict]:
    """The train problems the warm start (`stage="warm_start"`) or online RL (`"rl"`) uses:
    all of them, or with a warm start its side of `split_families`."""
    if stage not in ("warm_start", "rl"):
        raise ValueError(f"stage must be 'warm_start' or 'rl', got {stage!r}")
    c = rt.config
    warm = stage == "warm_start"
    examples = load_examples(rt, "train", c.task.num_train, seed=c.seed + warm)
    if not c.warm_start.steps:
        return examples
    return split_families(rt, examples)[0 if warm else 1]


def warm_start(
    rt: Runtime, params: Any, workdir: str, writer: MetricsWriter, *, restore_only: bool = False
) -> Any:
    """`params` after the supervised phase (trained now, or restored from the workdir)."""
    c = rt.config.warm_start
    ckpt = Checkpointer(os.path.join(workdir, "warm_start"), keep=1)
    if ckpt.latest_step() is not None:
        restored, _ = ckpt.restore(abstract_like({"params": params}))
        ckpt.close()
        log.info("warm start restored from %s", ckpt.directory)
        return restored["params"]
    if restore_only:
        raise CheckpointError(
            f"{ckpt.directory} is missing: the run's checkpoints need the warm start they began "
            "from; start a fresh workdir"
        )
    examples = train_problems(rt, "warm_start")
    rng = random.Random(rt.config.seed + 1)
    episode_fraction = c.episode_fraction
    answers, episodes = [], []
    for ex in examples:
        ex = {**ex, **rt.task.warm_start_fields(ex, rng)}
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
    tx, _ = optim.make_optimizer(
        total_steps=c.steps,
        learning_rate=c.learning_rate,
        warmup_ratio=c.warmup_ratio,
        max_grad_norm=1.0,
    )
    state = init_state(params, tx, rt.mesh)
    del params  # the state holds them now
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
