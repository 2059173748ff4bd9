"""Optimizer: schedule against a NumPy formula, weight-decay mask, gradient clipping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from reflax import optim


def np_lr(step, *, peak, total, warmup, floor_ratio):
    if step < warmup:
        return peak * step / max(warmup, 1)
    progress = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
    floor = peak * floor_ratio
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.1])
def test_schedule_matches_numpy(min_lr_ratio):
    peak, total = 5e-7, 200
    sched = optim.make_schedule(learning_rate=peak, total_steps=total, min_lr_ratio=min_lr_ratio)
    warmup = math.ceil(0.03 * total)  # 6
    assert optim.resolve_warmup_steps(total, 0.03) == warmup
    steps = np.arange(0, total + 5)
    got = np.asarray(jax.vmap(sched)(jnp.asarray(steps)))
    want = [
        np_lr(s, peak=peak, total=total, warmup=warmup, floor_ratio=min_lr_ratio) for s in steps
    ]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-14)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(sched(warmup // 2), peak / 2, rtol=1e-6)
    np.testing.assert_allclose(sched(warmup), peak, rtol=1e-6)
    np.testing.assert_allclose(sched(total), peak * min_lr_ratio, rtol=1e-6, atol=1e-14)
    np.testing.assert_allclose(sched(total + 100), peak * min_lr_ratio, rtol=1e-6, atol=1e-14)
    assert np.all(np.diff(got[warmup:]) <= 1e-12)  # monotone decay after warmup


def test_schedule_warmup_steps_override_and_no_warmup():
    sched = optim.make_schedule(learning_rate=1.0, total_steps=10, warmup_steps=4)
    np.testing.assert_allclose([float(sched(s)) for s in (0, 1, 4)], [0.0, 0.25, 1.0], rtol=1e-6)
    flat = optim.make_schedule(learning_rate=1.0, total_steps=10, warmup_ratio=0.0)
    assert float(flat(0)) == 1.0
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.make_schedule(learning_rate=1.0, total_steps=10, warmup_steps=11)
    with pytest.raises(ValueError, match="total_steps"):
        optim.make_schedule(learning_rate=1.0, total_steps=0)


def test_make_optimizer_returns_its_schedule():
    config = dict(learning_rate=1e-6, total_steps=100, warmup_ratio=0.1, weight_decay=0.01)
    tx, lr = optim.make_optimizer(**config)
    np.testing.assert_allclose(lr(10), 1e-6, rtol=1e-6)
    assert isinstance(tx, optax.GradientTransformation)
    # the transformation follows that schedule: Adam's first update is -lr(0) * sign(g)
    tx, lr = optim.make_optimizer(total_steps=10, learning_rate=1.0, warmup_steps=0)
    p = {"w": jnp.ones((2, 2))}
    updates, _ = tx.update({"w": jnp.full((2, 2), 3.0)}, tx.init(p), p)
    np.testing.assert_allclose(updates["w"], -lr(0), rtol=1e-5)


def test_unknown_kwargs_raise_type_error():
    with pytest.raises(TypeError):
        optim.make_optimizer(total_steps=10, learning_rat=1e-6)
    with pytest.raises(TypeError):
        optim.make_optimizer(learning_rate=1e-6)  # total_steps is required


class _Tiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(5, 4, rngs=rngs)
        self.proj = nnx.Linear(4, 4, rngs=rngs)
        self.norm = nnx.RMSNorm(4, rngs=rngs)
        self.ln = nnx.LayerNorm(4, rngs=rngs)


def test_weight_decay_mask_on_nnx_params():
    model = _Tiny(nnx.Rngs(0))
    mask = optim.weight_decay_mask(nnx.as_pure(nnx.state(model, nnx.Param)))
    flat = {
        "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(mask)[0]
    }
    assert flat == {
        "embed/embedding": True,
        "proj/kernel": True,
        "proj/bias": False,
        "norm/scale": False,
        "ln/scale": False,
        "ln/bias": False,
    }
    # Path names matter, not only rank: a 2-D "bias" or a norm's matrix is not decayed.
    custom = {"attn_norm": {"w": jnp.ones((2, 2))}, "bias2d": jnp.ones((2, 2)), "w": jnp.ones(3)}
    assert optim.weight_decay_mask(custom) == {
        "attn_norm": {"w": False},
        "bias2d": False,
        "w": False,
    }


def test_weight_decay_applies_only_to_masked_params_through_nnx_optimizer():
    model = _Tiny(nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.as_pure(nnx.state(model, nnx.Param)))
    tx, _ = optim.make_optimizer(
        learning_rate=0.1, total_steps=10, warmup_steps=0, weight_decay=0.5, max_grad_norm=1.0
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    zero_grads = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
    optimizer.update(model, zero_grads)  # Adam part is 0 for zero grads: only decay moves params
    after = jax.tree.map(np.asarray, nnx.as_pure(nnx.state(model, nnx.Param)))
    for name, leaf in (("proj", "kernel"), ("embed", "embedding")):
        want = before[name][leaf] * (1 - 0.1 * 0.5)
        np.testing.assert_allclose(after[name][leaf], want, rtol=1e-6)
    for name, leaf in (("proj", "bias"), ("norm", "scale"), ("ln", "scale"), ("ln", "bias")):
        np.testing.assert_array_equal(after[name][leaf], before[name][leaf])


def _first_moment(state):
    return optax.tree.get(state, "mu")


@pytest.mark.parametrize("scale", [0.1, 100.0])
def test_global_norm_clipping(scale):
    rng = np.random.default_rng(0)
    params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
    grads = {
        "w": jnp.asarray(rng.standard_normal((3, 4))),
        "b": jnp.asarray(rng.standard_normal(4)),
    }
    norm = float(optax.tree.norm(grads))
    grads = jax.tree.map(lambda g: g * scale / norm, grads)  # global norm == scale
    tx, _ = optim.make_optimizer(learning_rate=1e-3, total_steps=10, b1=0.9, max_grad_norm=1.0)
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    mu = _first_moment(state)  # (1 - b1) * clipped grad after one step
    factor = min(1.0, 1.0 / scale)
    for key in grads:
        np.testing.assert_allclose(mu[key], 0.1 * grads[key] * factor, rtol=1e-5)
    engaged = float(optax.tree.norm(mu)) / 0.1
    assert engaged == pytest.approx(min(scale, 1.0), rel=1e-5)


def test_clipping_can_be_disabled():
    params = {"w": jnp.ones((2, 2))}
    grads = {"w": jnp.full((2, 2), 50.0)}
    tx, _ = optim.make_optimizer(learning_rate=1e-3, total_steps=10, max_grad_norm=None)
    _, state = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(_first_moment(state)["w"], 0.1 * 50.0, rtol=1e-6)


def test_adamw_update_matches_numpy():
    peak, total, wd, b1, b2, eps = 1e-2, 20, 0.1, 0.8, 0.95, 1e-6
    tx, _ = optim.make_optimizer(
        learning_rate=peak,
        total_steps=total,
        warmup_steps=2,
        weight_decay=wd,
        b1=b1,
        b2=b2,
        eps=eps,
        max_grad_norm=None,
    )
    rng = np.random.default_rng(1)
    w = rng.standard_normal((3, 2)).astype(np.float32)
    params = {"w": jnp.asarray(w)}
    state = tx.init(params)
    m = v = np.zeros_like(w, np.float64)
    w_ref = w.astype(np.float64)
    for step in range(4):
        g = rng.standard_normal(w.shape).astype(np.float32)
        updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, updates)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g.astype(np.float64) ** 2
        m_hat, v_hat = m / (1 - b1 ** (step + 1)), v / (1 - b2 ** (step + 1))
        lr = np_lr(step, peak=peak, total=total, warmup=2, floor_ratio=0.0)
        w_ref = w_ref - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * w_ref)
        np.testing.assert_allclose(params["w"], w_ref, rtol=1e-5, atol=1e-7)
