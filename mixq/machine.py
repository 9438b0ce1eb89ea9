"""What CPU a number was measured on: its name and its int8/bf16 matrix features (from /proc/cpuinfo
on Linux), for reports. CPU timings differ several-fold between CPUs with and without VNNI or AMX."""

from __future__ import annotations

import os
import platform
from pathlib import Path

INT8_FLAGS = ("amx_int8", "amx_tile", "amx_bf16", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512f", "avx2")


def _cpuinfo_field(name: str) -> str | None:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    return None


def cpu_model() -> str:
    """The CPU's marketing name where the OS tells it (Linux), else the architecture."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags() -> str:
    """Every feature flag the OS lists for the CPU (Linux), space-separated; "" elsewhere."""
    return _cpuinfo_field("flags") or ""


def cpu_features() -> dict[str, bool]:
    """INT8_FLAGS -> present, from /proc/cpuinfo (Linux); empty elsewhere."""
    flags = _cpuinfo_field("flags")
    if flags is None:
        return {}
    present = set(flags.split())
    return {flag: flag in present for flag in INT8_FLAGS}


def describe_cpu() -> str:
    """'AMD EPYC 7B13, 2 cores, int8/bf16 features: avx512_vnni avx_vnni avx512_bf16 (no AMX)'; the
    features read 'unknown' where the OS does not list them (off Linux)."""
    features = cpu_features()
    if not features:
        return f"{cpu_model()}, {os.cpu_count()} cores, int8/bf16 features: unknown"
    have = [f for f in ("amx_int8", "avx512_vnni", "avx_vnni", "avx512_bf16") if features.get(f)]
    amx = "" if features.get("amx_int8") else " (no AMX)"
    return f"{cpu_model()}, {os.cpu_count()} cores, int8/bf16 features: {' '.join(have) or 'none'}{amx}"
