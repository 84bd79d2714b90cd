"""Summaries over seeds: mean, sample sd and the paired difference's Student-t 95% interval.

The t quantile is computed here (regularized incomplete beta + bisection) because scipy is not a
dependency of advews.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple


@dataclass(frozen=True)
class Stat:
    """Mean and sample sd (None below two values) of n values; a paired difference adds its 95% CI."""
    n: int
    mean: float
    sd: Optional[float]
    ci: Optional[Tuple[float, float]] = None


def t_quantile(p: float, df: int) -> float:
    """Student-t quantile for p in [0.5, 1), by bisection on the CDF (scipy is not a dependency)."""
    if not 0.5 <= p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 <= p < 1 and df >= 1, got p={p}, df={df}")
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def _t_cdf(t: float, df: int) -> float:
    """P(T <= t) for t >= 0: 1 - I_x(df/2, 1/2) / 2 with x = df / (df + t^2)."""
    return 1 - 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) by its continued fraction (Numerical Recipes 6.4)."""
    if x <= 0 or x >= 1:
        return max(0.0, min(1.0, x))
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _beta_fraction(a, b, x) / a
    return 1 - front * _beta_fraction(b, a, 1 - x) / b


def _beta_fraction(a: float, b: float, x: float) -> float:
    def clip(v: float) -> float:  # Lentz's method: keep denominators off zero
        return 1e-300 if abs(v) < 1e-300 else v

    c, d = 1.0, 1 / clip(1 - (a + b) * x / (a + 1))
    h = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 / clip(1 + num * d)
            c = clip(1 + num / c)
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h


def summarize(values: Sequence[float], paired: bool = False) -> Stat:
    """Mean and sample sd (ddof 1) of ``values``; ``paired`` differences also get their 95% t CI."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Stat(n, mean, None)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    if not paired:
        return Stat(n, mean, sd)
    half = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
    return Stat(n, mean, sd, (mean - half, mean + half))
