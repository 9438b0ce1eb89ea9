"""Loading a pipeline from a config, and running it the way calibration needs: fixed seeds per
prompt, cached text conditioning, images or captured UNet calls."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from mixq.calib.config import ModelConfig
from mixq.errors import ConfigError, ModelLoadError
from mixq.hub import (cached_on_disk, hub_offline, hub_reachable, load_failure_message, local_folder_problem,
                      looks_like_local_path)
from mixq.proving.model import MODEL_ID as PROVING_MODEL  # the trained pipeline shipped in mixq.proving

OFFLINE_ARCHS = {"offline:tiny-sdxl": "sdxl", "offline:tiny-sd15": "sd15"}
OFFLINE_MODELS = sorted([*OFFLINE_ARCHS, PROVING_MODEL])


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def check_model_source(model: ModelConfig):
    """Refuse, before anything loads, a model id that cannot work: an unknown offline name, or a
    local path that is missing or not a diffusers pipeline folder."""
    if model.id.startswith("offline:"):
        if model.id not in OFFLINE_MODELS:
            raise ConfigError(f"config field 'model.id' (--model) is {model.id!r}: unknown offline model; use one of "
                              f"{OFFLINE_MODELS}, a local pipeline folder or a Hub id")
        return
    if looks_like_local_path(model.id):
        problem = local_folder_problem(model.id)
        if problem:
            raise ModelLoadError(f"cannot load the pipeline {model.id!r}: {problem}")


def load_pipeline(model: ModelConfig, progress: bool = True):
    """The float pipeline a config names, on its device; LoRA fused, scheduler swapped."""
    check_model_source(model)
    dtype = getattr(torch, model.dtype)
    device = resolve_device(model.device)
    if model.id == PROVING_MODEL:
        from mixq.proving.model import pipeline_folder

        pipe = from_pretrained(str(pipeline_folder()), dtype, None, progress).to(device)
    elif model.id.startswith("offline:"):
        from mixq.offline import tiny_pipeline

        pipe = tiny_pipeline(OFFLINE_ARCHS[model.id], dtype=dtype, device=device)
    else:
        pipe = from_pretrained(model.id, dtype, model.variant, progress).to(device)
    if model.scheduler:
        import diffusers

        scheduler_cls = getattr(diffusers, model.scheduler, None)
        if scheduler_cls is None:
            raise ConfigError(f"config field 'model.scheduler': diffusers has no scheduler {model.scheduler!r}")
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    if model.lora:
        # Quantization needs the LoRA folded into the base weights (mixq refuses unfused adapters).
        pipe.load_lora_weights(model.lora)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def from_pretrained(model_id: str, dtype: torch.dtype, variant: str | None = None, progress: bool = True):
    """AutoPipelineForText2Image.from_pretrained as current diffusers expects it (`dtype=`, low-memory
    loading through accelerate); any failure to find or fetch the model becomes one ModelLoadError."""
    import warnings

    from diffusers import AutoPipelineForText2Image

    kwargs = {dtype_keyword(): dtype}
    if variant:
        kwargs["variant"] = variant
    if not looks_like_local_path(model_id) and not hub_offline() and not hub_reachable():
        # Without network, huggingface_hub retries each file five times (about a minute of printed
        # retries) before failing: check the Hub once, then use the local cache alone, or fail now.
        if not cached_on_disk(model_id):
            raise ModelLoadError(load_failure_message(model_id, ConnectionError("the Hub is unreachable")))
        kwargs["local_files_only"] = True
    try:
        with warnings.catch_warnings(), loading_bars(progress):
            # diffusers passes an argument huggingface_hub has deprecated; nothing the user can change.
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*", category=UserWarning)
            return AutoPipelineForText2Image.from_pretrained(model_id, **kwargs)
    except (OSError, ValueError) as err:  # missing files, Hub errors (OSError subclasses), bad variant
        raise ModelLoadError(load_failure_message(model_id, err)) from err


def dtype_keyword() -> str:
    """`dtype` on diffusers releases that deprecate `torch_dtype` (they warn on it), else `torch_dtype`."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401 (present where dtype= exists)
    except ImportError:
        return "torch_dtype"
    return "dtype"


@contextmanager
def loading_bars(show: bool):
    """diffusers' and transformers' loading progress bars, off when `show` is False."""
    if show:
        yield
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()


def encode_prompts(pipe, prompts: list[str], guidance_scale: float) -> dict:
    """Text conditioning as pipeline keyword arguments (prompt_embeds, pooled for SDXL, negatives
    under classifier-free guidance), so repeated generations skip the text encoders."""
    cfg = guidance_scale > 1.0
    encode = getattr(pipe, "encode_prompt", None)
    if encode is None:
        return {"prompt": prompts}
    with torch.no_grad():
        out = encode(prompt=prompts, device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=cfg)
    if len(out) == 4:  # SDXL
        names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    else:
        names = ("prompt_embeds", "negative_prompt_embeds")
    return {k: v for k, v in zip(names, out) if v is not None}


def seeded_generators(seed: int, count: int, start: int = 0) -> list[torch.Generator]:
    """One generator per prompt: image i gets the same noise whatever the batch it runs in."""
    return [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(count)]


def slice_conditioning(conditioning: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in conditioning.items()}


def repeat_batch(tensor: torch.Tensor, copies: int) -> torch.Tensor:
    """`copies` copies of a batch-first tensor, one after another along dim 0."""
    return tensor.repeat(copies, *[1] * (tensor.dim() - 1))


def repeated_conditioning(conditioning: dict, copies: int) -> dict:
    if copies == 1:
        return conditioning
    return {k: repeat_batch(v, copies) for k, v in conditioning.items()}


@torch.no_grad()
def generate(pipe, conditioning: dict, seed: int, pipeline_kwargs: dict, batch_size: int = 8,
             output_type: str = "pt", copies: int = 1) -> torch.Tensor:
    """Images (or latents) for every prompt of `conditioning`, as one float32 CPU tensor.

    `copies` > 1: each batch of prompts runs as one pipeline call of that many copies of it (same
    noise per copy, copy-major), so a model whose layers treat the copies differently (candidates
    under test) makes them all at once; the result is [copies, prompts, ...]."""
    count = len(next(iter(conditioning.values())))
    outputs = []
    for start in range(0, count, batch_size):
        stop = min(start + batch_size, count)
        generators = [g for _ in range(copies) for g in seeded_generators(seed, stop - start, start)]
        result = pipe(**repeated_conditioning(slice_conditioning(conditioning, start, stop), copies),
                      generator=generators, output_type=output_type, **pipeline_kwargs)
        images = result.images.float().cpu()
        outputs.append(images.view(copies, stop - start, *images.shape[1:]) if copies > 1 else images)
    return torch.cat(outputs, dim=1 if copies > 1 else 0)
