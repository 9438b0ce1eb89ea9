"""Quantized layers' eager CPU kernel calls, prepared once per layer (kernels/prepared_calls.py): bit for bit
the general path (and, on the fused GEMM, the torch reference), through the layers as users call them, and
prepared again whenever what they were made from changes."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from mixq.kernels import prepared_calls
from mixq.modules import QConv2d, QLinear
from tests.test_cpu_backend import activations
from tests.test_packed_gemm import needs_fused_gemm

pytestmark = needs_fused_gemm


@pytest.fixture
def prepared_runs(monkeypatch):
    """The prepared calls that produced an output (linear / conv2d returning a result)."""
    runs = []
    for name in ("linear", "conv2d"):
        real = getattr(prepared_calls, name)

        def spy(*args, real=real, name=name, **kwargs):
            result = real(*args, **kwargs)
            if result is not None:
                runs.append(name)
            return result
        monkeypatch.setattr(prepared_calls, name, spy)
    return runs


def general_path_output(layer, x, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(prepared_calls, "usable", lambda x: False)
        return layer(x)


def reference_output(layer, x, monkeypatch):
    with monkeypatch.context() as m:
        m.setenv("MIXQ_BACKEND", "torch")
        return layer(x)


@pytest.mark.parametrize("w_bits,a_bits", [(8, 8), (4, 8), (2, 8), (4, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_linear_layer_is_the_reference_bit_for_bit(w_bits, a_bits, dtype, monkeypatch, prepared_runs):
    monkeypatch.setenv("MIXQ_INT8_GEMM", "mixq")  # (8-bit linear layers run on oneDNN by default)
    torch.manual_seed(0)
    layer = QLinear.from_float(nn.Linear(72, 40), w_bits, a_bits, lows=(-3.0,), highs=(4.0,)).to(dtype)
    x = activations((3, 5, 72), dtype)
    y = layer(x)
    assert prepared_runs == ["linear"]
    assert torch.equal(y, reference_output(layer, x, monkeypatch))
    assert torch.equal(layer(x[:, ::2]), reference_output(layer, x[:, ::2], monkeypatch))  # a strided input


@pytest.mark.parametrize("w_bits", [8, 4, 2])
@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("split_at", [None, 16])  # two input parts (a skip concatenation), each its own scale
def test_a_convolution_is_the_reference_bit_for_bit(w_bits, kernel, stride, padding, channels_last, split_at,
                                                    monkeypatch, prepared_runs):
    monkeypatch.setenv("MIXQ_INT8_GEMM", "mixq")
    torch.manual_seed(0)
    ranges = dict(lows=(-3.0, -1.0), highs=(4.0, 2.0)) if split_at else dict(lows=(-3.0,), highs=(4.0,))
    layer = QConv2d.from_float(nn.Conv2d(24, 20, kernel, stride, padding), w_bits, 8, split_at=split_at, **ranges)
    layer = layer.to(torch.bfloat16)
    x = activations((2, 24, 9, 7), torch.bfloat16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = layer(x)
    assert prepared_runs == ["conv2d"]
    expected = reference_output(layer, x, monkeypatch)
    assert y.stride() == expected.stride() and torch.equal(y, expected)


def test_new_values_and_switches_prepare_again(monkeypatch, prepared_runs):
    torch.manual_seed(0)
    layer = QLinear.from_float(nn.Linear(64, 24), 4, 8, lows=(-3.0,), highs=(3.0,))
    x = activations((6, 64), torch.float32)
    first = layer(x)
    other = QLinear.from_float(nn.Linear(64, 24), 4, 8, lows=(-2.0,), highs=(5.0,))
    layer.load_state_dict(other.state_dict())  # in place: the same tensors, new versions
    assert torch.equal(layer(x), reference_output(other, x, monkeypatch)) and not torch.equal(layer(x), first)
    layer.set_activation_ranges((-1.0,), (1.0,))
    assert torch.equal(layer(x), reference_output(layer, x, monkeypatch))
    runs = len(prepared_runs)
    monkeypatch.setenv("MIXQ_PACKED_GEMM", "0")  # the general path (unpacking per call), the same outputs
    assert torch.equal(layer(x), reference_output(layer, x, monkeypatch)) and len(prepared_runs) == runs
    monkeypatch.delenv("MIXQ_PACKED_GEMM")
    layer(x)
    assert len(prepared_runs) == runs + 1


def test_copies_of_a_prepared_layer_run(monkeypatch):
    layer = QConv2d.from_float(nn.Conv2d(16, 8, 3, padding=1), 4, 8, lows=(-3.0,), highs=(3.0,))
    x = activations((1, 16, 5, 5), torch.float32)
    y = layer(x)
    assert layer.__dict__.get("_prepared") is not None
    for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert torch.equal(copied(x), y)


def test_non_finite_inputs_poison_what_they_reach(prepared_runs):
    layer = QConv2d.from_float(nn.Conv2d(16, 8, 3, padding=1), 4, 8, lows=(-3.0,), highs=(3.0,))
    x = activations((1, 16, 6, 6), torch.float32)
    x[0, 3, 0, 0] = float("nan")
    y = layer(x)
    assert prepared_runs == ["conv2d"]
    assert y[0, :, :2, :2].isnan().all() and not y[0, :, 3:, 3:].isnan().any()


@pytest.mark.parametrize("kind", ["linear", "conv", "split conv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cpu_weights", ["packed", "int8"])  # "int8": 4-bit weights unpacked once for oneDNN
def test_onednn_layers_give_the_general_paths_output(kind, dtype, cpu_weights, monkeypatch, prepared_runs):
    """8-bit weights held in oneDNN's layout (and 4-bit ones unpacked to it): the same op with the same
    arguments as the general path, so the same output bit for bit."""
    from mixq.kernels import dispatch

    monkeypatch.setenv("MIXQ_INT8_GEMM", "onednn")
    torch.manual_seed(0)
    w_bits = 8 if cpu_weights == "packed" else 4
    if kind == "linear":
        layer, x = QLinear.from_float(nn.Linear(48, 40), w_bits, 8, lows=(-3.0,), highs=(4.0,)), activations((7, 48), dtype)
    else:
        split = dict(split_at=16, lows=(-3.0, -1.0), highs=(4.0, 2.0)) if kind == "split conv" else dict(lows=(-3.0,), highs=(4.0,))
        layer = QConv2d.from_float(nn.Conv2d(24, 20, 3, 1, 1), w_bits, 8, **split)
        x = activations((2, 24, 6, 5), dtype).contiguous(memory_format=torch.channels_last)
    layer = layer.to(dtype)
    dispatch.prepare_layer(layer, cpu_weights=cpu_weights)
    y = layer(x)
    assert prepared_runs == (["linear"] if kind == "linear" else ["conv2d"])
    expected = general_path_output(layer, x, monkeypatch)
    assert y.stride() == expected.stride() and torch.equal(y, expected)


def test_a_held_layout_laid_out_again_is_prepared_again(monkeypatch, prepared_runs):
    from mixq.kernels import dispatch

    monkeypatch.setenv("MIXQ_INT8_GEMM", "onednn")
    torch.manual_seed(0)
    layer, other = (QLinear.from_float(nn.Linear(32, 16), 8, 8, lows=(-3.0,), highs=(3.0,)) for _ in range(2))
    dispatch.prepare_layer(layer)
    x = activations((5, 32), torch.float32)
    first = layer(x)
    layer.load_state_dict(other.state_dict())  # new values, laid out again (a new held layout)
    assert layer.kernel_weight(0).is_mkldnn
    y = layer(x)
    assert prepared_runs == ["linear", "linear"] and not torch.equal(y, first)
    assert torch.equal(y, general_path_output(layer, x, monkeypatch))


def test_a_layer_built_under_inference_mode_takes_the_general_path(monkeypatch, prepared_runs):
    """Its buffers keep no version counter, so a later write could not be seen: no prepared call."""
    with torch.inference_mode():
        layer = QLinear.from_float(nn.Linear(32, 16), 4, 8, lows=(-3.0,), highs=(3.0,))
        x = activations((5, 32), torch.float32)
        y = layer(x)
    assert prepared_runs == [] and torch.equal(y, reference_output(layer, x, monkeypatch))
