"""The whole-UNet latency model (benchmarks/unet_estimate.py): it finds every kernel of the forward."""

from __future__ import annotations

import pytest
import torch

from benchmarks.unet_estimate import (GPUS, LAUNCH_S, Kernel, kernel_seconds, predict, quantize_passes,
                                      trace_kernels, validation)


@pytest.fixture(scope="module")
def tiny():
    from diffusers import UNet2DConditionModel

    from mixq.offline import SDXL_UNET_STRUCTURE, shrink_unet_config

    config = shrink_unet_config(dict(SDXL_UNET_STRUCTURE))
    unet = UNet2DConditionModel(**config)
    return config, unet, trace_kernels(config, latent=16)


def test_every_linear_conv_and_attention_is_one_kernel(tiny):
    from diffusers.models.attention_processor import Attention

    config, unet, kernels = tiny
    layers = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in unet.modules())
    attentions = sum(isinstance(m, Attention) for m in unet.modules())
    kinds = [k.kind for k in kernels]
    assert kinds.count("matrix") == layers and kinds.count("attention") == attentions
    assert kinds.count("memory") > layers  # norms, activations, adds: more than one per layer
    assert all(k.bytes > 0 for k in kernels) and all(k.flops > 0 for k in kernels if k.kind != "memory")


def test_the_model_prices_compute_memory_and_launches():
    gpu = GPUS["H100 SXM"]
    compute = Kernel("mm", "matrix", flops=2e12, bytes=1e6)
    memory = Kernel("add", "memory", flops=0.0, bytes=3.35e9)
    assert kernel_seconds(compute, gpu) == pytest.approx(2e12 / gpu.fp16_flops + LAUNCH_S)
    assert kernel_seconds(memory, gpu) == pytest.approx(1e-3 + LAUNCH_S)
    total = predict([compute, memory], gpu)
    assert total["total"] == pytest.approx(total["matrix"] + total["memory"]) and total["kernels"] == 2


def test_validation_ratio_is_measured_over_predicted(tiny):
    checked = validation(tiny[2])
    for row in checked["gpus"].values():
        assert row["ratio"] == pytest.approx(row["measured_ms"] / row["predicted_ms"])
    low, high = sorted(r["ratio"] for r in checked["gpus"].values())
    assert low <= checked["ratio"] <= high


def test_quantize_passes_skip_shared_inputs_and_float_layers():
    layers = [{"count": 10, "shared_input": 3, "kept_in_float": False},
              {"count": 1, "shared_input": 0, "kept_in_float": True}]
    assert quantize_passes(layers) == 7


def test_a_uniform_plan_reproduces_the_static_report_totals():
    """Per-layer pricing of a plan (mixed plans) agrees with the static report's per-shape totals."""
    import json
    from pathlib import Path

    from benchmarks.sdxl_shapes import layer_shapes
    from benchmarks.unet_estimate import plan_layers_seconds, sdxl_turbo_unet_config

    static = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/static/estimates.json").read_text())
    layers = layer_shapes(sdxl_turbo_unet_config())
    for bits in (8, 4):
        seconds, passes = plan_layers_seconds(static["layers"], layers, {layer["name"]: bits for layer in layers})
        assert seconds == pytest.approx(static["totals"][f"W{bits}A8 kernels + quantize passes"], rel=1e-9)
        assert passes == quantize_passes(static["layers"])
