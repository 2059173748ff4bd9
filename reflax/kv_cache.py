"""The sampler's KV cache: its dtype ("auto" per platform), its bytes per device for one
program call (what `rollout.kv_cache_bytes` budgets), and the rows a continuation takes
in place on every batch shard."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from reflax.models.decoder import KVCache
from reflax.sharding import CACHE_AXES, CACHE_MASK_AXES, constrain


def is_auto(cache_dtype: Any) -> bool:
    return isinstance(cache_dtype, str) and cache_dtype == "auto"


def resolve_cache_dtype(cache_dtype: Any, compute_dtype: Any, platform: str) -> np.dtype:
    """The KV cache dtype: "auto" is bfloat16 on TPU (half the cache of float32, the
    dtype its matmul units take) and the model's compute dtype elsewhere; any other
    value is a dtype name or dtype."""
    if is_auto(cache_dtype):
        return jnp.dtype(jnp.bfloat16 if platform == "tpu" else compute_dtype)
    return jnp.dtype(cache_dtype)


def kv_slot_bytes(config: Any, cache_dtype: Any) -> int:
    """Bytes of one cache slot of one row: keys and values of every layer."""
    return (
        config.num_layers
        * 2
        * config.num_kv_heads
        * config.head_dim
        * (jnp.dtype(cache_dtype).itemsize)
    )


def kv_cache_bytes(
    config: Any,
    cache_dtype: Any,
    *,
    groups: int,
    num_samples: int,
    prefix_size: int,
    gen_len: int,
    keep_cache: bool,
    batch_shards: int = 1,
) -> int:
    """KV cache bytes per device of one program call: `groups` prefix rows of
    `prefix_size` slots (the prefilled cache and its heads-first decoding copy), their
    groups * num_samples decoding rows of `gen_len` slots, and with `keep_cache` the
    materialised cache those rows return (prefix + gen_len slots each). Rows are split
    over `batch_shards` devices."""
    slot = kv_slot_bytes(config, cache_dtype)
    rows = -(-groups * num_samples // batch_shards)
    per_row = gen_len + (prefix_size + gen_len if keep_cache else 0)
    return slot * (-(-groups // batch_shards) * 2 * prefix_size + rows * per_row)


def shard_block(cache: KVCache, shards: int, block: jax.Array, rows: int) -> KVCache:
    """`rows` rows of the cache: u = rows / shards of each batch shard's own rows, from
    row block * u of the shard (moved back to end at the shard's last row, as
    `dynamic_slice` clamps it): a slice within every shard, no row crosses devices."""

    def take(a: jax.Array, axis: int, logical: tuple) -> jax.Array:
        n, u = a.shape[axis], rows // shards
        split = a.reshape(*a.shape[:axis], shards, n // shards, *a.shape[axis + 1 :])
        split = constrain(split, (*logical[:axis], "batch", None, *logical[axis + 1 :]))
        part = jax.lax.dynamic_slice_in_dim(split, block * u, u, axis=axis + 1)
        return part.reshape(*a.shape[:axis], rows, *a.shape[axis + 1 :])

    k, v = (take(a, 1, CACHE_AXES) for a in (cache.k, cache.v))
    return cache.replace(k=k, v=v, mask=take(cache.mask, 0, CACHE_MASK_AXES))
