"""Verifier throughput: verifications per second per task on mixed inputs.

For each task, builds ``--n`` (default 100,000) completions with a fixed seed: about 40%
valid (the gold answer in one of several accepted formats), 35% wrong (a mutated number,
operator, target, argument or call; now and then a mutation yields another correct answer,
e.g. ``92 + 47 * (78 - 78)`` -> ``92 - 47 * (78 - 78)``) and 25% hostile (huge, deeply
nested or code-like text, NaN/Infinity, unicode digits...). Generation is not timed; the
table reports the time spent in ``task.verify`` alone, over examples drawn from a pool of
500 (as in training, where each example is verified for a whole group of samples).

Run from the repository root:  python -m experiments.bench_verify [--n 100000] [--seed 0]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import re
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reflax import tasks  # noqa: E402

POOL = 500
COUNTDOWN_HOSTILE = [
    "<answer>9**9**9</answer>",
    "<answer>**</answer>",
    "<answer>" + "(" * 100_000 + "</answer>",
    "<answer>" + "1" * 1_000_000,
    "x" * 1_000_000,
    "<answer>٣ + ٤</answer>",
    "<answer>__import__('os').system('ls')</answer>",
    "<answer>lambda: 1</answer>",
    "<answer>(1).__class__</answer>",
    "<answer>NaN</answer>",
    "<answer>Infinity</answer>",
    "<answer>1e309</answer>",
    "<answer>" + "[" * 100_000 + "]" * 100_000 + "</answer>",
    "<answer>" + "-" * 900 + "1</answer>",
]
FC_HOSTILE = [
    "[" * 100_000 + "]" * 100_000,
    "<tool_call>" + "[" * 10_000 + "]" * 10_000 + "</tool_call>",
    '{"a":' * 5_000 + "1" + "}" * 5_000,
    "x" * 1_000_000,
    '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>',
    '<tool_call>{"name": "f", "arguments": {"x": 1e309}}</tool_call>',
    '{"name": "f", "arguments": "' + "[" * 3_000 + '"}',
    "9**9**9",
    "__import__('os').system('ls')",
    "lambda: 1",
    "٣",
    "[1" + ", 1" * 10_000 + "]",
    "<tool_call>" * 50_000,
]


def countdown_inputs(n: int, seed: int) -> list[tuple[dict, str, str]]:
    rng = random.Random(seed)
    pool = tasks.get("countdown").load("train", num=POOL, seed=seed)
    inputs = []
    for _ in range(n):
        example = rng.choice(pool)
        solution = example["solution"]
        roll = rng.random()
        if roll < 0.40:
            text = rng.choice(
                [
                    f"<answer>{solution}</answer>",
                    f"Let me try.\n<answer> {solution} = {example['target']} </answer>",
                    f"<answer>1 + 1</answer> wait <answer>{solution}</answer>",
                ]
            )
            inputs.append((example, text, "valid"))
        elif roll < 0.75:
            literals = list(re.finditer(r"[0-9]+", solution))
            spot = rng.choice(literals).span()
            choice = rng.randrange(3)
            if choice == 0:
                old = int(solution[spot[0] : spot[1]])
                new = rng.choice([n for n in range(1, 101) if n != old])
                wrong = solution[: spot[0]] + str(new) + solution[spot[1] :]
            elif choice == 1:
                wrong = solution.replace("+", "-", 1) if "+" in solution else solution + " + 1"
            else:
                example = {**example, "target": example["target"] + rng.randint(1, 9)}
                wrong = solution
            inputs.append((example, f"<answer>{wrong}</answer>", "wrong"))
        else:
            inputs.append((example, rng.choice(COUNTDOWN_HOSTILE), "hostile"))
    return inputs


def _render_calls(calls: list[dict], rng: random.Random) -> str:
    calls = list(calls)
    rng.shuffle(calls)
    style = rng.randrange(3)
    if style == 0:
        return "".join(f"<tool_call>\n{json.dumps(c)}\n</tool_call>\n" for c in calls)
    if style == 1:
        return f"<tool_call>{json.dumps(calls)}</tool_call>"
    return "Calling the tools now: " + json.dumps(calls)


def function_calling_inputs(n: int, seed: int) -> list[tuple[dict, str, str]]:
    rng = random.Random(seed)
    pool = tasks.get("function_calling").load("train", num=POOL, seed=seed)
    inputs = []
    for _ in range(n):
        example = rng.choice(pool)
        gold = json.loads(example["answers"])
        roll = rng.random()
        if roll < 0.40:
            inputs.append((example, _render_calls(gold, rng), "valid"))
        elif roll < 0.75:
            call = rng.choice(gold)
            choice = rng.randrange(3)
            if choice == 0 and call["arguments"]:
                key = rng.choice(sorted(call["arguments"]))
                value = call["arguments"][key]
                call["arguments"][key] = value + "x" if isinstance(value, str) else str(value)
            elif choice == 1:
                gold.append(call)
            else:
                call["arguments"]["extra"] = 1
            inputs.append((example, _render_calls(gold, rng), "wrong"))
        else:
            inputs.append((example, rng.choice(FC_HOSTILE), "hostile"))
    return inputs


def bench(name: str, inputs: list[tuple[dict, str, str]]) -> list[tuple]:
    task = tasks.get(name)
    task.verify(*inputs[0][:2])  # warm imports and caches
    # The 100k inputs would otherwise make every cyclic-GC pass walk them mid-measurement.
    gc.collect()
    gc.freeze()
    results = []
    by_kind: dict[str, list[float]] = {}
    passed: dict[str, int] = {}
    total_start = time.perf_counter()
    cpu_start = time.process_time()
    for example, completion, kind in inputs:
        start = time.perf_counter()
        ok = task.verify(example, completion)
        by_kind.setdefault(kind, []).append(time.perf_counter() - start)
        passed[kind] = passed.get(kind, 0) + ok
    total = time.perf_counter() - total_start
    cpu = time.process_time() - cpu_start
    gc.unfreeze()
    all_passed = sum(passed.values())
    n = len(inputs)
    results.append((name, "mixed", n, total, n / total, all_passed / n))
    # Per CPU-second: the same work measured without the time other processes took.
    results.append((name, "mixed, CPU time", n, cpu, n / cpu, all_passed / n))
    for kind in ("valid", "wrong", "hostile"):
        times = by_kind.get(kind, [])
        seconds = sum(times)
        results.append(
            (name, kind, len(times), seconds, len(times) / seconds, passed[kind] / len(times))
        )
    worst = max(max(t) for t in by_kind.values())
    results.append((name, "worst single call (ms)", "", worst * 1e3, "", ""))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = []
    rows += bench("countdown", countdown_inputs(args.n, args.seed))
    rows += bench("function_calling", function_calling_inputs(args.n, args.seed))
    header = f"{'task':<18}{'inputs':<26}{'n':>8}{'seconds':>10}{'verif/s':>12}{'passing':>9}"
    print(f"command: python -m experiments.bench_verify --n {args.n} --seed {args.seed}")
    print(header)
    print("-" * len(header))
    for name, kind, n, seconds, rate, frac in rows:
        if rate == "":
            print(f"{name:<18}{kind:<26}{'':>8}{seconds:>10.3f}")
            continue
        print(f"{name:<18}{kind:<26}{n:>8}{seconds:>10.3f}{rate:>12,.0f}{frac:>9.3f}")


if __name__ == "__main__":
    main()
