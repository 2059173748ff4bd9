"""Ahead-of-time memory check of the GRPO train step on an 8-device mesh (a v5e-8's shape).

The train step of `reflax.trainer` is lowered and compiled from abstract shapes only
(`jax.ShapeDtypeStruct`s carrying their `NamedSharding`s); no parameter is ever allocated.
`compiled.memory_analysis()` then gives the per-device bytes of the partitioned program:

  arguments  train state (f32 master weights + AdamW moments), KL reference params, batch
  outputs    new train state + metrics
  alias      outputs written in place of donated arguments (the state)
  temp       activations, gradients, optimizer temporaries
  code       generated code
  total      arguments + outputs - alias + temp + code

and the total is compared with a v5e's 16 GiB of HBM per chip. The devices here are fake
CPU devices (`--xla_force_host_platform_device_count=8`): the CPU compiler fuses, lays out
and schedules differently from the TPU compiler, so the figures are an *estimate* of the
TPU's, not a measurement of it.

Defaults: Qwen2-1.5B-Instruct's shape, float32 master weights, bfloat16 compute, per-layer
remat, AdamW, float32 KL reference params (as `reflax.train` keeps them: a copy of the
initial params), the paper's batch of 256 rows (32 groups x G=8) of 1024 tokens, the
trainer's default LM-head chunk (`StepConfig.logits_chunk`), micro_batches 8 and 16, and
the meshes fsdp=8, data=2 x fsdp=4 and fsdp=4 x tensor=2. For each mesh the smallest
micro_batches that fits is reported; the exit status is 0 when every mesh fits with one.
`--fast_compile` compiles with `FAST_COMPILE` (same buffer assignment, several times faster).
Run from the repository root:

    python experiments/aot_memory.py
    python experiments/aot_memory.py --model=qwen2p5_7b --mesh=fsdp=8 --micro_batches=16
    python experiments/aot_memory.py --mesh=fsdp=8 --seq_len=2048 --micro_batches=8,16,32
    python experiments/aot_memory.py --mesh=fsdp=8 --micro_batches=1,4,8 --ref_dtype=bfloat16

`compile_train_step` is the reusable part (tests/test_aot.py runs it on a tiny model).
"""

from __future__ import annotations

import os

# Fake devices must be requested before jax is imported (a no-op when it already was).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from reflax import optim  # noqa: E402
from reflax.models import ModelConfig, abstract_model  # noqa: E402
from reflax.sharding import make_mesh  # noqa: E402
from reflax.trainer import (  # noqa: E402
    Batch,
    StepConfig,
    TrainState,
    batch_shardings,
    jit_train_step,
    make_train_step,
    state_shardings,
)

GIB = 1024**3
V5E_HBM_BYTES = 16 * GIB

MODELS: dict[str, ModelConfig] = {
    # Qwen/Qwen2-1.5B-Instruct (and Qwen2.5-1.5B-Instruct: the same shape)
    "qwen1p5b": ModelConfig(
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
    ),
    # Qwen/Qwen2.5-7B-Instruct
    "qwen2p5_7b": ModelConfig(
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
    ),
    # Qwen/Qwen2.5-0.5B-Instruct
    "qwen2p5_0p5b": ModelConfig(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        qkv_bias=True,
        max_position_embeddings=32768,
    ),
}

DEFAULT_MESHES = ("fsdp=8", "data=2,fsdp=4", "fsdp=4,tensor=2")

# Compiler options that cut the CPU compile time several-fold without changing buffer
# assignment (LLVM optimisation level 0; classic fusion emitters). The memory figures agree
# with a default compile to within a few hundred bytes; the test uses these.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Per-device bytes of one compiled step (from `compiled.memory_analysis()`)."""

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
    args: tuple  # (state, batch, ref) ShapeDtypeStructs with their shardings
    lower_s: float
    compile_s: float

    def global_argument_bytes(self) -> int:
        """Bytes of all arguments, unsharded (what a single device would hold)."""
        return sum(_nbytes(x.shape, x.dtype) for x in jax.tree.leaves(self.args))

    def shard_argument_bytes(self) -> int:
        """Bytes of the arguments' shards on one device, from the shardings (the expectation)."""
        return sum(
            _nbytes(x.sharding.shard_shape(x.shape), x.dtype) for x in jax.tree.leaves(self.args)
        )


def _nbytes(shape: tuple[int, ...], dtype: Any) -> int:
    return math.prod(shape) * jnp.dtype(dtype).itemsize


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


def abstract_batch(batch_size: int, seq_len: int) -> Batch:
    sds = jax.ShapeDtypeStruct
    bt = (batch_size, seq_len)
    return Batch(
        tokens=sds(bt, jnp.int32),
        positions=sds(bt, jnp.int32),
        mask=sds(bt, jnp.bool_),
        loss_mask=sds(bt, jnp.float32),
        anchor_mask=sds(bt, jnp.float32),
        advantages=sds((batch_size,), jnp.float32),
        old_logprobs=sds(bt, jnp.float32),
    )


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
) -> AotResult:
    """Lower and compile `reflax.trainer`'s sharded train step from abstract shapes only.

    The step is built exactly as `reflax.train` builds it (`make_train_step` +
    `jit_train_step`, state donated); `ref_dtype=None` compiles it without KL reference
    params. `compiler_options` go to `Lowered.compile` (e.g. `FAST_COMPILE`). Returns the
    compiled step, its per-device memory and the abstract arguments.
    """
    graphdef, params = nnx.split(
        abstract_model(config, param_dtype=param_dtype, dtype=dtype, remat=remat)
    )
    tx, _ = optim.make_optimizer(total_steps=1000, learning_rate=5e-7, warmup_ratio=0.03)
    state = jax.eval_shape(
        lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
        params,
    )
    state = _with_sharding(state, state_shardings(state, mesh))
    batch = abstract_batch(batch_size, seq_len)
    batch = _with_sharding(batch, batch_shardings(batch, mesh))
    ref = None
    if ref_dtype is not None:
        ref = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, ref_dtype, sharding=x.sharding), state.params
        )
    step = make_train_step(graphdef, tx, step_config)
    fn = jit_train_step(step, state, batch, mesh, with_ref=ref is not None)
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        lowered = fn.lower(state, batch, ref)
        t1 = time.perf_counter()
        compiled = lowered.compile(compiler_options)
        t2 = time.perf_counter()
    return AotResult(compiled, MemoryReport.of(compiled), (state, batch, ref), t1 - t0, t2 - t1)


def _gib(n: int) -> str:
    return f"{n / GIB:8.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen1p5b", choices=sorted(MODELS))
    p.add_argument(
        "--mesh",
        action="append",
        help=f"data=..,fsdp=..,tensor=.. (repeatable; default: {' | '.join(DEFAULT_MESHES)})",
    )
    p.add_argument("--groups_per_step", type=int, default=32)
    p.add_argument("--group_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--micro_batches", default="8,16", help="comma-separated values to try")
    p.add_argument("--logits_chunk", type=int, default=StepConfig().logits_chunk)
    p.add_argument("--param_dtype", default="float32")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype")
    p.add_argument("--ref_dtype", default="float32", help="KL reference params; 'none': no KL")
    p.add_argument("--no_remat", action="store_true")
    p.add_argument("--budget_gib", type=float, default=16.0, help="per-device HBM (v5e: 16)")
    p.add_argument("--fast_compile", action="store_true", help="compile with FAST_COMPILE options")
    a = p.parse_args(argv)

    config = MODELS[a.model]
    batch_size = a.groups_per_step * a.group_size
    ref_dtype = None if a.ref_dtype.lower() == "none" else jnp.dtype(a.ref_dtype)
    budget = int(a.budget_gib * GIB)
    micro = [int(m) for m in a.micro_batches.split(",")]
    meshes = a.mesh or list(DEFAULT_MESHES)
    devices = jax.devices()
    print(
        f"model={a.model} params={config.num_params / 1e9:.3f}B  "
        f"param_dtype={a.param_dtype} compute={a.dtype} remat={not a.no_remat} "
        f"optimizer=AdamW(clip) ref_params={a.ref_dtype}"
    )
    print(
        f"batch={batch_size} rows ({a.groups_per_step} groups x G={a.group_size}) x "
        f"seq_len={a.seq_len}  logits_chunk={a.logits_chunk}  "
        f"devices={len(devices)} x {devices[0].platform}  budget={a.budget_gib:g} GiB/device"
    )
    print(
        "NOTE: memory_analysis() of the CPU compiler approximates a TPU's (different fusion, "
        "layout and scheduling): an estimate, not a TPU measurement."
    )
    header = (
        f"{'mesh':<22}{'micro':>6}{'rows/dev/mb':>12}{'args':>9}{'output':>9}{'alias':>9}"
        f"{'temp':>9}{'code':>9}{'total':>9}  {'compile':>8}  result   (GiB per device)"
    )
    print(header)
    print("-" * len(header))
    fits: dict[str, list[tuple[int, MemoryReport]]] = {}
    for mesh_spec in meshes:
        mesh = make_mesh(parse_mesh(mesh_spec), devices=devices)
        batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
        fits[mesh_spec] = []
        for m in micro:
            cfg = StepConfig(
                temperature=0.9,
                beta=0.0 if ref_dtype is None else 0.001,
                micro_batches=m,
                logits_chunk=a.logits_chunk,
            )
            res = compile_train_step(
                config,
                mesh,
                batch_size=batch_size,
                seq_len=a.seq_len,
                step_config=cfg,
                param_dtype=jnp.dtype(a.param_dtype),
                dtype=jnp.dtype(a.dtype),
                ref_dtype=ref_dtype,
                remat=not a.no_remat,
                compiler_options=FAST_COMPILE if a.fast_compile else None,
            )
            r = res.memory
            ok = r.total <= budget
            if ok:
                fits[mesh_spec].append((m, r))
            print(
                f"{mesh_spec:<22}{m:>6}{batch_size / batch_ways / m:>12g}{_gib(r.argument)} "
                f"{_gib(r.output)} {_gib(r.alias)} {_gib(r.temp)} {_gib(r.code)} "
                f"{_gib(r.total)}  {res.compile_s:7.1f}s  {'PASS' if ok else 'FAIL'}",
                flush=True,
            )
            print(
                f"{'':<22}bytes: args={r.argument} output={r.output} alias={r.alias} "
                f"temp={r.temp} code={r.code} total={r.total}; "
                f"unsharded args={res.global_argument_bytes()}",
                flush=True,
            )
    print()
    for mesh_spec, ok in fits.items():
        if ok:
            m, r = ok[0]
            print(
                f"PASS {mesh_spec}: fits {a.budget_gib:g} GiB/device with micro_batches={m} "
                f"({r.total / GIB:.2f} GiB/device)"
            )
        else:
            print(f"FAIL {mesh_spec}: no micro_batches in {micro} fits {a.budget_gib:g} GiB/device")
    return 0 if all(fits.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
