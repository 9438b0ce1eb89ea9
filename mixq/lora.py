"""LoRA adapters on quantized layers: the low-rank branch in floating point beside the integer GEMM.

    mixq.quantize(pipe, w_bit=4, a_bit=8)
    pipe.load_lora_weights("owner/some-sdxl-lora", adapter_name="style")     # diffusers + PEFT, as usual
    pipe.set_adapters(["style"], adapter_weights=[0.8]); pipe.disable_lora(); pipe.unload_lora_weights()

A quantized layer with adapters computes  y = Q(x) + sum over active adapters of scale * B(A(dropout(x))):
the base weights stay packed integers and are never requantized, so adapters load, switch and unload
at no quantization cost. Fusing an adapter into quantized weights (pipe.fuse_lora()) would requantize
them and is refused: fuse the LoRA into the float pipeline before quantizing (tests/test_lora.py shows
the LCM-LoRA flow).

PEFT picks a LoRA layer class per target module through a list of dispatchers (LoraModel.
_create_new_module); `register()` (run by `import mixq`) puts one in front of them that handles mixq's
QLinear/QConv2d and hands every other module to PEFT's own.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mixq.errors import MixqError


class LoraError(MixqError, ValueError):
    """A LoRA adapter that cannot be applied to a quantized pipeline as asked."""


FUSE_REFUSAL = ("fusing a LoRA into quantized weights would requantize them (and lose the adapter's precision): fuse "
                "it into the floating-point pipeline before quantizing (pipe.load_lora_weights(...); pipe.fuse_lora(); "
                "pipe.unload_lora_weights(); then mixq.quantize(pipe, ...)), or keep it unfused, which mixq runs in "
                "floating point beside the integer layers")


def _peft_lora():
    from peft.tuners.lora import layer

    return layer


class QuantizedLoraMixin:
    """What a LoRA wrapper of a mixq layer changes in PEFT's: where its shape, device and dtype come from,
    and no merging."""

    def _get_in_out_features(self, module):
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer):
        from mixq.checkpoint import layer_float_dtype

        device = next(base_layer.buffers()).device
        return device, layer_float_dtype(base_layer) or torch.float32

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise LoraError(FUSE_REFUSAL)

    def unmerge(self) -> None:
        if self.merged_adapters:  # never: merge is refused
            raise LoraError("a mixq layer never holds merged adapters")

    def _check_supported(self, config, kind: str):
        unsupported = [name for name, on in (("use_dora", config.use_dora), ("lora_bias", config.lora_bias)) if on]
        if unsupported:
            raise LoraError(f"LoRA option(s) {', '.join(unsupported)} need the layer's float weights, which a quantized "
                            f"{kind} does not hold: fuse such adapters before quantizing")


class QuantizedLoraLinear(QuantizedLoraMixin, _peft_lora().Linear):
    """PEFT's LoRA Linear on a QLinear (its forward: base layer output + scaled low-rank branches)."""

    def __init__(self, base_layer, adapter_name, config, r=0, lora_alpha=1, **kwargs):
        self._check_supported(config, "linear layer")
        super().__init__(base_layer, adapter_name, config=config, r=r, lora_alpha=lora_alpha, **kwargs)


class QuantizedLoraConv2d(QuantizedLoraMixin, nn.Module, _peft_lora().LoraLayer):
    """A LoRA branch on a QConv2d: A is a conv with the layer's kernel, stride and padding, B a 1x1 conv
    (PEFT's Conv2d layout, so diffusers' LoRA files load into it unchanged)."""

    adapter_layer_names = ("lora_A", "lora_B")

    def __init__(self, base_layer, adapter_name, config, r=0, lora_alpha=1, **kwargs):
        self._check_supported(config, "convolution")
        nn.Module.__init__(self)
        _peft_lora().LoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self._kernel_dim = 4
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
        if r <= 0:
            raise LoraError(f"LoRA rank must be a positive integer, got {r}")
        base = self.get_base_layer()
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A[adapter_name] = nn.Conv2d(self.in_features, r, base.kernel_size, base.stride, base.padding,
                                              bias=False)
        self.lora_B[adapter_name] = nn.Conv2d(r, self.out_features, 1, 1, bias=False)
        self.lora_bias[adapter_name] = False
        self.use_rslora[adapter_name] = config.use_rslora
        self.use_dora[adapter_name] = False
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
        if config.init_lora_weights:
            self.reset_lora_parameters(adapter_name, config.init_lora_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None and not self.disable_adapters:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            branch = lora_b(lora_a(self.lora_dropout[name](x.to(lora_a.weight.dtype))))
            result = result + (branch * self.scaling[name]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def lora_layer_for(target, adapter_name, config, **kwargs):
    """PEFT dispatcher: a LoRA wrapper for a mixq QLinear/QConv2d, None for anything else."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from mixq.modules import FakeQuantLinear, FakeQuantConv2d, QConv2d, QLinear

    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, (FakeQuantLinear, FakeQuantConv2d)):
        raise LoraError("LoRA on fake-quant simulation layers (quantize(..., simulate=True)) is not supported: "
                        "quantize with simulate=False")
    if isinstance(base, QLinear):
        return QuantizedLoraLinear(target, adapter_name, config, **kwargs)
    if isinstance(base, QConv2d):
        return QuantizedLoraConv2d(target, adapter_name, config, **kwargs)
    return None


def check_lora_state_dict(model: nn.Module, state_dict: dict, adapter_name: str):
    """Before PEFT changes a quantized model: every module a LoRA file adapts exists in it, and each
    module's A and B agree with each other (the rank) and with the layer (its inputs, outputs, kernel).
    PEFT itself only warns about weights for modules it did not find and applies the rest."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        for part in ("lora_A", "lora_B"):
            name, found, rest = key.partition(f".{part}.")
            if found and rest.endswith("weight"):
                pairs.setdefault(name, {})[part] = tensor
    modules = dict(model.named_modules())
    missing = sorted(n for n in pairs if n not in modules)
    if missing:
        raise LoraError(f"LoRA adapter {adapter_name!r} adapts {len(missing)} module(s) this UNet does not have (e.g. "
                        f"{missing[0]!r}): it was made for another model; load a LoRA made for this one")
    for name, parts in sorted(pairs.items()):
        if set(parts) != {"lora_A", "lora_B"}:
            raise LoraError(f"LoRA adapter {adapter_name!r}: module {name!r} has only {next(iter(parts))}: the LoRA file "
                            "is incomplete")
        a, b = parts["lora_A"], parts["lora_B"]
        module = modules[name]
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        in_features = getattr(base, "in_features", getattr(base, "in_channels", None))
        out_features = getattr(base, "out_features", getattr(base, "out_channels", None))
        if a.shape[0] != b.shape[1]:
            raise LoraError(f"LoRA adapter {adapter_name!r}: module {name!r} has rank {a.shape[0]} in lora_A and "
                            f"{b.shape[1]} in lora_B: the LoRA file is damaged or mixed from two adapters")
        kernel = tuple(getattr(base, "kernel_size", ()))
        expected_a = (a.shape[0], in_features, *kernel) if a.dim() == 4 else (a.shape[0], in_features)
        if tuple(a.shape) != expected_a or b.shape[0] != out_features:
            raise LoraError(f"LoRA adapter {adapter_name!r}: module {name!r} takes {in_features} inputs and gives "
                            f"{out_features} outputs, the adapter's A is {list(a.shape)} and B {list(b.shape)}: it was "
                            "made for another model")


def holds_quantized_layers(model: nn.Module) -> bool:
    from mixq.modules import QuantizedLayer

    return any(isinstance(m, QuantizedLayer) for m in model.modules())


def register():
    """Put lora_layer_for in front of PEFT's dispatchers, and check_lora_state_dict before PEFT injects an
    adapter into a model with mixq layers (idempotent). Raises if PEFT moved these hooks, so that a PEFT
    release that changes them fails loudly (tests/test_lora_quantized.py)."""
    try:
        from peft.tuners.lora.model import LoraModel
    except ImportError:  # PEFT is optional: without it diffusers cannot load LoRAs at all
        return
    create = LoraModel.__dict__.get("_create_new_module")
    if not isinstance(create, staticmethod):
        raise RuntimeError("peft's LoraModel._create_new_module is no longer a staticmethod: this PEFT release is not "
                           "supported by this mixq version's LoRA support")
    original = create.__func__
    if getattr(original, "mixq_original", None) is not None:
        return

    def create_new_module(lora_config, adapter_name, target, **kwargs):
        module = lora_layer_for(target, adapter_name, lora_config, **kwargs)
        return module if module is not None else original(lora_config, adapter_name, target, **kwargs)

    create_new_module.mixq_original = original
    LoraModel._create_new_module = staticmethod(create_new_module)

    inject = LoraModel.inject_adapter

    def inject_adapter(self, model, adapter_name, *args, state_dict=None, **kwargs):
        if state_dict is not None and holds_quantized_layers(model):
            check_lora_state_dict(model, state_dict, adapter_name)
        return inject(self, model, adapter_name, *args, state_dict=state_dict, **kwargs)

    LoraModel.inject_adapter = inject_adapter
