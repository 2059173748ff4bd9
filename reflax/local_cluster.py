"""A multi-process JAX cluster on one machine: check a multi-host setup on a laptop.

    python -m reflax.local_cluster --processes=2 --devices=4 -- \\
        python -m reflax.train --config=configs/countdown_toy.py:smoke --workdir=/tmp/mh

starts the command once per process with the variables `reflax.distributed` reads
(JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, the coordinator bound to
127.0.0.1 on a free port) and `--devices` fake CPU devices per process, so the processes
form one cluster of processes x devices devices exactly as the hosts of a pod slice do.
Process 0's output passes through; the others' lines are prefixed with `[pN]` (so a user
error that every process meets shows once per process, each in one line). Its own usage
errors are one line and exit status 1, as the other commands'. SIGTERM
and SIGINT are forwarded to every process. When one process fails, the others are
stopped (SIGTERM, then SIGKILL after a grace period) and its exit status is returned.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import NoReturn


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def process_env(
    index: int, processes: int, port: int, devices: int, base: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment of process `index` of a loopback cluster."""
    env = dict(os.environ if base is None else base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    env.update(
        XLA_FLAGS=" ".join(flags),
        JAX_PLATFORMS="cpu",
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES=str(processes),
        JAX_PROCESS_ID=str(index),
        PYTHONUNBUFFERED="1",
    )
    return env


class LocalCluster:
    """`processes` copies of `cmd` forming one cluster; stop them all with `stop()`."""

    def __init__(
        self,
        cmd: Sequence[str],
        *,
        processes: int = 2,
        devices: int = 4,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        grace_s: float = 10.0,
        output: str = "prefix",  # "prefix": stream (process 0 plain); "capture": keep
    ):
        if processes < 1 or devices < 1:
            raise ValueError("processes and devices must be >= 1")
        self.grace_s = grace_s
        self.port = free_port()
        self.outputs: list[list[str]] = [[] for _ in range(processes)]
        self.procs: list[subprocess.Popen] = []
        self._threads: list[threading.Thread] = []
        try:
            for i in range(processes):
                p = subprocess.Popen(
                    list(cmd),
                    env=process_env(i, processes, self.port, devices, env),
                    cwd=cwd,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                self.procs.append(p)
                t = threading.Thread(target=self._pump, args=(i, p, output), daemon=True)
                t.start()
                self._threads.append(t)
        except BaseException:
            self.stop()
            raise

    def _pump(self, i: int, p: subprocess.Popen, output: str) -> None:
        for line in p.stdout:
            self.outputs[i].append(line)
            if output == "prefix":
                sys.stdout.write(line if i == 0 else f"[p{i}] {line}")
                sys.stdout.flush()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def output(self, i: int = 0) -> str:
        return "".join(self.outputs[i])

    def signal(self, sig: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(sig)

    def stop(self) -> None:
        """SIGTERM every live process, SIGKILL what is left after the grace period."""
        self.signal(signal.SIGTERM)
        deadline = time.time() + self.grace_s
        while time.time() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.05)
        self.signal(signal.SIGKILL)
        for p in self.procs:
            p.wait()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for all; the first non-zero exit stops the rest. Returns the cluster's status
        (0, or the first failure's). On timeout every process is killed and 124 returned."""
        deadline = None if timeout is None else time.time() + timeout
        status = 0
        while True:
            codes = [p.poll() for p in self.procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                status = failed[0]
                self.stop()
                break
            if all(c == 0 for c in codes):
                break
            if deadline is not None and time.time() > deadline:
                self.stop()
                status = 124
                break
            time.sleep(0.05)
        for t in self._threads:
            t.join(timeout=5)
        return status

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        if any(p.poll() is None for p in self.procs):
            self.stop()


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line and exit status 1, as the other reflax commands report them."""

    def error(self, message: str) -> NoReturn:
        self.exit(1, f"UsageError: {message} (see --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--devices", type=int, default=4, help="fake CPU devices per process")
    p.add_argument("--timeout", type=float, default=None, help="seconds, then kill all")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the command each process runs")
    a = p.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        p.error("no command given (put it after --)")
    try:
        cluster = LocalCluster(cmd, processes=a.processes, devices=a.devices)
    except (OSError, ValueError) as e:  # no such program, bad sizes
        p.exit(1, f"{type(e).__name__}: {e}\n")
    forward = lambda signum, frame: cluster.signal(signum)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return cluster.wait(a.timeout)


if __name__ == "__main__":
    sys.exit(main())
