"""The command lines' shared set-up (reflax.cli): a user error is one line on stderr and
exit status 1, before any model loads; a resumed run with another recipe stops; a SIGTERM
after the last step skips what is left, cleanly; the SIGTERM handler is restored."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from reflax import storage
from reflax.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "configs/countdown_toy.py:smoke"

# One interpreter imports the entry points once, then forks a child per case (the import
# is what a CLI spends its first seconds on): each child runs the module as __main__ with
# its argv, stderr to a file, and records whether any device backend was started (a model
# load starts one; every error below must come first).
RUNNER = r"""
import json, os, runpy, sys, tempfile
import jax._src.xla_bridge as xla_bridge
import reflax.collect_failures, reflax.evaluate, reflax.local_cluster, reflax.train
for name in ("reflax.collect_failures", "reflax.evaluate", "reflax.local_cluster", "reflax.train"):
    del sys.modules[name]  # their dependencies stay loaded; each child runs one as __main__
results = []
for module, argv, blocked in json.loads(sys.argv[1]):
    err = tempfile.TemporaryFile("w+")
    info = tempfile.TemporaryFile("w+")
    pid = os.fork()
    if pid == 0:
        os.dup2(err.fileno(), 2)
        for name in blocked:  # an extra that is not installed
            sys.modules[name] = None
        sys.argv = [module, *argv]
        code = 0
        try:
            runpy.run_module(module, run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        sys.stderr.flush()
        info.write(json.dumps(xla_bridge.backends_are_initialized()))
        info.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    err.seek(0), info.seek(0)
    results.append([os.waitstatus_to_exitcode(status), err.read(), json.loads(info.read())])
print(json.dumps(results))
"""


def _env():
    e = dict(os.environ)
    e.pop("XLA_FLAGS", None)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return e


def _run_cases(cases):
    p = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(cases)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_user_errors_are_one_line_before_any_model_loads(tmp_path):
    missing = str(tmp_path / "missing")
    out = str(tmp_path / "failures.jsonl")
    train = ["reflax.train", f"--config={SMOKE}", f"--workdir={tmp_path / 'w'}"]
    evaluate = ["reflax.evaluate", f"--config={SMOKE}"]
    collect = ["reflax.collect_failures", f"--config={SMOKE}", f"--output={out}"]
    local = "reflax.local_cluster"
    from configs.countdown_toy import get_config

    saved = get_config("smoke")
    saved.grpo.beta = 0.5
    saved.eval.num_examples = 3
    ckpt = Checkpointer(tmp_path / "resumed" / "checkpoints")
    ckpt.save(2, {"step": np.zeros((), np.int32)}, {"config": saved.to_dict()})
    ckpt.close()
    resumed = [f"--config={SMOKE}", f"--workdir={tmp_path / 'resumed'}"]
    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / "eval.json").write_text(json.dumps({"before": {"n": 1}}))
    (tmp_path / "r2").mkdir()
    (tmp_path / "r2" / "eval.json").write_text(json.dumps({"before": [], "after": 3}))
    cases = [  # (argv, expected text of the one line, blocked modules)
        (train + ["--config.rollout.no_such_key=1"], "ConfigError: --config.rollout.no_such_key"),
        (train + ["--config.rollout.group_size=1"], "group_size must be >= 2"),
        (train + ["stray"], "UsageError: unexpected arguments ['stray']"),
        (train + [f"--config.model.path={missing}"], f"model {missing} does not exist"),
        (
            train + ["--config.rollout.mode=offline", f"--config.rollout.failures={missing}.jsonl"],
            f"InputError: no failure set at rollout.failures={missing}.jsonl",
        ),
        (evaluate + ["--config.no_such_key=1"], "ConfigError: --config.no_such_key"),
        (evaluate + [f"--checkpoint={missing}"], f"{missing}/checkpoints is missing"),
        (evaluate + ["stray"], "UsageError: unexpected arguments"),
        (["reflax.evaluate"], "--config is required (or --results"),
        (["reflax.evaluate", f"--results={missing}.json"], f"cannot read {missing}.json"),
        (
            ["reflax.evaluate", f"--results={tmp_path / 'r1' / 'eval.json'}"],
            "--results: run 'r1' has no after results",
        ),
        (
            ["reflax.evaluate", f"--results={tmp_path / 'r2' / 'eval.json'}"],
            "--results: run 'r2': its before results are not an evaluation's",
        ),
        (
            evaluate + ["--suite=forgetting"],
            "--suite=forgetting needs lm_eval: pip install 'reflax[eval]'",
            ["lm_eval"],
        ),
        (collect + ["--config.rollout.no_such_key=1"], "--config.rollout.no_such_key"),
        (
            [*collect[:2], f"--output={missing}/failures.jsonl"],
            f"cannot write {missing}/failures.jsonl",
        ),
        (collect + [f"--warm_start={missing}"], f"{missing}/warm_start is missing"),
        (collect + ["--config=configs/no_such_config.py"], "cannot load the config file"),
        ([local, "--processes=x", "--", "true"], "UsageError: argument --processes"),
        ([local, "--processes=1", "--", missing], f"No such file or directory: '{missing}'"),
    ]
    results = _run_cases(
        [(a[0], a[1:], blocked[0] if blocked else []) for a, _, *blocked in cases]
        + [(train[0], [*cases[4][0][1:], "--verbose"], []), (train[0], resumed, [])]
    )
    *results, (verbose_code, verbose_err, _), (resume_code, resume_err, _) = results
    for (argv, text, *_), (code, err, backend) in zip(cases, results, strict=True):
        lines = [x for x in err.splitlines() if x.strip()]
        assert code == 1 and len(lines) == 1 and text in lines[0], (argv, err)
        assert not backend, argv  # no device was touched: no model was loaded
    # --verbose: the traceback, then the same line
    assert verbose_code == 1 and verbose_err.startswith("Traceback")
    assert verbose_err.strip().splitlines()[-1].startswith("InputError: no failure set")
    # a resumed run whose recipe differs from its checkpoint's: one line with the diff
    lines = resume_err.strip().splitlines()
    assert resume_code == 1 and len(lines) == 1, resume_err
    # (eval.num_examples differs too: evaluation keys may change on resume)
    assert "trained with: grpo.beta: 0.5 -> 0.0. Relaunch" in lines[0]
    assert "--config.resume_override=True" in lines[0]
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_a_cluster_reports_a_user_error_once_per_process(tmp_path):
    # every process of a local cluster meets the bad key: one line each, status 1
    cmd = [sys.executable, "-m", "reflax.train", f"--config={SMOKE}", f"--workdir={tmp_path}"]
    launcher = [sys.executable, "-m", "reflax.local_cluster", "--processes=2", "--devices=1"]
    p = subprocess.run(
        [*launcher, "--", *cmd, "--config.no_such_key=1"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [x for x in p.stdout.splitlines() if x.strip()]
    assert p.returncode == 1 and "Traceback" not in p.stdout + p.stderr, p.stdout
    assert all("ConfigError: --config.no_such_key" in x for x in lines), lines
    # process 0's line plain, process 1's prefixed (unless it was stopped before it printed)
    assert sorted(x.split(" ")[0] for x in lines) in (["ConfigError:"], ["ConfigError:", "[p1]"])


def test_check_resume_ignores_run_keys_and_honours_the_override():
    from reflax.config import ConfigError, base_config
    from reflax.runtime import check_resume

    c = base_config()
    saved = {"config": json.loads(json.dumps(c.to_dict()))}
    saved["config"]["mesh"]["fsdp"] = 8
    saved["config"]["log_every"] = 7
    saved["config"]["rollout"]["kv_cache_bytes"] = 2**30
    saved["config"]["rollout"]["retry_prefill"] = True
    # a reference in float32 scores as one in the compute dtype ("auto"), bit for bit
    saved["config"]["grpo"]["ref_dtype"] = "float32"
    check_resume(c, saved, "ckpt/5")  # where, how often, how caches are held: not the recipe
    saved["config"]["rollout"]["group_size"] = 3
    saved["config"]["optim"]["eps"] = 1e-3
    saved["config"]["grpo"]["ref_dtype"] = "float16"  # rounds the reference differently
    with pytest.raises(ConfigError) as e:
        check_resume(c, saved, "ckpt/5")
    assert "\n" not in str(e.value)
    assert (
        "grpo.ref_dtype: 'float16' -> 'auto'; optim.eps: 0.001 -> 1e-08; "
        "rollout.group_size: 3 -> 8" in str(e.value)
    )
    c.resume_override = True
    check_resume(c, saved, "ckpt/5")


def test_staged_dir_is_whole_or_untouched(tmp_path):
    final = tmp_path / "hf"
    final.mkdir()
    (final / "old").write_text("1")
    with pytest.raises(KeyError), storage.staged_dir(final) as stage:
        (tmp_path / os.path.basename(stage) / "half").write_text("2")
        raise KeyError("interrupted")
    assert os.listdir(tmp_path) == ["hf"] and os.listdir(final) == ["old"]
    with storage.staged_dir(final) as stage:
        (tmp_path / os.path.basename(stage) / "new").write_text("3")
    assert os.listdir(tmp_path) == ["hf"] and os.listdir(final) == ["new"]
    # an export killed part way (SIGKILL: no clean-up ran) left a half-built stage; one
    # killed between its two renames left the whole earlier export aside and no hf/
    (tmp_path / "hf.tmp-dead1").mkdir()
    (tmp_path / "hf.tmp-dead1" / "half").write_text("4")
    final.rename(tmp_path / "hf.old-dead2")
    (tmp_path / "hfx").mkdir()  # another directory whose name starts alike: not touched
    with pytest.raises(KeyError), storage.staged_dir(final):
        assert sorted(os.listdir(final)) == ["new"]  # moved back before anything else
        raise KeyError("interrupted again")
    assert sorted(os.listdir(tmp_path)) == ["hf", "hfx"] and os.listdir(final) == ["new"]


def test_train_restores_the_sigterm_handler_when_it_raises(tmp_path):
    from configs.countdown_toy import get_config
    from reflax.config import validate
    from reflax.train import train

    empty = tmp_path / "failures.jsonl"
    empty.write_text("")
    c = get_config("smoke")
    c.rollout.mode, c.rollout.failures = "offline", str(empty)
    c.warm_start.steps = 0
    mine = lambda signum, frame: None  # noqa: E731
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with pytest.raises(ValueError, match="holds no valid failure records"):
            train(validate(c), str(tmp_path / "w"))
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_during_the_final_evaluation_skips_the_export_cleanly(tmp_path, monkeypatch):
    # a run whose last step is checkpointed: relaunched, only the final phases are left. The
    # signal arrives while the final evaluation runs: it finishes, the export is skipped; the
    # next launch exports, whole.
    from configs.countdown_toy import get_config
    from reflax import train as train_module
    from reflax.config import validate
    from reflax.optim import make_optimizer
    from reflax.runtime import build, checkpoint_dir, state_to_dict
    from reflax.trainer import init_state

    c = get_config("smoke")
    c.total_steps, c.warm_start.steps, c.eval.before = 1, 0, False
    c = validate(c)
    rt, params = build(c)
    tx, _ = make_optimizer(total_steps=1, **c.optim)
    ckpt = Checkpointer(checkpoint_dir(str(tmp_path)))
    meta = {"rollout_step": 1, "cursor": {"epoch": 0, "position": 0}, "config": c.to_dict()}
    ckpt.save(1, state_to_dict(init_state(params, tx, rt.mesh)), meta)
    ckpt.close()
    result = {"n": 1, "first_try": 0.0, "second_try": 1.0}
    result.update(first_try_ci95=[0.0, 0.79], second_try_ci95=[0.21, 1.0])  # Wilson, n = 1

    def evaluate_then_signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # a preemption notice mid-evaluation
        return result

    monkeypatch.setattr(train_module, "evaluate", evaluate_then_signalled)
    before = signal.getsignal(signal.SIGTERM)
    assert train_module.train(c, str(tmp_path)) == {"after": result}
    metrics = tmp_path / "metrics.jsonl"  # no step is left to train: no program compiled
    assert not metrics.exists() or "compiled_train_programs" not in metrics.read_text()
    assert signal.getsignal(signal.SIGTERM) == before
    with open(tmp_path / "eval.json") as f:
        assert json.load(f) == {"after": result}  # the evaluation in progress finished
    assert not [n for n in os.listdir(tmp_path) if n.startswith("hf")]  # no export, no half
    monkeypatch.setattr(train_module, "evaluate", lambda *args, **kwargs: result)
    train_module.train(c, str(tmp_path))
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "hf"))
    assert [n for n in os.listdir(tmp_path) if n.startswith("hf")] == ["hf"]
