"""The Triton kernels against the exact torch reference.

On CPU they run in Triton's interpreter (TRITON_INTERPRET=1, set below before Triton is imported);
on a GPU run `TRITON_INTERPRET=0 pytest tests/test_triton_kernels.py` to test the compiled kernels.
Small odd shapes with forced small blocks cover partial tiles in M, N and K (channels for convs),
several tiles per dimension, and both image borders.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from tests.conftest import capture_unet_call, unet_output  # noqa: E402

import mixq  # noqa: E402
from mixq.kernels import dispatch  # noqa: E402
from mixq.kernels import autotune, fallback, reference, triton_backend, triton_conv, triton_gemm, triton_quantize  # noqa: E402
from mixq.kernels.autotune import Config  # noqa: E402
from mixq.kernels.triton_backend import TritonFallbackWarning  # noqa: E402
from mixq.modules import conv_weight_as_matrix  # noqa: E402
from mixq.quantizers import (  # noqa: E402
    activation_qparams,
    pack_weight,
    quantize_weight,
    unpack_weight,
    weight_row_sums,
)

# Blocks smaller than the test shapes; BLOCK_K = 32 is the smallest int8 dot on GPUs.
SMALL_BLOCKS = Config(32, 16, 32, group_m=2, num_warps=4, num_stages=2)

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not triton_gemm.INTERPRETED, reason="CPU tensors run Triton kernels only under TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA device: the compiled Triton kernels are tested on GPU only")),
]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: compiled Triton kernels only")


# --- helpers -------------------------------------------------------------------------------------


def quantized_layer(weight_matrix, x, w_bits, a_bits, with_bias, dtype):
    """The integer parameters of a layer, as QLinear / QConv2d store them, except that the bias is
    a strided view (the launchers must not index it as contiguous)."""
    q, w_scale = quantize_weight(weight_matrix, w_bits)
    # Half the observed range: the outliers of activations() saturate at both ends.
    scale, zero = activation_qparams(float(x.min()) / 2, float(x.max()) / 2, a_bits)
    bias = weight_matrix.to(device=x.device, dtype=dtype)[:, 0] if with_bias else None
    return dict(qweight=pack_weight(q, w_bits).to(x.device), w_bits=w_bits, w_scale=w_scale.to(x.device),
                w_sum=weight_row_sums(q).to(x.device), x_scale=torch.tensor(scale, device=x.device),
                x_zero=torch.tensor(float(zero), device=x.device), a_bits=a_bits, bias=bias)


def activations(shape, dtype, device, generator):
    # An offset, so that the zero point is not 0, and outliers.
    x = torch.randn(shape, generator=generator) * 2 + 0.5
    x.view(-1)[::17] *= 8
    return x.to(device=device, dtype=dtype)


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place of same-sign 16-bit floats."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


def assert_matches_reference(y, expected):
    assert y.dtype == expected.dtype and y.shape == expected.shape and y.stride() == expected.stride()
    if y.dtype == torch.bfloat16 and triton_gemm.INTERPRETED:
        # The interpreter truncates fp32 -> bf16; compiled kernels round to nearest even.
        assert ulps_apart(y, expected).max() <= 1
    else:
        assert torch.equal(y, expected)


# --- linear --------------------------------------------------------------------------------------

LINEAR_INPUTS = [(torch.float16, True), (torch.float32, False), (torch.bfloat16, True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, with_bias", LINEAR_INPUTS, ids=["fp16-bias", "fp32", "bf16-bias"])
@pytest.mark.parametrize("a_bits", [8, 4])
@pytest.mark.parametrize("w_bits", [8, 4, 2])
def test_linear_matches_reference(device, dtype, with_bias, a_bits, w_bits):
    g = torch.Generator().manual_seed(w_bits * 10 + a_bits)
    m, k, n = 37, 70, 45
    x = activations((m, k), dtype, device, g)
    layer = quantized_layer(torch.randn(n, k, generator=g), x, w_bits, a_bits, with_bias, dtype)

    acc = triton_gemm.linear(x, **layer, accumulate_only=True, config=SMALL_BLOCKS)
    codes = reference.quantize_input(x, layer["x_scale"], layer["x_zero"], a_bits)
    assert torch.equal(acc, reference.int_matmul(codes, unpack_weight(layer["qweight"], w_bits, k)))

    y = triton_gemm.linear(x, **layer, config=SMALL_BLOCKS)
    assert_matches_reference(y, reference.quantized_linear(x, **layer))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prologue_rounds_half_to_even_and_saturates(device, dtype):
    """Codes read back through an identity weight (127 on the diagonal): acc = 127 * code."""
    k = 64
    steps = (torch.arange(19 * k) - 608) * 0.5  # every half-integer tie in [-304, 303.5]
    x = (steps * 0.25).view(-1, k).to(device=device, dtype=dtype)  # exact: the scale is a power of two
    layer = quantized_layer(torch.eye(k), x, 8, 8, False, dtype)
    layer["x_scale"], layer["x_zero"] = torch.tensor(0.25, device=device), torch.tensor(3.0, device=device)

    codes = triton_gemm.linear(x, **layer, accumulate_only=True, config=SMALL_BLOCKS).flatten() // 127
    ties = {2.5: 2, 3.5: 4, -2.5: -2, -3.5: -4, 0.5: 0, -0.5: 0}
    for value, rounded in ties.items():
        assert codes[steps == value].item() == rounded + 3
    assert codes.max() == 127 and codes.min() == -128
    expected = reference.quantize_input(x, layer["x_scale"], layer["x_zero"], 8)
    assert torch.equal(codes.to(torch.int8), expected.flatten())


@pytest.mark.parametrize("device", DEVICES)
def test_linear_through_dispatch_takes_batched_strided_input(device, monkeypatch):
    """mixq.kernels.quantized_linear on [B, T, K] input that is a non-contiguous view."""
    monkeypatch.setenv("MIXQ_BACKEND", "triton")
    g = torch.Generator().manual_seed(1)
    x = activations((3, 11, 100), torch.float16, device, g)[..., :90]  # rows 100 elements apart
    layer = quantized_layer(torch.randn(24, 90, generator=g), x, 4, 8, True, torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TritonFallbackWarning)
        y = dispatch.quantized_linear(x, **layer)
    expected = reference.quantized_linear(x.reshape(-1, 90), **layer).reshape(3, 11, 24)
    assert torch.equal(y, expected)


def expected_accumulator(x, layer, k):
    codes = reference.quantize_input(x, layer["x_scale"], layer["x_zero"], layer["a_bits"])
    return reference.int_matmul(codes, unpack_weight(layer["qweight"], layer["w_bits"], k))


# K = 512 is a whole number of 128-wide blocks: the unmasked main loop, whose per-byte weight lanes
# are at least 32 wide for every weight width. A split of its 4 K-tiles into 3 leaves the last
# program an empty slice, which must add nothing.
EVEN_SPLITS = [Config(32, 16, 128, group_m=2, split_k=1), Config(32, 16, 128, group_m=2, split_k=3),
               Config(16, 32, 128, group_m=1, split_k=2), Config(16, 32, 256, group_m=1, split_k=1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", EVEN_SPLITS, ids=["even", "even-split3", "even-split2", "even-k256"])
@pytest.mark.parametrize("w_bits", [8, 4, 2])
def test_linear_even_k_and_split_k_match_reference(device, config, w_bits):
    g = torch.Generator().manual_seed(w_bits)
    m, k, n = 37, 512, 45
    x = activations((m, k), torch.float16, device, g)
    layer = quantized_layer(torch.randn(n, k, generator=g), x, w_bits, 8, True, torch.float16)
    assert triton_gemm.unmasked_loop(k, config, w_bits)

    acc = triton_gemm.linear(x, **layer, accumulate_only=True, config=config)
    assert torch.equal(acc, expected_accumulator(x, layer, k))
    y = triton_gemm.linear(x, **layer, config=config)
    assert_matches_reference(y, reference.quantized_linear(x, **layer))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_byte, group, pad", [(1, 1, 0), (2, 32, 1), (4, 64, 1)])
def test_quantize_pass_matches_reference_codes(device, dtype, per_byte, group, pad):
    """The standalone quantize kernel: reference codes, lane-major within blocks, x_zero borders."""
    g = torch.Generator().manual_seed(per_byte)
    b, h, w, c = 2, 5, 3, 128
    x = activations((b, c, h, w), dtype, device, g)  # NCHW, read through a permuted view
    scale, zero = torch.tensor(0.0625, device=device), torch.tensor(-5.0, device=device)
    codes = triton_quantize.quantize_image(x.permute(0, 2, 3, 1), scale, zero, 8, pad=pad, per_byte=per_byte,
                                           group=group)

    expected = reference.quantize_input(x, scale, zero, 8).permute(0, 2, 3, 1)  # [B, H, W, C]
    expected = torch.nn.functional.pad(expected.float() - zero, (0, 0, pad, pad, pad, pad)) + zero
    blocks = expected.to(torch.int8).reshape(-1, c // group, group // per_byte, per_byte)
    assert torch.equal(codes, blocks.transpose(2, 3).reshape(-1, c))


# --- conv2d --------------------------------------------------------------------------------------

CONV_CASES = [
    # kernel, stride, padding, w_bits, a_bits, dtype, channels_last, bias
    ((3, 3), (1, 1), (1, 1), 8, 8, torch.float16, True, True),
    ((3, 3), (1, 1), (1, 1), 4, 4, torch.float32, False, False),
    ((3, 3), (1, 1), (1, 1), 2, 8, torch.bfloat16, True, True),
    ((3, 3), (2, 2), (1, 1), 8, 4, torch.float32, True, False),
    ((3, 3), (2, 2), (1, 1), 4, 8, torch.float16, False, True),
    ((3, 3), (2, 2), (1, 1), 2, 8, torch.float16, True, False),
    ((1, 1), (1, 1), (0, 0), 8, 8, torch.float32, False, True),
    ((1, 1), (1, 1), (0, 0), 4, 8, torch.float16, True, True),
    ((1, 1), (1, 1), (0, 0), 2, 4, torch.float32, True, False),
]


def conv_case_id(case):
    kernel, stride, _, w_bits, a_bits, dtype, channels_last, bias = case
    layout = "nhwc" if channels_last else "nchw"
    return f"{kernel[0]}x{kernel[1]}s{stride[0]}-w{w_bits}a{a_bits}-{str(dtype)[6:]}-{layout}{'-bias' if bias else ''}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CONV_CASES, ids=conv_case_id)
def test_conv2d_matches_reference(device, case):
    kernel, stride, padding, w_bits, a_bits, dtype, channels_last, with_bias = case
    g = torch.Generator().manual_seed(w_bits * 10 + a_bits)
    # Odd sizes: stride-2 outputs end on padded rows and columns; 37 channels = 2 blocks of 32.
    b, c, h, w, n = 2, 37, 7, 5, 21
    x = activations((b, c, h, w), dtype, device, g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(n, c, *kernel, generator=g)
    layer = quantized_layer(conv_weight_as_matrix(weight), x, w_bits, a_bits, with_bias, dtype)
    geometry = dict(kernel_size=kernel, stride=stride, padding=padding)

    acc = triton_conv.conv2d(x, **layer, **geometry, accumulate_only=True, config=SMALL_BLOCKS)
    codes = reference.quantize_input(x, layer["x_scale"], layer["x_zero"], a_bits)
    cols, _, _ = reference.im2col_channels_last(codes, layer["x_zero"], **geometry)
    expected_acc = reference.int_matmul(cols, unpack_weight(layer["qweight"], w_bits, cols.shape[1]))
    assert torch.equal(acc.permute(0, 2, 3, 1).reshape(-1, n), expected_acc)

    y = triton_conv.conv2d(x, **layer, **geometry, config=SMALL_BLOCKS)
    assert_matches_reference(y, reference.quantized_conv2d(x, **layer, **geometry))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("w_bits, split_k, channels_last, block_k",
                         [(8, 1, True, 128), (4, 2, False, 128), (2, 5, True, 128), (4, 1, True, 256)])
def test_conv2d_even_channels_and_split_k_match_reference(device, stride, w_bits, split_k, channels_last, block_k):
    """256 channels = 2 blocks of 128 (or one of 256): the unmasked flattened (tap, channel) loop
    over 18 K-tiles, its packed-weight lanes, and splits of it that cut taps apart."""
    g = torch.Generator().manual_seed(stride * 10 + w_bits)
    b, c, h, w, n = 2, 256, 6, 5, 24
    x = activations((b, c, h, w), torch.float16, device, g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    layer = quantized_layer(conv_weight_as_matrix(torch.randn(n, c, 3, 3, generator=g)), x, w_bits, 8, True,
                            torch.float16)
    geometry = dict(kernel_size=(3, 3), stride=(stride, stride), padding=(1, 1))
    config = Config(32, 16, block_k, group_m=2, split_k=split_k)
    assert triton_gemm.unmasked_loop(c, config, w_bits)

    y = triton_conv.conv2d(x, **layer, **geometry, config=config)
    assert_matches_reference(y, reference.quantized_conv2d(x, **layer, **geometry))


def test_nchw_conv_input_warns_once(monkeypatch):
    monkeypatch.setattr(triton_conv, "_warned_nchw", False)
    x = torch.randn(1, 32, 4, 4)
    layer = quantized_layer(torch.randn(8, 32), x, 8, 8, False, torch.float32)
    geometry = dict(kernel_size=(1, 1), stride=(1, 1), padding=(0, 0))
    with pytest.warns(triton_conv.ChannelsFirstWarning, match="channels_last"):
        triton_conv.conv2d(x, **layer, **geometry)
    with warnings.catch_warnings():
        warnings.simplefilter("error", triton_conv.ChannelsFirstWarning)
        triton_conv.conv2d(x, **layer, **geometry)
        triton_conv.conv2d(x.to(memory_format=torch.channels_last), **layer, **geometry)


@pytest.mark.parametrize("device", DEVICES)
def test_conv2d_padding_is_the_real_zero(device):
    """An all-zero image quantizes to x_zero everywhere, borders included: the output is the bias."""
    x = torch.zeros(1, 8, 5, 5, device=device).to(memory_format=torch.channels_last)
    layer = quantized_layer(torch.randn(16, 72), x, 4, 8, True, torch.float32)
    layer["x_scale"], layer["x_zero"] = torch.tensor(0.1, device=device), torch.tensor(-37.0, device=device)
    y = triton_conv.conv2d(x, **layer, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), config=SMALL_BLOCKS)
    assert torch.equal(y, layer["bias"].view(1, -1, 1, 1).expand_as(y))


# --- a whole quantized UNet ----------------------------------------------------------------------


def on_device(value, device):
    """The tensors of a captured UNet call (nested in tuples and dicts) on device."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: on_device(item, device) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(on_device(item, device) for item in value)
    return value


def test_tiny_unet_through_triton_matches_torch_backend(tiny_sdxl, monkeypatch):
    if not triton_gemm.INTERPRETED and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 or a CUDA device")
    device = "cpu" if triton_gemm.INTERPRETED else "cuda"
    call = capture_unet_call(tiny_sdxl, prompts=("a red bus on a bridge",))  # batch 1: the interpreter is slow
    mixq.quantize(tiny_sdxl, 8, 8, guidance_scale=0.0, num_inference_steps=1, num_prompts=4, progress=False)
    tiny_sdxl.unet.to(device)
    call = on_device(call, device)
    monkeypatch.setenv("MIXQ_BACKEND", "torch")
    expected = unet_output(tiny_sdxl.unet, call)

    launches = {"linear": 0, "conv2d": 0}

    def counted(name, kernel):
        def run(*args, **kwargs):
            launches[name] += 1
            return kernel(*args, **kwargs)
        return run

    monkeypatch.setattr(triton_gemm, "linear", counted("linear", triton_gemm.linear))
    monkeypatch.setattr(triton_conv, "conv2d", counted("conv2d", triton_conv.conv2d))
    passes = count_quantize_passes(monkeypatch)
    monkeypatch.setattr(fallback, "_warned", set())
    monkeypatch.setenv("MIXQ_BACKEND", "triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error", TritonFallbackWarning)
        out = unet_output(tiny_sdxl.unet, call)

    assert launches["linear"] > 100 and launches["conv2d"] > 20
    assert mixq.sqnr_db(expected, out) >= 50.0
    # Self-attention's to_k and to_v reuse to_q's codes, cross-attention's to_v those of to_k.
    assert passes["count"] < launches["linear"] + launches["conv2d"] - 20


def count_quantize_passes(monkeypatch) -> dict:
    passes = {"count": 0}
    quantize_image = triton_quantize.quantize_image

    def counted(*args, **kwargs):
        passes["count"] += 1
        return quantize_image(*args, **kwargs)

    monkeypatch.setattr(triton_gemm, "quantize_image", counted)
    return passes


@pytest.mark.parametrize("device", DEVICES)
def test_layers_reading_one_input_share_one_quantize_pass(device, monkeypatch):
    """to_q / to_k / to_v: one pass for three layers with equal parameters; a new one after an
    in-place write to the input, for other parameters, or once the layer's buffers were written."""
    from mixq.modules import QLinear

    generator = torch.Generator().manual_seed(5)
    x = activations((2, 9, 64), torch.float32, device, generator)
    lo, hi = float(x.min()), float(x.max())
    layers = [QLinear.from_float(torch.nn.Linear(64, 48), 4, 8, (lo,), (hi,)).to(device) for _ in range(3)]
    other = QLinear.from_float(torch.nn.Linear(64, 48), 4, 8, (lo / 2,), (hi / 2,)).to(device)
    monkeypatch.setenv("MIXQ_BACKEND", "torch")
    expected = [layer(x) for layer in layers]
    triton_quantize.forget_shared_codes()
    passes = count_quantize_passes(monkeypatch)
    monkeypatch.setenv("MIXQ_BACKEND", "triton")

    assert all(torch.equal(layer(x), want) for layer, want in zip(layers, expected))
    assert passes["count"] == 1
    other(x)
    assert passes["count"] == 2

    x.mul_(0.5)  # same storage, new version: the kept codes are stale
    monkeypatch.setenv("MIXQ_BACKEND", "torch")
    halved = [layer(x) for layer in layers[:2]]
    monkeypatch.setenv("MIXQ_BACKEND", "triton")
    assert all(torch.equal(layer(x), want) for layer, want in zip(layers[:2], halved))
    assert passes["count"] == 3

    layers[2].x_scale.mul_(2.0)  # written behind set_activation_ranges' back: no longer shared
    assert layers[2].input_key(0) is None
    layers[2](x)
    assert passes["count"] == 4
    layers[2].refresh_input_key()
    assert layers[2].input_key(0)[1] == 2 * layers[0].input_key(0)[1]


def test_input_key_survives_moves_and_casts_but_not_loads():
    from mixq.modules import QLinear

    layer = QLinear.from_float(torch.nn.Linear(16, 8), 8, 8, (-1.0,), (3.0,))
    key = layer.input_key(0)
    assert key is not None and key[0] == 8 and key[1] == pytest.approx(4.0 / 255, rel=1e-6)
    layer.to(torch.float16)
    assert layer.input_key(0) == key  # the fp32 scales stay as they were
    layer.load_state_dict(layer.state_dict())
    assert layer.input_key(0) is None  # copied in: unknown until refreshed (dispatch.prepare_layer)
    dispatch.prepare_layer(layer)
    assert layer.input_key(0) == key


# --- fallback ------------------------------------------------------------------------------------


def test_unsupported_conv_falls_back_with_one_warning(monkeypatch, recwarn):
    monkeypatch.setenv("MIXQ_BACKEND", "triton")
    monkeypatch.setattr(fallback, "_warned", set())
    g = torch.Generator().manual_seed(2)
    x = activations((1, 3, 9, 9), torch.float32, "cpu", g)
    layer = quantized_layer(torch.randn(4, 75, generator=g), x, 8, 8, True, torch.float32)
    geometry = dict(kernel_size=(5, 5), stride=(1, 1), padding=(2, 2))

    with pytest.warns(TritonFallbackWarning, match=r"kernel_size=\(5, 5\)"):
        y = dispatch.quantized_conv2d(x, **layer, **geometry)
    assert torch.equal(y, reference.quantized_conv2d(x, **layer, **geometry))

    recwarn.clear()
    dispatch.quantized_conv2d(x, **layer, **geometry)
    assert not [w for w in recwarn if issubclass(w.category, TritonFallbackWarning)]


@pytest.mark.parametrize("dtype, interpreted, reason", [
    (torch.float64, True, "torch.float64 inputs"),
    (torch.float32, False, "cpu tensors"),  # MIXQ_BACKEND=triton on a machine without CUDA
], ids=["float64", "cpu-compiled"])
def test_unsupported_linear_falls_back(dtype, interpreted, reason, monkeypatch):
    monkeypatch.setenv("MIXQ_BACKEND", "triton")
    monkeypatch.setattr(fallback, "_warned", set())
    monkeypatch.setattr(triton_gemm, "INTERPRETED", interpreted)
    g = torch.Generator().manual_seed(3)
    x = activations((5, 16), dtype, "cpu", g)
    layer = quantized_layer(torch.randn(8, 16, generator=g), x, 8, 8, False, dtype)
    with pytest.warns(TritonFallbackWarning, match=reason):
        y = dispatch.quantized_linear(x, **layer)
    assert torch.equal(y, reference.quantized_linear(x, **layer))


# --- autotuning ----------------------------------------------------------------------------------

FAST, MEDIUM, SLOW = Config(64, 64, 64), Config(128, 128, 64), Config(128, 128, 128)


class Timer:
    """A fake benchmark: fixed timings per config, counting measurements."""

    def __init__(self, timings):
        self.timings, self.calls = timings, 0

    def __call__(self, config):
        self.calls += 1
        return self.timings[config]


@pytest.fixture
def cache_file(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "autotune.json"
    monkeypatch.setenv("MIXQ_AUTOTUNE_CACHE", str(path))
    monkeypatch.delenv("MIXQ_AUTOTUNE", raising=False)
    monkeypatch.setattr(autotune, "_caches", {})
    return path


def test_autotune_picks_fastest_and_a_new_process_reads_the_cache(cache_file, monkeypatch):
    timer = Timer({SLOW: 3.0, FAST: 1.0, MEDIUM: 2.0})
    assert autotune.tuned_config("linear|a", [SLOW, FAST, MEDIUM], timer, default=SLOW) == FAST
    assert timer.calls == 3
    assert autotune.tuned_config("linear|a", [SLOW, FAST, MEDIUM], timer, default=SLOW) == FAST
    assert timer.calls == 3
    assert list(cache_file.parent.iterdir()) == [cache_file]  # no temporary file left behind

    monkeypatch.setattr(autotune, "_caches", {})  # what a second process starts with
    untouched = Timer({})
    assert autotune.tuned_config("linear|a", [SLOW, FAST, MEDIUM], untouched, default=SLOW) == FAST
    assert untouched.calls == 0


def test_autotune_cache_keeps_entries_written_by_other_processes(cache_file):
    first, second = autotune.ConfigCache(cache_file), autotune.ConfigCache(cache_file)
    assert first.get("a") is None and second.get("b") is None  # both read the empty state
    first.put("a", FAST)
    second.put("b", MEDIUM)
    merged = autotune.ConfigCache(cache_file)
    assert merged.get("a") == FAST and merged.get("b") == MEDIUM


def test_autotune_off_and_unreadable_cache(cache_file, monkeypatch):
    monkeypatch.setenv("MIXQ_AUTOTUNE", "0")
    timer = Timer({FAST: 1.0})
    assert autotune.tuned_config("k", [FAST], timer, default=MEDIUM) == MEDIUM
    assert timer.calls == 0 and not cache_file.exists()

    monkeypatch.delenv("MIXQ_AUTOTUNE")
    monkeypatch.setattr(autotune, "_caches", {})
    cache_file.parent.mkdir(parents=True)
    cache_file.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable autotune cache"):
        assert autotune.tuned_config("k", [FAST], timer, default=MEDIUM) == FAST
    assert autotune.ConfigCache(cache_file).get("k") == FAST


def test_a_tuning_budget_measures_the_default_first_and_stops_in_time(cache_file, monkeypatch):
    monkeypatch.delenv("MIXQ_AUTOTUNE", raising=False)
    monkeypatch.setenv("MIXQ_AUTOTUNE_SECONDS", "0")
    timer = Timer({FAST: 1.0, SLOW: 2.0, MEDIUM: 1.5})
    assert autotune.tuned_config("budget", [FAST, SLOW], timer, default=MEDIUM) == MEDIUM
    assert timer.calls == 1  # only the default: the budget was spent before the candidates
    monkeypatch.setenv("MIXQ_AUTOTUNE_SECONDS", "60")
    assert autotune.tuned_config("budget2", [FAST, SLOW], timer, default=MEDIUM) == FAST
    assert timer.calls == 4


def test_unwritable_autotune_cache_warns_and_keeps_the_choice(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("MIXQ_AUTOTUNE_CACHE", str(blocker / "autotune.json"))
    monkeypatch.delenv("MIXQ_AUTOTUNE", raising=False)
    monkeypatch.setattr(autotune, "_caches", {})
    timer = Timer({FAST: 1.0, SLOW: 2.0})
    with pytest.warns(UserWarning, match="cannot write the autotune cache"):
        assert autotune.tuned_config("k", [SLOW, FAST], timer, default=SLOW) == FAST
    assert autotune.tuned_config("k", [SLOW, FAST], timer, default=SLOW) == FAST
    assert timer.calls == 2


def test_default_configs_fill_the_gpu_and_need_no_masks():
    # (M, N, K, what BLOCK_K must divide): SDXL-Turbo linears and 3x3 convs (C = K / 9)
    for m, n, k, channels in [(4096, 320, 2880, 320), (1024, 5120, 640, 640), (256, 1280, 1280, 1280),
                              (256, 1280, 11520, 1280), (76, 1280, 2048, 2048), (1024, 640, 8640, 960)]:
        config = autotune.default_config(m, n, k, channels)
        assert channels % config.block_k == 0
        assert k // config.block_k // config.split_k >= autotune.MIN_K_STEPS_PER_SPLIT
        unsplit = autotune.wave_time(m, n, k, config, 1)
        assert autotune.wave_time(m, n, k, config, config.split_k) == min(
            autotune.wave_time(m, n, k, config, s) for s in autotune.useful_splits(m, n, k, config)) <= unsplit
    # 40 tiles of 90 K-steps on 132 SMs: split
    assert autotune.default_config(256, 1280, 11520, 1280).split_k > 1
    assert autotune.default_config(4096, 1280, 1280, 1280).split_k == 1


def test_candidates_fit_block_k_and_offer_splits_only_for_small_grids():
    small = autotune.candidates_for(256, 1280, 11520, 1280, 8)
    assert all(1280 % c.block_k == 0 for c in small) and any(c.split_k > 1 for c in small)
    assert {c.block_k for c in small} == {128, 256}  # each tile also with a K-step twice as wide
    assert {c.block_k for c in autotune.candidates_for(1024, 640, 640, 640, 4)} == {128}  # 256 does not divide 640
    assert all(c.split_k == 1 for c in autotune.candidates_for(4096, 5120, 640, 640, 4))
    assert all(960 % c.block_k == 0 for c in autotune.candidates_for(1024, 640, 8640, 960, 8))
    # 2-bit weights on 320 channels take the masked loop: only tiles whose gather fits registers.
    masked = autotune.candidates_for(4096, 320, 2880, 320, 2)
    assert masked and all(autotune.fits_in_registers(320, c, 2) for c in masked)
    assert len(masked) < len(autotune.candidates_for(4096, 320, 2880, 320, 8))


@pytest.mark.skipif(not triton_gemm.INTERPRETED, reason="checks the interpreter's fixed config")
def test_interpreter_does_not_tune(cache_file):
    x = torch.randn(8, 32)
    layer = quantized_layer(torch.randn(16, 32), x, 8, 8, False, torch.float32)
    triton_gemm.linear(x, **layer)
    assert not cache_file.exists()


# --- GPU only: SDXL-Turbo-sized shapes with tuning ------------------------------------------------


@needs_cuda
@pytest.mark.skipif(triton_gemm.INTERPRETED, reason="run with TRITON_INTERPRET=0 to test compiled kernels")
def test_sdxl_shapes_tuned_on_gpu_match_reference(cache_file, monkeypatch):
    import triton.testing

    g = torch.Generator().manual_seed(4)
    x = activations((256, 1280), torch.float16, "cuda", g)
    layer = quantized_layer(torch.randn(1280, 1280, generator=g), x, 4, 8, True, torch.float16)
    assert torch.equal(triton_gemm.linear(x, **layer), reference.quantized_linear(x, **layer))
    assert cache_file.exists()

    image = activations((1, 320, 64, 64), torch.float16, "cuda", g).to(memory_format=torch.channels_last)
    conv = quantized_layer(torch.randn(320, 9 * 320, generator=g), image, 8, 8, True, torch.float16)
    geometry = dict(kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
    expected = reference.quantized_conv2d(image, **conv, **geometry)
    assert torch.equal(triton_conv.conv2d(image, **conv, **geometry), expected)

    monkeypatch.setattr(autotune, "_caches", {})  # a second process: reads the cache, never times
    monkeypatch.setattr(triton.testing, "do_bench", lambda *a, **k: pytest.fail("tuned again"))
    triton_gemm.linear(x, **layer)
    triton_conv.conv2d(image, **conv, **geometry)
