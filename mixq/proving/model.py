"""The shipped proving-ground pipeline: a StableDiffusionXLPipeline trained on the shapes grammar
(mixq.proving.train), stored in this package in diffusers `save_pretrained` layout (fp16 safetensors)
and loaded the way a user's SDXL-Turbo is:

    pipe = StableDiffusionXLPipeline.from_pretrained(mixq.proving.PIPELINE_FOLDER, torch_dtype=torch.float32)
    pipe = mixq.proving.load_pipeline()    # the same, with a clear error if the weights are absent

It generates 64x64 images in SAMPLING's 4 Euler steps without guidance, like SDXL-Turbo.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from mixq.errors import ModelLoadError

PIPELINE_FOLDER = Path(__file__).resolve().parent / "pipeline"
MODEL_ID = "offline:proving"
IMAGE_SIZE = 64
SAMPLER_STEPS = 4
SAMPLING = {"num_inference_steps": SAMPLER_STEPS, "guidance_scale": 0.0, "height": IMAGE_SIZE, "width": IMAGE_SIZE}
TRAINING_RECORD = "training.json"
SHIPPED_DTYPE = torch.float16  # halves the package; the content accuracy is measured on the fp16 weights


def pipeline_folder() -> Path:
    """The shipped pipeline's folder, or an error that says how to make it."""
    if not (PIPELINE_FOLDER / "model_index.json").is_file():
        raise ModelLoadError(f"the proving-ground pipeline is missing from {PIPELINE_FOLDER}: reinstall mixq, or train "
                             "and ship it with `python -m mixq.proving.train --out runs/proving --ship`")
    return PIPELINE_FOLDER


def load_pipeline(dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """The shipped pipeline through StableDiffusionXLPipeline.from_pretrained, progress bars off."""
    from diffusers import StableDiffusionXLPipeline

    from mixq.calib.pipeline import dtype_keyword, loading_bars

    with loading_bars(False):
        pipe = StableDiffusionXLPipeline.from_pretrained(str(pipeline_folder()), **{dtype_keyword(): dtype})
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def ship(pipe, folder: Path = PIPELINE_FOLDER, dtype: torch.dtype = SHIPPED_DTYPE, record: dict | None = None) -> Path:
    """Save a copy of `pipe` in `dtype` as package data (`pipe` itself is left as it was), with
    `record` (how it was trained and what it scored) as TRAINING_RECORD beside it, replacing the
    folder atomically (a failed save leaves the previous pipeline whole)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".pipeline-", dir=folder.parent))
    try:
        copy.deepcopy(pipe).to(dtype).save_pretrained(staging, safe_serialization=True)
        for name in ("tokenizer", "tokenizer_2"):
            if (staging / name / "tokenizer.json").is_file():
                write_vocabulary_files(staging / name)
        if record is not None:
            (staging / TRAINING_RECORD).write_text(json.dumps(record, indent=1) + "\n")
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)  # left by a save that died between its two renames
        if folder.exists():
            os.replace(folder, old)
        os.replace(staging, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def write_vocabulary_files(tokenizer_folder: Path):
    """vocab.json and merges.txt from the tokenizer.json that transformers 5 saves alone: the slow
    CLIPTokenizer of transformers 4.x, which diffusers loads there, reads only these two."""
    model = json.loads((tokenizer_folder / "tokenizer.json").read_text())["model"]
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    (tokenizer_folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    (tokenizer_folder / "merges.txt").write_text("#version: 0.2\n" + "".join(merge + "\n" for merge in merges))
