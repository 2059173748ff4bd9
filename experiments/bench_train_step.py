"""Benchmark: GRPO train steps of reflax against a PyTorch eager reference, one process each.

The "bench" model (Qwen2 architecture: vocab 8192, hidden 512, intermediate 1408, 4 layers,
8 heads, 2 KV heads, head_dim 64, q/k/v biases, tied embeddings, float32) is created once
with random weights from a fixed seed in transformers (`Qwen2ForCausalLM`) and saved
(`save_pretrained`); every worker loads that checkpoint (reflax through
`reflax.models.hf.load_pretrained`, PyTorch through `from_pretrained`), so all sides start
from the same weights. The batches are built once, from a fixed seed, and saved beside it.

Workloads
  W3  plain GRPO step: 16 sequences of 256 tokens; the last 128 tokens of each are the
      "reflection" (loss_mask = 1), the rest is prompt; beta = 0 (no reference forward).
  W4  the Reflect-Retry-Reward step: 4 groups x G = 8 rows; each group's 8 rows share a
      384-token prefix and then hold a reflection of 64..128 tokens (uniform, fixed seed;
      the loss is on reflection tokens only), right-padded to 512 tokens; beta = 0.001, so
      a reference forward (a frozen copy of the initial weights) and the k3 KL
      `exp(ref - lp) - (ref - lp) - 1` too; advantages are group-normalised random 0/1
      rewards (`reflax.grpo.group_advantages`).

Every step: logits / temperature (0.9), log-softmax, the token log-prob of each next token,
the clipped GRPO surrogate with mu = 1 (epsilon 0.2, old log-probs = the detached current
ones), plus beta * k3 where beta > 0, token-mean over the loss mask, global-norm clipping at
1.0, then AdamW (lr 1e-5, betas 0.9/0.999, eps 1e-8, no decay).

Implementations (each run in its own process, see `bench_common`)
  reflax            `reflax.trainer.make_train_step` compiled ahead on one device with the
                    state donated (compile time reported apart, never timed as a step);
  reflax packed     (W4) the same step on the batch packed by `reflax.batch.pack_groups`:
                    one row per group holding the shared prefix once and the 8 reflections
                    after it, at the smallest `bucket_lengths` length that fits;
  reflax unpacked   (W4) the same step on the 32 x 512 batch;
  torch             transformers' Qwen2ForCausalLM (the checkpoint's class; SDPA attention,
                    the padding mask passed as TRL does), eager, a no-grad reference
                    forward (W4),
                    torch.optim.AdamW, `torch.set_num_threads(os.cpu_count())`.

Each worker compiles, runs one step whose loss, mean reflection log-prob and pre-clipping
gradient norm are printed for all implementations (same weights, same data: they must agree
to float32 rounding; `agree` is checked against a bound relative to each figure's size), then
--warmup untimed and --steps timed steps, each ended by a synchronising read. A worker's
figure is the median of its timed steps; the table gives the median [min, max] of that over
rounds, and the ratios are taken within each round, then their median over rounds.

FLOPs (model FLOPs per step, the usual 6N + attention accounting; recomputation, e.g. the
chunked LM head's rematerialised logits, is not counted):

  tokens = B * T                                            (rows x padded row length)
  dense  = L * (D*H*Dh + 2*D*K*Dh + H*Dh*D + 3*D*F)        (q, k, v, o, gate, up, down)
  flops  = 6 * tokens * (dense + D*V)                       (forward 2x, backward 4x; LM head)
         + 12 * tokens * L * T * H * Dh                     (scores and weighted values,
                                                             full T x T as computed)
  W4 adds the reference forward: 2 * tokens * (dense + D*V) + 4 * tokens * L * T * H * Dh.

The packed step computes less: per group its Lp prefix slots once and G suffix regions
of Ls slots, whose attention spans the prefix and the suffix itself:

  packed = 2 * passes * U * (Lp + G * Ls) * (dense + D*V)
         + 4 * passes * U * L * H * Dh * (Lp * Lp + G * Ls * (Lp + Ls))

(passes = 4 with the reference forward). Each implementation's MFU counts its own FLOPs, so
it says how well its arithmetic runs; the tokens/s column counts the 32 x 512 unpacked
tokens for all three (the work done for the user: the same rows trained), so its ratios are
the ratios of step times. MFU is against the best float32 2048^3 matmul probe of the same
round in either framework (`bench_common`).

    python experiments/bench_train_step.py [--rounds 3] [--steps 2] [--warmup 0]

The last line is
`W4_packed_vs_torch=<x> W4_packed_vs_unpacked=<y> W3_vs_torch=<z>`: torch step time over
packed step time, unpacked over packed, and (W3) torch over reflax; medians over rounds.
"""

from __future__ import annotations

import argparse
import math
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
from reflax.config import DEFAULT_LOGITS_BYTES  # noqa: E402

BENCH = dict(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=4096,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
TEMPERATURE, EPSILON, LR, MAX_GRAD_NORM = 0.9, 0.2, 1e-5, 1.0
W3_BATCH, W3_SEQ, W3_REFLECTION = 16, 256, 128
W4_GROUPS, W4_G, W4_SEQ, W4_PREFIX, W4_REFL = 4, 8, 512, 384, (64, 128)
W4_BETA = 0.001

IMPLS = (
    bc.Impl("W3 reflax", "reflax_w3", "jax"),
    bc.Impl("W3 torch", "torch_w3", "torch"),
    bc.Impl("W4 reflax packed", "reflax_w4_packed", "jax"),
    bc.Impl("W4 reflax unpacked", "reflax_w4_unpacked", "jax"),
    bc.Impl("W4 torch", "torch_w4", "torch"),
)


# ----------------------------------------------------------------------------- model, data


def random_model(
    config_kwargs: dict[str, Any], seed: int, dtype: str = "float32", arch: str = "qwen2"
):
    """A transformers causal LM of architecture `arch` ("qwen2" or "llama") with random
    weights: norms 1 + 0.1 N, biases 0.1 N, N(0, 1/fan_in).

    Built on the meta device and then filled, so a large model is not initialised twice;
    only its parameters are valid (the rotary buffers are not): it is meant for
    `save_pretrained`, and every user loads the saved checkpoint."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(arch, **config_kwargs)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = model.to_empty(device="cpu").to(getattr(torch, dtype))
    model.tie_weights()  # to_empty unties the shared embedding
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[-1]))
    return model


def w3_batch(seed: int) -> dict[str, np.ndarray]:
    """16 x 256 tokens, the last 128 of each row the reflection; no padding."""
    rng = np.random.default_rng(seed)
    b, t = W3_BATCH, W3_SEQ
    loss_mask = np.zeros((b, t), np.float32)
    loss_mask[:, t - W3_REFLECTION :] = 1.0
    return dict(
        tokens=rng.integers(0, BENCH["vocab_size"], (b, t)).astype(np.int32),
        positions=np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
        mask=np.ones((b, t), bool),
        loss_mask=loss_mask,
        anchor_mask=np.zeros((b, t), np.float32),
        advantages=rng.normal(size=b).astype(np.float32),
        old_logprobs=np.zeros((b, t), np.float32),
    )


def rrr_batch(
    seed: int,
    groups: int,
    group_size: int,
    seq: int,
    prefix: int,
    refl: tuple[int, int],
    vocab: int,
) -> dict[str, np.ndarray]:
    """An unpacked Reflect-Retry-Reward batch (the fields of `reflax.trainer.Batch`, numpy):
    B = groups * group_size rows of `seq` tokens; rows u*G..u*G+G-1 share a `prefix`-token
    prompt, then a reflection of refl[0]..refl[1] tokens (the loss tokens), then padding."""
    from reflax.grpo import group_advantages

    rng = np.random.default_rng(seed)
    b = groups * group_size
    lengths = rng.integers(refl[0], refl[1] + 1, b)  # [B] reflection lengths
    if prefix + lengths.max() > seq:
        raise ValueError(f"prefix {prefix} + reflection {lengths.max()} > seq {seq}")
    tokens = np.zeros((b, seq), np.int32)  # padding id 0
    mask = np.zeros((b, seq), bool)
    loss_mask = np.zeros((b, seq), np.float32)
    for u in range(groups):
        shared = rng.integers(1, vocab, prefix)
        for g in range(group_size):
            i, n = u * group_size + g, lengths[u * group_size + g]
            tokens[i, :prefix] = shared
            tokens[i, prefix : prefix + n] = rng.integers(1, vocab, n)
            mask[i, : prefix + n] = True
            loss_mask[i, prefix : prefix + n] = 1.0
    rewards = rng.integers(0, 2, (groups, group_size)).astype(np.float32)
    rewards[:, 0], rewards[:, 1] = 1.0, 0.0  # every group has a learning signal
    adv, _ = group_advantages(rewards, np.ones(groups, bool))
    return dict(
        tokens=tokens,
        positions=np.broadcast_to(np.arange(seq, dtype=np.int32), (b, seq)).copy(),
        mask=mask,
        loss_mask=loss_mask,
        anchor_mask=np.zeros((b, seq), np.float32),
        advantages=np.asarray(adv, np.float32).reshape(b),
        old_logprobs=np.zeros((b, seq), np.float32),
    )


def w4_batch(seed: int) -> dict[str, np.ndarray]:
    return rrr_batch(seed, W4_GROUPS, W4_G, W4_SEQ, W4_PREFIX, W4_REFL, BENCH["vocab_size"])


def model_flops(c: dict[str, Any], batch: int, seq: int, reference: bool = False) -> float:
    """Model FLOPs of one training step on a [batch, seq] batch (see the module docstring);
    `c` holds transformers' Qwen2 config names."""
    weights, pair = bc.macs(c)
    tokens = batch * seq
    matmuls = tokens * weights  # multiply-adds of one forward, LM head included
    attention = tokens * seq * pair  # of QK^T (and as many of PV), full T x T
    passes = 4 if reference else 3  # forward 1, backward 2 (+ reference forward 1)
    return 2.0 * passes * matmuls + 4.0 * passes * attention


def packed_flops(
    c: dict[str, Any], groups: int, group_size: int, prefix: int, suffix: int
) -> float:
    """Model FLOPs of the packed W4 step (module docstring), reference forward included."""
    weights, pair = bc.macs(c)
    slots = groups * (prefix + group_size * suffix)
    pairs = groups * (prefix * prefix + group_size * suffix * (prefix + suffix))
    passes = 4
    return 2.0 * passes * slots * weights + 4.0 * passes * pair * pairs


# ----------------------------------------------------------------------------- reflax worker


def reflax_train_worker(
    ckpt: str,
    hb: dict[str, np.ndarray],
    *,
    beta: float,
    packed: bool,
    group_size: int,
    steps: int,
    warmup: int,
    logits_chunk: int,
    logits_bytes: int = DEFAULT_LOGITS_BYTES,
    remat: bool = False,
    micro_batches: int = 1,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Load the checkpoint, (pack and) place the batch, compile, first step, timed steps."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from reflax import optim
    from reflax.batch import Batch
    from reflax.models.hf import load_pretrained
    from reflax.trainer import StepConfig, init_state, make_train_step

    dt = jnp.dtype(dtype)
    model = load_pretrained(ckpt, param_dtype=dt, dtype=dt, remat=remat)
    graphdef, params = nnx.split(model)
    host = Batch(**hb)
    info: dict[str, Any] = {"rows": int(host.tokens.shape[0]), "length": int(host.tokens.shape[1])}
    if packed:
        from reflax.batch import pack_groups

        host = pack_groups(host, group_size)  # lengths: `PackLengths.fine`, the least padding
        info.update(
            rows=int(host.tokens.shape[0]),
            length=int(host.tokens.shape[1]),
            prefix_len=int(host.prefix_len),
        )
    info["real_tokens"] = int(np.asarray(host.mask).sum())
    batch = jax.tree.map(jnp.asarray, host)
    tx, _ = optim.make_optimizer(
        total_steps=1000, learning_rate=LR, warmup_steps=0, max_grad_norm=MAX_GRAD_NORM
    )
    cfg = StepConfig(
        temperature=TEMPERATURE,
        epsilon=EPSILON,
        beta=beta,
        micro_batches=micro_batches,
        logits_chunk=logits_chunk,
        logits_bytes=logits_bytes,
    )
    ref = jax.tree.map(jnp.copy, params) if beta else None  # frozen initial weights
    state = init_state(params, tx)
    t0 = time.perf_counter()
    step = (
        jax.jit(make_train_step(graphdef, tx, cfg), donate_argnums=(0,))
        .lower(state, batch, ref)
        .compile()
    )
    compile_s = time.perf_counter() - t0
    cost = step.cost_analysis()
    xla_flops = float((cost[0] if isinstance(cost, list) else cost or {}).get("flops", 0.0))

    state, m = step(state, batch, ref)
    first = {k: float(m[k]) for k in ("loss", "logprob", "grad_norm")}
    for _ in range(warmup):
        state, m = step(state, batch, ref)
        jax.block_until_ready(m)

    def one() -> None:
        nonlocal state
        state, out = step(state, batch, ref)
        jax.block_until_ready(out)

    times = bc.time_calls(one, steps)
    return dict(
        times=times,
        first=first,
        compile_s=compile_s,
        xla_flops=xla_flops,
        device=jax.devices()[0].device_kind,
        **info,
    )


# ----------------------------------------------------------------------------- torch worker


class TorchGRPOStep:
    """TRL's update in eager PyTorch: policy forward, optional no-grad reference forward,
    clipped surrogate (mu = 1) + beta * k3, token-mean, clip_grad_norm_, AdamW.
    `micro_rows`: rows per forward/backward (gradients accumulated), all rows if 0."""

    def __init__(self, model, hb: dict[str, np.ndarray], beta: float, micro_rows: int = 0):
        import copy

        import torch

        self.torch = torch
        self.model = model.train()
        dev = next(model.parameters()).device
        self.ref = None
        if beta:
            self.ref = copy.deepcopy(model).eval().requires_grad_(False)
        self.beta = beta
        self.opt = torch.optim.AdamW(
            model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
        )
        self.tokens = torch.from_numpy(hb["tokens"]).long().to(dev)
        # pass the padding mask as TRL does; None where every token is real
        self.attn = None if hb["mask"].all() else torch.from_numpy(hb["mask"]).long().to(dev)
        self.mask = torch.from_numpy(hb["loss_mask"][:, 1:]).to(dev)  # [B, T-1]
        self.adv = torch.from_numpy(hb["advantages"])[:, None].to(dev)  # [B, 1]
        self.sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        b = self.tokens.shape[0]
        self.micro = micro_rows or b

    def _logprobs(self, model, rows: slice):
        attn = None if self.attn is None else self.attn[rows]
        tokens = self.tokens[rows]
        logits = model(input_ids=tokens, attention_mask=attn).logits[:, :-1].float()
        logp = self.torch.log_softmax(logits / TEMPERATURE, dim=-1)
        return logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)  # [b, T-1]

    def __call__(self) -> tuple[float, float, float]:
        torch = self.torch
        self.opt.zero_grad(set_to_none=True)
        n = self.mask.sum()
        loss_total = lp_total = 0.0
        for start in range(0, self.tokens.shape[0], self.micro):
            rows = slice(start, start + self.micro)
            mask, adv = self.mask[rows], self.adv[rows]
            ref_lp = None
            if self.ref is not None:
                with torch.no_grad():
                    ref_lp = self._logprobs(self.ref, rows)
            lp = self._logprobs(self.model, rows)
            ratio = torch.exp(lp - lp.detach())
            clipped = torch.clamp(ratio, 1 - EPSILON, 1 + EPSILON)
            per_token = -torch.minimum(ratio * adv, clipped * adv)
            if ref_lp is not None:
                d = ref_lp - lp
                per_token = per_token + self.beta * (torch.exp(d) - d - 1)
            loss = (per_token * mask).sum() / n
            loss.backward()
            loss_total += loss.item()
            lp_total += ((lp.detach() * mask).sum() / n).item()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_GRAD_NORM)
        self.opt.step()
        self.sync()
        return loss_total, lp_total, float(grad_norm)


def torch_train_worker(
    ckpt: str,
    hb: dict[str, np.ndarray],
    *,
    beta: float,
    steps: int,
    warmup: int,
    micro_rows: int = 0,
    dtype: str = "float32",
    remat: bool = False,
) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        ckpt, torch_dtype=getattr(torch, dtype), attn_implementation="sdpa"
    ).to(dev)
    if remat:  # recompute each layer in the backward pass, as reflax's remat does
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    step = TorchGRPOStep(model, hb, beta, micro_rows)
    loss, lp, gn = step()
    for _ in range(warmup):
        step()
    times = bc.time_calls(step, steps)
    return dict(
        times=times,
        first=dict(loss=loss, logprob=lp, grad_norm=gn),
        threads=torch.get_num_threads(),
        device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        rows=int(hb["tokens"].shape[0]),
        length=int(hb["tokens"].shape[1]),
    )


# ----------------------------------------------------------------------------- agreement


def agreement(
    firsts: dict[str, dict[str, float]], hb: dict[str, np.ndarray], dtype: str = "float32"
) -> bool:
    """Print the first-step figures; True when they agree to the dtype's rounding.

    Bounds, relative to the size of what is compared: the loss is a token-mean of terms of
    size |A| (the ratio is 1 at the first step), so its bound is a fraction of the
    token-mean |A|; the mean log-prob's and the gradient norm's are fractions of their own
    size (the gradient norm's larger: it sums many more rounded products). float32:
    1e-4, 1e-4, 1e-3; bfloat16 (8 bits of mantissa): 1e-2, 1e-2, 5e-2."""
    tols = {"float32": (1e-4, 1e-4, 1e-3), "bfloat16": (1e-2, 1e-2, 5e-2)}[dtype]
    m = hb["loss_mask"][:, 1:] > 0
    adv_scale = float(np.abs(np.broadcast_to(hb["advantages"][:, None], m.shape))[m].mean())
    names = list(firsts)
    ok = True
    for key, scale, tol in (
        ("loss", adv_scale, tols[0]),
        ("logprob", abs(firsts[names[0]]["logprob"]), tols[1]),
        ("grad_norm", abs(firsts[names[0]]["grad_norm"]), tols[2]),
    ):
        vals = [firsts[n][key] for n in names]
        spread = max(vals) - min(vals)
        ok &= spread <= tol * scale
        print(
            f"  {key:<10} "
            + "  ".join(f"{n}={v:+.7f}" for n, v in zip(names, vals))
            + f"  spread {spread:.2e} (bound {tol * scale:.2e})"
        )
    print(f"  agree: {ok}")
    return ok


# ----------------------------------------------------------------------------- main


def worker(a: argparse.Namespace) -> int:
    ckpt = os.path.join(a.workdir, "model")
    data = np.load(os.path.join(a.workdir, "batches.npz"))
    w3 = {k[3:]: data[k] for k in data if k.startswith("w3_")}
    w4 = {k[3:]: data[k] for k in data if k.startswith("w4_")}
    common = dict(steps=a.steps, warmup=a.warmup)
    rx = dict(logits_chunk=a.logits_chunk, logits_bytes=a.logits_bytes, remat=a.remat)
    rx.update(group_size=W4_G, **common)
    bodies = {
        "reflax_w3": lambda: reflax_train_worker(ckpt, w3, beta=0.0, packed=False, **rx),
        "torch_w3": lambda: torch_train_worker(ckpt, w3, beta=0.0, **common),
        "reflax_w4_packed": lambda: reflax_train_worker(ckpt, w4, beta=W4_BETA, packed=True, **rx),
        "reflax_w4_unpacked": lambda: reflax_train_worker(
            ckpt, w4, beta=W4_BETA, packed=False, **rx
        ),
        "torch_w4": lambda: torch_train_worker(ckpt, w4, beta=W4_BETA, **common),
    }
    framework = "torch" if a.worker.startswith("torch") else "jax"
    return bc.run_worker(framework, bodies[a.worker])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bc.add_harness_args(p, rounds=3)
    p.add_argument("--steps", type=int, default=2, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=0, help="untimed steps after the first")
    # 0: the run's default, the largest chunk whose [rows, chunk, V] f32 logits fit
    # --logits_bytes (on the bench model W3's and W4's rows in one chunk, no recomputation)
    p.add_argument("--logits_chunk", type=int, default=0)
    p.add_argument("--logits_bytes", type=int, default=DEFAULT_LOGITS_BYTES)
    p.add_argument("--remat", action="store_true", help="rematerialise each layer (reflax)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)

    loaded = bc.check_load(a.max_load, a.allow_load)
    bc.parent_on_cpu()
    bc.header("bench model; W3 16x256 beta 0, W4 4 groups x 8 rows x 512, beta 0.001")
    impls = bc.selected(IMPLS, a.only)
    hb = {"w3": w3_batch(a.seed), "w4": w4_batch(a.seed)}
    with tempfile.TemporaryDirectory() as tmp:
        random_model(BENCH, a.seed).save_pretrained(os.path.join(tmp, "model"))
        np.savez(
            os.path.join(tmp, "batches.npz"),
            **{f"{w}_{k}": v for w, b in hb.items() for k, v in b.items()},
        )
        rounds = bc.run_rounds(__file__, impls, a.rounds, bc.parent_argv(argv), tmp)

    names = {i.name for i in impls}
    w3_flops = model_flops(BENCH, W3_BATCH, W3_SEQ)
    w4_flops = model_flops(BENCH, W4_GROUPS * W4_G, W4_SEQ, reference=True)
    flops = {i.name: w3_flops if i.name.startswith("W3") else w4_flops for i in impls}
    if "W4 reflax packed" in names:
        r0 = rounds[0]["W4 reflax packed"]
        suffix = (r0["length"] - r0["prefix_len"]) // W4_G
        flops["W4 reflax packed"] = packed_flops(BENCH, r0["rows"], W4_G, r0["prefix_len"], suffix)
    tokens = {
        i.name: W3_BATCH * W3_SEQ if i.name.startswith("W3") else W4_GROUPS * W4_G * W4_SEQ
        for i in impls
    }
    print(
        f"\nmodel FLOPs per step: W3 {w3_flops / 1e9:.1f} G, W4 unpacked (reflax, torch) "
        f"{w4_flops / 1e9:.1f} G"
        + (
            f", W4 packed {flops['W4 reflax packed'] / 1e9:.1f} G"
            if "W4 reflax packed" in names
            else ""
        )
    )
    for i in impls:
        r0 = rounds[0][i.name]
        extra = ""
        if "compile_s" in r0:
            extra = (
                f", compile {r0['compile_s']:.1f} s, XLA cost_analysis "
                f"{r0['xla_flops'] / 1e9:.1f} GFLOP"
            )
        print(
            f"  {i.name}: {r0['rows']} rows x {r0['length']} tokens on {r0['device']}"
            + (f" (prefix {r0['prefix_len']})" if "prefix_len" in r0 else "")
            + (f", {r0['real_tokens']} real tokens" if "real_tokens" in r0 else "")
            + extra
        )

    ok = True
    for w in ("W3", "W4"):
        firsts = {n: rounds[0][n]["first"] for n in names if n.startswith(w)}
        if len(firsts) > 1:
            print(f"\n{w} first step (same weights, same batch):")
            ok &= agreement(dict(sorted(firsts.items())), hb[w.lower()])

    print()
    rows: list[list[str]] = []
    for w in ("W3", "W4"):
        group = [i for i in impls if i.name.startswith(w)]
        rows += bc.impl_rows(rounds, group, w, flops, tokens, loaded)
    bc.print_table(bc.table_headers(), rows)
    bc.print_probe_summary(rounds)

    flag = " (loaded)" if loaded else ""
    pairs = {
        "W4_packed_vs_torch": ("W4 torch", "W4 reflax packed"),
        "W4_packed_vs_unpacked": ("W4 reflax unpacked", "W4 reflax packed"),
        "W3_vs_torch": ("W3 torch", "W3 reflax"),
    }
    final = {}
    for key, (num, den) in pairs.items():
        if num in names and den in names:
            s = bc.ratio(rounds, num, den)
            final[key] = s.median
            print(f"{key}: {s.fmt('.2f')}{flag} (per-round ratio, median [min, max])")
    print(f"{a.rounds} round(s), {a.steps} timed steps per process; agree={ok}{flag}")
    print(" ".join(f"{k}={final[k]:.2f}" if k in final else f"{k}=nan" for k in pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
