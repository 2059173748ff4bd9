"""What the command lines share: flag parsing, the config, the cluster, and error reports.

`reflax.train`, `reflax.evaluate` and `reflax.collect_failures` each define their flags and
a `main()` that starts with `setup` (or `start`, which also builds the runtime), then hand
it to `run`. In that order, before any model loads: the flags are parsed (a positional
argument is refused), the config is validated, every input path is checked
(`check_inputs`), and the process joins its cluster.

Errors. A user error prints one line on stderr, `<ErrorType>: <message>`, and exits with
status 1: a flag or config key that does not exist, a bad value (`ConfigError`), a missing
input (`InputError`), an unusable checkpoint (`CheckpointError`), a cluster that does not
form (`ClusterError`), a missing optional extra (`UsageError`, naming the `pip install`),
and the errors an entry point adds (train: a non-finite loss). Anything else is a bug and
keeps its traceback; `--verbose` shows the traceback of user errors too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

import jax
from absl import app, flags
from ml_collections import ConfigDict

from reflax import distributed, logs, storage
from reflax.checkpoint import CheckpointError
from reflax.config import ConfigError, validate
from reflax.distributed import ClusterError
from reflax.runtime import Runtime, build
from reflax.tasks.sources import _LOCAL_SUFFIXES as DATA_SUFFIXES


class UsageError(ValueError):
    """The command line asks for something it cannot do (a stray argument, a missing extra)."""


class InputError(FileNotFoundError):
    """A path the command reads (or writes into) does not exist."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    CheckpointError,
    ClusterError,
    UsageError,
    InputError,
    storage.StorageError,  # a bucket that cannot be reached or written
)

# The readers' rule (`reflax.models.hf.resolve_checkpoint`, `reflax.tasks.sources`): a path
# that starts so, has more than one "/" or a data file's suffix is local; "org/name" may be
# a Hub id, which only the reader can check.
_LOCAL_PREFIXES = ("/", ".", "~")


def run(main: Callable[[], Any], *, user_errors: tuple[type[BaseException], ...] = ()) -> None:
    """absl's `app.run` of `main` with the shared flag parsing and error policy."""
    flags.DEFINE_bool("verbose", False, "print the traceback of user errors too")
    errors = USER_ERRORS + tuple(user_errors)

    def entry(argv: Sequence[str]) -> None:
        del argv  # only the program name: `_parse` refuses positional arguments
        logs.setup()
        # inside exit_on_error, so a user error ends a multi-process run with one line too
        with distributed.exit_on_error(), _one_line(errors):
            main()

    app.run(entry, flags_parser=_parse)


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What a command reads and writes besides the paths in its config."""

    failures: bool = True  # it reads the config's failure set (offline runs)
    models: Sequence[str] = ()  # model directories or Hub ids
    checkpoints: Sequence[str] = ()  # checkpoint directories, each with a finished step
    outputs: Sequence[str] = ()  # files it will write


def setup(c: ConfigDict, inputs: Inputs = Inputs()) -> ConfigDict:
    """The validated config, every input checked (`check_inputs`), the cluster joined."""
    c = validate(c)
    check_inputs(c, inputs)
    distributed.initialize(distributed.ClusterSettings(**c.cluster))
    return c


def start(c: ConfigDict, inputs: Inputs = Inputs()) -> tuple[Runtime, Any]:
    """`setup`, then the run's `Runtime` and the model's initial weights."""
    return build(setup(c, inputs))


def check_inputs(c: ConfigDict, inputs: Inputs = Inputs()) -> None:
    """Raise `InputError` for the first missing input: the config's model, tokenizer and
    data files, the failure set an offline run reads (`inputs.failures`), the other
    `inputs` and the directories of its outputs. Cheap: nothing is loaded, so a wrong path
    fails in seconds rather than after the model has loaded."""
    for path in [c.model.path, c.tokenizer.path, *inputs.models]:
        if path and storage.is_remote(path):
            storage.check_readable(path)
        elif path and _looks_local(path) and not _is_model(os.path.expanduser(path)):
            raise InputError(f"model {path} does not exist (a directory or a .gguf file)")
    for path in (c.task.train_source, c.task.test_source):
        if path and storage.is_remote(path):
            storage.check_readable(path)
        elif (
            path
            and _looks_local(path, DATA_SUFFIXES)
            and not os.path.exists(os.path.expanduser(path))
        ):
            raise InputError(f"no such data file: {path}")
    offline = c.rollout.mode == "offline" and c.rollout.method != "first_attempt"
    if inputs.failures and offline and not _is_file(c.rollout.failures):
        raise InputError(
            f"no failure set at rollout.failures={c.rollout.failures} "
            "(write one with python -m reflax.collect_failures)"
        )
    for path in inputs.checkpoints:
        if storage.is_remote(path):
            storage.check_readable(path)  # orbax names an unfinished one when it restores
        elif not _has_checkpoint(path):
            raise InputError(f"{path} is missing or holds no finished checkpoint")
    for path in inputs.outputs:
        if storage.is_remote(path):
            storage.check_writable(storage.parent(path))
            continue
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise InputError(f"cannot write {path}: directory {parent} does not exist")


def require_extra(module: str, extra: str, what: str) -> ModuleType:
    """`module`, or a `UsageError` naming the `pip install` of the extra it needs."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = (e.name or "").split(".")[0]
        if not missing or missing == "reflax":
            raise
        raise UsageError(f"{what} needs {missing}: pip install 'reflax[{extra}]'") from e


def one_line(e: BaseException | str) -> str:
    """A message on one line: a multi-line one (e.g. a ConfigError's list) joined by "; "."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    if not lines:
        return type(e).__name__
    head, rest = lines[0], lines[1:]
    return head if not rest else head.rstrip(":") + ": " + "; ".join(rest)


# ----------------------------------------------------------------------------- internals


def _looks_local(path: str, suffixes: tuple[str, ...] = ()) -> bool:
    return (
        path.startswith(_LOCAL_PREFIXES) or path.count("/") > 1 or path.lower().endswith(suffixes)
    )


def _is_model(path: str) -> bool:
    # an HF directory, or a GGUF file (reflax.models.gguf)
    return os.path.isdir(path) or (os.path.isfile(path) and path.lower().endswith(".gguf"))


def _is_file(path: str) -> bool:
    if storage.is_remote(path):
        storage.check_readable(path)
        return True
    return os.path.isfile(path)


def _has_checkpoint(directory: str) -> bool:
    # a finished checkpoint is a bare integer directory (orbax renames it when complete)
    d = os.path.expanduser(directory)
    return os.path.isdir(d) and any(
        n.isdigit() and os.path.isdir(os.path.join(d, n)) for n in os.listdir(d)
    )


def _verbose(argv: Sequence[str]) -> bool:
    # read before the flags are parsed, for errors of the parsing itself
    return any(a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1") for a in argv)


def _report(text: str, verbose: bool) -> None:
    if verbose:
        traceback.print_exc()
    where = ""
    if jax.distributed.is_initialized() and jax.process_count() > 1:
        where = f"process {jax.process_index()} of {jax.process_count()}: "
    sys.stdout.flush()
    sys.stderr.write(f"{where}{text}\n")
    sys.stderr.flush()


def _exit(status: int) -> None:
    if jax.distributed.is_initialized() and jax.process_count() > 1:
        # not through jax's shutdown barrier, which would wait for peers that may be gone
        logging.shutdown()
        os._exit(status)
    raise SystemExit(status)


@contextlib.contextmanager
def _one_line(errors: tuple[type[BaseException], ...]) -> Iterator[None]:
    try:
        yield
    except errors as e:
        _report(f"{type(e).__name__}: {one_line(e)}", flags.FLAGS.verbose)
        _exit(1)


def _parse(argv: list[str]) -> list[str]:
    """absl's flag parsing with one-line errors; positional arguments are refused."""
    verbose = _verbose(argv)
    try:
        rest = flags.FLAGS(argv)
        if "config" in flags.FLAGS and flags.FLAGS.config is not None:
            flags.FLAGS.config.keys()  # a config file that failed to load raises when read
    except flags.Error as e:
        _report(f"UsageError: {one_line(e)}", verbose)
        raise SystemExit(1) from None
    except (AttributeError, KeyError) as e:  # a --config.<key> override of a key not there
        _report(f"ConfigError: {_unknown_key(e, argv)}", verbose)
        raise SystemExit(1) from None
    except OSError as e:  # the config file could not be read
        cause = str(e).strip().splitlines()[-1].strip()
        _report(f"ConfigError: cannot load the config file: {cause}", verbose)
        raise SystemExit(1) from None
    except Exception as e:  # the config file's get_config failed
        _report(f"ConfigError: the config file failed: {type(e).__name__}: {one_line(e)}", verbose)
        raise SystemExit(1) from None
    if len(rest) > 1:
        _report(
            f"UsageError: unexpected arguments {rest[1:]}: every option is a --flag=value",
            verbose,
        )
        raise SystemExit(1)
    return rest


def _unknown_key(e: BaseException, argv: Sequence[str]) -> str:
    name = str(e).strip("\"' ")
    culprits = [
        a.split("=")[0]
        for a in argv
        if a.startswith("--config.") and name in a.split("=")[0].split(".")
    ]
    shown = ", ".join(culprits) or f"--config...{name}"
    return f"{shown}: the config has no key {name!r} (keys: reflax.config.base_config)"
