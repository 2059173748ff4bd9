"""Benchmark: load a Qwen2-1.5B-shaped safetensors checkpoint into reflax on this host.

Writes the checkpoint once (random float32 weights, Hugging Face names, 2 GB
shards plus index, transformers-compatible config.json) into --dir, then loads
it in a fresh subprocess and reports:
  * wall time of `load_pretrained`,
  * peak host RSS of the loading process minus its RSS just before loading,
    as a multiple of the checkpoint's size on disk (the loaded float32 model
    itself is 1.0x on a CPU backend),
  * forward throughput on a 1 x 128 batch (jitted, after a warm-up).

    python experiments/bench_load.py [--dir /tmp/reflax_bench_qwen1p5b]

The tensors are written with `safetensors.numpy.save_file`, one shard at a
time, so writing needs about one shard of memory. The tensor names and config
are checked first by writing a tiny checkpoint the same way and loading it
with transformers, which must report no missing or unexpected tensors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

QWEN2_1P5B = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
TINY = dict(
    QWEN2_1P5B,
    vocab_size=64,
    hidden_size=24,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
)
SHARD_BYTES = 2 * 10**9


def hf_tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """HF names and shapes of a Qwen2ForCausalLM (q/k/v biases; no lm_head when tied)."""
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    dh = d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * dh, cfg["num_key_value_heads"] * dh
    shapes = {"model.embed_tokens.weight": (v, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (q, d),
                p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.weight": (kv, d),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, d),
                p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.weight": (d, q),
                p + "post_attention_layernorm.weight": (d,),
                p + "mlp.gate_proj.weight": (f, d),
                p + "mlp.up_proj.weight": (f, d),
                p + "mlp.down_proj.weight": (d, f),
            }
        )
    shapes["model.norm.weight"] = (d,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def write_checkpoint(path: str, cfg: dict, shard_bytes: int = SHARD_BYTES, seed: int = 0) -> None:
    """Random float32 weights as HF safetensors shards + index + config.json, shard by shard."""
    from safetensors.numpy import save_file
    from transformers import Qwen2Config

    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    shapes = hf_tensor_shapes(cfg)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 4 * math.prod(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            shape = shapes[name]
            if name.endswith("norm.weight"):
                tensors[name] = np.ones(shape, np.float32)
            else:
                scale = np.float32(0.02)
                tensors[name] = rng.standard_normal(shape, dtype=np.float32) * scale
            weight_map[name] = file
        save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
        del tensors
        print(f"  wrote {file} ({len(names)} tensors)", flush=True)
    total = sum(4 * math.prod(s) for s in shapes.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    config = Qwen2Config(**cfg, dtype="float32")
    config.architectures = ["Qwen2ForCausalLM"]
    config.save_pretrained(path)


def check_names_with_transformers() -> None:
    """A tiny checkpoint written like the big one must load into transformers exactly."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(tmp, TINY, shard_bytes=20_000)
        _, info = AutoModelForCausalLM.from_pretrained(tmp, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise SystemExit(f"tensor names do not match transformers' Qwen2: {problems}")


def checkpoint_bytes(path: str) -> int:
    return sum(
        os.path.getsize(os.path.join(path, f))
        for f in os.listdir(path)
        if f.endswith(".safetensors")
    )


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(path: str) -> None:
    """Runs in a fresh process: load, measure, forward; prints one JSON line."""
    import jax

    from reflax import api
    from reflax.models.hf import load_pretrained

    jax.devices()  # backend up before the baseline
    baseline = current_rss()
    t0, c0 = time.perf_counter(), cpu_seconds()
    model = load_pretrained(path)
    jax.block_until_ready(jax.tree.leaves(model))
    load_s, load_cpu = time.perf_counter() - t0, cpu_seconds() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    after = current_rss()

    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, 128), np.int32)
    t0 = time.perf_counter()
    api.logits(model, tokens).block_until_ready()
    compile_s = time.perf_counter() - t0
    runs = 5
    t0, c0 = time.perf_counter(), cpu_seconds()
    for _ in range(runs):
        api.logits(model, tokens).block_until_ready()
    fwd_s, fwd_cpu = (time.perf_counter() - t0) / runs, (cpu_seconds() - c0) / runs
    print(
        json.dumps(
            dict(
                load_s=load_s,
                load_cpu=load_cpu,
                fwd_cpu=fwd_cpu,
                cpus=len(os.sched_getaffinity(0)),
                baseline=baseline,
                peak=peak,
                after=after,
                compile_s=compile_s,
                fwd_s=fwd_s,
                devices=str(jax.devices()),
                params=model.config.num_params,
            )
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/tmp/reflax_bench_qwen1p5b")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.dir)

    if not os.path.exists(os.path.join(args.dir, "config.json")):
        print("checking tensor names against transformers ...", flush=True)
        check_names_with_transformers()
        print(f"writing the checkpoint to {args.dir} (once) ...", flush=True)
        t0 = time.perf_counter()
        write_checkpoint(args.dir, QWEN2_1P5B)
        print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
    size = checkpoint_bytes(args.dir)

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=pythonpath)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--dir", args.dir]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        sys.exit(f"load process failed:\n{out.stderr}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    gb = 1e9
    rows = [
        ("checkpoint", f"{size / gb:.2f} GB float32, {r['params'] / 1e9:.2f} B params"),
        (
            "load wall time",
            f"{r['load_s']:.1f} s ({size / gb / r['load_s']:.2f} GB/s), "
            f"CPU time {r['load_cpu']:.1f} s",
        ),
        ("RSS before load", f"{r['baseline'] / gb:.2f} GB"),
        (
            "peak RSS - before",
            f"{(r['peak'] - r['baseline']) / gb:.2f} GB = {(r['peak'] - r['baseline']) / size:.2f}x"
            " checkpoint",
        ),
        ("RSS after - before", f"{(r['after'] - r['baseline']) / gb:.2f} GB (the loaded model)"),
        (
            "forward 1x128",
            f"{128 / r['fwd_s']:.1f} tokens/s ({r['fwd_s']:.2f} s/step, "
            f"CPU time {r['fwd_cpu']:.2f} s/step)",
        ),
        ("first call (compile)", f"{r['compile_s']:.1f} s"),
        ("devices", f"{r['devices']} on {r['cpus']} CPU cores"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(f"\ncommand: python {os.path.relpath(__file__)} --dir {args.dir}")


if __name__ == "__main__":
    main()
