"""The benchmark harness: the load guard, and `bench_accelerator.py --tiny` end to end (every
implementation in its own process, the final line's format, first-step agreement)."""

import math
import os
import re
import subprocess
import sys

import pytest

from experiments import bench_common as bc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def env():
    e = dict(os.environ)
    e.pop("XLA_FLAGS", None)  # the benchmarks run on the real (single) CPU device
    e["JAX_PLATFORMS"] = "cpu"
    return e


def test_load_guard_refuses_and_flags(capsys):
    with pytest.raises(SystemExit) as e:
        bc.check_load(max_load=-1.0, allow_load=False)
    assert e.value.code == 2
    assert "--allow_load" in capsys.readouterr().err
    assert bc.check_load(max_load=-1.0, allow_load=True) is True
    assert bc.check_load(max_load=math.inf, allow_load=False) is False


def test_script_refuses_under_load(env):
    proc = subprocess.run(
        [sys.executable, "experiments/bench_train_step.py", "--max_load=-1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "refusing to benchmark" in proc.stderr


def test_rounds_rotate_and_ratios_stay_within_rounds():
    impls = [bc.Impl(n, n, "jax") for n in ("a", "b", "c")]
    fake = lambda t: {"times": [t], "probe_before": 1.0, "probe_after": 2.0}
    rounds = [{"a": fake(1.0), "b": fake(3.0)}, {"a": fake(10.0), "b": fake(20.0)}]
    s = bc.ratio(rounds, "b", "a")
    assert (s.median, s.lo, s.hi) == (2.5, 2.0, 3.0)  # per-round ratios 3 and 2
    assert bc.round_peak(rounds[0]) == 2.0
    assert [i.name for i in bc.selected(impls, "c,a")] == ["a", "c"]


def test_bench_accelerator_tiny(env):
    proc = subprocess.run(
        [
            sys.executable,
            "experiments/bench_accelerator.py",
            "--tiny",
            "--allow_load",
            "--steps=1",
            "--reps=1",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    num = r"([-+0-9.eE]+|nan|inf)"
    m = re.fullmatch(
        rf"accel: packed_mfu={num} unpacked_mfu={num} packed_vs_torch={num} "
        rf"sampler_tok_s={num} sampler_vs_generate={num}",
        lines[-1],
    )
    assert m, lines[-1]
    figures = [float(x) for x in m.groups()]
    assert all(math.isfinite(x) and x > 0 for x in figures), figures
    # the three first-step figures, as printed: same weights and batch in three processes
    for key in ("loss", "logprob", "grad_norm"):
        (line,) = [ln for ln in lines if ln.strip().startswith(key + " ")]
        values = [float(v) for v in re.findall(r"=([-+][0-9.]+)", line)]
        assert len(values) == 3, line
        if key == "loss":  # a token-mean of advantages (ratio 1): bound by their size, 1
            bound = 1e-4
        else:
            bound = 1e-4 * max(abs(v) for v in values)
        assert max(values) - min(values) <= bound, line
    assert "  agree: True" in lines


def test_bench_smollm2_tiny(env):
    """The real-model benchmark's train pair and report on a random 2-layer Llama (its
    sampler pair runs the workers test_bench_accelerator_tiny already runs)."""
    proc = subprocess.run(
        [
            sys.executable,
            "experiments/bench_smollm2.py",
            "--tiny",
            "--allow_load",
            "--rounds=1",
            "--steps=1",
            "--only=train reflax packed,train torch",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    num = r"([-+0-9.eE]+|nan|inf)"
    m = re.fullmatch(rf"smollm2: sampler_vs_generate={num} packed_vs_torch={num}", lines[-1])
    assert m, lines[-1]
    assert m[1] == "nan" and math.isfinite(float(m[2])) and float(m[2]) > 0, lines[-1]
    assert bc.cpu_model() in proc.stdout  # every figure names the CPU it ran on
    assert "load average" in lines[0]
    assert "  agree: True" in lines  # packed reflax and eager torch: the same first step
