"""Sampling operations: what a draw is (`SamplingSpec`) and how one is made.

`SamplingSpec` holds every choice about how tokens are drawn and when a row stops
(temperature, top-k, top-p, greedy, stop ids, banned ids, min_new_tokens, the pad id,
whether log-probs come back). A run builds it once from its config
(`SamplingSpec.from_config`) and passes it whole to `reflax.sampler.Sampler`, which
hands its device form (`SamplingSpec.on_device` -> `DeviceSpec`) to the jitted decode
loop of `reflax.decoding`.

Conventions
-----------
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
  Under greedy decoding (temperature 0) they are `log_softmax(logits)`. With
  `SamplingSpec.logprobs` False they are neither computed nor returned.
* A draw is exact Gumbel-max in two levels (`_categorical`): a block of about
  sqrt(V) vocabulary entries from the blocks' masses, then an entry within it.
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

__all__ = ["DeviceSpec", "SamplingSpec", "forbidden_mask", "sample_logits"]

_ID_BLOCK = 8  # id lists are padded to a multiple of this: one program for most sets


def _ids(ids: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(i) for i in ids)


@dataclasses.dataclass(frozen=True)
class SamplingSpec:
    """How tokens are drawn and when a row stops; frozen and hashable.

    `temperature` 0 or `greedy` decodes greedily (top-k / top-p then play no part).
    `top_k` 0 keeps every token; `top_p` 1 keeps every token. Rows stop on any of
    `stop_ids` (the stop token is part of the completion) and emit `pad_id` after it.
    `banned_ids` are never drawn, `stop_ids` not before `min_new_tokens` tokens.
    `logprobs`: compute and return each sampled token's log-prob (module docstring).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    stop_ids: tuple[int, ...] = ()
    banned_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0
    pad_id: int = 0
    logprobs: bool = True

    def __post_init__(self) -> None:
        # lists, numpy ids and ranges are accepted and stored as tuples of int (hashable)
        object.__setattr__(self, "stop_ids", _ids(self.stop_ids))
        object.__setattr__(self, "banned_ids", _ids(self.banned_ids))
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")

    @classmethod
    def from_config(cls, config: Any, tok: Any) -> SamplingSpec:
        """A run's rollout sampling: `config.rollout`'s temperature, top-k and top-p, the
        tokenizer's (`ChatTokens`) stop ids and pad id. No log-probs: the train step
        computes its own old log-probs when it needs them (grpo.mu > 1)."""
        r = config.rollout
        return cls(
            temperature=r.temperature,
            top_k=r.top_k,
            top_p=r.top_p,
            stop_ids=tok.stop_ids,
            pad_id=tok.pad_id,
            logprobs=False,
        )

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    def with_greedy(self, greedy: bool) -> SamplingSpec:
        """This spec, decoding greedily when `greedy` (unchanged otherwise)."""
        return dataclasses.replace(self, greedy=True) if greedy else self

    def check(self, vocab_size: int) -> None:
        """Forbidden ids must be token ids, and they must leave some token to sample."""
        if any(not 0 <= i < vocab_size for i in self.banned_ids):
            raise ValueError(f"banned_ids must lie in [0, {vocab_size}), got {self.banned_ids}")
        early = set(self.banned_ids)
        if self.min_new_tokens > 0:
            early |= {i for i in self.stop_ids if 0 <= i < vocab_size}
        if len(early) >= vocab_size:
            raise ValueError("banned_ids (and stop_ids before min_new_tokens) forbid every token")

    def on_device(self, vocab_size: int) -> DeviceSpec:
        """The form the decode loop takes: values as numpy leaves (traced, so changing
        them does not recompile), the choices that shape the program static."""
        self.check(vocab_size)
        greedy = self.is_greedy
        top_k = self.top_k if not greedy and 0 < self.top_k < vocab_size else 0
        return DeviceSpec(
            temperature=np.float32(1.0 if greedy else self.temperature),
            top_p=np.float32(self.top_p),
            stop_ids=_id_block(self.stop_ids),
            banned_ids=_id_block(self.banned_ids),
            min_new_tokens=np.int32(self.min_new_tokens),
            pad_id=np.int32(self.pad_id),
            greedy=greedy,
            top_k=top_k,
            # with top-k, top-p acts on the k sorted candidates for free; without, it
            # needs a sort of the whole vocabulary, run only when top_p < 1
            vocab_top_p=not greedy and top_k == 0 and self.top_p < 1.0,
            logprobs=self.logprobs,
        )


def _id_block(ids: Sequence[int]) -> np.ndarray:
    """Ids padded with -1 (never matched) to a multiple of `_ID_BLOCK`."""
    block = np.full((max(1, -(-len(ids) // _ID_BLOCK)) * _ID_BLOCK,), -1, np.int32)
    block[: len(ids)] = np.asarray(ids, np.int32)
    return block


class DeviceSpec(flax.struct.PyTreeNode):
    """A `SamplingSpec` as the jitted decode loop takes it (`SamplingSpec.on_device`).

    Leaves are traced values; the static fields are part of the compiled program.
    """

    temperature: jax.Array  # [] float32 (1 when greedy: unused)
    top_p: jax.Array  # [] float32
    stop_ids: jax.Array  # [S] int32, -1 entries never match
    banned_ids: jax.Array  # [S'] int32, -1 entries ignored
    min_new_tokens: jax.Array  # [] int32: no stop id before this many tokens
    pad_id: jax.Array  # [] int32
    greedy: bool = flax.struct.field(pytree_node=False, default=False)
    top_k: int = flax.struct.field(pytree_node=False, default=0)  # 0: no top-k truncation
    vocab_top_p: bool = flax.struct.field(pytree_node=False, default=False)
    logprobs: bool = flax.struct.field(pytree_node=False, default=True)


def sample_logits(
    logits: jax.Array,  # [B, V] float32
    keys: jax.Array,  # [B] keys
    spec: DeviceSpec,
    forbidden: jax.Array | None = None,  # [V] or [B, V] bool: never drawn
) -> tuple[jax.Array, jax.Array | None]:
    """One token per row -> (tokens [B] int32, untruncated log-probs [B] float32, or None
    without `spec.logprobs`).

    The log-probs are over the full vocabulary: neither top-k / top-p nor `forbidden`
    changes them (module docstring). Some token of every row must be allowed.
    """
    allowed = lambda z: z if forbidden is None else jnp.where(forbidden, -jnp.inf, z)
    picked = lambda logp, tokens: jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    if spec.greedy:
        tokens = jnp.argmax(allowed(logits), axis=-1).astype(jnp.int32)
        if not spec.logprobs:
            return tokens, None
        return tokens, picked(jax.nn.log_softmax(logits, axis=-1), tokens)

    scaled = logits / spec.temperature
    logp = jax.nn.log_softmax(scaled, axis=-1) if spec.logprobs else None
    scaled = allowed(scaled)
    index = None  # [B, k] vocab ids of the candidates when truncated
    if spec.top_k:
        # top-k first: top-p then only looks at k candidates, already sorted
        cand, index = jax.lax.top_k(scaled, spec.top_k)  # [B, k], descending
    elif spec.vocab_top_p:
        index = jnp.argsort(-scaled, axis=-1, stable=True).astype(jnp.int32)
        cand = jnp.take_along_axis(scaled, index, axis=-1)
    else:
        cand = scaled
    if index is not None:
        top_p = spec.top_p
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
    return tokens, None if logp is None else picked(logp, tokens)


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
