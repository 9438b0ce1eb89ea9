"""Paired timing for the A/B benchmarks: the arms are called in turn, round after round, so that the
machine's drift over the minutes of a run falls on all of them alike."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Callable, ContextManager

import torch


@contextlib.contextmanager
def environment_set(variables: dict):
    """Environment variables set for the block only (the kernels read MIXQ_* switches at each call)."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def alternate(arms: dict[str, tuple[Callable[[], object], Callable[[], ContextManager]]],
              rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each arm (name -> (call, the context it runs in, entered outside the timing)):
    one warm-up call each, then `rounds` rounds in which every arm runs once, in turn; under no_grad."""
    times = {name: [] for name in arms}
    with torch.no_grad():
        for call, context in arms.values():
            with context():
                call()
        for _ in range(rounds):
            for name, (call, context) in arms.items():
                with context():
                    start = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - start)
    return times


def ratio_cell(numerators: list[float], denominators: list[float], label: str = "") -> str:
    """Per-round ratios numerator / denominator: 'median x [min, max]' ('median x label [min, max]')."""
    ratios = [a / b for a, b in zip(numerators, denominators)]
    named = f" {label}" if label else ""
    return f"{statistics.median(ratios):.2f}x{named} [{min(ratios):.2f}, {max(ratios):.2f}]"


def speedup_cells(times: dict[str, list[float]], baseline: str, unit: str = "s") -> str:
    """Each arm's median ('s' with 3 decimals, or 'ms' with 1) and, but for the baseline, its per-round
    speed-up over it (the baseline's time over the arm's in the same round), '; '-joined."""
    scale, digits = (1e3, 1) if unit == "ms" else (1.0, 3)
    cells = []
    for arm, samples in times.items():
        cell = f"{arm} {statistics.median(samples) * scale:.{digits}f} {unit}"
        if arm != baseline:
            cell += f" ({ratio_cell(times[baseline], samples, baseline)})"
        cells.append(cell)
    return "; ".join(cells)
