"""Opt-in components: the VAE decoder and the text encoders quantized through the UNet's layers, kernels,
calibration and checkpoint format; refusals that leave the pipeline as it was."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

import mixq
from mixq.checkpoint import MANIFEST_NAME, CheckpointError
from mixq.components import ComponentTree, component_of, parse_components
from mixq.errors import CalibrationFileError, ConfigError, PlanMismatchError
from mixq.layers import find_quantized_layers, quantizable_layers
from mixq.modules import QConv2d, QLinear

SAMPLING = dict(num_inference_steps=1, guidance_scale=0.0, height=64, width=64)
QUICK = dict(progress=False, num_prompts=2, **SAMPLING)
EVERY = ("unet", "vae", "text_encoder", "text_encoder_2")


def image(pipe, prompt="a red bus on a bridge"):
    return pipe(prompt, generator=torch.Generator().manual_seed(3), output_type="pt", **SAMPLING).images


def named(module, suffix: str):
    """The submodule whose name ends with `suffix` (transformers releases differ in the text model's nesting)."""
    return next(m for n, m in module.named_modules() if n.endswith(suffix))


def quantized_anywhere(pipe) -> list[str]:
    return [f"{c}.{n}" for c in EVERY for n in find_quantized_layers(getattr(pipe, c))]


@pytest.fixture(scope="module")
def every_component(_tiny_sdxl_master):
    pipe = copy.deepcopy(_tiny_sdxl_master)
    return mixq.quantize(pipe, 8, 8, components=EVERY, **QUICK)


# --- what gets quantized -------------------------------------------------------------------------


def test_components_are_parsed_from_names_strings_and_mappings():
    assert list(parse_components(None)) == ["unet"]
    assert list(parse_components("unet, vae")) == ["unet", "vae"]
    assert parse_components({"unet": None, "text_encoder": (4, 8)})["text_encoder"].bits == (4, 8)
    assert parse_components(("vae", "unet"))["vae"].bits == (8, 8)  # the default of an opt-in component
    with pytest.raises(ConfigError, match="unknown component 'vea'"):
        parse_components(("unet", "vea"))
    with pytest.raises(ConfigError, match="leave out the UNet"):
        parse_components(("vae",))
    with pytest.raises(ConfigError, match="bits of component 'vae'"):
        parse_components({"unet": None, "vae": (3, 8)})


def test_every_component_is_quantized_with_its_defaults(every_component, _tiny_sdxl_master):
    rows = {r["name"]: r for r in mixq.summary(every_component)}
    by_group = {}
    for r in rows.values():
        by_group.setdefault(r["group"], []).append(r)
    assert {"content", "quality", "vae", "text_encoder", "text_encoder_2"} <= set(by_group)
    # VAE: the decoder only, its first/last convs, mid-block attention and up-block shortcuts kept in floating point
    assert all(n.startswith("vae.decoder.") for n in rows if component_of(n) == "vae")
    for kept in ("vae.decoder.conv_in", "vae.decoder.conv_out", "vae.decoder.mid_block.attentions.0.to_q",
                 "vae.decoder.up_blocks.1.resnets.0.conv_shortcut"):
        assert rows[kept]["w_bits"] == 16
    assert rows["vae.decoder.up_blocks.0.resnets.0.conv1"]["w_bits"] == 8
    assert isinstance(every_component.vae.decoder.up_blocks[0].resnets[0].conv1, QConv2d)
    # text encoders: every Linear W8A8 with its token-0 row stored; the pooled projection kept
    encoder_rows = [r for g in ("text_encoder", "text_encoder_2") for r in by_group[g]]
    assert all(r["bos"] == "cached" for r in encoder_rows if r["w_bits"] == 8)
    assert rows["text_encoder_2.text_projection"]["w_bits"] == 16
    assert isinstance(named(every_component.text_encoder, "layers.0.mlp.fc1"), QLinear)
    # the encoder of the VAE is never touched
    assert not find_quantized_layers(every_component.vae.encoder)
    assert every_component.unet.mixq_info["components"] == list(EVERY)
    assert every_component.vae.mixq_info["bits"]["vae.decoder.up_blocks.0.resnets.0.conv1"] == [8, 8]


def test_quantized_components_stay_close_to_float(every_component, _tiny_sdxl_master):
    reference, quantized = image(_tiny_sdxl_master), image(every_component)
    unet_only = mixq.quantize(copy.deepcopy(_tiny_sdxl_master), 8, 8, **QUICK)
    assert 0 < (quantized - reference).abs().mean() < 0.05
    assert not torch.equal(quantized, image(unet_only))  # the other components did change something


def test_text_encoder_token_zero_is_exact(every_component, _tiny_sdxl_master):
    """Token 0 of a causal text encoder is prompt-independent: its stored output row is the float one."""
    ids = _tiny_sdxl_master.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        float_states = _tiny_sdxl_master.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        quantized_states = every_component.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(quantized_states[:, 0], float_states[:, 0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(quantized_states[:, 1:], float_states[:, 1:], atol=1e-6)


def test_component_bits_and_a_plan_covering_the_vae(_tiny_sdxl_master):
    pipe = copy.deepcopy(_tiny_sdxl_master)
    unet_layers = quantizable_layers(pipe.unet)
    vae_layers = [n for n in quantizable_layers(ComponentTree.of(pipe, ("unet", "vae"))) if component_of(n) == "vae"]
    plan = {**{n: {"w_bits": 8, "a_bits": 8} for n in unet_layers}, **{n: {"w_bits": 4, "a_bits": 8} for n in vae_layers}}
    mixq.quantize(pipe, plan=plan, components=("unet", "vae"), **QUICK)
    conv = pipe.vae.decoder.up_blocks[0].resnets[0].conv1
    assert isinstance(conv, QConv2d) and conv.w_bits == 4

    other = mixq.quantize(copy.deepcopy(_tiny_sdxl_master), components={"unet": None, "text_encoder": (4, 8)}, **QUICK)
    assert named(other.text_encoder, "layers.0.mlp.fc1").w_bits == 4
    assert not find_quantized_layers(other.vae)


def test_keep_fp_replaces_only_the_defaults_of_the_components_it_names(_tiny_sdxl_master):
    pipe = mixq.quantize(copy.deepcopy(_tiny_sdxl_master), components=("unet", "vae"),
                         keep_fp=["vae.decoder.up_blocks.0.*"], **QUICK)
    rows = {r["name"]: r for r in mixq.summary(pipe)}
    assert rows["vae.decoder.up_blocks.0.resnets.0.conv1"]["w_bits"] == 16
    assert rows["vae.decoder.conv_out"]["w_bits"] == 8  # the VAE's defaults replaced by the given pattern
    assert rows["conv_in"]["w_bits"] == 16  # the UNet's defaults still hold


# --- checkpoints ---------------------------------------------------------------------------------


def test_save_load_round_trip_is_bit_identical(every_component, _tiny_sdxl_master, tmp_path):
    mixq.save_quantized(every_component, tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / MANIFEST_NAME).read_text())
    assert sorted(manifest["components"]) == ["text_encoder", "text_encoder_2", "vae"]
    loaded = mixq.load_quantized(copy.deepcopy(_tiny_sdxl_master), tmp_path / "ckpt")
    assert torch.equal(image(loaded), image(every_component))
    assert mixq.summary(loaded) == mixq.summary(every_component)
    assert loaded.vae.mixq_info["bits"] == every_component.vae.mixq_info["bits"]


def test_a_unet_only_checkpoint_has_no_components(_tiny_sdxl_master, tmp_path):
    pipe = mixq.quantize(copy.deepcopy(_tiny_sdxl_master), 8, 8, **QUICK)
    mixq.save_quantized(pipe, tmp_path)
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["components"] == {}
    loaded = mixq.load_quantized(copy.deepcopy(_tiny_sdxl_master), tmp_path)
    assert not find_quantized_layers(loaded.vae) and find_quantized_layers(loaded.unet)


def test_loading_into_a_pipeline_with_another_vae_changes_nothing(every_component, _tiny_sdxl_master, tmp_path):
    mixq.save_quantized(every_component, tmp_path)
    target = copy.deepcopy(_tiny_sdxl_master)
    with torch.no_grad():
        target.vae.encoder.conv_in.weight.add_(0.01)  # a weight the checkpoint does not store
    with pytest.raises(CheckpointError, match="pipeline's vae is not the model"):
        mixq.load_quantized(target, tmp_path)
    assert not quantized_anywhere(target)

    target.vae = None  # a pipeline without the component
    with pytest.raises(CheckpointError, match="also quantizes the pipeline's vae"):
        mixq.load_quantized(target, tmp_path)
    assert not quantized_anywhere(copy.deepcopy(_tiny_sdxl_master))


def test_a_manifest_naming_layers_of_an_unlisted_component_is_refused(every_component, _tiny_sdxl_master, tmp_path):
    from mixq.checkpoint import manifest_problems

    mixq.save_quantized(every_component, tmp_path)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    del manifest["components"]["vae"]
    assert any("layers of vae but no components['vae']" in p for p in manifest_problems(manifest))
    manifest["components"]["vea"] = {"model": {}, "mixq_info": {}}
    assert any("'vea'" in p for p in manifest_problems(manifest))


# --- bad input: one clear error each, the pipeline unchanged ---------------------------------------


@pytest.mark.parametrize("components, error, match", [
    (("unet", "vea"), ConfigError, "unknown component 'vea'"),
    (("vae",), ConfigError, "leave out the UNet"),
])
def test_bad_component_names_change_nothing(_tiny_sdxl_master, components, error, match):
    pipe = copy.deepcopy(_tiny_sdxl_master)
    with pytest.raises(error, match=match):
        mixq.quantize(pipe, components=components, **QUICK)
    assert not quantized_anywhere(pipe)


def test_a_component_the_pipeline_lacks_or_without_layers_is_refused(_tiny_sdxl_master, _tiny_sd15_master):
    sd15 = copy.deepcopy(_tiny_sd15_master)
    with pytest.raises(ConfigError, match="has no 'text_encoder_2' module"):
        mixq.quantize(sd15, components=("unet", "text_encoder_2"), **QUICK)
    assert not find_quantized_layers(sd15.unet)

    pipe = copy.deepcopy(_tiny_sdxl_master)
    pipe.text_encoder = nn.Sequential(nn.ReLU())  # a module with nothing mixq can quantize
    with pytest.raises(ConfigError, match="component 'text_encoder' has no Linear/Conv2d"):
        mixq.quantize(pipe, components=("unet", "text_encoder"), **QUICK)
    assert not find_quantized_layers(pipe.unet)


def test_a_plan_naming_layers_of_a_component_not_quantized_is_refused(_tiny_sdxl_master):
    pipe = copy.deepcopy(_tiny_sdxl_master)
    plan = {n: {"w_bits": 8, "a_bits": 8} for n in quantizable_layers(pipe.unet)}
    plan["vae.decoder.up_blocks.0.resnets.0.conv1"] = {"w_bits": 4, "a_bits": 8}
    with pytest.raises(PlanMismatchError, match="layers of the vae .* not being quantized: add it to components"):
        mixq.quantize(pipe, plan=plan, **QUICK)
    with pytest.raises(PlanMismatchError, match="gives no bits for"):  # covers the VAE only in part
        mixq.quantize(pipe, plan=plan, components=("unet", "vae"), **QUICK)
    assert not quantized_anywhere(pipe)


def test_ranges_recorded_without_a_component_are_refused_naming_it(_tiny_sdxl_master):
    pipe = copy.deepcopy(_tiny_sdxl_master)
    calibration = mixq.calibrate_ranges(pipe, **QUICK)
    with pytest.raises(CalibrationFileError, match="recorded without the vae"):
        mixq.quantize(pipe, components=("unet", "vae"), calibration=calibration, **QUICK)
    assert not quantized_anywhere(pipe)
    # ranges recorded with the VAE quantize it without another calibration
    with_vae = mixq.calibrate_ranges(pipe, components=("unet", "vae"), **QUICK)
    assert any(component_of(n) == "vae" for n in with_vae.layers)
    mixq.quantize(pipe, components=("unet", "vae"), calibration=with_vae)
    assert find_quantized_layers(pipe.vae)


# --- the calibration CLI -------------------------------------------------------------------------


def test_calibrate_with_components_records_their_ranges_and_reports_them(tmp_path):
    """`components` in the config (--components): collect observes the VAE decoder and the text encoders,
    the plan stays the UNet's, and the content check adds UNet+VAE and UNet+VAE+text encoders rows."""
    import yaml

    from mixq.calib.content import PLAN_NAME
    from mixq.calibration import Calibration
    from tests.test_calibrate import run_small_proving

    out = run_small_proving(tmp_path, "proving-components", content_prompts=4, components=list(EVERY))
    ranges = Calibration.load(out / "activation_ranges.safetensors")
    assert {component_of(n) for n in ranges.layers} == set(EVERY)
    assert all(r.calls > 0 for r in ranges.layers.values())
    assert "vae.decoder.conv_out" not in ranges.layers  # a default keep-fp layer of the VAE
    plan = yaml.safe_load((out / "plan.yaml").read_text())["layers"]
    assert {component_of(n) for n in plan} == {"unet"}
    names = [row["name"] for row in yaml.safe_load((out / "content.yaml").read_text())["rows"]]
    added = ["uniform W8A8 + VAE decoder W8A8", f"{PLAN_NAME} + VAE decoder W8A8",
             "uniform W8A8 + VAE decoder W8A8 + text encoders W8A8", f"{PLAN_NAME} + VAE decoder W8A8 + text encoders W8A8"]
    assert names[-4:] == added
    report = (out / "report.md").read_text()
    assert all(name in report for name in added)
    assert "against the UNet alone" in report
    rows = {row["name"]: row for row in yaml.safe_load((out / "content.yaml").read_text())["rows"]}
    assert rows[added[0]]["vs_unet_only"]["base"] == "uniform W8A8"
    assert rows[added[3]]["vs_unet_only"]["base"] == PLAN_NAME
    assert 0 <= rows[added[0]]["vs_unet_only"]["mcnemar_p"] <= 1
    # what the run measured quantizes the pipeline the same way, through the API
    pipe = mixq.quantize(mixq.proving.load_pipeline(), plan=out / "plan.yaml", calibration=out, components=EVERY)
    assert find_quantized_layers(pipe.vae) and find_quantized_layers(pipe.text_encoder_2)


def test_calibrate_refuses_an_unknown_component_before_loading(tmp_path, capsys):
    from mixq.calibrate import main

    assert main(["--components", "unet,vea", "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "unknown component 'vea'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_component_rows_are_compared_with_the_unet_alone():
    """Paired against the same UNet configuration: a difference is claimed only at p < 0.01."""
    import numpy as np
    from types import SimpleNamespace

    from mixq.calib.content import component_comparisons, component_sentence

    n = 40
    verdict = lambda ok: SimpleNamespace(correct=ok)  # noqa: E731
    verdicts = {"float": [verdict(True)] * n, "uniform W8A8": [verdict(True)] * n,
                "uniform W8A8 + VAE decoder W8A8": [verdict(i >= 30) for i in range(n)],  # 30 prompts lost
                "mixed plan": [verdict(True)] * n, "mixed plan + VAE decoder W8A8": [verdict(i != 0) for i in range(n)]}
    rng = np.random.default_rng(0)
    images = {name: rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8) for name in verdicts}
    rows = [{"name": name, "n": n, "content": {"overall": float(np.mean([v.correct for v in vs]))}}
            for name, vs in verdicts.items()]
    component_comparisons(rows, images, verdicts)
    by_name = {r["name"]: r for r in rows}
    assert "vs_unet_only" not in by_name["uniform W8A8"]
    lost = by_name["uniform W8A8 + VAE decoder W8A8"]["vs_unet_only"]
    assert lost["base"] == "uniform W8A8" and lost["content_difference"] == -0.75 and lost["mcnemar_p"] < 1e-6
    assert "LESS content than uniform W8A8 alone" in component_sentence(by_name["uniform W8A8 + VAE decoder W8A8"])
    one = by_name["mixed plan + VAE decoder W8A8"]
    assert one["vs_unet_only"]["mcnemar_p"] == 1.0
    assert "no significant difference in content from mixed plan alone" in component_sentence(one)


def test_save_pretrained_of_a_quantized_vae_is_refused(every_component, tmp_path):
    """diffusers would store the integer buffers as weights and reload random ones: refused, naming the fix."""
    with pytest.raises(CheckpointError, match="mixq.save_quantized"):
        every_component.vae.save_pretrained(tmp_path / "vae")
    with pytest.raises(CheckpointError, match="holds mixq-quantized layers"):
        every_component.save_pretrained(tmp_path / "pipe")
