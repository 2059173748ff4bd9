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
the script can be resumed. After each seed's reflect run, `reflections.py` analyses it
(vanilla and trained reflections, their lead over the best constant reflection; skipped
where its reflections.json exists, or with --no-reflections). Writes results.json (every
run's figures and per-problem outcomes, each seed's reflections.json, the paired tests),
results.md (the tables) and success_vs_step.png into --root (and copies them to --out).

The paired tests compare each seed's trained reflect model with that seed's vanilla model
(its warm start) on the same problems, per try: the exact McNemar test of the per-problem
outcomes (`reflax.stats.mcnemar`), the Wilson intervals eval.json keeps, and across the
seeds the test of the per-seed accuracy changes (`reflax.stats.across_seeds`: the seed is
the unit of replication).

A pre-registered rerun of the shipped design on fresh seeds and a fresh split salt (the
salt of the train / validation / test split, `task.kwargs.split_seed`; 0 made the splits
that chose the design):

    python experiments/toy_reproduction/run.py --root /tmp/toy_fresh \
        --out experiments/toy_reproduction/fresh_seeds --seeds 10 11 12 --ablation-seeds \
        -- --config.task.kwargs.split_seed=1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from reflax.stats import across_seeds, mcnemar

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
    ap.add_argument(
        "--no-reflections",
        dest="reflections",
        action="store_false",
        help="do not run reflections.py on each seed's reflect run",
    )
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
        if args.reflections:
            analyse_reflections(os.path.join(args.root, f"reflect_s{seed}"), seed, args.overrides)
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


def analyse_reflections(workdir: str, seed: int, overrides: list[str]) -> None:
    """`reflections.py` on a finished reflect run (its reflections.json), unless done."""
    if os.path.exists(os.path.join(workdir, "reflections.json")):
        return
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reflections.py")
    cmd = [sys.executable, script, f"--workdir={workdir}", f"--config.seed={seed}", *overrides]
    print("$", " ".join(cmd[1:]), flush=True)
    with open(log_path(workdir) + ".reflections", "w") as f:
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)


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
    """results.md (the tables), results.json and success_vs_step.png from the run dirs."""
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
    reflections = {}  # seed -> reflections.py's results for its reflect run
    for seed in seeds:
        p = os.path.join(root, f"reflect_s{seed}", "reflections.json")
        if os.path.exists(p):
            reflections[seed] = load_json(p)
    tests = paired_tests(
        {s: (results["vanilla (warm start)"][s], results["reflect"][s]) for s in seeds}
    )
    lines += ["", *tests_table(tests), "", *leads_table(reflections)]
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump(
            {
                "results": results,
                "times_s": times,
                "paired_tests": tests,
                "reflections": reflections,
            },
            f,
            indent=1,
        )
    with open(os.path.join(root, "results.md"), "w") as f:
        f.write(table + "\n")
    written = ["results.json", "results.md"]
    if plot(root, seeds, ablation_seeds, methods):
        written.append("success_vs_step.png")
    if out and os.path.abspath(out) != os.path.abspath(root):
        os.makedirs(out, exist_ok=True)
        for name in written:
            shutil.copy(os.path.join(root, name), os.path.join(out, name))


def plot(root: str, seeds: list[int], ablation_seeds: list[int], methods: list[str]) -> bool:
    """success_vs_step.png: each run's success per RL step; False (and one line saying
    why) where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print("success_vs_step.png not written: no matplotlib (pip install -e '.[experiments]')")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    names = [(f"reflect_s{s}", "reflect", s) for s in seeds]
    names += [(f"{m}_s{s}", m, s) for s in ablation_seeds for m in methods]
    colors = {
        "reflect": "C0",
        "reflect_retry": "C1",
        "first_attempt": "C2",
        "fixed_reflection": "C3",
    }
    order = list(dict.fromkeys([*seeds, *ablation_seeds]))
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
                    # one line style per seed; the config's own runs drawn over the ablations
                    linestyle=STYLES[order.index(seed) % len(STYLES)],
                    zorder=3 if method == "reflect" else 2,
                    alpha=0.9 if seed == seeds[0] else 0.6,
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
    return True


TRIES = ("first_try", "second_try")
STYLES = ("-", "--", ":", "-.")


def paired_tests(pairs: dict[int, tuple[dict, dict]]) -> dict:
    """Per seed, the trained model against the seed's vanilla model (`pairs`: seed ->
    (vanilla, trained) eval results) on each try: the exact McNemar test of the per-problem
    outcomes; across the seeds (two or more), the test of the accuracy changes. Seeds whose
    results keep no outcomes (older eval.json files) are left out."""
    per_seed = {}
    for seed, (van, tr) in pairs.items():
        if "outcomes" not in van or "outcomes" not in tr:
            continue
        per_seed[seed] = {
            t: {
                **mcnemar(van["outcomes"][t], tr["outcomes"][t]),
                "vanilla": van[t],
                "trained": tr[t],
                "vanilla_ci95": van[f"{t}_ci95"],
                "trained_ci95": tr[f"{t}_ci95"],
            }
            for t in TRIES
        }
    out: dict = {"per_seed": per_seed}
    if len(per_seed) >= 2:
        out["across_seeds"] = {
            t: across_seeds([m[t]["trained"] - m[t]["vanilla"] for m in per_seed.values()])
            for t in TRIES
        }
    return out


def _pct_ci(value: float, ci: list[float]) -> str:
    return f"{100 * value:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def tests_table(tests: dict) -> list[str]:
    """The paired tests as a markdown table and the across-seed lines (empty without any)."""
    if not tests["per_seed"]:
        return []
    lines = [
        "| seed | n | first try: vanilla | trained | change | McNemar (+gained -lost, p) "
        "| second try: vanilla | trained | change | McNemar (+gained -lost, p) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for seed, by_try in tests["per_seed"].items():
        cells = []
        for t in TRIES:
            m = by_try[t]
            cells += [
                _pct_ci(m["vanilla"], m["vanilla_ci95"]),
                _pct_ci(m["trained"], m["trained_ci95"]),
                f"{100 * (m['trained'] - m['vanilla']):+.1f}",
                f"+{m['gained']} -{m['lost']}, p={m['p']:.3g}",
            ]
        lines.append(f"| {seed} | {by_try['first_try']['n']} | " + " | ".join(cells) + " |")
    if "across_seeds" in tests:
        lines.append("")
    for t, a in tests.get("across_seeds", {}).items():
        lines.append(
            f"across {a['seeds']} seeds, {t.replace('_', ' ')} change: mean "
            f"{100 * a['mean']:+.2f} points, paired t={a['t']:.2f} (df {a['df']}) "
            f"p={a['p_t']:.3g}; sign test {a['positive']}+ {a['negative']}- p={a['p_sign']:.3g}  "
        )
    return lines


def leads_table(reflections: dict) -> list[str]:
    """reflections.py's figures per seed as a markdown table (empty without any): the share
    of first-try failures whose reflection names a solving operator / whose retry passes /
    whose stated side is right, vanilla and trained; the lead over the best constant
    reflection with its paired 95% CI half-width; the ceilings; the commonest reflections."""
    if not reflections:
        return []
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}"
    lines = [
        "| seed | vanilla: names / retry / side | trained: names / retry / side | "
        "lead, vanilla | lead, trained | trained lead beyond its CI | best constant "
        "(trained failures) | ceilings: failed op / + overshot / + target above both | "
        "trained reflections |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for seed, r in reflections.items():
        van, tr = r["vanilla"], r["trained"]
        nst = lambda x: " / ".join(
            pct(x[k]) for k in ("names_a_solving_op", "retry_success_given_failure", "side_right")
        )
        lead = lambda x: "{:+.1f} ± {:.1f}".format(*(100 * v for v in x["lead_over_best_constant"]))
        mean, half = tr["lead_over_best_constant"]
        best = tr["best_constant"]
        ceilings = " / ".join(
            pct(tr[k])
            for k in (
                "failed_op_ceiling",
                "failed_op_and_side_ceiling",
                "failed_op_and_size_ceiling",
            )
        )
        common = ", ".join(f"`{text}` {n}" for text, n in tr["reflections"][:3])
        lines.append(
            f"| {seed} | {nst(van)} | {nst(tr)} | {lead(van)} | {lead(tr)} | "
            f"{'yes' if mean - half > 0 else 'no'} | {best} "
            f"{pct(tr['constant_reflection_ceiling'][best])} | {ceilings} | "
            f"{common} of {tr['failures']} |"
        )
    return lines


def smooth(ys: list[float], k: int = 5) -> list[float]:
    return [
        sum(ys[max(0, i - k + 1) : i + 1]) / len(ys[max(0, i - k + 1) : i + 1])
        for i in range(len(ys))
    ]


if __name__ == "__main__":
    main()
