"""Train a model to reflect on its failures: Reflect, Retry, Reward with GRPO.

    python -m reflax.train --config=configs/qwen1p5b.py --workdir=/tmp/run [--config.key=value]

Each step: take failed attempts (offline failure set, or fresh attempts online),
sample G reflections per failure and one retry each, verify the retries, and
update the policy on the reflection tokens with one compiled GRPO step. The
workdir holds orbax checkpoints (resumed automatically), metrics.jsonl,
samples.jsonl, TensorBoard events, the HF export (hf/; with LoRA, the merged weights
there and the adapters alone as a PEFT directory in peft/) and eval.json.

`train` reads top to bottom: config and cluster, mesh, model and tokenizer, task and
data, warm start, state (restored or initialised), the rollout (chosen once), the
train step (compiled before the loop), the loop, the final evaluation and export.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from ml_collections import ConfigDict, config_flags

from reflax import cli, data, distributed, optim, storage
from reflax.batch import Batch, PackLengths, pack_groups, shard_batch
from reflax.checkpoint import Checkpointer
from reflax.config import ref_dtype
from reflax.episodes import (
    Failure,
    RolloutSettings,
    build_batch,
    first_attempt_groups,
    first_attempts,
    own_tokens_bound,
    reflect_and_retry,
)
from reflax.evaluate import accuracy_title, evaluate, table
from reflax.metrics import MetricsWriter, Progress, Timer
from reflax.models import lora
from reflax.models.hf import save_pretrained
from reflax.results import save_json
from reflax.runtime import (
    Runtime,
    add_lora,
    build_model,
    build_tokenizer,
    check_resume,
    checkpoint_dir,
    load_examples,
    restore_state,
    state_to_dict,
)
from reflax.sharding import make_mesh
from reflax.trainer import CompiledSteps, StepConfig, init_state, micro_batch_warning
from reflax.warm_start import train_problems, warm_start

log = logging.getLogger("reflax.train")

# A rollout: (current params, this step's rng) -> (groups, scalars to log)
Rollout = Callable[[Any, jax.Array], tuple[list, dict[str, float]]]


class NonFiniteLossError(FloatingPointError):
    pass


def train(c: ConfigDict, workdir: str) -> dict[str, Any]:
    """Run (or resume) training; returns the final evaluation results.

    SIGTERM (a preemption notice) stops every process after the same step with a checkpoint
    of it, and the run returns early; relaunching the same command resumes from there. A
    SIGTERM after the last step lets the final evaluation or export in progress finish and
    skips the rest. The signal's previous handler is back when this returns or raises.
    """
    distributed.initialize(distributed.ClusterSettings(**c.cluster))
    with distributed.StopRequest() as stop:  # from here on a SIGTERM is a request, not a kill
        return _train(c, workdir, stop)


def _train(c: ConfigDict, workdir: str, stop: distributed.StopRequest) -> dict[str, Any]:
    # --- config and cluster --------------------------------------------------------------
    storage.check_writable(workdir)  # a local one is created; a bad bucket fails here, at once
    writer, timer = MetricsWriter(workdir), Timer()
    ckpt = Checkpointer(checkpoint_dir(workdir), keep=c.keep_checkpoints)
    latest = ckpt.latest_step()  # None: a fresh run
    if latest is not None:  # before any compute: a changed recipe stops here
        check_resume(c, ckpt.metadata(latest), ckpt.step_dir(latest))
    U, G, T = c.rollout.groups_per_step, c.rollout.group_size, c.rollout.seq_len

    # --- mesh ----------------------------------------------------------------------------
    mesh = make_mesh(dict(c.mesh))

    # --- model and tokenizer -------------------------------------------------------------
    tok = build_tokenizer(c)
    model = build_model(c, mesh, len(tok.tokenizer))  # in its shards
    base_graphdef = nnx.graphdef(model)  # LoRA: the frozen base's graph, the KL reference's
    graphdef, params = nnx.split(add_lora(c, model, mesh))  # lora.rank > 0: + adapters
    del model
    use_lora = c.lora.rank > 0

    # --- task and data -------------------------------------------------------------------
    rt = Runtime.create(c, mesh, tok, graphdef)  # + the task and the sampler
    online = c.rollout.mode == "online" or c.rollout.method == "first_attempt"
    if online:
        items = train_problems(rt, "rl")
    else:
        items, _ = data.read_failures(c.rollout.failures)
    if not items:
        raise ValueError("no training examples")
    cursor = data.Cursor(len(items), c.seed)  # checkpointed: a resumed run continues it
    evaluating = c.eval.num_examples and (c.eval.before or c.eval.after)
    eval_examples = load_examples(rt, c.eval.split, c.eval.num_examples) if evaluating else []
    results: dict[str, Any] = {}

    def run_eval(name: str, params: Any) -> None:
        if eval_examples:
            with timer("eval"):
                kw = dict(batch_size=c.eval.batch_size, greedy=c.eval.greedy, seed=c.seed)
                results[name] = evaluate(rt, params, eval_examples, **kw)

    # --- warm start (supervised, for models with no pretraining) -------------------------
    if c.warm_start.steps:  # LoRA: the base is warm-started (fully), then adapted
        adapters, base = lora.split(params) if use_lora else (None, params)
        base_rt = dataclasses.replace(rt, graphdef=base_graphdef)
        base = warm_start(base_rt, base, workdir, writer, restore_only=latest is not None)
        params = lora.join(base, adapters) if use_lora else base
    if c.eval.before and latest is None:
        run_eval("before", params)

    # --- state: restored, or initialised from the (warm-started) weights ----------------
    tx, schedule = optim.make_optimizer(total_steps=c.total_steps * c.grpo.mu, **c.optim)
    # LoRA: the state trains the adapters; the frozen base stays beside it, passed to the
    # step as its reference (always: the policy is base + adapters, the KL reference the
    # base alone, no copy). Full fine-tuning: the reference is a copy of the initial
    # weights in grpo.ref_dtype, made only when a KL term needs it.
    frozen = None
    if use_lora:
        params, frozen = lora.split(params)
    ref = frozen
    if not use_lora and (c.grpo.beta > 0 or c.grpo.anchor_beta > 0):
        dtype = jnp.dtype(ref_dtype(c))
        ref = jax.tree.map(lambda x: x.astype(dtype, copy=True), params)  # state is donated

    def policy(state: Any) -> Any:  # the whole model's weights: base + adapters under LoRA
        return state.params if frozen is None else lora.join(frozen, state.params)

    start = 0
    if latest is None:
        state = init_state(params, tx, mesh)
    else:  # straight into the shards init_state would give, from abstract shapes
        state, meta = restore_state(ckpt, latest, params, tx, mesh)
        cursor.restore(meta["cursor"])
        start = int(meta["rollout_step"])
        results.update(meta.get("results", {}))
        log.info("resumed from %s at step %d", ckpt.step_dir(latest), start)
    del params  # the state holds the weights from here on

    # --- rollout, chosen once ------------------------------------------------------------
    settings = RolloutSettings.from_config(c, tok)
    if c.rollout.method == "first_attempt":
        rollout = first_attempt_rollout(rt, items, cursor, settings, timer)
    elif online:
        rollout = online_rollout(rt, items, cursor, settings, timer)
    else:
        rollout = offline_rollout(rt, items, cursor, settings, timer)

    # --- train step, compiled ahead of time from abstract shapes -------------------------
    # every layout a batch can take: unpacked rows, or each (prefix, suffix) size pair
    cfg = StepConfig.from_config(c)
    rows = c.rollout.groups_per_step * (1 if c.grpo.pack_groups else c.rollout.group_size)
    if note := micro_batch_warning(rows, c.grpo.micro_batches, mesh, c.grpo.pack_groups):
        log.warning(note)
    steps = CompiledSteps(
        graphdef,
        tx,
        cfg,
        state,
        ref,
        mesh,
        with_logprobs=c.grpo.mu > 1,
        ref_graphdef=base_graphdef if use_lora else None,
    )
    ladder = PackLengths.coarse(T, own_tokens_bound(settings, T), c.grpo.pack_sizes)
    layouts = ladder.layouts(U, G) if c.grpo.pack_groups else [Batch.abstract(U * G, T)]
    if start < c.total_steps:  # a relaunch after the last step trains nothing: compile nothing
        seconds = steps.precompile(layouts)
        writer.write_scalars(start, {"compiled_train_programs": len(layouts), "compile_s": seconds})
        if distributed.is_primary():
            print(f"compiled {len(layouts)} train programs in {seconds:.1f} s", flush=True)

    # --- loop ----------------------------------------------------------------------------
    rng0 = jax.random.key(c.seed)
    progress = Progress(c.total_steps, initial=start, desc="reflax")
    preempted = False
    with jax.set_mesh(mesh):
        for step in range(start, c.total_steps):
            with timer("rollout"):
                groups, info = rollout(policy(state), jax.random.fold_in(rng0, step))
                host, stats = build_batch(
                    groups, num_groups=U, group_size=G, seq_len=T, pad_id=tok.pad_id
                )
                if c.grpo.pack_groups:
                    host = pack_groups(host, G, ladder)
            batch = shard_batch(host, mesh)
            with timer("train_step"):
                train_step = steps.step(batch)
                if c.grpo.mu > 1:
                    old = steps.logprobs(batch)(policy(state), batch)
                    batch = batch.replace(old_logprobs=old)
                finite = True
                for _ in range(c.grpo.mu):
                    state, m = train_step(state, batch, ref)
                    finite = m["finite"] & finite  # every inner step's, not only the last's
                m = jax.device_get({**m, "finite": finite})
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
                train_slots=int(np.prod(host.tokens.shape)),  # rows x length the step computed
                train_programs=steps.num_programs,
                learning_rate=float(schedule(int(state.step))),
            )
            if (step + 1) % c.log_every == 0:
                writer.write_scalars(step + 1, {**scalars, **timer.summary()})
            if groups and (step + 1) % c.sample_every == 0:
                writer.write_texts(step + 1, {k: v[:2] for k, v in groups[0].texts.items()})
            progress.update(1, reward=stats.mean_reward, loss=scalars["loss"])
            # every process asks every step, so all stop after the same one
            preempted = stop.agreed() and step + 1 < c.total_steps
            if preempted or (step + 1) % c.checkpoint_every == 0 or step + 1 == c.total_steps:
                meta = {
                    "rollout_step": step + 1,
                    "cursor": cursor.state(),
                    "config": c.to_dict(),
                    "results": results,
                }
                writer.flush()  # a remote workdir's metrics reach it before the checkpoint
                ckpt.save(step + 1, state_to_dict(state), meta)
            if preempted:
                break
    progress.close()
    ckpt.wait()
    if preempted:
        if distributed.is_primary():
            print(
                f"stopped by SIGTERM after step {step + 1}: checkpoint saved in "
                f"{ckpt.step_dir(step + 1)}; relaunch the same command to resume",
                flush=True,
            )
        writer.close()
        ckpt.close()
        return results

    # --- final evaluation and export -----------------------------------------------------
    # After a SIGTERM the phase in progress finishes and the rest are skipped; the last
    # checkpoint is saved, so relaunching the same command runs them. hf/ is written under a
    # temporary name and renamed when whole, so a kill never leaves half an export.
    skipped = []
    if c.eval.after:
        if stop.agreed():
            skipped.append("final evaluation")
        else:
            run_eval("after", policy(state))
    if c.export_hf:
        if stop.agreed():
            skipped.append("HF export")
        else:
            model = nnx.merge(graphdef, policy(state))
            # built aside and moved in whole: a reader never sees half an export
            hf_dir = storage.join(workdir, "hf")
            with storage.staged_dir(hf_dir, publish=distributed.is_primary()) as staged:
                # LoRA: the merged weights, W + A @ B * alpha / r
                save_pretrained(lora.merged(model), staged, tokenizer=tok.tokenizer)
            if use_lora:  # and the adapters alone, as a PEFT directory on the base model
                peft_dir = storage.join(workdir, "peft")
                last = (lora.PEFT_CONFIG,)
                with storage.staged_dir(
                    peft_dir, publish=distributed.is_primary(), last=last
                ) as st:
                    lora.save_peft(model, st, base_model_name=c.model.path or None)
    if results and "final evaluation" not in skipped and distributed.is_primary():
        print(table(results, accuracy_title(c, len(eval_examples))))
        if c.eval.expected:
            print(f"expected: {c.eval.expected}")
        save_json(storage.join(workdir, "eval.json"), results)
    if skipped and distributed.is_primary():
        print(
            f"stopped by SIGTERM after the last step: {' and '.join(skipped)} skipped; "
            "relaunch the same command to run them",
            flush=True,
        )
    writer.close()
    ckpt.close()
    return results


# --- the rollouts: each step's groups from the current weights -----------------------------


def offline_rollout(
    rt: Runtime, failures: list[dict], cursor: data.Cursor, s: RolloutSettings, timer: Timer
) -> Rollout:
    """The paper's: U failed attempts of the failure set per step, G reflections each."""

    def rollout(params: Any, rng: jax.Array) -> tuple[list, dict[str, float]]:
        recs = data.select(failures, cursor.take(rt.config.rollout.groups_per_step))
        found = [Failure(r["example"], r["prompt_ids"], r["attempt_ids"]) for r in recs]
        args = (rt.sampler, params, rt.tok, rt.task, found, jax.random.fold_in(rng, 7), s)
        return reflect_and_retry(*args, timer=timer), {}

    return rollout


def online_rollout(
    rt: Runtime, problems: list[dict], cursor: data.Cursor, s: RolloutSettings, timer: Timer
) -> Rollout:
    """Fresh first attempts of the current policy; up to U of its failures are the groups."""
    r = rt.config.rollout

    def rollout(params: Any, rng: jax.Array) -> tuple[list, dict[str, float]]:
        examples = data.select(problems, cursor.take(r.queries_per_step))
        args = (rt.sampler, params, rt.tok, rt.task)
        prompts, attempts, _, passed = first_attempts(
            *args, examples, rng, s, greedy=r.greedy_attempts, timer=timer
        )
        failed = zip(examples, prompts, attempts, passed)
        found = [Failure(ex, p, a) for ex, p, a, ok in failed if not ok][: r.groups_per_step]
        groups = reflect_and_retry(*args, found, jax.random.fold_in(rng, 7), s, timer=timer)
        return groups, {"attempt_success": float(np.mean(passed))}

    return rollout


def first_attempt_rollout(
    rt: Runtime, problems: list[dict], cursor: data.Cursor, s: RolloutSettings, timer: Timer
) -> Rollout:
    """Plain GRPO (an ablation): G first attempts per problem, rewarded themselves."""

    def rollout(params: Any, rng: jax.Array) -> tuple[list, dict[str, float]]:
        examples = data.select(problems, cursor.take(rt.config.rollout.groups_per_step))
        args = (rt.sampler, params, rt.tok, rt.task, examples, rng, s)
        groups = first_attempt_groups(*args, timer=timer)
        return groups, {"attempt_success": float(np.mean([g.rewards for g in groups]))}

    return rollout


def _define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "reflax config file", lock_config=True)
    flags.DEFINE_string("workdir", None, "checkpoints, metrics and exports go here")
    flags.mark_flags_as_required(["config", "workdir"])


def main() -> None:
    train(cli.setup(flags.FLAGS.config), flags.FLAGS.workdir)


if __name__ == "__main__":
    _define_flags()
    cli.run(main, user_errors=(NonFiniteLossError,))
