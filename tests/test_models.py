"""The decoder on loaded checkpoints: KV-cache decoding and the sharded forward."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_close_scaled, cpu_mesh, padded_batch, tiny_hf_checkpoint
from jax.sharding import PartitionSpec as P

from reflax import api
from reflax.models import KVCache, positions_from_mask
from reflax.models.hf import iter_hf_tensors, load_pretrained


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # untied, GQA 4/2, every dim divisible by 2 so the (2, 2, 2) mesh really shards everything
    return tiny_hf_checkpoint(tmp_path_factory.mktemp("ckpt"), "qwen2", tie_word_embeddings=False)


@functools.partial(jax.jit, static_argnums=0)
def _step(graphdef, state, tokens, positions, mask, cache):
    return nnx.merge(graphdef, state)(tokens, positions, mask, cache)


def test_kv_cache_decoding_matches_full_forward(checkpoint):
    model = load_pretrained(checkpoint)
    T, prefill = 10, 4
    # row 0 left-padded (its first real token is inside the prefill), row 1 full
    tokens, mask = padded_batch(model.config.vocab_size, [8, 10], T, left=True)
    positions = np.asarray(positions_from_mask(jnp.asarray(mask)))
    full = np.asarray(api.logits(model, tokens, mask))

    graphdef, state = nnx.split(model)
    cache = KVCache.empty(model.config, batch=2, size=T)
    logits, cache = _step(
        graphdef, state, tokens[:, :prefill], positions[:, :prefill], mask[:, :prefill], cache
    )
    steps = [np.asarray(logits)]
    for t in range(prefill, T):
        sl = slice(t, t + 1)
        logits, cache = _step(graphdef, state, tokens[:, sl], positions[:, sl], mask[:, sl], cache)
        steps.append(np.asarray(logits))
    decoded = np.concatenate(steps, axis=1)
    assert int(cache.index) == T
    assert_close_scaled(decoded[mask], full[mask], 1e-5)


def test_sharded_forward_matches_unsharded(checkpoint):
    mesh = cpu_mesh()
    sharded = load_pretrained(checkpoint, mesh=mesh)
    plain = load_pretrained(checkpoint)

    specs = {
        "embed": P("tensor", "fsdp"),
        "lm_head": P("fsdp", "tensor"),
        "final_norm": P(None),
        "q_proj": P(None, "fsdp", "tensor"),
        "k_proj": P(None, "fsdp", "tensor"),
        "o_proj": P(None, "tensor", "fsdp"),
        "q_bias": P(None, "tensor"),
        "down_proj": P(None, "tensor", "fsdp"),
    }
    for name, spec in specs.items():
        owner = sharded.layers if hasattr(sharded.layers, name) else sharded
        array = getattr(owner, name)[...]
        assert array.sharding.spec == spec, name
        assert array.sharding.mesh.shape == mesh.shape
        if spec != P(None):
            assert array.addressable_shards[0].data.size < array.size, name
    for (n1, a), (n2, b) in zip(iter_hf_tensors(sharded), iter_hf_tensors(plain)):
        assert n1 == n2
        np.testing.assert_array_equal(a, b, err_msg=n1)

    tokens, mask = padded_batch(sharded.config.vocab_size, [7, 3, 9, 9], 9, left=[1, 0, 1, 0])
    out_sharded = api.logits(sharded, tokens, mask)
    out_plain = np.asarray(api.logits(plain, tokens, mask))
    assert len(out_sharded.sharding.device_set) == 8
    assert_close_scaled(np.asarray(out_sharded)[mask], out_plain[mask], 1e-5)


def test_odd_sizes_load_on_mesh(tmp_path):
    # dims not divisible by the mesh stay whole on that axis; values must still be right
    path = tiny_hf_checkpoint(
        tmp_path, "qwen2", hidden_size=37, vocab_size=127, num_key_value_heads=1
    )
    sharded = load_pretrained(path, mesh=cpu_mesh())
    assert sharded.embed[...].sharding.spec == P(None, None)
    assert sharded.layers.q_proj[...].sharding.spec == P(None, None, "tensor")
    for (n1, a), (_, b) in zip(iter_hf_tensors(sharded), iter_hf_tensors(load_pretrained(path))):
        np.testing.assert_array_equal(a, b, err_msg=n1)


def test_logits_api_accepts_a_single_sequence(checkpoint):
    model = load_pretrained(checkpoint)
    ids = [3, 14, 15, 92, 65]
    one = np.asarray(api.logits(model, ids))
    batch = np.asarray(api.logits(model, [ids]))
    assert one.shape == (5, model.config.vocab_size)
    np.testing.assert_array_equal(one, batch[0])
