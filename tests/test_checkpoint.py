"""Checkpointer: sharded round trips across meshes, retention, interrupted saves, corruption."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from reflax.checkpoint import Checkpointer, CheckpointError, abstract_like
from reflax.sharding import make_mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPES = {"embed": (16, 8), "proj": (2, 8, 4), "norm": (8,), "bias": (4,)}
DTYPES = {"bias": jnp.bfloat16}
# layout at save time on the (2,2,2) mesh, and a different one for restore on (1,8,1)
SAVE_SPECS = {"embed": P("fsdp", "tensor"), "proj": P(None, "fsdp", "tensor"), "bias": P("data")}
LOAD_SPECS = {"embed": P(None, "fsdp"), "proj": P(None, "fsdp", None), "norm": P("fsdp")}


def _name(path) -> str | None:
    for key in reversed(path):
        if isinstance(key, jax.tree_util.DictKey) and isinstance(key.key, str):
            return key.key
    return None


def _target(tree, mesh, specs):
    """ShapeDtypeStructs of `tree` laid out on `mesh`: named leaves by `specs`, rest replicated."""

    def one(path, x):
        spec = specs.get(_name(path), P()) if np.ndim(x) else P()
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(one, tree)


def _make_state(mesh, seed: int = 0):
    rng = np.random.default_rng(seed)
    params = {
        k: jax.device_put(
            rng.standard_normal(s).astype(DTYPES.get(k, np.float32)),
            NamedSharding(mesh, SAVE_SPECS.get(k, P())),
        )
        for k, s in SHAPES.items()
    }
    return _adam_state(params, jnp.asarray(7 + seed, jnp.int32), jax.random.PRNGKey(42 + seed))


# one jitted program: op-by-op on a sharded state would compile every small op separately
@jax.jit
def _adam_state(params, step, rng):
    tx = optax.adam(1e-2)
    grads = jax.tree.map(lambda p: p * 0.5 + 1, params)
    _, opt_state = tx.update(grads, tx.init(params), params)  # non-zero moments, count 1
    return {
        "params": params,
        "opt_state": opt_state,
        "step": step,
        "rng": rng,
    }


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(x).copy(), tree)


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


META = {"data_position": 123, "epoch": 1, "config": {"lr": 1e-6, "mesh": [2, 2, 2], "name": "x"}}


@pytest.fixture(scope="module")
def mesh222():
    return make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


@pytest.fixture(scope="module")
def mesh181():
    return make_mesh({"data": 1, "fsdp": 8, "tensor": 1})


@pytest.fixture(scope="module")
def saved(tmp_path_factory, mesh222):
    """A directory with complete checkpoints of steps 1 and 2 (different values)."""
    directory = tmp_path_factory.mktemp("template") / "ckpt"
    states = {s: _make_state(mesh222, seed=s) for s in (1, 2)}
    with Checkpointer(directory) as ckpt:
        for s, state in states.items():
            ckpt.save(s, state, {**META, "data_position": s})
    return directory, {s: _host(v) for s, v in states.items()}


def test_round_trip_onto_another_mesh(tmp_path, mesh222, mesh181):
    state = _make_state(mesh222)
    before = _host(state)
    ckpt = Checkpointer(tmp_path / "ckpt", keep=2)
    ckpt.save(7, state, META)
    # saving neither donates nor changes the arrays
    assert not any(x.is_deleted() for x in jax.tree.leaves(state))
    _assert_tree_equal(state, before)
    ckpt.close()

    target = _target(state, mesh181, LOAD_SPECS)
    restored, meta = Checkpointer(tmp_path / "ckpt").restore(target)
    assert meta == META
    _assert_tree_equal(restored, before)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
        assert got.sharding == want.sharding
    emb = restored["params"]["embed"]
    assert emb.sharding.mesh.shape == {"data": 1, "fsdp": 8, "tensor": 1}
    assert {s.data.shape for s in emb.addressable_shards} == {(16, 1)}
    assert restored["opt_state"][0].count.dtype == jnp.int32
    assert int(restored["opt_state"][0].count) == 1
    assert restored["rng"].dtype == jnp.uint32 and restored["rng"].shape == (2,)


class _TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    rng: jax.Array


def test_nnx_state_struct_and_typed_key(tmp_path, mesh181):
    model = nnx.Linear(8, 16, rngs=nnx.Rngs(0))
    params = jax.device_put(
        nnx.state(model, nnx.Param), NamedSharding(mesh181, P())
    )  # replicated on the mesh
    tx = optax.adamw(1e-3)
    state = _TrainState(
        step=jnp.asarray(3, jnp.int32),
        params=params,
        opt_state=jax.jit(tx.init)(params),
        rng=jax.random.key(5),
    )
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(3, state, {"epoch": np.int64(2), "data_position": np.asarray(9)})
    restored, meta = ckpt.restore(abstract_like(state))
    ckpt.close()
    assert meta == {"epoch": 2, "data_position": 9}
    assert isinstance(restored, _TrainState) and isinstance(restored.params, nnx.State)
    np.testing.assert_array_equal(restored.params["kernel"][...], model.kernel[...])
    assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(
        jax.random.key_data(restored.rng), jax.random.key_data(jax.random.key(5))
    )


def test_keep_n_and_latest(tmp_path):
    directory = tmp_path / "ckpt"
    ckpt = Checkpointer(directory, keep=2)
    assert ckpt.latest_step() is None and ckpt.all_steps() == []
    for s in (10, 20, 30, 40):
        ckpt.save(s, {"w": jnp.full((4,), s, jnp.float32)}, {"data_position": s})
    assert ckpt.all_steps() == [30, 40] and ckpt.latest_step() == 40
    assert sorted(os.listdir(directory)) == ["30", "40"]
    ckpt.close()
    reopened = Checkpointer(directory, keep=2)
    assert reopened.latest_step() == 40
    target = {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=_one_device())}
    state, meta = reopened.restore(target, step=30)
    assert meta == {"data_position": 30} and float(state["w"][0]) == 30.0
    reopened.close()


def _one_device():
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def test_existing_step_skipped_unless_forced(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt")
    target = {"w": jax.ShapeDtypeStruct((2,), jnp.float32, sharding=_one_device())}
    ckpt.save(5, {"w": jnp.zeros(2)}, {"v": 0})
    ckpt.save(5, {"w": jnp.ones(2)}, {"v": 1})  # not newer: skipped
    ckpt.save(4, {"w": jnp.ones(2)}, {"v": 1})  # older: skipped
    assert ckpt.all_steps() == [5]
    assert ckpt.restore(target)[1] == {"v": 0}
    ckpt.save(5, {"w": jnp.ones(2)}, {"v": 2}, force=True)  # replaced
    state, meta = ckpt.restore(target)
    assert meta == {"v": 2} and float(state["w"][1]) == 1.0
    ckpt.close()


def test_unserialisable_metadata_writes_nothing(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt")
    with pytest.raises(TypeError, match=r"metadata\['bad'\]"):
        ckpt.save(1, {"w": jnp.zeros(2)}, {"bad": object()})
    assert ckpt.all_steps() == [] and not glob.glob(str(tmp_path / "ckpt" / "1*"))
    ckpt.close()


def test_interrupted_save_is_ignored(saved, tmp_path):
    src, states = saved
    directory = tmp_path / "ckpt"
    shutil.copytree(src, directory)
    # what a save killed half-way leaves: orbax's tmp dir, never renamed to "3"
    tmp = directory / "3.orbax-checkpoint-tmp-1712345678"
    (tmp / "state" / "d").mkdir(parents=True)
    (tmp / "state" / "d" / "deadbeef").write_bytes(b"\x00" * 17)
    (tmp / "meta").mkdir()
    (tmp / "meta" / "metadata").write_text('{"data_pos')
    ckpt = Checkpointer(directory)
    assert ckpt.all_steps() == [1, 2] and ckpt.latest_step() == 2
    # one appearing while the Checkpointer is open is ignored too (restore re-lists steps)
    (directory / "4.orbax-checkpoint-tmp-1712345699" / "state").mkdir(parents=True)
    target = _target(states[2], make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), SAVE_SPECS)
    state, meta = ckpt.restore(target)
    assert meta["data_position"] == 2
    _assert_tree_equal(state, states[2])
    # the step can be saved again once the leftover is gone
    ckpt.save(3, state, meta)
    ckpt.close()
    assert Checkpointer(directory).latest_step() == 3


def test_kill_after_save_leaves_loadable_checkpoint(tmp_path):
    directory = tmp_path / "ckpt"
    script = textwrap.dedent(
        """
        import os, signal, sys
        import jax, jax.numpy as jnp
        from reflax.checkpoint import Checkpointer
        ckpt = Checkpointer(sys.argv[1])
        state = {"w": jnp.arange(6.0).reshape(2, 3), "rng": jax.random.PRNGKey(0)}
        ckpt.save(5, state, {"data_position": 11})
        os.kill(os.getpid(), signal.SIGKILL)  # no close(), no atexit
        """
    )
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(directory)], env=env, capture_output=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    target = {
        "w": jax.ShapeDtypeStruct((2, 3), jnp.float32, sharding=_one_device()),
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=_one_device()),
    }
    ckpt = Checkpointer(directory)
    assert ckpt.latest_step() == 5
    state, meta = ckpt.restore(target)
    assert meta == {"data_position": 11}
    np.testing.assert_array_equal(state["w"], np.arange(6.0).reshape(2, 3))
    ckpt.close()


def _truncate_data(step_dir):
    files = glob.glob(os.path.join(step_dir, "state", "d", "*"))
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)


def _delete_data(step_dir):
    for f in glob.glob(os.path.join(step_dir, "state", "d", "*")):
        os.remove(f)


def _delete_array_manifest(step_dir):
    os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))


def _garbage_metadata(step_dir):
    with open(os.path.join(step_dir, "meta", "metadata"), "w") as fh:
        fh.write('{"data_position": 1, "epo')


def _delete_reflax_manifest(step_dir):
    shutil.rmtree(os.path.join(step_dir, "manifest"))


def _swap_in_other_step(step_dir):
    # well-formed arrays of another step (a botched copy): only the fingerprints can tell
    other = os.path.join(os.path.dirname(step_dir), "1")
    shutil.rmtree(os.path.join(step_dir, "state"))
    shutil.copytree(os.path.join(other, "state"), os.path.join(step_dir, "state"))


# orbax's reader threads report failed reads a second time, after its event loop closed
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    "damage, match",
    [
        (_truncate_data, "could not be read"),
        (_delete_data, "could not be read"),
        (_delete_array_manifest, "could not be read"),
        (_garbage_metadata, "could not be read"),
        (_delete_reflax_manifest, "manifest unreadable"),
        (_swap_in_other_step, "corrupt"),
    ],
)
def test_damaged_checkpoint_raises_one_clear_error(saved, tmp_path, mesh222, damage, match):
    src, states = saved
    directory = tmp_path / "ckpt"
    shutil.copytree(src, directory)
    step_dir = str(directory / "2")
    damage(step_dir)
    ckpt = Checkpointer(directory)
    with pytest.raises(CheckpointError, match=match) as info:
        ckpt.restore(_target(states[2], mesh222, SAVE_SPECS))
    assert step_dir in str(info.value)
    # the older, intact step still restores
    state, meta = ckpt.restore(_target(states[1], mesh222, SAVE_SPECS), step=1)
    _assert_tree_equal(state, states[1])
    ckpt.close()


def test_mismatched_target_names_the_leaves(saved, mesh222):
    src, states = saved
    ckpt = Checkpointer(src)
    target = _target(states[2], mesh222, SAVE_SPECS)
    wrong = jax.tree.map(lambda x: x, target)
    wrong["params"]["embed"] = jax.ShapeDtypeStruct((16, 9), jnp.float32, sharding=_one_device())
    with pytest.raises(CheckpointError, match=r"shape mismatch: \['params'\]\['embed'\]"):
        ckpt.restore(wrong)
    missing = jax.tree.map(lambda x: x, target)
    del missing["rng"]
    with pytest.raises(CheckpointError, match=r"not requested: \['rng'\]"):
        ckpt.restore(missing)
    with pytest.raises(CheckpointError, match="no checkpoint for step 9"):
        ckpt.restore(target, step=9)


def test_restore_from_empty_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        Checkpointer(tmp_path / "empty").restore({})


def test_one_checkpoint_error_everywhere(tmp_path):
    # a run's missing checkpoints and a missing HF checkpoint raise the same error class
    from types import SimpleNamespace

    from reflax.models.hf import load_pretrained
    from reflax.runtime import restore_params
    from reflax.warm_start import warm_start

    with pytest.raises(CheckpointError, match="no checkpoint in"):
        restore_params(None, str(tmp_path / "run"))
    rt = SimpleNamespace(config=SimpleNamespace(warm_start=None))
    with pytest.raises(CheckpointError, match="warm_start is missing"):
        warm_start(rt, None, str(tmp_path / "run"), None, restore_only=True)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(str(tmp_path / "no_model"))


def test_async_save(tmp_path, mesh222):
    state = _make_state(mesh222)
    before = _host(state)
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=True, keep=1)
    ckpt.save(1, state, META)
    # while a background save runs, its step is not reported as complete
    real = ckpt._mgr.is_saving_in_progress
    ckpt._mgr.is_saving_in_progress = lambda: True
    assert 1 not in ckpt.all_steps()
    ckpt._mgr.is_saving_in_progress = real
    ckpt.save(2, state, META)  # waits for the first save, then drops it (keep=1)
    ckpt.wait()
    assert ckpt.all_steps() == [2]
    restored, meta = ckpt.restore(abstract_like(state))
    _assert_tree_equal(restored, before)
    assert meta == META
    ckpt.close()


def test_fingerprint_sees_one_element_and_ignores_layout(mesh222, mesh181):
    from reflax.checkpoint import _fingerprints

    # inputs built in numpy: op-by-op jax on typed keys would compile every op
    base = (np.arange(32) % 3).reshape(4, 8)
    changed_base = base.copy()
    changed_base[1, 2] = 1 - changed_base[1, 2] % 2
    raw_key = np.random.default_rng(0).integers(0, 2**32, (4, 8, 2), dtype=np.uint32)
    changed_key = raw_key.copy()
    changed_key[1, 2, 0] ^= 1
    dtypes = (jnp.float32, jnp.bfloat16, jnp.int8, jnp.bool_)
    xs = [jnp.asarray(base.astype(d)) for d in dtypes]
    changed = [jnp.asarray(changed_base.astype(d)) for d in dtypes]
    moved = [jnp.asarray(np.roll(base, 1, axis=1).astype(d)) for d in dtypes]  # values moved
    xs.append(jax.random.wrap_key_data(jnp.asarray(raw_key)))
    changed.append(jax.random.wrap_key_data(jnp.asarray(changed_key)))
    moved.append(jax.random.wrap_key_data(jnp.asarray(np.roll(raw_key, 1, axis=1))))
    # the numeric arrays laid out on two meshes, straight from host memory
    on_a = [
        jax.device_put(base.astype(d), NamedSharding(mesh222, P("fsdp", "tensor"))) for d in dtypes
    ]
    on_b = [jax.device_put(base.astype(d), NamedSharding(mesh181, P(None, "fsdp"))) for d in dtypes]
    n = len(xs)
    host = _fingerprints(xs + changed + moved)  # one compiled program for all
    plain, fy, fm = host[:n], host[n : 2 * n], host[2 * n :]
    assert None not in plain
    assert plain[: len(dtypes)] == _fingerprints(on_a) == _fingerprints(on_b)
    assert all(a != b for a, b in zip(plain, fy)) and all(a != b for a, b in zip(plain, fm))


def test_params_only_restore_whatever_the_optimizer(tmp_path):
    # a run trained without gradient clipping (optim.max_grad_norm=0: an optimizer state
    # tree without the clipping's entry) is evaluated under the default optimizer: only its
    # parameters are read. The whole state restores from abstract shapes alone.
    from reflax.models import create
    from reflax.optim import make_optimizer
    from reflax.runtime import checkpoint_dir, restore_params, restore_state, state_to_dict
    from reflax.trainer import init_state
    from tests.helpers import tiny_train_config

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, like = nnx.split(create(tiny_train_config(), mesh=mesh, seed=0))
    _, trained = nnx.split(create(tiny_train_config(), mesh=mesh, seed=1))
    trained_tx, _ = make_optimizer(total_steps=10, max_grad_norm=0.0)
    state = init_state(trained, trained_tx, mesh)
    ckpt = Checkpointer(checkpoint_dir(str(tmp_path)))
    ckpt.save(3, state_to_dict(state), {})
    params, step = restore_params(like, str(tmp_path))
    assert step == 3
    changed = 0
    for x, y, z in zip(jax.tree.leaves(params), jax.tree.leaves(trained), jax.tree.leaves(like)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert x.sharding == z.sharding
        changed += not np.array_equal(np.asarray(x), np.asarray(z))
    assert changed  # the trained weights, not the initial ones
    default_tx, _ = make_optimizer(total_steps=10)
    with pytest.raises(CheckpointError, match="not in checkpoint"):
        restore_state(ckpt, 3, like, default_tx, mesh)  # the whole state needs its optimizer
    restored, _ = restore_state(ckpt, 3, abstract_like(like), trained_tx, mesh)
    _assert_tree_equal(state_to_dict(restored), _host(state_to_dict(state)))
    ckpt.close()
