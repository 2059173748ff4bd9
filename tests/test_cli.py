"""The CLIs end to end on the smoke config: resume after kill -9, NaN stop,
collect_failures -> offline training; and a paper config's `:local` variant. Each run is a
real subprocess. (Bad configs and inputs: tests/test_cli_setup.py.)"""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from reflax.batch import PackLengths
from reflax.checkpoint import Checkpointer
from reflax.data import read_failures
from reflax.episodes import RolloutSettings, own_tokens_bound
from reflax.metrics import read_jsonl
from reflax.runtime import build_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "configs/countdown_toy.py:smoke"
# An easy variant the smoke model learns in its warm start, so that RL groups have mixed
# rewards and the GRPO updates are not zero (resume and NaN checks need real updates).
LEARNABLE = [
    "--config.task.kwargs.num_range=(1, 3)",
    "--config.task.kwargs.target_range=(1, 6)",
    "--config.task.kwargs.synthetic_unique_test=False",  # the tiny range has few problems
    "--config.task.kwargs.synthetic_validation_fraction=0.0",  # and no set to spare
    # the smoke model does not learn to state the failed attempt's side in 300 steps (its
    # retries then never pass), and with the numbers largest first most groups agree: the
    # toy's earlier reflection and number order keep every step's GRPO update well above
    # the round-off of an anchor-only gradient, which packed and unpacked sum differently
    "--config.warm_start.reflection_template=use {hint_word}",
    "--config.task.kwargs.synthetic_descending=False",
    "--config.warm_start.steps=300",
    "--config.warm_start.learning_rate=1e-2",
    "--config.warm_start.batch_size=16",
    "--config.model.init.hidden_size=64",
    "--config.model.init.num_layers=2",
    "--config.model.init.head_dim=16",
    # AdamW divides by |g| + eps: with the default 1e-8 an entry whose gradient is round-off
    # takes a full-size step in round-off's direction, so two exact runs that sum in another
    # order (packed or not, one process or two) could not be compared; 1e-3 keeps each
    # update a smooth function of the gradient
    "--config.optim.eps=1e-3",
]


@pytest.fixture(scope="module")
def env():
    e = dict(os.environ)  # with conftest's compilation cache: a relaunch loads the programs
    e.pop("XLA_FLAGS", None)  # the CLI runs on the real (single) CPU device
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return e


def cli(module, *args):
    return [sys.executable, "-m", f"reflax.{module}", *args]


def run(cmd, env, check=True, timeout=600):
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr[-4000:]}")
    return p


def final_state(workdir, sub="checkpoints"):
    """(step, state tree as NumPy) of the latest checkpoint in workdir/sub, from any devices."""
    import orbax.checkpoint as ocp

    ckpt = Checkpointer(os.path.join(workdir, sub))
    step = ckpt.latest_step()
    path = os.path.join(ckpt.step_dir(step), "state")
    ckpt.close()
    checkpointer = ocp.StandardCheckpointer()
    meta = checkpointer.metadata(path).item_metadata
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
    tree = checkpointer.restore(path, target)
    return step, jax.tree.map(np.asarray, tree)


def final_params(workdir, sub="checkpoints"):
    step, tree = final_state(workdir, sub)
    return step, tree["params"]


STEPS = [
    "--config.total_steps=5",
    "--config.checkpoint_every=1",
    "--config.eval.before=False",
    "--config.eval.after=False",
    "--config.export_hf=False",
    *LEARNABLE,
]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, env):
    """5 learnable steps, group-packed (the default), uninterrupted: the reference run."""
    a = str(tmp_path_factory.mktemp("runs") / "a")
    run(cli("train", f"--config={SMOKE}", f"--workdir={a}", *STEPS), env)
    rows = [r for r in read_jsonl(os.path.join(a, "metrics.jsonl")) if "loss" in r]
    assert any(r["grad_norm"] > 1e-3 for r in rows), "no GRPO update happened: test is vacuous"
    return a


def test_packed_run_equals_unpacked(uninterrupted, env, tmp_path):
    # the same run with grpo.pack_groups=False, from the packed run's warm start: the same
    # samples, and parameters within round-off of the whole run's update
    a, b = uninterrupted, str(tmp_path / "unpacked")
    shutil.copytree(os.path.join(a, "warm_start"), os.path.join(b, "warm_start"))
    unpacked = "--config.grpo.pack_groups=False"
    run(cli("train", f"--config={SMOKE}", f"--workdir={b}", unpacked, *STEPS), env)
    rows = {}
    for w in (a, b):
        rows[w] = [r for r in read_jsonl(os.path.join(w, "metrics.jsonl")) if "loss" in r]
    assert [r["train_slots"] for r in rows[a]] != [r["train_slots"] for r in rows[b]]
    for ra, rb in zip(rows[a], rows[b], strict=True):
        for k in ("loss", "grad_norm", "num_tokens", "kl", "retry_success"):
            assert abs(ra[k] - rb[k]) <= 1e-4 * max(1.0, abs(ra[k])), (k, ra[k], rb[k])
    samples = [
        [{k: v for k, v in r.items() if k != "time"} for r in read_jsonl(f"{w}/samples.jsonl")]
        for w in (a, b)
    ]
    assert samples[0] == samples[1] and samples[0]
    _, start = final_params(a, "warm_start")
    (_, pa), (_, pb) = final_params(a), final_params(b)
    for w, x, y in zip(jax.tree.leaves(start), jax.tree.leaves(pa), jax.tree.leaves(pb)):
        update = np.abs(x - w).max()
        assert update > 0
        # packed and unpacked rows sum in another order: within 1e-3 of the update, or a few
        # float32 steps of the parameter itself where its update is smaller than those
        assert np.abs(x - y).max() <= max(1e-3 * update, 4 * np.spacing(np.abs(x).max()))


def test_train_programs_compiled_before_the_loop(uninterrupted):
    # every (prefix, suffix) size pair of the packed layout is compiled before step 1, as
    # many as grpo.pack_sizes allows, and no step compiles another
    spec = importlib.util.spec_from_file_location("toy", os.path.join(ROOT, SMOKE.split(":")[0]))
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    c = toy.get_config(SMOKE.split(":")[1])
    T = c.rollout.seq_len
    sizes = c.grpo.pack_sizes
    settings = RolloutSettings.from_config(c, build_tokenizer(c))
    ladder = PackLengths.coarse(T, own_tokens_bound(settings, T), sizes)
    rows = read_jsonl(os.path.join(uninterrupted, "metrics.jsonl"))
    first_step = min(i for i, r in enumerate(rows) if "loss" in r)
    (i,) = [i for i, r in enumerate(rows) if "compiled_train_programs" in r]
    n = rows[i]["compiled_train_programs"]
    assert i < first_step and n == len(ladder.prefix) * len(ladder.suffix) <= sizes**2
    assert rows[i]["compile_s"] > 0
    assert all(r["train_programs"] == n for r in rows if "loss" in r)


def test_resume_after_kill_equals_uninterrupted(uninterrupted, tmp_path, env):
    steps = STEPS
    a, b = uninterrupted, str(tmp_path / "b")

    proc = subprocess.Popen(
        cli("train", f"--config={SMOKE}", f"--workdir={b}", *steps),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 600
    while not os.path.isdir(os.path.join(b, "checkpoints", "2")):
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed_at = Checkpointer(os.path.join(b, "checkpoints")).latest_step()
    assert 2 <= killed_at < 5

    run(cli("train", f"--config={SMOKE}", f"--workdir={b}", *steps), env)
    step_a, pa = final_params(a)
    step_b, pb = final_params(b)
    assert step_a == step_b == 5
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(x, y)
    steps_logged = [r["step"] for r in read_jsonl(os.path.join(b, "metrics.jsonl")) if "loss" in r]
    assert set(steps_logged) == set(range(1, 6))


def test_non_finite_loss_stops_with_checkpoint_intact(tmp_path, env):
    w = str(tmp_path / "nan")
    p = run(
        cli(
            "train",
            f"--config={SMOKE}",
            f"--workdir={w}",
            "--config.total_steps=4",
            "--config.checkpoint_every=1",
            "--config.optim.learning_rate=1e30",
            "--config.optim.warmup_ratio=0.0",
            "--config.optim.max_grad_norm=0.0",
            "--config.grpo.pack_sizes=1",  # one train program: the loss overflows in any layout
            "--config.eval.before=False",
            "--config.eval.after=False",
            *LEARNABLE,
        ),
        env,
        check=False,
    )
    assert p.returncode != 0
    assert "non-finite loss" in p.stderr
    ckpt = Checkpointer(os.path.join(w, "checkpoints"))
    steps = ckpt.all_steps()
    assert steps and max(steps) < 4
    step, params = final_params(w)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_collect_failures_then_offline_training(tmp_path, env):
    f = str(tmp_path / "failures.jsonl")
    out = run(
        cli("collect_failures", f"--config={SMOKE}", f"--output={f}", "--num_queries=16"), env
    )
    assert "failures=" in out.stdout
    records, skipped = read_failures(f)
    assert records and skipped == 0
    assert all(r["prompt_ids"] and r["attempt_ids"] for r in records)
    with open(f, "a") as fh:
        fh.write('{"example": 1}\nnot json\n')  # malformed rows are counted, not fatal
    w = str(tmp_path / "offline")
    run(
        cli(
            "train",
            f"--config={SMOKE}",
            f"--workdir={w}",
            "--config.rollout.mode=offline",
            f"--config.rollout.failures={f}",
            "--config.total_steps=1",
            "--config.eval.before=False",
            "--config.eval.after=False",
            "--config.warm_start.steps=0",
            "--config.export_hf=False",
            "--config.grpo.ref_dtype=bfloat16",  # the KL reference cast from the initial weights
            "--config.grpo.pack_sizes=1",  # one train program for the one step
        ),
        env,
    )
    rows = [r for r in read_jsonl(os.path.join(w, "metrics.jsonl")) if "loss" in r]
    assert len(rows) == 1 and rows[0]["groups"] >= 1


def test_collect_failures_from_a_warm_start(uninterrupted, tmp_path, env):
    # the paper's recipe on a config that warm-starts: failures of the warm-started model
    # (which solves some problems; the random initial model solves none)
    f = str(tmp_path / "failures.jsonl")
    args = [f"--config={SMOKE}", f"--output={f}", "--num_queries=32", *LEARNABLE]
    fresh = run(cli("collect_failures", *args), env).stdout
    warm = run(cli("collect_failures", *args, f"--warm_start={uninterrupted}"), env).stdout
    success = lambda out: float(out.split("attempt_success=")[1].split()[0])
    assert success(fresh) == 0 < success(warm)
    bad = run(cli("collect_failures", *args, f"--warm_start={tmp_path}"), env, check=False)
    assert bad.returncode != 0 and "warm_start is missing" in bad.stderr


def test_paper_config_local_variant_end_to_end(tmp_path, env):
    # a paper config loads by path from any directory and runs its whole pipeline
    w = str(tmp_path / "local")
    config = os.path.join(ROOT, "configs", "qwen2p5_1p5b.py")
    p = subprocess.run(
        cli("train", f"--config={config}:local", f"--workdir={w}"),
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    steps = [r["step"] for r in read_jsonl(os.path.join(w, "metrics.jsonl")) if "loss" in r]
    assert steps == [1, 2, 3]
    with open(os.path.join(w, "eval.json")) as f:
        assert json.load(f)["after"]["n"] == 8
    assert os.path.isdir(os.path.join(w, "hf"))


def test_mu2_on_eight_devices(tmp_path, env):
    # grpo.mu = 2 through the CLI on an 8-device mesh: the old-log-prob pass and both inner
    # steps run with explicit shardings, and each inner step is one optimizer update
    e = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    w = str(tmp_path / "mu2")
    run(
        cli(
            "train",
            f"--config={SMOKE}",
            f"--workdir={w}",
            "--config.grpo.mu=2",
            "--config.grpo.pack_sizes=1",  # one train program (each layout's path is the same)
            "--config.total_steps=2",
            "--config.warm_start.steps=0",
            "--config.eval.before=False",
            "--config.eval.after=False",
            "--config.export_hf=False",
        ),
        e,
    )
    rows = [r for r in read_jsonl(os.path.join(w, "metrics.jsonl")) if "loss" in r]
    assert len(rows) == 2 and all(r["finite"] == 1.0 for r in rows)
    assert all(r["applied"] == 1.0 and r["empty"] == 0.0 for r in rows)
    step, state = final_state(w)
    assert step == 2 and int(state["step"]) == 2 * 2  # mu optimizer updates per rollout step
