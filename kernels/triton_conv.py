"""Triton implicit-GEMM convolution for quantized Conv2d layers, A8 x W{8,4,2}.

The convolution is the GEMM of triton_gemm.py with rows m = (batch, output row, output column) and
reduction index k = (kernel row, kernel column, input channel), the order of the packed weights.
No im2col buffer is built: for each kernel tap the program loads the input pixels that tap sees
(channels contiguous in channels_last memory) and quantizes them in registers. Pixels outside the
image are loaded as 0.0, the real zero of the input, whose code is exactly x_zero.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autotune import Config, device_tag, tiles
from .reference import is_channels_last
from .triton_gemm import (
    choose_config,
    load_weight_tile,
    output_tile,
    per_channel_vectors,
    quantize_tile,
    store_output,
)


@triton.jit
def _conv2d_kernel(
    x_ptr, w_ptr, y_ptr, w_scale_ptr, w_sum_ptr, bias_ptr, x_scale_ptr, x_zero_ptr,
    C, H, W, N, H_OUT, W_OUT, M,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_wn, stride_wk,
    stride_yb, stride_yc, stride_yh, stride_yw,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
    W_BITS: tl.constexpr, A_BITS: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE_ONLY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    offs_m, offs_n, m_valid, n_valid = output_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # Output pixel of each row; its receptive field starts at (top, left), maybe in the padding.
    batch = offs_m // (H_OUT * W_OUT)
    out_h = (offs_m // W_OUT) % H_OUT
    out_w = offs_m % W_OUT
    top = out_h * STRIDE - PAD
    left = out_w * STRIDE - PAD
    x_scale = tl.load(x_scale_ptr)
    x_zero = tl.load(x_zero_ptr)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for tap in range(KH * KW):
        in_h = top + tap // KW
        in_w = left + tap % KW
        inside = m_valid & (in_h >= 0) & (in_h < H) & (in_w >= 0) & (in_w < W)
        pixel_ptrs = x_ptr + batch * stride_xb + in_h * stride_xh + in_w * stride_xw
        for c0 in range(0, C, BLOCK_K):
            offs_c = c0 + tl.arange(0, BLOCK_K)
            c_valid = offs_c < C
            x = tl.load(pixel_ptrs[:, None] + offs_c[None, :] * stride_xc,
                        mask=inside[:, None] & c_valid[None, :], other=0.0)
            q_x = quantize_tile(x, x_scale, x_zero, A_BITS)
            # Channels past C would read the next tap's weights: load_weight_tile zeroes them.
            q_w = load_weight_tile(w_ptr, stride_wn, stride_wk, tap * C + offs_c, c_valid, offs_n, n_valid, W_BITS)
            acc = tl.dot(q_x, q_w, acc)

    y_ptrs = (y_ptr + (batch * stride_yb + out_h * stride_yh + out_w * stride_yw)[:, None]
              + offs_n[None, :] * stride_yc)
    store_output(y_ptrs, acc, m_valid, n_valid, offs_n, w_scale_ptr, w_sum_ptr, bias_ptr, x_scale, x_zero,
                 HAS_BIAS, ACCUMULATE_ONLY)


def output_like(x: torch.Tensor, n: int, h_out: int, w_out: int, dtype: torch.dtype) -> torch.Tensor:
    """An empty [B, N, H_out, W_out] output in x's memory format, strided as the reference's."""
    y = torch.empty((x.shape[0], h_out, w_out, n), device=x.device, dtype=dtype).permute(0, 3, 1, 2)
    if is_channels_last(x) or y.is_contiguous():
        return y
    return torch.empty((x.shape[0], n, h_out, w_out), device=x.device, dtype=dtype)


def conv2d(x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias, kernel_size, stride, padding, *,
           accumulate_only: bool = False, config: Config | None = None) -> torch.Tensor:
    """x [B, C, H, W] -> y [B, N, H_out, W_out] in x's dtype and memory format (or the int32
    accumulator with accumulate_only=True). Square stride and padding; config forces block sizes."""
    if stride[0] != stride[1] or padding[0] != padding[1]:
        raise ValueError(f"the Triton conv takes square strides and paddings, got stride={stride}, padding={padding}")
    b, c, h, w = x.shape
    kh, kw = kernel_size
    step, pad = stride[0], padding[0]
    n = qweight.shape[0]
    h_out = (h + 2 * pad - kh) // step + 1
    w_out = (w + 2 * pad - kw) // step + 1
    m = b * h_out * w_out
    w_scale, w_sum, bias = per_channel_vectors(w_scale, w_sum, bias)
    out = output_like(x, n, h_out, w_out, torch.int32 if accumulate_only else x.dtype)

    def launch(cfg: Config):
        _conv2d_kernel[(tiles(m, n, cfg),)](
            x, qweight, out, w_scale, w_sum, bias, x_scale, x_zero,
            c, h, w, n, h_out, w_out, m,
            x.stride(0), x.stride(1), x.stride(2), x.stride(3),
            qweight.stride(0), qweight.stride(1),
            out.stride(0), out.stride(1), out.stride(2), out.stride(3),
            KH=kh, KW=kw, STRIDE=step, PAD=pad,
            W_BITS=w_bits, A_BITS=a_bits, HAS_BIAS=bias is not None, ACCUMULATE_ONLY=accumulate_only,
            enable_fp_fusion=False,  # a fused multiply-add would round differently from the reference
            **cfg.launch_args(),
        )

    if config is None:
        layout = "nhwc" if is_channels_last(x) else "nchw"
        key = (f"conv2d|{kh}x{kw}/{step}|b={b}|c={c}|h={h}|w={w}|n={n}|{layout}|w{w_bits}|{x.dtype}"
               f"|{device_tag(x.device)}")
        config = choose_config(key, m, n, x.element_size(), launch)
    launch(config)
    return out
