"""Ahead-of-time memory of a whole GRPO step, rollout and train step, on a TPU slice's mesh.

Every program a training step runs is lowered and compiled from abstract shapes only
(`jax.ShapeDtypeStruct`s carrying their `NamedSharding`s); no parameter, cache or batch is
ever allocated. `compiled.memory_analysis()` gives the per-device bytes of each
partitioned program (arguments, outputs, outputs aliased to donated arguments, temporaries,
code; total = arguments + outputs - alias + temp + code), and the weight copies the run
keeps alive around the programs are added to find the peak of each phase:

  rollout     the sampler's two programs of `reflax.episodes.reflect_and_retry`, built by
              a `Sampler` as `reflax.runtime` builds it (cache dtype and
              `rollout.kv_cache_bytes` from the config, resolved for the target platform):
              reflect  `Sampler.sample`: prefill the U failed attempts' prefixes (query,
                       attempt, reflection instruction: seq_len - max_reflection_tokens
                       slots), decode G reflections per prefix, keep the rows' cache
              retry    `Sampler.continue_rows`: every row's cache grown by the retry turn,
                       decode one retry per row (max_retry_tokens)
              A call whose KV cache exceeds `kv_cache_bytes` runs in chunks of whole
              groups: one chunk's program is compiled, and the caches the other chunks
              keep for the retry are added (they are alive until the retry ends).
  train step  `reflax.trainer`'s step on the largest batch layout `reflax.train`
              precompiles: packed groups (the default, `grpo.pack_groups`) of the
              longest prefix and suffix regions, or U*G rows of seq_len; micro-batched;
              arguments: train state (donated), batch, KL reference.

Weights alive during both phases (per device): the train state (master params and two
AdamW moments, sharded) and the KL reference in `grpo.ref_dtype` when the config has a KL
term (`reflax.train` casts the initial weights to it and keeps no other copy of them).
With LoRA (`lora.rank` > 0) the state holds the adapters and their moments, the frozen
base is the reference (held once, in `model.param_dtype`), and the sampler reads base +
adapters (no merged copy), as `reflax.train` builds them.
peak(rollout) = the largest program's total + the weights that are not its arguments +
the other chunks' kept caches; peak(train step) = the step's total (all weights are its
arguments). On TPU, "auto" attention is splash attention (train step and prefill) and
"auto" KV caches are bfloat16: both resolve for the slice compiled for, not the host.

Two compilers (`--backend`, default: tpu when libtpu is importable):

  tpu  the TPU compiler (libtpu; `pip install 'jax[tpu]'`, or `pip install --target DIR
       libtpu==0.0.42.*` and DIR on PYTHONPATH) for a slice that is only described
       (`jax.experimental.topologies`; no TPU needed): `--chip` and the mesh's size pick
       it (v5e-16: 16 chips; v4-32: 16 megacore chips). These are the TPU's own buffer
       assignments. A program that does not fit one chip's HBM by itself is refused by
       the compiler, which says how much it needs: reported as DOES NOT FIT.
  cpu  fake CPU devices (`--xla_force_host_platform_device_count`, from `--devices` or
       the mesh's size, set before jax is imported): the CPU compiler fuses, lays out and
       schedules differently and upcasts bfloat16 temporaries to float32, so its figures
       are a rough, high estimate. `--fast_compile` compiles with `FAST_COMPILE`.

One config on one slice, every term printed (`--set key=value` overrides a config key,
e.g. to try `grpo.micro_batches=16` or `rollout.kv_cache_bytes=2e9`):

    python experiments/aot_memory.py --config=qwen1p5b --chip=v5e --mesh=fsdp=8

The README's table (every paper config on the slices of `TABLE`; results appended to
`RESULTS`, rows chosen with `--rows=qwen7b@v5e-16,...`, a row's own overrides after its
config, `qwen7b:lora.rank=16@v5e-8`; `--print_table` prints the file):

    python experiments/aot_memory.py --table

`--flops=qwen1p5b@v5e-8` compiles one config's packed train step with the XLA attention
and with splash attention (`--impls`) and writes the compiler's cost analysis of each to
FLOPS, printing beside them the attention FLOPs each path computes for one packed row and
layer (`attention_flops`). XLA's cost analysis counts a loop's body once: the figures
are one layer of the layer scan in one micro-batch plus what lies outside the loops, not
a step's FLOPs. A TPU compile of a 7B program takes minutes on a CPU.
`compile_train_step`, `compile_rollout`, `weight_terms` and `measure` are the reusable
parts (tests/test_aot.py runs them on a tiny model).
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
# libtpu only compiles here (no TPU is attached): other processes may load it too
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import argparse  # noqa: E402
import ast  # noqa: E402
import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from experiments.aot_programs import (  # noqa: E402
    FAST_COMPILE,
    AotResult,
    MemoryReport,
    OutOfMemory,
    RolloutAot,
    RolloutShapes,
    WeightTerms,
    attention_flops,
    compile_rollout,
    compile_train_step,
    kv_cache_bytes,
    rollout_peak,
    tree_bytes,
    weight_terms,
)
from experiments.aot_slices import (  # noqa: E402
    CHIP_HBM_GIB,
    GIB,
    parse_slice,
    slice_name,
    tpu_devices,
)
from experiments.model_shapes import MODELS  # noqa: E402
from reflax.batch import PackLengths  # noqa: E402
from reflax.config import ref_dtype  # noqa: E402
from reflax.episodes import RolloutSettings, own_tokens_bound  # noqa: E402
from reflax.models import ModelConfig  # noqa: E402
from reflax.models.attention_kernels import Layout, block_size  # noqa: E402
from reflax.models.lora import LoraSpec  # noqa: E402
from reflax.sampler import resolve_cache_dtype  # noqa: E402
from reflax.sharding import make_mesh  # noqa: E402
from reflax.trainer import StepConfig  # noqa: E402

__all__ = [  # the compile layer, re-exported for one import
    "FAST_COMPILE",
    "AotResult",
    "MemoryReport",
    "OutOfMemory",
    "RolloutAot",
    "RolloutShapes",
    "WeightTerms",
    "attention_flops",
    "compile_rollout",
    "compile_train_step",
    "kv_cache_bytes",
    "rollout_peak",
    "tree_bytes",
    "weight_terms",
]

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "aot_memory.json"
FLOPS = REPO / "experiments" / "aot_flops.json"
# The README table: each paper config on the slices it is checked on (FSDP over every
# chip), full fine-tuning and with LoRA adapters (`parse_row`: config[:key=value...]@slice)
# LoRA on a v5e-8: rank 16 on every projection (the config's default targets), one packed
# group per chip per micro-batch, the rollout in calls of at most 1 GiB of KV cache a chip
LORA = "lora.rank=16:grpo.micro_batches=4:rollout.kv_cache_bytes=1073741824"
TABLE: tuple[str, ...] = (
    *(f"{c}@v5e-8" for c in ("qwen1p5b", "qwen2p5_1p5b", "qwen2p5_3b", "llama3p2_3b")),
    *(f"{c}@{s}" for s in ("v5e-16", "v5e-32") for c in ("qwen7b", "qwen2p5_7b", "llama3p1_8b")),
    *(f"{c}:{LORA}@v5e-8" for c in ("qwen7b", "qwen2p5_7b", "llama3p1_8b", "llama3p2_3b")),
    f"llama3p1_8b:{LORA}:rollout.retry_prefill=True@v5e-8",
    "llama3p2_3b@v5e-16",
    "llama3p1_8b:rollout.kv_cache_bytes=2147483648:rollout.retry_prefill=True@v5e-16",
)

DEFAULT_MESH = "fsdp=8"
# Tokens of the retry turn a continuation prefills: the reflection's closing template and
# the retry instruction's user turn (a few dozen tokens; one 64-slot prompt bucket).
RETRY_TURN_TOKENS = 64


def parse_mesh(spec: str) -> dict[str, int]:
    """ "data=2,fsdp=4" -> {"data": 2, "fsdp": 4} (missing axes are 1)."""
    out: dict[str, int] = {}
    for part in spec.split(","):
        name, _, size = part.partition("=")
        if not size:
            raise ValueError(f"mesh axis {part!r} is not name=size (in {spec!r})")
        out[name.strip()] = int(size)
    return out


def load_config(name: str, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """`get_config()` of configs/<name>.py (or of a path to a config file), with
    `key=value` overrides (a Python literal, else a string; `1e9` is read as an int)."""
    path = Path(name) if name.endswith(".py") else REPO / "configs" / f"{name}.py"
    if not path.exists():
        raise SystemExit(f"no config {name!r} ({path})")
    spec = importlib.util.spec_from_file_location(f"reflax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r} is not key=value")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        node, *_, leaf = [c, *key.split(".")]
        for part in key.split(".")[:-1]:
            node = node[part]
        old = node[leaf]
        node[leaf] = int(value) if isinstance(old, int) and isinstance(value, float) else value
    return c


@dataclasses.dataclass(frozen=True)
class StepShapes:
    """What a config fixes for the memory of one GRPO step on a platform."""

    model: ModelConfig
    param_dtype: Any
    dtype: Any
    cache_dtype: Any  # resolved for the platform
    ref_dtype: Any | None  # None: no KL term, no reference (LoRA: the base's, param_dtype)
    remat: bool
    rollout: RolloutShapes
    kv_cache_bytes: int
    train_rows: int  # rows of the train batch (groups when packed)
    train_slots: int  # slots per row
    packed: tuple[int, int] | None  # (prefix region, group size) of a packed row
    step: StepConfig
    adapters: LoraSpec | None = None  # `lora.rank` > 0: the run trains LoRA adapters
    retry_prefill: bool = False  # `rollout.retry_prefill`: no reflection cache kept

    @property
    def layout(self) -> str:
        if self.packed is None:
            return f"{self.train_rows} rows x {self.train_slots}"
        lp, g = self.packed
        return f"{self.train_rows} groups x [{lp} + {g} x {(self.train_slots - lp) // g}]"

    def compile_train_step(
        self,
        mesh: Mesh,
        model: ModelConfig | None = None,
        compiler_options: dict[str, Any] | None = None,
    ) -> AotResult | OutOfMemory:
        """The train step at these shapes (`model` in place of `self.model` if given)."""
        return compile_train_step(
            model or self.model,
            mesh,
            batch_size=self.train_rows,
            seq_len=self.train_slots,
            packed=self.packed,
            step_config=self.step,
            param_dtype=self.param_dtype,
            dtype=self.dtype,
            ref_dtype=self.ref_dtype,
            remat=self.remat,
            compiler_options=compiler_options,
            adapters=self.adapters,
        )


def step_shapes(c: Any, platform: str, unpacked: bool = False) -> StepShapes:
    """The shapes and dtypes a run config gives one step, as `reflax.train` builds them:
    the train batch is the largest layout it precompiles."""
    if c.model.path not in MODELS:
        raise SystemExit(f"no architecture for {c.model.path!r} in MODELS: add its shapes")
    r, g = c.rollout, c.grpo
    U, G, T = r.groups_per_step, r.group_size, r.seq_len
    dtype = jnp.dtype(c.model.dtype)
    with_ref = g.beta > 0 or g.anchor_beta > 0
    adapters = LoraSpec.from_config(c.lora)
    step = StepConfig.from_config(c)
    if not with_ref:
        step = dataclasses.replace(step, beta=0.0, anchor_beta=0.0)
    if g.pack_groups and not unpacked:
        settings = RolloutSettings(
            group_size=G,
            max_attempt_tokens=r.max_attempt_tokens,
            max_reflection_tokens=r.max_reflection_tokens,
            max_retry_tokens=r.max_retry_tokens,
            method=r.method,
        )
        ladder = PackLengths.coarse(T, own_tokens_bound(settings, T), g.pack_sizes)
        lp, ls = max(ladder.prefix), max(ladder.suffix)
        rows, slots, packed = U, lp + G * ls, (lp, G)
    else:
        rows, slots, packed = U * G, T, None
    return StepShapes(
        model=MODELS[c.model.path],
        param_dtype=jnp.dtype(c.model.param_dtype),
        dtype=dtype,
        cache_dtype=resolve_cache_dtype(r.cache_dtype, dtype, platform),
        ref_dtype=(
            jnp.dtype(c.model.param_dtype)
            if adapters
            else (jnp.dtype(ref_dtype(c)) if with_ref else None)
        ),
        remat=bool(c.model.remat),
        rollout=RolloutShapes(
            groups=U,
            group_size=G,
            prefix_len=T - r.max_reflection_tokens,
            max_reflection_tokens=r.max_reflection_tokens,
            retry_turn_len=RETRY_TURN_TOKENS,
            max_retry_tokens=r.max_retry_tokens,
        ),
        kv_cache_bytes=int(r.kv_cache_bytes),
        train_rows=rows,
        train_slots=slots,
        packed=packed,
        step=step,
        adapters=adapters,
        retry_prefill=bool(r.retry_prefill),
    )


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One config's step on one mesh: the weights, the compiled programs, the peaks."""

    weights: WeightTerms
    rollout: RolloutAot | None
    train: AotResult | OutOfMemory | None

    def peaks(self) -> dict[str, int | None]:
        """Per-device bytes of each phase measured (None: a program did not fit a chip)."""
        out: dict[str, int | None] = {}
        if self.rollout is not None:
            out["rollout"] = rollout_peak(self.rollout, self.weights)[1]
        if self.train is not None:
            out["train"] = None if isinstance(self.train, OutOfMemory) else self.train.memory.total
        return out


def measure(
    s: StepShapes,
    mesh: Mesh,
    *,
    rollout: bool = True,
    train: bool = True,
    compiler_options: dict[str, Any] | None = None,
) -> Measurement:
    """Compile a step's rollout and train step on `mesh` and size its weight copies."""
    kw = dict(param_dtype=s.param_dtype, dtype=s.dtype, adapters=s.adapters)
    weights = weight_terms(s.model, mesh, ref_dtype=s.ref_dtype, **kw)
    ro = None
    if rollout:
        ro = compile_rollout(
            s.model,
            mesh,
            s.rollout,
            cache_dtype=s.cache_dtype,
            kv_cache_bytes=s.kv_cache_bytes,
            compiler_options=compiler_options,
            retry_prefill=s.retry_prefill,
            **kw,
        )
    step = None
    if train:
        step = s.compile_train_step(mesh, compiler_options=compiler_options)
    return Measurement(weights, ro, step)


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


def print_measurement(s: StepShapes, m: Measurement, mesh: Mesh, budget: int) -> None:
    """Every term of one measurement, GiB per device."""
    w, shards = m.weights, mesh.shape["data"] * mesh.shape["fsdp"]
    lo = s.adapters
    trained = f"LoRA r={lo.rank} adapters" if lo else "params"
    print(_row(f"train state ({s.param_dtype.name} {trained} + 2 AdamW moments)", w.state))
    print(_row("policy params (read by sampler and train step)", w.params))
    ref = f"KL reference ({s.ref_dtype.name if s.ref_dtype else 'none'})"
    print(_row(ref, w.ref, "the frozen base" if lo else "initial params: no other copy kept"))
    print(_row(f"sampler's weights in {s.dtype.name}", w.views, "in the programs' temp"))
    header = (
        f"  {'program':<30}{'args':>7}{'output':>7}{'alias':>7}{'temp':>7}{'code':>7}"
        f"{'total':>7}  compile"
    )
    ro = m.rollout
    if ro is not None:
        rows = ro.reflect_rows
        kv = lambda n, t: kv_cache_bytes(s.model, n, t, s.cache_dtype, shards)
        print(
            f"  rollout: {ro.chunks} chunk(s) of {rows} rows (kv_cache_bytes="
            f"{s.kv_cache_bytes}), cache {s.cache_dtype.name}"
        )
        groups = rows // s.rollout.group_size
        print(
            _row(
                f"KV cache: reflect prefill [{groups}, {ro.reflect_prefix_slots}]",
                kv(groups, ro.reflect_prefix_slots),
            )
        )
        if ro.retry_prefill:  # nothing kept: the retry prefills each row's whole context
            print(
                _row(
                    f"KV cache: retry prefill [{ro.retry_rows}, {ro.retry_prefix_slots}]",
                    kv(ro.retry_rows, ro.retry_prefix_slots),
                    "rollout.retry_prefill: no reflection cache kept",
                )
            )
        else:
            slots = ro.reflect_cache.k.shape[2]
            print(
                _row(
                    f"KV cache: kept for retry [{rows}, {slots}]",
                    tree_bytes(ro.reflect_cache, shard=True),
                    f"x {ro.chunks} chunk(s)",
                )
            )
            print(
                _row(
                    f"KV cache: retry prefix [{rows}, {ro.retry_prefix_slots}]",
                    kv(rows, ro.retry_prefix_slots),
                    "retry temp",
                )
            )
        print(header)
        for name, res in ro.programs.items():
            print(_program_row(name, res))
        name, peak = rollout_peak(ro, w)
        fit = "DOES NOT FIT" if peak is None or peak > budget else "fits"
        print(_row(f"PEAK rollout ({name} + moments, reference, kept caches)", peak or 0, fit))
    if m.train is not None:
        print(f"  train batch {s.layout}, micro_batches={s.step.micro_batches}, remat={s.remat}")
        print(header)
        print(_program_row("train step", m.train))
        peak = m.peaks()["train"]
        fit = "DOES NOT FIT" if peak is None or peak > budget else "fits"
        print(_row("PEAK train step", peak or 0, fit))


def summary(
    name: str, slice_: str, c: Any, s: StepShapes, m: Measurement, budget: int, sets: list[str]
) -> dict:
    """One table row (GiB per device), as written to RESULTS."""
    peaks = m.peaks()
    gib = lambda n: None if n is None else round(n / GIB, 3)
    worst = None if None in peaks.values() else max(peaks.values())
    programs = {}
    for label, res in [*(m.rollout.programs.items() if m.rollout else ()), ("train", m.train)]:
        if res is not None:
            total = None if isinstance(res, OutOfMemory) else res.memory.total
            programs[label] = dict(total_gib=gib(total), compile_s=round(res.compile_s, 1))
    cost = None
    if isinstance(m.train, AotResult):
        cost = train_cost(m.train)
    return dict(
        config=name,
        slice=slice_,
        overrides=sets,  # --set key=value of the row (e.g. lora.rank=16)
        budget_gib=budget / GIB,
        settings=dict(
            micro_batches=c.grpo.micro_batches,
            remat=bool(c.model.remat),
            kv_cache_bytes=int(c.rollout.kv_cache_bytes),
            cache_dtype=s.cache_dtype.name,
            logits_bytes=int(c.grpo.logits_bytes),
            ref_dtype=s.ref_dtype.name if s.ref_dtype else None,
            train_layout=s.layout,
            chunks=m.rollout.chunks if m.rollout else None,
            lora_rank=s.adapters.rank if s.adapters else 0,
            retry_prefill=s.retry_prefill,
        ),
        state_gib=gib(m.weights.state),
        ref_gib=gib(m.weights.ref),
        programs=programs,
        rollout_peak_gib=gib(peaks.get("rollout")),
        train_peak_gib=gib(peaks.get("train")),
        train_cost=cost,  # the compiler's cost analysis of the train step, per device
        fits=worst is not None and worst <= budget,
        headroom=None if worst is None else round(1 - worst / budget, 3),
    )


def train_cost(res: AotResult) -> dict[str, float]:
    """FLOPs and bytes accessed of a compiled program, per device (`cost_analysis()`)."""
    cost = res.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {k: float(cost.get(k, 0.0)) for k in ("flops", "bytes accessed")}


def table_lines(rows: list[dict]) -> list[str]:
    """The README table of RESULTS rows, in TABLE's order (others after)."""
    spec = lambda r: ":".join([r["config"], *r.get("overrides", [])]) + "@" + r["slice"]
    rows = sorted(rows, key=lambda r: (TABLE + (spec(r),)).index(spec(r)))
    out = [
        "| config | slice | micro-batches | rollout chunks | rollout peak | train peak | fits "
        "(headroom) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        st = r["settings"]
        cell = lambda v: "does not fit a chip" if v is None else f"{v:.2f} GiB"
        fit = "no" if not r["fits"] else "yes"
        if r["headroom"] is not None:
            fit += f" ({100 * r['headroom']:.1f}%)"
        sets = r.get("overrides", [])
        lora_sets = LORA.split(":")
        if sets[: len(lora_sets)] == lora_sets:  # "+ LoRA", then the row's other settings
            name = ", ".join([f"{r['config']} + LoRA", *sets[len(lora_sets) :]])
        else:
            name = " ".join([r["config"], *sets])
        out.append(
            f"| {name} | {r['slice']} | {st['micro_batches']} | {st['chunks']} | "
            f"{cell(r['rollout_peak_gib'])} | {cell(r['train_peak_gib'])} | {fit} |"
        )
    return out


def _read_results(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def _devices(backend: str, chip: str, chips: int) -> list[Any]:
    return tpu_devices(chip, chips) if backend == "tpu" else jax.devices()[:chips]


def parse_row(spec: str) -> tuple[str, list[str], str]:
    """ "qwen7b:lora.rank=16@v5e-8" -> ("qwen7b", ["lora.rank=16"], "v5e-8")."""
    head, at, slice_ = spec.rpartition("@")
    if not at:
        raise SystemExit(f"table row {spec!r} is not config[:key=value...]@slice")
    name, *sets = head.split(":")
    return name, sets, slice_


def run_table(rows: list[str], backend: str, path: Path, overrides: list[str]) -> int:
    """Measure each row (`parse_row`) with FSDP over every chip; each row replaces its
    earlier result (same config, slice and overrides) in `path` once it is measured."""
    status = 0
    for spec in rows:
        name, sets, slice_ = parse_row(spec)
        sets = [*overrides, *sets]
        chip, chips = parse_slice(slice_)
        devices = _devices(backend, chip, chips)
        c = load_config(name, sets)
        s = step_shapes(c, devices[0].platform)
        mesh = make_mesh({"fsdp": chips}, devices=devices)
        budget = CHIP_HBM_GIB[chip] * GIB
        t0 = time.perf_counter()
        m = measure(s, mesh)
        row = summary(name, slice_, c, s, m, budget, sets)
        print(f"\n{spec} ({time.perf_counter() - t0:.0f} s)")
        print_measurement(s, m, mesh, budget)
        key = lambda r: (r["config"], r["slice"], r.get("overrides", []))
        done = [r for r in _read_results(path) if key(r) != key(row)]
        path.write_text(json.dumps([*done, row], indent=1) + "\n")
        status |= 0 if row["fits"] else 1
    return status


def run_flops(name: str, slice_: str, backend: str, overrides: list[str], impls: list[str]) -> None:
    """The packed train step of config `name` with each attention implementation of
    `impls` ("xla", "splash"): the compiler's cost analysis of each (written to FLOPS),
    and the attention FLOPs each path computes."""
    chip, chips = parse_slice(slice_)
    devices = _devices(backend, chip, chips)
    c = load_config(name, overrides)
    s = step_shapes(c, devices[0].platform)
    if s.packed is None:
        raise SystemExit(f"{name} does not pack its groups: --flops compares the packed step")
    mesh = make_mesh({"fsdp": chips}, devices=devices)
    lp, G = s.packed
    layout = Layout(lp, G, (s.train_slots - lp) // G)
    m = s.model
    print(f"{name} on {slice_}: packed step {s.layout}, {m.num_layers} layers, {m.num_heads} heads")
    print(f"  {'path':<8}{'cost_analysis flops':>22}{'bytes accessed':>18}{'compile':>9}")
    rows = _read_results(FLOPS)
    for impl in impls:
        res = s.compile_train_step(mesh, dataclasses.replace(m, attention_impl=impl))
        if isinstance(res, OutOfMemory):
            print(f"  {impl:<8}DOES NOT FIT: {res}")
            continue
        cost = train_cost(res)
        flops, nbytes = cost["flops"], cost["bytes accessed"]
        print(f"  {impl:<8}{flops:>22.4e}{nbytes:>18.4e}{res.compile_s:>8.0f}s")
        key = (name, slice_, impl)
        rows = [r for r in rows if (r["config"], r["slice"], r["impl"]) != key]
        rows.append(dict(config=name, slice=slice_, impl=impl, layout=s.layout, **cost))
        FLOPS.write_text(json.dumps(rows, indent=1) + "\n")
    block, _ = block_size(layout.length)
    exact = attention_flops(layout, m.num_heads, m.head_dim)
    tiles = attention_flops(layout, m.num_heads, m.head_dim, block)
    print(
        f"  attention forward FLOPs of one packed row and layer: allowed pairs {exact:.4e}, "
        f"splash tiles of {block} {tiles:.4e} ({tiles / exact:.2f}x the pairs)"
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
        "auto: tpu when libtpu is importable",
    )
    p.add_argument("--budget_gib", type=float, help="HBM per device (default: the chip's)")
    p.add_argument("--set", action="append", default=[], help="config override key=value")
    p.add_argument("--skip_rollout", action="store_true")
    p.add_argument("--skip_train", action="store_true")
    p.add_argument("--unpacked", action="store_true", help="train step on one row per sample")
    p.add_argument("--fast_compile", action="store_true", help="compile with FAST_COMPILE options")
    p.add_argument("--table", action="store_true", help="measure the README table's rows")
    p.add_argument("--rows", help="config[:key=value...]@slice,... (default: TABLE)")
    p.add_argument("--print_table", action="store_true", help="print RESULTS as the table")
    p.add_argument("--flops", help="config@slice: XLA vs splash cost of the packed step")
    p.add_argument("--impls", default="xla,splash", help="--flops: attention paths compiled")
    p.add_argument("--results", default=str(RESULTS), help="the table's results file")
    a = p.parse_args(argv)

    backend = a.backend
    if backend == "auto":
        backend = "tpu" if importlib.util.find_spec("libtpu") else "cpu"
    path = Path(a.results)
    if a.print_table:
        print("\n".join(table_lines(_read_results(path))))
        return 0
    if a.flops:
        run_flops(*a.flops.split("@"), backend, a.set, a.impls.split(","))
        return 0
    if a.table:
        rows = a.rows.split(",") if a.rows else list(TABLE)
        status = run_table(rows, backend, path, a.set)
        print("\n" + "\n".join(table_lines(_read_results(path))))
        return status

    c = load_config(a.config, a.set)
    options = FAST_COMPILE if a.fast_compile and backend == "cpu" else None
    chips = a.devices or _fake_device_count(sys.argv[1:] if argv is None else argv)
    devices = _devices(backend, a.chip, chips)
    s = step_shapes(c, devices[0].platform, unpacked=a.unpacked)
    budget = int((a.budget_gib or CHIP_HBM_GIB[a.chip]) * GIB)
    print(
        f"config={a.config} ({c.model.path}, {s.model.num_params / 1e9:.2f}B params)  "
        f"slice={slice_name(a.chip, len(devices))} ({budget / GIB:g} GiB/device)  "
        f"compiled for {len(devices)} x {devices[0].device_kind} ({backend} compiler)"
    )
    r = s.rollout
    print(
        f"params={s.param_dtype.name} compute={s.dtype.name} cache={s.cache_dtype.name} "
        f"remat={s.remat} KL reference={s.ref_dtype.name if s.ref_dtype else 'none'}  "
        f"U={r.groups} G={r.group_size} prefix={r.prefix_len} reflection="
        f"{r.max_reflection_tokens} retry turn={r.retry_turn_len} retry={r.max_retry_tokens}"
    )
    if backend == "cpu":
        print(
            "NOTE: memory_analysis() of the CPU compiler approximates a TPU's (different "
            "fusion, layout and scheduling; bfloat16 temporaries upcast to float32): an "
            "estimate, not a TPU's figures."
        )
    all_fit = True
    for spec in a.mesh or [DEFAULT_MESH]:
        mesh = make_mesh(parse_mesh(spec), devices=devices)
        print(f"\nmesh {spec}  (GiB per device)")
        m = measure(
            s, mesh, rollout=not a.skip_rollout, train=not a.skip_train, compiler_options=options
        )
        print_measurement(s, m, mesh, budget)
        peaks = m.peaks()
        ok = None not in peaks.values() and max(peaks.values(), default=0) <= budget
        all_fit &= ok
        if peaks and ok:
            peak = max(peaks.values())
            print(
                _row(
                    f"PEAK of the step ({a.chip}: {budget / GIB:g} GiB)",
                    peak,
                    f"{100 * peak / budget:.0f}%",
                )
            )
    return 0 if all_fit else 1


if __name__ == "__main__":
    sys.exit(main())
