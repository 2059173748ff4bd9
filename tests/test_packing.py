"""Group packing: the layout, and the packed train step's loss, metrics and gradients equal
the unpacked step's for every loss type, KL, anchor, mu > 1, micro-batches, on a mesh and
for every attention variant (sliding windows, q/k norm)."""

import contextlib
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_train_config

from reflax import grpo, optim
from reflax.batch import Batch, PackLengths, bucket_lengths, pack_groups, shard_batch
from reflax.models import create
from reflax.sharding import make_mesh
from reflax.trainer import (
    CompiledSteps,
    StepConfig,
    init_state,
    jit_logprob_fn,
    jit_train_step,
    make_grad_fn,
    make_logprob_fn,
    make_train_step,
    split_micro,
    step_normalisers,
)

CFG = tiny_train_config()
U, G, T = 4, 3, 40


def group_batch(seed=0, groups=U, group_size=G, seq_len=T, vocab=CFG.vocab_size):
    """Unpacked rows as episodes builds them: per group a shared [prompt, attempt (anchored),
    instruction] prefix, then each sample's reflection (loss) of its own length."""
    rng = np.random.default_rng(seed)
    B = groups * group_size
    tokens = np.zeros((B, seq_len), np.int32)
    mask = np.zeros((B, seq_len), bool)
    loss = np.zeros((B, seq_len), np.float32)
    anchor = np.zeros((B, seq_len), np.float32)
    for u in range(groups):
        n = int(rng.integers(6, seq_len // 2))
        prefix = rng.integers(1, vocab, n)
        a0, a1 = 2, n - 2  # the "attempt" inside the prefix
        for g in range(group_size):
            b = u * group_size + g
            m = int(rng.integers(1, seq_len - n + 1))
            tokens[b, :n] = prefix
            tokens[b, n : n + m] = rng.integers(1, vocab, m)
            if g == 0 and m > 1:  # a sample whose first reflection token equals another's
                tokens[b, n] = tokens[b - 1, n] if b % group_size else tokens[b, n]
            mask[b, : n + m] = True
            loss[b, n : n + m] = 1.0
            anchor[b, a0:a1] = 1.0
    rewards = rng.integers(0, 2, (groups, group_size)).astype(np.float32)
    adv = np.asarray(grpo.group_advantages(rewards, np.ones(groups, bool))[0]).reshape(B)
    return Batch(
        tokens=tokens,
        positions=np.broadcast_to(np.arange(seq_len, dtype=np.int32), (B, seq_len)).copy(),
        mask=mask,
        loss_mask=loss,
        anchor_mask=anchor,
        advantages=adv,
        old_logprobs=(-rng.uniform(1, 5, (B, seq_len))).astype(np.float32),
    )


def unpack(p: Batch, seq_len: int) -> dict[str, np.ndarray]:
    """Inverse of the layout: each sample's row, right-padded (the test's own reading)."""
    Lp, Gs = p.prefix_len, p.group_size
    Ls = (p.tokens.shape[1] - Lp) // Gs
    rows = {k: [] for k in ("tokens", "loss_mask", "anchor_mask", "positions")}
    for u in range(p.tokens.shape[0]):
        pre = np.asarray(p.mask[u, :Lp])
        for g in range(Gs):
            suf = np.asarray(p.mask[u, Lp + g * Ls : Lp + (g + 1) * Ls])
            for k in rows:
                x = np.asarray(getattr(p, k))[u]
                row = np.concatenate([x[:Lp][pre], x[Lp + g * Ls : Lp + (g + 1) * Ls][suf]])
                rows[k].append(np.pad(row, (0, seq_len - len(row))))
    return {k: np.stack(v) for k, v in rows.items()}


def test_layout_round_trips_and_shares_only_what_rows_share():
    b = group_batch()
    p = pack_groups(b, G)
    assert p.tokens.shape[0] == U and p.advantages.shape == (U, G)
    Lp = p.prefix_len
    assert Lp in bucket_lengths(T) and (p.tokens.shape[1] - Lp) // G in bucket_lengths(T)
    back = unpack(p, T)
    np.testing.assert_array_equal(back["tokens"], np.where(b.mask, b.tokens, 0))
    np.testing.assert_array_equal(back["positions"], np.where(b.mask, b.positions, 0))
    np.testing.assert_array_equal(back["anchor_mask"], b.anchor_mask)
    np.testing.assert_array_equal(back["loss_mask"], b.loss_mask)
    np.testing.assert_array_equal(p.advantages.reshape(-1), b.advantages)
    # the prefix stops at the first loss token: no loss token is ever shared
    assert not (p.loss_mask[:, :Lp] > 0).any()
    # the slots hold U * (prefix + sum of suffixes) real tokens: each prefix once
    shared = p.mask[:, :Lp].sum()
    assert p.mask.sum() == b.mask.sum() - (G - 1) * shared


def test_ladder_and_bad_input():
    ladder = bucket_lengths(1000)
    assert ladder[0] == 16 and ladder[-1] >= 1000 and ladder[-2] < 1000
    assert all(b / a <= 1.5 for a, b in zip(ladder, ladder[1:]))
    b = group_batch()
    with pytest.raises(ValueError, match="whole groups"):
        pack_groups(b, 5)
    left = b.replace(mask=np.roll(b.mask, 1, axis=1))
    with pytest.raises(ValueError, match="right-padded"):
        pack_groups(left, G)
    with pytest.raises(ValueError, match="no packed length"):
        pack_groups(b, G, lengths=PackLengths((4,), (4,)))
    with pytest.raises(ValueError, match="packed already"):
        pack_groups(pack_groups(b, G), G)


def test_prefix_stops_where_positions_differ():
    # two rows of a group with the same tokens but a gap in one row's positions (as after a
    # dropped token): the shared prefix must end there, or that row would take the other's
    b = group_batch(seed=11)
    positions = b.positions.copy()
    positions[1, 3:] += 1
    b = b.replace(positions=positions)
    p = pack_groups(b, G)
    back = unpack(p, T)
    np.testing.assert_array_equal(back["positions"], np.where(b.mask, b.positions, 0))
    np.testing.assert_array_equal(back["tokens"], np.where(b.mask, b.tokens, 0))


def test_constant_loss_needs_max_len_and_counts_it_in_both_layouts():
    # rows * max_len: left to the layout it would be B * (T - 1) unpacked and B * Ls packed
    with pytest.raises(ValueError, match="constant.*max_len"):
        StepConfig(loss_type="constant")
    cfg = StepConfig(loss_type="constant", max_len=T)
    b = group_batch(seed=3)
    den, _ = step_normalisers(b, cfg)
    den_packed, _ = step_normalisers(pack_groups(b, G), cfg)
    assert float(den) == float(den_packed) == U * G * T


def test_micro_batches_span_every_batch_shard():
    # the step scans over micro-batches: each must take its rows from every batch shard, so
    # that the scanned axis is never a sharded one and no shard idles
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rows, m, shards = 8 * G, 2, 4
    x = shard_batch(group_batch(groups=rows // G, seed=1), mesh).tokens
    split = jax.jit(lambda x: split_micro(x, m))
    with jax.set_mesh(mesh):
        micro = split(x)
    np.testing.assert_array_equal(np.asarray(micro), np.asarray(x).reshape(-1, m, T).swapaxes(0, 1))
    for shard in micro.addressable_shards:
        held = shard.data.shape  # [micro-batches, rows, T] on this device
        assert held == (m, rows // (m * shards), T), (shard.device, held)


def _gathered_hidden_states(hlo: str, hidden: int, scope: str) -> list[tuple[int, int]]:
    """(rows, length) of every all-gather in a compiled program whose output is shaped like
    hidden states [rows, length, hidden], from ops inside (`scope` = "lm_head") or outside
    (any other) the trainer's LM-head scope."""
    pat = re.compile(r"= \w+\[(\d+),(\d+),(\d+)\]\{[\d,]*\} all-gather(?:-start)?\(")
    found = []
    for line in hlo.splitlines():
        m = pat.search(line)
        if m and int(m.group(3)) == hidden and (("lm_head" in line) == (scope == "lm_head")):
            found.append((int(m.group(1)), int(m.group(2))))
    return found


def test_packed_step_gathers_no_whole_activation():
    """Compiled packed step on the (2, 2, 2) mesh, 2 micro-batches of 4 groups against 4
    batch shards: every device runs its own group's prefix and suffixes, and no all-gather
    returns more hidden states than one batch shard holds (weights are gathered instead)."""
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    groups, m, shards, Lp, Ls = 8, 2, 4, 48, 16
    config = dataclasses.replace(CFG, num_layers=1)  # the layer scan compiles its body once
    graphdef, params = nnx.split(create(config, mesh=mesh, seed=1))
    tx, _ = optim.make_optimizer(total_steps=10, learning_rate=1e-2, warmup_ratio=0.0)
    state = jax.eval_shape(lambda p: init_state(p, tx), params)
    cfg = StepConfig(max_len=T, micro_batches=m, logits_chunk=8)
    abstract = Batch.abstract(groups, Lp + G * Ls, Lp, G)
    fn = jit_train_step(make_train_step(graphdef, tx, cfg), state, abstract, mesh, False)
    with jax.set_mesh(mesh):
        hlo = fn.lower(state, abstract, None).compile().as_text()
    per_shard = groups // (m * shards) * (Lp + G * Ls)  # hidden states one shard owns
    gathered = _gathered_hidden_states(hlo, CFG.hidden_size, scope="layers")
    assert all(r * n <= per_shard for r, n in gathered), gathered
    # the vocabulary-parallel LM head gathers one chunk of positions (cfg.logits_chunk) of
    # its data replica's rows at a time (reflax.trainer), never a whole region
    replica_rows = groups // (m * mesh.shape["data"]) * G  # suffix rows of a data replica
    head = _gathered_hidden_states(hlo, CFG.hidden_size, scope="lm_head")
    assert head and all(n <= cfg.logits_chunk and r <= replica_rows for r, n in head), head


def _rel_tree_diff(a, b):
    """Largest |a - b| of each leaf relative to that leaf's largest |a|."""
    diffs = jax.tree.map(lambda x, y: float(np.abs(x - y).max() / np.abs(x).max()), a, b)
    return max(jax.tree.leaves(diffs))


def _grads(config, cfg, batch, mesh=None, ref_shift=0.05):
    model = create(config, mesh=mesh, seed=1)
    graphdef, params = nnx.split(model)
    ref = jax.tree.map(lambda x: x + ref_shift * jnp.sin(17.0 * x), params)
    fn = jax.jit(make_grad_fn(graphdef, cfg))
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        out = fn(params, shard_batch(batch, mesh), ref)
    return jax.device_get(out)


def assert_same_step(a, b, tol=1e-5):
    grads_a, loss_a, sums_a, norm_a = a
    grads_b, loss_b, sums_b, norm_b = b
    # the loss is a sum of per-token terms of size up to |A| * ratio + KL: relative to the
    # largest term's scale, not to a loss that may cancel to ~0
    scale = max(1.0, abs(float(loss_a)))
    assert abs(float(loss_a) - float(loss_b)) <= tol * scale, (loss_a, loss_b)
    assert sums_a.keys() == sums_b.keys()
    for k in sums_a:
        x, y = float(sums_a[k]), float(sums_b[k])
        assert abs(x - y) <= tol * max(1.0, abs(x)), (k, x, y)
    np.testing.assert_allclose(np.asarray(norm_a), np.asarray(norm_b), rtol=tol)
    assert _rel_tree_diff(grads_a, grads_b) <= tol


@pytest.mark.parametrize(
    "loss_type, mu2", [("token_mean", True), ("seq_mean", False), ("constant", True)]
)
def test_packed_gradients_equal_unpacked(loss_type, mu2):
    cfg = StepConfig(
        temperature=0.9,
        beta=0.04,
        anchor_beta=0.3,
        loss_type=loss_type,
        max_len=T,
        micro_batches=2,
        logits_chunk=16,
        use_old_logprobs=mu2,
    )
    b = group_batch(seed=3)
    a = _grads(CFG, cfg, b)
    assert float(a[2]["num_tokens"]) > 0 and float(a[3][1]) > 0, "vacuous: nothing scored"
    assert_same_step(a, _grads(CFG, cfg, pack_groups(b, G)))


def test_packed_gradients_on_a_2x2x2_mesh():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    cfg = StepConfig(beta=0.01, anchor_beta=0.1, max_len=T, micro_batches=1, logits_chunk=16)
    b = group_batch(seed=5)
    on_mesh = _grads(CFG, cfg, pack_groups(b, G), mesh=mesh)
    assert_same_step(_grads(CFG, cfg, b), on_mesh)
    assert_same_step(_grads(CFG, cfg, b, mesh=mesh), on_mesh)


@pytest.mark.parametrize(
    "variant",
    [
        dict(sliding_window=5, sliding_layers=(True, False)),  # one sliding, one full layer
        dict(qk_norm=True, qkv_bias=False),  # Qwen3
    ],
    ids=["sliding_window", "qk_norm"],
)
def test_packed_gradients_for_attention_variants(variant):
    config = dataclasses.replace(CFG, **variant)
    cfg = StepConfig(beta=0.02, anchor_beta=0.2, max_len=T, logits_chunk=16)
    b = group_batch(seed=7)
    assert_same_step(_grads(config, cfg, b), _grads(config, cfg, pack_groups(b, G)))


def test_packed_logprob_pass_matches_unpacked():
    model = create(CFG, seed=2)
    graphdef, params = nnx.split(model)
    cfg = StepConfig(temperature=0.7, logits_chunk=16)
    b = group_batch(seed=9)
    p = pack_groups(b, G)
    fn = make_logprob_fn(graphdef, cfg)
    lp = np.asarray(jit_logprob_fn(fn, params, b, None)(params, jax.tree.map(jnp.asarray, b)))
    lp_packed = np.asarray(jax.jit(fn)(params, jax.tree.map(jnp.asarray, p)))
    back = unpack(p.replace(tokens=lp_packed), T)["tokens"]  # log-probs moved like tokens
    scored = (b.loss_mask > 0) | (b.anchor_mask > 0)
    scored[:, 0] = False
    np.testing.assert_allclose(back[scored], lp[scored], rtol=1e-5, atol=1e-5 * np.abs(lp).max())


def test_compiled_steps_one_program_per_layout():
    model = create(CFG, seed=1)
    graphdef, params = nnx.split(model)
    tx, _ = optim.make_optimizer(total_steps=10, learning_rate=1e-2, warmup_ratio=0.0)
    state = init_state(params, tx)
    steps = CompiledSteps(graphdef, tx, StepConfig(max_len=T), state, None, None)
    batches = [pack_groups(group_batch(seed=s), G) for s in range(3)]
    for p in batches:
        state, m = steps.step(p)(state, jax.tree.map(jnp.asarray, p), None)
        assert bool(m["applied"])
    layouts = {(p.tokens.shape, p.prefix_len) for p in batches}
    assert steps.num_programs == len(layouts)


def test_coarse_lengths_bound_the_layouts_and_seal_the_programs():
    # a run's packed batches take one of sizes^2 layouts, all compiled before the loop; a
    # batch of any other layout is then an error, not a compile inside a timed step
    ladder = PackLengths.coarse(T, 12, sizes=2)
    assert ladder.prefix == bucket_lengths(T)[-2:] and ladder.suffix == (16,)
    assert PackLengths.coarse(2048, 256, 3) == PackLengths((1024, 1536, 2048), (128, 192, 256))
    layouts = {(a.tokens.shape, a.prefix_len) for a in ladder.layouts(U, G)}
    assert len(layouts) == 2
    b = group_batch(seed=4)
    keep = b.mask & (np.cumsum(b.loss_mask, 1) <= 12)  # each reflection cut to 12 tokens
    p = pack_groups(b.replace(mask=keep, loss_mask=b.loss_mask * keep), G, ladder)
    assert (p.tokens.shape, p.prefix_len) in layouts
    graphdef, params = nnx.split(create(CFG, seed=1))
    tx, _ = optim.make_optimizer(total_steps=10, learning_rate=1e-2, warmup_ratio=0.0)
    steps = CompiledSteps(graphdef, tx, StepConfig(max_len=T), init_state(params, tx), None, None)
    steps.precompile([])
    with pytest.raises(ValueError, match="not one of the 0 compiled before the loop"):
        steps.step(p)


def test_packed_forward_runs_the_one_block(monkeypatch):
    """The packed forward has no layer math of its own: it calls `decoder.block` for the
    prefix and for the suffixes, in every layer."""
    from reflax.models import decoder

    original, shapes = decoder.block, []

    def counted(p, x, rope, attend, config):
        shapes.append(x.shape)
        return original(p, x, rope, attend, config)

    monkeypatch.setattr(decoder, "block", counted)
    model = create(CFG, seed=1)
    p = pack_groups(group_batch(seed=0), G)
    Lp = p.prefix_len
    Ls = (p.tokens.shape[1] - Lp) // G
    model.packed_hidden_states(p.tokens, p.positions, p.mask, Lp, G)
    # the layer scan traces its body once: one prefix call, one suffix call
    assert shapes == [(U, Lp, CFG.hidden_size), (U * G, Ls, CFG.hidden_size)]
