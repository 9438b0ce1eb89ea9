"""Triton activation quantization: floating-point input -> int8 codes, once per layer input.

    q = clamp(round(x / s) + z, qmin, qmax)      exactly mixq.quantizers.quantize_activation

A memory-bound pass that reads the input once and writes one byte per element, so that the GEMM
and convolution main loops read int8 codes only (quantizing inside their prologue redid the work
for every N-tile, and an IEEE division costs ~26 instructions per element).

The input is seen as [B, H, W, C] with any strides: a linear input [M, K] is [1, 1, M, K], a
convolution input is its NCHW or channels-last tensor, permuted. The codes are always written dense
as [B * H' * W', C], i.e. channels-last for a convolution, the layout its kernel reads with
contiguous channel loads. For a padded convolution the codes carry the padding (H' = H + 2 pad):
the border holds x_zero, the code of the input's real zero, so the main loop needs no masks.

Layers that read one input tensor with equal quantization parameters (attention's to_q, to_k and
to_v) share one pass: shared_codes keeps the last codes made, keyed by the input's identity and
the parameters' values (kernels.quantized_linear's input_key).
"""

from __future__ import annotations

import threading

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# Adding and subtracting 1.5 * 2^23 rounds an fp32 |v| < 2^22 to an integer, half to even, like
# torch.round: the interpreter's rounding (below).
ROUND_MAGIC = tl.constexpr(12582912.0)
# Beyond +-256 every code saturates whatever the zero point (|z| <= 128): clamping there first
# changes no result and keeps |v| in the range where ROUND_MAGIC is exact.
SATURATED = tl.constexpr(256.0)


def _is_interpreted(kernel) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


@triton.jit
def _probe():
    pass


# Triton decides at decoration time whether kernels run compiled or in its numpy interpreter
# (TRITON_INTERPRET=1, which also accepts CPU tensors).
INTERPRETED = _is_interpreted(_probe)
# Compiled kernels round with one instruction (cvt.rni); the interpreter, which has no libdevice,
# with ROUND_MAGIC after clamping to SATURATED. Both round half to even, and the final clamp makes
# every value beyond the clamp saturate alike.
RINT_WITH_LIBDEVICE = tl.constexpr(not INTERPRETED)

BLOCK_P, BLOCK_C = 64, 64
INTERPRETER_BLOCKS = (64, 64)


@triton.jit
def quantize_tile(x, x_scale, x_zero, A_BITS: tl.constexpr):
    """Floating-point tile -> int8 codes clamp(round(x / s) + z), as mixq.quantizers does."""
    v = tl.math.div_rn(x.to(tl.float32), x_scale)  # IEEE division: Triton's `/` need not round correctly
    if RINT_WITH_LIBDEVICE:
        v = libdevice.rint(v)
    else:
        v = tl.minimum(tl.maximum(v, -SATURATED), SATURATED)
        v = (v + ROUND_MAGIC) - ROUND_MAGIC
    q = tl.minimum(tl.maximum(v + x_zero, -(1 << (A_BITS - 1))), (1 << (A_BITS - 1)) - 1)
    return q.to(tl.int8)


@triton.jit
def _quantize_kernel(
    x_ptr, q_ptr, x_scale_ptr, x_zero_ptr,
    H, W, C, stride_xb, stride_xh, stride_xw, stride_xc,
    A_BITS: tl.constexpr, PAD: tl.constexpr, PER_BYTE: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    batch = tl.program_id(2)
    padded_w = W + 2 * PAD
    pixels = (H + 2 * PAD) * padded_w
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # pixels of the padded image
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    h = offs_p // padded_w - PAD
    w = offs_p % padded_w - PAD
    inside = (h >= 0) & (h < H) & (w >= 0) & (w < W)
    c_valid = (offs_c < C)[None, :]
    # The border reads as 0.0, the real zero of the input, whose code is exactly x_zero.
    x = tl.load(x_ptr + batch * stride_xb + (h * stride_xh + w * stride_xw)[:, None] + offs_c[None, :] * stride_xc,
                mask=inside[:, None] & c_valid, other=0.0)
    q = quantize_tile(x, tl.load(x_scale_ptr), tl.load(x_zero_ptr), A_BITS)
    if PER_BYTE > 1:  # lane-major within each group of GROUP channels (BLOCK_C is a multiple of GROUP)
        q = tl.reshape(q, (BLOCK_P, BLOCK_C // GROUP, GROUP // PER_BYTE, PER_BYTE))
        q = tl.reshape(tl.permute(q, (0, 1, 3, 2)), (BLOCK_P, BLOCK_C))
    rows = batch * pixels + offs_p
    tl.store(q_ptr + rows[:, None] * C + offs_c[None, :], q, mask=(offs_p < pixels)[:, None] & c_valid)


def quantize_image(x: torch.Tensor, x_scale, x_zero, a_bits: int, *, pad: int = 0,
                   per_byte: int = 1, group: int = 1) -> torch.Tensor:
    """x viewed as [B, H, W, C] (4-D, any strides) -> int8 codes [B * (H + 2 pad) * (W + 2 pad), C],
    dense, with a border of pad pixels holding x_zero and each block of group channels lane-major
    for per_byte values per weight byte (identity for per_byte=1)."""
    b, h, w, c = x.shape
    pixels = (h + 2 * pad) * (w + 2 * pad)
    codes = torch.empty((b * pixels, c), device=x.device, dtype=torch.int8)
    block_p, block_c = INTERPRETER_BLOCKS if INTERPRETED else (BLOCK_P, BLOCK_C)
    if per_byte > 1 and block_c < group:  # a block holds whole groups, reordered in registers
        block_p, block_c = max(1, block_p * block_c // group), group
    grid = (triton.cdiv(pixels, block_p), triton.cdiv(c, block_c), b)
    _quantize_kernel[grid](
        x, codes, x_scale, x_zero, h, w, c, x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        A_BITS=a_bits, PAD=pad, PER_BYTE=per_byte, GROUP=group, BLOCK_P=block_p, BLOCK_C=block_c,
        enable_fp_fusion=False,  # keep every rounding step where the reference has it
        num_warps=4,
    )
    return codes


class _LastCodes(threading.local):
    entry: tuple | None = None  # (input, its identity, key, codes)


_last_codes = _LastCodes()


def tensor_identity(x: torch.Tensor) -> tuple:
    """What makes two tensors read the same values: storage, view and the version counter that
    every in-place write bumps."""
    return (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), x.stride(), x.dtype, x.device,
            x._version)


def shared_codes(x: torch.Tensor, key, make):
    """make() for input x, or the codes of the previous call when it had the same input and key.

    key: the quantizer's values and the codes' layout, or None (never shared). The entry holds x
    itself, so its storage cannot be freed and reused by another tensor while the entry lives.
    Not used while a CUDA graph is captured: a replay must run every pass it captured."""
    if key is None or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        return make()
    identity = tensor_identity(x)
    entry = _last_codes.entry
    if entry is not None and entry[1] == identity and entry[2] == key:
        return entry[3]
    codes = make()
    _last_codes.entry = (x, identity, key, codes)
    return codes


def forget_shared_codes():
    """Drop the kept input and codes (their memory)."""
    _last_codes.entry = None
