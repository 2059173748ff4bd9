"""Sampler throughput: reflax's jitted rollout engine against transformers' `generate`.

Both run the same random "bench" model (Qwen2 architecture, vocab 8192, hidden 512,
intermediate 1408, 4 layers, 8 heads, 2 KV heads, tied embeddings, float32): the
torch model is created under a fixed seed and its weights are copied into reflax.

W1: 32 prompts of 64 tokens, exactly 64 new tokens each, temperature 1.0.
W2: 4 prompts of 512 tokens, 8 samples each, exactly 32 new tokens
    (transformers: num_return_sequences=8; reflax with prefix sharing on and off).

Times are taken after a warm-up call (reflax's compile time is reported apart);
best and median over --reps repetitions. The last line is `W1_ratio=<x> W2_ratio=<y>`
(reflax speed over transformers speed, best times).

    python experiments/bench_sampler.py [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import jax
import numpy as np
import torch
from flax import nnx
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from reflax.models import Decoder, ModelConfig
from reflax.models.hf import from_hf_state_dict
from reflax.sampling import Sampler

SEED = 0


def bench_hf_model() -> Qwen2ForCausalLM:
    torch.manual_seed(SEED)
    cfg = Qwen2Config(
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
    return Qwen2ForCausalLM(cfg).eval()


def to_reflax(hf: Qwen2ForCausalLM) -> Decoder:
    """A reflax Decoder holding the weights of a transformers Qwen2 model."""
    tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    return from_hf_state_dict(ModelConfig.from_hf(hf.config.to_dict()), tensors)


def timed(fn: Callable[[int], object], reps: int) -> tuple[float, list[float]]:
    """(warm-up seconds, [seconds per repetition]); fn(i) runs repetition i to completion."""
    t0 = time.perf_counter()
    fn(0)
    warm = time.perf_counter() - t0
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        fn(i + 1)
        times.append(time.perf_counter() - t0)
    return warm, times


def hf_generate(hf: Qwen2ForCausalLM, prompts: np.ndarray, new: int, samples: int) -> np.ndarray:
    with torch.inference_mode():
        out = hf.generate(
            input_ids=torch.from_numpy(prompts).long(),
            attention_mask=torch.ones(prompts.shape, dtype=torch.long),
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
    return out.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch threads {cores}")
    print("load average at start: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))

    hf = bench_hf_model()
    model = to_reflax(hf)
    state = nnx.state(model)
    sampler = Sampler(model, prompt_buckets=64, gen_buckets=32, cache_buckets=128)
    rng = np.random.default_rng(SEED)
    rows = []  # (workload, system, warm-up s, best s, median s, tokens)

    def reflax_run(prompts: np.ndarray, new: int, samples: int, share: bool):
        def fn(i: int) -> None:
            out = sampler.sample(
                state,
                prompts.tolist(),
                max_new_tokens=new,
                rng=i,
                temperature=1.0,
                num_samples=samples,
                share_prefix=share,
            )
            assert out.tokens.shape == (len(prompts) * samples, new)
            assert (out.lengths == new).all()

        return fn

    def record(name: str, system: str, fn: Callable[[int], object], tokens: int) -> float:
        warm, times = timed(fn, args.reps)
        best, median = min(times), statistics.median(times)
        rows.append((name, system, warm, best, median, tokens))
        return best

    # W1: 32 x 64-token prompts, 64 new tokens each
    w1 = rng.integers(1, 8192, (32, 64))
    w1_tokens = 32 * 64
    r1 = record("W1", "reflax", reflax_run(w1, 64, 1, True), w1_tokens)
    h1 = record("W1", "transformers", lambda i: hf_generate(hf, w1, 64, 1), w1_tokens)

    # W2: 4 x 512-token prompts, 8 samples of 32 new tokens each
    w2 = rng.integers(1, 8192, (4, 512))
    w2_tokens = 4 * 8 * 32
    r2 = record("W2", "reflax (shared prefix)", reflax_run(w2, 32, 8, True), w2_tokens)
    record("W2", "reflax (no sharing)", reflax_run(w2, 32, 8, False), w2_tokens)
    h2 = record("W2", "transformers", lambda i: hf_generate(hf, w2, 32, 8), w2_tokens)

    print()
    print(
        "| workload | system | warm-up s | compile s (warm-up - median) | best s | median s |"
        " new tokens/s (best) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, system, warm, best, median, tokens in rows:
        compile_s = f"{warm - median:.1f}" if system.startswith("reflax") else "-"
        print(
            f"| {name} | {system} | {warm:.2f} | {compile_s} | {best:.3f} | {median:.3f} |"
            f" {tokens / best:.0f} |"
        )
    print(f"reflax programs compiled: {sampler.num_compilations}")
    print("load average at end: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    print(f"W1_ratio={h1 / r1:.2f} W2_ratio={h2 / r2:.2f}")


if __name__ == "__main__":
    main()
