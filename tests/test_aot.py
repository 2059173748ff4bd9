"""Ahead-of-time memory check (experiments/aot_memory.py) on a tiny model and 8 fake devices.

The train step and the sampler's rollout programs are lowered and compiled from
ShapeDtypeStructs only; the tests check that `compiled.memory_analysis()` gives sane
per-device figures, that fsdp=8 really shards the arguments (about 1/8 of their unsharded
bytes on each device), that the donated state is aliased to the output, that the total fits
a budget computed from the shapes, and that the rollout's KV cache and weight terms are the
analytic sizes and are covered by its programs and its peak.
"""

import importlib.util
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax._src.mesh import AbstractDevice, AbstractMesh

from reflax.models import ModelConfig
from reflax.models.attention_kernels import Layout, resolve, target_platform
from reflax.models.lora import LoraSpec
from reflax.sampler import kv_cache_bytes as sampler_kv_bytes
from reflax.sharding import LORA_TARGETS, make_mesh
from reflax.trainer import StepConfig

_SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "aot_memory.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("reflax_experiments_aot_memory", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


aot = _load_script()

CFG = ModelConfig(
    vocab_size=1024,
    hidden_size=128,
    intermediate_size=256,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    qkv_bias=True,
    tie_word_embeddings=True,
)
BATCH, SEQ, MICRO, CHUNK = 32, 64, 1, 32
DEVICES = 8


@pytest.fixture(scope="module")
def result():
    if jax.device_count() < DEVICES:
        pytest.skip(f"needs {DEVICES} devices (tests/conftest.py fakes them on the CPU)")
    mesh = make_mesh({"fsdp": DEVICES}, devices=jax.devices()[:DEVICES])
    return aot.compile_train_step(
        CFG,
        mesh,
        batch_size=BATCH,
        seq_len=SEQ,
        step_config=StepConfig(beta=0.001, micro_batches=MICRO, logits_chunk=CHUNK),
        param_dtype=jnp.float32,
        dtype=jnp.bfloat16,
        ref_dtype=jnp.float32,
        remat=True,
        compiler_options=aot.FAST_COMPILE,
    )


def _nbytes(tree, shard=False):
    leaves = jax.tree.leaves(tree)
    return sum(
        math.prod(x.sharding.shard_shape(x.shape) if shard else x.shape) * x.dtype.itemsize
        for x in leaves
    )


def test_memory_analysis_is_sane(result):
    m = result.memory
    assert m.argument > 0 and m.output > 0 and m.temp > 0
    assert m.alias >= 0 and m.code >= 0
    assert m.total == m.argument + m.output - m.alias + m.temp + m.code
    assert m.total > m.argument


def test_arguments_are_sharded_over_fsdp(result):
    m = result.memory
    unsharded = result.global_argument_bytes()
    # the compiler's per-device argument bytes are the shards the shardings promise ...
    assert m.argument == pytest.approx(result.shard_argument_bytes(), rel=0.01)
    # ... which are about 1/8 of everything (norms, biases and scalars are replicated)
    assert m.argument == pytest.approx(unsharded / DEVICES, rel=0.05)
    state, _, ref = result.args
    params = _nbytes(state.params)
    assert _nbytes(state.params, shard=True) == pytest.approx(params / DEVICES, rel=0.05)
    assert _nbytes(ref, shard=True) == pytest.approx(params / DEVICES, rel=0.05)


def test_state_is_donated(result):
    state, _, _ = result.args
    state_shard = _nbytes(state, shard=True)
    # the new state is written over the donated one; only the metrics are fresh outputs
    assert result.memory.alias == pytest.approx(state_shard, rel=0.01)
    assert result.memory.output - result.memory.alias < 4096


def test_fits_budget_from_shapes(result):
    c = CFG
    f32 = 4
    rows = BATCH // DEVICES // MICRO  # rows of one micro-batch on one device
    T, D, F, V, L = SEQ, c.hidden_size, c.intermediate_size, c.vocab_size, c.num_layers
    params = c.num_params * f32
    state_shard = _nbytes(result.args[0], shard=True)
    args = result.shard_argument_bytes()
    # gradient accumulator, one micro-batch's gradient, Adam's update temporaries (sharded);
    # every parameter all-gathered in the compute dtype for the forward, its gradient before
    # the reduce-scatter, for the policy and the reference model
    weights = 6 * state_shard + 2 * params + 2 * params
    # remat: one residual per layer is kept; one layer's working set is recomputed
    scores = rows * c.num_heads * T * T * f32
    layer = rows * T * (4 * F + 8 * D + 3 * c.num_heads * c.head_dim) * f32 + 4 * scores
    saved = L * rows * T * D * f32
    logits = 4 * rows * CHUNK * V * f32  # one chunk: logits, softmax, their gradients
    budget = args + weights + 2 * (saved + layer + logits)
    m = result.memory
    assert m.total <= budget, (m, budget)
    # and no less than the arguments plus one chunk of float32 logits
    assert m.total >= args + rows * CHUNK * V * f32


def test_packed_step_needs_less_than_unpacked(result):
    # the same 32 rows as 8 groups of 4 sharing a 48-token prefix, 16-token reflections:
    # [48 + 4 x 16] = 112 slots per group instead of 4 x 64 = 256
    mesh = make_mesh({"fsdp": DEVICES}, devices=jax.devices()[:DEVICES])
    packed = aot.compile_train_step(
        CFG,
        mesh,
        batch_size=BATCH // 4,
        seq_len=48 + 4 * 16,
        packed=(48, 4),
        step_config=StepConfig(beta=0.001, micro_batches=MICRO, logits_chunk=CHUNK, max_len=SEQ),
        param_dtype=jnp.float32,
        dtype=jnp.bfloat16,
        ref_dtype=jnp.float32,
        remat=True,
        compiler_options=aot.FAST_COMPILE,
    )
    state, batch, _ = packed.args
    assert batch.tokens.shape == (BATCH // 4, 112) and batch.advantages.shape == (8, 4)
    # same weights as arguments, one micro-batch each: per device one group of 112 slots
    # against 4 rows of 64; the unpacked step keeps more temporaries
    assert packed.memory.argument < result.memory.argument
    assert packed.memory.temp < result.memory.temp


def test_lora_step_holds_the_base_once_and_trains_the_adapters(result):
    mesh = make_mesh({"fsdp": DEVICES}, devices=jax.devices()[:DEVICES])
    adapters = LoraSpec(rank=4, alpha=8.0, targets=LORA_TARGETS)
    kw = dict(param_dtype=jnp.float32, dtype=jnp.bfloat16, ref_dtype=jnp.float32)
    full, w = (aot.weight_terms(CFG, mesh, adapters=a, **kw) for a in (None, adapters))
    lora = aot.compile_train_step(
        CFG,
        mesh,
        batch_size=BATCH,
        seq_len=SEQ,
        step_config=StepConfig(beta=0.001, micro_batches=MICRO, logits_chunk=CHUNK),
        remat=True,
        compiler_options=aot.FAST_COMPILE,
        adapters=adapters,
        **kw,
    )
    state, batch, ref = lora.args
    # the state trains the adapters alone; the reference is the frozen base in the
    # params' dtype (ref_dtype plays no part), the policy's own weights
    assert all(
        "_lora_" in jax.tree_util.keystr(p)
        for p, _ in jax.tree_util.tree_leaves_with_path(state.params)
    )
    assert not any(
        "_lora_" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(ref)
    )
    trained = _nbytes(state.params, shard=True)
    assert w.state == _nbytes(state, shard=True) == pytest.approx(3 * trained, rel=0.01)
    assert w.ref == _nbytes(ref, shard=True) == full.params
    assert w.params == full.params + trained  # the sampler reads base + adapters
    # the step's arguments hold the base once: no copy beside it, no moments for it
    assert lora.memory.argument == pytest.approx(
        w.state + w.ref + _nbytes(batch, shard=True), rel=0.01
    )
    # full fine-tuning's hold the same base (as its float32 reference) and batch, and the
    # trained params with their moments: the difference is the two states
    saved = result.memory.argument - lora.memory.argument
    assert saved == pytest.approx(full.state - w.state, rel=0.01)


# --------------------------------------------------------------------------- rollout phase


def kept_budget() -> int:
    """A KV budget of exactly 4 of the 8 groups: the reflect call runs in 2 chunks."""
    return sampler_kv_bytes(
        CFG,
        jnp.bfloat16,
        groups=4,
        num_samples=4,
        prefix_size=128,
        gen_len=64,
        keep_cache=True,
        batch_shards=DEVICES,
    )


def compile_test_rollout(mesh, shapes, retry_prefill=False):
    """The rollout's programs of `shapes` on `mesh`: float32 params, bfloat16 compute and
    cache, the reflect call in 2 chunks (`kept_budget`)."""
    return aot.compile_rollout(
        CFG,
        mesh,
        shapes,
        param_dtype=jnp.float32,
        dtype=jnp.bfloat16,
        cache_dtype=jnp.bfloat16,
        kv_cache_bytes=kept_budget(),
        compiler_options=aot.FAST_COMPILE,
        retry_prefill=retry_prefill,
    )


@pytest.fixture(scope="module")
def rollout():
    if jax.device_count() < DEVICES:
        pytest.skip(f"needs {DEVICES} devices (tests/conftest.py fakes them on the CPU)")
    mesh = make_mesh({"fsdp": DEVICES}, devices=jax.devices()[:DEVICES])
    shapes = aot.RolloutShapes(
        groups=8,
        group_size=4,
        prefix_len=100,  # bucketed to 128 slots
        max_reflection_tokens=16,
        retry_turn_len=10,
        max_retry_tokens=8,
    )
    ro = compile_test_rollout(mesh, shapes)
    weights = aot.weight_terms(
        CFG, mesh, param_dtype=jnp.float32, dtype=jnp.bfloat16, ref_dtype=jnp.bfloat16
    )
    return mesh, shapes, ro, weights


def test_rollout_kv_cache_matches_its_analytic_size(rollout):
    _, shapes, ro, _ = rollout
    # the reflect program keeps prefix (a 64-slot prompt bucket) + reflection slots
    # (a 64-slot generation bucket) for the G rows of each of a chunk's 4 groups
    slots, rows = 128 + 64, shapes.rows // 2
    assert ro.chunks == 2 and ro.reflect_prefix_slots == 128
    assert ro.reflect_cache.k.shape == (
        CFG.num_layers,
        rows,
        slots,
        CFG.num_kv_heads,
        CFG.head_dim,
    )
    per_row = 2 * CFG.num_layers * slots * CFG.num_kv_heads * CFG.head_dim * 2  # bf16
    mask = rows * slots // DEVICES  # bool slot mask
    assert aot.kv_cache_bytes(CFG, rows, slots, jnp.bfloat16) == rows * per_row
    cache_shard = aot.tree_bytes(ro.reflect_cache, shard=True)
    assert cache_shard == rows // DEVICES * per_row + mask + 4  # + the int32 index
    # the first chunk's cache is alive while the second chunk (and the retry) runs
    assert ro.held_cache_bytes == cache_shard
    # the cache is the reflect program's output and the retry program's argument
    assert ro.reflect.memory.output >= cache_shard
    assert ro.retry.memory.argument >= cache_shard
    # the retry's prefix: kept slots + the retry turn (a 64-slot bucket), in a 128-slot bucket
    assert ro.retry_prefix_slots == 256


def test_rollout_programs_hold_params_and_caches(rollout):
    _, shapes, ro, w = rollout
    assert w.params == pytest.approx(CFG.num_params * 4 / DEVICES, rel=0.05)
    assert w.state == pytest.approx(3 * w.params, rel=0.01)  # params + two AdamW moments
    assert w.ref == pytest.approx(w.params / 2, rel=0.01)  # bfloat16 reference
    assert w.views == pytest.approx(w.params / 2, rel=0.01)
    for res in ro.programs.values():
        m = res.memory
        assert m.total == m.argument + m.output - m.alias + m.temp + m.code
        # the sampler reads the master params: they are every program's argument
        assert m.argument >= w.params
        # ... with the cache, plus the call's token block (int32 ids and a bool mask of
        # at most every row at the largest 128-slot bucket) and a few scalars
        assert 0 <= m.argument - res.shard_argument_bytes() <= 5 * shapes.rows * 128
    # the retry call's prefix cache lives in its temp
    assert 0 < ro.retry_rows <= shapes.rows // 2  # within one cached chunk
    retry_prefix = aot.kv_cache_bytes(
        CFG, ro.retry_rows, ro.retry_prefix_slots, jnp.bfloat16, DEVICES
    )
    assert ro.retry.memory.temp >= retry_prefix


def test_rollout_peak_adds_the_weights_outside_the_program(rollout):
    _, _, ro, w = rollout
    name, peak = aot.rollout_peak(ro, w)
    assert name in ro.programs
    for res in ro.programs.values():
        # the peak is at least each program plus the optimizer moments, the reference and
        # the other chunk's kept cache
        held = ro.held_cache_bytes
        assert peak >= res.memory.total + w.state - w.params + w.ref + held
        assert peak >= res.memory.argument + w.resident - w.params + held


def test_retry_prefill_keeps_no_reflection_cache(rollout, capsys):
    mesh, shapes, kept, w = rollout
    ro = compile_test_rollout(mesh, shapes, retry_prefill=True)
    s = aot.step_shapes(aot.load_config("qwen1p5b", ["rollout.retry_prefill=True"]), "cpu")
    aot.print_measurement(s, aot.Measurement(w, ro, None), mesh, 16 * 2**30)
    printed = capsys.readouterr().out
    assert "retry prefill" in printed and "kept for retry" not in printed
    assert ro.retry_prefill and ro.held_cache_bytes == 0 < kept.held_cache_bytes
    cache_shard = aot.tree_bytes(kept.reflect_cache, shard=True)
    # the reflect call returns no cache; the retry takes none: params and token blocks only
    assert ro.reflect.memory.output < cache_shard <= kept.reflect.memory.output
    assert ro.retry.memory.argument - w.params < cache_shard
    # the retry prefills prefix + reflection + retry turn (100 + 16 + 10 in a 128 bucket)
    assert ro.retry_prefix_slots == 128
    assert aot.rollout_peak(ro, w)[1] < aot.rollout_peak(kept, w)[1]


# --------------------------------------------------------------------------- config shapes


def test_step_shapes_follow_the_config_and_target_platform():
    c = aot.load_config("qwen1p5b", ["model.dtype=float32", "rollout.kv_cache_bytes=2e9"])
    tpu, cpu = aot.step_shapes(c, "tpu"), aot.step_shapes(c, "cpu")
    # "auto" KV caches: bfloat16 on the TPU compiled for, the compute dtype elsewhere
    assert tpu.cache_dtype == jnp.bfloat16 and cpu.cache_dtype == jnp.float32
    assert tpu.kv_cache_bytes == 2_000_000_000
    # the largest packed layout reflax.train precompiles: seq_len prefix + G reflections
    r = c.rollout
    assert tpu.packed == (r.seq_len, r.group_size) and tpu.train_rows == r.groups_per_step
    assert tpu.train_slots == r.seq_len + r.group_size * r.max_reflection_tokens
    flat = aot.step_shapes(c, "tpu", unpacked=True)
    assert (flat.train_rows, flat.train_slots, flat.packed) == (256, r.seq_len, None)
    with pytest.raises(SystemExit, match="not key=value"):
        aot.load_config("qwen1p5b", ["grpo.micro_batches"])


def test_auto_attention_resolves_for_the_target_platform():
    # a described TPU slice (no TPU, no libtpu needed to describe one) gets splash attention
    tpu = AbstractMesh(
        (8,), ("fsdp",), abstract_device=AbstractDevice("TPU v5 lite", 1, platform="tpu")
    )
    with jax.sharding.use_abstract_mesh(tpu):
        assert target_platform() == "tpu" and resolve("auto", jnp.bfloat16) == "splash"
    with jax.set_mesh(make_mesh({"fsdp": DEVICES}, devices=jax.devices()[:DEVICES])):
        assert target_platform() == "cpu" and resolve("auto", jnp.bfloat16) == "xla"


def test_attention_flops_counts_allowed_pairs_and_splash_tiles():
    H, Dh = 2, 16
    per_pair = 4 * Dh * H  # QK^T and PV: 2 FLOPs per multiply-add, Dh each, every head
    # causal row of 200 slots: T(T+1)/2 pairs; splash computes whole 128-slot tiles of a
    # 256-slot padded row: 3 of 4 (the upper right one is masked)
    T = 200
    assert aot.attention_flops(Layout(T), H, Dh) == per_pair * T * (T + 1) // 2
    assert aot.attention_flops(Layout(T), H, Dh, block=128) == per_pair * 3 * 128 * 128
    # packed: a 128-slot prefix, 4 suffixes of 32 (each sees the prefix and itself)
    lp, g, ls = 128, 4, 32
    pairs = lp * (lp + 1) // 2 + g * (ls * lp + ls * (ls + 1) // 2)
    assert aot.attention_flops(Layout(lp, g, ls), H, Dh) == per_pair * pairs
    tiles = aot.attention_flops(Layout(lp, g, ls), H, Dh, block=128)
    assert tiles == per_pair * 3 * 128 * 128  # the 4 suffixes fill one tile row
