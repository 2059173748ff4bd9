"""Rollout engine: batched sampling with a KV cache, prefix sharing and continuation.

The device side is a pure function of (model state, left-padded token block,
rng, sampling settings): `prefill` writes the block of U unique rows into the
cache with the model's own forward and returns the logits at its last slot;
`decode` runs a `jax.lax.while_loop` over B = U * G rows (G samples per prefix
row) that samples one token per row per step, writes it and stops when every
row has emitted a stop id or `max_new_tokens` is reached.
`generate` composes the two.

A decode step runs the model's own transformer block (`reflax.models.decoder.block`,
which the training forward and prefill scan over) layer by layer, so it computes
what `Decoder.__call__` computes for one token per row with the equivalent cache;
only the attention it hands the block differs. Its cache is a `StepCache`: per
layer, the U prefilled prefix rows ([U, K, P, Dh], read only) and each row's new
slots ([B, K, N, Dh]). The G samples of a prefix row attend to one copy of it
(one matmul per prefix row and KV head), so the prefix is neither copied G times
nor read G times per step; the new slots are updated in place. Layers are
unrolled over per-layer arrays, because slicing a stacked [L, ...] cache or
weight inside the loop copies it every step; the price is a compile time that
grows with depth and a per-layer copy of the weights for the duration of
`decode` (`Decoder.weights(per_layer=True)`; the decoder's forward makes the same
copy when it casts parameters to a lower compute dtype).
The [B]-row `KVCache` (prefix repeated, then the new slots) is materialised at
the end only when the caller keeps it for a continuation.

`Sampler` is the host-side wrapper: it left-pads ragged prompts into bucketed
shapes, keeps one jitted program per bucketed shape/static setting (counted in
`Sampler.num_compilations`), places inputs on the mesh and fetches results.

Conventions
-----------
* Slots and positions. All rows share the cache's write index; a row's padding
  occupies slots with mask False, so gaps between a row's tokens are harmless.
  Positions are per row: the next position of a row is the number of real
  tokens it already has in the cache (`Rollout.seq_lens`).
* Every sampled token is written into the cache before `decode` returns (the
  loop forwards each sampled token, including the last one), so a finished
  rollout can be continued with nothing pending.
* Completions. `tokens[b, :lengths[b]]` is the completion; a stop token is
  included and counted in the length; after it the row emits `pad_id` and a
  log-prob of 0. `done[b]` is True when the row ended on a stop id, False when
  it ran out of `max_new_tokens`.
* Forbidden tokens. `banned_ids` are never sampled; stop ids are not sampled
  before `min_new_tokens` tokens (as transformers' `bad_words_ids` with single
  ids and `min_new_tokens`). They are removed before top-k / top-p, which then
  act on the allowed tokens (transformers' order: logits processors, then
  warpers).
* Log-probs are `log_softmax(logits / temperature)` at the sampled token over
  the *full* vocabulary, i.e. without the top-k / top-p truncation and without
  removing forbidden tokens, which is what a GRPO step that recomputes
  `log_softmax(logits / T)` compares against. They are not the log-probs of the
  distribution a token was drawn from whenever something was truncated or
  forbidden (that one is renormalised over the kept tokens).
  Under greedy decoding (temperature 0) they are `log_softmax(logits)`.
* Randomness. Row b (of the final, post-repeat batch) samples step t with key
  `fold_in(fold_in(rng, b), t)`. With prefix sharing, output row `u * G + g`
  is sample g of prompt u, which is exactly the row index the same prompts
  repeated G times would have without sharing: both paths draw the same tokens
  under the same rng. Keys do not depend on the padded batch size or the mesh.
  A draw is exact Gumbel-max in two levels (`_categorical`): a block of about
  sqrt(V) vocabulary entries from the blocks' masses, then an entry within it.
* Continuation (`Sampler.continue_`). Row i of the new batch continues row
  `rows[i]` of an earlier rollout: the earlier row's cache (its prompt and its
  whole completion) is gathered, the cache grown, and `new_ids[i]` (ragged) is
  written left-padded into the next block of slots, with positions continuing
  from the row's true length. That cache is the prefix of the new decode (with
  G samples per continued row), so continuing equals sampling from scratch on
  prompt + completion + new ids.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from reflax.models import decoder
from reflax.models.decoder import Decoder, KVCache, positions_from_mask
from reflax.sharding import (
    CACHE_AXES,
    CACHE_MASK_AXES,
    LOGICAL_RULES,
    MESH_AXES,
    batch_sharding,
    constrain,
    named_sharding,
    put,
    replicated,
)

BucketSpec = int | Sequence[int] | None

_NEG_INF = -1e30  # as in the decoder: finite, so a row with no valid key gives no NaN
F32 = jnp.float32
_STEP_CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")  # a StepCache layer

__all__ = [
    "BucketSpec",
    "Rollout",
    "SampleOutput",
    "Sampler",
    "SamplingSettings",
    "StepCache",
    "bucket_size",
    "decode",
    "forbidden_mask",
    "generate",
    "left_pad",
    "prefill",
    "resize_cache",
    "sample_logits",
]


# --------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """The static part of the sampling settings (part of the compiled program's key).

    Temperature and top-p values are traced arguments, so changing them does not
    recompile. With top-k, top-p is always applied to the k candidates (they come
    sorted, so it costs nothing); without top-k it needs a sort of the whole
    vocabulary, which runs only when `vocab_top_p` is set (top_p < 1).
    """

    greedy: bool = False
    top_k: int = 0  # 0: no top-k truncation
    vocab_top_p: bool = False

    @classmethod
    def make(
        cls, *, temperature: float, top_k: int, top_p: float, greedy: bool, vocab_size: int
    ) -> SamplingSettings:
        if greedy or temperature == 0:
            return cls(greedy=True)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        top_k = int(top_k) if 0 < top_k < vocab_size else 0
        return cls(top_k=top_k, vocab_top_p=top_k == 0 and top_p < 1.0)


def bucket_size(n: int, spec: BucketSpec) -> int:
    """The bucket for a size n: None -> next power of two; int m -> next multiple of m;
    a sequence -> its smallest entry >= n."""
    n = max(int(n), 1)
    if spec is None:
        return 1 << (n - 1).bit_length()
    if isinstance(spec, int):
        return -(-n // spec) * spec
    for b in sorted(spec):
        if b >= n:
            return int(b)
    raise ValueError(f"size {n} exceeds the largest bucket {max(spec)}")


def left_pad(
    seqs: Sequence[Sequence[int]], length: int, pad_id: int = 0, rows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Ragged id lists -> (tokens [rows, length] int32, mask [rows, length] bool), left-padded.

    Extra rows (up to `rows`) are all padding.
    """
    rows = len(seqs) if rows is None else rows
    tokens = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), bool)
    for i, s in enumerate(seqs):
        if len(s) > length:
            raise ValueError(f"sequence {i} has {len(s)} tokens, more than {length}")
        if len(s):
            tokens[i, length - len(s) :] = np.asarray(s, np.int32)
            mask[i, length - len(s) :] = True
    return tokens, mask


# --------------------------------------------------------------------------- pure functions


def sample_logits(
    logits: jax.Array,  # [B, V] float32
    keys: jax.Array,  # [B] keys
    temperature: jax.Array,  # [] float32
    top_p: jax.Array,  # [] float32
    settings: SamplingSettings,
    forbidden: jax.Array | None = None,  # [V] or [B, V] bool: never drawn
) -> tuple[jax.Array, jax.Array]:
    """One token per row -> (tokens [B] int32, untruncated log-probs [B] float32).

    The log-probs are over the full vocabulary: neither top-k / top-p nor `forbidden`
    changes them (module docstring). Some token of every row must be allowed.
    """
    allowed = lambda z: z if forbidden is None else jnp.where(forbidden, -jnp.inf, z)
    if settings.greedy:
        tokens = jnp.argmax(allowed(logits), axis=-1).astype(jnp.int32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]

    scaled = logits / temperature
    logp = jax.nn.log_softmax(scaled, axis=-1)
    scaled = allowed(scaled)
    index = None  # [B, k] vocab ids of the candidates when truncated
    if settings.top_k:
        # top-k first: top-p then only looks at k candidates, already sorted
        cand, index = jax.lax.top_k(scaled, settings.top_k)  # [B, k], descending
    elif settings.vocab_top_p:
        index = jnp.argsort(-scaled, axis=-1, stable=True).astype(jnp.int32)
        cand = jnp.take_along_axis(scaled, index, axis=-1)
    else:
        cand = scaled
    if index is not None:
        probs = jax.nn.softmax(cand, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # keep the smallest prefix whose mass reaches top_p (the first token always);
        # top_p == 1 keeps all (rounding could push mass_before of the tail to 1)
        cand = jnp.where((mass_before < top_p) | (top_p >= 1.0), cand, -jnp.inf)
    choice = _categorical(keys, cand)
    if index is not None:
        tokens = jnp.take_along_axis(index, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    else:
        tokens = choice
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def _categorical(keys: jax.Array, logits: jax.Array) -> jax.Array:
    """A draw per row from softmax(logits) ([B, n], -inf allowed) -> [B] int32.

    Gumbel-max in two levels: the n entries are cut into blocks of K ~ sqrt(n); a block
    is drawn by Gumbel-max on the blocks' log-masses (a logsumexp each), then an entry
    by Gumbel-max on the block's logits. P(block) * P(entry | block) is the softmax at
    any scale, in log space: no float32 cumulative sum over the vocabulary, whose
    rounding makes tokens far below the running sum's ulp (~6e-8 once it nears 1)
    unreachable. It needs n / K + K random numbers per row, not n as a one-level
    Gumbel-max (`jax.random.categorical`) does.
    """
    B, n = logits.shape
    K = 1 << max(0, math.ceil(math.log2(math.sqrt(n))))  # entries per block
    nb = -(-n // K)  # blocks
    z = jnp.pad(logits, ((0, 0), (0, nb * K - n)), constant_values=-jnp.inf)
    z = z.reshape(B, nb, K)
    log_mass = jax.nn.logsumexp(z, axis=-1)  # [B, nb]; -inf for a block with nothing
    pair = jax.vmap(jax.random.split)(keys)  # [B, 2]: block draw, entry draw
    g_block = jax.vmap(lambda k: jax.random.gumbel(k, (nb,)))(pair[:, 0])  # [B, nb]
    block = jnp.argmax(log_mass + g_block, axis=-1)  # [B]
    z_block = jnp.take_along_axis(z, block[:, None, None], axis=1)[:, 0]  # [B, K]
    g_entry = jax.vmap(lambda k: jax.random.gumbel(k, (K,)))(pair[:, 1])  # [B, K]
    entry = jnp.argmax(z_block + g_entry, axis=-1)  # [B]
    return (block * K + entry).astype(jnp.int32)


def forbidden_mask(ids: jax.Array, vocab_size: int) -> jax.Array:
    """[S] int32 ids (-1 entries ignored) -> [V] bool, True at those ids."""
    ids = jnp.where(ids < 0, vocab_size, ids)  # out of range: dropped, not wrapped
    return jnp.zeros((vocab_size,), bool).at[ids].set(True, mode="drop")


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
    """The KV cache while decoding: a shared prefix and per-row new slots, per layer.

    The prefix is the prefilled cache of the U unique rows ([U, K, P, Dh] per
    layer, read only); the B = U * G decoding rows write their new tokens into
    their own slots ([B, K, N, Dh] per layer), which follow the prefix's slots.
    Row u * G + g attends to prefix row u, so the prefix is never copied G times
    and the attention over it is one matmul per (prefix row, KV head) with the
    queries of all G samples. Per-layer arrays in this layout are updated in
    place and read by the matmuls as they are; `KVCache`'s stacked [L, B, S, K, Dh]
    layout suits the layer scan of prefill and training, but decoding with it
    would copy and transpose the cache every step.
    """

    prefix_k: tuple[jax.Array, ...]  # L x [U, K, P, Dh]
    prefix_v: tuple[jax.Array, ...]
    prefix_mask: jax.Array  # [U, P] bool
    k: tuple[jax.Array, ...]  # L x [B, K, N, Dh]: the slots decoding writes
    v: tuple[jax.Array, ...]
    mask: jax.Array  # [B, N] bool
    step: jax.Array  # [] int32: next of the N slots to write

    @classmethod
    def create(cls, prefix: KVCache, batch: int, new_slots: int) -> StepCache:
        """From a prefilled [U]-row cache, for `batch` = U * G rows and N new slots."""
        L, _, _, K, Dh = prefix.k.shape
        split = lambda a: tuple(
            constrain(a[i].transpose(0, 2, 1, 3), _STEP_CACHE_AXES) for i in range(L)
        )
        empty = lambda: tuple(
            constrain(jnp.zeros((batch, K, new_slots, Dh), prefix.k.dtype), _STEP_CACHE_AXES)
            for _ in range(L)
        )
        return cls(
            prefix_k=split(prefix.k),
            prefix_v=split(prefix.v),
            prefix_mask=prefix.mask,
            k=empty(),
            v=empty(),
            mask=jnp.zeros((batch, new_slots), bool),
            step=jnp.zeros((), jnp.int32),
        )

    def to_cache(self) -> KVCache:
        """The [B]-row KVCache: each row's prefix (repeated G times) then its new slots."""
        G = self.mask.shape[0] // self.prefix_mask.shape[0]
        stack = lambda xs: jnp.stack([x.transpose(0, 2, 1, 3) for x in xs])  # [L, ., S, K, Dh]
        join = lambda p, n: jnp.concatenate([jnp.repeat(stack(p), G, axis=1), stack(n)], axis=2)
        mask = jnp.concatenate([jnp.repeat(self.prefix_mask, G, axis=0), self.mask], axis=1)
        index = self.prefix_mask.shape[1] + self.step
        return KVCache(
            k=join(self.prefix_k, self.k), v=join(self.prefix_v, self.v), mask=mask, index=index
        )


def _step(
    model: Decoder,
    weights: dict[str, Any],  # model.weights(per_layer=True)
    cache: StepCache,
    tokens: jax.Array,  # [B] int32
    positions: jax.Array,  # [B] int32
    mask: jax.Array,  # [B] bool: False writes padding
) -> tuple[jax.Array, StepCache]:
    """One token per row -> (logits [B, V] float32, cache with the token written).

    The model's own block, layer by layer, with attention over the shared prefix and the
    row's new slots (one softmax over both): what `Decoder.__call__` computes for one
    token per row with the equivalent `KVCache` (`cache.to_cache()`).
    """
    c = model.config
    B = tokens.shape[0]
    N = cache.mask.shape[1]
    G = B // cache.prefix_mask.shape[0]  # samples per prefix row
    step = cache.step
    x = jnp.take(weights["embed"], tokens, axis=0)[:, None]  # [B, 1, D]
    x = constrain(x, ("batch", "length", "embed"))
    pos = positions[:, None]  # [B, 1]
    rope = decoder.rope_tables(c, pos)
    new_mask = jax.lax.dynamic_update_slice(cache.mask, mask[:, None], (0, step))  # [B, N]
    # valid keys: the prefix's real tokens; new slots written so far (this one included)
    prefix_valid = cache.prefix_mask[:, None, :]  # [U, 1, P]
    new_valid = (new_mask & (jnp.arange(N) <= step)[None, :])[:, None, :]  # [B, 1, N]
    windows = c.layer_windows() or (None,) * c.num_layers
    # key positions count each row's real tokens (only sliding windows read them)
    prefix_pos = positions_from_mask(cache.prefix_mask)  # [U, P]
    prefix_len = jnp.repeat(cache.prefix_mask.sum(-1, dtype=jnp.int32), G)  # [B]
    new_pos = prefix_len[:, None] + jnp.cumsum(new_mask, axis=-1, dtype=jnp.int32) - 1  # [B, N]

    ks, vs = list(cache.k), list(cache.v)
    for i, p in enumerate(weights["layers"]):

        def attend(q, k, v, i=i):  # q [B, 1, H, Dh], k/v [B, 1, K, Dh]
            kc = jax.lax.dynamic_update_slice(
                ks[i], k.transpose(0, 2, 1, 3).astype(ks[i].dtype), (0, 0, step, 0)
            )
            vc = jax.lax.dynamic_update_slice(
                vs[i], v.transpose(0, 2, 1, 3).astype(vs[i].dtype), (0, 0, step, 0)
            )
            blocks = [
                decoder.KVBlock(
                    cache.prefix_k[i],
                    cache.prefix_v[i],
                    decoder.window_valid(prefix_valid, pos, prefix_pos, windows[i]),
                    heads_first=True,
                ),
                decoder.KVBlock(
                    kc, vc, decoder.window_valid(new_valid, pos, new_pos, windows[i]), True
                ),
            ]
            return decoder.attention(q, blocks), (kc, vc)

        x, (ks[i], vs[i]) = decoder.block(p, x, rope, attend, c)
    x = decoder.final_norm(weights, x, c)
    logits = decoder.project(x, weights["lm_head"])[:, 0]
    cache = cache.replace(
        k=tuple(constrain(a, _STEP_CACHE_AXES) for a in ks),
        v=tuple(constrain(a, _STEP_CACHE_AXES) for a in vs),
        mask=new_mask,
        step=step + 1,
    )
    return constrain(logits, ("batch", "vocab")), cache


def _check_rope_range(config: Any, slots: int) -> None:
    """longrope switches to its long factors once a sequence passes the original context;
    transformers' generate then recomputes the whole cache with them. Decoding does not,
    so a rollout whose slots could pass that point is refused (positions <= slots)."""
    scaling = config.rope_scaling_dict
    if scaling.get("rope_type") != "longrope":
        return
    original = scaling["original_max_position_embeddings"]
    if slots > original:
        raise ValueError(
            f"sampling with {slots} cache slots (bucketed prompt + max_new_tokens) could pass "
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
    max_new_tokens: jax.Array,  # [] int32, <= gen_len
    temperature: jax.Array,  # [] float32
    top_p: jax.Array,  # [] float32
    stop_ids: jax.Array,  # [S] int32 (-1 entries never match)
    pad_id: jax.Array,  # [] int32
    *,
    gen_len: int,
    settings: SamplingSettings,
    keep_cache: bool = True,
    banned_ids: jax.Array | None = None,  # [S'] int32 never sampled (-1 entries ignored)
    min_new_tokens: jax.Array | int = 0,  # [] int32: no stop id before this many tokens
) -> dict[str, Any]:
    """The decode loop over B = U * G rows; row u * G + g continues prefix row u.

    Returns tokens [B, gen_len], logprobs [B, gen_len], lengths [B], done [B] (ended
    on a stop id), seq_lens [B], and with `keep_cache` the [B]-row cache (prefix,
    then gen_len new slots, every sampled token written).
    """
    B, V = logits.shape
    stop_v = forbidden_mask(stop_ids, V)  # [V]
    banned_v = jnp.zeros((V,), bool) if banned_ids is None else forbidden_mask(banned_ids, V)
    _check_rope_range(model.config, prefix.size + gen_len)
    weights = model.weights(per_layer=True)  # split once: slicing inside the loop copies
    carry = dict(
        cache=StepCache.create(prefix, B, gen_len),
        logits=logits,
        seq_lens=seq_lens,
        active=active,
        done=jnp.zeros((B,), bool),
        lengths=jnp.zeros((B,), jnp.int32),
        tokens=jnp.full((B, gen_len), pad_id, jnp.int32),
        logprobs=jnp.zeros((B, gen_len), jnp.float32),
    )

    def cond(c):
        return (c["cache"].step < max_new_tokens) & jnp.any(c["active"])

    def body(c):
        step, active = c["cache"].step, c["active"]
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)
        forbidden = banned_v | (stop_v & (step < min_new_tokens))  # [V]
        tok, lp = sample_logits(c["logits"], keys, temperature, top_p, settings, forbidden)
        tok = jnp.where(active, tok, pad_id)
        lp = jnp.where(active, lp, 0.0)
        stopped = active & jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
        # write the token (a finished row writes padding with mask False)
        logits, cache = _step(model, weights, c["cache"], tok, c["seq_lens"], active)
        return dict(
            cache=cache,
            logits=logits,
            seq_lens=c["seq_lens"] + active,
            active=active & ~stopped,
            done=c["done"] | stopped,
            lengths=c["lengths"] + active,
            tokens=jax.lax.dynamic_update_slice(c["tokens"], tok[:, None], (0, step)),
            logprobs=jax.lax.dynamic_update_slice(c["logprobs"], lp[:, None], (0, step)),
        )

    c = jax.lax.while_loop(cond, body, carry)
    out = {k: c[k] for k in ("tokens", "logprobs", "lengths", "done", "seq_lens")}
    if keep_cache:
        out["cache"] = c["cache"].to_cache().constrain()
    return out


def generate(
    model: Decoder,
    cache: KVCache,
    seq_lens: jax.Array,  # [U] int32
    tokens: jax.Array,  # [U, C] int32, left-padded block to write
    mask: jax.Array,  # [U, C] bool
    row_valid: jax.Array,  # [U] bool: False for padding rows
    rng: jax.Array,  # key
    max_new_tokens: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    stop_ids: jax.Array,
    pad_id: jax.Array,
    *,
    num_samples: int,
    gen_len: int,
    settings: SamplingSettings,
    keep_cache: bool = True,
    banned_ids: jax.Array | None = None,
    min_new_tokens: jax.Array | int = 0,
) -> dict[str, Any]:
    """Prefill U rows once, then decode G = num_samples rows per prefix row (u*G+g)."""
    logits, cache, seq_lens = prefill(model, cache, seq_lens, tokens, mask)
    G = num_samples
    logits = constrain(jnp.repeat(logits, G, axis=0), ("batch", "vocab"))
    rows = jnp.arange(logits.shape[0], dtype=jnp.int32)
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, rows)
    return decode(
        model,
        cache,
        logits,
        jnp.repeat(seq_lens, G),
        jnp.repeat(row_valid, G),
        row_keys,
        max_new_tokens,
        temperature,
        top_p,
        stop_ids,
        pad_id,
        gen_len=gen_len,
        settings=settings,
        keep_cache=keep_cache,
        banned_ids=banned_ids,
        min_new_tokens=min_new_tokens,
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


# --------------------------------------------------------------------------- host side


def _id_block(ids: Sequence[int]) -> np.ndarray:
    """Ids padded with -1 (never matched) to a multiple of 8: one program for most sets."""
    block = np.full((bucket_size(len(ids), 8),), -1, np.int32)
    block[: len(ids)] = np.asarray(ids, np.int32)
    return block


def _check_forbidden(
    banned_ids: Sequence[int], stop_ids: Sequence[int], min_new_tokens: int, vocab_size: int
) -> None:
    """Forbidden ids must be token ids, and they must leave some token to sample."""
    if any(not 0 <= int(i) < vocab_size for i in banned_ids):
        raise ValueError(f"banned_ids must lie in [0, {vocab_size}), got {list(banned_ids)}")
    if min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be >= 0, got {min_new_tokens}")
    early = {int(i) for i in banned_ids}
    if min_new_tokens > 0:
        early |= {int(i) for i in stop_ids if 0 <= int(i) < vocab_size}
    if len(early) >= vocab_size:
        raise ValueError("banned_ids (and stop_ids before min_new_tokens) forbid every token")


@dataclasses.dataclass
class Rollout:
    """What continuing a batch needs: its cache (every sampled token written) on device."""

    cache: KVCache  # rows: the padded batch
    seq_lens: jax.Array  # [B_padded] int32: real tokens per row in the cache
    num_rows: int  # real rows (the first num_rows of the cache)
    index: int  # host copy of cache.index: slots used


@dataclasses.dataclass
class SampleOutput:
    tokens: np.ndarray  # [B, N] int32; pad after a stop token
    logprobs: np.ndarray  # [B, N] float32; untruncated log_softmax(logits / T), 0 after stop
    lengths: np.ndarray  # [B] int32, stop token included
    done: np.ndarray  # [B] bool: ended on a stop id (False: hit max_new_tokens)
    rollout: Rollout | None  # what `Sampler.continue_` needs; None unless keep_cache

    def completions(self) -> list[list[int]]:
        return [t[:n].tolist() for t, n in zip(self.tokens, self.lengths)]


class Sampler:
    """Bucketed, jitted, optionally sharded sampling for one model architecture.

    Takes the model state at every call, so parameters may change between calls
    (one program per bucketed shape and static setting, not per value).

    Buckets (`BucketSpec`: None = powers of two, int m = multiples of m, or a
    sequence of sizes): `prompt_buckets` for prompt / new-turn block lengths,
    `gen_buckets` for max_new_tokens, `cache_buckets` for the prefix length of a
    continuation (earlier slots + new turn), `batch_buckets` for the number of
    unique rows. A fresh call's cache holds prompt bucket + generation bucket slots.
    `compiler_options` go to `jax.jit` (e.g. a lower XLA backend optimisation
    level where compile time matters more than speed, as in tests).
    """

    def __init__(
        self,
        model: Decoder | nnx.GraphDef,
        mesh: Mesh | None = None,
        *,
        cache_dtype: Any = jnp.float32,
        prompt_buckets: BucketSpec = 64,
        gen_buckets: BucketSpec = 64,
        cache_buckets: BucketSpec = 128,
        batch_buckets: BucketSpec = None,
        compiler_options: dict[str, Any] | None = None,
    ):
        self.graphdef = nnx.split(model)[0] if isinstance(model, nnx.Module) else model
        self.config = model.config if isinstance(model, nnx.Module) else None  # else at 1st call
        self.mesh = mesh
        self.cache_dtype = cache_dtype
        self.prompt_buckets = prompt_buckets
        self.gen_buckets = gen_buckets
        self.cache_buckets = cache_buckets
        self.batch_buckets = batch_buckets
        self.compiler_options = compiler_options  # passed to XLA, e.g. to compile faster
        self._fns: dict[tuple, Any] = {}
        self._traces = 0

    @property
    def num_compilations(self) -> int:
        """Programs traced (and so compiled) so far."""
        return self._traces

    # ------------------------------------------------------------------ sharding helpers

    def _batch_shards(self) -> int:
        if self.mesh is None:
            return 1
        axes = LOGICAL_RULES["batch"]
        axes = (axes,) if isinstance(axes, str) else axes
        return math.prod(self.mesh.shape[a] for a in axes if a in MESH_AXES)

    def _unique_rows(self, n: int, num_samples: int) -> int:
        """Bucketed unique rows; on a mesh, rounded so the decode batch splits evenly."""
        rows = bucket_size(n, self.batch_buckets)
        step = self._batch_shards() // math.gcd(self._batch_shards(), num_samples)
        return -(-rows // step) * step

    def _sharding(self, x: Any, logical: tuple | None) -> Any:
        if self.mesh is None:
            return None
        if logical is None:
            return replicated(self.mesh)
        return named_sharding(self.mesh, logical, np.shape(x))

    def _sharding(self, x: Any, logical: tuple | None) -> Any:
        if self.mesh is None:
            return None
        if logical is None:
            return replicated(self.mesh)
        return named_sharding(self.mesh, logical, np.shape(x))

    def _put(self, x: Any, logical: tuple | None) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(x)
        return put(x, self._sharding(x, logical))

    def _abstract(self, x: Any, logical: tuple | None) -> jax.ShapeDtypeStruct:
        """What `_put` would place, as a shape (for lowering without devices)."""
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=self._sharding(x, logical))

    def _out_shardings(self, batch: int, gen_len: int, cache_shape: tuple | None) -> Any:
        if self.mesh is None:
            return None
        m = self.mesh
        # what the host reads comes back replicated, so every process (host) has all rows
        out = dict(
            tokens=replicated(m),
            logprobs=replicated(m),
            lengths=replicated(m),
            done=replicated(m),
            seq_lens=batch_sharding(m, (batch,)),
        )
        if cache_shape is not None:
            out["cache"] = KVCache(
                k=named_sharding(m, CACHE_AXES, cache_shape),
                v=named_sharding(m, CACHE_AXES, cache_shape),
                mask=named_sharding(m, CACHE_MASK_AXES, cache_shape[1:3]),
                index=replicated(m),
            )
        return out

    # ------------------------------------------------------------------ programs

    def _program(self, key: tuple, out_shardings: Any) -> Any:
        fn = self._fns.get(key)
        if fn is not None:
            return fn
        kind, config, num_samples, gen_len, prefix_size, settings, keep_cache = key[:7]
        graphdef, cache_dtype = self.graphdef, self.cache_dtype

        def run(
            state, prev, tokens, mask, row_valid, rng, max_new, temperature, top_p, stop, pad,
            banned, min_new,
        ):  # fmt: skip
            self._traces += 1  # runs once per trace, i.e. per compiled program
            model = nnx.merge(graphdef, state)
            if prev is None:
                cache = KVCache.empty(config, tokens.shape[0], prefix_size, cache_dtype)
                cache = cache.constrain()
                seq_lens = jnp.zeros((tokens.shape[0],), jnp.int32)
            else:
                prev_cache, prev_lens, rows = prev  # rows None: every row, in order
                cache = resize_cache(prev_cache, rows, prefix_size)
                seq_lens = prev_lens if rows is None else prev_lens[rows]
            return generate(
                model,
                cache,
                seq_lens,
                tokens,
                mask,
                row_valid,
                rng,
                max_new,
                temperature,
                top_p,
                stop,
                pad,
                num_samples=num_samples,
                gen_len=gen_len,
                settings=settings,
                keep_cache=keep_cache,
                banned_ids=banned,
                min_new_tokens=min_new,
            )

        fn = jax.jit(run, out_shardings=out_shardings, compiler_options=self.compiler_options)
        self._fns[key] = fn
        return fn

    def _prepare(
        self,
        state: Any,
        prev: Rollout | None,
        rows: np.ndarray | None,
        block: Sequence[Sequence[int]],
        *,
        num_samples: int,
        max_new_tokens: int,
        rng: jax.Array | int,
        temperature: float,
        top_k: int,
        top_p: float,
        greedy: bool,
        stop_ids: Sequence[int],
        pad_id: int,
        keep_cache: bool,
        banned_ids: Sequence[int],
        min_new_tokens: int,
        abstract: bool = False,
    ) -> tuple[Any, tuple]:
        """The jitted program of a call and its arguments (inputs placed on the mesh;
        `abstract`: their ShapeDtypeStructs, for `lower`).

        `state` and `prev` are passed through as they are, so they may be
        `jax.ShapeDtypeStruct`s carrying shardings.
        """
        put = self._abstract if abstract else self._put
        if isinstance(state, nnx.Module):
            state = nnx.state(state)
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if num_samples < 1:
            raise ValueError("num_samples must be >= 1")
        if any(len(s) == 0 for s in block):
            raise ValueError("every prompt / new turn needs at least one token")
        if isinstance(rng, int):
            rng = jax.random.key(rng)
        if self.config is None:
            self.config = nnx.merge(self.graphdef, state).config
        config = self.config
        n = len(block)
        U = self._unique_rows(n, num_samples)
        B = U * num_samples
        C = bucket_size(max(len(s) for s in block), self.prompt_buckets)
        gen_len = bucket_size(max_new_tokens, self.gen_buckets)
        # the prefilled prefix: the new block after the earlier rollout's slots, if any
        if prev is None:
            prefix_size = C
        else:
            prefix_size = bucket_size(prev.index + C, self.cache_buckets)
        settings = SamplingSettings.make(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            greedy=greedy,
            vocab_size=config.vocab_size,
        )
        cache_shape = None
        if keep_cache:
            cache_size = prefix_size + gen_len
            cache_shape = (config.num_layers, B, cache_size, config.num_kv_heads, config.head_dim)
        _check_forbidden(banned_ids, stop_ids, min_new_tokens, config.vocab_size)
        stop, banned = _id_block(stop_ids), _id_block(banned_ids)
        # continuing every row in order (a retry per reflection) needs no gather of the cache
        in_order = prev is not None and prev.cache.k.shape[1] == U
        in_order = in_order and np.array_equal(rows, np.arange(n))
        kind = "new" if prev is None else ("extend" if in_order else "continue")
        key = (kind, config, num_samples, gen_len, prefix_size)
        key += (settings, keep_cache, U, C, len(stop), len(banned))
        if prev is not None:
            key += (prev.cache.k.shape, prev.cache.k.dtype)
        fn = self._program(key, self._out_shardings(B, gen_len, cache_shape))

        tokens, mask = left_pad(block, C, pad_id, rows=U)
        row_valid = np.arange(U) < n
        prev_args = None
        if prev is not None:
            rows_padded = np.zeros((U,), np.int32)
            rows_padded[:n] = rows
            rows_arg = None if in_order else put(rows_padded, ("batch",))
            prev_args = (prev.cache, prev.seq_lens, rows_arg)
        args = (
            state,
            prev_args,
            put(tokens, ("batch", None)),
            put(mask, ("batch", None)),
            put(row_valid, ("batch",)),
            put(rng, None),
            put(np.int32(max_new_tokens), None),
            put(np.float32(temperature if temperature > 0 else 1.0), None),
            put(np.float32(top_p), None),
            put(stop, None),
            put(np.int32(pad_id), None),
            put(banned, None),
            put(np.int32(min_new_tokens), None),
        )
        return fn, args

    def _call(
        self,
        state: Any,
        prev: Rollout | None,
        rows: np.ndarray | None,
        block: Sequence[Sequence[int]],
        *,
        num_samples: int,
        max_new_tokens: int,
        keep_cache: bool,
        **kw: Any,
    ) -> SampleOutput:
        fn, args = self._prepare(
            state,
            prev,
            rows,
            block,
            num_samples=num_samples,
            max_new_tokens=max_new_tokens,
            keep_cache=keep_cache,
            **kw,
        )
        if self.mesh is not None:
            with jax.set_mesh(self.mesh):
                out = fn(*args)
        else:
            out = fn(*args)
        real = len(block) * num_samples
        tokens_out, logprobs, lengths, done = jax.device_get(
            (out["tokens"], out["logprobs"], out["lengths"], out["done"])
        )
        rollout = None
        if keep_cache:
            index = int(jax.device_get(out["cache"].index))
            rollout = Rollout(out["cache"], out["seq_lens"], num_rows=real, index=index)
        return SampleOutput(
            tokens=np.asarray(tokens_out)[:real, :max_new_tokens],
            logprobs=np.asarray(logprobs)[:real, :max_new_tokens],
            lengths=np.asarray(lengths)[:real],
            done=np.asarray(done)[:real],
            rollout=rollout,
        )

    def lower(
        self,
        state: Any,
        *,
        num_rows: int,
        block_len: int,
        num_samples: int,
        max_new_tokens: int,
        keep_cache: bool,
        prev: Rollout | None = None,
        num_stop_ids: int = 1,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        greedy: bool = False,
    ) -> jax.stages.Lowered:
        """The program `sample` (prev None) or `continue_` (all of `prev`'s rows, in order)
        runs for `num_rows` prompts / new turns of `block_len` tokens, lowered without
        running it.

        `state` (and `prev.cache`, `prev.seq_lens`) may be `jax.ShapeDtypeStruct`s with
        their shardings: nothing is allocated or placed, so `.compile().memory_analysis()`
        sizes a rollout ahead of time, also for devices that are only described (a TPU
        topology from `jax.experimental.topologies`). An abstract `prev` is built from the
        output shapes of an earlier lowering, with `index` = the slots it may have used.
        """
        rows = None if prev is None else np.arange(num_rows) % prev.num_rows
        fn, args = self._prepare(
            state,
            prev,
            rows,
            [[0] * block_len] * num_rows,
            num_samples=num_samples,
            max_new_tokens=max_new_tokens,
            rng=0,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            greedy=greedy,
            stop_ids=list(range(num_stop_ids)),
            pad_id=0,
            keep_cache=keep_cache,
            banned_ids=(),
            min_new_tokens=0,
            abstract=True,
        )
        if self.mesh is None:
            return fn.lower(*args)
        with jax.set_mesh(self.mesh):
            return fn.lower(*args)

    # ------------------------------------------------------------------ public

    def sample(
        self,
        state: Any,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        rng: jax.Array | int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        greedy: bool = False,
        stop_ids: Sequence[int] = (),
        pad_id: int = 0,
        num_samples: int = 1,
        share_prefix: bool = True,
        keep_cache: bool = True,
        banned_ids: Sequence[int] = (),
        min_new_tokens: int = 0,
    ) -> SampleOutput:
        """Sample completions of ragged prompts; output row u*G+g is sample g of prompt u.

        `state`: the model's current `nnx.State` (or the model itself). With
        `share_prefix` each prompt is prefilled once and its G = num_samples rows
        attend to that one prefix while decoding; without, prompts are repeated
        before prefill (same tokens under the same rng either way). `keep_cache`:
        return the [B]-row cache as `SampleOutput.rollout`, for `continue_` (it is
        materialised at the end; pass False for rollouts that end here).
        `banned_ids` are never sampled and `stop_ids` not before `min_new_tokens`
        tokens; the returned log-probs stay over the full vocabulary (module docstring).
        """
        if not share_prefix and num_samples > 1:
            prompts = [p for p in prompts for _ in range(num_samples)]
            num_samples = 1
        return self._call(
            state,
            None,
            None,
            prompts,
            num_samples=num_samples,
            max_new_tokens=max_new_tokens,
            rng=rng,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            greedy=greedy,
            stop_ids=stop_ids,
            pad_id=pad_id,
            keep_cache=keep_cache,
            banned_ids=banned_ids,
            min_new_tokens=min_new_tokens,
        )

    def continue_(
        self,
        state: Any,
        rollout: Rollout,
        new_ids: Sequence[Sequence[int]],
        *,
        rows: Sequence[int] | None = None,
        max_new_tokens: int,
        rng: jax.Array | int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        greedy: bool = False,
        stop_ids: Sequence[int] = (),
        pad_id: int = 0,
        num_samples: int = 1,
        keep_cache: bool = True,
        banned_ids: Sequence[int] = (),
        min_new_tokens: int = 0,
    ) -> SampleOutput:
        """Append a new turn to rows of an earlier rollout and keep sampling.

        New row i continues `rollout` row `rows[i]` (default: i; repeats allowed):
        its sequence so far (prompt and full completion, already in the cache) is
        followed by `new_ids[i]` (at least one id), then sampled. With
        `num_samples` = G each continued row is then repeated G times after its new
        turn is prefilled once (output row i*G+g). The rng layout is the one of
        `sample`, so the result equals `sample` on the concatenated sequences.
        """
        if rollout is None:
            raise ValueError("no rollout to continue: sample with keep_cache=True")
        rows_arr = np.arange(len(new_ids)) if rows is None else np.asarray(rows, np.int32)
        if len(rows_arr) != len(new_ids):
            raise ValueError(f"{len(rows_arr)} rows for {len(new_ids)} new turns")
        if len(rows_arr) and (rows_arr.min() < 0 or rows_arr.max() >= rollout.num_rows):
            raise ValueError(f"rows must index the rollout's {rollout.num_rows} rows")
        return self._call(
            state,
            rollout,
            rows_arr,
            new_ids,
            num_samples=num_samples,
            max_new_tokens=max_new_tokens,
            rng=rng,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            greedy=greedy,
            stop_ids=stop_ids,
            pad_id=pad_id,
            keep_cache=keep_cache,
            banned_ids=banned_ids,
            min_new_tokens=min_new_tokens,
        )
