"""Triton GEMM for quantized Linear layers: int8 activation codes x W{8,4,2} weights -> int32.

    y[m, n] = f32(acc[m, n] - z_x * wsum[n]) * (s_x * s_w[n]) + bias[n],
    acc[m, n] = sum_k q_x[m, k] * q_w[n, k]

The input is quantized once per call by triton_quantize.py; the main loop then only loads int8
codes and packed weights and issues int8 tensor-core MMAs.

- EVEN_K (K a multiple of BLOCK_K, true of every SDXL layer): no masks in the main loop. Packed
  weights are loaded as one [BLOCK_N, BLOCK_K / per_byte] byte tile per K-step, a software-pipeline
  stage like any other load. Each of the per_byte lanes of that tile (the low nibbles, the high
  nibbles, ...) becomes int8 with at most two SIMD bit operations per 4 bytes; the lanes, side by side
  along K, make one [BLOCK_N, BLOCK_K] operand for one MMA per K-step. The activation block
  matches because the quantize pass stored it lane-major within each BLOCK_K block. No
  shuffles: the dot product does not care about K order.
- The weights are the MMA's first operand, which Hopper's wgmma reads from registers: the
  unpacked weights go straight from the unpack into the tensor core, with no shared-memory round
  trip. The tile is therefore computed transposed, [BLOCK_N, BLOCK_M], and transposed once at
  the end.
- Otherwise (odd test shapes): masked loads, each weight byte gathered per value it holds.
- Rows and columns past the edge of M and N are clamped to the last one instead of being masked:
  their loads stay in bounds (a min, where a wrap-around modulo costs an integer division), and
  their results are never stored.
- SPLIT_K > 1 (grids that under-fill the GPU): each program sums a slice of K and adds its int32
  partial tile to a zeroed accumulator with atomic adds, exact in any order; a second small kernel
  applies the epilogue. The result is bit-identical to SPLIT_K = 1.

The epilogue rounds exactly as kernels/reference.py does. The building blocks below are shared
with the implicit-GEMM convolution in triton_conv.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autotune import (
    INTERPRETER_CONFIG,
    Config,
    candidates_for,
    default_config,
    device_tag,
    tiles,
    tuned_config,
    unmasked_loop,
)
from .triton_quantize import INTERPRETED, quantize_image, shared_codes

# --- building blocks ---------------------------------------------------------------------------

# Compiled kernels unpack 4 bytes per instruction with inline PTX; the interpreter, which cannot
# run PTX, evaluates the same bit operations per byte.
UNPACK_WITH_PTX = tl.constexpr(not INTERPRETED)
DIGITS = tl.constexpr(tuple(str(d) for d in range(8)))
# By W_BITS: whether the unmasked main loops carry their load pointers from one K-step to the next
# (+= BLOCK_K) rather than recompute them from the K-step's offset: whichever ptxas compiles shorter,
# measured with benchmarks/sass_gate.py on sm_90. Carried pointers make the packed-weight loops 5-13
# instructions per K-step shorter (linear) and 5-17 (conv, bar its 128x64 tile: 11 longer), and the
# int8 loops 10-18 longer.
CARRIED_POINTERS = tl.constexpr((None, None, True, None, True, None, None, None, False))
# By W_BITS: the top field of each byte of a 32-bit word.
TOP_FIELD_MASK = tl.constexpr((None, None, "0xC0C0C0C0", None, "0xF0F0F0F0"))
# Whether packed weights reach an mma.sync (MMA v2, sm_8x) dot through a branch (weight_operand).
# Triton 3.6.0 gives both operands of such a dot kWidth 8 instead of 4 when a tt.join is among the
# register-only ops that produce an operand (AccelerateMatmul then halves the bit width it takes
# the operand to be loaded with), and both operands' fragments then load with 64-bit LDS plus
# register moves instead of ldmatrix: 1.3-1.5x longer W4/W2 main loops on sm_80 than Triton 3.9.0,
# which keeps kWidth 4. Measured with benchmarks/sass_gate.py on 3.6.0 and 3.9.0 only; the
# versions in between take the 3.6 path.
TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])
MMA_V2_OPERAND_THROUGH_BRANCH = tl.constexpr(TRITON_VERSION < (3, 9))
# Whether the activation tile of a packed-weight wgmma loop gets a second, never-executed use
# (activation_ring): Triton 3.6.0's pipeliner gives a tile that a wgmma reads from shared memory
# one buffer more than its stage distance unless the load has more than one use, the packed tile,
# which reaches the wgmma through registers, gets its stage distance, and each buffer count
# carries its own ring indices. With the second use both tiles get the packed tile's buffer count
# and share one pair of indices: 2-9 fewer instructions per K-step in the sm_90 W4 / W2 loops
# (128x128x256: 147 / 149 -> 138 / 142) and one activation buffer less of shared memory. The wgmma
# is waited for in the same K-step (its weight operand is in registers), before the barrier and
# the copies that refill its buffer, so the extra buffer was never in use. Measured with
# benchmarks/sass_gate.py on 3.6.0 and 3.9.0 only (3.9 compiles as before); the versions in
# between take the 3.6 path.
WGMMA_ACTIVATION_RING_SHARED = tl.constexpr(TRITON_VERSION < (3, 9))


@triton.jit
def weight_lane(packed, LANE: tl.constexpr, W_BITS: tl.constexpr):
    """Lane LANE of every packed byte (two's-complement fields, mixq.quantizers) as the int8
    w * 2^(8 - W_BITS).

    The field is shifted to the top of its byte and the bits below it are cleared, one byte at a
    time, so on 32-bit registers 4 bytes at a time, with one immediate per instruction (a second
    constant would need a register, which ptxas rematerializes in the loop). The factor
    2^(8 - W_BITS) keeps every product within int8 x int8 and is shifted out of the int32
    accumulator, exactly.
    """
    SHIFT: tl.constexpr = 8 - W_BITS * (LANE + 1)
    if UNPACK_WITH_PTX:
        if SHIFT == 0:
            w = tl.inline_asm_elementwise("and.b32 $0, $1, " + TOP_FIELD_MASK[W_BITS] + ";", "=r,r",
                                          [packed], dtype=tl.int8, is_pure=True, pack=4)
        else:
            w = tl.inline_asm_elementwise(
                "{ .reg .b32 t; shl.b32 t, $1, " + DIGITS[SHIFT] + "; and.b32 $0, t, " + TOP_FIELD_MASK[W_BITS]
                + "; }", "=r,r", [packed], dtype=tl.int8, is_pure=True, pack=4)
    else:
        w = ((packed << SHIFT) & ((0xFF << (8 - W_BITS)) & 0xFF)).to(tl.int8, bitcast=True)
    return w


@triton.jit
def unpacked_lanes(packed, W_BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """packed [BLOCK_N, BLOCK_K / per_byte] -> int8 [BLOCK_N, BLOCK_K], lane after lane along K.

    join + permute + reshape only relabel registers (Triton gives the result a linear layout and
    inserts no conversion; benchmarks/sass_gate.py would count one): each thread unpacks the bytes
    it loaded into exactly the MMA operand fragment it holds. weight_operand's branch for mma.sync
    on Triton before 3.9 is the exception."""
    if W_BITS == 8:
        w = packed
    elif W_BITS == 4:
        w = tl.join(weight_lane(packed, 0, W_BITS), weight_lane(packed, 1, W_BITS))
        w = tl.permute(w, (0, 2, 1)).reshape(BLOCK_N, BLOCK_K)
    else:
        w = tl.join(tl.join(weight_lane(packed, 0, W_BITS), weight_lane(packed, 1, W_BITS)),
                    tl.join(weight_lane(packed, 2, W_BITS), weight_lane(packed, 3, W_BITS)))
        w = tl.permute(w, (0, 3, 2, 1)).reshape(BLOCK_N, BLOCK_K)
    return w


@triton.jit
def weight_operand(packed, kt, W_BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   MMA_V2: tl.constexpr):
    """The MMA's weight operand for K-step kt: unpacked_lanes(packed).

    Where MMA_V2_OPERAND_THROUGH_BRANCH holds (Triton before 3.9) and the dot is an mma.sync one, the
    unpack sits in both arms of a branch on kt (always taken, and LLVM merges the identical arms):
    Triton's search for the loaded bit width stops at the branch, so it does not see the join and
    keeps kWidth 4, and its layout propagation stops there too, so the unpacked tile is converted
    to the operand layout through shared memory (one store, ldmatrix loads) instead of being
    unpacked in the operand layout itself. Elsewhere (Triton 3.9, Hopper's wgmma, the interpreter)
    the unpack feeds the dot directly."""
    if W_BITS != 8 and MMA_V2 and MMA_V2_OPERAND_THROUGH_BRANCH and UNPACK_WITH_PTX:
        if kt >= 0:
            w = unpacked_lanes(packed, W_BITS, BLOCK_N, BLOCK_K)
        else:
            w = unpacked_lanes(packed, W_BITS, BLOCK_N, BLOCK_K)
    else:
        w = unpacked_lanes(packed, W_BITS, BLOCK_N, BLOCK_K)
    return w


@triton.jit
def activation_ring(acc_t, a, W_BITS: tl.constexpr, MMA_V2: tl.constexpr):
    """acc_t, after the K-step's dot. Where WGMMA_ACTIVATION_RING_SHARED holds (Triton before 3.9)
    and the weights are packed and the dot a wgmma one, the activation tile a gets a second use
    under a condition that never holds (a negative program id), which LLVM removes after the
    pipeliner has seen it: the pipeliner then gives a the packed tile's buffer count."""
    if W_BITS != 8 and not MMA_V2 and WGMMA_ACTIVATION_RING_SHARED and UNPACK_WITH_PTX:
        if tl.program_id(0) < 0:
            acc_t += tl.max(tl.max(a, 1), 0).to(tl.int32)
    return acc_t


@triton.jit
def gather_weights(w_ptr, w_rows, stride_wn, k0, k_end, W_BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Integer weights [BLOCK_N, BLOCK_K] at reduction indices k0 .. k0 + BLOCK_K, for K not a
    multiple of BLOCK_K: each byte is gathered once per value it holds, and entries at k >= k_end
    are 0, so they add nothing to the dot product whatever the input there."""
    PER_BYTE: tl.constexpr = 8 // W_BITS
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_valid = (offs_k < k_end)[None, :]
    packed = tl.load(w_ptr + w_rows[:, None] * stride_wn + (offs_k // PER_BYTE)[None, :], mask=k_valid, other=0)
    if W_BITS == 8:
        w = packed
    else:
        # Byte-wide arithmetic: int32 temporaries for a [BLOCK_N, BLOCK_K] tile would spill.
        shift = ((offs_k % PER_BYTE) * W_BITS).to(tl.uint8)[None, :]
        HALF: tl.constexpr = 1 << (W_BITS - 1)
        w = (((packed >> shift) & ((1 << W_BITS) - 1)) ^ HALF).to(tl.int8) - HALF  # sign-extended field
        w = tl.where(k_valid, w, 0).to(tl.int8)
    return w


@triton.jit
def split_range(k_tiles, SPLIT_K: tl.constexpr):
    """The K-tiles [first, last) that this program sums (all of them unless K is split)."""
    if SPLIT_K == 1:
        first, last = 0, k_tiles
    else:
        per_split = tl.cdiv(k_tiles, SPLIT_K)
        first = tl.program_id(1) * per_split
        last = tl.minimum(first + per_split, k_tiles)
    return first, last


@triton.jit
def tile_coordinates(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, in groups of GROUP_M row tiles that share weights in L2."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m, pid_n


@triton.jit
def output_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Rows and columns of this program's output tile."""
    pid_m, pid_n = tile_coordinates(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def dequantize(acc, cols, n_valid, w_scale_ptr, w_sum_ptr, bias_ptr, x_scale, x_zero, HAS_BIAS: tl.constexpr):
    """The epilogue in fp32: f32(acc - z_x * wsum) * (s_x * s_w) + bias, in reference order."""
    w_sum = tl.load(w_sum_ptr + cols, mask=n_valid, other=0)
    w_scale = tl.load(w_scale_ptr + cols, mask=n_valid, other=0.0)
    folded = acc - x_zero.to(tl.int32) * w_sum[None, :]
    y = folded.to(tl.float32) * (x_scale * w_scale)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols, mask=n_valid, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def store_output(acc, rows, cols, M, N, y_ptr, P, stride_yb, stride_yp, stride_yn,
                 w_scale_ptr, w_sum_ptr, bias_ptr, x_scale_ptr, x_zero_ptr,
                 HAS_BIAS: tl.constexpr, ACCUMULATE_ONLY: tl.constexpr, EVEN_ROWS: tl.constexpr):
    """Write a finished tile: the raw int32 accumulator (tests), or the dequantized result in y's
    dtype. Row m of the GEMM is output position (m // P, m % P): P = M for a linear layer, the
    pixels of one image for a convolution."""
    m_valid, n_valid = rows < M, cols < N
    mask = m_valid[:, None] & n_valid[None, :]
    if EVEN_ROWS:  # stride_yb == P * stride_yp (linear, channels-last): no division compiled in
        y_rows = rows * stride_yp
    else:
        y_rows = (rows // P) * stride_yb + (rows % P) * stride_yp
    y_ptrs = y_ptr + y_rows[:, None] + cols[None, :] * stride_yn
    if ACCUMULATE_ONLY:
        tl.store(y_ptrs, acc, mask=mask)
    else:
        y = dequantize(acc, cols, n_valid, w_scale_ptr, w_sum_ptr, bias_ptr, tl.load(x_scale_ptr),
                       tl.load(x_zero_ptr), HAS_BIAS)
        tl.store(y_ptrs, y.to(y_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def finish_tile(acc, rows, cols, M, N, y_ptr, partial_ptr, P, stride_yb, stride_yp, stride_yn,
                w_scale_ptr, w_sum_ptr, bias_ptr, x_scale_ptr, x_zero_ptr,
                HAS_BIAS: tl.constexpr, ACCUMULATE_ONLY: tl.constexpr, EVEN_ROWS: tl.constexpr,
                SPLIT_K: tl.constexpr):
    """Store the tile, or with a split K add this slice's partial sums to the [M, N] accumulator."""
    if SPLIT_K == 1:
        store_output(acc, rows, cols, M, N, y_ptr, P, stride_yb, stride_yp, stride_yn,
                     w_scale_ptr, w_sum_ptr, bias_ptr, x_scale_ptr, x_zero_ptr, HAS_BIAS, ACCUMULATE_ONLY, EVEN_ROWS)
    else:
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        tl.atomic_add(partial_ptr + rows[:, None] * N + cols[None, :], acc, mask=mask, sem="relaxed")


# --- kernels -----------------------------------------------------------------------------------


@triton.jit
def _linear_kernel(
    a_ptr, w_ptr, y_ptr, partial_ptr, w_scale_ptr, w_sum_ptr, bias_ptr, x_scale_ptr, x_zero_ptr,
    M, N, K, P,
    stride_am, stride_wn, stride_yb, stride_yp, stride_yn,
    W_BITS: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE_ONLY: tl.constexpr, EVEN_ROWS: tl.constexpr,
    EVEN_K: tl.constexpr, SPLIT_K: tl.constexpr, MMA_V2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    rows, cols = output_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    a_rows = tl.minimum(rows, M - 1)  # clamped: in bounds without a mask
    w_rows = tl.minimum(cols, N - 1)
    first, last = split_range(tl.cdiv(K, BLOCK_K), SPLIT_K)

    PER_BYTE: tl.constexpr = 8 // W_BITS
    LANE_K: tl.constexpr = BLOCK_K // PER_BYTE
    a_rows_ptr = a_ptr + a_rows[:, None] * stride_am
    # Weights first: the MMA reads them from registers, right after the unpack (module docstring).
    acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    a_ptrs = a_rows_ptr + (first * BLOCK_K + tl.arange(0, BLOCK_K))[None, :]
    w_ptrs = w_ptr + w_rows[:, None] * stride_wn + (first * LANE_K + tl.arange(0, LANE_K))[None, :]
    for kt in range(first, last):
        k0 = kt * BLOCK_K
        if EVEN_K:
            if CARRIED_POINTERS[W_BITS]:
                packed, a = tl.load(w_ptrs), tl.load(a_ptrs)
                w_ptrs += LANE_K
                a_ptrs += BLOCK_K
            else:
                packed = tl.load(w_ptr + w_rows[:, None] * stride_wn + (k0 // PER_BYTE + tl.arange(0, LANE_K))[None, :])
                a = tl.load(a_rows_ptr + (k0 + tl.arange(0, BLOCK_K))[None, :])
            acc_t = tl.dot(weight_operand(packed, kt, W_BITS, BLOCK_N, BLOCK_K, MMA_V2), tl.trans(a), acc_t,
                           out_dtype=tl.int32)
            acc_t = activation_ring(acc_t, a, W_BITS, MMA_V2)
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_rows_ptr + offs_k[None, :], mask=(offs_k < K)[None, :], other=0)
            w = gather_weights(w_ptr, w_rows, stride_wn, k0, K, W_BITS, BLOCK_K)
            acc_t = tl.dot(w, tl.trans(a), acc_t, out_dtype=tl.int32)
    acc = tl.trans(acc_t)
    if EVEN_K:
        acc = acc >> (8 - W_BITS)  # the lanes' scale 2^(8 - W_BITS); every sum is a multiple of it

    finish_tile(acc, rows, cols, M, N, y_ptr, partial_ptr, P, stride_yb, stride_yp, stride_yn,
                w_scale_ptr, w_sum_ptr, bias_ptr, x_scale_ptr, x_zero_ptr, HAS_BIAS, ACCUMULATE_ONLY, EVEN_ROWS,
                SPLIT_K)


@triton.jit
def _epilogue_kernel(
    partial_ptr, y_ptr, w_scale_ptr, w_sum_ptr, bias_ptr, x_scale_ptr, x_zero_ptr,
    M, N, P, stride_yb, stride_yp, stride_yn,
    HAS_BIAS: tl.constexpr, ACCUMULATE_ONLY: tl.constexpr, EVEN_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """After a split-K GEMM: the summed int32 accumulator [M, N] -> the output."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    acc = tl.load(partial_ptr + rows[:, None] * N + cols[None, :], mask=mask, other=0)
    store_output(acc, rows, cols, M, N, y_ptr, P, stride_yb, stride_yp, stride_yn,
                 w_scale_ptr, w_sum_ptr, bias_ptr, x_scale_ptr, x_zero_ptr, HAS_BIAS, ACCUMULATE_ONLY, EVEN_ROWS)


# --- launchers ---------------------------------------------------------------------------------


def choose_config(key: str, m: int, n: int, k: int, channels: int, w_bits: int, launch) -> Config:
    """The interpreter's config, else the tuned (and cached) one for this shape. channels: what
    BLOCK_K must divide for the unmasked main loop (K for a linear layer, C for a convolution)."""
    if INTERPRETED:
        return INTERPRETER_CONFIG

    def measure(config: Config) -> float:
        return triton.testing.do_bench(lambda: launch(config), warmup=10, rep=40)

    return tuned_config(key, candidates_for(m, n, k, channels, w_bits), measure, default_config(m, n, k, channels))


def per_channel_vectors(w_scale, w_sum, bias):
    """w_scale, w_sum and bias as the kernels index them: with unit stride."""
    return w_scale.contiguous(), w_sum.contiguous(), None if bias is None else bias.contiguous()


def quantize_for(x_image, x_scale, x_zero, a_bits: int, w_bits: int, channels: int, config: Config,
                 pad: int = 0, input_key=None) -> torch.Tensor:
    """The int8 codes of x_image [B, H, W, C] (padded by pad pixels), in the order the main loop
    reads them: with packed weights and an unmasked loop, lane-major within each BLOCK_K block.
    Shared with the previous layer when it read the same input with the same input_key."""
    per_byte = 8 // w_bits if unmasked_loop(channels, config, w_bits) else 1
    group = config.block_k if per_byte > 1 else 1
    key = None if input_key is None else (*input_key, pad, per_byte, group)
    return shared_codes(x_image, key, lambda: quantize_image(x_image, x_scale, x_zero, a_bits, pad=pad,
                                                             per_byte=per_byte, group=group))


class OutputLayout:
    """Where GEMM row m, column n of the result goes: y[m // P, n, m % P] in y's own strides."""

    def __init__(self, y: torch.Tensor, pixels: int, stride_b: int, stride_p: int, stride_n: int):
        self.y, self.pixels, self.strides = y, pixels, (stride_b, stride_p, stride_n)


def mma_v2(device: torch.device) -> bool:
    """Whether Triton's int8 dots on this device are mma.sync ones (MMA v2: sm_8x, e.g. A100)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 8


def run_gemm(kernel, grid_args: dict, out: OutputLayout, m: int, n: int, config: Config, epilogue_args: dict):
    """Launch kernel on config's grid (with its split of K) and, for a split K, the epilogue pass."""
    split = config.split_k
    partial = out.y if split == 1 else torch.zeros((m, n), device=out.y.device, dtype=torch.int32)
    store_args = dict(P=out.pixels, stride_yb=out.strides[0], stride_yp=out.strides[1], stride_yn=out.strides[2],
                      EVEN_ROWS=out.strides[0] == out.pixels * out.strides[1], **epilogue_args)
    kernel[(tiles(m, n, config), split)](
        y_ptr=out.y, partial_ptr=partial, SPLIT_K=split, MMA_V2=mma_v2(out.y.device), **grid_args, **store_args,
        **config.launch_args(),
    )
    if split > 1:
        block_m, block_n = (64, 64) if INTERPRETED else (32, 128)
        _epilogue_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
            partial, out.y, M=m, N=n, BLOCK_M=block_m, BLOCK_N=block_n, **store_args,
        )


def epilogue_arguments(w_scale, w_sum, bias, x_scale, x_zero, accumulate_only: bool) -> dict:
    w_scale, w_sum, bias = per_channel_vectors(w_scale, w_sum, bias)
    return dict(w_scale_ptr=w_scale, w_sum_ptr=w_sum, bias_ptr=bias, x_scale_ptr=x_scale, x_zero_ptr=x_zero,
                HAS_BIAS=bias is not None, ACCUMULATE_ONLY=accumulate_only,
                enable_fp_fusion=False)  # a fused multiply-add would round differently from the reference


def gemm_rows(x_image, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias, out: OutputLayout, *, input_key,
              accumulate_only: bool, config: Config | None, tune_key: str) -> None:
    """x_image [B, H, W, K] (a linear input as [1, 1, M, K], or the pixels of a 1x1 convolution),
    one GEMM row per pixel, times the packed weights into out."""
    b, h, w, k = x_image.shape
    m, n = b * h * w, qweight.shape[0]
    qweight = qweight.contiguous()
    epilogue_args = epilogue_arguments(w_scale, w_sum, bias, x_scale, x_zero, accumulate_only)

    def launch(cfg: Config):
        codes = quantize_for(x_image, x_scale, x_zero, a_bits, w_bits, k, cfg, input_key=input_key)
        grid_args = dict(a_ptr=codes, w_ptr=qweight, M=m, N=n, K=k, stride_am=codes.stride(0),
                         stride_wn=qweight.stride(0), W_BITS=w_bits, EVEN_K=unmasked_loop(k, cfg, w_bits))
        run_gemm(_linear_kernel, grid_args, out, m, n, cfg, epilogue_args)

    if config is None:
        config = choose_config(f"{tune_key}|w{w_bits}|{device_tag(x_image.device)}", m, n, k, k, w_bits, launch)
    launch(config)


def linear(x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias=None, *,
           accumulate_only: bool = False, config: Config | None = None, input_key=None) -> torch.Tensor:
    """x [M, K] -> y [M, N] in x's dtype (or the int32 accumulator with accumulate_only=True).

    config forces the block sizes and split (tests use it to cover several tiles on small shapes).
    """
    m, k = x.shape
    n = qweight.shape[0]
    out = torch.empty((m, n), device=x.device, dtype=torch.int32 if accumulate_only else x.dtype)
    gemm_rows(x[None, None], qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias,
              OutputLayout(out, m, m * out.stride(0), out.stride(0), out.stride(1)),
              accumulate_only=accumulate_only, config=config, tune_key=f"linear|m={m}|n={n}|k={k}|{x.dtype}",
              input_key=input_key)
    return out
