"""The compiled GRPO train step: sharded == unsharded, exact micro-batching, anchor, NaN guard."""

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reflax import optim
from reflax.models import ModelConfig, create
from reflax.sharding import make_mesh
from reflax.trainer import (
    Batch,
    StepConfig,
    init_state,
    jit_train_step,
    make_logprob_fn,
    make_train_step,
    shard_batch,
)

CFG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    qkv_bias=True,
    tie_word_embeddings=True,
)


def make_batch(seed=0, B=8, T=12):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(6, T + 1, B)
    mask = np.arange(T)[None] < lengths[:, None]
    loss_mask = np.zeros((B, T), np.float32)
    anchor_mask = np.zeros((B, T), np.float32)
    for b, n in enumerate(lengths):
        loss_mask[b, n // 2 : n] = 1.0  # the "reflection" is the tail of each sequence
        anchor_mask[b, 2 : n // 2 - 1] = 1.0  # the "attempt" sits before it
    return Batch(
        tokens=jnp.asarray(rng.integers(0, CFG.vocab_size, (B, T)) * mask, jnp.int32),
        positions=jnp.asarray(np.broadcast_to(np.arange(T), (B, T)), jnp.int32),
        mask=jnp.asarray(mask),
        loss_mask=jnp.asarray(loss_mask),
        anchor_mask=jnp.asarray(anchor_mask),
        advantages=jnp.asarray(rng.normal(size=B), jnp.float32),
        old_logprobs=jnp.asarray(-rng.uniform(1, 5, (B, T)), jnp.float32),
    )


def run_steps(mesh, cfg: StepConfig, steps=2, beta=True):
    model = create(CFG, mesh=mesh, seed=1)
    graphdef, params = nnx.split(model)
    tx = optim.make_optimizer(total_steps=10, learning_rate=1e-2, warmup_ratio=0.0)
    ref = jax.tree.map(jnp.copy, params) if beta else None
    state = init_state(params, tx, mesh)
    step = make_train_step(graphdef, tx, cfg)
    batch = make_batch()
    fn = jit_train_step(step, state, batch, mesh, with_ref=beta)
    metrics = []
    with jax.set_mesh(mesh) if mesh is not None else _null():
        for i in range(steps):
            state, m = fn(state, shard_batch(make_batch(i), mesh), ref)
            metrics.append(jax.device_get(m))
    return jax.device_get(state.params), metrics


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def _max_diff(a, b):
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()), a, b)))


def test_sharded_step_equals_unsharded():
    cfg = StepConfig(temperature=0.9, beta=0.01, logits_chunk=16)
    p1, m1 = run_steps(None, cfg)
    p8, m8 = run_steps(make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), cfg)
    # relative to the update: Adam turns summation-order noise in near-zero gradients into
    # steps of up to the learning rate, so an absolute bound would depend on the CPU
    update = _max_diff(p1, jax.device_get(nnx.state(create(CFG, seed=1), nnx.Param)))
    assert _max_diff(p1, p8) < 5e-3 * update
    np.testing.assert_allclose(m1[-1]["loss"], m8[-1]["loss"], rtol=1e-5, atol=1e-6)
    assert all(m["finite"] for m in m1)


def test_micro_batches_are_exact(loss_type="seq_mean"):
    # every loss type's accumulation is checked in test_grpo; here the compiled scan
    base = StepConfig(loss_type=loss_type, use_old_logprobs=True, beta=0.0, logits_chunk=32)
    p1, m1 = run_steps(None, base, steps=1, beta=False)
    p4, m4 = run_steps(
        None,
        StepConfig(**{**base.__dict__, "micro_batches": 4}),
        steps=1,
        beta=False,
    )
    np.testing.assert_allclose(m1[0]["loss"], m4[0]["loss"], rtol=1e-6)
    assert _max_diff(p1, p4) < 1e-5


def test_anchor_adds_reference_kl_on_the_attempt(loss_type="token_mean"):
    # loss = (policy loss + beta * KL on loss tokens + anchor_beta * KL sum on anchor tokens)
    # / loss tokens, recomputed in NumPy from the step's own log-probs
    model = create(CFG, seed=1)
    graphdef, params = nnx.split(model)
    ref = jax.tree.map(lambda x: x + 0.05 * jnp.sin(17.0 * x), params)  # a distinct reference
    tx = optim.make_optimizer(total_steps=10, learning_rate=1e-2, warmup_ratio=0.0)
    batch = make_batch(3)
    cfg = StepConfig(beta=0.01, anchor_beta=0.5, logits_chunk=16, loss_type=loss_type)
    _, m = jax.jit(make_train_step(graphdef, tx, cfg))(init_state(params, tx), batch, ref)
    _, m0 = jax.jit(make_train_step(graphdef, tx, replace(cfg, anchor_beta=0.0)))(
        init_state(params, tx), batch, ref
    )
    lp_fn = jax.jit(make_logprob_fn(graphdef, cfg))
    lp = np.asarray(lp_fn(params, batch), np.float64)[:, 1:]
    rlp = np.asarray(lp_fn(ref, batch), np.float64)[:, 1:]
    loss_mask = np.asarray(batch.loss_mask)[:, 1:] > 0
    anchor = np.asarray(batch.anchor_mask)[:, 1:] > 0
    k3 = np.exp(rlp - lp) - (rlp - lp) - 1
    assert anchor.sum() > 0 and not (anchor & loss_mask).any()
    adv = np.asarray(batch.advantages, np.float64)[:, None]
    policy = (-adv * loss_mask).sum() + 0.01 * (k3 * loss_mask).sum()
    want = (policy + 0.5 * (k3 * anchor).sum()) / loss_mask.sum()
    np.testing.assert_allclose(m["loss"], want, rtol=1e-4)
    np.testing.assert_allclose(m0["loss"], policy / loss_mask.sum(), rtol=1e-4)
    np.testing.assert_allclose(m["anchor_kl"], k3[anchor].mean(), rtol=1e-4)
    assert "anchor_kl" not in m0


def test_non_finite_loss_keeps_state():
    model = create(CFG, seed=1)
    graphdef, params = nnx.split(model)
    tx = optim.make_optimizer(total_steps=10, learning_rate=1e-2, warmup_ratio=0.0)
    state = init_state(params, tx)
    step = jax.jit(make_train_step(graphdef, tx, StepConfig(beta=0.0)))
    batch = make_batch()
    bad = batch.replace(advantages=batch.advantages.at[0].set(jnp.nan))
    before = jax.device_get(state.params)
    new, m = step(state, bad, None)
    assert not bool(m["finite"])
    assert int(new.step) == 0
    assert _max_diff(before, jax.device_get(new.params)) == 0.0
