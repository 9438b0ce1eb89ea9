"""Low-bit kernels behind QLinear / QConv2d, and the backend dispatch.

The interface is three functions on plain tensors, so that backends stay interchangeable and the
torch backend can serve as the exact oracle for the others:

    quantized_linear(x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias, *, input_key=None)
    quantized_conv2d(x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias,
                     kernel_size, stride, padding, *, input_key=None)
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
- input_key: None, or a function of no arguments that returns (a_bits, x_scale, x_zero) as Python
  numbers, or None. Two calls in a row on the same input tensor (same storage, view and version)
  with equal keys may share one quantize pass: the Triton backend does (attention's to_q / to_k /
  to_v read one tensor); the others never call it. The key must match the tensors;
  QuantizedLayer.input_key guarantees it.

Backend: MIXQ_BACKEND=auto|torch|triton|onednn, read at each call. auto = triton on CUDA, onednn on
an x86 CPU (oneDNN int8 kernels, kernels/onednn.py), torch elsewhere. A backend that cannot run a call
falls back to the torch reference with a one-time warning naming why.
"""

from __future__ import annotations

import os

import torch

from mixq.errors import ConfigError

from . import onednn, reference

BACKENDS = ("auto", "torch", "triton", "onednn")


def selected_backend(x: torch.Tensor) -> str:
    choice = os.environ.get("MIXQ_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ConfigError(f"MIXQ_BACKEND={choice!r} is not one of {BACKENDS}")
    if choice == "auto":
        if x.is_cuda:
            return "triton" if _triton_available() else "torch"
        return "onednn" if onednn.unavailable_reason() is None else _cpu_fallback()
    if choice == "onednn" and (x.is_cuda or onednn.unavailable_reason() is not None):
        return _cpu_fallback("tensors on a CUDA device" if x.is_cuda else None)
    return choice


def _cpu_fallback(reason: str | None = None) -> str:
    onednn.warn_fallback(reason or onednn.unavailable_reason())
    return "torch"


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton():
    from . import triton_backend

    return triton_backend


def quantized_linear(x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias=None, *, input_key=None):
    backend = selected_backend(x)
    if backend == "onednn":
        return onednn.quantized_linear(x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias)
    if qweight.is_mkldnn:  # a held oneDNN layout, another backend asked for (MIXQ_BACKEND): the plain codes
        qweight = onednn.plain_codes(qweight, "linear")
    if backend == "triton":
        return _triton().quantized_linear(x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias,
                                          input_key=input_key)
    return reference.quantized_linear(x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias)


def quantized_conv2d(x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias, kernel_size, stride, padding,
                     *, input_key=None):
    backend = selected_backend(x)
    if backend == "onednn":
        return onednn.quantized_conv2d(
            x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias, kernel_size, stride, padding
        )
    if qweight.is_mkldnn:
        qweight = onednn.plain_codes(qweight, "conv2d")
    if backend == "triton":
        return _triton().quantized_conv2d(
            x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias, kernel_size, stride, padding,
            input_key=input_key,
        )
    return reference.quantized_conv2d(
        x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias, kernel_size, stride, padding
    )


def quantize_input(x, x_scale, x_zero, a_bits):
    return reference.quantize_input(x, x_scale, x_zero, a_bits)


def prepare_layer(layer, cpu_weights: str = "packed") -> None:
    """Lay out a QLinear / QConv2d's integer weights for the CPU kernels now (quantize / load time),
    so that no call, the first included, reorders weights, and record its activation parameters
    as numbers (QuantizedLayer.input_key) so that layers reading one input may share its codes.
    cpu_weights: "packed" keeps 4/2-bit weights packed (unpacked per call), "int8" unpacks them once
    into oneDNN's int8 layout (kernels/onednn.py)."""
    if hasattr(layer, "refresh_input_key"):
        layer.refresh_input_key()
    if not hasattr(layer, "kernel_weight") or layer.w_bits == 16:  # fake-quant twins, weight-float layers
        return
    if layer.kernel_weight(0).is_cuda:
        return
    # Probed here, once, for 4/2-bit layers too: a first probe inside torch.compile's trace would break
    # its graph (the probe runs a oneDNN op that dynamo does not trace).
    onednn.unavailable_reason()
    if layer.a_bits == 16 or layer.hold_kernel_layouts():  # 8-bit: the layer keeps oneDNN's layout alone
        return
    for p in range(len(layer.part_sizes)):
        onednn.prepare(getattr(layer, f"qweight_{p}"), layer.w_bits, layer.w_scale, **layer.part_geometry(p),
                       cpu_weights=cpu_weights)


__all__ = ["quantized_linear", "quantized_conv2d", "quantize_input", "prepare_layer", "selected_backend", "BACKENDS"]
