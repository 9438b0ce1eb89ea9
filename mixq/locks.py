"""Advisory folder locks: one writer at a time per folder, readers never beside a writer.

`save_quantized` and every stage of `python -m mixq.calibrate` hold an exclusive lock on their folder
while they write; `load_quantized` holds a shared one while it reads, so a load during a save returns
the old or the new checkpoint, never a mix. A second writer (or a reader during a write) waits, after
saying once which process holds the folder; the lock is the kernel's (`fcntl.flock` on the folder
itself, so no lock file lands in a checkpoint), released when the holder exits or crashes, so a
crashed process never leaves a stale lock. Locks are re-entrant within a process. Where `fcntl` or
flock on folders is unavailable (Windows, some network filesystems), folders are not locked.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

_held: dict[str, tuple[int, int, str]] = {}  # folder -> (fd, depth, mode) held by this process
_guard = threading.Lock()


def holders(folder: Path) -> list[int]:
    """Processes holding a flock on `folder`, from /proc/locks (Linux); empty where unknown."""
    try:
        inode = os.stat(folder).st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    pids = []
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; waiters read "1: -> FLOCK ..."
        held = "FLOCK" in fields and "->" not in fields and len(fields) >= 6
        if held and fields[-3].rsplit(":", 1)[-1] == str(inode):
            pid = fields[-4]
            if pid.isdigit() and int(pid) != os.getpid():
                pids.append(int(pid))
    return sorted(set(pids))


@contextmanager
def folder_lock(folder, shared: bool = False, what: str = "writing", say=None):
    """Hold `folder` (which must exist) exclusively, or shared with other readers, for the block."""
    folder = Path(folder)
    key = str(folder.resolve())
    with _guard:
        held = _held.get(key)
        if held is not None and not shared and held[2] == "shared":
            raise RuntimeError(f"{folder}: this process reads it (shared lock) and may not write it inside the read")
        reentered = held is not None
        if reentered:
            _held[key] = (held[0], held[1] + 1, held[2])
    if reentered:
        try:
            yield
        finally:
            _release(key)
        return
    fd = _open_folder(folder)
    if fd is None or not _acquire(fd, folder, shared, what, say):
        yield  # no flock here: unlocked
        return
    with _guard:
        _held[key] = (fd, 1, "shared" if shared else "exclusive")
    try:
        yield
    finally:
        _release(key)


def _acquire(fd: int, folder: Path, shared: bool, what: str, say) -> bool:
    """Take the flock on `fd`, waiting (with one message) while another process holds it; False, with
    `fd` closed, where the filesystem does not support flock."""
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            pids = holders(folder)
            who = f"process {', '.join(map(str, pids))}" if pids else "another process"
            (say or _stderr)(f"{folder}: {who} is using it; waiting until it is done before {what}")
            fcntl.flock(fd, mode)
    except OSError:
        os.close(fd)
        return False
    except BaseException:  # interrupted while waiting
        os.close(fd)
        raise
    return True


def _release(key: str):
    with _guard:
        fd, depth, mode = _held[key]
        if depth > 1:
            _held[key] = (fd, depth - 1, mode)
            return
        del _held[key]
    os.close(fd)  # closing the last descriptor releases the flock


def _open_folder(folder: Path) -> int | None:
    if fcntl is None:
        return None
    try:
        return os.open(folder, os.O_RDONLY)
    except OSError:
        return None


def _stderr(message: str):
    print(message, file=sys.stderr, flush=True)
