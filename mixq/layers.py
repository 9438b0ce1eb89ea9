"""Which layers of a UNet (and of the other components mixq quantizes) are quantized, and what each
one needs to know about its place.

Everything here reads the module structure; nothing is specific to SDXL's widths. The functions take
a UNet or a mixq.components.ComponentTree (the quantized components under their qualified names).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch.nn as nn

from mixq.components import BOS_EVERY_LINEAR, UNET, ComponentTree, component_of
from mixq.components import DEFAULT_KEEP_FP as COMPONENT_KEEP_FP
from mixq.errors import ConfigError
from mixq.modules import FakeQuantConv2d, FakeQuantLinear, QuantizedLayer, is_supported_conv

CONTENT_COMPONENTS = ("attn2", "ff")  # cross-attention and feed-forward: judged on the image (SSIM)
BOS_LAYER_SUFFIXES = ("attn2.to_k", "attn2.to_v")
DEFAULT_KEEP_FP = COMPONENT_KEEP_FP[UNET]


@dataclass(frozen=True)
class LayerInfo:
    name: str
    kind: str  # "linear" | "conv2d"
    group: str  # UNet: "content" | "quality"; another component: its name ("vae", "text_encoder", ...)
    params: int
    split_at: int | None  # input channels of the first part, for split activation quantization
    bos: bool  # cross-attention key/value projection of the text embedding


def layer_group(name: str) -> str:
    component = component_of(name)
    if component != UNET:
        return component
    parts = name.split(".")
    return "content" if any(c in parts for c in CONTENT_COMPONENTS) else "quality"


def is_bos_layer(name: str) -> bool:
    """A Linear whose token-0 input row is the same for every prompt: the UNet's cross-attention key and
    value projections of the text embedding, and every Linear of a (causal) text encoder."""
    return name.endswith(BOS_LAYER_SUFFIXES) or component_of(name) in BOS_EVERY_LINEAR


def find_lora_layers(unet: nn.Module) -> list[str]:
    """PEFT adapter wrappers (LoRA, LoHa, LoKr, ...): a base_layer plus adapter modules."""
    return [n for n, m in unet.named_modules() if is_adapter_wrapper(m)]


def is_adapter_wrapper(module: nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return hasattr(module, "base_layer")
    return isinstance(module, BaseTunerLayer)


def find_quantized_layers(unet: nn.Module) -> list[str]:
    return [n for n, m in unet.named_modules() if isinstance(m, (QuantizedLayer, FakeQuantLinear, FakeQuantConv2d))]


def up_block_split_points(unet: nn.Module) -> dict[str, int]:
    """conv_shortcut name -> number of input channels coming from the hidden state.

    Up-block resnets take cat([hidden, skip], dim=1). The hidden part of resnet j is the output
    of resnet j-1, and for j == 0 the output of whatever ran before the block: the previous up
    block (upsamplers keep channels) or, for the first up block, the mid block.
    """
    up_blocks = getattr(unet, "up_blocks", None)
    if up_blocks is None:
        return {}
    previous = _mid_block_channels(unet)
    splits = {}
    for i, block in enumerate(up_blocks):
        for j, resnet in enumerate(getattr(block, "resnets", [])):
            shortcut = getattr(resnet, "conv_shortcut", None)
            hidden = previous
            if isinstance(shortcut, nn.Conv2d) and hidden is not None and 0 < hidden < shortcut.in_channels:
                splits[f"up_blocks.{i}.resnets.{j}.conv_shortcut"] = hidden
            previous = getattr(resnet, "out_channels", None)
    return splits


def _mid_block_channels(unet):
    mid = getattr(unet, "mid_block", None)
    if mid is not None and getattr(mid, "resnets", None):
        return mid.resnets[-1].out_channels
    down = getattr(unet, "down_blocks", None)
    if down and getattr(down[-1], "resnets", None):
        return down[-1].resnets[-1].out_channels
    return None


def quantizable_layers(unet) -> dict[str, LayerInfo]:
    """Every nn.Linear and nn.Conv2d of the UNet (or ComponentTree) that mixq can replace exactly, in
    module order."""
    splits = up_block_split_points(unet.unet if isinstance(unet, ComponentTree) else unet)
    layers = {}
    for name, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or float_only_reason(module):
            continue
        kind = "linear" if isinstance(module, nn.Linear) else "conv2d"
        layers[name] = LayerInfo(
            name=name, kind=kind, group=layer_group(name), params=module.weight.numel(),
            split_at=splits.get(name), bos=kind == "linear" and is_bos_layer(name),
        )
    return layers


def float_only_layers(unet: nn.Module) -> dict[str, str]:
    """name -> why, for every Linear/Conv2d that mixq leaves in floating point whatever the settings."""
    return {name: reason for name, module in unet.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d)) and (reason := float_only_reason(module))}


# Subclasses whose forward is the plain op while they hold no adapter (diffusers' LoRA-compatible layers).
PLAIN_WHEN_NO_ADAPTER = ("LoRACompatibleLinear", "LoRACompatibleConv")


def float_only_reason(module: nn.Module) -> str | None:
    """Why mixq cannot replace this Linear/Conv2d by a quantized layer, or None if it can."""
    base = nn.Linear if isinstance(module, nn.Linear) else nn.Conv2d
    if has_custom_forward(module, base):
        # QLinear/QConv2d compute the plain op: a subclass's own forward would be silently dropped.
        return f"{type(module).__name__} has its own forward, which a quantized layer would not run"
    if base is nn.Conv2d and not is_supported_conv(module):
        return (f"Conv2d with groups={module.groups}, dilation={tuple(module.dilation)}, padding={module.padding!r}, "
                f"padding_mode={module.padding_mode!r} (quantized: groups 1, dilation 1, numeric zero padding)")
    return None


def has_custom_forward(module: nn.Module, base: type) -> bool:
    cls = type(module)
    if cls is base:
        return False
    if cls.__name__ in PLAIN_WHEN_NO_ADAPTER and getattr(module, "lora_layer", None) is None:
        return False
    return any(getattr(cls, method, None) is not getattr(base, method, None) for method in ("forward", "_conv_forward"))


def resolve_keep_fp(keep_fp, layer_names, defaults=DEFAULT_KEEP_FP) -> set[str]:
    """Names or glob patterns (fnmatch) -> the set of layer names left in floating point.

    A pattern that matches no layer is an error: it is almost always a typo or a name from
    another model."""
    patterns = defaults if keep_fp is None else ((keep_fp,) if isinstance(keep_fp, str) else tuple(keep_fp))
    kept = set()
    for pattern in patterns:
        matched = [n for n in layer_names if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not matched and keep_fp is not None:
            raise ConfigError(f"keep_fp entry {pattern!r} matches no Linear/Conv2d layer being quantized "
                             f"(names look like {next(iter(layer_names), '?')!r}; glob patterns are allowed)")
        kept.update(matched)
    return kept


def set_submodule(root, name: str, module: nn.Module):
    """Put `module` at `name` of `root` (a module or a ComponentTree, whose "" is the UNet)."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name), child, module)
