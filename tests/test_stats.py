"""reflax.stats against hand-computed and tabulated values."""

from __future__ import annotations

import json
import math

import pytest

from reflax.evaluate import _results_main, paired_tests, runs_table, table
from reflax.stats import (
    across_seeds,
    binomial_two_sided,
    mcnemar,
    student_t_two_sided,
    wilson_interval,
)


def test_wilson_interval_known_values():
    # 0 of 20: [0, z^2 / (n + z^2)] = [0, 0.1611]; 5 of 10: 0.5 ± 0.2634 (symmetric at p=1/2)
    assert wilson_interval(0, 20) == (0.0, pytest.approx(3.8415 / 23.8415, rel=1e-4))
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    # 1 of 10, as tabulated (Newcombe 1998 method 3): 0.0179 - 0.4042
    low, high = wilson_interval(1, 10)
    assert low == pytest.approx(0.0179, abs=1e-4) and high == pytest.approx(0.4042, abs=1e-4)
    assert wilson_interval(20, 20)[1] == 1.0
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    with pytest.raises(ValueError, match="successes <= n"):
        wilson_interval(3, 2)


def test_exact_binomial_and_mcnemar():
    # 1 vs 9 discordant: 2 (C(10,0) + C(10,1)) / 2^10 = 22 / 1024
    assert binomial_two_sided(1, 10) == 22 / 1024
    assert binomial_two_sided(9, 10) == 22 / 1024
    assert binomial_two_sided(5, 10) == 1.0 and binomial_two_sided(0, 0) == 1.0
    # large n stays exact: 0 of 2000 is 2^-1999, not 0 or an overflow
    assert binomial_two_sided(0, 2000) == 2.0**-1999
    before = [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    after = [1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1]
    r = mcnemar([bool(x) for x in before], [bool(x) for x in after])
    assert (r["n"], r["gained"], r["lost"]) == (12, 8, 1)
    assert r["p"] == 2 * (1 + 9) / 2**9  # 0.0391
    with pytest.raises(ValueError, match="equal lengths"):
        mcnemar([True], [True, False])


@pytest.mark.parametrize(
    "t,df,p",
    [
        (1.0, 1, 0.5),  # Cauchy: P(|T| >= 1) = 1/2
        (2.0, 2, 1 - 2 / math.sqrt(6)),  # df 2: P(|T| < t) = t / sqrt(2 + t^2)
        (12.706205, 1, 0.05),  # the t table's 95% two-sided critical values
        (4.302653, 2, 0.05),
        (3.182446, 3, 0.05),
        (2.776445, 4, 0.05),
        (2.570582, 5, 0.05),
        (2.228139, 10, 0.05),
        (2.845340, 20, 0.01),
        (0.0, 7, 1.0),
    ],
)
def test_student_t_known_values(t, df, p):
    assert student_t_two_sided(t, df) == pytest.approx(p, abs=2e-7)
    assert student_t_two_sided(-t, df) == student_t_two_sided(t, df)


def test_across_seeds():
    r = across_seeds([0.10, 0.20, 0.30])  # mean 0.2, sd 0.1: t = 0.2 / (0.1 / sqrt 3)
    assert r["t"] == pytest.approx(2 * math.sqrt(3))
    assert r["p_t"] == pytest.approx(student_t_two_sided(2 * math.sqrt(3), 2))
    assert (r["positive"], r["negative"], r["p_sign"]) == (3, 0, 0.25)
    tie = across_seeds([0.1, -0.1, 0.0, 0.0])
    assert tie["mean"] == 0 and tie["p_t"] == 1.0 and tie["p_sign"] == 1.0
    same = across_seeds([0.05, 0.05])
    assert same["p_t"] == 0.0 and same["t"] == math.inf
    one = across_seeds([0.1])
    assert math.isnan(one["p_t"]) and one["p_sign"] == 1.0


def _result(first: list[int], second: list[int]) -> dict:
    n = len(first)
    return {
        "n": n,
        "first_try": sum(first) / n,
        "second_try": sum(second) / n,
        "first_try_ci95": list(wilson_interval(sum(first), n)),
        "second_try_ci95": list(wilson_interval(sum(second), n)),
        "outcomes": {"first_try": first, "second_try": second},
    }


def test_table_prints_wilson_intervals_and_paired_tests():
    vanilla = _result([1, 0, 0, 0, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    runs = {
        "vanilla": vanilla,
        "trained s1": _result([1, 1, 0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1, 0]),
        "trained s2": _result([0, 0, 0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]),
        "other problems": _result([1, 0], [1, 1]),  # not paired with vanilla: left out
    }
    tests = paired_tests(runs)
    m = tests["mcnemar"]["trained s1"]
    assert (m["second_try"]["gained"], m["second_try"]["lost"]) == (8, 0)
    assert m["second_try"]["p"] == 2 / 2**8
    assert (m["first_try"]["gained"], m["first_try"]["lost"], m["first_try"]["p"]) == (1, 0, 1.0)
    m2 = tests["mcnemar"]["trained s2"]["first_try"]
    assert (m2["gained"], m2["lost"]) == (0, 1)
    assert set(tests["mcnemar"]) == {"trained s1", "trained s2"}
    across = tests["across_runs"]["second_try"]
    assert across["seeds"] == 2 and across["mean"] == pytest.approx((0.8 + 0.4) / 2)
    assert across["p_t"] == pytest.approx(student_t_two_sided(0.6 / (0.2828427 / 2**0.5), 1))

    text = table(runs, "title")
    assert "10.0 [1.8, 40.4]" in text  # vanilla's 1 of 10 with its Wilson interval
    assert "+8 -0 p=0.00781" in text and "across 2 runs vs vanilla, second try" in text
    # one model alone, or results without outcomes: no tests, the table as before
    assert "paired" not in table({"vanilla": vanilla})
    assert paired_tests({k: {**r, "outcomes": None} for k, r in runs.items()}) == {}


def test_results_of_several_runs_read_from_their_eval_files(tmp_path, capsys):
    vanilla = _result([1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0])
    afters = [
        _result([1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]),
        _result([1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]),
        _result([0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]),
    ]
    paths = []
    for k, after in enumerate(afters, 1):
        (tmp_path / f"s{k}").mkdir()
        paths.append(str(tmp_path / f"s{k}" / "eval.json"))
        (tmp_path / f"s{k}" / "eval.json").write_text(
            json.dumps({"before": vanilla, "after": after})
        )
    rows, notes = runs_table({"s1": {"before": vanilla, "after": afters[0]}})
    assert list(rows) == ["vanilla", "s1 after"] and notes == []
    out = tmp_path / "summary.json"
    _results_main(paths, str(out))
    text = capsys.readouterr().out
    assert "3 runs" in text and "s3 after" in text and "across 3 runs vs vanilla" in text
    summary = json.loads(out.read_text())
    assert list(summary["results"]) == ["vanilla", "s1 after", "s2 after", "s3 after"]
    m = summary["tests"]["mcnemar"]["s1 after"]["second_try"]
    assert (m["gained"], m["lost"]) == (3, 0)
    across = summary["tests"]["across_runs"]["second_try"]
    assert across["mean"] == pytest.approx((3 + 2 + 0) / 6 / 3)
    # a run whose vanilla differs is named; a file without "after" is an error
    other = _result([0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0])
    runs = {"a": {"before": vanilla, "after": vanilla}, "b": {"before": other, "after": other}}
    _, notes = runs_table(runs)
    assert notes == ["run 'b': its vanilla outcomes differ from run 'a''s"]
    with pytest.raises(ValueError, match="run 'x' has no after results"):
        runs_table({"x": {"before": vanilla}})
