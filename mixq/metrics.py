"""Fidelity metrics shared by calibration and benchmarks (pure functions on tensors)."""

from __future__ import annotations

import math

import torch

from mixq.quantizers import sqnr_db

SSIM_C1 = 0.01 ** 2  # (k1 * L)^2 with L = 1: images in [0, 1]
SSIM_C2 = 0.03 ** 2


def psnr_db(reference: torch.Tensor, image: torch.Tensor, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio of images in [0, peak]; +inf when identical."""
    mse = float((reference.double() - image.double()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def global_ssim(reference: torch.Tensor, image: torch.Tensor) -> float:
    """SSIM with one window covering the whole image (MixDQ's "near-global" window), per image and
    channel, averaged. Images: [..., C, H, W] in [0, 1]."""
    x = reference.double().flatten(-2)
    y = image.double().flatten(-2)
    mx, my = x.mean(-1), y.mean(-1)
    vx, vy = x.var(-1, unbiased=False), y.var(-1, unbiased=False)
    cov = ((x - mx[..., None]) * (y - my[..., None])).mean(-1)
    ssim = ((2 * mx * my + SSIM_C1) * (2 * cov + SSIM_C2)) / ((mx ** 2 + my ** 2 + SSIM_C1) * (vx + vy + SSIM_C2))
    return float(ssim.mean())


__all__ = ["psnr_db", "global_ssim", "sqnr_db"]
