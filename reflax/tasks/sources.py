"""Reading raw rows from a local file, a saved dataset directory or the Hugging Face Hub.

``read_rows(source)`` returns ``(rows, unreadable)``: the rows as Python objects (normally
dicts; anything else is left for the caller to reject and count) and the number of lines
that could not be decoded at all.

A file or directory in a bucket (``gs://...``) is read from a local copy (`reflax.storage`).

* ``*.jsonl`` (or ``*.ndjson``): one JSON value per line; blank lines are ignored, lines that
  are not valid JSON are counted as unreadable.
* ``*.json``: a top-level JSON list of rows; a file that is not one JSON document is read as
  JSON lines (the Hub's "json" files often are).
* ``*.parquet``: every row of the table.
* a directory: ``datasets.load_from_disk`` (a ``DatasetDict`` contributes ``hub_split``).
* anything else that is not an existing path: a Hub dataset id for ``datasets.load_dataset``
  (split ``hub_split``); honours the usual ``HF_*`` environment (offline mode, token, cache).
"""

from __future__ import annotations

import json
import os
from typing import Any

from reflax import storage

_LOCAL_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")


def read_rows(source: str, *, hub_split: str = "train") -> tuple[list[Any], int]:
    """All rows of ``source`` and the count of undecodable lines (see module docstring)."""
    path = os.path.expanduser(storage.local_path(source))  # a gs:// file: a local copy
    lower = path.lower()
    if os.path.isdir(path):
        return _read_saved_dataset(path, hub_split), 0
    if os.path.isfile(path):
        if lower.endswith((".jsonl", ".ndjson")):
            return _read_json_lines(path)
        if lower.endswith(".json"):
            return _read_json(path)
        if lower.endswith(".parquet"):
            return _read_parquet(path), 0
        raise ValueError(f"unsupported file type {source!r}; expected one of {_LOCAL_SUFFIXES}")
    if lower.endswith(_LOCAL_SUFFIXES) or source.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"no such data file: {source!r}")
    return _read_hub(source, hub_split), 0


def _read_json_lines(path: str) -> tuple[list[Any], int]:
    rows: list[Any] = []
    unreadable = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except (ValueError, RecursionError):
                unreadable += 1
    return rows, unreadable


def _read_json(path: str) -> tuple[list[Any], int]:
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return _read_json_lines(path)
    if isinstance(data, list):
        return data, 0
    # A single JSON object is one row (a one-line JSON-lines file parses this way too).
    return [data], 0


def _read_parquet(path: str) -> list[Any]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _read_saved_dataset(path: str, hub_split: str) -> list[Any]:
    import datasets

    data = datasets.load_from_disk(path)
    if isinstance(data, datasets.DatasetDict):
        if hub_split not in data:
            raise ValueError(f"{path!r} has splits {list(data)}, not {hub_split!r}")
        data = data[hub_split]
    return data.to_list()


def _read_hub(dataset_id: str, hub_split: str) -> list[Any]:
    import datasets

    return datasets.load_dataset(dataset_id, split=hub_split).to_list()
