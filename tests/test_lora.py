"""LoRA: unfused adapters are refused, fused ones are quantized; the LCM-LoRA flow on SDXL and SD1.5 end to end.

The LoRA is a randomly initialised PEFT adapter on the LCM-LoRA target modules (rank 4 instead of 64),
added with `unet.add_adapter`, or saved to a LoRA file and loaded with `pipe.load_lora_weights(folder)` as
users load latent-consistency/lcm-lora-*. In diffusers 0.42 `pipe.fuse_lora()` + `pipe.unload_lora_weights()`
fuse it and remove the PEFT wrappers in both cases.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import mixq
from mixq.checkpoint import CheckpointError
from mixq.layers import find_lora_layers, find_quantized_layers
from mixq.offline import tiny_sd15_pipeline, tiny_sdxl_pipeline
from tests.conftest import capture_unet_call, unet_output
from tests.test_checkpoint import assert_load_fails, assert_same_state, unet_snapshot

# The UNet modules latent-consistency/lcm-lora-sdxl adapts (the SD1.5 LCM-LoRA uses the same kinds).
LCM_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                    "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
LCM = dict(num_inference_steps=4, guidance_scale=1.0)
ONE_PROMPT = ("a red bus on a bridge",)


def add_random_lcm_lora(pipe, seed: int = 0):
    """Random (non-zero) A and B, so that the adapter changes the output; the same seed, the same LoRA."""
    from peft import LoraConfig

    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LCM_LORA_TARGETS, init_lora_weights=False))
    return pipe


def fuse_lora(pipe):
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return pipe


def use_lcm_scheduler(pipe):
    from diffusers import LCMScheduler

    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    return pipe


def lcm_lora_pipeline(master, seed: int = 0):
    """A copy of the float pipeline with the LCM scheduler and the random LoRA fused."""
    return fuse_lora(add_random_lcm_lora(use_lcm_scheduler(copy.deepcopy(master)), seed))


# --- refusals ------------------------------------------------------------------------------------


def test_unfused_lora_is_refused_and_pipe_untouched(tiny_sdxl):
    add_random_lcm_lora(tiny_sdxl)
    lora_layers = find_lora_layers(tiny_sdxl.unet)
    assert len(lora_layers) > 100
    before = unet_snapshot(tiny_sdxl.unet)

    with pytest.raises(ValueError, match=r"LoRA.*pipe\.fuse_lora\(\)"):
        mixq.quantize(tiny_sdxl, 8, 8, progress=False, num_prompts=2)

    assert unet_snapshot(tiny_sdxl.unet)["modules"] == before["modules"]
    assert_same_state(tiny_sdxl.unet.state_dict(), before["state"])
    assert find_lora_layers(tiny_sdxl.unet) == lora_layers
    assert not find_quantized_layers(tiny_sdxl.unet)
    assert not hasattr(tiny_sdxl.unet, "mixq_info")


def test_fused_but_not_unloaded_lora_is_refused(tiny_sd15):
    add_random_lcm_lora(tiny_sd15).fuse_lora()  # merged into the base weights, PEFT wrappers still in place
    with pytest.raises(ValueError, match="LoRA"):
        mixq.quantize(tiny_sd15, 8, 8, progress=False, num_prompts=2)
    assert not find_quantized_layers(tiny_sd15.unet)


# --- the LCM-LoRA flow ---------------------------------------------------------------------------


def save_random_lcm_lora(master, folder, seed: int = 0) -> Path:
    """A LoRA file like latent-consistency/lcm-lora-*, written by diffusers: users load it by name."""
    from peft.utils import get_peft_model_state_dict

    scratch = add_random_lcm_lora(copy.deepcopy(master), seed)
    type(scratch).save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(scratch.unet))
    return folder


def check_lcm_lora_flow(master, tmp_path):
    """load LoRA -> LCMScheduler -> fuse -> quantize W8A8 -> save -> load into a fresh pipe -> generate."""
    lora = save_random_lcm_lora(master, tmp_path / "lora")
    pipe = use_lcm_scheduler(copy.deepcopy(master))
    call = capture_unet_call(pipe, prompts=ONE_PROMPT)
    base_output = unet_output(pipe.unet, call)
    pipe.load_lora_weights(lora)
    lora_output = unet_output(pipe.unet, call)
    fuse_lora(pipe)
    assert not find_lora_layers(pipe.unet)
    fused_output = unet_output(pipe.unet, call)
    torch.testing.assert_close(fused_output, lora_output, rtol=1e-4, atol=1e-4)
    assert mixq.sqnr_db(base_output, fused_output) < 10  # the fused LoRA really changes the UNet

    mixq.quantize(pipe, 8, 8, progress=False, num_prompts=2, **LCM)
    quantized_output = unet_output(pipe.unet, call)
    # W8A8 stays close to the fused model, far closer than the model without the LoRA is.
    assert mixq.sqnr_db(fused_output, quantized_output) > 20
    mixq.save_quantized(pipe, tmp_path / "lcm-w8a8")

    fresh = use_lcm_scheduler(copy.deepcopy(master))
    fresh.load_lora_weights(lora)
    assert_load_fails(fresh, tmp_path / "lcm-w8a8", match="unfused LoRA")
    mixq.load_quantized(fuse_lora(fresh), tmp_path / "lcm-w8a8")
    assert torch.equal(unet_output(fresh.unet, call), quantized_output)
    images = fresh(list(ONE_PROMPT), generator=torch.Generator().manual_seed(0), output_type="pt", **LCM).images
    assert images.shape[:2] == (1, 3) and images.shape[-1] >= 32
    assert torch.isfinite(images).all() and 0 <= images.min() and images.max() <= 1 and images.std() > 0

    # LCM-LoRA only changes layers that are quantized, so the plain base pipeline makes the same UNet.
    plain = mixq.load_quantized(use_lcm_scheduler(copy.deepcopy(master)), tmp_path / "lcm-w8a8")
    assert_same_state(plain.unet.state_dict(), fresh.unet.state_dict())


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_lcm_lora_flow(arch, request, tmp_path):
    check_lcm_lora_flow(request.getfixturevalue(f"_tiny_{arch}_master"), tmp_path)


@pytest.mark.parametrize("arch, model", [("sdxl", "sdxl-base-1.0"), ("sd15", "sd-v1-5")])
def test_lcm_lora_on_real_configs_and_tokenizer(arch, model, data_dir, tmp_path):
    """The same flow, shorter, on tiny pipelines shrunk from the real UNet configs, with real CLIP token ids."""
    build = {"sdxl": tiny_sdxl_pipeline, "sd15": tiny_sd15_pipeline}[arch]
    master = build(unet_config=data_dir / "model-configs" / model / "unet", tokenizer=data_dir / "clip-tokenizer")
    pipe = mixq.quantize(lcm_lora_pipeline(master), 8, 8, progress=False, num_prompts=2, **LCM)
    mixq.save_quantized(pipe, tmp_path / "lcm-w8a8")

    fresh = mixq.load_quantized(lcm_lora_pipeline(master), tmp_path / "lcm-w8a8")
    call = capture_unet_call(master, prompts=ONE_PROMPT)  # on the float pipeline: its UNet is fast
    assert torch.equal(unet_output(fresh.unet, call), unet_output(pipe.unet, call))
    images = fresh(list(ONE_PROMPT), generator=torch.Generator().manual_seed(0), output_type="pt", **LCM).images
    assert torch.isfinite(images).all() and images.std() > 0


def test_lora_changed_float_layer_needs_the_fused_pipeline(_tiny_sdxl_master, tmp_path):
    """MixDQ keeps e.g. down_blocks.0.resnets.0.conv2 in floating point; LCM-LoRA changes it, so the base
    hash then covers the LoRA, and only a pipeline with the same LoRA fused can take the checkpoint."""
    keep = ["conv_in", "conv_out", "down_blocks.0.resnets.0.conv2"]
    pipe = mixq.quantize(lcm_lora_pipeline(_tiny_sdxl_master), 8, 8, keep_fp=keep, progress=False, num_prompts=2,
                         num_inference_steps=1, guidance_scale=1.0)
    mixq.save_quantized(pipe, tmp_path / "ckpt")

    assert_load_fails(use_lcm_scheduler(copy.deepcopy(_tiny_sdxl_master)), tmp_path / "ckpt",
                      match="not the model this checkpoint was made from.*same LoRA fused")
    with pytest.raises(CheckpointError, match="not the model"):  # another LoRA is another model too
        mixq.load_quantized(lcm_lora_pipeline(_tiny_sdxl_master, seed=1), tmp_path / "ckpt")
    loaded = mixq.load_quantized(lcm_lora_pipeline(_tiny_sdxl_master), tmp_path / "ckpt")
    assert_same_state(loaded.unet.state_dict(), pipe.unet.state_dict())
