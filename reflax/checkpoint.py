"""Train-state checkpoints: orbax `CheckpointManager` plus integrity checks.

A checkpoint holds the train state pytree (params, optimizer state, step, rng; any pytree of
arrays orbax can write) and a JSON-able metadata dict (data position, epoch, config, ...).

On-disk layout, one directory per step::

    <directory>/
      <step>/                 e.g. 1200/; orbax writes <step>.orbax-checkpoint-tmp-<id>/
                              first and renames it when complete, so a bare integer
                              directory is always a finished checkpoint
        state/                the arrays (OCDBT + zarr; every host writes its own shards)
        meta/metadata         the caller's metadata, JSON
        manifest/metadata     reflax's own JSON: format version, and per array leaf its
                              path, shape, dtype and a 32-bit fingerprint of its bits
        _CHECKPOINT_METADATA, commit_success.txt   orbax bookkeeping

Why the manifest: orbax detects missing or truncated files, but a flipped or zeroed byte in
an uncompressed chunk would restore silently. The fingerprint (a position-weighted hash of
every element's bit pattern, computed on device, sharding-independent) is recomputed after
restore, so a damaged checkpoint gives one `CheckpointError` instead of garbage weights.
The manifest also turns a tree or shape mismatch into an error that names the leaves.

What to do on a `CheckpointError`: the message names the step directory. Delete that
directory (``rm -r <directory>/<step>``) and restart; training resumes from the newest
remaining step (`Checkpointer.latest_step`), losing the steps since that one.

Multi-host: every process constructs the `Checkpointer` and calls `save` / `restore` with
its part of the global arrays; orbax does the barriers and writes shared files from the
primary process only. Nothing here writes files itself.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

_STATE = "state"
_META = "meta"
_MANIFEST = "manifest"

_ADVICE = (
    "If the checkpoint is damaged, delete its directory and restart: training resumes "
    "from the newest remaining checkpoint."
)


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt, or does not match what is asked of it.

    The one error of every checkpoint reflax reads: orbax train states (`Checkpointer`),
    a run's warm start and HF safetensors directories (`reflax.models.hf`). The message
    names the culprit (directory, file or tensor).
    """


# ---------------------------------------------------------------------------------------------
# fingerprints


def _mix32(x: jax.Array) -> jax.Array:
    # murmur3's finaliser: a bijection on uint32 with good avalanche
    x = x ^ (x >> 16)
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _fingerprintable(dtype: Any) -> bool:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return True
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return True
    # bfloat16 and fp8 are numpy kind "V", so ask jnp rather than dtype.kind
    if jnp.issubdtype(dtype, jnp.floating):
        bits = jnp.finfo(dtype).bits
    elif jnp.issubdtype(dtype, jnp.integer):
        bits = jnp.iinfo(dtype).bits
    else:
        return False  # complex, strings, ...
    # sub-byte types (int4, fp4) report itemsize 1 but cannot be bitcast to uint8
    return dtype.itemsize in (1, 2, 4, 8) and bits == 8 * dtype.itemsize


def _fingerprint_one(x: jax.Array) -> jax.Array:
    """uint32 hash of the bits of every element, weighted by position.

    Each word is xor-ed with a hash of its flat index and hashed again, then summed mod
    2**32: any change to one element changes the result, and the sum does not depend on
    how the array is sharded. The index is built from iotas rather than by reshaping, so a
    sharded array stays sharded (a reshape to 1-D could force a gather).
    """
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    itemsize = np.dtype(x.dtype).itemsize
    if x.dtype == jnp.bool_:
        words = x.astype(jnp.uint32)[..., None]
    elif itemsize == 8:
        words = jax.lax.bitcast_convert_type(x, jnp.uint32)  # adds a trailing dim of 2
    else:
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[itemsize]
        words = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)[..., None]
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(words.ndim)):
        iota = jax.lax.broadcasted_iota(jnp.uint32, words.shape, dim)
        index = index + iota * np.uint32(stride % 2**32)
        stride *= words.shape[dim]
    hashed = _mix32(words ^ _mix32(index + np.uint32(0x9E3779B9)))
    return jnp.sum(hashed, dtype=jnp.uint32)


@jax.jit
def _fingerprint_many(arrays: tuple[jax.Array, ...]) -> jax.Array:
    return jnp.stack([_fingerprint_one(x) for x in arrays])


def _as_array(x: Any) -> jax.Array:
    return x if isinstance(x, jax.Array) else jnp.asarray(x)


def _leaves(tree: Any) -> list[tuple[str, Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(path), x) for path, x in flat]


def _fingerprints(arrays: list[jax.Array]) -> list[int | None]:
    """Fingerprint of each array (None for dtypes that have none), one jit per device set.

    Arrays committed to different device sets (a mesh-sharded param vs. a single-device
    counter) cannot share one computation, so they are grouped.
    """
    groups: dict[Any, list[int]] = {}
    for i, x in enumerate(arrays):
        if _fingerprintable(x.dtype):
            key = frozenset(x.sharding.device_set) if x.committed else None
            groups.setdefault(key, []).append(i)
    out: list[int | None] = [None] * len(arrays)
    for idx in groups.values():
        # The results are replicated over the group's devices, so every process can read them.
        try:
            prints = np.asarray(_fingerprint_many(tuple(arrays[i] for i in idx))).tolist()
        except ValueError:  # same devices in another order (two meshes): one at a time
            prints = [int(np.asarray(_fingerprint_many((arrays[i],)))[0]) for i in idx]
        for i, f in zip(idx, prints):
            out[i] = int(f)
    return out


def _dtype_name(dtype: Any) -> str:
    return str(dtype)


def _manifest(state: Any) -> dict[str, Any]:
    leaves = _leaves(state)
    arrays = [_as_array(x) for _, x in leaves]
    prints = _fingerprints(arrays)
    return {
        "format": FORMAT_VERSION,
        "leaves": [
            {
                "path": path,
                "shape": list(a.shape),
                "dtype": _dtype_name(a.dtype),
                "fingerprint": f,
            }
            for (path, _), a, f in zip(leaves, arrays, prints)
        ],
    }


# ---------------------------------------------------------------------------------------------
# metadata


def _jsonable(obj: Any, where: str = "metadata") -> Any:
    """A JSON-ready copy of `obj`; numpy/jax scalars become Python numbers.

    Checked before anything is written, so a bad value cannot leave half a checkpoint.
    """
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray | jax.Array):
        return np.asarray(obj).tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} has a non-string key {k!r}; JSON needs string keys")
            out[k] = _jsonable(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, list | tuple):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(f"{where} of type {type(obj).__name__} is not JSON-serialisable")


def _short(e: BaseException, limit: int = 400) -> str:
    msg = str(e).splitlines()[0] if str(e) else ""
    if len(msg) > limit:
        msg = msg[:limit] + " ..."
    return f"{type(e).__name__}: {msg}"


# ---------------------------------------------------------------------------------------------


class Checkpointer:
    """Saves and restores (state, metadata) under `directory`, keeping the `keep` newest.

    `async_save=True` returns from `save` once the arrays are copied to host memory and
    writes in the background (the caller may then donate or overwrite the arrays); call
    `wait()` before relying on the files, and `close()` at exit.
    """

    def __init__(
        self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = False
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        directory = os.fspath(directory)
        if "://" not in directory:  # leave gs:// and other URLs alone
            directory = os.path.abspath(directory)
        self.directory = directory
        self.keep = keep
        self.async_save = async_save
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=1,
            create=True,
            # Leftovers of interrupted saves are never listed as steps; this also frees
            # their disk space (on the primary process) when a run restarts.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._mgr = ocp.CheckpointManager(directory, options=options)
        self._pending: int | None = None  # step of an async save that may still be writing

    # -- queries --------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Steps of complete checkpoints, ascending (an async save in flight is excluded)."""
        steps = sorted(int(s) for s in self._mgr.all_steps())
        if self._pending is not None and self._mgr.is_saving_in_progress():
            steps = [s for s in steps if s != self._pending]
        return steps

    def latest_step(self) -> int | None:
        """Newest complete checkpoint, or None. Interrupted saves (tmp dirs) never count."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def step_dir(self, step: int) -> str:
        """The directory of checkpoint `step` (delete it to discard a damaged checkpoint)."""
        return os.path.join(self.directory, str(int(step)))

    # -- save -----------------------------------------------------------------------------

    def save(self, step: int, state: Any, metadata: dict, *, force: bool = False) -> None:
        """Write `state` and `metadata` as checkpoint `step`. Must be called on every process.

        Arrays are read, never donated or modified. Without `force`, a step that is not newer
        than the latest checkpoint is skipped (logged); with `force` it is written anyway,
        replacing an existing checkpoint of the same step.
        """
        step = int(step)
        meta = _jsonable(dict(metadata))
        latest = self._mgr.latest_step()
        if latest is not None and step <= latest:
            if not force:
                log.warning(
                    "checkpoint step %d not saved: not newer than latest step %d in %s "
                    "(pass force=True to overwrite)",
                    step,
                    latest,
                    self.directory,
                )
                return
            if step in self._mgr.all_steps():
                self._mgr.wait_until_finished()
                log.warning("replacing checkpoint %s", self.step_dir(step))
                self._mgr.delete(step)
        manifest = _manifest(state)
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardSave(state),
                _META: ocp.args.JsonSave(meta),
                _MANIFEST: ocp.args.JsonSave(manifest),
            }
        )
        self._mgr.save(step, args=args, force=True)
        self._pending = step if self.async_save else None
        log.info(
            "saved checkpoint %s%s", self.step_dir(step), " (async)" if self.async_save else ""
        )

    def wait(self) -> None:
        """Block until background saves are complete; re-raises a failed async save."""
        self._mgr.wait_until_finished()
        self._pending = None

    def close(self) -> None:
        self._mgr.close()
        self._pending = None

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- restore --------------------------------------------------------------------------

    def metadata(self, step: int) -> dict:
        """The metadata saved with checkpoint `step`, without reading any array."""
        meta = self._read_json(int(step), _META)
        if not isinstance(meta, dict):
            raise CheckpointError(f"checkpoint {self.step_dir(step)}: metadata is not an object")
        return meta

    def restore(
        self, abstract_state: Any, step: int | None = None, *, partial: bool = False
    ) -> tuple[Any, dict]:
        """Restore checkpoint `step` (None: the latest) into the layout of `abstract_state`.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with `.sharding` set (e.g.
        from `jax.eval_shape` plus the current mesh's shardings); each process then reads
        only its own shards, on whatever mesh the shardings name. (A leaf without a
        sharding gets the layout it was saved with, which needs the same devices.) A dtype
        different from the saved one is cast. Returns (state, metadata); raises
        `CheckpointError` if the checkpoint is missing, damaged, or does not match
        `abstract_state`. With `partial`, `abstract_state` may name a subset of the saved
        leaves (e.g. only `params`); only those are read.
        """
        self.wait()  # a step still being written cannot be read
        self._mgr.reload()  # see steps deleted or added on disk since construction
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no complete checkpoint in {self.directory}")
        step = int(step)
        path = self.step_dir(step)
        if step not in self.all_steps():
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory} (available: {self.all_steps()})"
            )

        manifest = self._read_json(step, _MANIFEST)
        leaves = self._check_manifest(manifest, path)
        self._check_abstract(abstract_state, leaves, path, partial=partial)

        mgr, state_args = self._mgr, ocp.args.StandardRestore(abstract_state)
        if partial:
            state_args = ocp.args.PyTreeRestore(
                item=abstract_state,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
                partial_restore=True,
            )
            # orbax binds an item to the handler of its first use (StandardSave when this
            # Checkpointer saved): a partial read goes through a manager of its own
            mgr = ocp.CheckpointManager(self.directory)
        args = ocp.args.Composite(**{_STATE: state_args, _META: ocp.args.JsonRestore()})
        try:
            restored = mgr.restore(step, args=args)
            state, meta = restored[_STATE], restored[_META]
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {path} could not be read ({_short(e)}). {_ADVICE}"
            ) from e
        finally:
            if mgr is not self._mgr:
                mgr.close()
        if not isinstance(meta, dict):
            raise CheckpointError(
                f"checkpoint {path}: metadata is a {type(meta).__name__}, not a JSON object. "
                f"{_ADVICE}"
            )
        self._verify(state, leaves, path)
        log.info("restored checkpoint %s", path)
        return state, meta

    def _read_json(self, step: int, item: str) -> Any:
        try:
            return self._mgr.restore(
                step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()})
            )[item]
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {self.step_dir(step)}: {item} unreadable ({_short(e)}). {_ADVICE}"
            ) from e

    @staticmethod
    def _check_manifest(manifest: Any, path: str) -> dict[str, dict]:
        ok = (
            isinstance(manifest, dict)
            and manifest.get("format") == FORMAT_VERSION
            and isinstance(manifest.get("leaves"), list)
            and all(isinstance(x, dict) and "path" in x for x in manifest["leaves"])
        )
        if not ok:
            raise CheckpointError(
                f"checkpoint {path}: manifest is malformed or of an unknown format "
                f"(expected format {FORMAT_VERSION}). {_ADVICE}"
            )
        return {x["path"]: x for x in manifest["leaves"]}

    @staticmethod
    def _check_abstract(
        abstract_state: Any, leaves: dict[str, dict], path: str, *, partial: bool = False
    ) -> None:
        wanted = dict(_leaves(abstract_state))
        missing = [p for p in wanted if p not in leaves]
        extra = [] if partial else [p for p in leaves if p not in wanted]
        shapes = [
            f"{p}: checkpoint {tuple(leaves[p]['shape'])}, requested {tuple(np.shape(x))}"
            for p, x in wanted.items()
            if p in leaves and tuple(leaves[p]["shape"]) != tuple(np.shape(x))
        ]
        problems = []
        if missing:
            problems.append(f"not in checkpoint: {_some(missing)}")
        if extra:
            problems.append(f"in checkpoint but not requested: {_some(extra)}")
        if shapes:
            problems.append(f"shape mismatch: {_some(shapes)}")
        if problems:
            raise CheckpointError(
                f"checkpoint {path} does not match the requested state; " + "; ".join(problems)
            )

    @staticmethod
    def _verify(state: Any, leaves: dict[str, dict], path: str) -> None:
        restored = [(p, _as_array(x)) for p, x in _leaves(state)]  # the leaves asked for
        # A leaf restored with a cast dtype has different bits; it cannot be checked.
        todo = [
            (p, a)
            for p, a in restored
            if leaves[p].get("fingerprint") is not None
            and _dtype_name(a.dtype) == leaves[p].get("dtype")
        ]
        prints = _fingerprints([a for _, a in todo])
        bad = [p for (p, _), f in zip(todo, prints) if f != leaves[p]["fingerprint"]]
        if bad:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: restored values of {_some(bad)} do not match "
                f"the fingerprints written at save time. {_ADVICE}"
            )


def _some(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a live state: the target `restore` expects."""

    def one(x: Any) -> Any:
        x = _as_array(x)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

    return jax.tree.map(one, state)


__all__ = ["Checkpointer", "CheckpointError", "abstract_like", "FORMAT_VERSION"]
