"""RL variants of the toy config side by side, from one warm start per seed.

    python experiments/toy_reproduction/sweep.py --root /tmp/sweep \
        --spec experiments/toy_reproduction/sweeps/gpu_design4_rl.json --budget 450

A spec is JSON: `seeds`, `base` (config overrides for every run, warm start included)
and `variants` (name -> overrides for the RL phase). Per seed, one `reflax.train` run
does the warm start and evaluates the vanilla model (`ws_s<seed>`, one RL step); then
every variant runs in parallel from a copy of that warm start (`<variant>_s<seed>`),
so the variants differ only in what they override. Meant for a machine with many cores
or an accelerator (the variants share it); on 2 CPU cores use run.py. Runs still going
after `--budget` seconds are stopped. Prints, per run, held-out first/second try and
retry success given failure before (ws_*) or after RL, and the sampled training curve.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time

from run import CONFIG, ROOT, cell, load_json, log_path, read_metrics, train_command


def launch(config: str, root: str, name: str, seed: int, overrides: dict) -> subprocess.Popen:
    workdir = os.path.join(root, name)
    cmd = train_command(workdir, seed, [f"--config.{k}={v}" for k, v in overrides.items()], config)
    with open(log_path(workdir), "w") as log:  # the child keeps its own handle
        return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def wait_all(procs: dict[str, subprocess.Popen], deadline: float) -> None:
    for name, p in procs.items():
        try:
            p.wait(timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            p.kill()
            print("stopped at the budget:", name, flush=True)


def summary(root: str, name: str) -> str:
    wd = os.path.join(root, name)
    out = [name]
    if os.path.exists(os.path.join(wd, "eval.json")):
        for when, r in load_json(os.path.join(wd, "eval.json")).items():
            out.append(
                f"{when} first try {cell(r, 'first_try')}, second try {cell(r, 'second_try')}, "
                f"retry|fail {100 * r['retry_success_given_failure']:.1f}"
            )
    if os.path.exists(os.path.join(wd, "metrics.jsonl")):
        rows = [r for r in read_metrics(wd) if "retry_success" in r]
        out += [
            f"  step {r['step']}: attempt {r['attempt_success']:.2f} retry "
            f"{r['retry_success']:.2f} entropy {r['entropy']:.3f} "
            f"zero-variance {r['zero_variance_groups']:.2f}"
            for r in rows[::20] + rows[-1:]
        ]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True)
    ap.add_argument("--spec", required=True)
    ap.add_argument("--config", default=CONFIG, help="config file (`:smoke` for a dry run)")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for the whole sweep")
    args = ap.parse_args()
    spec = load_json(args.spec)
    os.makedirs(args.root, exist_ok=True)
    deadline = time.time() + args.budget
    warm = {"total_steps": 1, "eval.before": True, "eval.after": False, "export_hf": False}
    wait_all(
        {
            f"ws_s{s}": launch(args.config, args.root, f"ws_s{s}", s, {**spec["base"], **warm})
            for s in spec["seeds"]
        },
        deadline,
    )
    rl = {"eval.before": False, "export_hf": False, "checkpoint_every": 10**6}
    procs = {}
    for s in spec["seeds"]:
        src = os.path.join(args.root, f"ws_s{s}", "warm_start")
        if not os.path.isdir(src):
            print(f"seed {s}: no warm start, skipped", flush=True)
            continue
        for v, over in spec["variants"].items():
            name = f"{v}_s{s}"
            shutil.copytree(src, os.path.join(args.root, name, "warm_start"), dirs_exist_ok=True)
            procs[name] = launch(args.config, args.root, name, s, {**spec["base"], **rl, **over})
    wait_all(procs, deadline)
    for s in spec["seeds"]:
        print(summary(args.root, f"ws_s{s}"))
        for v in spec["variants"]:
            print(summary(args.root, f"{v}_s{s}"))


if __name__ == "__main__":
    main()
