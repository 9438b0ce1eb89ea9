"""Paired statistics for comparing configurations on the same prompts and seeds.

Every comparison mixq reports is paired (the same prompts, seeds and float reference for both
configurations), so the tests here are paired ones: exact McNemar for yes/no verdicts, and a normal
interval of the mean difference for per-image measures.
"""

from __future__ import annotations

import math

import numpy as np

SIGNIFICANCE = 0.01  # a report claims better or worse only below this p-value
Z95 = 1.959964


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


def paired_difference(a, b, z: float = Z95) -> dict:
    """Mean of a - b over paired samples with its 95 % normal interval and two-sided p-value (fine
    from a few dozen pairs on; the reports use hundreds)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.ndim != 1 or len(d) < 2:
        raise ValueError(f"need at least two paired samples, got shape {d.shape}")
    mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))
    p = 1.0 if se == 0 and mean == 0 else 0.0 if se == 0 else math.erfc(abs(mean) / se / math.sqrt(2))
    return {"mean": mean, "low": mean - z * se, "high": mean + z * se, "p": p, "n": len(d)}


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
