"""Native CPU helpers, compiled on first use with the machine's C compiler and called through ctypes.

activation_codes.c quantizes an activation in one pass (division, rounding, clamp, the store of
the codes, the NCHW -> channels-last transpose convolutions need, and the NaN/Inf test), where torch
ops take five to eight passes and as many dispatches per layer call. It is plain C (no Python or
torch headers), so a build takes well under a second; the library is cached per source, compiler
and CPU (it is built for the CPU at hand) in MIXQ_NATIVE_CACHE, else ~/.cache/mixq, written atomically,
so concurrent processes never load a partial file.

Where it cannot be had (no compiler, a failed build, not an x86 CPU), callers run the torch ops
instead, with one warning naming why: never a wrong result, only a slower one; MIXQ_NATIVE=0 turns it
off without a warning (for A/B runs). A build is checked against the torch reference (rounding ties,
clamping, both dtypes, the transpose, a NaN) before its first use.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from .fallback import warn_once

SOURCE = Path(__file__).with_name("activation_codes.c")
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
X86_MACHINES = ("x86_64", "amd64")
# -ffast-math must never be added: it allows a reciprocal in place of the division.
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared", "-std=c11"]


class NativeFallbackWarning(UserWarning):
    """mixq's native CPU helpers are unavailable; torch ops run instead (same results, slower)."""


_state: dict = {}
_lock = threading.Lock()


def cache_dir() -> Path:
    """Where built libraries are kept: MIXQ_NATIVE_CACHE, else ~/.cache/mixq (beside the Triton autotune cache)."""
    configured = os.environ.get("MIXQ_NATIVE_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "mixq"


def enabled() -> bool:
    return os.environ.get("MIXQ_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def library():
    """The loaded library, or None (with one warning naming why) where it cannot be had."""
    if not enabled():
        return None
    if "library" not in _state:
        with _lock:
            if "library" not in _state:
                _state["library"], _state["reason"] = _load()
    if _state["library"] is None:
        warn_once(NativeFallbackWarning, _state["reason"],
                  f"mixq: the native activation quantization is unavailable ({_state['reason']}); running torch "
                  "ops instead (same codes, slower). Install a C compiler (or set CC) to get it.", stacklevel=4)
    return _state["library"]


def unavailable_reason() -> str | None:
    if not enabled():
        return "MIXQ_NATIVE=0"
    library()
    return _state.get("reason")


def _load() -> tuple:
    if platform.machine().lower() not in X86_MACHINES:
        return None, f"not an x86-64 CPU ({platform.machine()})"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        return None, "no C compiler found (cc, gcc, clang or $CC)"
    try:
        path = _built(compiler)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"building {SOURCE.name} failed: {str(error).strip()[:300]}"
    fn = lib.mixq_activation_codes
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_float, ctypes.c_float, ctypes.c_float, ctypes.c_float, ctypes.c_int]
    problem = _self_check(fn)
    if problem:
        return None, problem
    return fn, None


def _built(compiler: str) -> Path:
    """The compiled library for this source, compiler and CPU, built now if the cache has none."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, " ".join(FLAGS), _cpu_signature()])
                         .encode()).hexdigest()[:20]
    path = cache_dir() / f"activation_codes-{key}.so"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        partial = Path(scratch) / path.name
        result = subprocess.run([compiler, *FLAGS, "-o", str(partial), str(SOURCE), "-lpthread"],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise subprocess.SubprocessError(result.stderr or result.stdout)
        os.replace(partial, path)  # atomic: a concurrent build writes the same bytes
    return path


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    from mixq.machine import cpu_flags, cpu_model

    return f"{cpu_model()}|{cpu_flags() or platform.processor()}"


def _self_check(fn) -> str | None:
    """None when the build gives the reference's codes on inputs chosen to catch a wrong rounding mode, a
    reciprocal in place of the division, a wrong clamp or transpose; else what went wrong."""
    from mixq.quantizers import quantize_activation

    scale, zero = 0.1, 3.0
    ties = (torch.arange(-300, 300, dtype=torch.float32) + 0.5) * scale  # x / scale lands on k + 0.5
    values = torch.cat([ties, torch.linspace(-40, 40, 4001), torch.tensor([1e30, -1e30, 0.0, -0.0])])
    values = values[: values.numel() // 48 * 48]
    for dtype in DTYPES:
        x = values.to(dtype).reshape(2, 24, -1)  # [rows, channels, inner]: 24 channels, a 16-tile and an edge
        expected = (quantize_activation(x, scale, zero, 8).to(torch.int32) + 128).to(torch.uint8)
        for channels_last in (False, True):
            out = torch.empty(x.numel(), dtype=torch.uint8)
            rows, channels, inner = x.shape if channels_last else (1, 1, x.numel())
            bad = fn(x.data_ptr(), DTYPES[dtype], out.data_ptr(), rows, channels, inner, scale, zero + 128, 0.0,
                     255.0, 2)
            want = expected.transpose(1, 2).reshape(-1) if channels_last else expected.reshape(-1)
            if bad or not torch.equal(out, want):
                return f"its codes differ from the torch reference ({dtype}, channels_last={channels_last})"
    poisoned, codes = torch.tensor([1.0, float("nan"), 2.0, 3.0]), torch.empty(4, dtype=torch.uint8)
    if fn(poisoned.data_ptr(), 0, codes.data_ptr(), 1, 1, 4, 1.0, 0.0, 0.0, 255.0, 1) != 1:
        return "it missed a NaN input"
    return None


def reads(x: torch.Tensor) -> bool:
    """Whether activation_codes can quantize x here: the library is available, x is a float32 or
    bfloat16 CPU tensor (float16 and the rest take the torch ops)."""
    return x.dtype in DTYPES and x.device.type == "cpu" and library() is not None


def activation_codes(x: torch.Tensor, out: torch.Tensor, scale: float, shift: float, low: int, high: int,
                     nchw_to_channels_last: bool = False) -> bool:
    """clamp(round(x / scale) + shift, low, high) into `out` (uint8 or int8, x.numel() elements), reading
    x in storage order (dense: contiguous, or channels-last when not transposing; `reads(x)` must hold).
    With nchw_to_channels_last, x is contiguous [B, C, H, W] and `out` gets the [B, H, W, C] order.
    Returns whether every element of x was finite."""
    if nchw_to_channels_last:
        rows, channels, inner = x.shape[0], x.shape[1], x.shape[2] * x.shape[3]
    else:
        rows, channels, inner = 1, 1, x.numel()
    fn = _state.get("library") or library()  # (loaded by reads(); no second read of the environment)
    bad = fn(x.data_ptr(), DTYPES[x.dtype], out.data_ptr(), rows, channels, inner, scale, shift, float(low),
             float(high), torch.get_num_threads())
    return not bad
