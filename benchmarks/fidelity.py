"""Fidelity of every variant against the floating-point pipeline, on the same prompts and seeds.

    python -m benchmarks.fidelity --out DIR [--prompts FILE --num-prompts N] [suite options]

Per variant: PSNR and SSIM (near-global window, as MixDQ) of the images, and SQNR of the first
UNet step's output on the fp pipeline's own inputs for that prompt. LPIPS and CLIP score need
model weights: they are computed where those are available locally (the `lpips` package with its
backbone weights in torch's hub cache; --clip-model DIR for CLIP) and skipped with a reason
otherwise. Writes DIR/fidelity.json and DIR/grid.png (rows: prompts; columns: fp | W8A8 | W4A8 |
plan | torchao). Variants run eager here, whatever the timing mode: fidelity is a property of the
quantized model, not of how it is launched.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from benchmarks.config import add_options, bench_config
from benchmarks.environment import environment
from benchmarks.images import labelled_grid
from mixq.metrics import psnr, ssim
from benchmarks.models import BENCH_SEED, capture_unet_calls
from mixq.calib.collect import run_unet
from benchmarks.variants import VARIANTS, VariantSet, VariantUnavailable, generate, with_eager_mode

FIDELITY_FILE = "fidelity.json"
GRID_FILE = "grid.png"
GRID_ROWS = 4  # prompts shown in the grid
CONTENT_GRID_FILE = "content_grid.png"
DEFAULT_NUM_PROMPTS = {"proving": 50, "tiny": 4, "sdxl-turbo": 8}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m benchmarks.fidelity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for fidelity.json and grid.png")
    parser.add_argument("--prompts", default=None, help="prompts file (COCO JSON/CSV, PartiPrompts TSV, ...); "
                                                        "default: mixq's built-in set")
    parser.add_argument("--num-prompts", type=int, default=None, help="prompts to evaluate (default: tiny 4, sdxl-turbo 8)")
    parser.add_argument("--seed", type=int, default=BENCH_SEED, help="prompt i uses seed + i")
    parser.add_argument("--clip-model", default=None, help="a local CLIP model folder (transformers) for CLIP score")
    add_options(parser.add_argument)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = with_eager_mode(bench_config(vars(args)))
    from mixq.calib.prompts import load_prompts

    count = args.num_prompts or DEFAULT_NUM_PROMPTS[cfg.name]
    if cfg.name == "proving" and args.prompts is None:
        from mixq.proving import evaluation_prompts

        prompts = [text for _, text in evaluation_prompts(count)]  # held out from training and calibration
    else:
        prompts = load_prompts(args.prompts, count)
    results = evaluate(cfg, prompts, args.seed, args.clip_model, args.out)
    results["command"] = " ".join(["python -m benchmarks.fidelity", *(sys.argv[1:] if argv is None else argv)])
    from mixq.io import write_text_atomic

    # Identical images have an infinite PSNR: Python's json writes it as Infinity and reads it back.
    write_text_atomic(args.out / FIDELITY_FILE, json.dumps(results, indent=2))
    print(f"wrote {args.out / FIDELITY_FILE} and {args.out / GRID_FILE}")


def evaluate(cfg, prompts: list[str], seed: int, clip_model, out: Path) -> dict:
    variants = VariantSet(cfg, measure_memory=False)
    reference = variants.reference
    seeds = [seed + i for i in range(len(prompts))]
    reference_images = [generate(reference, cfg, p, s, output_type="np")[0] for p, s in zip(prompts, seeds)]
    unet_calls = [capture_unet_calls(reference, p, s, cfg.generation_kwargs())[0] for p, s in zip(prompts, seeds)]
    reference_outputs = [run_unet(reference.unet, call) for call in unet_calls]
    scorers = optional_scorers(clip_model, cfg.device)

    rows, columns, labels, skipped = {}, [reference_images], [cfg.fp_label], {}
    for name in VARIANTS:
        if name == "fp":
            continue
        try:
            variant = variants.get(name)
        except VariantUnavailable as err:
            skipped[name] = str(err)
            continue
        images = [generate(variant.pipe, cfg, p, s, output_type="np")[0] for p, s in zip(prompts, seeds)]
        outputs = [run_unet(variant.unet, call) for call in unet_calls]
        rows[name] = variant_scores(variant.label, reference_images, images, reference_outputs, outputs, prompts, scorers)
        columns.append(images)
        labels.append(variant.label)
    if "clip_score" in scorers:
        rows["fp"] = {"label": cfg.fp_label,
                      "clip_score": float(np.mean([scorers["clip_score"](im, p) for im, p in zip(reference_images, prompts)]))}

    grid_rows = [[column[i] for column in columns] for i in range(min(GRID_ROWS, len(prompts)))]
    from mixq.io import atomic_path

    with atomic_path(out / GRID_FILE) as tmp:
        labelled_grid(grid_rows, labels).save(tmp, format="PNG")
    content = content_verdicts(prompts, dict(zip(["fp", *rows], columns)), labels, out) if cfg.name == "proving" else {}
    for name, rates in content.get("accuracy", {}).items():
        rows.setdefault(name, {"label": cfg.fp_label})["content"] = rates
    return {
        "config": cfg.as_dict(),
        "environment": environment(cfg.device),
        "prompts": prompts,
        "seeds": seeds,
        "reference": cfg.fp_label,
        "variants": rows,
        "skipped_variants": skipped,
        "optional_metrics": {name: reason or "computed" for name, reason in optional_metric_reasons(clip_model).items()},
        "grid": GRID_FILE,
        "grid_columns": labels,
        **({"content_grid": content["grid"]} if content.get("grid") else {}),
        **({"content_skipped": content["skipped"]} if content.get("skipped") else {}),
    }


def content_verdicts(prompts: list[str], columns: dict[str, list], labels: list[str], out: Path) -> dict:
    """The proving ground's content check of every column (variant name -> images in [0, 1]): accuracy
    per variant, and a grid of the first GRID_ROWS prompts titled with each image's verdict."""
    from mixq.proving import accuracy, parse_caption, save_grid
    from mixq.proving.evaluate import verdicts_for

    try:
        scenes = [parse_caption(p) for p in prompts]
    except ValueError as err:
        return {"skipped": f"content not checked: a prompt is outside the shapes grammar ({err})"}
    images = {label: np.stack([np.round(np.clip(i, 0, 1) * 255).astype(np.uint8) for i in column])
              for label, column in zip(labels, columns.values())}
    verdicts = {label: verdicts_for(found, scenes) for label, found in images.items()}
    shown = min(GRID_ROWS, len(prompts))
    save_grid(out / CONTENT_GRID_FILE, prompts[:shown], {k: v[:shown] for k, v in images.items()},
              {k: v[:shown] for k, v in verdicts.items()})
    return {"accuracy": {name: accuracy(verdicts[label]) for name, label in zip(columns, labels)},
            "grid": CONTENT_GRID_FILE}


def variant_scores(label, reference_images, images, reference_outputs, outputs, prompts, scorers) -> dict:
    from mixq.quantizers import sqnr_db

    per_prompt = {
        "psnr_db": [psnr(r, i) for r, i in zip(reference_images, images)],
        "ssim": [ssim(r, i) for r, i in zip(reference_images, images)],
        "unet_sqnr_db": [sqnr_db(r, o) for r, o in zip(reference_outputs, outputs)],
    }
    if "lpips" in scorers:
        per_prompt["lpips"] = [scorers["lpips"](r, i) for r, i in zip(reference_images, images)]
    if "clip_score" in scorers:
        per_prompt["clip_score"] = [scorers["clip_score"](i, p) for i, p in zip(images, prompts)]
    means = {metric: float(np.mean(values)) for metric, values in per_prompt.items()}
    return {"label": label, **means, "per_prompt": per_prompt}


# --- optional, weight-backed metrics ---------------------------------------------------------------


def optional_metric_reasons(clip_model) -> dict[str, str | None]:
    """metric -> why it is skipped, or None when it can be computed."""
    return {"lpips": lpips_unavailable_reason(), "clip_score": clip_unavailable_reason(clip_model)}


def lpips_unavailable_reason() -> str | None:
    try:
        import lpips  # noqa: F401
    except ImportError:
        return "skipped: the lpips package is not installed (its AlexNet weights are needed too)"
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    if not any(checkpoints.glob("alexnet-*.pth")):
        return f"skipped: no AlexNet weights in torch's hub cache ({checkpoints}); LPIPS would download them"
    return None


def clip_unavailable_reason(clip_model) -> str | None:
    if not clip_model:
        return "skipped: no local CLIP model (pass --clip-model DIR, a transformers CLIP folder)"
    if not (Path(clip_model) / "config.json").is_file():
        return f"skipped: {clip_model} is not a transformers model folder (no config.json)"
    return None


def optional_scorers(clip_model, device) -> dict:
    reasons = optional_metric_reasons(clip_model)
    scorers = {}
    if reasons["lpips"] is None:
        scorers["lpips"] = lpips_scorer(device)
    if reasons["clip_score"] is None:
        scorers["clip_score"] = clip_scorer(clip_model, device)
    return scorers


def lpips_scorer(device):
    import lpips

    model = lpips.LPIPS(net="alex", verbose=False).to(device).eval()

    def score(reference, image) -> float:
        def as_tensor(x):  # [H, W, 3] in [0, 1] -> [1, 3, H, W] in [-1, 1]
            return torch.from_numpy(np.ascontiguousarray(x)).float().permute(2, 0, 1)[None].to(device) * 2 - 1

        with torch.no_grad():
            return float(model(as_tensor(reference), as_tensor(image)))

    return score


def clip_scorer(clip_model, device):
    """CLIP score as in torchmetrics: 100 * max(cos(image embedding, text embedding), 0)."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(clip_model, local_files_only=True).to(device).eval()
    processor = CLIPProcessor.from_pretrained(clip_model, local_files_only=True)

    def score(image, prompt) -> float:
        pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        inputs = processor(text=[prompt], images=[pixels], return_tensors="pt", padding=True, truncation=True).to(device)
        with torch.no_grad():
            image_embeds = projected(model.get_image_features(pixel_values=inputs["pixel_values"]))
            text_embeds = projected(model.get_text_features(input_ids=inputs["input_ids"],
                                                            attention_mask=inputs["attention_mask"]))
        cosine = torch.nn.functional.cosine_similarity(image_embeds, text_embeds).item()
        return 100 * max(cosine, 0.0)

    return score


def projected(features) -> torch.Tensor:
    """CLIP's projected embedding: transformers 4 returns it as a tensor, 5 as an output's pooler_output."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


if __name__ == "__main__":
    main()
