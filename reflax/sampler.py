"""The host-side sampler: ragged prompts in, completions out, one jitted program per shape.

`Sampler` left-pads ragged prompts into bucketed shapes, keeps one jitted program
(`reflax.decoding.generate`) per bucketed shape and static setting (counted in
`Sampler.num_compilations`), places inputs on the mesh and fetches results. How
tokens are drawn is a `reflax.sampling.SamplingSpec`, passed whole to every call.

Continuation (`Sampler.continue_rows`). Row i of the new batch continues row
`rows[i]` of an earlier call (`CachedRows`): the earlier row's cache (its prompt and
its whole completion) is gathered, the cache grown, and `new_turns[i]` (ragged) is
written left-padded into the next block of slots, with positions continuing from
the row's true length. That cache is the prefix of the new decode (with G samples
per continued row), so continuing equals sampling from scratch on prompt +
completion + new turn. A continuation of every row in order that `kv_cache_bytes`
cuts smaller than a kept cache takes, on every batch shard, one block of that shard's
own rows per call (`shard_block`): no row crosses devices, where a gather of rows
would all-gather the cache onto every device.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from reflax.decoding import check_rope_range, generate, resize_cache
from reflax.kv_cache import is_auto, kv_cache_bytes, kv_slot_bytes, resolve_cache_dtype, shard_block
from reflax.models.decoder import Decoder, KVCache
from reflax.sampling import SamplingSpec
from reflax.sharding import (
    CACHE_AXES,
    CACHE_MASK_AXES,
    LOGICAL_RULES,
    MESH_AXES,
    named_sharding,
    put,
    replicated,
)

BucketSpec = int | Sequence[int] | None

__all__ = [
    "BucketSpec",
    "CachedRows",
    "SampleOutput",
    "Sampler",
    "bucket_size",
    "kv_cache_bytes",
    "kv_slot_bytes",
    "left_pad",
    "resolve_cache_dtype",
]

_LOWERING_SPEC = SamplingSpec(stop_ids=(0,))  # `lower`'s default: sampled, one stop id


def bucket_size(size: int, buckets: BucketSpec) -> int:
    """The bucket for a size: None -> next power of two; int m -> next multiple of m;
    a sequence -> its smallest entry >= size."""
    size = max(int(size), 1)
    if buckets is None:
        return 1 << (size - 1).bit_length()
    if isinstance(buckets, int):
        return -(-size // buckets) * buckets
    for b in sorted(buckets):
        if b >= size:
            return int(b)
    raise ValueError(f"size {size} exceeds the largest bucket {max(buckets)}")


def left_pad(
    seqs: Sequence[Sequence[int]], length: int, pad_id: int = 0, rows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Ragged id lists -> (tokens [rows, length] int32, mask [rows, length] bool), left-padded.

    Extra rows (up to `rows`) are all padding.
    """
    rows = len(seqs) if rows is None else rows
    tokens = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), bool)
    for i, seq in enumerate(seqs):
        if len(seq) > length:
            raise ValueError(f"sequence {i} has {len(seq)} tokens, more than {length}")
        if len(seq):
            tokens[i, length - len(seq) :] = np.asarray(seq, np.int32)
            mask[i, length - len(seq) :] = True
    return tokens, mask


@dataclasses.dataclass
class CachedRows:
    """Rows an earlier call sampled, kept for `Sampler.continue_rows`: their KV cache on
    device (every sampled token written) and each row's real token count.

    A call sampled in chunks keeps one cache per chunk: rows `starts[j]` onwards are the
    first rows of `cache[j]` (its batch padded like every chunk's).
    """

    cache: KVCache | tuple[KVCache, ...]  # rows: the padded batch of that call (chunk)
    seq_lens: np.ndarray  # [num_rows] int32: real tokens per row in the cache
    index: int  # host copy of cache.index: slots used (the most over chunks)
    starts: tuple[int, ...] = (0,)  # first row of each chunk's cache

    @property
    def num_rows(self) -> int:
        """Real rows (the first num_rows of the cache, over the chunks in order)."""
        return len(self.seq_lens)

    @property
    def caches(self) -> tuple[KVCache, ...]:
        return self.cache if isinstance(self.cache, tuple) else (self.cache,)


@dataclasses.dataclass(frozen=True)
class _Request:
    """One call: `block` holds prompts, or new turns after rows `rows` of `prev`."""

    state: Any
    block: Sequence[Sequence[int]]
    spec: SamplingSpec
    num_samples: int
    max_new_tokens: int
    rng: jax.Array | int
    keep_cache: bool
    prev: CachedRows | None = None
    rows: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class _Shape:
    """The shapes every program call of a request shares (chunks included)."""

    unique_rows: int  # U: prompts / new turns per call, padded
    block_len: int  # C: the bucketed prompt / new-turn block
    gen_len: int  # N: bucketed max_new_tokens
    prefix_size: int  # cache slots before decoding (earlier slots + the block)


@dataclasses.dataclass(frozen=True)
class _Piece:
    """One program call of a request: block entries lo..hi-1, continuing cache `part`;
    with `block` >= 0, row block `block` of every shard of that cache (`shard_block`),
    `entries` each row's block entry (-1: a padding row)."""

    lo: int
    hi: int
    part: int = 0
    block: int = -1
    entries: tuple[int, ...] = ()

    def ids(self, rows: int) -> np.ndarray:
        """[rows] the block entry of each of the call's rows, -1 for padding rows."""
        ids = np.asarray(self.entries or range(self.lo, self.hi), np.int64)
        return np.pad(ids, (0, rows - len(ids)), constant_values=-1)


@dataclasses.dataclass
class SampleOutput:
    tokens: np.ndarray  # [B, N] int32; pad after a stop token
    logprobs: np.ndarray | None  # [B, N] float32 (SamplingSpec.logprobs); 0 after stop
    lengths: np.ndarray  # [B] int32, stop token included
    done: np.ndarray  # [B] bool: ended on a stop id (False: hit max_new_tokens)
    cached: CachedRows | None  # what `Sampler.continue_rows` needs; None unless keep_cache

    def completions(self) -> list[list[int]]:
        return [t[:n].tolist() for t, n in zip(self.tokens, self.lengths)]


class Sampler:
    """Bucketed, jitted, optionally sharded sampling for one model architecture.

    Takes the model state at every call, so parameters may change between calls
    (one program per bucketed shape and static setting, not per value).

    Buckets (`BucketSpec`: None = powers of two, int m = multiples of m, or a
    sequence of sizes): `prompt_buckets` for prompt / new-turn block lengths,
    `gen_buckets` for max_new_tokens, `cache_buckets` for the prefix length of a
    continuation (earlier slots + new turn), `batch_buckets` for the number of
    unique rows. A fresh call's cache holds prompt bucket + generation bucket slots.
    `cache_dtype`: the KV cache's dtype, "auto" as `resolve_cache_dtype`.
    `kv_cache_bytes`: the KV cache one device may hold per program call
    (`kv_cache_bytes`); a call whose rows need more is sampled in chunks of whole
    groups (a prompt's G samples stay together), all padded to one size (one program),
    drawing the tokens of one pass. 0: every call in one pass.
    `compiler_options` go to `jax.jit` (e.g. a lower XLA backend optimisation
    level where compile time matters more than speed, as in tests).
    """

    def __init__(
        self,
        model: Decoder | nnx.GraphDef,
        mesh: Mesh | None = None,
        *,
        cache_dtype: Any = "auto",
        kv_cache_bytes: int = 0,
        prompt_buckets: BucketSpec = 64,
        gen_buckets: BucketSpec = 64,
        cache_buckets: BucketSpec = 128,
        batch_buckets: BucketSpec = None,
        compiler_options: dict[str, Any] | None = None,
    ):
        if kv_cache_bytes < 0:
            raise ValueError(f"kv_cache_bytes must be >= 0 (0: one pass), got {kv_cache_bytes}")
        self.graphdef = nnx.split(model)[0] if isinstance(model, nnx.Module) else model
        self.config = model.config if isinstance(model, nnx.Module) else None  # else at 1st call
        self.mesh = mesh
        self.cache_dtype = cache_dtype  # "auto" resolved at the first call
        if isinstance(model, nnx.Module) or not is_auto(cache_dtype):
            self.cache_dtype = self._resolve_cache_dtype(model)
        self.kv_cache_bytes = kv_cache_bytes
        self.prompt_buckets = prompt_buckets
        self.gen_buckets = gen_buckets
        self.cache_buckets = cache_buckets
        self.batch_buckets = batch_buckets
        self.compiler_options = compiler_options  # passed to XLA, e.g. to compile faster
        self._fns: dict[tuple, Any] = {}
        self._traces = 0

    def _resolve_cache_dtype(self, model: Any) -> np.dtype:
        platform = (
            jax.default_backend() if self.mesh is None else self.mesh.devices.flat[0].platform
        )
        if is_auto(self.cache_dtype) and platform != "tpu":
            compute = model.dtype  # only "auto" off TPU needs the model
        else:
            compute = None
        return resolve_cache_dtype(self.cache_dtype, compute, platform)

    @property
    def num_compilations(self) -> int:
        """Programs traced (and so compiled) so far."""
        return self._traces

    # ------------------------------------------------------------------ sharding helpers

    def _batch_shards(self) -> int:
        if self.mesh is None:
            return 1
        axes = LOGICAL_RULES["batch"]
        axes = (axes,) if isinstance(axes, str) else axes
        return math.prod(self.mesh.shape[a] for a in axes if a in MESH_AXES)

    def _unique_rows(self, n: int, num_samples: int) -> int:
        """Bucketed unique rows; on a mesh, rounded so the decode batch splits evenly."""
        rows = bucket_size(n, self.batch_buckets)
        step = self._batch_shards() // math.gcd(self._batch_shards(), num_samples)
        return -(-rows // step) * step

    def _sharding(self, x: Any, logical: tuple | None) -> Any:
        if self.mesh is None:
            return None
        if logical is None:
            return replicated(self.mesh)
        return named_sharding(self.mesh, logical, np.shape(x))

    def _put(self, x: Any, logical: tuple | None) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(x)
        return put(x, self._sharding(x, logical))

    def _abstract(self, x: Any, logical: tuple | None) -> jax.ShapeDtypeStruct:
        """What `_put` would place, as a shape (for lowering without devices)."""
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=self._sharding(x, logical))

    def _out_shardings(self, batch: int, logprobs: bool, cache_shape: tuple | None) -> Any:
        if self.mesh is None:
            return None
        m = self.mesh
        # what the host reads comes back replicated, so every process (host) has all rows
        names = ("tokens", "logprobs", "lengths", "done", "seq_lens")
        out = {k: replicated(m) for k in names if logprobs or k != "logprobs"}
        if cache_shape is not None:
            out["cache"] = KVCache(
                k=named_sharding(m, CACHE_AXES, cache_shape),
                v=named_sharding(m, CACHE_AXES, cache_shape),
                mask=named_sharding(m, CACHE_MASK_AXES, cache_shape[1:3]),
                index=replicated(m),
            )
        return out

    # ------------------------------------------------------------------ programs

    def _program(self, key: tuple, out_shardings: Any) -> Any:
        fn = self._fns.get(key)
        if fn is not None:
            return fn
        kind, config, num_samples, gen_len, prefix_size, keep_cache = key[:6]
        graphdef, cache_dtype, shards = self.graphdef, self.cache_dtype, self._batch_shards()

        def run(state, prev, tokens, mask, row_valid, rng, spec, max_new, row_ids):
            self._traces += 1  # runs once per trace, i.e. per compiled program
            model = nnx.merge(graphdef, state)
            if prev is None:
                cache = KVCache.empty(config, tokens.shape[0], prefix_size, cache_dtype)
                cache = cache.constrain()
                seq_lens = jnp.zeros((tokens.shape[0],), jnp.int32)
            else:
                prev_cache, seq_lens, rows = prev  # rows None: every row, in order
                if kind == "local":  # rows: the block of every shard's own rows
                    prev_cache = shard_block(prev_cache, shards, rows, tokens.shape[0])
                    rows = None
                cache = resize_cache(prev_cache, rows, prefix_size)
            return generate(
                model,
                cache,
                seq_lens,
                tokens,
                mask,
                row_valid,
                rng,
                spec,
                max_new,
                num_samples=num_samples,
                gen_len=gen_len,
                keep_cache=keep_cache,
                row_ids=row_ids,
            )

        fn = jax.jit(run, out_shardings=out_shardings, compiler_options=self.compiler_options)
        self._fns[key] = fn
        return fn

    def _chunk_groups(self, config: Any, shape: _Shape, req: _Request, step: int) -> int:
        """The most unique rows (a multiple of `step`) whose call fits `kv_cache_bytes`."""
        need = lambda groups: kv_cache_bytes(
            config,
            self.cache_dtype,
            groups=groups,
            num_samples=req.num_samples,
            prefix_size=shape.prefix_size,
            gen_len=shape.gen_len,
            keep_cache=req.keep_cache,
            batch_shards=self._batch_shards(),
        )
        if need(step) > self.kv_cache_bytes:
            raise ValueError(
                f"kv_cache_bytes={self.kv_cache_bytes} fits no chunk: {step} prompt(s) x "
                f"{req.num_samples} samples ({shape.prefix_size} prefix + {shape.gen_len} new "
                f"slots) need {need(step)} bytes of KV cache per device"
            )
        groups = step
        while need(groups + step) <= self.kv_cache_bytes and groups < len(req.block):
            groups += step
        return groups

    def _plan(self, req: _Request) -> tuple[_Shape, list[_Piece]]:
        """The shapes a request's program calls share and the calls: one, or chunks of
        whole groups (each within one cached chunk when continuing) of one padded size."""
        state, prev, rows, block = req.state, req.prev, req.rows, req.block
        if req.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if req.num_samples < 1:
            raise ValueError("num_samples must be >= 1")
        if any(len(seq) == 0 for seq in block):
            raise ValueError("every prompt / new turn needs at least one token")
        if self.config is None or is_auto(self.cache_dtype):
            model = nnx.merge(self.graphdef, state)
            self.config = model.config
            self.cache_dtype = self._resolve_cache_dtype(model)
        config = self.config
        n = len(block)
        C = bucket_size(max(len(seq) for seq in block), self.prompt_buckets)
        gen_len = bucket_size(req.max_new_tokens, self.gen_buckets)
        # the prefilled prefix: the new block after the earlier call's slots, if any
        prefix_size = C if prev is None else bucket_size(prev.index + C, self.cache_buckets)
        lens = np.zeros((n,), np.int32) if prev is None else prev.seq_lens[rows]
        longest = max(int(lens[i]) + len(block[i]) for i in range(n))
        check_rope_range(config, longest + req.max_new_tokens)
        shape = _Shape(self._unique_rows(n, req.num_samples), C, gen_len, prefix_size)
        parts = np.zeros((n,), np.int64)
        kept, S = (0 if prev is None else prev.caches[0].k.shape[1]), self._batch_shards()
        every_row = prev is not None and np.array_equal(rows, np.arange(prev.num_rows))
        if prev is not None and (len(prev.starts) > 1 or every_row):
            parts = np.searchsorted(np.asarray(prev.starts), rows, side="right") - 1
            # a chunk as large as a cached chunk continues it in order (no gather)
            shape = dataclasses.replace(shape, unique_rows=kept)
        if self.kv_cache_bytes:
            step = self._batch_shards() // math.gcd(self._batch_shards(), req.num_samples)
            fit = self._chunk_groups(config, shape, req, step)
            if fit < shape.unique_rows:
                shape = dataclasses.replace(shape, unique_rows=fit)
        if every_row and S <= shape.unique_rows < kept and kept % S == 0 and not req.keep_cache:
            return self._plan_local(prev, shape, kept // S, S)
        pieces, lo = [], 0
        for hi in range(1, n + 1):  # runs of one cached chunk, cut to unique_rows each
            if hi == n or parts[hi] != parts[lo] or hi - lo == shape.unique_rows:
                pieces.append(_Piece(lo, hi, int(parts[lo])))
                lo = hi
        return shape, pieces

    def _plan_local(
        self, prev: CachedRows, shape: _Shape, local: int, shards: int
    ) -> tuple[_Shape, list[_Piece]]:
        """Every kept row continued in order, in calls smaller than a kept cache: call b
        takes rows b*u.. of each shard's `local` rows (the last block moved back to end at
        `local`, as `shard_block`'s slice is; rows an earlier call took are padding), so
        the cache is sliced in place on every device."""
        u = min(local, shape.unique_rows // shards)
        ends = (*prev.starts[1:], prev.num_rows)
        pieces = []
        for part, (start, end) in enumerate(zip(prev.starts, ends)):
            for b in range(-(-local // u)):
                mine = min(b * u, local - u) + np.arange(u)  # each shard's rows of call b
                pos = (np.arange(shards)[:, None] * local + mine).reshape(-1)
                new = np.tile(mine >= b * u, shards) & (start + pos < end)
                if new.any():
                    ids = tuple(int(i) for i in np.where(new, start + pos, -1))
                    pieces.append(_Piece(-1, -1, part, b, ids))
        return dataclasses.replace(shape, unique_rows=u * shards), pieces

    def _prepare(
        self, req: _Request, shape: _Shape, piece: _Piece, abstract: bool = False
    ) -> tuple[Any, tuple]:
        """The jitted program of one call (`piece` of `req`) and its arguments (inputs
        placed on the mesh; `abstract`: their ShapeDtypeStructs, for `lower`).

        `req.state` and `req.prev.cache` are passed through as they are, so they may be
        `jax.ShapeDtypeStruct`s carrying shardings.
        """
        state, prev, spec, G = req.state, req.prev, req.spec, req.num_samples
        put = self._abstract if abstract else self._put
        if isinstance(state, nnx.Module):
            state = nnx.state(state)
        rng = jax.random.key(req.rng) if isinstance(req.rng, int) else req.rng
        config, U, C = self.config, shape.unique_rows, shape.block_len
        ids = piece.ids(U)  # [U] block entry of each row, -1: padding
        valid, B = ids >= 0, U * G
        device_spec = spec.on_device(config.vocab_size)
        cache_shape = None
        if req.keep_cache:
            cache_size = shape.prefix_size + shape.gen_len
            cache_shape = (config.num_layers, B, cache_size, config.num_kv_heads, config.head_dim)
        lens = np.zeros((U,), np.int32)  # real tokens of each row before sampling
        if prev is not None:
            src = req.rows[np.maximum(ids, 0)]  # each row's row of the earlier call
            lens = np.where(valid, prev.seq_lens[src], 0).astype(np.int32)
            prev_cache = prev.caches[piece.part]
            rows = np.where(valid, src - prev.starts[piece.part], 0).astype(np.int32)
        # continuing every row in order (a retry per reflection) needs no gather of the cache
        in_order = prev is not None and prev_cache.k.shape[1] == U and piece.block < 0
        in_order = in_order and np.array_equal(rows[valid], np.arange(valid.sum()))
        kind = "new" if prev is None else ("in_order" if in_order else "gather")
        kind = "local" if piece.block >= 0 else kind
        key = (kind, config, G, shape.gen_len, shape.prefix_size, req.keep_cache, U, C)
        key += (jax.tree.structure(device_spec), *(x.shape for x in jax.tree.leaves(device_spec)))
        if prev is not None:
            key += (prev_cache.k.shape, prev_cache.k.dtype)
        fn = self._program(key, self._out_shardings(B, spec.logprobs, cache_shape))

        tokens, mask = left_pad([req.block[i] if i >= 0 else () for i in ids], C, spec.pad_id)
        prev_args = None
        if prev is not None:
            rows_arg = None if in_order else put(rows, ("batch",))
            if kind == "local":
                rows_arg = put(np.int32(piece.block), None)
            # every chunk continues at the slot one pass would (the most slots used)
            prev_cache = prev_cache.replace(index=put(np.int32(prev.index), None))
            prev_args = (prev_cache, put(lens, ("batch",)), rows_arg)
        args = (
            state,
            prev_args,
            put(tokens, ("batch", None)),
            put(mask, ("batch", None)),
            put(valid, ("batch",)),
            put(rng, None),
            jax.tree.map(lambda x: put(x, None), device_spec),
            put(np.int32(req.max_new_tokens), None),
            put(np.maximum(ids, 0).astype(np.int32), ("batch",)),
        )
        return fn, args

    def _call(self, req: _Request) -> SampleOutput:
        shape, pieces = self._plan(req)
        G, n = req.num_samples, req.max_new_tokens
        outs, order, caches, index = [], [], [], 0
        for piece in pieces:
            fn, args = self._prepare(req, shape, piece)
            if self.mesh is not None:
                with jax.set_mesh(self.mesh):
                    out = fn(*args)
            else:
                out = fn(*args)
            dest = (piece.ids(shape.unique_rows)[:, None] * G + np.arange(G)).reshape(-1)
            host = jax.device_get({k: v for k, v in out.items() if k != "cache"})
            outs.append({k: np.asarray(v)[dest >= 0] for k, v in host.items()})
            order.append(dest[dest >= 0])  # the output rows of the call's real rows
            if req.keep_cache:
                caches.append(out["cache"])
                index = max(index, int(jax.device_get(out["cache"].index)))
        order = np.argsort(np.concatenate(order))
        join = lambda k: np.concatenate([o[k] for o in outs])[order]
        cached = None
        if req.keep_cache:
            starts = tuple(p.lo * G for p in pieces)
            cache = caches[0] if len(caches) == 1 else tuple(caches)
            cached = CachedRows(cache, join("seq_lens"), index=index, starts=starts)
        return SampleOutput(
            tokens=join("tokens")[:, :n],
            logprobs=join("logprobs")[:, :n] if req.spec.logprobs else None,
            lengths=join("lengths"),
            done=join("done"),
            cached=cached,
        )

    def lower(
        self,
        state: Any,
        spec: SamplingSpec = _LOWERING_SPEC,
        *,
        num_rows: int,
        block_len: int,
        num_samples: int,
        max_new_tokens: int,
        keep_cache: bool,
        prev: CachedRows | None = None,
    ) -> jax.stages.Lowered:
        """The program `sample` (prev None) or `continue_rows` (all of `prev`'s rows, in
        order) runs for `num_rows` prompts / new turns of `block_len` tokens, lowered
        without running it (a chunk's, when `kv_cache_bytes` cuts the call).

        `state` (and `prev.cache`) may be `jax.ShapeDtypeStruct`s with their shardings:
        nothing is allocated or placed, so `.compile().memory_analysis()` sizes a rollout
        ahead of time, also for devices that are only described (a TPU topology from
        `jax.experimental.topologies`). An abstract `prev` is built from the output shapes
        of an earlier lowering, with `index` = the slots it may have used and `seq_lens` any
        [num_rows] int32 array (only its length shapes the program).
        """
        rows = None if prev is None else np.arange(num_rows) % prev.num_rows
        block = [[0] * block_len] * num_rows
        request = _Request(
            state, block, spec, num_samples, max_new_tokens, 0, keep_cache, prev, rows
        )
        shape, pieces = self._plan(request)
        fn, args = self._prepare(request, shape, pieces[0], abstract=True)
        if self.mesh is None:
            return fn.lower(*args)
        with jax.set_mesh(self.mesh):
            return fn.lower(*args)

    # ------------------------------------------------------------------ public

    def sample(
        self,
        state: Any,
        prompts: Sequence[Sequence[int]],
        spec: SamplingSpec,
        *,
        max_new_tokens: int,
        rng: jax.Array | int,
        num_samples: int = 1,
        share_prefix: bool = True,
        keep_cache: bool = True,
    ) -> SampleOutput:
        """Sample completions of ragged prompts; output row u*G+g is sample g of prompt u.

        `state`: the model's current `nnx.State` (or the model itself). With
        `share_prefix` each prompt is prefilled once and its G = num_samples rows
        attend to that one prefix while decoding; without, prompts are repeated
        before prefill (same tokens under the same rng either way). `keep_cache`:
        return the [B]-row cache as `SampleOutput.cached`, for `continue_rows` (it is
        materialised at the end; pass False for rollouts that end here).
        """
        if not share_prefix and num_samples > 1:
            prompts = [p for p in prompts for _ in range(num_samples)]
            num_samples = 1
        return self._call(
            _Request(state, prompts, spec, num_samples, max_new_tokens, rng, keep_cache)
        )

    def continue_rows(
        self,
        state: Any,
        cached: CachedRows,
        new_turns: Sequence[Sequence[int]],
        spec: SamplingSpec,
        *,
        rows: Sequence[int] | None = None,
        max_new_tokens: int,
        rng: jax.Array | int,
        num_samples: int = 1,
        keep_cache: bool = True,
    ) -> SampleOutput:
        """Append a new turn to rows of an earlier call and keep sampling.

        New row i continues `cached` row `rows[i]` (default: i; repeats allowed): its
        sequence so far (prompt and full completion, already in the cache) is followed by
        `new_turns[i]` (at least one id), then sampled. With `num_samples` = G each
        continued row is then repeated G times after its new turn is prefilled once
        (output row i*G+g). The rng layout is the one of `sample`, so the result equals
        `sample` on the concatenated sequences.
        """
        if cached is None:
            raise ValueError("no rows to continue: sample with keep_cache=True")
        rows_arr = np.arange(len(new_turns)) if rows is None else np.asarray(rows, np.int32)
        if len(rows_arr) != len(new_turns):
            raise ValueError(f"{len(rows_arr)} rows for {len(new_turns)} new turns")
        if len(rows_arr) and (rows_arr.min() < 0 or rows_arr.max() >= cached.num_rows):
            raise ValueError(f"rows must index the earlier call's {cached.num_rows} rows")
        return self._call(
            _Request(
                state,
                new_turns,
                spec,
                num_samples,
                max_new_tokens,
                rng,
                keep_cache,
                cached,
                rows_arr,
            )
        )
