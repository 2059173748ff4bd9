"""Fused attention kernels against the decoder's XLA attention, on the CPU: splash
attention in Pallas interpret mode (values and gradients; packed group rows, sliding
windows, left and right padding; the decoder's packed and unpacked forward with it, also
on a mesh), and the cuDNN path's call run through XLA."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_train_config

from reflax.models import abstract_model, create
from reflax.models.attention_kernels import (
    Layout,
    block_size,
    cudnn_attention,
    resolve,
    splash_attention,
)
from reflax.models.decoder import KVBlock, KVCache, attention, positions_from_mask, window_valid
from reflax.sharding import make_mesh

H, K, DH = 4, 2, 8  # GQA: two query heads per key head


def _rel(a, b) -> float:
    """max |a - b| relative to max |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _qkv(rows: int, length: int, seed: int):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=(rows, length, n, DH)), jnp.float32) for n in (H, K, K)]


def _unpacked_case(window):
    """Rows of 40 slots: left-padded, right-padded, full; causal attention over them."""
    T = 40
    mask = np.ones((3, T), bool)
    mask[0, :7] = False
    mask[1, 29:] = False
    mask = jnp.asarray(mask)
    pos = positions_from_mask(mask)
    valid = mask[:, None, :] & jnp.tril(jnp.ones((T, T), bool))[None]

    def reference(q, k, v):
        return attention(q, [KVBlock(k, v, window_valid(valid, pos, pos, window))])

    return Layout(T), mask, reference


def _packed_case(window):
    """Group-packed rows [prefix | suffix_1 .. suffix_G] (prefix left-padded, suffixes
    right-padded), and the decoder's attention over them: the prefix causal, each suffix
    over the shared prefix and itself (`Decoder.packed_hidden_states`)."""
    U, G, Lp, Ls = 2, 3, 24, 16
    P = Lp + G * Ls
    rng = np.random.default_rng(1)
    mask = np.zeros((U, P), bool)
    positions = np.zeros((U, P), np.int32)
    for u in range(U):
        n = int(rng.integers(3, Lp + 1))  # real prefix tokens (left-padded)
        mask[u, Lp - n : Lp] = True
        positions[u, Lp - n : Lp] = np.arange(n)
        for g in range(G):
            m = int(rng.integers(1, Ls + 1))  # real suffix tokens (right-padded)
            start = Lp + g * Ls
            mask[u, start : start + m] = True
            positions[u, start : start + m] = n + np.arange(m)
    mask, positions = jnp.asarray(mask), jnp.asarray(positions)

    def suffixes(a):
        return a[:, Lp:].reshape(U * G, Ls, *a.shape[2:])

    mask_p, mask_s = mask[:, :Lp], suffixes(mask)
    pos_p, pos_s = positions[:, :Lp], suffixes(positions)
    valid_pp = mask_p[:, None, :] & jnp.tril(jnp.ones((Lp, Lp), bool))[None]
    valid_sp = jnp.broadcast_to(jnp.repeat(mask_p, G, axis=0)[:, None, :], (U * G, Ls, Lp))
    valid_ss = mask_s[:, None, :] & jnp.tril(jnp.ones((Ls, Ls), bool))[None]

    def reference(q, k, v):
        prefix = attention(
            q[:, :Lp], [KVBlock(k[:, :Lp], v[:, :Lp], window_valid(valid_pp, pos_p, pos_p, window))]
        )
        shared = KVBlock(k[:, :Lp], v[:, :Lp], window_valid(valid_sp, pos_s, pos_p, window))
        own = KVBlock(suffixes(k), suffixes(v), window_valid(valid_ss, pos_s, pos_s, window))
        suffix = attention(suffixes(q), [shared, own]).reshape(U, G * Ls, -1)
        return jnp.concatenate([prefix, suffix], axis=1)

    return Layout(Lp, G, Ls), mask, reference


@pytest.mark.parametrize(
    "case, window",
    [("unpacked", None), ("unpacked", 5), ("packed", 9)],
    ids=["padding", "padding-window", "packed-window"],
)
def test_splash_values_and_gradients_equal_xla(case, window):
    layout, mask, reference = (_unpacked_case if case == "unpacked" else _packed_case)(window)
    q, k, v = _qkv(mask.shape[0], layout.length, seed=2)
    real = mask[..., None]
    # a fixed random cotangent on the real query slots: padding outputs are unused garbage
    weights = jnp.asarray(np.random.default_rng(3).normal(size=(*mask.shape, H * DH)))

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.where(real, fn(q, k, v), 0.0) * weights)

    def splash(q, k, v):
        return splash_attention(q, k, v, mask, layout, window, interpret=True)

    def values_and_grads(fn):  # one program each: interpret mode compiles slowly
        return jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(loss(fn), (0, 1, 2))(q, k, v)))

    out, grads = values_and_grads(splash)(q, k, v)
    ref, ref_grads = values_and_grads(reference)(q, k, v)
    assert _rel(jnp.where(real, out, 0), jnp.where(real, ref, 0)) < 1e-5
    for name, g, r in zip("qkv", grads, ref_grads):
        assert float(jnp.abs(r).max()) > 0, f"vacuous: no gradient reaches {name}"
        assert _rel(g, r) < 1e-5, name


def test_traced_window_switches_kernels():
    """The layer scan's window is a traced value: each layer gets its own mask."""
    layout, mask, _ = _unpacked_case(None)
    q, k, v = _qkv(mask.shape[0], layout.length, seed=4)
    windows = (None, 5, 1000)  # 1000 >= T: the full layers' kernel

    def per_layer(w):
        return splash_attention(q, k, v, mask, layout, w, windows, interpret=True)

    traced = jax.jit(jax.vmap(per_layer))(jnp.asarray([2**30, 5, 1000]))
    real = mask[..., None]
    for i, w in enumerate(windows):
        reference = _unpacked_case(w)[2](q, k, v)
        assert _rel(jnp.where(real, traced[i], 0), jnp.where(real, reference, 0)) < 1e-5
    assert _rel(traced[1], traced[0]) > 1e-2, "vacuous: the window changed nothing"


def test_splash_on_a_mesh():
    """Rows over (data, fsdp), heads over tensor: the kernel runs per shard (shard_map),
    values and gradients as on one device."""
    layout, mask, _ = _packed_case(None)
    mask = jnp.concatenate([mask, mask[::-1]])  # 4 rows, one per (data, fsdp) shard
    q, k, v = _qkv(4, layout.length, seed=6)

    def fn(q, k, v):
        out = splash_attention(q, k, v, mask, layout, interpret=True)
        return jnp.sum(jnp.where(mask[..., None], out, 0.0) ** 2)

    program = jax.jit(jax.value_and_grad(fn, (0, 1, 2)))
    with jax.set_mesh(make_mesh({"data": 2, "fsdp": 2, "tensor": 2})):
        on_mesh = program(q, k, v)
    single = program(q, k, v)
    for x, y in zip(jax.tree.leaves(on_mesh), jax.tree.leaves(single)):
        assert _rel(x, y) < 1e-6


def test_block_sizes_and_bad_input():
    assert block_size(16) == (128, 128) and block_size(384) == (128, 384)
    assert block_size(520) == (128, 640) and block_size(1024) == (512, 1024)
    assert resolve("auto", jnp.bfloat16) == ("xla" if jax.default_backend() == "cpu" else "splash")
    with pytest.raises(ValueError, match="attention_impl 'flash' is not one of"):
        resolve("flash", jnp.float32)
    q, k, v = _qkv(1, 16, seed=0)
    with pytest.raises(ValueError, match="do not match the layout's 24"):
        splash_attention(q, k, v, jnp.ones((1, 16), bool), Layout(8, 2, 8))
    with pytest.raises(ValueError, match="a traced window needs `windows`"):
        jax.jit(lambda w: splash_attention(q, k, v, jnp.ones((1, 16), bool), Layout(16), w))(3)


def test_cudnn_call_through_xla_equals_attention():
    """The cuDNN path's call and mask, run by XLA (cuDNN itself needs a GPU)."""
    layout, mask, reference = _unpacked_case(5)
    q, k, v = _qkv(mask.shape[0], layout.length, seed=5)
    T = layout.length
    pos = positions_from_mask(mask)
    valid = window_valid(mask[:, None, :] & jnp.tril(jnp.ones((T, T), bool))[None], pos, pos, 5)
    out = cudnn_attention(q, k, v, valid, implementation="xla")
    real = mask[..., None]
    assert _rel(jnp.where(real, out, 0), jnp.where(real, reference(q, k, v), 0)) < 1e-5
    assert bool(jnp.isfinite(out).all())


# --------------------------------------------------------------------------- the decoder

CFG = dataclasses.replace(tiny_train_config(), sliding_window=6, sliding_layers=(True, False))


def _packed_batch(seed=0, U=4, G=3, Lp=16, Ls=16):
    rng = np.random.default_rng(seed)
    P = Lp + G * Ls
    tokens = rng.integers(1, CFG.vocab_size, (U, P)).astype(np.int32)
    mask = np.zeros((U, P), bool)
    positions = np.zeros((U, P), np.int32)
    for u in range(U):
        n = int(rng.integers(4, Lp + 1))
        mask[u, Lp - n : Lp] = True
        positions[u, Lp - n : Lp] = np.arange(n)
        for g in range(G):
            m, start = int(rng.integers(2, Ls + 1)), Lp + g * Ls
            mask[u, start : start + m] = True
            positions[u, start : start + m] = n + np.arange(m)
    return jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask), Lp, G


def _token_loss(model, hidden, tokens, mask):
    """Mean log-likelihood of each real token's successor (a train step's forward)."""
    logp = jax.nn.log_softmax(model.logits(hidden[:, :-1]), axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    scored = mask[:, 1:] & mask[:, :-1]
    return -jnp.sum(jnp.where(scored, picked, 0.0)) / jnp.sum(scored)


@functools.cache
def _params():
    return nnx.split(create(CFG, seed=1))[1]


def _model(impl):
    """(graphdef, params): one set of parameters, the graph of `impl`'s config (layers
    rematerialised, as the train configs run them)."""
    config = dataclasses.replace(CFG, attention_impl=impl)
    return nnx.split(abstract_model(config, remat=True))[0], _params()


def _loss_and_grads(impl):
    graphdef, params = _model(impl)
    tokens, positions, mask, Lp, G = _packed_batch()

    def loss(params):
        m = nnx.merge(graphdef, params)
        hp, hs = m.packed_hidden_states(tokens, positions, mask, Lp, G)
        U, Ls = tokens.shape[0], hs.shape[1]
        suffix_tokens = tokens[:, Lp:].reshape(U * G, Ls)
        suffix_mask = mask[:, Lp:].reshape(U * G, Ls)
        prefix_loss = _token_loss(m, hp, tokens[:, :Lp], mask[:, :Lp])
        return prefix_loss + _token_loss(m, hs, suffix_tokens, suffix_mask)

    return jax.device_get(jax.jit(jax.value_and_grad(loss))(params))


def _assert_same(a, b, tol=1e-5):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert abs(float(loss_a) - float(loss_b)) <= tol * abs(float(loss_b))
    for x, y in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        assert _rel(x, y) <= tol


def test_packed_decoder_with_splash_equals_xla():
    """The packed forward's loss and every parameter's gradient, with a sliding and a full
    layer."""
    _assert_same(_loss_and_grads("splash"), _loss_and_grads("xla"))


def _prefill(impl, tokens, mask):
    graphdef, params = _model(impl)
    cache = KVCache.empty(CFG, tokens.shape[0], tokens.shape[1])

    def prefill(params, cache):
        return nnx.merge(graphdef, params)(tokens, mask=mask, cache=cache)

    return jax.jit(prefill)(params, cache)


def test_fresh_prefill_with_splash_equals_xla():
    """A prefill that fills its cache (left-padded prompts): logits and the cache."""
    tokens = _packed_batch(seed=2)[0]
    mask = jnp.asarray(np.arange(64)[None, :] >= np.asarray([0, 9, 30, 50])[:, None])
    logits, cache = _prefill("splash", tokens, mask)
    ref_logits, ref_cache = _prefill("xla", tokens, mask)
    real = mask[..., None]
    assert _rel(jnp.where(real, logits, 0), jnp.where(real, ref_logits, 0)) < 1e-5
    slots = mask[None, :, :, None, None]  # padding slots hold garbage keys, never read
    for x, ref in ((cache.k, ref_cache.k), (cache.v, ref_cache.v)):
        assert _rel(jnp.where(slots, x, 0), jnp.where(slots, ref, 0)) < 1e-5
