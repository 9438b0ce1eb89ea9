"""The x86 CPU backend: the oneDNN int8 kernels PyTorch ships, on weights laid out once, and mixq's fused GEMM.

8-bit weights of large linear layers and of convolutions on large images (every 8-bit layer where the CPU
has AMX; INT8_GEMM_CHOICES below) run on torch.ops.onednn.qlinear_pointwise / qconv2d_pointwise (the
kernels PyTorch's own x86 quantization lowers to: VNNI / AMX int8 dot products, zero-point compensation
and the scale/bias epilogue fused). A linear layer's weights are reordered into oneDNN's blocked layout
once, when the layer is prepared (quantize / load time), and the layer then holds that layout instead of
its plain buffer (QuantizedLayer.hold_kernel_layouts: one copy of the weights); the ops take either. A
plain 8-bit buffer that reaches them (a layer never prepared) gets its layout on first use, kept beside
it (see PackedWeights), but for a convolution that keeps its plain buffer for the fused GEMM, whose
oneDNN calls lay it out for the call alone.

4-bit and 2-bit weights stay packed in memory by default (resident bytes follow the bits; CPU weight
mode "packed"). On a CPU with AVX512-VNNI they run on mixq's own GEMM (kernels/packed_gemm.c through
native.packed_gemm): it unpacks a block of weights at a time into the operand panel of its blocked loop,
so the packed bytes are read once per call and no unpacked copy of the layer is ever written, and it
applies the reference's epilogue as it stores; it reads a convolution's padded channels-last codes in
place (no column matrix is written). On CPUs without AMX it also runs the 8-bit layers it is faster on,
from their plain buffer. Elsewhere (no VNNI, no compiler, K, or a convolution's channels,
not a multiple of 4) each call unpacks one layer into a per-thread scratch buffer that is reused from
layer to layer, one contiguous run per lane (lane-major K order, the activations' columns permuted to
match: dot products are unchanged), and multiplies with torch._int_mm on a transposed view of it (no
copy); convolutions gather int8 codes (never floats) into columns first. Both give the reference's
outputs bit for bit. Columns, accumulators and the epilogue's float32 go into per-thread buffers reused from layer to layer:
fresh ones of tens of MB page-fault on every call (benchmarks/results/cpu-unet-speed-ab-2026-12-07.md).
In mode "int8" (`mixq.quantize(..., cpu_weights="int8")`, and on load_quantized) they are instead
unpacked once, when the layer is prepared, into the same oneDNN layout as 8-bit weights and run on its
kernels, at one byte per weight more than the packed buffer.

Activations reach oneDNN as unsigned codes: mixq's signed code q in [-2^(b-1), 2^(b-1) - 1] plus
128, with zero point x_zero + 128, so (u - u_zero) == (q - x_zero) and the integer accumulation is
the reference's exactly. The fused epilogue rounds in its own order (oneDNN applies the scales and
the bias in fp32, sometimes with an FMA), so 8-bit outputs agree with the reference within the output
dtype's rounding rather than bit for bit.

Activation quantization gives the reference's codes bit for bit (quantize_codes), in one native pass
(kernels/native.py) that also writes an NCHW activation's codes channels-last for the convolutions and
finds NaN/Inf for the layer (scanned_finite), or in torch ops where that pass cannot be built.

Under torch.compile of a whole model each GEMM is one custom op (mixq::cpu_linear / mixq::cpu_conv2d).
"""

from __future__ import annotations

import functools
import os
import platform
import threading
import weakref

import torch

from mixq.errors import ConfigError
from mixq.machine import cpu_features
from mixq.quantizers import activation_qrange, unpack_weight, values_per_byte

from . import native, reference
from .fallback import warn_once

UNSIGNED_OFFSET = 128  # signed int8 code q <-> unsigned code q + 128
# How 4/2-bit weights live on the CPU: packed (unpacked per call) or unpacked once into oneDNN's layout.
CPU_WEIGHT_MODES = ("packed", "int8")
ONEDNN_OUTPUT_DTYPES = (torch.float32, torch.bfloat16)
X86_MACHINES = ("x86_64", "amd64", "i386", "i686", "x86")


class CpuBackendFallbackWarning(UserWarning):
    """A call ran on the exact torch reference because the oneDNN CPU backend cannot run it here."""


def warn_fallback(reason: str):
    warn_once(CpuBackendFallbackWarning, reason, f"mixq: the oneDNN CPU backend cannot run this call ({reason}); "
              "running the exact torch reference instead (slower)")


_availability: list = []


def unavailable_reason() -> str | None:
    """Why this machine cannot run the oneDNN int8 kernels, or None when it can (probed once)."""
    if not _availability:
        _availability.append(_probe())
    return _availability[0]


def _probe() -> str | None:
    if platform.machine().lower() not in X86_MACHINES:
        return f"not an x86 CPU ({platform.machine()})"
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch build has no oneDNN"
    try:
        weight = torch.ones(4, 4, dtype=torch.int8)
        codes = torch.full((2, 4), UNSIGNED_OFFSET + 1, dtype=torch.uint8)
        y = _onednn_linear(codes, 1.0, UNSIGNED_OFFSET, _prepack_linear(weight),
                           torch.ones(4), torch.zeros(4, dtype=torch.int64), None, torch.float32)
    except (RuntimeError, AttributeError) as error:  # op missing or no usable int8 primitive
        return f"torch.ops.onednn.qlinear_pointwise failed: {error}"
    if not torch.equal(y, torch.full((2, 4), 4.0)):
        return "torch.ops.onednn.qlinear_pointwise returned a wrong result"
    return None


# --- activations -------------------------------------------------------------------------------


def quantize_input_unsigned(x, x_scale, x_zero, a_bits, reuse: bool = False, channels_last: bool = False):
    """The reference's codes (same rounding and clamping), shifted into uint8. `reuse`: into this thread's
    codes buffer (valid until its next reuse: for a kernel call that consumes them at once)."""
    return quantize_codes(x, x_scale, x_zero, a_bits, UNSIGNED_OFFSET, reuse, channels_last)


def quantize_input_signed(x, x_scale, x_zero, a_bits, reuse: bool = False, channels_last: bool = False):
    """The reference's int8 codes (reference.quantize_input), computed as quantize_input_unsigned's."""
    return quantize_codes(x, x_scale, x_zero, a_bits, 0, reuse, channels_last)


# Elements quantized per pass: the float32 scratch (1 MiB) stays in cache across the in-place steps.
QUANTIZE_CHUNK = 1 << 18


def quantize_codes(x, x_scale, x_zero, a_bits, offset: int, reuse: bool = False,
                   channels_last: bool = False) -> torch.Tensor:
    """round(x / x_scale) + x_zero clamped to the code range, plus `offset`, as uint8 (offset 128) or
    int8 (offset 0), in x's memory format (with `channels_last`, a contiguous NCHW x's codes come
    channels-last where the native pass can transpose them on the way): bit for bit the reference's codes.

    One pass over x: the native helper (kernels/native.py) where it can be had, which also tells whether
    x was all finite (scanned_finite); else torch ops a chunk at a time through a reused float32 scratch,
    instead of whole-tensor float32 temporaries: fresh allocations of up to hundreds of MB per layer,
    whose page faults on first touch cost more than the arithmetic on the activations of a VAE decoder or
    a UNet at 1024x1024; with `reuse` the codes themselves go into a reused buffer for the same reason
    (benchmarks/results/cpu-activation-quantization-2026-12-06.md).
    Shifting before clamping gives the same codes (in range they are exact small integers, out of
    range both saturate)."""
    qmin, qmax = activation_qrange(a_bits)
    dtype = torch.uint8 if offset else torch.int8
    in_one_pass = native.reads(x)
    transpose = channels_last and in_one_pass and is_nchw(x)
    flat, codes, flat_codes = storage_order_views(x, dtype, reuse, transpose)
    if flat is None:  # a strided view: whole-tensor temporaries, as the reference
        q = torch.div(x.float(), x_scale).round_()
        return q.add_(x_zero + offset).clamp_(qmin + offset, qmax + offset).to(dtype)
    if in_one_pass:
        finite = native.activation_codes(x, flat_codes, x_scale.item(), x_zero.item() + offset, qmin + offset,
                                         qmax + offset, nchw_to_channels_last=transpose)
        record_scan(x, finite)
    else:
        codes_into(flat, flat_codes, x_scale, x_zero + offset, qmin + offset, qmax + offset)
    return codes


def is_nchw(x: torch.Tensor) -> bool:
    """A 4-D tensor contiguous in NCHW order and not also channels-last contiguous (C or H * W of 1)."""
    return x.dim() == 4 and x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)


# What the last native quantization on this thread found: (a weak reference to the tensor whose storage
# holds the activation, its first element's address, element count, dtype and version, all finite?).
_last_scan = threading.local()


def version_of(x: torch.Tensor) -> int | None:
    return None if x.is_inference() else x._version  # (inference tensors keep no version counter)


def record_scan(x: torch.Tensor, finite: bool):
    owner = x._base if x._base is not None else x  # (a view passed to the kernel dies before the layer asks)
    _last_scan.entry = (weakref.ref(owner), x.data_ptr(), x.numel(), x.dtype, version_of(x), finite)


def forget_scan():
    """Drop what the last quantization found: a layer calls it before its kernels, so that what it asks
    scanned_finite after them was found by them."""
    _last_scan.entry = None


def scanned_finite(x: torch.Tensor) -> bool | None:
    """Whether every element of x is finite, as the last native quantization on this thread found while
    reading exactly x's elements; None where it read something else. The answer is given once.

    While the storage that held the quantized elements is alive (the weak reference), its memory cannot
    hold another tensor; so a dense x of the same dtype, start, size and version is those elements."""
    entry = getattr(_last_scan, "entry", None)
    _last_scan.entry = None
    if entry is None:
        return None
    owner, address, numel, dtype, version, finite = entry
    dense = x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
    same = (owner() is not None and dense and x.data_ptr() == address and x.numel() == numel and x.dtype == dtype
            and version_of(x) == version)
    return finite if same else None


def codes_into(flat, out, x_scale, shift, low: int, high: int):
    """round(flat / x_scale) + shift clamped to [low, high], into `out`, a chunk at a time."""
    total = flat.numel()
    scratch = float_scratch(min(total, QUANTIZE_CHUNK))
    for start in range(0, total, QUANTIZE_CHUNK):
        stop = min(start + QUANTIZE_CHUNK, total)
        q = scratch[:stop - start]
        if flat.dtype == torch.float32:
            torch.div(flat[start:stop], x_scale, out=q)  # one pass fewer: no copy into the scratch
        else:
            q.copy_(flat[start:stop]).div_(x_scale)  # float32 first: the division runs in float32, as the reference's
        q.round_().add_(shift).clamp_(low, high)
        out[start:stop].copy_(q)  # exact: small integers


def storage_order_views(x: torch.Tensor, dtype, reuse: bool = False, nchw_to_channels_last: bool = False) -> tuple:
    """(x flattened in storage order, a `dtype` tensor in x's memory format, or channels-last with
    nchw_to_channels_last, it flattened: fresh, or with `reuse` this thread's codes buffer);
    (None, None, None) when x is neither contiguous nor channels-last contiguous."""
    channels_last = not x.is_contiguous()
    if channels_last and not (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return None, None, None
    flat_codes = codes_scratch(x.numel(), dtype) if reuse else torch.empty(x.numel(), dtype=dtype, device=x.device)
    if not (channels_last or nchw_to_channels_last):
        return x.reshape(-1), flat_codes.view(x.shape), flat_codes
    b, c, h, w = x.shape
    flat = x.reshape(-1) if nchw_to_channels_last else x.permute(0, 2, 3, 1).reshape(-1)
    return flat, flat_codes.view(b, h, w, c).permute(0, 3, 1, 2), flat_codes


def unsigned_zero(x_zero) -> int:
    """The zero point of the unsigned codes, as the number the oneDNN ops take."""
    return int(x_zero.item()) + UNSIGNED_OFFSET


# --- weights laid out once ---------------------------------------------------------------------


class PackedWeights:
    """oneDNN layouts of 8-bit weights, keyed by the packed buffer they were made from.

    An entry lives as long as its buffer (a weak reference drops it) and is rebuilt if the buffer is
    written to (its version counter moves), e.g. by load_state_dict. Keeping the table beside the
    modules leaves their state_dict, deepcopy and .to() untouched.
    """

    def __init__(self):
        self._entries: dict = {}
        self._lock = threading.Lock()

    def get(self, qweight: torch.Tensor, layout: tuple, build, only_if_prepared: bool = False):
        """The layout of `qweight`, built now if there is none or it is stale; with only_if_prepared,
        None where none was ever built (4/2-bit weights in the "packed" mode)."""
        key = (qweight.data_ptr(), layout)
        with self._lock:
            entry = self._entries.get(key)
        if entry is not None and entry[0]() is not None and entry[1] == qweight._version:
            return entry[2]
        if only_if_prepared and (entry is None or entry[0]() is None):
            return None
        packed = build()
        owner = weakref.ref(qweight, lambda ref, key=key: self._drop(key, ref))
        with self._lock:
            self._entries[key] = (owner, qweight._version, packed)
        return packed

    def _drop(self, key, ref):
        with self._lock:
            if key in self._entries and self._entries[key][0] is ref:
                del self._entries[key]

    def __len__(self):
        return len(self._entries)

    def nbytes(self) -> int:
        return sum(entry[2][0].numel() for entry in list(self._entries.values()))  # int8 weights


packed_weights = PackedWeights()


def int8_codes(qweight: torch.Tensor, w_bits: int, k: int) -> torch.Tensor:
    """The int8 weight codes [N, K] in natural order (4/2-bit weights unpacked, a copy)."""
    return qweight if w_bits == 8 else unpack_weight(qweight, w_bits, k)


def _prepack_linear(qweight: torch.Tensor) -> torch.Tensor:
    return torch.ops.onednn.qlinear_prepack(qweight, None)


def _prepack_conv(qweight, w_scale, in_channels, kernel_size, stride, padding) -> torch.Tensor:
    n = qweight.shape[0]
    kh, kw = kernel_size
    # [N, (row, col, channel)] -> the [N, C, kh, kw] weight oneDNN reorders from.
    weight = qweight.view(n, kh, kw, in_channels).permute(0, 3, 1, 2).contiguous()
    return torch.ops.onednn.qconv_prepack(weight, w_scale, 1.0, 0, list(stride), list(padding), [1, 1], 1, None)


def weight_layout(qweight, w_scale, kind: str, in_channels: int, kernel_size=None, stride=None,
                  padding=None) -> torch.Tensor:
    """oneDNN's layout of 8-bit codes [N, K] ((row, col, channel) order for a convolution), a new
    tensor that the ops take in place of qweight; `in_channels`: K of a linear layer."""
    if kind == "linear":
        return _prepack_linear(qweight)
    return _prepack_conv(qweight, w_scale, in_channels, kernel_size, stride, padding)


def plain_codes(layout: torch.Tensor, kind: str) -> torch.Tensor:
    """The codes [N, K] a weight_layout was made from, exactly (oneDNN's reorder only moves bytes)."""
    dense = layout.to_dense()
    if kind == "linear":
        return dense.t().contiguous()  # oneDNN keeps linear weights as [K, N]
    return dense.permute(0, 2, 3, 1).reshape(dense.shape[0], -1).contiguous()  # [N, C, kh, kw] -> [N, K]


_zero_points: dict = {}


def zero_points(n: int) -> torch.Tensor:
    """int64 zeros [N]: the weights' zero points (symmetric), made once per N."""
    if n not in _zero_points:
        _zero_points[n] = torch.zeros(n, dtype=torch.int64)
    return _zero_points[n]


def linear_layout(qweight, w_bits: int = 8, k: int | None = None, only_if_prepared: bool = False):
    """(oneDNN weight, zero points) of a linear weight; 4/2-bit ones (K = k) are unpacked to build it."""
    return packed_weights.get(qweight, ("linear",), lambda: (
        _prepack_linear(int8_codes(qweight, w_bits, k)), zero_points(qweight.shape[0]),
    ), only_if_prepared)


def conv_layout(qweight, w_scale, in_channels, kernel_size, stride, padding, w_bits: int = 8,
                only_if_prepared: bool = False):
    layout = ("conv2d", in_channels, tuple(kernel_size), tuple(stride), tuple(padding))
    k = in_channels * kernel_size[0] * kernel_size[1]
    return packed_weights.get(qweight, layout, lambda: (
        _prepack_conv(int8_codes(qweight, w_bits, k), w_scale, in_channels, kernel_size, stride, padding),
        zero_points(qweight.shape[0]),
    ), only_if_prepared)


# --- 4/2-bit weights: unpacked per call into a reused scratch buffer ---------------------------

_scratch = threading.local()


def thread_buffer(name: str, numel: int, dtype) -> torch.Tensor:
    """The first `numel` elements of this thread's reused `dtype` buffer `name`, grown to the largest
    request so far (and kept): fresh large allocations page-fault on first touch at every call."""
    buffer = getattr(_scratch, name, None)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(numel, dtype=dtype)
        setattr(_scratch, name, buffer)
    return buffer[:numel]


def scratch_bytes(nbytes: int) -> torch.Tensor:
    """Bytes for unpacking one 4/2-bit weight."""
    return thread_buffer("weights", nbytes, torch.uint8)


def codes_scratch(numel: int, dtype) -> torch.Tensor:
    """`numel` activation codes of `dtype` (uint8 or int8) for a kernel call that consumes them at once;
    the buffer grows to the largest activation quantized with reuse (one byte per element) and stays."""
    return thread_buffer("codes", numel, torch.uint8).view(dtype)


def float_scratch(numel: int) -> torch.Tensor:
    """float32 room for one chunk of activation quantization."""
    return thread_buffer("floats", numel, torch.float32)


def unpack_lane_major(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """pack_weight's codes as signed int8 [N, per_byte * width], written into the scratch buffer in
    lane-major K order: column lane * width + j holds weight k = j * per_byte + lane (pack_weight puts
    k in byte k // per_byte, lane k % per_byte). Each lane is one contiguous run per row, where the
    natural order would interleave single bytes; the activations are permuted to match (lane_major),
    which leaves every dot product, and so the int32 accumulation, unchanged."""
    per_byte = values_per_byte(bits)
    n, width = packed.shape
    lanes = scratch_bytes(n * per_byte * width).view(n, per_byte, width)
    for lane in range(per_byte):  # each field to the top of its byte (uint8 shifts drop the bits above)
        torch.bitwise_left_shift(packed, 8 - bits * (lane + 1), out=lanes[:, lane])
    signed = lanes.view(torch.int8)
    signed.bitwise_right_shift_(8 - bits)  # arithmetic on int8: sign extension
    return signed.view(n, per_byte * width)


def lane_major(q: torch.Tensor, per_byte: int) -> torch.Tensor:
    """int8 codes [M, K], K a multiple of per_byte, with K reordered as unpack_lane_major orders it (into
    this thread's columns buffer: valid until its next use)."""
    m, k = q.shape
    out = thread_buffer("columns", m * k, torch.int8)
    out.view(m, per_byte, k // per_byte).copy_(q.view(m, k // per_byte, per_byte).transpose(1, 2))
    return out.view(m, k)


def padded_codes(q_x: torch.Tensor, pad_code: int, padding) -> torch.Tensor:
    """8-bit codes [B, C, H, W] -> [B, H + 2 ph, W + 2 pw, C] (channels-last order), the border holding
    `pad_code` (the code of the real zero), in this thread's reused buffer (valid until its next use)."""
    b, c, h, w = q_x.shape
    ph, pw = padding
    padded_shape = (b, h + 2 * ph, w + 2 * pw, c)
    padded = thread_buffer("padded", b * padded_shape[1] * padded_shape[2] * c, torch.int8)
    padded = padded.view(q_x.dtype).view(padded_shape)
    if ph or pw:
        padded.fill_(pad_code)
    padded[:, ph:ph + h, pw:pw + w].copy_(q_x.permute(0, 2, 3, 1))
    return padded


def code_columns(q_x: torch.Tensor, pad_code: int, kernel_size, stride, padding,
                 per_byte: int = 1) -> tuple[torch.Tensor, int, int]:
    """8-bit codes (int8 or uint8) [B, C, H, W] -> [B * Ho * Wo, kh * kw * C] in (row, col, channel) order,
    borders holding `pad_code` (the code of the real zero); integer copies only, into this thread's reused
    buffers (valid until their next use: fresh ones of this size page-fault on every call). With
    per_byte > 1 (C a multiple of it) the columns come in unpack_lane_major's order, in the same single
    gather."""
    b, c, h, w = q_x.shape
    (kh, kw), (sh, sw) = kernel_size, stride
    padded = padded_codes(q_x, pad_code, padding)
    windows = padded.unfold(1, kh, sh).unfold(2, kw, sw)  # [B, Ho, Wo, C, kh, kw]
    ho, wo = windows.shape[1], windows.shape[2]
    # [B, Ho, Wo, C / per_byte, lane, kh, kw] -> [B, Ho, Wo, lane, kh, kw, C / per_byte]
    windows = windows.unflatten(3, (c // per_byte, per_byte)).permute(0, 1, 2, 4, 5, 6, 3)
    cols = thread_buffer("columns", b * ho * wo * kh * kw * c, torch.int8).view(q_x.dtype)
    cols.view(windows.shape).copy_(windows)
    return cols.view(b * ho * wo, kh * kw * c), ho, wo


def int_matmul_transposed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] @ int8 [N, K]^T -> int32 [M, N], on a view of b (no copy), into this thread's
    accumulator buffer (valid until its next use)."""
    acc = thread_buffer("accumulators", a.shape[0] * b.shape[0], torch.int32).view(a.shape[0], b.shape[0])
    return torch._int_mm(a, b.t(), out=acc)


def epilogue_in_place(acc, x_scale, x_zero, w_scale, w_sum, bias, out_dtype):
    """reference.epilogue's arithmetic in its order, in place on `acc` (a scratch) and a reused float32
    scratch, so bit for bit its result without its three fresh [M, N] temporaries; the result is a fresh
    tensor."""
    acc.sub_(x_zero.to(torch.int32) * w_sum.to(torch.int32))
    if out_dtype == torch.float32:
        y = torch.empty(acc.shape, dtype=torch.float32)
    else:
        y = thread_buffer("epilogue", acc.numel(), torch.float32).view(acc.shape)
    y.copy_(acc).mul_(x_scale.to(torch.float32) * w_scale.to(torch.float32))
    if bias is not None:
        y.add_(bias.to(torch.float32))
    return y if out_dtype == torch.float32 else y.to(out_dtype)


# Which GEMM runs 8-bit weights (MIXQ_INT8_GEMM). "auto": small layers on mixq's fused GEMM, where
# oneDNN's fixed cost per call (~40 us) decides, and larger ones where each kernel was measured faster on
# a VNNI-only EPYC (benchmarks/results/cpu-int8-gemm-2026-12-07.md): linear layers of more than
# INT8_FUSED_LINEAR_WEIGHTS weights on oneDNN (the fused GEMM 1.1-1.2x slower on 1280 x 10240); convolutions
# per call, by their output positions: up to INT8_FUSED_CONV_ROWS on the fused GEMM (1.1-1.8x faster on
# SDXL's deep, low-resolution layers), more on oneDNN (the fused GEMM 0.66-0.98x on the VAE decoder's
# and 1024x1024 UNets' large images). An 8-bit convolution therefore keeps its plain buffer as its only
# copy until its first call on a large image, then holds oneDNN's layout instead (QConv2d.forward); a call
# of the functional interface on a plain buffer lays it out for that call alone. Where the CPU has AMX,
# everything stays on oneDNN (its int8 tiles; the fused GEMM has VNNI dot products only).
# "mixq" / "onednn": every 8-bit layer on one of the two.
INT8_GEMM_CHOICES = ("auto", "mixq", "onednn")
INT8_FUSED_LINEAR_WEIGHTS = 1 << 20
INT8_FUSED_CONV_ROWS = 2048
INT8_FUSED_CONV_WEIGHTS = 1 << 16  # convolutions this small stay fused at any size


def int8_gemm_choice() -> str:
    choice = os.environ.get("MIXQ_INT8_GEMM", "auto").strip().lower() or "auto"
    if choice not in INT8_GEMM_CHOICES:
        raise ConfigError(f"MIXQ_INT8_GEMM={choice!r} is not one of {INT8_GEMM_CHOICES}: unset it for the automatic "
                          "choice, or set mixq or onednn")
    return choice


@functools.cache
def cpu_has_amx() -> bool:
    return bool(cpu_features().get("amx_int8"))


def int8_keeps_plain_buffer(kind: str, weights: int) -> bool:
    """Whether an 8-bit `kind` layer of `weights` (N x K) weights keeps its plain buffer (it may run on the
    fused GEMM) rather than holding oneDNN's layout; the fused GEMM's availability aside."""
    choice = int8_gemm_choice()
    if choice != "auto":
        return choice == "mixq"
    return not cpu_has_amx() and (kind == "conv2d" or weights <= INT8_FUSED_LINEAR_WEIGHTS)


def fused_gemm_runs(k: int, w_bits: int = 4, kind: str = "linear", weights: int | None = None,
                    rows: int | None = None) -> bool:
    """Whether a `kind` layer ("linear" / "conv2d") of `w_bits` weights with K = k (a convolution: its input
    channels), `weights` = N x K weights in all, runs on the fused GEMM here (native.packed_gemm) for a call
    of `rows` output rows (None: not known, counted as many): AVX512-VNNI, the native library built, K a
    multiple of 4, and for 8-bit weights MIXQ_INT8_GEMM's choice (above); else 4/2-bit weights are
    unpacked per call and 8-bit ones run on oneDNN (below)."""
    if k % 4:
        return False
    if w_bits == 8:
        if weights is None or not int8_keeps_plain_buffer(kind, weights):
            return False
        if kind == "conv2d" and int8_gemm_choice() == "auto" and weights > INT8_FUSED_CONV_WEIGHTS and (
                rows is None or rows > INT8_FUSED_CONV_ROWS):
            return False
    return native.packed_gemm_function() is not None


def int8_conv_leaves_fused_gemm(k: int, weights: int, rows: int) -> bool:
    """Whether an 8-bit convolution (K = k input channels, `weights` in all) that the fused GEMM runs on small
    images runs on oneDNN for a call of `rows` output rows. Called on every call of such a layer: the row
    count, which alone can make the answer yes, is compared before the kernel switches are read."""
    return (rows > INT8_FUSED_CONV_ROWS and fused_gemm_runs(k, 8, "conv2d", weights, rows=1)
            and not fused_gemm_runs(k, 8, "conv2d", weights, rows=rows))


def call_layout_of_plain_conv(qweight, w_scale, in_channels, kernel_size, stride, padding) -> tuple:
    """(oneDNN weight, zero points) of an 8-bit convolution that keeps its plain buffer, for one call: not
    kept (int8_keeps_plain_buffer)."""
    return _prepack_conv(qweight, w_scale, in_channels, kernel_size, stride, padding), zero_points(qweight.shape[0])


def fused_packed_gemm(codes, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, bias, out_dtype, kernel_size=None,
                      stride=None):
    """The layer's output [M, N] from its unsigned codes [M, K] (or, with kernel_size, a convolution's padded
    codes, read in place) and packed weights, in one native call that unpacks the weights block by block
    into the GEMM's operand panel: bit for bit the reference."""
    kernel_dtype = out_dtype if out_dtype in native.OUTPUT_DTYPES else torch.float32
    settings = (qweight, w_bits, w_sum, x_scale.item(), unsigned_zero(x_zero), w_scale, bias, kernel_dtype)
    if kernel_size is None:
        y = native.packed_gemm(codes, *settings)
    else:
        y = native.packed_conv(codes, kernel_size, stride, *settings)
    return y.to(out_dtype)


# --- the two ops -------------------------------------------------------------------------------


def _onednn_linear(codes, x_scale: float, zero: int, packed, w_scale, w_zero, bias, out_dtype):
    # (the overload taking numbers: tensor scales would cost two small ops per call on the CPU)
    return torch.ops.onednn.qlinear_pointwise.default(
        codes, x_scale, zero, packed, w_scale, w_zero, bias, 1.0, 0, out_dtype, "none", [], "")


def onednn_bias(bias, out_dtype):
    return bias if bias is None or bias.dtype in (torch.float32, out_dtype) else bias.float()


def held_or_built_layout(qweight, w_scale, build):
    """(oneDNN weight, zero points): qweight itself where a layer holds its layout, else `build()`."""
    return (qweight, zero_points(w_scale.shape[0])) if qweight.is_mkldnn else build()


def linear_impl(x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias, out_dtype):
    if not qweight.is_mkldnn and fused_gemm_runs(x.shape[-1], w_bits, "linear", qweight.shape[0] * x.shape[-1]):
        codes = quantize_input_unsigned(x, x_scale, x_zero, a_bits, reuse=True)
        return fused_packed_gemm(codes, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, bias, out_dtype)
    prepared = held_or_built_layout(qweight, w_scale, lambda: linear_layout(
        qweight, w_bits, x.shape[-1], only_if_prepared=w_bits != 8))
    if prepared is None:  # a 4/2-bit weight kept packed
        per_byte = values_per_byte(w_bits)
        if x.shape[-1] % per_byte:
            warn_fallback(f"{w_bits}-bit linear layers with {x.shape[-1]} inputs (not a multiple of {per_byte})")
            return reference.quantized_linear(x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias)
        q_x = quantize_input_signed(x, x_scale, x_zero, a_bits, reuse=True)
        acc = int_matmul_transposed(lane_major(q_x, per_byte), unpack_lane_major(qweight, w_bits))
        return epilogue_in_place(acc, x_scale, x_zero, w_scale, w_sum, bias, out_dtype)
    kernel_dtype = out_dtype if out_dtype in ONEDNN_OUTPUT_DTYPES else torch.float32
    codes = quantize_input_unsigned(x, x_scale, x_zero, a_bits, reuse=True)
    packed, w_zero = prepared
    y = _onednn_linear(codes, x_scale.item(), unsigned_zero(x_zero), packed, w_scale, w_zero,
                       onednn_bias(bias, kernel_dtype), kernel_dtype)
    return y.to(out_dtype)


def conv2d_impl(x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias, kernel_size, stride, padding,
                out_dtype):
    b, c = x.shape[:2]
    ho, wo = reference.conv_output_size(x.shape[2:], kernel_size, stride, padding)
    weights = w_scale.shape[0] * c * kernel_size[0] * kernel_size[1]
    if not qweight.is_mkldnn and fused_gemm_runs(c, w_bits, "conv2d", weights, b * ho * wo):  # (c: whole dwords)
        codes = quantize_input_unsigned(x, x_scale, x_zero, a_bits, reuse=True, channels_last=True)
        codes = codes.contiguous(memory_format=torch.channels_last)
        if tuple(kernel_size) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0):
            y = fused_packed_gemm(codes.permute(0, 2, 3, 1).reshape(-1, c), qweight, w_bits, w_scale, w_sum,
                                  x_scale, x_zero, bias, out_dtype)  # (the codes as they are: a view)
        else:  # the padded codes, read in place by the GEMM
            y = fused_packed_gemm(padded_codes(codes, unsigned_zero(x_zero), padding), qweight, w_bits, w_scale,
                                  w_sum, x_scale, x_zero, bias, out_dtype, kernel_size, stride)
        return y.view(b, ho, -1, y.shape[-1]).permute(0, 3, 1, 2)
    if w_bits == 8 and not qweight.is_mkldnn and int8_keeps_plain_buffer("conv2d", weights):
        prepared = call_layout_of_plain_conv(qweight, w_scale, c, kernel_size, stride, padding)
    else:
        prepared = held_or_built_layout(qweight, w_scale, lambda: conv_layout(
            qweight, w_scale, c, kernel_size, stride, padding, w_bits, only_if_prepared=w_bits != 8))
    if prepared is None:  # a 4/2-bit weight kept packed
        per_byte = values_per_byte(w_bits)
        if c % per_byte:
            warn_fallback(f"{w_bits}-bit convolutions with {c} input channels (not a multiple of {per_byte})")
            return reference.quantized_conv2d(x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias,
                                              kernel_size, stride, padding)
        q_x = quantize_input_signed(x, x_scale, x_zero, a_bits, reuse=True, channels_last=True)
        cols, ho, wo = code_columns(q_x, int(x_zero.item()), kernel_size, stride, padding, per_byte)
        acc = int_matmul_transposed(cols, unpack_lane_major(qweight, w_bits))
        y = epilogue_in_place(acc, x_scale, x_zero, w_scale, w_sum, bias, out_dtype)
        return y.view(b, ho, wo, -1).permute(0, 3, 1, 2)
    kernel_dtype = out_dtype if out_dtype in ONEDNN_OUTPUT_DTYPES else torch.float32
    codes = quantize_input_unsigned(x, x_scale, x_zero, a_bits, reuse=True, channels_last=True)
    codes = codes.contiguous(memory_format=torch.channels_last)  # (a copy where the native pass is unavailable)
    packed, w_zero = prepared
    y = torch.ops.onednn.qconv2d_pointwise.default(
        codes, x_scale.item(), unsigned_zero(x_zero), packed, w_scale, w_zero, onednn_bias(bias, kernel_dtype),
        list(stride), list(padding), [1, 1], 1, 1.0, 0, kernel_dtype, "none", [], None)
    return y.to(out_dtype)


@torch.library.custom_op("mixq::cpu_linear", mutates_args=())
def _linear_op(x: torch.Tensor, qweight: torch.Tensor, w_bits: int, w_scale: torch.Tensor, w_sum: torch.Tensor,
               x_scale: torch.Tensor, x_zero: torch.Tensor, a_bits: int, bias: torch.Tensor | None,
               out_dtype: torch.dtype) -> torch.Tensor:
    return linear_impl(x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias, out_dtype)


@_linear_op.register_fake
def _(x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias, out_dtype):
    return x.new_empty((x.shape[0], w_scale.shape[0]), dtype=out_dtype)  # (a held linear layout is [K, N])


@torch.library.custom_op("mixq::cpu_conv2d", mutates_args=())
def _conv2d_op(x: torch.Tensor, qweight: torch.Tensor, w_bits: int, w_scale: torch.Tensor, w_sum: torch.Tensor,
               x_scale: torch.Tensor, x_zero: torch.Tensor, a_bits: int, bias: torch.Tensor | None,
               kernel_size: list[int], stride: list[int], padding: list[int], out_dtype: torch.dtype) -> torch.Tensor:
    # A custom op may not return a view of scratch memory or an input: hand back owned storage.
    y = conv2d_impl(x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias, kernel_size, stride,
                    padding, out_dtype)
    return y.contiguous(memory_format=torch.channels_last)


@_conv2d_op.register_fake
def _(x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias, kernel_size, stride, padding, out_dtype):
    ho, wo = reference.conv_output_size(x.shape[2:], kernel_size, stride, padding)
    out = x.new_empty((x.shape[0], w_scale.shape[0], ho, wo), dtype=out_dtype)
    return out.contiguous(memory_format=torch.channels_last)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def quantized_linear(x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias=None):
    """The kernels/__init__ interface; eager calls skip the custom-op dispatch (~tens of us each)."""
    run = _linear_op if _compiling() else linear_impl
    return run(x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias, x.dtype)


def quantized_conv2d(x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias, kernel_size, stride, padding):
    run = _conv2d_op if _compiling() else conv2d_impl
    y = run(x, qweight, w_bits, w_scale, w_sum, x_scale, x_zero, a_bits, bias, list(kernel_size), list(stride),
            list(padding), x.dtype)
    # Follow the input's memory format, as torch's convs (and the reference) do.
    return y if reference.is_channels_last(x) else y.contiguous()


def prepare(qweight, w_bits, w_scale, kind, in_channels=None, kernel_size=None, stride=None, padding=None,
            cpu_weights: str = "packed"):
    """Lay out one weight for the kernels now (at quantize / load time) rather than at first use: every
    8-bit weight, and 4/2-bit ones in the "int8" CPU weight mode. `in_channels`: K of a linear layer."""
    if (w_bits != 8 and cpu_weights != "int8") or unavailable_reason() is not None:
        return
    if w_bits == 8 and int8_keeps_plain_buffer(kind, qweight.shape[0] * qweight.shape[1]):
        return  # (the fused GEMM reads the plain buffer)
    if kind == "linear":
        linear_layout(qweight, w_bits, in_channels)
    else:
        conv_layout(qweight, w_scale, in_channels, kernel_size, stride, padding, w_bits)
