"""The task interface: prompts, the reflect/retry turns, loading and a binary verifier.

A task turns examples (plain dicts in the dataset's own schema) into chat prompts and
judges completions with :meth:`Task.verify`, the only reward signal of the method, so
``verify`` must be exact, must never raise and must finish in bounded time whatever the
model wrote. :meth:`Task.diagnose` sorts a completion into ``"correct"`` or one of the
task's failure ``categories`` (with a human reason, :meth:`Task.explain`), for the error
analysis of :mod:`reflax.evaluate`; it says ``"correct"`` exactly when ``verify`` passes.

Loading (:meth:`Task.load`) is shared by all tasks:

* ``source=None`` asks the task for procedurally generated examples (:meth:`Task.generate`).
* Otherwise ``source`` is a local ``.jsonl``/``.json``/``.parquet`` file, a directory written
  by ``datasets.Dataset.save_to_disk``, or a Hugging Face Hub dataset id (see
  :mod:`reflax.tasks.sources`). Each row goes through :meth:`Task.parse_row`; rows it rejects
  (and unreadable lines) are skipped, counted in ``last_load_skipped`` and reported with one
  ``logging`` warning. Valid rows are split into train and a held-out test set of
  ``test_size`` by :func:`reflax.tasks.splits.held_out_split`: the split depends only on row
  content and ``split_seed``, never on file order or ``seed``, and rows with the same
  :meth:`Task.split_key` always land on the same side, so test never overlaps train.
* The selected split is shuffled with ``seed`` and cut to ``num`` rows.

Inline tool format (:meth:`Prompt.inline_tools`), for chat templates without ``tools=``:
the tool list goes into the system turn (appended after any existing system text) as::

    # Tools

    You can call the following tools. Each is described by a JSON schema, one per line:
    {"type": "function", "function": {"name": ..., "description": ..., "parameters": ...}}
    ...

    To call tools, reply with a JSON list of calls, each {"name": <tool name>,
    "arguments": {<argument name>: <value>, ...}}, inside <tool_call></tool_call> tags, e.g.
    <tool_call>[{"name": "tool_name", "arguments": {"argument": "value"}}]</tool_call>
"""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
import random
from collections.abc import Hashable
from typing import Any

from reflax.tasks import sources, splits

logger = logging.getLogger(__name__)

SPLITS = ("train", "test", "validation")
CORRECT = "correct"
INCORRECT = "incorrect"

INLINE_TOOLS_HEADER = (
    "# Tools\n\nYou can call the following tools. "
    "Each is described by a JSON schema, one per line:\n"
)
INLINE_TOOLS_FOOTER = (
    "To call tools, reply with a JSON list of calls, each "
    '{"name": <tool name>, "arguments": {<argument name>: <value>, ...}}, '
    "inside <tool_call></tool_call> tags, e.g.\n"
    '<tool_call>[{"name": "tool_name", "arguments": {"argument": "value"}}]</tool_call>'
)


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A first-attempt prompt: chat turns plus, optionally, the tools the model may call."""

    messages: list[dict[str, str]]
    tools: list[dict] | None = None

    def inline_tools(self) -> list[dict[str, str]]:
        """The messages with the tools described in the system turn (module docstring format).

        Equal to ``messages`` when there are no tools.
        """
        messages = [dict(m) for m in self.messages]
        if not self.tools:
            return messages
        listing = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in self.tools)
        block = f"{INLINE_TOOLS_HEADER}{listing}\n\n{INLINE_TOOLS_FOOTER}"
        if messages and messages[0].get("role") == "system":
            existing = messages[0].get("content", "")
            messages[0]["content"] = f"{existing}\n\n{block}" if existing else block
        else:
            messages.insert(0, {"role": "system", "content": block})
        return messages


class Task(abc.ABC):
    """A verifiable task. Subclasses register themselves with ``@reflax.tasks.register``."""

    name: str = ""
    # Failure categories of `diagnose`, in the order error tables list them.
    categories: tuple[str, ...] = (INCORRECT,)
    # Split used when ``source`` is a Hub dataset id (the datasets used here ship only "train").
    hub_split: str = "train"

    def __init__(self, *, test_size: int | float = 0.1, split_seed: int = 0) -> None:
        if isinstance(test_size, bool) or not isinstance(test_size, int | float):
            raise TypeError(f"test_size must be an int or a float fraction, got {test_size!r}")
        if isinstance(test_size, float) and not 0.0 < test_size < 1.0:
            raise ValueError(f"a fractional test_size must lie in (0, 1), got {test_size}")
        if isinstance(test_size, int) and test_size < 0:
            raise ValueError(f"test_size must be non-negative, got {test_size}")
        self.test_size = test_size
        self.split_seed = split_seed
        self.last_load_skipped = 0
        # share of generated problems held out of training for choosing designs (a task that
        # generates a "validation" split sets it above 0)
        self.validation_fraction = 0.0

    # ----------------------------------------------------------------------------- loading
    def load(
        self, split: str, *, source: str | None = None, num: int | None = None, seed: int = 0
    ) -> list[dict]:
        """Examples of ``split`` ("train", "test" or "validation"); see the module docstring.

        "validation" exists for generated problems of a task with a validation fraction
        (Countdown's `synthetic_validation_fraction`): held out of training like the test
        split, disjoint from it, for choosing a design without touching the test set.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split == "validation" and (source is not None or not self.validation_fraction > 0):
            raise ValueError(
                "a validation split exists only for generated problems of a task with a "
                "validation fraction (countdown: task.kwargs.synthetic_validation_fraction)"
            )
        if num is not None and num < 0:
            raise ValueError(f"num must be non-negative, got {num}")
        if source is None:
            self.last_load_skipped = 0
            return self.generate(split, num=num, seed=seed)

        rows, unreadable = sources.read_rows(source, hub_split=self.hub_split)
        examples: list[dict] = []
        skipped = unreadable
        for row in rows:
            example = self._parse_row_safely(row)
            if example is None:
                skipped += 1
            else:
                examples.append(example)
        self.last_load_skipped = skipped
        if skipped:
            logger.warning(
                "%s: skipped %d malformed row(s) of %d in %s",
                self.name or type(self).__name__,
                skipped,
                len(rows) + unreadable,
                source,
            )
        train, test = splits.held_out_split(
            examples,
            key=self.split_key,
            test_size=self.test_size,
            salt=f"{self.name}:{self.split_seed}",
        )
        chosen = train if split == "train" else test
        if not chosen:
            logger.warning("%s: the %s split of %s is empty", self.name, split, source)
        random.Random(seed).shuffle(chosen)
        return chosen if num is None else chosen[:num]

    def _parse_row_safely(self, row: Any) -> dict | None:
        if not isinstance(row, dict):
            return None
        try:
            return self.parse_row(row)
        except Exception:  # a malformed row must be counted, never crash the load
            return None

    def generate(self, split: str, *, num: int | None, seed: int) -> list[dict]:
        """Procedurally generated examples; tasks without a generator need a ``source``."""
        raise ValueError(f"task {self.name!r} has no procedural generator; pass source=...")

    def parse_row(self, row: dict) -> dict | None:
        """Validate and normalise one loaded row; ``None`` marks it malformed."""
        return row

    def split_key(self, example: dict) -> Hashable:
        """Identity used by the held-out split: equal keys never straddle train and test."""
        return json.dumps(example, sort_keys=True, default=str)

    def family_key(self, example: dict) -> Hashable:
        """Problems that teach each other's answers share a family (default: the split key).

        The warm start and online RL split the train problems by family
        (`warm_start.holdout_fraction`), so RL meets problems the warm start never taught.
        """
        return self.split_key(example)

    def warm_start_fields(self, example: dict, rng: random.Random) -> dict[str, str]:
        """Extra ``str.format`` fields for the warm-start templates (:mod:`reflax.warm_start`),
        e.g. a reference answer written the way the model should; none by default."""
        return {}

    # ------------------------------------------------------------------------------ turns
    @abc.abstractmethod
    def prompt(self, example: dict) -> Prompt:
        """The first-attempt prompt (no chain-of-thought instruction)."""

    @abc.abstractmethod
    def reflection_instruction(self, example: dict) -> str:
        """User turn after a failure: asks for a short explanation of what went wrong."""

    @abc.abstractmethod
    def retry_instruction(self, example: dict) -> str:
        """User turn after the reflection: the original task asked again."""

    # --------------------------------------------------------------------------- checking
    @abc.abstractmethod
    def verify(self, example: dict, completion: str) -> bool:
        """Whether ``completion`` solves ``example``; never raises, bounded time."""

    def diagnose(self, example: dict, completion: str) -> tuple[str, str]:
        """``(category, reason)``: ``(CORRECT, CORRECT)`` exactly when ``verify`` passes, else
        one of ``categories`` and a short human reason. Never raises, bounded time.

        Tasks override it with their own failure categories; this default knows only
        ``"incorrect"``.
        """
        if self.verify(example, completion):
            return CORRECT, CORRECT
        return INCORRECT, INCORRECT

    def explain(self, example: dict, completion: str) -> str:
        """A short human reason why ``completion`` fails, or ``"correct"``."""
        return self.diagnose(example, completion)[1]

    def category(self, example: dict, completion: str) -> str:
        """``"correct"`` or the failure category of ``completion`` (error analysis)."""
        return self.diagnose(example, completion)[0]
