"""Decoder model, its config, and creation of parameters already sharded on a mesh."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from reflax.models.config import ModelConfig, UnsupportedModelError
from reflax.models.decoder import Decoder, KVCache, param_shapes, positions_from_mask
from reflax.sharding import param_shardings

__all__ = [
    "Decoder",
    "KVCache",
    "ModelConfig",
    "UnsupportedModelError",
    "abstract_model",
    "create",
    "param_shapes",
    "positions_from_mask",
]


def abstract_model(config: ModelConfig, **kwargs: Any) -> Decoder:
    """The model with ShapeDtypeStructs for parameters: no memory, no compute."""
    return nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0), **kwargs))


def create(
    config: ModelConfig,
    *,
    mesh: Mesh | None = None,
    seed: int = 0,
    param_dtype: Any = jnp.float32,
    dtype: Any = jnp.float32,
    remat: bool = False,
) -> Decoder:
    """A randomly initialised model whose parameters are created in their shards.

    The init is jitted with out_shardings, so no host or device ever holds the
    whole model (unless the mesh is a single device).
    """
    kwargs = dict(param_dtype=param_dtype, dtype=dtype, remat=remat)
    graphdef, abstract_state = nnx.split(abstract_model(config, **kwargs))
    shardings = param_shardings(abstract_state, mesh) if mesh is not None else None

    @jax.jit
    def init():
        return nnx.state(Decoder(config, rngs=nnx.Rngs(seed), **kwargs))

    if shardings is not None:
        init = jax.jit(init, out_shardings=shardings)
    return nnx.merge(graphdef, init())
