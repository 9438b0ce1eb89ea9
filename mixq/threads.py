"""CPU threads that fit what the machine has free, for long CPU runs (calibration).

PyTorch starts one OpenMP thread per core. When another process keeps some of those cores busy, the
threads that share a core with it are descheduled while the others spin at every barrier: on a
2-core Xeon with one core busy, calibration took about 13 s per layer with 2 threads against 1.2 s
with 1 (benchmarks/results/cpu-calibration-threads-2026-12-06.md). So
long runs choose their thread count from the cores this process may use (its CPU affinity) minus the
cores other processes keep busy, measured from /proc/stat (over a short window at the first choice, then
over the time since the last one, which costs no waiting), and choose again from time to time as the
load changes. `--threads N` (or OMP_NUM_THREADS) fixes the count instead.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from mixq.errors import ConfigError

MEASURE_SECONDS = 0.3
RECHOOSE_EVERY_SECONDS = 30.0


def usable_cpus() -> list[int]:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def cpu_busy_seconds(cpus: list[int]) -> float | None:
    """Seconds the given CPUs have spent busy since boot (all processes), from /proc/stat; None off Linux."""
    stat = Path("/proc/stat")
    if not stat.is_file():
        return None
    wanted, ticks = {f"cpu{c}" for c in cpus}, 0
    for line in stat.read_text().splitlines():
        fields = line.split()
        if fields and fields[0] in wanted:
            values = [int(v) for v in fields[1:]]
            ticks += sum(values[:8]) - values[3] - values[4]  # all but idle and iowait (guest is inside user)
    return ticks / os.sysconf("SC_CLK_TCK")


def load_reading(cpus: list[int]) -> tuple[float, float, float] | None:
    """(busy seconds of `cpus` since boot, this process's CPU seconds, monotonic time); None off Linux."""
    busy = cpu_busy_seconds(cpus)
    return None if busy is None else (busy, time.process_time(), time.monotonic())


def busy_cores_of_others(seconds: float = MEASURE_SECONDS, since: tuple | None = None) -> float | None:
    """How many of this process's usable cores other processes kept busy over the last `seconds`, or
    since the load_reading `since` (waiting only what makes that window `seconds` long)."""
    cpus = usable_cpus()
    start = since if since is not None else load_reading(cpus)
    if start is None:
        return None
    time.sleep(max(0.0, seconds - (time.monotonic() - start[2])))
    end = load_reading(cpus)
    others = (end[0] - start[0]) - (end[1] - start[1])
    return max(0.0, others / (end[2] - start[2]))


def fitting_threads(cores: int, busy_elsewhere: float | None) -> int:
    """Threads for `cores` usable cores of which `busy_elsewhere` are busy with other processes: the
    free cores, rounded, at least one."""
    if busy_elsewhere is None:
        return cores
    return max(1, min(cores, round(cores - busy_elsewhere)))


class ThreadPolicy:
    """Sets torch's intra-op threads to what fits now, and again at most every RECHOOSE_EVERY_SECONDS.

    `fixed` (from --threads or OMP_NUM_THREADS) turns the choice off."""

    def __init__(self, fixed: int | None = None, log=None):
        source = "--threads"
        if fixed is None and os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
            fixed, source = int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
        if fixed is not None and fixed < 1:
            raise ConfigError(f"{source} {fixed}: give at least 1 (or leave it out to use the free cores)")
        self.fixed, self.log = fixed, log
        self.threads: int | None = None
        self.chosen_at = -float("inf")
        self.last_reading = None  # the load when last chosen: the next choice measures from it

    @property
    def reason(self) -> str:
        return "fixed" if self.fixed is not None else "free cores"

    def choose(self) -> int:
        """Choose now (also when chosen recently); returns the thread count."""
        cores = len(usable_cpus())
        if self.fixed is not None:
            threads = self.fixed
        else:
            threads = fitting_threads(cores, busy_cores_of_others(since=self.last_reading))
            self.last_reading = load_reading(usable_cpus())
        self.chosen_at = time.monotonic()
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        if threads != self.threads and self.log is not None:
            self.log(f"threads: {threads} of {cores} cores ({self.reason})")
        self.threads = threads
        return threads

    def maybe_rechoose(self) -> int:
        """Choose again if the last choice is old (the load of other processes may have changed)."""
        if self.fixed is None and time.monotonic() - self.chosen_at >= RECHOOSE_EVERY_SECONDS:
            return self.choose()
        return self.threads
