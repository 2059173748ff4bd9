"""Build the failure set the paper trains on (offline mode).

    python -m reflax.collect_failures --config=configs/qwen1p5b.py --output=failures.jsonl
    python -m reflax.collect_failures --config=configs/countdown_toy.py \
        --warm_start=/tmp/toy --output=failures.jsonl   # from a run's warm-started model

For each training query, sample `rollout.attempts_per_query` first attempts
from the config's initial model and keep the first failing one: a JSONL row
{"example", "prompt_ids", "attempt_ids", "attempt_text", "pass_rate"}. Queries
the model always solves are left out (nothing to reflect on). The file loads
with `datasets.load_dataset("json", data_files=...)` and is what
`rollout.failures` points the trainer at.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import jax
from absl import flags
from ml_collections import config_flags

from reflax import cli, data, distributed, storage
from reflax.episodes import RolloutSettings, completion_text, first_attempts
from reflax.metrics import MetricsWriter, Progress
from reflax.runtime import Runtime, load_examples
from reflax.warm_start import warm_start

log = logging.getLogger("reflax.collect_failures")


def collect_failures(
    rt: Runtime,
    params: Any,
    examples: Sequence[dict],
    *,
    attempts: int,
    batch_size: int,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    s = RolloutSettings.from_config(rt.config, rt.tok)
    rng = jax.random.key(seed)
    records: list[dict[str, Any]] = []
    solved_all = 0
    passes = 0
    progress = Progress(len(examples), desc="attempts")
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start : start + batch_size])
        prompts, outs, _, passed = first_attempts(
            rt.sampler,
            params,
            rt.tok,
            rt.task,
            chunk,
            jax.random.fold_in(rng, start),
            s,
            num_samples=attempts,
        )
        passes += sum(passed)
        for e, ex in enumerate(chunk):
            rows = range(e * attempts, (e + 1) * attempts)
            failed = [i for i in rows if not passed[i]]
            if not failed:
                solved_all += 1
                continue
            i = failed[0]
            records.append(
                {
                    "example": ex,
                    "prompt_ids": prompts[i],
                    "attempt_ids": outs[i],
                    "attempt_text": completion_text(rt.tok, outs[i]),
                    "pass_rate": 1 - len(failed) / attempts,
                }
            )
        progress.update(len(chunk), failures=len(records))
    progress.close()
    n = len(examples)
    stats = {
        "queries": n,
        "failures": len(records),
        "always_solved": solved_all,
        "attempt_success": passes / max(n * attempts, 1),
    }
    return records, stats


def _define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "reflax config file", lock_config=True)
    flags.DEFINE_string("output", None, "JSONL file to write")
    flags.DEFINE_integer("num_queries", None, "training queries to attempt (default: all)")
    flags.DEFINE_integer("batch_size", 64, "queries per sampling call")
    flags.DEFINE_string(
        "warm_start",
        None,
        "a workdir whose warm start is the initial model (configs with warm_start.steps > 0)",
    )
    flags.mark_flags_as_required(["config", "output"])


def main() -> None:
    FLAGS = flags.FLAGS
    c = FLAGS.config
    if c.rollout.mode == "offline" and not c.rollout.failures:
        c.rollout.failures = FLAGS.output  # the file this command is about to write
    warm = [storage.join(FLAGS.warm_start, "warm_start")] if FLAGS.warm_start else []
    rt, params = cli.start(c, cli.Inputs(failures=False, checkpoints=warm, outputs=[FLAGS.output]))
    if FLAGS.warm_start:  # the model RL starts from: the warm start trained in that workdir
        writer = MetricsWriter(FLAGS.warm_start, tensorboard=False, enabled=False)
        params = warm_start(rt, params, FLAGS.warm_start, writer, restore_only=True)
    c = rt.config
    examples = load_examples(rt, "train", FLAGS.num_queries or c.task.num_train, seed=c.seed)
    records, stats = collect_failures(
        rt,
        params,
        examples,
        attempts=c.rollout.attempts_per_query,
        batch_size=FLAGS.batch_size,
        seed=c.seed,
    )
    if distributed.is_primary():  # one file for the whole cluster
        data.write_failures(FLAGS.output, records)
        print(
            " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()
            )
        )


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
