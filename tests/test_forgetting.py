"""The lm_eval adapter on local tasks in lm_eval's YAML format (no network): the harness's
scores through `ReflaxLM` equal a direct computation with `reflax.logits`."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from flax import nnx

pytest.importorskip("lm_eval")

import reflax  # noqa: E402
from reflax import forgetting  # noqa: E402
from reflax.forgetting import ReflaxLM, forgetting_table, run_suite  # noqa: E402
from reflax.models.hf import load_pretrained  # noqa: E402
from reflax.sampler import Sampler  # noqa: E402
from reflax.tokenizer import ChatTokens, load_tokenizer  # noqa: E402
from tests.helpers import cpu_mesh, tiny_hf_checkpoint  # noqa: E402

GEN_TOKENS = 8
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
WORDS = ["red", "blue", "green", "gold", "tea", "sky", "sea", "stone", "ink"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random qwen2 model with O(1) logits on a (2, 2, 2) mesh and its tokenizer."""
    path = tiny_hf_checkpoint(tmp_path_factory.mktemp("ckpt"))
    mesh = cpu_mesh()
    model = load_pretrained(path, mesh=mesh)
    tok = ChatTokens(load_tokenizer(path))
    return model, tok, mesh


def _write_task(directory, name: str, rows: list[dict], body: str) -> None:
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\n" + body
    )


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _continuation_scores(model, pairs: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
    """For (ids, n) pairs: log p(ids[n:] | ids[:n]) and whether every one of those ids is
    the argmax, from full logits of one right-padded batch (one program)."""
    width = max(len(ids) for ids, _ in pairs)
    tokens = np.zeros((len(pairs), width), np.int32)
    mask = np.zeros((len(pairs), width), bool)
    for b, (ids, _) in enumerate(pairs):
        tokens[b, : len(ids)], mask[b, : len(ids)] = ids, True
    logits = np.asarray(reflax.logits(model, tokens, mask), np.float64)  # [B, W, V]
    out = []
    for b, (ids, n) in enumerate(pairs):
        rows, targets = np.arange(n - 1, len(ids) - 1), np.asarray(ids[n:])
        logp = _log_softmax(logits[b, rows])
        out.append(
            (
                float(logp[np.arange(len(rows)), targets].sum()),
                bool((logp.argmax(-1) == targets).all()),
            )
        )
    return out


def _greedy(model, prompts: list[list[int]], steps: int, stop_ids) -> list[list[int]]:
    """Greedy decoding by full forwards over a fixed right-padded block (one program)."""
    width = max(len(p) for p in prompts) + steps
    tokens = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), bool)
    lengths = np.asarray([len(p) for p in prompts])
    for b, p in enumerate(prompts):
        tokens[b, : len(p)], mask[b, : len(p)] = p, True
    out: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    for _ in range(steps):
        logits = np.asarray(reflax.logits(model, tokens, mask))
        for b in range(len(prompts)):
            if done[b]:
                continue
            nxt = int(logits[b, lengths[b] - 1].argmax())
            out[b].append(nxt)
            done[b] = nxt in stop_ids
            tokens[b, lengths[b]], mask[b, lengths[b]] = nxt, True
            lengths[b] += 1
    return out


def test_harness_scores_equal_direct_computation(setup, tmp_path):
    model, tok, mesh = setup
    graphdef, state = nnx.split(model)
    rng = random.Random(0)
    mc_rows = []
    for i in range(10):
        choices = rng.sample(WORDS, rng.choice((2, 3, 4)))
        mc_rows.append({"question": f"Q{i}: {rng.choice(WORDS)} or not?", "choices": choices})
        mc_rows[-1]["label"] = rng.randrange(len(choices))
    _write_task(
        tmp_path,
        "tiny_mc",
        mc_rows,
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n",
    )

    # direct answers first: the task's stop string is a character they actually produce
    gen_rows = [{"question": f"say {w}:", "answer": w} for w in WORDS[:5]]
    prompts = [tok.encode(r["question"]) for r in gen_rows]
    raw = [
        tok.decode([t for t in ids if t not in tok.stop_ids], skip_special_tokens=True)
        for ids in _greedy(model, prompts, GEN_TOKENS, tok.stop_ids)
    ]
    until = next(text[2] for text in raw if len(text) > 2)
    _write_task(
        tmp_path,
        "tiny_gen",
        gen_rows,
        "output_type: generate_until\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_target: "{{answer}}"\n'
        f"generation_kwargs:\n  until: [{json.dumps(until)}]\n"
        f"  max_gen_toks: {GEN_TOKENS}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n",
    )

    sampler = Sampler(
        graphdef, mesh, prompt_buckets=16, gen_buckets=GEN_TOKENS, compiler_options=FAST_COMPILE
    )
    lm = ReflaxLM(
        graphdef,
        state,
        tok,
        mesh=mesh,
        sampler=sampler,
        batch_size=8,
        compiler_options=FAST_COMPILE,
    )
    results = run_suite(
        lm,
        ["tiny_mc", "tiny_gen"],
        include_path=str(tmp_path),
        include_defaults=False,
        log_samples=True,
        bootstrap_iters=0,
    )

    # multiple choice: every choice's log-likelihood and greediness, then the accuracy
    pairs = [
        (tok.encode(row["question"] + " " + c), len(tok.encode(row["question"])))
        for row in mc_rows
        for c in row["choices"]
    ]
    text = "red sea, blue sky"  # for the rolling log-likelihood below
    pairs.append(([lm.prefix_token_id, *tok.encode(text)], 1))
    *scores, rolling = _continuation_scores(model, pairs)
    correct = []
    samples = sorted(results["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(mc_rows)
    for row, sample in zip(mc_rows, samples):
        direct, scores = scores[: len(row["choices"])], scores[len(row["choices"]) :]
        harness = [r[0] for r in sample["resps"]]
        assert len(harness) == len(direct)
        for (ll, greedy), (h_ll, h_greedy) in zip(direct, harness):
            assert abs(h_ll - ll) <= 1e-4 * max(1.0, abs(ll)), (h_ll, ll)
            assert h_greedy == greedy
        ranked = sorted(ll for ll, _ in direct)
        assert ranked[-1] - ranked[-2] > 1e-3  # no near tie: the argmax below is meaningful
        correct.append(int(np.argmax([ll for ll, _ in direct])) == row["label"])
    assert 0 < sum(correct) < len(correct)  # the model is neither always right nor wrong
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(np.mean(correct), abs=1e-12)
    assert forgetting.headline(results, "tiny_mc") == ("acc,none", np.mean(correct))

    # generation: the greedy text cut at the stop string
    samples = sorted(results["samples"]["tiny_gen"], key=lambda s: s["doc_id"])
    expected = [text.split(until)[0] for text in raw]
    assert [s["resps"][0][0] for s in samples] == expected
    assert any(e != text for e, text in zip(expected, raw))  # the stop string cut something
    assert results["results"]["tiny_gen"]["exact_match,none"] == pytest.approx(
        np.mean([e == r["answer"] for e, r in zip(expected, gen_rows)])
    )

    # rolling log-likelihood over the harness's windows: the text's total log-prob
    from lm_eval.api.instance import Instance

    req = Instance("loglikelihood_rolling", {}, (text,), 0)
    assert lm.loglikelihood_rolling([req])[0] == pytest.approx(rolling[0], rel=1e-4)

    # the side-by-side table: a degraded copy of the results breaks the paper's claim
    worse = json.loads(json.dumps(results))
    worse["results"]["tiny_mc"]["acc,none"] -= 0.05
    text = forgetting_table({"vanilla": results, "trained": worse}, ["tiny_mc"])
    assert "< 1 point" in text and "-5.0" in text and "NO" in text
    same = forgetting_table({"vanilla": results, "trained": results}, ["tiny_mc"])
    assert "yes" in same.splitlines()[-1]


def test_continuations_longer_than_the_input_bucket(setup):
    # a 150-token rolling window and a 141-token choice: the continuation bucket (a power of
    # two, 256) passes the input bucket (a multiple of 64, 192); scored in one batch with a
    # short greedy continuation, right-aligned in the same bucket
    from lm_eval.api.instance import Instance

    model, tok, mesh = setup
    graphdef, state = nnx.split(model)
    lm = ReflaxLM(graphdef, state, tok, mesh=mesh, batch_size=4, compiler_options=FAST_COMPILE)
    rng = random.Random(1)
    text = " ".join(rng.choice(WORDS) for _ in range(60))
    while len(tok.encode(text)) > 150:
        text = text[:-1]
    ids = tok.encode(text)
    assert len(ids) == 150
    context = tok.encode("Q: pick one")
    choice = ids[:141]
    start = tok.encode("say red:")
    greedy = _greedy(model, [start], 6, stop_ids=())[0]
    requests = [
        (None, [lm.prefix_token_id], ids),
        (None, context, choice),
        (None, start, greedy),
    ]
    harness = lm._loglikelihood_tokens(requests)
    direct = _continuation_scores(model, [(c + t, len(c)) for _, c, t in requests])
    for (h_ll, h_greedy), (ll, is_greedy) in zip(harness, direct, strict=True):
        assert abs(h_ll - ll) <= 1e-4 * max(1.0, abs(ll)), (h_ll, ll)
        assert h_greedy == is_greedy
    assert [g for _, g in direct] == [False, False, True]  # both answers of the argmax test
    # the same text through the harness's rolling windows (one window of 150 tokens)
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert rolling[0] == pytest.approx(direct[0][0], rel=1e-4)
