"""Countdown: every verifier rule, generation, loading and hostile input."""

import json
import logging
import random
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reflax import tasks
from reflax.tasks import countdown
from reflax.tasks.countdown import CountdownTask, check, extract_answer, reachable_targets

TASK = CountdownTask()
EX = {"target": 24, "nums": [3, 4, 2]}  # 3 * 4 * 2


def ok(answer: str, example: dict = EX, task: CountdownTask = TASK) -> bool:
    return task.verify(example, answer)


# ------------------------------------------------------------------------ answer format
def test_correct_answer_in_tags():
    assert ok("<answer>3 * 4 * 2</answer>")
    assert ok("Let me think. <answer> (3 * 4) * 2 </answer> done")
    assert TASK.explain(EX, "<answer>3*4*2</answer>") == "correct"


def test_last_answer_tag_wins():
    assert ok("<answer>3 + 4 + 2</answer> no wait <answer>3 * 4 * 2</answer>")
    assert not ok("<answer>3 * 4 * 2</answer> no wait <answer>3 + 4 + 2</answer>")


def test_unclosed_last_tag_runs_to_end():
    assert ok("<answer> 3 * 4 * 2")
    assert not ok("<answer>3 * 4 * 2</answer> <answer>")


def test_no_tag_fails_by_default():
    assert not ok("3 * 4 * 2")
    assert TASK.explain(EX, "3 * 4 * 2") == "no <answer> tag"


def test_fallback_uses_last_nonblank_line():
    task = CountdownTask(answer_fallback=True)
    assert ok("thinking...\n3 * 4 * 2\n\n", task=task)
    assert not ok("3 * 4 * 2\nsomething else", task=task)
    assert not ok("   \n\n", task=task)
    # Tags still take precedence over the last line.
    assert ok("<answer>3*4*2</answer>\n3 + 4 + 2", task=task)


def test_extract_answer():
    assert extract_answer("a <answer>x</answer> <answer>y</answer> b") == "y"
    assert extract_answer("no tags") is None
    assert extract_answer("l1\nl2\n", fallback=True) == "l2"
    long = extract_answer("<answer>" + "1" * 5000)
    assert long is not None and len(long) == countdown.MAX_ANSWER_CHARS + 1


def test_whitespace_and_newlines_inside_answer():
    assert ok("<answer>\n  3 *\t4\n * 2 \n</answer>")


def test_equals_target_suffix():
    assert ok("<answer>3 * 4 * 2 = 24</answer>")
    assert not ok("<answer>3 * 4 * 2 = 25</answer>")
    assert not ok("<answer>3 * 4 * 2 = 24 = 24</answer>")
    assert not ok("<answer>24 = 3 * 4 * 2</answer>")
    assert not ok("<answer>3 * 4 * 2 = 2 * 12</answer>")


# --------------------------------------------------------------------------------- rules
@pytest.mark.parametrize(
    "answer",
    ["2.0 * 3 * 4", "3 * 4 * 2.", "3 * 4 * 2e0", "3 * 4 * 0x2", "3 * 4 * 2j", "3 * 4 * 1_2"],
)
def test_only_integer_literals(answer):
    assert not ok(f"<answer>{answer}</answer>")


def test_unicode_digits_rejected():
    assert not ok("<answer>٣ * 4 * 2</answer>")
    assert not ok("<answer>３ * 4 * 2</answer>")  # fullwidth 3
    assert "not allowed" in TASK.explain(EX, "<answer>٣ * 4 * 2</answer>")


def test_unary_minus_and_plus_rejected():
    example = {"target": 5, "nums": [3, 8]}
    assert ok("<answer>8 - 3</answer>", example)
    assert not ok("<answer>-3 + 8</answer>", example)
    assert not ok("<answer>8 - -3 - 6</answer>", {"target": 5, "nums": [3, 8, 6]})
    assert not ok("<answer>+8 - 3</answer>", example)
    assert "unary" in TASK.explain(example, "<answer>-3 + 8</answer>")


def test_power_floor_division_and_modulo_rejected():
    assert not ok("<answer>3 ** 2</answer>", {"target": 9, "nums": [3, 2]})
    assert "**" in TASK.explain({"target": 9, "nums": [3, 2]}, "<answer>3 ** 2</answer>")
    assert not ok("<answer>7 // 2</answer>", {"target": 3, "nums": [7, 2]})
    assert not ok("<answer>7 % 2</answer>", {"target": 1, "nums": [7, 2]})


def test_each_number_exactly_once():
    assert not ok("<answer>3 * 4 * 2 * 1</answer>")  # extra number
    assert not ok("<answer>3 * 8</answer>")  # missing number (and 8 not given)
    assert not ok("<answer>(3 + 3) * 4</answer>")  # 3 reused, 2 unused
    assert ok("<answer>(3 + 3) * 4</answer>", {"target": 24, "nums": [3, 4, 3]})
    assert not ok("<answer>(3 + 3) * 4</answer>", {"target": 24, "nums": [3, 4, 4]})
    assert "exactly once" in TASK.explain(EX, "<answer>3 * 8</answer>")


def test_value_must_equal_target():
    assert not ok("<answer>3 + 4 + 2</answer>")
    assert TASK.explain(EX, "<answer>3 + 4 + 2</answer>") == "the expression equals 9, not 24"


def test_exact_rational_arithmetic():
    assert ok("<answer>4 / 2 * 1</answer>", {"target": 2, "nums": [4, 2, 1]})
    assert ok("<answer>(1 / 2) * 4</answer>", {"target": 2, "nums": [1, 2, 4]})
    # 1/3 * 3 is exactly 1 (floats would also agree here, but 8/3*3 differs in binary)
    assert ok("<answer>(1 / 3) * 3</answer>", {"target": 1, "nums": [1, 3, 3]})
    assert ok("<answer>8 / 3 * 3</answer>", {"target": 8, "nums": [8, 3, 3]})
    assert not ok("<answer>(1 / 3) * 3</answer>", {"target": 0, "nums": [1, 3, 3]})
    assert "not 2" in TASK.explain({"target": 2, "nums": [1, 3]}, "<answer>1 / 3</answer>")


def test_division_by_zero_fails():
    example = {"target": 0, "nums": [5, 3, 3]}
    assert not ok("<answer>5 / (3 - 3)</answer>", example)
    assert TASK.explain(example, "<answer>5 / (3 - 3)</answer>") == "division by zero"
    assert ok("<answer>(3 - 3) / 5</answer>", example)


def test_leading_zero_is_a_syntax_error():
    assert not ok("<answer>03 * 4 * 2</answer>")


def test_syntax_errors_fail():
    for answer in ["3 * * 4 2", "(3 * 4 * 2", "3 4 2", "3 * 4 * 2)", "()", ""]:
        assert not ok(f"<answer>{answer}</answer>"), answer


def test_length_cap():
    padded = "3 * 4 * 2" + " " * (countdown.MAX_ANSWER_CHARS - 9)
    assert len(padded) == countdown.MAX_ANSWER_CHARS
    assert ok(f"<answer>{padded}</answer>")
    assert not ok(f"<answer>{padded} </answer>")
    assert "longer" in TASK.explain(EX, f"<answer>{padded} </answer>")


def test_huge_intermediate_values_fail():
    big = 10**20
    example = {"target": 1, "nums": [big, big, big]}
    assert not ok(f"<answer>{big} * {big} / {big}</answer>", example)
    assert "too large" in TASK.explain(example, f"<answer>{big} * {big} / {big}</answer>")
    assert ok(f"<answer>{big} / {big} * 1</answer>", {"target": 1, "nums": [big, big, 1]})


def test_ast_node_cap(monkeypatch):
    monkeypatch.setattr(countdown, "MAX_AST_NODES", 4)
    assert not ok("<answer>3 * 4 * 2</answer>")
    assert TASK.explain(EX, "<answer>3 * 4 * 2</answer>") == "expression is too large"


def test_non_string_completion_and_bad_example():
    assert not TASK.verify(EX, None)  # type: ignore[arg-type]
    assert not TASK.verify(EX, b"<answer>3*4*2</answer>")  # type: ignore[arg-type]
    assert not TASK.verify({}, "<answer>3*4*2</answer>")
    assert not TASK.verify({"target": 24, "nums": None}, "<answer>3*4*2</answer>")
    assert isinstance(TASK.explain({}, "x"), str)


def test_check_function():
    assert check([3, 4, 2], 24, "<answer>3*4*2</answer>") == (True, "correct")
    assert check([3, 4, 2], 24, "3*4*2", fallback=True) == (True, "correct")


# ------------------------------------------------------------------------------- hostile
HOSTILE = [
    "9**9**9",
    "**",
    "(" * 100_000,
    "(" * 100_000 + "9" + ")" * 100_000,
    "1" * 1_000_000,
    "9 " * 500_000,
    " " * 1_000_000,
    "٣",
    "__import__('os').system('echo hi')",
    "lambda: 9",
    "(lambda x: x)(9)",
    "(9).__class__.__bases__",
    "9 .real",
    "NaN",
    "Infinity",
    "float('nan')",
    "1e309",
    "9e999999",
    "[" * 100_000 + "]" * 100_000,
    '{"a":' * 50_000,
    "-" * 999 + "9",
    "+" * 999 + "9",
    "9" * 999,
    "9 / 0",
    "(9 - 9) / (9 - 9)",
    "9 * " * 30 + "9",
    "\x00\ud800\U0010ffff",
    "9\n9\n9",
    "<answer>" * 10_000,
]


def _wrappings(text: str) -> list[str]:
    return [text, f"<answer>{text}</answer>", f"<answer>{text}", f"reasoning\n{text}"]


def _best_of(fn, repeats: int = 3) -> float:
    # Best of a few runs: this machine is shared, and one descheduling is not slowness.
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("task", [TASK, CountdownTask(answer_fallback=True)], ids=["tags", "fb"])
@pytest.mark.parametrize("hostile", HOSTILE, ids=lambda h: repr(h[:12]))
def test_hostile_inputs_fail_fast_and_never_raise(task, hostile):
    example = {"target": 24, "nums": [9, 9, 9]}
    for completion in _wrappings(hostile):
        assert task.verify(example, completion) is False  # warm-up
        assert isinstance(task.explain(example, completion), str)
        elapsed = _best_of(lambda c=completion: task.verify(example, c))
        assert elapsed < 0.010, (completion[:40], elapsed)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="0123456789+-*/() =.<>answer/\n٣x_", max_size=80))
def test_fuzzed_answers_never_raise(text):
    example = {"target": 24, "nums": [3, 4, 2]}
    for completion in (text, f"<answer>{text}</answer>"):
        assert isinstance(TASK.verify(example, completion), bool)
        assert isinstance(TASK.explain(example, completion), str)


# ---------------------------------------------------------------------------- generation
def test_reachable_targets_are_correct():
    reachable = reachable_targets([3, 4, 2])
    assert 24 in reachable and 9 in reachable and 1 in reachable
    for value, expression in reachable.items():
        assert check([3, 4, 2], value, f"<answer>{expression}</answer>")[0], expression


def test_generator_is_deterministic_and_respects_ranges():
    task = CountdownTask(counts=(3, 4), num_range=(1, 20), target_range=(10, 50))
    first = task.load("train", num=50, seed=3)
    assert first == task.load("train", num=50, seed=3)
    assert first != task.load("train", num=50, seed=4)
    for example in first:
        assert set(example) == {"target", "nums", "solution"}
        assert len(example["nums"]) in (3, 4)
        assert all(1 <= n <= 20 for n in example["nums"])
        assert 10 <= example["target"] <= 50
        assert task.verify(example, f"<answer>{example['solution']}</answer>")


def test_generated_train_and_test_never_share_numbers():
    task = CountdownTask(counts=(3,), num_range=(1, 12), synthetic_test_fraction=0.3)
    train = task.load("train", num=300, seed=0)
    test = task.load("test", num=100, seed=0)
    train_keys = {tuple(sorted(e["nums"])) for e in train}
    test_keys = {tuple(sorted(e["nums"])) for e in test}
    assert train_keys.isdisjoint(test_keys)
    assert len(test) == 100 and len(train) == 300
    assert task.load("test", num=100, seed=0) == test


def test_unique_generation_gives_distinct_problems_or_a_clear_error():
    kw = dict(counts=(2,), num_range=(1, 12), target_range=(1, 40), synthetic_test_fraction=0.3)
    task = CountdownTask(**kw, synthetic_unique_test=True, answer_fallback=True)
    plain = CountdownTask(**kw).load("test", num=200, seed=0)
    assert len({task.split_key(e) for e in plain}) < 200  # a small pool repeats
    test = task.load("test", num=40, seed=0)
    assert len({task.split_key(e) for e in test}) == 40
    assert all(task.verify(e, e["solution"]) for e in test)
    with pytest.raises(ValueError, match="could not generate 200 distinct"):
        task.load("test", num=200, seed=0)
    assert len(task.load("train", num=500, seed=0)) == 500  # train still draws with replacement


def test_generator_counts_config_and_default_size():
    task = CountdownTask(counts=(4,), synthetic_size=7)
    examples = task.load("test")
    assert len(examples) == 7 and all(len(e["nums"]) == 4 for e in examples)


def test_invalid_configuration_is_rejected():
    with pytest.raises(ValueError):
        CountdownTask(counts=(1,))
    with pytest.raises(ValueError):
        CountdownTask(counts=(9,))
    with pytest.raises(ValueError):
        CountdownTask(num_range=(5, 1))
    with pytest.raises(ValueError):
        CountdownTask(prompt_template="{numbers} -> {target}")
    with pytest.raises(ValueError):
        CountdownTask(synthetic_test_fraction=1.5)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), data=st.data())
def test_property_solution_verifies_and_mutations_fail(seed, data):
    example = CountdownTask(counts=(3, 4)).load("train", num=1, seed=seed)[0]
    solution = example["solution"]
    assert TASK.verify(example, f"<answer>{solution}</answer>")
    # Changing the target changes the required value.
    delta = data.draw(st.integers(1, 50)) * data.draw(st.sampled_from([-1, 1]))
    assert not TASK.verify(
        {**example, "target": example["target"] + delta}, f"<answer>{solution}</answer>"
    )
    # Changing one number in the expression breaks the exactly-once rule.
    literals = list(re.finditer(r"[0-9]+", solution))
    which = data.draw(st.integers(0, len(literals) - 1))
    old = int(literals[which].group())
    new = data.draw(st.integers(0, 200).filter(lambda n: n != old))
    span = literals[which].span()
    mutated = solution[: span[0]] + str(new) + solution[span[1] :]
    assert not TASK.verify(example, f"<answer>{mutated}</answer>")
    # Changing a given number makes the (unchanged) expression use the wrong numbers.
    nums = list(example["nums"])
    nums[data.draw(st.integers(0, len(nums) - 1))] += data.draw(st.integers(1, 9))
    assert not TASK.verify({**example, "nums": nums}, f"<answer>{solution}</answer>")


# ----------------------------------------------------------------------------- templates
def test_default_prompt_resembles_the_paper():
    prompt = TASK.prompt(EX)
    assert prompt.tools is None
    assert prompt.inline_tools() == prompt.messages
    (message,) = prompt.messages
    assert message["role"] == "user"
    text = message["content"]
    assert "Using the numbers [3, 4, 2], create an equation that equals 24." in text
    assert "(+, -, *, /)" in text and "exactly once" in text and "<answer>" in text
    assert "think" not in text.lower()  # no chain-of-thought instruction on the first attempt


def test_reflection_and_retry_turns():
    reflection = TASK.reflection_instruction(EX)
    assert "wrong" in reflection and "explanation" in reflection
    retry = TASK.retry_instruction(EX)
    assert "[3, 4, 2]" in retry and "24" in retry


def test_custom_terse_templates_and_system_prompt():
    task = CountdownTask(
        prompt_template="{nums}>{target}:",
        reflection_template="bad",
        retry_template="again {nums}>{target}:",
        system_prompt="sys",
        answer_fallback=True,
    )
    prompt = task.prompt(EX)
    assert prompt.messages == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "[3, 4, 2]>24:"},
    ]
    assert task.reflection_instruction(EX) == "bad"
    assert task.retry_instruction(EX) == "again [3, 4, 2]>24:"
    assert task.verify(EX, "3*4*2")


def test_registry_builds_countdown():
    task = tasks.get("countdown", counts=(3,), test_size=5)
    assert isinstance(task, CountdownTask) and task.name == "countdown"


# -------------------------------------------------------------------------------- loading
ROWS = [{"target": t, "nums": [t, 1, 1]} for t in range(1, 41)]
BAD_ROWS = [
    {"target": "24", "nums": [1, 2, 3]},
    {"target": True, "nums": [1, 2, 3]},
    {"target": 24, "nums": "1,2,3"},
    {"target": 24, "nums": [1, 2, "3"]},
    {"target": 24, "nums": [1, -2, 3]},
    {"target": 24, "nums": [1]},
    {"target": 24.5, "nums": [1, 2, 3]},
    {"nums": [1, 2, 3]},
    [1, 2, 3],
]


def _write_jsonl(path, rows, garbage_lines=()):
    lines = [json.dumps(row) for row in rows] + list(garbage_lines)
    random.Random(0).shuffle(lines)
    path.write_text("\n".join(lines) + "\n")


def test_load_jsonl_counts_malformed_rows(tmp_path, caplog):
    path = tmp_path / "cd.jsonl"
    _write_jsonl(path, ROWS + BAD_ROWS, garbage_lines=["{not json", '{"target": 3, "nums": [1,'])
    task = CountdownTask(test_size=10)
    with caplog.at_level(logging.WARNING):
        train = task.load("train", source=str(path))
    assert task.last_load_skipped == len(BAD_ROWS) + 2
    assert "skipped 11 malformed" in caplog.text
    test = task.load("test", source=str(path))
    assert len(train) == 30 and len(test) == 10
    assert {e["target"] for e in train}.isdisjoint({e["target"] for e in test})
    assert all(set(e) == {"target", "nums"} for e in train + test)


def test_integral_float_target_is_accepted(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text('{"target": 6.0, "nums": [1, 2, 3]}\n')
    (example,) = CountdownTask(test_size=0).load("train", source=str(path))
    assert example["target"] == 6 and type(example["target"]) is int


def test_held_out_split_is_deterministic_and_order_independent(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    b.write_text("".join(json.dumps(r) + "\n" for r in reversed(ROWS)))
    task = CountdownTask(test_size=8)
    test_a = task.load("test", source=str(a))
    test_b = task.load("test", source=str(b))
    assert sorted(e["target"] for e in test_a) == sorted(e["target"] for e in test_b)
    assert test_a == task.load("test", source=str(a))
    other = CountdownTask(test_size=8, split_seed=1).load("test", source=str(a))
    assert {e["target"] for e in other} != {e["target"] for e in test_a}
    fraction = CountdownTask(test_size=0.25).load("test", source=str(a))
    assert len(fraction) == 10


def test_duplicates_never_straddle_the_split(tmp_path):
    path = tmp_path / "dup.jsonl"
    rows = ROWS + [{"target": r["target"], "nums": list(reversed(r["nums"]))} for r in ROWS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = CountdownTask(test_size=5)
    train = task.load("train", source=str(path))
    test = task.load("test", source=str(path))
    assert len(test) == 10 and len(train) == 70
    assert {e["target"] for e in train}.isdisjoint({e["target"] for e in test})


def test_num_and_seed_subsample_within_the_split(tmp_path):
    path = tmp_path / "cd.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    task = CountdownTask(test_size=10)
    full = task.load("train", source=str(path))
    sample = task.load("train", source=str(path), num=5, seed=1)
    assert len(sample) == 5 and all(e in full for e in sample)
    assert sample == task.load("train", source=str(path), num=5, seed=1)
    assert sample != task.load("train", source=str(path), num=5, seed=2)


def test_load_parquet_and_json(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "cd.parquet"
    table = pa.table(
        {
            "target": [r["target"] for r in ROWS] + [None],
            "nums": [r["nums"] for r in ROWS] + [[1, 2]],
        }
    )
    pq.write_table(table, parquet)
    task = CountdownTask(test_size=4)
    rows = task.load("train", source=str(parquet)) + task.load("test", source=str(parquet))
    assert task.last_load_skipped == 1
    assert len(rows) == 40

    as_json = tmp_path / "cd.json"
    as_json.write_text(json.dumps(ROWS + [{"target": None}]))
    assert len(task.load("test", source=str(as_json))) == 4
    assert task.last_load_skipped == 1


def test_load_saved_dataset_directory(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    task = CountdownTask(test_size=4)
    assert len(task.load("train", source=str(tmp_path / "saved"))) == 36


def test_missing_local_file_and_bad_split():
    with pytest.raises(FileNotFoundError):
        TASK.load("train", source="./missing.jsonl")
    with pytest.raises(ValueError):
        TASK.load("validation")


def test_validation_split_is_held_out_of_training_and_test():
    kw = dict(counts=(2,), num_range=(1, 40), target_range=(1, 80), synthetic_test_fraction=0.3)
    plain = CountdownTask(**kw, synthetic_unique_test=True)
    with pytest.raises(ValueError, match="validation fraction"):
        plain.load("validation", num=10)
    task = CountdownTask(**kw, synthetic_unique_test=True, synthetic_validation_fraction=0.2)
    sets = lambda exs: {tuple(sorted(e["nums"])) for e in exs}
    val = task.load("validation", num=200)
    train = task.load("train", num=4000, seed=1)
    test = task.load("test", num=200)
    assert len({task.split_key(e) for e in val}) == 200  # distinct problems
    assert not sets(val) & sets(train) and not sets(val) & sets(test)
    # the test split does not depend on the validation bucket; training loses it
    assert test == plain.load("test", num=200)
    assert sets(val) & sets(plain.load("train", num=4000, seed=1))  # trained on without it
    assert all(reachable_targets(e["nums"]).get(e["target"]) for e in val)
    with pytest.raises(ValueError, match="synthetic_validation_fraction"):
        CountdownTask(**kw, synthetic_validation_fraction=0.7)


def test_problem_split_holds_out_problems_not_number_sets():
    kw = dict(counts=(2,), num_range=(1, 40), target_range=(1, 80), synthetic_test_fraction=0.3)
    task = CountdownTask(
        **kw,
        synthetic_unique_test=True,
        synthetic_validation_fraction=0.2,
        synthetic_split="problems",
    )
    val = task.load("validation", num=200)
    train = task.load("train", num=4000, seed=1)
    test = task.load("test", num=200)
    keys = lambda exs: {task.split_key(e) for e in exs}
    sets = lambda exs: {tuple(sorted(e["nums"])) for e in exs}
    assert len(keys(val)) == 200 and len(keys(test)) == 200
    assert not keys(val) & keys(train) and not keys(test) & keys(train)
    assert not keys(val) & keys(test)
    # a held-out problem's numbers do appear in training, with another target
    assert len(sets(test) & sets(train)) > 50
    assert all(reachable_targets(e["nums"]).get(e["target"]) for e in test)
    with pytest.raises(ValueError, match="synthetic_split"):
        CountdownTask(**kw, synthetic_split="targets")


def test_descending_numbers_are_the_same_problems_largest_first():
    kw = dict(counts=(2, 3), num_range=(1, 40), target_range=(1, 80), synthetic_test_fraction=0.3)
    plain, desc = CountdownTask(**kw), CountdownTask(**kw, synthetic_descending=True)
    for split in ("train", "test"):
        a, b = plain.load(split, num=100), desc.load(split, num=100)
        assert [plain.split_key(e) for e in a] == [desc.split_key(e) for e in b]
        assert all(e["nums"] == sorted(e["nums"], reverse=True) for e in b)
        assert all(reachable_targets(e["nums"]).get(e["target"]) for e in b)
