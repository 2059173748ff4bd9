"""Shared harness of the benchmarks: one process per implementation, interleaved rounds.

Running two frameworks in one process makes them compete for the same cores in ways that
depend on the load from other jobs (PyTorch's OpenMP threads collapse under load, XLA's
thread pool slows gently), so a benchmark script here is a parent that starts every
implementation as a fresh subprocess of itself (`--worker=<name>`), one after the other,
in rounds: round r runs the implementations in an order rotated by r. Each worker prints
one result line (`BENCH_RESULT <json>`) and exits; the parent keeps the round's results
together, compares implementations only within a round (a ratio per round) and reports
medians (and min / max) over rounds.

Each worker times a float32 2048^3 matmul (best of a few calls) in its own framework before
and after its timed work: the machine-speed probe printed beside its figure. MFU in a round
is taken against the best probe of that round in either framework (PyTorch's CPU matmul is
faster than XLA's on some machines, so each framework's own probe would flatter the
slower one).

The 1-minute load average is checked before the first round: above `--max_load` (default
half the cores) the run is refused with exit status 2, unless `--allow_load` is given, in
which case every figure is flagged "(loaded)".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

RESULT_TAG = "BENCH_RESULT "
# the --tiny modes' model: 2 layers, GQA, tied embeddings, small enough for a test (each
# script adds its family's own rope / norm settings)
TINY_MODEL = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)
PROBE_N = 2048  # the probe: a float32 PROBE_N^3 matmul


# ----------------------------------------------------------------------------- arguments


def add_harness_args(parser: argparse.ArgumentParser, *, rounds: int) -> None:
    """The options every benchmark script shares (parent and worker parse the same line)."""
    cores = os.cpu_count() or 1
    parser.add_argument("--rounds", type=int, default=rounds, help="rounds of fresh processes")
    parser.add_argument(
        "--max_load",
        type=float,
        default=0.5 * cores,
        help="refuse to run above this 1-minute load average (default: half the cores)",
    )
    parser.add_argument(
        "--allow_load",
        action="store_true",
        help="run even above --max_load; every figure is then flagged (loaded)",
    )
    parser.add_argument(
        "--only", default="", help="comma-separated implementation names to run (default: all)"
    )
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)  # set by the parent
    parser.add_argument("--workdir", default="", help=argparse.SUPPRESS)  # set by the parent


def check_load(max_load: float, allow_load: bool) -> bool:
    """Print the load average; exit 2 above `max_load` unless allowed. True: flag as loaded."""
    load = os.getloadavg()
    cores = os.cpu_count() or 1
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {cores} cores", flush=True)
    if load[0] <= max_load:
        return False
    if not allow_load:
        print(
            f"refusing to benchmark: 1-minute load average {load[0]:.2f} > {max_load:.2f} "
            "(--max_load); other jobs would distort the figures. Wait for a quiet machine, "
            "or pass --allow_load to run anyway with every figure flagged (loaded).",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(2)
    print(f"load above {max_load:.2f}: every figure below is flagged (loaded)", flush=True)
    return True


# ----------------------------------------------------------------------------- FLOPs


def macs(c: dict[str, Any]) -> tuple[int, int]:
    """Multiply-adds of a Qwen2-style model (`c`: transformers' config names): (one token's
    forward through every weight, the LM head included; one (query, key) pair's scores
    summed over layers and heads, as many again for the weighted values)."""
    d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    h, k, n_layers = c["num_attention_heads"], c["num_key_value_heads"], c["num_hidden_layers"]
    dh = c.get("head_dim") or d // h
    dense = n_layers * (d * h * dh + 2 * d * k * dh + h * dh * d + 3 * d * f)  # q k v o, MLP
    return dense + d * v, n_layers * h * dh


# ----------------------------------------------------------------------------- worker side


def matmul_probe(framework: str, reps: int = 3, n: int = PROBE_N) -> float:
    """FLOP/s of the best of `reps` float32 n^3 matmuls in `framework` ("jax" or "torch")."""
    if framework == "jax":
        import jax
        import jax.numpy as jnp

        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        mm = jax.jit(jnp.dot)
        run = lambda: mm(a, b).block_until_ready()
    elif framework == "torch":
        import torch

        dev = "cuda" if torch.cuda.is_available() else "cpu"
        a = torch.randn(n, n, device=dev)
        b = torch.randn(n, n, device=dev)
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

        def run() -> None:
            a @ b
            sync()
    else:
        raise ValueError(f"unknown framework {framework!r}")
    run()  # compile / warm up
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def time_calls(fn: Callable[[], Any], n: int) -> list[float]:
    """Wall seconds of n calls of fn (which must return only once its work is done)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def run_worker(framework: str, body: Callable[[], dict[str, Any]]) -> int:
    """Run one worker: probe, `body()` (its timed work, returns a JSON-able dict), probe
    again; print the result line. `body`'s dict should hold `times` (seconds per timed
    call); the probes and the load averages are added here."""
    load0 = os.getloadavg()[0]
    before = matmul_probe(framework)
    result = body()
    after = matmul_probe(framework)
    result.update(
        framework=framework,
        probe_before=before,
        probe_after=after,
        load_start=load0,
        load_end=os.getloadavg()[0],
    )
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


# ----------------------------------------------------------------------------- parent side


@dataclass(frozen=True)
class Impl:
    """One implementation: its display name, the worker that runs it and that worker's
    framework (for the probe)."""

    name: str
    worker: str
    framework: str


_WORKER_ENV: dict[str, str] | None = None


def parent_on_cpu() -> None:
    """Keep the parent (which builds the weights and the batches) off any accelerator, so
    that it holds no device memory while its workers run; the workers get the original
    environment. Call it before the parent uses jax or torch."""
    global _WORKER_ENV
    if _WORKER_ENV is None:
        _WORKER_ENV = dict(os.environ)
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def launch(script: str, worker: str, argv: Sequence[str], workdir: str, timeout: float) -> dict:
    """Run `script --worker=<worker>` in a fresh process; its parsed result line."""
    cmd = [sys.executable, script, *argv, f"--worker={worker}", f"--workdir={workdir}"]
    env = _WORKER_ENV if _WORKER_ENV is not None else dict(os.environ)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise RuntimeError(f"worker {worker} failed (exit {proc.returncode}): {' '.join(cmd)}")
    return json.loads(lines[-1][len(RESULT_TAG) :])


def parent_argv(argv: Sequence[str]) -> list[str]:
    """The parent's own command line, for its workers (minus any worker options)."""
    return [a for a in argv if not a.startswith(("--worker", "--workdir"))]


def run_rounds(
    script: str,
    impls: Sequence[Impl],
    rounds: int,
    argv: Sequence[str],
    workdir: str,
    timeout: float = 3600.0,
) -> list[dict[str, dict]]:
    """Every implementation once per round, each in a fresh process, the order rotated by
    one each round; per round {name: result}."""
    out = []
    for r in range(rounds):
        k = r % len(impls)
        order = list(impls[k:]) + list(impls[:k])
        results = {}
        for impl in order:
            t0 = time.perf_counter()
            res = launch(script, impl.worker, argv, workdir, timeout)
            res["process_s"] = time.perf_counter() - t0
            results[impl.name] = res
            print(
                f"  round {r + 1}/{rounds}: {impl.name:<28} median "
                f"{statistics.median(res['times']):.3f} s over {len(res['times'])} "
                f"(process {res['process_s']:.0f} s, probe "
                f"{res['probe_before'] / 1e9:.0f}/{res['probe_after'] / 1e9:.0f} GFLOP/s, "
                f"load {res['load_start']:.1f}->{res['load_end']:.1f})",
                flush=True,
            )
        out.append(results)
    return out


def round_peak(results: dict[str, dict]) -> float:
    """The best matmul probe of a round, in either framework (FLOP/s)."""
    return max(max(r["probe_before"], r["probe_after"]) for r in results.values())


def per_round(rounds: list[dict[str, dict]], fn: Callable[[dict[str, dict]], float]) -> list[float]:
    return [fn(res) for res in rounds]


def step_time(res: dict) -> float:
    """A worker's figure: the median of its timed calls."""
    return statistics.median(res["times"])


@dataclass(frozen=True)
class Summary:
    median: float
    lo: float
    hi: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        return cls(statistics.median(values), min(values), max(values))

    def fmt(self, spec: str = ".3f", pct: bool = False) -> str:
        f = (lambda x: f"{x:.1%}") if pct else (lambda x: format(x, spec))
        if len(set([self.lo, self.hi])) == 1:
            return f(self.median)
        return f"{f(self.median)} [{f(self.lo)}, {f(self.hi)}]"


def ratio(rounds: list[dict[str, dict]], num: str, den: str) -> Summary:
    """Median (min, max) over rounds of step_time(num) / step_time(den) within each round."""
    return Summary.of(per_round(rounds, lambda res: step_time(res[num]) / step_time(res[den])))


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A markdown table."""
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def impl_rows(
    rounds: list[dict[str, dict]],
    impls: Sequence[Impl],
    workload: str,
    flops: dict[str, float],
    tokens: dict[str, float],
    loaded: bool,
) -> list[list[str]]:
    """Table rows: step time, tokens/s, GFLOP/s, MFU vs the round's best probe, own probe."""
    rows = []
    flag = " (loaded)" if loaded else ""
    for impl in impls:
        t = Summary.of(per_round(rounds, lambda res, n=impl.name: step_time(res[n])))
        tok = Summary.of(per_round(rounds, lambda res, n=impl.name: tokens[n] / step_time(res[n])))
        gf = Summary.of(
            per_round(rounds, lambda res, n=impl.name: flops[n] / step_time(res[n]) / 1e9)
        )
        mfu = Summary.of(
            per_round(
                rounds, lambda res, n=impl.name: flops[n] / step_time(res[n]) / round_peak(res)
            )
        )
        probe = Summary.of(
            per_round(
                rounds,
                lambda res, n=impl.name: max(res[n]["probe_before"], res[n]["probe_after"]) / 1e9,
            )
        )
        rows.append(
            [
                workload,
                impl.name,
                t.fmt() + flag,
                tok.fmt(".0f") + flag,
                gf.fmt(".1f") + flag,
                mfu.fmt(pct=True) + flag,
                f"{probe.fmt('.0f')} ({impl.framework})",
            ]
        )
    return rows


def table_headers(time_label: str = "step s", tokens_label: str = "tokens/s") -> list[str]:
    """The columns of `impl_rows`."""
    return [
        "workload",
        "implementation",
        time_label,
        tokens_label,
        "model GFLOP/s",
        "MFU",
        "own fp32 matmul probe GFLOP/s",
    ]


def print_probe_summary(rounds: list[dict[str, dict]]) -> None:
    peaks = Summary.of([r / 1e9 for r in per_round(rounds, round_peak)])
    print(
        f"MFU peak = the best float32 {PROBE_N}^3 matmul of the round in either framework: "
        f"{peaks.fmt('.0f')} GFLOP/s (median [min, max] over rounds)"
    )


def selected(impls: Sequence[Impl], only: str) -> list[Impl]:
    """The implementations named by --only (all if empty)."""
    if not only:
        return list(impls)
    names = {n.strip() for n in only.split(",") if n.strip()}
    unknown = names - {i.name for i in impls} - {i.worker for i in impls}
    if unknown:
        raise SystemExit(f"--only: unknown implementation(s) {sorted(unknown)}")
    return [i for i in impls if i.name in names or i.worker in names]


def cpu_model() -> str:
    """The processor's model name (/proc/cpuinfo on Linux, else `platform.processor()`):
    every figure is named with it, since the ratios move with the CPU."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def header(note: str = "") -> None:
    """Versions and the machine, printed by the parent (which imports neither framework
    for timing)."""
    import platform

    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPUs ({cpu_model()})"
        f"{', ' + note if note else ''}",
        flush=True,
    )
