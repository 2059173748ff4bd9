"""What the toy's reflections say, before and after RL, on the held-out problems
(`eval.split`: test, or validation while choosing a design).

    python experiments/toy_reproduction/reflections.py --workdir=/tmp/R2/reflect_s0 \
        --config.seed=0 [--config.key=value ...]

Pass the same config flags as the run that wrote the workdir. For the warm-started
(vanilla) and the trained model, with the evaluation's greedy protocol, on every first-try
failure: the share of reflections that name an operator that solves the problem, the
retry success, and what the reflections say; and, for comparison, the success a
constant reflection (`use minus` for every failure, say) would reach if the retry
followed it. A reflection-only reward can raise the first share; only a retry that
follows its reflection turns it into second-try accuracy.

Prints both analyses and writes them to `--output` (default: `reflections.json` in the
workdir), the file `run.py` gathers into its results.json; every figure quoted from this
script (the lead over the best constant, the ceilings, the stated side) is in it.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from collections.abc import Sequence

import jax
from absl import app, flags
from ml_collections import config_flags
from run import CONFIG

from reflax.config import validate
from reflax.evaluate import evaluate
from reflax.metrics import MetricsWriter
from reflax.runtime import build, load_examples, restore_params
from reflax.tasks.countdown import OP_WORDS, apply_operator, solving_operators
from reflax.warm_start import warm_start

WORDS = tuple(OP_WORDS.values())

config_flags.DEFINE_config_file("config", CONFIG, "the toy config and its overrides")
flags.DEFINE_string("workdir", None, "a finished `reflax.train` run of the toy config")
flags.DEFINE_string("output", "", "json file for the results (default: workdir/reflections.json)")
flags.mark_flag_as_required("workdir")
OUTPUT = "reflections.json"


def attempt_op(text: str) -> str:
    """The operator a bare two-number attempt used ('?' when it has none or several)."""
    ops = [o for o in "+-*/" if o in text]
    return ops[0] if len(ops) == 1 else "?"


def attempt_side(text: str, target: int) -> str:
    """Whether a bare two-number attempt's value lies above the target ('high'), not
    ('low'), or '?' when it is not `x op y`: what design 12's reflections state."""
    m = re.fullmatch(r"\s*(\d+)\s*([-+*/])\s*(\d+)\s*", text)
    if not m:
        return "?"
    return "high" if apply_operator(m[2], int(m[1]), int(m[3])) > target else "low"


def best_lookup(rows: Sequence[tuple], key) -> float:
    """Share of failures a reflection chosen from `key(row)` alone (one word per key value)
    names a solving operator for: the most that information can give."""
    by_key = collections.defaultdict(list)
    for row in rows:
        by_key[key(row)].append(row[0])
    hits = sum(max(sum(w in ops for ops in group) for w in WORDS) for group in by_key.values())
    return hits / max(len(rows), 1)


def _names(row: tuple) -> bool:
    """Whether a failure's reflection names an operator that solves its problem."""
    ops, text = row[0], row[1]
    return any(w in ops and w in text.split() for w in WORDS)


def _stated_side(text: str) -> str | None:
    """The side a design-12 reflection states (`high, use minus` -> 'high'), if any."""
    side = text.split(",")[0]
    return side if side in ("high", "low") else None


def _share(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


def paired_gain(rows: Sequence[tuple], constant: str) -> tuple[float, float]:
    """(mean, 95% CI half-width) over failures of [the reflection names a solving op] -
    [`constant` solves]: the reflections' lead over the best constant, paired."""
    d = [float(_names(row)) - float(constant in row[0]) for row in rows]
    n = len(d)
    if n < 2:
        return float("nan"), float("nan")
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    return mean, 1.96 * (var / n) ** 0.5


def analyse(rt, params, examples: Sequence[dict], batch_size: int = 256) -> dict:
    """The evaluation's greedy protocol, keeping every failure's reflection."""
    r = evaluate(rt, params, examples, batch_size=batch_size, num_samples_kept=len(examples))
    # (words of the operators that solve the problem, reflection, retry passed, failed op,
    # whether the target exceeds both numbers, the first try's error category, whether the
    # failed attempt overshot the target)
    rows = []
    for k in r["samples"]:
        ex = examples[k["index"]]
        solving = solving_operators(ex, rt.task.verify)
        above = ex["target"] > max(ex["nums"])
        rows.append(
            (
                {OP_WORDS[o] for o in solving},
                k["reflection"],
                k["passed"],
                attempt_op(k["attempt"]),
                above,
                rt.task.category(ex, k["attempt"]),
                attempt_side(k["attempt"], ex["target"]),
            )
        )
    n = max(len(rows), 1)
    named = sum(map(_names, rows))
    constants = {w: sum(w in ops for ops, *_ in rows) / n for w in WORDS}
    best = max(constants, key=constants.get)
    return {
        "failures": len(rows),
        "names_a_solving_op": named / n,
        "retry_success_given_failure": r["retry_success_given_failure"],
        "constant_reflection_ceiling": constants,
        "best_constant": best,
        "lead_over_best_constant": paired_gain(rows, best),
        # what a reflection could reach that reads only the failed operator, or the failed
        # operator and whether the target lies above both numbers
        "failed_op_ceiling": best_lookup(rows, lambda row: row[3]),
        "failed_op_and_size_ceiling": best_lookup(rows, lambda row: (row[3], row[4])),
        # reflections that state a side (design 12): how many, and how many state it right
        "states_a_side": _share([_stated_side(r[1]) is not None for r in rows]),
        "side_right": _share([_stated_side(r[1]) == r[6] for r in rows if _stated_side(r[1])]),
        # or the failed operator and whether its value lies above the target
        "failed_op_and_side_ceiling": best_lookup(rows, lambda row: (row[3], row[6])),
        "reflections": collections.Counter(text for _, text, *_ in rows).most_common(5),
        # how often the retry passes after a reflection that names a solving op, and after
        # one that does not: the reward sees the retry, so it credits what the retry follows
        "retry_given_right": _share([r[2] for r in rows if _names(r)]),
        "retry_given_wrong": _share([r[2] for r in rows if not _names(r)]),
        # per first-try error: (failures, share whose reflection names a solving op, share
        # the best constant overall would solve)
        "by_error": {
            cat: (
                len(sub),
                _share([_names(r) for r in sub]),
                _share([best in r[0] for r in sub]),
            )
            for cat in sorted({r[5] for r in rows})
            for sub in [[r for r in rows if r[5] == cat]]
        },
    }


def main(argv: Sequence[str]) -> None:
    del argv
    c = validate(flags.FLAGS.config)
    wd = flags.FLAGS.workdir
    rt, initial = build(c)
    writer = MetricsWriter(wd, tensorboard=False, enabled=False)  # restores, writes nothing
    vanilla = warm_start(rt, initial, wd, writer, restore_only=True)
    trained, step = restore_params(initial, wd)
    examples = load_examples(rt, c.eval.split, c.eval.num_examples)
    out: dict = {"workdir": wd, "seed": c.seed, "split": c.eval.split, "n": len(examples)}
    with jax.set_mesh(rt.mesh):
        for key, name, params in (
            ("vanilla", "vanilla", vanilla),
            ("trained", f"trained (step {step})", trained),
        ):
            r = analyse(rt, params, examples, c.eval.batch_size)
            out[key] = {**r, "step": step if key == "trained" else 0}
            ceiling = ", ".join(
                f"{w} {100 * v:.1f}" for w, v in r["constant_reflection_ceiling"].items()
            )
            lead, half = r["lead_over_best_constant"]
            by_error = ", ".join(
                f"{cat} {n} {100 * named:.1f}% {100 * const:.1f}%"
                for cat, (n, named, const) in r["by_error"].items()
            )
            print(
                f"{name}: {r['failures']} failures; reflection names a solving operator "
                f"{100 * r['names_a_solving_op']:.1f}%, retry passes "
                f"{100 * r['retry_success_given_failure']:.1f}% (after a reflection naming a "
                f"solving operator {100 * r['retry_given_right']:.1f}%, after one that does "
                f"not {100 * r['retry_given_wrong']:.1f}%); a constant reflection could "
                f"reach: {ceiling}; lead over the best constant ({r['best_constant']}): "
                f"{100 * lead:+.1f} +- {100 * half:.1f}; a reflection from the failed operator "
                f"could reach {100 * r['failed_op_ceiling']:.1f}%, from it and whether the "
                f"target is above both numbers {100 * r['failed_op_and_size_ceiling']:.1f}%, "
                f"from it and whether it overshot {100 * r['failed_op_and_side_ceiling']:.1f}%; "
                f"reflections: {r['reflections']}; {100 * r['states_a_side']:.1f}% state "
                f"a side, {100 * r['side_right']:.1f}% of those rightly; by first-try error "
                f"(failures, names a solving operator, the best constant): {by_error}",
                flush=True,
            )
    path = flags.FLAGS.output or os.path.join(wd, OUTPUT)
    with open(path, "w") as f:
        json.dump(_json_safe(out), f, indent=1)
    print(f"wrote {path}")


def _json_safe(value):
    """NaN (an empty share) as null, so the file is strict JSON; tuples as lists."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


if __name__ == "__main__":
    app.run(main)
