"""Shared test utilities: tiny HF checkpoints written offline, reference logits and GRPO
numerics, tokenizers, float comparisons relative to the size of what is compared.

Nothing can be downloaded in tests, so checkpoints are random transformers
models saved with `save_pretrained` and tokenizers are character-level ones
built with `reflax.tokenizer.char_tokenizer`.

    path = tiny_hf_checkpoint(tmp_path)                    # qwen2, tied, GQA 4/2
    path = tiny_hf_checkpoint(tmp_path, "llama", num_key_value_heads=1, attention_bias=True)
    tokens, mask = padded_batch(vocab=100, lengths=[5, 8], length=8, left=[True, False])
    ref = torch_logits(path, tokens, mask)                 # [B, T, V] float32, transformers
    assert_close_scaled(ours[mask], ref[mask], 1e-5)       # bound relative to max |ref|
"""

from __future__ import annotations

import math
import os
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reflax.tokenizer import char_tokenizer


def tiny_train_config():
    """The tiny decoder of the train-step tests (qwen2: GQA 4/2, q/k/v biases, tied)."""
    from reflax.models import ModelConfig

    return ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        qkv_bias=True,
        tie_word_embeddings=True,
    )


# printable ASCII: 100 characters, so a char tokenizer has 104 ids (< the default vocab 128)
ALPHABET = string.printable

# transformers config kwargs of the tiny models; any can be overridden
_SHARED = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
    rope_theta=10000.0,
)
BASE_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2": dict(_SHARED, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "llama": dict(_SHARED, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "mistral": dict(_SHARED, rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False),
    "qwen3": dict(_SHARED, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "phi3": dict(_SHARED, rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=None),
}

LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)
# Llama 3.1's template reduced to messages (no tools): a system block with dates, always
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)


def chatml_tokenizer(alphabet: str = ALPHABET) -> Any:
    """Qwen-style ChatML char tokenizer (eos <|im_end|>, pad <|endoftext|>)."""
    return char_tokenizer(alphabet)


def llama3_tokenizer(alphabet: str = ALPHABET) -> Any:
    """Llama-3-style char tokenizer: bos <|begin_of_text|>, eos <|end_of_text|>, no pad,
    turns closed by <|eot_id|>."""
    return char_tokenizer(
        alphabet,
        chat_template=LLAMA3_TEMPLATE,
        special_tokens=LLAMA3_SPECIAL_TOKENS,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token=None,
    )


def _architecture(arch: str) -> tuple[Any, Any]:
    import transformers

    names = {
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
        "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    }
    config_name, model_name = names[arch]
    return getattr(transformers, config_name), getattr(transformers, model_name)


def tiny_torch_model(arch: str = "qwen2", *, seed: int = 0, **overrides: Any) -> Any:
    """A random transformers model; every weight, norm scale and bias is random.

    Norm scales are 1 + 0.1 N(0,1), biases 0.1 N(0,1), matrices N(0, 1/fan_in), so
    logits are O(1) and every parameter matters to a parity check.
    """
    import torch

    config_cls, model_cls = _architecture(arch)
    config = config_cls(**{**BASE_CONFIGS[arch], **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
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


def tiny_hf_checkpoint(
    tmp_path: str | os.PathLike,
    arch: str = "qwen2",
    *,
    seed: int = 0,
    dtype: str = "float32",
    max_shard_size: str | int | None = None,
    tokenizer: bool = True,
    name: str | None = None,
    **overrides: Any,
) -> Path:
    """Write a tiny random `arch` checkpoint (plus a ChatML char tokenizer) and return its path.

    `overrides` are transformers config kwargs (num_key_value_heads=1,
    tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
    rope_parameters={...}, ...). `max_shard_size` (e.g. "20KB") makes
    transformers write several files and an index. `dtype` "bfloat16" saves
    bf16 weights. The directory is `tmp_path / name` (default: from the arguments).
    """
    import torch

    model = tiny_torch_model(arch, seed=seed, **overrides)
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    tag = "-".join(f"{k}={v}" for k, v in sorted(overrides.items()) if not isinstance(v, dict))
    path = Path(tmp_path) / (name or f"{arch}-s{seed}-{dtype}-{tag or 'base'}-{max_shard_size}")
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    if tokenizer:
        tok = chatml_tokenizer()
        model.config.eos_token_id = tok.eos_token_id
        model.config.pad_token_id = tok.pad_token_id
        model.config.bos_token_id = None
        tok.save_pretrained(path)
    model.save_pretrained(path, **kwargs)
    return path


def load_torch(path: str | os.PathLike) -> Any:
    """transformers' model from a checkpoint directory, float32, eager attention."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def torch_logits(
    model_or_path: Any, tokens: np.ndarray, mask: np.ndarray | None = None
) -> np.ndarray:
    """Reference logits [B, T, V] float32 from transformers, positions counting real tokens."""
    import torch

    model = (
        load_torch(model_or_path)
        if isinstance(model_or_path, (str, os.PathLike))
        else model_or_path
    )
    tokens = np.asarray(tokens)
    mask = np.ones(tokens.shape, bool) if mask is None else np.asarray(mask, bool)
    positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(tokens, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            position_ids=torch.as_tensor(positions, dtype=torch.long),
        )
    return out.logits.float().numpy()


def padded_batch(
    vocab: int,
    lengths: Sequence[int],
    length: int,
    *,
    left: Sequence[bool] | bool = True,
    seed: int = 0,
    pad_id: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Random tokens [B, length] int32 and mask [B, length] bool; row b has lengths[b] real
    tokens, left-padded where left[b] else right-padded."""
    rng = np.random.default_rng(seed)
    left = [left] * len(lengths) if isinstance(left, bool) else list(left)
    tokens = np.full((len(lengths), length), pad_id, np.int32)
    mask = np.zeros((len(lengths), length), bool)
    for b, (n, is_left) in enumerate(zip(lengths, left)):
        span = slice(length - n, length) if is_left else slice(0, n)
        tokens[b, span] = rng.integers(1, vocab, n)
        mask[b, span] = True
    return tokens, mask


def cpu_mesh(data: int = 2, fsdp: int = 2, tensor: int = 2) -> Any:
    """A (data, fsdp, tensor) mesh over the 8 fake CPU devices conftest sets up."""
    from reflax.sharding import make_mesh

    return make_mesh({"data": data, "fsdp": fsdp, "tensor": tensor})


def assert_close_scaled(
    actual: Any, desired: Any, rtol: float, *, scale: float | None = None, err_msg: str = ""
) -> None:
    """max |actual - desired| <= rtol * scale, with scale = max |desired| unless given.

    The bound is relative to the size of what is compared (logits, log-probs, gradients),
    never an absolute constant, and not per element (an entry that cancels to near 0 would
    need a bound of its own): float32 rounding follows the summation order, which differs
    between CPUs (Intel / AMD), compilers and shardings.
    """
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    assert actual.shape == desired.shape, (actual.shape, desired.shape, err_msg)
    scale = float(np.abs(desired).max()) if scale is None else float(scale)
    assert scale > 0, f"{err_msg}: nothing to compare against, the check would be vacuous"
    diff = float(np.abs(actual - desired).max())
    assert diff <= rtol * scale, f"{err_msg}: max |diff| {diff:.3g} > {rtol:g} * {scale:.3g}"


def np_grpo_loss(lp, old, ref, adv, mask, *, eps, eps_high, beta, loss_type, max_len=None):
    """float64 NumPy reference of TRL's GRPOTrainer._compute_loss (old=None: mu = 1), with
    rows without loss tokens handled as documented in reflax.grpo -> (loss, metrics)."""
    lp, adv = np.asarray(lp, np.float64), np.asarray(adv, np.float64)
    mask = np.asarray(mask, np.float64)
    old = lp if old is None else np.asarray(old, np.float64)
    eps_high = eps if eps_high is None else eps_high
    coef1 = np.exp(lp - old)
    coef2 = np.clip(coef1, 1 - eps, 1 + eps_high)
    a = adv[:, None]
    per_token = -np.minimum(coef1 * a, coef2 * a)
    kl = None
    if ref is not None:
        d = np.asarray(ref, np.float64) - lp
        kl = np.exp(d) - d - 1
        if beta != 0:
            per_token = per_token + beta * kl
    n_b = mask.sum(1)
    if loss_type == "token_mean":
        loss = (per_token * mask).sum() / mask.sum()
    elif loss_type == "seq_mean":
        seq = (per_token * mask).sum(1) / np.maximum(n_b, 1)
        loss = seq[n_b > 0].mean()
    else:
        loss = (per_token * mask).sum() / (lp.shape[0] * (max_len or lp.shape[1]))
    m = mask > 0
    metrics = {
        "num_tokens": mask.sum(),
        "num_seqs": float((n_b > 0).sum()),
        "ratio_mean": coef1[m].mean(),
        "kl": kl[m].mean() if kl is not None else 0.0,
        "clip_frac_low": ((coef1 < 1 - eps) & (a < 0))[m].mean(),
        "clip_frac_high": ((coef1 > 1 + eps_high) & (a > 0))[m].mean(),
    }
    return loss, metrics


def logprobs_entropy_from_logits(logits: Any, targets: Any, temperature: float = 1.0) -> Any:
    """Unfused jnp reference of reflax.grpo's fused LM-head log-probs: log_softmax(logits / T)
    at targets and the softmax entropy, ``[B, T, V], [B, T] -> ([B, T], [B, T])``."""
    import jax
    import jax.numpy as jnp

    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32) / temperature, axis=-1)
    lp = jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], axis=-1)[..., 0]
    return lp, -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def masked_max_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Max |a - b| over the positions where mask is True (a, b [B, T, ...], mask [B, T])."""
    return float(np.max(np.abs(np.asarray(a)[mask] - np.asarray(b)[mask])))
