"""The oneDNN CPU backend against the exact torch reference: integer accumulation bit for bit, outputs
within the output dtype's rounding (bit for bit for 4/2-bit weights, whose epilogue is the
reference's), weights laid out once, packed weights staying packed (torch.compile: tests/test_compile.py).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from mixq.kernels import dispatch
from mixq.kernels import fallback, onednn, reference
from mixq.kernels.onednn import CpuBackendFallbackWarning
from mixq.modules import QConv2d, QLinear, QuantizedLayer, conv_weight_as_matrix
from mixq.quantizers import activation_qparams, pack_weight, quantize_weight, weight_row_sums
from tests.conftest import capture_unet_call, unet_output

needs_onednn = pytest.mark.skipif(onednn.unavailable_reason() is not None,
                                  reason=f"oneDNN int8 kernels unavailable: {onednn.unavailable_reason()}")
pytestmark = needs_onednn

BITS = [(w, a) for w in (8, 4, 2) for a in (8, 4)]
DTYPES = (torch.float32, torch.bfloat16)


def activations(shape, dtype, seed=0):
    # An offset (a zero point far from 0) and outliers that saturate at both ends.
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2 + 0.5
    x.view(-1)[::17] *= 8
    return x.to(dtype)


def integer_layer(weight_matrix, x, w_bits, a_bits, dtype, unit_scales=False):
    q, w_scale = quantize_weight(weight_matrix, w_bits)
    scale, zero = activation_qparams(float(x.min()) / 2, float(x.max()) / 2, a_bits)
    if unit_scales:  # the output is then f32(acc - z * w_sum): the integer accumulation itself
        w_scale, scale = torch.ones_like(w_scale), 1.0
    return dict(qweight=pack_weight(q, w_bits), w_bits=w_bits, w_scale=w_scale, w_sum=weight_row_sums(q),
                x_scale=torch.tensor(scale), x_zero=torch.tensor(float(zero)), a_bits=a_bits,
                bias=None if unit_scales else torch.randn(weight_matrix.shape[0]).to(dtype))


def assert_within_rounding(y, expected):
    """Equal up to the output dtype's rounding: the fused epilogue rounds in oneDNN's order."""
    assert y.dtype == expected.dtype and y.shape == expected.shape and y.stride() == expected.stride()
    eps = torch.finfo(y.dtype).eps
    torch.testing.assert_close(y.float(), expected.float(), rtol=eps, atol=eps * float(expected.abs().max()))


def assert_matches(y, expected, w_bits):
    if w_bits == 8:
        assert_within_rounding(y, expected)
    else:
        assert y.stride() == expected.stride()
        assert torch.equal(y, expected)


# --- linear --------------------------------------------------------------------------------------


@pytest.mark.parametrize("w_bits,a_bits", BITS)
# K not a multiple of 4 / 64 (low-bit weights then fall back to the reference), and multiples of 4.
@pytest.mark.parametrize("m,k,n", [(1, 5, 3), (7, 37, 24), (33, 130, 70), (1, 8, 3), (33, 136, 70)])
def test_linear_accumulates_exactly(w_bits, a_bits, m, k, n):
    x = activations((m, k), torch.float32)
    layer = integer_layer(torch.randn(n, k), x, w_bits, a_bits, torch.float32, unit_scales=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CpuBackendFallbackWarning)
        y = onednn.quantized_linear(x, **layer)
    assert torch.equal(y, reference.quantized_linear(x, **layer))


@pytest.mark.parametrize("w_bits,a_bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES + (torch.float16,))
def test_linear_matches_reference(w_bits, a_bits, dtype):
    x = activations((19, 44), dtype)
    layer = integer_layer(torch.randn(40, 44), x, w_bits, a_bits, dtype)
    assert_matches(onednn.quantized_linear(x, **layer), reference.quantized_linear(x, **layer), w_bits)


# --- conv ----------------------------------------------------------------------------------------

CONV_GEOMETRIES = [  # (kernel, stride, padding)
    ((3, 3), (1, 1), (1, 1)),
    ((3, 3), (2, 2), (1, 1)),
    ((1, 1), (1, 1), (0, 0)),
]


def conv_layer(c, n, kernel, x, w_bits, a_bits, dtype, unit_scales=False):
    weight = torch.randn(n, c, *kernel)
    return integer_layer(conv_weight_as_matrix(weight), x, w_bits, a_bits, dtype, unit_scales)


@pytest.mark.parametrize("w_bits,a_bits", BITS)
@pytest.mark.parametrize("kernel,stride,padding", CONV_GEOMETRIES)
@pytest.mark.parametrize("channels", [5, 12])  # 5: low-bit weights fall back to the reference (odd width)
def test_conv_accumulates_exactly(w_bits, a_bits, kernel, stride, padding, channels):
    x = activations((2, channels, 7, 6), torch.float32)
    layer = conv_layer(channels, 12, kernel, x, w_bits, a_bits, torch.float32, unit_scales=True)
    geometry = dict(kernel_size=kernel, stride=stride, padding=padding)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CpuBackendFallbackWarning)
        y = onednn.quantized_conv2d(x, **layer, **geometry)
    assert torch.equal(y, reference.quantized_conv2d(x, **layer, **geometry))


@pytest.mark.parametrize("w_bits,a_bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("kernel,stride,padding", CONV_GEOMETRIES[:2])
def test_conv_matches_reference(w_bits, a_bits, dtype, channels_last, kernel, stride, padding):
    x = activations((3, 16, 9, 8), dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    layer = conv_layer(16, 24, kernel, x, w_bits, a_bits, dtype)
    geometry = dict(kernel_size=kernel, stride=stride, padding=padding)
    assert_matches(onednn.quantized_conv2d(x, **layer, **geometry), reference.quantized_conv2d(x, **layer, **geometry),
                   w_bits)


@pytest.mark.parametrize("w_bits", (8, 4))
@pytest.mark.parametrize("dtype", DTYPES)
def test_split_conv_shortcut_matches_reference(w_bits, dtype, monkeypatch):
    """An up-block conv_shortcut: two input parts with their own activation parameters."""
    torch.manual_seed(0)
    conv = nn.Conv2d(24, 16, 1).to(dtype)
    x = torch.cat([activations((2, 10, 6, 6), dtype, seed=1), activations((2, 14, 6, 6), dtype, seed=2) * 5], dim=1)
    layer = QConv2d.from_float(conv, w_bits, 8, lows=(-4.0, -30.0), highs=(5.0, 35.0), split_at=10)
    monkeypatch.setenv("MIXQ_BACKEND", "torch")
    expected = layer(x)
    monkeypatch.setenv("MIXQ_BACKEND", "onednn")
    assert_matches(layer(x), expected, w_bits)


# --- dispatch and fallback -----------------------------------------------------------------------


def test_auto_selects_onednn_on_x86(monkeypatch):
    monkeypatch.delenv("MIXQ_BACKEND", raising=False)
    assert dispatch.selected_backend(torch.zeros(1)) == "onednn"
    monkeypatch.setenv("MIXQ_BACKEND", "torch")
    assert dispatch.selected_backend(torch.zeros(1)) == "torch"


@pytest.mark.parametrize("choice", ["auto", "onednn"])
def test_falls_back_to_reference_with_a_warning(choice, monkeypatch):
    monkeypatch.setenv("MIXQ_BACKEND", choice)
    monkeypatch.setattr(onednn, "_availability", ["not an x86 CPU (riscv64)"])
    monkeypatch.setattr(fallback, "_warned", set())
    x = activations((4, 8), torch.float32)
    layer = integer_layer(torch.randn(6, 8), x, 8, 8, torch.float32)
    with pytest.warns(CpuBackendFallbackWarning, match="riscv64"):
        y = dispatch.quantized_linear(x, **layer)
    assert torch.equal(y, reference.quantized_linear(x, **layer))


def test_unknown_backend_is_a_clear_error(monkeypatch):
    from mixq.errors import ConfigError

    monkeypatch.setenv("MIXQ_BACKEND", "amx")
    with pytest.raises(ConfigError, match="MIXQ_BACKEND"):
        dispatch.selected_backend(torch.zeros(1))


# --- weight layouts ------------------------------------------------------------------------------


@pytest.mark.usefixtures("int8_on_onednn")
def test_weights_are_laid_out_once(monkeypatch):
    monkeypatch.setenv("MIXQ_BACKEND", "onednn")
    calls = []
    real = onednn._prepack_linear
    monkeypatch.setattr(onednn, "_prepack_linear", lambda w: calls.append(w.shape) or real(w))
    layer = QLinear.from_float(nn.Linear(32, 16), 8, 8, lows=(-3.0,), highs=(3.0,))
    dispatch.prepare_layer(layer)
    x = torch.randn(5, 32)
    first = layer(x)
    assert torch.equal(layer(x), first)
    assert calls == [(16, 32)]
    layer.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()})  # new values: laid out again
    layer(x)
    assert len(calls) == 2


def test_layouts_go_with_their_layer():
    """A plain 8-bit buffer that reaches the ops unprepared gets its layout on first use, dropped with it."""
    qweight = torch.randint(-128, 128, (16, 32), dtype=torch.int8)
    before = len(onednn.packed_weights)
    onednn.linear_layout(qweight)
    assert len(onednn.packed_weights) == before + 1
    del qweight
    assert len(onednn.packed_weights) == before


# --- 8-bit weights held once, in oneDNN's layout -------------------------------------------------


@pytest.fixture
def int8_on_onednn(monkeypatch):
    """8-bit weights on oneDNN's kernels, whatever the CPU (by default convolutions run on the fused GEMM
    where there is no AMX; tests/test_packed_gemm.py)."""
    monkeypatch.setenv("MIXQ_INT8_GEMM", "onednn")


def held_layers(dtype=torch.float32):
    """A prepared 8-bit linear, convolution and split convolution, with inputs, and unprepared twins."""
    torch.manual_seed(0)
    floats = {
        "linear": (nn.Linear(32, 24), dict(lows=(-3.0,), highs=(3.0,)), activations((5, 32), dtype)),
        "conv": (nn.Conv2d(16, 24, 3, stride=2, padding=1), dict(lows=(-3.0,), highs=(3.0,)),
                 activations((2, 16, 9, 8), dtype)),
        "split": (nn.Conv2d(24, 16, 1), dict(lows=(-3.0, -1.0), highs=(3.0, 2.0), split_at=16),
                  activations((2, 24, 5, 6), dtype)),
    }
    cases = {}
    for name, (float_layer, ranges, x) in floats.items():
        build = QLinear.from_float if name == "linear" else QConv2d.from_float
        held, plain = (build(float_layer.to(dtype), 8, 8, **ranges) for _ in range(2))
        dispatch.prepare_layer(held)
        cases[name] = (held, plain, x)
    return cases


def int8_weight_bytes(layer) -> int:
    return sum(layer.out_features * layer.kernel_size[0] * layer.kernel_size[1] * size for size in layer.part_sizes)


@pytest.mark.usefixtures("int8_on_onednn")
@pytest.mark.parametrize("case", ("linear", "conv", "split"))
def test_8_bit_weights_are_held_once(case):
    from benchmarks.measure import module_bytes

    held, plain, x = held_layers()[case]
    names = [f"qweight_{p}" for p in range(len(held.part_sizes))]
    assert all(held._buffers[name] is None for name in names)  # no plain copy beside the layout
    assert all(held.kernel_weight(p).is_mkldnn for p in range(len(names)))
    # The layer's bytes: the layout (one byte per weight) instead of the plain buffer, not beside it.
    assert held.state_bytes() == plain.state_bytes()
    assert module_bytes(held) == module_bytes(plain)  # the benchmarks' memory tables count the layout
    assert int8_weight_bytes(held) <= held.state_bytes() < 1.05 * int8_weight_bytes(held) + 4096
    for name in names:  # the plain codes come back exactly
        assert torch.equal(getattr(held, name), getattr(plain, name))
    assert list(held.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in held.state_dict().items())
    assert torch.equal(held(x), plain(x))  # the same oneDNN kernels, on the same layout


@pytest.mark.usefixtures("int8_on_onednn")
@pytest.mark.parametrize("case", ("linear", "conv", "split"))
def test_held_weights_follow_loads_copies_and_moves(case, tmp_path):
    import copy
    import pickle

    held, plain, x = held_layers()[case]
    expected = plain(x)
    for copied in (copy.deepcopy(held), pickle.loads(pickle.dumps(held))):
        assert copied.kernel_weight(0).is_mkldnn and torch.equal(copied(x), expected)
    # New values through load_state_dict are laid out again (and still held once).
    other = held_layers()[case][0]
    with torch.no_grad():
        for p in range(len(plain.part_sizes)):
            getattr(plain, f"qweight_{p}").neg_()
    other.load_state_dict(plain.state_dict())
    assert other.kernel_weight(0).is_mkldnn and torch.equal(other(x), plain(x))
    # A cast of the float buffers keeps the layout; a move elsewhere takes the plain buffers along.
    assert held.to(torch.bfloat16).kernel_weight(0).is_mkldnn
    moved = copy.deepcopy(plain).to("meta")
    held.to("meta")
    assert held._kernel_layouts == {} and held.qweight_0.is_meta and held.qweight_0.shape == moved.qweight_0.shape


@pytest.mark.usefixtures("int8_on_onednn")
@pytest.mark.parametrize("case", ("linear", "conv", "split"))
def test_held_weights_serve_the_reference_backend_exactly(case, monkeypatch):
    held, plain, x = held_layers()[case]
    monkeypatch.setenv("MIXQ_BACKEND", "torch")
    assert torch.equal(held(x), plain(x))


@pytest.mark.usefixtures("int8_on_onednn")
def test_requantizing_a_held_layer_lays_out_the_new_weights():
    held, plain, x = held_layers()["linear"]
    weight = torch.randn(24, 32)
    held.load_float_weight(weight, None)
    plain.load_float_weight(weight, None)
    assert held.kernel_weight(0).is_mkldnn
    assert torch.equal(held.qweight_0, plain.qweight_0) and torch.equal(held(x), plain(x))


@pytest.mark.parametrize("w_bits", (4, 2))
def test_low_bit_weights_stay_packed(w_bits):
    layer = QLinear.from_float(nn.Linear(64, 16), w_bits, 8, lows=(-3.0,), highs=(3.0,))
    before = len(onednn.packed_weights)
    dispatch.prepare_layer(layer)
    layer(torch.randn(3, 64))
    assert len(onednn.packed_weights) == before  # nothing unpacked is kept
    assert layer.qweight_0.numel() == 16 * 64 * w_bits // 8


# --- the "int8" CPU weight mode: 4/2-bit weights unpacked once into oneDNN's layout ---------------


@pytest.mark.parametrize("w_bits,a_bits", [(4, 8), (2, 8), (4, 4)])
@pytest.mark.parametrize("k", [44, 37])  # 37: no multiple of the values per byte, which "packed" cannot run
def test_int8_mode_linear_accumulates_exactly(w_bits, a_bits, k):
    x = activations((19, k), torch.float32)
    layer = integer_layer(torch.randn(40, k), x, w_bits, a_bits, torch.float32, unit_scales=True)
    onednn.prepare(layer["qweight"], w_bits, layer["w_scale"], "linear", k, cpu_weights="int8")
    assert onednn.linear_layout(layer["qweight"], w_bits, k, only_if_prepared=True) is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error", CpuBackendFallbackWarning)  # no fallback at any width
        y = onednn.quantized_linear(x, **layer)
    assert torch.equal(y, reference.quantized_linear(x, **layer))


@pytest.mark.parametrize("w_bits", (4, 2))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel,stride,padding", CONV_GEOMETRIES[:2])
def test_int8_mode_matches_reference(w_bits, dtype, kernel, stride, padding):
    x = activations((3, 16, 9, 8), dtype)
    layer = conv_layer(16, 24, kernel, x, w_bits, 8, dtype)
    onednn.prepare(layer["qweight"], w_bits, layer["w_scale"], "conv2d", 16, kernel, stride, padding, cpu_weights="int8")
    geometry = dict(kernel_size=kernel, stride=stride, padding=padding)
    # the 8-bit path's guarantee: the integer sums exact, the fused epilogue within the dtype's rounding
    assert_within_rounding(onednn.quantized_conv2d(x, **layer, **geometry),
                           reference.quantized_conv2d(x, **layer, **geometry))
    x = activations((1, 16, 7, 6), torch.float32)
    exact = conv_layer(16, 24, kernel, x, w_bits, 8, torch.float32, unit_scales=True)
    onednn.prepare(exact["qweight"], w_bits, exact["w_scale"], "conv2d", 16, kernel, stride, padding, cpu_weights="int8")
    assert torch.equal(onednn.quantized_conv2d(x, **exact, **geometry), reference.quantized_conv2d(x, **exact, **geometry))


def prepared_layouts(unet) -> list:
    """Each quantized layer part's oneDNN layout, or None where none was made (a packed 4/2-bit weight)."""
    from mixq.layers import find_quantized_layers

    layouts = []
    for name in find_quantized_layers(unet):
        layer = unet.get_submodule(name)
        for p, size in enumerate(layer.part_sizes):
            qweight = layer.kernel_weight(p)
            if qweight.is_mkldnn:  # an 8-bit weight, held in its layout
                layouts.append(qweight)
                continue
            layouts.append(onednn.linear_layout(qweight, layer.w_bits, layer.in_features, only_if_prepared=True)
                           if layer.kind == "linear" else
                           onednn.conv_layout(qweight, layer.w_scale, size, layer.kernel_size, layer.stride,
                                              layer.padding, layer.w_bits, only_if_prepared=True))
    return layouts


def layer_inputs(unet, call) -> dict:
    """Each quantized layer's input during one UNet call."""
    inputs, handles = {}, []

    def keep_first(name, args):
        inputs.setdefault(name, args[0].detach().clone())  # (a hook that returns something replaces the output)

    for name, module in unet.named_modules():
        if isinstance(module, QuantizedLayer):
            handles.append(module.register_forward_pre_hook(lambda m, args, name=name: keep_first(name, args)))
    try:
        unet_output(unet, call)
    finally:
        for handle in handles:
            handle.remove()
    return inputs


def test_int8_mode_through_quantize_and_load(_tiny_sdxl_master, tmp_path):
    """cpu_weights="int8" lays out every 4-bit layer at quantize / load time (one int8 copy each); the
    default keeps them packed; every layer agrees with its packed twin on the same input within the
    float epilogue's rounding (oneDNN scales its exact integer sums in another order than the packed
    path), so whole-UNet outputs agree far above the 4-bit noise."""
    import copy

    import mixq
    from mixq.errors import ConfigError

    quick = dict(progress=False, num_prompts=2, num_inference_steps=1, guidance_scale=0.0)
    calibration = mixq.calibrate_ranges(_tiny_sdxl_master, **quick)
    packed = mixq.quantize(copy.deepcopy(_tiny_sdxl_master), 4, 8, calibration=calibration)
    unpacked = mixq.quantize(copy.deepcopy(_tiny_sdxl_master), 4, 8, calibration=calibration, cpu_weights="int8")
    packed_layouts, unpacked_layouts = prepared_layouts(packed.unet), prepared_layouts(unpacked.unet)
    assert packed_layouts and all(layout is None for layout in packed_layouts)
    assert len(unpacked_layouts) == len(packed_layouts) and all(layout is not None for layout in unpacked_layouts)
    call = capture_unet_call(_tiny_sdxl_master)
    inputs = layer_inputs(packed.unet, call)
    for name, x in inputs.items():
        expected = packed.unet.get_submodule(name)(x)
        torch.testing.assert_close(unpacked.unet.get_submodule(name)(x), expected, rtol=1e-5,
                                   atol=1e-6 * float(expected.abs().max()), msg=name)
    # Through the whole UNet an ulp can move an activation code by one, so outputs agree closely, not
    # bit for bit (seen: 35 dB on an AVX512-VNNI EPYC; the 4-bit noise against float is ~15 dB).
    y = unet_output(unpacked.unet, call)
    agreement = mixq.sqnr_db(unet_output(packed.unet, call), y)
    noise = mixq.sqnr_db(unet_output(_tiny_sdxl_master.unet, call), y)  # quantized, not float
    assert agreement >= 30 and agreement >= noise + 10, (agreement, noise)
    mixq.save_quantized(unpacked, tmp_path)
    loaded = mixq.load_quantized(copy.deepcopy(_tiny_sdxl_master), tmp_path, cpu_weights="int8")
    assert all(layout is not None for layout in prepared_layouts(loaded.unet))
    assert torch.equal(unet_output(loaded.unet, call), y)
    with pytest.raises(ConfigError, match="cpu_weights='int4'"):
        mixq.quantize(copy.deepcopy(_tiny_sdxl_master), 4, 8, calibration=calibration, cpu_weights="int4")


@pytest.mark.parametrize("bits,k", [(4, 8), (4, 64), (2, 8), (2, 132)])
def test_lane_major_unpacking_keeps_every_dot_product(bits, k):
    qmax = 2 ** (bits - 1) - 1
    q = torch.randint(-qmax - 1, qmax + 1, (9, k), dtype=torch.int8)
    packed = pack_weight(q, bits)
    per_byte = 8 // bits
    unpacked = onednn.unpack_lane_major(packed, bits)
    # The same codes, K reordered the way lane_major reorders the activations.
    assert torch.equal(unpacked, onednn.lane_major(q, per_byte))
    x = torch.randint(-128, 128, (5, k), dtype=torch.int8)
    assert torch.equal(onednn.int_matmul_transposed(onednn.lane_major(x, per_byte), unpacked),
                       reference.int_matmul(x, q))


@pytest.mark.parametrize("bits,k", [(4, 7), (2, 130)])
def test_low_bit_odd_widths_run_on_the_reference_with_a_warning(bits, k, monkeypatch):
    monkeypatch.setattr(fallback, "_warned", set())
    x = activations((3, k), torch.float32)
    layer = integer_layer(torch.randn(6, k), x, bits, 8, torch.float32)
    with pytest.warns(CpuBackendFallbackWarning, match=f"{k} inputs"):
        y = onednn.quantized_linear(x, **layer)
    assert torch.equal(y, reference.quantized_linear(x, **layer))


# --- torch.compile -------------------------------------------------------------------------------


class SmallQuantizedModel(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.conv = QConv2d.from_float(nn.Conv2d(8, 16, 3, stride=2, padding=1).to(dtype), 8, 8, (-3.0,), (3.0,))
        self.shortcut = QConv2d.from_float(nn.Conv2d(24, 16, 1).to(dtype), 4, 8, (-3.0, -1.0), (3.0, 2.0), split_at=16)
        self.linear = QLinear.from_float(nn.Linear(16, 32).to(dtype), 8, 8, (-5.0,), (5.0,))
        self.low_bit = QLinear.from_float(nn.Linear(32, 16).to(dtype), 2, 4, (-5.0,), (5.0,))

    def forward(self, x):
        h = torch.nn.functional.silu(self.conv(x))
        h = self.shortcut(torch.cat([h, x[:, :, ::2, ::2]], dim=1))
        tokens = h.flatten(2).transpose(1, 2)
        return self.low_bit(torch.relu(self.linear(tokens)))


def small_input(dtype):
    x = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(3)) * 2
    return torch.cat([x, x], dim=1)[:, :8].to(dtype)


TIE_SCALE = torch.tensor(0.0312345)


def tie_activations(dtype, channels_last):
    """[2, 3, 16, 17] activations whose first values divide by TIE_SCALE to a .5 tie or its neighbours."""
    near = (torch.arange(-100, 100, dtype=torch.float32) + 0.5) * TIE_SCALE
    ties = torch.cat([near, torch.nextafter(near, near + 1), torch.nextafter(near, near - 1)])
    rest = activations((2 * 3 * 16 * 17,), torch.float32)[:2 * 3 * 16 * 17 - ties.numel()]
    x = torch.cat([ties, rest]).reshape(2, 3, 16, 17).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("a_bits", [4, 8])
def test_activation_codes_are_the_references_in_every_chunk(dtype, channels_last, a_bits, monkeypatch):
    """The chunked quantization (fp32 inputs divided straight into the scratch, others copied first) gives
    the reference's codes bit for bit, also at exact rounding ties and across chunk borders."""
    monkeypatch.setattr(onednn, "QUANTIZE_CHUNK", 1000)  # several chunks, the last one partial
    monkeypatch.setenv("MIXQ_NATIVE", "0")  # the torch ops (the native pass: tests/test_native.py)
    x, zero = tie_activations(dtype, channels_last), torch.tensor(3.0)
    expected = reference.quantize_input(x, TIE_SCALE, zero, a_bits)
    assert torch.equal(onednn.quantize_input_signed(x, TIE_SCALE, zero, a_bits), expected)
    assert torch.equal(onednn.quantize_input_unsigned(x, TIE_SCALE, zero, a_bits).to(torch.int16) - 128,
                       expected.to(torch.int16))


def test_reused_codes_buffer_serves_each_call_in_turn():
    """The kernels' codes go into one per-thread buffer (no page faults on large activations): each call
    gets the codes of its own input, in its memory format, and the buffer grows to the largest."""
    zero = torch.tensor(3.0)
    small, large = activations((4, 8, 5, 5), torch.float32), activations((2, 8, 16, 16), torch.bfloat16)
    for x in (large, small.contiguous(memory_format=torch.channels_last), small):
        codes = onednn.quantize_input_unsigned(x, TIE_SCALE, zero, 8, reuse=True)
        assert torch.equal(codes, onednn.quantize_input_unsigned(x, TIE_SCALE, zero, 8))
        assert codes.stride() == x.stride()
        assert codes.untyped_storage().data_ptr() == onednn.codes_scratch(1, torch.uint8).data_ptr()
