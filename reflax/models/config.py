"""Decoder configuration, derived from a Hugging Face `config.json`.

One dataclass covers the decoder-only families reflax trains: Qwen2/Qwen2.5
(q/k/v biases), Llama 3.x (rope_scaling type "llama3") and Mistral-style
configs. Both the transformers 4.x keys (`rope_theta`, `rope_scaling`) and the
5.x key (`rope_parameters`) are read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or options are outside what the decoder implements."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Hashable form of the rope scaling dict: (("rope_type", "llama3"), ("factor", 8.0), ...).
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 always; Llama when attention_bias
    o_bias: bool = False  # Llama attention_bias also biases o_proj
    mlp_bias: bool = False
    max_position_embeddings: int = 32768
    model_type: str = "qwen2"
    qk_norm: bool = False  # RMSNorm of q and k per head before rope (Qwen3)
    # keys limited to the `sliding_window` latest positions, in the layers flagged by
    # sliding_layers (None: all layers)
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] | None = None
    partial_rotary_factor: float = 1.0  # rope on the first head_dim * factor dims (Phi-3)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        rope_type = self.rope_scaling_dict.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})"
            )

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def layer_windows(self) -> tuple[int | None, ...] | None:
        """Each layer's sliding window (None: a full layer), or None when no layer slides."""
        if self.sliding_window is None:
            return None
        flags = self.sliding_layers or (True,) * self.num_layers
        if not any(flags):
            return None
        return tuple(self.sliding_window if f else None for f in flags)

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    @property
    def num_params(self) -> int:
        d, f, v, h = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.qkv_bias:
            attn += h * (self.num_heads + 2 * self.num_kv_heads)
        if self.o_bias:
            attn += d
        mlp = 3 * d * f + (2 * f + d if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * d + (2 * h if self.qk_norm else 0)
        head = 0 if self.tie_word_embeddings else d * v
        return v * d + self.num_layers * per_layer + d + head

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a transformers config dict (the contents of config.json)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            archs = hf.get("architectures")
            raise UnsupportedModelError(
                f"unsupported architecture: model_type={model_type!r} architectures={archs!r}; "
                f"reflax supports {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act={act!r} is not supported (only 'silu')")
        if hf.get("use_sliding_window"):
            raise UnsupportedModelError("sliding-window attention is not supported")
        if model_type == "mistral" and hf.get("sliding_window") is not None:
            raise UnsupportedModelError("Mistral sliding_window attention is not supported")
        # transformers 5 stores rope settings in rope_parameters; 4.x in rope_theta/rope_scaling.
        rope = dict(hf.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        if not rope and hf.get("rope_scaling"):
            rope = dict(hf["rope_scaling"])
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        rope.pop("type", None)
        if rope.get("rope_type", "default") == "default":
            rope = {}
        elif rope["rope_type"] == "llama3":
            # as transformers: a top-level value wins, else max_position_embeddings
            fallback = hf.get("original_max_position_embeddings")
            if fallback is None:
                fallback = rope.get(
                    "original_max_position_embeddings", hf.get("max_position_embeddings")
                )
            if fallback is None:
                raise UnsupportedModelError(
                    "llama3 rope scaling needs original_max_position_embeddings or "
                    "max_position_embeddings in config.json"
                )
            rope["original_max_position_embeddings"] = int(fallback)
        heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=tuple(sorted(rope.items())) if rope else None,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type != "qwen2" and attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            model_type=model_type,
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ModelConfig:
        file = os.path.join(path, "config.json")
        try:
            with open(file) as f:
                hf = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json in {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not valid JSON: {e}") from None
        return cls.from_hf(hf)

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict transformers reads back into the same architecture."""
        if self.model_type == "qwen2" and self.o_bias:
            raise UnsupportedModelError("Qwen2 has no o_proj bias")
        rope = {"rope_theta": self.rope_theta, **self.rope_scaling_dict}
        rope.setdefault("rope_type", "default")
        hf: dict[str, Any] = {
            "architectures": [SUPPORTED_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling_dict or None,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
        }
        if self.model_type != "qwen2":
            hf["attention_bias"] = self.qkv_bias
            hf["mlp_bias"] = self.mlp_bias
        if self.model_type == "qwen2":
            hf["use_sliding_window"] = False
        if self.model_type == "mistral":
            hf["sliding_window"] = None
        return hf
