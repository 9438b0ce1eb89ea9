"""Low-bit kernels behind QLinear / QConv2d, and the backend dispatch.

The interface is three functions on plain tensors, so that backends stay interchangeable and the
torch backend can serve as the exact oracle for the others:

    quantized_linear(x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias)
    quantized_conv2d(x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias,
                     kernel_size, stride, padding)
    quantize_input(x, x_scale, x_zero, a_bits)

- x: floating point (fp32/fp16/bf16); linear takes [M, K], conv takes [B, C, H, W] (any memory
  format). The result has x's dtype.
- qweight: packed integer weights from mixq.quantizers.pack_weight, [N, ceil(K / (8 // w_bits))];
  for convs K is ordered (kernel row, kernel column, input channel), i.e. channels-last.
- w_scale: fp32 [N]; w_sum: int32 [N] (sum of the integer weights of each output channel).
- x_scale, x_zero: fp32 0-dim tensors (tensors, not numbers: no host sync, CUDA-graph friendly).
- The math, identical in every backend: acc = sum_k q_x[m, k] * q_w[n, k] in int32, then
  y = float32(acc - x_zero * w_sum[n]) * (x_scale * w_scale[n]) + bias[n], cast to x's dtype.
  Padded conv borders hold the real zero of the input, whose code is exactly x_zero.

Backend: MIXQ_BACKEND=auto|torch|triton (read at each call; auto = triton on CUDA, torch otherwise).
"""

from __future__ import annotations

import os

import torch

from . import reference

BACKENDS = ("auto", "torch", "triton")


def selected_backend(x: torch.Tensor) -> str:
    choice = os.environ.get("MIXQ_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"MIXQ_BACKEND={choice!r} is not one of {BACKENDS}")
    if choice == "auto":
        return "triton" if x.is_cuda and _triton_available() else "torch"
    return choice


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton():
    from . import triton_backend

    return triton_backend


def quantized_linear(x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias=None):
    if selected_backend(x) == "triton":
        return _triton().quantized_linear(x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias)
    return reference.quantized_linear(x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias)


def quantized_conv2d(x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias, kernel_size, stride, padding):
    if selected_backend(x) == "triton":
        return _triton().quantized_conv2d(
            x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias, kernel_size, stride, padding
        )
    return reference.quantized_conv2d(
        x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias, kernel_size, stride, padding
    )


def quantize_input(x, x_scale, x_zero, a_bits):
    return reference.quantize_input(x, x_scale, x_zero, a_bits)


__all__ = ["quantized_linear", "quantized_conv2d", "quantize_input", "selected_backend", "BACKENDS"]
