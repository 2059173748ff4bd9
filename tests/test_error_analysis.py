"""Error analysis: each task's failure categories agree with its verifier, and evaluate()
counts them per try into eval.json's `errors` and the printed table."""

from __future__ import annotations

import json
import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from reflax.config import base_config
from reflax.evaluate import error_breakdown, evaluate, table
from reflax.runtime import Runtime
from reflax.sampler import SampleOutput
from reflax.tasks.base import CORRECT
from reflax.tasks.countdown import CountdownTask, reachable_targets
from reflax.tasks.function_calling import FunctionCallingTask
from reflax.tokenizer import ChatTokens
from tests.helpers import chatml_tokenizer

CD = CountdownTask()
FC = FunctionCallingTask()
EX = {"target": 24, "nums": [3, 4, 2]}


def _consistent(task, example: dict, completion: str) -> str:
    """The category, after checking it is allowed and 'correct' exactly when verify passes."""
    category = task.category(example, completion)
    assert category in (CORRECT, *task.categories), category
    assert (category == CORRECT) == task.verify(example, completion), (completion, category)
    return category


# ----------------------------------------------------------------------------- Countdown
def test_countdown_categories():
    cases = {
        "<answer>3 * 4 * 2</answer>": "correct",
        "3 * 4 * 2": "malformed",  # no tag
        "<answer></answer>": "malformed",
        "<answer>(3 * 4 * 2</answer>": "malformed",  # unbalanced
        "<answer>3 ** 4 * 2</answer>": "malformed",
        "<answer>-3 + 4 * 2</answer>": "malformed",
        "<answer>3 * 4 * x</answer>": "malformed",
        "<answer>3 * 4 * 2 = 25</answer>": "malformed",
        "<answer>(3 * 8</answer>": "malformed",  # malformed wins over wrong numbers
        "<answer>3 * 8</answer>": "wrong_numbers",
        "<answer>3 * 4 * 2 * 1</answer>": "wrong_numbers",
        "<answer>3 * 4 * 4</answer>": "wrong_numbers",
        "<answer>3 + 4 + 2</answer>": "missed_target",
        "<answer>3 / (4 - 4) + 2</answer>": "wrong_numbers",
    }
    for completion, want in cases.items():
        assert _consistent(CD, EX, completion) == want, completion
    zero = {"target": 5, "nums": [5, 3, 3]}
    assert _consistent(CD, zero, "<answer>5 / (3 - 3)</answer>") == "missed_target"
    assert CD.explain(zero, "<answer>5 / (3 - 3)</answer>") == "division by zero"
    assert _consistent(CD, {}, "<answer>3 * 4 * 2</answer>") == "malformed"
    assert _consistent(CD, EX, None) == "malformed"  # type: ignore[arg-type]


def _mutations(expression: str, rng: random.Random) -> list[str]:
    """Near misses of a solution: an edited character, a dropped or swapped one."""
    chars = "0123456789+-*/() =x"
    out = []
    for _ in range(6):
        i = rng.randrange(len(expression))
        out.append(expression[:i] + rng.choice(chars) + expression[i + 1 :])
        out.append(expression[:i] + expression[i + 1 :])
        out.append(expression[:i] + rng.choice(chars) + expression[i:])
    return out


def test_countdown_sweep_agrees_with_verify():
    rng = random.Random(0)
    seen = set()
    for _ in range(60):
        nums = [rng.randint(1, 12) for _ in range(rng.choice((3, 4)))]
        for target, expression in list(reachable_targets(nums).items())[:5]:
            example = {"target": target, "nums": nums}
            assert _consistent(CD, example, f"<answer>{expression}</answer>") == CORRECT
            for text in _mutations(expression, rng):
                for wrapped in (f"<answer>{text}</answer>", text, f"<answer>{text}"):
                    seen.add(_consistent(CD, example, wrapped))
    assert seen == {CORRECT, *CD.categories}  # the sweep reaches every category


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789+-*/() =.<>answer/\n٣x_", max_size=60))
def test_countdown_fuzz_agrees_with_verify(text):
    for task in (CD, CountdownTask(answer_fallback=True)):
        for completion in (text, f"<answer>{text}</answer>"):
            _consistent(task, EX, completion)


def test_countdown_hostile_inputs():
    for hostile in ("(" * 100_000, "9 / 0", "9**9**9", "\x00\ud800", "<answer>" * 1000, "1" * 5000):
        for completion in (hostile, f"<answer>{hostile}</answer>"):
            assert _consistent(CD, {"target": 24, "nums": [9, 9, 9]}, completion) != CORRECT


# ------------------------------------------------------------------------ function calling
def _fc_example(calls: list[dict]) -> dict:
    tools = [{"name": n, "parameters": {}} for n in ("a", "b", "c")]
    return {"query": "q", "tools": json.dumps(tools), "answers": json.dumps(calls)}


def _tagged(calls: list[dict]) -> str:
    return f"<tool_call>{json.dumps(calls)}</tool_call>"


def test_function_calling_categories():
    a1, a2, b1 = (
        {"name": "a", "arguments": {"x": 1}},
        {"name": "a", "arguments": {"x": 2}},
        {"name": "b", "arguments": {"x": 1}},
    )
    gold = _fc_example([a1, b1])
    cases = {
        _tagged([b1, a1]): "correct",
        "no calls here": "malformed",
        "<tool_call>[{'name': 'a'}]</tool_call>": "malformed",
        '<tool_call>{"name": "a", "arguments": </tool_call>': "malformed",
        _tagged([a1]): "wrong_call_count",
        _tagged([a1, b1, b1]): "wrong_call_count",
        _tagged([a1, a1]): "wrong_tool",
        _tagged([a1, {"name": "c", "arguments": {"x": 1}}]): "wrong_tool",
        _tagged([a2, b1]): "wrong_arguments",
        _tagged([a1, {"name": "b", "arguments": {}}]): "wrong_arguments",
        _tagged([a1, {"name": "b", "arguments": {"x": 1, "y": 0}}]): "wrong_arguments",
    }
    for completion, want in cases.items():
        assert _consistent(FC, gold, completion) == want, completion
    assert _consistent(FC, {"query": "q"}, _tagged([a1])) == "malformed"  # no gold answers


_CALL = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["a", "b", "c"]),
        "arguments": st.dictionaries(
            st.sampled_from(["x", "y"]), st.one_of(st.integers(0, 2), st.sampled_from(["1", 1.0]))
        ),
    }
)


@settings(max_examples=300, deadline=None)
@given(
    gold=st.lists(_CALL, min_size=1, max_size=3),
    predicted=st.lists(_CALL, max_size=4),
    style=st.sampled_from(["tagged", "bare", "broken"]),
)
def test_function_calling_property_agrees_with_verify(gold, predicted, style):
    if style == "tagged":
        text = _tagged(predicted)
    elif style == "bare":
        text = json.dumps(predicted)
    else:
        text = _tagged(predicted)[:-15]
    category = _consistent(FC, _fc_example(gold), text)
    if style != "broken" and predicted and len(predicted) != len(gold):
        assert category == "wrong_call_count"


# ------------------------------------------------------------------------- evaluate()
class ScriptedSampler:
    """Stands in for the Sampler: each call returns the next scripted list of completions."""

    def __init__(self, tok: ChatTokens, script: list[list[str]]):
        self.tok, self.script = tok, list(script)

    def _out(self, rows: int, num_samples: int) -> SampleOutput:
        texts = self.script.pop(0)
        assert len(texts) == rows * num_samples, (texts, rows, num_samples)
        ids = [self.tok.encode(t) + [self.tok.stop_ids[0]] for t in texts]
        width = max(len(i) for i in ids)
        tokens = np.full((len(ids), width), self.tok.pad_id, np.int32)
        for r, i in enumerate(ids):
            tokens[r, : len(i)] = i
        lengths = np.asarray([len(i) for i in ids], np.int32)
        return SampleOutput(tokens, np.zeros(tokens.shape, np.float32), lengths, lengths > 0, None)

    def sample(self, state, prompts, spec, *, num_samples=1, **kwargs) -> SampleOutput:
        return self._out(len(prompts), num_samples)

    def continue_rows(self, state, cached, new_turns, spec, *, num_samples=1, **kw) -> SampleOutput:
        return self._out(len(new_turns), num_samples)


def test_evaluate_counts_categories_per_try():
    examples = [{"target": 24, "nums": [3, 4, 2]}, {"target": 7, "nums": [3, 4]}] * 2
    first = ["<answer>3*4*2</answer>", "<answer>3-4</answer>", "3*4*2", "<answer>4-3</answer>"]
    # failed: problems 1, 2, 3 -> one reflection and one retry each
    reflections = ["think", "think", "think"]
    retries = ["<answer>3+4</answer>", "<answer>3*4*2*1</answer>", "<answer>4*3</answer>"]
    tok = ChatTokens(chatml_tokenizer())
    c = base_config()
    sampler = ScriptedSampler(tok, [first, reflections, retries])
    rt = Runtime(config=c, mesh=None, tok=tok, graphdef=None, task=CD, sampler=sampler)
    r = evaluate(rt, None, examples, batch_size=8)
    want_first = {"correct": 1, "malformed": 1, "wrong_numbers": 0, "missed_target": 2}
    want_second = {"correct": 2, "malformed": 0, "wrong_numbers": 1, "missed_target": 1}
    assert r["errors"]["first_try"]["counts"] == want_first
    assert r["errors"]["second_try"]["counts"] == want_second
    assert r["errors"]["second_try"]["fractions"]["correct"] == r["second_try"] == 0.5
    assert r["errors"]["first_try"]["fractions"]["correct"] == r["first_try"] == 0.25
    # each problem's outcome, in order: 0 passes at once, 1 on its retry
    assert r["outcomes"] == {"first_try": [1, 0, 0, 0], "second_try": [1, 1, 0, 0]}
    json.dumps(r)  # eval.json

    text = table({"before": r, "after": r}, "countdown")
    assert "first try" in text and "wrong_numbers" in text
    rows = [line for line in text.splitlines() if line.startswith(("before, ", "after, "))]
    assert len(rows) == 4
    assert rows[1].split()[-4:] == ["50.0", "0.0", "25.0", "25.0"]  # before, second try


def test_error_breakdown_rejects_unknown_categories():
    from collections import Counter

    out = error_breakdown(("x",), {"first_try": Counter(correct=1, x=3)}, 4)
    assert out["first_try"]["fractions"] == {"correct": 0.25, "x": 0.75}
    try:
        error_breakdown(("x",), {"first_try": Counter(y=1)}, 1)
    except ValueError as error:
        assert "y" in str(error)
    else:
        raise AssertionError("an unknown category must be an error")
