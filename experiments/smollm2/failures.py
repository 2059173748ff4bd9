"""The failures an evaluation kept (attempt, reflection, retry), before and after, as
Markdown for the README: the first `--n` of each.

    python experiments/smollm2/failures.py --eval=experiments/smollm2/test/s1/eval.json --n=10

`eval.json` is what `reflax.train` writes: "before" and "after", each with `samples`, the
first failures of its evaluation in the order of the problems (`reflax.evaluate`). Texts
are printed as the model wrote them, with newlines shown as a space and `|` escaped.
"""

from __future__ import annotations

import argparse
import json


def cell(text: str, limit: int = 400) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def failures_markdown(results: dict, n: int) -> str:
    lines = []
    for name in ("before", "after"):
        kept = results.get(name, {}).get("samples", [])[:n]
        lines += [
            f"**{name}** (first {len(kept)} failures of the first try)",
            "",
            "| problem | attempt | reflection | retry | retry passed |",
            "|---|---|---|---|---|",
        ]
        for s in kept:
            row = [str(s["index"]), *(cell(s[k]) for k in ("attempt", "reflection", "retry"))]
            lines.append("| " + " | ".join(row) + f" | {'yes' if s['passed'] else 'no'} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval", required=True, help="a run's eval.json")
    p.add_argument("--n", type=int, default=10, help="failures of each model")
    a = p.parse_args()
    with open(a.eval) as f:
        print(failures_markdown(json.load(f), a.n))


if __name__ == "__main__":
    main()
