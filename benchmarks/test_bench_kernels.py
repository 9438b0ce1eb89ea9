"""Kernel benchmarks: mixq's Triton kernels against torch fp16 (cuBLAS / cuDNN) and torch._int_mm.

GPU, at the SDXL-Turbo shapes (512x512, batch 1), in a pytest run of their own (not with tests/,
which turn on the Triton interpreter):

    pytest benchmarks/test_bench_kernels.py --benchmark-group-by=group

Every implementation is measured the same way: one call per weight copy, captured in a CUDA graph
(no Python or launch overhead, as in a graph-captured UNet), over enough copies that the weights
come from HBM rather than L2, as they do when a whole UNet streams its layers. The activation
stays hot in L2 (the previous layer just wrote it). The first call, which compiles and autotunes,
runs before the timing. pytest-benchmark's times are per graph replay; extra_info holds the time
per call (us_per_call) and the throughput (tops).

CPU (CI): `pytest benchmarks/test_bench_kernels.py --benchmark-disable` runs tiny shapes on the
torch backend and one through the Triton interpreter, to keep this file working; no GPU timing.
Without a GPU, the evidence of speed is the compiled code: benchmarks/test_static_gate.py (CI) and
the estimate of benchmarks/static_report.py, which these GPU timings should be compared against.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.measure import CudaEventClock  # noqa: E402
from mixq.kernels import dispatch  # noqa: E402
from mixq.kernels import reference, triton_gemm  # noqa: E402
from mixq.modules import conv_weight_as_matrix  # noqa: E402
from mixq.quantizers import (  # noqa: E402
    activation_qparams,
    pack_weight,
    quantize_activation,
    quantize_weight,
    weight_row_sums,
)

# (name, M tokens, K, N): attention and feed-forward layers of the 640- and 1280-channel blocks.
LINEAR_SHAPES = [
    ("attn-640", 1024, 640, 640),
    ("ff-in-640", 1024, 640, 5120),
    ("ff-out-640", 1024, 2560, 640),
    ("attn-1280", 256, 1280, 1280),
    ("ff-in-1280", 256, 1280, 10240),
    ("ff-out-1280", 256, 5120, 1280),
]
# (name, C, H = W, N, kernel, stride): resnet convs, downsamplers and an up-block shortcut.
CONV_SHAPES = [
    ("3x3-320@64", 320, 64, 320, 3, 1),
    ("3x3-640@32", 640, 32, 640, 3, 1),
    ("3x3-1280@16", 1280, 16, 1280, 3, 1),
    ("3x3s2-320@64", 320, 64, 320, 3, 2),
    ("3x3s2-640@32", 640, 32, 640, 3, 2),
    ("1x1-1920to1280@16", 1920, 16, 1280, 1, 1),
]
IMPLEMENTATIONS = ["torch-fp16", "torch-int_mm", "triton-w8a8", "triton-w4a8", "triton-w2a8"]
WEIGHT_BITS = {"torch-int_mm": 8, "triton-w8a8": 8, "triton-w4a8": 4, "triton-w2a8": 2}

COLD_BYTES = 256 * 2**20  # weight bytes touched per replay: several times any GPU's L2
MAX_COPIES = 1024
ROUNDS, WARMUP_ROUNDS = 20, 3

ON_GPU = torch.cuda.is_available() and not triton_gemm.INTERPRETED
gpu_only = pytest.mark.skipif(
    not ON_GPU, reason="needs a CUDA device and compiled Triton kernels (TRITON_INTERPRET unset); "
                       "the CPU variant below runs instead")


# --- the layer under test ------------------------------------------------------------------------


def quantized_params(weight, bits):
    """Packed weights and the parameters QLinear / QConv2d would hold (weight: [N, K] matrix);
    activations are calibrated to [-4, 4], which holds nearly all of a standard normal input."""
    q, w_scale = quantize_weight(weight, bits)
    scale, zero = activation_qparams(-4.0, 4.0, 8)
    device = weight.device
    return dict(qweight=pack_weight(q, bits), w_bits=bits, w_scale=w_scale, w_sum=weight_row_sums(q),
                x_scale=torch.tensor(scale, device=device), x_zero=torch.tensor(float(zero), device=device),
                a_bits=8, bias=torch.randn(weight.shape[0], device=device, dtype=weight.dtype))


def weight_copies(tensor: torch.Tensor) -> list[torch.Tensor]:
    count = max(1, min(MAX_COPIES, math.ceil(COLD_BYTES / (tensor.numel() * tensor.element_size()))))
    return [tensor.clone() for _ in range(count)]


def linear_calls(impl, m, k, n, monkeypatch):
    """One zero-argument call per weight copy."""
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    weight = torch.randn(n, k, device="cuda", dtype=torch.float16) / math.sqrt(k)
    if impl == "torch-fp16":
        bias = torch.randn(n, device="cuda", dtype=torch.float16)
        return [lambda w=w: F.linear(x, w, bias) for w in weight_copies(weight)]
    params = quantized_params(weight, WEIGHT_BITS[impl])
    if impl == "torch-int_mm":
        # The best plain-torch W8A8: quantize, cuBLASLt int8 GEMM on the (pre-transposed) weight, epilogue.
        def int_mm(w_t):
            codes = quantize_activation(x, params["x_scale"], params["x_zero"], 8)
            acc = torch._int_mm(codes, w_t)
            return reference.epilogue(acc, params["x_scale"], params["x_zero"], params["w_scale"], params["w_sum"],
                                      params["bias"], x.dtype)
        return [lambda w=w: int_mm(w.t()) for w in weight_copies(params.pop("qweight"))]
    monkeypatch.setenv("MIXQ_BACKEND", "triton")
    packed = params.pop("qweight")
    return [lambda w=w: dispatch.quantized_linear(x, w, **params) for w in weight_copies(packed)]


def conv_calls(impl, c, size, n, kernel, stride, monkeypatch):
    padding = kernel // 2
    x = torch.randn(1, c, size, size, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    weight = torch.randn(n, c, kernel, kernel, device="cuda", dtype=torch.float16) / math.sqrt(c * kernel**2)
    if impl == "torch-fp16":
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # cuDNN tunes too
        bias = torch.randn(n, device="cuda", dtype=torch.float16)
        weights = weight_copies(weight.to(memory_format=torch.channels_last))
        return [lambda w=w: F.conv2d(x, w, bias, stride, padding) for w in weights]
    params = quantized_params(conv_weight_as_matrix(weight), WEIGHT_BITS[impl])
    geometry = dict(kernel_size=(kernel, kernel), stride=(stride, stride), padding=(padding, padding))
    if impl == "torch-int_mm":
        # The torch backend's path: quantize, im2col, cuBLASLt int8 GEMM, epilogue (zero as a number:
        # reading it from the tensor would synchronize inside the graph capture).
        zero = float(params["x_zero"])
        h_out = (size + 2 * padding - kernel) // stride + 1

        def int_mm(w_t):
            codes = quantize_activation(x, params["x_scale"], params["x_zero"], 8)
            cols, _, _ = reference.im2col_channels_last(codes, zero, **geometry)
            acc = torch._int_mm(cols, w_t)
            y = reference.epilogue(acc, params["x_scale"], params["x_zero"], params["w_scale"], params["w_sum"],
                                   params["bias"], x.dtype)
            return y.view(1, h_out, h_out, n).permute(0, 3, 1, 2)
        return [lambda w=w: int_mm(w.t()) for w in weight_copies(params.pop("qweight"))]
    monkeypatch.setenv("MIXQ_BACKEND", "triton")
    packed = params.pop("qweight")
    return [lambda w=w: dispatch.quantized_conv2d(x, w, **params, **geometry) for w in weight_copies(packed)]


@pytest.fixture
def gpu_benchmark(request):
    """pytest-benchmark with rounds timed on the GPU's clock (CUDA events)."""
    request.node.add_marker(pytest.mark.benchmark(timer=CudaEventClock(), disable_gc=True))
    return request.getfixturevalue("benchmark")


def benchmark_graph(benchmark, calls, ops):
    """Times a CUDA graph of all calls; records the time per call and TOP/s."""
    calls[0]()  # compile, autotune and cache outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up allocations on a side stream, as torch.cuda.graph asks
        for call in calls[:3]:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    benchmark.pedantic(graph.replay, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    if benchmark.disabled:  # --benchmark-disable: ran once, nothing was timed
        return
    per_call_s = benchmark.stats.stats.median / len(calls)
    benchmark.extra_info.update(calls_per_replay=len(calls), us_per_call=per_call_s * 1e6,
                                tops=ops / per_call_s / 1e12, device=torch.cuda.get_device_name())


@gpu_only
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=[s[0] for s in LINEAR_SHAPES])
def test_linear_kernel(gpu_benchmark, shape, impl, monkeypatch):
    name, m, k, n = shape
    gpu_benchmark.group = f"linear {name} M={m} K={k} N={n}"
    benchmark_graph(gpu_benchmark, linear_calls(impl, m, k, n, monkeypatch), 2 * m * n * k)


@gpu_only
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=[s[0] for s in CONV_SHAPES])
def test_conv2d_kernel(gpu_benchmark, shape, impl, monkeypatch):
    name, c, size, n, kernel, stride = shape
    gpu_benchmark.group = f"conv2d {name} C={c} N={n}"
    out = (size + 2 * (kernel // 2) - kernel) // stride + 1
    benchmark_graph(gpu_benchmark, conv_calls(impl, c, size, n, kernel, stride, monkeypatch),
                    2 * out * out * n * c * kernel * kernel)


# --- CPU-sized variant (CI) ----------------------------------------------------------------------

TINY_LINEAR = (64, 96, 80)  # M, K, N
TINY_CONV = (2, 16, 8, 24)  # B, C, H = W, N (3x3, stride 1)


def tiny_linear_call(backend, monkeypatch):
    m, k, n = TINY_LINEAR
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g)
    weight = torch.randn(n, k, generator=g)
    if backend == "torch-fp32":
        return lambda: F.linear(x, weight)
    monkeypatch.setenv("MIXQ_BACKEND", backend)
    params = quantized_params(weight, 4)
    return lambda: dispatch.quantized_linear(x, **params)


def tiny_conv_call(backend, monkeypatch):
    b, c, size, n = TINY_CONV
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, c, size, size, generator=g).to(memory_format=torch.channels_last)
    weight = torch.randn(n, c, 3, 3, generator=g)
    if backend == "torch-fp32":
        return lambda: F.conv2d(x, weight, None, 1, 1)
    monkeypatch.setenv("MIXQ_BACKEND", backend)
    params = quantized_params(conv_weight_as_matrix(weight), 4)
    return lambda: dispatch.quantized_conv2d(x, **params, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))


interpreter_only = pytest.mark.skipif(not triton_gemm.INTERPRETED, reason="the Triton interpreter is for CPU-only CI")


@pytest.mark.parametrize("backend", ["torch-fp32", "torch", pytest.param("triton", marks=interpreter_only)])
def test_tiny_linear_cpu(benchmark, backend, monkeypatch):
    benchmark.group = "tiny linear (CPU)"
    y = benchmark(tiny_linear_call(backend, monkeypatch))
    assert y.shape == TINY_LINEAR[::2] and torch.isfinite(y).all()


@pytest.mark.parametrize("backend", ["torch-fp32", "torch"])
def test_tiny_conv2d_cpu(benchmark, backend, monkeypatch):
    benchmark.group = "tiny conv2d (CPU)"
    y = benchmark(tiny_conv_call(backend, monkeypatch))
    b, _, size, n = TINY_CONV
    assert y.shape == (b, n, size, size) and torch.isfinite(y).all()


# A VAE decoder activation at 512x512 (the largest a quantized SDXL-Turbo pipeline feeds a layer), bf16.
VAE_ACTIVATION = (1, 128, 512, 512)


def whole_tensor_unsigned_codes(x, x_scale, x_zero):
    """What the oneDNN backend did before it quantized in chunks: whole-tensor float32 temporaries."""
    q = torch.div(x.float(), x_scale).round_()
    return q.add_(x_zero + 128).clamp_(0, 255).to(torch.uint8)


@pytest.mark.parametrize("method", ["whole-tensor", "chunked"])
def test_activation_quantization(benchmark, method):
    """uint8 codes of a large activation: the chunked pass through a reused scratch (onednn's) against
    whole-tensor temporaries, whose fresh allocations page-fault on first touch."""
    from mixq.kernels import onednn

    benchmark.group = "activation quantization, 128x512x512 bf16 (CPU)"
    x = (torch.randn(VAE_ACTIVATION, generator=torch.Generator().manual_seed(0)) * 3).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    scale, zero = torch.tensor(0.05), torch.tensor(3.0)
    run = (lambda: whole_tensor_unsigned_codes(x, scale, zero)) if method == "whole-tensor" else \
        (lambda: onednn.quantize_input_unsigned(x, scale, zero, 8))
    codes = benchmark(run)
    assert torch.equal(codes, whole_tensor_unsigned_codes(x, scale, zero))
    assert codes.is_contiguous(memory_format=torch.channels_last)
