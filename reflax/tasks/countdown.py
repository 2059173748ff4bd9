"""Countdown: combine the given numbers with + - * / into an expression equal to a target.

Examples follow TinyZero's Countdown-Tasks-3to4 schema, ``{"target": int, "nums": [int, ...]}``;
procedurally generated ones carry an extra ``"solution"`` expression.

Answer format
    The answer is the text inside the LAST ``<answer>`` tag: from the last ``<answer>`` to the
    next ``</answer>``, or to the end of the completion when the closing tag is missing (a
    stop string may have eaten it). A completion without ``<answer>`` fails unless the task
    was built with ``answer_fallback=True``, in which case the last non-blank line is the
    answer (for terse toy formats that emit the bare expression).

Verifier rules (each failing rule makes ``verify`` return False; ``explain`` names it)
    * the answer is at most ``MAX_ANSWER_CHARS`` (1,000) characters;
    * it may end in ``= <target>`` (one ``=``, right-hand side exactly the target as a plain
      integer); any other use of ``=`` fails;
    * only ASCII digits, ``+ - * / ( )`` and whitespace are allowed, so names, calls,
      attributes, lambdas, strings, ``.``, ``%``, unicode digits and the like are rejected
      before any parsing;
    * number literals are non-negative decimal integers; floats such as ``2.0`` are rejected
      (every given number is an integer and must appear as written); leading zeros are a
      syntax error as in Python;
    * the text parses with ``ast.parse(mode="eval")`` into only BinOp nodes with + - * /
      (true division) over int constants, at most ``MAX_AST_NODES`` nodes (checked by an
      iterative walk before evaluation, which bounds the evaluation's recursion depth);
      ``**`` and ``//`` and unary operators are rejected -- unary minus in particular,
      because it would let the model negate a given number, which the task does not offer;
    * the multiset of literals equals the multiset of given numbers (each used exactly once);
    * evaluation is exact, with ``fractions.Fraction``; non-integer intermediates are allowed
      (``(1 / 2) * 4`` is 2); division by zero fails; any intermediate whose numerator or
      denominator exceeds ``MAX_MAGNITUDE`` fails, so nothing can blow up;
    * the value equals the target exactly.
    Nothing is ever evaluated with ``eval``; any unexpected exception makes ``verify`` False.

Failure categories (``category``; the rules are checked in the order above, so the first
broken rule decides)
    * ``malformed``: no answer, or an answer that breaks a format rule (length, ``=``,
      characters, syntax, operators, size) -- whatever its numbers;
    * ``wrong_numbers``: a well-formed expression whose literals are not exactly the given
      numbers;
    * ``missed_target``: a well-formed expression over exactly the given numbers whose value
      is not the target (division by zero and overflowing intermediates included: the
      expression has no value, so it misses the target).

Generation (``load(split)`` without ``source``)
    Draw a count from ``counts`` and that many numbers from ``num_range``; search all binary
    expression trees over them (pairwise reduction, integer-exact divisions only, so every
    stored ``solution`` has integer intermediates) and pick the target uniformly among the
    reachable integers inside ``target_range`` (redraw when none). A number multiset is held
    out for test iff its salted hash falls in the first ``synthetic_test_fraction`` of the
    hash range, so generated train and test problems never share numbers; with
    ``synthetic_split="problems"`` the hash is of the problem (target, number multiset)
    instead, so a held-out problem's numbers may appear in training with another target,
    as in the paper's Countdown split. ``synthetic_descending=True`` lists each problem's
    numbers largest first (the same problems, so the same splits). Train problems
    are drawn with replacement; with ``synthetic_unique_test=True`` the test split holds
    each problem (target, number multiset) at most once, so a small number range still
    gives distinct held-out problems (a request larger than the pool raises an error).

Warm start (``warm_start_fields``, the templates' fields for :mod:`reflax.warm_start`)
    A generated problem gives ``expression`` (its solution without spaces), ``step`` (the
    solution's first operation on two given numbers, ``a*b=v``) and ``wrong`` (a
    left-to-right expression over the numbers that fails). Two-number problems, where the
    answer is ``x op y`` and the choice is the operator, give instead ``expression``,
    ``op``, ``wrong`` / ``wrong_op`` (an operator that fails), ``hint_op`` (the operator a
    reflection names: the solution's with probability ``hint_gold_fraction``, otherwise a
    random one other than ``wrong_op``), ``hint`` (the expression that follows it) and
    ``hint_word`` / ``wrong_word`` (plus, minus, times, over). With probability
    ``wrong_numbers_fraction`` the failed attempt is instead the solution's operator on
    one miscopied number (another from ``num_range``), the error a small model makes on
    unseen number pairs; its ``hint_op`` is then random among all four operators.
    ``wrong_side`` says whether the failed attempt's value lies above the target
    (``high``) or not (``low``): what a reflection can observe about the failure.

Loading (``load(split, source=...)``)
    Rows need an integer ``target`` (an integral float is accepted) and ``nums``, a list of
    2 to ``MAX_NUMBERS`` non-negative integers each below ``MAX_MAGNITUDE``; other rows are
    skipped and counted. The held-out key is ``(target, sorted nums)``; ``test_size``
    defaults to 15,000 problems, as held out from Countdown-Tasks-3to4 in the paper.
"""

from __future__ import annotations

import ast
import random
import re
from collections.abc import Hashable, Sequence
from fractions import Fraction
from typing import Any

from reflax.tasks import splits
from reflax.tasks.base import CORRECT, Prompt, Task
from reflax.tasks.registry import register

MAX_ANSWER_CHARS = 1_000
MAX_AST_NODES = 128
MAX_NUMBERS = 8
MAX_MAGNITUDE = 10**30
MAX_GENERATED_NUMBERS = 5  # the exhaustive search grows fast beyond this

DEFAULT_PROMPT = (
    "Using the numbers {nums}, create an equation that equals {target}. "
    "You can use basic arithmetic operations (+, -, *, /) and each number must be used "
    "exactly once. Return the final equation in <answer> </answer> tags, "
    "for example <answer> (1 + 2) / 3 </answer>."
)
DEFAULT_REFLECTION = (
    "You tried solving the problem and got the wrong answer. Reflect on what went wrong "
    "and write a short explanation that will help you do better next time."
)
DEFAULT_RETRY = "Try again. " + DEFAULT_PROMPT

ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"

_ALLOWED_TEXT = re.compile(r"[0-9+\-*/() ]*")
_DISALLOWED_CHAR = re.compile(r"[^0-9+\-*/() ]")
_INT_LITERAL = re.compile(r"[0-9]+")
_PLAIN_INT = re.compile(r"[0-9]{1,40}")

_OPERATORS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_REJECTED_NODE_REASONS = {
    ast.UnaryOp: "unary operators (e.g. a leading minus) are not allowed",
    ast.Pow: "exponentiation (**) is not allowed",
    ast.FloorDiv: "floor division (//) is not allowed",
}


MALFORMED, WRONG_NUMBERS, MISSED_TARGET = "malformed", "wrong_numbers", "missed_target"
CATEGORIES = (MALFORMED, WRONG_NUMBERS, MISSED_TARGET)


class _Reject(Exception):
    """Internal: the answer breaks a rule; the message is the human-readable reason."""

    def __init__(self, reason: str, category: str = MALFORMED) -> None:
        super().__init__(reason)
        self.category = category


# ------------------------------------------------------------------------------ checking
def extract_answer(completion: str, *, fallback: bool = False) -> str | None:
    """The answer text of ``completion`` (module docstring), or None when there is none.

    An answer longer than ``MAX_ANSWER_CHARS`` comes back cut to ``MAX_ANSWER_CHARS + 1``
    characters (still too long to pass), so a huge completion is never copied.
    """
    start = completion.rfind(ANSWER_OPEN)
    if start >= 0:
        start += len(ANSWER_OPEN)
        end = completion.find(ANSWER_CLOSE, start)
        end = len(completion) if end < 0 else end
    elif fallback:
        end = len(completion.rstrip())
        if end == 0:
            return None
        start = completion.rfind("\n", 0, end) + 1
    else:
        return None
    return completion[start : min(end, start + MAX_ANSWER_CHARS + 1)]


def _check_answer(answer: str, nums: Sequence[int], target: int) -> Fraction:
    """Apply every rule to ``answer``; returns its exact value or raises ``_Reject``."""
    if len(answer) > MAX_ANSWER_CHARS:
        raise _Reject(f"answer is longer than {MAX_ANSWER_CHARS} characters")
    expression = " ".join(answer.split())
    if not expression:
        raise _Reject("the answer is empty")
    if "=" in expression:
        lhs, _, rhs = expression.partition("=")
        rhs = rhs.strip()
        if "=" in rhs or not _PLAIN_INT.fullmatch(rhs) or int(rhs) != target:
            raise _Reject(
                f"'= {rhs}' is not '= {target}' (only '<expression> = target' is allowed)"
            )
        expression = lhs.strip()
    if not _ALLOWED_TEXT.fullmatch(expression):
        bad = _DISALLOWED_CHAR.search(expression)
        char = bad.group() if bad else "?"
        raise _Reject(f"character {char!r} is not allowed (only digits, + - * / and parentheses)")
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise _Reject("not a valid arithmetic expression") from None
    # Whitelist walk before evaluating; it also bounds the tree's size and so its depth.
    stack: list[ast.AST] = [tree.body]
    count = 0
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_AST_NODES:
            raise _Reject("expression is too large")
        kind = type(node)
        if kind is ast.BinOp:
            op = type(node.op)
            if op not in _OPERATORS:
                raise _Reject(_REJECTED_NODE_REASONS.get(op) or f"{op.__name__} is not allowed")
            stack.append(node.left)
            stack.append(node.right)
        elif kind is ast.Constant:
            if type(node.value) is not int:
                raise _Reject(f"{node.value!r} is not a non-negative integer literal")
        else:
            raise _Reject(_REJECTED_NODE_REASONS.get(kind) or f"{kind.__name__} is not allowed")
    used = sorted(int(literal) for literal in _INT_LITERAL.findall(expression))
    if used != sorted(nums):
        raise _Reject(
            f"uses the numbers {used} but must use {sorted(nums)} each exactly once",
            WRONG_NUMBERS,
        )
    return _evaluate(tree.body)


def _evaluate(node: ast.expr) -> Fraction:
    if isinstance(node, ast.Constant):
        return Fraction(node.value)
    assert isinstance(node, ast.BinOp)  # guaranteed by the node whitelist
    left = _evaluate(node.left)
    right = _evaluate(node.right)
    op = type(node.op)
    if op is ast.Add:
        value = left + right
    elif op is ast.Sub:
        value = left - right
    elif op is ast.Mult:
        value = left * right
    else:
        if right == 0:
            raise _Reject("division by zero", MISSED_TARGET)
        value = left / right
    if abs(value.numerator) > MAX_MAGNITUDE or value.denominator > MAX_MAGNITUDE:
        raise _Reject("an intermediate value is too large", MISSED_TARGET)
    return value


def diagnose(
    nums: Sequence[int], target: int, completion: str, *, fallback: bool = False
) -> tuple[str, str]:
    """``(category, reason)`` for a completion: ``(CORRECT, CORRECT)`` or a failure
    category of ``CATEGORIES`` with the human-readable reason; never raises."""
    try:
        if not isinstance(completion, str):
            return MALFORMED, "the completion is not a string"
        answer = extract_answer(completion, fallback=fallback)
        if answer is None:
            return MALFORMED, "no <answer> tag" if not fallback else "no answer found"
        value = _check_answer(answer, nums, target)
        if value != target:
            shown = str(value) if value.denominator == 1 else f"{value} ({float(value):.4g})"
            return MISSED_TARGET, f"the expression equals {shown}, not {target}"
        return CORRECT, CORRECT
    except _Reject as reject:
        return reject.category, str(reject)
    except Exception as error:  # model output is hostile input: never propagate
        return MALFORMED, f"could not check the answer ({type(error).__name__})"


def check(
    nums: Sequence[int], target: int, completion: str, *, fallback: bool = False
) -> tuple[bool, str]:
    """``(passed, reason)`` for a completion; never raises."""
    category, reason = diagnose(nums, target, completion, fallback=fallback)
    return category == CORRECT, reason


# ---------------------------------------------------------------------------- generation
# An item of the search is (value, expression text, precedence: 3 atom, 2 * /, 1 + -).
_Item = tuple[int, str, int]


def _wrap(item: _Item, min_prec: int) -> str:
    return f"({item[1]})" if item[2] < min_prec else item[1]


def _combinations(a: _Item, b: _Item) -> list[_Item]:
    """Every integer result of one operation on ``a`` and ``b`` (either order)."""
    out: list[_Item] = [
        (a[0] + b[0], f"{a[1]} + {b[1]}", 1),
        (a[0] * b[0], f"{_wrap(a, 2)} * {_wrap(b, 2)}", 2),
        (a[0] - b[0], f"{a[1]} - {_wrap(b, 2)}", 1),
        (b[0] - a[0], f"{b[1]} - {_wrap(a, 2)}", 1),
    ]
    if b[0] != 0 and a[0] % b[0] == 0:
        out.append((a[0] // b[0], f"{_wrap(a, 2)} / {_wrap(b, 3)}", 2))
    if a[0] != 0 and b[0] % a[0] == 0:
        out.append((b[0] // a[0], f"{_wrap(b, 2)} / {_wrap(a, 3)}", 2))
    return out


def reachable_targets(nums: Sequence[int]) -> dict[int, str]:
    """Every integer reachable using all of ``nums`` once, with one expression each.

    Searches all expression trees by repeatedly combining two of the remaining items; only
    exact divisions are taken, so every intermediate (and expression) is integer-valued.
    States with the same multiset of values are explored once.
    """
    results: dict[int, str] = {}
    seen: set[tuple[int, ...]] = set()

    def search(items: list[_Item]) -> None:
        state = tuple(sorted(item[0] for item in items))
        if state in seen:
            return
        seen.add(state)
        if len(items) == 1:
            results.setdefault(items[0][0], items[0][1])
            return
        for i in range(len(items)):
            for j in range(i + 1, len(items)):
                rest = items[:i] + items[i + 1 : j] + items[j + 1 :]
                for combined in _combinations(items[i], items[j]):
                    search([*rest, combined])

    search([(n, str(n), 3) for n in nums])
    return results


# ------------------------------------------------------------------- warm-start fields
OP_WORDS = {"+": "plus", "-": "minus", "*": "times", "/": "over"}


def _solution_fields(example: dict, rng: random.Random, verify: Any) -> dict[str, str]:
    """`expression`: the solution without spaces; `step`: its first operation on two given
    numbers, as `a*b=v`; `wrong`: a random expression over the numbers that fails."""
    expression = example["solution"].replace(" ", "")
    stack = [ast.parse(expression, mode="eval").body]
    step = expression
    while stack:  # the first binary operation whose operands are both given numbers
        node = stack.pop()
        if isinstance(node, ast.BinOp):
            if isinstance(node.left, ast.Constant) and isinstance(node.right, ast.Constant):
                a, b = Fraction(node.left.value), Fraction(node.right.value)
                op = _OPERATORS[type(node.op)]
                step = f"{a}{op}{b}={apply_operator(op, a, b)}"
                break
            stack += [node.right, node.left]
    wrong = expression
    for _ in range(20):  # left-to-right expressions in the answer format; a few may pass
        nums = list(example["nums"])
        rng.shuffle(nums)
        cand = str(nums[0]) + "".join(rng.choice("+-*") + str(n) for n in nums[1:])
        if not verify(example, cand):
            wrong = cand
            break
    return {"expression": expression, "step": step, "wrong": wrong}


def apply_operator(op: str, a: Fraction | int, b: Fraction | int) -> Fraction:
    """`a op b` exactly; a division by zero gives `a` (callers only describe values)."""
    a, b = Fraction(a), Fraction(b)
    return {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else a}[op]


def pair_operands(op: str, nums: Sequence[int]) -> tuple[int, int]:
    """The two numbers in the order `x op y` writes them: `-` and `/` put the larger first
    (targets are positive)."""
    x, y = nums
    return (max(x, y), min(x, y)) if op in "-/" else (x, y)


def pair_expression(op: str, nums: Sequence[int]) -> str:
    """Two numbers joined by `op`, in `pair_operands` order."""
    x, y = pair_operands(op, nums)
    return f"{x}{op}{y}"


def solving_operators(example: dict, verify: Any) -> list[str]:
    """The operators `op` for which `x op y` (as `pair_expression` writes it) passes."""
    return [o for o in "+-*/" if verify(example, pair_expression(o, list(example["nums"])))]


def _pair_fields(
    example: dict,
    rng: random.Random,
    verify: Any,
    gold_fraction: float,
    wrong_numbers_fraction: float = 0.0,
    num_range: tuple[int, int] = (1, 100),
) -> dict[str, str]:
    """Two-number fields (module docstring, Warm start); `wrong_op` is `op` only when no
    operator fails or the attempt miscopies a number, and `hint_op`, when not gold, may
    pass too."""
    nums = list(example["nums"])
    op = next(ch for ch in "+-*/" if ch in example["solution"])
    solving = solving_operators(example, verify)
    fails = [o for o in "+-*/" if o not in solving]
    if wrong_numbers_fraction and rng.random() < wrong_numbers_fraction:
        # the solution's operator on a miscopied number: the reflection may name any
        # operator, the failed one included, and the retry copies the prompt's numbers
        k = rng.randrange(2)
        lo, hi = num_range
        written = list(nums)
        written[k] = rng.choice([n for n in range(lo, hi + 1) if n != nums[k]] or [hi + 1])
        wrong_op, wrong, others = op, pair_expression(op, written), list("+-*/")
    else:
        wrong_op = rng.choice(fails) if fails else op
        wrong = pair_expression(wrong_op, nums)
        written, others = nums, [o for o in "+-*/" if o != wrong_op]
    hint_op = op if rng.random() < gold_fraction else rng.choice(others)
    value = apply_operator(wrong_op, *pair_operands(wrong_op, written))
    return {
        "wrong_side": "high" if value > example["target"] else "low",
        "expression": pair_expression(op, nums),
        "op": op,
        "wrong": wrong,
        "wrong_op": wrong_op,
        "hint_op": hint_op,
        "hint": pair_expression(hint_op, nums),
        "hint_word": OP_WORDS[hint_op],
        "wrong_word": OP_WORDS[wrong_op],
    }


# ---------------------------------------------------------------------------------- task
def _check_range(name: str, value: tuple[int, int], minimum: int) -> tuple[int, int]:
    lo, hi = value
    if not (isinstance(lo, int) and isinstance(hi, int) and minimum <= lo <= hi):
        raise ValueError(
            f"{name} must be (lo, hi) integers with {minimum} <= lo <= hi, got {value}"
        )
    return lo, hi


def _check_template(name: str, template: str) -> str:
    try:
        template.format(nums=[1, 2, 3], target=6)
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(
            f"{name} must be a str.format template using only {{nums}} and {{target}}: {error}"
        ) from None
    return template


@register("countdown")
class CountdownTask(Task):
    """The Countdown numbers game; see the module docstring for every rule."""

    categories = CATEGORIES

    def __init__(
        self,
        *,
        counts: Sequence[int] = (3, 4),
        num_range: tuple[int, int] = (1, 100),
        target_range: tuple[int, int] = (1, 100),
        prompt_template: str = DEFAULT_PROMPT,
        reflection_template: str = DEFAULT_REFLECTION,
        retry_template: str = DEFAULT_RETRY,
        system_prompt: str | None = None,
        answer_fallback: bool = False,
        test_size: int | float = 15_000,
        split_seed: int = 0,
        synthetic_size: int = 1_000,
        synthetic_test_fraction: float = 0.1,
        synthetic_unique_test: bool = False,
        synthetic_validation_fraction: float = 0.0,
        hint_gold_fraction: float = 1.0,
        wrong_numbers_fraction: float = 0.0,
        synthetic_split: str = "numbers",
        synthetic_descending: bool = False,
    ) -> None:
        super().__init__(test_size=test_size, split_seed=split_seed)
        counts = tuple(counts)
        if not counts or any(
            not isinstance(c, int) or not 2 <= c <= MAX_GENERATED_NUMBERS for c in counts
        ):
            raise ValueError(
                f"counts must be integers in [2, {MAX_GENERATED_NUMBERS}], got {counts}"
            )
        if not 0.0 < synthetic_test_fraction < 1.0:
            raise ValueError(
                f"synthetic_test_fraction must lie in (0, 1), got {synthetic_test_fraction}"
            )
        self.counts = counts
        self.num_range = _check_range("num_range", num_range, 0)
        self.target_range = _check_range("target_range", target_range, -MAX_MAGNITUDE)
        self.prompt_template = _check_template("prompt_template", prompt_template)
        self.reflection_template = _check_template("reflection_template", reflection_template)
        self.retry_template = _check_template("retry_template", retry_template)
        self.system_prompt = system_prompt
        self.answer_fallback = answer_fallback
        self.synthetic_size = synthetic_size
        self.synthetic_test_fraction = synthetic_test_fraction
        self.synthetic_unique_test = synthetic_unique_test
        if not 0.0 <= synthetic_validation_fraction < 1.0 - synthetic_test_fraction:
            raise ValueError(
                "synthetic_validation_fraction must lie in [0, 1 - synthetic_test_fraction), "
                f"got {synthetic_validation_fraction}"
            )
        self.validation_fraction = synthetic_validation_fraction
        if not 0.0 <= hint_gold_fraction <= 1.0:
            raise ValueError(f"hint_gold_fraction must lie in [0, 1], got {hint_gold_fraction}")
        self.hint_gold_fraction = hint_gold_fraction
        if not 0.0 <= wrong_numbers_fraction <= 1.0:
            raise ValueError(
                f"wrong_numbers_fraction must lie in [0, 1], got {wrong_numbers_fraction}"
            )
        self.wrong_numbers_fraction = wrong_numbers_fraction
        if synthetic_split not in ("numbers", "problems"):
            raise ValueError(
                f"synthetic_split must be 'numbers' or 'problems', got {synthetic_split!r}"
            )
        self.synthetic_split = synthetic_split
        self.synthetic_descending = synthetic_descending

    # ------------------------------------------------------------------------- loading
    def parse_row(self, row: dict) -> dict | None:
        target = row.get("target")
        nums = row.get("nums")
        if isinstance(target, float) and target.is_integer():
            target = int(target)
        if type(target) is not int or abs(target) > MAX_MAGNITUDE:
            return None
        if not isinstance(nums, list | tuple) or not 2 <= len(nums) <= MAX_NUMBERS:
            return None
        if any(type(n) is not int or not 0 <= n <= MAX_MAGNITUDE for n in nums):
            return None
        return {**row, "target": target, "nums": list(nums)}

    def split_key(self, example: dict) -> Hashable:
        return (example["target"], tuple(sorted(example["nums"])))

    def family_key(self, example: dict) -> Hashable:
        # the same numbers with another target still teach their sums and products
        return tuple(sorted(example["nums"]))

    def generate(self, split: str, *, num: int | None, seed: int) -> list[dict]:
        """``num`` (default ``synthetic_size``) solvable problems of ``split``."""
        num = self.synthetic_size if num is None else num
        rng = random.Random(f"countdown:{split}:{seed}")
        salt = f"countdown-synthetic:{self.split_seed}"
        unique = split != "train" and self.synthetic_unique_test
        # the hash range: [0, test) test, [test, test + validation) validation, the rest train
        test = self.synthetic_test_fraction
        held = test + self.validation_fraction
        start, stop = {"test": (0.0, test), "validation": (test, held)}.get(split, (held, 1.0))
        by_problem = self.synthetic_split == "problems"  # else by number multiset
        lo, hi = self.num_range
        t_lo, t_hi = self.target_range
        examples: list[dict] = []
        seen: set[tuple] = set()
        misses = 0  # draws in a row that added nothing
        while len(examples) < num:
            misses += 1
            if misses > 100_000:
                raise ValueError(
                    f"could not generate {num} {'distinct ' * unique}solvable "
                    f"{split} problems with these ranges (got {len(examples)}); widen "
                    "num_range/target_range or change synthetic_test_fraction"
                )
            nums = [rng.randint(lo, hi) for _ in range(rng.choice(self.counts))]
            if self.synthetic_descending:
                nums.sort(reverse=True)
            key = tuple(sorted(nums))
            if not by_problem and not splits.in_bucket(key, start=start, stop=stop, salt=salt):
                continue
            reachable = reachable_targets(nums)
            targets = sorted(t for t in reachable if t_lo <= t <= t_hi)
            if not targets:
                continue
            target = rng.choice(targets)
            if by_problem and not splits.in_bucket(
                (target, key), start=start, stop=stop, salt=salt
            ):
                continue
            if unique and (target, key) in seen:
                continue
            seen.add((target, key))
            misses = 0
            examples.append({"target": target, "nums": nums, "solution": reachable[target]})
        return examples

    def warm_start_fields(self, example: dict, rng: random.Random) -> dict[str, str]:
        """Generated problems (with a ``solution``): ``expression``, ``step`` and ``wrong``
        (module docstring, Warm start); with two numbers ``expression``, ``op``, ``wrong``,
        ``wrong_op``, ``hint_op``, ``hint``, ``hint_word`` and ``wrong_word``. Loaded rows
        have no solution and no fields."""
        if "solution" not in example:
            return {}
        if len(example["nums"]) == 2:
            return _pair_fields(
                example,
                rng,
                self.verify,
                self.hint_gold_fraction,
                self.wrong_numbers_fraction,
                self.num_range,
            )
        return _solution_fields(example, rng, self.verify)

    # --------------------------------------------------------------------------- turns
    def _fields(self, example: dict) -> dict:
        return {"nums": list(example["nums"]), "target": example["target"]}

    def prompt(self, example: dict) -> Prompt:
        messages = [
            {"role": "user", "content": self.prompt_template.format(**self._fields(example))}
        ]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return Prompt(messages=messages)

    def reflection_instruction(self, example: dict) -> str:
        return self.reflection_template.format(**self._fields(example))

    def retry_instruction(self, example: dict) -> str:
        return self.retry_template.format(**self._fields(example))

    # ------------------------------------------------------------------------ checking
    def diagnose(self, example: dict, completion: str) -> tuple[str, str]:
        try:
            nums, target = example["nums"], example["target"]
        except Exception:
            return MALFORMED, "the example has no 'nums'/'target'"
        return diagnose(nums, target, completion, fallback=self.answer_fallback)

    def verify(self, example: dict, completion: str) -> bool:
        return self.diagnose(example, completion)[0] == CORRECT
