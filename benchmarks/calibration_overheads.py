"""The calibration's overheads of mixq's own, timed alone (a profiler inflates them many times over).

    python -m benchmarks.calibration_overheads

Alternating old and new ways, one process: rewriting a sensitivity table after each of 202 layers (the
whole dump each time against TableText's rows emitted once; text only, no disk), and SSIM of 335
batches of 8 64x64 RGB images (image by image against batch_ssim, which must agree bit for bit).
"""

from __future__ import annotations

import random
import sys
import time

import numpy as np
import torch
import yaml

from mixq.io import TableText, _FastSafeDumper
from mixq.metrics import batch_ssim, ssim

LAYERS, SSIM_BATCHES = 202, 335


def table_rows(count: int) -> dict:
    rng = random.Random(0)
    return {f"up_blocks.{i // 40}.attentions.{i % 40}.transformer_blocks.0.attn{1 + i % 2}.to_q": {
        "group": "quality", "metric": "sqnr_db", "params": rng.randrange(10**6), "act_numel": rng.randrange(10**5),
        "weight": {b: rng.uniform(0, 90) for b in (2, 4, 8)}, "activation": {b: rng.uniform(0, 90) for b in (4, 8)}}
        for i in range(count)}


def rewrite_whole(rows: dict):
    grown = {}
    for name, row in rows.items():
        grown[name] = row
        yaml.dump({"layers": grown}, Dumper=_FastSafeDumper, sort_keys=False)


def rewrite_rows_once(rows: dict):
    grown, texts = {}, TableText()
    for name, row in rows.items():
        grown[name] = row
        texts.text({}, grown)


def ssim_image_by_image(reference, images) -> float:
    a, b = reference.permute(0, 2, 3, 1).numpy(), images.permute(0, 2, 3, 1).numpy()
    return float(np.mean([ssim(r, i) for r, i in zip(a, b)]))


def seconds(fn, *args, repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn(*args)
    return time.perf_counter() - start


def main() -> int:
    rows = table_rows(LAYERS)
    generator = torch.Generator().manual_seed(0)
    reference = torch.rand(8, 3, 64, 64, generator=generator)
    images = (reference + 1e-3 * torch.randn(8, 3, 64, 64, generator=generator)).clamp(0, 1)
    assert batch_ssim(reference, images) == ssim_image_by_image(reference, images)
    for _ in range(2):
        print(f"table, {LAYERS} rewrites: whole dump {seconds(rewrite_whole, rows):.3f} s, "
              f"rows once {seconds(rewrite_rows_once, rows):.3f} s", flush=True)
        print(f"SSIM, {SSIM_BATCHES} batches of 8: image by image "
              f"{seconds(ssim_image_by_image, reference, images, repeat=SSIM_BATCHES):.2f} s, "
              f"batched {seconds(batch_ssim, reference, images, repeat=SSIM_BATCHES):.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
