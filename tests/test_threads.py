"""Thread counts that fit the machine (mixq.threads): the free cores, measured, at least one."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from mixq import threads
from mixq.threads import ThreadPolicy, busy_cores_of_others, fitting_threads


@pytest.mark.parametrize("cores, busy, expected", [
    (2, 0.0, 2), (2, 0.3, 2), (2, 0.97, 1), (2, 2.0, 1), (2, 5.0, 1), (8, 2.6, 5), (4, None, 4), (1, 0.0, 1),
])
def test_fitting_threads_are_the_free_cores_rounded_at_least_one(cores, busy, expected):
    assert fitting_threads(cores, busy) == expected


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_busy_process_is_seen_and_leaves_its_core(restore_threads, monkeypatch):
    if threads.cpu_busy_seconds(threads.usable_cpus()) is None:
        pytest.skip("no /proc/stat on this OS")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = busy_cores_of_others(0.5)
        chosen = ThreadPolicy().choose()
    finally:
        spinner.kill()
        spinner.wait()
    assert busy > 0.4, f"a spinning process measured as {busy:.2f} busy cores"
    # The policy measures for itself, a moment later: other load (a parallel test worker) may differ
    # between the two measurements, so its choice is bounded rather than recomputed from `busy`.
    assert torch.get_num_threads() == chosen >= 1
    assert chosen < len(threads.usable_cpus()) or len(threads.usable_cpus()) == 1


def test_a_later_choice_measures_the_time_since_the_last_one_without_waiting(restore_threads, monkeypatch):
    if threads.cpu_busy_seconds(threads.usable_cpus()) is None:
        pytest.skip("no /proc/stat on this OS")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    policy = ThreadPolicy()
    policy.choose()
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(2 * threads.MEASURE_SECONDS)
        slept = []
        monkeypatch.setattr(threads.time, "sleep", lambda seconds: slept.append(seconds))
        busy = busy_cores_of_others(since=policy.last_reading)
        policy.choose()
    finally:
        spinner.kill()
        spinner.wait()
    assert slept and max(slept) == 0.0, f"waited {slept} although the window since the last choice was long enough"
    assert busy > 0.4, f"a process spinning since the last choice measured as {busy:.2f} busy cores"
    assert torch.get_num_threads() == policy.threads >= 1


def test_fixed_threads_are_kept_and_logged_once(restore_threads, monkeypatch):
    monkeypatch.setattr(threads, "busy_cores_of_others", lambda seconds=0, since=None: pytest.fail("measured while fixed"))
    said = []
    policy = ThreadPolicy(fixed=1, log=said.append)
    assert policy.choose() == 1 and policy.maybe_rechoose() == 1 and torch.get_num_threads() == 1
    assert said == [f"threads: 1 of {len(threads.usable_cpus())} cores (fixed)"]


def test_omp_num_threads_fixes_the_count(restore_threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert ThreadPolicy().fixed == 1


def test_rechoosing_waits_for_its_interval(restore_threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    measured = []
    monkeypatch.setattr(threads, "busy_cores_of_others", lambda seconds=0, since=None: measured.append(1) or 0.0)
    policy = ThreadPolicy()
    policy.choose()
    policy.maybe_rechoose()
    assert len(measured) == 1
    policy.chosen_at -= threads.RECHOOSE_EVERY_SECONDS
    policy.maybe_rechoose()
    assert len(measured) == 2


def test_zero_threads_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        ThreadPolicy(fixed=0)
