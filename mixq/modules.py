"""Quantized replacements for nn.Linear and nn.Conv2d, and their fake-quant twins.

A layer's precision is a pair (w_bits, a_bits); 16 on a side keeps that side in floating point:

    w < 16, a < 16   integer path: packed weights, quantized input, mixq.kernels
    w < 16, a = 16   weight-only: weights dequantized on the fly, floating-point matmul
    w = 16, a < 16   activation-only: fake-quantized input, floating-point weights

Activation parameters come per input "part": one part normally, two for the up-block
conv_shortcut layers whose input is cat([hidden, skip]) (split quantization). Parts are
contiguous slices of the input channels.

BOS-aware cross-attention (attn2.to_k / attn2.to_v): the output row of token 0 is prompt-
independent for a causal text encoder, so it is computed once from the unquantized layer and
stored ("cached"); tokens 1.. go through the quantized layer. Where calibration found token 0 to
vary between prompts, it is computed on every call from the unquantized input and the
dequantized weights instead ("float").
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from mixq.kernels import dispatch, native, onednn, prepared_calls
from mixq.kernels.reference import conv_output_size, is_channels_last
from mixq.quantizers import (
    FLOAT_BITS,
    activation_qparams,
    check_activation_bits,
    check_weight_bits,
    dequantize_weight,
    fake_quantize_activation,
    pack_weight,
    packed_width,
    quantize_activation,
    quantize_weight,
    unpack_weight,
    weight_row_sums,
)

BOS_MODES = ("none", "cached", "float")
# Token 0 counts as prompt-independent when every observation is this close to the first one
# (relative to the row's magnitude); batch-size-dependent kernels differ by far less than this.
BOS_RELATIVE_TOLERANCE = 1e-2


class BosMismatchWarning(UserWarning):
    """Token 0 of the text embedding differs from the one the cached BOS rows were calibrated with."""


def bos_rows_match(rows: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Every row of `rows` [B, K] is the calibrated token-0 input `reference` [K], within tolerance
    (a 0-dim bool tensor: no host sync)."""
    reference = reference.to(rows.device, torch.float32)
    deviation = (rows.float() - reference).abs().amax()
    return deviation <= BOS_RELATIVE_TOLERANCE * reference.abs().amax().clamp_min(1e-6)


def bos_row_matches(rows: torch.Tensor, reference: torch.Tensor) -> bool:
    return bool(bos_rows_match(rows, reference))


def propagate_non_finite(x: torch.Tensor, y: torch.Tensor, conv=None, known_finite: bool | None = None) -> torch.Tensor:
    """`y` with NaN wherever the float layer's output would depend on a NaN/Inf input element.

    Quantizing an activation maps NaN/Inf to ordinary integer codes, so the integer and fake-quant paths
    alone would turn a broken input into plausible numbers. Checked around the kernel call, without a
    host sync: a row-wise flag for Linear (any non-finite feature poisons the row), the input's non-finite
    map pushed through the convolution's window for Conv2d (`conv` = (kernel_size, stride, padding)).
    Where float would give +-Inf this gives NaN: non-finite either way. `known_finite`: whether x is all
    finite, where the kernels just found out (QuantizedLayer.input_found_finite); None: unknown."""
    if known_finite is not None:
        return y if known_finite else y.masked_fill(non_finite_map(x, conv), float("nan"))
    if x.device.type == "cpu":
        # CPU: one reduction settles the common case, where a host sync costs nothing. A sum of finite
        # values is never NaN; one that overflows to Inf only sends the call to the exact map below.
        # bf16 sums in its own dtype (float32 range, float32 accumulation; converting first is 10x
        # slower), fp16 in float32 (its range would overflow on large activations).
        all_finite = x.sum(dtype=torch.float32 if x.dtype == torch.float16 else None).isfinite()
        if torch.compiler.is_compiling():  # the same decision, taken as the compiled graph runs
            poisoned = torch.cond(all_finite, functools.partial(nothing_poisoned, conv=conv),
                                  functools.partial(non_finite_map, conv=conv), (x,))
            return y.masked_fill(poisoned, float("nan"))
        if bool(all_finite):
            return y
    return y.masked_fill(non_finite_map(x, conv), float("nan"))


def non_finite_map(x: torch.Tensor, conv=None) -> torch.Tensor:
    """Where the layer's output depends on a non-finite input element: [..., 1] for Linear, [B, 1, Ho, Wo]
    for Conv2d (bool, broadcast against the output)."""
    if conv is None:
        return ~torch.isfinite(x).all(dim=-1, keepdim=True)
    kernel_size, stride, padding = conv
    bad = (~torch.isfinite(x)).any(dim=1, keepdim=True).float()
    window = torch.ones(1, 1, *kernel_size, device=x.device)
    return F.conv2d(bad, window, stride=stride, padding=padding) > 0


def nothing_poisoned(x: torch.Tensor, conv=None) -> torch.Tensor:
    """An all-False map of non_finite_map's shape (torch.cond's branch for finite inputs)."""
    if conv is None:
        shape = (*x.shape[:-1], 1)
    else:
        shape = (x.shape[0], 1, *conv_output_size(x.shape[2:], *conv))
    return torch.zeros(shape, dtype=torch.bool, device=x.device)


@torch.no_grad()
def bos_output_row(linear: nn.Linear, bos_input: torch.Tensor) -> torch.Tensor:
    """The unquantized layer's output for the BOS token, [N] in the layer's dtype."""
    w = linear.weight
    return linear(bos_input.to(w.device, w.dtype).view(1, 1, -1)).reshape(-1)


def conv_weight_as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """[N, C, kh, kw] -> [N, kh * kw * C]: the channels-last reduction order the kernels use."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def matrix_as_conv_weight(matrix: torch.Tensor, in_channels: int, kernel_size) -> torch.Tensor:
    kh, kw = kernel_size
    return matrix.reshape(matrix.shape[0], kh, kw, in_channels).permute(0, 3, 1, 2)


def split_sizes(in_channels: int, split_at: int | None) -> list[int]:
    return [in_channels] if not split_at else [split_at, in_channels - split_at]


class QuantizedLayer(nn.Module):
    """State and behaviour shared by QLinear and QConv2d.

    Buffers (all in state_dict, so a quantized UNet saves and loads like any module):
      qweight_{p}  packed integer weight of input part p, or `weight` (fp, the original layer's
                   shape) when w_bits == 16
      w_scale      fp32 [N] per-output-channel scales
      w_sum_{p}    int32 [N] per-part integer weight sums (zero-point folding)
      x_scale, x_zero   fp32 [parts] activation parameters
      bias         the original bias (pipeline dtype), if any
      bos_output   [N] the stored output row of token 0 (BOS mode "cached")

    On an x86 CPU an 8-bit layer that runs on oneDNN holds its weights once, in the oneDNN kernels' layout
    (see hold_kernel_layouts): `qweight_{p}` is then rebuilt from that layout on demand. One that runs on
    mixq's fused GEMM (kernels/onednn.py, INT8_GEMM_CHOICES) keeps its plain buffer alone.
    """

    def __init__(self, out_features, in_features, w_bits, a_bits, kernel_size=(1, 1), split_at=None,
                 bos_mode="none", has_bias=True, dtype=torch.float32, device=None):
        super().__init__()
        self.w_bits = check_weight_bits(w_bits)
        self.a_bits = check_activation_bits(a_bits)
        if self.w_bits == FLOAT_BITS and self.a_bits == FLOAT_BITS:
            raise ValueError("a layer with w_bits == a_bits == 16 is not quantized: keep the original module")
        if bos_mode not in BOS_MODES:
            raise ValueError(f"bos_mode must be one of {BOS_MODES}, got {bos_mode!r}")
        self.out_features, self.in_features = out_features, in_features
        self.kernel_size = tuple(kernel_size)
        self.split_at = split_at if (split_at and self.a_bits != FLOAT_BITS) else None
        self.bos_mode = bos_mode
        self.part_sizes = split_sizes(in_features, self.split_at)
        taps = self.kernel_size[0] * self.kernel_size[1]
        f32 = dict(dtype=torch.float32, device=device)
        if self.w_bits == FLOAT_BITS:
            shape = (out_features, in_features) if self.kind == "linear" else (out_features, in_features, *self.kernel_size)
            self.register_buffer("weight", torch.zeros(shape, dtype=dtype, device=device))
        else:
            packed_dtype = torch.int8 if self.w_bits == 8 else torch.uint8
            for p, size in enumerate(self.part_sizes):
                width = packed_width(taps * size, self.w_bits)
                self.register_buffer(f"qweight_{p}", torch.zeros(out_features, width, dtype=packed_dtype, device=device))
                self.register_buffer(f"w_sum_{p}", torch.zeros(out_features, dtype=torch.int32, device=device))
            self.register_buffer("w_scale", torch.ones(out_features, **f32))
        parts = len(self.part_sizes)
        self.register_buffer("x_scale", torch.ones(parts, **f32))
        self.register_buffer("x_zero", torch.zeros(parts, **f32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if has_bias else None)
        self.register_buffer("bos_output", torch.zeros(out_features, dtype=dtype, device=device) if bos_mode == "cached" else None)
        # The calibrated token-0 input the stored row was computed from: checked on every call (see QLinear).
        self.register_buffer("bos_input", torch.zeros(in_features, dtype=dtype, device=device) if bos_mode == "cached" else None)
        self._input_key = None  # see input_key
        self._kernel_layouts: dict[str, torch.Tensor] = {}  # see hold_kernel_layouts

    # --- construction from a float layer ---------------------------------------------------------

    def load_float_weight(self, weight: torch.Tensor, bias: torch.Tensor | None):
        """weight: the float layer's weight, in its own shape."""
        held = self.release_kernel_layouts()
        if bias is not None:
            self.bias.copy_(bias.detach())
        if self.w_bits == FLOAT_BITS:
            self.weight.copy_(weight.detach())
            return
        matrix = weight if self.kind == "linear" else conv_weight_as_matrix(weight)
        q, scales = quantize_weight(matrix, self.w_bits)
        self.w_scale.copy_(scales)
        for p, part in enumerate(self._weight_parts(q)):
            getattr(self, f"qweight_{p}").copy_(pack_weight(part, self.w_bits))
            getattr(self, f"w_sum_{p}").copy_(weight_row_sums(part))
        if held:
            self.hold_kernel_layouts()

    def set_activation_ranges(self, lows, highs):
        if self.a_bits == FLOAT_BITS:
            return
        if len(lows) != len(self.part_sizes):
            raise ValueError(f"expected {len(self.part_sizes)} activation range(s), got {len(lows)}")
        for p, (lo, hi) in enumerate(zip(lows, highs)):
            scale, zero = activation_qparams(lo, hi, self.a_bits)
            self.x_scale[p] = scale
            self.x_zero[p] = zero
        self.refresh_input_key()

    # --- one quantize pass for layers that read the same input ----------------------------------

    def refresh_input_key(self):
        """Record x_scale / x_zero as numbers (one device read, at calibration or load time, never
        per call), stamped with the buffers' version counters: any later write to them voids the
        record instead of leaving it stale."""
        if self.x_scale.is_meta:
            self._input_key = None
            return
        self._input_key = (tuple(zip(self.x_scale.tolist(), self.x_zero.tolist())), self._parameter_stamp())

    def _parameter_stamp(self) -> tuple | None:
        """None for buffers made under torch.inference_mode, which keep no version counter (no record then)."""
        if self.x_scale.is_inference() or self.x_zero.is_inference():
            return None
        return (self.x_scale.data_ptr(), self.x_scale._version, self.x_zero.data_ptr(), self.x_zero._version)

    def input_key(self, part: int) -> tuple | None:
        """(a_bits, scale, zero) of input part `part` as numbers, by which the kernels recognise
        layers that quantize one input tensor identically (attention's to_q / to_k / to_v) and
        quantize it once for all of them; None while unknown (never recorded, or written since)."""
        if (torch.compiler.is_compiling() or self._input_key is None or self._input_key[1] is None
                or self._input_key[1] != self._parameter_stamp()):
            return None  # (a compiled graph fuses the quantization itself)
        scale, zero = self._input_key[0][part]
        return (self.a_bits, scale, zero)

    def _weight_parts(self, matrix: torch.Tensor) -> list[torch.Tensor]:
        """Split a [N, K] (row, col, channel)-ordered matrix into per-part matrices."""
        if len(self.part_sizes) == 1:
            return [matrix]
        taps = self.kernel_size[0] * self.kernel_size[1]
        per_tap = matrix.reshape(matrix.shape[0], taps, self.in_features)
        chunks = per_tap.split(self.part_sizes, dim=2)
        return [chunk.reshape(matrix.shape[0], -1) for chunk in chunks]

    # --- views used by forward, summaries and tests ----------------------------------------------

    def float_weight(self, dtype) -> torch.Tensor:
        """The effective weight in the float layer's shape (contiguous, so float ops run exactly
        as they would on an nn.Linear / nn.Conv2d holding these values)."""
        if self.w_bits == FLOAT_BITS:
            return self.weight.to(dtype)
        matrix = self.dequantized_weight_matrix()
        if self.kind == "conv2d":
            matrix = matrix_as_conv_weight(matrix, self.in_features, self.kernel_size)
        return matrix.to(dtype).contiguous()

    def dequantized_weight_matrix(self) -> torch.Tensor:
        """The effective [N, K] weight (fp32) in (row, col, channel) order; w_bits < 16."""
        taps = self.kernel_size[0] * self.kernel_size[1]
        parts = [
            unpack_weight(getattr(self, f"qweight_{p}"), self.w_bits, taps * size).reshape(-1, taps, size)
            for p, size in enumerate(self.part_sizes)
        ]
        q = torch.cat(parts, dim=2).reshape(self.out_features, -1)
        return dequantize_weight(q, self.w_scale)

    def _integer_parts(self, x, run_kernel):
        """Sum of per-part kernel calls; the bias is added once."""
        if not torch.compiler.is_compiling():
            onednn.forget_scan()  # (what input_found_finite then answers comes from these calls)
        y = None
        start = 0
        for p, size in enumerate(self.part_sizes):
            xp = x if len(self.part_sizes) == 1 else x.narrow(1 if x.dim() == 4 else -1, start, size)
            yp = run_kernel(
                xp, self.kernel_weight(p), getattr(self, f"w_sum_{p}"),
                self.x_scale[p], self.x_zero[p], self.bias if p == 0 else None, functools.partial(self.input_key, p),
            )
            y = yp if y is None else y + yp
            start += size
        return y

    def cpu_calls(self, x: torch.Tensor) -> list | None:
        """This layer's eager CPU kernel calls, one per input part (kernels/prepared_calls.py), prepared on
        first use and again whenever a buffer or a kernel switch changed; None where the general path runs x
        (another backend, a compiled graph, 4/2-bit weights unpacked per call)."""
        if not prepared_calls.usable(x):
            return None
        b, parts = self._buffers, range(len(self.part_sizes))
        weights, sums = [self.kernel_weight(p) for p in parts], [b[f"w_sum_{p}"] for p in parts]
        buffers = prepared_calls.buffer_stamp(*weights, *sums, b["w_scale"], b["x_scale"], b["x_zero"], b["bias"])
        if buffers is None:
            return None
        stamp = (prepared_calls.switches(), buffers)
        cached = self.__dict__.get("_prepared")
        if cached is None or cached[0] != stamp:
            calls = [prepared_calls.prepare(
                weights[p], self.w_bits, b["w_scale"], sums[p], b["x_scale"][p], b["x_zero"][p], self.a_bits,
                b["bias"] if p == 0 else None, self.kind, self.in_features if self.kind == "linear" else size,
                self.part_geometry(p)) for p, size in enumerate(self.part_sizes)]
            cached = (stamp, None if None in calls else calls)
            self.__dict__["_prepared"] = cached
        return cached[1]

    @staticmethod
    def input_found_finite(x: torch.Tensor) -> bool | None:
        """Whether x is all finite, as the native activation quantization found in the kernel calls of
        _integer_parts just made (which forget what earlier calls found); None where it did not read x."""
        return None if torch.compiler.is_compiling() else onednn.scanned_finite(x)

    def _fake_quantized_input(self, x, channel_dim):
        if len(self.part_sizes) == 1:
            return fake_quantize_activation(x, self.x_scale[0], self.x_zero[0], self.a_bits)
        chunks = x.split(self.part_sizes, dim=channel_dim)
        return torch.cat(
            [fake_quantize_activation(c, self.x_scale[p], self.x_zero[p], self.a_bits) for p, c in enumerate(chunks)],
            dim=channel_dim,
        )

    # Scales stay fp32 when the pipeline is cast (pipe.to(torch.float16)); only their device follows.
    _FP32_BUFFERS = ("w_scale", "x_scale", "x_zero")

    def _apply(self, fn, recurse=True):
        if self._kernel_layouts and not keeps_cpu_int8(fn):
            self.release_kernel_layouts()  # moving to another device or dtype: the plain buffers move
        key_valid = self.input_key(0) is not None
        kept = {name: self._buffers.pop(name) for name in self._FP32_BUFFERS if name in self._buffers}
        super()._apply(fn, recurse)
        for name, tensor in kept.items():
            device = fn(torch.empty(0, device=tensor.device)).device
            # A meta tensor has no data to copy (unet.to_empty(device=...)): allocate it uninitialised there.
            self._buffers[name] = torch.empty_like(tensor, device=device) if tensor.is_meta else tensor.to(device)
        if key_valid:  # the values moved unchanged: only the stamp is new
            self._input_key = (self._input_key[0], self._parameter_stamp())
        return self

    @property
    def qweight(self) -> torch.Tensor:
        """The packed weight of the first input part (the float weight when w_bits == 16): where PEFT, like
        other libraries that wrap quantized layers, looks for a layer's device."""
        return self._buffers["weight"] if self.w_bits == FLOAT_BITS else self.kernel_weight(0)

    def state_bytes(self) -> int:
        """Bytes the layer holds: its buffers and the weight layouts it holds instead of plain buffers."""
        return self.held_layout_bytes() + sum(b.numel() * b.element_size() for b in self.buffers())

    def held_layout_bytes(self) -> int:
        """Bytes of the kernel layouts held in place of `qweight_{p}` buffers (which buffers() skips)."""
        return sum(layout.numel() * layout.element_size() for layout in self._kernel_layouts.values())

    # --- 8-bit weights held once, in the CPU kernels' layout --------------------------------------
    #
    # oneDNN's int8 kernels read weights reordered into a blocked layout. Keeping that layout beside
    # the plain `qweight_{p}` buffer would hold every 8-bit weight twice, so prepare_layer (quantize /
    # load time) has the layer keep the layout alone; its `_buffers` entry stays, as None, so that
    # state_dict keeps its keys and their order. The plain codes come back exactly (the reorder only
    # moves bytes): `layer.qweight_{p}` gives a fresh copy, and state_dict, load_state_dict, pickling,
    # deepcopy and moves to another device or dtype work on them as on an unprepared layer.

    def hold_kernel_layouts(self, large_calls: bool = False) -> bool:
        """Keep 8-bit integer weights only in oneDNN's layout, where that layout can be built here (an x86
        CPU with oneDNN, the weights on the CPU) and oneDNN runs them; True when the layer now holds them so.
        A layer the fused GEMM may run keeps its plain buffer instead, unless `large_calls` (a convolution
        called on an image too large for it, see QConv2d.forward)."""
        if self._kernel_layouts:
            return True
        plain = [self._buffers.get(f"qweight_{p}") for p in range(len(self.part_sizes))]
        if (self.w_bits != 8 or self.a_bits == FLOAT_BITS or any(q is None or q.device.type != "cpu" for q in plain)
                or onednn.unavailable_reason() is not None):
            return False
        if not large_calls and native.packed_gemm_function() is not None and onednn.int8_keeps_plain_buffer(
                self.kind, sum(q.numel() for q in plain)) and all(size % 4 == 0 for size in self.part_sizes):
            return False  # mixq's fused GEMM runs them from the plain buffer: already one copy
        for p, qweight in enumerate(plain):
            self._kernel_layouts[f"qweight_{p}"] = onednn.weight_layout(qweight, self.w_scale, **self.part_geometry(p))
        for name in self._kernel_layouts:
            self._buffers[name] = None
        return True

    def part_geometry(self, part: int) -> dict:
        """What the CPU kernels' weight layouts of input part `part` are built from: the op kind,
        its input channels (K for a linear layer, whose input is never split) and the window."""
        if self.kind == "linear":
            return {"kind": "linear", "in_channels": self.in_features}
        return {"kind": "conv2d", "in_channels": self.part_sizes[part], "kernel_size": self.kernel_size,
                "stride": self.stride, "padding": self.padding}

    def release_kernel_layouts(self) -> bool:
        """Put the plain `qweight_{p}` buffers back and drop the layouts; True when there were any."""
        if not self._kernel_layouts:
            return False
        for name in list(self._kernel_layouts):
            self._buffers[name] = self._plain_codes(name)
            del self._kernel_layouts[name]
        return True

    def kernel_weight(self, part: int) -> torch.Tensor:
        """What the kernels take for input part `part`: the held oneDNN layout, or the packed buffer."""
        layout = self._kernel_layouts.get(f"qweight_{part}")
        return layout if layout is not None else self._buffers[f"qweight_{part}"]

    def _plain_codes(self, name: str) -> torch.Tensor:
        return onednn.plain_codes(self._kernel_layouts[name], self.kind)

    def __getattr__(self, name):
        layouts = self.__dict__.get("_kernel_layouts")
        if layouts and name in layouts:
            return self._plain_codes(name)  # a copy: writing to it changes nothing (see load_float_weight)
        return super().__getattr__(name)

    @contextlib.contextmanager
    def _plain_buffers(self):
        """The plain buffers in place of the held layouts for the duration (for state_dict)."""
        names = list(self._kernel_layouts)
        for name in names:
            self._buffers[name] = self._plain_codes(name)
        try:
            yield
        finally:
            for name in names:
                self._buffers[name] = None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        with self._plain_buffers():
            super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        held = self.release_kernel_layouts()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if held:
            self.hold_kernel_layouts()  # from the values just loaded

    def __getstate__(self):  # pickle and deepcopy: the plain buffers, laid out again on restore
        state = super().__getstate__()
        state.pop("_prepared", None)  # (native function pointers: prepared again on first use)
        if self._kernel_layouts:
            state["_buffers"] = OrderedDict(
                (name, self._plain_codes(name) if name in self._kernel_layouts else tensor)
                for name, tensor in self._buffers.items())
            state["_kernel_layouts"] = {}
            state["_restore_kernel_layouts"] = True
        return state

    def __setstate__(self, state):
        restore = state.pop("_restore_kernel_layouts", False)
        super().__setstate__(state)
        self.__dict__.setdefault("_kernel_layouts", {})
        if restore:
            self.hold_kernel_layouts()

    def extra_repr(self):
        extra = f", split={self.part_sizes}" if self.split_at else ""
        bos = f", bos={self.bos_mode}" if self.bos_mode != "none" else ""
        return f"in={self.in_features}, out={self.out_features}, w_bits={self.w_bits}, a_bits={self.a_bits}{extra}{bos}"


class QLinear(QuantizedLayer):
    kind = "linear"

    @classmethod
    def from_float(cls, linear: nn.Linear, w_bits: int, a_bits: int, lows=(0.0,), highs=(0.0,),
                   bos_mode="none", bos_input: torch.Tensor | None = None) -> "QLinear":
        w = linear.weight
        layer = cls(linear.out_features, linear.in_features, w_bits, a_bits, bos_mode=bos_mode,
                    has_bias=linear.bias is not None, dtype=w.dtype, device=w.device)
        layer.load_float_weight(w, linear.bias)
        layer.set_activation_ranges(lows, highs)
        if bos_mode == "cached":
            if bos_input is None:
                raise ValueError("bos_mode='cached' needs the calibrated BOS input row")
            layer.bos_output.copy_(bos_output_row(linear, bos_input))
            layer.bos_input.copy_(bos_input.detach().reshape(-1))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bos_mode != "none" and x.dim() == 3 and x.shape[1] > 1:
            head = self._bos_rows(x)
            return torch.cat([head, self._body(x[:, 1:])], dim=1)
        return self._body(x)

    def _bos_rows(self, x):
        if self.bos_mode == "cached" and self.bos_input is not None and torch.compiler.is_compiling():
            # A compiled graph takes no host decision: both rows are traced and the check picks one as it
            # runs (without the warning eager mode gives).
            return torch.cond(bos_rows_match(x[:, 0], self.bos_input), self._stored_bos_rows, self._computed_bos_rows,
                              (x,))
        if self.bos_mode == "cached" and self._bos_input_is_calibrated(x[:, 0]):
            return self._stored_bos_rows(x)
        return self._computed_bos_rows(x)

    def _stored_bos_rows(self, x):
        rows = self.bos_output.to(x.dtype).expand(x.shape[0], 1, -1)
        return rows.clone() if torch.compiler.is_compiling() else rows  # (torch.cond branches return no views)

    def _computed_bos_rows(self, x):
        return F.linear(x[:, :1], self.float_weight(x.dtype), self.bias)

    def _bos_input_is_calibrated(self, rows) -> bool:
        """False (with a warning) when token 0 differs from the calibrated one, e.g. a zeroed negative
        embedding under classifier-free guidance after calibrating without guidance: the stored row would
        then be wrong, so token 0 is computed from the input instead (the "float" BOS mode)."""
        if self.bos_input is None or bos_row_matches(rows, self.bos_input):
            return True  # (checkpoints saved before bos_input was stored cannot be checked)
        warnings.warn(
            "token 0 of the text embedding differs from the one mixq calibrated its cached cross-attention rows "
            "with (e.g. calibrated with guidance_scale <= 1, served with classifier-free guidance and a zeroed "
            "negative prompt): computing token 0 from the input instead, which is slower. Calibrate with the "
            "guidance and negative prompt you serve with.", BosMismatchWarning, stacklevel=3)
        return False

    def _body(self, x):
        if self.a_bits == FLOAT_BITS:
            return F.linear(x, self.float_weight(x.dtype), self.bias)
        if self.w_bits == FLOAT_BITS:
            return propagate_non_finite(x, F.linear(self._fake_quantized_input(x, -1), self.weight, self.bias))
        calls = self.cpu_calls(x)
        prepared = calls and prepared_calls.linear(calls[0], x.reshape(-1, self.in_features))
        if prepared:
            y, finite = prepared
            return propagate_non_finite(x, y.reshape(*x.shape[:-1], self.out_features), known_finite=finite)
        y = self._integer_parts(
            x.reshape(-1, self.in_features),
            lambda xp, qw, ws, xs, xz, b, key: dispatch.quantized_linear(
                xp, qw, self.w_bits, self.w_scale, ws, xs, xz, self.a_bits, b, input_key=key
            ),
        )
        return propagate_non_finite(x, y.reshape(*x.shape[:-1], self.out_features),
                                    known_finite=self.input_found_finite(x))


class QConv2d(QuantizedLayer):
    kind = "conv2d"

    def __init__(self, out_channels, in_channels, w_bits, a_bits, kernel_size, stride=(1, 1), padding=(0, 0),
                 split_at=None, has_bias=True, dtype=torch.float32, device=None):
        super().__init__(out_channels, in_channels, w_bits, a_bits, kernel_size=kernel_size, split_at=split_at,
                         has_bias=has_bias, dtype=dtype, device=device)
        self.stride, self.padding = tuple(stride), tuple(padding)

    # nn.Conv2d's names for the shape, which diffusers code reads.
    @property
    def in_channels(self) -> int:
        return self.in_features

    @property
    def out_channels(self) -> int:
        return self.out_features

    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_bits: int, a_bits: int, lows=(0.0,), highs=(0.0,),
                   split_at: int | None = None) -> "QConv2d":
        check_supported_conv(conv)
        w = conv.weight
        layer = cls(conv.out_channels, conv.in_channels, w_bits, a_bits, conv.kernel_size, conv.stride,
                    conv.padding, split_at=split_at, has_bias=conv.bias is not None, dtype=w.dtype, device=w.device)
        layer.load_float_weight(w, conv.bias)
        layer.set_activation_ranges(lows, highs)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_bits == FLOAT_BITS:
            return F.conv2d(x, self.float_weight(x.dtype), self.bias, self.stride, self.padding)
        known_finite = None
        if self.w_bits == FLOAT_BITS:
            y = F.conv2d(self._fake_quantized_input(x, 1), self.float_weight(x.dtype), self.bias, self.stride,
                         self.padding)
        else:
            if self.w_bits == 8 and not self._kernel_layouts and self._too_large_for_the_fused_gemm(x):
                self.hold_kernel_layouts(large_calls=True)  # oneDNN's layout from now on, still one copy
            calls = self.cpu_calls(x)
            prepared = calls and prepared_calls.conv2d(calls, x, self.part_sizes, self.kernel_size, self.stride,
                                                       self.padding)
            if prepared:
                y, known_finite = prepared
                # The memory format the general path gives: its parts' (a part of a channels-last x is not
                # channels-last dense, so a split convolution's output comes contiguous), as torch's convs.
                y = y if len(calls) == 1 and is_channels_last(x) else y.contiguous()
            else:
                y = self._integer_parts(
                    x,
                    lambda xp, qw, ws, xs, xz, b, key: dispatch.quantized_conv2d(
                        xp, qw, self.w_bits, self.w_scale, ws, xs, xz, self.a_bits, b,
                        self.kernel_size, self.stride, self.padding, input_key=key,
                    ),
                )
                known_finite = self.input_found_finite(x)
        return propagate_non_finite(x, y, (self.kernel_size, self.stride, self.padding), known_finite)

    def _too_large_for_the_fused_gemm(self, x: torch.Tensor) -> bool:
        """Whether this 8-bit convolution, kept plain for the fused GEMM, is called on an image on which
        oneDNN's kernel runs it faster (onednn.int8_conv_leaves_fused_gemm: a large convolution on many
        output positions, e.g. the VAE decoder's): it then holds oneDNN's layout, instead of laying it out on
        every call; a layer called on such images once is likely to be called on them again."""
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return False
        rows = x.shape[0] * math.prod(conv_output_size(x.shape[2:], self.kernel_size, self.stride, self.padding))
        taps = self.kernel_size[0] * self.kernel_size[1]
        return any(onednn.int8_conv_leaves_fused_gemm(size, self.out_features * size * taps, rows)
                   for size in self.part_sizes)


def keeps_cpu_int8(fn) -> bool:
    """Whether Module._apply's `fn` leaves an int8 CPU tensor an int8 CPU tensor (.half(), .to(dtype), a
    move within the CPU), so that held kernel layouts stay valid."""
    probe = fn(torch.empty(0, dtype=torch.int8))
    return probe.device.type == "cpu" and probe.dtype == torch.int8


def check_supported_conv(conv: nn.Conv2d):
    if conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(
            f"unsupported Conv2d (groups={conv.groups}, dilation={conv.dilation}, padding={conv.padding!r}, "
            f"padding_mode={conv.padding_mode!r}): only groups=1, dilation=1, numeric zero padding are "
            "quantized; add the layer to keep_fp"
        )


def is_supported_conv(conv: nn.Conv2d) -> bool:
    try:
        check_supported_conv(conv)
    except ValueError:
        return False
    return True


# --- fake-quant twins: the float simulation used by sensitivity analysis and as the integer path's oracle
#
# A twin quantizes the input to codes with the same function as the real layer, then runs the float
# op (F.linear / F.conv2d, with torch's own zero padding) on the centered codes (q - zero) and the
# integer weights in float64, where sums of integers are exact, and applies the scales after it.
# It shares no packing, weight-sum folding or im2col with the kernels, so it checks all of them;
# and since it rounds exactly where the kernels do, a correct integer path agrees with it bit for
# bit instead of drifting through the chain of rounding decisions in a deep network.


class FakeQuantLayer(nn.Module):
    def __init__(self, inner: nn.Module, w_bits, a_bits, lows, highs, split_at=None, bos_mode="none", bos_input=None):
        super().__init__()
        self.w_bits, self.a_bits = check_weight_bits(w_bits), check_activation_bits(a_bits)
        self.bos_mode = bos_mode
        self.inner = inner
        # Same shape attributes as the float layer: pipelines read them (e.g. SDXL reads
        # add_embedding.linear_1.in_features).
        for attr in ("in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride", "padding"):
            if hasattr(inner, attr):
                setattr(self, attr, getattr(inner, attr))
        in_channels = inner.weight.shape[1]
        self.part_sizes = split_sizes(in_channels, split_at if a_bits != FLOAT_BITS else None)
        if self.w_bits != FLOAT_BITS:
            q, scales = quantize_weight(inner.weight, self.w_bits)
            self.register_buffer("q_weight", q)
            self.register_buffer("w_scale", scales)
        if self.a_bits != FLOAT_BITS:
            params = [activation_qparams(lo, hi, self.a_bits) for lo, hi in zip(lows, highs)]
            self.register_buffer("x_scale", torch.tensor([s for s, _ in params], dtype=torch.float32))
            self.register_buffer("x_zero", torch.tensor([z for _, z in params], dtype=torch.float32))
        if bos_mode == "cached":
            self.register_buffer("bos_output", bos_output_row(inner, bos_input))

    def float_weight(self, dtype):
        if self.w_bits == FLOAT_BITS:
            return self.inner.weight
        return dequantize_weight(self.q_weight, self.w_scale).to(dtype)

    def simulate(self, x, channel_dim, op):
        """op(input, weight, bias) is the layer's float op (F.linear or a conv)."""
        if self.a_bits == FLOAT_BITS:
            return op(x, self.float_weight(x.dtype), self.inner.bias)
        conv = None if self.kind == "linear" else (self.inner.kernel_size, self.inner.stride, self.inner.padding)
        return propagate_non_finite(x, self._simulate_quantized_input(x, channel_dim, op), conv)

    def _simulate_quantized_input(self, x, channel_dim, op):
        if self.w_bits == FLOAT_BITS:
            chunks = x.split(self.part_sizes, dim=channel_dim)
            fq = [fake_quantize_activation(c, self.x_scale[p], self.x_zero[p], self.a_bits) for p, c in enumerate(chunks)]
            return op(torch.cat(fq, dim=channel_dim), self.inner.weight, self.inner.bias)
        y = None
        for p, (chunk, w_part) in enumerate(zip(x.split(self.part_sizes, dim=channel_dim),
                                                self.q_weight.split(self.part_sizes, dim=1))):
            codes = quantize_activation(chunk, self.x_scale[p], self.x_zero[p], self.a_bits)
            acc = op(codes.double() - self.x_zero[p].double(), w_part.double(), None)
            shape = [1] * acc.dim()
            shape[channel_dim] = -1
            yp = acc.float() * (self.x_scale[p] * self.w_scale).view(shape)
            if p == 0 and self.inner.bias is not None:
                yp = yp + self.inner.bias.float().view(shape)
            yp = yp.to(x.dtype)
            y = yp if y is None else y + yp
        return y


class FakeQuantLinear(FakeQuantLayer):
    kind = "linear"

    def forward(self, x):
        if self.bos_mode != "none" and x.dim() == 3 and x.shape[1] > 1:
            # Token 0 as the real layer computes it: the stored row of the unquantized layer
            # ("cached"), or the quantized weights on the unquantized input ("float").
            if self.bos_mode == "cached":
                head = self.bos_output.to(x.dtype).expand(x.shape[0], 1, -1)
            else:
                head = F.linear(x[:, :1], self.float_weight(x.dtype), self.inner.bias)
            return torch.cat([head, self.simulate(x[:, 1:], -1, F.linear)], dim=1)
        return self.simulate(x, -1, F.linear)


class FakeQuantConv2d(FakeQuantLayer):
    kind = "conv2d"

    def forward(self, x):
        conv = self.inner
        return self.simulate(x, 1, lambda inp, w, b: F.conv2d(inp, w, b, conv.stride, conv.padding))
