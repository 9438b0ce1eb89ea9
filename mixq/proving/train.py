"""Train the proving-ground pipeline on the shapes grammar, on a CPU:

    python -m mixq.proving.train --out runs/proving --vae-steps 1500 --unet-steps 6000

An SDXL-architecture StableDiffusionXLPipeline at small widths (the UNet's block layout,
cross-attention transformer blocks and text_embeds/time_ids conditioning of SDXL; two CLIP text
encoders, the second with projection; the grammar tokenizer) and a small VAE with 4x downsampling
(64x64 images, 16x16x4 latents). Two stages, each seeded and resumable:

1. the VAE, as an autoencoder of rendered scenes (L1 + a small KL term); the latents' scaling factor
   is then set from their measured spread, as SD's VAEs ship it;
2. the UNet and both text encoders together, predicting the clean latent ("sample" prediction) at the
   timesteps a 4-step trailing Euler sampler visits and at random ones, so that 4 steps give a sharp
   image.

State is written atomically every --save-every steps (OUT/train-state.pt) and a stopped run continues
where it stopped. The finished pipeline is saved with save_pretrained to OUT/pipeline, and its content
accuracy on held-out evaluation prompts (mixq.proving.check) goes to OUT/evaluation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .model import IMAGE_SIZE, SAMPLER_STEPS

TIME_IDS = (IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE)  # original size, crop, target size


# --- the pipeline ----------------------------------------------------------------------------------


def small_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[32, 64, 64],
                         layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 3,
                         up_block_types=["UpDecoderBlock2D"] * 3, norm_num_groups=16, sample_size=IMAGE_SIZE)


def untrained_pipeline(seed: int, base_width: int, text_width: int):
    from diffusers import StableDiffusionXLPipeline

    from mixq.offline import (SDXL_UNET_STRUCTURE, default_scheduler, shrink_unet_config, tiny_text_encoder,
                              unet_from_config)

    from .tokenizer import grammar_clip_tokenizer

    tokenizer = grammar_clip_tokenizer()
    scheduler = default_scheduler()
    scheduler.register_to_config(prediction_type="sample")
    unet_config = shrink_unet_config(SDXL_UNET_STRUCTURE, base_width=base_width, text_width=text_width,
                                     max_transformer_depth=1, sample_size=IMAGE_SIZE // 4, heads=4)
    pipe = StableDiffusionXLPipeline(
        vae=small_vae(seed + 1),
        text_encoder=tiny_text_encoder(len(tokenizer), False, seed + 2, width=text_width),
        text_encoder_2=tiny_text_encoder(len(tokenizer), True, seed + 3, width=text_width),
        tokenizer=tokenizer, tokenizer_2=tokenizer,
        unet=unet_from_config(unet_config, seed=seed), scheduler=scheduler, force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- data --------------------------------------------------------------------------------------------


class ScenePool:
    """A fixed pool of rendered training scenes with paraphrased captions, drawn from in seeded batches."""

    def __init__(self, size: int, seed: int):
        from .scenes import render, scenes

        pairs = scenes("train", size, seed)
        self.captions = [text for _, text in pairs]
        images = np.stack([render(scene, seed=seed + i) for i, (scene, _) in enumerate(pairs)])
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # [-1, 1]

    def batch(self, step: int, size: int, seed: int) -> list[int]:
        return random.Random(f"batch:{seed}:{step}").sample(range(len(self.captions)), size)

    @torch.no_grad()
    def encode(self, vae, batch: int = 256):
        """The VAE's latent means of every image, scaled: the UNet stage's targets."""
        means = [vae.encode(self.images[i:i + batch]).latent_dist.mean for i in range(0, len(self.images), batch)]
        self.latents = torch.cat(means) * vae.config.scaling_factor


# --- resumable state -----------------------------------------------------------------------------------


def save_state(path: Path, state: dict):
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a killed run leaves the previous state whole


def load_state(path: Path) -> dict | None:
    return torch.load(path, weights_only=False) if path.is_file() else None


# --- the two stages ------------------------------------------------------------------------------------


def vae_loss(vae, images, kl_weight: float = 1e-6):
    posterior = vae.encode(images).latent_dist
    reconstruction = vae.decode(posterior.sample()).sample
    return F.l1_loss(reconstruction, images) + kl_weight * posterior.kl().mean()


def encode_text(pipe, captions):
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(captions, device="cpu", num_images_per_prompt=1,
                                                     do_classifier_free_guidance=False)
    return prompt_embeds, pooled


def training_timesteps(scheduler, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Half at the timesteps the 4-step sampler visits, half uniform over the schedule."""
    scheduler.set_timesteps(SAMPLER_STEPS)
    sampler = scheduler.timesteps.long()
    picks = sampler[torch.randint(len(sampler), (batch,), generator=generator)]
    uniform = torch.randint(scheduler.config.num_train_timesteps, (batch,), generator=generator)
    return torch.where(torch.rand(batch, generator=generator) < 0.5, picks, uniform)


def unet_loss(pipe, latents, captions, generator):
    t = training_timesteps(pipe.scheduler, len(captions), generator)
    alphas = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noise = torch.randn(latents.shape, generator=generator)
    noisy = alphas.sqrt() * latents + (1 - alphas).sqrt() * noise  # = Euler's scaled model input
    prompt_embeds, pooled = encode_text(pipe, captions)
    time_ids = torch.tensor([TIME_IDS], dtype=torch.float32).expand(len(captions), -1)
    predicted = pipe.unet(noisy, t, encoder_hidden_states=prompt_embeds,
                          added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    return F.mse_loss(predicted, latents)


def run_stage(name, modules, loss_fn, steps, lr, state, done, state_path, args, pool):
    """Train `modules` for `steps` steps, resuming from `state` if it was written by this stage;
    `done` (finished stages' weights) is carried along in every saved state."""
    from tqdm import tqdm

    params = [p for m in modules for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    start = 0
    if state and state.get("stage") == name and "modules" in state:
        for module, saved in zip(modules, state["modules"]):
            module.load_state_dict(saved)
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    for m in modules:
        m.train()
    generator = torch.Generator().manual_seed(args.seed * 1000 + start)
    progress = tqdm(range(start, steps), desc=name, initial=start, total=steps, disable=args.quiet)
    for step in progress:
        for group in optimizer.param_groups:  # warm-up, then linear decay to a tenth
            group["lr"] = lr * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * (1 - step / steps))
        loss = loss_fn(pool.batch(step, args.batch, args.seed), generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        progress.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % args.save_every == 0 or step + 1 == steps:
            save_state(state_path, {"stage": name, "step": step + 1, "optimizer": optimizer.state_dict(),
                                    "modules": [m.state_dict() for m in modules], "done": done})
    for m in modules:
        m.eval()


def latent_scaling_factor(vae, images) -> float:
    with torch.no_grad():
        return float(1.0 / vae.encode(images).latent_dist.mean.std())


# --- evaluation ------------------------------------------------------------------------------------------


def evaluate(pipe, count: int, seed: int) -> dict:
    from .evaluate import evaluation_prompts, generate, score_images

    pairs = evaluation_prompts(count)
    images = generate(pipe, [text for _, text in pairs], seed)
    return score_images(images, [scene for scene, _ in pairs])["content"]


@torch.no_grad()
def reconstruction_accuracy(vae, count: int, seed: int) -> dict:
    """Content accuracy of the VAE's reconstructions of held-out scenes: what the pipeline can reach at
    best, whatever its UNet."""
    from .content import accuracy, check
    from .evaluate import evaluation_prompts
    from .scenes import render

    pairs = evaluation_prompts(count)
    images = torch.from_numpy(np.stack([render(scene, seed=seed) for scene, _ in pairs])).permute(0, 3, 1, 2)
    decoded = vae.decode(vae.encode(images.float() / 127.5 - 1).latent_dist.mean).sample
    decoded = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return accuracy([check(image, scene) for image, (scene, _) in zip(decoded, pairs)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m mixq.proving.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--unet-steps", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4, help="UNet and text encoders")
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--pool", type=int, default=8192, help="rendered training scenes")
    parser.add_argument("--base-width", type=int, default=32, help="the UNet's first block width")
    parser.add_argument("--text-width", type=int, default=64)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--eval-prompts", type=int, default=200)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--ship", action="store_true",
                        help="also save the finished pipeline in fp16 as mixq's package data (mixq/proving/pipeline) "
                             "and evaluate that copy")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    state_path = args.out / "train-state.pt"
    state = load_state(state_path)
    started = time.perf_counter()
    pipe = untrained_pipeline(args.seed, args.base_width, args.text_width)
    pool = ScenePool(args.pool, args.seed)
    done = dict(state["done"]) if state else {}

    if "vae" not in done:
        run_stage("vae", [pipe.vae], lambda rows, g: vae_loss(pipe.vae, pool.images[rows]), args.vae_steps,
                  args.vae_lr, state, done, state_path, args, pool)
        done["vae"] = pipe.vae.state_dict()
        state = {"stage": "unet", "step": 0, "done": done}
        save_state(state_path, state)
    pipe.vae.load_state_dict(done["vae"])
    pipe.vae.requires_grad_(False)
    scale = latent_scaling_factor(pipe.vae, pool.images[:256])
    pipe.vae.register_to_config(scaling_factor=scale)
    pool.encode(pipe.vae)
    run_stage("unet", [pipe.unet, pipe.text_encoder, pipe.text_encoder_2],
              lambda rows, g: unet_loss(pipe, pool.latents[rows], [pool.captions[r] for r in rows], g),
              args.unet_steps, args.lr, state, done, state_path, args, pool)
    pipe.save_pretrained(args.out / "pipeline", safe_serialization=True)
    result = {"train_seconds_this_run": round(time.perf_counter() - started, 1), "vae_scaling_factor": scale,
              "args": {k: str(v) for k, v in vars(args).items()}}
    result["vae_reconstruction"] = reconstruction_accuracy(pipe.vae, args.eval_prompts, args.seed)
    with torch.no_grad():
        result["evaluation"] = evaluate(pipe, args.eval_prompts, args.seed)
    if args.ship:
        from .model import load_pipeline, ship

        ship(pipe, record={**result, "args": {k: v for k, v in result["args"].items() if k != "out"}})
        with torch.no_grad():
            result["evaluation_shipped"] = evaluate(load_pipeline(), args.eval_prompts, args.seed)
    (args.out / "evaluation.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k.startswith(("vae_rec", "evaluation"))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
