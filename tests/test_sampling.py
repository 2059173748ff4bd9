"""Rollout engine: exactness against transformers, sampling statistics, prefix sharing,
continuation, sharding and the number of compiled programs."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import assert_close_scaled
from scipy import stats
from transformers import Qwen2Config, Qwen2ForCausalLM

from reflax.decoding import StepCache, _step, prefill, resize_cache
from reflax.models import Decoder, ModelConfig, abstract_model
from reflax.models.decoder import KVCache
from reflax.models.hf import from_hf_state_dict
from reflax.sampler import Sampler, bucket_size, left_pad
from reflax.sampling import SamplingSpec, sample_logits
from reflax.sharding import make_mesh, param_shardings, put

VOCAB = 64
# prompts of different lengths in one batch (left-padded)
PROMPTS = [[5, 9, 13, 2, 7, 30, 41], [11, 3], [8, 8, 60, 21, 17], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
# Small buckets, and XLA CPU options that cut compile time 3-5x (backend optimisation off,
# the older loop emitters): these programs are tiny and compiling them dominates the tests.
# The options change how fast the code runs, not what it computes.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
SAMPLER_KW = dict(
    prompt_buckets=16, gen_buckets=16, cache_buckets=32, compiler_options=FAST_COMPILE
)
GREEDY = SamplingSpec(greedy=True)


def to_reflax(hf: Qwen2ForCausalLM) -> Decoder:
    """A reflax Decoder holding the weights of a transformers Qwen2 model."""
    tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    return from_hf_state_dict(ModelConfig.from_hf(hf.config.to_dict()), tensors)


def tiny_hf(seed: int, init_range: float, tied: bool = False) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=init_range,  # large: well separated logits, no greedy ties
        tie_word_embeddings=tied,
        max_position_embeddings=256,
    )
    return Qwen2ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def hf_model() -> Qwen2ForCausalLM:
    return tiny_hf(0, 0.3)


@pytest.fixture(scope="module")
def model(hf_model) -> Decoder:
    return to_reflax(hf_model)


@pytest.fixture(scope="module")
def sampler(model) -> Sampler:
    return Sampler(model, **SAMPLER_KW)


# Log-probs of logits / T are compared up to LP_RTOL * (largest |logit| / T): their float32
# error follows the logits' size, and its constant depends on the summation order (the CPU).
LP_RTOL = 1e-5


@pytest.fixture(scope="module")
def logit_scale(model) -> float:
    return float(max(np.abs(x).max() for x in full_logits(model, PROMPTS)))


def hf_greedy(
    hf: Qwen2ForCausalLM, prompts: list[list[int]], n: int, eos: int | None, **kw
) -> np.ndarray:
    """transformers' greedy `generate` on a left-padded batch -> new tokens [B, <= n]
    (`kw`: more `generate` arguments)."""
    P = max(map(len, prompts))
    ids, mask = left_pad(prompts, P)
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            do_sample=False,
            max_new_tokens=n,
            eos_token_id=eos,
            pad_token_id=0,
            **kw,
        )
    return out[:, P:].numpy()


@pytest.mark.parametrize("tied", [False, True])
def test_greedy_matches_transformers(hf_model, model, sampler, tied):
    if tied:  # a second checkpoint: tied embeddings, other weights
        hf_model = tiny_hf(1, 0.3, tied=True)
        model = to_reflax(hf_model)
        assert model.lm_head is None
        sampler = Sampler(model, **SAMPLER_KW)
    n = 12
    ref = hf_greedy(hf_model, PROMPTS, n, eos=None)
    out = sampler.sample(
        nnx.state(model), PROMPTS, SamplingSpec(temperature=0.0), max_new_tokens=n, rng=0
    )
    np.testing.assert_array_equal(out.tokens, ref)
    assert (out.lengths == n).all() and not out.done.any()
    # the greedy choices are not near-ties (else float noise could flip them)
    seqs = [p + c for p, c in zip(PROMPTS, out.completions())]
    for p, logits in zip(PROMPTS, full_logits(model, seqs)):
        top2 = np.sort(logits[len(p) - 1 : -1], axis=-1)[:, -2:]
        assert (top2[:, 1] - top2[:, 0]).min() > 1e-3

    # a stop id taken from the greedy output: rows stop at different steps, then pad
    eos = int(ref[0, 4])
    ref = hf_greedy(hf_model, PROMPTS, n, eos=eos)
    out = sampler.sample(
        model, PROMPTS, SamplingSpec(greedy=True, stop_ids=[eos]), max_new_tokens=n, rng=0
    )
    np.testing.assert_array_equal(out.tokens[:, : ref.shape[1]], ref)
    assert (out.tokens[:, ref.shape[1] :] == 0).all()
    for row, length, done in zip(out.tokens, out.lengths, out.done):
        hits = np.flatnonzero(row == eos)
        assert done == (len(hits) > 0)
        assert length == (hits[0] + 1 if done else n)
        assert (row[length:] == 0).all()
    assert out.lengths[0] == 5 and len(set(out.lengths.tolist())) > 1


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _forward(graphdef, state, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(tokens, mask=mask)[0]


def full_logits(model: Decoder, seqs: list[list[int]]) -> list[np.ndarray]:
    """Training-style forward (no cache) over each full sequence: logits [len, V] per row."""
    T = bucket_size(max(map(len, seqs)), 16)
    tokens, mask = left_pad(seqs, T, rows=16)  # fixed shapes: few compilations
    logits = np.asarray(_forward(*nnx.split(model), jnp.asarray(tokens), jnp.asarray(mask)))
    return [logits[i, T - len(s) :] for i, s in enumerate(seqs)]


def next_token_probs(model: Decoder, prompt: list[int], temperature: float) -> np.ndarray:
    logits = full_logits(model, [prompt])[0][-1].astype(np.float64) / temperature
    p = np.exp(logits - logits.max())
    return p / p.sum()


def chi_square_pvalue(samples: np.ndarray, probs: np.ndarray) -> float:
    """Goodness of fit; tokens with small expected counts are pooled into one bin."""
    counts = np.bincount(samples, minlength=len(probs)).astype(np.float64)
    expected = probs * len(samples)
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] < 5:  # too little pooled mass: fold it into the largest bin
        obs, exp = obs[:-1], exp[:-1]
        obs[np.argmax(exp)] += counts[~big].sum()
        exp[np.argmax(exp)] += expected[~big].sum()
    return float(stats.chisquare(obs, exp).pvalue)


N_DRAWS = 4096
T_CHI = 1.7


def test_temperature_sampling_matches_softmax(model, sampler, logit_scale):
    prompt = PROMPTS[0]
    probs = next_token_probs(model, prompt, T_CHI)
    assert (probs > 0.01).sum() >= 8  # the test would be weak on a peaked distribution
    out = sampler.sample(
        model,
        [prompt],
        SamplingSpec(temperature=T_CHI),
        num_samples=N_DRAWS,
        max_new_tokens=1,
        rng=1,
    )
    assert out.tokens.shape == (N_DRAWS, 1)
    assert chi_square_pvalue(out.tokens[:, 0], probs) > 1e-3
    # the returned log-prob is the untruncated log_softmax(logits / T)
    want = np.log(probs[out.tokens[:, 0]])
    assert_close_scaled(out.logprobs[:, 0], want, LP_RTOL, scale=logit_scale / T_CHI)


def test_top_k_top_p_truncation(model, sampler, logit_scale):
    prompt = PROMPTS[0]
    probs = next_token_probs(model, prompt, T_CHI)
    top = np.argsort(-probs, kind="stable")[:5]
    mass_before = np.cumsum(probs[top]) - probs[top]
    nucleus = top[mass_before < 0.6 * probs[top].sum()]  # top-p applies after top-k
    assert 2 <= len(nucleus) < len(top)
    before = None
    for top_p, allowed in ((1.0, top), (0.6, nucleus)):
        out = sampler.sample(
            model,
            [prompt],
            SamplingSpec(temperature=T_CHI, top_k=5, top_p=top_p),
            num_samples=N_DRAWS,
            max_new_tokens=1,
            rng=2,
        )
        drawn = out.tokens[:, 0]
        assert np.isin(drawn, allowed).all()
        assert set(drawn.tolist()) == set(allowed.tolist())
        kept = np.where(np.isin(np.arange(VOCAB), allowed), probs, 0.0)
        assert chi_square_pvalue(drawn, kept / kept.sum()) > 1e-3
        want = np.log(probs[drawn])
        assert_close_scaled(out.logprobs[:, 0], want, LP_RTOL, scale=logit_scale / T_CHI)
        # top_p is a traced value: changing it reuses the program
        before = sampler.num_compilations if before is None else before
        assert sampler.num_compilations == before


def test_tail_tokens_are_drawn_at_their_rate():
    """A 150k vocabulary: one token holds almost all the mass and comes first; each of the
    others has 2.5e-8, a fraction of the ulp of a float32 running sum near 1. Together they
    hold 3.75e-3 and must be drawn at that rate, and so must the tokens that a float32
    cumulative sum over the vocabulary cannot tell from their predecessor (equal running
    sums), which inverse-CDF sampling on it never draws. The reported log-prob is the drawn
    token's log-softmax."""
    V, rows, chunks = 150_000, 256, 64  # 16384 draws, 256 rows of [V] logits at a time
    p_tail = 2.5e-8
    probs = np.full(V, p_tail)
    probs[0] = 1.0 - p_tail * (V - 1)
    logits = jnp.asarray(np.log(probs), jnp.float32)
    cdf = np.asarray(jnp.cumsum(jnp.exp(logits - logits.max())))
    hidden = np.flatnonzero(np.diff(cdf) == 0) + 1  # a CDF in float32 never lands on these
    assert len(hidden) > V // 2
    spec = SamplingSpec(temperature=1.0).on_device(V)

    @jax.jit
    def draw(chunk):
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), chunk * rows + i))(
            jnp.arange(rows)
        )
        batch = jnp.broadcast_to(logits, (rows, V))
        return sample_logits(batch, keys, spec)

    tokens, logprobs = map(np.concatenate, zip(*(jax.device_get(draw(c)) for c in range(chunks))))
    n = rows * chunks
    for name, subset in (("tail", np.arange(1, V)), ("hidden", hidden)):
        hits = int(np.isin(tokens, subset).sum())
        expected = n * probs[subset].sum()  # 61.4 and about 4/5 of it
        assert abs(hits - expected) <= 5 * np.sqrt(expected), (name, hits, expected)
    drawn = tokens[tokens != 0]
    assert np.bincount(drawn).max() <= 2  # spread over the tail, no favourite
    assert drawn.min() < V // 4 and drawn.max() > 3 * V // 4
    scale = np.abs(np.log(probs)).max()
    assert np.abs(logprobs - np.log(probs[tokens])).max() <= 1e-5 * scale


FORBID_STOP = [3, 17]  # stop ids, forbidden before MIN_NEW tokens
MIN_NEW = 4


def test_banned_ids_and_min_new_tokens(model, sampler, logit_scale):
    """Banned ids never appear; stop ids not before min_new_tokens; the log-probs stay the
    full-vocabulary log_softmax (what the GRPO step recomputes)."""
    prompt = PROMPTS[0]
    probs = next_token_probs(model, prompt, T_CHI)
    banned = np.argsort(-probs)[:3].tolist()  # the likeliest first tokens
    stop = FORBID_STOP + [int(np.argsort(-probs)[3])]  # a likely stop: rows end early after
    out = sampler.sample(
        model,
        [prompt],
        SamplingSpec(temperature=T_CHI, stop_ids=stop, banned_ids=banned, min_new_tokens=MIN_NEW),
        num_samples=256,
        max_new_tokens=8,
        rng=4,
    )
    assert not np.isin(out.tokens, banned).any()
    assert not np.isin(out.tokens[:, :MIN_NEW], stop).any()
    assert (out.lengths >= MIN_NEW).all() and out.done.any()  # some rows stop right after
    drawn = out.tokens[:, 0]
    want = np.log(probs[drawn])
    assert_close_scaled(out.logprobs[:, 0], want, LP_RTOL, scale=logit_scale / T_CHI)
    kept = np.where(np.isin(np.arange(VOCAB), banned + stop), 0.0, probs)
    assert chi_square_pvalue(drawn, kept / kept.sum()) > 1e-3  # renormalised over the rest
    with pytest.raises(ValueError, match="banned_ids"):
        sampler.sample(model, [prompt], SamplingSpec(banned_ids=[VOCAB]), max_new_tokens=2, rng=0)
    with pytest.raises(ValueError, match="forbid every token"):
        sampler.sample(
            model, [prompt], SamplingSpec(banned_ids=range(VOCAB)), max_new_tokens=2, rng=0
        )


def test_greedy_forbidding_matches_transformers(hf_model, model, sampler):
    """transformers' generate with bad_words_ids (single ids) and min_new_tokens."""
    n = 10
    free = hf_greedy(hf_model, PROMPTS, n, eos=None)
    banned = sorted({int(free[0, 1]), int(free[1, 0])})  # tokens greedy decoding would pick
    eos = int(free[2, 1])  # an early stop of row 2, forbidden before MIN_NEW tokens
    ref = hf_greedy(
        hf_model,
        PROMPTS,
        n,
        eos=eos,
        bad_words_ids=[[b] for b in banned],
        min_new_tokens=MIN_NEW,
    )
    spec = SamplingSpec(greedy=True, stop_ids=[eos], banned_ids=banned, min_new_tokens=MIN_NEW)
    out = sampler.sample(model, PROMPTS, spec, max_new_tokens=n, rng=0)
    np.testing.assert_array_equal(out.tokens[:, : ref.shape[1]], ref)
    assert not np.isin(out.tokens, banned).any()
    assert (ref != free[:, : ref.shape[1]]).any()  # the constraints changed the output


# Settings shared by several tests, so that they reuse one compiled program.
SAMPLED = SamplingSpec(temperature=0.8, top_p=0.9)  # top-p over the vocabulary
G = 3  # samples per prompt


def test_logprobs_match_training_forward_and_reproducible(model, sampler, logit_scale):
    T, top_p = SAMPLED.temperature, SAMPLED.top_p
    stop = STOP
    spec = dataclasses.replace(SAMPLED, stop_ids=stop)
    kw = dict(max_new_tokens=10, num_samples=G)
    out = sampler.sample(model, PROMPTS, spec, rng=jax.random.key(7), **kw)
    again = sampler.sample(model, PROMPTS, spec, rng=jax.random.key(7), **kw)
    other = sampler.sample(model, PROMPTS, spec, rng=jax.random.key(8), **kw)
    np.testing.assert_array_equal(out.tokens, again.tokens)
    np.testing.assert_array_equal(out.logprobs, again.logprobs)
    assert (out.tokens != other.tokens).any()
    assert len(set(out.lengths.tolist())) > 1 and out.done.any()

    prompts = [p for p in PROMPTS for _ in range(3)]
    completions = out.completions()
    seqs = [p + c for p, c in zip(prompts, completions)]
    for row, (prompt, comp, logits) in enumerate(
        zip(prompts, completions, full_logits(model, seqs))
    ):
        step_logits = logits[len(prompt) - 1 : -1].astype(np.float64) / T  # predicts comp
        logp = step_logits - np.log(np.exp(step_logits).sum(-1, keepdims=True))
        expected = logp[np.arange(len(comp)), comp]
        got = out.logprobs[row, : len(comp)]
        assert_close_scaled(got, expected, LP_RTOL, scale=logit_scale / T)
        assert (out.logprobs[row, len(comp) :] == 0).all()
        # top-p respected at every step: the token is inside the nucleus
        p = np.exp(logp[np.arange(len(comp))])
        assert ((p > p[np.arange(len(comp)), comp][:, None]) * p).sum(-1).max() < top_p
        assert out.done[row] == (comp[-1] in stop)


def test_prefix_sharing_equals_unshared(model, sampler, logit_scale):
    """Same rng -> same tokens: row u*G+g uses key fold_in(rng, u*G+g) on both paths."""
    kw = dict(max_new_tokens=9, rng=3, num_samples=G)
    shared = sampler.sample(model, PROMPTS, SAMPLED, **kw)
    unshared = sampler.sample(model, PROMPTS, SAMPLED, share_prefix=False, keep_cache=False, **kw)
    assert unshared.cached is None
    np.testing.assert_array_equal(shared.tokens, unshared.tokens)
    scale = logit_scale / SAMPLED.temperature
    assert_close_scaled(shared.logprobs, unshared.logprobs, LP_RTOL, scale=scale)
    assert (shared.tokens[0] != shared.tokens[1]).any()  # the G samples of a prompt differ


STOP = list(range(0, VOCAB, 8))  # frequent stops: ragged lengths
REFLECT_ROWS = [7, 0, 11]  # rows of the attempt batch (prompt r // 3) that get reflections
REFLECT = [[50, 51, 52, 53, 54], [50], [52, 53, 54, 55, 56, 57, 58]]  # ragged new turns


def attempt_and_reflect(sampler: Sampler, state) -> tuple:
    """Sampled attempts (3 per prompt), then greedy reflections (2 per selected row) that
    continue selected attempt rows after a ragged new turn."""
    spec = dataclasses.replace(SAMPLED, stop_ids=STOP)
    attempt = sampler.sample(state, PROMPTS, spec, max_new_tokens=8, rng=5, num_samples=G)
    reflect = sampler.continue_rows(
        state,
        attempt.cached,
        REFLECT,
        GREEDY,
        rows=REFLECT_ROWS,
        num_samples=2,
        max_new_tokens=4,
        rng=0,
    )
    return attempt, reflect


def test_continuation_equals_from_scratch(model, sampler, logit_scale):
    """attempt -> reflections on selected rows (G per row) -> retries with ragged new turns."""
    attempt, refl = attempt_and_reflect(sampler, model)
    assert attempt.done.any() and not attempt.done.all()  # rows end at different slots
    completions = attempt.completions()
    seqs = [PROMPTS[r // 3] + completions[r] + n for r, n in zip(REFLECT_ROWS, REFLECT)]
    seqs = [s for s in seqs for _ in range(2)]  # sample g of row i is output row i*G+g
    scratch = sampler.sample(model, seqs, GREEDY, max_new_tokens=4, rng=0)
    np.testing.assert_array_equal(refl.tokens, scratch.tokens)
    assert_close_scaled(refl.logprobs, scratch.logprobs, LP_RTOL, scale=logit_scale)

    seqs = [s + c for s, c in zip(seqs, refl.completions())]
    retry = [[60 + i % 3] * (1 + i % 2) for i in range(len(seqs))]
    greedy = SamplingSpec(greedy=True, stop_ids=[3, 17])
    out = sampler.continue_rows(model, refl.cached, retry, greedy, max_new_tokens=4, rng=0)
    seqs = [s + r for s, r in zip(seqs, retry)]
    scratch = sampler.sample(model, seqs, greedy, max_new_tokens=4, rng=0)
    np.testing.assert_array_equal(out.tokens, scratch.tokens)
    assert_close_scaled(out.logprobs, scratch.logprobs, LP_RTOL, scale=logit_scale)
    # positions continue from each row's true length: the scratch run saw no gaps
    lens = np.array([len(s) for s in seqs]) + out.lengths
    assert (out.cached.seq_lens == lens).all()


def test_sharded_equals_unsharded(model, sampler, logit_scale):
    """Fresh sampling (temperature, top-p, shared prefixes) and a continuation on a
    (data=2, fsdp=2, tensor=2) mesh of 8 devices give the unsharded results."""
    assert jax.device_count() == 8
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    state = nnx.state(model)
    sharded_state = put(state, param_shardings(state, mesh))
    sharded = Sampler(model, mesh, **SAMPLER_KW)
    ref = attempt_and_reflect(sampler, model)
    out = attempt_and_reflect(sharded, sharded_state)
    assert len(out[0].cached.cache.k.sharding.device_set) == 8
    assert len(out[1].cached.cache.k.sharding.device_set) == 8
    for o, r in zip(out, ref):
        np.testing.assert_array_equal(o.tokens, r.tokens)
        np.testing.assert_array_equal(o.lengths, r.lengths)
        # attempts at temperature 0.8, reflections greedy: bound by the larger 1 / T
        scale = logit_scale / SAMPLED.temperature
        assert_close_scaled(o.logprobs, r.logprobs, LP_RTOL, scale=scale)


def test_compilations_bounded(model, sampler):
    """Varied prompt lengths, batch sizes, max_new_tokens and sampling values: one program."""
    rng = np.random.default_rng(0)
    before = None
    for i in range(8):
        batch = int(rng.integers(3, 5))  # 3..4 prompts: one batch bucket
        prompts = [rng.integers(1, VOCAB, int(rng.integers(1, 17))).tolist() for _ in range(batch)]
        spec = SamplingSpec(
            temperature=float(rng.uniform(0.5, 1.5)), top_p=float(rng.uniform(0.5, 0.99))
        )
        n = int(rng.integers(1, 17))
        out = sampler.sample(model, prompts, spec, max_new_tokens=n, rng=i, num_samples=G)
        assert out.tokens.shape == (batch * 3, n)
        if before is None:  # the first call compiles at most once (none if already cached)
            before = sampler.num_compilations
    assert sampler.num_compilations == before


def test_decode_step_matches_decoder():
    """The sampler's single-token step over a shared prefix computes what the Decoder
    computes with the equivalent per-row cache (here a Llama-style config: o_proj and
    MLP biases, untied head, no q/k/v bias; bf16 and float32 caches)."""
    config = ModelConfig(
        vocab_size=48,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        o_bias=True,
        mlp_bias=True,
        model_type="llama",
    )
    graphdef, state = nnx.split(abstract_model(config))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype), state)
    tokens, mask = left_pad([[1, 2, 3, 4, 5], [6, 7]], 6)  # U = 2 prefix rows, P = 6
    G, N = 2, 3  # 2 samples per prefix row, 3 new slots
    steps = [  # (tokens [4], mask [4]): row 1 writes padding at the first step
        (np.array([9, 11, 13, 15], np.int32), np.array([True, False, True, True])),
        (np.array([17, 19, 21, 23], np.int32), np.array([True, True, True, True])),
    ]

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def both(state, prefix):
        model = nnx.merge(graphdef, state)
        _, prefix, lens = prefill(model, prefix, jnp.zeros(2, jnp.int32), tokens, mask)
        lens = jnp.repeat(lens, G)
        ref_cache = resize_cache(prefix, jnp.repeat(jnp.arange(2), G), 6 + N)
        got_cache = StepCache.create(prefix, 2 * G, N)
        weights = model.weights()
        ref, got = [], []
        for toks, m in steps:
            logits, ref_cache = model(toks[:, None], lens[:, None], m[:, None], ref_cache)
            ref.append(logits[:, 0])
            logits, got_cache = _step(model, weights, got_cache, toks, lens, m)
            got.append(logits)
            lens = lens + m
        return ref, ref_cache, got, got_cache.to_cache()

    for dtype in (jnp.float32, jnp.bfloat16):  # the cache dtype is configurable
        ref, ref_cache, got, got_cache = both(state, KVCache.empty(config, 2, 6, dtype))
        assert got_cache.k.dtype == dtype and int(got_cache.index) == 6 + len(steps)
        np.testing.assert_allclose(got, ref, atol=1e-5)
        tol = 1e-5 if dtype == jnp.float32 else 2e-2  # bf16: an ulp may flip
        for a, b in zip(jax.tree.leaves(got_cache), jax.tree.leaves(ref_cache)):
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            np.testing.assert_allclose(a, b, atol=tol, rtol=tol)


def test_resize_cache():
    config = ModelConfig(
        vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
        num_kv_heads=1, head_dim=4,
    )  # fmt: skip
    cache = KVCache.empty(config, 3, 8)
    cache = cache.replace(
        k=cache.k + jnp.arange(3.0)[None, :, None, None, None],
        mask=cache.mask.at[:, :5].set(True),
        index=jnp.int32(5),
    )
    rows = jnp.array([2, 0, 2, 1])
    grown = resize_cache(cache, rows, 12)
    assert grown.k.shape == (1, 4, 12, 1, 4) and grown.mask.shape == (4, 12)
    np.testing.assert_array_equal(grown.k[0, :, 0, 0, 0], [2, 0, 2, 1])
    assert not grown.mask[:, 8:].any() and int(grown.index) == 5
    shrunk = resize_cache(cache, rows, 6)  # slots after the index were never written
    assert shrunk.k.shape == (1, 4, 6, 1, 4)
    np.testing.assert_array_equal(shrunk.mask.sum(1), [5, 5, 5, 5])


def test_buckets():
    assert [bucket_size(n, None) for n in (1, 2, 3, 64, 65)] == [1, 2, 4, 64, 128]
    assert [bucket_size(n, 64) for n in (1, 64, 65)] == [64, 64, 128]
    assert bucket_size(100, (64, 128, 256)) == 128
    with pytest.raises(ValueError):
        bucket_size(300, (64, 128, 256))
    tokens, mask = left_pad([[1, 2], [3]], 4, pad_id=9, rows=3)
    np.testing.assert_array_equal(tokens, [[9, 9, 1, 2], [9, 9, 9, 3], [9, 9, 9, 9]])
    np.testing.assert_array_equal(mask.sum(1), [2, 1, 0])


def test_sampler_and_trainer_run_the_same_block(model, monkeypatch):
    """Prefill, decode and the training forward all run `decoder.block`: alter it and
    the sampler's greedy tokens follow the altered training forward, step for step."""
    from reflax.models import decoder

    original, shapes = decoder.block, []

    def altered(p, x, rope, attend, config):  # a different model: every layer's output scaled
        shapes.append(x.shape)
        x, aux = original(p, x, rope, attend, config)
        return 1.5 * x, aux

    monkeypatch.setattr(decoder, "block", altered)
    n, prompts = 4, PROMPTS[:2]
    out = Sampler(model, **SAMPLER_KW).sample(model, prompts, GREEDY, max_new_tokens=n, rng=0)
    assert [s[1] for s in shapes] == [16, 1]  # the prefill's layer scan, then the decode's

    forward = jax.jit(lambda state, t, m: nnx.merge(graphdef, state)(t, mask=m)[0])
    graphdef, state = nnx.split(model)
    seqs = [list(p) for p in prompts]
    for _ in range(n):  # greedy with the training forward over the whole sequence
        tokens, mask = left_pad(seqs, 16)
        logits = np.asarray(forward(state, tokens, mask))[:, -1]
        seqs = [s + [int(t)] for s, t in zip(seqs, logits.argmax(-1))]
    np.testing.assert_array_equal(out.tokens, [s[len(p) :] for s, p in zip(seqs, prompts)])
    monkeypatch.undo()
    plain = Sampler(model, **SAMPLER_KW).sample(model, prompts, GREEDY, max_new_tokens=n, rng=0)
    assert (plain.tokens != out.tokens).any()  # the alteration mattered
