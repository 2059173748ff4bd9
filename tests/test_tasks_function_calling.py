"""Function calling: parsing, every matching rule, tool schemas, synthetic data, loading."""

import json
import logging
import random
import string
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reflax import tasks
from reflax.tasks import function_calling as fc
from reflax.tasks import xlam_synthetic
from reflax.tasks.function_calling import FunctionCallingTask, parse_tool_calls
from reflax.tasks.xlam_schema import xlam_param_schema, xlam_tool_to_schema

TASK = FunctionCallingTask()
SAMPLE = Path(fc.__file__).parent / "data" / "xlam_synthetic_sample.jsonl"

TOOLS = [
    {
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": {
            "city": {"description": "City name.", "type": "str"},
            "units": {"description": "Units.", "type": "str, optional", "default": "metric"},
        },
    },
    {
        "name": "sum_numbers",
        "description": "Add numbers.",
        "parameters": {"numbers": {"description": "Numbers.", "type": "List[int]"}},
    },
]


def example(answers: list[dict], query: str = "q") -> dict:
    return {"id": 0, "query": query, "tools": json.dumps(TOOLS), "answers": json.dumps(answers)}


W_PARIS = {"name": "get_weather", "arguments": {"city": "Paris"}}
W_ROME = {"name": "get_weather", "arguments": {"city": "Rome"}}
SUM = {"name": "sum_numbers", "arguments": {"numbers": [1, 2, 3]}}


def tagged(*calls: dict) -> str:
    return "".join(f"<tool_call>\n{json.dumps(call)}\n</tool_call>\n" for call in calls)


def passes(gold: list[dict], completion: str) -> bool:
    return TASK.verify(example(gold), completion)


# ------------------------------------------------------------------------------- parsing
def test_parse_qwen_style_one_block_per_call():
    text = tagged(W_PARIS, SUM)
    assert parse_tool_calls(text) == [W_PARIS, SUM]


def test_parse_list_in_one_block_and_bare_json():
    assert parse_tool_calls(f"<tool_call>{json.dumps([W_PARIS, SUM])}</tool_call>") == [
        W_PARIS,
        SUM,
    ]
    assert parse_tool_calls(json.dumps([W_PARIS, SUM])) == [W_PARIS, SUM]
    assert parse_tool_calls(json.dumps(W_PARIS)) == [W_PARIS]


def test_parse_tolerates_surrounding_text_and_fences():
    text = f"Sure! I'll call these:\n```json\n{json.dumps([W_PARIS])}\n```\nDone."
    assert parse_tool_calls(text) == [W_PARIS]
    fenced = f"<tool_call>```json\n{json.dumps(W_PARIS)}\n```</tool_call>"
    assert parse_tool_calls(fenced) == [W_PARIS]
    prose = 'A {"note": 1} then [1, 2] then ' + json.dumps(W_PARIS)
    assert parse_tool_calls(prose) == [W_PARIS]
    assert parse_tool_calls("I think {the answer} is " + json.dumps([SUM])) == [SUM]


def test_parse_arguments_as_string_parameters_key_and_wrappers():
    as_string = {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}
    assert parse_tool_calls(json.dumps(as_string)) == [W_PARIS]
    as_parameters = {"name": "get_weather", "parameters": {"city": "Paris"}}
    assert parse_tool_calls(json.dumps(as_parameters)) == [W_PARIS]
    openai = {"type": "function", "function": as_string}
    assert parse_tool_calls(json.dumps([openai])) == [W_PARIS]
    assert parse_tool_calls(json.dumps({"tool_calls": [openai]})) == [W_PARIS]
    no_args = {"name": "ping"}
    assert parse_tool_calls(json.dumps(no_args)) == [{"name": "ping", "arguments": {}}]


def test_parse_unclosed_last_block():
    text = tagged(W_PARIS) + "<tool_call>" + json.dumps(SUM)
    assert parse_tool_calls(text) == [W_PARIS, SUM]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "no calls here",
        "<tool_call>not json</tool_call>",
        tagged(W_PARIS) + "<tool_call>{broken</tool_call>",
        "<tool_call>" + json.dumps(W_PARIS) + " trailing</tool_call>",
        '{"name": 3, "arguments": {}}',
        '{"name": "f", "arguments": [1]}',
        '{"name": "f", "arguments": "{not json"}',
        '{"name": "f", "arguments": "[1]"}',
        '[{"name": "f", "arguments": {}}, 7]',
        '<tool_call>{"name": "", "arguments": {}}</tool_call>',
    ],
)
def test_parse_rejects_malformed_calls(text):
    assert parse_tool_calls(text) is None


def test_broken_call_list_is_not_partly_salvaged():
    broken = json.dumps([W_PARIS, SUM])[:-5]  # truncated inside the second call
    assert parse_tool_calls(broken) is None
    missing_comma = json.dumps(W_PARIS) + " " + json.dumps(SUM)
    assert parse_tool_calls(missing_comma) == [W_PARIS, SUM]  # two separate values are fine
    glued = "[" + json.dumps(W_PARIS) + " " + json.dumps(SUM) + "]"
    assert parse_tool_calls(glued) is None


def test_explicit_empty_list_is_no_calls():
    assert parse_tool_calls("[]") == []
    assert passes([], "[]")
    assert not passes([W_PARIS], "[]")


# ------------------------------------------------------------------------------ matching
def test_correct_calls_pass():
    assert passes([W_PARIS], tagged(W_PARIS))
    assert TASK.explain(example([W_PARIS]), tagged(W_PARIS)) == "correct"


def test_call_order_is_irrelevant():
    assert passes([W_PARIS, SUM], tagged(SUM, W_PARIS))
    assert passes([W_PARIS, SUM], json.dumps([SUM, W_PARIS]))


def test_extra_call_fails():
    assert not passes([W_PARIS], tagged(W_PARIS, SUM))
    assert "unexpected call sum_numbers" in TASK.explain(example([W_PARIS]), tagged(W_PARIS, SUM))


def test_missing_call_fails():
    assert not passes([W_PARIS, SUM], tagged(W_PARIS))
    assert "missing call sum_numbers" in TASK.explain(example([W_PARIS, SUM]), tagged(W_PARIS))


def test_same_call_twice_must_match_twice():
    assert passes([W_PARIS, W_PARIS], tagged(W_PARIS, W_PARIS))
    assert not passes([W_PARIS, W_PARIS], tagged(W_PARIS))
    assert not passes([W_PARIS], tagged(W_PARIS, W_PARIS))
    assert not passes([W_PARIS, W_PARIS], tagged(W_PARIS, W_ROME))
    assert passes([W_PARIS, W_ROME], tagged(W_ROME, W_PARIS))


def test_names_are_exact():
    wrong = {"name": "Get_Weather", "arguments": {"city": "Paris"}}
    assert not passes([W_PARIS], tagged(wrong))


def test_missing_and_extra_arguments_fail():
    gold = {"name": "get_weather", "arguments": {"city": "Paris", "units": "imperial"}}
    assert not passes([gold], tagged(W_PARIS))
    assert "missing argument(s) units" in TASK.explain(example([gold]), tagged(W_PARIS))
    assert not passes([W_PARIS], tagged(gold))
    assert "unexpected argument(s) units" in TASK.explain(example([W_PARIS]), tagged(gold))


def test_defaults_are_not_filled_in():
    # Gold states the default explicitly: omitting it fails.
    explicit = {"name": "get_weather", "arguments": {"city": "Paris", "units": "metric"}}
    assert not passes([explicit], tagged(W_PARIS))
    # Gold omits the argument: giving its default value fails too.
    assert not passes([W_PARIS], tagged(explicit))


def _one(value) -> dict:
    return {"name": "f", "arguments": {"x": value}}


@pytest.mark.parametrize(
    ("gold", "predicted", "equal"),
    [
        (1, 1, True),
        (1, 1.0, True),
        (1.0, 1, True),
        (100, 1e2, True),
        (0.5, 0.50, True),
        (1, "1", False),
        ("1", 1, False),
        (True, 1, False),
        (1, True, False),
        (False, 0, False),
        (True, True, True),
        (None, None, True),
        (None, "null", False),
        (None, 0, False),
        ("Paris", "paris", False),
        ("Paris", "Paris ", False),
        ([1, 2], [1, 2], True),
        ([1, 2], [2, 1], False),
        ([1, 2], [1, 2, 2], False),
        ([1, [2, {"a": 1}]], [1.0, [2, {"a": 1.0}]], True),
        ({"a": 1, "b": [1, 2]}, {"b": [1, 2], "a": 1}, True),
        ({"a": {"b": {"c": True}}}, {"a": {"b": {"c": 1}}}, False),
        ({"a": 1}, {"a": 1, "b": None}, False),
        ({}, [], False),
        (1.5, 1.5000000000000002, False),
    ],
)
def test_argument_value_normalisation(gold, predicted, equal):
    assert passes([_one(gold)], tagged(_one(predicted))) is equal


def test_value_difference_is_explained():
    text = TASK.explain(example([_one(1)]), tagged(_one("1")))
    assert text == 'call f: x is "1", expected 1'


def test_nested_arguments_round_trip():
    nested = {
        "name": "place_order",
        "arguments": {
            "items": [{"sku": "A-1", "quantity": 2}, {"sku": "B-2", "quantity": 1}],
            "options": {"gift": True, "notes": None, "tags": ["x", "y"]},
        },
    }
    reordered = {
        "name": "place_order",
        "arguments": {
            "options": {"tags": ["x", "y"], "notes": None, "gift": True},
            "items": [{"quantity": 2, "sku": "A-1"}, {"quantity": 1.0, "sku": "B-2"}],
        },
    }
    assert passes([nested], tagged(reordered))
    swapped = json.loads(json.dumps(nested))
    swapped["arguments"]["items"].reverse()
    assert not passes([nested], tagged(swapped))


def test_malformed_example_and_non_string_completion_are_false():
    assert not TASK.verify({"query": "q"}, tagged(W_PARIS))
    assert not TASK.verify({**example([W_PARIS]), "answers": "[NaN"}, tagged(W_PARIS))
    assert not TASK.verify(example([W_PARIS]), None)  # type: ignore[arg-type]
    assert "malformed" in TASK.explain({"query": "q"}, "x")
    assert TASK.explain(example([W_PARIS]), "nothing").startswith("could not parse")


def test_gold_answers_may_be_decoded_lists():
    assert TASK.verify({**example([W_PARIS]), "answers": [W_PARIS]}, tagged(W_PARIS))


# ------------------------------------------------------------------------------- hostile
DEEP = 100_000
HOSTILE = [
    "[" * DEEP + "]" * DEEP,
    "[" * DEEP,
    '{"a":' * DEEP + "1" + "}" * DEEP,
    "[" * 5_000 + "]" * 5_000,
    "[" * 1_000 + "]" * 1_000,
    "[[[[" * 900 + "]]]]" * 900,
    '{"name": "f", "arguments": ' + "[" * 3_000 + "]" * 3_000 + "}",
    '{"name": "f", "arguments": "' + "[" * 3_000 + "]" * 3_000 + '"}',
    "x" * 1_000_000,
    "<tool_call>" * 200_000,
    "<tool_call>" + "[" * 10_000,
    '{"name": "f", "arguments": {"x": NaN}}',
    '{"name": "f", "arguments": {"x": Infinity}}',
    '{"name": "f", "arguments": {"x": -Infinity}}',
    '{"name": "f", "arguments": {"x": 1e309}}',
    '{"name": "f", "arguments": {"x": ' + "9" * 5_000 + "}}",
    "9**9**9",
    "**",
    "(" * DEEP,
    "٣",
    "__import__('os').system('echo hi')",
    "lambda: 1",
    "().__class__.__base__.__subclasses__()",
    "{" * 3_000,
    '{"' * 3_000,
    "[{" * 2_000,
    '["\\ud800"]',
    "\x00" * 1_000,
    "[1" + ", 1" * 10_000 + "]",
]


def _best_of(fn, repeats: int = 3) -> float:
    # Best of a few runs: this machine is shared, and one descheduling is not slowness.
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("hostile", HOSTILE, ids=lambda h: repr(h[:12]))
def test_hostile_inputs_fail_fast_and_never_raise(hostile):
    gold = example([W_PARIS])
    for completion in (hostile, f"<tool_call>{hostile}</tool_call>", f"text {hostile} text"):
        assert TASK.verify(gold, completion) is False  # warm-up
        assert isinstance(TASK.explain(gold, completion), str)
        assert parse_tool_calls(completion) in (None, [])
        elapsed = _best_of(lambda c=completion: TASK.verify(gold, c))
        assert elapsed < 0.010, (completion[:40], elapsed)


def test_limits_are_enforced():
    deep_args = {"name": "f", "arguments": {"x": json.loads("[" * 40 + "]" * 40)}}
    assert parse_tool_calls(json.dumps(deep_args)) is None
    ok_args = {"name": "f", "arguments": {"x": json.loads("[" * 20 + "]" * 20)}}
    assert parse_tool_calls(json.dumps(ok_args)) == [ok_args]
    too_many = json.dumps([{"name": "f", "arguments": {}}] * (fc.MAX_CALLS + 1))
    assert parse_tool_calls(too_many) is None
    long_text = json.dumps(W_PARIS) + " " * fc.MAX_COMPLETION_CHARS
    assert parse_tool_calls(long_text) is None


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet='[]{}":,0123456789.eE-+ truefalsnu<>/tool_cal\\', max_size=120))
def test_fuzzed_completions_never_raise(text):
    gold = example([W_PARIS])
    assert isinstance(TASK.verify(gold, text), bool)
    assert isinstance(TASK.explain(gold, text), str)


# ---------------------------------------------------------------- properties on records
def _render(calls: list[dict], style: int, rng: random.Random) -> str:
    calls = list(calls)
    rng.shuffle(calls)
    if style == 0:
        return tagged(*calls)
    if style == 1:
        return f"<tool_call>{json.dumps(calls)}</tool_call>"
    if style == 2:
        return "Here you go: " + json.dumps(calls, indent=2)
    with_strings = [{"name": c["name"], "arguments": json.dumps(c["arguments"])} for c in calls]
    return json.dumps(with_strings)


def _mutate_value(value, rng: random.Random):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return [*value, 0]
    if isinstance(value, dict):
        return {**value, "extra_key": 1}
    return 0


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), style=st.integers(0, 3), mutation=st.integers(0, 4))
def test_property_gold_verifies_and_mutations_fail(seed, style, mutation):
    record = xlam_synthetic.generate_records(1, seed=seed)[0]
    gold = json.loads(record["answers"])
    rng = random.Random(seed)
    assert TASK.verify(record, _render(gold, style, rng))
    mutated = json.loads(record["answers"])
    call = rng.choice(mutated)
    if mutation == 0 and call["arguments"]:
        key = rng.choice(sorted(call["arguments"]))
        call["arguments"][key] = _mutate_value(call["arguments"][key], rng)
    elif mutation == 1 and call["arguments"]:
        del call["arguments"][rng.choice(sorted(call["arguments"]))]
    elif mutation == 2:
        call["arguments"]["unexpected"] = "value"
    elif mutation == 3:
        mutated.remove(call)
    else:
        mutated.append(call)
    assert not TASK.verify(record, _render(mutated, style, rng))


# ------------------------------------------------------------------------- tool schemas
@pytest.mark.parametrize(
    ("type_text", "schema", "optional"),
    [
        ("str", {"type": "string"}, False),
        ("int", {"type": "integer"}, False),
        ("float", {"type": "number"}, False),
        ("bool", {"type": "boolean"}, False),
        ("str, optional", {"type": "string"}, True),
        ("float, optional", {"type": "number"}, True),
        ("int, optional, default=5", {"type": "integer"}, True),
        ("Optional[int]", {"type": "integer"}, True),
        ("List[int]", {"type": "array", "items": {"type": "integer"}}, False),
        ("list", {"type": "array"}, False),
        ("List", {"type": "array"}, False),
        ("List[str], optional", {"type": "array", "items": {"type": "string"}}, True),
        (
            "List[List[int]]",
            {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
            False,
        ),
        ("List[Union[int, float]]", {"type": "array", "items": {"type": "number"}}, False),
        ("Tuple[float, float]", {"type": "array", "items": {"type": "number"}}, False),
        ("Dict", {"type": "object"}, False),
        ("Dict[str, Any]", {"type": "object"}, False),
        ("dict, optional", {"type": "object"}, True),
        ("typing.List[str]", {"type": "array", "items": {"type": "string"}}, False),
        ("Union[str, int]", {"type": ["string", "integer"]}, False),
        ("int or float", {"type": "number"}, False),
        ("str or None", {"type": "string"}, True),
        ("Union[str, None]", {"type": "string"}, True),
        ("Callable", {}, False),
        ("", {}, False),
        (None, {}, False),
    ],
)
def test_xlam_type_mapping(type_text, schema, optional):
    assert xlam_param_schema(type_text) == (schema, optional)


def test_tool_conversion_required_defaults_and_unknown_types():
    tool = {
        "name": "t",
        "description": "d",
        "parameters": {
            "a": {"description": "A.", "type": "str"},
            "b": {"description": "B.", "type": "int", "default": 3},
            "c": {"description": "C.", "type": "float, optional"},
            "d": {"description": "D.", "type": "Callable"},
            "e": {"description": "E.", "type": "str", "default": ""},
        },
    }
    converted = xlam_tool_to_schema(tool)
    assert converted["type"] == "function"
    function = converted["function"]
    assert function["name"] == "t" and function["description"] == "d"
    parameters = function["parameters"]
    assert parameters["type"] == "object"
    assert parameters["required"] == ["a", "d"]
    assert parameters["properties"]["a"] == {"type": "string", "description": "A."}
    assert parameters["properties"]["b"] == {"type": "integer", "description": "B.", "default": 3}
    assert parameters["properties"]["c"] == {"type": "number", "description": "C."}
    assert parameters["properties"]["d"] == {"description": "D. (type: Callable)"}
    assert parameters["properties"]["e"]["default"] == ""
    bare = xlam_tool_to_schema({"name": "ping"})
    assert bare["function"]["parameters"] == {"type": "object", "properties": {}, "required": []}


def test_prompt_and_inline_tools():
    ex = example([W_PARIS], query="Weather in Paris?")
    prompt = TASK.prompt(ex)
    assert prompt.messages == [{"role": "user", "content": "Weather in Paris?"}]
    assert [t["function"]["name"] for t in prompt.tools] == ["get_weather", "sum_numbers"]
    inline = prompt.inline_tools()
    assert inline[0]["role"] == "system" and inline[1:] == prompt.messages
    system = inline[0]["content"]
    for tool in prompt.tools:
        assert json.dumps(tool, ensure_ascii=False) in system
    assert "<tool_call>" in system and "JSON list" in system
    with_system = FunctionCallingTask(system_prompt="Be precise.").prompt(ex)
    assert with_system.messages[0] == {"role": "system", "content": "Be precise."}
    merged = with_system.inline_tools()
    assert len(merged) == 2 and merged[0]["content"].startswith("Be precise.\n\n# Tools")


def test_reflection_and_retry_turns():
    ex = example([W_PARIS], query="Weather in Paris?")
    reflection = TASK.reflection_instruction(ex)
    assert "failed" in reflection and "explanation" in reflection
    assert "Weather in Paris?" in TASK.retry_instruction(ex)
    custom = FunctionCallingTask(retry_template="Again: {query}", reflection_template="Why?")
    assert custom.retry_instruction(ex) == "Again: Weather in Paris?"
    assert custom.reflection_instruction(ex) == "Why?"
    with pytest.raises(ValueError):
        FunctionCallingTask(retry_template="{question}")


def test_registry_builds_function_calling():
    task = tasks.get("function_calling", test_size=3)
    assert isinstance(task, FunctionCallingTask) and task.name == "function_calling"


# ------------------------------------------------------------------------ synthetic data
def test_generator_reproduces_the_committed_sample():
    records = xlam_synthetic.generate_records(200, seed=0)
    assert xlam_synthetic.to_jsonl(records) == SAMPLE.read_text(encoding="utf-8")


def test_catalogue_is_the_data_file_and_its_templates_name_every_argument():
    data = json.loads(xlam_synthetic.CATALOGUE_FILE.read_text(encoding="utf-8"))
    tools = xlam_synthetic.catalogue()
    assert [t.name for t in tools] == [t["name"] for t in data["tools"]]
    for tool in tools:
        assert tool.xlam()["parameters"].keys() == {p.name for p in tool.params}
        required = {p.name for p in tool.params if not p.optional}
        for template in tool.templates:
            named = {f for _, f, _, _ in string.Formatter().parse(template) if f}
            assert named == required | {"opts"}, (tool.name, template)
        for param in tool.params:  # every optional argument can be said in a query
            assert not param.optional or param.phrase is not None, (tool.name, param.name)
    with pytest.raises(ValueError, match="unknown sampler"):
        xlam_synthetic._sampler({"gauss": [0, 1]}, data["values"])


def test_sample_loads_cleanly_and_every_gold_verifies():
    task = FunctionCallingTask(test_size=20)
    train = task.load("train", source=str(SAMPLE))
    assert task.last_load_skipped == 0
    test = task.load("test", source=str(SAMPLE))
    assert len(test) >= 20 and len(train) + len(test) == 200
    assert {r["query"] for r in train}.isdisjoint({r["query"] for r in test})
    for record in train + test:
        assert set(record) == {"id", "query", "tools", "answers"}
        assert isinstance(record["tools"], str) and isinstance(record["answers"], str)
        assert task.verify(record, json.dumps(json.loads(record["answers"])))


def test_synthetic_records_cover_the_schema():
    records = xlam_synthetic.generate_records(300, seed=1)
    types, defaults, calls_per_record, values = set(), 0, set(), set()
    for record in records:
        tools = json.loads(record["tools"])
        answers = json.loads(record["answers"])
        calls_per_record.add(len(answers))
        names = {tool["name"] for tool in tools}
        for tool in tools:
            for spec in tool["parameters"].values():
                types.add(spec["type"])
                defaults += "default" in spec
        for call in answers:
            assert call["name"] in names
            values.update(type(v).__name__ for v in call["arguments"].values())
            assert set(call["arguments"]) <= set(
                next(t for t in tools if t["name"] == call["name"])["parameters"]
            )
    assert {"str", "int", "float", "bool", "List[int]", "List[str]", "Dict"} <= types
    assert any("optional" in t for t in types) and defaults > 0
    assert {1, 2, 3} <= calls_per_record
    assert {"str", "int", "float", "bool", "list", "dict"} <= values
    assert len({r["query"] for r in records}) > 250


def test_synthetic_load_is_split_disjoint_and_deterministic():
    task = FunctionCallingTask(synthetic_size=40)
    train = task.load("train", seed=0)
    test = task.load("test", seed=0)
    assert len(train) == 40 and len(test) == 40
    assert {r["query"] for r in train}.isdisjoint({r["query"] for r in test})
    assert task.load("test", seed=0) == test
    assert task.load("train", num=5, seed=1) != train[:5]


def test_generator_cli_writes_the_sample_format(tmp_path):
    out = tmp_path / "s.jsonl"
    xlam_synthetic.main(["--num", "3", "--seed", "0", "--out", str(out)])
    assert out.read_text().splitlines() == SAMPLE.read_text().splitlines()[:3]


# -------------------------------------------------------------------------------- loading
def _rows(n: int) -> list[dict]:
    return [example([_one(i)], query=f"query number {i}") | {"id": i} for i in range(n)]


BAD_ROWS = [
    {"id": 100, "query": "", "tools": json.dumps(TOOLS), "answers": "[]"},
    {"id": 101, "query": "q101", "tools": "not json", "answers": "[]"},
    {"id": 102, "query": "q102", "tools": json.dumps(TOOLS), "answers": "{broken"},
    {
        "id": 103,
        "query": "q103",
        "tools": json.dumps(TOOLS),
        "answers": '[{"name": "f", "arguments": {"x": NaN}}]',
    },
    {"id": 104, "query": "q104", "tools": json.dumps(TOOLS), "answers": '[{"arguments": {}}]'},
    {"id": 105, "query": "q105", "tools": json.dumps(TOOLS), "answers": '{"name": "f"}'},
    {"id": 106, "query": "q106", "tools": "[]", "answers": "[]"},
    {
        "id": 107,
        "query": "q107",
        "tools": json.dumps([{"description": "no name"}]),
        "answers": "[]",
    },
    {"id": 108, "query": "q108", "answers": "[]"},
    {"id": 109, "query": 5, "tools": json.dumps(TOOLS), "answers": "[]"},
]


def test_load_jsonl_counts_malformed_rows(tmp_path, caplog):
    path = tmp_path / "x.jsonl"
    lines = [json.dumps(r) for r in _rows(30) + BAD_ROWS] + ["{oops", "[1, 2"]
    random.Random(0).shuffle(lines)
    path.write_text("\n".join(lines) + "\n")
    task = FunctionCallingTask(test_size=6)
    with caplog.at_level(logging.WARNING):
        train = task.load("train", source=str(path))
    assert task.last_load_skipped == len(BAD_ROWS) + 2
    assert f"skipped {len(BAD_ROWS) + 2} malformed" in caplog.text
    test = task.load("test", source=str(path))
    assert len(train) == 24 and len(test) == 6
    assert {r["id"] for r in train}.isdisjoint({r["id"] for r in test})
    assert test == task.load("test", source=str(path))
    for record in train + test:
        assert task.verify(record, tagged(*json.loads(record["answers"])))


def test_load_parquet_and_split_determinism(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows(25) + [BAD_ROWS[1], BAD_ROWS[3]]
    columns = {key: [row.get(key) for row in rows] for key in ("id", "query", "tools", "answers")}
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table(columns), path)
    reversed_path = tmp_path / "r.parquet"
    pq.write_table(pa.table({k: v[::-1] for k, v in columns.items()}), reversed_path)
    task = FunctionCallingTask(test_size=5)
    test = task.load("test", source=str(path))
    assert task.last_load_skipped == 2
    assert {r["id"] for r in test} == {
        r["id"] for r in task.load("test", source=str(reversed_path))
    }
    train = task.load("train", source=str(path))
    assert len(train) == 20 and {r["id"] for r in train}.isdisjoint({r["id"] for r in test})


def test_duplicate_queries_stay_on_one_side(tmp_path):
    rows = _rows(20)
    duplicates = [dict(row, id=row["id"] + 1000) for row in rows]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + duplicates))
    task = FunctionCallingTask(test_size=4)
    train = task.load("train", source=str(path))
    test = task.load("test", source=str(path))
    assert len(test) == 8 and len(train) == 32
    assert {r["query"] for r in train}.isdisjoint({r["query"] for r in test})
