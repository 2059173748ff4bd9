"""The cluster a run belongs to: joining it, agreeing across processes, moving host data.

A multi-host job (a Cloud TPU pod slice, GPU nodes under SLURM or Open MPI, or processes
started by hand) runs the same command on every host. `initialize` joins the processes
into one JAX cluster (`jax.distributed`), after which `jax.devices()` is the global device
list, every array built on the mesh spans all hosts, and collectives cross hosts. A launch
is recognised by:

  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID   started by hand (the names of
                                 `jax.distributed.initialize`'s arguments); set all three,
                                 plus JAX_COORDINATOR_BIND_ADDRESS to bind the coordinator
                                 to one interface (127.0.0.1 for a cluster on one machine)
  SLURM_NTASKS > 1, OMPI_COMM_WORLD_SIZE > 1   jax reads the rest from the scheduler
  TPU_WORKER_HOSTNAMES with several hosts     Cloud TPU pod slices (jax asks the TPU
                                 metadata); REFLAX_DISTRIBUTED=1 forces jax's detection

Failure is bounded, never a hang (`ClusterSettings`): joining gives up after
`init_timeout_s` (a missing coordinator, a wrong process count, an unreachable host) with
one `ClusterError`; once running, a process whose peer stops sending heartbeats for
`heartbeat_timeout_s` is stopped by jax's coordination service with an error naming the
lost task. Both come from the config (`cluster.*`).

Every process holds the same host-side values (configs, examples, sampled text, the global
batch), built by the same code from the same seeds; `reflax.sharding.put` and `fetch` move
them onto the mesh and back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)

_RUNTIME_GRACE_S = 30  # jax's own join deadline, after ours
_EXPLICIT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


class ClusterError(RuntimeError):
    """The processes of a multi-host launch could not form (or keep) one cluster."""


@dataclasses.dataclass(frozen=True)
class ClusterSettings:
    init_timeout_s: int = 300  # joining: every process must reach the coordinator by then
    heartbeat_timeout_s: int = 100  # running: a silent peer is declared dead after this


def launch_kind(env: dict[str, str] | None = None) -> str | None:
    """How this process was launched as part of a cluster ("explicit", "slurm", "mpi",
    "tpu", "auto"), or None for a single-process run."""
    env = os.environ if env is None else env
    if any(env.get(k) for k in _EXPLICIT):
        return "explicit"
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return "slurm"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "mpi"
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return "tpu"
    if env.get("REFLAX_DISTRIBUTED", "") not in ("", "0"):
        return "auto"
    return None


def initialize(settings: ClusterSettings = ClusterSettings()) -> tuple[int, int]:
    """Join the cluster this process was launched in (no-op for a single process).

    Returns (process index, process count) and logs `process i of n` once.
    """
    if jax.distributed.is_initialized():
        return jax.process_index(), jax.process_count()
    kind = launch_kind()
    if kind is None:
        return 0, 1
    kwargs: dict[str, Any] = dict(heartbeat_timeout_seconds=int(settings.heartbeat_timeout_s))
    where = ""
    if kind == "explicit":
        missing = [k for k in _EXPLICIT if not os.environ.get(k)]
        if missing:
            raise ClusterError(
                f"a multi-process launch by environment needs all of {', '.join(_EXPLICIT)}; "
                f"missing: {', '.join(missing)}"
            )
        try:
            n, i = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
        except ValueError as e:
            raise ClusterError(
                f"JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers: {e}"
            ) from None
        if not (n >= 1 and 0 <= i < n):
            raise ClusterError(f"JAX_PROCESS_ID={i} is not in [0, JAX_NUM_PROCESSES={n})")
        address = os.environ["JAX_COORDINATOR_ADDRESS"]
        kwargs.update(coordinator_address=address, num_processes=n, process_id=i)
        where = f" (coordinator {address}, process {i} of {n})"
    message = (
        f"could not join the {kind} cluster{where} within {settings.init_timeout_s} s. Check "
        "that every process was started, with the same process count, and can reach the "
        "coordinator (cluster.init_timeout_s sets the wait)."
    )
    # jax's runtime aborts the process (a C++ fatal error) when joining times out; a
    # watchdog that fires first gives one clear error and exit status 1 instead
    watchdog = threading.Timer(settings.init_timeout_s, _give_up, args=(message,))
    watchdog.daemon = True
    watchdog.start()
    kwargs["initialization_timeout"] = int(settings.init_timeout_s) + _RUNTIME_GRACE_S
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # the runtime raises several types; one clear error for all
        raise ClusterError(f"{message} ({_first_line(e)})") from e
    finally:
        watchdog.cancel()
    log.info("process %d of %d", jax.process_index(), jax.process_count())
    if jax.process_count() > 1 and jax.devices()[0].platform == "cpu":
        # On CPU every persistent-cache key holds the process's own topology fingerprint and
        # only process 0 writes, so a relaunch would load process 0's programs while the
        # others compile theirs again, and process 0 would wait in its first collective for
        # the slowest compile (past the collectives' timeouts on a busy host; see
        # experiments/cpu_cache_relaunch.py). Every process compiles, as on a first launch.
        jax.config.update("jax_enable_compilation_cache", False)
        log.info("persistent compilation cache off (a multi-process CPU cluster)")
    return jax.process_index(), jax.process_count()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _give_up(message: str) -> None:
    sys.stderr.write(f"reflax.distributed.ClusterError: {message}\n")
    sys.stderr.flush()
    os._exit(1)


def is_primary() -> bool:
    """The process that writes files (metrics, samples, exports, eval results)."""
    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is True on any (a collective: call it on all)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray([bool(flag)], np.int32), tiled=True)
    return bool(np.asarray(flags).any())


_PEER_LOSS = ("gloo", "connection closed", "connection reset", "heartbeat", "coordination")


@contextlib.contextmanager
def exit_on_error() -> Iterator[None]:
    """Around a multi-process command: an error ends this process at once, with one message.

    Without it a failing process would first wait at jax's shutdown barrier for peers that
    may never come, then abort with the runtime's own report. A collective whose peer died
    fails fast on CPU and GPU (the connection closes); where it cannot, the coordination
    service stops every process after `cluster.heartbeat_timeout_s`.
    """
    try:
        yield
    except BaseException as e:
        # (is_initialized first: an error before joining must not start a device backend)
        alone = not jax.distributed.is_initialized() or jax.process_count() == 1
        if alone or (isinstance(e, SystemExit) and not e.code):
            raise
        me = f"process {jax.process_index()} of {jax.process_count()}"
        text = _first_line(e)
        if any(k in str(e).lower() for k in _PEER_LOSS):
            sys.stderr.write(
                f"reflax.distributed.ClusterError: {me} lost its cluster (another process "
                f"died or was stopped): {text}. Relaunch the same command on every host to "
                "resume from the last checkpoint.\n"
            )
        else:
            traceback.print_exc()
            sys.stderr.write(f"{me} stopped on the error above; so will the others.\n")
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(1)


class StopRequest:
    """SIGTERM (a preemption notice, `scancel`, a pod's eviction) as a flag the loop polls.

    The handler only records the signal; the loop asks `agreed()` at each step boundary, a
    collective, so every process stops after the same step. Later signals are counted and
    ignored, so a second SIGTERM cannot interrupt the checkpoint being written. As a context
    manager it puts the previous handlers back on exit.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.received = 0
        self._previous = {}
        for s in signals:
            self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        self.received += 1
        if self.received == 1:
            log.warning("received signal %d: stopping at the next step boundary", signum)
        else:
            log.warning("received signal %d again: still saving, ignored", signum)

    def agreed(self) -> bool:
        """Whether any process has been asked to stop (call on every process, each step)."""
        return any_process(self.received > 0)

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def __enter__(self) -> StopRequest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()  # on every exit path, an exception's included
