"""Model families beyond Qwen2/Llama through the one block: Qwen3 (q/k norm), Phi-3
(fused qkv / gate_up, longrope, partial rotary), sliding windows (Mistral, Qwen2/Qwen3).

Each family: logits parity with transformers, greedy generation parity with
transformers' `generate`, and export round trip (reflax saves, transformers loads).

Sliding windows: transformers counts a window in slots, left padding included; reflax
counts a row's real tokens (so a row's result does not depend on how it is padded). The
two agree on rows without left padding, which is what the references use.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import (
    cpu_mesh,
    load_torch,
    masked_max_diff,
    padded_batch,
    tiny_hf_checkpoint,
    tiny_torch_model,
    torch_logits,
)

from reflax import api
from reflax.models import Decoder, ModelConfig, abstract_model
from reflax.models.config import UnsupportedModelError
from reflax.models.hf import from_hf_state_dict, iter_hf_tensors, load_pretrained, save_pretrained
from reflax.sampler import Sampler, left_pad
from reflax.sampling import SamplingSpec

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def longrope(rotary_dims: int) -> dict:
    """A longrope dict (Phi-3.5-mini's kind) with distinct short and long factors."""
    n = rotary_dims // 2
    return {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0 + 0.5 * i for i in range(n)],
        "long_factor": [2.0 + 3.0 * i for i in range(n)],
    }


CASES = {
    "qwen3-untied-bias": ("qwen3", dict(attention_bias=True, tie_word_embeddings=False)),
    # q/k/v width (4 heads x 16) differs from the hidden size (32), as in real Qwen3
    "qwen3-tied-wide-heads": ("qwen3", dict(head_dim=16)),
    "phi3-fused": ("phi3", {}),
    # original context 8 < the 9-token batch: transformers switches to the long factors;
    # half the head rotated; a window of 5
    "phi3-longrope-long-partial-window": (
        "phi3",
        dict(
            partial_rotary_factor=0.5,
            rope_parameters={**longrope(4), "partial_rotary_factor": 0.5},
            original_max_position_embeddings=8,
            sliding_window=5,
        ),
    ),
    "phi3-longrope-short": (
        "phi3",
        dict(rope_parameters=longrope(8), original_max_position_embeddings=64),
    ),
    "mistral-window": ("mistral", dict(sliding_window=4)),
    # the window only from layer 1 on, as Qwen2's max_window_layers says
    "qwen2-window-upper-layers": (
        "qwen2",
        dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=3, max_window_layers=1),
    ),
    "qwen3-window": ("qwen3", dict(use_sliding_window=True, sliding_window=4, max_window_layers=0)),
}


def _slides(config) -> bool:
    return config.layer_windows() is not None


def _reference(path, tokens, mask, sliding: bool) -> np.ndarray:
    """transformers' logits; with a window, of the rows right-padded (see the module doc)."""
    if not sliding:
        return torch_logits(path, tokens, mask)
    lengths = mask.sum(-1)
    right = np.zeros_like(tokens)
    for b, n in enumerate(lengths):
        right[b, :n] = tokens[b][mask[b]]
    ref = torch_logits(path, right, np.arange(tokens.shape[1]) < lengths[:, None])
    out = np.zeros_like(ref)
    for b, n in enumerate(lengths):
        out[b, mask[b]] = ref[b, :n]
    return out


def _tolerance(ref: np.ndarray, mask: np.ndarray) -> float:
    return 1e-4 * max(1.0, float(np.abs(ref[mask]).max()))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    arch, overrides = CASES[case]
    path = tiny_hf_checkpoint(tmp_path, arch, **overrides)
    model = load_pretrained(path)
    c = model.config
    tokens, mask = padded_batch(c.vocab_size, [5, 9, 3, 9], 9, left=[True, False, False, True])
    ours = np.asarray(api.logits(model, tokens, mask))
    ref = _reference(path, tokens, mask, _slides(c))
    assert masked_max_diff(ours, ref, mask) <= _tolerance(ref, mask)
    if _slides(c):  # the window changes the result, so the parity above covers it
        full = dataclasses.replace(c, sliding_window=None, sliding_layers=None)
        unwindowed = _with_config(model, full)
        other = np.asarray(api.logits(unwindowed, tokens, mask))
        assert masked_max_diff(other, ref, mask) > 100 * _tolerance(ref, mask)


def _with_config(model, config):
    """The same parameters under another config (of the same shapes)."""
    graphdef, _ = nnx.split(abstract_model(config))
    return nnx.merge(graphdef, nnx.state(model))


def test_config_fields(tmp_path):
    """What each family's config.json turns into (transformers' reading of it)."""
    qwen2 = load_pretrained(
        tiny_hf_checkpoint(tmp_path, "qwen2", **CASES["qwen2-window-upper-layers"][1])
    ).config
    assert qwen2.sliding_window == 3 and qwen2.sliding_layers == (False, True, True)
    assert qwen2.layer_windows() == (None, 3, 3)
    # use_sliding_window off: no window, whatever sliding_window says
    off = tiny_hf_checkpoint(tmp_path, "qwen2", use_sliding_window=False, sliding_window=3)
    assert load_pretrained(off).config.layer_windows() is None
    phi = load_pretrained(
        tiny_hf_checkpoint(tmp_path, "phi3", **CASES["phi3-longrope-long-partial-window"][1])
    ).config
    assert phi.rotary_dim == 4 and phi.sliding_window == 5
    assert phi.rope_scaling_dict["original_max_position_embeddings"] == 8
    qwen3 = load_pretrained(tiny_hf_checkpoint(tmp_path, "qwen3")).config
    assert qwen3.qk_norm and not qwen3.qkv_bias and qwen3.layer_windows() is None
    # longrope factors that do not fit the rotary dims: one clear error, before any compute
    hf = dict(phi.to_hf(), rope_scaling=None)
    hf["rope_parameters"] = {**hf["rope_parameters"], "short_factor": [1.0] * 3}
    with pytest.raises(UnsupportedModelError, match="short_factor has 3 entries; 2 expected"):
        ModelConfig.from_hf(hf)


def _from_torch(hf) -> Decoder:
    tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    return from_hf_state_dict(ModelConfig.from_hf(hf.config.to_dict()), tensors)


def _hf_greedy(hf, prompt: list[int], n: int) -> np.ndarray:
    """transformers' greedy `generate` on one unpadded prompt -> its n new tokens."""
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=n,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].numpy()


GENERATE_CASES = [
    "qwen3-untied-bias",
    "phi3-fused",
    "phi3-longrope-short",
    "mistral-window",
    "qwen2-window-upper-layers",
]


@pytest.mark.parametrize("case", GENERATE_CASES)
def test_greedy_generate_matches_transformers(case):
    arch, overrides = CASES[case]
    hf = tiny_torch_model(arch, seed=1, **overrides)
    model = _from_torch(hf)
    rng = np.random.default_rng(0)
    # windows: unpadded prompts (see the module doc); else ragged, left-padded
    lengths = [6, 6, 6] if _slides(model.config) else [6, 2, 4]
    prompts = [rng.integers(1, model.config.vocab_size, n).tolist() for n in lengths]
    n = 8  # long enough for the window to slide
    ids, mask = left_pad(prompts, max(lengths))
    with torch.no_grad():
        ref = hf.generate(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            do_sample=False,
            max_new_tokens=n,
            eos_token_id=None,
            pad_token_id=0,
        )[:, max(lengths) :].numpy()
    sampler = Sampler(
        model, prompt_buckets=8, gen_buckets=8, cache_buckets=16, compiler_options=FAST_COMPILE
    )
    out = sampler.sample(model, prompts, SamplingSpec(greedy=True), max_new_tokens=n, rng=0)
    np.testing.assert_array_equal(out.tokens, ref)
    # the greedy choices are not near-ties (else float noise could flip them)
    seqs = [p + c for p, c in zip(prompts, out.completions())]
    tokens, mask = left_pad(seqs, max(map(len, seqs)))
    logits = np.asarray(api.logits(model, tokens, mask))
    for b in range(len(prompts)):
        step = logits[b, -n - 1 : -1]
        top2 = np.sort(step, axis=-1)[:, -2:]
        assert (top2[:, 1] - top2[:, 0]).min() > 1e-3


def test_sampling_past_the_longrope_context_is_refused():
    """transformers recomputes the cache when a sequence passes longrope's original context
    (the factors change for every position); the sampler refuses instead of diverging. It
    counts the positions a call uses, not its bucketed cache slots: 3 prompt tokens and 5
    new ones fill the 8 positions of the context in 4 + 8 slots, and decode as transformers
    does; a continuation counts the tokens its rows already hold."""
    arch, overrides = CASES["phi3-longrope-long-partial-window"]  # original context 8
    hf = tiny_torch_model(arch, **overrides)
    model = _from_torch(hf)
    sampler = Sampler(model, prompt_buckets=4, gen_buckets=4, compiler_options=FAST_COMPILE)
    greedy = SamplingSpec(greedy=True)
    prompt = [1, 2, 3]
    out = sampler.sample(model, [prompt], greedy, max_new_tokens=5, rng=0)  # 12 slots
    np.testing.assert_array_equal(out.tokens[0], _hf_greedy(hf, prompt, 5))
    with pytest.raises(ValueError, match="longrope original context of 8 positions"):
        sampler.sample(model, [prompt], greedy, max_new_tokens=6, rng=0)
    with pytest.raises(ValueError, match="longrope original context of 8 positions"):
        sampler.continue_rows(model, out.cached, [[4]], greedy, max_new_tokens=1, rng=0)


EXPORT_CASES = [
    "qwen3-untied-bias",
    "phi3-longrope-long-partial-window",
    "qwen2-window-upper-layers",
]


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_export_round_trip(tmp_path, case):
    arch, overrides = CASES[case]
    model = load_pretrained(tiny_hf_checkpoint(tmp_path, arch, **overrides))
    out = tmp_path / "export"
    save_pretrained(model, out, max_shard_size="16KB")  # several files: the index path too
    tokens, mask = padded_batch(model.config.vocab_size, [7, 4], 7, left=[False, False])
    ours = np.asarray(api.logits(model, tokens, mask))
    ref = torch_logits(out, tokens, mask)
    assert masked_max_diff(ours, ref, mask) <= _tolerance(ref, mask)
    again = load_pretrained(out)
    assert again.config == model.config
    for (n1, a), (n2, b) in zip(iter_hf_tensors(model), iter_hf_tensors(again)):
        assert n1 == n2
        np.testing.assert_array_equal(a, b, err_msg=n1)
    # transformers holds exactly the tensors reflax wrote (Phi-3: fused)
    state = {k: v.numpy() for k, v in load_torch(out).state_dict().items()}
    ours_hf = dict(iter_hf_tensors(model))
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    assert set(ours_hf) == set(state) - tied
    for name, value in ours_hf.items():
        np.testing.assert_array_equal(value, state[name], err_msg=name)


def test_fused_checkpoint_loads_sharded(tmp_path):
    """Phi-3's fused tensors read shard by shard on a (2, 2, 2) mesh: each shard of q/k/v and
    gate/up is a row range of its fused tensor."""
    path = tiny_hf_checkpoint(tmp_path, "phi3", num_key_value_heads=4)
    sharded = load_pretrained(path, mesh=cpu_mesh())
    assert sharded.layers.k_proj[...].sharding.spec == jax.sharding.PartitionSpec(
        None, "fsdp", "tensor"
    )
    for (n1, a), (_, b) in zip(iter_hf_tensors(sharded), iter_hf_tensors(load_pretrained(path))):
        np.testing.assert_array_equal(a, b, err_msg=n1)
    ref = {k: v.numpy() for k, v in load_torch(path).state_dict().items()}
    for name, value in iter_hf_tensors(sharded):
        np.testing.assert_array_equal(value, ref[name], err_msg=name)


def test_window_counts_tokens_not_padding():
    """A row's sliding window covers its own last tokens however it is padded: greedy tokens
    of a ragged (left-padded) batch equal transformers' on each prompt alone, and a
    continuation (padding gaps between turns) equals sampling from scratch."""
    arch, overrides = CASES["mistral-window"]
    hf = tiny_torch_model(arch, seed=2, **overrides)
    model = _from_torch(hf)
    kw = dict(prompt_buckets=8, gen_buckets=8, cache_buckets=32, compiler_options=FAST_COMPILE)
    sampler = Sampler(model, **kw)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, model.config.vocab_size, n).tolist() for n in (7, 2, 5)]
    greedy = dict(max_new_tokens=6, rng=0)
    out = sampler.sample(model, prompts, SamplingSpec(greedy=True), **greedy)
    for p, tokens in zip(prompts, out.tokens):
        np.testing.assert_array_equal(tokens, _hf_greedy(hf, p, 6))
    turn = [[5, 6], [7], [8, 9, 10]]
    more = sampler.continue_rows(model, out.cached, turn, SamplingSpec(greedy=True), **greedy)
    seqs = [p + c + t for p, c, t in zip(prompts, out.completions(), turn)]
    scratch = sampler.sample(model, seqs, SamplingSpec(greedy=True), **greedy)
    np.testing.assert_array_equal(more.tokens, scratch.tokens)
