"""Optimizer and learning-rate schedule.

``make_optimizer(total_steps=..., **config.optim)`` returns the transformation and the
schedule it follows (for logging)::

    clip_by_global_norm(max_grad_norm) -> AdamW(schedule, b1, b2, eps, weight_decay, mask)

Decisions
---------
* Schedule (Hugging Face ``get_cosine_schedule_with_warmup`` plus an optional floor): linear
  warmup from 0 at step 0 to ``learning_rate`` at step ``warmup_steps``, then half-cosine from
  ``learning_rate`` down to ``min_lr_ratio * learning_rate`` at ``total_steps``, constant after.
  ``warmup_steps`` defaults to ``ceil(warmup_ratio * total_steps)`` (paper: 3 %), as in HF.
  The floor defaults to 0 (HF, and so TRL); ``min_lr_ratio=0.1`` is the usual alternative.
  Steps count optimizer updates (after gradient accumulation), starting from 0: the first
  update uses ``lr(0)``, which is 0 whenever there is warmup.
* Weight decay is decoupled (AdamW: ``p -= lr * wd * p``, as ``torch.optim.AdamW``) and
  applied only to parameters with ``ndim >= 2`` whose path mentions neither "norm" nor "bias";
  norm scales, biases and other vectors are never decayed. Embeddings (2-D) are decayed, as
  in HF's default grouping. The default ``weight_decay`` is 0.
* Gradients are clipped by their global L2 norm before Adam (default 1.0; ``None`` or a
  non-positive value disables clipping).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

_NO_DECAY_NAME_PARTS = ("norm", "bias")


def resolve_warmup_steps(
    total_steps: int, warmup_ratio: float = 0.03, warmup_steps: int | None = None
) -> int:
    """Explicit ``warmup_steps`` if given, else ``ceil(warmup_ratio * total_steps)``."""
    if warmup_steps is not None:
        steps = int(warmup_steps)
    else:
        if not 0.0 <= warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
        steps = math.ceil(warmup_ratio * total_steps)
    if not 0 <= steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {steps}")
    return steps


def make_schedule(
    *,
    learning_rate: float,
    total_steps: int,
    warmup_ratio: float = 0.03,
    warmup_steps: int | None = None,
    min_lr_ratio: float = 0.0,
) -> optax.Schedule:
    """Linear warmup then cosine decay to ``min_lr_ratio * learning_rate``: step -> lr."""
    total_steps = int(total_steps)
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    warmup = resolve_warmup_steps(total_steps, warmup_ratio, warmup_steps)
    peak = float(learning_rate)
    floor = peak * float(min_lr_ratio)
    decay_steps = max(total_steps - warmup, 1)

    def schedule(step: Any) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = peak * step / max(warmup, 1)
        progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        cosine = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup, warm, cosine)

    return schedule


def weight_decay_mask(params: Any) -> Any:
    """Pytree of bools like ``params``: True where weight decay applies (see module doc)."""

    def decide(path: tuple[Any, ...], leaf: Any) -> bool:
        names = []
        for key in path:
            for attr in ("key", "name", "idx"):
                if hasattr(key, attr):
                    names.append(str(getattr(key, attr)).lower())
                    break
        if any(part in name for name in names for part in _NO_DECAY_NAME_PARTS):
            return False
        return jnp.ndim(leaf) >= 2

    return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(
    *,
    total_steps: int,
    learning_rate: float = 5e-7,
    warmup_ratio: float = 0.03,
    warmup_steps: int | None = None,
    min_lr_ratio: float = 0.0,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    max_grad_norm: float | None = 1.0,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(Global-norm clipping then masked AdamW on the warmup-cosine schedule, that schedule).

    The schedule is the one the transformation follows, returned for logging the rate.
    """
    schedule = make_schedule(
        learning_rate=learning_rate,
        total_steps=total_steps,
        warmup_ratio=warmup_ratio,
        warmup_steps=warmup_steps,
        min_lr_ratio=min_lr_ratio,
    )
    adamw = optax.adamw(
        learning_rate=schedule,
        b1=b1,
        b2=b2,
        eps=eps,
        weight_decay=weight_decay,
        mask=weight_decay_mask,
    )
    if max_grad_norm is None or max_grad_norm <= 0:
        return adamw, schedule
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw), schedule
