"""The exact torch backend: integer codes, int32 accumulation (torch._int_mm), then the epilogue.

This is the CPU path and the oracle the Triton kernels are tested against, so it is written for
clarity and exactness, not speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixq.quantizers import quantize_activation, unpack_weight


def conv_output_size(size, kernel_size, stride, padding) -> tuple[int, int]:
    """(height, width) of a convolution's output over an input of spatial `size` (h, w), without dilation."""
    (h, w), (kh, kw), (sh, sw), (ph, pw) = size, kernel_size, stride, padding
    return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1


def quantize_input(x, x_scale, x_zero, a_bits):
    return quantize_activation(x, x_scale, x_zero, a_bits)


def int_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] @ int8 [N, K]^T -> int32 [M, N], exact."""
    if a.is_cuda and (a.shape[0] <= 16 or a.shape[1] % 8 or b_t.shape[0] % 8):
        # torch._int_mm's CUDA path has shape constraints and CUDA has no integer matmul; float64
        # is exact here too (products of codes < 2^14, sums far below 2^53), only slower.
        return (a.double() @ b_t.double().t()).to(torch.int32)
    return torch._int_mm(a.contiguous(), b_t.t().contiguous())


def epilogue(acc, x_scale, x_zero, w_scale, w_sum, bias, out_dtype):
    """y = f32(acc - z * wsum) * (s_x * s_w) + bias, in fp32, cast once to the output dtype."""
    folded = acc - x_zero.to(torch.int32) * w_sum.to(torch.int32)
    y = folded.to(torch.float32) * (x_scale.to(torch.float32) * w_scale.to(torch.float32))
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)


def quantized_linear(x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias=None):
    k = x.shape[-1]
    q_x = quantize_input(x, x_scale, x_zero, a_bits)
    q_w = unpack_weight(qweight, w_bits, k)
    acc = int_matmul(q_x, q_w)
    return epilogue(acc, x_scale, x_zero, w_scale, w_sum, bias, x.dtype)


def im2col_channels_last(q_x: torch.Tensor, x_zero, kernel_size, stride, padding) -> tuple[torch.Tensor, int, int]:
    """int8 [B, C, H, W] -> int8 [B * Ho * Wo, kh * kw * C] in (row, col, channel) order.

    Borders are padded with the code of the real zero (x_zero), as the kernels do.
    """
    kh, kw = kernel_size
    b, c, h, w = q_x.shape
    # Integer codes are exact in fp32, and F.pad / F.unfold only move them around. Padding the
    # centered codes with 0 puts x_zero at the borders without reading x_zero on the host (a sync
    # that would break CUDA-graph capture).
    zero = x_zero.to(torch.float32) if torch.is_tensor(x_zero) else float(x_zero)
    padded = F.pad(q_x.float() - zero, (padding[1], padding[1], padding[0], padding[0])) + zero
    cols = F.unfold(padded, (kh, kw), stride=stride)  # [B, C * kh * kw, L], channel-major
    ho, wo = conv_output_size((h, w), kernel_size, stride, padding)
    cols = cols.view(b, c, kh * kw, ho * wo).permute(0, 3, 2, 1).reshape(b * ho * wo, kh * kw * c)
    return cols.to(torch.int8), ho, wo


def quantized_conv2d(x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias, kernel_size, stride, padding):
    b, c = x.shape[:2]
    kh, kw = kernel_size
    q_x = quantize_input(x, x_scale, x_zero, a_bits)
    cols, ho, wo = im2col_channels_last(q_x, x_zero, kernel_size, stride, padding)
    q_w = unpack_weight(qweight, w_bits, kh * kw * c)
    acc = int_matmul(cols, q_w)
    y = epilogue(acc, x_scale, x_zero, w_scale, w_sum, bias, x.dtype)
    y = y.view(b, ho, wo, -1).permute(0, 3, 1, 2)  # channels_last strides
    # Follow the input's memory format, as torch's convs do: later ops reduce in layout order.
    return y if is_channels_last(x) else y.contiguous()


def is_channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
