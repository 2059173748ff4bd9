"""LoRA: low-rank adapters on the decoder's projections, trained while the base is frozen.

A projection W [in, out] that carries an adapter computes

    y = x @ W + (x @ A) @ B * alpha / r        A [in, r], B [r, out]

in the train step, the prefill and the decode loop alike (`decoder._dense`); W + A @ B *
scale is formed only for the merged HF export (`merged`). B starts at zero, so a fresh
adapter leaves the model exactly as it was; A is drawn from a fixed seed with PEFT's
default distribution (kaiming-uniform, a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))).

The adapters are `LoraParam`s (a kind of `nnx.Param`) in the decoder's stacked `layers`,
named `<projection>_lora_a` [L, in, r] and `<projection>_lora_b` [L, r, out]
(`reflax.sharding.LORA_A`, `LORA_B`; sharded along their big dim as the projection is).
`split` separates a model's state into (adapters, base): the train state and its
optimizer hold the adapters only, the frozen base is passed beside them, and the base
alone (`base_model`'s graph, no adapters) is the KL reference, so no second copy of the
weights exists. `save_peft` writes the adapters as a PEFT directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors.numpy import save_file

from reflax import distributed
from reflax.models.decoder import Decoder, param_shapes
from reflax.models.hf import hf_param_specs
from reflax.sharding import LORA_A, LORA_B, LORA_TARGETS, PARAM_AXES, fetch, named_sharding

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Which projections carry an adapter, of what rank, scaled by alpha / rank."""

    rank: int
    alpha: float
    targets: tuple[str, ...]

    def __post_init__(self):
        problems = []
        if not isinstance(self.rank, int) or self.rank < 1:
            problems.append(f"rank must be an integer >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            problems.append(f"alpha must be > 0, got {self.alpha!r}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if not self.targets or unknown or len(set(self.targets)) != len(self.targets):
            problems.append(
                f"targets must be distinct names among {LORA_TARGETS}, got {tuple(self.targets)}"
            )
        if problems:
            raise ValueError("LoRA: " + "; ".join(problems))

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    @classmethod
    def from_config(cls, lora: Any) -> LoraSpec | None:
        """From a run config's `lora` section; None when `rank` is 0 (full fine-tuning)."""
        if lora.rank == 0:
            return None
        return cls(int(lora.rank), float(lora.alpha), tuple(lora.targets))


class LoraParam(nnx.Param):
    """An adapter's A or B: the trainable parameters of a LoRA run."""


def adapter_shapes(config: Any, spec: LoraSpec) -> dict[str, tuple[int, ...]]:
    """Leaf name -> shape of every adapter: A [L, in, r], B [L, r, out]."""
    layers = param_shapes(config)["layers"]
    out = {}
    for t in spec.targets:
        L, n_in, n_out = layers[t]
        out[t + LORA_A] = (L, n_in, spec.rank)
        out[t + LORA_B] = (L, spec.rank, n_out)
    return out


def init_adapters(
    config: Any, spec: LoraSpec, *, seed: int = 0, dtype: Any = jnp.float32, mesh: Mesh | None
) -> dict[str, jax.Array]:
    """Fresh adapters, created in their shards: A uniform in +-1/sqrt(in) from `seed`, B 0."""
    shapes = adapter_shapes(config, spec)

    def init() -> dict[str, jax.Array]:
        out = {}
        for i, (name, shape) in enumerate(shapes.items()):
            if name.endswith(LORA_B):
                out[name] = jnp.zeros(shape, dtype)
            else:
                bound = 1.0 / math.sqrt(shape[1])
                key = jax.random.fold_in(jax.random.key(seed), i)
                out[name] = jax.random.uniform(key, shape, dtype, -bound, bound)
        return out

    if mesh is None:
        return jax.jit(init)()
    shardings = {n: named_sharding(mesh, PARAM_AXES[n], s) for n, s in shapes.items()}
    return jax.jit(init, out_shardings=shardings)()


def attach(model: Decoder, spec: LoraSpec, *, seed: int = 0, mesh: Mesh | None = None) -> Decoder:
    """`model` with fresh adapters on `spec.targets` (in place; its weights are untouched).
    An abstract model (`reflax.models.abstract_model`) gets abstract adapters (shapes and
    dtypes; the step's shardings come from `reflax.sharding`'s table): what an
    ahead-of-time compile of a LoRA step needs."""
    if model.lora_scale is not None:
        raise ValueError("the model already carries LoRA adapters")
    kernel = model.layers.q_proj.get_value()
    make = lambda: init_adapters(model.config, spec, seed=seed, dtype=kernel.dtype, mesh=mesh)
    adapters = jax.eval_shape(make) if isinstance(kernel, jax.ShapeDtypeStruct) else make()
    for name, value in adapters.items():
        setattr(model.layers, name, LoraParam(value))
    model.lora_scale = spec.scale
    return model


def adapter_names(model: Decoder) -> list[str]:
    return [k for k, v in vars(model.layers).items() if isinstance(v, LoraParam)]


def base_model(model: Decoder) -> Decoder:
    """A decoder sharing `model`'s base weights without its adapters (the KL reference's
    graph: `nnx.graphdef(base_model(model))`)."""
    graphdef, state = nnx.split(model)
    base = nnx.merge(graphdef, state, copy=True)  # new modules and variables, same arrays
    for name in adapter_names(base):
        delattr(base.layers, name)
    base.lora_scale = None
    return base


def split(params: nnx.State) -> tuple[nnx.State, nnx.State]:
    """A LoRA model's state -> (adapters, base)."""
    adapters, base = nnx.split_state(params, LoraParam, ...)
    return adapters, base


def join(base: nnx.State, adapters: nnx.State) -> nnx.State:
    """The whole model's state: the base and the adapters side by side (no array copied)."""
    return nnx.merge_state(base, adapters)


@jax.jit
def _merge_kernel(w: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    # [L, in, out] + [L, in, r] @ [L, r, out], summed in float32, in W's dtype
    delta = jnp.einsum("lir,lro->lio", a.astype(jnp.float32), b.astype(jnp.float32))
    return (w.astype(jnp.float32) + delta * scale).astype(w.dtype)


def merged(model: Decoder) -> Decoder:
    """The decoder without adapters whose adapted projections are W + A @ B * alpha / r:
    what the HF export writes. A model without adapters is returned as it is."""
    names = adapter_names(model)
    if not names:
        return model
    base = base_model(model)
    scale = jnp.float32(model.lora_scale)
    for name in names:
        if name.endswith(LORA_A):
            t = name[: -len(LORA_A)]
            w = getattr(model.layers, t)[...]
            a, b = getattr(model.layers, name)[...], getattr(model.layers, t + LORA_B)[...]
            getattr(base.layers, t)[...] = _merge_kernel(w, a, b, scale)
    return base


# --------------------------------------------------------------------------- PEFT


def _peft_modules(model: Decoder) -> dict[str, list[tuple[str, int, int]]]:
    """HF module (without `model.layers.{i}.`) -> its adapted parts: (target, first row of
    the HF weight's out dim, rows). Several parts where the HF checkpoint fuses
    projections (Phi-3's qkv_proj, gate_up_proj)."""
    targets = {n[: -len(LORA_A)] for n in adapter_names(model) if n.endswith(LORA_A)}
    modules: dict[str, list[tuple[str, int, int]]] = {}
    for spec in hf_param_specs(model.config):
        if spec.key[0] == "layers" and spec.key[1] in targets:
            module = spec.hf_names[0].split(".", 3)[-1].removesuffix(".weight")
            rows = spec.shape[-1]  # the out dim of [L, in, out]
            modules.setdefault(module, []).append((spec.key[1], spec.hf_offset, rows))
    return modules


def peft_tensors(model: Decoder) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(PEFT's tensors, adapter_config.json) of `model`'s adapters.

    PEFT names `base_model.model.<module>.lora_A.weight` [r, in] and `lora_B.weight`
    [out, r] and scales by lora_alpha / r. A fused HF module whose n parts are adapted
    gets one adapter of rank n * r, A the parts' A stacked, B block-diagonal in the parts'
    rows (zero rows for a part without an adapter), and alpha n * alpha: the same scale,
    the same sum.
    """
    if model.lora_scale is None:
        raise ValueError("the model carries no LoRA adapters")
    layers = model.layers
    r = next(getattr(layers, n)[...].shape[-1] for n in adapter_names(model) if n.endswith(LORA_A))
    alpha = model.lora_scale * r
    tensors: dict[str, np.ndarray] = {}
    rank_pattern, alpha_pattern = {}, {}
    for module, parts in _peft_modules(model).items():
        a = [fetch(getattr(layers, t + LORA_A)[...]) for t, _, _ in parts]  # [L, in, r] each
        b = [fetch(getattr(layers, t + LORA_B)[...]) for t, _, _ in parts]  # [L, r, out]
        n = len(parts)
        spec = next(s for s in hf_param_specs(model.config) if s.key == ("layers", parts[0][0]))
        out_rows = spec.hf_shape[0]  # the whole (fused) HF weight's out dim
        if n > 1:
            short = module.rsplit(".", 1)[-1]
            rank_pattern[short], alpha_pattern[short] = n * r, n * alpha
        for i in range(model.config.num_layers):
            big_a = np.concatenate([x[i].T for x in a], axis=0)  # [n r, in]
            big_b = np.zeros((out_rows, n * r), b[0].dtype)
            for j, (_, first, rows) in enumerate(parts):
                big_b[first : first + rows, j * r : (j + 1) * r] = b[j][i].T
            prefix = f"base_model.model.model.layers.{i}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(big_a)
            tensors[f"{prefix}.lora_B.weight"] = big_b
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in _peft_modules(model)}),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "base_model_name_or_path": None,
    }
    return tensors, config


def save_peft(model: Decoder, path: str | os.PathLike, base_model_name: str | None = None) -> None:
    """Write `model`'s adapters as a PEFT LoRA directory (adapter_config.json,
    adapter_model.safetensors) that `peft.PeftModel.from_pretrained` loads onto the base
    model. Every process must call it (the adapters are gathered); process 0 writes."""
    tensors, config = peft_tensors(model)
    config["base_model_name_or_path"] = base_model_name
    if not distributed.is_primary():
        return
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, PEFT_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(path, PEFT_CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
