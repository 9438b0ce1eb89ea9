"""The benchmark settings: one option table shared by the pytest suites, fidelity and the runner.

Three model configs:
  proving     the default: the proving-ground pipeline shipped in mixq (mixq.proving; SDXL architecture
              at small widths, trained on flat coloured shapes), 64x64, 4 steps, CPU. Its images have
              checkable content, so fidelity also reports each variant's content accuracy on held-out
              prompts.
  tiny        the offline tiny SDXL pipeline (mixq.offline), random weights, CPU-sized: checks that the
              suite works, fastest.
  sdxl-turbo  the full SDXL-Turbo architecture from a real unet/config.json (--unet-config) with
              random weights (weight values do not change speed or memory), 512x512, batch 1, fp16,
              CUDA. The text encoders and VAE are SDXL 1.0's (built-in configs, or the ones in
              --mixq-components), also with random weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

MODES = ("eager", "compile", "cuda-graph")
CONFIGS = ("proving", "tiny", "sdxl-turbo")

# (flags, argparse/pytest keyword arguments). Defaults are None where they depend on the config.
OPTIONS = (
    (("--mixq-config",), dict(default="proving", choices=CONFIGS,
                              help="model: proving (trained, shipped, offline), tiny (random weights, offline) or "
                                   "sdxl-turbo (full architecture, CUDA)")),
    (("--unet-config",), dict(default=None, help="a diffusers unet/config.json (file or folder); needed by sdxl-turbo")),
    (("--mixq-components",), dict(default=None, help="sdxl-turbo: a diffusers SDXL model folder whose text_encoder/, "
                                                     "text_encoder_2/ and vae/ config.json replace the built-in "
                                                     "SDXL 1.0 configs")),
    (("--mixq-tokenizer",), dict(default=None, help="a CLIP tokenizer folder for tiny / sdxl-turbo (default: mixq's built-in byte-level one)")),
    (("--plan",), dict(default=None, help="mixed-precision plan YAML for the 'plan' variant "
                                          "(default: derived, see benchmarks/plans.py)")),
    (("--mixq-mode",), dict(default="eager", choices=MODES,
                            help="how every variant's UNet runs: eager, torch.compile, or captured in a CUDA graph")),
    (("--mixq-device",), dict(default=None, help="torch device (default: cuda for sdxl-turbo, cpu for tiny and proving)")),
    (("--mixq-resolution",), dict(default=None, type=int, help="image side in pixels (default: 512 / proving 64 / tiny 32)")),
    (("--mixq-steps",), dict(default=None, type=int, help="denoising steps per image, guidance 0 as SDXL-Turbo "
                                                         "(default: proving 4, others 1)")),
    (("--mixq-rounds",), dict(default=None, type=int, help="timed rounds per benchmark (default: cuda 20, cpu 3)")),
    (("--mixq-warmup",), dict(default=None, type=int, help="untimed warm-up calls per benchmark (default: cuda 5, cpu 1)")),
    (("--mixq-calibration-prompts",), dict(default=None, type=int, help="prompts used to calibrate activation ranges: "
                                                                      "the built-in set, or for proving the grammar's "
                                                                      "calibration split (default: 4, proving 16)")),
)


def option_dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_options(add, names=None):
    """Register the options with `add(*flags, **kwargs)`: argparse's add_argument or pytest's addoption."""
    for flags, kwargs in OPTIONS:
        if names is None or flags[0] in names:
            add(*flags, dest=option_dest(flags[0]), **kwargs)


def options_as_argv(values: dict) -> list[str]:
    """{dest: value} -> the command-line flags that reproduce the non-default values."""
    argv = []
    for flags, kwargs in OPTIONS:
        value = values.get(option_dest(flags[0]))
        if value is not None and value != kwargs.get("default"):
            argv += [flags[0], str(value)]
    return argv


@dataclass(frozen=True)
class BenchConfig:
    name: str
    device: str
    dtype: str  # "float16" | "float32"
    resolution: int
    steps: int
    mode: str
    rounds: int
    warmup: int
    calibration_prompts: int
    unet_config: str | None = None
    components: str | None = None
    tokenizer: str | None = None
    plan: str | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def fp_label(self) -> str:
        return {"float16": "fp16", "float32": "fp32", "bfloat16": "bf16"}[self.dtype]

    @property
    def calibration_source(self) -> str | None:
        """Where calibration prompts come from (None: mixq's built-in set)."""
        return "proving:calibration" if self.name == "proving" else None

    @property
    def is_cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    def generation_kwargs(self) -> dict:
        """What every pipeline call of the suite passes: SDXL-Turbo settings (guidance 0)."""
        return {"num_inference_steps": self.steps, "guidance_scale": 0.0,
                "height": self.resolution, "width": self.resolution}

    def as_dict(self) -> dict:
        return asdict(self)


def bench_config(values: dict) -> BenchConfig:
    """Resolve per-config defaults from {dest: value} (parsed options; None = default)."""
    name = values.get("mixq_config") or "proving"
    full = name == "sdxl-turbo"
    device = values.get("mixq_device") or ("cuda" if full else "cpu")
    cuda = torch.device(device).type == "cuda"
    if full and not values.get("unet_config"):
        raise ValueError("--mixq-config sdxl-turbo needs --unet-config PATH (a diffusers unet/config.json)")
    if cuda and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but torch sees no CUDA device")
    if name == "proving" and values.get("mixq_tokenizer"):
        raise ValueError("--mixq-tokenizer applies to the tiny and sdxl-turbo configs: the proving pipeline ships "
                         "its own tokenizer, which its text encoders were trained with")
    mode = values.get("mixq_mode") or "eager"
    if mode == "cuda-graph" and not cuda:
        raise ValueError("--mixq-mode cuda-graph needs a CUDA device")

    def resolved(key, default):
        value = values.get(key)
        return default if value is None else value

    return BenchConfig(
        name=name,
        device=device,
        dtype="float16" if cuda else "float32",
        resolution=resolved("mixq_resolution", 512 if full else 64 if name == "proving" else 32),
        steps=resolved("mixq_steps", 4 if name == "proving" else 1),
        mode=mode,
        rounds=resolved("mixq_rounds", 20 if cuda else 3),
        warmup=resolved("mixq_warmup", 5 if cuda else 1),
        calibration_prompts=resolved("mixq_calibration_prompts", 16 if name == "proving" else 4),
        unet_config=_path_or_none(values.get("unet_config")),
        components=_path_or_none(values.get("mixq_components")),
        tokenizer=_path_or_none(values.get("mixq_tokenizer")),
        plan=_path_or_none(values.get("plan")),
    )


def _path_or_none(value) -> str | None:
    # Kept as given (relative to where the command runs): results record it and may be committed.
    return str(Path(value).expanduser()) if value else None
