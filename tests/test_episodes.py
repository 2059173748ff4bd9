"""Episodes: token in, token out; loss_mask exactly on reflection tokens; sampler and
trainer log-probs agree on the train rows; one sampling spec from the config."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from reflax import tasks
from reflax.config import base_config
from reflax.episodes import (
    Failure,
    RolloutSettings,
    _content,
    after_sampled,
    build_batch,
    completion_text,
    prompt_ids,
    reflect_and_retry,
    retry_turn,
)
from reflax.models import ModelConfig, create
from reflax.sampler import Sampler
from reflax.sampling import SamplingSpec
from reflax.tokenizer import ChatTokens, char_tokenizer
from reflax.trainer import StepConfig, make_logprob_fn

ALPHABET = "0123456789+-*/() ,[]toagainwrongwhy.:?"
TEMPERATURE = 0.9


@pytest.fixture(scope="module")
def setup():
    tok = ChatTokens(char_tokenizer(ALPHABET))
    cfg = ModelConfig(
        vocab_size=len(tok.tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        qkv_bias=True,
        tie_word_embeddings=True,
    )
    model = create(cfg, seed=3)
    graphdef, params = nnx.split(model)
    task = tasks.get(
        "countdown",
        counts=(3,),
        num_range=(1, 9),
        target_range=(1, 20),
        prompt_template="{nums} to {target}",
        reflection_template="wrong. why?",
        retry_template="again: {nums} to {target}",
        answer_fallback=True,
    )
    examples = task.load("train", num=3)
    failures = [
        Failure(ex, prompt_ids(tok, task, ex), tok.encode("1+2") + [tok.stop_ids[0]])
        for ex in examples[:2]
    ] + [Failure(examples[2], prompt_ids(tok, task, examples[2]), tok.encode("9*9"))]
    # XLA CPU options that cut compile time (what the programs compute is unchanged)
    fast = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
    sampler = Sampler(
        graphdef, prompt_buckets=32, gen_buckets=16, cache_buckets=64, compiler_options=fast
    )
    return tok, task, graphdef, params, sampler, failures


def _settings(tok, method, G=3):
    """Sampler log-probs on: the tests compare them with the trainer's."""
    spec = SamplingSpec(
        temperature=TEMPERATURE, stop_ids=tok.stop_ids, pad_id=tok.pad_id, logprobs=True
    )
    return RolloutSettings(
        sampling=spec,
        group_size=G,
        max_attempt_tokens=8,
        max_reflection_tokens=10,
        max_retry_tokens=8,
        method=method,
    )


def test_reflect_rows_and_logprobs(setup):
    tok, task, graphdef, params, sampler, failures = setup
    s = _settings(tok, "reflect")
    groups = reflect_and_retry(sampler, params, tok, task, failures, jax.random.key(0), s)
    assert len(groups) == len(failures) and all(len(g.rows) == 3 for g in groups)
    batch, stats = build_batch(groups, num_groups=4, group_size=3, seq_len=256, pad_id=tok.pad_id)
    assert stats.groups == 3 and stats.padding_groups == 1
    tokens, loss_mask = np.asarray(batch.tokens), np.asarray(batch.loss_mask)
    anchor_mask = np.asarray(batch.anchor_mask)
    for u, g in enumerate(groups):
        f = failures[u]
        prefix = (
            f.prompt_ids
            + tok.close_assistant(f.attempt_ids)
            + tok.user_turn_ids(task.reflection_instruction(f.example))
        )
        for k, row in enumerate(g.rows):
            b = u * 3 + k
            reflection = row[-1].ids
            n = len(prefix)
            assert tokens[b, :n].tolist() == prefix  # the exact ids the sampler saw
            assert tokens[b, n : n + len(reflection)].tolist() == reflection
            expected = np.zeros(256)
            expected[n : n + len(reflection)] = 1
            np.testing.assert_array_equal(loss_mask[b], expected)
            # the anchor covers the failed attempt's sampled content, nothing else
            p, content = len(f.prompt_ids), _content(tok, f.attempt_ids)
            assert content and tokens[b, p : p + len(content)].tolist() == content
            expected = np.zeros(256)
            expected[p : p + len(content)] = 1
            np.testing.assert_array_equal(anchor_mask[b], expected)
            assert g.rewards[k] == float(task.verify(f.example, g.texts["retry"][k]))
    assert not loss_mask[9:].any()  # the padding group
    # the trainer scores the train rows exactly as the sampler did
    lp = make_logprob_fn(graphdef, StepConfig(temperature=TEMPERATURE))(params, batch)
    m = loss_mask > 0
    np.testing.assert_allclose(np.asarray(lp)[m], np.asarray(batch.old_logprobs)[m], atol=1e-4)


def test_retry_continues_the_exact_context(setup):
    tok, task, graphdef, params, sampler, failures = setup
    s = _settings(tok, "reflect", G=2)
    groups = reflect_and_retry(
        sampler, params, tok, task, failures, jax.random.key(1), s, greedy=True
    )
    contexts, expected = [], []
    for u, g in enumerate(groups):
        for k, row in enumerate(g.rows):
            prefix = [i for sg in row[:-1] for i in sg.ids]
            reflection = row[-1].ids
            turn = tok.close_assistant(reflection) + tok.user_turn_ids(
                task.retry_instruction(failures[u].example)
            )
            contexts.append(prefix + reflection + after_sampled(tok, reflection, turn))
            expected.append(g.texts["retry"][k])
    spec = SamplingSpec(greedy=True, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    fresh = sampler.sample(params, contexts, spec, max_new_tokens=8, rng=jax.random.key(2))
    assert [completion_text(tok, c) for c in fresh.completions()] == expected


@pytest.mark.parametrize("greedy", [False, True])
def test_retry_prefill_samples_what_the_continued_cache_does(setup, greedy):
    # rollout.retry_prefill: the retry sampled from its whole context, no reflection cache
    # kept; the same rng layout, so the same retries (and log-probs) as continuing the cache
    tok, task, graphdef, params, sampler, failures = setup
    s = _settings(tok, "reflect_retry", G=2)
    run = lambda settings: reflect_and_retry(
        sampler, params, tok, task, failures, jax.random.key(5), settings, greedy=greedy
    )
    kept, prefilled = run(s), run(dataclasses.replace(s, retry_prefill=True))
    for a, b in zip(kept, prefilled, strict=True):
        assert a.texts == b.texts and a.rewards == b.rewards
        for row_a, row_b in zip(a.rows, b.rows, strict=True):
            assert [sg.ids for sg in row_a] == [sg.ids for sg in row_b]
            np.testing.assert_allclose(row_a[-1].logprobs, row_b[-1].logprobs, atol=1e-5)


@pytest.mark.parametrize("method", ["reflect_retry", "fixed_reflection"])
def test_ablation_masks(setup, method):
    tok, task, graphdef, params, sampler, failures = setup
    s = _settings(tok, method, G=2)
    groups = reflect_and_retry(sampler, params, tok, task, failures, jax.random.key(0), s)
    batch, _ = build_batch(groups, num_groups=3, group_size=2, seq_len=512, pad_id=tok.pad_id)
    assert int(np.asarray(batch.mask).any(1).sum()) == 6  # no group dropped
    loss_mask = np.asarray(batch.loss_mask)
    anchored = np.asarray(batch.anchor_mask).sum(1)
    for u, g in enumerate(groups):
        for k, row in enumerate(g.rows):
            assert anchored[u * 2 + k] == len(_content(tok, failures[u].attempt_ids))
            trained = [sg for sg in row if sg.trainable]
            expected = sum(len(sg.ids) for sg in trained)
            assert loss_mask[u * 2 + k].sum() == expected
            if method == "fixed_reflection":
                assert len(trained) == 1 and trained[0].ids == row[-1].ids  # the retry
                assert tok.encode(s.fixed_reflection)[0] in [i for sg in row for i in sg.ids]
            else:
                assert len(trained) == 2  # reflection and retry, not the instruction turn
                # the retry's context is the one the sampler continued: retry_turn's ids
                assert row[-2].ids == retry_turn(tok, task, failures[u].example, row[-3].ids)
    lp = make_logprob_fn(graphdef, StepConfig(temperature=TEMPERATURE))(params, batch)
    m = loss_mask > 0
    np.testing.assert_allclose(np.asarray(lp)[m], np.asarray(batch.old_logprobs)[m], atol=1e-4)


def test_long_groups_are_dropped_not_truncated(setup):
    tok, task, graphdef, params, sampler, failures = setup
    groups = reflect_and_retry(
        sampler, params, tok, task, failures[:1], jax.random.key(0), _settings(tok, "reflect", 2)
    )
    batch, stats = build_batch(groups, num_groups=1, group_size=2, seq_len=8, pad_id=tok.pad_id)
    assert stats.dropped_too_long == 1 and stats.groups == 0
    assert not np.asarray(batch.loss_mask).any()


def test_settings_validation():
    with pytest.raises(ValueError, match="method"):
        RolloutSettings(method="nope")
    with pytest.raises(ValueError, match="group_size"):
        dataclasses.replace(RolloutSettings(), group_size=1)
    with pytest.raises(ValueError, match="greedy_retry needs method 'reflect'"):
        RolloutSettings(method="reflect_retry", greedy_retry=True)


class RecordingSampler:
    """A Sampler that records the spec and output of every call."""

    def __init__(self, sampler: Sampler):
        self.sampler, self.calls = sampler, []

    def sample(self, state, prompts, spec, **kw):
        self.calls.append((spec, self.sampler.sample(state, prompts, spec, **kw)))
        return self.calls[-1][1]

    def continue_rows(self, state, cached, new_turns, spec, **kw):
        self.calls.append((spec, self.sampler.continue_rows(state, cached, new_turns, spec, **kw)))
        return self.calls[-1][1]


def test_one_sampling_spec_from_the_config(setup):
    """The config's sampling options become one SamplingSpec, and every sampler call of an
    episode gets that spec (greedy where asked). A run's spec asks for no log-probs: none
    come back from the device and the batch's old_logprobs stay zero."""
    tok, task, graphdef, params, sampler, failures = setup
    c = base_config()
    c.rollout.temperature, c.rollout.top_k, c.rollout.top_p = TEMPERATURE, 7, 0.95
    c.rollout.group_size, c.rollout.max_reflection_tokens, c.rollout.max_retry_tokens = 2, 10, 8
    s = RolloutSettings.from_config(c, tok)
    want = SamplingSpec(
        temperature=TEMPERATURE,
        top_k=7,
        top_p=0.95,
        stop_ids=tuple(tok.stop_ids),
        pad_id=tok.pad_id,
        logprobs=False,
    )
    assert s.sampling == want and hash(s.sampling) == hash(want)
    recording = RecordingSampler(sampler)
    groups = reflect_and_retry(recording, params, tok, task, failures, jax.random.key(0), s)
    assert [spec for spec, _ in recording.calls] == [s.sampling] * 2  # reflect, retry
    assert all(out.logprobs is None for _, out in recording.calls)
    batch, _ = build_batch(groups, num_groups=3, group_size=2, seq_len=256, pad_id=tok.pad_id)
    assert np.asarray(batch.loss_mask).any() and not np.asarray(batch.old_logprobs).any()
    recording.calls.clear()
    reflect_and_retry(recording, params, tok, task, failures, jax.random.key(0), s, greedy=True)
    assert [spec for spec, _ in recording.calls] == [dataclasses.replace(want, greedy=True)] * 2
    # rollout.greedy_retry: the reflections sampled, the retry greedy
    recording.calls.clear()
    c.rollout.greedy_retry = True
    s = RolloutSettings.from_config(c, tok)
    reflect_and_retry(recording, params, tok, task, failures, jax.random.key(0), s)
    assert [spec for spec, _ in recording.calls] == [want, dataclasses.replace(want, greedy=True)]
