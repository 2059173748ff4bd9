"""A two-process CPU relaunch on a persistent compilation cache: process 0 loads its
programs, process 1 compiles all of its own again.

Pure JAX (0.10.2, gloo collectives), 2 processes x 4 CPU devices on 127.0.0.1. Each process
compiles one program with cross-process collectives (a ppermute ring and a psum, unrolled)
and runs it; the cluster is launched twice on one fresh cache dir. Each process prints
whether its program came from the cache, the time to lower and compile (or load) it, the
time of its first call (waiting for the other process included), and the CPU topology
fingerprint that jax hashes into every cache key
(`jax._src.cache_key._hash_accelerator_config`). The fingerprints differ between the
processes and only process 0 writes the cache (`jax._src.compiler._cache_write`), so on
every relaunch process 0 hits and process 1 misses: the processes reach their first
collective at different times, and the earlier one waits there for the other's compile.
In a reflax train run whose step compiles for minutes on a busy host, that wait ran past
the run's timeouts. `--no-cache` does what `reflax.distributed.initialize` does on
multi-process CPU runs: no process reads the cache, both compile, as on a first launch.

    python experiments/cpu_cache_relaunch.py [--no-cache]

Observed (2-core Xeon shared with other jobs), without --no-cache:
    launch 1
    p0 cache_hit=False compile=5.7s first_call=1.8s fingerprint=17321702946844851012
    p1 cache_hit=False compile=4.0s first_call=3.5s fingerprint=14361769262781867543
    launch 2
    p1 cache_hit=False compile=2.6s first_call=1.6s fingerprint=14361769262781867543
    p0 cache_hit=True compile=1.9s first_call=2.3s fingerprint=17321702946844851012
With --no-cache, cache_hit=False in both processes on both launches. A hit on CPU is not
always much faster than a compile (a 400-op version, timed without the lowering: hit
41.6 s, compile 45.6 s); in the reflax runs it was (a train step loaded in 1-3 s by
process 0, compiled in about 12 s by process 1).
"""

import os
import subprocess
import sys
import tempfile
import time

if len(sys.argv) > 1 and sys.argv[1] == "worker":
    pid, port, cache, no_cache = int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5] == "1"
    import jax
    import numpy as np
    from jax._src.lib import xla_client
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid)
    if no_cache:
        jax.config.update("jax_enable_compilation_cache", False)
    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **kw: hits.append(1) if event.endswith("cache_hits") else None
    )
    mesh, n = jax.make_mesh((8,), ("x",)), 8
    ring = [(i, (i + 1) % n) for i in range(n)]

    def body(a):  # [1, 64] per device
        for _ in range(150):
            a = jax.numpy.tanh(jax.lax.ppermute(a, "x", ring) @ a.T @ a) + jax.lax.psum(a, "x")
        return a

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x")))
    x = jax.device_put(np.ones((n, 64), np.float32) / 64, NamedSharding(mesh, P("x")))
    t0 = time.time()
    compiled = f.lower(x).compile()  # the lowering included
    t1 = time.time()
    jax.block_until_ready(compiled(x))
    t2 = time.time()
    fp = xla_client.get_topology_for_devices(jax.devices()).fingerprint()
    print(
        f"p{pid} cache_hit={bool(hits)} compile={t1 - t0:.1f}s first_call={t2 - t1:.1f}s "
        f"fingerprint={fp}",
        flush=True,
    )
    sys.exit(0)

no_cache = "1" if "--no-cache" in sys.argv else "0"
env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
with tempfile.TemporaryDirectory() as cache:
    for launch in (1, 2):
        print(f"launch {launch}", flush=True)
        port = str(23400 + os.getpid() % 500 + launch)
        cmd = [sys.executable, __file__, "worker"]
        procs = [subprocess.Popen([*cmd, str(i), port, cache, no_cache], env=env) for i in (0, 1)]
        try:
            codes = [p.wait(timeout=300) for p in procs]
        finally:
            for p in procs:
                p.kill()
        print(f"exit codes {codes}", flush=True)
