"""Function calling on the xLAM (APIGen, function-calling-60k) schema.

Examples are xLAM rows: ``id``, ``query`` (the user request), ``tools`` (a JSON string: a
list of ``{"name", "description", "parameters": {param: {"type", "description",
"default"?}}}`` with free-form types such as ``"str, optional"`` or ``"List[int]"``) and
``answers`` (a JSON string: the gold list of ``{"name", "arguments"}`` calls). Already
decoded lists are accepted in place of the JSON strings.

Prompt
    The user turn is the query. ``Prompt.tools`` holds the tools in the JSON-schema form
    HF chat templates take (``{"type": "function", "function": {"name", "description",
    "parameters": {"type": "object", "properties", "required"}}}``), converted from xLAM's
    free-form types by :mod:`reflax.tasks.xlam_schema`. ``Prompt.inline_tools()`` renders
    them into a system turn (format: ``reflax.tasks.base``).

Parsing the model's calls (``parse_tool_calls``)
    * At most ``MAX_COMPLETION_CHARS`` characters, at most ``MAX_BRACKETS`` ``[``/``{``.
    * If the completion contains ``<tool_call>``, every ``<tool_call>...</tool_call>`` block
      (the last may lack its closing tag) must hold exactly one JSON value -- one call or a
      list of calls, optionally inside a Markdown code fence -- and the calls of all blocks
      are collected in order (Qwen2.5 emits one block per call). Any bad block fails.
    * Otherwise JSON values starting at ``[`` or ``{`` are decoded left to right out of the
      surrounding text (at most ``MAX_DECODE_ATTEMPTS`` attempts). Text that does not
      decode is prose and skipped, unless a ``"name"``/``"function"`` key appears before
      its syntax error: a botched call fails the whole parse (nothing of a broken call list
      is salvaged). Decoded values that do not look like calls (no object with a
      ``name``/``function`` key) are ignored as prose, values that do must be valid calls,
      and all calls found are collected. An explicit ``[]`` is an empty call list. No
      call-like value at all: failure.
    * A call is an object with a non-empty string ``name`` and an ``arguments`` object (or
      ``parameters`` when ``arguments`` is absent; missing or null means ``{}``); arguments
      given as a JSON string are decoded. OpenAI-style ``{"function": {...}}`` call wrappers
      and ``{"tool_calls": [...]}`` message wrappers are unwrapped. Other keys are ignored.
    * JSON is decoded by the C decoder with NaN/Infinity rejected, non-finite floats (e.g.
      ``1e309``) rejected, integers limited to ``MAX_INT_DIGITS`` digits, nesting limited
      to ``MAX_JSON_DEPTH`` and size to ``MAX_JSON_NODES`` values over the whole completion
      (checked without recursion; the decoder's own recursion guard is caught). Never
      ``eval``.

Verifier rules
    * The multiset of predicted calls equals the gold multiset: order is irrelevant, an
      extra or a missing call fails, and a call appearing twice in gold must appear twice.
    * Names must match exactly (case-sensitive).
    * Arguments must be exactly the gold ``arguments``: no missing and no extra argument. In
      particular, an argument present in gold must be given even when it equals the tool's
      default, and an argument absent from gold must not be given even with its default
      value (the gold dict is the specification; nothing is filled in from defaults).
    * Values are compared after JSON normalisation: numbers by mathematical value (1 ==
      1.0, 100 == 1e2), booleans are not numbers (true != 1), strings exactly (1 != "1",
      no case or whitespace folding), null only equals null, lists element-wise in order,
      objects key-wise regardless of key order.

Failure categories (``category``; the first that applies)
    * ``malformed``: no parseable tool calls (the parsing rules above);
    * ``wrong_call_count``: more or fewer calls than gold;
    * ``wrong_tool``: as many calls as gold, but not the gold multiset of tool names;
    * ``wrong_arguments``: the gold tool names, with missing, extra or wrong argument values.

Loading
    A row needs a non-empty string ``query``, a non-empty ``tools`` list of objects with a
    string ``name`` (and ``parameters`` an object, if present), and ``answers`` decoding
    under the limits above to a list of valid calls whose arguments are JSON values; other
    rows (and undecodable lines) are skipped and counted. Rows are returned unchanged. The
    held-out key is the whitespace-normalised query, so the same request never appears on
    both sides; ``test_size`` defaults to 12,000, as held out from xLAM-60k in the paper.
    Without a ``source``, records come from :mod:`reflax.tasks.xlam_synthetic`, a query
    being held out iff its salted hash falls in the first ``synthetic_test_fraction``.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections import Counter
from collections.abc import Hashable, Iterator
from typing import Any

from reflax.tasks import splits, xlam_synthetic
from reflax.tasks.base import CORRECT, Prompt, Task
from reflax.tasks.registry import register
from reflax.tasks.xlam_schema import xlam_tool_to_schema

MAX_COMPLETION_CHARS = 32_000
MAX_BRACKETS = 4_096
MAX_JSON_DEPTH = 32
MAX_JSON_NODES = 4_096  # per completion, over all its JSON values
MAX_INT_DIGITS = 100
MAX_DECODE_ATTEMPTS = 32
MAX_CALLS = 64

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

DEFAULT_REFLECTION = (
    "You tried performing the task, but failed in generating the correct tool call. "
    "Reflect on what went wrong and write a short explanation that will help you do "
    "better next time."
)
DEFAULT_RETRY = "Try again. {query}"

Call = tuple[str, dict]

MALFORMED, WRONG_CALL_COUNT = "malformed", "wrong_call_count"
WRONG_TOOL, WRONG_ARGUMENTS = "wrong_tool", "wrong_arguments"
CATEGORIES = (MALFORMED, WRONG_CALL_COUNT, WRONG_TOOL, WRONG_ARGUMENTS)


class CallParseError(ValueError):
    """The text does not contain well-formed tool calls; the message says why."""


class JsonLimitError(ValueError):
    """Syntactically JSON, but outside the accepted limits (NaN, 1e309, depth, size...)."""


# --------------------------------------------------------------------------- bounded JSON
def _reject_constant(name: str) -> Any:
    raise JsonLimitError(f"{name} is not allowed")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_JSON_START = re.compile(r"[\[{]")
_CALL_KEY = re.compile(r'"(?:name|function)"\s*:')
_MAX_INT = 10**MAX_INT_DIGITS
_SUSPICIOUS_NUMBER = re.compile(rf"[eE][+]?[0-9]{{3}}|[0-9]{{{MAX_INT_DIGITS + 1}}}")


class _Budget:
    """JSON values one parse may still inspect: shared by every value of a completion, so
    many medium-sized values cannot add up to a slow verification."""

    def __init__(self, nodes: int = MAX_JSON_NODES) -> None:
        self.nodes = nodes

    def spend(self, count: int) -> None:
        self.nodes -= count
        if self.nodes < 0:
            raise JsonLimitError("too much JSON")


def _check_numbers(value: Any) -> None:
    """Reject non-finite floats and integers beyond ``MAX_INT_DIGITS`` digits anywhere."""
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is dict or kind is list:
            stack.extend(item.values() if kind is dict else item)
        elif kind is float and not math.isfinite(item):
            raise JsonLimitError("a number is out of range")
        elif kind is int and not -_MAX_INT < item < _MAX_INT:
            raise JsonLimitError(f"an integer has more than {MAX_INT_DIGITS} digits")


def _check_shape(value: Any, budget: _Budget) -> None:
    """Raise JsonLimitError if ``value`` nests deeper than MAX_JSON_DEPTH or overspends.

    Iterative; containers are sized before their elements are visited, so a huge value is
    rejected without walking it.
    """
    budget.spend(1)
    if type(value) is not dict and type(value) is not list:
        return
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise JsonLimitError(f"JSON nests deeper than {MAX_JSON_DEPTH} levels")
        budget.spend(len(item))
        values = item.values() if type(item) is dict else item
        stack.extend((c, depth + 1) for c in values if type(c) is dict or type(c) is list)


def _decode_at(text: str, index: int, budget: _Budget) -> tuple[Any, int]:
    """Decode one value at ``index``: JSONDecodeError for bad syntax, JsonLimitError otherwise."""
    try:
        value, end = _DECODER.raw_decode(text, index)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise JsonLimitError(f"JSON nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as error:  # NaN/Infinity, or an integer beyond Python's digit limit
        raise JsonLimitError(str(error)) from None
    _check_shape(value, budget)
    # Out-of-range numbers need an exponent of 3+ digits or 101+ digits: only then walk the
    # value for them (a decoder hook per number would slow every long list down).
    if _SUSPICIOUS_NUMBER.search(text, index, end):
        _check_numbers(value)
    return value, end


def loads_bounded(text: str, budget: _Budget | None = None) -> Any:
    """``json.loads`` with the limits of the module docstring; raises ValueError."""
    start = _WHITESPACE.match(text).end()
    value, end = _decode_at(text, start, budget or _Budget())
    if _WHITESPACE.match(text, end).end() != len(text):
        raise ValueError("extra text after the JSON value")
    return value


# ------------------------------------------------------------------------------- parsing
def _looks_like_call(item: Any) -> bool:
    return isinstance(item, dict) and ("name" in item or isinstance(item.get("function"), dict))


def normalize_call(item: Any, budget: _Budget | None = None) -> Call:
    """``(name, arguments)`` of one call object; raises CallParseError."""
    if not isinstance(item, dict):
        raise CallParseError(f"a call must be a JSON object, got {type(item).__name__}")
    if "name" not in item and isinstance(item.get("function"), dict):
        item = item["function"]
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise CallParseError("a call has no string 'name'")
    args = item["arguments"] if "arguments" in item else item.get("parameters")
    if args is None:
        args = {}
    if isinstance(args, str):
        if len(args) > MAX_COMPLETION_CHARS:
            raise CallParseError(f"the arguments of {name} are too long")
        try:
            args = loads_bounded(args, budget)
        except ValueError as error:
            raise CallParseError(
                f"the arguments string of {name} is not valid JSON: {error}"
            ) from None
    if not isinstance(args, dict):
        raise CallParseError(f"the arguments of {name} are not a JSON object")
    return name, args


def _calls_of(value: Any, budget: _Budget | None = None) -> list[Call]:
    items = value if isinstance(value, list) else [value]
    return [normalize_call(item, budget) for item in items]


def _strip_fence(block: str) -> str:
    block = block.strip()
    if block.startswith("```"):
        newline = block.find("\n")
        block = block[newline + 1 :] if newline >= 0 else ""
        if block.rstrip().endswith("```"):
            block = block.rstrip()[:-3]
    return block


def _tool_call_blocks(text: str) -> Iterator[str]:
    position = text.find(TOOL_CALL_OPEN)
    while position >= 0:
        start = position + len(TOOL_CALL_OPEN)
        end = text.find(TOOL_CALL_CLOSE, start)
        if end < 0:
            yield text[start:]
            return
        yield text[start:end]
        position = text.find(TOOL_CALL_OPEN, end + len(TOOL_CALL_CLOSE))


def _embedded_values(text: str, budget: _Budget) -> Iterator[Any]:
    """JSON values starting at ``[``/``{`` in ``text``, left to right.

    A value that breaks a limit (NaN, depth...) fails the whole parse, and so does one with
    a syntax error after a ``"name"``/``"function"`` key (a botched call: nothing of it is
    salvaged). Other undecodable text is prose; the search resumes at its syntax error.
    """
    position = 0
    for _ in range(MAX_DECODE_ATTEMPTS):
        match = _JSON_START.search(text, position)
        if match is None:
            return
        try:
            value, end = _decode_at(text, match.start(), budget)
        except json.JSONDecodeError as error:
            if _CALL_KEY.search(text, match.start(), error.pos):
                raise CallParseError(f"a tool call is not valid JSON: {error}") from None
            position = max(match.start() + 1, error.pos)
            continue
        except JsonLimitError as error:
            raise CallParseError(f"unacceptable JSON: {error}") from None
        yield value
        position = end


def _unwrap(value: Any) -> Any:
    """``{"tool_calls": [...]}`` (OpenAI message style) -> the list."""
    if (
        isinstance(value, dict)
        and "name" not in value
        and isinstance(value.get("tool_calls"), list)
    ):
        return value["tool_calls"]
    return value


def parse_calls(text: str) -> list[Call]:
    """The calls in a completion (module docstring); raises CallParseError."""
    if not isinstance(text, str):
        raise CallParseError("the completion is not a string")
    if len(text) > MAX_COMPLETION_CHARS:
        raise CallParseError(f"the completion is longer than {MAX_COMPLETION_CHARS} characters")
    if text.count("[") + text.count("{") > MAX_BRACKETS:
        raise CallParseError("the completion has too many brackets")
    calls: list[Call] = []
    budget = _Budget()
    if TOOL_CALL_OPEN in text:
        for block in _tool_call_blocks(text):
            try:
                value = loads_bounded(_strip_fence(block), budget)
            except ValueError as error:
                raise CallParseError(f"a <tool_call> block is not valid JSON: {error}") from None
            calls.extend(_calls_of(_unwrap(value), budget))
            if len(calls) > MAX_CALLS:
                raise CallParseError(f"more than {MAX_CALLS} calls")
        return calls
    found = False
    for value in _embedded_values(text, budget):
        value = _unwrap(value)
        items = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not value:
            found = True  # an explicit empty call list
            continue
        if not any(_looks_like_call(item) for item in items if type(item) is dict):
            continue  # JSON in prose, not an attempted call
        found = True
        calls.extend(_calls_of(value, budget))
        if len(calls) > MAX_CALLS:
            raise CallParseError(f"more than {MAX_CALLS} calls")
    if not found:
        raise CallParseError("no tool calls found")
    return calls


def parse_tool_calls(text: str) -> list[dict] | None:
    """The calls in a completion as ``[{"name", "arguments"}]``, or None if malformed."""
    try:
        return [{"name": name, "arguments": args} for name, args in parse_calls(text)]
    except Exception:
        return None


# ---------------------------------------------------------------------------- comparison
def canonical(value: Any) -> Hashable:
    """A hashable normal form: equal iff the JSON values are equal under the module rules."""
    if value is None:
        return ("null",)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int):
        return ("num", value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("non-finite number")
        return ("num", int(value) if value.is_integer() else value)
    if isinstance(value, str):
        return ("str", value)
    if isinstance(value, list | tuple):
        return ("list", tuple(canonical(item) for item in value))
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise ValueError("object keys must be strings")
        return ("dict", tuple(sorted((key, canonical(item)) for key, item in value.items())))
    raise ValueError(f"{type(value).__name__} is not a JSON value")


def _call_key(call: Call) -> Hashable:
    return call[0], canonical(call[1])


def parse_gold(answers: str | list) -> list[Call]:
    """The gold calls of an ``answers`` field (JSON string or list); raises ValueError."""
    if isinstance(answers, str):
        answers = loads_bounded(answers)
    if not isinstance(answers, list):
        raise ValueError("answers must be a JSON list of calls")
    return _calls_of(answers)


@functools.lru_cache(maxsize=1 << 16)
def _gold_keys_cached(answers: str) -> Counter:
    return Counter(_call_key(call) for call in parse_gold(answers))


def _gold_keys(answers: str | list) -> Counter:
    if isinstance(answers, str):
        return _gold_keys_cached(answers)
    return Counter(_call_key(call) for call in parse_gold(answers))


def _show(name: str, args: dict, limit: int = 160) -> str:
    text = f"{name}({json.dumps(args, ensure_ascii=False, sort_keys=True)})"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _argument_diff(predicted: dict, gold: dict) -> str:
    parts = []
    missing = sorted(set(gold) - set(predicted))
    extra = sorted(set(predicted) - set(gold))
    if missing:
        parts.append(f"missing argument(s) {', '.join(missing)}")
    if extra:
        parts.append(f"unexpected argument(s) {', '.join(extra)}")
    for key in sorted(set(gold) & set(predicted)):
        if canonical(gold[key]) != canonical(predicted[key]):
            got = json.dumps(predicted[key], ensure_ascii=False)[:60]
            want = json.dumps(gold[key], ensure_ascii=False)[:60]
            parts.append(f"{key} is {got}, expected {want}")
    return "; ".join(parts)


def mismatch_category(predicted: list[Call], gold: list[Call]) -> str:
    """``"correct"`` or the first failure category (module docstring) that separates the
    parsed calls ``predicted`` from ``gold``."""
    if Counter(_call_key(call) for call in predicted) == Counter(_call_key(c) for c in gold):
        return CORRECT
    if len(predicted) != len(gold):
        return WRONG_CALL_COUNT
    if Counter(name for name, _ in predicted) != Counter(name for name, _ in gold):
        return WRONG_TOOL
    return WRONG_ARGUMENTS


def describe_mismatch(predicted: list[Call], gold: list[Call]) -> str:
    """A short explanation of how ``predicted`` differs from ``gold`` ("correct" if it does not)."""
    remaining = Counter(_call_key(call) for call in gold)
    extra: list[Call] = []
    for call in predicted:
        key = _call_key(call)
        if remaining[key] > 0:
            remaining[key] -= 1
        else:
            extra.append(call)
    missing: list[Call] = []
    for call in gold:
        key = _call_key(call)
        if remaining[key] > 0:
            remaining[key] -= 1
            missing.append(call)
    if not extra and not missing:
        return "correct"
    reasons = []
    for call in extra:
        same_name = next((g for g in missing if g[0] == call[0]), None)
        if same_name is not None:
            missing.remove(same_name)
            reasons.append(f"call {call[0]}: {_argument_diff(call[1], same_name[1])}")
        else:
            reasons.append(f"unexpected call {_show(*call)}")
    reasons.extend(f"missing call {_show(*call)}" for call in missing)
    text = "; ".join(reasons)
    return text if len(text) <= 600 else text[:597] + "..."


def _decode_list(value: Any) -> list:
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, list):
        raise ValueError("expected a JSON list")
    return value


def _valid_tool(tool: Any) -> bool:
    if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
        return False
    parameters = tool.get("parameters")
    return parameters is None or isinstance(parameters, dict)


# ---------------------------------------------------------------------------------- task
def _check_template(name: str, template: str) -> str:
    try:
        template.format(query="q")
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(
            f"{name} must be a str.format template using only {{query}}: {error}"
        ) from None
    return template


@register("function_calling")
class FunctionCallingTask(Task):
    """xLAM function calling; see the module docstring for the parsing and matching rules."""

    categories = CATEGORIES

    def __init__(
        self,
        *,
        system_prompt: str | None = None,
        reflection_template: str = DEFAULT_REFLECTION,
        retry_template: str = DEFAULT_RETRY,
        test_size: int | float = 12_000,
        split_seed: int = 0,
        synthetic_size: int = 1_000,
        synthetic_test_fraction: float = 0.1,
    ) -> None:
        super().__init__(test_size=test_size, split_seed=split_seed)
        if not 0.0 < synthetic_test_fraction < 1.0:
            raise ValueError(
                f"synthetic_test_fraction must lie in (0, 1), got {synthetic_test_fraction}"
            )
        self.system_prompt = system_prompt
        self.reflection_template = _check_template("reflection_template", reflection_template)
        self.retry_template = _check_template("retry_template", retry_template)
        self.synthetic_size = synthetic_size
        self.synthetic_test_fraction = synthetic_test_fraction

    # ------------------------------------------------------------------------- loading
    def parse_row(self, row: dict) -> dict | None:
        query = row.get("query")
        if not isinstance(query, str) or not query.strip():
            return None
        tools = _decode_list(row.get("tools"))
        if not tools or not all(_valid_tool(tool) for tool in tools):
            return None
        for call in parse_gold(row.get("answers")):
            canonical(call[1])  # every gold argument must be a comparable JSON value
        return row

    def split_key(self, example: dict) -> Hashable:
        return " ".join(example["query"].split())

    def generate(self, split: str, *, num: int | None, seed: int) -> list[dict]:
        """``num`` (default ``synthetic_size``) synthetic xLAM records of ``split``."""
        num = self.synthetic_size if num is None else num
        salt = f"function_calling-synthetic:{self.split_seed}"
        want_test = split == "test"
        records: list[dict] = []
        for record in xlam_synthetic.iter_records(f"{split}:{seed}"):
            if len(records) >= num:
                break
            key = self.split_key(record)
            held_out = splits.in_test_bucket(key, fraction=self.synthetic_test_fraction, salt=salt)
            if held_out == want_test:
                records.append(record)
        return records

    # --------------------------------------------------------------------------- turns
    def tools(self, example: dict) -> list[dict]:
        """The example's tools in JSON-schema form."""
        return [xlam_tool_to_schema(tool) for tool in _decode_list(example["tools"])]

    def prompt(self, example: dict) -> Prompt:
        messages = [{"role": "user", "content": example["query"]}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return Prompt(messages=messages, tools=self.tools(example))

    def reflection_instruction(self, example: dict) -> str:
        return self.reflection_template.format(query=example["query"])

    def retry_instruction(self, example: dict) -> str:
        return self.retry_template.format(query=example["query"])

    # ------------------------------------------------------------------------ checking
    def verify(self, example: dict, completion: str) -> bool:
        try:
            predicted = Counter(_call_key(call) for call in parse_calls(completion))
            return predicted == _gold_keys(example["answers"])
        except Exception:  # hostile output or a malformed example: never raise
            return False

    def diagnose(self, example: dict, completion: str) -> tuple[str, str]:
        try:
            gold = parse_gold(example["answers"])
        except Exception as error:
            return MALFORMED, f"the example's answers are malformed ({error})"
        try:
            predicted = parse_calls(completion)
        except CallParseError as error:
            return MALFORMED, f"could not parse tool calls: {error}"
        except Exception as error:
            return MALFORMED, f"could not parse tool calls ({type(error).__name__})"
        try:
            return mismatch_category(predicted, gold), describe_mismatch(predicted, gold)
        except Exception as error:
            return MALFORMED, f"could not compare the calls ({type(error).__name__})"
