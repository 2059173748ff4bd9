"""Hugging Face checkpoints in and out: safetensors <-> sharded `Decoder` parameters.

Loading never holds the whole model on the host. Every parameter is created with
`jax.make_array_from_callback`, whose callback reads only the byte range the
requesting shard needs (a range of layers, a range of rows of each layer's
tensor) straight from the safetensors file.

The safetensors format is an 8-byte little-endian header length, a JSON header
(dtype, shape, byte offsets of each tensor) and the raw little-endian tensor
bytes. The reader here parses that header itself and reads with `os.preadv`
rather than `safetensors.safe_open(..., framework="numpy")`, because:
  * safetensors 0.8's numpy backend cannot return bfloat16 tensors (numpy has no
    bfloat16; here the bytes are viewed as `ml_dtypes.bfloat16`), and
  * safe_open memory-maps the file, and every mapped page it touches counts in
    the process's resident memory until the file is closed; reads into fresh
    buffers keep peak RSS at the size of the arrays actually built.
Parsing the header up front also lets every file, tensor name, shape and byte
range be checked before anything is created on a device. Shards are built in
64-byte aligned buffers, which the CPU backend adopts without a copy, and the
layers of a stacked parameter are read by a few threads.

HF layout -> reflax layout: per-layer tensors `model.layers.{i}.<name>` are
stacked along a leading [L] axis; linear weights ([out, in] in HF) are stored
transposed as [in, out] kernels; a tied `lm_head.weight` is ignored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import struct
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from reflax import distributed, storage
from reflax.checkpoint import CheckpointError
from reflax.models import abstract_model
from reflax.models.config import ModelConfig, UnsupportedModelError
from reflax.models.decoder import Decoder, param_shapes
from reflax.sharding import fetch, param_shardings

log = logging.getLogger(__name__)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
# what a Hub download fetches: config, weights, tokenizer; never pytorch .bin files
HUB_PATTERNS = [
    CONFIG,
    GENERATION_CONFIG,
    "*.safetensors",
    SAFE_INDEX,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
]

# safetensors dtype -> numpy dtype (only these may hold parameters)
_FLOAT_DTYPES: dict[str, np.dtype] = {
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
_MAX_READ_WORKERS = 4


# --------------------------------------------------------------------------- name mapping

# reflax stacked-layer parameter -> (HF name inside `model.layers.{i}.`, HF weight is transposed)
_LAYER_NAMES: dict[str, tuple[str, bool]] = {
    "attn_norm": ("input_layernorm.weight", False),
    "q_proj": ("self_attn.q_proj.weight", True),
    "k_proj": ("self_attn.k_proj.weight", True),
    "v_proj": ("self_attn.v_proj.weight", True),
    "o_proj": ("self_attn.o_proj.weight", True),
    "q_bias": ("self_attn.q_proj.bias", False),
    "k_bias": ("self_attn.k_proj.bias", False),
    "v_bias": ("self_attn.v_proj.bias", False),
    "o_bias": ("self_attn.o_proj.bias", False),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "gate_proj": ("mlp.gate_proj.weight", True),
    "up_proj": ("mlp.up_proj.weight", True),
    "down_proj": ("mlp.down_proj.weight", True),
    "gate_bias": ("mlp.gate_proj.bias", False),
    "up_bias": ("mlp.up_proj.bias", False),
    "down_bias": ("mlp.down_proj.bias", False),
    "q_norm": ("self_attn.q_norm.weight", False),
    "k_norm": ("self_attn.k_norm.weight", False),
}
# Phi-3 fuses q/k/v and gate/up into one HF weight each: reflax parameter -> fused HF name
_FUSED_NAMES: dict[str, str] = {
    "q_proj": "self_attn.qkv_proj.weight",
    "k_proj": "self_attn.qkv_proj.weight",
    "v_proj": "self_attn.qkv_proj.weight",
    "gate_proj": "mlp.gate_up_proj.weight",
    "up_proj": "mlp.gate_up_proj.weight",
}
_TOP_NAMES: dict[str, tuple[str, bool]] = {
    "embed": ("model.embed_tokens.weight", False),
    "final_norm": ("model.norm.weight", False),
    "lm_head": ("lm_head.weight", True),
}


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One reflax parameter and the HF tensors it is made of."""

    key: tuple[str, ...]  # path in the model state, e.g. ("layers", "q_proj")
    shape: tuple[int, ...]  # reflax shape, e.g. [L, D, H*Dh]
    hf_names: tuple[str, ...]  # one name, or one per layer when stacked
    hf_shape: tuple[int, ...]  # shape of each HF tensor, e.g. [H*Dh, D]
    transpose: bool  # HF [out, in] weight <-> reflax [in, out] kernel
    stacked: bool  # leading [L] axis gathers model.layers.{i}
    # a fused HF tensor (Phi-3's qkv_proj, gate_up_proj) holds this parameter in rows
    # hf_offset.. of its first axis, after the parameters listed before it
    hf_offset: int = 0


def hf_param_specs(config: ModelConfig) -> list[ParamSpec]:
    """Every parameter of `Decoder(config)` with its HF tensor names, in `param_shapes` order."""
    shapes = param_shapes(config)
    fused = config.model_type == "phi3"
    offsets: dict[str, int] = {}  # fused HF name -> rows taken by the parameters so far
    specs = []
    for name, shape in shapes.items():
        if name == "layers":
            for lname, lshape in shape.items():
                hf, transpose = _LAYER_NAMES[lname]
                per = tuple(lshape[1:])
                hf_shape = per[::-1] if transpose else per
                offset = 0
                if fused and lname in _FUSED_NAMES:
                    hf = _FUSED_NAMES[lname]
                    offset = offsets.get(hf, 0)
                    offsets[hf] = offset + hf_shape[0]
                names = tuple(f"model.layers.{i}.{hf}" for i in range(config.num_layers))
                specs.append(
                    ParamSpec(
                        ("layers", lname), tuple(lshape), names, hf_shape, transpose, True, offset
                    )
                )
        else:
            hf, transpose = _TOP_NAMES[name]
            shape = tuple(shape)
            specs.append(
                ParamSpec(
                    (name,), shape, (hf,), shape[::-1] if transpose else shape, transpose, False
                )
            )
    # a fused HF tensor's shape: all of its parts' rows
    return [
        dataclasses.replace(s, hf_shape=(offsets[_hf_base(s)], *s.hf_shape[1:]))
        if _hf_base(s) in offsets
        else s
        for s in specs
    ]


def _hf_base(spec: ParamSpec) -> str:
    """The HF name without the `model.layers.{i}.` prefix."""
    return spec.hf_names[0].split(".", 3)[-1] if spec.stacked else spec.hf_names[0]


def _hf_rows(spec: ParamSpec) -> int:
    """Rows of the HF tensor's first axis that are this parameter's (all unless fused)."""
    return spec.shape[-1] if spec.transpose else spec.shape[1 if spec.stacked else 0]


def hf_tensor_groups(specs: list[ParamSpec]) -> list[list[ParamSpec]]:
    """Specs grouped by the HF tensors they make up (several for a fused tensor), in order."""
    groups: dict[tuple[str, ...], list[ParamSpec]] = {}
    for s in specs:
        groups.setdefault(s.hf_names, []).append(s)
    return list(groups.values())


# --------------------------------------------------------------------------- safetensors files


@dataclasses.dataclass(frozen=True)
class TensorInfo:
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


class _Reader:
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

    def __enter__(self) -> _Reader:
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
        dtype = _FLOAT_DTYPES[info.dtype]
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


def _normalize_index(index: tuple[slice, ...], shape: Sequence[int]) -> tuple[tuple[int, int], ...]:
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


def _copy_transposed(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[...] = src.T (2-D, with a cast), in row blocks of src: ~2x faster than one strided
    copy for large matrices because each block stays in cache."""
    for i in range(0, src.shape[0], _TRANSPOSE_BLOCK):
        dst[:, i : i + _TRANSPOSE_BLOCK] = src[i : i + _TRANSPOSE_BLOCK].T


def _read_shard(
    reader: _Reader, spec: ParamSpec, index: tuple[tuple[int, int], ...], dtype: np.dtype
) -> np.ndarray:
    """The shard `param[index]` of a reflax parameter, as a contiguous aligned array of `dtype`."""

    def into(dst: np.ndarray, name: str, idx: Sequence[tuple[int, int]]) -> None:
        hf_idx = list(idx[::-1] if spec.transpose else idx)
        (r0, r1), off = hf_idx[0], spec.hf_offset  # a fused tensor: this parameter's rows
        hf_idx[0] = (r0 + off, r1 + off)
        if spec.transpose:
            _copy_transposed(dst, reader.read(name, hf_idx))
        else:
            dst[...] = reader.read(name, hf_idx)

    shape = tuple(b - a for a, b in index)
    if spec.stacked:  # a few layers' slices (one per worker) on the host at a time
        out = aligned_empty(shape, dtype)
        l0 = index[0][0]
        fill = lambda j: into(out[j], spec.hf_names[l0 + j], index[1:])
        for _ in reader.pool.map(fill, range(shape[0])):  # re-raises a worker's error
            pass
        return out
    if not spec.transpose and not spec.hf_offset:
        part = reader.read(spec.hf_names[0], index)
        if part.dtype == dtype and part.flags.c_contiguous:
            return part  # the (aligned) read buffer itself: no copy
    out = aligned_empty(shape, dtype)
    into(out, spec.hf_names[0], index)
    return out


# --------------------------------------------------------------------------- locating files


def resolve_checkpoint(path_or_id: str | os.PathLike, *, revision: str | None = None) -> str:
    """A local directory holding the checkpoint: the path itself, a local copy of a remote
    one (gs://...; see `storage.local_path`), or a Hub snapshot."""
    path = os.path.expanduser(storage.local_path(path_or_id))
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise CheckpointError(f"{path} is a file; expected a checkpoint directory")
    if path.startswith(("/", ".", "~")) or path.count("/") > 1:  # not a Hub "org/name" id
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, revision=revision, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # offline, unknown repo, gated repo, bad id: one message
        raise CheckpointError(
            f"{path!r} is not a local directory and could not be fetched from the Hugging Face "
            f"Hub (offline, or no such repository?): {type(e).__name__}: {e}"
        ) from None


def read_config(path: str) -> ModelConfig:
    """The `ModelConfig` of a checkpoint directory; errors name config.json."""
    file = os.path.join(path, CONFIG)
    try:
        with open(file) as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"no {CONFIG} in {path}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {file}: {e}") from None
    except ValueError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    try:
        return ModelConfig.from_hf(hf)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{file}: {e}") from None
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{file}: missing or malformed field {e}") from None


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


def _collect_tensors(path: str) -> dict[str, TensorInfo]:
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


def _check_tensors(specs: list[ParamSpec], tensors: dict[str, TensorInfo], path: str) -> None:
    missing = [n for s in specs for n in s.hf_names if n not in tensors]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(
            f"checkpoint {path} is missing tensor {missing[0]!r}"
            + (f" (also {missing[1:5]}{more})" if len(missing) > 1 else "")
        )
    unused = set(tensors) - {n for s in specs for n in s.hf_names}
    if unused:  # e.g. a tied lm_head.weight, rotary inv_freq buffers
        log.info(
            "ignoring %d checkpoint tensors the model does not use: %s",
            len(unused),
            sorted(unused)[:5],
        )
    for s in specs:
        for name in s.hf_names:
            info = tensors[name]
            if info.shape != s.hf_shape:
                raise CheckpointError(
                    f"tensor {name!r} in {info.file} has shape {list(info.shape)}, "
                    f"expected {list(s.hf_shape)} from {CONFIG}"
                )
            if info.dtype not in _FLOAT_DTYPES:
                raise CheckpointError(
                    f"tensor {name!r} in {info.file} has dtype {info.dtype}; "
                    f"supported: {sorted(_FLOAT_DTYPES)}"
                )


# --------------------------------------------------------------------------- load


def load_pretrained(
    path_or_id: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    param_dtype: Any = jnp.float32,
    dtype: Any = jnp.float32,
    remat: bool = False,
    revision: str | None = None,
) -> Decoder:
    """A `Decoder` with the checkpoint's weights, each parameter created in its shards.

    `path_or_id` is a local directory or a Hub repository id. With a mesh the
    parameters are laid out by `reflax.sharding.param_shardings`; without one
    they go to the first device. Everything (config, index, every file header,
    every tensor's presence, shape and dtype) is validated before any device
    array is created; problems raise `CheckpointError` / `UnsupportedModelError`.
    """
    path = resolve_checkpoint(path_or_id, revision=revision)
    config = read_config(path)
    specs = hf_param_specs(config)
    tensors = _collect_tensors(path)
    _check_tensors(specs, tensors, path)

    graphdef, abstract_state = nnx.split(
        abstract_model(config, param_dtype=param_dtype, dtype=dtype, remat=remat)
    )
    if mesh is not None:
        shardings = param_shardings(abstract_state, mesh)
    else:
        shardings = jax.tree.map(
            lambda _: SingleDeviceSharding(jax.local_devices()[0]), abstract_state
        )
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
    sharding_leaves = jax.tree.leaves(shardings)
    by_key = {s.key: s for s in specs}
    items = []
    for (path_keys, leaf), sharding in zip(leaves, sharding_leaves):
        key = tuple(k.key for k in path_keys if isinstance(k, jax.tree_util.DictKey))
        if key not in by_key:
            raise KeyError(f"no checkpoint mapping for parameter {'.'.join(key)}")
        items.append((by_key[key], leaf, sharding))

    arrays: dict[tuple[str, ...], jax.Array] = {}
    with _Reader(tensors, workers=_read_workers()) as reader:
        # largest first: peak host memory is the loaded part plus the parameter in flight,
        # so the big transients happen while little is loaded
        for spec, leaf, sharding in sorted(items, key=lambda it: -math.prod(it[1].shape)):
            # wait for the transfer so its host buffers are freed before the next parameter
            arrays[spec.key] = _make_param(reader, spec, leaf, sharding).block_until_ready()
    flat = [arrays[spec.key] for spec, _, _ in items]
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, flat))


def _read_workers() -> int:
    """Threads reading layers: a few, as each holds one layer's tensor on the host."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(_MAX_READ_WORKERS, cpus or 1))


def _make_param(reader: _Reader, spec: ParamSpec, leaf: Any, sharding: Any) -> jax.Array:
    np_dtype = np.dtype(leaf.dtype)
    # replicas of one shard ask for the same index: read it once
    cache: dict[tuple[tuple[int, int], ...], np.ndarray] = {}

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        idx = _normalize_index(index, leaf.shape)
        if idx not in cache:
            cache[idx] = _read_shard(reader, spec, idx, np_dtype)
        return cache[idx]

    return jax.make_array_from_callback(leaf.shape, sharding, callback, dtype=leaf.dtype)


# --------------------------------------------------------------------------- save


def parse_size(size: int | str) -> int:
    """Bytes in "2GB" (10^9), "500MiB" (2^20), "10KB" or an int."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", size.upper().replace("IB", "iB"))
    if not m:
        raise ValueError(f"cannot parse size {size!r}; use e.g. '2GB' or '500MiB'")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


_SAVE_DTYPES = {np.dtype(v): k for k, v in _FLOAT_DTYPES.items()}
_TORCH_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


class _ShardedWriter:
    """Writes tensors, in a planned order, into one or more safetensors files as they come."""

    def __init__(self, path: str, plan: list[list[tuple[str, str, tuple[int, ...], int]]]):
        self.path, self.plan = path, plan
        n = len(plan)
        self.names = [
            SAFE_WEIGHTS if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            for i in range(n)
        ]
        self.weight_map = {t[0]: self.names[i] for i, ts in enumerate(plan) for t in ts}
        self._file_index, self._pos, self._f = -1, 0, None

    def _open_next(self) -> None:
        if self._f is not None:
            self._f.close()
        self._file_index += 1
        self._pos = 0
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape, nbytes in self.plan[self._file_index]:
            header[name] = {
                "dtype": dtype,
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data section 8-byte aligned, as safetensors writes it
        self._f = open(os.path.join(self.path, self.names[self._file_index]), "wb")  # noqa: SIM115
        self._f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, array: np.ndarray) -> None:
        while self._f is None or self._pos >= len(self.plan[self._file_index]):
            self._open_next()
        expected = self.plan[self._file_index][self._pos]
        assert expected[0] == name and expected[2] == array.shape, (expected, name, array.shape)
        self._f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        self._pos += 1

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _plan_shards(
    entries: list[tuple[str, str, tuple[int, ...], int]], max_bytes: int
) -> list[list[tuple[str, str, tuple[int, ...], int]]]:
    plan: list[list[tuple[str, str, tuple[int, ...], int]]] = [[]]
    size = 0
    for entry in entries:
        if plan[-1] and size + entry[3] > max_bytes:
            plan.append([])
            size = 0
        plan[-1].append(entry)
        size += entry[3]
    return plan


def _model_params(model: Decoder) -> dict[tuple[str, ...], jax.Array]:
    state = nnx.state(model, nnx.Param)
    out = {}
    for path_keys, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        key = tuple(k.key for k in path_keys if isinstance(k, jax.tree_util.DictKey))
        out[key] = leaf
    return out


def save_pretrained(
    model: Decoder,
    path: str | os.PathLike,
    *,
    tokenizer: Any = None,
    dtype: Any = None,
    max_shard_size: int | str = "2GB",
) -> None:
    """Write a transformers-compatible checkpoint: config.json, safetensors, tokenizer.

    Parameters are gathered to the host one at a time and streamed into the
    files, so the host never holds more than one (stacked) parameter. `dtype`
    (e.g. "bfloat16") casts on the way out; default: each parameter's own dtype.
    Stale `model*.safetensors` files and index in `path` are removed first. In
    a multi-process job every process must call this; only process 0 writes.
    """
    path = os.fspath(path)
    config: ModelConfig = model.config
    params = _model_params(model)
    specs = hf_param_specs(config)
    save_dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))
    if save_dtype is not None and save_dtype not in _SAVE_DTYPES:
        raise ValueError(f"cannot save as {save_dtype}; use one of float32, bfloat16, float16")

    entries = []
    for spec, *_ in hf_tensor_groups(specs):  # a fused tensor once
        out_dtype = save_dtype or np.dtype(params[spec.key].dtype)
        st_dtype = _SAVE_DTYPES[out_dtype]
        nbytes = math.prod(spec.hf_shape) * out_dtype.itemsize
        entries += [(name, st_dtype, spec.hf_shape, nbytes) for name in spec.hf_names]
    plan = _plan_shards(entries, parse_size(max_shard_size))
    writer = _ShardedWriter(path, plan)
    is_writer = distributed.is_primary()

    if is_writer:
        os.makedirs(path, exist_ok=True)
        for f in os.listdir(path):  # a previous save with other sharding must not linger
            if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", f):
                os.remove(os.path.join(path, f))
    try:
        for name, tensor in iter_hf_tensors(model):  # every process joins each gather
            if is_writer:
                writer.write(name, tensor if save_dtype is None else tensor.astype(save_dtype))
    finally:
        writer.close()
    if not is_writer:
        return

    if len(plan) > 1:
        index = {
            "metadata": {"total_size": sum(e[3] for e in entries)},
            "weight_map": dict(sorted(writer.weight_map.items())),
        }
        _write_json(os.path.join(path, SAFE_INDEX), index)
    hf = config.to_hf()
    torch_dtype = _TORCH_DTYPE_NAMES[entries[0][1]]
    hf.update(torch_dtype=torch_dtype, dtype=torch_dtype)
    generation = _generation_config(tokenizer)
    hf.update({k: v for k, v in generation.items() if k != "eos_token_id"})
    if generation.get("eos_token_id") is not None:
        eos = generation["eos_token_id"]
        hf["eos_token_id"] = eos[0] if isinstance(eos, list) and len(eos) == 1 else eos
    _write_json(os.path.join(path, CONFIG), hf)
    if generation:
        _write_json(os.path.join(path, GENERATION_CONFIG), generation)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def _generation_config(tokenizer: Any) -> dict[str, Any]:
    """bos/eos/pad ids from the tokenizer; eos lists every end-of-turn token of its template."""
    if tokenizer is None:
        return {}
    stop: list[int] = []
    try:
        from reflax.tokenizer import ChatTokens

        stop = list(ChatTokens(tokenizer).stop_ids)
    except ValueError:  # no usable chat template (a base model's tokenizer): eos alone
        if tokenizer.eos_token_id is not None:
            stop = [tokenizer.eos_token_id]
    out: dict[str, Any] = {}
    if tokenizer.bos_token_id is not None:
        out["bos_token_id"] = tokenizer.bos_token_id
    if stop:
        out["eos_token_id"] = stop if len(stop) > 1 else stop[0]
    if tokenizer.pad_token_id is not None:
        out["pad_token_id"] = tokenizer.pad_token_id
    return out


def _write_json(file: str, obj: Any) -> None:
    tmp = file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    shutil.move(tmp, file)


def from_hf_state_dict(config: ModelConfig, tensors: Mapping[str, np.ndarray]) -> Decoder:
    """A Decoder from in-memory HF tensors (e.g. a torch model's state dict as numpy).

    For references and tests that already hold a transformers model; files go
    through `load_pretrained`, which validates and shards.
    """
    graphdef, state = nnx.split(abstract_model(config))
    pure: dict[str, Any] = {}
    for spec in hf_param_specs(config):
        rows = slice(spec.hf_offset, spec.hf_offset + _hf_rows(spec))  # of a fused tensor
        arrays = [np.asarray(tensors[n])[rows] for n in spec.hf_names]
        arrays = [a.T if spec.transpose else a for a in arrays]
        value = np.stack(arrays) if spec.stacked else arrays[0]
        node = pure
        for k in spec.key[:-1]:
            node = node.setdefault(k, {})
        node[spec.key[-1]] = jnp.asarray(value)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def iter_hf_tensors(model: Decoder) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, host array in HF layout, possibly a strided view) for every tensor.

    One parameter (the parts of a fused tensor) is on the host at a time. Multi-host:
    every process must iterate, since each parameter is gathered with a collective.
    """
    params = _model_params(model)
    for group in hf_tensor_groups(hf_param_specs(model.config)):
        values = [fetch(params[spec.key]) for spec in group]
        spec = group[0]
        for i, name in enumerate(spec.hf_names):
            parts = [v[i] if spec.stacked else v for v in values]
            parts = [p.T if spec.transpose else p for p in parts]
            yield name, parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        del values
