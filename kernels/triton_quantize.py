"""Triton activation quantization: floating-point input -> int8 codes, once per layer input.

    q = clamp(round(x / s) + z, qmin, qmax)      exactly mixq.quantizers.quantize_activation

A memory-bound pass that reads the input once and writes one byte per element, so that the GEMM
and convolution main loops read int8 codes only (quantizing inside their prologue redid the work
for every N-tile, and an IEEE division costs ~26 instructions per element).

The input is seen as [B, P, C] with any strides: a linear input is [1, M, K], a convolution input
is [B, H * W, C], whether NCHW or channels-last. The codes are always written dense as [B * P, C],
i.e. channels-last for a convolution, the layout its kernel reads with contiguous channel loads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Adding and subtracting 1.5 * 2^23 rounds an fp32 |v| < 2^22 to an integer, half to even, like
# torch.round; unlike libdevice's rint it also runs in the interpreter.
ROUND_MAGIC = tl.constexpr(12582912.0)
# Beyond +-256 every code saturates whatever the zero point (|z| <= 128): clamping there first
# changes no result and keeps |v| in the range where ROUND_MAGIC is exact.
SATURATED = tl.constexpr(256.0)

BLOCK_P, BLOCK_C = 64, 64
INTERPRETER_BLOCKS = (64, 64)


@triton.jit
def quantize_tile(x, x_scale, x_zero, A_BITS: tl.constexpr):
    """Floating-point tile -> int8 codes clamp(round(x / s) + z), as mixq.quantizers does."""
    v = tl.math.div_rn(x.to(tl.float32), x_scale)  # IEEE division: Triton's `/` need not round correctly
    v = tl.minimum(tl.maximum(v, -SATURATED), SATURATED)
    v = (v + ROUND_MAGIC) - ROUND_MAGIC
    q = tl.minimum(tl.maximum(v + x_zero, -(1 << (A_BITS - 1))), (1 << (A_BITS - 1)) - 1)
    return q.to(tl.int8)


@triton.jit
def _quantize_kernel(
    x_ptr, q_ptr, x_scale_ptr, x_zero_ptr,
    P, C, stride_xb, stride_xp, stride_xc,
    A_BITS: tl.constexpr, PER_BYTE: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    batch = tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_p < P)[:, None] & (offs_c < C)[None, :]
    x = tl.load(x_ptr + batch * stride_xb + offs_p[:, None] * stride_xp + offs_c[None, :] * stride_xc, mask=mask)
    q = quantize_tile(x, tl.load(x_scale_ptr), tl.load(x_zero_ptr), A_BITS)
    rows = batch * P + offs_p
    within = offs_c % GROUP
    lane_major = offs_c - within + (within % PER_BYTE) * (GROUP // PER_BYTE) + within // PER_BYTE
    tl.store(q_ptr + rows[:, None] * C + lane_major[None, :], q, mask=mask)


def quantize_rows(x: torch.Tensor, x_scale, x_zero, a_bits: int, interpreted: bool, *, per_byte: int = 1,
                  group: int = 1) -> torch.Tensor:
    """x viewed as [B, P, C] (3-D, any strides) -> int8 codes [B * P, C], dense, each block of
    group channels lane-major for per_byte values per weight byte (identity for per_byte=1)."""
    b, p, c = x.shape
    codes = torch.empty((b * p, c), device=x.device, dtype=torch.int8)
    block_p, block_c = INTERPRETER_BLOCKS if interpreted else (BLOCK_P, BLOCK_C)
    grid = (triton.cdiv(p, block_p), triton.cdiv(c, block_c), b)
    _quantize_kernel[grid](
        x, codes, x_scale, x_zero, p, c, x.stride(0), x.stride(1), x.stride(2),
        A_BITS=a_bits, PER_BYTE=per_byte, GROUP=group, BLOCK_P=block_p, BLOCK_C=block_c,
        enable_fp_fusion=False,  # keep every rounding step where the reference has it
        num_warps=4,
    )
    return codes
