"""mixq.quantize on offline tiny pipelines: coverage, fidelity, integer path vs simulation, BOS,
memory, dtypes, and errors that leave the pipeline untouched."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import yaml

import mixq
from mixq.layers import quantizable_layers
from mixq.modules import QConv2d, QLinear, QuantizedLayer
from tests.conftest import capture_unet_call, unet_output

CALIB = dict(num_prompts=8, num_inference_steps=1, guidance_scale=0.0, progress=False)


@pytest.fixture(scope="module")
def calibrated(_tiny_sdxl_master):
    """(float pipeline, its calibration, a realistic UNet call, the float UNet output)."""
    pipe = copy.deepcopy(_tiny_sdxl_master)
    calibration = mixq.calibrate_ranges(pipe, **CALIB)
    call = capture_unet_call(pipe)
    return pipe, calibration, call, unet_output(pipe.unet, call)


def quantized_copy(calibrated, w_bit, a_bit, **kwargs):
    pipe, calibration, _, _ = calibrated
    return mixq.quantize(copy.deepcopy(pipe), w_bit, a_bit, calibration=calibration, **kwargs)


def test_w8a8_replaces_every_layer_but_keep_fp_and_keeps_fidelity(calibrated, record_property):
    pipe, _, call, reference = calibrated
    names = quantizable_layers(pipe.unet)
    q = quantized_copy(calibrated, 8, 8)
    for name in names:
        module = q.unet.get_submodule(name)
        if name in ("conv_in", "conv_out"):
            assert type(module) is nn.Conv2d
        else:
            assert isinstance(module, (QLinear, QConv2d)), name
            assert (module.w_bits, module.a_bits) == (8, 8)
    sqnr = mixq.sqnr_db(reference, unet_output(q.unet, call))
    record_property("w8a8_unet_sqnr_db", sqnr)
    print(f"W8A8 UNet SQNR vs float: {sqnr:.2f} dB")
    assert sqnr >= 25


def test_lower_weight_bits_run_and_degrade_in_order(calibrated, record_property):
    _, _, call, reference = calibrated
    sqnrs = {}
    for w_bit in (8, 4, 2):
        out = unet_output(quantized_copy(calibrated, w_bit, 8).unet, call)
        assert torch.isfinite(out).all()
        sqnrs[w_bit] = mixq.sqnr_db(reference, out)
        record_property(f"w{w_bit}a8_unet_sqnr_db", sqnrs[w_bit])
    print("UNet SQNR vs float (dB):", {f"W{w}A8": round(s, 2) for w, s in sqnrs.items()})
    assert sqnrs[8] > sqnrs[4] > sqnrs[2]


@pytest.mark.parametrize("w_bit,a_bit", [(8, 8), (4, 8), (2, 8), (4, 4), (8, 16), (16, 8)])
def test_integer_path_matches_fake_quant_simulation(calibrated, w_bit, a_bit):
    _, _, call, _ = calibrated
    real = unet_output(quantized_copy(calibrated, w_bit, a_bit).unet, call)
    simulated = unet_output(quantized_copy(calibrated, w_bit, a_bit, simulate=True).unet, call)
    assert mixq.sqnr_db(simulated, real) >= 50


def test_mixed_plan_from_yaml_file(calibrated, tmp_path):
    pipe, _, call, reference = calibrated
    choices = [(8, 8), (4, 8), (2, 16), (16, 8), (4, 4)]
    names = [n for n in quantizable_layers(pipe.unet) if n not in ("conv_in", "conv_out")]
    layers = {n: dict(zip(("w_bits", "a_bits"), choices[i % len(choices)])) for i, n in enumerate(names)}
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump({"layers": layers}))
    q = quantized_copy(calibrated, 8, 8, plan=str(plan_file))
    rows = {r["name"]: r for r in mixq.summary(q)}
    for name, bits in layers.items():
        assert (rows[name]["w_bits"], rows[name]["a_bits"]) == (bits["w_bits"], bits["a_bits"])
    simulated = quantized_copy(calibrated, 8, 8, plan=layers, simulate=True)
    assert mixq.sqnr_db(unet_output(simulated.unet, call), unet_output(q.unet, call)) >= 50
    assert math.isfinite(mixq.sqnr_db(reference, unet_output(q.unet, call)))


def test_quantized_state_is_small(calibrated):
    for w_bit, limit in ((4, 0.32), (8, 0.57)):
        layers = [m for m in quantized_copy(calibrated, w_bit, 8).unet.modules() if isinstance(m, QuantizedLayer)]
        state = sum(m.state_bytes() for m in layers)
        fp16_weights = sum(2 * m.out_features * m.in_features * m.kernel_size[0] * m.kernel_size[1] for m in layers)
        assert state <= limit * fp16_weights, (w_bit, state / fp16_weights)


# --- BOS-aware cross-attention --------------------------------------------------------------------


def test_bos_row_equals_the_unquantized_layer(calibrated):
    pipe, _, call, _ = calibrated
    q = quantized_copy(calibrated, 4, 8)
    context = call[1]["encoder_hidden_states"]
    bos_layers = [n for n, info in quantizable_layers(pipe.unet).items() if info.bos]
    assert bos_layers and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in bos_layers)
    for name in bos_layers:
        float_out = pipe.unet.get_submodule(name)(context)
        layer = q.unet.get_submodule(name)
        assert layer.bos_mode == "cached"
        out = layer(context)
        # equal up to fp32 GEMM rounding (the stored row was computed on a [1, 1, K] input)
        torch.testing.assert_close(out[:, 0], float_out[:, 0], rtol=1e-6, atol=1e-6)
        assert not torch.equal(out[:, 1:], float_out[:, 1:])  # the rest really is quantized


def test_excluding_bos_changes_the_calibrated_range_when_token_0_is_an_outlier(tiny_sdxl):
    # Make BOS an outlier as in real CLIP encoders (~800 vs ~10).
    for encoder in (tiny_sdxl.text_encoder, tiny_sdxl.text_encoder_2):
        with torch.no_grad():
            row = encoder.get_input_embeddings().weight[tiny_sdxl.tokenizer.bos_token_id]
            row.mul_(500 / row.abs().max())
    calibration = mixq.calibrate_ranges(tiny_sdxl, **CALIB)
    call = capture_unet_call(tiny_sdxl)
    context = call[1]["encoder_hidden_states"]
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    r = calibration.layers[name]
    assert r.bos_constant
    # The range excludes token 0: it matches the other tokens and is far narrower than token 0.
    assert r.highs[0] <= float(context[:, 1:].amax()) + 1e-4
    assert float(context[:, 0].abs().max()) > 10 * max(abs(r.lows[0]), abs(r.highs[0]))
    # What it buys: the quantized layer keeps tokens 1.. accurate, which a range that includes the
    # BOS outlier cannot (its step is ~100x coarser than those tokens' values).
    float_layer = tiny_sdxl.unet.get_submodule(name)
    info = quantizable_layers(tiny_sdxl.unet)[name]
    reference = float_layer(context)
    aware = mixq.quantize(tiny_sdxl, 8, 8, calibration=calibration).unet.get_submodule(name)
    # The report's ablation (build_quantized_layer(bos_aware=False)): token 0 quantized with the rest.
    from mixq.api import build_quantized_layer, ranges_including_row
    naive = build_quantized_layer(float_layer, info, 8, 8, calibration, bos_aware=False)
    assert naive.bos_mode == "none" and float(naive.x_scale[0]) > 10 * float(aware.x_scale[0])
    assert ranges_including_row(r.lows, r.highs, r.bos_input) == ((min(r.lows[0], float(r.bos_input.min())),),
                                                                  (max(r.highs[0], float(r.bos_input.max())),))
    aware_sqnr = mixq.sqnr_db(reference[:, 1:], aware(context)[:, 1:])
    naive_sqnr = mixq.sqnr_db(reference[:, 1:], naive(context)[:, 1:])
    assert aware_sqnr > 30 and aware_sqnr > naive_sqnr + 20


def test_bos_falls_back_to_float_when_token_0_varies(tiny_sdxl):
    # With classifier-free guidance SDXL zeroes the negative prompt's embedding, token 0 included.
    with pytest.warns(UserWarning, match="token 0"):
        mixq.quantize(tiny_sdxl, 8, 8, num_prompts=2, num_inference_steps=1, guidance_scale=5.0, progress=False)
    layer = tiny_sdxl.unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k")
    assert layer.bos_mode == "float" and layer.bos_output is None
    assert tiny_sdxl.unet.mixq_info["bos_fallback"]
    image = tiny_sdxl(["a cat"], num_inference_steps=1, guidance_scale=5.0, output_type="pt").images
    assert torch.isfinite(image).all()


# --- pipelines, dtypes, summary ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_pipelines(_tiny_sdxl_master, dtype):
    pipe = copy.deepcopy(_tiny_sdxl_master).to(dtype=dtype)
    call = capture_unet_call(pipe)
    reference = unet_output(pipe.unet, call)
    mixq.quantize(pipe, 8, 8, **CALIB)
    layer = pipe.unet.get_submodule("mid_block.attentions.0.proj_in")
    assert layer.bias.dtype == dtype and layer.w_scale.dtype == torch.float32
    out = unet_output(pipe.unet, call)
    assert out.dtype == dtype
    assert mixq.sqnr_db(reference.float(), out.float()) >= 20
    images = pipe(["a dog"], num_inference_steps=1, guidance_scale=0.0, output_type="pt").images
    assert torch.isfinite(images.float()).all()


def test_scales_stay_fp32_when_the_quantized_pipe_is_cast(calibrated):
    q = quantized_copy(calibrated, 4, 8)
    q.to(torch.float16)
    layer = q.unet.get_submodule("mid_block.attentions.0.proj_in")
    assert layer.w_scale.dtype == torch.float32 and layer.x_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.float16 and layer.qweight_0.dtype == torch.uint8


def test_sd15_pipeline(tiny_sd15):
    call = capture_unet_call(tiny_sd15)
    reference = unet_output(tiny_sd15.unet, call)
    mixq.quantize(tiny_sd15, 8, 8, **CALIB)
    assert mixq.sqnr_db(reference, unet_output(tiny_sd15.unet, call)) >= 25
    images = tiny_sd15(["a dog"], num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_summary_rows_and_table(calibrated, capsys):
    q = quantized_copy(calibrated, 4, 8)
    rows = mixq.summary(q, print_table=True)
    assert len(rows) == len(quantizable_layers(calibrated[0].unet))
    by_name = {r["name"]: r for r in rows}
    assert by_name["conv_in"]["w_bits"] == 16
    assert by_name["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q"]["group"] == "content"
    assert by_name["down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"]["group"] == "content"
    assert by_name["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]["group"] == "quality"
    assert by_name["up_blocks.0.resnets.0.conv_shortcut"]["split"] is not None
    assert by_name["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"]["bos"] == "cached"
    printed = capsys.readouterr().out
    assert "average weight bits" in printed and "up_blocks.0.resnets.0.conv_shortcut" in printed


def test_keep_fp_accepts_globs_and_rejects_unknown_names(calibrated):
    q = quantized_copy(calibrated, 8, 8, keep_fp=["conv_in", "conv_out", "*ff.net.2"])
    assert all(type(q.unet.get_submodule(n)) is nn.Linear for n in quantizable_layers(q.unet) if n.endswith("ff.net.2"))
    with pytest.raises(ValueError, match="matches no Linear/Conv2d"):
        quantized_copy(calibrated, 8, 8, keep_fp=["conv_inn"])


# --- errors leave the pipeline as it was --------------------------------------------------------------


def assert_untouched(pipe, before):
    assert not any(isinstance(m, QuantizedLayer) for m in pipe.unet.modules())
    after = pipe.unet.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("kwargs,message", [
    (dict(w_bit=3), "unsupported weight bit-width 3"),
    (dict(a_bit=2), "unsupported activation bit-width 2"),
    (dict(prompts=[]), "no prompts"),
    (dict(prompts="missing-prompts.txt"), "does not exist"),
    (dict(plan={"not.a.layer": {"w_bits": 4, "a_bits": 8}}), "made for another model"),
    (dict(plan={"down_blocks.0.resnets.0.conv1": {"w_bits": 4, "a_bits": 8}}), "gives no bits"),
    (dict(plan={"down_blocks.0.resnets.0.conv1": {"w_bits": 5, "a_bits": 8}}), "unsupported weight bit-width 5"),
    (dict(plan={"model": "0123456789abcdef", "layers": {}}), "another model"),
])
def test_bad_input_is_a_clear_error_and_changes_nothing(tiny_sdxl, kwargs, message):
    before = copy.deepcopy(tiny_sdxl.unet.state_dict())
    args = {"w_bit": 8, "a_bit": 8, **kwargs}
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        mixq.quantize(tiny_sdxl, args.pop("w_bit"), args.pop("a_bit"), **{**CALIB, **args})
    assert_untouched(tiny_sdxl, before)


def test_nan_activations_name_the_layer(tiny_sdxl):
    victim = tiny_sdxl.unet.get_submodule("mid_block.attentions.0.proj_in")
    with torch.no_grad():
        victim.weight[0, 0] = float("nan")
    before = copy.deepcopy(tiny_sdxl.unet.state_dict())
    # Kept in floating point, the layer's NaN output reaches the next quantized layer, which is named.
    with pytest.raises(mixq.NonFiniteActivationError, match="mid_block.attentions.0.transformer_blocks.0.norm1|"
                       "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"):
        mixq.quantize(tiny_sdxl, 8, 8, keep_fp=["conv_in", "conv_out", "mid_block.attentions.0.proj_in"], **CALIB)
    assert_untouched(tiny_sdxl, before)
    # To be quantized, its weight is refused before calibration, naming it.
    with pytest.raises(mixq.NonFiniteActivationError, match="'mid_block.attentions.0.proj_in' has NaN/Inf .* weight"):
        mixq.quantize(tiny_sdxl, 8, 8, **CALIB)
    assert_untouched(tiny_sdxl, before)
    assert not any(m._forward_pre_hooks for m in tiny_sdxl.unet.modules())  # observers removed


def test_pipeline_without_unet_is_refused():
    class NotADiffusionPipeline:
        transformer = nn.Linear(2, 2)

    with pytest.raises(TypeError, match="no `.unet`"):
        mixq.quantize(NotADiffusionPipeline())


def test_quantizing_twice_is_refused(calibrated):
    q = quantized_copy(calibrated, 8, 8)
    with pytest.raises(ValueError, match="already quantized"):
        mixq.quantize(q, 8, 8, calibration=calibrated[1])


def test_calibration_from_another_model_is_refused(calibrated, tiny_sd15):
    with pytest.raises(ValueError, match="another model"):
        mixq.quantize(tiny_sd15, 8, 8, calibration=calibrated[1])
