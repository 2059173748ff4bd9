"""GGUF files in: llama.cpp's single-file checkpoints -> sharded `Decoder` parameters.

A GGUF file holds the architecture's hyper-parameters and the tokenizer (vocabulary,
merges, chat template) as metadata, and every tensor, often quantized in blocks along
its rows (Q4_1, Q8_0, Q6_K, ...). Loading maps the metadata to a `ModelConfig`, names
each reflax parameter's HF tensors in GGUF's convention (`model.layers.3.self_attn.
q_proj.weight` -> `blk.3.attn_q.weight`, gguf-py's own table), and builds every
parameter in its shards with `jax.make_array_from_callback`: the rows of each layer's
GGUF tensor that this process's shards need are dequantized (gguf-py's `dequantize`)
from the memory-mapped file once, in bounded blocks, and cast into the shards, so the
host holds the shards and one block, never a whole dequantized model.

GGUF stores a weight in HF's [out, in] row order, except that llama.cpp's converter
permutes the rows of llama's q and k weights within each head, interleaving the two
rotary halves; loading undoes that. The result is an ordinary model: `reflax.save`
writes it as HF safetensors.

Everything (architecture, hyper-parameters, every tensor's presence, shape and type,
that its quantization can be dequantized) is checked before a device array is made.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from reflax.checkpoint import CheckpointError
from reflax.models import abstract_model
from reflax.models.config import ModelConfig, UnsupportedModelError
from reflax.models.decoder import Decoder
from reflax.models.hf import ParamSpec, hf_param_specs
from reflax.sharding import param_shardings

try:  # an optional dependency (the `gguf` extra): only loading a GGUF file needs it
    import gguf
except ImportError:  # pragma: no cover - exercised where gguf is not installed
    gguf = None

log = logging.getLogger(__name__)

# GGUF `general.architecture` -> reflax model_type; llama.cpp permutes q/k rows of these
SUPPORTED_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_PERMUTED_QK = ("llama",)
# integer tensor types: GGUF allows them, but they are no weights
_INT_TYPES = ("I8", "I16", "I32", "I64")
_BLOCK_VALUES = 1 << 22  # values dequantized at a time (16 MB as float32)


def _require_gguf() -> None:
    if gguf is None:
        raise ImportError(
            "loading a GGUF file needs the `gguf` package: pip install 'reflax[gguf]'"
        )


def open_gguf(path: str | os.PathLike) -> Any:
    """A `gguf.GGUFReader` over the file (memory-mapped; tensors are read on access)."""
    _require_gguf()
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise CheckpointError(f"GGUF file {path} does not exist")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # bad magic, truncated header, unknown value type: one message
        raise CheckpointError(
            f"{path}: not a readable GGUF file: {type(e).__name__}: {e}"
        ) from None


def gguf_has_tokenizer(path: str | os.PathLike) -> bool:
    """Whether a GGUF file's metadata holds a tokenizer (llama.cpp's files always do)."""
    return "tokenizer.ggml.model" in open_gguf(path).fields


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_gguf_config(reader: Any) -> ModelConfig:
    """The `ModelConfig` of a GGUF file, from its metadata (as transformers maps it)."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{reader.data.filename}: unsupported GGUF architecture {arch!r}; reflax reads "
            f"{sorted(SUPPORTED_ARCHITECTURES)}"
        )
    tensors = {t.name: t for t in reader.tensors}

    def key(name: str, default: Any = None) -> Any:
        value = _field(reader, f"{arch}.{name}", default)
        if value is None:
            raise CheckpointError(f"{reader.data.filename}: GGUF metadata has no {arch}.{name}")
        return value

    if _field(reader, f"{arch}.expert_count"):
        raise UnsupportedModelError(f"{reader.data.filename}: mixture-of-experts GGUF models")
    if "rope_freqs.weight" in tensors:  # llama 3.1's scaled frequencies, stored precomputed
        raise UnsupportedModelError(
            f"{reader.data.filename}: GGUF with precomputed rope frequencies (rope_freqs.weight)"
        )
    heads, kv_heads = key("attention.head_count"), key("attention.head_count_kv", 0)
    if isinstance(heads, list) or isinstance(kv_heads, list):
        raise UnsupportedModelError(f"{reader.data.filename}: per-layer head counts")
    hidden = key("embedding_length")
    head_dim = key("attention.key_length", hidden // heads)
    if key("rope.dimension_count", head_dim) != head_dim:
        raise UnsupportedModelError(f"{reader.data.filename}: partial rotary embeddings")
    rope = {}
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        rope = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    elif scaling != "none":
        raise UnsupportedModelError(f"{reader.data.filename}: rope scaling {scaling!r}")
    vocab = _field(reader, f"{arch}.vocab_size") or len(
        _field(reader, "tokenizer.ggml.tokens", ()) or ()
    )
    if not vocab and "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[-1])
    hf = {
        "model_type": SUPPORTED_ARCHITECTURES[arch],
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(kv_heads or heads),
        "head_dim": int(head_dim),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "rope_scaling": rope or None,
        "max_position_embeddings": int(key("context_length")),
        "tie_word_embeddings": "output.weight" not in tensors,
        # llama GGUFs with attention / mlp biases carry the bias tensors
        "attention_bias": "blk.0.attn_o.bias" in tensors or "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
    }
    try:
        return ModelConfig.from_hf(hf)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{reader.data.filename}: {e}") from None


def gguf_names(config: ModelConfig, specs: Sequence[ParamSpec]) -> dict[str, str]:
    """HF tensor name -> GGUF tensor name for every tensor of `specs` (gguf-py's table)."""
    _require_gguf()
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == config.model_type)
    table = gguf.get_tensor_name_map(arch, config.num_layers)
    out = {}
    for spec in specs:
        for hf in spec.hf_names:
            base, suffix = hf.rsplit(".", 1)  # "...q_proj", "weight"
            name = table.get_name(base)
            if name is None:
                raise UnsupportedModelError(f"GGUF has no name for the HF tensor {hf!r}")
            out[hf] = f"{name}.{suffix}"
    return out


def _check_tensors(
    reader: Any, specs: Sequence[ParamSpec], names: dict[str, str]
) -> dict[str, Any]:
    """HF name -> the GGUF ReaderTensor, each present with its expected shape and a type
    that dequantizes to floats."""
    file = reader.data.filename
    tensors = {t.name: t for t in reader.tensors}
    missing = [names[n] for s in specs for n in s.hf_names if names[n] not in tensors]
    if missing:
        raise CheckpointError(f"{file}: missing tensor {missing[0]!r} ({len(missing)} missing)")
    unused = set(tensors) - set(names.values())
    if unused:
        log.info("ignoring %d GGUF tensors: %s", len(unused), sorted(unused)[:5])
    out = {}
    for s in specs:
        for hf in s.hf_names:
            t = tensors[names[hf]]
            shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
            if shape != s.hf_shape:
                raise CheckpointError(
                    f"{file}: tensor {t.name!r} has shape {list(shape)}, expected "
                    f"{list(s.hf_shape)} from the file's metadata"
                )
            kind = t.tensor_type.name
            if kind in _INT_TYPES:
                raise CheckpointError(f"{file}: tensor {t.name!r} holds integers ({kind})")
            try:  # the first row: does gguf-py know this quantization?
                gguf.dequantize(t.data[:1], t.tensor_type)
            except NotImplementedError:
                raise UnsupportedModelError(
                    f"{file}: tensor {t.name!r} is quantized as {kind}, which gguf-py cannot "
                    "dequantize"
                ) from None
            out[hf] = t
    return out


def _rows(tensor: Any, r0: int, r1: int, heads: int | None) -> np.ndarray:
    """Rows r0..r1 of a GGUF tensor in HF layout, float32. `heads`: the tensor is a llama
    q/k weight whose rows llama.cpp permuted within each of its `heads` heads; whole heads
    are dequantized and un-permuted, then cut to r0..r1."""
    if heads is None:
        return np.asarray(gguf.dequantize(tensor.data[r0:r1], tensor.tensor_type), np.float32)
    size = int(tensor.shape[-1]) // heads  # rows per head
    h0, h1 = r0 // size * size, -(-r1 // size) * size
    w = np.asarray(gguf.dequantize(tensor.data[h0:h1], tensor.tensor_type), np.float32)
    # llama.cpp: w.reshape(heads, 2, size // 2, in).swapaxes(1, 2); this is its inverse
    w = w.reshape(-1, size // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    return w[r0 - h0 : r1 - h0]


Index = tuple[tuple[int, int], ...]  # (start, stop) per axis of a parameter's shard


def _hf_index(spec: ParamSpec, index: Index) -> Index:
    """A shard's index into one layer's HF tensor ([out, in] rows first)."""
    inner = index[1:] if spec.stacked else index
    return inner[::-1] if spec.transpose else inner


def _build_shards(
    spec: ParamSpec,
    tensors: dict[str, Any],
    heads: int | None,
    indices: set[Index],
    dtype: np.dtype,
) -> dict[Index, np.ndarray]:
    """Every shard `param[index]` this process needs, in `dtype`, filled in one pass.

    Shards that cut the HF tensor's columns (e.g. fsdp over the [in] axis) need the same
    rows: each layer's rows are dequantized once for all of them, in blocks of about
    _BLOCK_VALUES values (whole heads for a permuted q/k), so the host holds the shards
    plus one block, never a whole dequantized tensor."""
    shards = {idx: np.empty(tuple(b - a for a, b in idx), dtype) for idx in indices}
    for layer, name in enumerate(spec.hf_names):
        users = [i for i in shards if not spec.stacked or i[0][0] <= layer < i[0][1]]
        if not users:
            continue
        r0 = min(_hf_index(spec, i)[0][0] for i in users)
        r1 = max(_hf_index(spec, i)[0][1] for i in users)
        tensor = tensors[name]
        row = max(1, int(np.prod(spec.hf_shape[1:])))
        step = max(1, _BLOCK_VALUES // row)
        if heads is not None:  # blocks of whole heads (_rows would widen a cut head)
            size = spec.hf_shape[0] // heads
            step = -(-step // size) * size
            r0 = r0 // size * size
        for b0 in range(r0, r1, step):
            b1 = min(b0 + step, r1)
            block = _rows(tensor, b0, b1, heads)
            for idx in users:
                (a, b), rest = _hf_index(spec, idx)[0], _hf_index(spec, idx)[1:]
                lo, hi = max(a, b0), min(b, b1)
                if lo >= hi:
                    continue
                part = block[(slice(lo - b0, hi - b0), *(slice(c, d) for c, d in rest))]
                dst = shards[idx][layer - idx[0][0]] if spec.stacked else shards[idx]
                if spec.transpose:  # HF rows lo..hi are the kernel's columns
                    dst[..., lo - a : hi - a] = part.T
                else:
                    dst[lo - a : hi - a] = part
    return shards


def load_gguf(
    path: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    param_dtype: Any = jnp.float32,
    dtype: Any = jnp.float32,
    remat: bool = False,
) -> Decoder:
    """A `Decoder` with a GGUF file's weights, dequantized to `param_dtype`, each parameter
    created in its shards (laid out by `reflax.sharding.param_shardings` on `mesh`, else on
    the first device). Problems raise `CheckpointError` / `UnsupportedModelError`."""
    reader = open_gguf(path)
    config = read_gguf_config(reader)
    specs = hf_param_specs(config)
    tensors = _check_tensors(reader, specs, gguf_names(config, specs))
    heads = {}
    if _field(reader, "general.architecture") in _PERMUTED_QK:
        q, k = config.num_heads, config.num_kv_heads  # the biases are permuted alike
        heads = {"q_proj": q, "q_bias": q, "k_proj": k, "k_bias": k}

    graphdef, abstract = nnx.split(
        abstract_model(config, param_dtype=param_dtype, dtype=dtype, remat=remat)
    )
    if mesh is not None:
        shardings = param_shardings(abstract, mesh)
    else:
        device = SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    by_key = {s.key: s for s in specs}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    arrays = []
    for (keys, leaf), sharding in zip(leaves, jax.tree.leaves(shardings)):
        spec = by_key[tuple(k.key for k in keys if isinstance(k, jax.tree_util.DictKey))]
        wanted = {  # this process's shards; replicas share one index
            tuple(s.indices(d)[:2] for s, d in zip(index, leaf.shape))
            for index in sharding.addressable_devices_indices_map(leaf.shape).values()
        }
        shards = _build_shards(spec, tensors, heads.get(spec.key[-1]), wanted, leaf.dtype)

        def callback(index: tuple[slice, ...], leaf=leaf, shards=shards) -> np.ndarray:
            return shards[tuple(s.indices(d)[:2] for s, d in zip(index, leaf.shape))]

        array = jax.make_array_from_callback(leaf.shape, sharding, callback, dtype=leaf.dtype)
        arrays.append(array.block_until_ready())  # then the host shards can go
        del shards
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, arrays))
