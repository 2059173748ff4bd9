"""Sampler throughput: reflax's jitted rollout engine against transformers' `generate`.

Both run the same random "bench" model (Qwen2 architecture, vocab 8192, hidden 512,
intermediate 1408, 4 layers, 8 heads, 2 KV heads, head_dim 64, tied embeddings, float32):
the torch model is created under a fixed seed and saved (`save_pretrained`); every worker
loads that checkpoint (reflax through `reflax.models.hf.load_pretrained`, transformers
through `from_pretrained`).

W1: 32 prompts of 64 tokens, exactly 64 new tokens each, temperature 1.0.
W2: 4 prompts of 512 tokens, 8 samples each, exactly 32 new tokens
    (transformers: num_return_sequences=8; reflax with prefix sharing on and off).

Each implementation of each workload runs in its own process (`bench_common`: rounds of
fresh processes, the order rotated per round, a float32 2048^3 matmul probe in the worker's
framework before and after). A worker makes one warm-up call (reflax's compile time is
reported apart), then --reps timed calls; its figure is their median. The table gives the
median [min, max] over rounds; the ratios are taken within each round (transformers time /
reflax time), then their median over rounds.

FLOPs (forward only; the work the generation needs at least: each prompt's prefill once,
then every row's new tokens, each attending to its prompt and its earlier tokens; the same
count for every implementation of a workload, so W2 without prefix sharing, which prefills
each prompt 8 times, does more arithmetic than is counted):

  per token  2 * (dense + D*V)                      (dense as in bench_train_step)
  attention  4 * L * H * Dh * (keys the token attends to)
  W1         32 x 64 prompt tokens, then 32 rows x 64 new tokens; a decode step at batch 32
             is ~1 GFLOP.

For W1 the achieved GFLOP/s is set against the matmul probes of its round: how near reflax's
decode loop comes to what this processor does at its best (a batch-32 decode step is a
chain of skinny matmuls, so it cannot reach the big matmul's rate).

    python experiments/bench_sampler.py [--rounds 3] [--reps 3]

The last line is `W1_ratio=<x> W2_ratio=<y>` (transformers time over reflax time, W2 with
prefix sharing; medians over rounds).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from experiments import bench_common as bc  # noqa: E402

SEED = 0
BENCH = dict(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    max_position_embeddings=2048,
    torch_dtype="float32",
)
W1 = dict(prompts=32, prompt_len=64, new=64, samples=1)
W2 = dict(prompts=4, prompt_len=512, new=32, samples=8)

IMPLS = (
    bc.Impl("W1 reflax", "reflax_w1", "jax"),
    bc.Impl("W1 transformers", "torch_w1", "torch"),
    bc.Impl("W2 reflax (shared prefix)", "reflax_w2_shared", "jax"),
    bc.Impl("W2 reflax (no sharing)", "reflax_w2_noshare", "jax"),
    bc.Impl("W2 transformers", "torch_w2", "torch"),
)


def bench_hf_model():
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(SEED)
    return Qwen2ForCausalLM(Qwen2Config(**BENCH)).eval()


def prompts_of(w: dict[str, int]) -> np.ndarray:
    """The workload's prompts [N, P] (a fixed seed per workload)."""
    rng = np.random.default_rng(SEED + w["prompt_len"])
    return rng.integers(1, BENCH["vocab_size"], (w["prompts"], w["prompt_len"]))


def generate_flops(c: dict[str, Any], prompts: int, samples: int, prompt: int, new: int) -> float:
    """Forward model FLOPs of prefilling `prompts` prompts of `prompt` tokens once, then
    generating `new` tokens in each of `samples` rows per prompt (the module docstring);
    `c` holds transformers' Qwen2 config names."""
    weights, pair = bc.macs(c)
    per_token = 2.0 * weights
    per_key = 4.0 * pair
    # token t (0-based) of a row attends to t + 1 keys
    prefill = prompt * per_token + per_key * prompt * (prompt + 1) / 2
    total = prompt + new
    decode = new * per_token + per_key * (total * (total + 1) - prompt * (prompt + 1)) / 2
    return prompts * prefill + prompts * samples * decode


# ----------------------------------------------------------------------------- workers


def reflax_worker(
    ckpt: str,
    prompts: np.ndarray,
    new: int,
    samples: int,
    share: bool,
    reps: int,
    *,
    dtype: str = "float32",
    prompt_buckets: int = 64,
    gen_buckets: int = 32,
    cache_buckets: int = 128,
) -> dict[str, Any]:
    """Load the checkpoint, one warm-up call (compiles), `reps` timed calls of the Sampler."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from reflax.models.hf import load_pretrained
    from reflax.sampler import Sampler
    from reflax.sampling import SamplingSpec

    dt = jnp.dtype(dtype)
    model = load_pretrained(ckpt, param_dtype=dt, dtype=dt)
    state = nnx.state(model)
    sampler = Sampler(
        model,
        cache_dtype=dt,
        prompt_buckets=prompt_buckets,
        gen_buckets=gen_buckets,
        cache_buckets=cache_buckets,
    )
    rows = prompts.tolist()
    calls = iter(range(1 << 30))

    def call() -> None:
        out = sampler.sample(
            state,
            rows,
            SamplingSpec(temperature=1.0),
            max_new_tokens=new,
            rng=next(calls),
            num_samples=samples,
            share_prefix=share,
        )
        assert out.tokens.shape == (len(rows) * samples, new)
        assert (out.lengths == new).all()

    t0 = time.perf_counter()
    call()
    warm = time.perf_counter() - t0
    times = bc.time_calls(call, reps)
    return dict(
        times=times,
        warm_s=warm,
        compiled=sampler.num_compilations,
        device=jax.devices()[0].device_kind,
    )


def hf_generate(hf, prompts: np.ndarray, new: int, samples: int) -> np.ndarray:
    import torch

    with torch.inference_mode():
        out = hf.generate(
            input_ids=torch.from_numpy(prompts).long().to(hf.device),
            attention_mask=torch.ones(prompts.shape, dtype=torch.long, device=hf.device),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=new,
            min_new_tokens=new,
            num_return_sequences=samples,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert out.shape == (prompts.shape[0] * samples, prompts.shape[1] + new)
    return out.cpu().numpy()  # the copy to the host waits for the device


def torch_worker(
    ckpt: str, prompts: np.ndarray, new: int, samples: int, reps: int, dtype: str = "float32"
) -> dict[str, Any]:
    """Load the checkpoint, one warm-up call, `reps` timed calls of `generate`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hf = AutoModelForCausalLM.from_pretrained(
        ckpt, torch_dtype=getattr(torch, dtype), attn_implementation="sdpa"
    )
    hf = hf.to(dev).eval()
    call = lambda: hf_generate(hf, prompts, new, samples)
    t0 = time.perf_counter()
    call()
    warm = time.perf_counter() - t0
    times = bc.time_calls(call, reps)
    return dict(
        times=times,
        warm_s=warm,
        threads=torch.get_num_threads(),
        device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
    )


def worker(a: argparse.Namespace) -> int:
    ckpt = os.path.join(a.workdir, "model")
    p1, p2 = prompts_of(W1), prompts_of(W2)
    bodies = {
        "reflax_w1": lambda: reflax_worker(ckpt, p1, W1["new"], 1, True, a.reps),
        "torch_w1": lambda: torch_worker(ckpt, p1, W1["new"], 1, a.reps),
        "reflax_w2_shared": lambda: reflax_worker(ckpt, p2, W2["new"], 8, True, a.reps),
        "reflax_w2_noshare": lambda: reflax_worker(ckpt, p2, W2["new"], 8, False, a.reps),
        "torch_w2": lambda: torch_worker(ckpt, p2, W2["new"], 8, a.reps),
    }
    framework = "torch" if a.worker.startswith("torch") else "jax"
    return bc.run_worker(framework, bodies[a.worker])


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bc.add_harness_args(p, rounds=3)
    p.add_argument("--reps", type=int, default=3, help="timed calls per process")
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)

    loaded = bc.check_load(a.max_load, a.allow_load)
    bc.parent_on_cpu()
    bc.header("bench model, float32")
    impls = bc.selected(IMPLS, a.only)
    with tempfile.TemporaryDirectory() as tmp:
        bench_hf_model().save_pretrained(os.path.join(tmp, "model"))
        rounds = bc.run_rounds(__file__, impls, a.rounds, bc.parent_argv(argv), tmp)

    def workload(name: str) -> dict[str, int]:
        return W1 if name.startswith("W1") else W2

    flops, tokens = {}, {}
    for i in impls:
        w = workload(i.name)
        flops[i.name] = generate_flops(BENCH, w["prompts"], w["samples"], w["prompt_len"], w["new"])
        tokens[i.name] = w["prompts"] * w["samples"] * w["new"]
    print()
    for i in impls:
        r0 = rounds[0][i.name]
        extra = f", {r0['compiled']} programs compiled" if "compiled" in r0 else ""
        warm = bc.Summary.of([res[i.name]["warm_s"] for res in rounds])
        print(f"  {i.name}: warm-up call {warm.fmt('.2f')} s on {r0['device']}{extra}")
    print()
    rows = []
    for w in ("W1", "W2"):
        group = [i for i in impls if i.name.startswith(w)]
        rows += bc.impl_rows(rounds, group, w, flops, tokens, loaded)
    bc.print_table(bc.table_headers("s per call", "new tokens/s"), rows)
    bc.print_probe_summary(rounds)

    flag = " (loaded)" if loaded else ""
    names = {i.name for i in impls}
    if "W1 reflax" in names:
        # how near reflax's decode comes to this processor's best float32 matmul
        w = W1
        last = w["prompt_len"] + w["new"] - 1  # the last decode step's position
        step = generate_flops(BENCH, 1, w["prompts"], last, 1) - generate_flops(
            BENCH, 1, 0, last, 1
        )
        got = bc.Summary.of(
            [flops["W1 reflax"] / bc.step_time(res["W1 reflax"]) / 1e9 for res in rounds]
        )
        frac = bc.Summary.of(
            [
                flops["W1 reflax"] / bc.step_time(res["W1 reflax"]) / bc.round_peak(res)
                for res in rounds
            ]
        )
        print(
            f"W1 reflax vs this CPU's limit: {got.fmt('.1f')} GFLOP/s achieved = "
            f"{frac.fmt(pct=True)} of the round's best fp32 matmul{flag} "
            f"(a batch-32 decode step at the last position is {step / 1e9:.2f} GFLOP)"
        )
    final = {}
    for key, (num, den) in {
        "W1_ratio": ("W1 transformers", "W1 reflax"),
        "W2_ratio": ("W2 transformers", "W2 reflax (shared prefix)"),
    }.items():
        if num in names and den in names:
            s = bc.ratio(rounds, num, den)
            final[key] = s.median
            print(f"{key}: {s.fmt('.2f')}{flag} (per-round ratio, median [min, max])")
    print(f"{a.rounds} round(s), {a.reps} timed calls per process{flag}")
    print(" ".join(f"{k}={final.get(k, float('nan')):.2f}" for k in ("W1_ratio", "W2_ratio")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
