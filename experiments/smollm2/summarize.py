"""A Reflect-Retry-Reward run's training dynamics and before/after table, as one JSON file.

    python experiments/smollm2/summarize.py --workdir=/tmp/smollm2/run \
        --output=experiments/smollm2/run/summary.json

Reads <workdir>/metrics.jsonl (one line per GRPO step), samples.jsonl (the reflections
and retries written every `sample_every` steps), eval.json (the before/after evaluation)
and, when there, vanilla.json (experiments/smollm2/vanilla.py) and the warm start's sampled
reflections (warm_start/reflections.jsonl). Writes: per GRPO step the
sampled retry success (the reward), the share of groups whose G rewards were all equal
(no gradient), the mean reflection length in tokens, the times; their means over the
first and second half of the run; the share of sampled reflections holding an `<answer>`
tag; the eval's first / second try, retry success given failure and paired McNemar tests
(reflax.evaluate.paired_tests); over the failures each file kept, the share of
reflections with an `<answer>` tag and of retries that repeat the failed attempt.
"""

from __future__ import annotations

import argparse
import json
import os

from reflax.evaluate import paired_tests

STEP_KEYS = (
    "retry_success",
    "zero_variance_groups",
    "reflection_tokens",
    "grad_norm",
    "kl",
    "time/rollout",
    "time/train_step",
)


def _lines(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def failure_samples(results: dict) -> dict:
    """Over a result's kept failures (`samples`): how many, the share of reflections with an
    `<answer>` tag, and the share of retries that repeat the failed attempt word for word."""
    kept = results.get("samples", [])
    n = len(kept)
    return {
        "n": n,
        "reflection_answer_tag_share": sum("<answer>" in s["reflection"] for s in kept) / n
        if n
        else None,
        "retry_repeats_attempt_share": sum(s["retry"].strip() == s["attempt"].strip() for s in kept)
        / n
        if n
        else None,
    }


def summarize(workdir: str, last_step: int | None = None) -> dict:
    # a step run again after a resume (the steps past the last checkpoint) counts once: its
    # last run, the one the weights kept
    by_step = {
        m["step"]: m for m in _lines(os.path.join(workdir, "metrics.jsonl")) if "retry_success" in m
    }
    steps = [by_step[s] for s in sorted(by_step) if last_step is None or s <= last_step]
    per_step = [{"step": m["step"], **{k: m.get(k) for k in STEP_KEYS}} for m in steps]
    half = len(per_step) // 2

    def mean(rows: list[dict], key: str) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    halves = {
        name: {k: mean(rows, k) for k in STEP_KEYS}
        for name, rows in (("first_half", per_step[:half]), ("second_half", per_step[half:]))
    }
    by_sample_step = {  # as for the metrics: a step run again counts once, its last run
        s["step"]: s for s in _lines(os.path.join(workdir, "samples.jsonl"))
    }
    samples = [
        by_sample_step[s] for s in sorted(by_sample_step) if last_step is None or s <= last_step
    ]
    reflections = [r for s in samples for r in s.get("reflection", [])]
    out = {
        "steps": len(per_step),
        "per_step": per_step,
        "halves": halves,
        "sampled_reflections": len(reflections),
        "sampled_reflections_answer_tag_share": (
            sum("<answer>" in r for r in reflections) / len(reflections) if reflections else None
        ),
    }
    eval_path = os.path.join(workdir, "eval.json")
    if os.path.exists(eval_path):
        with open(eval_path) as f:
            ev = json.load(f)
        keys = ("n", "first_try", "second_try", "retry_success_given_failure")
        out["eval"] = {name: {k: r.get(k) for k in keys} for name, r in ev.items()}
        out["paired_tests"] = paired_tests(ev)
        out["eval_failures_kept"] = {name: failure_samples(r) for name, r in ev.items()}
    refs = os.path.join(workdir, "warm_start", "reflections.jsonl")  # the distilled samples
    if os.path.exists(refs):
        rows = _lines(refs)
        lengths = [len(r["reflection"]) for r in rows]
        out["warm_start_reflections"] = {
            "n": len(rows),
            "answer_tag_share": sum("<answer>" in r["text"] for r in rows) / len(rows),
            "mean_tokens": sum(lengths) / len(rows),
            "at_longest": sum(k == max(lengths) for k in lengths),  # the cap, when reached
        }
    vanilla = os.path.join(workdir, "vanilla.json")  # experiments/smollm2/vanilla.py's file
    if os.path.exists(vanilla):
        with open(vanilla) as f:
            van = json.load(f)
        out["vanilla_failures"] = {
            k: failure_samples(r) for k, r in van.items() if isinstance(r, dict)
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--last_step", type=int, default=None, help="the evaluated checkpoint's")
    args = ap.parse_args()
    out = summarize(args.workdir, args.last_step)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(out, f, indent=2, default=str)
    print(json.dumps({k: v for k, v in out.items() if k != "per_step"}, indent=2, default=str))


if __name__ == "__main__":
    main()
