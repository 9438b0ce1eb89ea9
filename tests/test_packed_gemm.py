"""The fused GEMM of packed 4/2-bit weights, and of 8-bit ones where it serves them (kernels/packed_gemm.c),
against the exact torch reference: bit for bit through the CPU backend's entry points, on shapes that
reach every tail (rows past a 6-row tile, columns past a 64-column block, two k blocks, k blocks that end
inside a convolution's tap), with the fallbacks where it cannot run, and the choice of GEMM for 8-bit
weights (MIXQ_INT8_GEMM)."""

from __future__ import annotations

import warnings

import pytest
import torch

from mixq.errors import ConfigError
from mixq.kernels import fallback, native, onednn, reference
from mixq.kernels.onednn import CpuBackendFallbackWarning
from tests.test_cpu_backend import activations, conv_layer, integer_layer

needs_fused_gemm = pytest.mark.skipif(
    onednn.unavailable_reason() is not None or native.packed_gemm_unavailable_reason() is not None,
    reason=f"the fused packed GEMM cannot run here: {onednn.unavailable_reason() or native.packed_gemm_unavailable_reason()}")


@pytest.fixture
def fused_calls(monkeypatch):
    """How many calls reached the fused GEMM."""
    calls = []
    for name in ("packed_gemm", "packed_conv"):  # (a matrix; a convolution read in place)
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *args, real=real, **kwargs: calls.append(1) or real(*args, **kwargs))
    return calls


@pytest.fixture
def int8_on_fused_gemm(monkeypatch):
    monkeypatch.setenv("MIXQ_INT8_GEMM", "mixq")


@needs_fused_gemm
@pytest.mark.usefixtures("int8_on_fused_gemm")
@pytest.mark.parametrize("w_bits,a_bits", [(8, 8), (4, 8), (2, 8), (4, 4)])
@pytest.mark.parametrize("m,k,n", [(1, 4, 3), (6, 64, 64), (13, 136, 70), (50, 2048 + 132, 130), (7, 4100, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_linear_is_the_reference_bit_for_bit(w_bits, a_bits, m, k, n, dtype, fused_calls):
    x = activations((m, k), dtype, seed=m + k)
    layer = integer_layer(torch.randn(n, k), x, w_bits, a_bits, dtype)
    y = onednn.quantized_linear(x, **layer)
    assert fused_calls == [1]
    expected = reference.quantized_linear(x, **layer)
    assert y.dtype == expected.dtype and y.stride() == expected.stride() and torch.equal(y, expected)


@needs_fused_gemm
def test_fused_linear_takes_a_strided_input(fused_calls):
    x = activations((72, 24), torch.bfloat16).t()  # [24, 72] with strides (1, 24): a transposed view
    layer = integer_layer(torch.randn(40, 72), x, 4, 8, torch.bfloat16)
    y = onednn.quantized_linear(x, **layer)
    assert fused_calls == [1] and torch.equal(y, reference.quantized_linear(x, **layer))


@needs_fused_gemm
def test_fused_linear_without_bias_accumulates_exactly(fused_calls):
    """Unit scales and no bias: the output is f32(acc - z * w_sum) itself, so any error in a sum shows."""
    x = activations((19, 260), torch.float32)
    layer = integer_layer(torch.randn(40, 260), x, 4, 8, torch.float32, unit_scales=True)
    assert layer["bias"] is None
    y = onednn.quantized_linear(x, **layer)
    assert fused_calls == [1] and torch.equal(y, reference.quantized_linear(x, **layer))


@needs_fused_gemm
@pytest.mark.usefixtures("int8_on_fused_gemm")
@pytest.mark.parametrize("w_bits", [8, 4, 2])
@pytest.mark.parametrize("kernel,stride,padding", [((3, 3), (1, 1), (1, 1)), ((3, 3), (2, 2), (1, 1)),
                                                   ((1, 1), (1, 1), (0, 0))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_conv_is_the_reference_bit_for_bit(w_bits, kernel, stride, padding, channels_last, fused_calls):
    x = activations((2, 20, 9, 7), torch.bfloat16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    layer = conv_layer(20, 72, kernel, x, w_bits, 8, torch.bfloat16)
    geometry = dict(kernel_size=kernel, stride=stride, padding=padding)
    y = onednn.quantized_conv2d(x, **layer, **geometry)
    assert fused_calls == [1]
    expected = reference.quantized_conv2d(x, **layer, **geometry)
    assert y.stride() == expected.stride() and torch.equal(y, expected)


@needs_fused_gemm
@pytest.mark.usefixtures("int8_on_fused_gemm")
@pytest.mark.parametrize("channels", [1000, 2400])  # k blocks of 2048 end inside a tap; a tap wider than a block
@pytest.mark.parametrize("stride", [(1, 1), (2, 2)])
@pytest.mark.parametrize("w_bits", [8, 4])
def test_fused_conv_with_k_blocks_across_taps(channels, stride, w_bits, fused_calls):
    x = activations((2, channels, 5, 4), torch.bfloat16).contiguous(memory_format=torch.channels_last)
    layer = conv_layer(channels, 24, (3, 3), x, w_bits, 8, torch.bfloat16)
    geometry = dict(kernel_size=(3, 3), stride=stride, padding=(1, 1))
    y = onednn.quantized_conv2d(x, **layer, **geometry)
    assert fused_calls == [1] and torch.equal(y, reference.quantized_conv2d(x, **layer, **geometry))


@needs_fused_gemm
def test_two_threads_and_one_give_the_same_output():
    x = activations((96, 1280), torch.bfloat16)
    layer = integer_layer(torch.randn(320, 1280), x, 4, 8, torch.bfloat16)  # 5 column blocks: split by rows
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = onednn.quantized_linear(x, **layer)
        torch.set_num_threads(2)
        two = onednn.quantized_linear(x, **layer)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two) and torch.equal(one, reference.quantized_linear(x, **layer))


def test_turned_off_it_unpacks_per_call_with_the_same_result(monkeypatch, fused_calls):
    x = activations((9, 64), torch.bfloat16)
    layer = integer_layer(torch.randn(24, 64), x, 4, 8, torch.bfloat16)
    monkeypatch.setenv("MIXQ_PACKED_GEMM", "0")
    assert native.packed_gemm_unavailable_reason() == "MIXQ_PACKED_GEMM=0"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # turned off on purpose: no warning
        y = onednn.quantized_linear(x, **layer)
    assert fused_calls == [] and torch.equal(y, reference.quantized_linear(x, **layer))


@pytest.mark.skipif(native.unavailable_reason() is not None, reason="the native library cannot be built here")
def test_a_cpu_without_it_warns_once_and_unpacks(monkeypatch):
    monkeypatch.setattr(native, "_state", {**native._state, "gemm": None, "gemm_reason": "this CPU has no AVX512-VNNI"})
    monkeypatch.setattr(fallback, "_warned", set())
    x = activations((9, 64), torch.float32)
    layer = integer_layer(torch.randn(24, 64), x, 2, 8, torch.float32)
    with pytest.warns(native.PackedGemmFallbackWarning, match="no AVX512-VNNI"):
        y = onednn.quantized_linear(x, **layer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", native.PackedGemmFallbackWarning)
        assert torch.equal(onednn.quantized_linear(x, **layer), y)  # no second warning
    assert torch.equal(y, reference.quantized_linear(x, **layer))


def test_the_self_check_catches_a_wrong_build():
    """A build whose sums are off (here: one that writes nothing) is refused with the reason."""
    assert "differ from the torch reference" in native._packed_gemm_self_check(lambda *args: 0)
    assert "could not allocate" in native._packed_gemm_self_check(lambda *args: 1)


def test_k_not_a_multiple_of_4_takes_the_unpacking_path(fused_calls):
    x = activations((3, 6), torch.float32)  # K = 6: whole bytes of 4-bit weights, but not whole dwords
    layer = integer_layer(torch.randn(5, 6), x, 4, 8, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CpuBackendFallbackWarning)  # not the reference: no warning
        y = onednn.quantized_linear(x, **layer)
    assert fused_calls == [] and torch.equal(y, reference.quantized_linear(x, **layer))


def test_the_report_runs_weights_as_served_where_the_fused_gemm_runs(monkeypatch):
    from mixq.calib.content import content_cpu_weights
    from mixq.calib.report import WEIGHT_MODE_SENTENCES

    expected = "packed" if native.packed_gemm_unavailable_reason() is None else "int8"
    assert content_cpu_weights() == expected
    monkeypatch.setenv("MIXQ_PACKED_GEMM", "0")  # no fused GEMM: unpacked once to int8, not per call
    assert content_cpu_weights() == "int8"
    assert set(WEIGHT_MODE_SENTENCES) == {"packed", "int8"}


# --- which GEMM runs 8-bit weights ---------------------------------------------------------------


@needs_fused_gemm
@pytest.mark.parametrize("amx", [False, True])
def test_8_bit_convolutions_and_small_linear_layers_run_fused_by_default(amx, monkeypatch, fused_calls):
    """MIXQ_INT8_GEMM unset: convolutions and linear layers of at most INT8_FUSED_LINEAR_WEIGHTS weights on
    the fused GEMM (bit for bit the reference), larger linear layers on oneDNN; everything on oneDNN where
    the CPU has AMX."""
    monkeypatch.delenv("MIXQ_INT8_GEMM", raising=False)
    monkeypatch.setattr(onednn, "cpu_has_amx", lambda: amx)
    x = activations((2, 20, 9, 7), torch.float32)
    conv = conv_layer(20, 24, (3, 3), x, 8, 8, torch.float32)
    geometry = dict(kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
    y = onednn.quantized_conv2d(x, **conv, **geometry)
    expected = reference.quantized_conv2d(x, **conv, **geometry)
    assert torch.equal(y, expected) if not amx else torch.allclose(y, expected, rtol=1e-5, atol=1e-5)
    small_k, large_k = 64, 1024
    large_n = onednn.INT8_FUSED_LINEAR_WEIGHTS // large_k + 8
    for k, n in ((small_k, 24), (large_k, large_n)):
        tokens = activations((3, k), torch.float32)
        onednn.quantized_linear(tokens, **integer_layer(torch.randn(n, k), tokens, 8, 8, torch.float32))
    assert fused_calls == ([] if amx else [1, 1])  # the convolution and the small linear layer


@needs_fused_gemm
def test_an_8_bit_convolution_on_the_fused_gemm_holds_its_plain_buffer_alone(monkeypatch):
    """Prepared for the fused GEMM, an 8-bit convolution keeps no oneDNN layout (held or beside it): its bytes
    are its int8 weights plus scales, and its output the reference's."""
    from torch import nn

    from mixq.kernels import dispatch
    from mixq.modules import QConv2d

    monkeypatch.delenv("MIXQ_INT8_GEMM", raising=False)
    monkeypatch.setattr(onednn, "cpu_has_amx", lambda: False)
    layer = QConv2d.from_float(nn.Conv2d(32, 48, 3, padding=1), 8, 8, lows=(-3.0,), highs=(3.0,))
    before = len(onednn.packed_weights)
    dispatch.prepare_layer(layer)
    x = activations((2, 32, 6, 5), torch.float32)
    y = layer(x)
    assert layer._kernel_layouts == {} and layer._buffers["qweight_0"].dtype == torch.int8
    assert len(onednn.packed_weights) == before  # no layout built beside the buffer either
    assert layer.state_bytes() < 48 * 32 * 9 + 4096
    monkeypatch.setenv("MIXQ_BACKEND", "torch")
    assert torch.equal(y, layer(x))


def test_a_wrong_int8_gemm_choice_is_refused_with_the_choices(monkeypatch):
    monkeypatch.setenv("MIXQ_INT8_GEMM", "amx")
    x = activations((3, 8), torch.float32)
    with pytest.raises(ConfigError, match="MIXQ_INT8_GEMM='amx' is not one of .*mixq.*onednn"):
        onednn.quantized_linear(x, **integer_layer(torch.randn(4, 8), x, 8, 8, torch.float32))


@needs_fused_gemm
def test_a_large_8_bit_convolution_runs_fused_on_small_images_and_on_onednn_from_its_first_large_one(
        monkeypatch, fused_calls):
    """MIXQ_INT8_GEMM unset, no AMX: a convolution of more than INT8_FUSED_CONV_WEIGHTS weights runs on the
    fused GEMM from its plain buffer while called on up to INT8_FUSED_CONV_ROWS output positions; its first
    call on more makes it hold oneDNN's layout instead (still one copy), on which it runs from then on."""
    from torch import nn

    from mixq.kernels import dispatch
    from mixq.modules import QConv2d

    monkeypatch.delenv("MIXQ_INT8_GEMM", raising=False)
    monkeypatch.setattr(onednn, "cpu_has_amx", lambda: False)
    monkeypatch.setattr(onednn, "INT8_FUSED_CONV_ROWS", 2048)
    torch.manual_seed(0)
    layer = QConv2d.from_float(nn.Conv2d(64, 128, 3, padding=1), 8, 8, lows=(-3.0,), highs=(3.0,))
    assert 128 * 64 * 9 > onednn.INT8_FUSED_CONV_WEIGHTS
    dispatch.prepare_layer(layer)
    before = len(onednn.packed_weights)
    small = activations((2, 64, 16, 16), torch.float32)  # 512 output positions
    large = activations((1, 64, 48, 48), torch.float32)  # 2304 > INT8_FUSED_CONV_ROWS
    with monkeypatch.context() as m:
        m.setenv("MIXQ_PREPARED_CALLS", "0")  # (the general path's kernel calls are the ones counted)
        y_small = layer(small)
    assert fused_calls == [1] and layer._kernel_layouts == {}
    assert torch.equal(layer(small), y_small)  # the prepared call: the same kernel
    with monkeypatch.context() as m:
        m.setenv("MIXQ_BACKEND", "torch")
        assert torch.equal(layer(small), y_small)  # fused: the reference bit for bit
    y_large = layer(large)
    assert layer.kernel_weight(0).is_mkldnn and layer._buffers["qweight_0"] is None
    assert len(onednn.packed_weights) == before  # the layout instead of the buffer, not beside it
    with monkeypatch.context() as m:
        m.setenv("MIXQ_PREPARED_CALLS", "0")
        assert torch.equal(layer(large), y_large)
    assert fused_calls == [1]  # nothing more on the fused GEMM
