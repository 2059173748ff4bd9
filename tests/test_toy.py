"""End to end through the real CLIs: the toy config's `:smoke` variant trains, exports and
evaluates (warm start, Reflect-Retry-Reward steps, checkpoints, before/after table)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
    for name in ("before", "after"):
        r = results[name]
        assert 0.0 <= r["first_try"] <= r["second_try"] <= 1.0
        # Kept samples are the first failures, each pointing at its problem.
        idx = [k["index"] for k in r["samples"]]
        assert len(idx) == min(5, round(r["n"] * (1 - r["first_try"])))
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
