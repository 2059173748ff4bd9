"""Group packing: each group's shared prefix stored, run and differentiated once.

In Reflect-Retry-Reward the G rows of a group share one long prefix (the query, the
failed attempt, the reflection instruction) and differ only in their last tokens (the
reflection; for `reflect_retry` also the retry). `pack_groups` turns an unpacked batch
of B = U * G rows into U rows `[prefix | suffix_1 | ... | suffix_G]` (layout in
`reflax.trainer.Batch`); the train step then runs the prefix once per group and each
suffix against it (`Decoder.packed_hidden_states`), with the same loss, metrics and
gradients as the unpacked batch.

The prefix of a group is the longest run of leading slots on which all its rows agree
in token and anchor mask and carry no loss token (loss tokens have per-sample
advantages, so they are never shared). Its length and the suffix length are rounded up
on a short ladder of sizes (`bucket_lengths`), so a run compiles a handful of programs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from reflax.trainer import Batch


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


def _shared_prefix(tokens: np.ndarray, anchor: np.ndarray, loss: np.ndarray, n: int) -> int:
    """Leading slots (< n, the shortest row) on which the [G, T] rows agree, no loss token."""
    same = (tokens[:, :n] == tokens[0, :n]).all(0) & (anchor[:, :n] == anchor[0, :n]).all(0)
    same &= ~(loss[:, :n] > 0).any(0)
    return int(np.argmin(same)) if not same.all() else n


def pack_groups(batch: Batch, group_size: int, lengths: Sequence[int] | None = None) -> Batch:
    """An unpacked host batch (numpy; rows u * G ... u * G + G - 1 form group u, each row
    right-padded) -> the packed batch of its U groups.

    `lengths`: the sizes a prefix or suffix region may take (default: `bucket_lengths` up
    to the unpacked row length); both regions take the smallest that fits every group.
    Advantages come along per sample ([U, G]); old log-probs, positions and masks move
    with their tokens. Tokens at an unpacked row's slot 0 are scored by nothing, so their
    masks are dropped.
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
    loss = np.asarray(batch.loss_mask, np.float32).copy()
    anchor = np.asarray(batch.anchor_mask, np.float32).copy()
    loss[:, 0] = anchor[:, 0] = 0.0  # position 0 is scored by nothing

    shared = np.zeros(U, np.int64)
    for u in range(U):
        rows = slice(u * G, (u + 1) * G)
        shortest = int(n_real[rows].min())
        shared[u] = _shared_prefix(tokens[rows], anchor[rows], loss[rows], shortest)
    suffix = n_real - np.repeat(shared, G)  # [B]
    ladder = bucket_lengths(T) if lengths is None else lengths
    Lp = fit_length(max(int(shared.max()), 1), ladder)
    Ls = fit_length(max(int(suffix.max()), 1), ladder)
    P = Lp + G * Ls

    fields = {  # [B, T] each, moved slot by slot into [U, P]
        "tokens": tokens.astype(np.int32, copy=False),
        "positions": np.asarray(batch.positions, np.int32),
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
