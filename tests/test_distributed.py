"""The cluster pieces that need no second process: launch detection, host-to-mesh placement
for any mesh layout, process-ordered meshes, the SIGTERM request, the KL reference dtype."""

from __future__ import annotations

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_trainer import CFG, make_batch

from reflax import distributed, optim
from reflax.batch import shard_batch
from reflax.config import ConfigError, base_config, validate
from reflax.models import create
from reflax.sharding import fetch, make_mesh, named_sharding, put
from reflax.trainer import StepConfig, init_state, jit_train_step, make_train_step


@pytest.mark.parametrize(
    "env, kind",
    [
        ({}, None),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),  # one task: a plain run
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, "slurm"),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, "mpi"),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),  # a single-host TPU VM
        ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, "tpu"),
        ({"JAX_NUM_PROCESSES": "2"}, "explicit"),
        ({"REFLAX_DISTRIBUTED": "1"}, "auto"),
    ],
)
def test_launch_kind(env, kind):
    assert distributed.launch_kind(env) == kind


def test_explicit_launch_needs_all_three_variables(monkeypatch):
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(distributed.ClusterError, match="missing: JAX_COORDINATOR_ADDRESS"):
        distributed.initialize()
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(distributed.ClusterError, match=r"JAX_PROCESS_ID=2 is not in \[0, "):
        distributed.initialize()


def test_single_process_run_is_not_a_cluster(monkeypatch):
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.initialize() == (0, 1)
    assert distributed.is_primary() and not distributed.any_process(False)
    assert distributed.any_process(True)


def test_mesh_across_hosts_puts_the_axis_between_processes():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2, "across_hosts": "tensor"})
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    # devices 0-3 would be one host and 4-7 the other: tensor index = host
    assert (ids[..., 0] < 4).all() and (ids[..., 1] >= 4).all()
    default = np.vectorize(lambda d: d.id)(make_mesh({"data": 2, "fsdp": 2, "tensor": 2}).devices)
    assert (default[0] < 4).all() and (default[1] >= 4).all()  # data outermost
    with pytest.raises(ValueError, match="across_hosts"):
        make_mesh({"fsdp": -1, "across_hosts": "pipeline"})


@pytest.mark.parametrize("across", ["", "tensor"])
def test_put_and_fetch_round_trip_on_any_layout(across):
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2, "across_hosts": across})
    x = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    for logical in (("batch", None), ("batch", "vocab"), (None, None)):
        arr = put(x, named_sharding(mesh, logical, x.shape))
        assert arr.sharding.spec == named_sharding(mesh, logical, x.shape).spec
        np.testing.assert_array_equal(fetch(arr), x)
    key = jax.random.key(3)
    placed = put(key, named_sharding(mesh, (), ()))
    assert jax.dtypes.issubdtype(placed.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.uniform(placed, (4,)), jax.random.uniform(key, (4,)))


def test_stop_request_counts_signals_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    stop = distributed.StopRequest()
    assert not stop.agreed()
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)  # a second notice does not kill the process
    assert stop.received == 2 and stop.agreed()
    stop.restore()
    assert signal.getsignal(signal.SIGTERM) == before


def test_exit_on_error_reraises_in_a_single_process():
    with pytest.raises(KeyError), distributed.exit_on_error():
        raise KeyError("x")


def test_bfloat16_reference_matches_float32_to_its_precision():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    graphdef, params = nnx.split(create(CFG, mesh=mesh, seed=1))
    tx, _ = optim.make_optimizer(total_steps=10, learning_rate=1e-2, warmup_ratio=0.0)
    cfg = StepConfig(beta=0.1, anchor_beta=0.5)
    batch = shard_batch(make_batch(), mesh)
    metrics = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        ref = jax.tree.map(lambda x, d=dtype: x.astype(d), params)
        state = init_state(jax.tree.map(jnp.copy, params), tx, mesh)
        step = jit_train_step(make_train_step(graphdef, tx, cfg), state, batch, mesh, True)
        with jax.set_mesh(mesh):
            _, metrics[dtype] = step(state, batch, ref)
    f32, bf16 = metrics[jnp.float32], metrics[jnp.bfloat16]
    assert float(f32["kl"]) == 0.0 < float(bf16["kl"])  # bf16 rounding is the only difference
    # the policy's log-probs against a bf16-rounded copy: the KL is of the order of the
    # squared log-prob error, far below the size of a log-prob (~1)
    assert float(bf16["kl"]) < 1e-3 and float(bf16["anchor_kl"]) < 1e-3
    np.testing.assert_allclose(float(bf16["loss"]), float(f32["loss"]), rtol=1e-2, atol=1e-4)


def test_config_validates_cluster_mesh_and_reference_keys():
    c = base_config()
    c.tokenizer.char_alphabet = "ab"
    c.rollout.mode = "online"
    c.cluster.init_timeout_s = 0
    c.mesh.across_hosts = "pipeline"
    c.grpo.ref_dtype = "int8"
    with pytest.raises(ConfigError) as e:
        validate(c)
    for key in ("cluster.init_timeout_s", "mesh.across_hosts", "grpo.ref_dtype"):
        assert key in str(e.value)
