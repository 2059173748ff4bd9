"""Decoder-only transformer shared by Qwen2/2.5, Qwen3, Llama 3.x, Mistral and Phi-3,
in Flax NNX.

The layer math lives in one pure function, `block` (norm -> q/k/v -> q/k norm ->
rope -> attention -> o -> norm -> SwiGLU). The caller supplies the attention:
the decoder's forward (training, prefill) attends over the input or its
`KVCache`; the sampler's decode step over a shared prefix plus per-row new slots
(`attention` over `KVBlock`s, one softmax over all of them).

Layers are stacked (every per-layer parameter has a leading [L] axis) and run
with `jax.lax.scan`, so compile time does not grow with depth. The forward is
a pure function of its inputs: the KV cache is an explicit pytree passed in
and returned, so the sampler and the train step can jit it.

Attention masking is by *slot*: tokens are written to consecutive slots (of the
input when there is no cache, of the cache otherwise), a query at slot i sees
valid keys at slots <= i. Rows may be left- or right-padded; padding tokens
have `mask == False` and their outputs are finite garbage. A sliding window
counts positions (a row's real tokens), not slots: a query at position p sees
keys at positions > p - window, so padding never shifts it (transformers counts
slots, left padding included). A cache's key positions are the count of real
slots before them, since a cache row holds all of its row's tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reflax.models.attention_kernels import Layout, cudnn_attention, resolve, splash_attention
from reflax.models.config import ModelConfig
from reflax.sharding import CACHE_AXES, CACHE_MASK_AXES, LORA_A, LORA_B, constrain

_NEG_INF = -1e30  # finite, so rows with no valid key (padding) give no NaN
F32 = jnp.float32
_NO_WINDOW = 2**30  # the window of a full-attention layer: no position difference reaches it


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


def rope_inv_freq(config: ModelConfig, long: bool = False) -> np.ndarray:
    """Inverse frequencies [R/2] float32 (R rotary dims), as transformers computes them.

    `long`: longrope's long factors (used once a call sees a position past the original
    context); otherwise its short factors.
    """
    dim = config.rotary_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    base = np.float32(config.rope_theta) ** exponent
    inv_freq = (1.0 / base).astype(np.float32)
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
    elif kind == "longrope":
        ext = np.asarray(scaling["long_factor" if long else "short_factor"], np.float32)
        inv_freq = (1.0 / (ext * base)).astype(np.float32)
    return inv_freq


def rope_attention_factor(config: ModelConfig) -> float:
    """The scale transformers puts on cos and sin (longrope: from the context extension)."""
    scaling = config.rope_scaling_dict
    if scaling.get("rope_type") != "longrope":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or config.max_position_embeddings / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


class Rope(flax.struct.PyTreeNode):
    """cos and sin of every token's rotary angles, computed once per forward, used by every
    layer."""

    cos: jax.Array  # [B, T, R] float32, R = rotary dims
    sin: jax.Array  # [B, T, R]


def rope_tables(config: ModelConfig, positions: jax.Array) -> Rope:
    """Rotary tables for positions [B, T].

    longrope switches to its long factors for the whole call when the call's largest
    position reaches the original context, as transformers' forward does (its generate
    then recomputes the cache; the sampler refuses to decode past that point instead).
    """
    inv_freq = jnp.asarray(rope_inv_freq(config))
    if config.rope_scaling_dict.get("rope_type") == "longrope":
        original = config.rope_scaling_dict["original_max_position_embeddings"]
        long = jnp.max(positions) + 1 > original
        inv_freq = jnp.where(long, jnp.asarray(rope_inv_freq(config, long=True)), inv_freq)
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, R/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    scale = rope_attention_factor(config)
    return Rope(cos=jnp.cos(emb) * scale, sin=jnp.sin(emb) * scale)


def apply_rope(x: jax.Array, rope: Rope) -> jax.Array:
    """Rotary embedding in the rotate-half layout of HF checkpoints, on the first R of the
    Dh dims (all of them unless the model rotates part). x [B, T, H, Dh]."""
    R = rope.cos.shape[-1]
    xf = x.astype(jnp.float32)
    rot, rest = xf[..., :R], xf[..., R:]
    x1, x2 = jnp.split(rot, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = rope.cos[:, :, None, :], rope.sin[:, :, None, :]
    out = rot * cos + rotated * sin
    if x.shape[-1] > R:
        out = jnp.concatenate([out, rest], axis=-1)
    return out.astype(x.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def _dense(p: dict[str, jax.Array], x: jax.Array, name: str, bias: str) -> jax.Array:
    """x [B, T, in] @ the projection `name` [in, out] (+ its bias): x @ W, plus (x @ A) @ B
    where the projection carries a LoRA adapter (reflax.models.lora; `Decoder.weights` has
    scaled B by alpha / r), never a merged W + A @ B."""
    y = jnp.einsum("btd,df->btf", x, p[name])
    if name + LORA_A in p:
        low = jnp.einsum("btd,dr->btr", x, p[name + LORA_A])  # [B, T, r]
        y = y + jnp.einsum("btr,rf->btf", low, p[name + LORA_B])
    return y if bias not in p else y + p[bias]


# --------------------------------------------------------------------------- attention


class KVBlock(NamedTuple):
    """Keys and values a batch of queries attends to, with the validity of each (query, key).

    The R rows of k/v serve B = R * G query rows: query row b reads row b // G, so G
    queries share one copy (the sampler's G samples of a prefix row). k/v are
    [R, S, K, Dh] (`heads_first` False, the `KVCache` layout) or [R, K, S, Dh].
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array  # [R or B, T or 1, S] bool: query (row, t) may attend to key s
    heads_first: bool = False


def attention(q: jax.Array, blocks: Sequence[KVBlock]) -> jax.Array:
    """Grouped-query attention of q [B, T, H, Dh] over the blocks' keys with one softmax
    over all of them -> [B, T, H * Dh]. Keys are read in the compute dtype of q.

    Scores are laid out [R0, K, B // R0, T, H // K, S] for the block with the fewest rows
    (R0: the shared prefix when decoding), which is how its matmul produces them, so only
    the other blocks' scores are rearranged to join the softmax.
    """
    B, T, H, Dh = q.shape
    dt = q.dtype
    K = blocks[0].k.shape[1 if blocks[0].heads_first else 2]
    Gq = H // K
    R0 = min(blk.k.shape[0] for blk in blocks)

    def common(x: jax.Array, R: int) -> jax.Array:  # [R, K, B/R, ...] -> [R0, K, B/R0, ...]
        if R == R0:
            return x
        x = jnp.moveaxis(x.reshape(R0, R // R0, *x.shape[1:]), 1, 2)
        return x.reshape(R0, K, B // R0, *x.shape[4:])

    def own(x: jax.Array, R: int) -> jax.Array:  # the inverse of `common`
        if R == R0:
            return x
        x = jnp.moveaxis(x.reshape(R0, K, R // R0, B // R, *x.shape[3:]), 2, 1)
        return x.reshape(R, K, B // R, *x.shape[4:])

    def spec(blk: KVBlock) -> str:
        return "rksd" if blk.heads_first else "rskd"

    scores = []
    for blk in blocks:
        R, S = blk.k.shape[0], blk.valid.shape[-1]
        qr = q.reshape(R, B // R, T, K, Gq, Dh)
        s = jnp.einsum(
            f"rgtkhd,{spec(blk)}->rkgths", qr, blk.k.astype(dt), preferred_element_type=F32
        )
        valid = blk.valid.reshape(R, 1, -1, blk.valid.shape[1], 1, S)  # rows: R, or R x g
        scores.append(common(jnp.where(valid, s / math.sqrt(Dh), _NEG_INF), R))
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1) if len(scores) > 1 else scores[0])
    probs = probs.astype(dt)
    out, start = None, 0
    for blk in blocks:
        R, S = blk.k.shape[0], blk.valid.shape[-1]
        p = own(probs[..., start : start + S], R)
        o = jnp.einsum(f"rkgths,{spec(blk)}->rgtkhd", p, blk.v.astype(dt))
        out = o.reshape(B, T, H * Dh) if out is None else out + o.reshape(B, T, H * Dh)
        start += S
    return out


def window_valid(
    valid: jax.Array,  # [B, T, S] bool
    query_positions: jax.Array,  # [B, T] int32
    key_positions: jax.Array,  # [R, S] int32 (R = B, or B // G for shared keys)
    window: int | jax.Array | None,
) -> jax.Array:
    """valid & the key is among the `window` latest positions up to the query's
    (transformers' sliding window: key position > query position - window)."""
    if window is None:
        return valid
    R, S = key_positions.shape
    B, T = query_positions.shape
    dist = query_positions.reshape(R, B // R, T, 1) - key_positions[:, None, None, :]
    inside = valid.reshape(R, -1, valid.shape[1], S) & (dist < window)  # [R, G, T, S]
    return inside.reshape(B, T, S)


# --------------------------------------------------------------------------- the block

Attend = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]


def block(
    p: dict[str, jax.Array],  # one layer's parameters, in the compute dtype
    x: jax.Array,  # [B, T, D]
    rope: Rope,
    attend: Attend,
    config: ModelConfig,
) -> tuple[jax.Array, Any]:
    """One transformer layer: norm -> q/k/v (-> q/k norm) -> rope -> attention -> o ->
    norm -> SwiGLU, with residuals. The one place this math exists: the decoder's layer
    scan (training, prefill) and the sampler's decode loop both call it.

    `attend(q [B,T,H,Dh], k [B,T,K,Dh], v [B,T,K,Dh]) -> (out [B,T,H*Dh], aux)` is the
    caller's: it writes k/v where it keeps them (a cache, or nowhere) and attends over
    them; `aux` (e.g. the updated cache) is returned as is.
    """
    c = config
    B, T, _ = x.shape
    H, K, Dh = c.num_heads, c.num_kv_heads, c.head_dim
    h = rms_norm(x, p["attn_norm"], c.rms_norm_eps)
    q = _dense(p, h, "q_proj", "q_bias").reshape(B, T, H, Dh)
    k = _dense(p, h, "k_proj", "k_bias").reshape(B, T, K, Dh)
    v = _dense(p, h, "v_proj", "v_bias").reshape(B, T, K, Dh)
    if c.qk_norm:  # per head, before rope (Qwen3)
        q = rms_norm(q, p["q_norm"], c.rms_norm_eps)
        k = rms_norm(k, p["k_norm"], c.rms_norm_eps)
    q = constrain(apply_rope(q, rope), ("batch", "length", "heads", None))
    k = constrain(apply_rope(k, rope), ("batch", "length", "kv_heads", None))
    v = constrain(v, ("batch", "length", "kv_heads", None))
    out, aux = attend(q, k, v)
    x = x + _dense(p, out, "o_proj", "o_bias")
    h = rms_norm(x, p["mlp_norm"], c.rms_norm_eps)
    gate = _dense(p, h, "gate_proj", "gate_bias")
    up = _dense(p, h, "up_proj", "up_bias")
    act = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
    x = x + _dense(p, act, "down_proj", "down_bias")
    return constrain(x, ("batch", "length", "embed")), aux


def final_norm(weights: dict[str, Any], x: jax.Array, config: ModelConfig) -> jax.Array:
    return rms_norm(x, weights["final_norm"], config.rms_norm_eps)


def project(hidden: jax.Array, kernel: jax.Array) -> jax.Array:
    """Hidden states [B, T, D] -> logits [B, T, V] float32."""
    logits = jnp.einsum("btd,dv->btv", hidden, kernel, preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "length", "vocab"))


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
    if c.qk_norm:
        layers.update(q_norm=(L, Dh), k_norm=(L, Dh))
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
        # alpha / r of the LoRA adapters `reflax.models.lora.attach` adds to `layers`
        self.lora_scale: float | None = None

    def lm_head_kernel(self) -> jax.Array:
        """[D, V] output projection (the transposed embedding when tied)."""
        if self.lm_head is None:
            return self.embed[...].T
        return self.lm_head[...]

    def weights(self) -> dict[str, Any]:
        """Parameters cast to the compute dtype: embed [V, D], layers, final_norm [D] and
        lm_head [D, V] (the transposed embedding when tied). `layers` is a dict of stacked
        [L, ...] arrays, read one layer at a time by the layer scans of training, prefill
        and decode."""
        dt = self.dtype
        layers = {
            k: v[...].astype(dt) for k, v in vars(self.layers).items() if isinstance(v, nnx.Param)
        }
        for k in layers:  # a LoRA B [L, r, out] carries the scale, once per forward
            if k.endswith(LORA_B):
                layers[k] = (getattr(self.layers, k)[...] * self.lora_scale).astype(dt)
        return dict(
            embed=self.embed[...].astype(dt),
            layers=layers,
            final_norm=self.final_norm[...].astype(dt),
            lm_head=self.lm_head_kernel().astype(dt),
        )

    def hidden_states(
        self,
        tokens: jax.Array,  # [B, T] int32
        positions: jax.Array,  # [B, T] int32
        mask: jax.Array,  # [B, T] bool, False on padding
        cache: KVCache | None = None,
        layout: Layout | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-norm hidden states [B, T, D] and the updated cache.

        Without a cache, or with one this call fills (a fresh prefill), attention runs
        through `config.attention_impl`'s kernel (`attention_kernels`); `layout` (splash
        only) sets the regions of the rows, a causal row by default.
        """
        c = self.config
        T = tokens.shape[1]
        impl = resolve(c.attention_impl, self.dtype)
        fresh = impl != "xla" and (cache is None or cache.size == T)
        if layout is not None and not (fresh and impl == "splash"):
            raise ValueError("a row layout needs the splash attention and no cache")
        w = self.weights()
        x = constrain(jnp.take(w["embed"], tokens, axis=0), ("batch", "length", "embed"))
        rope = rope_tables(c, positions)

        if cache is None:
            slots = jnp.arange(T)
            key_mask = mask  # [B, T]
            key_positions = positions
            start = None
        else:
            start = cache.index
            slots = start + jnp.arange(T)
            key_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, start))  # [B, S]
            # a cache row holds all of its row's tokens, so a key's position is the count
            # of real slots before it (only sliding windows need it)
            key_positions = positions_from_mask(key_mask)
        key_slots = jnp.arange(key_mask.shape[1])
        # [B, T, S]: a valid key at or before the query's slot
        valid = key_mask[:, None, :] & (key_slots[None, :] <= slots[:, None])[None]

        def attend(kc, vc, window):
            def fn(q, k, v):
                if kc is not None:
                    kc_ = jax.lax.dynamic_update_slice(kc, k.astype(kc.dtype), (0, start, 0, 0))
                    vc_ = jax.lax.dynamic_update_slice(vc, v.astype(vc.dtype), (0, start, 0, 0))
                    k, v = kc_, vc_
                else:
                    kc_ = vc_ = None
                ok = window_valid(valid, positions, key_positions, window)
                if fresh and impl == "splash":
                    lay = layout or Layout(T)
                    out = splash_attention(q, k, v, mask, lay, window, c.layer_windows())
                elif fresh and impl == "cudnn":
                    out = cudnn_attention(q, k, v, ok)
                else:
                    out = attention(q, [KVBlock(k, v, ok)])
                return out, (kc_, vc_)

            return fn

        windows = _scanned_windows(c)
        xs = (w["layers"], windows)
        if cache is None:

            def body(x, xs):
                p, window = xs
                return block(p, x, rope, attend(None, None, window), c)[0], None

            if self.remat:
                body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
            x, _ = jax.lax.scan(body, x, xs)
            new_cache = None
        else:

            def body(x, xs):
                (p, window), kc, vc = xs
                return block(p, x, rope, attend(kc, vc, window), c)

            x, (ks, vs) = jax.lax.scan(body, x, (xs, cache.k, cache.v))
            new_cache = KVCache(k=ks, v=vs, mask=key_mask, index=start + T).constrain()
        return final_norm(w, x, c), new_cache

    def packed_hidden_states(
        self,
        tokens: jax.Array,  # [U, P] int32, P = prefix_len + G * Ls
        positions: jax.Array,  # [U, P] int32
        mask: jax.Array,  # [U, P] bool
        prefix_len: int,
        group_size: int,
    ) -> tuple[jax.Array, jax.Array]:
        """Final-norm hidden states of group-packed rows: (prefix [U, Lp, D], suffixes
        [U * G, Ls, D]).

        A row is `[prefix | suffix_1 | ... | suffix_G]`: the group's shared prefix
        (left-padded to `prefix_len` slots) and then G suffix regions of Ls slots each
        (right-padded). The prefix attends causally to itself; suffix g to the prefix and
        causally to itself, through the same `attention` the sampler's decode step uses
        (a shared prefix `KVBlock` read by G query rows plus each row's own block), so no
        score is ever computed between two suffixes or for a padded [P, P] square. With
        splash attention the whole row runs at once under a mask of these regions, whose
        kernel skips the blocks between two suffixes.
        """
        c = self.config
        U, P = tokens.shape
        Lp, G = int(prefix_len), int(group_size)
        Ls = (P - Lp) // G
        if Lp < 1 or Ls < 1 or Lp + G * Ls != P:
            raise ValueError(f"packed rows of {P} slots do not split as {Lp} + {G} x Ls")

        def suffixes(a: jax.Array) -> jax.Array:  # [U, P, ...] -> [U * G, Ls, ...]
            return a[:, Lp:].reshape(U * G, Ls, *a.shape[2:])

        if resolve(c.attention_impl, self.dtype) == "splash":
            hidden, _ = self.hidden_states(tokens, positions, mask, layout=Layout(Lp, G, Ls))
            return hidden[:, :Lp], suffixes(hidden)
        w = self.weights()
        x = constrain(jnp.take(w["embed"], tokens, axis=0), ("batch", "length", "embed"))

        xp, xs = x[:, :Lp], suffixes(x)
        pos_p, pos_s = positions[:, :Lp], suffixes(positions)
        mask_p, mask_s = mask[:, :Lp], suffixes(mask)
        rope_p, rope_s = rope_tables(c, pos_p), rope_tables(c, pos_s)
        causal_p = jnp.tril(jnp.ones((Lp, Lp), bool))
        causal_s = jnp.tril(jnp.ones((Ls, Ls), bool))
        valid_pp = mask_p[:, None, :] & causal_p[None]  # [U, Lp, Lp]
        valid_sp = jnp.broadcast_to(mask_p[:, None, :], (U, 1, Lp))  # [U, 1, Lp]: every slot
        valid_ss = mask_s[:, None, :] & causal_s[None]  # [U * G, Ls, Ls]

        windows = _scanned_windows(c)
        if windows is not None:
            # the prefix block's validity depends on each suffix query once windowed
            valid_sp = jnp.broadcast_to(jnp.repeat(mask_p, G, axis=0)[:, None, :], (U * G, Ls, Lp))

        def body(carry, xs_):
            xp, xs = carry
            p, window = xs_

            def attend_prefix(q, k, v):
                ok = window_valid(valid_pp, pos_p, pos_p, window)
                return attention(q, [KVBlock(k, v, ok)]), (k, v)

            xp, (kp, vp) = block(p, xp, rope_p, attend_prefix, c)

            def attend_suffix(q, k, v):
                shared = KVBlock(kp, vp, window_valid(valid_sp, pos_s, pos_p, window))
                own = KVBlock(k, v, window_valid(valid_ss, pos_s, pos_s, window))
                return attention(q, [shared, own]), None

            xs, _ = block(p, xs, rope_s, attend_suffix, c)
            return (xp, xs), None

        if self.remat:
            body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
        (xp, xs), _ = jax.lax.scan(body, (xp, xs), (w["layers"], windows))
        return final_norm(w, xp, c), final_norm(w, xs, c)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[B, T, D] -> [B, T, V] float32."""
        return project(hidden, self.lm_head_kernel().astype(self.dtype))

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


def _scanned_windows(config: ModelConfig) -> jax.Array | None:
    """Each layer's sliding window as an [L] int32 array for the layer scan (a full layer's
    window is never reached), or None when no layer slides."""
    windows = config.layer_windows()
    if windows is None:
        return None
    return jnp.asarray([_NO_WINDOW if n is None else n for n in windows], jnp.int32)


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Positions counting real tokens only: left padding does not shift them. [B, T] int32."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)
