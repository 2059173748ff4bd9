"""GRPO numerics: group advantages, token log-probabilities and the clipped policy loss.

Everything here is a pure, jit-friendly function of fixed-shape arrays. The formulas follow
TRL's ``GRPOTrainer``; where this module deviates or has to pick one of several conventions,
the choice is listed here.

Shape letters: ``U`` groups, ``G`` samples per group, ``B`` sequences, ``T`` positions,
``D`` hidden size, ``V`` vocabulary size.

Numeric decisions
-----------------
Advantages (:func:`group_advantages`)
  * ``A = (r - mean_g(r)) / (std_g(r) + eps)`` with ``eps = 1e-4`` (TRL's constant), or
    ``A = r - mean_g(r)`` when ``scale=False`` (Dr. GRPO).
  * ``std="unbiased"`` (default) uses Bessel's correction (divide by ``G - 1``) because TRL
    calls ``torch.std``, which is unbiased; ``std="biased"`` divides by ``G``. Unbiased std
    needs ``G >= 2`` and raises otherwise.
  * A group whose rewards are all equal gets an advantage of exactly 0. In float32 the group
    mean of equal values can be off by one ulp and ``1 / (std + eps)`` would amplify that to
    ~1e-4; such groups carry no learning signal, so they are zeroed explicitly.
  * Padding groups (``valid == False``) get advantage 0 and are excluded from the stats;
    their rewards may be anything, NaN included.

Log-probabilities (:func:`token_logprobs`, :func:`token_logprobs_and_entropy`)
  * Logits are produced in float32 (``preferred_element_type=float32``, so bf16 weights are
    never up-cast as a whole) and divided by ``temperature`` before the softmax, as TRL does
    so that the loss sees the distribution that was sampled from.
  * ``targets[b, t]`` is the token scored by position ``t``; the caller shifts ids by one.
    Targets must lie in ``[0, V)`` at every position (use the pad id at padding): an
    out-of-range id yields NaN, which is harmless only where ``loss_mask`` is 0.
  * Entropy is ``logsumexp(z) - sum(softmax(z) * z)``; logits must be finite.
  * The fused LM-head version maps (``lax.map``) over chunks of ``chunk_size`` sequence
    positions with a rematerialised (``jax.checkpoint``) body, so at most
    ``[B, chunk_size, V]`` logits exist at a time in the forward and the backward pass. A
    single chunk (``chunk_size >= T``) keeps its logits for the backward pass instead of
    recomputing them.
    Chunking along ``T`` (not ``B * T``) keeps ``B`` a plain batch axis of every chunk, so a
    batch-sharded input is never scanned over its sharded axis. ``T`` need not be a multiple
    of ``chunk_size``: it is zero-padded and the padding is sliced off. The trainer's
    default chunk is the largest whose ``[rows, chunk, V]`` logits fit a byte budget
    (:func:`logits_chunk`, ``grpo.logits_bytes``): one chunk for a small vocabulary, which
    also skips the recomputation, and a few hundred positions for a 150k one.
  * An optional ``mask`` replaces hidden states/logits at masked positions by zeros before any
    arithmetic, so NaN/Inf stored there cannot reach any gradient (``0 * nan = nan`` would
    otherwise leak into the LM-head gradient through the matmul).

Loss (:func:`grpo_loss`)
  * ``ratio = exp(clip(lp - old, -log_ratio_clip, log_ratio_clip))`` with
    ``log_ratio_clip = 20``: the clip only guards against overflow (``exp(20) ~ 5e8``; beyond
    it the token's gradient is 0); the PPO clip does the real trust-region work.
  * ``old_logprobs=None`` means one optimisation step per generation (mu = 1): ``old`` is
    ``stop_gradient(lp)``, so ``ratio == 1`` and the gradient is the plain policy gradient.
  * Per-token loss ``-min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A) + beta * k3``
    with ``eps_high = eps`` unless given (DAPO's clip-higher), and the k3 estimator
    ``k3 = exp(ref - lp) - (ref - lp) - 1`` (Schulman), whose log-difference is clipped like
    the ratio's. ``beta == 0`` or ``ref_logprobs is None`` drops the KL term.
  * :func:`anchor_kl` is the same k3 on tokens that get no reward (``anchor_mask``, the
    failed first attempt). The anchor has its own normaliser, the number of anchor tokens
    of the whole step, under every ``loss_type``: the trainer's objective is
    ``num / den + anchor_beta * sum(anchor k3) / anchor tokens``, so ``anchor_beta``
    weighs the mean per-token KL on the attempt whatever the policy loss's normaliser is
    (sharing ``den`` would make its strength depend on the reflection lengths, the row
    count or ``max_len``). Both normalisers depend only on the masks, so the trainer counts
    them over the whole step before its micro-batch scan, which keeps accumulation exact.
  * Every input is passed through ``jnp.where(loss_mask, x, 0)`` before use and the per-token
    loss through it again after, so the gradient w.r.t. ``logprobs`` at a masked position is
    exactly 0.0 even if the inputs there are NaN/Inf (advantages of rows without loss tokens
    are ignored the same way). Upstream, the logit gradient there is then exactly 0.0 for any
    logits without NaN/+Inf; pass ``mask`` to the log-prob functions to cover those too.
  * The loss is returned as ``(numerator, denominator)``: summing both over micro-batches (and
    devices) and dividing once, with :func:`safe_divide`, gives exactly the full-batch loss,
    because no denominator depends on the parameters. Per micro-batch, differentiate the
    numerator, sum the gradients, divide by the summed denominator; or, as the trainer does,
    count the whole batch's denominator first (:func:`loss_denominator`, from the mask alone)
    and differentiate each micro-batch's ``numerator / denominator``.

      ``token_mean`` (default; DAPO / TRL ``"bnpo"``):
          sum of masked per-token losses / number of masked tokens.
      ``seq_mean`` (TRL ``"grpo"``): mean over each sequence's masked tokens, then mean over
          the sequences that have at least one masked token. TRL averages over all rows; here
          rows without loss tokens (e.g. padding rows) are not counted, so they cannot dilute
          the step. With every row non-empty the two agree.
      ``constant`` (Dr. GRPO / TRL ``"dr_grpo"``): sum of masked per-token losses /
          ``(B * max_len)``; ``max_len`` defaults to ``T``.

  * Metrics are additive too (and carry no gradient): every entry of the metrics dict is a
    sum (or count) over the micro-batch; accumulate them with
    ``jax.tree.map(jnp.add, a, b)`` and call :func:`finalize_metrics` once to get per-token
    means. Clip fractions count tokens on which the clipped branch is active (zero
    gradient), TRL's definition: low is
    ``ratio < 1 - eps and A < 0``, high is ``ratio > 1 + eps_high and A > 0``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp

from reflax.config import LOSS_TYPES, LossType

Array = jax.Array
StdType = Literal["unbiased", "biased"]


# ----------------------------------------------------------------------------- small helpers


def masked_sum(x: Array, mask: Array, axis: int | tuple[int, ...] | None = None) -> Array:
    """Sum of ``x`` over positions where ``mask`` is true; NaN/Inf at masked-out entries ignored."""
    return jnp.sum(jnp.where(mask.astype(bool), x, 0), axis=axis)


def masked_mean(x: Array, mask: Array, axis: int | tuple[int, ...] | None = None) -> Array:
    """Mean of ``x`` over positions where ``mask`` is true; 0 where nothing is selected."""
    count = jnp.sum(mask.astype(jnp.float32), axis=axis)
    return safe_divide(masked_sum(x.astype(jnp.float32), mask, axis), count)


def safe_divide(numerator: Array, denominator: Array) -> Array:
    """``numerator / denominator``, with 0 where ``denominator == 0`` (e.g. a step without
    loss tokens, whose numerator is 0 too)."""
    denominator = jnp.asarray(denominator, jnp.float32)
    return jnp.where(denominator > 0, numerator / jnp.where(denominator > 0, denominator, 1.0), 0.0)


# ----------------------------------------------------------------------------- advantages


def group_advantages(
    rewards: Array,
    valid: Array,
    *,
    eps: float = 1e-4,
    std: StdType = "unbiased",
    scale: bool = True,
) -> tuple[Array, dict[str, Array]]:
    """Group-relative advantages.

    Args:
      rewards: ``[U, G]`` rewards; row ``u`` holds the G samples of one group.
      valid: ``[U]`` bool, False for padding groups.
      eps: added to the group std before dividing.
      std: ``"unbiased"`` (Bessel, ``torch.std``; default) or ``"biased"``.
      scale: divide by ``std + eps``; False gives the centred reward only.

    Returns:
      ``advantages [U, G]`` float32 (0 for padding and zero-variance groups) and stats over the
      valid groups: ``reward_mean``, ``reward_std`` (mean within-group std),
      ``frac_zero_std`` (fraction of groups with all rewards equal), ``num_groups``,
      ``adv_abs_mean``.
    """
    if rewards.ndim != 2 or valid.shape != rewards.shape[:1]:
        raise ValueError(f"want rewards [U, G] and valid [U], got {rewards.shape}, {valid.shape}")
    if std not in ("unbiased", "biased"):
        raise ValueError(f"std must be 'unbiased' or 'biased', got {std!r}")
    num_samples = rewards.shape[1]
    if std == "unbiased" and num_samples < 2:
        raise ValueError("unbiased std needs at least 2 samples per group")

    valid_ug = jnp.broadcast_to(valid.astype(bool)[:, None], rewards.shape)  # [U, G]
    r_ug = jnp.where(valid_ug, rewards.astype(jnp.float32), 0.0)  # padding rewards may be NaN
    mean_u = jnp.mean(r_ug, axis=1)  # [U]
    centred_ug = r_ug - mean_u[:, None]
    ddof = 1 if std == "unbiased" else 0
    std_u = jnp.sqrt(jnp.sum(centred_ug**2, axis=1) / (num_samples - ddof))  # [U]
    zero_var_u = jnp.max(r_ug, axis=1) == jnp.min(r_ug, axis=1)  # [U]

    adv_ug = centred_ug / (std_u[:, None] + eps) if scale else centred_ug
    keep_u = valid.astype(bool) & ~zero_var_u
    adv_ug = jnp.where(keep_u[:, None], adv_ug, 0.0)

    valid_f = valid.astype(jnp.float32)
    stats = {
        "reward_mean": masked_mean(r_ug, valid_ug),
        "reward_std": masked_mean(std_u, valid_f),
        "frac_zero_std": masked_mean(zero_var_u.astype(jnp.float32), valid_f),
        "num_groups": jnp.sum(valid_f),
        "adv_abs_mean": masked_mean(jnp.abs(adv_ug), valid_ug),
    }
    return adv_ug, stats


# ----------------------------------------------------------------------------- log-probs


def _logprobs_entropy_f32(logits: Array, targets: Array) -> tuple[Array, Array]:
    """``[..., V]`` float32 logits, ``[...]`` targets -> (log p(target), entropy), ``[...]``."""
    lse = jax.nn.logsumexp(logits, axis=-1)  # [...]
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)
    logprobs = target_logit[..., 0] - lse
    probs = jnp.exp(logits - lse[..., None])
    entropy = lse - jnp.sum(probs * logits, axis=-1)
    return logprobs, entropy


def token_logprobs(
    logits: Array,
    targets: Array,
    *,
    temperature: float = 1.0,
    mask: Array | None = None,
) -> Array:
    """``log_softmax(logits / temperature)`` at ``targets``: ``[B, T, V], [B, T] -> [B, T]``."""
    z = logits.astype(jnp.float32) / temperature
    if mask is not None:
        z = jnp.where(mask.astype(bool)[..., None], z, 0.0)
    target_logit = jnp.take_along_axis(z, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    logprobs = target_logit - jax.nn.logsumexp(z, axis=-1)
    if mask is not None:
        logprobs = jnp.where(mask.astype(bool), logprobs, 0.0)
    return logprobs


def logits_chunk(rows: int, vocab: int, budget_bytes: int) -> int:
    """The most sequence positions whose ``[rows, chunk, vocab]`` float32 logits fit in
    ``budget_bytes``: a multiple of 8 from 8 up (TPU sublanes), at least 1."""
    chunk = int(budget_bytes) // (4 * max(int(rows), 1) * max(int(vocab), 1))
    return max(chunk - chunk % 8 if chunk >= 8 else chunk, 1)


def token_logprobs_and_entropy(
    hidden: Array,
    lm_head: Array,
    targets: Array,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = 256,
    mask: Array | None = None,
    chunk_rows: Callable[[Array], Array] | None = None,
    chunk_logits: Callable[[Array], Array] | None = None,
) -> tuple[Array, Array]:
    """Fused LM head + log-softmax + entropy without materialising ``[B, T, V]`` logits.

    Args:
      hidden: ``[B, T, D]`` final hidden states (after the final norm).
      lm_head: ``[D, V]`` output kernel, ``[in, out]`` layout.
      targets: ``[B, T]`` int token ids in ``[0, V)``.
      temperature: logits are divided by it.
      chunk_size: sequence positions per chunk (``None``: one chunk); each step holds
        ``[B, chunk_size, V]`` float32 logits. Any positive value works: ``T`` is zero-padded
        up to a multiple of it.
      mask: optional ``[B, T]``; where false the outputs are 0 and no gradient flows (hidden
        states there are ignored, even NaN ones).
      chunk_rows, chunk_logits: sharding hints (the values are unchanged) applied inside
        each chunk, to its ``[B, chunk, D]`` hidden states and ``[B, chunk]`` targets and to
        its ``[B, chunk, V]`` logits: a vocabulary-parallel head gathers one chunk's rows
        at a time (`reflax.trainer`).

    Returns:
      ``(logprobs [B, T], entropy [B, T])`` float32.
    """
    batch, length, dim = hidden.shape
    if lm_head.ndim != 2 or lm_head.shape[0] != dim:
        raise ValueError(f"lm_head must be [D={dim}, V], got {lm_head.shape}")
    if targets.shape != (batch, length):
        raise ValueError(f"targets must be [{batch}, {length}], got {targets.shape}")
    chunk = length if chunk_size is None else int(chunk_size)
    if chunk <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    chunk = min(chunk, length)
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length

    h_btd = hidden
    t_bt = targets.astype(jnp.int32)
    if mask is not None:
        h_btd = jnp.where(mask.astype(bool)[..., None], h_btd, jnp.zeros((), h_btd.dtype))
    if pad:
        h_btd = jnp.pad(h_btd, ((0, 0), (0, pad), (0, 0)))
        t_bt = jnp.pad(t_bt, ((0, 0), (0, pad)))
    # Chunks are cut along T, and B stays a batch axis inside every chunk, so a batch-sharded
    # input stays sharded: the scanned axis is never a sharded one.
    h_kbcd = h_btd.reshape(batch, num_chunks, chunk, dim).transpose(1, 0, 2, 3)
    t_kbc = t_bt.reshape(batch, num_chunks, chunk).transpose(1, 0, 2)

    def one_chunk(args: tuple[Array, Array]) -> tuple[Array, Array]:
        h_bcd, t_bc = args
        if chunk_rows is not None:
            h_bcd, t_bc = chunk_rows(h_bcd), chunk_rows(t_bc)
        z_bcv = jnp.dot(h_bcd, lm_head, preferred_element_type=jnp.float32) / temperature
        if chunk_logits is not None:
            z_bcv = chunk_logits(z_bcv)
        return _logprobs_entropy_f32(z_bcv, t_bc)

    if num_chunks == 1:  # all logits at once, as asked: nothing to save by recomputing them
        lp_kbc, ent_kbc = jax.tree.map(lambda x: x[None], one_chunk((h_kbcd[0], t_kbc[0])))
    else:
        # Rematerialised body: the backward pass recomputes one chunk's logits instead of
        # keeping [B, T, V] residuals.
        lp_kbc, ent_kbc = jax.lax.map(jax.checkpoint(one_chunk), (h_kbcd, t_kbc))
    logprobs = lp_kbc.transpose(1, 0, 2).reshape(batch, num_chunks * chunk)[:, :length]
    entropy = ent_kbc.transpose(1, 0, 2).reshape(batch, num_chunks * chunk)[:, :length]
    if mask is not None:
        logprobs = jnp.where(mask.astype(bool), logprobs, 0.0)
        entropy = jnp.where(mask.astype(bool), entropy, 0.0)
    return logprobs, entropy


# ----------------------------------------------------------------------------- loss


def _k3(lp: Array, ref: Array, log_ratio_clip: float) -> Array:
    """Schulman's k3 estimate of KL(policy || ref) per token, log-difference clipped."""
    diff = jnp.clip(ref - lp, -log_ratio_clip, log_ratio_clip)
    return jnp.exp(diff) - diff - 1.0


def grpo_loss(
    logprobs: Array,
    old_logprobs: Array | None,
    ref_logprobs: Array | None,
    advantages: Array,
    loss_mask: Array,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.001,
    loss_type: LossType = "token_mean",
    max_len: int | None = None,
    log_ratio_clip: float = 20.0,
) -> tuple[Array, Array, dict[str, Array]]:
    """Clipped GRPO surrogate with optional k3 KL penalty, as an exact-accumulation pair.

    Args:
      logprobs: ``[B, T]`` current-policy log-probs of the taken tokens (differentiable).
      old_logprobs: ``[B, T]`` sampling-policy log-probs, or None for mu = 1 (``old`` is
        ``stop_gradient(logprobs)``). Never differentiated.
      ref_logprobs: ``[B, T]`` reference-policy log-probs, or None (no KL term or metric).
      advantages: ``[B]`` per-sequence advantages.
      loss_mask: ``[B, T]`` bool/float, nonzero exactly on tokens that receive loss.
      epsilon: lower PPO clip, ``ratio >= 1 - epsilon``.
      epsilon_high: upper PPO clip, ``ratio <= 1 + epsilon_high``; defaults to ``epsilon``.
      beta: KL coefficient (static Python float).
      loss_type: ``"token_mean"``, ``"seq_mean"`` or ``"constant"`` (module docstring).
      max_len: length constant of ``"constant"``; defaults to ``T``.
      log_ratio_clip: bound on ``|lp - old|`` and ``|ref - lp|`` before ``exp``.

    Returns:
      ``(numerator, denominator, metrics)``; the loss is ``safe_divide(sum numerators,
      sum denominators)``. ``metrics`` holds additive sums: ``num_tokens``, ``num_seqs``,
      ``pg_loss_sum``, ``kl_sum``, ``ratio_sum``, ``clip_low_sum``, ``clip_high_sum``
      (see :func:`finalize_metrics`).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if logprobs.ndim != 2 or loss_mask.shape != logprobs.shape:
        raise ValueError(f"want logprobs/loss_mask [B, T], got {logprobs.shape}, {loss_mask.shape}")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be [B={logprobs.shape[0]}], got {advantages.shape}")
    eps_low = float(epsilon)
    eps_high = eps_low if epsilon_high is None else float(epsilon_high)
    mask_bt = loss_mask.astype(bool)
    mask_f_bt = mask_bt.astype(jnp.float32)

    def clean(x: Array) -> Array:
        # Select (not multiply) so NaN/Inf at masked positions affect neither value nor grad.
        return jnp.where(mask_bt, x.astype(jnp.float32), 0.0)

    lp_bt = clean(logprobs)
    if old_logprobs is None:
        old_bt = jax.lax.stop_gradient(lp_bt)
    else:
        old_bt = jax.lax.stop_gradient(clean(old_logprobs))
    adv_b1 = jnp.where(jnp.any(mask_bt, axis=1), advantages.astype(jnp.float32), 0.0)[:, None]

    log_ratio_bt = jnp.clip(lp_bt - old_bt, -log_ratio_clip, log_ratio_clip)
    ratio_bt = jnp.exp(log_ratio_bt)
    surr_unclipped_bt = ratio_bt * adv_b1
    surr_clipped_bt = jnp.clip(ratio_bt, 1.0 - eps_low, 1.0 + eps_high) * adv_b1
    pg_loss_bt = -jnp.minimum(surr_unclipped_bt, surr_clipped_bt)

    if ref_logprobs is not None:
        ref_bt = jax.lax.stop_gradient(clean(ref_logprobs))
        kl_bt = _k3(lp_bt, ref_bt, log_ratio_clip)
    else:
        kl_bt = jnp.zeros_like(lp_bt)
    per_token_bt = pg_loss_bt
    if ref_logprobs is not None and beta != 0.0:
        per_token_bt = per_token_bt + beta * kl_bt
    per_token_bt = jnp.where(mask_bt, per_token_bt, 0.0)

    tokens_b = jnp.sum(mask_f_bt, axis=1)  # [B]
    has_tokens_b = tokens_b > 0
    if loss_type == "seq_mean":
        numerator = jnp.sum(jnp.sum(per_token_bt, axis=1) / jnp.maximum(tokens_b, 1.0))
    else:
        numerator = jnp.sum(per_token_bt)
    denominator = loss_denominator(loss_mask, loss_type=loss_type, max_len=max_len)

    sg = jax.lax.stop_gradient
    clip_low_bt = (ratio_bt < 1.0 - eps_low) & (adv_b1 < 0) & mask_bt
    clip_high_bt = (ratio_bt > 1.0 + eps_high) & (adv_b1 > 0) & mask_bt
    metrics = {
        "num_tokens": jnp.sum(tokens_b),
        "num_seqs": jnp.sum(has_tokens_b.astype(jnp.float32)),
        "pg_loss_sum": sg(masked_sum(pg_loss_bt, mask_bt)),
        "kl_sum": sg(masked_sum(kl_bt, mask_bt)),
        "ratio_sum": sg(masked_sum(ratio_bt, mask_bt)),
        "clip_low_sum": jnp.sum(clip_low_bt.astype(jnp.float32)),
        "clip_high_sum": jnp.sum(clip_high_bt.astype(jnp.float32)),
    }
    return numerator, denominator, metrics


def loss_denominator(
    loss_mask: Array, *, loss_type: LossType = "token_mean", max_len: int | None = None
) -> Array:
    """The ``loss_type``'s normaliser of a ``[B, T]`` loss mask (module docstring).

    It depends on the mask only, never on the parameters, so the sum over micro-batches
    equals the value on the whole batch.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    mask_bt = loss_mask.astype(bool)
    if loss_type == "token_mean":
        return jnp.sum(mask_bt.astype(jnp.float32))
    if loss_type == "seq_mean":
        return jnp.sum(jnp.any(mask_bt, axis=1).astype(jnp.float32))
    batch, length = mask_bt.shape
    return jnp.asarray(float(batch * (length if max_len is None else int(max_len))), jnp.float32)


def anchor_kl(
    logprobs: Array, ref_logprobs: Array, anchor_mask: Array, *, log_ratio_clip: float = 20.0
) -> tuple[Array, Array]:
    """k3 KL to the reference on tokens that get no reward, as ``(kl_sum, num_tokens)``.

    Same estimator and clip as :func:`grpo_loss`'s KL term, on ``anchor_mask`` instead of
    ``loss_mask``. The trainer adds ``anchor_beta * kl_sum / anchor tokens of the step`` to
    the loss: the anchor's own normaliser, the same under every ``loss_type``.
    Masked positions are selected away: NaN/Inf there reach neither value nor gradient.
    """
    if logprobs.shape != anchor_mask.shape or ref_logprobs.shape != logprobs.shape:
        raise ValueError(
            f"want logprobs/ref_logprobs/anchor_mask [B, T], got {logprobs.shape}, "
            f"{ref_logprobs.shape}, {anchor_mask.shape}"
        )
    mask_bt = anchor_mask.astype(bool)
    lp_bt = jnp.where(mask_bt, logprobs.astype(jnp.float32), 0.0)
    ref_bt = jax.lax.stop_gradient(jnp.where(mask_bt, ref_logprobs.astype(jnp.float32), 0.0))
    kl_bt = jnp.where(mask_bt, _k3(lp_bt, ref_bt, log_ratio_clip), 0.0)
    return jnp.sum(kl_bt), jnp.sum(mask_bt.astype(jnp.float32))


def finalize_metrics(metric_sums: dict[str, Array]) -> dict[str, Array]:
    """Per-token means from (accumulated) :func:`grpo_loss` metric sums.

    Returns ``num_tokens``, ``num_seqs``, ``pg_loss``, ``kl``, ``ratio_mean``,
    ``clip_frac_low``, ``clip_frac_high``, ``clip_frac`` (low + high; they are disjoint).
    """
    n = metric_sums["num_tokens"]
    low = safe_divide(metric_sums["clip_low_sum"], n)
    high = safe_divide(metric_sums["clip_high_sum"], n)
    return {
        "num_tokens": n,
        "num_seqs": metric_sums["num_seqs"],
        "pg_loss": safe_divide(metric_sums["pg_loss_sum"], n),
        "kl": safe_divide(metric_sums["kl_sum"], n),
        "ratio_mean": safe_divide(metric_sums["ratio_sum"], n),
        "clip_frac_low": low,
        "clip_frac_high": high,
        "clip_frac": low + high,
    }
