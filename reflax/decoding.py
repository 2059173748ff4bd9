"""The jitted decode loop: prefill a block into the KV cache, then sample token by token.

The device side is a pure function of (model state, left-padded token block,
rng, `DeviceSpec`): `prefill` writes the block of U unique rows into the
cache with the model's own forward and returns the logits at its last slot;
`decode` runs a `jax.lax.while_loop` over B = U * G rows (G samples per prefix
row) that samples one token per row per step, writes it and stops when every
row has emitted a stop id or `max_new_tokens` is reached.
`generate` composes the two.

A decode step runs the model's own transformer block (`reflax.models.decoder.block`,
which the training forward and prefill scan over) in a scan over the layers, so it
computes what `Decoder.__call__` computes for one token per row with the equivalent
cache; only the attention it hands the block differs. Its cache is a `StepCache`:
the U prefilled prefix rows ([L, U, K, P, Dh], read only) and each row's new slots
([L, B, K, N, Dh]). The G samples of a prefix row attend to one copy of it (one
matmul per prefix row and KV head), so the prefix is neither copied G times nor
read G times per step; the new slots are written in place in the scan's carry.
The scan reads one layer of the stacked weights and prefix at a time, so decoding
holds no second copy of the weights (`Decoder.weights` casts them to the compute
dtype first, a copy only when that dtype differs from the parameters').
The [B]-row `KVCache` (prefix repeated, then the new slots) is materialised at
the end only when the caller keeps it for a continuation.

Conventions
-----------
* Slots and positions. All rows share the cache's write index; a row's padding
  occupies slots with mask False, so gaps between a row's tokens are harmless.
  Positions are per row: the next position of a row is the number of real
  tokens it already has in the cache (`seq_lens`).
* Every sampled token is written into the cache before `decode` returns (the
  loop forwards each sampled token, including the last one), so a finished
  rollout can be continued with nothing pending.
* Completions. `tokens[b, :lengths[b]]` is the completion; a stop token is
  included and counted in the length; after it the row emits the pad id and a
  log-prob of 0. `done[b]` is True when the row ended on a stop id, False when
  it ran out of `max_new_tokens`.
* Randomness. Row b (of the final, post-repeat batch) samples step t with key
  `fold_in(fold_in(rng, b), t)`, b counted over the whole call (`generate`'s
  `row_ids`: a call sampled in chunks draws the tokens of one pass). With
  prefix sharing, output row `u * G + g` is sample g of prompt u, which is exactly
  the row index the same prompts repeated G times would have without sharing: both
  paths draw the same tokens under the same rng. Keys do not depend on the padded
  batch size, the chunking or the mesh.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from reflax.models import decoder
from reflax.models.decoder import Decoder, KVCache, positions_from_mask
from reflax.sampling import DeviceSpec, forbidden_mask, sample_logits
from reflax.sharding import constrain

_STEP_CACHE_AXES = ("layers", "batch", "kv_heads", "length", "head_dim")  # StepCache

__all__ = [
    "StepCache",
    "check_rope_range",
    "decode",
    "generate",
    "prefill",
    "resize_cache",
]


def prefill(
    model: Decoder,
    cache: KVCache,
    seq_lens: jax.Array,  # [B] int32: real tokens each row already has in the cache
    tokens: jax.Array,  # [B, C] int32, left-padded
    mask: jax.Array,  # [B, C] bool
) -> tuple[jax.Array, KVCache, jax.Array]:
    """Write a left-padded block at the cache's index -> (logits [B, V] at its last slot,
    cache, seq_lens + real tokens of the block).

    Left padding puts every row's last real token in the block's last slot, so
    only that slot goes through the output projection.
    """
    positions = seq_lens[:, None] + positions_from_mask(mask)
    hidden, cache = model.hidden_states(tokens, positions, mask, cache)
    logits = model.logits(hidden[:, -1:])[:, 0]
    return logits, cache, seq_lens + mask.sum(-1, dtype=jnp.int32)


class StepCache(flax.struct.PyTreeNode):
    """The KV cache while decoding: a shared prefix and per-row new slots, layers stacked.

    The prefix is the prefilled cache of the U unique rows ([L, U, K, P, Dh], read
    only); the B = U * G decoding rows write their new tokens into their own slots
    ([L, B, K, N, Dh]), which follow the prefix's slots. Row u * G + g attends to
    prefix row u, so the prefix is never copied G times and the attention over it is
    one matmul per (prefix row, KV head) with the queries of all G samples. Heads come
    before slots, the layout the matmuls read; `KVCache`'s [L, B, S, K, Dh] is the
    layout of prefill and training.
    """

    prefix_k: jax.Array  # [L, U, K, P, Dh]
    prefix_v: jax.Array
    prefix_mask: jax.Array  # [U, P] bool
    k: jax.Array  # [L, B, K, N, Dh]: the slots decoding writes
    v: jax.Array
    mask: jax.Array  # [B, N] bool
    step: jax.Array  # [] int32: next of the N slots to write

    @classmethod
    def create(cls, prefix: KVCache, batch: int, new_slots: int) -> StepCache:
        """From a prefilled [U]-row cache, for `batch` = U * G rows and N new slots."""
        L, _, _, K, Dh = prefix.k.shape
        heads_first = lambda a: constrain(a.transpose(0, 1, 3, 2, 4), _STEP_CACHE_AXES)
        empty = lambda: constrain(
            jnp.zeros((L, batch, K, new_slots, Dh), prefix.k.dtype), _STEP_CACHE_AXES
        )
        return cls(
            prefix_k=heads_first(prefix.k),
            prefix_v=heads_first(prefix.v),
            prefix_mask=prefix.mask,
            k=empty(),
            v=empty(),
            mask=jnp.zeros((batch, new_slots), bool),
            step=jnp.zeros((), jnp.int32),
        )

    def to_cache(self) -> KVCache:
        """The [B]-row KVCache: each row's prefix (repeated G times) then its new slots."""
        G = self.mask.shape[0] // self.prefix_mask.shape[0]
        slots_first = lambda a: a.transpose(0, 1, 3, 2, 4)  # [L, ., S, K, Dh]
        join = lambda p, n: jnp.concatenate(
            [jnp.repeat(slots_first(p), G, axis=1), slots_first(n)], axis=2
        )
        mask = jnp.concatenate([jnp.repeat(self.prefix_mask, G, axis=0), self.mask], axis=1)
        index = self.prefix_mask.shape[1] + self.step
        return KVCache(
            k=join(self.prefix_k, self.k), v=join(self.prefix_v, self.v), mask=mask, index=index
        )


def _step(
    model: Decoder,
    weights: dict[str, Any],  # model.weights(): layers stacked [L, ...]
    cache: StepCache,
    tokens: jax.Array,  # [B] int32
    positions: jax.Array,  # [B] int32
    mask: jax.Array,  # [B] bool: False writes padding
) -> tuple[jax.Array, StepCache]:
    """One token per row -> (logits [B, V] float32, cache with the token written).

    The model's own block in a scan over the layers, with attention over the shared
    prefix and the row's new slots (one softmax over both): what `Decoder.__call__`
    computes for one token per row with the equivalent `KVCache` (`cache.to_cache()`).
    The scan reads each layer's weights and prefix out of the stacked arrays and
    writes the new keys and values into its carried cache in place, so no second copy
    of the weights or the cache is made, only one layer's at a time.
    """
    c = model.config
    N = cache.mask.shape[1]
    G = tokens.shape[0] // cache.prefix_mask.shape[0]  # samples per prefix row
    step = cache.step
    x = jnp.take(weights["embed"], tokens, axis=0)[:, None]  # [B, 1, D]
    x = constrain(x, ("batch", "length", "embed"))
    pos = positions[:, None]  # [B, 1]
    rope = decoder.rope_tables(c, pos)
    new_mask = jax.lax.dynamic_update_slice(cache.mask, mask[:, None], (0, step))  # [B, N]
    # valid keys: the prefix's real tokens; new slots written so far (this one included)
    prefix_valid = cache.prefix_mask[:, None, :]  # [U, 1, P]
    new_valid = (new_mask & (jnp.arange(N) <= step)[None, :])[:, None, :]  # [B, 1, N]
    # key positions count each row's real tokens (only sliding windows read them)
    prefix_pos = positions_from_mask(cache.prefix_mask)  # [U, P]
    prefix_len = jnp.repeat(cache.prefix_mask.sum(-1, dtype=jnp.int32), G)  # [B]
    new_pos = prefix_len[:, None] + jnp.cumsum(new_mask, axis=-1, dtype=jnp.int32) - 1  # [B, N]
    windows = decoder._scanned_windows(c)  # [L] int32, or None: no layer slides

    def layer(carry, xs):
        x, ks, vs, i = carry
        p, prefix_k, prefix_v, window = xs

        def attend(q, k, v):  # q [B, 1, H, Dh], k/v [B, 1, K, Dh]
            at = (i, 0, 0, step, 0)
            ks_ = jax.lax.dynamic_update_slice(
                ks, k.transpose(0, 2, 1, 3)[None].astype(ks.dtype), at
            )
            vs_ = jax.lax.dynamic_update_slice(
                vs, v.transpose(0, 2, 1, 3)[None].astype(vs.dtype), at
            )
            kc = jax.lax.dynamic_index_in_dim(ks_, i, keepdims=False)  # [B, K, N, Dh]
            vc = jax.lax.dynamic_index_in_dim(vs_, i, keepdims=False)
            blocks = [
                decoder.KVBlock(
                    prefix_k,
                    prefix_v,
                    decoder.window_valid(prefix_valid, pos, prefix_pos, window),
                    heads_first=True,
                ),
                decoder.KVBlock(
                    kc, vc, decoder.window_valid(new_valid, pos, new_pos, window), True
                ),
            ]
            return decoder.attention(q, blocks), (ks_, vs_)

        x, (ks, vs) = decoder.block(p, x, rope, attend, c)
        return (x, ks, vs, i + 1), None

    xs = (weights["layers"], cache.prefix_k, cache.prefix_v, windows)
    (x, ks, vs, _), _ = jax.lax.scan(layer, (x, cache.k, cache.v, jnp.int32(0)), xs)
    x = decoder.final_norm(weights, x, c)
    logits = decoder.project(x, weights["lm_head"])[:, 0]
    cache = cache.replace(
        k=constrain(ks, _STEP_CACHE_AXES),
        v=constrain(vs, _STEP_CACHE_AXES),
        mask=new_mask,
        step=step + 1,
    )
    return constrain(logits, ("batch", "vocab")), cache


def check_rope_range(config: Any, positions: int) -> None:
    """Refuse a rollout whose rows would use more than longrope's original context.

    longrope switches to its long factors once a sequence passes the original context;
    transformers' generate then recomputes the whole cache with them. Decoding does not,
    so a call whose rows may reach `positions` positions (the longest row's real tokens
    before sampling plus max_new_tokens) past that point is refused. Padding slots hold
    no position: the bucketed cache size does not count.
    """
    scaling = config.rope_scaling_dict
    if scaling.get("rope_type") != "longrope":
        return
    original = scaling["original_max_position_embeddings"]
    if positions > original:
        raise ValueError(
            f"sampling up to {positions} positions (prompt + max_new_tokens) would pass "
            f"the longrope original context of {original} positions, where the rope factors "
            "change for the whole sequence; keep prompts and max_new_tokens within it"
        )


def decode(
    model: Decoder,
    prefix: KVCache,
    logits: jax.Array,  # [B, V]: next-token logits of every row
    seq_lens: jax.Array,  # [B] int32
    active: jax.Array,  # [B] bool: rows that sample (False: padding rows)
    row_keys: jax.Array,  # [B] keys
    spec: DeviceSpec,
    max_new_tokens: jax.Array,  # [] int32, <= gen_len
    *,
    gen_len: int,
    keep_cache: bool = True,
) -> dict[str, Any]:
    """The decode loop over B = U * G rows; row u * G + g continues prefix row u.

    Returns tokens [B, gen_len], lengths [B], done [B] (ended on a stop id), seq_lens
    [B], logprobs [B, gen_len] when `spec.logprobs`, and with `keep_cache` the [B]-row
    cache (prefix, then gen_len new slots, every sampled token written). The caller
    keeps longrope models inside their original context (`check_rope_range`).
    """
    B, V = logits.shape
    stop_v = forbidden_mask(spec.stop_ids, V)  # [V]
    banned_v = forbidden_mask(spec.banned_ids, V)  # [V]
    weights = model.weights()  # layers stacked: the layer scan reads them in place
    carry = dict(
        cache=StepCache.create(prefix, B, gen_len),
        logits=logits,
        seq_lens=seq_lens,
        active=active,
        done=jnp.zeros((B,), bool),
        lengths=jnp.zeros((B,), jnp.int32),
        tokens=jnp.full((B, gen_len), spec.pad_id, jnp.int32),
    )
    if spec.logprobs:
        carry["logprobs"] = jnp.zeros((B, gen_len), jnp.float32)

    def cond(state):
        return (state["cache"].step < max_new_tokens) & jnp.any(state["active"])

    def body(state):
        step, active = state["cache"].step, state["active"]
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)
        forbidden = banned_v | (stop_v & (step < spec.min_new_tokens))  # [V]
        tok, lp = sample_logits(state["logits"], keys, spec, forbidden)
        tok = jnp.where(active, tok, spec.pad_id)
        stopped = active & jnp.any(tok[:, None] == spec.stop_ids[None, :], axis=-1)
        # write the token (a finished row writes padding with mask False)
        logits, cache = _step(model, weights, state["cache"], tok, state["seq_lens"], active)
        new = dict(
            cache=cache,
            logits=logits,
            seq_lens=state["seq_lens"] + active,
            active=active & ~stopped,
            done=state["done"] | stopped,
            lengths=state["lengths"] + active,
            tokens=jax.lax.dynamic_update_slice(state["tokens"], tok[:, None], (0, step)),
        )
        if spec.logprobs:
            lp = jnp.where(active, lp, 0.0)
            new["logprobs"] = jax.lax.dynamic_update_slice(
                state["logprobs"], lp[:, None], (0, step)
            )
        return new

    final = jax.lax.while_loop(cond, body, carry)
    names = ("tokens", "logprobs", "lengths", "done", "seq_lens")
    out = {k: final[k] for k in names if k in final}
    if keep_cache:
        out["cache"] = final["cache"].to_cache().constrain()
    return out


def generate(
    model: Decoder,
    cache: KVCache,
    seq_lens: jax.Array,  # [U] int32
    tokens: jax.Array,  # [U, C] int32, left-padded block to write
    mask: jax.Array,  # [U, C] bool
    row_valid: jax.Array,  # [U] bool: False for padding rows
    rng: jax.Array,  # key
    spec: DeviceSpec,
    max_new_tokens: jax.Array,  # [] int32, <= gen_len
    *,
    num_samples: int,
    gen_len: int,
    keep_cache: bool = True,
    row_ids: jax.Array | None = None,  # [U] int32: each prefix row's index in the whole call
) -> dict[str, Any]:
    """Prefill U rows once, then decode G = num_samples rows per prefix row (u*G+g).

    Sample g of prefix row u samples with the keys of global row `row_ids[u] * G + g`
    (`row_ids` None: 0..U-1), so a call cut into blocks of any rows draws what the whole
    call draws.
    """
    logits, cache, seq_lens = prefill(model, cache, seq_lens, tokens, mask)
    G = num_samples
    logits = constrain(jnp.repeat(logits, G, axis=0), ("batch", "vocab"))
    ids = jnp.arange(tokens.shape[0], dtype=jnp.int32) if row_ids is None else row_ids
    rows = (ids[:, None] * G + jnp.arange(G, dtype=jnp.int32)).reshape(-1)
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, rows)
    return decode(
        model,
        cache,
        logits,
        jnp.repeat(seq_lens, G),
        jnp.repeat(row_valid, G),
        row_keys,
        spec,
        max_new_tokens,
        gen_len=gen_len,
        keep_cache=keep_cache,
    )


def resize_cache(cache: KVCache, rows: jax.Array | None, size: int) -> KVCache:
    """Rows gathered ([B'] indices, repeats allowed; None: all, in order) and the slot
    axis resized to `size`.

    Slots at or after `cache.index` were never written, so a cache may shrink down
    to its index (the caller keeps `size >= index + slots still to write`).
    """

    def fit(a: jax.Array, axis: int) -> jax.Array:
        if size <= a.shape[axis]:
            return jax.lax.slice_in_dim(a, 0, size, axis=axis)
        pad = [(0, 0)] * a.ndim
        pad[axis] = (0, size - a.shape[axis])
        return jnp.pad(a, pad)

    if rows is None:
        k, v, mask = cache.k, cache.v, cache.mask
    else:  # a gather over the sharded batch axis: the partitioner all-gathers the cache
        k, v, mask = cache.k[:, rows], cache.v[:, rows], cache.mask[rows]
    return KVCache(k=fit(k, 2), v=fit(v, 2), mask=fit(mask, 1), index=cache.index).constrain()
