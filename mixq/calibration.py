"""Activation-range calibration: run the pipeline itself on prompts and observe every layer's input.

Per layer: EMA of per-call min/max (momentum 0.95, as MixDQ) for each input part (two for split
conv_shortcut layers), token 0 excluded for attn2.to_k/to_v, the input's element count (the
activation "size" of bit allocation), and for BOS layers the token-0 input row plus whether it
stayed the same for every prompt. Non-finite inputs stop calibration with the layer's name.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from mixq.errors import CalibrationFileError, NonFiniteActivationError  # noqa: F401 (also importable from here)
from mixq.layers import LayerInfo
from mixq.modules import BOS_RELATIVE_TOLERANCE

EMA_MOMENTUM = 0.95




@dataclass
class LayerRanges:
    lows: list[float]
    highs: list[float]
    numel: int = 0
    bos_input: torch.Tensor | None = None  # [K] token-0 input row (BOS layers)
    bos_constant: bool = True
    calls: int = 0


@dataclass
class Calibration:
    """Calibrated activation statistics for the layers of one UNet."""

    layers: dict[str, LayerRanges] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)  # prompts used, pipeline settings, model fingerprint

    def ranges(self, name: str) -> LayerRanges:
        if name not in self.layers:
            raise CalibrationFileError(
                f"no calibrated activation range for layer {name!r}: these ranges were made for another "
                "model or another set of layers; recalibrate (mixq.quantize without calibration=)"
            )
        return self.layers[name]

    def bos_fallback_layers(self) -> list[str]:
        return [n for n, r in self.layers.items() if r.bos_input is not None and not r.bos_constant]

    # --- persistence: one safetensors file, tensors plus JSON metadata -------------------------

    def save(self, path):
        from safetensors.torch import save_file

        from mixq.io import atomic_path, storage_errors

        tensors, index = {}, {}
        for name, r in self.layers.items():
            tensors[f"{name}:lows"] = torch.tensor(r.lows, dtype=torch.float64)
            tensors[f"{name}:highs"] = torch.tensor(r.highs, dtype=torch.float64)
            if r.bos_input is not None:
                tensors[f"{name}:bos_input"] = r.bos_input.detach().float().cpu().contiguous()
            index[name] = {"numel": r.numel, "bos_constant": r.bos_constant, "calls": r.calls}
        with atomic_path(path) as tmp, storage_errors(path):
            save_file(tensors, str(tmp), metadata={"layers": json.dumps(index), "meta": json.dumps(self.meta)})

    @classmethod
    def load(cls, path) -> "Calibration":
        """Read a file written by save(); anything malformed raises CalibrationFileError naming the layer."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                index = json.loads(metadata["layers"])
                meta = json.loads(metadata.get("meta", "{}"))
                if not isinstance(index, dict) or not isinstance(meta, dict):
                    raise ValueError("its 'layers' and 'meta' metadata must be JSON objects")
                keys = set(f.keys())
                layers = {name: read_layer_ranges(f, keys, name, info) for name, info in index.items()}
                return cls(layers=layers, meta=meta)
        except CalibrationFileError as err:
            raise CalibrationFileError(f"{path}: {err}; rerun calibration") from err
        except (KeyError, ValueError, TypeError, OSError, RuntimeError, RecursionError, SafetensorError) as err:
            raise CalibrationFileError(f"{path} is not a mixq activation-range file ({err}); rerun calibration") from err


def read_layer_ranges(f, keys: set, name: str, info) -> LayerRanges:
    """One layer's record from an open activation-range file, checked: finite ranges, low <= high."""
    if not isinstance(info, dict):
        raise CalibrationFileError(f"layer {name!r}: its record is {type(info).__name__}, not an object")
    missing = [k for k in (f"{name}:lows", f"{name}:highs") if k not in keys]
    if missing:
        raise CalibrationFileError(f"layer {name!r}: no tensor {missing[0]!r}")
    lows, highs = f.get_tensor(f"{name}:lows"), f.get_tensor(f"{name}:highs")
    if lows.dim() != 1 or lows.shape != highs.shape or not 1 <= lows.numel() <= 2 or not lows.is_floating_point():
        raise CalibrationFileError(f"layer {name!r}: lows/highs of shapes {list(lows.shape)}, {list(highs.shape)}; "
                                   "one or two parts expected")
    if not (torch.isfinite(lows).all() and torch.isfinite(highs).all()):
        raise CalibrationFileError(f"layer {name!r}: the activation range holds NaN or Inf "
                                   f"(lows {lows.tolist()}, highs {highs.tolist()})")
    if (lows > highs).any():
        raise CalibrationFileError(f"layer {name!r}: a low above its high (lows {lows.tolist()}, highs {highs.tolist()})")
    numel, calls, constant = info.get("numel"), info.get("calls", 0), info.get("bos_constant")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (numel, calls)) \
            or not isinstance(constant, bool):
        raise CalibrationFileError(f"layer {name!r}: numel/calls must be counts and bos_constant true/false, got "
                                   f"{numel!r}, {calls!r}, {constant!r}")
    bos_key = f"{name}:bos_input"
    bos_input = f.get_tensor(bos_key) if bos_key in keys else None
    if bos_input is not None and (bos_input.dim() != 1 or not bos_input.is_floating_point()
                                  or not torch.isfinite(bos_input).all()):
        raise CalibrationFileError(f"layer {name!r}: the token-0 input row is not a finite vector")
    return LayerRanges(lows=lows.tolist(), highs=highs.tolist(), numel=numel, bos_constant=constant, calls=calls,
                       bos_input=bos_input)


def _input_parts(x: torch.Tensor, info: LayerInfo) -> list[torch.Tensor]:
    if info.bos and x.dim() == 3 and x.shape[1] > 1:
        x = x[:, 1:]
    if info.split_at:
        return list(x.split([info.split_at, x.shape[1] - info.split_at], dim=1))
    return [x]


class RangeObserver:
    """A forward pre-hook that folds one layer's inputs into its LayerRanges."""

    def __init__(self, info: LayerInfo, record: LayerRanges, momentum: float = EMA_MOMENTUM):
        self.info, self.record, self.momentum = info, record, momentum

    def __call__(self, module, args):
        x = args[0].detach()
        if not torch.isfinite(x).all():
            raise NonFiniteActivationError(
                f"layer {self.info.name!r} received NaN/Inf activations during calibration. The float "
                "pipeline itself overflows here: calibrate in bf16 or fp32 (fp16 SDXL VAEs/UNets are prone to "
                "this), check the prompts and inputs, or add the layer to keep_fp"
            )
        r = self.record
        parts = _input_parts(x, self.info)
        lows = [float(p.amin()) for p in parts]
        highs = [float(p.amax()) for p in parts]
        if r.calls == 0:
            r.lows, r.highs, r.numel = lows, highs, x[0].numel() if x.dim() > 1 else x.numel()
        else:
            m = self.momentum
            r.lows = [m * old + (1 - m) * new for old, new in zip(r.lows, lows)]
            r.highs = [m * old + (1 - m) * new for old, new in zip(r.highs, highs)]
        r.calls += 1
        if self.info.bos and x.dim() == 3 and x.shape[1] > 1:
            self._observe_bos(x[:, 0])

    def _observe_bos(self, rows: torch.Tensor):
        r = self.record
        if r.bos_input is None:
            r.bos_input = rows[0].float().cpu().clone()
        reference = r.bos_input.to(rows.device)
        deviation = (rows.float() - reference).abs().max()
        if deviation > BOS_RELATIVE_TOLERANCE * reference.abs().max().clamp_min(1e-6):
            r.bos_constant = False


@contextmanager
def observing(unet, layers: dict[str, LayerInfo], calibration: Calibration):
    """Attach RangeObservers to `layers` for the duration of the block; always removes them."""
    handles = []
    try:
        for name, info in layers.items():
            record = calibration.layers.setdefault(name, LayerRanges(lows=[], highs=[]))
            handles.append(unet.get_submodule(name).register_forward_pre_hook(RangeObserver(info, record)))
        yield calibration
    finally:
        for h in handles:
            h.remove()
