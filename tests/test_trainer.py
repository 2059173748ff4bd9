"""The compiled GRPO train step: sharded == unsharded, exact micro-batching, anchor, NaN guard,
empty steps, the old-log-prob pass."""

import contextlib
import re
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import np_grpo_loss, tiny_train_config

from reflax import grpo, optim
from reflax.batch import Batch, shard_batch
from reflax.models import create
from reflax.sharding import make_mesh
from reflax.trainer import (
    StepConfig,
    init_state,
    jit_logprob_fn,
    jit_train_step,
    make_logprob_fn,
    make_train_step,
    micro_batch_warning,
)

CFG = tiny_train_config()


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


def distinct_reference(params):
    return jax.tree.map(lambda x: x + 0.05 * jnp.sin(17.0 * x), params)


def run_steps(mesh, cfg: StepConfig, steps=2, beta=True, ref_fn=None):
    """`steps` compiled steps from the same init; the reference is a copy of the initial
    parameters (`beta`), or `ref_fn(params)`. -> (params [initial, after each step], metrics)"""
    model = create(CFG, mesh=mesh, seed=1)
    graphdef, params = nnx.split(model)
    # Adam divides by |g| + eps: with the default 1e-8, an entry whose gradient is near eps
    # turns a summation-order difference into a sizeable share of its update; eps = 1e-3
    # keeps the update a well-conditioned function of the gradient, so runs compare tightly
    tx, _ = optim.make_optimizer(total_steps=10, learning_rate=1e-2, warmup_ratio=0.0, eps=1e-3)
    ref = None
    if ref_fn is not None:
        ref = ref_fn(params)
    elif beta:
        ref = jax.tree.map(jnp.copy, params)
    history = [jax.device_get(params)]
    state = init_state(params, tx, mesh)
    step = make_train_step(graphdef, tx, cfg)
    batch = make_batch()
    fn = jit_train_step(step, state, batch, mesh, with_ref=ref is not None)
    metrics = []
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        for i in range(steps):
            state, m = fn(state, shard_batch(make_batch(i), mesh), ref)
            metrics.append(jax.device_get(m))
            history.append(jax.device_get(state.params))
    return history, metrics


def _max_diff(a, b):
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()), a, b)))


def assert_same_updates(a, b, rtol):
    """Two runs' parameter trajectories agree up to rtol of each step's update: the bound
    scales with what the step changed, not with a constant that depends on summation order
    (it differs between CPUs)."""
    for i in range(1, len(a)):
        size = _max_diff(a[i], a[i - 1])
        assert size > 0, "the step changed nothing: the comparison would be vacuous"
        assert _max_diff(a[i], b[i]) <= rtol * size, (i, _max_diff(a[i], b[i]), size)


def test_sharded_step_equals_unsharded():
    cfg = StepConfig(temperature=0.9, beta=0.01, logits_chunk=16)
    p1, m1 = run_steps(None, cfg)
    p8, m8 = run_steps(make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), cfg)
    assert_same_updates(p1, p8, rtol=1e-3)
    loss_scale = np.abs(np.asarray(make_batch(1).advantages)).max()  # bounds |per-token loss|
    assert abs(m1[-1]["loss"] - m8[-1]["loss"]) <= 1e-5 * loss_scale
    np.testing.assert_allclose(m1[-1]["grad_norm"], m8[-1]["grad_norm"], rtol=1e-4)
    assert all(m["finite"] and m["applied"] for m in m1)


def test_micro_batches_are_exact(loss_type="seq_mean"):
    # every loss type's accumulation is checked in test_grpo; here the compiled scan, with the
    # anchor's own normaliser accumulated across micro-batches too
    base = StepConfig(
        loss_type=loss_type, use_old_logprobs=True, beta=0.0, anchor_beta=0.5, logits_chunk=32
    )
    p1, m1 = run_steps(None, base, steps=1, ref_fn=distinct_reference)
    p4, m4 = run_steps(None, replace(base, micro_batches=4), steps=1, ref_fn=distinct_reference)
    np.testing.assert_allclose(m1[0]["loss"], m4[0]["loss"], rtol=1e-6)
    # the k3 KL is a small difference of log-probs: its round-off is set by their size
    lp_scale = abs(float(m1[0]["logprob"]))
    np.testing.assert_allclose(
        m1[0]["anchor_kl"], m4[0]["anchor_kl"], rtol=1e-6, atol=1e-6 * lp_scale
    )
    assert_same_updates(p1, p4, rtol=1e-3)


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_anchor_has_its_own_normaliser(loss_type):
    # loss = the loss_type's policy loss (with beta * KL on loss tokens) + anchor_beta * the
    # mean KL over anchor tokens, whatever the loss_type; recomputed in NumPy from the step's
    # own log-probs
    model = create(CFG, seed=1)
    graphdef, params = nnx.split(model)
    ref = distinct_reference(params)
    tx, _ = optim.make_optimizer(total_steps=10, learning_rate=1e-2, warmup_ratio=0.0)
    batch = make_batch(3)
    T = batch.tokens.shape[1]
    cfg = StepConfig(beta=0.01, anchor_beta=0.5, logits_chunk=16, loss_type=loss_type, max_len=T)
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
    assert anchor.sum() != loss_mask.sum()  # else token_mean could not tell the normalisers
    adv = np.asarray(batch.advantages)
    kw = dict(eps=0.2, eps_high=None, beta=0.01, loss_type=loss_type, max_len=T)
    policy, _ = np_grpo_loss(lp, None, rlp, adv, loss_mask, **kw)
    np.testing.assert_allclose(m["loss"], policy + 0.5 * k3[anchor].mean(), rtol=1e-4)
    np.testing.assert_allclose(m0["loss"], policy, rtol=1e-4)
    np.testing.assert_allclose(m["anchor_kl"], k3[anchor].mean(), rtol=1e-4)
    assert "anchor_kl" not in m0


@pytest.mark.parametrize("anchored", [False, True])
def test_empty_step_leaves_state_untouched(anchored):
    # no loss tokens (no failures this step, or every group dropped as too long): AdamW must
    # not step (count, moments, schedule); with anchor tokens the anchor alone is a real step
    model = create(CFG, seed=1)
    graphdef, params = nnx.split(model)
    ref = distinct_reference(params) if anchored else None
    tx, _ = optim.make_optimizer(total_steps=10, learning_rate=1e-2, warmup_ratio=0.0)
    cfg = StepConfig(beta=0.01, anchor_beta=0.5 if anchored else 0.0, logits_chunk=16)
    step = jax.jit(make_train_step(graphdef, tx, cfg))
    batch = make_batch()
    no_loss = batch.replace(loss_mask=jnp.zeros_like(batch.loss_mask))
    empty = no_loss.replace(anchor_mask=jnp.zeros_like(batch.anchor_mask))
    state = init_state(params, tx)
    before = jax.device_get(state)
    new, m = step(state, empty, ref)
    after = jax.device_get(new)
    assert int(after.step) == 0
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(x, y)  # params and AdamW's count and moments
    assert bool(m["finite"]) and bool(m["empty"]) and not bool(m["applied"])
    assert float(m["loss"]) == 0.0
    new, m = step(new, no_loss, ref)
    assert bool(m["empty"]) != anchored and bool(m["applied"]) == anchored
    assert int(new.step) == int(anchored)
    assert (_max_diff(before.params, jax.device_get(new.params)) > 0) == anchored


def test_logprob_pass_is_sharded_like_the_batch():
    # mu > 1: the old log-probs come from a pass compiled with explicit shardings, and land
    # sharded as the train step's old_logprobs
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    graphdef, params = nnx.split(create(CFG, seed=1))
    _, sharded = nnx.split(create(CFG, mesh=mesh, seed=1))
    cfg = StepConfig(temperature=0.9, logits_chunk=16)
    fn = make_logprob_fn(graphdef, cfg)
    batch = make_batch()
    want = np.asarray(jax.jit(fn)(params, batch))
    with jax.set_mesh(mesh):
        placed = shard_batch(batch, mesh)
        got = jit_logprob_fn(fn, sharded, placed, mesh)(sharded, placed)
    assert got.sharding.is_equivalent_to(placed.old_logprobs.sharding, 2)
    scale = np.abs(want).max()
    assert scale > 0 and np.abs(np.asarray(got) - want).max() <= 1e-5 * scale


def test_non_finite_loss_keeps_state():
    model = create(CFG, seed=1)
    graphdef, params = nnx.split(model)
    tx, _ = optim.make_optimizer(total_steps=10, learning_rate=1e-2, warmup_ratio=0.0)
    state = init_state(params, tx)
    step = jax.jit(make_train_step(graphdef, tx, StepConfig(beta=0.0)))
    batch = make_batch()
    bad = batch.replace(advantages=batch.advantages.at[0].set(jnp.nan))
    before = jax.device_get(state.params)
    new, m = step(state, bad, None)
    assert not bool(m["finite"])
    assert int(new.step) == 0
    assert _max_diff(before, jax.device_get(new.params)) == 0.0


def test_logits_chunk_from_the_byte_budget(monkeypatch):
    rule, V, budget = grpo.logits_chunk, 151936, 256 * 2**20
    chunk = rule(2, V, budget)  # the largest multiple of 8 within the budget
    assert chunk % 8 == 0 and 4 * 2 * chunk * V <= budget < 4 * 2 * (chunk + 8) * V
    assert rule(1, 1, 20) == 5 and rule(10**6, 10**6, 1) == 1
    # the step asks the rule with the rows and the vocabulary one device holds; an explicit
    # grpo.logits_chunk wins
    seen, original = [], grpo.token_logprobs_and_entropy

    def recorded(*args, chunk_size, **kw):
        seen.append(chunk_size)
        return original(*args, chunk_size=chunk_size, **kw)

    monkeypatch.setattr(grpo, "token_logprobs_and_entropy", recorded)
    graphdef, params = nnx.split(create(CFG, seed=1))
    batch = make_batch()  # 8 rows
    budget = 4 * 8 * CFG.vocab_size * 5  # 5 positions of 8 rows' logits
    shapes = lambda cfg: jax.eval_shape(make_logprob_fn(graphdef, cfg), params, batch)
    shapes(StepConfig(logits_bytes=budget))
    with jax.set_mesh(make_mesh({"data": 2, "fsdp": 2, "tensor": 2})):
        shapes(StepConfig(logits_bytes=budget))  # 2 rows and half the vocabulary per device
    shapes(StepConfig(logits_chunk=3, logits_bytes=budget))
    assert seen == [5, 40, 3]


def test_micro_batch_warning_names_micro_batches_that_do_not_fill_the_batch_shards():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})  # 4 batch shards
    assert micro_batch_warning(32, 8, mesh, packed=True) is None  # 4 groups: one a shard
    assert micro_batch_warning(64, 2, mesh, packed=False) is None
    note = micro_batch_warning(32, 16, mesh, packed=True)  # 2 groups against 4 shards
    assert "2 packed groups against 4 batch shards" in note and "multiple of 4" in note
    assert "6 rows" in micro_batch_warning(12, 2, mesh, packed=False)


def test_reference_in_the_compute_dtype_scores_as_float32():
    # grpo.ref_dtype="auto" keeps the reference in model.dtype: the forward casts every
    # weight to it before use, so the reference's log-probs are float32's, bit for bit
    graphdef, params = nnx.split(create(CFG, dtype=jnp.bfloat16, seed=1))
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    fn = jax.jit(make_logprob_fn(graphdef, StepConfig(logits_chunk=5)))
    batch = make_batch()
    want, got = np.asarray(fn(params, batch)), np.asarray(fn(half, batch))
    assert np.abs(want).max() > 0
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2)])
def test_lm_head_is_never_gathered_whole(shape):
    # the train step splits the LM head's vocabulary over the devices that shard the
    # parameters and gathers the rows' hidden states instead: no device holds the [D, V]
    # head or its gradient whole (FSDP over 8 devices gathered both before)
    mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)))
    model = create(CFG, mesh=mesh, seed=1)
    graphdef, params = nnx.split(model)
    tx, _ = optim.make_optimizer(total_steps=10, learning_rate=1e-2, warmup_ratio=0.0)
    state = init_state(params, tx, mesh)
    step = make_train_step(graphdef, tx, StepConfig(beta=0.01, logits_chunk=4))
    batch = shard_batch(make_batch(), mesh)
    with jax.set_mesh(mesh):
        fn = jit_train_step(step, state, batch, mesh, with_ref=True)
        hlo = fn.lower(state, batch, params).compile().as_text()
    V, D = CFG.vocab_size, CFG.hidden_size
    whole = re.compile(rf"\[(?:{V},{D}|{D},{V})\]")
    collectives = [
        line for line in hlo.splitlines() if "all-gather" in line or "all-reduce" in line
    ]
    assert collectives, "a sharded step with no collectives: the check would be vacuous"
    assert not [line for line in collectives if whole.search(line.split("=", 1)[-1])]
