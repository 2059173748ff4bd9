"""Train a model to reflect on its failures: Reflect, Retry, Reward with GRPO.

    python -m reflax.train --config=configs/qwen1p5b.py --workdir=/tmp/run [--config.key=value]

Each step: take failed attempts (offline failure set, or fresh attempts online),
sample G reflections per failure and one retry each, verify the retries, and
update the policy on the reflection tokens with one compiled GRPO step. The
workdir holds orbax checkpoints (resumed automatically), metrics.jsonl,
samples.jsonl, TensorBoard events, the HF export (hf/) and eval.json.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import ConfigDict, config_flags

from reflax import data, logs, optim
from reflax.checkpoint import Checkpointer, abstract_like
from reflax.config import rollout_settings, step_config, validate
from reflax.episodes import (
    Failure,
    build_batch,
    first_attempt_groups,
    first_attempts,
    reflect_and_retry,
)
from reflax.evaluate import evaluate, save_json, table
from reflax.metrics import MetricsWriter, Progress, Timer
from reflax.models.hf import save_pretrained
from reflax.runtime import (
    Runtime,
    build,
    checkpoint_dir,
    load_examples,
    maybe_initialize_distributed,
    state_to_dict,
)
from reflax.trainer import (
    TrainState,
    init_state,
    jit_train_step,
    make_logprob_fn,
    make_train_step,
    shard_batch,
)
from reflax.warm_start import split_families, warm_start

log = logging.getLogger("reflax.train")


class NonFiniteLossError(FloatingPointError):
    pass


class GroupSource:
    """Yields each step's groups; its cursor is checkpointed with the state."""

    def __init__(self, rt: Runtime, timer: Timer | None = None):
        c = rt.config
        self.timer = timer
        self.rt, self.s = rt, rollout_settings(c)
        self.online = c.rollout.mode == "online" or c.rollout.method == "first_attempt"
        if self.online:
            self.items = load_examples(rt, "train", c.task.num_train, seed=c.seed)
            if c.warm_start.steps:
                self.items = split_families(rt, self.items)[1]
        else:
            self.items, _ = data.read_failures(c.rollout.failures)
        if not self.items:
            raise ValueError("no training examples")
        self.cursor = data.Cursor(len(self.items), c.seed)

    def next(self, params: Any, rng: jax.Array) -> tuple[list, dict[str, float]]:
        rt, c, s = self.rt, self.rt.config, self.s
        U = c.rollout.groups_per_step
        args = (rt.sampler, params, rt.tok, rt.task)
        if c.rollout.method == "first_attempt":
            examples = data.select(self.items, self.cursor.take(U))
            groups = first_attempt_groups(*args, examples, rng, s, timer=self.timer)
            return groups, {"attempt_success": float(np.mean([g.rewards for g in groups]))}
        info: dict[str, float] = {}
        if self.online:
            examples = data.select(self.items, self.cursor.take(c.rollout.queries_per_step))
            prompts, attempts, _, passed = first_attempts(
                *args, examples, rng, s, greedy=c.rollout.greedy_attempts, timer=self.timer
            )
            failures = [
                Failure(ex, p, a)
                for ex, p, a, ok in zip(examples, prompts, attempts, passed)
                if not ok
            ][:U]
            info["attempt_success"] = float(np.mean(passed))
        else:
            recs = data.select(self.items, self.cursor.take(U))
            failures = [Failure(r["example"], r["prompt_ids"], r["attempt_ids"]) for r in recs]
        groups = reflect_and_retry(*args, failures, jax.random.fold_in(rng, 7), s, timer=self.timer)
        return groups, info


def train(c: ConfigDict, workdir: str) -> dict[str, Any]:
    """Run (or resume) training; returns the final evaluation results."""
    maybe_initialize_distributed()
    os.makedirs(workdir, exist_ok=True)
    rt = build(c)
    writer = MetricsWriter(workdir)
    timer = Timer()
    ckpt = Checkpointer(checkpoint_dir(workdir), keep=c.keep_checkpoints)
    latest = ckpt.latest_step()
    results: dict[str, Any] = {}
    evaluating = c.eval.num_examples and (c.eval.before or c.eval.after)
    eval_examples = load_examples(rt, "test", c.eval.num_examples) if evaluating else []

    def run_eval(name: str, params: Any) -> None:
        if eval_examples:
            with timer("eval"):
                results[name] = evaluate(
                    rt,
                    params,
                    eval_examples,
                    batch_size=c.eval.batch_size,
                    greedy=c.eval.greedy,
                    seed=c.seed,
                )

    if c.warm_start.steps and latest is None:
        rt.params = warm_start(rt, workdir, writer)
    elif c.warm_start.steps:
        rt.params = warm_start(rt, workdir, writer, restore_only=True)
    if c.eval.before and latest is None:
        run_eval("before", rt.params)

    tx = optim.make_optimizer(total_steps=c.total_steps * c.grpo.mu, **c.optim)
    lr_fn = optim.learning_rate_fn(total_steps=c.total_steps * c.grpo.mu, **c.optim)
    with_ref = c.grpo.beta > 0 or c.grpo.anchor_beta > 0
    # The KL reference is the initial weights in grpo.ref_dtype (the same arrays when that is
    # their dtype); the train state is built from them, and no other copy is kept.
    ref_dtype = jnp.dtype(c.grpo.ref_dtype)
    ref = jax.tree.map(lambda x: x.astype(ref_dtype), rt.params) if with_ref else None
    state = init_state(rt.params, tx, rt.mesh)
    rt.params = None
    source = GroupSource(rt, timer)
    start = 0
    if latest is not None:
        restored, meta = ckpt.restore(abstract_like(state_to_dict(state)), latest)
        state = TrainState(**restored)
        source.cursor.restore(meta["cursor"])
        start = int(meta["rollout_step"])
        results.update(meta.get("results", {}))
        log.info("resumed from %s at step %d", ckpt.step_dir(latest), start)

    cfg = step_config(c)
    step_fn = make_train_step(rt.graphdef, tx, cfg)
    logprob_fn = jax.jit(make_logprob_fn(rt.graphdef, cfg))
    U, G, T = c.rollout.groups_per_step, c.rollout.group_size, c.rollout.seq_len
    rng0 = jax.random.key(c.seed)
    compiled = None
    progress = Progress(c.total_steps, initial=start, desc="reflax")
    with jax.set_mesh(rt.mesh):
        for step in range(start, c.total_steps):
            rng = jax.random.fold_in(rng0, step)
            with timer("rollout"):
                groups, info = source.next(state.params, rng)
                host, stats = build_batch(
                    groups, num_groups=U, group_size=G, seq_len=T, pad_id=rt.tok.pad_id
                )
            batch = shard_batch(host, rt.mesh)
            if compiled is None:
                compiled = jit_train_step(step_fn, state, batch, rt.mesh, ref is not None)
            with timer("train_step"):
                if c.grpo.mu > 1:
                    batch = batch.replace(old_logprobs=logprob_fn(state.params, batch))
                for _ in range(c.grpo.mu):
                    state, m = compiled(state, batch, ref)
                m = jax.device_get(m)
            if not bool(m["finite"]):
                raise NonFiniteLossError(
                    f"non-finite loss ({m['loss']}) or gradient norm ({m['grad_norm']}) at step "
                    f"{step}; the update was not applied and the last checkpoint "
                    f"({ckpt.latest_step()}) is intact. Lower optim.learning_rate or check the "
                    "data."
                )
            scalars = {k: float(np.asarray(v)) for k, v in m.items()}
            scalars.update(info)
            scalars.update(
                retry_success=stats.mean_reward,
                zero_variance_groups=stats.zero_variance_frac,
                groups=stats.groups,
                dropped_too_long=stats.dropped_too_long,
                reflection_tokens=stats.loss_tokens / max(stats.groups * G, 1),
                learning_rate=float(lr_fn(int(state.step))),
            )
            if (step + 1) % c.log_every == 0:
                writer.write_scalars(step + 1, {**scalars, **timer.summary()})
            if groups and (step + 1) % c.sample_every == 0:
                g = groups[0]
                writer.write_texts(step + 1, {k: v[:2] for k, v in g.texts.items()})
            progress.update(1, reward=stats.mean_reward, loss=scalars["loss"])
            if (step + 1) % c.checkpoint_every == 0 or step + 1 == c.total_steps:
                meta = {
                    "rollout_step": step + 1,
                    "cursor": source.cursor.state(),
                    "config": c.to_dict(),
                    "results": results,
                }
                ckpt.save(step + 1, state_to_dict(state), meta)
    progress.close()
    ckpt.wait()
    if c.eval.after:
        run_eval("after", state.params)
    if c.export_hf:
        model = nnx.merge(rt.graphdef, state.params)
        save_pretrained(model, os.path.join(workdir, "hf"), tokenizer=rt.tok.tokenizer)
    if results:
        print(table(results, f"{c.task.name}: held-out accuracy (%), n={len(eval_examples)}"))
        save_json(os.path.join(workdir, "eval.json"), results)
    writer.close()
    ckpt.close()
    return results


def _define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "reflax config file", lock_config=True)
    flags.DEFINE_string("workdir", None, "checkpoints, metrics and exports go here")
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logs.setup()
    train(validate(flags.FLAGS.config), flags.FLAGS.workdir)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
