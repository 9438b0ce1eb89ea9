"""Layers of the sensitivity pass measured side by side on CPU: one evaluator per thread.

On a small model a layer's measurement is many small operators, and their Python and dispatch work
runs on one thread whatever the intra-op thread count: on the offline default, 2 intra-op threads made
a layer only 1.55-1.75x faster than 1 (2-core AMD EPYC). Where copies of the pipeline fit in memory,
the pass runs one evaluator per thread instead, each on its own copy of the pipeline with one intra-op
thread, each taking the next layer when it finishes one; the float work recorded ahead of each layer
(mixq.calib.prefix) is shared. The offline default's pass took 0.88x the time there, the whole run
0.90x (benchmarks/results/cpu-calibration-workers-2026-12-07.md).

A row does not depend on which evaluator measured it, nor on the order: it is what the pass's own
evaluator (its float reference and recorded prefix made with every thread) measures with one thread
(tests/test_sensitivity_workers.py). Where a kernel sums in an order that depends on the thread count,
that can differ in the last digits from a measurement with every thread. On the offline default on that
EPYC, only the 1x1 convolutions did: oneDNN's float32 1x1 convolution of a batch of 8 (a candidate's
share of the batch) is not bit for bit the same on 1 and 2 threads, and the shortcut convolutions'
scores moved by up to 2e-4 (relative). So 1x1 convolutions are measured after the others, one at a time
with every thread, and there the table came out byte for byte the one a pass of one layer at a time
writes. Elsewhere (the tiny test models' small linear layers, other CPUs) rows can still differ in their
last digits; MIXQ_SENSITIVITY_WORKERS=1 measures one layer at a time.
"""

from __future__ import annotations

import os
import queue
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Iterator

import torch

from mixq.errors import ConfigError

WORKERS_VARIABLE = "MIXQ_SENSITIVITY_WORKERS"
MEMORY_SHARE = 0.25  # the copies of the pipeline may take this share of the memory available


def model_bytes(pipe) -> int:
    """Bytes of the pipeline's parameters and buffers (what a copy of it costs)."""
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    return sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers()))


def available_memory_bytes() -> int | None:
    """Memory the system can give without swapping, or None where unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def requested_workers() -> int | None:
    """MIXQ_SENSITIVITY_WORKERS as a count, None when unset."""
    text = os.environ.get(WORKERS_VARIABLE, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{WORKERS_VARIABLE}={text!r}: give a whole number of at least 1 (1 measures one layer at "
                          "a time with every thread), or unset it to choose from the threads and memory")
    return int(text)


def worker_count(pipe, threads: int, processes: int = 1) -> int:
    """How many evaluators measure side by side: one per CPU thread where copies of the pipeline fit in
    MEMORY_SHARE of the available memory; one (the intra-op threads doing the work) on a GPU, under
    torchrun (its processes already share the cores), or where memory is short or unknown.
    MIXQ_SENSITIVITY_WORKERS sets the count on CPU (1 turns this off)."""
    if pipe.device.type != "cpu":
        return 1
    requested = requested_workers()
    if requested is not None:
        return requested
    if processes > 1 or threads < 2:
        return 1
    available = available_memory_bytes()
    if available is None:
        return 1
    copies_fitting = int(available * MEMORY_SHARE) // max(1, model_bytes(pipe))
    return max(1, min(threads, 1 + copies_fitting))


def sums_depend_on_threads(module) -> bool:
    """Layers measured one at a time with every thread (see above): 1x1 convolutions."""
    return isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) == (1, 1)


def one_by_one(evaluator, names: list[str], measure: Callable) -> Iterator[tuple[str, object, float]]:
    """measure(evaluator, name) for each name in turn; yields (name, result, seconds)."""
    for name in names:
        started = time.monotonic()
        result = measure(evaluator, name)
        yield name, result, time.monotonic() - started


def side_by_side(evaluators: list, names: list[str], measure: Callable) -> Iterator[tuple[str, object, float]]:
    """measure(evaluator, name) for every name, on one thread per evaluator, each with one intra-op
    thread, each evaluator used by one thread at a time; yields (name, result, seconds) as they finish.
    Leaving early (an error, Ctrl-C) cancels the names not started and waits for the running ones."""
    free = queue.SimpleQueue()
    for evaluator in evaluators:
        free.put(evaluator)

    def job(name):
        evaluator = free.get()
        try:
            with torch.no_grad():  # grad mode is per thread
                started = time.monotonic()
                return name, measure(evaluator, name), time.monotonic() - started
        finally:
            free.put(evaluator)

    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(len(evaluators), thread_name_prefix="mixq-sensitivity")
    try:
        for future in as_completed([pool.submit(job, name) for name in names]):
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads_before)


def parallelism_text(workers: int, threads: int) -> str:
    if workers > 1:
        return f"{workers} layers at a time, 1 thread each"
    return f"{threads} thread" if threads == 1 else f"{threads} threads"
