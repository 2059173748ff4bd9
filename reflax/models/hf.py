"""Hugging Face checkpoints in and out: HF tensor names <-> sharded `Decoder` parameters.

Loading never holds the whole model on the host. Every parameter is created with
`jax.make_array_from_callback`, whose callback reads only the byte range the
requesting shard needs (a range of layers, a range of rows of each layer's
tensor) straight from the safetensors file (`reflax.models.safetensors_io`), into
64-byte aligned buffers the CPU backend adopts without a copy; the layers of a
stacked parameter are read by a few threads. Everything (config, index, every
file header, every tensor's presence, shape and dtype) is checked before any device
array is created.

HF layout -> reflax layout (`hf_param_specs`, one table for every family): per-layer
tensors `model.layers.{i}.<name>` are stacked along a leading [L] axis; linear weights
([out, in] in HF) are stored transposed as [in, out] kernels; Phi-3's fused qkv_proj and
gate_up_proj are split by rows; a tied `lm_head.weight` is ignored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from reflax import distributed, storage
from reflax.checkpoint import CheckpointError
from reflax.models import abstract_model
from reflax.models.config import ModelConfig, UnsupportedModelError
from reflax.models.decoder import Decoder, param_shapes
from reflax.models.safetensors_io import (
    FLOAT_DTYPES,
    SAFE_INDEX,
    SAVE_DTYPES,
    PlannedTensor,
    Reader,
    ShardedWriter,
    TensorInfo,
    aligned_empty,
    collect_tensors,
    copy_transposed,
    normalize_index,
    parse_size,
    plan_shards,
    remove_weight_files,
)
from reflax.sharding import fetch, param_shardings
from reflax.tokenizer import ChatTokens

log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------- reading shards


def _read_shard(
    reader: Reader, spec: ParamSpec, index: tuple[tuple[int, int], ...], dtype: np.dtype
) -> np.ndarray:
    """The shard `param[index]` of a reflax parameter, as a contiguous aligned array of `dtype`."""

    def into(dst: np.ndarray, name: str, idx: Sequence[tuple[int, int]]) -> None:
        hf_idx = list(idx[::-1] if spec.transpose else idx)
        (r0, r1), off = hf_idx[0], spec.hf_offset  # a fused tensor: this parameter's rows
        hf_idx[0] = (r0 + off, r1 + off)
        if spec.transpose:
            copy_transposed(dst, reader.read(name, hf_idx))
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
            if info.dtype not in FLOAT_DTYPES:
                raise CheckpointError(
                    f"tensor {name!r} in {info.file} has dtype {info.dtype}; "
                    f"supported: {sorted(FLOAT_DTYPES)}"
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
    tensors = collect_tensors(path)
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
    with Reader(tensors, workers=_read_workers()) as reader:
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


def _make_param(reader: Reader, spec: ParamSpec, leaf: Any, sharding: Any) -> jax.Array:
    np_dtype = np.dtype(leaf.dtype)
    # replicas of one shard ask for the same index: read it once
    cache: dict[tuple[tuple[int, int], ...], np.ndarray] = {}

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        idx = normalize_index(index, leaf.shape)
        if idx not in cache:
            cache[idx] = _read_shard(reader, spec, idx, np_dtype)
        return cache[idx]

    return jax.make_array_from_callback(leaf.shape, sharding, callback, dtype=leaf.dtype)


# --------------------------------------------------------------------------- save


# safetensors dtype -> config.json's torch_dtype
_TORCH_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


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
    if model.lora_scale is not None:  # its adapters would be left out without a word
        raise ValueError(
            "the model carries LoRA adapters: save reflax.models.lora.merged(model), the "
            "merged weights (reflax.save does)"
        )
    path = os.fspath(path)
    config: ModelConfig = model.config
    params = _model_params(model)
    specs = hf_param_specs(config)
    save_dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))
    if save_dtype is not None and save_dtype not in SAVE_DTYPES:
        raise ValueError(f"cannot save as {save_dtype}; use one of float32, bfloat16, float16")

    tensors = []
    for spec, *_ in hf_tensor_groups(specs):  # a fused tensor once
        out_dtype = save_dtype or np.dtype(params[spec.key].dtype)
        nbytes = math.prod(spec.hf_shape) * out_dtype.itemsize
        tensors += [
            PlannedTensor(name, SAVE_DTYPES[out_dtype], spec.hf_shape, nbytes)
            for name in spec.hf_names
        ]
    writer = ShardedWriter(path, plan_shards(tensors, parse_size(max_shard_size)))
    is_writer = distributed.is_primary()

    if is_writer:
        os.makedirs(path, exist_ok=True)
        remove_weight_files(path)
    try:
        for name, tensor in iter_hf_tensors(model):  # every process joins each gather
            if is_writer:
                writer.write(name, tensor if save_dtype is None else tensor.astype(save_dtype))
    finally:
        writer.close()
    if not is_writer:
        return

    index = writer.index()
    if index is not None:
        _write_json(os.path.join(path, SAFE_INDEX), index)
    hf = config.to_hf()
    torch_dtype = _TORCH_DTYPE_NAMES[tensors[0].dtype]
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
