"""What the toy's reflections say, before and after RL, on the held-out problems.

    python experiments/toy_reproduction/reflections.py --workdir=/tmp/R2/reflect_s0 \
        --config.seed=0 [--config.key=value ...]

Pass the same config flags as the run that wrote the workdir. For the warm-started
(vanilla) and the trained model, with the evaluation's greedy protocol, on every first-try
failure: the share of reflections that name an operator that solves the problem, the
retry success, and what the reflections say; and, for comparison, the success a
constant reflection (`use minus` for every failure, say) would reach if the retry
followed it. A reflection-only reward can raise the first share; only a retry that
follows its reflection turns it into second-try accuracy.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import jax
from absl import app, flags
from ml_collections import config_flags
from run import CONFIG

from reflax.config import validate
from reflax.evaluate import evaluate
from reflax.metrics import MetricsWriter
from reflax.runtime import build, load_examples, restore_params
from reflax.tasks.countdown import OP_WORDS, solving_operators
from reflax.warm_start import warm_start

WORDS = tuple(OP_WORDS.values())

config_flags.DEFINE_config_file("config", CONFIG, "the toy config and its overrides")
flags.DEFINE_string("workdir", None, "a finished `reflax.train` run of the toy config")
flags.mark_flag_as_required("workdir")


def analyse(rt, params, examples: Sequence[dict], batch_size: int = 256) -> dict:
    """The evaluation's greedy protocol, keeping every failure's reflection."""
    r = evaluate(rt, params, examples, batch_size=batch_size, num_samples_kept=len(examples))
    rows = []  # (words of the operators that solve the problem, reflection, retry passed)
    for k in r["samples"]:
        solving = solving_operators(examples[k["index"]], rt.task.verify)
        rows.append(({OP_WORDS[o] for o in solving}, k["reflection"], k["passed"]))
    n = max(len(rows), 1)
    named = sum(any(w in ops and w in text.split() for w in WORDS) for ops, text, _ in rows)
    return {
        "failures": len(rows),
        "names_a_solving_op": named / n,
        "retry_success_given_failure": r["retry_success_given_failure"],
        "constant_reflection_ceiling": {w: sum(w in ops for ops, _, _ in rows) / n for w in WORDS},
        "reflections": collections.Counter(text for _, text, _ in rows).most_common(5),
    }


def main(argv: Sequence[str]) -> None:
    del argv
    c = validate(flags.FLAGS.config)
    wd = flags.FLAGS.workdir
    rt, initial = build(c)
    writer = MetricsWriter(wd, tensorboard=False, enabled=False)  # restores, writes nothing
    vanilla = warm_start(rt, initial, wd, writer, restore_only=True)
    trained, step = restore_params(rt, initial, wd)
    examples = load_examples(rt, "test", c.eval.num_examples)
    with jax.set_mesh(rt.mesh):
        for name, params in (("vanilla", vanilla), (f"trained (step {step})", trained)):
            r = analyse(rt, params, examples, c.eval.batch_size)
            ceiling = ", ".join(
                f"{w} {100 * v:.1f}" for w, v in r["constant_reflection_ceiling"].items()
            )
            print(
                f"{name}: {r['failures']} failures; reflection names a solving operator "
                f"{100 * r['names_a_solving_op']:.1f}%, retry passes "
                f"{100 * r['retry_success_given_failure']:.1f}%; a constant reflection could "
                f"reach: {ceiling}; reflections: {r['reflections']}"
            )


if __name__ == "__main__":
    app.run(main)
