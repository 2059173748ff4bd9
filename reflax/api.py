"""The three calls most users need: load a checkpoint, compute logits, save.

    model, tokenizer = reflax.load("Qwen/Qwen2.5-0.5B-Instruct")     # or a local directory,
                                                                     # or a .gguf file
    ids = tokenizer.encode("The capital of France is")
    next_token = reflax.logits(model, ids)[-1].argmax()
    reflax.save(model, "/tmp/my-model", tokenizer)  # or gs://...; transformers can load it

`load(..., mesh=reflax.sharding.make_mesh({"fsdp": -1}))` shards the parameters
over all devices as they are read; `logits` then runs sharded too.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from reflax import distributed, storage
from reflax.models import lora
from reflax.models.decoder import Decoder
from reflax.models.gguf import gguf_has_tokenizer, load_gguf
from reflax.models.hf import load_pretrained, resolve_checkpoint, save_pretrained
from reflax.tokenizer import is_gguf, load_tokenizer

__all__ = ["load", "logits", "save"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load(
    path_or_id: str | os.PathLike,
    *,
    dtype: Any = "float32",
    mesh: Mesh | None = None,
    revision: str | None = None,
) -> tuple[Decoder, Any]:
    """(model, tokenizer) from a local directory, Hub id or GGUF file; tokenizer is None if it
    has none.

    `dtype` ("float32", "bfloat16") is both the parameter and the compute dtype; a GGUF
    file's (quantized) tensors are dequantized to it, its tokenizer and chat template come
    from the file's metadata.
    """
    dt = jnp.dtype(dtype)
    if is_gguf(path_or_id):
        model = load_gguf(path_or_id, mesh=mesh, param_dtype=dt, dtype=dt)
        return model, load_tokenizer(path_or_id) if gguf_has_tokenizer(path_or_id) else None
    path = resolve_checkpoint(path_or_id, revision=revision)
    model = load_pretrained(path, mesh=mesh, param_dtype=dt, dtype=dt)
    has_tokenizer = any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES)
    return model, load_tokenizer(path) if has_tokenizer else None


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef: Any, state: Any, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, state)
    out, _ = model(tokens, None, mask)
    return out


def _mesh_of(state: Any) -> Mesh | None:
    for leaf in jax.tree.leaves(state):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


def logits(model: Decoder, tokens: Any, mask: Any = None) -> jax.Array:
    """Next-token logits float32: tokens [B, T] -> [B, T, V], or [T] -> [T, V].

    `mask` [B, T] bool marks real tokens (False on left or right padding);
    positions count real tokens only. Jitted; runs on the parameters' mesh.
    """
    tokens = np.asarray(tokens, np.int32)
    single = tokens.ndim == 1
    if single:
        tokens = tokens[None]
    mask = (
        np.ones(tokens.shape, bool)
        if mask is None
        else np.asarray(mask, bool).reshape(tokens.shape)
    )
    graphdef, state = nnx.split(model)
    mesh = _mesh_of(state)
    if mesh is None:
        out = _forward(graphdef, state, tokens, mask)
    else:
        with jax.set_mesh(mesh):
            out = _forward(graphdef, state, tokens, mask)
    return out[0] if single else out


def save(model: Decoder, path: str | os.PathLike, tokenizer: Any = None) -> None:
    """A transformers-loadable checkpoint (config, safetensors, tokenizer) in `path`, a local
    directory or a bucket (gs://...), which holds the whole checkpoint or the previous one.
    A model with LoRA adapters is saved merged (W + A @ B * alpha / r)."""
    with storage.staged_dir(path, publish=distributed.is_primary()) as staged:
        save_pretrained(lora.merged(model), staged, tokenizer=tokenizer)
