"""Where each step's groups come from, with a resumable position.

Offline (the paper): a failure set written by `python -m reflax.collect_failures`,
a JSONL file `datasets` can load, one failed (query, attempt) per line with the
attempt's token ids. Online: fresh first attempts from the current policy.
Either way the order is a seeded permutation per epoch, so a run resumed from
(epoch, position) sees exactly the examples an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from reflax import storage

log = logging.getLogger(__name__)

FAILURE_FIELDS = ("example", "prompt_ids", "attempt_ids")


def write_failures(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Write failure records (example, prompt_ids, attempt_ids, attempt_text) as JSONL
    (a local path or a URL such as gs://bucket/failures.jsonl)."""
    n = 0
    with storage.atomic_write(path) as f:  # a crash never leaves a half-written failure set
        for r in records:
            f.write(json.dumps(r) + "\n")
            n += 1
    return n


def read_failures(path: str | os.PathLike) -> tuple[list[dict[str, Any]], int]:
    """Failure records and the number of malformed lines skipped."""
    records, skipped = [], 0
    with storage.open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                ok = isinstance(r, dict) and all(k in r for k in FAILURE_FIELDS)
                ok = ok and isinstance(r["example"], dict)
                ok = ok and all(
                    isinstance(r[k], list) and all(isinstance(i, int) for i in r[k])
                    for k in ("prompt_ids", "attempt_ids")
                )
            except json.JSONDecodeError:
                ok = False
            if ok:
                records.append(r)
            else:
                skipped += 1
    if skipped:
        log.warning("%s: skipped %d malformed failure records", path, skipped)
    if not records:
        raise ValueError(f"{path} holds no valid failure records ({skipped} malformed)")
    return records, skipped


@dataclasses.dataclass
class Cursor:
    """Epoch-wise seeded shuffling with a resumable (epoch, position)."""

    size: int
    seed: int
    epoch: int = 0
    position: int = 0

    def take(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
            k = min(n - len(out), self.size - self.position)
            out.extend(order[self.position : self.position + k].tolist())
            self.position += k
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def select(items: Sequence[Any], idx: Sequence[int]) -> list[Any]:
    return [items[i] for i in idx]
