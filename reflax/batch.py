"""The train batch: its layout (`Batch`), group packing, abstract shapes, placement.

A batch is a pytree of fixed-shape arrays, built on the host (`reflax.episodes`),
optionally packed (`pack_groups`), placed on the mesh (`shard_batch`) and consumed by
the compiled step (`reflax.trainer`), which is specialised to its `layout`.

Group packing: in Reflect-Retry-Reward the G rows of a group share one long prefix (the
query, the failed attempt, the reflection instruction) and differ only in their last
tokens (the reflection; for `reflect_retry` also the retry). `pack_groups` turns an
unpacked batch of B = U * G rows into U rows `[prefix | suffix_1 | ... | suffix_G]`; the
train step then runs the prefix once per group and each suffix against it
(`Decoder.packed_hidden_states`), with the same loss, metrics and gradients as the
unpacked batch.

The prefix of a group is the longest run of leading slots on which all its rows agree
in token, position and anchor mask and carry no loss token (loss tokens have per-sample
advantages, so they are never shared). Its length and the suffix length are rounded up
to sizes of a `PackLengths`: a run uses `PackLengths.coarse`, a few sizes per region, so
the train programs of every reachable (prefix, suffix) pair (`PackLengths.layouts`) are
compiled before the first step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from reflax.sharding import batch_sharding, put


class Batch(flax.struct.PyTreeNode):
    """One GRPO batch of fixed-shape rows.

    Unpacked (`group_size == 0`): B sequences of T tokens, right-padded, one per sample.

    Group-packed (`pack_groups`): one row per group of G samples,
    `[prefix | suffix_1 | ... | suffix_G]`: the tokens the group's rows share, once,
    left-padded to `prefix_len` slots, then each sample's own tokens in a region of
    Ls = (T - prefix_len) / G slots, right-padded, with positions continuing after the
    prefix. Loss tokens lie in the suffixes only; `advantages` is [B, G], one per sample.
    """

    tokens: jax.Array  # [B, T] int32
    positions: jax.Array  # [B, T] int32
    mask: jax.Array  # [B, T] bool: real token
    loss_mask: jax.Array  # [B, T] float32: 1 on the tokens that get a gradient (reflections)
    anchor_mask: jax.Array  # [B, T] float32: 1 on sampled tokens kept near the reference (KL only)
    advantages: jax.Array  # [B] float32, or [B, G] when packed
    old_logprobs: jax.Array  # [B, T] float32: log p_old(tokens[t]) at position t (mu > 1)
    prefix_len: int = flax.struct.field(pytree_node=False, default=0)  # packed: Lp
    group_size: int = flax.struct.field(pytree_node=False, default=0)  # packed: G; 0 unpacked

    @property
    def packed(self) -> bool:
        return self.group_size > 0

    @classmethod
    def abstract(
        cls, batch_size: int, seq_len: int, prefix_len: int = 0, group_size: int = 0
    ) -> Batch:
        """Shapes and dtypes of a batch (`jax.ShapeDtypeStruct`s): to compile a step ahead.
        With `group_size`, a packed batch of `batch_size` groups."""
        sds = jax.ShapeDtypeStruct
        bt = (batch_size, seq_len)
        adv = (batch_size, group_size) if group_size else (batch_size,)
        return cls(
            tokens=sds(bt, jnp.int32),
            positions=sds(bt, jnp.int32),
            mask=sds(bt, jnp.bool_),
            loss_mask=sds(bt, jnp.float32),
            anchor_mask=sds(bt, jnp.float32),
            advantages=sds(adv, jnp.float32),
            old_logprobs=sds(bt, jnp.float32),
            prefix_len=prefix_len,
            group_size=group_size,
        )

    def sample_rows(self, x: jax.Array) -> jax.Array:
        """A [B, T] array aligned to tokens -> the rows the policy loss sees, one per sample:
        [B, T - 1] unpacked (position 0 predicts nothing), [B * G, Ls] packed."""
        if not self.packed:
            return x[:, 1:]
        B, T = x.shape[:2]
        G = self.group_size
        return x[:, self.prefix_len :].reshape(B * G, (T - self.prefix_len) // G)

    def anchor_parts(self, x: jax.Array) -> list[tuple[jax.Array, float]]:
        """A [B, T] array aligned to tokens -> (part, weight) pairs covering every scored
        token; a packed prefix counts once per sample that shares it (weight G), so the
        anchor's sums equal the unpacked batch's."""
        if not self.packed:
            return [(x[:, 1:], 1.0)]
        return [(x[:, 1 : self.prefix_len], float(self.group_size)), (self.sample_rows(x), 1.0)]


def layout(batch: Batch) -> Batch:
    """The abstract batch (shapes, dtypes, packing) a compiled step is specialised to."""
    B, T = batch.tokens.shape
    return Batch.abstract(B, T, batch.prefix_len, batch.group_size)


def batch_shardings(batch: Batch, mesh: Mesh) -> Batch:
    """Every field's leading (row) axis over the batch mesh axes, the rest whole."""
    return jax.tree.map(lambda x: batch_sharding(mesh, x.shape), batch)


def shard_batch(batch: Batch, mesh: Mesh | None) -> Batch:
    """Place a host batch (the full global batch, identical on every host) on the mesh.

    Each shard is cut from the host copy, so this is exact for any mesh, also where a
    batch shard spans processes (a tensor axis across hosts).
    """
    if mesh is None:
        return jax.tree.map(jnp.asarray, batch)
    return put(batch, batch_shardings(batch, mesh))


# --- group packing ----------------------------------------------------------------------


def bucket_lengths(max_len: int, minimum: int = 16) -> tuple[int, ...]:
    """The ladder of region sizes: 16, 24, 32, 48, 64, 96, ... (2^k and 3 * 2^(k-1), at
    most 1.5x apart), up to and including the first one >= `max_len`."""
    sizes, k = [], max(int(minimum), 2)
    while True:
        for n in (k, k * 3 // 2):
            sizes.append(n)
            if n >= max_len:
                return tuple(sizes)
        k *= 2


def fit_length(n: int, lengths: Sequence[int]) -> int:
    """The smallest of `lengths` that holds `n` slots."""
    for length in sorted(lengths):
        if length >= n:
            return int(length)
    raise ValueError(f"no packed length in {tuple(lengths)} holds {n} slots")


@dataclasses.dataclass(frozen=True)
class PackLengths:
    """The sizes a packed row's prefix region and each suffix region may take: a batch of
    U groups packs into one of `len(prefix) * len(suffix)` layouts."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]

    @classmethod
    def fine(cls, seq_len: int) -> PackLengths:
        """Every `bucket_lengths` size up to the row length, for both regions: the least
        padding, and one program per pair a batch happens to need."""
        ladder = bucket_lengths(seq_len)
        return cls(ladder, ladder)

    @classmethod
    def coarse(cls, seq_len: int, suffix_len: int, sizes: int) -> PackLengths:
        """The `sizes` largest `bucket_lengths` sizes per region: a shared prefix holds
        up to `seq_len` slots, a sample's own tokens up to `suffix_len`. At most
        sizes^2 layouts, each padding a region at most 1.5x above its smallest size."""
        if sizes < 1:
            raise ValueError(f"a packed region needs at least one size, got {sizes}")
        top = lambda n: bucket_lengths(max(int(n), 1))[-int(sizes) :]
        return cls(top(seq_len), top(min(suffix_len, seq_len)))

    def layouts(self, groups: int, group_size: int) -> list[Batch]:
        """The abstract packed batch of every (prefix, suffix) pair."""
        G = int(group_size)
        return [
            Batch.abstract(groups, lp + G * ls, lp, G) for lp in self.prefix for ls in self.suffix
        ]


def _shared_prefix(fields: Sequence[np.ndarray], loss: np.ndarray, n: int) -> int:
    """Leading slots (< n, the shortest row) on which the [G, T] rows agree in every one of
    `fields` and carry no loss token."""
    same = ~(loss[:, :n] > 0).any(0)
    for x in fields:
        same &= (x[:, :n] == x[0, :n]).all(0)
    return int(np.argmin(same)) if not same.all() else n


def pack_groups(batch: Batch, group_size: int, lengths: PackLengths | None = None) -> Batch:
    """An unpacked host batch (numpy; rows u * G ... u * G + G - 1 form group u, each row
    right-padded) -> the packed batch of its U groups.

    `lengths`: the sizes the prefix and suffix regions may take (default
    `PackLengths.fine` of the unpacked row length); each region takes the smallest that
    fits every group. Advantages come along per sample ([U, G]); old log-probs,
    positions and masks move with their tokens. Tokens at an unpacked row's slot 0 are
    scored by nothing, so their masks are dropped.
    """
    tokens = np.asarray(batch.tokens)
    B, T = tokens.shape
    G = int(group_size)
    if batch.group_size:
        raise ValueError("the batch is packed already")
    if G < 1 or B % G:
        raise ValueError(f"batch of {B} rows is not whole groups of {G}")
    U = B // G
    mask = np.asarray(batch.mask, bool)
    n_real = mask.sum(1)
    if not (mask == (np.arange(T)[None, :] < n_real[:, None])).all():
        raise ValueError("pack_groups needs right-padded rows (real tokens from slot 0)")
    positions = np.asarray(batch.positions, np.int32)
    loss = np.asarray(batch.loss_mask, np.float32).copy()
    anchor = np.asarray(batch.anchor_mask, np.float32).copy()
    loss[:, 0] = anchor[:, 0] = 0.0  # position 0 is scored by nothing

    shared = np.zeros(U, np.int64)
    for u in range(U):
        rows = slice(u * G, (u + 1) * G)
        shortest = int(n_real[rows].min())
        fields = (tokens[rows], positions[rows], anchor[rows])
        shared[u] = _shared_prefix(fields, loss[rows], shortest)
    suffix = n_real - np.repeat(shared, G)  # [B]
    lengths = PackLengths.fine(T) if lengths is None else lengths
    Lp = fit_length(max(int(shared.max()), 1), lengths.prefix)
    Ls = fit_length(max(int(suffix.max()), 1), lengths.suffix)
    P = Lp + G * Ls

    fields = {  # [B, T] each, moved slot by slot into [U, P]
        "tokens": tokens.astype(np.int32, copy=False),
        "positions": positions,
        "mask": mask,
        "loss_mask": loss,
        "anchor_mask": anchor,
        "old_logprobs": np.asarray(batch.old_logprobs, np.float32),
    }
    out = {name: np.zeros((U, P), src.dtype) for name, src in fields.items()}
    for name, src in fields.items():
        dst = out[name]
        for u in range(U):
            n = int(shared[u])
            first = u * G
            dst[u, Lp - n : Lp] = src[first, :n]  # left-padded prefix, from the group's row 0
            for g in range(G):
                b, start = first + g, Lp + g * Ls
                m = int(suffix[b])
                dst[u, start : start + m] = src[b, n : n + m]
    advantages = np.asarray(batch.advantages, np.float32).reshape(U, G)
    return Batch(
        **out,
        advantages=advantages,
        prefix_len=Lp,
        group_size=G,
    )
