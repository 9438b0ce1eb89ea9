"""The Triton backend: the kernels of triton_gemm.py / triton_conv.py behind the interface of
kernels/reference.py, with an explicit fallback to that reference for what they do not cover.

Supported: fp32/fp16/bf16 inputs, w_bits 8/4/2, a_bits 8/4, CUDA tensors (or any device under
TRITON_INTERPRET=1); convs 1x1 (stride 1, no padding) and 3x3 (stride 1 or 2, padding 1), the
convs of SDXL and SD1.5 UNets. Anything else runs on the exact torch reference, with a
TritonFallbackWarning once per reason, so that a result is never silently wrong or silently slow.
"""

from __future__ import annotations

import math

import torch

from mixq.quantizers import packed_width

from . import reference, triton_conv, triton_gemm
from .fallback import warn_once

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
WEIGHT_BITS = (2, 4, 8)
ACTIVATION_BITS = (4, 8)
# (kernel_size, stride, padding)
SUPPORTED_CONVS = {
    ((1, 1), (1, 1), (0, 0)),
    ((3, 3), (1, 1), (1, 1)),
    ((3, 3), (2, 2), (1, 1)),
}
# The kernels index memory with int32 offsets.
MAX_OFFSET = 2**31 - 1


class TritonFallbackWarning(UserWarning):
    """A call ran on the torch reference because the Triton kernels do not support it."""


def warn_fallback(reason: str):
    warn_once(TritonFallbackWarning, reason, f"mixq: the Triton kernels do not support {reason}; running the exact "
              "torch reference instead (slower)")


def unsupported_reason(x: torch.Tensor, w_bits: int, a_bits: int, out_elements: int) -> str | None:
    """Why the Triton kernels cannot run this call, or None when they can."""
    if not (x.is_cuda or triton_gemm.INTERPRETED):
        return f"{x.device.type} tensors (compiled Triton kernels need CUDA; TRITON_INTERPRET=1 emulates them)"
    if x.dtype not in FLOAT_DTYPES:
        return f"{x.dtype} inputs"
    if w_bits not in WEIGHT_BITS:
        return f"{w_bits}-bit weights"
    if a_bits not in ACTIVATION_BITS:
        return f"{a_bits}-bit activations"
    if x.numel() == 0:
        return "empty inputs"
    if max(last_offset(x), out_elements - 1) > MAX_OFFSET:
        return "tensors that span 2^31 elements or more"
    return None


def last_offset(t: torch.Tensor) -> int:
    """The offset in elements of t's last element from its first."""
    return sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))


def check_weight_width(qweight: torch.Tensor, w_bits: int, k: int):
    if qweight.shape[1] < packed_width(k, w_bits):
        raise ValueError(f"qweight {tuple(qweight.shape)} holds fewer than {k} {w_bits}-bit values per row")


def quantized_linear(x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias=None, *, input_key=None):
    k, n = x.shape[-1], qweight.shape[0]
    reason = unsupported_reason(x, w_bits, a_bits, math.prod(x.shape[:-1]) * n)
    if reason is not None:
        warn_fallback(reason)
        return reference.quantized_linear(x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias)
    check_weight_width(qweight, w_bits, k)
    y = triton_gemm.linear(x.reshape(-1, k), qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias,
                           input_key=resolved(input_key))
    return y.reshape(*x.shape[:-1], n)


def quantized_conv2d(x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias, kernel_size, stride, padding,
                     *, input_key=None):
    args = (x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias, kernel_size, stride, padding)
    geometry = (tuple(kernel_size), tuple(stride), tuple(padding))
    if geometry not in SUPPORTED_CONVS:
        reason = f"convolutions with kernel_size={geometry[0]}, stride={geometry[1]}, padding={geometry[2]}"
    else:
        reason = unsupported_reason(x, w_bits, a_bits, conv_output_elements(x, qweight.shape[0], *geometry))
    if reason is not None:
        warn_fallback(reason)
        return reference.quantized_conv2d(*args)
    check_weight_width(qweight, w_bits, kernel_size[0] * kernel_size[1] * x.shape[1])
    return triton_conv.conv2d(*args, input_key=resolved(input_key))


def resolved(input_key):
    """kernels' input_key argument (None or a function) as the key itself."""
    return None if input_key is None else input_key()


def conv_output_elements(x, n, kernel_size, stride, padding) -> int:
    h_out, w_out = reference.conv_output_size(x.shape[2:], kernel_size, stride, padding)
    return x.shape[0] * n * h_out * w_out
