"""First-try and second-try accuracy on the held-out split: the paper's table.

    python -m reflax.evaluate --config=configs/qwen1p5b.py --checkpoint=WORKDIR
    python -m reflax.evaluate --config=configs/qwen1p5b.py --hf=WORKDIR/hf --baseline
    python -m reflax.evaluate --config=configs/qwen1p5b.py --checkpoint=WORKDIR --suite=forgetting
    python -m reflax.evaluate --results=RUN1/eval.json,RUN2/eval.json,RUN3/eval.json

First try: the model answers the task (greedy by default). Second try: on a
failure it writes one reflection and answers again; the second-try accuracy
counts first-try successes plus successful retries, as in the paper. With
`--baseline` the config's initial model (vanilla) is evaluated too and the two
are printed side by side. `--suite=forgetting` runs general benchmarks through
lm_eval instead (`reflax.forgetting`). `--results` evaluates nothing: it reads the
eval.json files that runs of one recipe with different seeds wrote (`runs_table`) and
prints their table, each run's paired tests against the shared vanilla model and the
test across the runs.

Error analysis: every answer is sorted by `Task.category` into "correct" or one of the
task's failure categories (Countdown: malformed, wrong_numbers, missed_target; function
calling: malformed, wrong_call_count, wrong_tool, wrong_arguments). `errors.first_try`
counts the first answers; `errors.second_try` counts each problem's final outcome (a
first-try success, else its retry's category), so its "correct" matches `second_try`.
Both hold counts and fractions of n, and the table prints them per model and try.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import jax
from absl import flags
from ml_collections import config_flags

from reflax import cli, distributed, storage
from reflax.episodes import (
    Failure,
    RolloutSettings,
    completion_text,
    first_attempts,
    reflect_and_retry,
)
from reflax.results import save_json
from reflax.runtime import Runtime, build, checkpoint_dir, load_examples, restore_params
from reflax.stats import across_seeds, mcnemar, wilson_interval
from reflax.tasks.base import CORRECT

TRIES = ("first_try", "second_try")
NUM_SAMPLES_KEPT = 10  # failures an evaluation keeps with their texts (`evaluate`'s samples)


def error_breakdown(
    categories: Sequence[str], counts: dict[str, Counter], n: int
) -> dict[str, dict[str, dict[str, float]]]:
    """Per try: counts and fractions of n of "correct" and each failure category, in order."""
    names = [CORRECT, *categories]
    out = {}
    for try_, counter in counts.items():
        unknown = set(counter) - set(names)
        if unknown:
            raise ValueError(f"categories {sorted(unknown)} are not among {names}")
        c = {name: counter[name] for name in names}
        out[try_] = {
            "counts": c,
            "fractions": {k: v / n if n else float("nan") for k, v in c.items()},
        }
    return out


def accuracy_title(c: Any, n: int) -> str:
    """The accuracy table's title: task, split and number of problems."""
    return f"{c.task.name}: held-out accuracy (%), {c.eval.split} split, n={n}"


def evaluate(
    rt: Runtime,
    params: Any,
    examples: Sequence[dict],
    *,
    batch_size: int = 64,
    greedy: bool = True,
    seed: int = 0,
    num_samples_kept: int = NUM_SAMPLES_KEPT,
) -> dict[str, Any]:
    """Accuracy before and after one reflect-and-retry, with 95% Wilson intervals, each
    problem's outcome and sample reflections.

    `outcomes` holds, per try, 1/0 for each problem of `examples` in order (passed or not;
    the second try counts a first-try success as passed), for paired tests between models
    evaluated on the same problems. `samples` holds the first `num_samples_kept` failures:
    the failed attempt, reflection, retry, whether the retry passed, and the failed
    problem's index in `examples`.
    `errors` is the error analysis of the module docstring.
    """
    s = RolloutSettings.from_config(rt.config, rt.tok)
    if s.method == "first_attempt":  # the second try always uses the model's own reflection
        s = dataclasses.replace(s, method="reflect")
    rng = jax.random.key(seed)
    passed_first: list[int] = []
    passed_second: list[int] = []
    kept: list[dict[str, str]] = []
    tally = {t: Counter() for t in TRIES}
    t0 = time.time()
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start : start + batch_size])
        key = jax.random.fold_in(rng, start)
        prompts, attempts, _, passed = first_attempts(
            rt.sampler, params, rt.tok, rt.task, chunk, key, s, greedy=greedy
        )
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
        retried = {i: int(g.rewards[0]) for i, g in zip(failed, groups)}
        passed_first += [int(ok) for ok in passed]
        passed_second += [int(ok) or retried.get(i, 0) for i, ok in enumerate(passed)]
        verdicts = [
            rt.task.category(ex, completion_text(rt.tok, a)) for ex, a in zip(chunk, attempts)
        ]
        tally["first_try"].update(verdicts)
        for i, g in zip(failed, groups):  # a failure's final outcome is its retry's
            verdicts[i] = rt.task.category(chunk[i], g.texts["retry"][0])
        tally["second_try"].update(verdicts)
        for i, g in zip(failed, groups[: max(0, num_samples_kept - len(kept))]):
            kept.append(
                {
                    "index": start + i,  # into `examples`
                    "attempt": completion_text(rt.tok, attempts[i]),
                    "reflection": g.texts["reflection"][0],
                    "retry": g.texts["retry"][0],
                    "passed": bool(g.rewards[0]),
                }
            )
    n, first, total = len(examples), sum(passed_first), sum(passed_second)
    second = total - first  # retries that passed
    return {
        "n": n,
        "first_try": first / n if n else float("nan"),
        "second_try": total / n if n else float("nan"),
        "first_try_ci95": list(wilson_interval(first, n)),
        "second_try_ci95": list(wilson_interval(total, n)),
        "retry_success_given_failure": second / (n - first) if n > first else float("nan"),
        "errors": error_breakdown(rt.task.categories, tally, n),
        "seconds": time.time() - t0,
        "samples": kept,
        "outcomes": {"first_try": passed_first, "second_try": passed_second},
    }


def table(results: dict[str, dict[str, Any]], title: str = "") -> str:
    """The paper's table: rows are models, columns first / second try (%, [95% Wilson
    interval]); below it the paired tests of `paired_tests` when the results carry
    per-problem outcomes, then the error table when they have an error analysis."""
    lines = [title] if title else []
    lines.append(f"{'model':<24} {'n':>6} {'first try':>20} {'second try':>20}")
    for name, r in results.items():
        cells = "".join(f" {_percent_cell(r, t):>20}" for t in TRIES)
        lines.append(f"{name:<24} {r['n']:>6}{cells}")
    tests = paired_tests_text(paired_tests(results))
    errors = error_table(results)
    return "\n".join(lines + ([tests] if tests else []) + ([""] + [errors] if errors else []))


def runs_table(runs: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The results of several runs of one recipe (run name -> its eval.json: "before" and
    "after" on the same problems) as one table's rows: "vanilla" (the first run's "before")
    and each run's "after"; `paired_tests` of them gives each run's McNemar tests and the
    test across runs. The runs must share their vanilla model (one warm start, greedy
    evaluation): a run whose "before" outcomes differ from the first's is named in the
    returned notes, since its change is then measured against a model it did not start from.
    """
    if not runs:
        raise ValueError("no runs given")
    rows: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    base_name = next(iter(runs))
    for name, r in runs.items():
        missing = {"before", "after"} - set(r if isinstance(r, dict) else ())
        if missing:
            raise ValueError(f"run {name!r} has no {' or '.join(sorted(missing))} results")
        for part in ("before", "after"):
            if not isinstance(r[part], dict) or not {"n", *TRIES} <= set(r[part]):
                raise ValueError(f"run {name!r}: its {part} results are not an evaluation's")
        if not rows:
            rows["vanilla"] = r["before"]
        elif r["before"].get("outcomes") != rows["vanilla"].get("outcomes"):
            notes.append(f"run {name!r}: its vanilla outcomes differ from run {base_name!r}'s")
        rows[f"{name} after"] = r["after"]
    return rows, notes


def _percent_cell(r: dict[str, Any], try_: str) -> str:
    low, high = r[f"{try_}_ci95"]
    return f"{100 * r[try_]:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def paired_tests(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each later model against the first (the baseline) on the same problems: per try, the
    exact McNemar test of the per-problem outcomes (`reflax.stats.mcnemar`); with two or more
    later models (runs of one recipe with different seeds), the test across them of their
    accuracy changes (`reflax.stats.across_seeds`). Empty when fewer than two results carry
    outcomes of the same problems."""
    names = [k for k, r in results.items() if r.get("outcomes")]
    if len(names) < 2:
        return {}
    base, others = names[0], names[1:]
    n = results[base]["n"]
    others = [k for k in others if results[k]["n"] == n]  # other problem sets: not paired
    if not others:
        return {}
    outcomes = {k: results[k]["outcomes"] for k in [base, *others]}
    out: dict[str, Any] = {
        "baseline": base,
        "mcnemar": {
            k: {t: mcnemar(outcomes[base][t], outcomes[k][t]) for t in TRIES} for k in others
        },
    }
    if len(others) >= 2:
        out["across_runs"] = {
            t: across_seeds([results[k][t] - results[base][t] for k in others]) for t in TRIES
        }
    return out


def paired_tests_text(tests: dict[str, Any]) -> str:
    """`paired_tests` as lines under the accuracy table."""
    if not tests:
        return ""
    base = tests["baseline"]
    lines = [f"paired change vs {base} (exact McNemar: problems gained / lost, p):"]
    for name, by_try in tests["mcnemar"].items():
        cells = "".join(
            f"   {t.replace('_', ' ')}: +{m['gained']} -{m['lost']} p={m['p']:.3g}"
            for t, m in by_try.items()
        )
        lines.append(f"  {name:<22}{cells}")
    for t, a in tests.get("across_runs", {}).items():
        lines.append(
            f"across {a['seeds']} runs vs {base}, {t.replace('_', ' ')}: mean "
            f"{100 * a['mean']:+.1f} pts, paired t={a['t']:.2f} (df {a['df']}) p={a['p_t']:.3g}, "
            f"sign test {a['positive']}+ {a['negative']}- p={a['p_sign']:.3g}"
        )
    return "\n".join(lines)


def error_table(results: dict[str, dict[str, Any]]) -> str:
    """Rows (model, try), columns "correct" and each failure category (% of n); empty
    when no result has an error analysis."""
    rows = [(name, r["errors"]) for name, r in results.items() if r.get("errors")]
    if not rows:
        return ""
    names = list(rows[0][1]["first_try"]["fractions"])
    width = max(12, *(len(c) for c in names))
    head = f"{'answers by category (%)':<36}" + "".join(f" {c:>{width}}" for c in names)
    lines = [head]
    for name, errors in rows:
        for try_ in TRIES:
            fractions = errors[try_]["fractions"]
            cells = "".join(f" {100 * fractions.get(c, float('nan')):>{width}.1f}" for c in names)
            label = f"{name}, {try_.replace('_', ' ')}"
            lines.append(f"{label:<36}{cells}")
    return "\n".join(lines)


def _define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "reflax config file", lock_config=True)
    flags.DEFINE_string("checkpoint", None, "workdir of a reflax run: its latest checkpoint")
    flags.DEFINE_string("hf", None, "a Hugging Face checkpoint (directory or Hub id)")
    flags.DEFINE_bool("baseline", False, "also evaluate the config's initial model")
    flags.DEFINE_integer("num_examples", None, "held-out examples (default: eval.num_examples)")
    flags.DEFINE_string("output", None, "write the results as JSON here")
    flags.DEFINE_list("results", None, "eval.json files of runs of one recipe: their table")
    flags.DEFINE_enum(
        "suite",
        "task",
        ["task", "forgetting"],
        "task: the config's task (first/second try); "
        "forgetting: general benchmarks through lm_eval, vanilla vs trained (reflax.forgetting)",
    )
    flags.DEFINE_list("forgetting_tasks", None, "lm_eval tasks (default: the paper's Table 3)")
    flags.DEFINE_float("forgetting_limit", None, "examples per lm_eval task (<1: a fraction)")
    flags.DEFINE_string("forgetting_include", None, "a directory of extra lm_eval task YAMLs")
    flags.DEFINE_integer("forgetting_batch_size", 16, "rows per forward / sampler call")
    flags.DEFINE_bool("forgetting_chat_template", False, "prompts through the chat template")


def _results_main(paths: Sequence[str], output: str | None) -> None:
    """`--results`: the table of finished runs, read from their eval.json files (a run is
    named by its file's directory)."""
    runs = {}
    for path in paths:
        name = os.path.basename(os.path.dirname(os.path.normpath(path))) or path
        if name in runs:
            name = path
        try:
            with storage.open(path) as f:
                runs[name] = json.load(f)
        except (OSError, ValueError) as e:
            raise cli.UsageError(f"--results: cannot read {path}: {cli.one_line(e)}") from e
    try:
        rows, notes = runs_table(runs)
    except ValueError as e:  # a file that is not a run's eval.json
        raise cli.UsageError(f"--results: {e}") from e
    print(table(rows, f"{len(runs)} runs, their eval.json files"))
    for note in notes:
        print(note)
    if output:
        save_json(output, {"runs": list(paths), "results": rows, "tests": paired_tests(rows)})


def main() -> None:
    FLAGS = flags.FLAGS
    if FLAGS.results:
        _results_main(FLAGS.results, FLAGS.output)
        return
    if FLAGS.config is None:
        raise cli.UsageError("--config is required (or --results, to read finished runs)")
    forgetting = None
    if FLAGS.suite == "forgetting":  # lm_eval is an extra: asked for only here
        forgetting = cli.require_extra("reflax.forgetting", "eval", "--suite=forgetting")
    inputs = cli.Inputs(
        failures=False,
        models=[FLAGS.hf] if FLAGS.hf else [],
        checkpoints=[checkpoint_dir(FLAGS.checkpoint)] if FLAGS.checkpoint else [],
        outputs=[FLAGS.output] if FLAGS.output else [],
    )
    rt, params = cli.start(FLAGS.config, inputs)
    if forgetting is not None:
        forgetting.run(
            rt,
            params,
            checkpoint=FLAGS.checkpoint,
            hf=FLAGS.hf,
            tasks=FLAGS.forgetting_tasks,
            limit=FLAGS.forgetting_limit,
            include_path=FLAGS.forgetting_include,
            batch_size=FLAGS.forgetting_batch_size,
            chat_template=FLAGS.forgetting_chat_template,
            output=FLAGS.output,
        )
        return
    c = rt.config
    n = FLAGS.num_examples if FLAGS.num_examples is not None else c.eval.num_examples
    examples = load_examples(rt, c.eval.split, n)
    kw = dict(batch_size=c.eval.batch_size, greedy=c.eval.greedy, seed=c.seed)
    results: dict[str, Any] = {}
    if FLAGS.baseline or not (FLAGS.checkpoint or FLAGS.hf):
        results["vanilla"] = evaluate(rt, params, examples, **kw)
    if FLAGS.checkpoint:
        trained, step = restore_params(params, FLAGS.checkpoint)
        results[f"trained (step {step})"] = evaluate(rt, trained, examples, **kw)
    if FLAGS.hf:
        other, other_params = build(c, model_path=FLAGS.hf)
        results[os.path.basename(os.path.normpath(FLAGS.hf)) or FLAGS.hf] = evaluate(
            other, other_params, examples, **kw
        )
    if distributed.is_primary():
        print(table(results, accuracy_title(c, len(examples))))
    if FLAGS.output:
        save_json(FLAGS.output, results)


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
