"""Triton implicit-GEMM convolution for quantized Conv2d layers, int8 codes x W{8,4,2}.

The convolution is the GEMM of triton_gemm.py with rows m = (batch, output row, output column) and
reduction index k = (kernel row, kernel column, input channel), the order of the packed weights.
The input is first quantized once into channels-last int8 codes [B * (H + 2 pad) * (W + 2 pad), C]
(triton_quantize.py reads NCHW or channels-last input alike), so the main loop only loads
contiguous channel runs.

One flattened K loop walks (tap, channel block) pairs, so the software pipeline runs across taps
instead of draining at each one. A K-tile never straddles two taps: each tap's C channels are
cdiv(C, BLOCK_K) tiles, the last one masked unless BLOCK_K divides C (EVEN_K, every SDXL conv).
The codes carry the convolution's zero padding as a border of x_zero codes (the code of the
input's real zero, as the reference pads), so the main loop has no masks and no selects.
1x1 stride-1 convolutions are plain GEMMs and run on the linear kernel.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from .autotune import Config, device_tag
from .reference import conv_output_size, is_channels_last
from .triton_gemm import (
    CARRIED_POINTERS,
    OutputLayout,
    activation_ring,
    choose_config,
    epilogue_arguments,
    finish_tile,
    gather_weights,
    gemm_rows,
    output_tile,
    quantize_for,
    run_gemm,
    split_range,
    unmasked_loop,
    weight_operand,
)


@triton.jit
def _conv2d_kernel(
    a_ptr, w_ptr, y_ptr, partial_ptr, w_scale_ptr, w_sum_ptr, bias_ptr, x_scale_ptr, x_zero_ptr,
    C, H, W, N, H_OUT, W_OUT, M, P,
    stride_wn, stride_yb, stride_yp, stride_yn,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
    W_BITS: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE_ONLY: tl.constexpr, EVEN_ROWS: tl.constexpr,
    EVEN_K: tl.constexpr, SPLIT_K: tl.constexpr, MMA_V2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    rows, cols = output_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m = tl.minimum(rows, M - 1)  # clamped: in bounds without a mask
    w_rows = tl.minimum(cols, N - 1)
    # The codes hold the image padded by PAD pixels: the receptive field of an output pixel starts
    # at padded row out_h * STRIDE and column out_w * STRIDE, and never leaves the buffer.
    padded_w = W + 2 * PAD
    corner = ((m // (H_OUT * W_OUT)) * (H + 2 * PAD) * padded_w + ((m // W_OUT) % H_OUT) * STRIDE * padded_w
              + (m % W_OUT) * STRIDE)
    a_rows_ptr = a_ptr + corner[:, None] * C
    c_tiles = tl.cdiv(C, BLOCK_K)
    first, last = split_range(KH * KW * c_tiles, SPLIT_K)

    PER_BYTE: tl.constexpr = 8 // W_BITS
    LANE_K: tl.constexpr = BLOCK_K // PER_BYTE
    acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)  # transposed: weights first, as in the GEMM
    # With EVEN_K, K-tile kt starts at reduction index kt * BLOCK_K, so the weights advance linearly.
    w_ptrs = w_ptr + w_rows[:, None] * stride_wn + (first * LANE_K + tl.arange(0, LANE_K))[None, :]
    for kt in range(first, last):
        tap = kt // c_tiles
        c0 = (kt - tap * c_tiles) * BLOCK_K
        tap_ptrs = a_rows_ptr + ((tap // KW) * padded_w + tap % KW) * C + c0
        if EVEN_K:
            if CARRIED_POINTERS[W_BITS]:
                packed = tl.load(w_ptrs)
                w_ptrs += LANE_K
            else:
                k0 = tap * C + c0
                packed = tl.load(w_ptr + w_rows[:, None] * stride_wn + (k0 // PER_BYTE + tl.arange(0, LANE_K))[None, :])
            a = tl.load(tap_ptrs + tl.arange(0, BLOCK_K)[None, :])
            acc_t = tl.dot(weight_operand(packed, kt, W_BITS, BLOCK_N, BLOCK_K, MMA_V2), tl.trans(a), acc_t,
                           out_dtype=tl.int32)
            acc_t = activation_ring(acc_t, a, W_BITS, MMA_V2)
        else:
            offs_c = c0 + tl.arange(0, BLOCK_K)
            a = tl.load(tap_ptrs + tl.arange(0, BLOCK_K)[None, :], mask=(offs_c < C)[None, :], other=0)
            # Channels past C would read the next tap's weights: gather_weights zeroes them.
            w = gather_weights(w_ptr, w_rows, stride_wn, tap * C + c0, tap * C + C, W_BITS, BLOCK_K)
            acc_t = tl.dot(w, tl.trans(a), acc_t, out_dtype=tl.int32)
    acc = tl.trans(acc_t)
    if EVEN_K:
        acc = acc >> (8 - W_BITS)  # the lanes' scale 2^(8 - W_BITS); every sum is a multiple of it

    finish_tile(acc, rows, cols, M, N, y_ptr, partial_ptr, P, stride_yb, stride_yp, stride_yn,
                w_scale_ptr, w_sum_ptr, bias_ptr, x_scale_ptr, x_zero_ptr, HAS_BIAS, ACCUMULATE_ONLY, EVEN_ROWS,
                SPLIT_K)


class ChannelsFirstWarning(UserWarning):
    """A convolution received NCHW input: correct, but its output stores are strided."""


_warned_nchw = False


def warn_nchw_once():
    global _warned_nchw
    if not _warned_nchw:
        _warned_nchw = True
        warnings.warn("mixq: NCHW input to a quantized convolution: it is quantized into channels-last codes in "
                      "one pass, but the output keeps NCHW, which the kernel stores with strided writes; "
                      "pipe.unet.to(memory_format=torch.channels_last) avoids both", ChannelsFirstWarning,
                      stacklevel=5)


def output_like(x: torch.Tensor, n: int, h_out: int, w_out: int, dtype: torch.dtype) -> torch.Tensor:
    """An empty [B, N, H_out, W_out] output in x's memory format, strided as the reference's."""
    y = torch.empty((x.shape[0], h_out, w_out, n), device=x.device, dtype=dtype).permute(0, 3, 1, 2)
    if is_channels_last(x) or y.is_contiguous():
        return y
    return torch.empty((x.shape[0], n, h_out, w_out), device=x.device, dtype=dtype)


def as_image(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] (NCHW or channels-last) -> the [B, H, W, C] view the quantize pass reads."""
    return x.permute(0, 2, 3, 1)


def conv2d(x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias, kernel_size, stride, padding, *,
           accumulate_only: bool = False, config: Config | None = None, input_key=None) -> torch.Tensor:
    """x [B, C, H, W] -> y [B, N, H_out, W_out] in x's dtype and memory format (or the int32
    accumulator with accumulate_only=True). Square stride and padding; config forces block sizes."""
    if stride[0] != stride[1] or padding[0] != padding[1]:
        raise ValueError(f"the Triton conv takes square strides and paddings, got stride={stride}, padding={padding}")
    b, c, h, w = x.shape
    kh, kw = kernel_size
    step, pad = stride[0], padding[0]
    n = qweight.shape[0]
    h_out, w_out = conv_output_size((h, w), kernel_size, stride, padding)
    m = b * h_out * w_out
    if not is_channels_last(x) and c > 1 and h * w > 1:
        warn_nchw_once()
    x_image = as_image(x)
    out = output_like(x, n, h_out, w_out, torch.int32 if accumulate_only else x.dtype)
    layout = OutputLayout(out, h_out * w_out, out.stride(0), out.stride(3), out.stride(1))
    key = f"conv2d|{kh}x{kw}/{step}|b={b}|c={c}|h={h}|w={w}|n={n}|{x.dtype}"
    if (kh, kw, step, pad) == (1, 1, 1, 0):
        gemm_rows(x_image, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias, layout,
                  accumulate_only=accumulate_only, config=config, tune_key=key, input_key=input_key)
        return out

    qweight = qweight.contiguous()
    epilogue_args = epilogue_arguments(w_scale, w_sum, bias, x_scale, x_zero, accumulate_only)

    def launch(cfg: Config):
        codes = quantize_for(x_image, x_scale, x_zero, a_bits, w_bits, c, cfg, pad=pad, input_key=input_key)
        grid_args = dict(a_ptr=codes, w_ptr=qweight, C=c, H=h, W=w, N=n, H_OUT=h_out, W_OUT=w_out, M=m,
                         stride_wn=qweight.stride(0), KH=kh, KW=kw, STRIDE=step, PAD=pad, W_BITS=w_bits,
                         EVEN_K=unmasked_loop(c, cfg, w_bits))
        run_gemm(_conv2d_kernel, grid_args, layout, m, n, cfg, epilogue_args)

    if config is None:
        config = choose_config(f"{key}|w{w_bits}|{device_tag(x.device)}", m, n, kh * kw * c, c, w_bits, launch)
    launch(config)
    return out
