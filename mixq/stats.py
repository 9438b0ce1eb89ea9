"""Paired statistics for comparing configurations on the same prompts and seeds.

Every comparison mixq reports is paired (the same prompts, seeds and float reference for both
configurations), so the tests here are paired ones: exact McNemar for yes/no verdicts, and a Student-t
interval of the mean difference for per-image measures.
"""

from __future__ import annotations

import math

import numpy as np

SIGNIFICANCE = 0.01  # a report claims better or worse only below this p-value
Z95 = 1.959964  # the normal quantile of 0.975


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(a, b) -> float:
    """Two-sided exact McNemar p-value for paired verdicts (the binomial test on the discordant pairs)."""
    if len(a) != len(b):
        raise ValueError(f"paired verdicts of different lengths: {len(a)} and {len(b)}")
    only_a = sum(bool(x) and not bool(y) for x, y in zip(a, b))
    only_b = sum(bool(y) and not bool(x) for x, y in zip(a, b))
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_difference(a, b) -> dict:
    """Mean of a - b over paired samples with its 95 % Student-t interval and two-sided p-value."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.ndim != 1 or len(d) < 2:
        raise ValueError(f"need at least two paired samples, got shape {d.shape}")
    n = len(d)
    mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(n))
    if se == 0:
        return {"mean": mean, "low": mean, "high": mean, "p": 1.0 if mean == 0 else 0.0, "n": n}
    half = student_t_quantile(0.975, n - 1) * se
    p = 2 * (1 - student_t_cdf(abs(mean) / se, n - 1))
    return {"mean": mean, "low": mean - half, "high": mean + half, "p": max(p, 0.0), "n": n}


def student_t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with df degrees of freedom (through the regularized incomplete beta)."""
    tail = 0.5 * _regularized_beta(df / (df + t * t), df / 2, 0.5)
    return 1 - tail if t > 0 else tail


def student_t_quantile(q: float, df: int) -> float:
    """The t with student_t_cdf(t, df) = q, for q in (0.5, 1), by bisection."""
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < q:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if student_t_cdf(mid, df) < q else (low, mid)
    return (low + high) / 2


def _regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) by its continued fraction (Lentz's method), on the side where it converges fast."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1 - _regularized_beta(1 - x, b, a)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return front * result


def per_image_psnr(reference: np.ndarray, images: np.ndarray) -> np.ndarray:
    """PSNR (dB) of each uint8 image against its reference. An image identical to its reference is
    counted as one off by one level in a single value, so identical images get a finite (high) PSNR
    and means and differences stay defined."""
    a = reference.reshape(len(reference), -1).astype(np.float64) / 255
    b = images.reshape(len(images), -1).astype(np.float64) / 255
    floor = (1 / 255) ** 2 / a.shape[1]
    mse = np.maximum(((a - b) ** 2).mean(axis=1), floor)
    return 10 * np.log10(1 / mse)


def describe_p(p: float) -> str:
    return f"p = {p:.2g}"
