"""Accelerator benchmark: reflax train step (packed, unpacked) and sampler at Qwen2.5-1.5B shapes.

One prepared run for a single GPU (an H200 by default), jax with CUDA and torch installed,
under 10 minutes in total. The model has Qwen2.5-1.5B's shapes (hidden 1536, intermediate
8960, 28 layers, 12 heads, 2 KV heads, head_dim 128, vocab 151936, tied embeddings, q/k/v
biases, rope_theta 1e6) and random weights in bfloat16, built in code (nothing is
downloaded), saved once with `save_pretrained` and loaded by every worker.

  (a) train: the Reflect-Retry-Reward step at the paper's shapes: 32 groups x G = 8 rows,
      each group's rows sharing a 600-token prefix, then a reflection of 64..256 tokens
      (uniform, fixed seed; the loss tokens), right-padded to 896 tokens; beta 0.001 (a
      reference forward on a frozen copy of the initial weights), temperature 0.9,
      epsilon 0.2, AdamW lr 1e-5, clipping at 1.0, token-mean; each layer rematerialised.
      reflax packed (`reflax.batch.pack_groups`, default length ladder) and unpacked,
      and transformers + torch (SDPA, unpacked, gradient checkpointing, no-grad reference
      forward), each scanning / looping over micro-batches to fit. The step is
      `bench_train_step`'s W4 step at these shapes.
  (b) sampler: 64 groups x G = 8 rows x 256 new tokens after 512-token prefixes, temperature
      1.0: reflax's Sampler with prefix sharing against transformers' `generate`
      (num_return_sequences = 8).

Every implementation runs in its own process (`bench_common`); a worker's figure is the
median of its timed calls. MFU is against the chip's dense bf16 peak (`--peak_tflops`,
989 for an H200 SXM) and counts, for all three train steps, the model FLOPs of the unpacked
256 x 896 batch (`bench_train_step.model_flops` with the reference forward): the packed
step is credited with the work the plain step has to do, so its MFU may exceed what its own
arithmetic reaches, and MFU ratios equal step-time ratios. The float32 2048^3 matmul probe
of each worker is printed beside its figure (on a GPU, jax's default float32 matmul
precision may use TF32 where torch's does not, so there the two probes are not alike).

    python experiments/bench_accelerator.py [--peak_tflops 989]
    python experiments/bench_accelerator.py --tiny --allow_load   # tiny shapes, on a CPU

The last line is `accel: packed_mfu=<> unpacked_mfu=<> packed_vs_torch=<> sampler_tok_s=<>
sampler_vs_generate=<>` (torch step time over packed step time; reflax sampler new tokens per
second and its ratio to `generate`'s).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from experiments import bench_common as bc  # noqa: E402
from experiments import bench_sampler as bs  # noqa: E402
from experiments import bench_train_step as bt  # noqa: E402

QWEN25_1P5B = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    head_dim=128,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
TINY = dict(bc.TINY_MODEL, rope_theta=1000000.0, rms_norm_eps=1e-6)

# shapes: (full, tiny)
SHAPES = {
    "groups": (32, 2),
    "group_size": (8, 4),
    "prefix": (600, 24),
    "refl": ((64, 256), (4, 16)),
    "seq": (896, 48),
    "micro_packed": (4, 1),  # micro-batches of the packed step (of 32 group rows)
    "micro_unpacked": (8, 2),  # micro-batches of the unpacked step (of 256 rows)
    "torch_micro_rows": (8, 4),  # rows per torch forward/backward (f32 logits: 8 x 896 x V)
    "s_groups": (64, 2),
    "s_prefix": (512, 16),
    "s_new": (256, 8),
}

IMPLS = (
    bc.Impl("train reflax packed", "reflax_packed", "jax"),
    bc.Impl("train reflax unpacked", "reflax_unpacked", "jax"),
    bc.Impl("train torch", "torch_train", "torch"),
    bc.Impl("sampler reflax", "reflax_sampler", "jax"),
    bc.Impl("sampler transformers", "torch_generate", "torch"),
)


def shapes(tiny: bool) -> dict[str, Any]:
    return {k: v[1] if tiny else v[0] for k, v in SHAPES.items()}


def sampler_prompts(s: dict[str, Any], vocab: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(1, vocab, (s["s_groups"], s["s_prefix"]))


def worker(a: argparse.Namespace) -> int:
    s = shapes(a.tiny)
    ckpt = os.path.join(a.workdir, "model")
    data = np.load(os.path.join(a.workdir, "batch.npz"))
    hb = {k: data[k] for k in data}
    dtype = "float32" if a.tiny else "bfloat16"
    train = dict(steps=a.steps, warmup=a.warmup, dtype=dtype)
    rx = dict(beta=bt.W4_BETA, group_size=s["group_size"], logits_chunk=128, remat=True, **train)
    prompts = sampler_prompts(s, (TINY if a.tiny else QWEN25_1P5B)["vocab_size"])
    g, new = s["group_size"], s["s_new"]
    # buckets that fit the prompts and the new tokens exactly
    buckets = dict(prompt_buckets=s["s_prefix"], gen_buckets=new, cache_buckets=s["s_prefix"])
    bodies = {
        "reflax_packed": lambda: bt.reflax_train_worker(
            ckpt, hb, packed=True, micro_batches=s["micro_packed"], **rx
        ),
        "reflax_unpacked": lambda: bt.reflax_train_worker(
            ckpt, hb, packed=False, micro_batches=s["micro_unpacked"], **rx
        ),
        "torch_train": lambda: bt.torch_train_worker(
            ckpt, hb, beta=bt.W4_BETA, micro_rows=s["torch_micro_rows"], remat=True, **train
        ),
        "reflax_sampler": lambda: bs.reflax_worker(
            ckpt, prompts, new, g, True, a.reps, dtype=dtype, **buckets
        ),
        "torch_generate": lambda: bs.torch_worker(ckpt, prompts, new, g, a.reps, dtype=dtype),
    }
    framework = "torch" if a.worker.startswith("torch") else "jax"
    return bc.run_worker(framework, bodies[a.worker])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bc.add_harness_args(p, rounds=1)
    p.add_argument("--tiny", action="store_true", help="tiny shapes in float32, for a CPU")
    p.add_argument("--steps", type=int, default=2, help="timed train steps per process")
    p.add_argument("--warmup", type=int, default=0, help="untimed steps after the first")
    p.add_argument("--reps", type=int, default=2, help="timed sampler calls per process")
    p.add_argument(
        "--peak_tflops", type=float, default=989.0, help="the chip's dense bf16 peak (TFLOP/s)"
    )
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)

    loaded = bc.check_load(a.max_load, a.allow_load)
    bc.parent_on_cpu()
    s = shapes(a.tiny)
    cfg = TINY if a.tiny else QWEN25_1P5B
    dtype = "float32" if a.tiny else "bfloat16"
    bc.header(f"{'tiny model' if a.tiny else 'Qwen2.5-1.5B shapes'}, {dtype}")
    impls = bc.selected(IMPLS, a.only)
    hb = bt.rrr_batch(
        a.seed,
        s["groups"],
        s["group_size"],
        s["seq"],
        s["prefix"],
        s["refl"],
        cfg["vocab_size"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        bt.random_model(cfg, a.seed, dtype).save_pretrained(os.path.join(tmp, "model"))
        np.savez(os.path.join(tmp, "batch.npz"), **hb)
        rounds = bc.run_rounds(__file__, impls, a.rounds, bc.parent_argv(argv), tmp)

    rows_n = s["groups"] * s["group_size"]
    train_flops = bt.model_flops(cfg, rows_n, s["seq"], reference=True)
    sampler_rows = s["s_groups"] * s["group_size"]
    names = {i.name for i in impls}
    r0 = rounds[0]
    print(
        f"\ntrain: {rows_n} rows x {s['seq']} tokens ({s['groups']} groups x "
        f"{s['group_size']}, prefix {s['prefix']}, reflections {s['refl'][0]}..{s['refl'][1]}),"
        f" model FLOPs per step {train_flops / 1e12:.2f} T (the unpacked count)"
    )
    for i in impls:
        r = r0[i.name]
        extra = ""
        if "compile_s" in r:
            extra = f", compile {r['compile_s']:.1f} s"
        if "warm_s" in r:
            extra = f", warm-up call {r['warm_s']:.1f} s"
        print(
            f"  {i.name}: on {r['device']}"
            + (f", {r['rows']} rows x {r['length']}" if "rows" in r else "")
            + (f" (prefix {r['prefix_len']})" if "prefix_len" in r else "")
            + extra
        )

    ok = True
    firsts = {n: r0[n]["first"] for n in sorted(names) if n.startswith("train")}
    if len(firsts) > 1:
        print("\nfirst step (same weights, same batch):")
        ok = bt.agreement(firsts, hb, dtype)

    peak = a.peak_tflops * 1e12
    flag = " (loaded)" if loaded else ""
    table = []
    res: dict[str, Any] = {}
    for i in impls:
        t = bc.Summary.of([bc.step_time(r[i.name]) for r in rounds])
        probe = bc.Summary.of(
            [max(r[i.name]["probe_before"], r[i.name]["probe_after"]) / 1e9 for r in rounds]
        )
        if i.name.startswith("train"):
            figure = train_flops / t.median / peak
            res[i.name] = figure
            shown = f"MFU {figure:.3g}"
        else:
            figure = sampler_rows * s["s_new"] / t.median
            res[i.name] = figure
            shown = f"{figure:.0f} new tokens/s"
        table.append([i.name, t.fmt() + flag, shown + flag, f"{probe.fmt('.0f')} ({i.framework})"])
    print()
    bc.print_table(["implementation", "s per call", "figure", "fp32 matmul probe GFLOP/s"], table)
    print(f"MFU against {a.peak_tflops:g} TFLOP/s dense bf16; agree={ok}{flag}")

    def get(name: str) -> float:
        return res.get(name, float("nan"))

    vs_torch = (
        bc.ratio(rounds, "train torch", "train reflax packed").median
        if {"train torch", "train reflax packed"} <= names
        else float("nan")
    )
    print(
        f"accel: packed_mfu={get('train reflax packed'):.4g} "
        f"unpacked_mfu={get('train reflax unpacked'):.4g} packed_vs_torch={vs_torch:.2f} "
        f"sampler_tok_s={get('sampler reflax'):.0f} "
        f"sampler_vs_generate={get('sampler reflax') / get('sampler transformers'):.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
