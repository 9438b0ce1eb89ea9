"""A LoRA the proving pipeline can be checked against: it swaps two colour words.

The base pipeline draws "a red circle" red. The shipped LoRA (LORA_FOLDER, a diffusers LoRA file on the
UNet's cross-attention) was trained on scenes rendered with red and blue exchanged, so with it "a red
circle" comes out blue. The content checker then measures, on held-out prompts that name red or blue,
how often an image shows the swapped scene: near 0 for the base model, high with the LoRA, and the gap
between float+LoRA and a quantized pipeline + the same LoRA is what quantization costs the adapter.

    python -m mixq.proving.lora --train --steps 1000       # train it again (seeded, resumable), ship it
    python -m mixq.proving.lora --run runs/proving --prompts 400   # the content table

The evaluation's table (float, float+LoRA, W8A8+LoRA, the run's 4-bit plan+LoRA) goes to
benchmarks/results/ when --results is given.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mixq.machine import describe_cpu
from mixq.stats import mcnemar_exact, wilson_interval

from .scenes import Scene, render, scenes
from .train import ScenePool

LORA_FOLDER = Path(__file__).resolve().parent / "color-swap-lora"
ADAPTER = "color_swap"
SWAP = {"red": "blue", "blue": "red"}
TARGETS = ["attn2.to_k", "attn2.to_v", "attn2.to_q", "attn2.to_out.0"]
RANK = 8


def swapped(scene: Scene) -> Scene:
    """The scene with the swapped colours exchanged (what the LoRA should draw for the scene's caption)."""
    return replace(scene, objects=tuple(replace(o, color=SWAP.get(o.color, o.color)) for o in scene.objects))


def names_a_swapped_color(scene: Scene) -> bool:
    return any(o.color in SWAP for o in scene.objects)


def swap_prompts(split: str, count: int, seed: int = 0) -> list[tuple[Scene, str]]:
    """`count` (scene, caption) pairs of a split whose captions name red or blue."""
    pairs, drawn = [], 0
    while len(pairs) < count:
        drawn = max(4 * count, 2 * drawn)
        pairs = [(s, t) for s, t in scenes(split, drawn, seed) if names_a_swapped_color(s)][:count]
    return pairs


# --- training ------------------------------------------------------------------------------------------


class SwapPool(ScenePool):
    """Training scenes rendered with the colours swapped (captions unchanged), half of them naming red or blue
    and half not (so that the other colours stay as they were)."""

    def __init__(self, size: int, seed: int):
        named = swap_prompts("train", size // 2, seed)
        others = [(s, t) for s, t in scenes("train", 4 * size, seed + 1) if not names_a_swapped_color(s)][:size - len(named)]
        pairs = named + others
        self.captions = [text for _, text in pairs]
        images = np.stack([render(swapped(scene), seed=seed + i) for i, (scene, _) in enumerate(pairs)])
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)

    def batch(self, step: int, size: int, seed: int) -> list[int]:  # (its own draws: the shipped LoRA's training)
        return random.Random(f"lora-batch:{seed}:{step}").sample(range(len(self.captions)), size)



def add_swap_adapter(pipe, seed: int = 0):
    from peft import LoraConfig

    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, init_lora_weights=True),
                          adapter_name=ADAPTER)


def adapter_modules(unet) -> nn.ModuleList:
    return nn.ModuleList([m for n, m in unet.named_modules() if n.endswith((f"lora_A.{ADAPTER}", f"lora_B.{ADAPTER}"))])


def train(pipe, steps: int, out: Path, seed: int = 0, batch: int = 16, lr: float = 2e-3, pool_size: int = 2000,
          quiet: bool = False):
    """Train the swap adapter on `pipe` (float), resumable from out/train-state.pt (see train.run_stage)."""
    from .train import run_stage, unet_loss

    for module in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
        module.requires_grad_(False)
    add_swap_adapter(pipe, seed)
    pool = SwapPool(pool_size, seed)
    pool.encode(pipe.vae)
    adapters = adapter_modules(pipe.unet)
    args = argparse.Namespace(seed=seed, batch=batch, save_every=100, quiet=quiet)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "train-state.pt"
    from .train import load_state

    run_stage("lora", [adapters], lambda idx, g: unet_loss(pipe, pool.latents[idx], [pool.captions[i] for i in idx], g),
              steps, lr, load_state(state_path), {}, state_path, args, pool)


def save_lora(pipe, folder: Path = LORA_FOLDER, record: dict | None = None):
    """The adapter as a diffusers LoRA file, with `record` (how it was trained) as training.json beside it."""
    from diffusers import StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(
        pipe.unet, adapter_name=ADAPTER))
    if record is not None:
        (Path(folder) / "training.json").write_text(json.dumps(record, indent=1) + "\n")


def load_lora(pipe, folder: Path = LORA_FOLDER):
    """The shipped LoRA, loaded as users load one: pipe.load_lora_weights(folder)."""
    pipe.load_lora_weights(str(folder), adapter_name=ADAPTER)
    return pipe


# --- evaluation ------------------------------------------------------------------------------------------


def swap_verdicts(pipe, pairs, seed: int = 0, batch_size: int = 50) -> list[bool]:
    """Per prompt: does the image show the swapped scene (every attribute right)?"""
    from .content import check
    from .evaluate import generate

    images = generate(pipe, [text for _, text in pairs], seed, batch_size=batch_size)
    return [check(image, swapped(scene)).correct for image, (scene, _) in zip(images, pairs)]


def content_table(run: Path, prompts: int, seed: int = 0) -> dict:
    """Swap accuracy of float, float+LoRA, W8A8+LoRA and the run's plan+LoRA on the same held-out prompts."""
    import mixq

    from .model import load_pipeline

    pairs = swap_prompts("evaluation", prompts)
    rows = {}
    base = load_pipeline()
    rows["float, no LoRA"] = swap_verdicts(base, pairs, seed)
    rows["float + LoRA"] = swap_verdicts(load_lora(base), pairs, seed)
    configs = {"mixq W8A8 + LoRA": dict(w_bit=8, a_bit=8), "mixq W4A8 + LoRA": dict(w_bit=4, a_bit=8),
               "mixq plan.yaml + LoRA": dict(plan=str(run / "plan.yaml"))}
    for name, settings in configs.items():
        pipe = mixq.quantize(load_pipeline(), calibration=run, progress=False, **settings)
        if "plan" in settings:
            name = f"mixq plan.yaml ({average_bits(mixq.summary(pipe))}) + LoRA"
        rows[name] = swap_verdicts(load_lora(pipe), pairs, seed)
    reference = rows["float + LoRA"]
    return {name: {"n": len(v), "correct": int(sum(v)), "interval": wilson_interval(int(sum(v)), len(v)),
                   "p_vs_float_lora": mcnemar_exact(v, reference) if name != "float + LoRA" else None}
            for name, v in rows.items()}


def average_bits(rows: list[dict]) -> str:
    """Size-weighted average weight and activation bits of a mixq.summary's quantized layers."""
    rows = [r for r in rows if (r["w_bits"], r["a_bits"]) != (16, 16)]
    params = sum(r["params"] for r in rows)
    w = sum(r["params"] * r["w_bits"] for r in rows) / params
    a = sum(r["params"] * r["a_bits"] for r in rows) / params
    return f"{w:.2f} weight / {a:.2f} activation bits"


EXPLANATION = """Prompts: held-out evaluation captions of the shapes grammar that name red or blue. An image counts
as right when the content checker finds the *swapped* scene (red drawn blue, blue drawn red) with every
attribute right. Each quantized pipeline is quantized from the float one with the run folder's activation
ranges, then gets the same LoRA file through `pipe.load_lora_weights`; its low-rank branch runs in
floating point beside the integer layers. Same prompts and seeds in every row; intervals are Wilson 95 %,
p-values exact McNemar on the paired verdicts (significant at 0.01).

"""


def format_table(table: dict) -> str:
    lines = ["| pipeline | swapped-colour content accuracy | 95 % interval | paired vs float + LoRA (exact McNemar) |",
             "|---|---|---|---|"]
    for name, row in table.items():
        low, high = row["interval"]
        p = "" if row["p_vs_float_lora"] is None else f"p = {row['p_vs_float_lora']:.3g}"
        lines.append(f"| {name} | {row['correct'] / row['n']:.1%} ({row['correct']}/{row['n']}) | "
                     f"{low:.1%} - {high:.1%} | {p} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixq.proving.lora", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--train", action="store_true", help="train the LoRA and ship it to the package")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--work", default="runs/color-swap-lora", help="training state folder (resumable)")
    parser.add_argument("--run", help="a finished `python -m mixq.calibrate` run folder: evaluate with its ranges "
                                      "and plan")
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--results", help="write the table as markdown to this file")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if not args.train and not args.run:
        parser.error("nothing to do: pass --train and/or --run RUN")
    if args.train:
        from .model import load_pipeline

        pipe = load_pipeline()
        started = time.perf_counter()
        train(pipe, args.steps, Path(args.work), quiet=args.quiet)
        seconds = time.perf_counter() - started
        save_lora(pipe, record={"command": f"python -m mixq.proving.lora --train --steps {args.steps}",
                                "steps": args.steps, "rank": RANK, "targets": TARGETS, "seed": 0,
                                "seconds": round(seconds), "machine": describe_cpu()})
        print(f"trained {args.steps} steps in {seconds:.0f} s; shipped to {LORA_FOLDER}")
    if args.run:
        started = time.perf_counter()
        table = content_table(Path(args.run), args.prompts)
        text = format_table(table)
        print(text)
        if args.results:
            header = (f"# Colour-swap LoRA on quantized proving pipelines\n\nCommand: `python -m mixq.proving.lora "
                      f"--run {args.run} --prompts {args.prompts}`; machine: {describe_cpu()}; "
                      f"{time.perf_counter() - started:.0f} s.\n\n" + EXPLANATION)
            Path(args.results).write_text(header + text + "\n\n```json\n" + json.dumps(table, indent=1) + "\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
