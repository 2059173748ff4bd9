"""End to end through the real CLIs: the toy config's `:smoke` variant trains, exports and
evaluates (warm start, Reflect-Retry-Reward steps, checkpoints, before/after table with its
error categories, the forgetting suite on a local lm_eval task)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from reflax.evaluate import NUM_SAMPLES_KEPT

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "countdown_toy.py")


def _run(args: list[str]) -> str:
    # One CPU device: the subprocess must not inherit the tests' fake 8-device mesh.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def test_toy_smoke_train_then_evaluate(tmp_path: Path) -> None:
    workdir = tmp_path / "run"
    log = _run(["reflax.train", f"--config={CONFIG}:smoke", f"--workdir={workdir}"])

    assert "first try" in log and "second try" in log  # the before/after table
    assert "before" in log and "after" in log
    assert sorted(os.listdir(workdir / "checkpoints"))
    assert (workdir / "warm_start").is_dir()
    assert (workdir / "hf" / "config.json").exists()
    assert any(p.suffix == ".safetensors" for p in (workdir / "hf").iterdir())
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any("retry_success" in m for m in metrics)
    assert any("attempt_success" in m for m in metrics)
    assert any("anchor_kl" in m for m in metrics)  # the config anchors the first attempt
    assert (workdir / "samples.jsonl").read_text().strip()
    results = json.loads((workdir / "eval.json").read_text())
    assert "answers by category (%)" in log and "missed_target" in log  # the error table
    for name in ("before", "after"):
        r = results[name]
        assert 0.0 <= r["first_try"] <= r["second_try"] <= 1.0
        for try_ in ("first_try", "second_try"):
            counts = r["errors"][try_]["counts"]
            assert sum(counts.values()) == r["n"]
            assert counts["correct"] == round(r[try_] * r["n"])
        # Kept samples are the first failures, each pointing at its problem.
        idx = [k["index"] for k in r["samples"]]
        assert len(idx) == min(NUM_SAMPLES_KEPT, round(r["n"] * (1 - r["first_try"])))
        assert idx == sorted(set(idx)) and all(0 <= i < r["n"] for i in idx)

    log = _run(
        [
            "reflax.evaluate",
            f"--config={CONFIG}:smoke",
            f"--checkpoint={workdir}",
            "--baseline",
        ]
    )
    assert "vanilla" in log and "trained (step" in log and "second try" in log

    # the reproduction's reflection analysis replays the same evaluation
    script = ROOT / "experiments" / "toy_reproduction" / "reflections.py"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, str(script), f"--config={CONFIG}:smoke", f"--workdir={workdir}"],
        cwd=ROOT,
        env={**env, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [x for x in out.stdout.splitlines() if x.startswith(("vanilla:", "trained"))]
    assert len(lines) == 2 and all("by first-try error" in x for x in lines)
    for line, name in zip(lines, ("before", "after"), strict=True):
        r = results[name]
        assert line.split(": ")[1].startswith(f"{round(r['n'] * (1 - r['first_try']))} failures")

    # the forgetting suite, on a local lm_eval task: vanilla and trained side by side
    rows = [
        {"q": f"{a}+{b}=", "choices": [str(a + b), str(a * b)], "label": 0}
        for a, b in ((2, 3), (3, 4))
    ]
    (tmp_path / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "sums.yaml").write_text(
        "task: sums\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(tmp_path / 'sums.jsonl'))}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n"
    )
    log = _run(
        [
            "reflax.evaluate",
            f"--config={CONFIG}:smoke",
            f"--checkpoint={workdir}",
            "--suite=forgetting",
            "--forgetting_tasks=sums",
            f"--forgetting_include={tmp_path}",
        ]
    )
    assert "< 1 point" in log and "vanilla" in log and "trained (step" in log
    runs = json.loads((workdir / "forgetting.json").read_text())["runs"]
    assert [k.split(" ")[0] for k in runs] == ["vanilla", "trained"]
    assert all(0.0 <= r["results"]["sums"]["acc,none"] <= 1.0 for r in runs.values())


def test_reproduction_paired_tests_and_tables() -> None:
    """run.py's paired tests (trained vs the seed's vanilla model, per try) and its tables."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "toy_run", ROOT / "experiments" / "toy_reproduction" / "run.py"
    )
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)

    def result(first: list[int], second: list[int]) -> dict:
        n = len(first)
        return {
            "n": n,
            "first_try": sum(first) / n,
            "second_try": sum(second) / n,
            "first_try_ci95": [0.0, 1.0],
            "second_try_ci95": [0.0, 1.0],
            "outcomes": {"first_try": first, "second_try": second},
        }

    van = result([1, 0, 0, 0, 1, 0], [1, 1, 0, 0, 1, 0])
    # seed 1: the second try gains problems 2, 3, 5 and loses 1; seed 2 changes nothing
    trained = result([1, 0, 0, 0, 1, 0], [1, 0, 1, 1, 1, 1])
    tests = run.paired_tests({1: (van, trained), 2: (van, van), 3: ({"n": 6}, trained)})
    assert list(tests["per_seed"]) == [1, 2]  # seed 3 keeps no outcomes: left out
    second = tests["per_seed"][1]["second_try"]
    assert (second["gained"], second["lost"], second["p"]) == (3, 1, 0.625)
    assert tests["per_seed"][1]["first_try"]["gained"] == 0
    across = tests["across_seeds"]["second_try"]
    assert abs(across["mean"] - (2 / 6) / 2) < 1e-12 and across["positive"] == 1
    table = "\n".join(run.tests_table(tests))
    assert "+3 -1, p=0.625" in table and "across 2 seeds, second try change" in table

    row = {
        "names_a_solving_op": 0.5,
        "retry_success_given_failure": 0.4,
        "side_right": None,
        "best_constant": "over",
        "constant_reflection_ceiling": {"over": 0.3},
        "failed_op_ceiling": 0.6,
        "failed_op_and_side_ceiling": 0.7,
        "failed_op_and_size_ceiling": 0.8,
        "reflections": [["high, use over", 10], ["low, use plus", 5]],
        "failures": 15,
    }
    leads = {
        1: {
            "vanilla": {**row, "lead_over_best_constant": [0.0, 0.1]},
            "trained": {**row, "lead_over_best_constant": [0.2, 0.05]},
        },
        2: {
            "vanilla": {**row, "lead_over_best_constant": [0.0, 0.1]},
            "trained": {**row, "lead_over_best_constant": [0.02, 0.05]},
        },
    }
    lines = run.leads_table(leads)
    assert "| +20.0 ± 5.0 | yes |" in lines[2] and "| +2.0 ± 5.0 | no |" in lines[3]
    assert "`high, use over` 10, `low, use plus` 5 of 15" in lines[2]
