"""First-try and second-try accuracy on the held-out split: the paper's table.

    python -m reflax.evaluate --config=configs/qwen1p5b.py --checkpoint=WORKDIR
    python -m reflax.evaluate --config=configs/qwen1p5b.py --hf=WORKDIR/hf --baseline

First try: the model answers the task (greedy by default). Second try: on a
failure it writes one reflection and answers again; the second-try accuracy
counts first-try successes plus successful retries, as in the paper. With
`--baseline` the config's initial model (vanilla) is evaluated too and the two
are printed side by side.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
from absl import app, flags
from ml_collections import config_flags

from reflax import distributed
from reflax.config import rollout_settings
from reflax.episodes import Failure, first_attempts, reflect_and_retry
from reflax.runtime import Runtime


def ci95(p: float, n: int) -> float:
    """Half-width of the normal-approximation 95% confidence interval of a proportion."""
    return 1.96 * math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def evaluate(
    rt: Runtime,
    params: Any,
    examples: Sequence[dict],
    *,
    batch_size: int = 64,
    greedy: bool = True,
    seed: int = 0,
    num_samples_kept: int = 5,
) -> dict[str, Any]:
    """Accuracy before and after one reflect-and-retry, with 95% CIs and sample reflections.

    `samples` holds the first `num_samples_kept` failures: reflection, retry, whether the
    retry passed, and the failed problem's index in `examples`.
    """
    s = rollout_settings(rt.config)
    if s.method == "first_attempt":  # the second try always uses the model's own reflection
        s = dataclasses.replace(s, method="reflect")
    rng = jax.random.key(seed)
    first = second = 0
    kept: list[dict[str, str]] = []
    t0 = time.time()
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start : start + batch_size])
        key = jax.random.fold_in(rng, start)
        prompts, attempts, _, passed = first_attempts(
            rt.sampler, params, rt.tok, rt.task, chunk, key, s, greedy=greedy
        )
        first += sum(passed)
        failed = [i for i, ok in enumerate(passed) if not ok]
        failures = [Failure(chunk[i], prompts[i], attempts[i]) for i in failed]
        groups = reflect_and_retry(
            rt.sampler,
            params,
            rt.tok,
            rt.task,
            failures,
            jax.random.fold_in(key, 1),
            s,
            num_samples=1,
            greedy=greedy,
        )
        second += sum(int(g.rewards[0]) for g in groups)
        for i, g in zip(failed, groups[: max(0, num_samples_kept - len(kept))]):
            kept.append(
                {
                    "index": start + i,  # into `examples`
                    "reflection": g.texts["reflection"][0],
                    "retry": g.texts["retry"][0],
                    "passed": bool(g.rewards[0]),
                }
            )
    n = len(examples)
    p1 = first / n if n else float("nan")
    p2 = (first + second) / n if n else float("nan")
    return {
        "n": n,
        "first_try": p1,
        "second_try": p2,
        "first_try_ci95": ci95(p1, n),
        "second_try_ci95": ci95(p2, n),
        "retry_success_given_failure": second / (n - first) if n > first else float("nan"),
        "seconds": time.time() - t0,
        "samples": kept,
    }


def table(results: dict[str, dict[str, Any]], title: str = "") -> str:
    """The paper's table: rows are models, columns first / second try (%, ±95% CI)."""
    lines = [title] if title else []
    lines.append(f"{'model':<24} {'n':>6} {'first try':>16} {'second try':>16}")
    for name, r in results.items():
        f = f"{100 * r['first_try']:.1f} ± {100 * r['first_try_ci95']:.1f}"
        s = f"{100 * r['second_try']:.1f} ± {100 * r['second_try_ci95']:.1f}"
        lines.append(f"{name:<24} {r['n']:>6} {f:>16} {s:>16}")
    return "\n".join(lines)


def save_json(path: str | os.PathLike, results: dict[str, Any]) -> None:
    """Write the results (on the primary process only: one file for the whole cluster)."""
    if distributed.is_primary():
        with open(path, "w") as f:
            json.dump(results, f, indent=2)


def _define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "reflax config file", lock_config=True)
    flags.DEFINE_string("checkpoint", None, "workdir of a reflax run: its latest checkpoint")
    flags.DEFINE_string("hf", None, "a Hugging Face checkpoint (directory or Hub id)")
    flags.DEFINE_bool("baseline", False, "also evaluate the config's initial model")
    flags.DEFINE_integer("num_examples", None, "held-out examples (default: eval.num_examples)")
    flags.DEFINE_string("output", None, "write the results as JSON here")


def main(argv: Sequence[str]) -> None:
    with distributed.exit_on_error():
        _main(argv)


def _main(argv: Sequence[str]) -> None:
    del argv
    from reflax import logs
    from reflax.config import validate
    from reflax.runtime import build, load_examples, restore_params

    logs.setup()
    FLAGS = flags.FLAGS
    c = validate(FLAGS.config)
    distributed.initialize(distributed.ClusterSettings(**c.cluster))
    rt = build(c)
    n = FLAGS.num_examples if FLAGS.num_examples is not None else c.eval.num_examples
    examples = load_examples(rt, "test", n)
    kw = dict(batch_size=c.eval.batch_size, greedy=c.eval.greedy, seed=c.seed)
    results: dict[str, Any] = {}
    if FLAGS.baseline or not (FLAGS.checkpoint or FLAGS.hf):
        results["vanilla"] = evaluate(rt, rt.params, examples, **kw)
    if FLAGS.checkpoint:
        params, step = restore_params(rt, FLAGS.checkpoint)
        results[f"trained (step {step})"] = evaluate(rt, params, examples, **kw)
    if FLAGS.hf:
        other = build(c, model_path=FLAGS.hf)
        results[os.path.basename(os.path.normpath(FLAGS.hf)) or FLAGS.hf] = evaluate(
            other, other.params, examples, **kw
        )
    if distributed.is_primary():
        print(table(results, f"{c.task.name}: held-out accuracy (%), n={len(examples)}"))
    if FLAGS.output:
        save_json(FLAGS.output, results)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
