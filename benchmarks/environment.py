"""What a result was measured on: device and library versions, recorded with every result file."""

from __future__ import annotations

import os
import platform
import re
from importlib import metadata

import torch

from mixq.machine import describe_cpu

LIBRARIES = ("torch", "triton", "diffusers", "transformers", "torchao", "mixq", "pytest-benchmark")


def library_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {describe_cpu()}, {torch.get_num_threads()} torch threads"


def device_slug(device) -> str:
    """A short file-name-safe device name: 'cpu', 'nvidia-h100-80gb-hbm3', ..."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def kernel_backend(device) -> str:
    """The backend mixq's quantized layers dispatch to on this device (MIXQ_BACKEND, auto-resolved)."""
    from mixq.kernels.dispatch import selected_backend

    return selected_backend(torch.empty(0, device=device))


def environment(device) -> dict:
    cpu = torch.device(device).type != "cuda"
    return {
        # Other processes on the machine skew CPU timings; the 1-minute load average says how much.
        "load_average_1min": round(os.getloadavg()[0], 2) if cpu and hasattr(os, "getloadavg") else None,
        "cpu_count": os.cpu_count(),
        "device": device_name(device),
        "device_slug": device_slug(device),
        "mixq_kernel_backend": kernel_backend(device),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.version.cuda if torch.device(device).type == "cuda" else None,
        "versions": {name: library_version(name) for name in LIBRARIES},
    }
