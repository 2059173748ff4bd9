"""Ahead-of-time memory of a whole GRPO step, rollout and train step, on a TPU slice's mesh.

Every program a training step runs is lowered and compiled from abstract shapes only
(`jax.ShapeDtypeStruct`s carrying their `NamedSharding`s); no parameter, cache or batch is
ever allocated. `compiled.memory_analysis()` gives the per-device bytes of each
partitioned program (arguments, outputs, outputs aliased to donated arguments, temporaries,
code; total = arguments + outputs - alias + temp + code), and the weight copies the run
keeps alive around the programs are added to find the peak of each phase:

  rollout     the sampler's two programs of `reflax.episodes.reflect_and_retry`:
              reflect  `Sampler.sample`: prefill the U failed attempts' prefixes (query,
                       attempt, reflection instruction: seq_len - max_reflection_tokens
                       slots), decode G reflections per prefix, keep the [U*G]-row cache
              retry    `Sampler.continue_rows`: every row's cache grown by the retry turn,
                       decode one retry per row (max_retry_tokens)
              Their arguments hold the policy's params and (retry) the reflect program's
              cache; their temporaries hold the prefill's cache, the decode's cache,
              a compute-dtype copy of the weights and the logits.
  train step  `reflax.trainer`'s step over the U*G rows of seq_len tokens, micro-batched;
              arguments: train state (donated), batch, KL reference.

Weights alive during both phases (per device): the train state (master params and two
AdamW moments, sharded), the KL reference in `grpo.ref_dtype` when the config has a KL
term (`reflax.train` casts the initial weights to it and keeps no other copy of them).
peak(rollout) = max over its programs of (program total + the weights that are not its
arguments); peak(train step) = the step's total (all weights are its arguments).

The shapes come from a config file (`configs/<name>.py`: model, U, G, lengths, dtypes,
micro-batches, KL terms); the model's architecture from the table `MODELS` (no download).
Two compilers (`--backend`, default: tpu when libtpu is installed):

  tpu  the TPU compiler (libtpu, `pip install 'jax[tpu]'`) for a slice that is only
       described (`jax.experimental.topologies`; no TPU needed): `--chip` and the mesh's
       size pick it (v5e-16: 16 chips; v4-32: 16 megacore chips). These are the TPU's own
       buffer assignments. A program that does not fit one chip's HBM by itself is
       refused by the compiler, which says how much it needs: reported as DOES NOT FIT.
  cpu  fake CPU devices (`--xla_force_host_platform_device_count`, from `--devices` or
       the mesh's size, set before jax is imported): the CPU compiler fuses, lays out and
       schedules differently and upcasts bfloat16 temporaries to float32, so its figures
       are a rough, high estimate. `--fast_compile` compiles with `FAST_COMPILE`.

`--chip` also picks the HBM per chip (`CHIP_HBM_GIB`). The exit status is 0 when every
mesh fits with one of the micro-batch counts tried. Run from the repository root (a TPU
compile of a sampler program takes minutes on a CPU):

    python experiments/aot_memory.py --config=qwen1p5b --chip=v5e --mesh=fsdp=8
    python experiments/aot_memory.py --config=qwen7b --chip=v4 --mesh=fsdp=16 \\
        --micro_batches=4,8

Results at the configs' shapes (TPU compiler, GiB per device; state: f32 params + AdamW
moments; ref: the f32 KL reference; reflect, retry, train: the programs' totals; fits: both
peaks within the chip's HBM):

    config       slice (mesh)      mb  state   ref reflect  retry  train  rollout  train  fits
                                                                          peak     peak
    qwen1p5b     v5e-8 (fsdp=8)     8   2.16  0.72   6.20   9.74   8.91    11.90   8.91  yes
    qwen1p5b     v5e-8 (fsdp=8)     4   2.16  0.72   6.20   9.74  13.10    11.90  13.10  yes
    qwen7b       v5e-16 (fsdp=16)  16   5.32  1.77  14.41  15.52  16.57    20.84  16.57  no
    qwen7b       v5e-32 (fsdp=32)   4   2.66  0.89  13.59  14.13  11.37    16.79  11.37  no
    qwen7b       v4-16 (fsdp=8)     8  10.64  3.55  12.22  19.76  36.66    30.40  36.66  no
    qwen7b       v4-32 (fsdp=16)    4   5.32  1.77   6.57   9.98  22.56    15.31  22.56  yes
    qwen7b       v5p-8 (fsdp=4)     8  21.28  7.09  23.63  39.45  71.49    60.73  71.49  yes
    qwen2p5_7b   v4-32 (fsdp=16)    4   5.32  1.77   5.28   6.36  18.68    11.68  18.68  yes
    llama3p1_8b  v4-16 (fsdp=8)     8  11.22  3.74  19.70    oom    oom        -      -  no
    llama3p1_8b  v4-32 (fsdp=16)    4   5.61  1.87   9.44  19.35  22.17    24.96  22.17  yes

  (oom: the compiler's temporaries alone exceed the 30.75 GiB it allows a v4 chip; it
  allows 15.75 GiB of a v5e's 16. On v5e the decode loop's temporaries grow with the
  number of chips (reflect: 10.9 GiB on 16, 11.8 on 32 for Qwen2-7B; 3.0 on a v4-32),
  which points at all-gathered weights held across the loop (the CPU compiler's buffer
  assignment holds every layer's gathered weights there), so no v5e slice fits a 7B
  rollout as the decode is written now.)

`compile_train_step`, `compile_rollout` and `weight_terms` are the reusable parts
(tests/test_aot.py runs them on a tiny model).
"""

from __future__ import annotations

import os
import sys


def _fake_device_count(argv: list[str]) -> int:
    """--devices=N, else the size of the first --mesh, else 8."""
    devices, mesh = None, None
    for arg in argv:
        if arg.startswith("--devices="):
            devices = int(arg.split("=", 1)[1])
        elif arg.startswith("--mesh=") and mesh is None:
            sizes = [int(p.partition("=")[2] or 1) for p in arg.split("=", 1)[1].split(",")]
            mesh = 1
            for s in sizes:
                mesh *= max(s, 1)
    return devices or mesh or 8


# Fake devices must be requested before jax is imported (a no-op when it already was).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    _n = _fake_device_count(sys.argv[1:]) if __name__ == "__main__" else 8
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_n}"
    ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from reflax import optim  # noqa: E402
from reflax.batch import Batch, batch_shardings, bucket_lengths, fit_length  # noqa: E402
from reflax.models import ModelConfig, abstract_model  # noqa: E402
from reflax.sampler import (  # noqa: E402
    CachedRows,
    Sampler,
    bucket_size,
    kv_slot_bytes,
    resolve_cache_dtype,
)
from reflax.sharding import make_mesh, param_shardings  # noqa: E402
from reflax.trainer import (  # noqa: E402
    StepConfig,
    TrainState,
    jit_train_step,
    make_train_step,
    state_shardings,
)

GIB = 1024**3
CHIP_HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# chips -> topology of a slice (`jax.experimental.topologies` names); v4 and v5p chips are
# one megacore device each, and their slices are named by TensorCores (v4-32: 16 chips)
_TOPOLOGY_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16"}
_TOPOLOGY_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4"}
TOPOLOGIES = {"v4": _TOPOLOGY_3D, "v5e": _TOPOLOGY_2D, "v5p": _TOPOLOGY_3D, "v6e": _TOPOLOGY_2D}
CORES_PER_CHIP = {"v4": 2, "v5e": 1, "v5p": 2, "v6e": 1}
V5E_HBM_BYTES = CHIP_HBM_GIB["v5e"] * GIB
REPO = Path(__file__).resolve().parents[1]

_QWEN2_1P5B = ModelConfig(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_layers=28,
    num_heads=12,
    num_kv_heads=2,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
    qkv_bias=True,
    max_position_embeddings=32768,
)
_QWEN2_7B = ModelConfig(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_layers=28,
    num_heads=28,
    num_kv_heads=4,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=False,
    qkv_bias=True,
    max_position_embeddings=32768,
)
_LLAMA3_SCALING = (
    ("rope_type", "llama3"),
    ("factor", 8.0),  # 3.2-3B: 32.0 (no effect on shapes)
    ("low_freq_factor", 1.0),
    ("high_freq_factor", 4.0),
    ("original_max_position_embeddings", 8192),
)

# Hugging Face model id -> architecture (the shapes of each config.json; no download)
MODELS: dict[str, ModelConfig] = {
    "Qwen/Qwen2-1.5B-Instruct": _QWEN2_1P5B,
    "Qwen/Qwen2.5-1.5B-Instruct": _QWEN2_1P5B,
    "Qwen/Qwen2-7B-Instruct": _QWEN2_7B,
    "Qwen/Qwen2.5-7B-Instruct": _QWEN2_7B,
    "Qwen/Qwen2.5-0.5B-Instruct": ModelConfig(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        qkv_bias=True,
    ),
    "Qwen/Qwen2.5-3B-Instruct": ModelConfig(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=11008,
        num_layers=36,
        num_heads=16,
        num_kv_heads=2,
        head_dim=128,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        qkv_bias=True,
    ),
    "meta-llama/Llama-3.1-8B-Instruct": ModelConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_SCALING,
        tie_word_embeddings=False,
        max_position_embeddings=131072,
        model_type="llama",
    ),
    "meta-llama/Llama-3.2-3B-Instruct": ModelConfig(
        vocab_size=128256,
        hidden_size=3072,
        intermediate_size=8192,
        num_layers=28,
        num_heads=24,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_SCALING,
        tie_word_embeddings=True,
        max_position_embeddings=131072,
        model_type="llama",
    ),
}

DEFAULT_MESH = "fsdp=8"
# Tokens of the retry turn a continuation prefills: the reflection's closing template and
# the retry instruction's user turn (a few dozen tokens; one 64-slot prompt bucket).
RETRY_TURN_TOKENS = 64

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


def parse_mesh(spec: str) -> dict[str, int]:
    """ "data=2,fsdp=4" -> {"data": 2, "fsdp": 4} (missing axes are 1)."""
    out: dict[str, int] = {}
    for part in spec.split(","):
        name, _, size = part.partition("=")
        if not size:
            raise ValueError(f"mesh axis {part!r} is not name=size (in {spec!r})")
        out[name.strip()] = int(size)
    return out


def _with_sharding(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _as_dtype(tree: Any, dtype: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding), tree)


def abstract_params(config: ModelConfig, mesh: Mesh, **model_kwargs: Any) -> tuple[Any, Any]:
    """(graphdef, params as ShapeDtypeStructs with their shardings on the mesh)."""
    graphdef, params = nnx.split(abstract_model(config, **model_kwargs))
    return graphdef, _with_sharding(params, param_shardings(params, mesh))


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
) -> AotResult:
    """Lower and compile `reflax.trainer`'s sharded train step from abstract shapes only.

    The step is built exactly as `reflax.train` builds it (`make_train_step` +
    `jit_train_step`, state donated); `ref_dtype=None` compiles it without KL reference
    params. `packed=(prefix_len, group_size)`: `batch_size` group-packed rows of `seq_len`
    slots (`reflax.batch`). `compiler_options` go to `Lowered.compile` (e.g.
    `FAST_COMPILE`). Returns the compiled step, its per-device memory and the abstract
    (state, batch, ref).
    """
    graphdef, params = abstract_params(
        config, mesh, param_dtype=param_dtype, dtype=dtype, remat=remat
    )
    tx, state = abstract_state(params, mesh)
    batch = Batch.abstract(batch_size, seq_len, *(packed or ()))
    batch = _with_sharding(batch, batch_shardings(batch, mesh))
    ref = None if ref_dtype is None else _as_dtype(state.params, ref_dtype)
    step = make_train_step(graphdef, tx, step_config)
    fn = jit_train_step(step, state, batch, mesh, with_ref=ref is not None)
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
    reflect_cache: Any  # the [U*G]-row KVCache the reflect program returns (abstract)
    reflect_prefix_slots: int  # slots of the reflect program's prefill (a prompt bucket)
    retry_prefix_slots: int  # slots of the retry's prefix: kept cache + retry turn, bucketed

    @property
    def programs(self) -> dict[str, AotResult | OutOfMemory]:
        return {"reflect": self.reflect, "retry": self.retry}


def compile_rollout(
    config: ModelConfig,
    mesh: Mesh,
    shapes: RolloutShapes,
    *,
    param_dtype: Any = jnp.float32,
    dtype: Any = jnp.bfloat16,
    cache_dtype: Any = jnp.bfloat16,
    compiler_options: dict[str, Any] | None = None,
) -> RolloutAot:
    """Lower and compile the sampler's programs of one `reflect_and_retry` from abstract
    shapes: the policy's params (as the train state holds them) on the mesh, a `Sampler`
    built as `reflax.runtime.build` builds it, the reflect call (`sample`, G samples per
    prefix, cache kept) and the retry call (`continue_rows` of every row, one sample each)."""
    graphdef, params = abstract_params(config, mesh, param_dtype=param_dtype, dtype=dtype)
    sampler = Sampler(graphdef, mesh, cache_dtype=cache_dtype, compiler_options=compiler_options)
    sampler.config = config
    s = shapes
    t0 = time.perf_counter()
    lowered = sampler.lower(
        params,
        num_rows=s.groups,
        block_len=s.prefix_len,
        num_samples=s.group_size,
        max_new_tokens=s.max_reflection_tokens,
        keep_cache=True,
    )
    reflect = _compile(lowered, None, t0, (params,))
    outputs = abstract_outputs(lowered)
    cache = outputs["cache"]
    prev = CachedRows(
        cache=cache,
        seq_lens=np.zeros((s.rows,), np.int32),  # values do not change the program's shapes
        index=cache.k.shape[2],  # every slot used: each row ran to max_reflection_tokens
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
    turn = bucket_size(s.retry_turn_len, sampler.prompt_buckets)
    return RolloutAot(
        reflect,
        retry,
        cache,
        reflect_prefix_slots=bucket_size(s.prefix_len, sampler.prompt_buckets),
        retry_prefix_slots=bucket_size(prev.index + turn, sampler.cache_buckets),
    )


def kv_cache_bytes(config: ModelConfig, rows: int, slots: int, dtype: Any, shards: int = 1) -> int:
    """Keys and values of every layer for `rows` x `slots`, over `shards` batch shards."""
    return kv_slot_bytes(config, dtype) * slots * (rows // shards)


@dataclasses.dataclass(frozen=True)
class WeightTerms:
    """Per-device bytes of the weight copies a run keeps alive (from the shardings)."""

    state: int  # master params + AdamW moments + step
    params: int  # the master params (what the sampler and the train step read)
    ref: int  # the KL reference (0: no KL term)
    views: int  # the sampler's copy of the weights in the compute dtype (inside its temp)

    @property
    def resident(self) -> int:
        """Alive through the whole step: train state and reference."""
        return self.state + self.ref


def weight_terms(
    config: ModelConfig,
    mesh: Mesh,
    *,
    param_dtype: Any = jnp.float32,
    dtype: Any = jnp.bfloat16,
    ref_dtype: Any | None = jnp.float32,
) -> WeightTerms:
    _, params = abstract_params(config, mesh, param_dtype=param_dtype, dtype=dtype)
    _, state = abstract_state(params, mesh)
    ref = 0 if ref_dtype is None else tree_bytes(_as_dtype(params, ref_dtype), shard=True)
    return WeightTerms(
        state=tree_bytes(state, shard=True),
        params=tree_bytes(params, shard=True),
        ref=ref,
        views=tree_bytes(_as_dtype(params, dtype), shard=True),
    )


def rollout_peak(rollout: RolloutAot, weights: WeightTerms) -> tuple[str, int | None]:
    """(program, bytes) of the rollout's peak: a program's total plus the resident weights
    that are not its arguments (the sampler takes the master params only); bytes None when
    a program did not fit on its own."""
    for name, res in rollout.programs.items():
        if isinstance(res, OutOfMemory):
            return name, None
    others = weights.resident - weights.params
    name, res = max(rollout.programs.items(), key=lambda kv: kv[1].memory.total)
    return name, others + res.memory.total


def slice_name(chip: str, chips: int) -> str:
    """ "v5e", 16 -> "v5e-16"; "v4", 16 -> "v4-32" (v4 and v5p count TensorCores)."""
    return f"{chip}-{chips * CORES_PER_CHIP[chip]}"


def tpu_devices(chip: str, chips: int) -> list[Any]:
    """Described (not attached) TPU devices of a slice: the TPU compiler can compile for
    them without a TPU (needs libtpu: `pip install 'jax[tpu]'`)."""
    from jax.experimental import topologies

    if chips not in TOPOLOGIES[chip]:
        raise ValueError(f"no {chip} topology of {chips} chips; known: {sorted(TOPOLOGIES[chip])}")
    kwargs = {"chip_config_name": "megacore"} if CORES_PER_CHIP[chip] == 2 else {}
    name = f"{chip}:{TOPOLOGIES[chip][chips]}"
    return list(topologies.get_topology_desc(name, "tpu", **kwargs).devices)


def load_config(name: str) -> Any:
    """`get_config()` of configs/<name>.py (or of a path to a config file)."""
    path = Path(name) if name.endswith(".py") else REPO / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"reflax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _gib(n: int) -> str:
    return f"{n / GIB:7.3f}"


def _row(label: str, n: int, note: str = "") -> str:
    return f"  {label:<52}{_gib(n)}  {note}".rstrip()


def _program_row(label: str, res: AotResult | OutOfMemory) -> str:
    if isinstance(res, OutOfMemory):
        return f"  {label:<30}DOES NOT FIT: {res}  {res.compile_s:6.1f}s"
    m, compile_s = res.memory, res.compile_s
    return (
        f"  {label:<30}{_gib(m.argument)}{_gib(m.output)}{_gib(m.alias)}{_gib(m.temp)}"
        f"{_gib(m.code)}{_gib(m.total)}  {compile_s:6.1f}s"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="qwen1p5b", help="configs/<name>.py (or a path)")
    p.add_argument("--mesh", action="append", help=f"data=..,fsdp=..,tensor=.. ({DEFAULT_MESH})")
    p.add_argument("--devices", type=int, help="fake devices (default: the first mesh's size)")
    p.add_argument("--chip", default="v5e", choices=sorted(CHIP_HBM_GIB))
    p.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "tpu", "cpu"),
        help="tpu: the TPU compiler for a described slice (libtpu); cpu: fake CPU devices; "
        "auto: tpu when libtpu is installed",
    )
    p.add_argument("--budget_gib", type=float, help="HBM per device (default: the chip's)")
    p.add_argument("--micro_batches", help="comma-separated (default: the config's)")
    p.add_argument("--seq_len", type=int, help="train rows (default: the config's)")
    p.add_argument("--ref_dtype", help="KL reference params (default: the config's); 'none'")
    p.add_argument("--retry_turn_tokens", type=int, default=RETRY_TURN_TOKENS)
    p.add_argument("--skip_rollout", action="store_true")
    p.add_argument("--skip_train", action="store_true")
    p.add_argument("--unpacked", action="store_true", help="train step on one row per sample")
    p.add_argument("--fast_compile", action="store_true", help="compile with FAST_COMPILE options")
    a = p.parse_args(argv)

    c = load_config(a.config)
    if c.model.path not in MODELS:
        raise SystemExit(f"no architecture for {c.model.path!r} in MODELS: add its shapes")
    config = MODELS[c.model.path]
    r, g = c.rollout, c.grpo
    seq_len = a.seq_len or r.seq_len
    param_dtype, dtype = jnp.dtype(c.model.param_dtype), jnp.dtype(c.model.dtype)
    cache_dtype = resolve_cache_dtype(r.cache_dtype, dtype, platform="tpu")  # TPU programs
    with_ref = g.beta > 0 or g.anchor_beta > 0
    ref_name = a.ref_dtype or (g.get("ref_dtype", None) or c.model.param_dtype)
    ref_dtype = None if not with_ref or ref_name.lower() == "none" else jnp.dtype(ref_name)
    micro = [int(m) for m in (a.micro_batches or str(g.micro_batches)).split(",")]
    budget = int((a.budget_gib or CHIP_HBM_GIB[a.chip]) * GIB)
    shapes = RolloutShapes(
        groups=r.groups_per_step,
        group_size=r.group_size,
        prefix_len=seq_len - r.max_reflection_tokens,
        max_reflection_tokens=r.max_reflection_tokens,
        retry_turn_len=a.retry_turn_tokens,
        max_retry_tokens=r.max_retry_tokens,
    )
    backend = a.backend
    if backend == "auto":
        backend = "tpu" if importlib.util.find_spec("libtpu") else "cpu"
    options = FAST_COMPILE if a.fast_compile and backend == "cpu" else None
    devices = jax.devices()
    if backend == "tpu":
        devices = tpu_devices(a.chip, a.devices or _fake_device_count(sys.argv[1:]))
    print(
        f"config={a.config} ({c.model.path}, {config.num_params / 1e9:.2f}B params)  "
        f"slice={slice_name(a.chip, len(devices))} ({budget / GIB:g} GiB/device)  "
        f"compiled for {len(devices)} x {devices[0].device_kind} ({backend} compiler)"
    )
    print(
        f"params={param_dtype.name} compute={dtype.name} cache={cache_dtype.name} "
        f"remat={c.model.remat} AdamW  KL reference={ref_dtype.name if ref_dtype else 'none'}  "
        f"U={shapes.groups} G={shapes.group_size} prefix={shapes.prefix_len} "
        f"reflection={shapes.max_reflection_tokens} retry turn={shapes.retry_turn_len} "
        f"retry={shapes.max_retry_tokens} train rows={shapes.rows} x {seq_len}"
    )
    if backend == "cpu":
        print(
            "NOTE: memory_analysis() of the CPU compiler approximates a TPU's (different "
            "fusion, layout and scheduling; bfloat16 temporaries upcast to float32): an "
            "estimate, not a TPU's figures."
        )
    program_header = (
        f"  {'program':<30}{'args':>7}{'output':>7}{'alias':>7}{'temp':>7}{'code':>7}"
        f"{'total':>7}  compile"
    )
    all_fit = True
    for spec in a.mesh or [DEFAULT_MESH]:
        mesh = make_mesh(parse_mesh(spec), devices=devices)
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        w = weight_terms(config, mesh, param_dtype=param_dtype, dtype=dtype, ref_dtype=ref_dtype)
        print(f"\nmesh {spec}  (GiB per device)")
        print(_row(f"train state ({param_dtype.name} params + 2 AdamW moments)", w.state))
        print(_row("  of which params (read by sampler and train step)", w.params))
        ref_label = f"KL reference ({ref_dtype.name})" if ref_dtype else "KL reference (none)"
        print(_row(ref_label, w.ref))
        print(_row("initial params copy", 0, "none kept (the reference is cast from it)"))
        print(_row(f"sampler weight views ({dtype.name})", w.views, "in the programs' temp"))
        peaks: dict[str, int] = {}
        mesh_fit = True
        if not a.skip_rollout:
            ro = compile_rollout(
                config,
                mesh,
                shapes,
                param_dtype=param_dtype,
                dtype=dtype,
                cache_dtype=cache_dtype,
                compiler_options=options,
            )
            reflect_slots = ro.reflect_cache.k.shape[2]
            kv = lambda rows, slots, n=shards: kv_cache_bytes(config, rows, slots, cache_dtype, n)
            gen_slots = reflect_slots - ro.reflect_prefix_slots
            print(
                _row(
                    f"KV cache: reflect prefill [U={shapes.groups}, {ro.reflect_prefix_slots}]",
                    kv(shapes.groups, ro.reflect_prefix_slots),
                    "reflect temp",
                )
            )
            print(
                _row(
                    f"KV cache: reflections [B={shapes.rows}, {gen_slots}] new slots",
                    kv(shapes.rows, gen_slots),
                    "reflect temp",
                )
            )
            print(
                _row(
                    f"KV cache: kept for retry [B={shapes.rows}, {reflect_slots}]",
                    tree_bytes(ro.reflect_cache, shard=True),
                    "reflect output, retry argument",
                )
            )
            print(
                _row(
                    f"KV cache: retry prefix [B={shapes.rows}, {ro.retry_prefix_slots}]",
                    kv(shapes.rows, ro.retry_prefix_slots),
                    "retry temp",
                )
            )
            print(program_header)
            for name, res in ro.programs.items():
                print(_program_row(name, res), flush=True)
            name, peak = rollout_peak(ro, w)
            if peak is None:
                mesh_fit = False
                print(f"  PEAK rollout: {name} alone exceeds a chip; DOES NOT FIT", flush=True)
            else:
                peaks["rollout"] = peak
                print(
                    _row(
                        f"PEAK rollout ({name} + opt moments + reference)",
                        peak,
                        "FITS" if peak <= budget else "DOES NOT FIT",
                    ),
                    flush=True,
                )
        if not a.skip_train:
            if g.pack_groups and not a.unpacked:  # reflax.batch's layout of the widest rows
                ladder = bucket_lengths(seq_len)
                prefix = fit_length(seq_len - r.max_reflection_tokens, ladder)
                suffix = fit_length(r.max_reflection_tokens, ladder)
                rows, slots = shapes.groups, prefix + shapes.group_size * suffix
                packed = (prefix, shapes.group_size)
                layout = f"packed: {rows} groups x [{prefix} + {shapes.group_size} x {suffix}]"
            else:
                rows, slots, packed = shapes.rows, seq_len, None
                layout = f"unpacked: {rows} rows x {seq_len}"
            print(f"  train batch {layout}")
            print(program_header)
            fitting = []
            for m in micro:
                cfg = StepConfig(
                    temperature=r.temperature,
                    beta=g.beta if ref_dtype is not None else 0.0,
                    anchor_beta=g.anchor_beta if ref_dtype is not None else 0.0,
                    loss_type=g.loss_type,
                    max_len=seq_len,
                    micro_batches=m,
                    logits_chunk=g.logits_chunk,
                )
                if rows % m:
                    print(f"  train step mb={m}: {rows} rows do not split in {m}; skipped")
                    continue
                res = compile_train_step(
                    config,
                    mesh,
                    batch_size=rows,
                    seq_len=slots,
                    packed=packed,
                    step_config=cfg,
                    param_dtype=param_dtype,
                    dtype=dtype,
                    ref_dtype=ref_dtype,
                    remat=c.model.remat,
                    compiler_options=options,
                )
                label = f"train step mb={m} ({max(rows // shards // m, 1)} rows/dev)"
                print(_program_row(label, res), flush=True)
                if isinstance(res, AotResult) and res.memory.total <= budget:
                    fitting.append((m, res.memory.total))
            if fitting:
                m, total = fitting[0]
                peaks["train"] = total
                print(_row(f"PEAK train step (smallest fitting: micro_batches={m})", total, "FITS"))
            else:
                mesh_fit = False
                print(f"  PEAK train step: no micro_batches in {micro} fits; DOES NOT FIT")
        if peaks:
            peak = max(peaks.values())
            ok = mesh_fit and peak <= budget
            mesh_fit = ok
            print(
                _row(
                    f"PEAK of the step ({a.chip}: {budget / GIB:g} GiB)",
                    peak,
                    f"{'FITS' if ok else 'DOES NOT FIT'} ({100 * peak / budget:.0f}%)",
                )
            )
        all_fit &= mesh_fit
    return 0 if all_fit else 1


if __name__ == "__main__":
    sys.exit(main())
