"""Decoder configuration, derived from a Hugging Face `config.json`.

One dataclass covers the decoder-only families reflax trains: Qwen2/Qwen2.5
(q/k/v biases, optional sliding window from `max_window_layers` on), Qwen3
(q/k RMSNorm), Llama 3.x (rope_scaling type "llama3"), Mistral (sliding window)
and Phi-3/3.5 (fused qkv and gate_up tensors, longrope, partial rotary). Both
the transformers 4.x keys (`rope_theta`, `rope_scaling`) and the 5.x key
(`rope_parameters`) are read.
"""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
# transformers' defaults where config.json has no max_position_embeddings
_DEFAULT_MAX_POSITIONS = {
    "qwen2": 32768,
    "qwen3": 32768,
    "llama": 2048,
    "mistral": 131072,
    "phi3": 4096,
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
    # the forward's attention without a cache: "auto" (splash on TPU, cuDNN on GPU, XLA on
    # CPU), "xla", "splash" or "cudnn" (reflax.models.attention_kernels); decoding is XLA
    attention_impl: str = "auto"

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
        if rope_type == "longrope":
            for key in ("short_factor", "long_factor"):
                n = len(self.rope_scaling_dict.get(key) or ())
                if n != self.rotary_dim // 2:
                    raise UnsupportedModelError(
                        f"longrope {key} has {n} entries; {self.rotary_dim // 2} expected "
                        f"(half the {self.rotary_dim} rotary dims)"
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
        # transformers 5 stores rope settings in rope_parameters; 4.x in rope_theta/rope_scaling.
        rope = dict(hf.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        if not rope and hf.get("rope_scaling"):
            rope = dict(hf["rope_scaling"])
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        rope.pop("type", None)
        rotary = rope.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        if model_type == "phi3" and rope.get("rope_type") in ("su", "yarn"):
            rope["rope_type"] = "longrope"  # transformers' reading of older Phi-3 configs
        if rope.get("rope_type", "default") == "default":
            rope = {}
        elif rope["rope_type"] in ("llama3", "longrope"):
            # as transformers: a top-level value wins (Phi-3 always has one, default 4096),
            # else the rope dict's, else max_position_embeddings
            fallback = hf.get("original_max_position_embeddings")
            if fallback is None and model_type == "phi3":
                fallback = 4096
            if fallback is None:
                fallback = rope.get(
                    "original_max_position_embeddings", hf.get("max_position_embeddings")
                )
            if fallback is None:
                raise UnsupportedModelError(
                    f"{rope['rope_type']} rope scaling needs original_max_position_embeddings "
                    "or max_position_embeddings in config.json"
                )
            rope["original_max_position_embeddings"] = int(fallback)
        if rope.get("rope_type") == "longrope":
            for key in ("short_factor", "long_factor"):  # lists -> tuples: the config is hashed
                rope[key] = tuple(float(f) for f in rope[key])
        heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        num_layers = hf["num_hidden_layers"]
        attention_bias = bool(hf.get("attention_bias", False)) and model_type != "mistral"
        window, sliding_layers = _sliding_window(hf, model_type, num_layers)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=tuple(sorted(rope.items())) if rope else None,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or (model_type != "phi3" and attention_bias),
            o_bias=model_type in ("llama", "qwen3") and attention_bias,
            mlp_bias=model_type == "llama" and bool(hf.get("mlp_bias", False)),
            max_position_embeddings=int(
                hf.get("max_position_embeddings", _DEFAULT_MAX_POSITIONS[model_type])
            ),
            model_type=model_type,
            qk_norm=model_type == "qwen3",
            sliding_window=window,
            sliding_layers=sliding_layers,
            partial_rotary_factor=float(rotary) if model_type == "phi3" else 1.0,
        )

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict transformers reads back into the same architecture."""
        _check_exportable(self)
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
        if self.model_type in ("llama", "qwen3"):
            hf["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            hf["mlp_bias"] = self.mlp_bias
        if self.model_type in ("qwen2", "qwen3"):
            flags = self.sliding_layers or (True,) * self.num_layers
            hf["use_sliding_window"] = self.sliding_window is not None
            hf["sliding_window"] = self.sliding_window
            if self.sliding_window is not None:
                hf["layer_types"] = ["sliding_attention" if f else "full_attention" for f in flags]
                hf["max_window_layers"] = flags.index(True) if any(flags) else self.num_layers
        else:
            hf["sliding_window"] = self.sliding_window
        if self.model_type == "phi3":
            # Phi-3's class defaults (32000...) lie outside other vocabularies; a tokenizer
            # passed to save_pretrained sets the real ones
            hf.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
            # Phi-3 reads these top-level keys before its rope dict
            hf["partial_rotary_factor"] = self.partial_rotary_factor
            rope["partial_rotary_factor"] = self.partial_rotary_factor
            if "original_max_position_embeddings" in rope:
                hf["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
        return hf


def _sliding_window(
    hf: dict[str, Any], model_type: str, num_layers: int
) -> tuple[int | None, tuple[bool, ...] | None]:
    """(window, per-layer flags) as transformers reads them: Qwen2/Qwen3 slide only with
    use_sliding_window, in the layers `layer_types` marks (default: from layer
    max_window_layers on); Mistral and Phi-3 slide in every layer when sliding_window is set."""
    window = hf.get("sliding_window")
    if model_type in ("qwen2", "qwen3"):
        if not hf.get("use_sliding_window") or window is None:
            return None, None
        types = hf.get("layer_types")
        if types is None:
            first = hf.get("max_window_layers", 28)
            types = ["sliding_attention" if i >= first else "full" for i in range(num_layers)]
        if len(types) != num_layers:
            raise UnsupportedModelError(
                f"layer_types has {len(types)} entries for {num_layers} layers"
            )
        return int(window), tuple(t == "sliding_attention" for t in types)
    if model_type in ("mistral", "phi3") and window is not None:
        return int(window), None
    return None, None


def _check_exportable(c: ModelConfig) -> None:
    """The biases, norms and rope options the model's transformers class can express."""
    t = c.model_type
    biases = (c.qkv_bias, c.o_bias, c.mlp_bias)
    expressible = {
        "qwen2": [(True, False, False)],
        "qwen3": [(False, False, False), (True, True, False)],
        "llama": [(q, q, m) for q in (False, True) for m in (False, True)],
        "mistral": [(False, False, False)],
        "phi3": [(False, False, False)],
    }[t]
    if biases not in expressible:
        raise UnsupportedModelError(
            f"{t} cannot express qkv_bias={c.qkv_bias} o_bias={c.o_bias} mlp_bias={c.mlp_bias}"
        )
    if c.qk_norm != (t == "qwen3"):
        raise UnsupportedModelError(f"{t} cannot express qk_norm={c.qk_norm}")
    if c.partial_rotary_factor != 1.0 and t != "phi3":
        raise UnsupportedModelError(f"{t} cannot express a partial rotary factor")
    if c.sliding_layers is not None and t not in ("qwen2", "qwen3") and not all(c.sliding_layers):
        raise UnsupportedModelError(f"{t} slides in every layer or none")
