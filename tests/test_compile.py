"""torch.compile of quantized models in an ordinary process: after a calibration ran in it, on layers
built by load_quantized and by the diffusers backend, with LoRA adapters, and with mode="max-autotune".
These run in the pytest process itself, after whatever ran before them (no fresh interpreter)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import mixq
from mixq.kernels import onednn
from mixq.modules import QuantizedLayer
from tests.test_cpu_backend import DTYPES, SmallQuantizedModel, small_input

pytestmark = pytest.mark.skipif(onednn.unavailable_reason() is not None,
                                reason=f"oneDNN int8 kernels unavailable: {onednn.unavailable_reason()}")


def assert_compiles_like_eager(model, x, **compile_kwargs):
    """No graph break, and the compiled model's output is eager's (inductor may reorder the float math
    around the integer ops: within fp32 rounding of the output's scale)."""
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, **compile_kwargs)(x)
    if x.dtype == torch.float32:
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5 * float(eager.abs().max()))
    else:
        torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2 * float(eager.abs().max()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_compiles_in_the_process_that_calibrated(finished, dtype):
    """`finished` ran `python -m mixq.calibrate` (sensitivity, allocation, report) in this process."""
    assert (finished / "plan.yaml").is_file()
    assert_compiles_like_eager(SmallQuantizedModel(dtype), small_input(dtype))


def test_compiles_layers_built_by_load_quantized_and_the_diffusers_backend(_tiny_sdxl_master, tmp_path):
    from diffusers import UNet2DConditionModel

    pipe = mixq.quantize(copy.deepcopy(_tiny_sdxl_master), 4, 8, progress=False, num_prompts=2)
    mixq.save_quantized(pipe, tmp_path / "ckpt")
    pipe.unet.save_pretrained(tmp_path / "unet")
    loaded = mixq.load_quantized(copy.deepcopy(_tiny_sdxl_master), tmp_path / "ckpt").unet
    from_diffusers = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    for unet in (loaded, from_diffusers):
        name, layer = next((n, m) for n, m in unet.named_modules() if isinstance(m, QuantizedLayer)
                           and m.kind == "linear" and m.bos_mode == "none")
        x = torch.randn(2, 7, layer.in_features, generator=torch.Generator().manual_seed(0))
        assert_compiles_like_eager(layer, x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_compiles_layers_holding_their_weights_in_onednn_layout(dtype, monkeypatch):
    """Prepared 8-bit layers hand the ops their held oneDNN layout (no plain buffer) inside the graph too."""
    from mixq.kernels import dispatch

    monkeypatch.setenv("MIXQ_INT8_GEMM", "onednn")  # (convolutions may run on the fused GEMM by default)

    model = SmallQuantizedModel(dtype)
    for layer in model.modules():
        if isinstance(layer, QuantizedLayer):
            dispatch.prepare_layer(layer)
    assert model.conv.kernel_weight(0).is_mkldnn and model.linear.kernel_weight(0).is_mkldnn
    assert_compiles_like_eager(model, small_input(dtype))


def test_compiles_with_lora_adapters():
    from peft import LoraConfig, inject_adapter_in_model

    model = SmallQuantizedModel(torch.float32)
    model.anchor = nn.Parameter(torch.zeros(1))  # PEFT reads a model's device from its first parameter
    torch.manual_seed(1)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["conv", "linear", "low_bit"],
                                       init_lora_weights=False), model)
    assert_compiles_like_eager(model, small_input(torch.float32))


def test_compiles_with_max_autotune():
    assert_compiles_like_eager(SmallQuantizedModel(torch.float32), small_input(torch.float32), mode="max-autotune")


def test_a_whole_quantized_unet_traces_as_one_graph(_tiny_sdxl_master):
    """BOS-cached cross-attention layers and the non-finite check decide on data as the graph runs
    (torch.cond), not on the host: no graph break anywhere in a quantized UNet."""
    from tests.conftest import capture_unet_call

    pipe = copy.deepcopy(_tiny_sdxl_master)
    args, kwargs = capture_unet_call(pipe)
    mixq.quantize(pipe, 4, 8, progress=False, num_prompts=2, guidance_scale=0.0)
    assert any(getattr(m, "bos_mode", "none") == "cached" for m in pipe.unet.modules())
    explanation = torch._dynamo.explain(pipe.unet)(*args, **kwargs)
    assert explanation.graph_break_count == 0, explanation.break_reasons[:3]


def test_compiled_bos_rows_follow_the_input_like_eager():
    from mixq.modules import QLinear

    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    bos = torch.randn(16)
    layer = QLinear.from_float(linear, 8, 8, (-4.0,), (4.0,), bos_mode="cached", bos_input=bos)
    calibrated = torch.cat([bos.expand(2, 1, 16), torch.randn(2, 5, 16)], dim=1)
    other = calibrated.clone()
    other[:, 0] += 3.0  # token 0 differs from the calibrated one: computed from the input
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad(), pytest.warns(mixq.modules.BosMismatchWarning):
        eager_other = layer(other)
    with torch.no_grad():
        for x, eager in ((calibrated, layer(calibrated)), (other, eager_other)):
            torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(eager_other[:, 0], layer(calibrated)[:, 0])


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_compiled_layers_propagate_non_finite_inputs_like_eager(kind):
    from mixq.modules import QConv2d, QLinear

    torch.manual_seed(0)
    if kind == "linear":
        layer, x = QLinear.from_float(nn.Linear(16, 8), 8, 8, (-4.0,), (4.0,)), torch.randn(2, 5, 16)
        x[1, 2, 3] = float("nan")
    else:
        layer, x = QConv2d.from_float(nn.Conv2d(8, 4, 3, padding=1), 8, 8, (-4.0,), (4.0,)), torch.randn(1, 8, 6, 6)
        x[0, 2, 3, 3] = float("inf")
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        for inputs in (x.nan_to_num(), x):
            eager, out = layer(inputs), compiled(inputs)
            assert torch.equal(torch.isnan(out), torch.isnan(eager))
            torch.testing.assert_close(out.nan_to_num(), eager.nan_to_num(), rtol=1e-5, atol=1e-5)
    assert torch.isnan(eager).any() and not torch.isnan(eager).all()
