"""Run every paper config's `:local` variant end to end and print each run time.

    python experiments/run_local_configs.py                    # all paper configs
    python experiments/run_local_configs.py qwen1p5b qwen7b    # some of them

Each run is `python -m reflax.train --config=configs/<name>.py:local` in a fresh workdir
(a tiny random model on the CPU, generated data, 3 online GRPO steps, the before/after
evaluation of 8 problems). A paper config is a file of `configs/` that builds its variants
with `reflax.recipes.variant`. Exits 1 if any run fails, after running all of them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def paper_configs() -> list[str]:
    return sorted(
        p.stem for p in (ROOT / "configs").glob("*.py") if "recipes.variant" in p.read_text()
    )


def run(name: str, workdir: str) -> tuple[bool, float, str]:
    """(succeeded, seconds, last lines of its output) of one config's local run."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the real (single) CPU device, as a user's laptop has
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable,
        "-m",
        "reflax.train",
        f"--config={ROOT / 'configs' / name}.py:local",
        f"--workdir={workdir}",
    ]
    start = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-5:])
    return p.returncode == 0, seconds, tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", help="config names (default: every paper config)")
    args = parser.parse_args(argv)
    names = args.configs or paper_configs()
    failed = []
    with tempfile.TemporaryDirectory(prefix="reflax-local-") as root:
        for name in names:
            ok, seconds, tail = run(name, os.path.join(root, name))
            print(f"{name:<14} {'ok' if ok else 'FAILED':<6} {seconds:7.1f} s", flush=True)
            if not ok:
                failed.append(name)
                print(tail, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
