"""Seeded synthetic function-calling records in exactly the xLAM function-calling-60k schema.

Each record is ``{"id": int, "query": str, "tools": <JSON string>, "answers": <JSON string>}``
with xLAM's free-form parameter types (``"str"``, ``"int, optional"``, ``"List[int]"``,
``"Dict[str, Any]"``...) and ``default`` keys, so the whole function-calling pipeline runs
offline. The tool catalogue is data, ``reflax/tasks/data/xlam_tools.json``: named value
lists (``values``) and tools, each with its parameters (xLAM type text, description, a
value sampler, optional ``default``, how a value reads in a query) and its query templates
(see ``_sampler`` and ``_param`` for the forms). It spans weather, finance, maths, text,
shopping, maps, sports, media, calendar, health, cooking, social, units, dates, web,
settings and news tools; arguments cover str/int/float/bool/list/dict values, nested lists
and objects, and optional parameters (with and without defaults) that are included in
roughly 40% of calls.

A query asks for one to three calls (sometimes the same tool twice, as in xLAM's parallel
calls); each call's sentence comes from a per-tool template that states every argument value
literally, so the gold answer is recoverable from the query. The tool list holds the called
tools plus up to three distractors, shuffled.

``python -m reflax.tasks.xlam_synthetic --num 200 --seed 0 --out FILE`` writes JSON lines;
``reflax/tasks/data/xlam_synthetic_sample.jsonl`` is exactly that output for 200 records, seed 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

Sampler = Callable[[random.Random], Any]
_NO_DEFAULT = object()


@dataclasses.dataclass(frozen=True)
class Param:
    """One tool parameter: xLAM type text, a value sampler and how a value reads in a query."""

    name: str
    type: str
    description: str
    sample: Sampler
    default: Any = _NO_DEFAULT
    # For optional parameters: the phrase added to the query when the argument is given.
    phrase: Callable[[Any], str] | None = None
    # How a required argument's value is written into the query template.
    show: Callable[[Any], str] | None = None

    @property
    def optional(self) -> bool:
        return self.default is not _NO_DEFAULT or "optional" in self.type.lower()


@dataclasses.dataclass(frozen=True)
class ToolSpec:
    """A tool and the query templates that ask for a call to it.

    Templates name every required parameter as ``{param}`` and end with ``{opts}``, where the
    phrases of the optional arguments that were included go.
    """

    name: str
    description: str
    params: tuple[Param, ...]
    templates: tuple[str, ...]

    def xlam(self) -> dict:
        """The tool in xLAM form."""
        parameters = {}
        for param in self.params:
            spec: dict[str, Any] = {"description": param.description, "type": param.type}
            if param.default is not _NO_DEFAULT:
                spec["default"] = param.default
            parameters[param.name] = spec
        return {"name": self.name, "description": self.description, "parameters": parameters}


# ------------------------------------------------------------------------------ catalogue
CATALOGUE_FILE = Path(__file__).parent / "data" / "xlam_tools.json"


def _bool(rng: random.Random) -> bool:
    return rng.random() < 0.5


def _numbers(rng: random.Random, values: dict) -> list:
    return [
        rng.randint(0, 50) if rng.random() < 0.5 else round(rng.uniform(0, 50), 1)
        for _ in range(rng.randint(3, 7))
    ]


def _order_items(rng: random.Random, values: dict) -> list[dict]:
    return [
        {"sku": f"SKU-{rng.randint(1000, 9999)}", "quantity": rng.randint(1, 5)}
        for _ in range(rng.randint(1, 3))
    ]


def _filters(rng: random.Random, values: dict) -> dict:
    candidates = {
        "max_price": round(rng.uniform(10, 500), 2),
        "brand": rng.choice(values["brands"]),
        "in_stock": _bool(rng),
        "min_rating": rng.randint(1, 5),
    }
    keys = rng.sample(sorted(candidates), rng.randint(1, 3))
    return {key: candidates[key] for key in sorted(keys)}


def _settings(rng: random.Random, values: dict) -> dict:
    settings: dict[str, Any] = {"theme": rng.choice(["dark", "light", "system"])}
    if rng.random() < 0.7:
        settings["notifications"] = {"email": _bool(rng), "sms": _bool(rng)}
    if rng.random() < 0.5:
        settings["language"] = rng.choice(["en", "fr", "es", "de", "ja"])
    if rng.random() < 0.3:
        settings["favorite_tags"] = rng.sample(["news", "sports", "tech", "food", "travel"], 2)
    return settings


# Structured values a catalogue entry names as its `sample` (`values` are its value lists).
_NAMED_SAMPLERS: dict[str, Callable[[random.Random, dict], Any]] = {
    "bool": lambda rng, values: _bool(rng),
    "date": lambda rng, values: f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
    "sentence": lambda rng, values: " ".join(
        rng.choice(values["words"]) for _ in range(rng.randint(4, 9))
    ),
    "numbers": _numbers,
    "int_list": lambda rng, values: [rng.randint(-20, 99) for _ in range(rng.randint(3, 8))],
    "emails": lambda rng, values: [
        f"{name}@example.com" for name in rng.sample(values["names"], rng.randint(1, 3))
    ],
    "order_items": _order_items,
    "filters": _filters,
    "settings": _settings,
}


def _sampler(spec: Any, values: dict) -> Sampler:
    """A value sampler from its catalogue form: a name of `_NAMED_SAMPLERS`, or one of
    {"pick": list or value-list name}, {"int": [lo, hi]}, {"float": [lo, hi, digits?]},
    {"matrix": [rows, cols]}, {"sample": value-list name, "count": [lo, hi]} (distinct
    items), {"format": str, "of": [spec, ...]} (the specs' values in its `{}`s)."""
    if isinstance(spec, str):
        named = _NAMED_SAMPLERS[spec]
        return lambda rng: named(rng, values)
    (kind,) = set(spec) - {"count", "of"}
    arg = spec[kind]
    if kind == "pick":
        options = values[arg] if isinstance(arg, str) else arg
        return lambda rng: rng.choice(options)
    if kind == "int":
        return lambda rng: rng.randint(*arg)
    if kind == "float":
        lo, hi, digits = (*arg, 2)[:3]
        return lambda rng: round(rng.uniform(lo, hi), digits)
    if kind == "matrix":
        rows, cols = arg
        return lambda rng: [[rng.randint(-9, 9) for _ in range(cols)] for _ in range(rows)]
    if kind == "sample":
        options, (lo, hi) = values[arg], spec["count"]
        return lambda rng: rng.sample(options, rng.randint(lo, hi))
    if kind == "format":
        parts = [_sampler(part, values) for part in spec["of"]]
        return lambda rng: arg.format(*[part(rng) for part in parts])
    raise ValueError(f"unknown sampler {spec!r} in {CATALOGUE_FILE.name}")


# ---------------------------------------------------------------------- query rendering
def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _and_list(values: list) -> str:
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _show(value: Any) -> str:
    if isinstance(value, list | dict):
        return _json(value)
    return str(value)


_SHOW = {"quoted": lambda value: f"'{value}'", "and_list": _and_list}


def _by_truth(words: dict) -> Callable[[Any], str]:
    return lambda value: words["true" if value else "false"]


def _param(spec: dict, values: dict) -> Param:
    """A parameter from its catalogue form: `show` renders its value (default: JSON for
    lists and objects, else str; a name of `_SHOW`, or {"true", "false"} words for a
    flag); an optional parameter's `phrase` holds the rendered value in its `{}`, or is
    {"true", "false"} phrases for a flag."""
    show = spec.get("show")
    show_fn = _by_truth(show) if isinstance(show, dict) else _SHOW.get(show, _show)
    phrase = spec.get("phrase")
    if isinstance(phrase, dict):
        phrase_fn = _by_truth(phrase)
    elif phrase is not None:
        phrase_fn = lambda value, text=phrase: text.format(show_fn(value))  # noqa: E731
    else:
        phrase_fn = None
    return Param(
        name=spec["name"],
        type=spec["type"],
        description=spec["description"],
        sample=_sampler(spec["sample"], values),
        default=spec.get("default", _NO_DEFAULT),
        phrase=phrase_fn,
        show=show_fn if show is not None else None,
    )


@functools.cache
def catalogue() -> tuple[ToolSpec, ...]:
    """The tools of `data/xlam_tools.json`, read once."""
    data = json.loads(CATALOGUE_FILE.read_text(encoding="utf-8"))
    values = data["values"]
    return tuple(
        ToolSpec(
            name=tool["name"],
            description=tool["description"],
            params=tuple(_param(p, values) for p in tool["parameters"]),
            templates=tuple(tool["templates"]),
        )
        for tool in data["tools"]
    )


CONNECTORS = ("Also, ", "Additionally, ", "And ", "Then ", "After that, ")
OPTIONAL_RATE = 0.4


def _call(rng: random.Random, tool: ToolSpec) -> tuple[dict, str]:
    """Sample one call to ``tool``: ``({"name", "arguments"}, sentence)``."""
    arguments: dict[str, Any] = {}
    fields: dict[str, str] = {}
    phrases: list[str] = []
    for param in tool.params:
        if param.optional:
            if rng.random() >= OPTIONAL_RATE:
                continue
            value = param.sample(rng)
            assert param.phrase is not None
            phrases.append(param.phrase(value))
        else:
            value = param.sample(rng)
            fields[param.name] = (param.show or _show)(value)
        arguments[param.name] = value
    sentence = rng.choice(tool.templates).format(**fields, opts="".join(phrases))
    return {"name": tool.name, "arguments": arguments}, sentence


def _record(rng: random.Random, record_id: int) -> dict:
    n_calls = rng.choices((1, 2, 3), weights=(55, 30, 15))[0]
    calls: list[dict] = []
    sentences: list[str] = []
    used: list[ToolSpec] = []
    for i in range(n_calls):
        if used and rng.random() < 0.3:
            tool = used[-1]  # the same tool again with other arguments, like xLAM's parallel calls
        else:
            tool = rng.choice(catalogue())
        call, sentence = _call(rng, tool)
        calls.append(call)
        if i:
            sentence = rng.choice(CONNECTORS) + sentence[0].lower() + sentence[1:]
        sentences.append(sentence)
        if tool not in used:
            used.append(tool)
    others = [tool for tool in catalogue() if tool not in used]
    tools = used + rng.sample(others, rng.randint(0, 3))
    rng.shuffle(tools)
    return {
        "id": record_id,
        "query": " ".join(sentences),
        "tools": _json([tool.xlam() for tool in tools]),
        "answers": _json(calls),
    }


def iter_records(seed: int | str = 0) -> Iterator[dict]:
    """An endless, deterministic stream of synthetic xLAM records."""
    rng = random.Random(f"xlam-synthetic:{seed}")
    for record_id in itertools.count():
        yield _record(rng, record_id)


def generate_records(num: int, seed: int | str = 0) -> list[dict]:
    """The first ``num`` records of ``iter_records(seed)``."""
    return list(itertools.islice(iter_records(seed), num))


def to_jsonl(records: list[dict]) -> str:
    """Records as JSON lines, the format of the committed sample."""
    return "".join(_json(record) + "\n" for record in records)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=200)
    parser.add_argument("--seed", default="0")
    parser.add_argument("--out", required=True, help="output .jsonl path")
    args = parser.parse_args(argv)
    seed: int | str = int(args.seed) if args.seed.lstrip("-").isdigit() else args.seed
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(to_jsonl(generate_records(args.num, seed)))


if __name__ == "__main__":
    main()
