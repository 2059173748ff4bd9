"""A rollout sampled in chunks whose KV cache fits a budget draws what one pass draws.

Tokens are compared exactly. Log-probs are compared up to float32 round-off relative to
the logits' size: a chunk's matmuls have fewer rows than one pass's, and XLA's CPU
kernels sum in an order that depends on the shape.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_close_scaled

from reflax.config import ConfigError, base_config, validate
from reflax.models import Decoder, ModelConfig
from reflax.models.decoder import KVCache
from reflax.sampler import Sampler, _Request, bucket_size, kv_cache_bytes, resolve_cache_dtype
from reflax.sampling import SamplingSpec
from reflax.sharding import make_mesh, param_shardings, put

VOCAB = 48
G = 3
PROMPTS = [[5, 9, 13, 2, 7], [11, 3], [8, 8, 40, 21], [1, 2, 3, 4, 5, 6], [30], [17, 16]]
SPEC = SamplingSpec(temperature=1.0, top_p=0.95, stop_ids=(0, 1, 2, 3), pad_id=0)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
KW = dict(prompt_buckets=8, gen_buckets=8, cache_buckets=16, compiler_options=FAST_COMPILE)


@pytest.fixture(scope="module")
def model() -> Decoder:
    config = ModelConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        max_position_embeddings=128,
    )
    # random weights drawn on the host (an eager init runs op by op: seconds); std 0.3,
    # larger than an init's, gives peaked logits, so rows differ visibly
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    draw = lambda path, a: (
        np.ones(a.shape, a.dtype)
        if "norm" in jax.tree_util.keystr(path)
        else (0.3 * rng.standard_normal(a.shape)).astype(a.dtype)
    )
    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, abstract))


def logit_scale(model: Decoder) -> float:
    """Largest |logit| of the prompts' last tokens: the size log-prob round-off follows."""
    tokens = jnp.asarray([p[-1:] for p in PROMPTS], jnp.int32)
    positions = jnp.asarray([[len(p) - 1] for p in PROMPTS], jnp.int32)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a)[0], compiler_options=FAST_COMPILE)
    return float(jnp.abs(forward(state, tokens, positions, jnp.ones(tokens.shape, bool))).max())


LP_RTOL = 1e-5


def budget_for(model: Decoder, groups: int, **shape) -> int:
    """The smallest budget that fits `groups` groups of a call of these shapes."""
    return kv_cache_bytes(model.config, jnp.float32, groups=groups, num_samples=G, **shape)


def cache_moves(hlo: str, cache: KVCache) -> list[str]:
    """The collectives of compiled HLO that move a kept cache's rows between devices: an
    all-gather, collective-permute or all-to-all of [L, rows, T, H, D] (T its slots)."""
    L, _, T, H, D = cache.k.shape
    shape = re.compile(rf"\[{L},\d+,{T},{H},{D}\]")
    ops = ("all-gather(", "collective-permute(", "all-to-all(")
    return [x for x in hlo.splitlines() if shape.search(x) and any(op in x for op in ops)]


def test_chunked_equals_one_pass(model):
    """Fresh sampling in chunks of 2 groups (3 calls, the last padded), then retries that
    continue the chunked rows in order and in any order, equal one pass token for token;
    on a mesh, a retry cut smaller than the kept chunks slices them in place."""
    one = Sampler(model, **KW)
    fresh = dict(prefix_size=8, gen_len=8, keep_cache=True)
    chunked = Sampler(model, kv_cache_bytes=budget_for(model, 2, **fresh), **KW)
    kw = dict(max_new_tokens=7, rng=4, num_samples=G)
    spec = dataclasses.replace(SPEC, logprobs=True)
    ref, out = (s.sample(model, PROMPTS, spec, **kw) for s in (one, chunked))
    assert out.cached.starts == (0, 2 * G, 4 * G)  # three chunks of 2 prompts x G samples
    assert ref.done.any() and not ref.done.all()
    assert any((ref.tokens[u * G] != ref.tokens[u * G + 1]).any() for u in range(6))
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    scale = logit_scale(model) / spec.temperature
    assert_close_scaled(out.logprobs, ref.logprobs, LP_RTOL, scale=scale)
    np.testing.assert_array_equal(out.cached.seq_lens, ref.cached.seq_lens)
    assert out.cached.index == ref.cached.index

    rows = len(PROMPTS) * G
    turns = [[40 + i % 5] * (1 + i % 3) for i in range(rows)]
    retry = dict(max_new_tokens=5, rng=9)
    for extra in (dict(), dict(rows=[17, 0, 5, 6, 6, 12], num_samples=2)):
        new = turns if not extra else turns[: len(extra["rows"])]
        a, b = (
            s.continue_rows(model, o.cached, new, spec, **retry, **extra)
            for s, o in ((one, ref), (chunked, out))
        )
        np.testing.assert_array_equal(b.tokens, a.tokens)
        assert_close_scaled(b.logprobs, a.logprobs, LP_RTOL, scale=scale)
        np.testing.assert_array_equal(b.cached.seq_lens, a.cached.seq_lens)
    # one program per call kind: chunks and the padded last chunk share it
    assert chunked.num_compilations == one.num_compilations == 3

    # on a mesh: 2 batch shards, chunks of 2 groups (6 rows, 3 per device)
    mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
    state = nnx.state(model)
    state = put(state, param_shardings(state, mesh))
    budget = kv_cache_bytes(
        model.config, jnp.float32, groups=2, num_samples=G, batch_shards=2, **fresh
    )
    sharded = Sampler(model, mesh, kv_cache_bytes=budget, **KW)
    got = sharded.sample(state, PROMPTS, spec, **kw)
    assert got.cached.starts == (0, 2 * G, 4 * G)
    assert len(got.cached.caches[0].k.sharding.device_set) == 8
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    retry = dict(retry, keep_cache=False)
    retry_ref = one.continue_rows(model, ref.cached, turns, spec, **retry)
    # without a budget too, a chunked call's rows are continued chunk by chunk
    retry_got = Sampler(model, mesh, **KW).continue_rows(state, got.cached, turns, spec, **retry)
    np.testing.assert_array_equal(retry_got.tokens, retry_ref.tokens)

    # a retry budget of 2 rows (one a shard) a call, less than a kept chunk: each call
    # takes one of each shard's own 3 rows (3 calls a chunk, one program), and no
    # collective moves a kept cache's rows (a gather of rows moves them between devices,
    # on a TPU slice all-gathering the chunk onto every chip)
    prefix = bucket_size(got.cached.index + KW["prompt_buckets"], KW["cache_buckets"])
    tight = kv_cache_bytes(
        model.config,
        jnp.float32,
        groups=2,
        num_samples=1,
        prefix_size=prefix,
        gen_len=8,
        keep_cache=False,
        batch_shards=2,
    )
    local = Sampler(model, mesh, kv_cache_bytes=tight, **KW)
    retry_local = local.continue_rows(state, got.cached, turns, spec, **retry)
    np.testing.assert_array_equal(retry_local.tokens, retry_ref.tokens)
    assert_close_scaled(retry_local.logprobs, retry_ref.logprobs, LP_RTOL, scale=scale)
    assert local.num_compilations == 1
    lowered = local.lower(
        state,
        num_rows=rows,
        block_len=3,
        num_samples=1,
        max_new_tokens=5,
        keep_cache=False,
        prev=got.cached,
    )
    assert lowered.out_info["tokens"].shape[0] == 2  # the program that ran: 2 rows a call
    assert cache_moves(lowered.compile().as_text(), got.cached.caches[0]) == []


def test_chunk_size_from_budget(model):
    """The chunk is the most whole groups whose KV cache fits; none fitting is an error."""
    c = model.config
    slot = c.num_layers * 2 * c.num_kv_heads * c.head_dim * 4  # float32 keys and values
    # 2 prompts x G samples, 8 prefix and 8 new slots, cache kept, over 2 devices
    got = kv_cache_bytes(
        c,
        jnp.float32,
        groups=2,
        num_samples=G,
        prefix_size=8,
        gen_len=8,
        keep_cache=True,
        batch_shards=2,
    )
    assert got == slot * (1 * 2 * 8 + 3 * (8 + 16))
    fresh = dict(prefix_size=8, gen_len=8, keep_cache=False)
    for groups in (1, 4):
        sampler = Sampler(model, kv_cache_bytes=budget_for(model, groups, **fresh) + 1, **KW)
        shape, pieces = sampler._plan(_Request(model, PROMPTS, SPEC, G, 7, 0, False))
        assert shape.unique_rows == groups
        assert [(p.lo, p.hi) for p in pieces] == [
            (lo, min(lo + groups, len(PROMPTS))) for lo in range(0, len(PROMPTS), groups)
        ]
    tight = Sampler(model, kv_cache_bytes=budget_for(model, 1, **fresh) - 1, **KW)
    with pytest.raises(ValueError, match="fits no chunk"):
        tight.sample(model, PROMPTS, SPEC, max_new_tokens=7, rng=0, num_samples=G, keep_cache=False)
    with pytest.raises(ValueError, match="kv_cache_bytes must be >= 0"):
        Sampler(model, kv_cache_bytes=-1)


def test_cache_dtype_selection(model):
    """ "auto": bfloat16 on TPU, the compute dtype elsewhere; names are dtypes."""
    assert resolve_cache_dtype("auto", jnp.float32, "tpu") == jnp.bfloat16
    assert resolve_cache_dtype("auto", jnp.float32, "cpu") == jnp.float32
    assert resolve_cache_dtype("auto", jnp.bfloat16, "gpu") == jnp.bfloat16
    assert resolve_cache_dtype("float16", jnp.float32, "tpu") == jnp.float16
    assert Sampler(model).cache_dtype == jnp.float32  # CPU, float32 compute
    c = base_config()
    assert c.rollout.cache_dtype == "auto"
    c.rollout.cache_dtype = "int8"
    with pytest.raises(ConfigError, match="cache_dtype"):
        validate(c)


def test_decode_reads_weights_in_place():
    """The sampler's program holds no second copy of the layer weights: its compiled temp
    memory grows by far less than the weights do when layers are added."""

    def temp_and_weights(num_layers: int) -> tuple[int, int]:
        config = ModelConfig(
            vocab_size=VOCAB,
            hidden_size=128,
            intermediate_size=512,
            num_layers=num_layers,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            max_position_embeddings=128,
        )
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
        weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
        sampler = Sampler(graphdef, cache_dtype=jnp.float32, **KW)
        lowered = sampler.lower(
            state, num_rows=2, block_len=8, num_samples=2, max_new_tokens=8, keep_cache=False
        )
        return lowered.compile().memory_analysis().temp_size_in_bytes, weights

    (temp2, weights2), (temp4, weights4) = temp_and_weights(2), temp_and_weights(4)
    assert weights4 - weights2 > 2**20  # two layers: about 2 MB of float32 weights
    assert temp4 - temp2 < 0.25 * (weights4 - weights2), (temp2, temp4)
