"""The toy reproduction: vanilla vs Reflect-Retry-Reward, and three ablations, on a CPU.

    python experiments/toy_reproduction/run.py --root /tmp/toy_repro
    python experiments/toy_reproduction/run.py --root /tmp/toy_repro --seeds 0 1 2 \
        --ablation-seeds 0 --recipe-seeds 0

For each seed, `python -m reflax.train --config=configs/countdown_toy.py` trains the
config's design ("reflect": the paper's reward on the reflection tokens, with the config's
online greedy first attempts and attempt anchor): a supervised warm start, then
Reflect-Retry-Reward GRPO; its eval.json holds the held-out first/second-try accuracy
before (vanilla: the warm-started model) and after RL. Each ablation on a seed starts
from a copy of that seed's warm start (the same weights) and runs the same number of
steps with the same number of sampled rows per step (groups_per_step * group_size), then
is evaluated on the same held-out problems with the same greedy protocol. With --recipe-seeds, the
paper's own recipe runs beside the shipped design from the same warm start: an offline
failure set collected once from the warm-started model (`reflax.collect_failures`, 64
sampled attempts per query), no anchor; then each of the two switches alone (`RECIPES`).
Only that recipe is labelled "paper". Runs whose eval.json already exists are skipped, so
the script can be resumed. Writes results.json (with each seed's `reflections.py` results
where its reflect run holds a reflections.json), results.md and success_vs_step.png into
--root (and copies them to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from reflax.stats import mcnemar

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "countdown_toy.py")
ABLATIONS = ("reflect_retry", "first_attempt", "fixed_reflection")
# The paper's recipe and the shipped design differ by two switches: the paper trains on an
# offline failure set (first attempts sampled once from the initial model, up to 64 per
# query, failing queries kept) with no anchor; the shipped design decodes fresh first
# attempts greedily every step and anchors them. Each recipe runs from the seed's warm start.
RECIPES = {
    "paper": ["--config.grpo.anchor_beta=0"],  # offline failures, no anchor
    "offline_anchor": [],  # offline failures, the shipped anchor
    "online_greedy": [  # the shipped online greedy attempts, no anchor
        "--config.grpo.anchor_beta=0",
        "--config.rollout.mode=online",
    ],
}
OFFLINE = ["--config.rollout.mode=offline", "--config.rollout.greedy_attempts=False"]
FAILURE_SAMPLES = 64  # first attempts sampled per query for the failure set
FAILURE_QUERIES = 2000
# The toy alphabet is lower-case; a short generic reflection that fits its rows.
FIXED_REFLECTION = "try another way"


def train_command(workdir: str, seed: int, flags: list[str], config: str = CONFIG) -> list[str]:
    """`python -m reflax.train` on `config` with a workdir, a seed and more config flags."""
    return [
        sys.executable,
        "-m",
        "reflax.train",
        f"--config={config}",
        f"--workdir={workdir}",
        f"--config.seed={seed}",
        *flags,
    ]


def log_path(workdir: str) -> str:
    """A run's output, beside its workdir."""
    return os.path.join(os.path.dirname(workdir), os.path.basename(workdir) + ".log")


def train(workdir: str, seed: int, method: str, extra: list[str], vanilla: bool = True) -> float:
    """One CLI run; returns its wall time in seconds (0 when already done)."""
    if os.path.exists(os.path.join(workdir, "eval.json")):
        return 0.0
    cmd = train_command(workdir, seed, [f"--config.rollout.method={method}", *extra])
    if method == "fixed_reflection":
        cmd.append(f"--config.rollout.fixed_reflection={FIXED_REFLECTION}")
    if method != "reflect" or not vanilla:  # vanilla: the warm start, evaluated once
        cmd.append("--config.eval.before=False")
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    with open(log_path(workdir), "w") as f:
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    return time.time() - t0


def load_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def dump_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def read_metrics(workdir: str) -> list[dict]:
    rows = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "retry_success" in r or "attempt_success" in r:
                rows.append(r)
    return rows


def cell(r: dict, key: str) -> str:
    ci = r[key + "_ci95"]
    if isinstance(ci, list):  # a Wilson interval [low, high]
        return f"{100 * r[key]:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
    return f"{100 * r[key]:.1f} ± {100 * ci:.1f}"  # results written before Wilson intervals


def gain_test(r: dict, van: dict) -> str:
    """The second try's paired test against vanilla: exact McNemar on the problems' own
    outcomes where eval.json keeps them, else (older files) the sum of the two CI half-widths."""
    if "outcomes" in r and "outcomes" in van:
        t = mcnemar(van["outcomes"]["second_try"], r["outcomes"]["second_try"])
        return f"+{t['gained']} -{t['lost']} p={t['p']:.3g}"
    s = r["second_try_ci95"] + van["second_try_ci95"]
    return f"CI sum {100 * s:.1f}" + (
        " (exceeded)" if r["second_try"] - van["second_try"] > s else ""
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True, help="workdirs and logs go here")
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ablation-seeds", type=int, nargs="*", default=[0])
    ap.add_argument("--methods", nargs="*", default=list(ABLATIONS))
    ap.add_argument("--recipe-seeds", type=int, nargs="*", default=[])
    ap.add_argument("overrides", nargs="*", help="extra --config.key=value flags for every run")
    args = ap.parse_args()
    os.makedirs(args.root, exist_ok=True)
    times_path = os.path.join(args.root, "times.json")
    times = load_json(times_path) if os.path.exists(times_path) else {}

    def run(name: str, seed: int, method: str) -> None:
        wd = os.path.join(args.root, name)
        if method != "reflect" and not os.path.exists(os.path.join(wd, "warm_start")):
            shutil.copytree(
                os.path.join(args.root, f"reflect_s{seed}", "warm_start"),
                os.path.join(wd, "warm_start"),
            )
        t = train(wd, seed, method, args.overrides)
        if t:
            times[name] = t
            dump_json(times_path, times)

    for seed in args.seeds:
        run(f"reflect_s{seed}", seed, "reflect")
    for seed in args.ablation_seeds:
        for method in args.methods:
            run(f"{method}_s{seed}", seed, method)
    for seed in args.recipe_seeds:
        failures = collect(args.root, seed, args.overrides)
        for name, flags in RECIPES.items():
            offline = "--config.rollout.mode=online" not in flags
            extra = [*OFFLINE, f"--config.rollout.failures={failures}"] if offline else []
            wd = os.path.join(args.root, f"{name}_s{seed}")
            if not os.path.exists(os.path.join(wd, "warm_start")):
                shutil.copytree(
                    os.path.join(args.root, f"reflect_s{seed}", "warm_start"),
                    os.path.join(wd, "warm_start"),
                )
            t = train(wd, seed, "reflect", [*args.overrides, *extra, *flags], vanilla=False)
            if t:
                times[f"{name}_s{seed}"] = t
                dump_json(times_path, times)
    report(
        args.root,
        args.out,
        args.seeds,
        args.ablation_seeds,
        args.methods,
        times,
        args.recipe_seeds,
    )


def collect(root: str, seed: int, overrides: list[str]) -> str:
    """The paper's failure set from the seed's warm-started model (`reflax.collect_failures`)."""
    out = os.path.join(root, f"failures_s{seed}.jsonl")
    if os.path.exists(out):
        return out
    cmd = [
        sys.executable,
        "-m",
        "reflax.collect_failures",
        f"--config={CONFIG}",
        f"--config.seed={seed}",
        f"--config.rollout.attempts_per_query={FAILURE_SAMPLES}",
        f"--warm_start={os.path.join(root, f'reflect_s{seed}')}",
        f"--num_queries={FAILURE_QUERIES}",
        f"--output={out}.partial",
        *overrides,
    ]
    print("$", " ".join(cmd[1:]), flush=True)
    with open(out + ".log", "w") as f:
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    os.replace(out + ".partial", out)
    return out


def report(
    root: str,
    out: str,
    seeds: list[int],
    ablation_seeds: list[int],
    methods: list[str],
    times: dict[str, float],
    recipe_seeds: list[int] = (),
) -> None:
    """results.md (the table), results.json and success_vs_step.png from the run dirs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, lines = {}, []
    lines.append(
        "| run | seed | n | first try | second try | retry success given failure | "
        "2nd-try gain over vanilla | paired test (exact McNemar) | wall time (s) |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for seed in seeds:
        ev = load_json(os.path.join(root, f"reflect_s{seed}", "eval.json"))
        van = ev["before"]
        runs = [("vanilla (warm start)", van, None)]
        runs.append(("reflect", ev["after"], times.get(f"reflect_s{seed}")))
        others = [m for m in methods if seed in ablation_seeds]
        others += [f"recipe {r}" for r in RECIPES if seed in recipe_seeds]
        for m in others:
            name = m.removeprefix("recipe ")
            p = os.path.join(root, f"{name}_s{seed}", "eval.json")
            if os.path.exists(p):
                runs.append((m, load_json(p)["after"], times.get(f"{name}_s{seed}")))
        for name, r, t in runs:
            results.setdefault(name, {})[seed] = {k: v for k, v in r.items() if k != "samples"}
            gain = sep = ""
            if r is not van:
                gain = f"{100 * (r['second_try'] - van['second_try']):+.1f}"
                sep = gain_test(r, van)
            lines.append(
                f"| {name} | {seed} | {r['n']} | {cell(r, 'first_try')} | {cell(r, 'second_try')}"
                f" | {100 * r['retry_success_given_failure']:.1f} | {gain} | {sep} | "
                f"{'' if t is None else f'{t:.0f}'} |"
            )
    table = "\n".join(lines)
    print(table)
    reflections = {}  # seed -> reflections.py's results for its reflect run
    for seed in seeds:
        p = os.path.join(root, f"reflect_s{seed}", "reflections.json")
        if os.path.exists(p):
            reflections[seed] = load_json(p)
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump({"results": results, "times_s": times, "reflections": reflections}, f, indent=1)
    with open(os.path.join(root, "results.md"), "w") as f:
        f.write(table + "\n")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    names = [(f"reflect_s{s}", "reflect", s) for s in seeds]
    names += [(f"{m}_s{s}", m, s) for s in ablation_seeds for m in methods]
    colors = {
        "reflect": "C0",
        "reflect_retry": "C1",
        "first_attempt": "C2",
        "fixed_reflection": "C3",
    }
    for wd, method, seed in names:
        if not os.path.exists(os.path.join(root, wd, "metrics.jsonl")):
            continue
        rows = read_metrics(os.path.join(root, wd))
        for ax, key in zip(axes, ("attempt_success", "retry_success")):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts and not (key == "retry_success" and method == "first_attempt"):
                xs, ys = zip(*pts)
                ax.plot(
                    xs,
                    smooth(ys),
                    color=colors[method],
                    alpha=0.9 if seed == seeds[0] else 0.5,
                    label=f"{method} s{seed}",
                )
    axes[0].set_title("first-attempt success (train problems)")
    axes[1].set_title("retry success after a failure (sampled)")
    for ax in axes:
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("success rate (moving average of 5 steps)")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(root, "success_vs_step.png"), dpi=110)
    if out and os.path.abspath(out) != os.path.abspath(root):
        for name in ("results.json", "results.md", "success_vs_step.png"):
            shutil.copy(os.path.join(root, name), os.path.join(out, name))


def smooth(ys: list[float], k: int = 5) -> list[float]:
    return [
        sum(ys[max(0, i - k + 1) : i + 1]) / len(ys[max(0, i - k + 1) : i + 1])
        for i in range(len(ys))
    ]


if __name__ == "__main__":
    main()
