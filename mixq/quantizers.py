"""Quantizer math: small pure functions, no modules and no state.

Weights: per-output-channel, symmetric, min-max, round to nearest. A b-bit weight is an integer
in [-(2^(b-1) - 1), 2^(b-1) - 1] (so 2-bit weights are ternary), times a per-channel scale.

Activations: per-tensor, asymmetric, static. A b-bit activation is a signed integer in
[-2^(b-1), 2^(b-1) - 1]; x ~= scale * (q - zero). The calibrated range is widened to contain 0 so
that 0 is exactly representable (q == zero): padded conv borders and masked loads then contribute
nothing after zero-point folding.

Real layers use the integer forms (quantize_weight + pack_weight, activation_qparams +
quantize_activation); sensitivity analysis and tests use the fake-quant twins, which must agree
with the integer path up to floating-point rounding.
"""

from __future__ import annotations

import torch

WEIGHT_BITS = (2, 4, 8)
ACTIVATION_BITS = (4, 8)
FLOAT_BITS = 16  # "16 bits" means that side of the layer stays in floating point


# --- validation --------------------------------------------------------------------------------


def check_weight_bits(bits: int) -> int:
    if bits not in WEIGHT_BITS and bits != FLOAT_BITS:
        raise ValueError(
            f"unsupported weight bit-width {bits!r}: choose one of {WEIGHT_BITS} "
            f"or {FLOAT_BITS} to keep the weights in floating point"
        )
    return int(bits)


def check_activation_bits(bits: int) -> int:
    if bits not in ACTIVATION_BITS and bits != FLOAT_BITS:
        raise ValueError(
            f"unsupported activation bit-width {bits!r}: choose one of {ACTIVATION_BITS} "
            f"or {FLOAT_BITS} to keep the activations in floating point"
        )
    return int(bits)


# --- weights -----------------------------------------------------------------------------------


def weight_qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def weight_scales(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric scales (fp32, shape [out_channels])."""
    absmax = weight.detach().float().flatten(1).abs().amax(dim=1)
    # An all-zero channel gets scale 1 so that it quantizes to zeros instead of NaN.
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    return absmax / weight_qmax(bits)


def quantize_weight(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (integer weight as int8 with the input's shape, per-channel fp32 scales)."""
    scales = weight_scales(weight, bits)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    qmax = weight_qmax(bits)
    q = torch.clamp(torch.round(weight.detach().float() / scales.view(shape)), -qmax, qmax)
    return q.to(torch.int8), scales


def dequantize_weight(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    shape = (-1,) + (1,) * (q.dim() - 1)
    return q.float() * scales.view(shape)


def fake_quantize_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize in floating point; returns the input's dtype."""
    q, scales = quantize_weight(weight, bits)
    return dequantize_weight(q, scales).to(weight.dtype)


# --- packing: 8 // bits values per byte, along the last (reduction) dimension -------------------
# Each value is a b-bit two's-complement field; element k of a row sits in byte k // per_byte at bit
# offset (k % per_byte) * bits. Unpacking shifts a field to the top of its byte and arithmetically
# back (sign extension); the GPU kernels stop after the first shift and let the int32 accumulator
# carry the factor 2^(8 - b). Checkpoints before format 3 stored offset-binary fields (q + 2^(b-1)),
# which differ from these in the top bit of each field only (flip_field_sign_bits).

# By bits: the top bit of every field of a byte.
FIELD_SIGN_BITS = {4: 0x88, 2: 0xAA}


def values_per_byte(bits: int) -> int:
    return 8 // bits


def packed_width(k: int, bits: int) -> int:
    per_byte = values_per_byte(bits)
    return (k + per_byte - 1) // per_byte


def sign_extended(field: torch.Tensor, bits: int) -> torch.Tensor:
    """b-bit two's-complement fields held as 0 .. 2^b - 1 -> their signed values."""
    half = 2 ** (bits - 1)
    return (field ^ half) - half


def pack_weight(q: torch.Tensor, bits: int) -> torch.Tensor:
    """[N, K] int8 -> [N, ceil(K / (8 // bits))]; 8-bit weights stay int8, 4/2-bit become uint8."""
    if q.dim() != 2:
        raise ValueError(f"pack_weight expects a 2-D [out, in] integer weight, got shape {tuple(q.shape)}")
    if bits == 8:
        return q.to(torch.int8).contiguous()
    per_byte = values_per_byte(bits)
    n, k = q.shape
    # Padding holds 0, so it never contributes to a dot product.
    padded = torch.zeros(n, packed_width(k, bits) * per_byte, dtype=torch.int32, device=q.device)
    padded[:, :k] = q.to(torch.int32) & ((1 << bits) - 1)
    lanes = padded.view(n, -1, per_byte)
    packed = torch.zeros(lanes.shape[:2], dtype=torch.int32, device=q.device)
    for lane in range(per_byte):
        packed |= lanes[:, :, lane] << (lane * bits)
    return packed.to(torch.uint8)


def unpack_weight(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of pack_weight: [N, packed] -> [N, k] int8."""
    if bits == 8:
        return packed[:, :k].to(torch.int8)
    per_byte = values_per_byte(bits)
    mask = (1 << bits) - 1
    as_int = packed.to(torch.int32)
    lanes = [sign_extended((as_int >> (lane * bits)) & mask, bits) for lane in range(per_byte)]
    return torch.stack(lanes, dim=-1).flatten(1)[:, :k].to(torch.int8)


def flip_field_sign_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Offset-binary packed fields <-> two's-complement ones (the same operation both ways)."""
    return packed ^ FIELD_SIGN_BITS[bits]


# --- activations -------------------------------------------------------------------------------


def activation_qrange(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def activation_qparams(lo: float, hi: float, bits: int) -> tuple[float, int]:
    """(scale, zero_point) for a calibrated range [lo, hi]; the range is widened to contain 0."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qmin, qmax = activation_qrange(bits)
    if hi - lo <= 0:
        return 1.0, 0
    scale = (hi - lo) / (qmax - qmin)
    zero = int(round(qmin - lo / scale))
    return scale, max(qmin, min(qmax, zero))


def quantize_activation(x: torch.Tensor, scale, zero, bits: int) -> torch.Tensor:
    """x -> int8 codes q with x ~= scale * (q - zero). scale/zero: numbers or 0-dim tensors."""
    qmin, qmax = activation_qrange(bits)
    q = torch.round(x.float() / scale) + zero
    return torch.clamp(q, qmin, qmax).to(torch.int8)


def fake_quantize_activation(x: torch.Tensor, scale, zero, bits: int) -> torch.Tensor:
    q = quantize_activation(x, scale, zero, bits)
    return ((q.float() - zero) * scale).to(x.dtype)


# --- the folded epilogue -----------------------------------------------------------------------


def weight_row_sums(q: torch.Tensor) -> torch.Tensor:
    """sum_k w[n, k] (int32, shape [N]): lets the GEMM run on raw codes, since
    sum_k (q_x - z) w = acc - z * wsum."""
    return q.flatten(1).to(torch.int32).sum(dim=1)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """10 * log10(||ref||^2 / ||approx - ref||^2); +inf when identical."""
    ref = reference.detach().double()
    noise = (approx.detach().double() - ref).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))
