"""MetricsWriter files, read_jsonl, Timer and Progress."""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import struct
import time

import jax.numpy as jnp
import numpy as np
import pytest

from reflax.metrics import MetricsWriter, Progress, Timer, read_jsonl


def _events(tb_dir: str):
    """(tag, step, value) of every scalar and text summary in the TensorBoard event files."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in glob.glob(os.path.join(tb_dir, "events.out.tfevents.*")):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                if v.HasField("tensor") and v.tensor.string_val:
                    out.append((v.tag, event.step, v.tensor.string_val[0].decode()))
                else:
                    out.append((v.tag, event.step, v.simple_value))
    return out


def test_scalars_jsonl_flushed_per_write_and_tensorboard(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True)
    before = time.time()
    writer.write_scalars(
        1,
        {
            "loss": jnp.asarray(0.5),
            "reward": np.float32(0.25),
            "num_tokens": jnp.asarray(12, jnp.int32),
            "finite": np.bool_(True),
            "lr": 1e-6,
            "count": 3,
        },
    )
    # readable before close: each record is flushed as it is written
    (rec,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert rec["step"] == 1 and before <= rec["time"] <= time.time()
    assert rec["loss"] == 0.5 and rec["reward"] == 0.25 and rec["lr"] == 1e-6
    assert rec["num_tokens"] == 12 and isinstance(rec["num_tokens"], int)
    assert rec["finite"] == 1 and rec["count"] == 3
    writer.write_scalars(2, {"loss": jnp.asarray([0.75])})
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
    writer.close()
    writer.close()  # idempotent
    events = _events(str(tmp_path / "tb"))
    assert ("loss", 1, 0.5) in events and ("loss", 2, 0.75) in events
    assert ("num_tokens", 1, 12.0) in events


def test_non_finite_values_become_null_and_are_logged(tmp_path, caplog):
    with MetricsWriter(tmp_path, enabled=True) as writer, caplog.at_level(logging.WARNING):
        writer.write_scalars(3, {"loss": jnp.asarray(jnp.nan), "kl": float("inf"), "ok": 1.0})
        text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    rec = json.loads(text)
    assert rec["loss"] is None and rec["kl"] is None and rec["ok"] == 1.0
    assert "non-finite" in caplog.text and "loss" in caplog.text
    events = {tag: v for tag, _, v in _events(str(tmp_path / "tb"))}
    assert np.isnan(events["loss"]) and np.isinf(events["kl"])


def test_texts_to_samples_jsonl_and_tensorboard(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True)
    assert not (tmp_path / "samples.jsonl").exists()  # created on first use
    reflections = ["I mis-added.\n# Retry: 3+4=7", "Use the tool `add`."]
    writer.write_texts(5, {"reflection": reflections, "prompt": "2+2?"})
    (rec,) = read_jsonl(tmp_path / "samples.jsonl")
    assert rec["step"] == 5 and rec["reflection"] == reflections and rec["prompt"] == "2+2?"
    writer.close()
    texts = {tag: v for tag, _, v in _events(str(tmp_path / "tb"))}
    assert any("reflection" in tag for tag in texts)
    body = next(v for tag, v in texts.items() if "reflection" in tag)
    assert "    # Retry: 3+4=7" in body  # verbatim (indented) rather than markdown


def test_bad_input_is_rejected(tmp_path):
    with MetricsWriter(tmp_path, enabled=True, tensorboard=False) as writer:
        with pytest.raises(ValueError, match="scalar"):
            writer.write_scalars(1, {"v": np.zeros(3)})
        with pytest.raises(ValueError, match="reserved"):
            writer.write_scalars(1, {"step": 1})
    with pytest.raises(RuntimeError, match="closed"):
        writer.write_scalars(2, {"v": 1.0})
    assert not (tmp_path / "tb").exists()


def test_disabled_writer_writes_nothing(tmp_path):
    writer = MetricsWriter(tmp_path / "w", enabled=False)
    writer.write_scalars(1, {"loss": 1.0})
    writer.write_texts(1, {"s": "x"})
    writer.flush()
    writer.close()
    assert not (tmp_path / "w").exists()
    # process 0 (this one) writes by default
    with MetricsWriter(tmp_path / "d", tensorboard=False) as writer:
        assert writer.enabled


def test_truncated_last_line_skipped_and_repaired_on_reopen(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(tmp_path, enabled=True, tensorboard=False) as writer:
        writer.write_scalars(1, {"loss": 1.0})
        writer.write_scalars(2, {"loss": 2.0})
    with open(path, "a") as f:
        f.write('{"step": 3, "time": 1.0, "lo')  # a crash mid-write
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in read_jsonl(path)] == [1, 2]
    assert "skipped 1 truncated" in caplog.text
    # a resumed run appends after the last complete record
    with MetricsWriter(tmp_path, enabled=True, tensorboard=False) as writer:
        writer.write_scalars(3, {"loss": 3.0})
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]
    # damage elsewhere is an error, not a silent skip
    path.write_text('{"step": 1}\n{oops\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_jsonl(path)


def test_timer_accumulates(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    timer = Timer()
    for _ in range(2):
        with timer("rollout"):
            clock[0] += 1.5
        with timer("train_step"):
            clock[0] += 0.5
    with pytest.raises(KeyError), timer("verify"):  # time counts even when the body raises
        clock[0] += 1.0
        raise KeyError
    summary = timer.summary()
    assert summary["time/rollout"] == 3.0 and summary["time/train_step"] == 1.0
    assert summary["time/verify"] == 1.0 and summary["time/wall"] == 5.0
    assert summary["time_frac/rollout"] == pytest.approx(0.6)
    clock[0] += 2.0
    assert timer.summary() == {"time/wall": 2.0}  # reset by the previous call


def test_progress_non_tty_and_disabled():
    stream = io.StringIO()  # not a TTY, like a log file
    bar = Progress(total=10, initial=2, desc="train", disable=False, file=stream, mininterval=0)
    bar.update(1, reward=0.123456, retry_success=jnp.asarray(0.5))
    bar.update(2)
    assert bar.n == 5
    bar.close()
    out = stream.getvalue()
    assert "train" in out and "5/10" in out and "reward=0.1235" in out
    assert "retry_success=0.5" in out

    quiet = io.StringIO()
    with Progress(total=3, disable=True, file=quiet) as bar:
        bar.update(3, reward=1.0)
    assert quiet.getvalue() == ""

    piped = io.StringIO()
    with Progress(total=1000, disable=False, file=piped) as bar:  # default interval: 30 s
        for _ in range(1000):
            bar.update(1, reward=0.5)
    assert piped.getvalue().count("\r") < 10
