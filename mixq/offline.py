"""Offline pipelines with seeded random weights, for tests, demos and benchmarks (no model hub).

`tiny_sdxl_pipeline()` / `tiny_sd15_pipeline()` build a StableDiffusionXLPipeline /
StableDiffusionPipeline with the real block structure (block types, resnets per block, transformer
depths up to a cap, two text encoders and `text_time` embeddings for SDXL) at tiny widths. Pass a
real diffusers `unet/config.json` (`unet_config=`) to shrink that architecture instead of the
built-in description, and a real CLIP tokenizer folder (`tokenizer=`) to use real token ids; by
default a byte-level CLIP-style tokenizer is generated, so nothing outside this package is needed.

`unet_from_config()` builds a full-size UNet from a config with random weights (benchmarks: the
weight values do not change speed).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch

# The block structure of the real models (stabilityai/sdxl-turbo and SD v1.5 UNet configs), the
# fields that shape the graph; widths are filled in by shrink_unet_config.
SDXL_UNET_STRUCTURE = {
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "use_linear_projection": True,
    "in_channels": 4,
    "out_channels": 4,
    "sample_size": 64,
}
SD15_UNET_STRUCTURE = {
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "in_channels": 4,
    "out_channels": 4,
    "sample_size": 64,
}

TINY_TEXT_WIDTH = 32
TINY_TIME_EMBED_DIM = 8


def load_unet_config(path) -> dict:
    """A diffusers UNet config from a file or a folder holding config.json (or unet/config.json)."""
    path = Path(path)
    for candidate in (path, path / "config.json", path / "unet" / "config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise FileNotFoundError(f"no UNet config.json at {path}")


def shrink_unet_config(config: dict, base_width: int = 16, text_width: int = TINY_TEXT_WIDTH,
                       max_transformer_depth: int = 2, sample_size: int = 16, heads: int = 2) -> dict:
    """Same block structure, tiny widths: channels scaled so the first block has `base_width`,
    `heads` attention heads everywhere, transformer depth capped, text/time widths shrunk."""
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    ratio = base_width / cfg["block_out_channels"][0]
    cfg["block_out_channels"] = [max(8, int(round(c * ratio))) for c in cfg["block_out_channels"]]
    n_blocks = len(cfg["block_out_channels"])
    cfg["norm_num_groups"] = math.gcd(*cfg["block_out_channels"], 8)
    cfg["attention_head_dim"] = [heads] * n_blocks
    cfg["num_attention_heads"] = None
    depth = cfg.get("transformer_layers_per_block", 1)
    if isinstance(depth, int):
        depth = [depth] * n_blocks
    cfg["transformer_layers_per_block"] = [min(d, max_transformer_depth) for d in depth]
    cfg["sample_size"] = sample_size
    if cfg.get("addition_embed_type") == "text_time":
        # SDXL: the context is cat(encoder 1, encoder 2); the added embedding is the pooled
        # projection of encoder 2 plus 6 time ids of addition_time_embed_dim each.
        cfg["cross_attention_dim"] = 2 * text_width
        cfg["addition_time_embed_dim"] = TINY_TIME_EMBED_DIM
        cfg["projection_class_embeddings_input_dim"] = text_width + 6 * TINY_TIME_EMBED_DIM
    else:
        cfg["cross_attention_dim"] = text_width
    return cfg


def unet_from_config(config: dict, seed: int = 0, dtype=torch.float32, device="cpu"):
    """The UNet of `config` with seeded random weights, made in place in `dtype` on `device` (a
    full-size UNet is never built in float32 on the CPU first; "meta" gives shapes without memory)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # a .to(dtype) afterwards would also print a diffusers notice
    try:
        with torch.device(device):
            return UNet2DConditionModel(**cfg).eval()
    finally:
        torch.set_default_dtype(default)


def _to(module, device, dtype):
    """Move/cast only when needed: a no-op .to() on diffusers models still logs a dtype notice."""
    if torch.device(device) != torch.device("cpu") or dtype != torch.float32:
        module = module.to(device=device, dtype=dtype)
    return module


# --- tokenizer ---------------------------------------------------------------------------------


def _byte_unicode_alphabet() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


CLIP_SPECIAL_TOKENS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                       "unk_token": "<|endoftext|>"}


def write_clip_tokenizer_files(folder: Path, merges: list[tuple[str, str]] = ()) -> Path:
    """vocab.json, merges.txt and tokenizer_config.json of a byte-level CLIP tokenizer: every byte is
    a token (plus its end-of-word form), then one token per merge's result, in merge order; CLIP's
    special tokens, padding and 77-token length."""
    alphabet = _byte_unicode_alphabet()
    vocab = {tok: i for i, tok in enumerate(alphabet + [c + "</w>" for c in alphabet])}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer", **CLIP_SPECIAL_TOKENS}))
    return folder


def byte_level_clip_tokenizer():
    """A working CLIPTokenizer without downloads: every byte is a token (plus its end-of-word
    form), no merges. Same special tokens, padding and 77-token length as CLIP."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        return CLIPTokenizer.from_pretrained(str(write_clip_tokenizer_files(Path(folder))))


def load_tokenizer(tokenizer=None):
    """None -> byte-level tokenizer; a path -> CLIPTokenizer.from_pretrained(path); else as is."""
    if tokenizer is None:
        return byte_level_clip_tokenizer()
    if isinstance(tokenizer, (str, Path)):
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(str(tokenizer))
    return tokenizer


# --- components --------------------------------------------------------------------------------


def tiny_text_encoder(vocab_size: int, with_projection: bool, seed: int, width: int = TINY_TEXT_WIDTH):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=width, intermediate_size=2 * width, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=vocab_size, max_position_embeddings=77, projection_dim=width, hidden_act="quick_gelu",
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )
    torch.manual_seed(seed)
    model_cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_cls(config).eval()


def tiny_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16], layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8,
        sample_size=32,
    ).eval()


def default_scheduler():
    from diffusers import EulerDiscreteScheduler

    # SD's noise schedule with trailing timesteps, so 1-4 step sampling is meaningful (as SDXL-Turbo).
    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  timestep_spacing="trailing", steps_offset=1)


def tiny_sdxl_pipeline(seed: int = 0, dtype=torch.float32, device="cpu", unet_config=None, tokenizer=None,
                       **shrink_kwargs):
    """A StableDiffusionXLPipeline with SDXL's UNet structure at tiny widths and random weights."""
    from diffusers import StableDiffusionXLPipeline

    structure = load_unet_config(unet_config) if unet_config is not None else SDXL_UNET_STRUCTURE
    tok = load_tokenizer(tokenizer)
    vocab = len(tok)
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(seed + 1),
        text_encoder=tiny_text_encoder(vocab, False, seed + 2),
        text_encoder_2=tiny_text_encoder(vocab, True, seed + 3),
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet_from_config(shrink_unet_config(structure, **shrink_kwargs), seed=seed),
        scheduler=default_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return _to(pipe, device, dtype)


def tiny_sd15_pipeline(seed: int = 0, dtype=torch.float32, device="cpu", unet_config=None, tokenizer=None,
                       **shrink_kwargs):
    """A StableDiffusionPipeline with SD1.5's UNet structure at tiny widths and random weights."""
    from diffusers import StableDiffusionPipeline

    structure = load_unet_config(unet_config) if unet_config is not None else SD15_UNET_STRUCTURE
    tok = load_tokenizer(tokenizer)
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(seed + 1),
        text_encoder=tiny_text_encoder(len(tok), False, seed + 2),
        tokenizer=tok,
        unet=unet_from_config(shrink_unet_config(structure, **shrink_kwargs), seed=seed),
        scheduler=default_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return _to(pipe, device, dtype)


def tiny_pipeline(arch: str = "sdxl", **kwargs):
    builders = {"sdxl": tiny_sdxl_pipeline, "sd15": tiny_sd15_pipeline}
    if arch not in builders:
        raise ValueError(f"unknown tiny architecture {arch!r}: choose one of {sorted(builders)}")
    return builders[arch](**kwargs)
