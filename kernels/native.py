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

packed_gemm.c is the GEMM of 4/2-bit weights kept packed (the unpacking fused into its packing step, the
reference's epilogue into its stores; AVX512-VNNI). It is built into the same library; where the CPU
lacks AVX512-VNNI, or its self-check against the reference fails, packed_gemm_function() is None (one warning)
and the backend unpacks per call as before. MIXQ_PACKED_GEMM=0 turns only it off (for A/B runs).
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
from .reference import conv_output_size

SOURCES = tuple(Path(__file__).with_name(name) for name in ("activation_codes.c", "packed_gemm.c"))
HEADERS = (Path(__file__).with_name("native_threads.h"),)  # (part of the cache key)
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
X86_MACHINES = ("x86_64", "amd64")
# -ffast-math must never be added: it allows a reciprocal in place of the division; -ffp-contract=off keeps
# the epilogue's multiply and add two roundings, as the reference's.
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared", "-std=c11"]
# The helpers' threads are OpenMP's where the compiler has it: the same runtime (libgomp.so.1) that torch
# has loaded, so they run on torch's own worker threads. Threads of their own would compete for the
# cores with torch's workers, which keep spinning for a few ms after each torch op (about 1.8x slower
# layers measured on a 2-core EPYC).
OPENMP_FLAGS = ["-fopenmp"]
OUTPUT_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


class NativeFallbackWarning(UserWarning):
    """mixq's native CPU helpers are unavailable; torch ops run instead (same results, slower)."""


_state: dict = {}
_lock = threading.Lock()


def cache_dir() -> Path:
    """Where built libraries are kept: MIXQ_NATIVE_CACHE, else ~/.cache/mixq (beside the Triton autotune cache)."""
    configured = os.environ.get("MIXQ_NATIVE_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "mixq"


def switched_on(variable: str) -> bool:
    """An environment switch: on unless set to 0, false, no or off."""
    return os.environ.get(variable, "1").strip().lower() not in ("0", "false", "no", "off")


def enabled() -> bool:
    return switched_on("MIXQ_NATIVE")


def loaded_once(key: str, load) -> tuple:
    """(what, why it is None) from `load()`, run once per process and kept as _state[key], _state[key_reason]."""
    if key not in _state:
        with _lock:
            if key not in _state:
                _state[key], _state[f"{key}_reason"] = load()
    return _state[key], _state[f"{key}_reason"]


def library():
    """The loaded library, or None (with one warning naming why) where it cannot be had."""
    if not enabled():
        return None
    lib, reason = loaded_once("library", _load)
    if lib is None:
        warn_once(NativeFallbackWarning, reason,
                  f"mixq: the native activation quantization is unavailable ({reason}); running torch "
                  "ops instead (same codes, slower). Install a C compiler (or set CC) to get it.", stacklevel=4)
    return lib


def unavailable_reason() -> str | None:
    if not enabled():
        return "MIXQ_NATIVE=0"
    library()
    return _state.get("library_reason")


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
        return None, f"building {' and '.join(s.name for s in SOURCES)} failed: {str(error).strip()[:300]}"
    _state["cdll"] = lib
    fn = lib.mixq_activation_codes
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_float, ctypes.c_float, ctypes.c_float, ctypes.c_float, ctypes.c_int]
    problem = _self_check(fn)
    if problem:
        return None, problem
    return fn, None


def _built(compiler: str) -> Path:
    """The compiled library for these sources, compiler and CPU, built now if the cache has none: with
    OpenMP where the compiler has it, else with plain threads."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    texts = [source.read_text() for source in SOURCES + HEADERS]
    failure = None
    for flags in (FLAGS + OPENMP_FLAGS, FLAGS):
        key = hashlib.sha256("\0".join([*texts, compiler, version, " ".join(flags), _cpu_signature()])
                             .encode()).hexdigest()[:20]
        path = cache_dir() / f"native-{key}.so"
        if path.is_file():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
            partial = Path(scratch) / path.name
            result = subprocess.run([compiler, *flags, "-o", str(partial), *map(str, SOURCES), "-lpthread"],
                                    capture_output=True, text=True, timeout=300)
            if result.returncode == 0:
                os.replace(partial, path)  # atomic: a concurrent build writes the same bytes
                return path
            failure = failure or result.stderr or result.stdout
    raise subprocess.SubprocessError(failure)


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


# --- the packed 4/2-bit GEMM ----------------------------------------------------------------------


class PackedGemmFallbackWarning(UserWarning):
    """The fused packed-weight GEMM is unavailable; 4/2-bit weights are unpacked per call (same results, slower)."""


def packed_gemm_enabled() -> bool:
    return switched_on("MIXQ_PACKED_GEMM")


def packed_gemm_function():
    """The library's mixq_packed_gemm, or None (with one warning naming why) where it cannot run here."""
    if not packed_gemm_enabled() or library() is None:
        return None
    gemm, reason = loaded_once("gemm", lambda: _load_packed_gemm(_state["cdll"]))
    if gemm is None:
        warn_once(PackedGemmFallbackWarning, reason, f"mixq: the fused 4/2-bit GEMM is unavailable ({reason}); "
                  "unpacking packed weights on every call instead (same results, slower)", stacklevel=4)
    return gemm


def packed_gemm_unavailable_reason() -> str | None:
    if not packed_gemm_enabled():
        return "MIXQ_PACKED_GEMM=0"
    if library() is None:
        return unavailable_reason()
    packed_gemm_function()
    return _state.get("gemm_reason")


def _load_packed_gemm(lib) -> tuple:
    if not lib.mixq_packed_gemm_available():
        return None, "this CPU has no AVX512-VNNI"
    fn = lib.mixq_packed_gemm
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                   ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int]
    problem = _packed_gemm_self_check(fn)
    return (None, problem) if problem else (fn, None)


def _packed_gemm_self_check(fn) -> str | None:
    """None when the build gives the reference's outputs bit for bit on a matrix case with row, column and k
    tails and two k blocks, every width and both output dtypes, and on a strided convolution read in place;
    else what went wrong."""
    from mixq.quantizers import pack_weight

    g = torch.Generator().manual_seed(0)
    m, n, k = 13, 70, 2048 + 136  # 13 rows: two full tiles and one; 70 columns: a 64-block and a tail
    padded = torch.randint(0, 256, (2, 7, 6, 8), dtype=torch.uint8, generator=g)  # a 3x3 convolution, stride (2, 1)
    columns = padded.unfold(1, 3, 2).unfold(2, 3, 1).permute(0, 1, 2, 4, 5, 3).reshape(-1, 72)
    cases = [(torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=g), None),
             (columns, (72, conv_geometry(padded.shape, (3, 3), (2, 1))))]
    for codes, convolution in cases:
        for bits in (8, 4, 2):
            low = -(2 ** (bits - 1))
            q = torch.randint(low, -low, (n, codes.shape[1]), dtype=torch.int8, generator=g)
            w_scale = torch.rand(n, generator=g) / 100
            bias = torch.randn(n, generator=g)
            for dtype in OUTPUT_DTYPES:
                y = torch.empty(codes.shape[0], n, dtype=dtype)
                read = codes if convolution is None else padded
                if _call_packed_gemm(fn, read, pack_weight(q, bits), bits, q.sum(1, dtype=torch.int32), 0.037, 131,
                                     w_scale, bias, y, convolution):
                    return "it could not allocate its buffers"
                acc = torch._int_mm(codes.to(torch.int32).sub(128).to(torch.int8), q.t().contiguous())
                expected = ((acc - 3 * q.sum(1, dtype=torch.int32)).float() * (torch.tensor(0.037) * w_scale) + bias)
                if not torch.equal(y, expected.to(dtype)):
                    what = "a convolution" if convolution else "a matrix"
                    return f"its outputs differ from the torch reference ({what}, {bits}-bit weights, {dtype})"
    return None


def _call_packed_gemm(fn, codes, packed, bits, w_sum, x_scale: float, zero: int, w_scale, bias, out,
                      convolution: tuple | None = None) -> int:
    """The native call; codes [M, K] rows contiguous, or with `convolution` = (K, conv_geometry(...)) the padded
    input (see packed_conv)."""
    scale = torch.tensor(x_scale, dtype=torch.float32) * w_scale.float()  # the reference's float32 product
    bias = None if bias is None else bias.float().contiguous()
    k, geometry = convolution if convolution else (codes.shape[1], None)
    m = out.shape[0]
    return fn(codes.data_ptr(), codes.stride(0), geometry, packed.data_ptr(),
              packed.stride(0), bits, m, packed.shape[0], k, zero, w_sum.data_ptr(), scale.data_ptr(),
              None if bias is None else bias.data_ptr(), out.data_ptr(), OUTPUT_DTYPES[out.dtype], out.stride(0),
              torch.get_num_threads())


def packed_gemm(codes: torch.Tensor, packed: torch.Tensor, bits: int, w_sum: torch.Tensor, x_scale: float,
                zero: int, w_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype) -> torch.Tensor | None:
    """y [M, N] = f32(codes @ w^T - zero * w_sum) * (x_scale * w_scale) + bias in `out_dtype` (float32 or
    bfloat16), bit for bit the reference's epilogue; codes: uint8 [M, K] (signed codes + 128), packed:
    pack_weight's [N, K / per_byte] bytes, zero: the signed zero point + 128.
    None where the fused GEMM cannot run this call (callers then unpack)."""
    fn = packed_gemm_function()
    m, k = codes.shape
    if fn is None or k % 4:
        return None
    if codes.stride(1) != 1:  # (the codes of a strided activation keep its strides)
        codes = codes.contiguous()
    return _run(fn, codes, packed, bits, w_sum, x_scale, zero, w_scale, bias, torch.empty(m, packed.shape[0],
                                                                                          dtype=out_dtype))


def packed_conv(padded: torch.Tensor, kernel_size, stride, packed: torch.Tensor, bits: int, w_sum: torch.Tensor,
                x_scale: float, zero: int, w_scale: torch.Tensor, bias: torch.Tensor | None,
                out_dtype) -> torch.Tensor | None:
    """packed_gemm of a convolution, its input read in place (no column matrix): padded is the input's codes,
    padded with the code of zero, [B, H + 2 ph, W + 2 pw, C] contiguous, C a multiple of 4. y [B * Ho * Wo, N]
    in (b, y, x) row order. None where the fused GEMM cannot run it."""
    fn = packed_gemm_function()
    b, hp, wp, c = padded.shape
    if fn is None or c % 4 or not padded.is_contiguous():
        return None
    kh, kw = kernel_size
    ho, wo = conv_output_size((hp, wp), kernel_size, stride, (0, 0))  # the input comes padded
    out = torch.empty(b * ho * wo, packed.shape[0], dtype=out_dtype)
    return _run(fn, padded, packed, bits, w_sum, x_scale, zero, w_scale, bias, out,
                (kh * kw * c, conv_geometry(padded.shape, kernel_size, stride)))


def conv_geometry(padded_shape, kernel_size, stride):
    """What mixq_packed_gemm reads a convolution by: {channels, out_h, out_w, in_h, in_w, kernel_w, stride_h,
    stride_w} of its padded channels-last input codes [B, Hp, Wp, C], as a ctypes int64 array."""
    _, hp, wp, c = padded_shape
    ho, wo = conv_output_size((hp, wp), kernel_size, stride, (0, 0))
    return (ctypes.c_int64 * 8)(c, ho, wo, hp, wp, kernel_size[1], *stride)


def _run(fn, codes, packed, bits, w_sum, x_scale, zero, w_scale, bias, out, convolution=None) -> torch.Tensor:
    w_sum = w_sum.to(torch.int32).contiguous()  # (as the reference takes it)
    if _call_packed_gemm(fn, codes, packed.contiguous(), bits, w_sum, x_scale, zero, w_scale, bias, out, convolution):
        raise MemoryError("mixq: the packed 4/2-bit GEMM could not allocate its buffers")
    return out
