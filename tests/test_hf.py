"""Hugging Face checkpoints: logits parity with transformers, sharded files, export, bad input."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from helpers import (
    assert_close_scaled,
    chatml_tokenizer,
    cpu_mesh,
    load_torch,
    padded_batch,
    tiny_hf_checkpoint,
    torch_logits,
)

from reflax import api
from reflax.checkpoint import CheckpointError
from reflax.models.config import UnsupportedModelError
from reflax.models.hf import iter_hf_tensors, load_pretrained, save_pretrained
from reflax.models.safetensors_io import parse_size, read_safetensors_header

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # wavelengths of head_dim 8..16 fall below, between and above 64/4..64/1: all three branches
    "original_max_position_embeddings": 64,
}

# (arch, overrides): tiny, but covering tying, biases, GQA ratios, rope types and odd sizes
PARITY_CASES = {
    "qwen2-tied-gqa": ("qwen2", {}),
    "qwen2-untied-mqa-prime": (
        "qwen2",
        dict(
            tie_word_embeddings=False,
            num_key_value_heads=1,
            hidden_size=37,
            intermediate_size=53,
            vocab_size=127,
        ),
    ),
    "llama-mha-llama3rope": (
        "llama",
        dict(num_key_value_heads=4, head_dim=16, hidden_size=48, rope_parameters=LLAMA3_ROPE),
    ),
    "llama-tied-biases-linear": (
        "llama",
        dict(
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            num_attention_heads=6,
            num_key_value_heads=2,
            hidden_size=24,
            head_dim=4,
            vocab_size=113,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
        ),
    ),
    "mistral-gqa4": ("mistral", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=4)),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_logits_match_transformers(tmp_path, case):
    arch, overrides = PARITY_CASES[case]
    path = tiny_hf_checkpoint(tmp_path, arch, **overrides)
    model = load_pretrained(path)
    vocab = model.config.vocab_size
    # left-padded, right-padded and full rows in one batch
    tokens, mask = padded_batch(vocab, [5, 9, 3, 9], 9, left=[True, False, False, True])
    ours = np.asarray(api.logits(model, tokens, mask))
    ref = torch_logits(path, tokens, mask)
    assert ours.shape == ref.shape == (4, 9, vocab)
    assert_close_scaled(ours[mask], ref[mask], 2e-5)


@pytest.mark.parametrize("top_level", [False, True])
def test_llama3_rope_without_original_max_positions(tmp_path, top_level):
    """A llama3 rope config without original_max_position_embeddings falls back as
    transformers does: to a top-level original_max_position_embeddings if there is one,
    else to max_position_embeddings (here 256 and 128: all three rope branches either way)."""
    path = tiny_hf_checkpoint(tmp_path, "llama", head_dim=16, hidden_size=48)
    config = json.loads((path / "config.json").read_text())
    rope = {k: v for k, v in LLAMA3_ROPE.items() if k != "original_max_position_embeddings"}
    config.pop("rope_parameters", None)
    config.update(rope_scaling=rope, rope_theta=rope["rope_theta"])  # a transformers 4.x config
    if top_level:
        config["original_max_position_embeddings"] = 128
    (path / "config.json").write_text(json.dumps(config))
    model = load_pretrained(path)
    expected = 128 if top_level else config["max_position_embeddings"]
    assert model.config.rope_scaling_dict["original_max_position_embeddings"] == expected
    tokens, mask = padded_batch(model.config.vocab_size, [9, 6], 9, left=[False, True])
    ours = np.asarray(api.logits(model, tokens, mask))
    ref = torch_logits(path, tokens, mask)
    assert_close_scaled(ours[mask], ref[mask], 1e-4)


def test_weights_match_state_dict(tmp_path):
    path = tiny_hf_checkpoint(tmp_path, "llama", attention_bias=True, mlp_bias=True)
    ours = dict(iter_hf_tensors(load_pretrained(path)))
    ref = {k: v.numpy() for k, v in load_torch(path).state_dict().items()}
    assert set(ours) == set(ref)
    for name, value in ours.items():
        np.testing.assert_array_equal(value, ref[name], err_msg=name)


def test_bf16_checkpoint_loads_exactly(tmp_path):
    path = tiny_hf_checkpoint(tmp_path, "qwen2", dtype="bfloat16")
    assert read_safetensors_header(str(path / "model.safetensors"))[
        "model.embed_tokens.weight"
    ].dtype == ("BF16")
    ours = dict(iter_hf_tensors(load_pretrained(path, param_dtype=jnp.float32)))
    ref = load_torch(path).state_dict()  # float32 from the bf16 file
    for name, value in ours.items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, ref[name].numpy(), err_msg=name)
    as_bf16 = load_pretrained(path, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    assert as_bf16.embed[...].dtype == jnp.bfloat16


def test_sharded_safetensors_load(tmp_path):
    single = tiny_hf_checkpoint(tmp_path, "qwen2", seed=3)
    sharded = tiny_hf_checkpoint(tmp_path, "qwen2", seed=3, max_shard_size="20KB")
    files = [f for f in os.listdir(sharded) if f.endswith(".safetensors")]
    assert len(files) > 2 and (sharded / "model.safetensors.index.json").exists()
    a = dict(iter_hf_tensors(load_pretrained(single)))
    b = dict(iter_hf_tensors(load_pretrained(sharded)))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize("tied", [True, False])
def test_export_round_trip(tmp_path, tied):
    src = tiny_hf_checkpoint(tmp_path, "qwen2", tie_word_embeddings=tied)
    model, tok = api.load(src)
    out = tmp_path / "export"
    # small shards: the index path of the writer is exercised too
    save_pretrained(model, out, tokenizer=tok, max_shard_size="16KB" if tied else "2GB")
    assert (out / "model.safetensors.index.json").exists() == tied
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32" and config["tie_word_embeddings"] == tied
    assert config["eos_token_id"] == tok.eos_token_id
    names = {n for f in os.listdir(out) if f.endswith(".safetensors") for n in _header(out / f)}
    assert ("lm_head.weight" in names) == (not tied)

    tokens, mask = padded_batch(model.config.vocab_size, [6, 4], 6, left=[True, False])
    ours = np.asarray(api.logits(model, tokens, mask))
    assert_close_scaled(torch_logits(out, tokens, mask)[mask], ours[mask], 2e-5)

    again, tok2 = api.load(out)
    for (n1, a), (n2, b) in zip(iter_hf_tensors(model), iter_hf_tensors(again)):
        assert n1 == n2
        np.testing.assert_array_equal(a, b, err_msg=n1)
    assert tok2.encode("hello") == tok.encode("hello")
    assert tok2.chat_template == tok.chat_template


def test_export_bfloat16(tmp_path):
    model = load_pretrained(tiny_hf_checkpoint(tmp_path, "llama", attention_bias=True))
    out = tmp_path / "bf16"
    save_pretrained(model, out, dtype="bfloat16")
    header = _header(out / "model.safetensors")
    assert {v["dtype"] for v in header.values()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert not (out / "generation_config.json").exists()  # no tokenizer, no stop ids to record
    torch_model = load_torch(out)
    for name, value in iter_hf_tensors(model):
        expected = value.astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(torch_model.state_dict()[name].numpy(), expected)


def test_export_from_sharded_model(tmp_path):
    path = tiny_hf_checkpoint(tmp_path, "qwen2", tie_word_embeddings=False)
    model = load_pretrained(path, mesh=cpu_mesh())
    assert model.lm_head[...].sharding.spec != jax.sharding.PartitionSpec()
    out = tmp_path / "from-mesh"
    save_pretrained(model, out)
    for (n1, a), (n2, b) in zip(iter_hf_tensors(model), iter_hf_tensors(load_pretrained(out))):
        assert n1 == n2
        np.testing.assert_array_equal(a, b, err_msg=n1)


def test_generation_config_lists_stop_tokens(tmp_path):
    model = load_pretrained(tiny_hf_checkpoint(tmp_path, "qwen2"))
    tok = chatml_tokenizer()
    save_pretrained(model, tmp_path / "gen", tokenizer=tok)
    gen = json.loads((tmp_path / "gen" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert gen["pad_token_id"] == tok.pad_token_id


def test_parse_size():
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("10KB") == 10_000
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="cannot parse"):
        parse_size("lots")


# ------------------------------------------------------------------------- bad input


def _header(file) -> dict:
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


@pytest.fixture
def no_device_arrays(monkeypatch):
    """Fails the test if the loader creates any parameter before the error."""
    calls = []
    original = jax.make_array_from_callback
    monkeypatch.setattr(
        jax, "make_array_from_callback", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    yield
    assert not calls, "parameters were created before validation failed"


def _rewrite(file, tensors_fn):
    from safetensors.torch import load_file, save_file

    tensors = tensors_fn(load_file(str(file)))
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_missing_config(tmp_path, no_device_arrays):
    path = tiny_hf_checkpoint(tmp_path, tokenizer=False)
    os.remove(path / "config.json")
    with pytest.raises(CheckpointError, match=r"no config\.json in .*"):
        load_pretrained(path)


def test_missing_safetensors(tmp_path, no_device_arrays):
    path = tiny_hf_checkpoint(tmp_path, tokenizer=False)
    os.remove(path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing safetensors file: no model\.safetensors"):
        load_pretrained(path)


def test_missing_shard_file(tmp_path, no_device_arrays):
    path = tiny_hf_checkpoint(tmp_path, max_shard_size="20KB", tokenizer=False)
    os.remove(path / sorted(f for f in os.listdir(path) if f.startswith("model-"))[-1])
    with pytest.raises(CheckpointError, match=r"missing safetensors file .*model-000\d\d-of-"):
        load_pretrained(path)


def test_garbage_safetensors(tmp_path, no_device_arrays):
    path = tiny_hf_checkpoint(tmp_path, tokenizer=False)
    (path / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt"):
        load_pretrained(path)


def test_bad_json_header(tmp_path, no_device_arrays):
    path = tiny_hf_checkpoint(tmp_path, tokenizer=False)
    (path / "model.safetensors").write_bytes(
        (16).to_bytes(8, "little") + b"{not json at all" + b"0"
    )
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header"):
        load_pretrained(path)


def test_truncated_safetensors(tmp_path, no_device_arrays):
    path = tiny_hf_checkpoint(tmp_path, tokenizer=False)
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated .*tensor '"):
        load_pretrained(path)


def test_unsupported_architecture(tmp_path, no_device_arrays):
    path = tiny_hf_checkpoint(tmp_path, tokenizer=False)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"config\.json: .*model_type='gpt2'"):
        load_pretrained(path)


def test_wrong_shape(tmp_path, no_device_arrays):
    import torch

    path = tiny_hf_checkpoint(tmp_path, tokenizer=False)
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite(path / "model.safetensors", lambda t: {**t, name: torch.zeros(48, 31)})
    with pytest.raises(
        CheckpointError, match=rf"tensor '{name}' in .*has shape \[48, 31\], expected \[48, 32\]"
    ):
        load_pretrained(path)


def test_missing_tensor(tmp_path, no_device_arrays):
    path = tiny_hf_checkpoint(tmp_path, tokenizer=False)
    name = "model.layers.0.self_attn.k_proj.bias"
    _rewrite(path / "model.safetensors", lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(CheckpointError, match=rf"missing tensor '{name}'"):
        load_pretrained(path)


def test_missing_lm_head_when_untied(tmp_path):
    path = tiny_hf_checkpoint(tmp_path, "llama", tokenizer=False)
    _rewrite(
        path / "model.safetensors", lambda t: {k: v for k, v in t.items() if "lm_head" not in k}
    )
    with pytest.raises(CheckpointError, match=r"missing tensor 'lm_head\.weight'"):
        load_pretrained(path)


def test_bad_paths(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere" / "model")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        load_pretrained(tmp_path / "file")
    with pytest.raises(CheckpointError, match="could not be fetched from the Hugging Face Hub"):
        load_pretrained("reflax-tests/no-such-model")
