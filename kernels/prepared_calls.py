"""Eager CPU calls of the fused GEMM, prepared once per layer.

Through the backend-neutral interface (dispatch -> onednn), every call of a quantized layer works out again
what does not change between calls: the activation scale and zero point as numbers (.item()), the float32
product x_scale * w_scale and the bias in float32, the environment switches and layout lookups that pick
the kernel, the per-part views of the scales. In Python frames and small torch ops that cost about 100 us
per call on a 2-core EPYC, more than the GEMM of a small layer. A PreparedCall holds all of it; a call is
then the native activation quantization, the native GEMM and a few checks
(benchmarks/results/cpu-prepared-calls-2026-12-07.md).

It runs only where the general path would run the fused GEMM (kernels/onednn.py: the onednn backend, the
native library, AVX512-VNNI, K a multiple of 4, MIXQ_INT8_GEMM's choice for 8-bit weights), on float32 or
bfloat16 inputs, outside torch.compile; everything else takes the general path, which gives the same
outputs bit for bit (both are the reference's). A prepared call stays valid while the layer's buffers
are the same tensors with the same version counters (load_state_dict, .to() and in-place writes void
it) and the switches read the same.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from mixq.quantizers import activation_qrange

from . import native, onednn

SWITCHES = ("MIXQ_BACKEND", "MIXQ_NATIVE", "MIXQ_PACKED_GEMM", "MIXQ_INT8_GEMM")


@dataclass(frozen=True)
class PreparedCall:
    """One input part of a layer, ready for the native calls."""

    gemm: object  # native mixq_packed_gemm
    qweight: torch.Tensor  # the packed (or plain 8-bit) buffer, [N, bytes per row]
    bits: int
    n: int
    k: int  # a linear layer's K; a convolution's input channels of this part
    scale: torch.Tensor  # float32 x_scale * w_scale[n], the reference's product
    bias: torch.Tensor | None  # float32, on part 0 only
    w_sum: torch.Tensor  # int32
    x_scale: float
    shift: float  # x_zero + 128: unsigned codes
    low: int
    high: int


def switches() -> tuple:
    return tuple(os.environ.get(name) for name in SWITCHES)


def buffer_stamp(*tensors) -> tuple:
    """What a prepared call was made from: the tensors' storage and versions (None where absent)."""
    return tuple(None if t is None else (t.data_ptr(), t._version) for t in tensors)


def usable(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in native.OUTPUT_DTYPES and not torch.compiler.is_compiling()


def prepare(qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias, kind, k) -> PreparedCall | None:
    """The prepared call of one input part, or None where the general path must run it."""
    from .dispatch import selected_backend

    if qweight.is_mkldnn or selected_backend(qweight) != "onednn" or not onednn.fused_gemm_runs(k, w_bits, kind):
        return None
    gemm = native.packed_gemm_function()
    if gemm is None or native.library() is None:
        return None
    x_scale_value = float(x_scale)
    qmin, qmax = activation_qrange(a_bits)
    offset = onednn.UNSIGNED_OFFSET
    return PreparedCall(
        gemm=gemm, qweight=qweight.contiguous(), bits=w_bits, n=qweight.shape[0], k=k,
        scale=torch.tensor(x_scale_value, dtype=torch.float32) * w_scale.float(),
        bias=None if bias is None else bias.float().contiguous(), w_sum=w_sum.to(torch.int32).contiguous(),
        x_scale=x_scale_value, shift=float(x_zero) + offset, low=qmin + offset, high=qmax + offset)


def run_gemm(call: PreparedCall, codes: torch.Tensor, lda: int, m: int, k: int, out: torch.Tensor,
             geometry=None) -> None:
    """out [M, N] (float32 or bfloat16, rows contiguous) = the layer's epilogue of codes @ w^T; `geometry`: a
    convolution's (ctypes) geometry, codes then its padded channels-last input read in place."""
    failed = call.gemm(codes.data_ptr(), lda, geometry, call.qweight.data_ptr(), call.qweight.stride(0), call.bits,
                       m, call.n, k, int(call.shift), call.w_sum.data_ptr(), call.scale.data_ptr(),
                       None if call.bias is None else call.bias.data_ptr(), out.data_ptr(),
                       native.OUTPUT_DTYPES[out.dtype], out.stride(0), torch.get_num_threads())
    if failed:
        raise MemoryError("mixq: the packed GEMM could not allocate its buffers")


def quantize(call: PreparedCall, x: torch.Tensor, codes: torch.Tensor, nchw_to_channels_last: bool = False) -> bool:
    """x's unsigned codes into `codes` (see native.activation_codes); whether x was all finite."""
    return native.activation_codes(x, codes, call.x_scale, call.shift, call.low, call.high, nchw_to_channels_last)


def linear(call: PreparedCall, x: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """(y [M, N] in x's dtype, whether x was all finite) for x [M, K] with contiguous rows; None where x is
    strided (the general path copies it)."""
    if not x.is_contiguous():
        return None
    m = x.shape[0]
    codes = onednn.codes_scratch(x.numel(), torch.uint8)
    finite = quantize(call, x, codes)
    out = torch.empty(m, call.n, dtype=x.dtype)
    run_gemm(call, codes, call.k, m, call.k, out)
    return out, finite


def conv2d(calls: list[PreparedCall], x: torch.Tensor, part_sizes, kernel_size, stride,
           padding) -> tuple[torch.Tensor, bool] | None:
    """(y [B, N, Ho, Wo] channels-last in memory, whether x was all finite) for a dense x [B, C, H, W] split
    into `part_sizes` channels (one call each, summed); None where x is neither NCHW nor channels-last dense."""
    nchw = onednn.is_nchw(x)
    if not (nchw or x.is_contiguous(memory_format=torch.channels_last)):
        return None
    b, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    finite, codes = None, None
    if len(calls) == 1:
        codes = onednn.codes_scratch(x.numel(), torch.uint8)
        finite = quantize(calls[0], x, codes, nchw_to_channels_last=nchw)
        codes = codes.view(b, h, w, c)
    y, start = None, 0
    for call, size in zip(calls, part_sizes):
        if len(calls) > 1:  # each part has its own scale: quantize its channels alone
            part = x.narrow(1, start, size).contiguous(memory_format=torch.channels_last)
            part_codes = onednn.codes_scratch(part.numel(), torch.uint8)
            part_finite = quantize(call, part, part_codes)
            finite = part_finite if finite is None else finite and part_finite
            source = part_codes.view(b, h, w, size)
        else:
            source = codes
        out = torch.empty(b * ho * wo, call.n, dtype=x.dtype)
        if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
            run_gemm(call, source, size, b * h * w, size, out)
        else:
            padded = onednn.padded_codes(source.permute(0, 3, 1, 2), int(call.shift), padding)
            run_gemm(call, padded, 0, b * ho * wo, kh * kw * size, out, native.conv_geometry(padded.shape, kernel_size,
                                                                                             stride))
        y = out if y is None else y.add_(out)
        start += size
    return y.view(b, ho, wo, -1).permute(0, 3, 1, 2), finite
