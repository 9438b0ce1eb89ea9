"""Triton GEMM for quantized Linear layers: A8 x W{8,4,2} with int32 accumulation.

    y[m, n] = f32(acc[m, n] - z_x * wsum[n]) * (s_x * s_w[n]) + bias[n],
    acc[m, n] = sum_k q_x[m, k] * q_w[n, k]

One kernel reads the floating-point input and quantizes each tile in registers (prologue), unpacks
the packed weight tile in registers, multiplies int8 x int8 -> int32 on tensor cores and applies
the scales in the epilogue. Every floating-point step rounds exactly as kernels/reference.py does,
so the result is bit-identical to the torch backend. The building blocks below are shared with
the implicit-GEMM convolution in triton_conv.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autotune import CANDIDATES, INTERPRETER_CONFIG, Config, default_config, device_tag, tiles, tuned_config

# Adding and subtracting 1.5 * 2^23 rounds an fp32 |v| < 2^22 to an integer, half to even, like
# torch.round; unlike libdevice's rint it also runs in the interpreter.
ROUND_MAGIC = tl.constexpr(12582912.0)
# Beyond +-256 every code saturates whatever the zero point (|z| <= 128): clamping there first
# changes no result and keeps |v| in the range where ROUND_MAGIC is exact.
SATURATED = tl.constexpr(256.0)


@triton.jit
def quantize_tile(x, x_scale, x_zero, A_BITS: tl.constexpr):
    """Floating-point tile -> int8 codes clamp(round(x / s) + z), as mixq.quantizers does."""
    v = tl.math.div_rn(x.to(tl.float32), x_scale)  # IEEE division: Triton's `/` need not round correctly
    v = tl.minimum(tl.maximum(v, -SATURATED), SATURATED)
    v = (v + ROUND_MAGIC) - ROUND_MAGIC
    q = tl.minimum(tl.maximum(v + x_zero, -(1 << (A_BITS - 1))), (1 << (A_BITS - 1)) - 1)
    return q.to(tl.int8)


@triton.jit
def load_weight_tile(w_ptr, stride_wn, stride_wk, offs_k, k_valid, offs_n, n_valid, W_BITS: tl.constexpr):
    """Integer weights [BLOCK_K, BLOCK_N] (int8) of rows offs_n at reduction indices offs_k.

    Packed weights hold 8 // W_BITS offset-binary values per byte along K (element k in byte
    k // per_byte at bit (k % per_byte) * W_BITS); each byte is loaded once per value it holds
    (the repeats hit L1) and unpacked with a shift, a mask and a subtraction. Entries where
    k_valid is false are 0, so they add nothing to the dot product whatever the input there.
    """
    PER_BYTE: tl.constexpr = 8 // W_BITS
    ptrs = w_ptr + offs_n[None, :] * stride_wn + (offs_k // PER_BYTE)[:, None] * stride_wk
    packed = tl.load(ptrs, mask=k_valid[:, None] & n_valid[None, :], other=0)
    if W_BITS == 8:
        w = packed
    else:
        shift = ((offs_k % PER_BYTE) * W_BITS)[:, None]
        w = ((packed.to(tl.int32) >> shift) & ((1 << W_BITS) - 1)) - (1 << (W_BITS - 1))
    return tl.where(k_valid[:, None], w, 0).to(tl.int8)


@triton.jit
def dequantize(acc, offs_n, n_valid, w_scale_ptr, w_sum_ptr, bias_ptr, x_scale, x_zero, HAS_BIAS: tl.constexpr):
    """The epilogue in fp32: f32(acc - z_x * wsum) * (s_x * s_w) + bias, in reference order."""
    w_sum = tl.load(w_sum_ptr + offs_n, mask=n_valid, other=0)
    w_scale = tl.load(w_scale_ptr + offs_n, mask=n_valid, other=0.0)
    folded = acc - x_zero.to(tl.int32) * w_sum[None, :]
    y = folded.to(tl.float32) * (x_scale * w_scale)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=n_valid, other=0.0).to(tl.float32)[None, :]
    return y


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
    """Rows and columns of this program's output tile, and which of them exist."""
    pid_m, pid_n = tile_coordinates(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def store_output(y_ptrs, acc, m_valid, n_valid, offs_n, w_scale_ptr, w_sum_ptr, bias_ptr, x_scale, x_zero,
                 HAS_BIAS: tl.constexpr, ACCUMULATE_ONLY: tl.constexpr):
    """Write the tile: the raw int32 accumulator (tests), or the dequantized result in y's dtype."""
    mask = m_valid[:, None] & n_valid[None, :]
    if ACCUMULATE_ONLY:
        tl.store(y_ptrs, acc, mask=mask)
    else:
        y = dequantize(acc, offs_n, n_valid, w_scale_ptr, w_sum_ptr, bias_ptr, x_scale, x_zero, HAS_BIAS)
        tl.store(y_ptrs, y.to(y_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, y_ptr, w_scale_ptr, w_sum_ptr, bias_ptr, x_scale_ptr, x_zero_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    W_BITS: tl.constexpr, A_BITS: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE_ONLY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    offs_m, offs_n, m_valid, n_valid = output_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    x_scale = tl.load(x_scale_ptr)
    x_zero = tl.load(x_zero_ptr)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_valid = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_valid[:, None] & k_valid[None, :], other=0.0)
        q_x = quantize_tile(x, x_scale, x_zero, A_BITS)
        q_w = load_weight_tile(w_ptr, stride_wn, stride_wk, offs_k, k_valid, offs_n, n_valid, W_BITS)
        acc = tl.dot(q_x, q_w, acc)

    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    store_output(y_ptrs, acc, m_valid, n_valid, offs_n, w_scale_ptr, w_sum_ptr, bias_ptr, x_scale, x_zero,
                 HAS_BIAS, ACCUMULATE_ONLY)


def _is_interpreted(kernel) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


# Triton decides at decoration time whether kernels run compiled or in its numpy interpreter
# (TRITON_INTERPRET=1, which also accepts CPU tensors).
INTERPRETED = _is_interpreted(_linear_kernel)


def choose_config(key: str, m: int, n: int, x_element_size: int, launch) -> Config:
    """The interpreter's config, else the tuned (and cached) one for this shape."""
    if INTERPRETED:
        return INTERPRETER_CONFIG

    def measure(config: Config) -> float:
        return triton.testing.do_bench(lambda: launch(config), warmup=10, rep=40)

    return tuned_config(key, CANDIDATES, measure, default_config(m, n, x_element_size))


def per_channel_vectors(w_scale, w_sum, bias):
    """w_scale, w_sum and bias as the kernels index them: with unit stride."""
    return w_scale.contiguous(), w_sum.contiguous(), None if bias is None else bias.contiguous()


def linear(x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias=None, *,
           accumulate_only: bool = False, config: Config | None = None) -> torch.Tensor:
    """x [M, K] -> y [M, N] in x's dtype (or the int32 accumulator with accumulate_only=True).

    config forces the block sizes (tests use it to cover several tiles on small shapes).
    """
    m, k = x.shape
    n = qweight.shape[0]
    w_scale, w_sum, bias = per_channel_vectors(w_scale, w_sum, bias)
    out = torch.empty((m, n), device=x.device, dtype=torch.int32 if accumulate_only else x.dtype)

    def launch(cfg: Config):
        _linear_kernel[(tiles(m, n, cfg),)](
            x, qweight, out, w_scale, w_sum, bias, x_scale, x_zero,
            m, n, k,
            x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), out.stride(0), out.stride(1),
            W_BITS=w_bits, A_BITS=a_bits, HAS_BIAS=bias is not None, ACCUMULATE_ONLY=accumulate_only,
            enable_fp_fusion=False,  # a fused multiply-add would round differently from the reference
            **cfg.launch_args(),
        )

    if config is None:
        key = f"linear|m={m}|n={n}|k={k}|w{w_bits}|{x.dtype}|{device_tag(x.device)}"
        config = choose_config(key, m, n, x.element_size(), launch)
    launch(config)
    return out
