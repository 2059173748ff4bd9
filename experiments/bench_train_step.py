"""Benchmark: one GRPO train step of reflax against a PyTorch eager reference, side by side.

The "bench" model (Qwen2 architecture: vocab 8192, hidden 512, intermediate 1408, 4 layers,
8 heads, 2 KV heads, head_dim 64, q/k/v biases, tied embeddings, float32) is created once
with random weights from a fixed seed in transformers (`Qwen2ForCausalLM`), saved, and
loaded into reflax (`reflax.models.hf.load_pretrained`), so both sides start from the same
weights. The batch is 16 sequences of 256 tokens; the last 128 tokens of each are the
"reflection" (loss_mask = 1), the rest is prompt.

Both sides do the same update: logits / temperature, log-softmax, the token log-prob of
each next token, the clipped GRPO surrogate with mu = 1 (old log-probs = the detached
current ones), beta = 0 (no KL, so no reference forward), token-mean over the loss mask,
global-norm clipping at 1.0, then AdamW (lr 1e-5, betas 0.9/0.999, eps 1e-8, no decay).

  reflax   `reflax.trainer.make_train_step` jitted on one device with the state donated
           (compile time reported separately, never timed as a step);
  PyTorch  transformers' Qwen2ForCausalLM (SDPA attention), eager mode, torch.optim.AdamW,
           `torch.set_num_threads(os.cpu_count())`.

The steps are timed alternately (reflax, torch, reflax, torch, ...) after warm-up, each
with a synchronising read (`block_until_ready` / the loss's `.item()`), and the median of
each side is reported, so load from other jobs on a shared machine hits both alike. The
first step's loss, mean reflection log-prob and pre-clipping gradient norm of both sides are
printed as a sanity check (they must agree to float32 rounding).

FLOPs (model FLOPs per step, the usual 6N + attention accounting; recomputation, e.g. the
chunked LM head's rematerialised logits, is not counted):

  tokens = B * T
  dense  = L * (D*H*Dh + 2*D*K*Dh + H*Dh*D + 3*D*F)        (q, k, v, o, gate, up, down)
  flops  = 6 * tokens * dense                               (forward 2x, backward 4x)
         + 6 * tokens * D * V                               (LM head)
         + 12 * tokens * L * T * H * Dh                     (scores and weighted values,
                                                             full T x T as computed)

`compiled.cost_analysis()["flops"]` of the reflax step is printed as a cross-check (it counts
what XLA runs, remat included, and may count a loop body once). The peak is the best call of
a float32 2048^3 matmul (jitted `jnp.dot`) on the same machine in the same run, called
before, between and after the steps; MFU = model FLOPs / median step time / that peak.
Because the machine may be shared, every step and matmul is also timed in CPU-seconds of
this process (`time.process_time`, all threads), and MFU(CPU) and the CPU-time ratio are
printed next to the wall-clock figures: they move much less with other jobs' load.

    python experiments/bench_train_step.py [--steps 10] [--logits_chunk 128]

The last line is `ratio_vs_torch=<torch step / reflax step> mfu=<reflax MFU>`.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from reflax import optim  # noqa: E402
from reflax.models.config import ModelConfig  # noqa: E402
from reflax.models.hf import load_pretrained  # noqa: E402
from reflax.trainer import Batch, StepConfig, init_state, make_train_step  # noqa: E402

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
BATCH, SEQ, REFLECTION = 16, 256, 128
TEMPERATURE, EPSILON, LR, MAX_GRAD_NORM = 0.9, 0.2, 1e-5, 1.0


def torch_model(seed: int):
    """Qwen2ForCausalLM with random weights: norms 1 + 0.1 N, biases 0.1 N, N(0, 1/fan_in)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**BENCH)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).float()
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
    return model.train()


def host_batch(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    loss_mask = np.zeros((BATCH, SEQ), np.float32)
    loss_mask[:, SEQ - REFLECTION :] = 1.0
    return dict(
        tokens=rng.integers(0, BENCH["vocab_size"], (BATCH, SEQ)).astype(np.int32),
        loss_mask=loss_mask,
        advantages=rng.normal(size=BATCH).astype(np.float32),
    )


def model_flops(c: ModelConfig, batch: int, seq: int) -> float:
    """Model FLOPs of one training step (see the module docstring)."""
    d, f, v, h, k, dh, n_layers = (
        c.hidden_size,
        c.intermediate_size,
        c.vocab_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.num_layers,
    )
    tokens = batch * seq
    dense = n_layers * (d * h * dh + 2 * d * k * dh + h * dh * d + 3 * d * f)
    return 6.0 * tokens * dense + 6.0 * tokens * d * v + 12.0 * tokens * n_layers * seq * h * dh


class MatmulPeak:
    """Float32 2048^3 matmul FLOP/s (jitted `jnp.dot`), best of all calls: wall and CPU time."""

    def __init__(self, n: int = 2048):
        self.n = n
        self.a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        self.b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        self.mm = jax.jit(jnp.dot)
        self.mm(self.a, self.b).block_until_ready()
        self.wall = self.cpu = math.inf

    def __call__(self, reps: int = 1) -> None:
        for _ in range(reps):
            t0, c0 = time.perf_counter(), time.process_time()
            self.mm(self.a, self.b).block_until_ready()
            self.wall = min(self.wall, time.perf_counter() - t0)
            self.cpu = min(self.cpu, time.process_time() - c0)

    @property
    def flops(self) -> float:
        return 2.0 * self.n**3


def torch_matmul_peak(n: int = 2048, reps: int = 5) -> float:
    ta, tb = torch.randn(n, n), torch.randn(n, n)
    ta @ tb
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        ta @ tb
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


class TorchStep:
    def __init__(self, model, hb: dict[str, np.ndarray]):
        self.model = model
        self.opt = torch.optim.AdamW(
            model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
        )
        self.tokens = torch.from_numpy(hb["tokens"]).long()
        self.mask = torch.from_numpy(hb["loss_mask"][:, 1:])
        self.adv = torch.from_numpy(hb["advantages"])[:, None]

    def __call__(self) -> tuple[float, float, float]:
        self.opt.zero_grad(set_to_none=True)
        logits = self.model(input_ids=self.tokens).logits[:, :-1].float() / TEMPERATURE
        logp = torch.log_softmax(logits, dim=-1)
        lp = logp.gather(-1, self.tokens[:, 1:, None]).squeeze(-1)  # [B, T-1]
        ratio = torch.exp(lp - lp.detach())
        clipped = torch.clamp(ratio, 1 - EPSILON, 1 + EPSILON)
        per_token = -torch.minimum(ratio * self.adv, clipped * self.adv)
        n = self.mask.sum()
        loss = (per_token * self.mask).sum() / n
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_GRAD_NORM)
        self.opt.step()
        lp_mean = ((lp.detach() * self.mask).sum() / n).item()
        return loss.item(), lp_mean, float(grad_norm)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side")
    p.add_argument("--logits_chunk", type=int, default=StepConfig().logits_chunk)
    p.add_argument("--remat", action="store_true", help="rematerialise each layer (reflax)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind} x {jax.device_count()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), {threads} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )

    tmodel = torch_model(a.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmodel.save_pretrained(tmp)
        model = load_pretrained(tmp, param_dtype=jnp.float32, dtype=jnp.float32, remat=a.remat)
    config: ModelConfig = model.config
    graphdef, params = nnx.split(model)

    hb = host_batch(a.seed)
    batch = Batch(
        tokens=jnp.asarray(hb["tokens"]),
        positions=jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32), (BATCH, SEQ)),
        mask=jnp.ones((BATCH, SEQ), bool),
        loss_mask=jnp.asarray(hb["loss_mask"]),
        anchor_mask=jnp.zeros((BATCH, SEQ), jnp.float32),
        advantages=jnp.asarray(hb["advantages"]),
        old_logprobs=jnp.zeros((BATCH, SEQ), jnp.float32),
    )
    tx, _ = optim.make_optimizer(
        total_steps=1000, learning_rate=LR, warmup_steps=0, max_grad_norm=MAX_GRAD_NORM
    )
    cfg = StepConfig(
        temperature=TEMPERATURE,
        epsilon=EPSILON,
        beta=0.0,
        micro_batches=1,
        logits_chunk=a.logits_chunk,
    )
    state = init_state(params, tx)
    t0 = time.perf_counter()
    step = (
        jax.jit(make_train_step(graphdef, tx, cfg), donate_argnums=(0,))
        .lower(state, batch, None)
        .compile()
    )
    compile_s = time.perf_counter() - t0
    cost = step.cost_analysis()
    xla_flops = float((cost[0] if isinstance(cost, list) else cost or {}).get("flops", 0.0))

    tstep = TorchStep(tmodel, hb)
    # First step of each: the same weights and batch must give the same figures.
    state, m = step(state, batch, None)
    jl, jlp, jgn = (float(m["loss"]), float(m["logprob"]), float(m["grad_norm"]))
    tl, tlp, tgn = tstep()
    print("first step (same weights, same batch):")
    print(f"  reflax  loss={jl:+.6f}  reflection logprob={jlp:.6f}  grad_norm={jgn:.6f}")
    print(f"  torch   loss={tl:+.6f}  reflection logprob={tlp:.6f}  grad_norm={tgn:.6f}")
    agree = (
        abs(jl - tl) <= 1e-4 * max(1.0, abs(tl))
        and abs(jlp - tlp) <= 1e-4 * max(1.0, abs(tlp))
        and abs(jgn - tgn) <= 1e-3 * max(1.0, abs(tgn))
    )
    print(f"  agree: {agree}")

    peak = MatmulPeak()
    peak(reps=5)
    for _ in range(a.warmup):
        state, m = step(state, batch, None)
        jax.block_until_ready(m)
        tstep()
    wall = {"reflax": [], "torch": []}
    cpu = {"reflax": [], "torch": []}

    def timed(name, fn):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall[name].append(time.perf_counter() - t0)
        cpu[name].append(time.process_time() - c0)
        return out

    def reflax_step():
        out = step(state, batch, None)
        return jax.block_until_ready(out)

    for _ in range(a.steps):  # alternate, so both sides see the same machine load
        state, m = timed("reflax", reflax_step)
        timed("torch", tstep)
        peak(reps=2)  # between steps too: the best call is the least disturbed one
    peak(reps=5)
    peak_torch = torch_matmul_peak()

    flops = model_flops(config, BATCH, SEQ)
    tokens = BATCH * SEQ
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    peak_wall, peak_cpu = peak.flops / peak.wall, peak.flops / peak.cpu
    mfu = {k: flops / med[k] / peak_wall for k in med}
    mfu_cpu = {k: flops / med_cpu[k] / peak_cpu for k in med}
    ratio, ratio_cpu = med["torch"] / med["reflax"], med_cpu["torch"] / med_cpu["reflax"]
    print(
        f"\nmodel: {config.num_params / 1e6:.2f}M params; batch {BATCH} x {SEQ} tokens, "
        f"{REFLECTION} reflection tokens per row; logits_chunk={a.logits_chunk} "
        f"remat={a.remat}; {a.steps} timed steps per side, alternating; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"model FLOPs/step {flops / 1e9:.1f} G (XLA cost_analysis of the reflax step: "
        f"{xla_flops / 1e9:.1f} G); reflax compile {compile_s:.1f} s"
    )
    print(
        f"float32 2048^3 matmul peak (best call): jax {peak_wall / 1e9:.1f} GFLOP/s wall, "
        f"{peak_cpu / 1e9:.1f} GFLOP per CPU-second; torch {peak_torch / 1e9:.1f} GFLOP/s wall"
    )
    header = (
        f"{'':<8}{'median s':>10}{'min s':>9}{'max s':>9}{'tokens/s':>10}{'GFLOP/s':>9}"
        f"{'MFU':>7}{'CPU s':>8}{'MFU(CPU)':>10}"
    )
    print(header)
    print("-" * len(header))
    for name in ("reflax", "torch"):
        ts = wall[name]
        print(
            f"{name:<8}{med[name]:>10.3f}{min(ts):>9.3f}{max(ts):>9.3f}"
            f"{tokens / med[name]:>10.0f}{flops / med[name] / 1e9:>9.1f}{mfu[name]:>7.1%}"
            f"{med_cpu[name]:>8.2f}{mfu_cpu[name]:>10.1%}"
        )
    print(
        "MFU: median step vs the best matmul call (wall clock); MFU(CPU): the same in "
        "CPU-seconds of this process, less sensitive to other jobs' load. "
        f"CPU-time ratio torch/reflax = {ratio_cpu:.2f}"
    )
    print(f"ratio_vs_torch={ratio:.2f} mfu={mfu['reflax']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
