"""The floating-point pipeline of a config, and the realistic inputs of one UNet step."""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.config import BenchConfig
from mixq.calib.collect import capturing_unet_calls

BENCH_PROMPT = "a photo of a cat sitting on a windowsill"
BENCH_SEED = 42  # the reference's seed


def float_pipeline(cfg: BenchConfig):
    """The fp pipeline of the config (fp16 on CUDA, fp32 on CPU), progress bars off."""
    if cfg.name == "proving":
        from mixq.proving import load_pipeline

        pipe = load_pipeline(cfg.torch_dtype, cfg.device)
    elif cfg.name == "tiny":
        from mixq.offline import tiny_sdxl_pipeline

        pipe = tiny_sdxl_pipeline(seed=0, dtype=cfg.torch_dtype, device=cfg.device, tokenizer=cfg.tokenizer)
    else:
        pipe = sdxl_pipeline_from_configs(cfg)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# SDXL 1.0's text encoders (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 with projection) and VAE, as in
# their published config.json files; SDXL-Turbo uses the same three. --mixq-components overrides them.
SDXL_TEXT_ENCODER = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                         projection_dim=768, hidden_act="quick_gelu", vocab_size=49408, max_position_embeddings=77,
                         bos_token_id=0, eos_token_id=2, pad_token_id=1)
SDXL_TEXT_ENCODER_2 = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                           projection_dim=1280, hidden_act="gelu", vocab_size=49408, max_position_embeddings=77,
                           bos_token_id=0, eos_token_id=2, pad_token_id=1)
SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
                layers_per_block=2, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32, sample_size=1024,
                scaling_factor=0.13025, act_fn="silu")


def sdxl_pipeline_from_configs(cfg: BenchConfig):
    """A full-size StableDiffusionXLPipeline with random weights: the UNet from --unet-config, the
    text encoders and VAE from --mixq-components (a diffusers SDXL layout) or SDXL 1.0's configs."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from mixq.offline import default_scheduler, load_tokenizer, load_unet_config, unet_from_config

    te_config, te2_config, vae_config = component_configs(cfg.components)
    # Served SDXL pipelines use an fp16-safe VAE; with force_upcast the pipeline would cast the
    # VAE to fp32 and back on every image, which no deployment measures.
    vae_config = {**vae_config, "force_upcast": False}
    with torch.device(cfg.device):  # random init on the device itself: minutes faster than on the host
        unet = unet_from_config(load_unet_config(cfg.unet_config), seed=0, dtype=cfg.torch_dtype, device=cfg.device)
        torch.manual_seed(1)
        text_encoder = CLIPTextModel(te_config)
        text_encoder_2 = CLIPTextModelWithProjection(te2_config)
        vae = AutoencoderKL.from_config(vae_config)
    tokenizer = load_tokenizer(cfg.tokenizer)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=default_scheduler(), force_zeros_for_empty_prompt=True,
    )
    return pipe.to(device=cfg.device, dtype=cfg.torch_dtype)


def component_configs(folder=None):
    """(text encoder config, text encoder 2 config, VAE config dict) from a diffusers model folder,
    or SDXL 1.0's when folder is None."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig

    if folder is None:
        return CLIPTextConfig(**SDXL_TEXT_ENCODER), CLIPTextConfig(**SDXL_TEXT_ENCODER_2), dict(SDXL_VAE)
    folder = Path(folder)
    absent = [sub for sub in ("text_encoder", "text_encoder_2", "vae") if not (folder / sub / "config.json").is_file()]
    if absent:
        raise FileNotFoundError(f"{folder} lacks {', '.join(sub + '/config.json' for sub in absent)}: "
                                "--mixq-components takes a diffusers SDXL model folder")
    return (CLIPTextConfig.from_pretrained(folder / "text_encoder"),
            CLIPTextConfig.from_pretrained(folder / "text_encoder_2"),
            dict(AutoencoderKL.load_config(folder / "vae")))


def with_unet(pipe, unet):
    """A pipeline of the same class sharing every component of `pipe` except its UNet."""
    new = type(pipe)(**{**pipe.components, "unet": unet})
    new.set_progress_bar_config(disable=True)
    return new


def generator(seed: int) -> torch.Generator:
    # CPU generator: the same initial latents on every device, so CPU and GPU runs see the same noise.
    return torch.Generator("cpu").manual_seed(seed)


def capture_unet_calls(pipe, prompt: str, seed: int, generation_kwargs: dict) -> list[tuple[tuple, dict]]:
    """Run the pipeline once and return the (args, kwargs) of each UNet call: realistic step inputs."""
    with torch.no_grad(), capturing_unet_calls(pipe.unet, to_cpu=False) as calls:
        pipe(prompt, generator=generator(seed), output_type="latent", **generation_kwargs)
    return [(args, kwargs) for args, kwargs, _ in calls]
