"""Supervised warm start: next-token training on the task's reference answers.

For models with no pretraining (the CPU toy runs), a short supervised phase
gives basic competence before Reflect-Retry-Reward. It reuses the GRPO step:
with advantage 1 on every answer token, ratio 1 and no KL, the policy-gradient
loss has exactly the gradient of the answer tokens' negative log-likelihood.
The result is checkpointed in <workdir>/warm_start, so a resumed run (and its
KL reference) starts from the same weights.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np

from reflax import data, optim
from reflax.checkpoint import Checkpointer, abstract_like
from reflax.episodes import Group, Segment, build_batch, prompt_ids
from reflax.metrics import MetricsWriter, Progress
from reflax.runtime import Runtime, load_examples
from reflax.trainer import StepConfig, init_state, jit_train_step, make_train_step, shard_batch

log = logging.getLogger(__name__)


def answer_ids(rt: Runtime, example: dict) -> list[int]:
    """The reference answer as a complete assistant turn ending in the stop id."""
    text = rt.config.warm_start.answer_template.format(**example)
    end = rt.tok.turn_suffix_ids[:1]
    if not end or end[0] not in rt.tok.stop_ids:
        end = rt.tok.stop_ids[:1]
    return rt.tok.encode(text) + end


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
        raise FileNotFoundError(
            f"{ckpt.directory} is missing: the run's checkpoints need the warm start they began "
            "from; start a fresh workdir"
        )
    examples = load_examples(rt, "train", rt.config.task.num_train, seed=rt.config.seed + 1)
    rows = []
    for ex in examples:
        try:
            rows.append((prompt_ids(rt.tok, rt.task, ex), answer_ids(rt, ex)))
        except KeyError as e:
            raise ValueError(
                f"warm_start.answer_template needs field {e} which the examples lack"
            ) from None
    tx = optim.make_optimizer(
        total_steps=c.steps,
        learning_rate=c.learning_rate,
        warmup_ratio=c.warmup_ratio,
        max_grad_norm=1.0,
    )
    state = init_state(rt.params, tx, rt.mesh)
    step_fn = make_train_step(rt.graphdef, tx, StepConfig(temperature=1.0, beta=0.0))
    cursor = data.Cursor(len(rows), rt.config.seed + 1)
    compiled = None
    progress = Progress(c.steps, desc="warm start")
    with jax.set_mesh(rt.mesh):
        for step in range(c.steps):
            batch_rows = data.select(rows, cursor.take(c.batch_size))
            groups = [Group(None, [[Segment(p), Segment(a, True)]], [1.0]) for p, a in batch_rows]
            host, stats = build_batch(
                groups,
                num_groups=c.batch_size,
                group_size=1,
                seq_len=c.seq_len,
                pad_id=rt.tok.pad_id,
            )
            # group_size 1 gives zero advantages; supervised rows all get advantage 1
            host = host.replace(
                advantages=np.ones_like(host.advantages) * (host.loss_mask.sum(1) > 0)
            )
            batch = shard_batch(host, rt.mesh)
            if compiled is None:
                compiled = jit_train_step(step_fn, state, batch, rt.mesh, with_ref=False)
            state, m = compiled(state, batch, None)
            nll = -float(m["logprob"])
            if not np.isfinite(nll):
                raise FloatingPointError(f"warm start diverged at step {step} (nll={nll})")
            progress.update(1, nll=nll)
            writer.write_scalars(
                step + 1, {"warm_start/nll": nll, "warm_start/dropped": stats.dropped_too_long}
            )
    progress.close()
    ckpt.save(c.steps, {"params": state.params}, {"steps": c.steps})
    ckpt.wait()
    ckpt.close()
    return state.params
