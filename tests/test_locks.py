"""mixq.locks in one process: re-entrant, a write inside a read refused, errors pass through unchanged,
and a filesystem without flock means unlocked, not broken."""

from __future__ import annotations

import errno
import os

import pytest

from mixq import locks


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


def test_locks_are_reentrant_and_released(tmp_path):
    before = open_descriptors()
    with locks.folder_lock(tmp_path):
        with locks.folder_lock(tmp_path), locks.folder_lock(tmp_path, shared=True):
            assert str(tmp_path.resolve()) in locks._held
    assert str(tmp_path.resolve()) not in locks._held and open_descriptors() == before


def test_writing_inside_a_read_is_refused(tmp_path):
    with locks.folder_lock(tmp_path, shared=True):
        with pytest.raises(RuntimeError, match="may not write it inside the read"):
            with locks.folder_lock(tmp_path):
                pass


def test_an_error_in_the_block_passes_through_and_releases(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with locks.folder_lock(tmp_path):
            1 / 0
    assert str(tmp_path.resolve()) not in locks._held


@pytest.mark.skipif(locks.fcntl is None, reason="no fcntl on this OS")
def test_a_filesystem_without_flock_runs_unlocked(tmp_path, monkeypatch):
    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(locks.fcntl, "flock", no_flock)
    before, ran = open_descriptors(), []
    with pytest.raises(KeyError):  # the block's own error, not a double close
        with locks.folder_lock(tmp_path):
            ran.append(True)
            raise KeyError("body")
    assert ran and open_descriptors() == before
