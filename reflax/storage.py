"""Where a run's files live: a local directory or a bucket (gs://...), through one set of calls.

Every file reflax reads or writes goes through here, so a workdir, a failure set, an output
file or a model directory may be `gs://bucket/...` as well as a local path. Local paths use
the os module; URLs use fsspec (gcsfs for gs://: `pip install gcsfs`, or reflax's `[gcs]`
extra). orbax reaches gs:// through the same gcsfs (via etils.epath), so checkpoints and every
other file share one set of credentials; an emulator is named by `STORAGE_EMULATOR_HOST`
(gcsfs) and `TENSORSTORE_GCS_HTTP_URL` (the checkpoint arrays).

An object store has no append, no rename and no directories, so:
* a whole file is written locally and uploaded once complete (`atomic_write`): a reader sees
  the old object or the new one, never half of one;
* files that grow during a run (metrics.jsonl, TensorBoard events) live in a local `Mirror`
  and are uploaded whole by `Mirror.sync`;
* a directory meant to appear complete (the HF export) is built locally and published by
  `staged_dir`: uploaded beside its destination, then copied in with its marker file
  (config.json) last, so whoever finds the marker finds every file;
* a remote directory that a library reads from disk (a model, a tokenizer) is copied to a
  local cache first (`local_path`).
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import glob
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import IO, Any

# A reachability check gives up after this long: gcsfs retries a refused connection for
# about half a minute, and a run should not wait that long to learn its bucket is wrong.
CHECK_TIMEOUT_S = 10.0
# Where remote model directories are copied before loading (REFLAX_CACHE overrides).
CACHE_DIR = os.path.join("~", ".cache", "reflax")


class StorageError(OSError):
    """A location that cannot be reached, read or written (one line: what and why)."""


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def join(path: str | os.PathLike, *parts: str) -> str:
    path = os.fspath(path)
    if is_remote(path):
        return "/".join([path.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(path, *parts)


def parent(path: str | os.PathLike) -> str:
    """The directory holding `path` (a bucket's root for gs://bucket/file)."""
    path = os.fspath(path).rstrip("/")
    if is_remote(path):
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{rest.rsplit('/', 1)[0]}" if "/" in rest else path
    return os.path.dirname(os.path.abspath(path))


def _fs(path: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) of a URL."""
    import fsspec  # a dependency of datasets; gcsfs plugs into it for gs://

    try:
        return fsspec.core.url_to_fs(path)
    except (ImportError, ValueError) as e:  # no gcsfs, an unknown scheme
        raise StorageError(f"cannot use {path}: {e}") from None


# --- files ------------------------------------------------------------------------------------


def open(path: str | os.PathLike, mode: str = "r", **kwargs: Any) -> IO:  # noqa: A001
    """A file object for `path`, local or remote (remote writes: prefer `atomic_write`)."""
    path = os.fspath(path)
    if is_remote(path):
        fs, p = _fs(path)
        return fs.open(p, mode, **kwargs)
    return builtins.open(path, mode, **kwargs)


def exists(path: str | os.PathLike) -> bool:
    path = os.fspath(path)
    if is_remote(path):
        fs, p = _fs(path)
        return fs.exists(p)
    return os.path.exists(path)


def makedirs(path: str | os.PathLike) -> None:
    """A local directory and its parents; nothing for a URL (an object store has none)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a directory (or file) and everything under it; nothing if it is absent."""
    path = os.fspath(path)
    if is_remote(path):
        fs, p = _fs(path)
        if fs.exists(p):
            fs.rm(p, recursive=True)
    elif os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Write `path` whole or not at all: into a temporary file, then renamed (local) or
    uploaded (remote) when the block ends without an error."""
    path = os.fspath(path)
    if is_remote(path):
        fd, tmp = tempfile.mkstemp(prefix="reflax-upload-")
        os.close(fd)
    else:
        makedirs(os.path.dirname(os.path.abspath(path)))
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with builtins.open(tmp, mode, **kwargs) as f:
            yield f
        if is_remote(path):
            fs, p = _fs(path)
            fs.put_file(tmp, p)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str | os.PathLike, obj: Any, **dump_kwargs: Any) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, **dump_kwargs)
        f.write("\n")


# --- checks before a run starts ---------------------------------------------------------------


def _bounded(what: str, path: str, fn: Any, timeout_s: float) -> Any:
    """fn() within `timeout_s`, else one StorageError naming `path`; errors become one too."""
    out: dict[str, Any] = {}

    def call() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # handed to the caller's thread
            out["error"] = e

    # a daemon thread: a request still hanging when we give up must not hold the exit
    worker = threading.Thread(target=call, name="reflax-storage-check", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise StorageError(
            f"cannot {what} {path}: no answer within {timeout_s:g} s (is the storage service "
            "reachable from here?)"
        )
    e = out.get("error")
    if e is None:
        return out.get("value")
    if isinstance(e, StorageError):
        raise e
    if isinstance(e, FileNotFoundError):
        raise StorageError(f"cannot {what} {path}: no such bucket or directory") from None
    reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]  # auth, refused, ...: one line
    raise StorageError(f"cannot {what} {path}: {reason}") from None


def check_writable(path: str | os.PathLike, timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """Write and delete a probe file in directory `path` (created if local), or raise one
    `StorageError`: called before any compute, so a wrong bucket costs seconds."""
    path = os.fspath(path)
    probe = join(path, f".reflax-write-check-{uuid.uuid4().hex[:8]}")

    def write_and_delete() -> None:
        makedirs(path)
        with open(probe, "w") as f:  # straight to the bucket: no local file to leave behind
            f.write("ok\n")
        remove_tree(probe)

    _bounded("write to", path, write_and_delete, timeout_s)


def check_readable(path: str | os.PathLike, timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """`path` exists and can be reached, or one `StorageError`."""
    path = os.fspath(path)
    if not _bounded("read", path, lambda: exists(path), timeout_s):
        raise StorageError(f"{path} does not exist")


# --- directories that grow, directories that appear whole, directories read from disk ---------


class Mirror:
    """A local directory standing in for `path`: the path itself when local; for a URL, a
    temporary directory whose files `sync` uploads whole (each one that changed since its
    last upload). `fetch` brings an existing remote file down first, to append to it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.remote = is_remote(self.path)
        if self.remote:
            self.local = tempfile.mkdtemp(prefix="reflax-mirror-")
        else:
            self.local = self.path
            os.makedirs(self.local, exist_ok=True)
        self._uploaded: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns)
        self._last_sync = time.monotonic()

    def fetch(self, name: str) -> str:
        """The local path of file `name`, holding the remote file's contents if it exists."""
        local = os.path.join(self.local, name)
        if self.remote:
            fs, p = _fs(join(self.path, name))
            if fs.exists(p):
                os.makedirs(os.path.dirname(local), exist_ok=True)
                fs.get_file(p, local)
                self._uploaded[name] = self._stamp(local)
        return local

    @staticmethod
    def _stamp(file: str) -> tuple[int, int]:
        st = os.stat(file)
        return st.st_size, st.st_mtime_ns

    def sync(self, min_interval_s: float = 0.0) -> None:
        """Upload every changed file (at most every `min_interval_s` seconds)."""
        if not self.remote or time.monotonic() - self._last_sync < min_interval_s:
            return
        for root, _, files in os.walk(self.local):
            for f in files:
                local = os.path.join(root, f)
                rel = os.path.relpath(local, self.local)
                stamp = self._stamp(local)
                if self._uploaded.get(rel) != stamp:
                    fs, p = _fs(join(self.path, *rel.split(os.sep)))
                    fs.put_file(local, p)
                    self._uploaded[rel] = stamp
        self._last_sync = time.monotonic()

    def close(self) -> None:
        """A last `sync`; a remote mirror's local directory is then deleted."""
        self.sync()
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(
    dest: str | os.PathLike, *, publish: bool = True, last: Sequence[str] = ("config.json",)
) -> Iterator[str]:
    """A fresh local directory to build `dest` in. If the block ends without an error (and
    `publish`), it replaces `dest`; otherwise it is deleted and `dest` is left as it was.

    Local: a sibling `<dest>.tmp-<id>` renamed into place. Remote (no renames in an object
    store): uploaded to `<dest>.tmp-<id>/` first (the long part, while the old `dest` stays
    whole), then the old `dest` is deleted and the files copied in on the server, those
    named in `last` after all others: a reader who finds config.json finds a whole export.

    What an export killed part way left beside `dest` is tidied first (`_tidy_leftovers`).
    """
    dest = os.fspath(dest).rstrip("/")
    tag = uuid.uuid4().hex[:8]
    if publish:
        _tidy_leftovers(dest)
    if is_remote(dest) or not publish:
        stage = tempfile.mkdtemp(prefix="reflax-stage-")
    else:
        stage = f"{dest}.tmp-{tag}"
        os.makedirs(stage)
    try:
        yield stage
        if publish:
            (_publish_remote if is_remote(dest) else _publish_local)(stage, dest, tag, last)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _tidy_leftovers(dest: str) -> None:
    """Undo what a killed `staged_dir` left (its `finally` never ran): half-built stages
    `<dest>.tmp-<id>` are deleted; a whole earlier export moved aside to `<dest>.old-<id>`
    (killed between the two renames, so `dest` is missing) is moved back."""
    if is_remote(dest):
        fs, d = _fs(dest)
        for leftover in fs.glob(f"{d}.tmp-*"):
            fs.rm(leftover, recursive=True)
        return
    for path in sorted(glob.glob(glob.escape(dest) + ".*")):  # each starts with dest
        suffix = path[len(dest) :]
        if suffix.startswith(".tmp-"):
            shutil.rmtree(path, ignore_errors=True)
        elif suffix.startswith(".old-"):
            if os.path.exists(dest):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.rename(path, dest)


def _publish_local(stage: str, dest: str, tag: str, last: Sequence[str]) -> None:
    old = f"{dest}.old-{tag}"
    if os.path.exists(dest):
        os.rename(dest, old)
    os.rename(stage, dest)
    shutil.rmtree(old, ignore_errors=True)


def _publish_remote(stage: str, dest: str, tag: str, last: Sequence[str]) -> None:
    fs, d = _fs(dest)
    tmp = f"{d}.tmp-{tag}"
    walk = ((root, f) for root, _, names in os.walk(stage) for f in names)
    files = sorted(os.path.relpath(os.path.join(root, f), stage) for root, f in walk)
    files.sort(key=lambda rel: rel in last)  # stable: the marker files last
    for rel in files:
        fs.put_file(os.path.join(stage, rel), f"{tmp}/{rel.replace(os.sep, '/')}")
    if fs.exists(d):
        fs.rm(d, recursive=True)
    for rel in files:
        name = rel.replace(os.sep, "/")
        fs.copy(f"{tmp}/{name}", f"{d}/{name}")
    fs.rm(tmp, recursive=True)


def local_path(path: str | os.PathLike) -> str:
    """`path` itself when local; a remote file or directory copied to a local cache
    (REFLAX_CACHE, default ~/.cache/reflax) and reused while the remote listing (names,
    sizes, generations) is unchanged. For libraries that only read local files."""
    path = os.fspath(path)
    if not is_remote(path):
        return path
    fs, p = _fs(path)
    p = p.rstrip("/")
    try:
        found = fs.find(p, detail=True)
    except Exception as e:
        raise StorageError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if not found:
        raise StorageError(f"{path} does not exist")
    listing = sorted(
        (name, int(info.get("size") or 0), str(info.get("generation") or info.get("mtime") or ""))
        for name, info in found.items()
    )
    root = os.path.expanduser(os.environ.get("REFLAX_CACHE") or CACHE_DIR)
    cache = os.path.join(root, path.split("://", 1)[0], *p.split("/"))
    marker = cache + ".listing.json"
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    # one download per host: processes sharing the cache take turns
    with builtins.open(cache + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with builtins.open(marker) as f:
                if json.load(f) == [list(e) for e in listing] and os.path.exists(cache):
                    return cache
        except (OSError, ValueError):
            pass
        remove_tree(cache)
        for name, _, _ in listing:
            rel = os.path.relpath(name, p) if name != p else ""
            local = os.path.join(cache, rel) if rel else cache
            os.makedirs(os.path.dirname(local), exist_ok=True)
            fs.get_file(name, local)
        with builtins.open(marker, "w") as f:
            json.dump(listing, f)
    return cache
