"""Eager CPU calls of quantized layers, prepared once per layer.

Through the backend-neutral interface (dispatch -> onednn), every call of a quantized layer works out again
what does not change between calls: the activation scale and zero point as numbers (.item()), the float32
product x_scale * w_scale and the bias in the kernel's dtype, the environment switches and layout lookups
that pick the kernel, the per-part views of the scales. In Python frames and small torch ops that cost
about 100 us per call on a 2-core EPYC, more than the GEMM of a small layer. A PreparedCall holds all of
it; a call is then the native activation quantization, one kernel call (mixq's fused GEMM or oneDNN's
int8 op) and a few checks (benchmarks/results/cpu-prepared-calls-2026-12-07.md).

It runs where the general path (kernels/onednn.py) would run one of those two kernels: the onednn backend
with the native library, on float32 or bfloat16 inputs, outside torch.compile; everything else (4/2-bit
weights where the fused GEMM cannot run, another backend, a compiled graph) takes the general path. Both
paths call the same kernels with the same arguments, so their outputs are the same bit for bit. A
prepared call stays valid while the layer's buffers are the same tensors with the same version counters
(load_state_dict, .to() and in-place writes void it) and the switches read the same.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import torch

from mixq.quantizers import activation_qrange

from . import native, onednn, reference

SWITCHES = ("MIXQ_BACKEND", "MIXQ_NATIVE", "MIXQ_PACKED_GEMM", "MIXQ_INT8_GEMM")  # (what picks the kernel)


@dataclass(frozen=True)
class PreparedCall:
    """One input part of a layer, ready for the native quantization and its kernel."""

    fused: bool  # mixq's fused GEMM (up to onednn_above_rows output rows); else oneDNN's int8 op
    weight: torch.Tensor  # fused: the packed (or plain 8-bit) buffer [N, bytes per row]; else oneDNN's layout
    bits: int
    n: int
    k: int  # a linear layer's K; a convolution's input channels of this part
    w_scale: torch.Tensor
    bias: torch.Tensor | None  # the layer's (on part 0 only)
    x_scale: float
    shift: float  # x_zero + 128: unsigned codes
    low: int
    high: int
    gemm: object = None  # fused: native mixq_packed_gemm
    scale: torch.Tensor | None = None  # fused: float32 x_scale * w_scale[n], the reference's product
    bias_f32: torch.Tensor | None = None  # fused: the bias in float32
    w_sum: torch.Tensor | None = None  # fused: int32
    onednn_above_rows: int | None = None  # fused 8-bit convolution: calls of more rows run on oneDNN
    w_zero: torch.Tensor | None = None  # oneDNN


def switches() -> tuple:
    return tuple(os.environ.get(name) for name in SWITCHES)


def buffer_stamp(*tensors) -> tuple | None:
    """What a prepared call was made from: the tensors' storage and versions (a held oneDNN layout, which is
    replaced rather than written: its identity; None where absent). None where a tensor keeps no version
    counter (made under torch.inference_mode): a write to it could not be seen, so its layer is not prepared."""
    if any(t is not None and not t.is_mkldnn and t.is_inference() for t in tensors):
        return None
    return tuple(None if t is None else ("layout", id(t)) if t.is_mkldnn else (t.data_ptr(), t._version)
                 for t in tensors)


def usable(x: torch.Tensor) -> bool:
    """Whether x can take a prepared call; MIXQ_PREPARED_CALLS=0 sends every call the general way (A/B runs)."""
    return (x.device.type == "cpu" and x.dtype in native.OUTPUT_DTYPES and not torch.compiler.is_compiling()
            and native.switched_on("MIXQ_PREPARED_CALLS"))


def prepare(weight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias, kind, k,
            geometry: dict) -> PreparedCall | None:
    """The prepared call of one input part (weight: the layer's kernel_weight, a packed buffer or a held
    oneDNN layout; geometry: QuantizedLayer.part_geometry), or None where the general path must run it."""
    from .dispatch import selected_backend

    if selected_backend(w_scale) != "onednn" or native.library() is None:
        return None
    x_scale_value = float(x_scale)
    qmin, qmax = activation_qrange(a_bits)
    offset = onednn.UNSIGNED_OFFSET
    common = dict(bits=w_bits, n=w_scale.shape[0], k=k, w_scale=w_scale, bias=bias, x_scale=x_scale_value,
                  shift=float(x_zero) + offset, low=qmin + offset, high=qmax + offset)
    taps = 1 if kind == "linear" else geometry["kernel_size"][0] * geometry["kernel_size"][1]
    weights = w_scale.shape[0] * k * taps
    if not weight.is_mkldnn and onednn.fused_gemm_runs(k, w_bits, kind, weights, rows=1):
        always = onednn.fused_gemm_runs(k, w_bits, kind, weights, rows=None)
        return PreparedCall(
            fused=True, weight=weight.contiguous(), gemm=native.packed_gemm_function(),
            scale=torch.tensor(x_scale_value, dtype=torch.float32) * w_scale.float(),
            bias_f32=None if bias is None else bias.float().contiguous(), w_sum=w_sum.to(torch.int32).contiguous(),
            onednn_above_rows=None if always else onednn.INT8_FUSED_CONV_ROWS, **common)
    if kind == "linear":
        build = lambda: onednn.linear_layout(weight, w_bits, k, only_if_prepared=w_bits != 8)  # noqa: E731
    else:
        build = lambda: onednn.conv_layout(weight, w_scale, k, geometry["kernel_size"], geometry["stride"],  # noqa: E731
                                           geometry["padding"], w_bits, only_if_prepared=w_bits != 8)
    layout = onednn.held_or_built_layout(weight, w_scale, build)
    if layout is None:  # a 4/2-bit weight kept packed, without the fused GEMM: unpacked per call
        return None
    return PreparedCall(fused=False, weight=layout[0], w_zero=layout[1], **common)


def run_gemm(call: PreparedCall, codes: torch.Tensor, lda: int, m: int, k: int, out: torch.Tensor,
             geometry=None) -> None:
    """out [M, N] (float32 or bfloat16, rows contiguous) = the layer's epilogue of codes @ w^T on the fused
    GEMM; `geometry`: a convolution's (ctypes) geometry, codes then its padded channels-last input."""
    failed = call.gemm(codes.data_ptr(), lda, geometry, call.weight.data_ptr(), call.weight.stride(0), call.bits,
                       m, call.n, k, int(call.shift), call.w_sum.data_ptr(), call.scale.data_ptr(),
                       None if call.bias_f32 is None else call.bias_f32.data_ptr(), out.data_ptr(),
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
    if not call.fused:
        y = torch.ops.onednn.qlinear_pointwise.default(
            codes.view(m, call.k), call.x_scale, int(call.shift), call.weight, call.w_scale, call.w_zero,
            onednn.onednn_bias(call.bias, x.dtype), 1.0, 0, x.dtype, "none", [], "")
        return y, finite
    out = torch.empty(m, call.n, dtype=x.dtype)
    run_gemm(call, codes, call.k, m, call.k, out)
    return out, finite


def conv2d(calls: list[PreparedCall], x: torch.Tensor, part_sizes, kernel_size, stride,
           padding) -> tuple[torch.Tensor, bool] | None:
    """(y [B, N, Ho, Wo], channels-last in memory, whether x was all finite) for a dense x [B, C, H, W] split
    into `part_sizes` channels (one kernel call each, summed as the general path sums them); None where x is
    neither NCHW nor channels-last dense."""
    nchw = onednn.is_nchw(x)
    if not (nchw or x.is_contiguous(memory_format=torch.channels_last)):
        return None
    b, c, h, w = x.shape
    finite, codes = None, None
    if len(calls) == 1:
        codes = onednn.codes_scratch(x.numel(), torch.uint8)
        finite = quantize(calls[0], x, codes, nchw_to_channels_last=nchw)
        codes = codes.view(b, h, w, c)
    rows = b * math.prod(reference.conv_output_size((h, w), kernel_size, stride, padding))
    y, start = None, 0
    for call, size in zip(calls, part_sizes):
        if len(calls) > 1:  # each part has its own scale: quantize its channels alone
            part = x.narrow(1, start, size).contiguous(memory_format=torch.channels_last)
            part_codes = onednn.codes_scratch(part.numel(), torch.uint8)
            part_finite = quantize(call, part, part_codes)
            finite = part_finite if finite is None else finite and part_finite
            codes = part_codes.view(b, h, w, size)
        if call.fused and call.onednn_above_rows is not None and rows > call.onednn_above_rows:
            # a large 8-bit convolution kept plain: on oneDNN, its layout made for this call
            layout, w_zero = onednn.call_layout_of_plain_conv(call.weight, call.w_scale, size, kernel_size, stride,
                                                              padding)
            part_y = onednn_conv2d(replace(call, fused=False, weight=layout, w_zero=w_zero), codes, x.dtype, stride,
                                   padding)
        elif call.fused:
            part_y = fused_conv2d(call, codes, x.dtype, kernel_size, stride, padding)
        else:
            part_y = onednn_conv2d(call, codes, x.dtype, stride, padding)
        y = part_y if y is None else y.add_(part_y)
        start += size
    return y, finite


def fused_conv2d(call: PreparedCall, codes: torch.Tensor, dtype, kernel_size, stride, padding) -> torch.Tensor:
    """One part's output [B, N, Ho, Wo] (channels-last in memory) from its codes [B, H, W, C] on the fused
    GEMM: a 1x1 convolution is a matrix product of the codes as they are; others read the padded codes in
    place."""
    b, h, w, c = codes.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    ho, wo = reference.conv_output_size((h, w), kernel_size, stride, padding)
    out = torch.empty(b * ho * wo, call.n, dtype=dtype)
    if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
        run_gemm(call, codes, c, b * h * w, c, out)
    else:
        padded = onednn.padded_codes(codes.permute(0, 3, 1, 2), int(call.shift), padding)
        geometry = native.conv_geometry(padded.shape, kernel_size, stride)
        run_gemm(call, padded, 0, b * ho * wo, kh * kw * c, out, geometry)
    return out.view(b, ho, wo, -1).permute(0, 3, 1, 2)


def onednn_conv2d(call: PreparedCall, codes: torch.Tensor, dtype, stride, padding) -> torch.Tensor:
    """One part's output from its codes [B, H, W, C] on oneDNN's op, as the general path calls it."""
    return torch.ops.onednn.qconv2d_pointwise.default(
        codes.permute(0, 3, 1, 2), call.x_scale, int(call.shift), call.weight, call.w_scale, call.w_zero,
        onednn.onednn_bias(call.bias, dtype), list(stride), list(padding), [1, 1], 1, 1.0, 0, dtype, "none", [], None)
