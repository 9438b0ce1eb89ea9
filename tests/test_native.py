"""The native one-pass activation quantization (kernels/activation_codes.c through kernels/native.py):
the reference's codes bit for bit in every layout, dtype and thread split, NaN/Inf found in the same
pass, layers that give the same outputs with and without it, and the fallback where it cannot be built."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from mixq.kernels import fallback, native, onednn, reference
from mixq.modules import QConv2d, QLinear
from mixq.quantizers import activation_qrange

needs_native = pytest.mark.skipif(native.unavailable_reason() is not None,
                                  reason=f"native activation quantization unavailable: {native.unavailable_reason()}")
needs_onednn = pytest.mark.skipif(onednn.unavailable_reason() is not None, reason="oneDNN int8 kernels unavailable")

SCALE, ZERO = 0.0312345, 3.0


def tie_activations(shape, dtype, seed=0):
    """Activations whose first values divide by SCALE to a .5 tie or its float neighbours (where a wrong
    rounding mode or a reciprocal shows), then values that saturate at both ends."""
    near = (torch.arange(-150, 150, dtype=torch.float32) + 0.5) * SCALE
    ties = torch.cat([near, torch.nextafter(near, near + 1), torch.nextafter(near, near - 1)])
    g = torch.Generator().manual_seed(seed)
    count = torch.Size(shape).numel()
    rest = torch.randn(max(count - ties.numel(), 0), generator=g) * 4
    return torch.cat([ties, rest])[:count].reshape(shape).to(dtype)


def expected_codes(x, a_bits, offset):
    codes = reference.quantize_input(x, torch.tensor(SCALE), torch.tensor(ZERO), a_bits).to(torch.int16) + offset
    return codes.to(torch.uint8 if offset else torch.int8)


def native_codes(x, a_bits, offset, transpose):
    qmin, qmax = activation_qrange(a_bits)
    out = torch.empty(x.numel(), dtype=torch.uint8 if offset else torch.int8)
    finite = native.activation_codes(x, out, SCALE, ZERO + offset, qmin + offset, qmax + offset,
                                     nchw_to_channels_last=transpose)
    return out, finite


# Channel counts below, at and past a 16-byte block, positions that end mid-block and span several runs.
SHAPES = [(2, 3, 5, 7), (1, 16, 16, 16), (2, 40, 17, 19), (1, 33, 20, 20)]


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("a_bits,offset", [(8, 128), (8, 0), (4, 0)])
def test_codes_are_the_references_flat_and_transposed(dtype, shape, a_bits, offset):
    x = tie_activations(shape, dtype)
    expected = expected_codes(x, a_bits, offset)
    flat, finite = native_codes(x, a_bits, offset, transpose=False)
    assert finite and torch.equal(flat, expected.reshape(-1))
    transposed, finite = native_codes(x, a_bits, offset, transpose=True)
    b, c, h, w = shape
    assert finite and torch.equal(transposed.view(b, h, w, c), expected.permute(0, 2, 3, 1))


@needs_native
@pytest.mark.parametrize("shape", [(0, 8, 4, 4), (2, 8, 0, 3)])
def test_an_empty_activation_has_no_codes(shape):
    for transpose in (False, True):
        codes, finite = native_codes(torch.empty(shape), 8, 128, transpose)
        assert finite and codes.numel() == 0


@needs_native
@pytest.mark.parametrize("transpose", [False, True])
def test_codes_split_across_threads_are_the_references(transpose):
    """Past a million elements the pass runs on torch's thread count: the shares must meet exactly."""
    x = tie_activations((1, 24, 211, 211), torch.float32)  # 1.07 M elements, an odd split
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        codes, finite = native_codes(x, 8, 128, transpose)
    finally:
        torch.set_num_threads(previous)
    expected = expected_codes(x, 8, 128)
    assert finite
    assert torch.equal(codes, (expected.permute(0, 2, 3, 1) if transpose else expected).reshape(-1))


@needs_native
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, -1, 16 * 40 + 5])  # first, last, and inside a transposed block
def test_a_non_finite_element_anywhere_is_reported(transpose, bad, where):
    x = tie_activations((2, 40, 17, 19), torch.float32)
    x.view(-1)[where] = bad
    _, finite = native_codes(x, 8, 128, transpose)
    assert finite is False
    _, finite = native_codes(x.to(torch.bfloat16), 8, 128, transpose)
    assert finite is False


def conv_and_linear_layers(w_bits, dtype):
    torch.manual_seed(0)
    conv, linear = nn.Conv2d(40, 24, 3, padding=1), nn.Linear(48, 32)
    layers = (QConv2d.from_float(conv, w_bits, 8, lows=(-3.0,), highs=(5.0,)),
              QLinear.from_float(linear, w_bits, 8, lows=(-3.0,), highs=(5.0,)))
    return [layer.to(dtype) for layer in layers]


@needs_native
@needs_onednn
@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_layers_give_the_same_outputs_with_and_without_it(w_bits, dtype, channels_last, monkeypatch):
    """The same codes reach the same kernels: outputs bit for bit, NaN where the torch path puts it, in
    the input's memory format."""
    monkeypatch.setenv("MIXQ_INT8_GEMM", "onednn")  # (without the native library the fused GEMM cannot run)
    conv, linear = conv_and_linear_layers(w_bits, dtype)
    x = tie_activations((2, 40, 9, 11), dtype)
    x.view(-1)[123] = float("nan")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    tokens = tie_activations((2, 7, 48), dtype, seed=1)
    tokens[1, 3, 5] = float("inf")
    with torch.no_grad():
        native_outputs = conv(x), linear(tokens)
        monkeypatch.setenv("MIXQ_NATIVE", "0")
        torch_outputs = conv(x), linear(tokens)
    for y, expected in zip(native_outputs, torch_outputs):
        assert y.stride() == expected.stride()
        assert torch.equal(y.isnan(), expected.isnan()) and y.isnan().any()
        assert torch.equal(y.nan_to_num(), expected.nan_to_num())


@needs_native
@needs_onednn
def test_layers_run_under_inference_mode():
    """Inference tensors keep no version counter: the finiteness record must not need one there."""
    conv, linear = conv_and_linear_layers(8, torch.float32)
    x = tie_activations((2, 40, 9, 11), torch.float32)
    with torch.no_grad():
        expected = conv(x)
    with torch.inference_mode():
        assert torch.equal(conv(x), expected)
        x_bad = x.clone()
        x_bad[0, 0, 0, 0] = float("nan")
        assert conv(x_bad).isnan().any()


@needs_native
def test_the_finiteness_record_answers_only_for_the_elements_it_read():
    x = tie_activations((2, 40, 9, 11), torch.float32)
    zero, scale = torch.tensor(ZERO), torch.tensor(SCALE)
    onednn.quantize_input_unsigned(x, scale, zero, 8)
    assert onednn.scanned_finite(x) is True
    assert onednn.scanned_finite(x) is None  # given once
    onednn.quantize_input_unsigned(x, scale, zero, 8)
    assert onednn.scanned_finite(x[:1]) is None  # fewer elements
    onednn.quantize_input_unsigned(x, scale, zero, 8)
    assert onednn.scanned_finite(x.clone()) is None  # another tensor
    onednn.quantize_input_unsigned(x, scale, zero, 8)
    x.add_(0)  # written since
    assert onednn.scanned_finite(x) is None
    onednn.quantize_input_unsigned(x, scale, zero, 8)
    onednn.forget_scan()
    assert onednn.scanned_finite(x) is None


@pytest.mark.parametrize("compiler", ["/nonexistent/cc", "false"])
def test_without_a_working_compiler_torch_ops_quantize_with_one_warning(compiler, tmp_path, monkeypatch):
    monkeypatch.setenv("CC", compiler)
    monkeypatch.setenv("MIXQ_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(fallback, "_warned", set())
    x = tie_activations((2, 3, 5, 7), torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        codes = onednn.quantize_input_unsigned(x, torch.tensor(SCALE), torch.tensor(ZERO), 8)
        onednn.quantize_input_unsigned(x, torch.tensor(SCALE), torch.tensor(ZERO), 8)
    assert torch.equal(codes, expected_codes(x, 8, 128))
    assert native.unavailable_reason() is not None
    notes = [w for w in caught if issubclass(w.category, native.NativeFallbackWarning)]
    assert len(notes) == 1 and "C compiler" in str(notes[0].message)
    assert not list(tmp_path.glob("*.so"))


def test_it_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("MIXQ_NATIVE", "0")
    assert native.unavailable_reason() == "MIXQ_NATIVE=0" and not native.reads(torch.zeros(1))


@needs_native
def test_the_build_is_cached_per_source_and_loaded_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXQ_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    assert native.library() is not None
    built = list(tmp_path.glob("native-*.so"))
    assert len(built) == 1 and not [p for p in tmp_path.iterdir() if p.is_dir()]  # no partial build left
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_state", {})
    assert native.library() is not None and built[0].stat().st_mtime_ns == stamp  # not rebuilt


@needs_native
def test_a_compiler_without_openmp_builds_with_plain_threads(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXQ_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "OPENMP_FLAGS", ["-fno-such-openmp-flag"])  # the OpenMP build fails
    assert native.library() is not None and len(list(tmp_path.glob("native-*.so"))) == 1
    x = tie_activations((2, 40, 130, 200), torch.float32)  # over 1M elements: split over threads
    codes = onednn.quantize_input_unsigned(x, torch.tensor(SCALE), torch.tensor(ZERO), 8)
    assert torch.equal(codes, expected_codes(x, 8, 128))
    if native.packed_gemm_function() is not None:  # the fused 4-bit GEMM, on two threads of its own
        from tests.test_cpu_backend import activations, integer_layer

        x = activations((96, 1280), torch.bfloat16)
        layer = integer_layer(torch.randn(320, 1280), x, 4, 8, torch.bfloat16)
        assert torch.equal(onednn.quantized_linear(x, **layer), reference.quantized_linear(x, **layer))


@needs_native
def test_the_library_runs_on_torchs_openmp_runtime_not_a_second_one():
    """Threads of a second runtime (or of their own) would compete for the cores with torch's spinning workers."""
    assert native.library() is not None
    if not Path("/proc/self/maps").exists():
        pytest.skip("no /proc/self/maps to list the loaded libraries")
    with open("/proc/self/maps") as maps:
        runtimes = {line.split()[-1] for line in maps if "libgomp" in line or "libomp" in line}
    assert len(runtimes) <= 1, runtimes
