"""Which components of a pipeline mixq quantizes, and how their layers are named.

The UNet is always quantized; the VAE decoder and the text encoders are opt-in
(`mixq.quantize(pipe, components=("unet", "vae"))`, `python -m mixq.calibrate --components unet,vae`).
Every component goes through the same layers, kernels, calibration and checkpoint format.

Names: UNet layers keep their own names ("down_blocks.1.attentions.0.proj_in"), as in every plan,
activation-range file and checkpoint; a layer of another component is named by its path from the
pipeline ("vae.decoder.up_blocks.0.resnets.1.conv2", "text_encoder_2.text_model.encoder.layers.3.mlp.fc1").
No UNet layer name starts with another component's name, so the prefix says where a layer lives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from mixq.errors import ConfigError
from mixq.quantizers import check_activation_bits, check_weight_bits

UNET = "unet"
OPTIONAL_COMPONENTS = ("vae", "text_encoder", "text_encoder_2")
COMPONENTS = (UNET, *OPTIONAL_COMPONENTS)

# The part of a component that is quantized: text-to-image never runs the VAE's encoder.
QUANTIZED_PART = {"vae": "decoder"}

# Left in floating point unless keep_fp names layers of the component: the UNet's first and last convs;
# the VAE decoder's first and last convs and its mid-block attention (small, and the last conv writes
# pixels), and the 1x1 shortcuts of its up-block resnets (1.4 % of its work in SDXL, but on the proving
# ground the one there carried 39 % of the W8A8 decoder's PSNR cost: +1.17 dB [1.13, 1.20] in float,
# n = 1000; docs/quantize.md); text_encoder_2's projection of the pooled token (one row per prompt).
DEFAULT_KEEP_FP = {
    UNET: ("conv_in", "conv_out"),
    "vae": ("vae.decoder.conv_in", "vae.decoder.conv_out", "vae.decoder.mid_block.attentions.*",
            "vae.decoder.up_blocks.*.resnets.*.conv_shortcut"),
    "text_encoder": (),
    "text_encoder_2": ("text_encoder_2.text_projection",),
}

# Bits of an opt-in component when neither `components` nor the plan says otherwise.
DEFAULT_COMPONENT_BITS = (8, 8)

# Text encoders are causal: token 0 (BOS) attends only to itself, so every Linear's token-0 input row
# is the same for every prompt, and it carries CLIP's largest activations. It gets the UNet
# cross-attention's BOS treatment (its output row stored, excluded from the activation range).
BOS_EVERY_LINEAR = ("text_encoder", "text_encoder_2")


def component_of(name: str) -> str:
    """The component a (qualified) layer name belongs to."""
    head = name.split(".", 1)[0]
    return head if head in OPTIONAL_COMPONENTS else UNET


def local_name(name: str) -> str:
    """A qualified name's path inside its component module."""
    component = component_of(name)
    return name if component == UNET else name[len(component) + 1:]


def qualified_name(component: str, local: str) -> str:
    """The inverse of component_of/local_name ("" local: the component's own module)."""
    if component == UNET:
        return local
    return f"{component}.{local}" if local else component


@dataclass(frozen=True)
class ComponentChoice:
    name: str
    bits: tuple[int, int] | None  # None: the UNet, whose bits come from w_bit/a_bit or the plan


def parse_components(components) -> dict[str, ComponentChoice]:
    """`components` as given (None, "unet,vae", a sequence of names, or a mapping name -> (w_bits,
    a_bits) or None) -> name -> ComponentChoice, the UNet first. Unknown names and bad bits raise."""
    if components is None:
        return {UNET: ComponentChoice(UNET, None)}
    if isinstance(components, str):
        components = [c.strip() for c in components.split(",") if c.strip()]
    entries = dict(components) if isinstance(components, dict) else {name: None for name in components}
    unknown = [n for n in entries if n not in COMPONENTS]
    if unknown:
        raise ConfigError(f"unknown component {unknown[0]!r}: mixq quantizes {', '.join(COMPONENTS)} "
                          "(the UNet always; the others opt-in)")
    if UNET not in entries:
        raise ConfigError(f"components {tuple(entries)} leave out the UNet, which mixq always quantizes: "
                          f"name it too, e.g. components=('unet', {next(iter(entries), 'vae')!r})")
    if entries[UNET] is not None:
        raise ConfigError("the UNet's bits come from w_bit/a_bit or the plan: give components={'unet': None, ...}")
    choices = {UNET: ComponentChoice(UNET, None)}
    for name in COMPONENTS[1:]:
        if name in entries:
            choices[name] = ComponentChoice(name, component_bits(name, entries[name]))
    return choices


def component_bits(name: str, bits) -> tuple[int, int]:
    if bits is None:
        return DEFAULT_COMPONENT_BITS
    try:
        w, a = bits
        return check_weight_bits(w), check_activation_bits(a)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"bits of component {name!r} must be (w_bits, a_bits), e.g. (8, 8); got {bits!r} "
                          f"({err})") from None


def component_module(pipe, name: str) -> nn.Module:
    """The module of the pipeline whose layers component `name` quantizes (the VAE's decoder)."""
    module = getattr(pipe, name, None)
    if not isinstance(module, nn.Module):
        present = [c for c in COMPONENTS if isinstance(getattr(pipe, c, None), nn.Module)]
        raise ConfigError(f"{type(pipe).__name__} has no {name!r} module to quantize (its components: "
                          f"{', '.join(present) or 'none'})")
    return module


class ComponentTree:
    """The quantized components of a pipeline seen as one module tree addressed by qualified names:
    get_submodule("down_blocks.0....") is in the UNet, get_submodule("vae.decoder....") in the VAE."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules  # component name -> the component's own module (pipe.vae, not its decoder)

    @classmethod
    def of(cls, pipe, names) -> "ComponentTree":
        return cls({name: component_module(pipe, name) for name in names})

    @property
    def unet(self) -> nn.Module:
        return self.modules[UNET]

    def get_submodule(self, name: str) -> nn.Module:
        component = component_of(name)
        if component not in self.modules:
            raise AttributeError(f"{name!r} is in component {component!r}, which is not being quantized")
        return self.modules[component].get_submodule(local_name(name))

    def named_modules(self):
        """(qualified name, module) of every module of every component's quantized part."""
        for component, module in self.modules.items():
            part = QUANTIZED_PART.get(component, "")
            for name, child in module.get_submodule(part).named_modules():
                yield qualified_name(component, f"{part}.{name}" if part and name else part or name), child
