"""Paired timing for the A/B benchmarks: the arms are called in turn, round after round, so that the
machine's drift over the minutes of a run falls on all of them alike."""

from __future__ import annotations

import contextlib
import os
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
