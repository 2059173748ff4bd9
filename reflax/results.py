"""What a command leaves behind besides checkpoints: result files and exported directories.

`save_json` writes eval.json, forgetting.json and `--output` files; `replaced_dir` writes an
export (the HF checkpoint in hf/) under a temporary name and renames it when complete, so
an interrupted export never leaves a half-written directory behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

from reflax import distributed


def save_json(path: str | os.PathLike, results: dict[str, Any]) -> None:
    """Write the results (on the primary process only: one file for the whole cluster)."""
    if distributed.is_primary():
        with open(path, "w") as f:
            json.dump(results, f, indent=2)


@contextlib.contextmanager
def replaced_dir(path: str | os.PathLike) -> Iterator[str]:
    """A temporary directory beside `path` to write into; on success it replaces `path`.

    Every process enters it (multi-process writers write from process 0 only); the rename is
    the primary's. On an exception or a kill the old `path` (if any) is untouched and the
    temporary directory is removed (or, after a kill, replaced by the next attempt).
    """
    path = os.path.normpath(os.fspath(path))
    tmp = f"{path}.tmp"
    if distributed.is_primary() and os.path.exists(tmp):
        shutil.rmtree(tmp)  # a killed earlier attempt's leftovers
    try:
        yield tmp
    except BaseException:
        if distributed.is_primary():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if distributed.is_primary():
        old = f"{path}.old"
        if os.path.exists(path):
            os.replace(path, old)  # directories cannot be replaced in one rename
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
