"""mixq as a diffusers quantization backend: MixqConfig, from_pretrained(quantization_config=...),
save_pretrained -> from_pretrained (pre-quantized, in a fresh process), PipelineQuantizationConfig,
push_to_hub, and the same refusals as load_quantized."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mixq
from mixq import CheckpointError, MixqConfig
from mixq.errors import ConfigError
from mixq.layers import find_quantized_layers, quantizable_layers
from mixq.modules import QuantizedLayer
from tests.conftest import capture_unet_call

REPO = Path(__file__).resolve().parents[1]
MIXED_BITS = [(8, 8), (4, 8), (2, 8), (4, 4), (8, 16), (16, 8)]


def proving_folder() -> Path:
    from mixq.proving.model import pipeline_folder

    return pipeline_folder()


def mixed_plan(unet) -> dict:
    """Every bit pair mixq serves, layer after layer (conv_in/conv_out stay float: keep_fp's default)."""
    names = [n for n in quantizable_layers(unet) if n not in ("conv_in", "conv_out")]
    return {name: dict(zip(("w_bits", "a_bits"), MIXED_BITS[i % len(MIXED_BITS)])) for i, name in enumerate(names)}


@torch.no_grad()
def run(unet, call) -> torch.Tensor:
    """The UNet's output for a captured call (args, kwargs) of the pipeline."""
    from mixq.calib.collect import run_unet

    return run_unet(unet, call)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """The proving pipeline quantized with a mixed plan by mixq.quantize, its ranges and plan saved as a
    run folder would hold them, and its UNet saved with save_pretrained."""
    from mixq.proving import load_pipeline

    root = tmp_path_factory.mktemp("diffusers-backend")
    pipe = load_pipeline()
    plan = mixed_plan(pipe.unet)
    calibration = mixq.calibrate_ranges(pipe, "proving:calibration", 4, progress=False, num_inference_steps=2,
                                        guidance_scale=0.0, height=64, width=64)
    calibration.save(root / "run" / "activation_ranges.safetensors")
    write_plan(root / "run" / "plan.yaml", plan)
    call = capture_unet_call(pipe, prompts=("a red circle above a blue square", "a green triangle"), height=64,
                             width=64)
    mixq.quantize(pipe, plan=plan, calibration=calibration)
    pipe.unet.save_pretrained(root / "saved")
    return {"pipe": pipe, "plan": plan, "root": root, "run": root / "run", "saved": root / "saved", "inputs": call}


def write_plan(path: Path, layers: dict, model: str | None = None):
    import yaml

    path.write_text(yaml.safe_dump({"model": model, "layers": layers} if model else {"layers": layers}))


# --- registration and the config -----------------------------------------------------------------


def test_mixq_is_registered_in_diffusers_backend_mappings():
    from diffusers.quantizers import auto

    from mixq.diffusers_quantizer import MixqQuantizer

    assert auto.AUTO_QUANTIZER_MAPPING["mixq"] is MixqQuantizer
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["mixq"] is MixqConfig
    config = auto.DiffusersAutoQuantizer.from_dict({"quant_method": "mixq", "w_bit": 4, "a_bit": 8})
    assert isinstance(config, MixqConfig) and (config.w_bit, config.a_bit) == (4, 8)


def test_registration_fails_loudly_if_diffusers_moves_its_mappings(monkeypatch):
    from diffusers.quantizers import auto

    from mixq.diffusers_quantizer import register

    monkeypatch.setattr(auto, "AUTO_QUANTIZER_MAPPING", tuple(auto.AUTO_QUANTIZER_MAPPING.items()))
    with pytest.raises(RuntimeError, match="not supported by this mixq version"):
        register()
    with pytest.warns(UserWarning, match="diffusers quantization backend .* is unavailable"):  # import mixq warns
        mixq._register(register, "the diffusers quantization backend (MixqConfig)")


def test_config_round_trips_through_dict_and_json():
    config = MixqConfig(w_bit=2, a_bit=4, plan="runs/x/plan.yaml", calibration=Path("runs/x"), keep_fp="conv_in")
    data = json.loads(config.to_json_string())
    again = MixqConfig.from_dict(data)
    assert again.to_dict() == config.to_dict() == data
    assert data["quant_method"] == "mixq" and data["calibration"] == "runs/x" and data["keep_fp"] == ["conv_in"]


@pytest.mark.parametrize("kwargs, match", [
    ({"w_bit": 3}, "weight bit-width 3"),
    ({"a_bit": 2}, "activation bit-width 2"),
    ({"w_bits": 4}, r"unknown field\(s\) \['w_bits'\]"),
    ({"plan": 4}, "plan must be"),
    ({"calibration": object()}, "calibration must be"),
])
def test_invalid_config_is_one_clear_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MixqConfig(**kwargs)


# --- quantize while loading, save, load pre-quantized --------------------------------------------


def test_from_pretrained_quantizes_while_loading_like_mixq_quantize(quantized):
    from diffusers import UNet2DConditionModel

    config = MixqConfig(plan=str(quantized["run"] / "plan.yaml"), calibration=str(quantized["run"]))
    unet = UNet2DConditionModel.from_pretrained(proving_folder(), subfolder="unet", quantization_config=config,
                                                torch_dtype=torch.float32)
    assert len(find_quantized_layers(unet)) == len(find_quantized_layers(quantized["pipe"].unet))
    assert torch.equal(run(unet, quantized["inputs"]), run(quantized["pipe"].unet, quantized["inputs"]))
    assert unet.config.quantization_config is config and config.is_quantized


def test_activation_quantization_without_calibration_is_refused_before_loading():
    from diffusers import UNet2DConditionModel

    with pytest.raises(ConfigError, match="calibration="):
        UNet2DConditionModel.from_pretrained(proving_folder(), subfolder="unet",
                                             quantization_config=MixqConfig(w_bit=4, a_bit=8))


def test_weight_only_quantizes_while_loading_without_calibration():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(proving_folder(), subfolder="unet",
                                                quantization_config=MixqConfig(w_bit=4, a_bit=16))
    layers = [m for m in unet.modules() if isinstance(m, QuantizedLayer)]
    assert layers and all((m.w_bits, m.a_bits) == (4, 16) for m in layers)


def test_a_plan_for_another_model_is_refused(quantized, tmp_path):
    from diffusers import UNet2DConditionModel

    from mixq.plan import PlanMismatchError

    write_plan(tmp_path / "plan.yaml", {"conv_in": {"w_bits": 8, "a_bits": 8}}, model="0123456789abcdef")
    with pytest.raises(PlanMismatchError, match="another model"):
        UNet2DConditionModel.from_pretrained(proving_folder(), subfolder="unet", quantization_config=MixqConfig(
            plan=str(tmp_path / "plan.yaml"), calibration=str(quantized["run"])))


def test_save_pretrained_writes_a_diffusers_folder_with_the_quantization_config(quantized):
    saved = quantized["saved"]
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    config = json.loads((saved / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "mixq"
    manifest = config["manifest"]
    assert manifest["format_version"] == mixq.checkpoint.FORMAT_VERSION
    saved_bits = {n: [e["w_bits"], e["a_bits"]] for n, e in manifest["layers"].items()}
    assert saved_bits == {n: [b["w_bits"], b["a_bits"]] for n, b in quantized["plan"].items() if n in saved_bits}
    assert sorted(saved_bits) == sorted(find_quantized_layers(quantized["pipe"].unet))
    assert {tuple(bits) for bits in saved_bits.values()} == set(MIXED_BITS)


FRESH_PROCESS = """
import sys, torch, mixq
from diffusers import UNet2DConditionModel
from mixq.modules import QuantizedLayer
from tests.test_diffusers_backend import run
unet = UNet2DConditionModel.from_pretrained(sys.argv[1])
assert sum(isinstance(m, QuantizedLayer) for m in unet.modules()) == int(sys.argv[4])
torch.save(run(unet, torch.load(sys.argv[2], weights_only=False)), sys.argv[3])
"""


def test_round_trip_in_a_fresh_process_gives_identical_outputs(quantized, tmp_path):
    torch.save(quantized["inputs"], tmp_path / "inputs.pt")
    layers = len(find_quantized_layers(quantized["pipe"].unet))
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(quantized["saved"]), str(tmp_path / "inputs.pt"),
                             str(tmp_path / "out.pt"), str(layers)], cwd=REPO, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), run(quantized["pipe"].unet, quantized["inputs"]))


def test_loaded_model_saves_again_and_serves_in_a_pipeline(quantized, tmp_path):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(quantized["saved"])
    unet.save_pretrained(tmp_path / "again")
    again = UNet2DConditionModel.from_pretrained(tmp_path / "again")
    assert torch.equal(run(again, quantized["inputs"]), run(quantized["pipe"].unet, quantized["inputs"]))
    pipe = StableDiffusionXLPipeline.from_pretrained(proving_folder(), unet=again, torch_dtype=torch.float32)
    image = pipe("a red circle", num_inference_steps=1, guidance_scale=0.0, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and bool(torch.isfinite(torch.from_numpy(image)).all())


def test_half_precision_load_keeps_scales_in_float32(quantized):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(quantized["saved"], torch_dtype=torch.bfloat16)
    layer = next(m for m in unet.modules() if isinstance(m, QuantizedLayer) and m.bias is not None)
    assert layer.w_scale.dtype == layer.x_scale.dtype == torch.float32 and layer.bias.dtype == torch.bfloat16
    assert unet.conv_in.weight.dtype == torch.bfloat16


def cast_floats(value, dtype):
    if torch.is_tensor(value):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: cast_floats(v, dtype) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cast_floats(v, dtype) for v in value)
    return value


def test_a_copy_cast_to_bfloat16_saves_itself(quantized, tmp_path):
    """The config of a deep-copied pipeline describes the copy (its dtype here), not the original."""
    from diffusers import UNet2DConditionModel

    copy_ = copy.deepcopy(quantized["pipe"])
    copy_.unet.to(torch.bfloat16)
    assert copy_.unet.config.quantization_config is not quantized["pipe"].unet.config.quantization_config
    copy_.unet.save_pretrained(tmp_path / "bf16")
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "bf16", torch_dtype=torch.bfloat16)
    call = cast_floats(quantized["inputs"], torch.bfloat16)
    assert torch.equal(run(loaded, call), run(copy_.unet, call))
    layer = next(m for m in quantized["pipe"].unet.modules() if isinstance(m, QuantizedLayer) and m.bias is not None)
    assert layer.bias.dtype == torch.float32  # the original is untouched


def test_pipeline_quantization_config_quantizes_the_unet(quantized):
    from diffusers import StableDiffusionXLPipeline
    from diffusers.quantizers import PipelineQuantizationConfig

    config = PipelineQuantizationConfig(quant_mapping={"unet": MixqConfig(
        plan=str(quantized["run"] / "plan.yaml"), calibration=str(quantized["run"]))})
    pipe = StableDiffusionXLPipeline.from_pretrained(proving_folder(), quantization_config=config,
                                                     torch_dtype=torch.float32)
    assert torch.equal(run(pipe.unet, quantized["inputs"]), run(quantized["pipe"].unet, quantized["inputs"]))
    assert not find_quantized_layers(pipe.text_encoder)


def test_push_to_hub_uploads_a_folder_that_loads(quantized, tmp_path, monkeypatch):
    """The Hub calls are diffusers' (create_repo, then its upload of the saved folder): replaced by a copy
    to a local folder, which must load as the repo would."""
    import shutil

    from diffusers import UNet2DConditionModel
    from diffusers.models import modeling_utils

    uploaded = tmp_path / "hub"

    class Repo:
        repo_id = "someone/proving-mixq"

    monkeypatch.setattr(modeling_utils, "create_repo", lambda repo_id, **kwargs: Repo())
    monkeypatch.setattr(UNet2DConditionModel, "_upload_folder",
                        lambda self, folder, repo_id, **kwargs: shutil.copytree(folder, uploaded))
    quantized["pipe"].unet.save_pretrained(str(tmp_path / "local"), push_to_hub=True, repo_id=Repo.repo_id)
    loaded = UNet2DConditionModel.from_pretrained(uploaded)
    assert torch.equal(run(loaded, quantized["inputs"]), run(quantized["pipe"].unet, quantized["inputs"]))


# --- the refusals of load_quantized ----------------------------------------------------------------


def copy_saved(quantized, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(quantized["saved"], tmp_path / "copy"))


def edit_config(folder: Path, change):
    path = folder / "config.json"
    data = json.loads(path.read_text())
    change(data["quantization_config"]["manifest"])
    path.write_text(json.dumps(data))


def rewrite_weights(folder: Path, change):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = folder / "diffusion_pytorch_model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)


def load(folder):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder)


def test_truncated_weights_file_is_refused(quantized, tmp_path):
    folder = copy_saved(quantized, tmp_path)
    path = folder / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(Exception, match="diffusion_pytorch_model.safetensors|truncated|deserializ"):
        load(folder)


def test_altered_quantized_tensor_is_refused(quantized, tmp_path):
    folder = copy_saved(quantized, tmp_path)
    name = next(iter(json.loads((folder / "config.json").read_text())["quantization_config"]["manifest"]["layers"]))

    def flip(tensors):
        tensors[f"{name}.qweight_0"].view(-1)[0] ^= 1

    rewrite_weights(folder, flip)
    with pytest.raises(CheckpointError, match="do not match the sha256"):
        load(folder)


def test_weights_of_another_base_model_are_refused(quantized, tmp_path):
    folder = copy_saved(quantized, tmp_path)

    def other_base(tensors):
        tensors["conv_in.weight"] = tensors["conv_in.weight"] * 1.5

    rewrite_weights(folder, other_base)
    with pytest.raises(CheckpointError, match="not the model this checkpoint was made from"):
        load(folder)


def test_unknown_format_version_is_refused(quantized, tmp_path):
    folder = copy_saved(quantized, tmp_path)
    edit_config(folder, lambda manifest: manifest.update(format_version=99))
    with pytest.raises(CheckpointError, match="format 99.*upgrade mixq|newer"):
        load(folder)


def test_edited_layer_entry_is_refused(quantized, tmp_path):
    folder = copy_saved(quantized, tmp_path)

    def fewer_activation_bits(manifest):
        entry = next(e for e in manifest["layers"].values() if e["a_bits"] == 8)
        entry["a_bits"] = 4

    edit_config(folder, fewer_activation_bits)
    with pytest.raises(CheckpointError, match="edited after saving"):
        load(folder)


def test_config_of_another_architecture_is_refused(quantized, tmp_path):
    folder = copy_saved(quantized, tmp_path)
    edit_config(folder, lambda manifest: manifest["model"].update(fingerprint="0123456789abcdef"))
    with pytest.raises(CheckpointError, match="edited after saving"):
        load(folder)


def test_non_safetensors_save_is_refused(quantized, tmp_path):
    with pytest.raises(CheckpointError, match="safetensors only"):
        quantized["pipe"].unet.save_pretrained(tmp_path / "bin", safe_serialization=False)
