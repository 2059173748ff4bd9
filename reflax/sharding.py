"""The device mesh and the one table that says how arrays are laid out on it.

Every array reflax shards (parameters, optimizer state, KV cache, batches,
activations) is described by *logical* axis names; `LOGICAL_RULES` maps them to
mesh axes. Change the table, not the model code, to change the layout.

Mesh axes:
  data   - pure data parallelism (parameters replicated)
  fsdp   - data parallelism with parameters and optimizer state sharded
  tensor - megatron-style tensor parallelism over heads / mlp / vocab

The train step's LM head is vocabulary-parallel: the vocabulary is split over the axes
that shard the parameters ("vocab_shards": tensor, fsdp), and each device scores all rows
of its data replica ("data_rows") against its slice (`reflax.trainer`), so the [D, V]
head is never gathered whole.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

# the mesh axes, in this order in every mesh (meanings in the module docstring)
MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None for replicated)
LOGICAL_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    # the train step's LM head (module docstring): the vocabulary over the axes that shard
    # the parameters, the rows over the data axis only
    "vocab_shards": ("tensor", "fsdp"),
    "data_rows": "data",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "layers": None,
    "length": None,
    "head_dim": None,
    "norm": None,
    "lora_rank": None,  # a LoRA adapter's rank: small, never split
}

# parameter leaf name -> logical axes of that array (stacked layers lead with "layers")
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "final_norm": ("norm",),
    "attn_norm": ("layers", "norm"),
    "mlp_norm": ("layers", "norm"),
    "q_proj": ("layers", "embed", "heads"),
    "k_proj": ("layers", "embed", "kv_heads"),
    "v_proj": ("layers", "embed", "kv_heads"),
    "o_proj": ("layers", "heads", "embed"),
    "q_bias": ("layers", "heads"),
    "k_bias": ("layers", "kv_heads"),
    "v_bias": ("layers", "kv_heads"),
    "o_bias": ("layers", "norm"),
    "gate_proj": ("layers", "embed", "mlp"),
    "up_proj": ("layers", "embed", "mlp"),
    "down_proj": ("layers", "mlp", "embed"),
    "gate_bias": ("layers", "mlp"),
    "up_bias": ("layers", "mlp"),
    "down_bias": ("layers", "norm"),
    "q_norm": ("layers", "head_dim"),
    "k_norm": ("layers", "head_dim"),
}

# LoRA (reflax.models.lora): the projections that can carry an adapter, and an adapter's
# leaf names, `<projection>_lora_a` [L, in, r] and `<projection>_lora_b` [L, r, out]. Each is
# sharded along its big dim as the projection's kernel is; the rank stays whole.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_A, LORA_B = "_lora_a", "_lora_b"
PARAM_AXES.update({n + LORA_A: (*PARAM_AXES[n][:2], "lora_rank") for n in LORA_TARGETS})
PARAM_AXES.update({n + LORA_B: ("layers", "lora_rank", PARAM_AXES[n][2]) for n in LORA_TARGETS})

# KV cache [L, B, S, K, Dh] and its slot mask [B, S]
CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")
CACHE_MASK_AXES = ("batch", "length")

log = logging.getLogger(__name__)


def make_mesh(
    shape: Mapping[str, Any] | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices; one size may be -1 for "the rest".

    `shape` may also name `across_hosts`: the axis whose first split separates the
    processes (hosts). Left empty, jax's device order decides (on one host, or the
    outermost axis across hosts). Data parallelism across hosts is the usual choice,
    as it sends the least over the slower links between hosts.

    Axis types are Auto so that XLA's sharding propagation handles the
    matmuls (Explicit axes would demand a sharding on every op).
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = dict(shape or {"data": 1, "fsdp": -1, "tensor": 1})
    across = shape.pop("across_hosts", "") or ""
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
    if across and across not in MESH_AXES:
        raise ValueError(f"mesh.across_hosts must be one of {MESH_AXES}, got {across!r}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {shape}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or len(devices) % known:
        raise ValueError(f"mesh {shape} does not divide {len(devices)} devices")
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
            f"have {len(devices)}"
        )
    types = (AxisType.Auto,) * len(MESH_AXES)
    if not across:
        return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=types, devices=devices)
    # devices in process order, the chosen axis outermost, then moved back to its place
    k = MESH_AXES.index(across)
    order = [k] + [i for i in range(len(MESH_AXES)) if i != k]
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    grid = np.array(ordered, dtype=object).reshape([sizes[i] for i in order])
    return Mesh(grid.transpose(np.argsort(order)), MESH_AXES, axis_types=types)


def _mesh_axis_size(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(
    logical: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None
) -> PartitionSpec:
    """PartitionSpec for logical axes; with shape and mesh, axes that don't divide stay whole."""
    spec = []
    used: set[str] = set()
    for i, name in enumerate(logical):
        axes = LOGICAL_RULES.get(name) if name is not None else None
        if axes is not None:
            flat = (axes,) if isinstance(axes, str) else tuple(axes)
            if used & set(flat):  # a mesh axis may shard only one dimension
                axes = None
            elif shape is not None and mesh is not None:
                size = _mesh_axis_size(mesh, axes)
                if shape[i] % size:
                    log.debug(
                        "dim %d of %s (%d) not divisible by %s=%d: replicated",
                        i,
                        logical,
                        shape[i],
                        axes,
                        size,
                    )
                    axes = None
            if axes is not None:
                used |= set(flat)
        spec.append(axes)
    return PartitionSpec(*spec)


def named_sharding(
    mesh: Mesh, logical: Sequence[str | None], shape: Sequence[int]
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical, shape, mesh))


def _leaf_name(path: tuple) -> str:
    # nnx.State paths end in GetAttrKey("value"); the parameter's name is the last dict key
    for key in reversed(path):
        if isinstance(key, jax.tree_util.DictKey) and isinstance(key.key, str):
            return key.key
    raise ValueError(f"cannot name parameter at path {path}")


def param_logical_axes(path: tuple, ndim: int) -> tuple[str | None, ...]:
    name = _leaf_name(path)
    if name not in PARAM_AXES:
        raise KeyError(f"no sharding rule for parameter {name!r}; add it to PARAM_AXES")
    axes = PARAM_AXES[name]
    if len(axes) != ndim:
        raise ValueError(f"parameter {name!r} has {ndim} dims but rule {axes}")
    return axes


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """NamedShardings for a parameter pytree (arrays or ShapeDtypeStructs)."""

    def one(path, x):
        return named_sharding(mesh, param_logical_axes(path, x.ndim), x.shape)

    return jax.tree_util.tree_map_with_path(one, params)


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Leading axis over (data, fsdp), the rest replicated."""
    return named_sharding(mesh, ("batch",) + (None,) * (len(shape) - 1), shape)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Sharding hint for an activation; a no-op outside a mesh context (`jax.set_mesh`)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, x.shape, mesh))


def local_size(size: int, logical: str) -> int:
    """A dimension of `size` along `logical` as one device holds it in the current mesh
    context (`jax.set_mesh`): divided by its mesh axes where they divide it."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return size
    return size // _mesh_axis_size(mesh, logical_to_spec((logical,), (size,), mesh)[0])


def put(tree: Any, shardings: Any) -> Any:
    """A host pytree, identical on every process, as global arrays with `shardings`.

    Each addressable shard is cut from the host copy, so any mesh works, including
    shards that span processes (multi-host). PRNG key arrays keep their type.
    """
    return jax.tree.map(_put_one, tree, shardings)


def _put_one(x: Any, sharding: NamedSharding) -> jax.Array:
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        # the key data's trailing key-word dims are left whole by the sharding's spec
        data = _put_one(np.asarray(jax.random.key_data(x)), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    x = np.asarray(x)
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def fetch(tree: Any) -> Any:
    """Global arrays -> numpy, on every process (an all-gather where shards are remote)."""

    def one(x: Any) -> Any:
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(jax.device_get(x))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)
