"""The programs of one GRPO step compiled ahead of time from abstract shapes, and the
bytes each holds per device (`compiled.memory_analysis()`); experiments/aot_memory.py
puts them together into a step's peaks for a config and a slice."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from reflax import optim
from reflax.batch import Batch, batch_shardings
from reflax.models import ModelConfig, abstract_model, lora
from reflax.models.attention_kernels import Layout, block_size, layout_mask
from reflax.models.lora import LoraSpec
from reflax.sampler import CachedRows, Sampler, bucket_size, kv_slot_bytes
from reflax.sharding import param_shardings
from reflax.trainer import (
    StepConfig,
    TrainState,
    jit_train_step,
    make_train_step,
    state_shardings,
)

# Compiler options that cut the CPU compile time several-fold without changing buffer
# assignment (LLVM optimisation level 0; classic fusion emitters). The memory figures agree
# with a default compile to within a few hundred bytes; the test uses these.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Per-device bytes of one compiled program (from `compiled.memory_analysis()`)."""

    argument: int
    output: int
    alias: int
    temp: int
    code: int
    peak: int  # the compiler's own peak estimate where it reports one, else 0

    @property
    def total(self) -> int:
        return self.argument + self.output - self.alias + self.temp + self.code

    @classmethod
    def of(cls, compiled: Any) -> MemoryReport:
        m = compiled.memory_analysis()
        if m is None:
            raise RuntimeError("this backend's compiled.memory_analysis() returned None")
        return cls(
            argument=int(m.argument_size_in_bytes),
            output=int(m.output_size_in_bytes),
            alias=int(m.alias_size_in_bytes),
            temp=int(m.temp_size_in_bytes),
            code=int(m.generated_code_size_in_bytes),
            peak=int(getattr(m, "peak_memory_in_bytes", 0) or 0),
        )


@dataclasses.dataclass(frozen=True)
class AotResult:
    compiled: Any
    memory: MemoryReport
    args: tuple  # the abstract arguments (ShapeDtypeStructs with their shardings)
    lower_s: float
    compile_s: float
    outputs: Any = None  # the abstract outputs, with their shardings

    def global_argument_bytes(self) -> int:
        """Bytes of all arguments, unsharded (what a single device would hold)."""
        return tree_bytes(self.args)

    def shard_argument_bytes(self) -> int:
        """Bytes of the arguments' shards on one device, from the shardings (the expectation)."""
        return tree_bytes(self.args, shard=True)


def _nbytes(shape: tuple[int, ...], dtype: Any) -> int:
    return math.prod(shape) * jnp.dtype(dtype).itemsize


def tree_bytes(tree: Any, shard: bool = False) -> int:
    """Bytes of a pytree of arrays / ShapeDtypeStructs; `shard`: of one device's shards."""
    return sum(
        _nbytes(x.sharding.shard_shape(x.shape) if shard else x.shape, x.dtype)
        for x in jax.tree.leaves(tree)
    )


def _with_sharding(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _as_dtype(tree: Any, dtype: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding), tree)


def abstract_params(
    config: ModelConfig, mesh: Mesh, adapters: LoraSpec | None = None, **model_kwargs: Any
) -> tuple[Any, Any]:
    """(graphdef, params as ShapeDtypeStructs with their shardings on the mesh); with
    `adapters`, the model carries LoRA adapters as `reflax.train` attaches them (params:
    base + adapters, the policy the sampler reads)."""
    model = abstract_model(config, **model_kwargs)
    if adapters is not None:
        lora.attach(model, adapters)
    graphdef, params = nnx.split(model)
    return graphdef, _with_sharding(params, param_shardings(params, mesh))


def trained_and_ref(
    params: Any, adapters: LoraSpec | None, ref_dtype: Any | None
) -> tuple[Any, Any | None]:
    """(what the train state trains, the KL reference) as `reflax.train` splits them: the
    adapters and the frozen base itself (LoRA, no copy), or every weight and a copy of the
    initial weights in `ref_dtype` (None: no KL term, no reference)."""
    if adapters is not None:
        return lora.split(params)
    return params, None if ref_dtype is None else _as_dtype(params, ref_dtype)


def abstract_state(params: Any, mesh: Mesh) -> tuple[Any, TrainState]:
    """(optimizer, the TrainState `reflax.train` builds around `params`, abstract, sharded)."""
    tx, _ = optim.make_optimizer(total_steps=1000, learning_rate=5e-7, warmup_ratio=0.03)
    state = jax.eval_shape(
        lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
        params,
    )
    return tx, _with_sharding(state, state_shardings(state, mesh))


@dataclasses.dataclass(frozen=True)
class OutOfMemory:
    """A program the TPU compiler refused: it does not fit one chip's HBM on its own."""

    message: str  # the compiler's, e.g. "... HLO temporaries (20.45G) exceeds ... (15.75G)"
    compile_s: float

    def __str__(self) -> str:
        return self.message.split("\n")[0].removeprefix("RESOURCE_EXHAUSTED: ")


def _plain_sharding(s: Any) -> Any:
    return getattr(s, "sharding", s)  # a Format (layout, sharding) or the sharding itself


def abstract_outputs(lowered: Any) -> Any:
    """A lowered program's outputs as ShapeDtypeStructs with their shardings."""
    return jax.tree.map(
        lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=_plain_sharding(o.sharding)),
        lowered.out_info,
    )


def _compile(
    lowered: Any, compiler_options: dict[str, Any] | None, t0: float, args: tuple
) -> AotResult | OutOfMemory:
    t1 = time.perf_counter()
    try:
        compiled = lowered.compile(compiler_options)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return OutOfMemory(str(e), time.perf_counter() - t1)
    t2 = time.perf_counter()
    memory = MemoryReport.of(compiled)
    return AotResult(compiled, memory, args, t1 - t0, t2 - t1, abstract_outputs(lowered))


def compile_train_step(
    config: ModelConfig,
    mesh: Mesh,
    *,
    batch_size: int,
    seq_len: int,
    step_config: StepConfig,
    param_dtype: Any = jnp.float32,
    dtype: Any = jnp.bfloat16,
    ref_dtype: Any | None = jnp.float32,
    remat: bool = True,
    compiler_options: dict[str, Any] | None = None,
    packed: tuple[int, int] | None = None,
    adapters: LoraSpec | None = None,
) -> AotResult:
    """Lower and compile `reflax.trainer`'s sharded train step from abstract shapes only.

    The step is built exactly as `reflax.train` builds it (`make_train_step` +
    `jit_train_step`, state donated); `ref_dtype=None` compiles it without KL reference
    params. `packed=(prefix_len, group_size)`: `batch_size` group-packed rows of `seq_len`
    slots (`reflax.batch`). `adapters`: a LoRA step, the state holding the adapters and
    their moments, the frozen base its reference (`ref_dtype` unused). `compiler_options`
    go to `Lowered.compile` (e.g. `FAST_COMPILE`). Returns the compiled step, its
    per-device memory and the abstract (state, batch, ref).
    """
    kw = dict(param_dtype=param_dtype, dtype=dtype, remat=remat)
    graphdef, params = abstract_params(config, mesh, adapters, **kw)
    trained, ref = trained_and_ref(params, adapters, ref_dtype)
    tx, state = abstract_state(trained, mesh)
    batch = Batch.abstract(batch_size, seq_len, *(packed or ()))
    batch = _with_sharding(batch, batch_shardings(batch, mesh))
    # LoRA: the base model's graph runs the reference (as reflax.train's base_graphdef)
    ref_graphdef = None if adapters is None else nnx.graphdef(abstract_model(config, **kw))
    step = make_train_step(graphdef, tx, step_config, ref_graphdef)
    fn = jit_train_step(step, state, batch, mesh, ref is not None, ref)
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        lowered = fn.lower(state, batch, ref)
        return _compile(lowered, compiler_options, t0, (state, batch, ref))


@dataclasses.dataclass(frozen=True)
class RolloutShapes:
    """The shapes of one step's `reflect_and_retry` (U failures, G reflections each)."""

    groups: int  # U
    group_size: int  # G
    prefix_len: int  # query + attempt + reflection instruction, tokens (a prompt bucket)
    max_reflection_tokens: int
    retry_turn_len: int  # the retry turn appended to each reflection
    max_retry_tokens: int

    @property
    def rows(self) -> int:
        return self.groups * self.group_size


@dataclasses.dataclass(frozen=True)
class RolloutAot:
    reflect: AotResult | OutOfMemory  # Sampler.sample: U prefixes, G reflections, cache kept
    retry: AotResult | OutOfMemory  # Sampler.continue_rows: every reflection row, one retry each
    reflect_cache: Any  # the KVCache one reflect call (chunk) returns (abstract; None: none kept)
    reflect_prefix_slots: int  # slots of the reflect program's prefill (a prompt bucket)
    retry_prefix_slots: int  # slots of the retry's prefix: kept cache + retry turn, bucketed
    chunks: int = 1  # reflect calls (`kv_cache_bytes`); each keeps its cache for the retry
    retry_rows: int = 0  # rows of one retry call (a chunk's, padded)
    retry_prefill: bool = False  # the retry prefills its whole context: no cache kept
    reflect_rows: int = 0  # sampled rows of one reflect call (a chunk's, padded)

    @property
    def programs(self) -> dict[str, AotResult | OutOfMemory]:
        return {"reflect": self.reflect, "retry": self.retry}

    @property
    def held_cache_bytes(self) -> int:
        """Per device: the caches of the other chunks, alive while a chunk's program runs
        (the last reflect chunk's and every retry chunk's); none under `retry_prefill`."""
        if self.retry_prefill:
            return 0
        return (self.chunks - 1) * tree_bytes(self.reflect_cache, shard=True)


def compile_rollout(
    config: ModelConfig,
    mesh: Mesh,
    shapes: RolloutShapes,
    *,
    param_dtype: Any = jnp.float32,
    dtype: Any = jnp.bfloat16,
    cache_dtype: Any = jnp.bfloat16,
    kv_cache_bytes: int = 0,
    compiler_options: dict[str, Any] | None = None,
    adapters: LoraSpec | None = None,
    retry_prefill: bool = False,
) -> RolloutAot:
    """Lower and compile the sampler's programs of one `reflect_and_retry` from abstract
    shapes: the policy's params (as the train state holds them) on the mesh, a `Sampler`
    built as `reflax.runtime.build` builds it, the reflect call (`sample`, G samples per
    prefix, cache kept) and the retry call (`continue_rows` of every row, one sample each);
    with `kv_cache_bytes`, the first chunk's program of each. `adapters`: the sampler of a
    LoRA run, on base + adapters (no merged copy). `retry_prefill` (`rollout.retry_prefill`):
    the reflect call keeps no cache and the retry is a new call on each row's whole context
    (prefix, reflection, retry turn), one sample each."""
    kw = dict(param_dtype=param_dtype, dtype=dtype)
    graphdef, params = abstract_params(config, mesh, adapters, **kw)
    sampler = Sampler(
        graphdef,
        mesh,
        cache_dtype=cache_dtype,
        kv_cache_bytes=kv_cache_bytes,
        compiler_options=compiler_options,
    )
    sampler.config = config
    s = shapes
    t0 = time.perf_counter()
    lowered = _lower_reflect(sampler, params, s, keep_cache=not retry_prefill)
    reflect = _compile(lowered, None, t0, (params,))
    if retry_prefill:
        return _compile_prefilled_retry(sampler, params, s, reflect, abstract_outputs(lowered))
    cache = abstract_outputs(lowered)["cache"]  # the cache a reflect call keeps
    chunk_rows = cache.k.shape[1]  # sampled rows of one call: its groups x G (padded)
    chunks = -(-s.groups // (chunk_rows // s.group_size))
    prev = CachedRows(
        cache=cache if chunks == 1 else (cache,) * chunks,
        seq_lens=np.zeros((s.rows,), np.int32),  # values do not change the program's shapes
        index=cache.k.shape[2],  # every slot used: each row ran to max_reflection_tokens
        starts=tuple(j * chunk_rows for j in range(chunks)),
    )
    t0 = time.perf_counter()
    lowered = sampler.lower(
        params,
        num_rows=s.rows,
        block_len=s.retry_turn_len,
        num_samples=1,
        max_new_tokens=s.max_retry_tokens,
        keep_cache=False,
        prev=prev,
    )
    retry = _compile(lowered, None, t0, (params, cache))
    retry_rows = abstract_outputs(lowered)["tokens"].shape[0]
    turn = bucket_size(s.retry_turn_len, sampler.prompt_buckets)
    return RolloutAot(
        reflect,
        retry,
        cache,
        reflect_prefix_slots=bucket_size(s.prefix_len, sampler.prompt_buckets),
        retry_prefix_slots=bucket_size(prev.index + turn, sampler.cache_buckets),
        chunks=chunks,
        retry_rows=retry_rows,
        reflect_rows=chunk_rows,
    )


def _lower_reflect(sampler: Sampler, params: Any, s: RolloutShapes, keep_cache: bool) -> Any:
    """The reflect call's program (`sample`: U prefixes, G reflections each), lowered."""
    return sampler.lower(
        params,
        num_rows=s.groups,
        block_len=s.prefix_len,
        num_samples=s.group_size,
        max_new_tokens=s.max_reflection_tokens,
        keep_cache=keep_cache,
    )


def _compile_prefilled_retry(
    sampler: Sampler, params: Any, s: RolloutShapes, reflect: Any, reflect_out: Any
) -> RolloutAot:
    """`compile_rollout` under `retry_prefill`: `reflect` (compiled, outputs `reflect_out`)
    keeps no cache, and the retry samples every row's whole context."""
    rows = reflect_out["tokens"].shape[0]  # sampled rows of one reflect call
    chunks = -(-s.rows // rows)
    context = s.prefix_len + s.max_reflection_tokens + s.retry_turn_len
    t0 = time.perf_counter()
    lowered = sampler.lower(
        params,
        num_rows=s.rows,
        block_len=context,
        num_samples=1,
        max_new_tokens=s.max_retry_tokens,
        keep_cache=False,
    )
    retry = _compile(lowered, None, t0, (params,))
    return RolloutAot(
        reflect,
        retry,
        None,
        reflect_prefix_slots=bucket_size(s.prefix_len, sampler.prompt_buckets),
        retry_prefix_slots=bucket_size(context, sampler.prompt_buckets),
        chunks=chunks,
        retry_rows=abstract_outputs(lowered)["tokens"].shape[0],
        reflect_rows=rows,
        retry_prefill=True,
    )


def kv_cache_bytes(config: ModelConfig, rows: int, slots: int, dtype: Any, shards: int = 1) -> int:
    """Keys and values of every layer for `rows` x `slots`, over `shards` batch shards."""
    return kv_slot_bytes(config, dtype) * slots * (rows // shards)


@dataclasses.dataclass(frozen=True)
class WeightTerms:
    """Per-device bytes of the weight copies a run keeps alive (from the shardings)."""

    state: int  # trained params + AdamW moments + step (LoRA: the adapters')
    params: int  # the policy's master params the sampler reads (LoRA: base + adapters)
    ref: int  # the KL reference (0: no KL term; LoRA: the frozen base, the policy's own)
    views: int  # the sampler's copy of the weights in the compute dtype (inside its temp)

    @property
    def resident(self) -> int:
        """Alive through the whole step: train state and reference (under LoRA the base
        and the adapters, each once)."""
        return self.state + self.ref


def weight_terms(
    config: ModelConfig,
    mesh: Mesh,
    *,
    param_dtype: Any = jnp.float32,
    dtype: Any = jnp.bfloat16,
    ref_dtype: Any | None = jnp.float32,
    adapters: LoraSpec | None = None,
) -> WeightTerms:
    _, params = abstract_params(config, mesh, adapters, param_dtype=param_dtype, dtype=dtype)
    trained, ref = trained_and_ref(params, adapters, ref_dtype)
    _, state = abstract_state(trained, mesh)
    return WeightTerms(
        state=tree_bytes(state, shard=True),
        params=tree_bytes(params, shard=True),
        ref=tree_bytes(ref, shard=True),
        views=tree_bytes(_as_dtype(params, dtype), shard=True),
    )


def rollout_peak(rollout: RolloutAot, weights: WeightTerms) -> tuple[str, int | None]:
    """(program, bytes) of the rollout's peak: a program's total plus the resident weights
    that are not its arguments (the sampler takes the master params only) plus the other
    chunks' kept caches; bytes None when a program did not fit on its own."""
    for name, res in rollout.programs.items():
        if isinstance(res, OutOfMemory):
            return name, None
    others = weights.resident - weights.params + rollout.held_cache_bytes
    name, res = max(rollout.programs.items(), key=lambda kv: kv[1].memory.total)
    return name, others + res.memory.total


def attention_flops(layout: Layout, heads: int, head_dim: int, block: int | None = None) -> int:
    """Attention matmul FLOPs of one row's forward (QK^T and PV, 2 * 2 * Dh per query-key
    pair) over the query-key pairs computed: with `block`, every (block x block) tile
    splash attention does not skip (any allowed pair in it); without, the exact pairs the
    mask allows (a lower bound no kernel beats)."""
    T = layout.length
    _, padded = block_size(T)
    q, k = np.arange(padded)[:, None], np.arange(padded)[None, :]
    ok = layout_mask(layout, None, q, k) & (q < T) & (k < T)
    if block is None:
        pairs = int(ok.sum())
    else:
        nb = padded // block
        tiles = ok.reshape(nb, block, nb, block).any(axis=(1, 3))
        pairs = int(tiles.sum()) * block * block
    return 4 * head_dim * heads * pairs
