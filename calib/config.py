"""Calibration configs (configs/*.yaml): model, sampling, calibration, keep-fp layers, bits, budgets.

Every field is checked: an unknown or mistyped field is an error that names it, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import math

from mixq.errors import BudgetError, ConfigError  # noqa: F401 (also importable from here)
from mixq.components import parse_components
from mixq.io import read_yaml
from mixq.quantizers import check_activation_bits, check_weight_bits

DEFAULT_CONFIG = "proving"
QUALITY_SCORES = ("db", "noise")
DTYPES = ("float32", "float16", "bfloat16")

# Command-line flag -> the config field it overrides (a config file uses the field names).
OVERRIDES = {
    "model": "model.id",
    "dtype": "model.dtype",
    "device": "model.device",
    "variant": "model.variant",
    "steps": "sampling.num_inference_steps",
    "guidance": "sampling.guidance_scale",
    "size": "sampling.height and sampling.width",
    "prompts": "calibration.prompts",
    "num_prompts": "calibration.num_prompts",
    "w_bits": "budget.w_bits",
    "a_bits": "budget.a_bits",
    "components": "components",
    "content_prompts": "evaluation.content_prompts",
}


@dataclass
class ModelConfig:
    id: str = "offline:tiny-sdxl"  # a Hub id / local folder, or offline:proving / offline:tiny-sdxl / offline:tiny-sd15
    dtype: str = "float32"
    variant: str | None = None
    lora: str | None = None  # a LoRA to load and fuse before quantization (LCM-LoRA)
    scheduler: str | None = None  # a diffusers scheduler class name, built from the pipeline's config
    device: str = "auto"


@dataclass
class SamplingConfig:
    num_inference_steps: int = 1
    guidance_scale: float = 0.0
    height: int | None = None
    width: int | None = None
    seed: int = 42


@dataclass
class CalibrationConfig:
    prompts: str | None = None  # a prompts file; None: the built-in set
    num_prompts: int = 32  # prompts for activation ranges
    sensitivity_prompts: int = 8  # prompts (and seeds) for the sensitivity pass and plan selection
    batch_size: int = 8


@dataclass
class BitsConfig:
    weight_content: list[int] = field(default_factory=lambda: [2, 4, 8])
    weight_quality: list[int] = field(default_factory=lambda: [4, 8])
    activation: list[int] = field(default_factory=lambda: [4, 8])


@dataclass
class BudgetConfig:
    w_bits: float = 4.0
    a_bits: float = 8.0
    ratios: list[float] = field(default_factory=lambda: [0.7, 0.85, 1.0, 1.15, 1.3])
    # What the quality group's integer program sums: "db", each layer's UNet SQNR in dB (MixDQ), or
    # "noise", each layer's noise power 10^(-SQNR/10), which adds up like independent errors do.
    quality_score: str = "db"


@dataclass
class EvaluationConfig:
    """The report's content check (proving-ground models: prompts of the shapes grammar)."""

    content_prompts: int = 0  # held-out evaluation prompts per configuration; 0: no content check
    grid_prompts: int = 8  # of those, shown in the report's image grid


@dataclass
class Config:
    name: str = "tiny-sdxl"
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    keep_fp: list[str] = field(default_factory=lambda: ["conv_in", "conv_out"])
    # What is quantized: the UNet, plus opt-in "vae" (its decoder), "text_encoder", "text_encoder_2" at
    # W8A8, calibrated in collect and compared in the report's content check (mixq.components).
    components: list[str] = field(default_factory=lambda: ["unet"])
    bits: BitsConfig = field(default_factory=BitsConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def pipeline_kwargs(self) -> dict:
        s = self.sampling
        kwargs = {"num_inference_steps": s.num_inference_steps, "guidance_scale": s.guidance_scale}
        if s.height:
            kwargs["height"] = s.height
        if s.width:
            kwargs["width"] = s.width
        return kwargs

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, data, where: str):
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"config field {where!r} must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown config field {where + '.' if where else ''}{unknown[0]!r} "
                          f"(known fields here: {sorted(known)})")
    values = {}
    for name, value in data.items():
        f = known[name]
        path = f"{where}.{name}" if where else name
        nested = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(nested):
            values[name] = _build(nested, value, path)
        else:
            values[name] = _check_type(value, f.type, path)
    return cls(**values)


def _check_type(value, annotation: str, path: str):
    expected = str(annotation)
    if value is None:
        if "None" in expected:
            return None
        raise ConfigError(f"config field {path!r} must not be empty")
    if expected.startswith("list"):
        if not isinstance(value, list):
            raise ConfigError(f"config field {path!r} must be a list, got {value!r}")
        return value
    for name, kind in (("int", int), ("float", (int, float)), ("str", str)):
        if expected.startswith(name):
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ConfigError(f"config field {path!r} must be {name}, got {value!r}")
            return float(value) if name == "float" else value
    return value


def parse_size(text: str) -> tuple[int, int]:
    """'512' -> (512, 512); '1024x768' (width x height) -> (768, 1024) as (height, width)."""
    parts = str(text).lower().split("x")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 2) or any(n <= 0 for n in numbers):
        raise ConfigError(f"--size {text!r}: give one number (square images, e.g. 512) or WIDTHxHEIGHT (e.g. 1024x768)")
    width, height = numbers if len(numbers) == 2 else numbers * 2
    return height, width


def apply_overrides(config: Config, *, model=None, dtype=None, device=None, variant=None, steps=None, guidance=None,
                    size=None, prompts=None, num_prompts=None, w_bits=None, a_bits=None, components=None,
                    content_prompts=None) -> Config:
    """The config with every given (not None) command-line value put in its field (see OVERRIDES)."""
    fields = {
        ("model", "id"): model, ("model", "dtype"): dtype, ("model", "device"): device, ("model", "variant"): variant,
        ("sampling", "num_inference_steps"): steps, ("sampling", "guidance_scale"): guidance,
        ("calibration", "prompts"): prompts, ("calibration", "num_prompts"): num_prompts,
        ("budget", "w_bits"): None if w_bits is None else float(w_bits),
        ("budget", "a_bits"): None if a_bits is None else float(a_bits),
        ("evaluation", "content_prompts"): content_prompts,
    }
    if size is not None:
        fields[("sampling", "height")], fields[("sampling", "width")] = parse_size(size)
    for (section, name), value in fields.items():
        if value is not None:
            setattr(getattr(config, section), name, value)
    if components is not None:
        config.components = [c.strip() for c in components.split(",") if c.strip()]
    return config


def check_budget_range(config: Config):
    """A budget outside [smallest, largest candidate bits] is refused: below, no plan exists; above,
    every layer already gets the largest candidate, so the number would be a lie in the report."""
    weight_bits = config.bits.weight_content + config.bits.weight_quality
    for flag, value, candidates in (("--w-bits", config.budget.w_bits, weight_bits),
                                    ("--a-bits", config.budget.a_bits, config.bits.activation)):
        low, high = min(candidates), max(candidates)
        if not math.isfinite(value) or not low <= value <= high:
            raise BudgetError(
                f"{flag} {value:g} (config field 'budget.{flag[2:].replace('-', '_')}') is outside {low:g}..{high:g}, "
                f"the smallest and largest candidate bit-widths of this config ({sorted(set(candidates))}); "
                f"give a budget in that range")


def check_model_settings(config: Config):
    model, sampling = config.model, config.sampling
    if model.dtype not in DTYPES:
        raise ConfigError(f"config field 'model.dtype' (--dtype) is {model.dtype!r}; choose one of {', '.join(DTYPES)}")
    if model.device != "auto":
        import torch

        try:
            torch.device(model.device)
        except (RuntimeError, ValueError):
            raise ConfigError(f"config field 'model.device' (--device) is {model.device!r}; use auto, cpu, cuda or "
                              "cuda:N") from None
    for name in ("height", "width"):
        value = getattr(sampling, name)
        if value is not None and (value <= 0 or value % 8):
            raise ConfigError(f"config field 'sampling.{name}' (--size) is {value}; image sizes must be positive "
                              "multiples of 8 (the VAE downsamples by 8)")
    if sampling.guidance_scale < 0:
        raise ConfigError(f"config field 'sampling.guidance_scale' (--guidance) is {sampling.guidance_scale:g}; "
                          "use 0 or more")


def validate(config: Config) -> Config:
    for path, values, check in (("bits.weight_content", config.bits.weight_content, check_weight_bits),
                                ("bits.weight_quality", config.bits.weight_quality, check_weight_bits),
                                ("bits.activation", config.bits.activation, check_activation_bits)):
        if not values:
            raise ConfigError(f"config field {path!r} needs at least one bit-width")
        for bits in values:
            try:
                check(bits)
            except ValueError as err:
                raise ConfigError(f"config field {path!r}: {err}") from None
    if config.sampling.num_inference_steps < 1:
        raise ConfigError("config field 'sampling.num_inference_steps' must be at least 1")
    if config.calibration.num_prompts < 1 or config.calibration.sensitivity_prompts < 1:
        raise ConfigError("config fields 'calibration.num_prompts' and 'calibration.sensitivity_prompts' must be >= 1")
    if config.evaluation.content_prompts < 0 or config.evaluation.grid_prompts < 0:
        raise ConfigError("config fields 'evaluation.content_prompts' and 'evaluation.grid_prompts' must be >= 0")
    if config.budget.quality_score not in QUALITY_SCORES:
        raise ConfigError(f"config field 'budget.quality_score' is {config.budget.quality_score!r}; use one of "
                          f"{', '.join(QUALITY_SCORES)}")
    if not config.budget.ratios or any(r <= 0 for r in config.budget.ratios):
        raise ConfigError("config field 'budget.ratios' must be a non-empty list of positive numbers")
    try:
        parse_components(config.components)
    except ConfigError as err:
        raise ConfigError(f"config field 'components' (--components): {err}") from None
    check_model_settings(config)
    check_budget_range(config)
    return config


def load_config(source=None) -> Config:
    """None -> the offline default (proving); a name ('sdxl-turbo') -> the shipped config; else a path."""
    source = DEFAULT_CONFIG if source is None else source
    path = Path(source)
    if not path.is_file():
        from mixq.configs.shipped import config_path, shipped_configs

        shipped = config_path(str(source))
        if shipped is None:
            raise ConfigError(f"no config file {source!r} (shipped configs: {', '.join(shipped_configs())})")
        path = shipped
    return config_from_data(read_yaml(path) or {})


def config_from_data(data: dict) -> Config:
    """A checked Config from a parsed YAML mapping (a config file, or a run folder's config.yaml)."""
    return validate(_build(Config, data, ""))

