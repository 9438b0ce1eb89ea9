"""The public entry points: quantize(), calibrate_ranges() and summary()."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

from mixq.kernels import dispatch
from mixq.calibration import Calibration, observing
from mixq.errors import CalibrationFileError, ConfigError, NonFiniteActivationError
from mixq.layers import (
    LayerInfo,
    find_lora_layers,
    find_quantized_layers,
    float_only_layers,
    layer_group,
    quantizable_layers,
    resolve_keep_fp,
    set_submodule,
)
from mixq.memory import release_freed_memory
from mixq.modules import FakeQuantConv2d, FakeQuantLinear, QConv2d, QLinear, QuantizedLayer
from mixq.plan import architecture_fingerprint, resolve_bits
from mixq.quantizers import FLOAT_BITS

DEFAULT_CALIBRATION_STEPS = 4  # few-step models; pass num_inference_steps= to match your serving settings
RANGES_FILENAME = "activation_ranges.safetensors"


# --- checks --------------------------------------------------------------------------------------


def get_unet(pipe) -> nn.Module:
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, nn.Module):
        raise TypeError(
            f"{type(pipe).__name__} has no `.unet` module: mixq quantizes diffusers pipelines built on a "
            "UNet2DConditionModel (StableDiffusionPipeline, StableDiffusionXLPipeline, ...)"
        )
    return unet


def check_quantizable(unet: nn.Module):
    lora = find_lora_layers(unet)
    if lora:
        fused = all(getattr(unet.get_submodule(n), "merged", False) for n in lora)
        state = "fused but still wrapped in PEFT layers" if fused else "unfused"
        raise ValueError(
            f"the UNet holds {len(lora)} {state} LoRA/adapter layer(s) (e.g. {lora[0]!r}); quantizing them would drop "
            "or half-quantize the adapter. Fold it into the weights first: "
            + ("pipe.unload_lora_weights()" if fused else "pipe.fuse_lora(); pipe.unload_lora_weights()")
        )
    done = find_quantized_layers(unet)
    if done:
        raise ValueError(f"this UNet is already quantized ({len(done)} quantized layers, e.g. {done[0]!r}); "
                         "start from the floating-point pipeline")


def check_finite_weights(unet: nn.Module, names):
    """Refuse NaN/Inf weights or biases in the layers about to be quantized, naming the first such layer
    (quantizing would turn them into zeros or infinite scales, and calibration would blame the next layer)."""
    for name in names:
        module = unet.get_submodule(name)
        for kind in ("weight", "bias"):
            tensor = getattr(module, kind, None)
            if tensor is not None and not torch.isfinite(tensor).all():
                raise NonFiniteActivationError(
                    f"layer {name!r} has NaN/Inf values in its {kind}: the floating-point model is already broken "
                    "there. Reload or repair the weights (an fp16 overflow when converting is a common cause), or "
                    "add the layer to keep_fp")


def warn_float_only(unet: nn.Module) -> dict[str, str]:
    """Linear/Conv2d layers mixq leaves in floating point whatever the settings, with a warning saying why."""
    float_only = float_only_layers(unet)
    if float_only:
        name, reason = next(iter(float_only.items()))
        warnings.warn(
            f"{len(float_only)} Linear/Conv2d layer(s) stay in floating point, e.g. {name!r}: {reason}; "
            "mixq.summary(pipe) lists them with the reason", stacklevel=4)
    return float_only


# --- calibration ---------------------------------------------------------------------------------


def run_pipeline(pipe, prompts, batch_size=8, seed=0, progress=True, desc="calibrating", **pipeline_kwargs):
    """Run the pipeline on prompts, a batch at a time, seeded per batch; returns nothing (hooks observe)."""
    from tqdm.auto import tqdm

    kwargs = {"num_inference_steps": DEFAULT_CALIBRATION_STEPS, "output_type": "latent", **pipeline_kwargs}
    saved_bar = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    try:
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
            generator = torch.Generator("cpu").manual_seed(seed + start)
            pipe(prompt=list(prompts[start:start + batch_size]), generator=generator, **kwargs)
    finally:
        pipe._progress_bar_config = saved_bar


def calibrate_ranges(pipe, prompts=None, num_prompts=None, *, batch_size=8, seed=0, progress=True,
                     layers: dict[str, LayerInfo] | None = None, **pipeline_kwargs) -> Calibration:
    """Observe every quantizable layer's input range while the pipeline generates from `prompts`."""
    from mixq.calib.prompts import fit_prompts_to_text_encoder, load_prompts

    unet = get_unet(pipe)
    prompt_list = fit_prompts_to_text_encoder(pipe, load_prompts(prompts, num_prompts))
    layers = quantizable_layers(unet) if layers is None else layers
    calibration = Calibration(meta={
        "model": architecture_fingerprint(unet),
        "num_prompts": len(prompt_list),
        "seed": seed,
        "pipeline_kwargs": {k: v for k, v in pipeline_kwargs.items() if isinstance(v, (int, float, str, bool))},
    })
    with torch.no_grad(), observing(unet, layers, calibration):
        run_pipeline(pipe, prompt_list, batch_size=batch_size, seed=seed, progress=progress, **pipeline_kwargs)
    return calibration


def load_calibration(calibration, unet) -> Calibration:
    if isinstance(calibration, Calibration):
        loaded = calibration
    else:
        path = Path(calibration)
        if path.is_dir():
            path = path / RANGES_FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"no activation ranges at {path}: pass a calibration run folder or its {RANGES_FILENAME}")
        loaded = Calibration.load(path)
    model = loaded.meta.get("model")
    if model and model != architecture_fingerprint(unet):
        raise CalibrationFileError(
            f"these activation ranges were calibrated on another model (fingerprint {model}, this UNet is "
            f"{architecture_fingerprint(unet)}); recalibrate this model"
        )
    return loaded


# --- quantization --------------------------------------------------------------------------------


def build_quantized_layer(module: nn.Module, info: LayerInfo, w_bits: int, a_bits: int, calibration: Calibration,
                          simulate: bool = False, bos_aware: bool = True) -> nn.Module:
    """The replacement for one float layer (a fake-quant twin when `simulate`). `bos_aware=False` is the
    ablation without MixDQ's BOS handling: the token-0 row is quantized with the rest, its range included."""
    lows, highs, bos_mode, bos_input = (0.0,), (0.0,), "none", None
    if a_bits != FLOAT_BITS:
        r = calibration.ranges(info.name)
        lows, highs = r.lows, r.highs
        expected_parts = 2 if info.split_at else 1
        if len(lows) != expected_parts:
            raise CalibrationFileError(f"activation ranges of {info.name!r} have {len(lows)} part(s), the layer needs "
                             f"{expected_parts}: they come from another model; recalibrate")
        if info.bos and r.bos_input is not None and not bos_aware:
            lows, highs = ranges_including_row(lows, highs, r.bos_input)
        elif info.bos and r.bos_input is not None:
            if r.bos_input.numel() != module.weight.shape[1]:
                raise CalibrationFileError(f"the token-0 input row of {info.name!r} has {r.bos_input.numel()} values, the "
                                           f"layer takes {module.weight.shape[1]}: the ranges come from another model; "
                                           "recalibrate")
            bos_mode, bos_input = ("cached", r.bos_input) if r.bos_constant else ("float", None)
    if info.kind == "linear":
        if simulate:
            return FakeQuantLinear(module, w_bits, a_bits, lows, highs, bos_mode=bos_mode, bos_input=bos_input)
        return QLinear.from_float(module, w_bits, a_bits, lows, highs, bos_mode=bos_mode, bos_input=bos_input)
    if simulate:
        return FakeQuantConv2d(module, w_bits, a_bits, lows, highs, split_at=info.split_at)
    return QConv2d.from_float(module, w_bits, a_bits, lows, highs, split_at=info.split_at)


def ranges_including_row(lows, highs, row: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Activation ranges widened to cover one more input row (a one-part layer's)."""
    return (min(lows[0], float(row.min())),), (max(highs[0], float(row.max())),)


def quantize(pipe, w_bit: int = 8, a_bit: int = 8, *, prompts=None, num_prompts: int | None = None, keep_fp=None,
             plan=None, calibration=None, simulate: bool = False, batch_size: int = 8, seed: int = 0,
             progress: bool = True, **pipeline_kwargs):
    """Quantize `pipe.unet` in place and return `pipe`.

    w_bit / a_bit: uniform weight bits {2, 4, 8} and activation bits {4, 8}; 16 keeps a side in
        floating point. Ignored for layers a `plan` covers.
    prompts: calibration prompts: None (built-in set), a list of strings or a prompts file
        (COCO JSON/CSV, PartiPrompts TSV, JSON list, text). num_prompts keeps the first N.
    keep_fp: layer names or glob patterns left in floating point (default: conv_in, conv_out).
    plan: per-layer bits, a mapping or YAML file (name -> {w_bits, a_bits}) for mixed precision.
    calibration: reuse recorded activation ranges (a Calibration, a run folder or its
        activation_ranges.safetensors) instead of running the pipeline.
    simulate: use fake-quant layers (float math) instead of integer kernels.
    **pipeline_kwargs: passed to the pipeline during calibration, e.g. num_inference_steps=1,
        guidance_scale=0.0 for SDXL-Turbo (default: 4 steps, the pipeline's other defaults).

    Nothing in the pipeline changes until every layer has been built, so a failure leaves it as it was.
    """
    unet = get_unet(pipe)
    layers, bits, keep = resolve_layer_bits(unet, w_bit, a_bit, keep_fp, plan)
    if calibration is None:
        calibration = calibrate_ranges(pipe, prompts, num_prompts, batch_size=batch_size, seed=seed,
                                       progress=progress, layers=layers, **pipeline_kwargs)
    replace_layers(unet, layers, bits, keep, calibration, simulate,
                   settings={"w_bit": w_bit, "a_bit": a_bit, "plan": plan, "keep_fp": keep_fp})
    return pipe


def quantize_unet(unet: nn.Module, w_bit: int = 8, a_bit: int = 8, *, calibration=None, plan=None, keep_fp=None,
                  simulate: bool = False) -> nn.Module:
    """Quantize a UNet in place from recorded activation ranges (`calibration`: a Calibration, a run folder
    or its activation_ranges.safetensors); what `quantize` does once it has them. Weight-only bits
    (a_bit=16 everywhere) need no calibration. Used where there is no pipeline to calibrate with, e.g.
    UNet2DConditionModel.from_pretrained(..., quantization_config=mixq.MixqConfig(...))."""
    layers, bits, keep = resolve_layer_bits(unet, w_bit, a_bit, keep_fp, plan)
    if calibration is None:
        if any(a != FLOAT_BITS for _, a in bits.values()):
            raise ConfigError("quantizing activations needs their recorded ranges: pass calibration= (a run folder of "
                              "`python -m mixq.calibrate`, its activation_ranges.safetensors or a mixq.Calibration), "
                              "or quantize the whole pipeline with mixq.quantize(pipe, ...), which calibrates it")
        calibration = Calibration(meta={"model": architecture_fingerprint(unet)})
    replace_layers(unet, layers, bits, keep, calibration, simulate,
                   settings={"w_bit": w_bit, "a_bit": a_bit, "plan": plan, "keep_fp": keep_fp})
    return unet


def resolve_layer_bits(unet: nn.Module, w_bit, a_bit, keep_fp, plan) -> tuple[dict[str, LayerInfo], dict, set[str]]:
    """The layers to quantize and each one's (w_bits, a_bits), after checking the UNet can be quantized."""
    check_quantizable(unet)
    layers = quantizable_layers(unet)
    keep = resolve_keep_fp(keep_fp, layers)
    bits = resolve_bits(list(layers), keep, w_bit, a_bit, plan=plan, unet=unet)
    check_finite_weights(unet, [n for n in layers if bits[n] != (FLOAT_BITS, FLOAT_BITS)])
    return layers, bits, keep


def replace_layers(unet: nn.Module, layers: dict[str, LayerInfo], bits: dict, keep: set[str], calibration,
                   simulate: bool, settings: dict):
    """Build every quantized layer, then swap them all in (a failure leaves the UNet as it was).
    `settings` (w_bit, a_bit, plan, keep_fp as the caller gave them) go to the diffusers quantization
    config the UNet gets, so that save_pretrained records them."""
    float_only = warn_float_only(unet)
    calibration = load_calibration(calibration, unet)
    replacements, not_run = {}, []
    with torch.no_grad():
        for name, info in layers.items():
            w, a = bits[name]
            if (w, a) == (FLOAT_BITS, FLOAT_BITS):
                continue
            if a != FLOAT_BITS and calibration.ranges(name).calls == 0:
                not_run.append(name)  # never executed: no range to calibrate, leave it as it is
                continue
            layer = build_quantized_layer(unet.get_submodule(name), info, w, a, calibration, simulate)
            dispatch.prepare_layer(layer)  # the CPU kernels' weight layout, made once, here
            replacements[name] = layer
            # Peak memory stays at float model + quantized layers + one layer's temporaries.
            release_freed_memory()

    for name, module in replacements.items():
        set_submodule(unet, name, module)
    fallback = [n for n in calibration.bos_fallback_layers() if n in replacements]
    if fallback:
        warnings.warn(
            f"token 0 of the text embedding differed between calibration prompts in {len(fallback)} cross-attention "
            "layer(s) (a non-causal text encoder, or classifier-free guidance with zeroed negative embeddings): "
            "computing token 0 in floating point on every call instead of caching it. With SDXL-Turbo/LCM, "
            "calibrate with the guidance you serve with (e.g. guidance_scale=0.0).", stacklevel=3)
    unet.mixq_info = {
        "model": architecture_fingerprint(unet),
        "bits": {n: list(bits[n]) for n in layers},
        "keep_fp": sorted(keep),
        "float_only": float_only,
        "not_executed": not_run,
        "bos_fallback": fallback,
        "simulate": simulate,
        "calibration": calibration.meta,
    }
    if not simulate:
        from mixq.diffusers_quantizer import attach_quantizer

        attach_quantizer(unet, settings)


# --- summary -------------------------------------------------------------------------------------


def summary(pipe, print_table: bool = False) -> list[dict]:
    """One row per quantizable layer: name, kind, w_bits, a_bits, group, params, bytes, split, bos."""
    unet = get_unet(pipe)
    info = getattr(unet, "mixq_info", {})
    float_layers = quantizable_layers(unet)
    float_only = float_only_layers(unet)
    rows, wrapped = [], []
    for name, module in unet.named_modules():
        if any(name.startswith(prefix + ".") for prefix in wrapped):
            continue  # the float layer inside a fake-quant twin
        if isinstance(module, (QuantizedLayer, FakeQuantLinear, FakeQuantConv2d)):
            if not isinstance(module, QuantizedLayer):
                wrapped.append(name)
            rows.append(_row(name, module.kind, module.w_bits, module.a_bits, _params(module), _bytes(module),
                             getattr(module, "part_sizes", None), getattr(module, "bos_mode", "none")))
        elif name in float_layers:
            layer = float_layers[name]
            rows.append(_row(name, layer.kind, FLOAT_BITS, FLOAT_BITS, layer.params, _bytes(module), None, "none"))
        elif name in float_only:
            kind = "linear" if isinstance(module, nn.Linear) else "conv2d"
            rows.append(_row(name, kind, FLOAT_BITS, FLOAT_BITS, module.weight.numel(), _bytes(module), None, "none",
                             note=f"not quantized: {float_only[name]}"))
    if print_table:
        print(format_summary(rows, info))
    return rows


def _row(name, kind, w_bits, a_bits, params, nbytes, parts, bos, note=None):
    """note: why a Linear/Conv2d is not quantized when mixq cannot quantize it (None otherwise)."""
    return {"name": name, "kind": kind, "w_bits": w_bits, "a_bits": a_bits, "group": layer_group(name),
            "params": params, "bytes": nbytes, "split": list(parts) if parts and len(parts) > 1 else None,
            "bos": bos, "note": note}


def _params(module) -> int:
    if isinstance(module, QuantizedLayer):
        taps = module.kernel_size[0] * module.kernel_size[1]
        return module.out_features * module.in_features * taps
    return module.inner.weight.numel()


def _bytes(module) -> int:
    if isinstance(module, QuantizedLayer):
        return module.state_bytes()
    return sum(t.numel() * t.element_size() for t in module.parameters())


def format_summary(rows: list[dict], info: dict | None = None) -> str:
    width = max([60] + [len(r["name"]) for r in rows])  # long names must not push their row's columns
    header = f"{'layer':<{width}} {'kind':<7} {'group':<8} {'W':>3} {'A':>3} {'params':>10} {'bytes':>10}  notes"
    lines = [header, "-" * len(header)]
    for r in rows:
        notes = []
        if r["split"]:
            notes.append(f"split {r['split']}")
        if r["bos"] != "none":
            notes.append(f"BOS {r['bos']}")
        if r.get("note"):
            notes.append(r["note"])
        lines.append(f"{r['name']:<{width}} {r['kind']:<7} {r['group']:<8} {r['w_bits']:>3} {r['a_bits']:>3} "
                     f"{r['params']:>10,} {r['bytes']:>10,}  {', '.join(notes)}")
    total_params = sum(r["params"] for r in rows)
    w_avg = sum(r["params"] * r["w_bits"] for r in rows) / max(total_params, 1)
    total_bytes = sum(r["bytes"] for r in rows)
    lines.append("-" * len(header))
    lines.append(f"{len(rows)} layers, {total_params:,} weights, size-weighted average weight bits {w_avg:.2f}, "
                 f"{total_bytes / 2**20:.2f} MiB of layer state")
    info = info or {}
    if info.get("bos_fallback"):
        lines.append(f"BOS: token 0 varied between prompts in {len(info['bos_fallback'])} layer(s); computed in "
                     "floating point on every call there")
    if info.get("not_executed"):
        lines.append(f"left in floating point, never executed during calibration: {', '.join(info['not_executed'])}")
    return "\n".join(lines)
