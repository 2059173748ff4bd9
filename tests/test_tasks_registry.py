"""The task registry, the shared Prompt/Task plumbing, sources and held-out splits."""

import json

import pytest

from reflax import tasks
from reflax.tasks import registry, sources, splits
from reflax.tasks.base import Prompt, Task


class _Echo(Task):
    """A minimal task: the answer is the example's text."""

    def __init__(self, *, test_size: int = 2, upper: bool = False) -> None:
        super().__init__(test_size=test_size)
        self.upper = upper

    def prompt(self, example: dict) -> Prompt:
        return Prompt(messages=[{"role": "user", "content": example["text"]}])

    def reflection_instruction(self, example: dict) -> str:
        return "wrong"

    def retry_instruction(self, example: dict) -> str:
        return example["text"]

    def verify(self, example: dict, completion: str) -> bool:
        return completion == (example["text"].upper() if self.upper else example["text"])

    def explain(self, example: dict, completion: str) -> str:
        return "correct" if self.verify(example, completion) else "mismatch"


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_builtin_tasks_are_registered():
    assert {"countdown", "function_calling"} <= set(tasks.names())
    assert tasks.names() == sorted(tasks.names())
    for name in ("countdown", "function_calling"):
        task = tasks.get(name)
        assert isinstance(task, Task) and task.name == name


def test_unknown_task_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown task 'nope'.*countdown.*function_calling"):
        tasks.get("nope")


def test_unknown_options_are_a_clear_error():
    with pytest.raises(tasks.TaskOptionError, match="unknown option.*bogus.*accepted.*counts"):
        tasks.get("countdown", bogus=1)
    with pytest.raises(TypeError):
        tasks.get("function_calling", counts=(3,))
    with pytest.raises(ValueError):
        tasks.get("function_calling", counts=(3,))


def test_register_a_task_in_one_place(clean_registry):
    tasks.register("echo")(_Echo)
    assert "echo" in tasks.names()
    task = tasks.get("echo", upper=True)
    assert task.name == "echo" and task.verify({"text": "hi"}, "HI")
    with pytest.raises(tasks.TaskOptionError, match="accepted options: test_size, upper"):
        tasks.get("echo", lower=True)


def test_register_rejects_clashes_and_non_tasks(clean_registry):
    with pytest.raises(ValueError, match="already registered"):
        tasks.register("countdown")(_Echo)
    with pytest.raises(TypeError):
        tasks.register("thing")(dict)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        tasks.register("")


def test_inline_tools_without_tools_is_the_messages():
    messages = [{"role": "user", "content": "hi"}]
    prompt = Prompt(messages=messages)
    assert prompt.inline_tools() == messages
    assert prompt.inline_tools() is not messages  # a copy: callers may append turns


def test_inline_tools_format():
    tool = {"type": "function", "function": {"name": "f", "description": "", "parameters": {}}}
    prompt = Prompt(messages=[{"role": "user", "content": "hi"}], tools=[tool])
    system, user = prompt.inline_tools()
    assert user == {"role": "user", "content": "hi"}
    assert system["role"] == "system"
    assert system["content"].startswith("# Tools\n")
    assert json.dumps(tool) in system["content"]
    assert "<tool_call>" in system["content"] and "JSON list of calls" in system["content"]
    assert prompt.messages == [{"role": "user", "content": "hi"}]  # not mutated


def test_base_load_validates_arguments(tmp_path):
    task = _Echo()
    with pytest.raises(ValueError, match="split"):
        task.load("dev", source="x.jsonl")
    with pytest.raises(ValueError, match="no procedural generator"):
        task.load("train")
    with pytest.raises(ValueError):
        task.load("train", source="x.jsonl", num=-1)
    with pytest.raises(ValueError):
        _Echo(test_size=-1)
    with pytest.raises(ValueError):
        Task.__init__(task, test_size=1.5)


def test_base_load_counts_non_dict_rows(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"}\n[1]\n"s"\n{bad\n\n')
    task = _Echo(test_size=1)
    train = task.load("train", source=str(path))
    assert task.last_load_skipped == 3
    test = task.load("test", source=str(path))
    assert len(train) == 2 and len(test) == 1


def test_sources_dispatch(tmp_path):
    with pytest.raises(FileNotFoundError):
        sources.read_rows(str(tmp_path / "missing.parquet"))
    with pytest.raises(FileNotFoundError):
        sources.read_rows("./nope/data")
    other = tmp_path / "data.csv"
    other.write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported"):
        sources.read_rows(str(other))
    single = tmp_path / "one.json"
    single.write_text('{"text": "a"}')
    assert sources.read_rows(str(single)) == ([{"text": "a"}], 0)
    lines = tmp_path / "lines.json"
    lines.write_text('{"text": "a"}\n{"text": "b"}\nnot json\n')
    assert sources.read_rows(str(lines)) == ([{"text": "a"}, {"text": "b"}], 1)


def test_held_out_split_properties():
    items = list(range(100)) + list(range(50))  # keys 0..49 duplicated
    train, test = splits.held_out_split(items, key=lambda x: x, test_size=10, salt="s")
    assert set(train).isdisjoint(test)
    assert len(set(test)) == 10 and len(train) + len(test) == 150
    again = splits.held_out_split(list(reversed(items)), key=lambda x: x, test_size=10, salt="s")
    assert sorted(again[1]) == sorted(test)
    other = splits.held_out_split(items, key=lambda x: x, test_size=10, salt="t")
    assert set(other[1]) != set(test)
    _, fraction = splits.held_out_split(items, key=lambda x: x, test_size=0.2, salt="s")
    assert len(set(fraction)) == 20
    _, everything = splits.held_out_split(items, key=lambda x: x, test_size=1000, salt="s")
    assert len(everything) == 150


def test_in_test_bucket_fraction():
    held = sum(splits.in_test_bucket(i, fraction=0.1, salt="s") for i in range(20_000))
    assert 1_700 < held < 2_300
    assert splits.in_test_bucket(7, fraction=0.1, salt="s") == splits.in_test_bucket(
        7, fraction=0.1, salt="s"
    )
