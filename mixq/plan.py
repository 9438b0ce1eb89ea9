"""Bit plans: layer name -> (w_bits, a_bits), from uniform settings, a mapping or a YAML file.

YAML layout (what `python -m mixq.calibrate` writes; a bare `name: {w_bits, a_bits}` mapping
is accepted too):

    model: <architecture fingerprint>      # optional; checked against the UNet when present
    layers:
      down_blocks.1.attentions.0.proj_in: {w_bits: 4, a_bits: 8}
      ...
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch.nn as nn

from mixq.components import UNET, component_of
from mixq.errors import ConfigError, PlanMismatchError
from mixq.io import read_yaml
from mixq.quantizers import FLOAT_BITS, check_activation_bits, check_weight_bits




def layer_signature(module) -> tuple | None:
    """The shape of a Linear/Conv2d, the same for its float, quantized and fake-quant forms."""
    module = getattr(module, "inner", module)  # fake-quant twins wrap the float layer
    kernel = tuple(getattr(module, "kernel_size", (1, 1)))
    if isinstance(module, nn.Linear) or getattr(module, "kind", None) == "linear":
        return ("linear", module.in_features, module.out_features)
    if isinstance(module, nn.Conv2d) or getattr(module, "kind", None) == "conv2d":
        return ("conv2d", module.in_channels, module.out_channels, *kernel, *tuple(module.stride), *tuple(module.padding))
    return None


def architecture_fingerprint(unet) -> str:
    """A short hash of the UNet's structure: every Linear/Conv2d's name and shape, and the name and
    shape of every other parameter. Quantizing a UNet does not change it; a different architecture
    does. (The config is not hashed: a diffusers release that adds a config field would otherwise
    orphan every saved plan and checkpoint.)"""
    parts, layers = [type(unet).__name__], []
    for name, module in unet.named_modules():
        if any(name.startswith(prefix + ".") for prefix in layers):
            continue
        signature = layer_signature(module)
        if signature is not None:
            layers.append(name)
            parts.append(f"{name}:{signature}")
        else:
            parts.extend(f"{name}.{p}:{tuple(t.shape)}" for p, t in module.named_parameters(recurse=False))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


# A plan of the full SDXL UNet (794 layers, plan.yaml with its averages) is about 100 KB.
MAX_PLAN_BYTES = 1 << 20  # ten times that: a larger file is refused before the (slow) parse


def read_plan(plan) -> tuple[dict[str, tuple[int, int]], dict]:
    """A mapping or YAML path -> ({name: (w_bits, a_bits)}, metadata)."""
    source = plan
    if isinstance(plan, (str, Path)):
        plan = read_yaml(plan, error=PlanMismatchError, max_bytes=MAX_PLAN_BYTES)
    if not isinstance(plan, dict):
        raise PlanMismatchError(f"plan {source!r} must be a mapping of layer name -> {{w_bits, a_bits}}")
    meta = {}
    if "layers" in plan and isinstance(plan["layers"], dict):
        meta = {k: v for k, v in plan.items() if k != "layers"}
        plan = plan["layers"]
    bits = {}
    for name, entry in plan.items():
        if not isinstance(name, str):
            raise PlanMismatchError(f"plan {source!r}: layer names must be strings, got {name!r}")
        try:
            w, a = (entry["w_bits"], entry["a_bits"]) if isinstance(entry, dict) else entry
        except (KeyError, TypeError, ValueError):
            raise PlanMismatchError(f"plan entry for {name!r} must be {{w_bits: W, a_bits: A}}, got {entry!r}") from None
        try:
            if isinstance(w, bool) or isinstance(a, bool):
                raise ValueError(f"bit-widths must be numbers, got {w!r}, {a!r}")
            bits[name] = (check_weight_bits(w), check_activation_bits(a))
        except (ValueError, TypeError) as err:
            raise PlanMismatchError(f"plan entry for {name!r}: {err}") from None
    return bits, meta


def resolve_bits(layer_names, keep_fp: set[str], w_bit: int, a_bit: int, plan=None, unet=None,
                 uniform: dict | None = None) -> dict[str, tuple[int, int]]:
    """The (w_bits, a_bits) of every layer: keep_fp layers 16/16, the rest from the plan or uniform.
    uniform: name -> (w, a) where it is not w_bit/a_bit (layers of opt-in components). A plan must cover
    the UNet; it covers an opt-in component wholly or not at all (then the component's uniform bits)."""
    try:
        check_weight_bits(w_bit)
        check_activation_bits(a_bit)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    uniform = {n: (uniform or {}).get(n, (w_bit, a_bit)) for n in layer_names}
    if plan is None:
        bits = uniform
    else:
        bits, meta = read_plan(plan)
        if unet is not None and meta.get("model") and meta["model"] != architecture_fingerprint(unet):
            raise PlanMismatchError(
                f"this plan was made for another model (fingerprint {meta['model']}, this UNet is "
                f"{architecture_fingerprint(unet)}): calibrate this model with `python -m mixq.calibrate`"
            )
        check_plan_components(bits, layer_names)
        covered = plan_components(bits)
        given, bits = bits, {**{n: uniform[n] for n in layer_names if component_of(n) not in covered}, **bits}
        check_plan_covers(bits, layer_names, keep_fp)
        warn_plan_overridden(given, keep_fp)
    return {n: (FLOAT_BITS, FLOAT_BITS) if n in keep_fp else bits[n] for n in layer_names}


def warn_plan_overridden(bits: dict, keep_fp: set[str]):
    """A plan that quantizes a layer keep_fp keeps in floating point (conv_in/conv_out by default) loses."""
    overridden = sorted(n for n in keep_fp if n in bits and bits[n] != (FLOAT_BITS, FLOAT_BITS))
    if overridden:
        warnings.warn(
            f"the plan gives bits to {len(overridden)} layer(s) that keep_fp keeps in floating point "
            f"({', '.join(overridden[:3])}); they stay in floating point. Pass keep_fp=[] (or a list without them) to "
            "quantize them as the plan says", stacklevel=4)


def plan_components(bits: dict) -> set[str]:
    return {component_of(n) for n in bits}


def check_plan_components(bits: dict, layer_names):
    """A plan naming layers of a component that is not being quantized is refused, naming it."""
    absent = sorted(plan_components(bits) - {component_of(n) for n in layer_names} - {UNET})
    if absent:
        example = next(n for n in bits if component_of(n) == absent[0])
        raise PlanMismatchError(
            f"the plan gives bits to layers of the {absent[0]} (e.g. {example!r}), which is not being quantized: add "
            f"it to components (components=('unet', {absent[0]!r}), --components unet,{absent[0]}) or remove those "
            "entries")


def check_plan_covers(bits: dict, layer_names, keep_fp: set[str]):
    names = set(layer_names)
    unknown = sorted(set(bits) - names)
    missing = sorted(names - set(bits) - keep_fp)
    if unknown:
        raise PlanMismatchError(
            f"the plan names {len(unknown)} layer(s) this UNet does not have (e.g. {unknown[:3]}): it was made "
            "for another model; calibrate this one with `python -m mixq.calibrate`"
        )
    if missing:
        raise PlanMismatchError(
            f"the plan gives no bits for {len(missing)} layer(s) of this UNet (e.g. {missing[:3]}): add them "
            "(w_bits/a_bits 16 keeps a layer in floating point) or list them in keep_fp"
        )
