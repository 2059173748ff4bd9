"""Architectures of the Hugging Face models the paper configs name, by model id: the shapes
of each model's config.json, written out so that ahead-of-time compiles and benchmarks
build abstract models without a download."""

from reflax.models import ModelConfig

_QWEN2_1P5B = ModelConfig(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_layers=28,
    num_heads=12,
    num_kv_heads=2,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
    qkv_bias=True,
    max_position_embeddings=32768,
)
_QWEN2_7B = ModelConfig(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_layers=28,
    num_heads=28,
    num_kv_heads=4,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=False,
    qkv_bias=True,
    max_position_embeddings=32768,
)
_LLAMA3_SCALING = (
    ("rope_type", "llama3"),
    ("factor", 8.0),  # 3.2-3B: 32.0 (no effect on shapes)
    ("low_freq_factor", 1.0),
    ("high_freq_factor", 4.0),
    ("original_max_position_embeddings", 8192),
)

# Hugging Face model id -> architecture (the shapes of each config.json; no download)
MODELS: dict[str, ModelConfig] = {
    "Qwen/Qwen2-1.5B-Instruct": _QWEN2_1P5B,
    "Qwen/Qwen2.5-1.5B-Instruct": _QWEN2_1P5B,
    "Qwen/Qwen2-7B-Instruct": _QWEN2_7B,
    "Qwen/Qwen2.5-7B-Instruct": _QWEN2_7B,
    "Qwen/Qwen2.5-0.5B-Instruct": ModelConfig(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        qkv_bias=True,
    ),
    "Qwen/Qwen2.5-3B-Instruct": ModelConfig(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=11008,
        num_layers=36,
        num_heads=16,
        num_kv_heads=2,
        head_dim=128,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        qkv_bias=True,
    ),
    "meta-llama/Llama-3.1-8B-Instruct": ModelConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_SCALING,
        tie_word_embeddings=False,
        max_position_embeddings=131072,
        model_type="llama",
    ),
    "meta-llama/Llama-3.2-3B-Instruct": ModelConfig(
        vocab_size=128256,
        hidden_size=3072,
        intermediate_size=8192,
        num_layers=28,
        num_heads=24,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_SCALING,
        tie_word_embeddings=True,
        max_position_embeddings=131072,
        model_type="llama",
    ),
}
