"""Training telemetry: JSONL + TensorBoard metrics, text samples, timers, a progress bar.

Files written under the work directory (by process 0 only, by default)::

    metrics.jsonl   one object per `write_scalars`: {"step": s, "time": unix, "loss": ...}
    samples.jsonl   one object per `write_texts`:   {"step": s, "time": unix, "reflection": [...]}
    tb/             TensorBoard event files (tensorboardX), scalars and text

JSONL files are appended and flushed after every record, so a crash loses nothing already
written; a record torn by a crash mid-write is cut off when the file is reopened, and
`read_jsonl` skips one at the end of a file. A run resumed from a checkpoint appends to
the same files, so records for steps after that checkpoint can appear twice; readers that
care keep the last record per step. A remote workdir (gs://...) has no append: the files
are written in a local temporary mirror and uploaded whole (`storage.Mirror`) every
`SYNC_INTERVAL_S` seconds, at `flush` and at `close`, so a crash there loses at most the
records since the last upload, and none before the last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import textwrap
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import IO, Any

import jax
import numpy as np
from tqdm import tqdm

from reflax import distributed, storage

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
TB_DIR = "tb"
# A remote workdir's files are uploaded whole: at most this often while records come in,
# and at every `flush` (the train loop flushes before each checkpoint) and at `close`.
SYNC_INTERVAL_S = 30.0

_RESERVED = ("step", "time")


def _scalar(name: str, value: Any) -> int | float:
    """A Python int or float from a number or a one-element array (host or device)."""
    if isinstance(value, bool | np.bool_):
        return int(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    arr = np.asarray(value)  # fetches a jax.Array to host
    if arr.size != 1:
        raise ValueError(f"metric {name!r} must be a scalar, got shape {arr.shape}")
    item = arr.reshape(()).item()
    if isinstance(item, bool):
        return int(item)
    if isinstance(item, int | float):
        return item
    raise TypeError(f"metric {name!r} has non-numeric dtype {arr.dtype}")


def _repair_tail(path: str) -> None:
    """Make appends start on a fresh line: cut a torn last record (a crash mid-write), or
    end a complete one that merely lacks its newline."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        content = f.read()
        keep = content.rfind(b"\n") + 1
        try:
            json.loads(content[keep:])
        except ValueError:
            f.truncate(keep)
            log.warning("%s: removed a torn last record (%d bytes)", path, len(content) - keep)
        else:
            f.write(b"\n")


class MetricsWriter:
    """Writes scalars and text samples to JSONL files and TensorBoard; only one host writes.

    With `enabled=False` (default on processes other than 0) every method is a no-op and
    no file is created, so the train loop can call it unconditionally on every host.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        tensorboard: bool = True,
        enabled: bool | None = None,
    ) -> None:
        self.workdir = os.fspath(workdir)
        self.enabled = distributed.is_primary() if enabled is None else bool(enabled)
        self._metrics: IO[str] | None = None
        self._samples: IO[str] | None = None
        self._tb: Any = None
        self._closed = False
        if not self.enabled:
            return
        self._dir = storage.Mirror(self.workdir)  # the workdir, or a local stand-in for a URL
        self._metrics = self._open(METRICS_FILE)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                log.warning("tensorboardX is not installed: TensorBoard logging is off")
            else:
                self._tb = SummaryWriter(logdir=os.path.join(self._dir.local, TB_DIR))

    def _open(self, name: str) -> IO[str]:
        path = self._dir.fetch(name)
        _repair_tail(path)
        return open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run

    def _write_line(self, f: IO[str], record: dict[str, Any]) -> None:
        # allow_nan=False: the files stay strict JSON (non-finite values are null by now)
        f.write(json.dumps(record, allow_nan=False, ensure_ascii=False) + "\n")
        f.flush()
        self._dir.sync(min_interval_s=SYNC_INTERVAL_S)

    @staticmethod
    def _check_names(names: Any) -> None:
        clash = [k for k in names if k in _RESERVED]
        if clash:
            raise ValueError(f"names {clash} are reserved for the record's own fields")

    def write_scalars(
        self, step: int, scalars: Mapping[str, float | int | np.ndarray | jax.Array]
    ) -> None:
        """Log one record of scalars for `step`. Arrays must hold one element.

        Integers (and bools) stay integers, everything else becomes a float. NaN and inf
        are written as JSON null and as the real value to TensorBoard, with a warning.
        """
        if not self.enabled:
            return
        self._check_open()
        self._check_names(scalars)
        step = int(step)
        host = jax.device_get(dict(scalars))  # one transfer for all device arrays
        values = {str(k): _scalar(str(k), v) for k, v in host.items()}
        bad = {k: v for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)}
        if bad:
            log.warning("non-finite metrics at step %d: %s", step, bad)
        record = {"step": step, "time": time.time()}
        record.update({k: (None if k in bad else v) for k, v in values.items()})
        assert self._metrics is not None
        self._write_line(self._metrics, record)
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)

    def write_texts(self, step: int, texts: Mapping[str, str | list[str]]) -> None:
        """Log text samples (e.g. reflections) for `step` to samples.jsonl and TensorBoard."""
        if not self.enabled:
            return
        self._check_open()
        self._check_names(texts)
        step = int(step)
        values: dict[str, str | list[str]] = {}
        for k, v in texts.items():
            values[str(k)] = v if isinstance(v, str) else [str(s) for s in v]
        if self._samples is None:
            self._samples = self._open(SAMPLES_FILE)
        self._write_line(self._samples, {"step": step, "time": time.time(), **values})
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_text(k, _markdown(v), step)

    def flush(self) -> None:
        if self._closed:
            return
        for f in (self._metrics, self._samples):
            if f is not None:
                f.flush()
        if self._tb is not None:
            self._tb.flush()
        if self.enabled:
            self._dir.sync()

    def close(self) -> None:
        """Flush and close every file; later writes raise. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for f in (self._metrics, self._samples):
            if f is not None:
                f.close()
        if self._tb is not None:
            self._tb.close()
        if self.enabled:
            self._dir.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"MetricsWriter for {self.workdir} is closed")

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _markdown(value: str | list[str]) -> str:
    # TensorBoard renders text as markdown; an indented block shows the sample verbatim.
    samples = [value] if isinstance(value, str) else value
    blocks = [textwrap.indent(s, "    ", lambda _: True) for s in samples]
    if len(blocks) == 1:
        return blocks[0]
    return "\n\n".join(f"**[{i}]**\n\n{b}" for i, b in enumerate(blocks))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSONL file. A torn last line (a crash mid-write) is skipped and logged;
    an unreadable line elsewhere raises ValueError naming the file and line."""
    path = os.fspath(path)
    with storage.open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    skipped = 0
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == last:
                skipped += 1
                continue
            raise ValueError(f"{path}:{i + 1}: not valid JSON ({e})") from e
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{i + 1}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    if skipped:
        log.warning("%s: skipped %d truncated last line", path, skipped)
    return records


class Timer:
    """Accumulates wall seconds per phase: ``with timer("rollout"): ...``.

    JAX dispatches asynchronously: block on the phase's results inside the ``with`` (e.g.
    ``jax.block_until_ready``) or the time lands in whichever later phase first waits.
    """

    def __init__(self) -> None:
        self._totals: dict[str, float] = defaultdict(float)
        self._start = time.perf_counter()

    @contextlib.contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._totals[name] += time.perf_counter() - t0

    def __call__(self, name: str) -> contextlib.AbstractContextManager:
        return self._timed(name)

    def summary(self, reset: bool = True) -> dict[str, float]:
        """{"time/<name>": seconds, "time_frac/<name>": share of wall time, "time/wall": s}
        since the last reset. Nested phases overlap, so shares need not sum to 1."""
        now = time.perf_counter()
        wall = now - self._start
        out = {f"time/{k}": v for k, v in self._totals.items()}
        if wall > 0:
            out.update({f"time_frac/{k}": v / wall for k, v in self._totals.items()})
        out["time/wall"] = wall
        if reset:
            self._totals = defaultdict(float)
            self._start = now
        return out


class Progress:
    """A tqdm bar with live figures: ``progress.update(1, reward=0.4, retry_success=0.2)``.

    Disabled on processes other than 0 unless `disable` says otherwise. When the output
    is not a terminal (a log file, a pipe) it refreshes at most every 30 s, so logs get a
    line now and then rather than thousands of carriage returns.
    """

    def __init__(
        self,
        total: int,
        initial: int = 0,
        desc: str = "train",
        disable: bool | None = None,
        *,
        file: IO[str] | None = None,
        mininterval: float | None = None,
    ) -> None:
        if disable is None:
            disable = not distributed.is_primary()
        stream = file if file is not None else sys.stderr
        if mininterval is None:
            isatty = getattr(stream, "isatty", None)
            mininterval = 0.5 if callable(isatty) and isatty() else 30.0
        self._bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            disable=disable,
            file=stream,
            mininterval=mininterval,
            dynamic_ncols=True,
        )

    def update(self, n: int = 1, **postfix: float) -> None:
        if postfix:
            self._bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)
        self._bar.update(n)

    @property
    def n(self) -> int:
        return int(self._bar.n)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fmt(value: Any) -> str:
    try:
        v = float(np.asarray(value))
    except (TypeError, ValueError):
        return str(value)
    return f"{v:.4g}"


__all__ = ["MetricsWriter", "Progress", "Timer", "read_jsonl"]
