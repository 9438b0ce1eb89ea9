"""Content and quality of a pipeline's images on held-out evaluation prompts of the shapes grammar.

    pairs = evaluation_prompts(200)
    images = generate(pipe, [text for _, text in pairs], seed=0)        # [N, 64, 64, 3] uint8
    scores = score_images(images, [scene for scene, _ in pairs], reference=float_images)

`score_images` gives the checker's per-attribute and overall content accuracy, the no-reference
quality measures (edge sharpness, background noise) and, against a reference (the float pipeline's
images for the same prompts and seeds), PSNR and SSIM. `save_grid` draws images side by side with
their prompts and verdicts.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from mixq.metrics import psnr, ssim

from .content import accuracy, background_noise, check, edge_sharpness
from .model import SAMPLING
from .scenes import Scene, scenes

EVALUATION_SEED = 0  # the evaluation prompts are the same whatever the sampling seed


def evaluation_prompts(count: int, seed: int = EVALUATION_SEED) -> list[tuple[Scene, str]]:
    """`count` held-out (scene, caption) pairs: never seen in training or calibration."""
    return scenes("evaluation", count, seed)


@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int, batch_size: int = 50, sampling: dict = SAMPLING) -> np.ndarray:
    """[N, H, W, 3] uint8 images; image i gets noise from seed + i whatever the batch it runs in."""
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(chunk))]
        images = pipe(chunk, generator=generators, output_type="np", **sampling).images
        out.append(np.clip(np.round(images * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def verdicts_for(images: np.ndarray, scenes_: list[Scene]) -> list:
    if len(images) != len(scenes_):
        raise ValueError(f"{len(images)} images for {len(scenes_)} prompts")
    return [check(image, scene) for image, scene in zip(images, scenes_)]


def score_images(images: np.ndarray, scenes_: list[Scene], reference: np.ndarray | None = None,
                 verdicts: list | None = None) -> dict:
    """Content accuracy per attribute and overall, mean edge sharpness and background noise, and PSNR
    (over all images) / mean SSIM against `reference` when given. `verdicts`: the images' verdicts
    when already known (the checker is the costly part)."""
    scores = {"content": accuracy(verdicts if verdicts is not None else verdicts_for(images, scenes_)),
              "edge_sharpness": float(np.mean([edge_sharpness(i) for i in images])),
              "background_noise": float(np.nanmean([background_noise(i) for i in images]))}
    if reference is not None:
        a, b = reference.astype(np.float64) / 255, images.astype(np.float64) / 255
        scores["psnr"] = psnr(a, b)
        scores["ssim"] = float(np.mean([ssim(r, i) for r, i in zip(a, b)]))
    return scores


def save_grid(path, prompts: list[str], columns: dict[str, np.ndarray], verdicts: dict[str, list]):
    """A PNG with one row per prompt and one column per configuration; each image is titled with its
    verdict (OK, or the attributes it got wrong). Written atomically, like every report file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, names = len(prompts), list(columns)
    fig, axes = plt.subplots(rows, len(names), figsize=(2.0 * len(names) + 2.6, 2.1 * rows), squeeze=False)
    for r, prompt in enumerate(prompts):
        for c, name in enumerate(names):
            ax = axes[r][c]
            ax.imshow(columns[name][r], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            verdict = verdicts[name][r]
            wrong = [k for k, ok in asdict(verdict).items() if not ok]
            ax.set_title("OK" if not wrong else "wrong: " + ", ".join(wrong), fontsize=7,
                         color="darkgreen" if not wrong else "darkred")
            if r == 0:
                ax.text(0.5, 1.25, name, transform=ax.transAxes, ha="center", fontsize=9, weight="bold")
        axes[r][0].set_ylabel(_wrap(prompt), rotation=0, ha="right", va="center", fontsize=7, labelpad=6)
    fig.tight_layout()
    from mixq.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def _wrap(text: str, width: int = 28) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))
