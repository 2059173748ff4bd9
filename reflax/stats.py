"""Small-sample statistics for comparing two models on the same problems, without scipy.

* `wilson_interval`: the Wilson score interval of a proportion. Unlike the normal
  approximation p ± 1.96 sqrt(p(1-p)/n) it stays inside [0, 1] and keeps its coverage at
  small n and at p near 0 or 1 (0 of 20 is [0, 16.1%], not 0 ± 0).
* `mcnemar`: the exact McNemar test of paired pass/fail outcomes (model A and model B on
  the same problems). Only discordant problems carry information: under the null
  hypothesis that neither model is better, each of the b + c discordant problems is
  equally likely to favour either, so b ~ Binomial(b + c, 1/2); the two-sided p-value is
  2 P(X <= min(b, c)), capped at 1. It is computed with exact integers (math.comb).
* `across_seeds`: whether a training recipe helps across independent runs (seeds) judged
  on one evaluation set against one baseline. The seed is the unit of replication (the
  problems and the baseline are shared by every seed, so per-problem outcomes of
  different seeds are not independent and must not be pooled): each seed contributes
  one difference d_s = accuracy(trained_s) - accuracy(baseline). Reported are the paired
  t-test on the d_s (two-sided, Student's t with k - 1 degrees of freedom, its CDF in
  closed form for integer degrees of freedom) and the exact sign test (the number of
  positive d_s against Binomial(k', 1/2), ties dropped), which assumes nothing about the
  d_s' distribution but cannot go below p = 2^(1-k): 0.25 with 3 seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (low, high) of successes / n; (nan, nan) when n = 0."""
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return float("nan"), float("nan")
    p, z2 = successes / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # at 0 or n successes the bound is exactly 0 or 1 (round-off would leave ~1e-17)
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def binomial_two_sided(k: int, n: int) -> float:
    """Two-sided exact p-value of k successes in n trials at p = 1/2: 2 P(X <= min(k, n-k))."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got {k} of {n}")
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1))
    return min(1.0, 2 * tail / 2**n)  # exact integers; int / int rounds once


def mcnemar(first: Sequence[bool], second: Sequence[bool]) -> dict[str, Any]:
    """Exact McNemar test of paired outcomes: `first[i]`, `second[i]` say whether models A
    and B passed problem i. Returns n, `gained` (B passes where A fails), `lost` (A passes
    where B fails) and the two-sided p-value."""
    if len(first) != len(second):
        raise ValueError(f"paired outcomes need equal lengths, got {len(first)} and {len(second)}")
    gained = sum(1 for a, b in zip(first, second) if b and not a)
    lost = sum(1 for a, b in zip(first, second) if a and not b)
    return {
        "n": len(first),
        "gained": gained,
        "lost": lost,
        "p": binomial_two_sided(gained, gained + lost),
    }


def student_t_two_sided(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with integer df >= 1 (Abramowitz & Stegun 26.7.3-4)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2:  # odd: A = (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for j in range(1, (df - 3) // 2 + 1):
            term *= c2 * (2 * j) / (2 * j + 1)
            total += term
        inside = 2 / math.pi * (theta + s * math.cos(theta) * total)
    else:  # even: A = sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
        term = total = 1.0
        for j in range(1, (df - 2) // 2 + 1):
            term *= c2 * (2 * j - 1) / (2 * j)
            total += term
        inside = s * total
    return min(1.0, max(0.0, 1.0 - inside))


def across_seeds(differences: Sequence[float]) -> dict[str, Any]:
    """Tests of per-seed differences (trained - baseline accuracy), one per seed (module
    docstring): mean, the paired t-test (t, df, p; nan with fewer than 2 seeds or no spread)
    and the exact sign test (positive / negative seeds, p)."""
    d = [float(x) for x in differences]
    k = len(d)
    mean = sum(d) / k if k else float("nan")
    t = p_t = float("nan")
    if k >= 2:
        sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (k - 1))
        if sd > 0:
            t = mean / (sd / math.sqrt(k))
            p_t = student_t_two_sided(t, k - 1)
        elif mean != 0:  # every seed moved by exactly the same amount
            t, p_t = math.copysign(math.inf, mean), 0.0
    pos, neg = sum(x > 0 for x in d), sum(x < 0 for x in d)
    return {
        "seeds": k,
        "mean": mean,
        "t": t,
        "df": k - 1,
        "p_t": p_t,
        "positive": pos,
        "negative": neg,
        "p_sign": binomial_two_sided(pos, pos + neg),
    }
