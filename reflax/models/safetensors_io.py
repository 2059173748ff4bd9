"""safetensors files: header parsing, ranged reads into aligned buffers, sharded writing.

The format is an 8-byte little-endian header length, a JSON header (dtype, shape, byte
offsets of each tensor) and the raw little-endian tensor bytes. A checkpoint is one
`model.safetensors`, or several shards listed by `model.safetensors.index.json`.

The header is parsed here and tensors are read with `os.preadv` rather than
`safetensors.safe_open(..., framework="numpy")`, because:
  * safetensors 0.8's numpy backend cannot return bfloat16 tensors (numpy has no
    bfloat16; here the bytes are viewed as `ml_dtypes.bfloat16`), and
  * safe_open memory-maps the file, and every mapped page it touches counts in
    the process's resident memory until the file is closed; reads into fresh
    buffers keep peak RSS at the size of the arrays actually built.
Parsing every header up front lets each file, tensor name, shape and byte range be
checked before anything is created on a device. Reads land in 64-byte aligned
buffers, which the CPU backend adopts without a copy.

This module knows files and tensors only; which tensor is which model parameter is
`reflax.models.hf`'s business.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from reflax.checkpoint import CheckpointError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"

# safetensors dtype -> numpy dtype (only these may hold parameters)
FLOAT_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
# byte size of every safetensors dtype, to validate byte ranges of any tensor in a file
_DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors reference implementation's limit
_ALIGN = 64  # bytes; what XLA's CPU client needs to use a host buffer in place
_TRANSPOSE_BLOCK = 64  # rows per block of the cache-friendly transpose


# --------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are, from its file's header."""

    file: str
    name: str
    dtype: str  # safetensors dtype, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in the file
    nbytes: int


def read_safetensors_header(file: str) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header: every byte range must lie inside the file."""
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file}: {size} bytes, too short to be a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise CheckpointError(
                    f"{file}: corrupt or truncated safetensors file (header length {n} but "
                    f"the file has {size} bytes)"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read safetensors file {file}: {e}") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors header: {e}") from None
    data_start, data_size = 8 + n, size - 8 - n
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = entry["dtype"], tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: corrupt header entry for tensor {name!r}") from None
        if dtype in _DTYPE_SIZES and (end - begin) != math.prod(shape) * _DTYPE_SIZES[dtype]:
            raise CheckpointError(
                f"{file}: tensor {name!r} of shape {list(shape)} {dtype} has "
                f"{end - begin} bytes in the header; corrupt file"
            )
        if not 0 <= begin <= end or end > data_size:
            raise CheckpointError(
                f"{file}: truncated or corrupt: tensor {name!r} needs bytes {begin}..{end} of "
                f"the data section but the file holds {data_size}"
            )
        tensors[name] = TensorInfo(file, name, dtype, shape, data_start + begin, end - begin)
    return tensors


class Reader:
    """Reads row ranges of tensors into fresh aligned host buffers.

    Files stay open (one descriptor each) while loading. Reads use `os.preadv`,
    which has no file position, so the threads that read the layers of a stacked
    parameter in parallel share descriptors; preadv and numpy copies release the GIL.
    """

    def __init__(self, tensors: dict[str, TensorInfo], workers: int):
        self.tensors = tensors
        self.pool = ThreadPoolExecutor(workers)
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.pool.shutdown()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _fd(self, file: str) -> int:
        with self._lock:
            if file not in self._fds:
                self._fds[file] = os.open(file, os.O_RDONLY)
            return self._fds[file]

    def read(self, name: str, index: Sequence[tuple[int, int]]) -> np.ndarray:
        """tensor[index] for an index of (start, stop) per dim; only rows start..stop are read."""
        info = self.tensors[name]
        dtype = FLOAT_DTYPES[info.dtype]
        (r0, r1), rest = index[0], index[1:]
        row = math.prod(info.shape[1:]) * dtype.itemsize
        buf = aligned_empty((r1 - r0) * row, np.uint8)
        fd, view, pos, done = self._fd(info.file), memoryview(buf), info.start + r0 * row, 0
        while done < buf.size:  # one read returns at most ~2 GB on Linux
            n = os.preadv(fd, [view[done:]], pos + done)
            if n == 0:
                raise CheckpointError(f"{info.file}: unexpected end of file in tensor {name!r}")
            done += n
        rows = buf.view(dtype).reshape((r1 - r0, *info.shape[1:]))
        if any((a, b) != (0, d) for (a, b), d in zip(rest, info.shape[1:])):
            rows = rows[(slice(None), *(slice(a, b) for a, b in rest))]
        return rows


def normalize_index(index: tuple[slice, ...], shape: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """A shard's index (slices, as jax passes it) as (start, stop) per dim."""
    out = []
    for s, d in zip(index, shape):
        start, stop, step = s.indices(d)
        if step != 1:
            raise ValueError(f"strided shard index {index}")
        out.append((start, stop))
    return tuple(out)


def aligned_empty(shape: int | Sequence[int], dtype: Any) -> np.ndarray:
    """np.empty aligned to 64 bytes.

    The CPU backend adopts such a buffer as a device array without copying it
    (jax.device_put / make_array_from_callback alias it), so on CPU the loaded
    model costs its own size and no transient copy.
    """
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    offset = -raw.ctypes.data % _ALIGN
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def copy_transposed(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[...] = src.T (2-D, with a cast), in row blocks of src: ~2x faster than one strided
    copy for large matrices because each block stays in cache."""
    for i in range(0, src.shape[0], _TRANSPOSE_BLOCK):
        dst[:, i : i + _TRANSPOSE_BLOCK] = src[i : i + _TRANSPOSE_BLOCK].T


def weight_files(path: str) -> dict[str, list[str]]:
    """safetensors file -> tensor names the index assigns to it ([] = whatever the header says)."""
    index_file = os.path.join(path, SAFE_INDEX)
    if os.path.exists(index_file):
        try:
            with open(index_file) as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_file} is not a valid safetensors index: {e}") from None
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(os.path.join(path, file), []).append(name)
        for file, names in files.items():
            if not os.path.isfile(file):
                raise CheckpointError(
                    f"missing safetensors file {file} (listed in {index_file} for tensor "
                    f"{names[0]!r})"
                )
        return files
    single = os.path.join(path, SAFE_WEIGHTS)
    if os.path.isfile(single):
        return {single: []}
    others = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".msgpack")))
    hint = f" (found {others}; only safetensors is supported)" if others else ""
    raise CheckpointError(
        f"missing safetensors file: no {SAFE_WEIGHTS} or {SAFE_INDEX} in {path}{hint}"
    )


def collect_tensors(path: str) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint directory: its files' headers, checked against the index."""
    tensors: dict[str, TensorInfo] = {}
    for file, names in weight_files(path).items():
        header = read_safetensors_header(file)
        listed = set(names)
        for name in listed:
            if name not in header:
                raise CheckpointError(
                    f"tensor {name!r} is listed in {SAFE_INDEX} for {file} but is not in that file"
                )
        for name, info in header.items():
            if not listed or name in listed:
                tensors[name] = info
    return tensors


# --------------------------------------------------------------------------- writing


def parse_size(size: int | str) -> int:
    """Bytes in "2GB" (10^9), "500MiB" (2^20), "10KB" or an int."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", size.upper().replace("IB", "iB"))
    if not m:
        raise ValueError(f"cannot parse size {size!r}; use e.g. '2GB' or '500MiB'")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


# numpy dtype -> safetensors dtype, for the float dtypes a parameter may be saved as
SAVE_DTYPES = {np.dtype(v): k for k, v in FLOAT_DTYPES.items()}
_WEIGHT_FILE = re.compile(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?")


class PlannedTensor(NamedTuple):
    """One tensor to be written: its place in the files is decided before any byte is."""

    name: str
    dtype: str  # safetensors dtype, e.g. "BF16"
    shape: tuple[int, ...]
    nbytes: int


def plan_shards(tensors: list[PlannedTensor], max_bytes: int) -> list[list[PlannedTensor]]:
    """Tensors in order into files of at most `max_bytes` (a larger tensor gets a file alone)."""
    plan: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if plan[-1] and size + t.nbytes > max_bytes:
            plan.append([])
            size = 0
        plan[-1].append(t)
        size += t.nbytes
    return plan


def remove_weight_files(path: str) -> None:
    """Delete `model*.safetensors` files and the index: a save with other sharding must not
    leave stale shards beside the new ones."""
    for f in os.listdir(path):
        if _WEIGHT_FILE.fullmatch(f):
            os.remove(os.path.join(path, f))


class ShardedWriter:
    """Writes tensors, in a planned order, into one or more safetensors files as they come,
    so the host holds one tensor at a time."""

    def __init__(self, path: str, plan: list[list[PlannedTensor]]):
        self.path, self.plan = path, plan
        n = len(plan)
        self.names = [
            SAFE_WEIGHTS if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            for i in range(n)
        ]
        self.weight_map = {t.name: self.names[i] for i, ts in enumerate(plan) for t in ts}
        self._file_index, self._pos, self._f = -1, 0, None

    def _open_next(self) -> None:
        if self._f is not None:
            self._f.close()
        self._file_index += 1
        self._pos = 0
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for t in self.plan[self._file_index]:
            header[t.name] = {
                "dtype": t.dtype,
                "shape": list(t.shape),
                "data_offsets": [offset, offset + t.nbytes],
            }
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data section 8-byte aligned, as safetensors writes it
        self._f = open(os.path.join(self.path, self.names[self._file_index]), "wb")  # noqa: SIM115
        self._f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, array: np.ndarray) -> None:
        """The next tensor of the plan; its name and shape must be the planned ones."""
        while self._f is None or self._pos >= len(self.plan[self._file_index]):
            self._open_next()
        expected = self.plan[self._file_index][self._pos]
        if (expected.name, expected.shape) != (name, array.shape):
            raise ValueError(
                f"writing tensor {name!r} of shape {array.shape}; the plan expects "
                f"{expected.name!r} of shape {expected.shape}"
            )
        self._f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        self._pos += 1

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def index(self) -> dict[str, Any] | None:
        """The contents of `SAFE_INDEX` for a sharded save; None for a single file."""
        if len(self.plan) == 1:
            return None
        return {
            "metadata": {"total_size": sum(t.nbytes for ts in self.plan for t in ts)},
            "weight_map": dict(sorted(self.weight_map.items())),
        }
