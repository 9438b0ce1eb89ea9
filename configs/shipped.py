"""Shipped calibration configs (installed as mixq.configs): `config_path("sdxl-turbo")`."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.yaml"))


def config_path(name: str) -> Path | None:
    """A shipped config by name ('sdxl-turbo', 'tiny-sdxl.yaml', 'configs/sdxl-turbo.yaml')."""
    candidate = HERE / (Path(name).stem + ".yaml")
    return candidate if candidate.is_file() else None
