"""Fused attention for the decoder's forward without a cache (training, a fresh prefill):
splash attention on TPU, cuDNN flash attention on GPU; XLA's einsum attention
(`decoder.attention`) everywhere else and for decoding.

`resolve` picks the implementation from `ModelConfig.attention_impl`: "auto" is splash
on TPU, cuDNN on GPU for 16-bit compute dtypes (cuDNN's flash attention has no float32)
and XLA otherwise; "xla", "splash" and "cudnn" force one. The platform is the one the
program is traced for (`target_platform`: the active mesh's devices, so a TPU slice
that is only described, compiled ahead of time on a CPU host, gets the TPU's choice).
Off TPU, splash runs in Pallas interpret mode, which is how the tests check it against
the XLA attention.

Splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) takes its mask as
a static object, skips the key blocks it rules out, and computes the rest in blocks of
at least 128 slots (rows are padded up to a multiple of the block). The masks here
(`LayoutMask`) describe a row's regions (`Layout`): a prefix attended causally, then
`groups` suffixes that each see the prefix and themselves causally, never another
suffix (the group-packed train row; an unpacked row is a prefix alone). Padding slots
(`mask == False`) get segment id 0 and real slots 1, so real queries see real keys only.

A sliding window is part of the static mask, so it counts slots: slot distances equal
the decoder's position distances when each row's real tokens are contiguous (left or
right padding; a packed row's prefix left-padded and its suffixes right-padded), which
is how reflax lays out its batches. The layer scan carries each layer's window as a
traced value; `splash_attention` switches between one kernel per distinct window.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax._src import config as jax_config
from jax._src import mesh as mesh_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec

from reflax.sharding import LOGICAL_RULES, MESH_AXES

IMPLS = ("auto", "xla", "splash", "cudnn")
# splash's key blocks are multiples of the TPU's 128 lanes; larger blocks (fewer grid
# steps) are used where the padded length divides by them
BLOCK_SIZES = (512, 256, 128)


def target_platform() -> str:
    """The platform of the program being traced: the active mesh's devices (`jax.set_mesh`;
    e.g. "tpu" for a described TPU slice compiled on a CPU host), else jax's default
    backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    return jax.default_backend() if device is None else device.platform


def resolve(impl: str, dtype: Any) -> str:
    """The implementation `impl` ("auto" | "xla" | "splash" | "cudnn") names on the target
    platform (`target_platform`), for compute dtype `dtype`."""
    if impl not in IMPLS:
        raise ValueError(f"attention_impl {impl!r} is not one of {IMPLS}")
    if impl != "auto":
        return impl
    backend = target_platform()
    if backend == "tpu":
        return "splash"
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "cudnn"
    return "xla"


@dataclasses.dataclass(frozen=True)
class Layout:
    """The regions of a row of `prefix + groups * suffix` slots: the prefix, attended
    causally, then `groups` suffixes of `suffix` slots, each attending to the prefix and
    causally to itself. An unpacked row is `Layout(T)`."""

    prefix: int
    groups: int = 0
    suffix: int = 0

    @property
    def length(self) -> int:
        return self.prefix + self.groups * self.suffix


def layout_mask(layout: Layout, window: int | None, q: Any, k: Any) -> Any:
    """Whether query slot q may attend to key slot k (broadcasting int arrays, numpy on
    the host or jax inside the kernel; operators only, so both work).

    With a window, a suffix query's distance to a prefix key is counted as if the suffix
    followed the prefix directly (its position), not across the other suffixes. Slots
    past the layout (the padding up to a block multiple) see each other causally, so no
    query row is empty.
    """
    Lp, G, Ls, P = layout.prefix, layout.groups, layout.suffix, layout.length

    def near(dist: Any) -> Any:
        return True if window is None else dist < window

    causal = k <= q
    ok = (q < Lp) & causal & near(q - k)
    for g in range(G):
        start = Lp + g * Ls
        own = (k >= start) & causal & near(q - k)
        shared = (k < Lp) & near(q - g * Ls - k)
        ok = ok | ((q >= start) & (q < start + Ls) & (own | shared))
    return ok | ((q >= P) & (k >= P) & causal)


class LayoutMask(splash_mask._ComputableMask):
    """`layout_mask` as a splash mask over `padded` slots: computed inside the kernel for
    the blocks it cuts, never materialised as a [padded, padded] array."""

    def __init__(self, layout: Layout, window: int | None, padded: int):
        self.layout, self.window = layout, window
        super().__init__((padded, padded), functools.partial(layout_mask, layout, window))

    def _key(self) -> tuple:
        return (self.shape, self.layout, self.window)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LayoutMask) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash((LayoutMask, self._key()))


def block_size(length: int) -> tuple[int, int]:
    """(block, padded length): the length rounded up to a multiple of 128 and the largest
    of `BLOCK_SIZES` dividing it."""
    padded = -(-length // BLOCK_SIZES[-1]) * BLOCK_SIZES[-1]
    return next(b for b in BLOCK_SIZES if padded % b == 0), padded


@contextlib.contextmanager
def _outside_mesh() -> Iterator[None]:
    """Arrays made here are placed on the default device, not on the active mesh's. A
    mesh of described devices (a TPU slice compiled ahead of time on a CPU host) can run
    nothing, so a compile-time constant placed on it fails; jax has no public way to
    leave a mesh inside a trace, hence its thread-local device context."""
    prev = jax_config.device_context.swap_local(mesh_lib.empty_concrete_mesh)
    try:
        yield
    finally:
        jax_config.device_context.set_local(prev)


@functools.lru_cache(maxsize=64)
def _kernel(
    layout: Layout, window: int | None, padded: int, heads: int, interpret: bool
) -> splash.SplashAttentionKernel:
    block, _ = block_size(padded)
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        use_fused_bwd_kernel=True,
    )
    mask = splash_mask.MultiHeadMask([LayoutMask(layout, window, padded)] * heads)
    # the mask's block tables become constants, not values of the trace that asked first
    with jax.ensure_compile_time_eval(), _outside_mesh():
        return splash.make_splash_mha(
            mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
        )


def _mesh_specs(q_shape: tuple[int, ...], kv_heads: int) -> tuple[Any, PartitionSpec] | None:
    """(mesh, spec of [B, H, T, Dh]) to run the kernel per shard under the active mesh:
    rows over the batch axes, heads over the tensor axis when both H and K divide by it
    (a GQA group must stay on one shard); None outside a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return None

    def fit(axes: Any, *sizes: int) -> Any:
        flat = (axes,) if isinstance(axes, str) else tuple(axes)
        n = math.prod(mesh.shape[a] for a in flat)
        return axes if all(s % n == 0 for s in sizes) else None

    rows = fit(LOGICAL_RULES["batch"], q_shape[0])
    heads = fit(LOGICAL_RULES["heads"], q_shape[1], kv_heads)
    return mesh, PartitionSpec(rows, heads, None, None)


def _splash_one_window(
    q: jax.Array,  # [B, H, Tp, Dh], scaled
    k: jax.Array,  # [B, K, Tp, Dh]
    v: jax.Array,  # [B, K, Tp, Dh]
    segments: jax.Array,  # [B, Tp] int32: 1 real, 0 padding
    layout: Layout,
    window: int | None,
    interpret: bool,
) -> jax.Array:
    def run(q, k, v, segments):  # per shard: local rows and heads
        kernel = _kernel(layout, window, q.shape[2], q.shape[1], interpret)

        def one(q, k, v, s):
            return kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s))

        return jax.vmap(one)(q, k, v, segments)

    sharded = _mesh_specs(q.shape, k.shape[1])
    if sharded is None:
        return run(q, k, v, segments)
    mesh, spec = sharded
    seg_spec = PartitionSpec(spec[0], None)
    run = jax.shard_map(
        run,
        mesh=mesh,
        in_specs=(spec, spec, spec, seg_spec),
        out_specs=spec,
        check_vma=False,
    )
    return run(q, k, v, segments)


def splash_attention(
    q: jax.Array,  # [B, T, H, Dh]
    k: jax.Array,  # [B, T, K, Dh]
    v: jax.Array,  # [B, T, K, Dh]
    mask: jax.Array,  # [B, T] bool, False on padding
    layout: Layout,
    window: jax.Array | int | None = None,
    windows: tuple[int | None, ...] | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Grouped-query attention of q over k/v with `layout`'s mask and `mask`'s padding,
    one softmax per query -> [B, T, H * Dh], as `decoder.attention` computes it for real
    query slots (padding queries give finite garbage).

    `window`: this layer's sliding window (an int, or a traced scalar from the layer
    scan, in which case `windows` lists every layer's window, None for full layers; a
    value past the row's length, like the decoder's full-layer sentinel, is no window).
    `interpret`: Pallas interpret mode (default: when the target platform is not TPU).
    """
    B, T, H, Dh = q.shape
    if layout.length != T:
        raise ValueError(f"rows of {T} slots do not match the layout's {layout.length}")
    if interpret is None:
        interpret = target_platform() != "tpu"
    dt = q.dtype
    _, padded = block_size(T)

    def heads_first(x: jax.Array) -> jax.Array:  # [B, T, N, Dh] -> [B, N, Tp, Dh]
        return jnp.pad(x.astype(dt), ((0, 0), (0, padded - T), (0, 0), (0, 0))).swapaxes(1, 2)

    qh = heads_first((q.astype(jnp.float32) / math.sqrt(Dh)).astype(dt))
    kh, vh = heads_first(k), heads_first(v)
    segments = jnp.pad(mask.astype(jnp.int32), ((0, 0), (0, padded - T)))

    def branch(w: int | None):
        return lambda *args: _splash_one_window(*args, layout, w, interpret)

    if window is None or isinstance(window, int):
        static = None if window is None or window >= T else window
        out = branch(static)(qh, kh, vh, segments)
    else:
        if windows is None:
            raise ValueError("a traced window needs `windows`, every layer's window")
        # windows at least T long exclude nothing, so they share the full layers' kernel
        choices = sorted({w for w in windows if w is not None and w < T})
        index = sum((window == w).astype(jnp.int32) * (i + 1) for i, w in enumerate(choices))
        fns = [branch(None)] + [branch(w) for w in choices]
        if len(fns) == 1:
            out = fns[0](qh, kh, vh, segments)
        else:
            out = jax.lax.switch(jnp.asarray(index, jnp.int32), fns, qh, kh, vh, segments)
    return out[:, :, :T].swapaxes(1, 2).reshape(B, T, H * Dh).astype(dt)


def cudnn_attention(
    q: jax.Array,  # [B, T, H, Dh]
    k: jax.Array,  # [B, S, K, Dh]
    v: jax.Array,  # [B, S, K, Dh]
    valid: jax.Array,  # [B, T, S] bool: query t may attend to key s
    implementation: str = "cudnn",
) -> jax.Array:
    """`jax.nn.dot_product_attention` with the decoder's validity as its mask -> [B, T,
    H * Dh]. Each query also sees its own slot, so a padding query's row is never empty
    (an empty row is undefined in a fused kernel; real queries always see themselves).
    `implementation="xla"` runs the same call through XLA (how the CPU tests check it)."""
    B, T, H, Dh = q.shape
    S = k.shape[1]
    own = jnp.arange(S)[None, :] == jnp.arange(T)[:, None] + (S - T)  # [T, S]
    ok = valid | own[None]
    out = jax.nn.dot_product_attention(
        q,
        k.astype(q.dtype),
        v.astype(q.dtype),
        mask=ok[:, None],
        scale=1.0 / math.sqrt(Dh),
        implementation=implementation,
    )
    return out.reshape(B, T, H * Dh)
