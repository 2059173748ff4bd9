"""Decoder-only transformer shared by Qwen2/2.5, Llama 3.x and Mistral, in Flax NNX.

Layers are stacked (every per-layer parameter has a leading [L] axis) and run
with `jax.lax.scan`, so compile time does not grow with depth. The forward is
a pure function of its inputs: the KV cache is an explicit pytree passed in
and returned, so the sampler and the train step can jit it.

Attention masking is by *slot*: tokens are written to consecutive slots (of the
input when there is no cache, of the cache otherwise), a query at slot i sees
valid keys at slots <= i. Rows may be left- or right-padded; padding tokens
have `mask == False` and their outputs are finite garbage.
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reflax.models.config import ModelConfig
from reflax.sharding import CACHE_AXES, CACHE_MASK_AXES, constrain

_NEG_INF = -1e30  # finite, so rows with no valid key (padding) give no NaN


class KVCache(flax.struct.PyTreeNode):
    """Keys and values of every layer, written slot by slot."""

    k: jax.Array  # [L, B, S, K, Dh]
    v: jax.Array  # [L, B, S, K, Dh]
    mask: jax.Array  # [B, S] bool: the slot holds a real token
    index: jax.Array  # [] int32: next slot to write, shared by all rows

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, size: int, dtype: Any = jnp.float32) -> KVCache:
        shape = (config.num_layers, batch, size, config.num_kv_heads, config.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            mask=jnp.zeros((batch, size), bool),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def size(self) -> int:
        return self.k.shape[2]

    def constrain(self) -> KVCache:
        return self.replace(
            k=constrain(self.k, CACHE_AXES),
            v=constrain(self.v, CACHE_AXES),
            mask=constrain(self.mask, CACHE_MASK_AXES),
        )


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [Dh/2] float32, as transformers computes them (incl. llama3 scaling)."""
    dim = config.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
    scaling = config.rope_scaling_dict
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / np.float32(scaling["factor"])
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding in the rotate-half layout of HF checkpoints. x [B,T,H,Dh]."""
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, Dh]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(jnp.float32) * jnp.cos(emb) + rotated * jnp.sin(emb)).astype(x.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def _dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
    y = jnp.einsum("btd,df->btf", x, kernel)
    return y if bias is None else y + bias


def param_shapes(config: ModelConfig) -> dict[str, Any]:
    """Shapes of every parameter, nested like the module: {"embed": ..., "layers": {...}}."""
    c = config
    L, D, F, V, Dh = c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size, c.head_dim
    H, K = c.num_heads, c.num_kv_heads
    layers = {
        "attn_norm": (L, D),
        "q_proj": (L, D, H * Dh),
        "k_proj": (L, D, K * Dh),
        "v_proj": (L, D, K * Dh),
        "o_proj": (L, H * Dh, D),
        "mlp_norm": (L, D),
        "gate_proj": (L, D, F),
        "up_proj": (L, D, F),
        "down_proj": (L, F, D),
    }
    if c.qkv_bias:
        layers.update(q_bias=(L, H * Dh), k_bias=(L, K * Dh), v_bias=(L, K * Dh))
    if c.o_bias:
        layers["o_bias"] = (L, D)
    if c.mlp_bias:
        layers.update(gate_bias=(L, F), up_bias=(L, F), down_bias=(L, D))
    shapes: dict[str, Any] = {"embed": (V, D), "layers": layers, "final_norm": (D,)}
    if not c.tie_word_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


class Layers(nnx.Module):
    """Per-layer parameters stacked along a leading [L] axis."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], rngs: nnx.Rngs, param_dtype: Any):
        for name, shape in shapes.items():
            if name.endswith("norm"):
                value = jnp.ones(shape, param_dtype)
            elif name.endswith("bias"):
                value = jnp.zeros(shape, param_dtype)
            else:
                value = 0.02 * jax.random.normal(rngs.params(), shape, param_dtype)
            setattr(self, name, nnx.Param(value))


class Decoder(nnx.Module):
    """Causal LM. `__call__(tokens, positions, mask, cache)` -> (logits, cache)."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        rngs: nnx.Rngs,
        param_dtype: Any = jnp.float32,
        dtype: Any = jnp.float32,
        remat: bool = False,
    ):
        self.config = config
        self.dtype = dtype  # compute dtype; parameters are cast to it in the forward
        self.remat = remat
        shapes = param_shapes(config)
        init = lambda shape: 0.02 * jax.random.normal(rngs.params(), shape, param_dtype)
        self.embed = nnx.Param(init(shapes["embed"]))
        self.layers = Layers(shapes["layers"], rngs, param_dtype)
        self.final_norm = nnx.Param(jnp.ones(shapes["final_norm"], param_dtype))
        self.lm_head = nnx.Param(init(shapes["lm_head"])) if "lm_head" in shapes else None

    def lm_head_kernel(self) -> jax.Array:
        """[D, V] output projection (the transposed embedding when tied)."""
        if self.lm_head is None:
            return self.embed[...].T
        return self.lm_head[...]

    def hidden_states(
        self,
        tokens: jax.Array,  # [B, T] int32
        positions: jax.Array,  # [B, T] int32
        mask: jax.Array,  # [B, T] bool, False on padding
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-norm hidden states [B, T, D] and the updated cache."""
        c = self.config
        B, T = tokens.shape
        dt = self.dtype
        embed = self.embed[...].astype(dt)
        x = constrain(jnp.take(embed, tokens, axis=0), ("batch", "length", "embed"))
        layer_params = {
            k: v[...].astype(dt) for k, v in vars(self.layers).items() if isinstance(v, nnx.Param)
        }
        inv_freq = jnp.asarray(rope_inv_freq(c))

        if cache is None:
            slots = jnp.arange(T)
            key_mask = mask  # [B, T]
            start = None
        else:
            start = cache.index
            slots = start + jnp.arange(T)
            key_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, start))  # [B, S]
        key_slots = jnp.arange(key_mask.shape[1])
        # [B, 1, 1, T, S]: valid key at or before the query's slot
        attn_mask = (
            key_mask[:, None, None, None, :]
            & (key_slots[None, :] <= slots[:, None])[None, None, None]
        )

        def layer(x, p, k_cache, v_cache):
            h = rms_norm(x, p["attn_norm"], c.rms_norm_eps)
            q = _dense(h, p["q_proj"], p.get("q_bias")).reshape(B, T, c.num_heads, c.head_dim)
            k = _dense(h, p["k_proj"], p.get("k_bias")).reshape(B, T, c.num_kv_heads, c.head_dim)
            v = _dense(h, p["v_proj"], p.get("v_bias")).reshape(B, T, c.num_kv_heads, c.head_dim)
            q = constrain(apply_rope(q, positions, inv_freq), ("batch", "length", "heads", None))
            k = constrain(apply_rope(k, positions, inv_freq), ("batch", "length", "kv_heads", None))
            v = constrain(v, ("batch", "length", "kv_heads", None))
            if k_cache is not None:
                k_cache = jax.lax.dynamic_update_slice(
                    k_cache, k.astype(k_cache.dtype), (0, start, 0, 0)
                )
                v_cache = jax.lax.dynamic_update_slice(
                    v_cache, v.astype(v_cache.dtype), (0, start, 0, 0)
                )
                k, v = k_cache.astype(dt), v_cache.astype(dt)
            groups = c.num_heads // c.num_kv_heads
            q = q.reshape(B, T, c.num_kv_heads, groups, c.head_dim)
            scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
            scores = jnp.where(attn_mask, scores / math.sqrt(c.head_dim), _NEG_INF)
            probs = jax.nn.softmax(scores, axis=-1).astype(dt)
            out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(B, T, -1)
            x = x + _dense(out, p["o_proj"], p.get("o_bias"))
            h = rms_norm(x, p["mlp_norm"], c.rms_norm_eps)
            gate = _dense(h, p["gate_proj"], p.get("gate_bias"))
            up = _dense(h, p["up_proj"], p.get("up_bias"))
            act = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
            x = x + _dense(act, p["down_proj"], p.get("down_bias"))
            return constrain(x, ("batch", "length", "embed")), k_cache, v_cache

        if cache is None:
            body = lambda x, p: (layer(x, p, None, None)[0], None)
            if self.remat:
                body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
            x, _ = jax.lax.scan(body, x, layer_params)
            new_cache = None
        else:

            def body(x, xs):
                p, kc, vc = xs
                x, kc, vc = layer(x, p, kc, vc)
                return x, (kc, vc)

            x, (ks, vs) = jax.lax.scan(body, x, (layer_params, cache.k, cache.v))
            new_cache = KVCache(k=ks, v=vs, mask=key_mask, index=start + T).constrain()
        x = rms_norm(x, self.final_norm[...].astype(dt), c.rms_norm_eps)
        return x, new_cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[B, T, D] -> [B, T, V] float32."""
        kernel = self.lm_head_kernel().astype(self.dtype)
        logits = jnp.einsum("btd,dv->btv", hidden, kernel, preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "length", "vocab"))

    def __call__(
        self,
        tokens: jax.Array,  # [B, T] int32
        positions: jax.Array | None = None,  # [B, T] int32
        mask: jax.Array | None = None,  # [B, T] bool
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        if mask is None:
            mask = jnp.ones(tokens.shape, bool)
        if positions is None:
            positions = positions_from_mask(mask)
        hidden, cache = self.hidden_states(tokens, positions, mask, cache)
        return self.logits(hidden), cache


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Positions counting real tokens only: left padding does not shift them. [B, T] int32."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)
