"""The public entry points: quantize(), calibrate_ranges() and summary()."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

from mixq.kernels import dispatch
from mixq.calibration import Calibration, observing
from mixq.components import DEFAULT_KEEP_FP, UNET, ComponentTree, component_of, parse_components
from mixq.errors import CalibrationFileError, CheckpointError, ConfigError, NonFiniteActivationError
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


def check_quantizable(unet: nn.Module, component: str = UNET):
    what = "the UNet" if component == UNET else f"pipe.{component}"
    lora = find_lora_layers(unet)
    if lora:
        fused = all(getattr(unet.get_submodule(n), "merged", False) for n in lora)
        state = "fused but still wrapped in PEFT layers" if fused else "unfused"
        raise ValueError(
            f"{what} holds {len(lora)} {state} LoRA/adapter layer(s) (e.g. {lora[0]!r}); quantizing them would drop "
            "or half-quantize the adapter. Fold it into the weights first: "
            + ("pipe.unload_lora_weights()" if fused else "pipe.fuse_lora(); pipe.unload_lora_weights()")
        )
    done = find_quantized_layers(unet)
    if done:
        raise ValueError(f"{what} is already quantized ({len(done)} quantized layers, e.g. {done[0]!r}); "
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
                     layers: dict[str, LayerInfo] | None = None, components=None, **pipeline_kwargs) -> Calibration:
    """Observe every quantizable layer's input range while the pipeline generates from `prompts`.
    components: as in quantize(); with the VAE among them the pipeline decodes its latents, so that the
    decoder's layers run."""
    from mixq.calib.prompts import fit_prompts_to_text_encoder, load_prompts

    get_unet(pipe)
    names = tuple(parse_components(components)) if layers is None else layers_components(layers)
    tree = ComponentTree.of(pipe, names)
    prompt_list = fit_prompts_to_text_encoder(pipe, load_prompts(prompts, num_prompts))
    layers = quantizable_layers(tree) if layers is None else layers
    calibration = Calibration(meta={
        "model": architecture_fingerprint(tree.unet),
        **({"components": component_fingerprints(tree)} if len(names) > 1 else {}),
        "num_prompts": len(prompt_list),
        "seed": seed,
        "pipeline_kwargs": {k: v for k, v in pipeline_kwargs.items() if isinstance(v, (int, float, str, bool))},
    })
    if "vae" in names and pipeline_kwargs.get("output_type", "latent") == "latent":
        pipeline_kwargs["output_type"] = "pt"  # decode, so that the VAE decoder's layers are observed
    with torch.no_grad(), observing(tree, layers, calibration):
        run_pipeline(pipe, prompt_list, batch_size=batch_size, seed=seed, progress=progress, **pipeline_kwargs)
    return calibration


def layers_components(layers) -> tuple[str, ...]:
    """The components whose layers `layers` names, the UNet first."""
    present = {component_of(n) for n in layers}
    return (UNET, *sorted(present - {UNET}))


def component_fingerprints(tree: ComponentTree) -> dict[str, str]:
    """Architecture fingerprints of the components other than the UNet (whose own is the "model")."""
    return {name: architecture_fingerprint(module) for name, module in tree.modules.items() if name != UNET}


def load_calibration(calibration, tree) -> Calibration:
    """A Calibration, run folder or ranges file, checked against the UNet (or the components of a
    ComponentTree) it is about to quantize."""
    if isinstance(calibration, Calibration):
        loaded = calibration
    else:
        path = Path(calibration)
        if path.is_dir():
            path = path / RANGES_FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"no activation ranges at {path}: pass a calibration run folder or its {RANGES_FILENAME}")
        loaded = Calibration.load(path)
    unet = tree.unet if isinstance(tree, ComponentTree) else tree
    model = loaded.meta.get("model")
    if model and model != architecture_fingerprint(unet):
        raise CalibrationFileError(
            f"these activation ranges were calibrated on another model (fingerprint {model}, this UNet is "
            f"{architecture_fingerprint(unet)}); recalibrate this model"
        )
    if isinstance(tree, ComponentTree):
        recorded = loaded.meta.get("components", {})
        for name, fingerprint in component_fingerprints(tree).items():
            if name in recorded and recorded[name] != fingerprint:
                raise CalibrationFileError(
                    f"these activation ranges were calibrated on another {name} (fingerprint {recorded[name]}, this "
                    f"one is {fingerprint}); recalibrate this pipeline")
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


def quantize(pipe, w_bit: int = 8, a_bit: int = 8, *, components=None, prompts=None, num_prompts: int | None = None,
             keep_fp=None, plan=None, calibration=None, simulate: bool = False, cpu_weights: str = "packed",
             batch_size: int = 8, seed: int = 0, progress: bool = True, **pipeline_kwargs):
    """Quantize `pipe.unet` (and the opt-in `components`) in place and return `pipe`.

    w_bit / a_bit: the UNet's uniform weight bits {2, 4, 8} and activation bits {4, 8}; 16 keeps a side
        in floating point. Ignored for layers a `plan` covers.
    components: what to quantize besides the UNet (default: the UNet only): names among "unet", "vae"
        (its decoder), "text_encoder", "text_encoder_2", as a sequence, a comma-separated string, or a
        mapping name -> (w_bits, a_bits) (default W8A8; None for the UNet). Layers of other components
        are named by their path from the pipeline ("vae.decoder.up_blocks.0.resnets.0.conv1"), in plans,
        keep_fp and summary().
    prompts: calibration prompts: None (built-in set), a list of strings or a prompts file
        (COCO JSON/CSV, PartiPrompts TSV, JSON list, text). num_prompts keeps the first N.
    keep_fp: layer names or glob patterns left in floating point. Each component has defaults (UNet:
        conv_in, conv_out; VAE decoder: conv_in, conv_out, mid-block attention; text_encoder_2: its
        projection); patterns given here replace the defaults of the components they match.
    plan: per-layer bits, a mapping or YAML file (name -> {w_bits, a_bits}) for mixed precision. It must
        cover the UNet; it may also cover every layer of an opt-in component.
    calibration: reuse recorded activation ranges (a Calibration, a run folder or its
        activation_ranges.safetensors) instead of running the pipeline.
    simulate: use fake-quant layers (float math) instead of integer kernels.
    cpu_weights: how 4/2-bit weights live on an x86 CPU: "packed" (default; memory follows the bits,
        each call unpacks its layer) or "int8" (unpacked once, here, into oneDNN's int8 layout: as fast
        as W8 layers, one byte per weight more). 8-bit weights and other devices are unaffected.
    **pipeline_kwargs: passed to the pipeline during calibration, e.g. num_inference_steps=1,
        guidance_scale=0.0 for SDXL-Turbo (default: 4 steps, the pipeline's other defaults).

    Nothing in the pipeline changes until every layer has been built, so a failure leaves it as it was.
    """
    get_unet(pipe)
    check_cpu_weights(cpu_weights)
    choices = parse_components(components)
    tree = ComponentTree.of(pipe, choices)
    layers, bits, keep = resolve_layer_bits(tree, w_bit, a_bit, keep_fp, plan,
                                            component_bits={n: c.bits for n, c in choices.items() if c.bits})
    if calibration is None:
        calibration = calibrate_ranges(pipe, prompts, num_prompts, batch_size=batch_size, seed=seed,
                                       progress=progress, layers=layers, **pipeline_kwargs)
    replace_layers(tree, layers, bits, keep, calibration, simulate,
                   settings={"w_bit": w_bit, "a_bit": a_bit, "plan": plan, "keep_fp": keep_fp}, cpu_weights=cpu_weights)
    return pipe


def check_cpu_weights(cpu_weights):
    from mixq.kernels.onednn import CPU_WEIGHT_MODES

    if cpu_weights not in CPU_WEIGHT_MODES:
        raise ConfigError(f"cpu_weights={cpu_weights!r}: use 'packed' (4/2-bit weights stay packed, memory follows the "
                          "bits) or 'int8' (unpacked once into oneDNN's int8 layout: faster, one byte per weight more)")


def quantize_unet(unet: nn.Module, w_bit: int = 8, a_bit: int = 8, *, calibration=None, plan=None, keep_fp=None,
                  simulate: bool = False) -> nn.Module:
    """Quantize a UNet in place from recorded activation ranges (`calibration`: a Calibration, a run folder
    or its activation_ranges.safetensors); what `quantize` does once it has them. Weight-only bits
    (a_bit=16 everywhere) need no calibration. Used where there is no pipeline to calibrate with, e.g.
    UNet2DConditionModel.from_pretrained(..., quantization_config=mixq.MixqConfig(...))."""
    tree = ComponentTree({UNET: unet})
    layers, bits, keep = resolve_layer_bits(tree, w_bit, a_bit, keep_fp, plan)
    if calibration is None:
        if any(a != FLOAT_BITS for _, a in bits.values()):
            raise ConfigError("quantizing activations needs their recorded ranges: pass calibration= (a run folder of "
                              "`python -m mixq.calibrate`, its activation_ranges.safetensors or a mixq.Calibration), "
                              "or quantize the whole pipeline with mixq.quantize(pipe, ...), which calibrates it")
        calibration = Calibration(meta={"model": architecture_fingerprint(unet)})
    replace_layers(tree, layers, bits, keep, calibration, simulate,
                   settings={"w_bit": w_bit, "a_bit": a_bit, "plan": plan, "keep_fp": keep_fp})
    return unet


def resolve_layer_bits(tree, w_bit, a_bit, keep_fp, plan, component_bits: dict | None = None
                       ) -> tuple[dict[str, LayerInfo], dict, set[str]]:
    """The layers to quantize and each one's (w_bits, a_bits), after checking every component can be
    quantized. `tree`: a UNet or a ComponentTree; component_bits: name -> (w, a) of the opt-in ones."""
    tree = tree if isinstance(tree, ComponentTree) else ComponentTree({UNET: tree})
    for name, module in tree.modules.items():
        check_quantizable(module, name)
    layers = quantizable_layers(tree)
    for name in tree.modules:
        if name != UNET and not any(component_of(n) == name for n in layers):
            raise ConfigError(f"component {name!r} has no Linear/Conv2d layer mixq can quantize: leave it out of "
                              "components")
    keep = resolve_component_keep_fp(keep_fp, layers)
    uniform = {n: (component_bits or {}).get(component_of(n), (w_bit, a_bit)) for n in layers}
    bits = resolve_bits(list(layers), keep, w_bit, a_bit, plan=plan, unet=tree.unet, uniform=uniform)
    check_finite_weights(tree, [n for n in layers if bits[n] != (FLOAT_BITS, FLOAT_BITS)])
    return layers, bits, keep


def resolve_component_keep_fp(keep_fp, layers: dict[str, LayerInfo]) -> set[str]:
    """keep_fp over every component: the given patterns, plus the defaults of each component none of
    them matches."""
    given = resolve_keep_fp(keep_fp, layers) if keep_fp is not None else set()
    chosen = {component_of(n) for n in given}
    components = {component_of(n) for n in layers}
    defaults = [p for c in sorted(components - chosen) for p in DEFAULT_KEEP_FP[c]]
    return given | resolve_keep_fp(None, layers, defaults=defaults)


def replace_layers(tree, layers: dict[str, LayerInfo], bits: dict, keep: set[str], calibration,
                   simulate: bool, settings: dict, cpu_weights: str = "packed"):
    """Build every quantized layer, then swap them all in (a failure leaves the pipeline as it was).
    `tree`: a ComponentTree (or a UNet). `settings` (w_bit, a_bit, plan, keep_fp as the caller gave them)
    go to the diffusers quantization config the UNet gets, so that save_pretrained records them."""
    tree = tree if isinstance(tree, ComponentTree) else ComponentTree({UNET: tree})
    float_only = warn_float_only(tree)
    calibration = load_calibration(calibration, tree)
    check_ranges_cover(calibration, [n for n in layers if bits[n][1] != FLOAT_BITS and n not in keep])
    replacements, not_run = {}, []
    with torch.no_grad():
        for name, info in layers.items():
            w, a = bits[name]
            if (w, a) == (FLOAT_BITS, FLOAT_BITS):
                continue
            if a != FLOAT_BITS and calibration.ranges(name).calls == 0:
                not_run.append(name)  # never executed: no range to calibrate, leave it as it is
                continue
            layer = build_quantized_layer(tree.get_submodule(name), info, w, a, calibration, simulate)
            dispatch.prepare_layer(layer, cpu_weights)  # the CPU kernels' weight layout, made once, here
            replacements[name] = layer
            # Peak memory stays at float model + quantized layers + one layer's temporaries.
            release_freed_memory()

    for name, module in replacements.items():
        set_submodule(tree, name, module)
    fallback = [n for n in calibration.bos_fallback_layers() if n in replacements]
    if fallback:
        warnings.warn(
            f"token 0 of the text embedding differed between calibration prompts in {len(fallback)} layer(s) "
            "(a non-causal text encoder, or classifier-free guidance with zeroed negative embeddings): "
            "computing token 0 in floating point on every call instead of caching it. With SDXL-Turbo/LCM, "
            "calibrate with the guidance you serve with (e.g. guidance_scale=0.0).", stacklevel=3)
    quantized = [c for c in tree.modules if c == UNET or any(component_of(n) == c for n in replacements)]
    for component, module in tree.modules.items():
        mine = [n for n in layers if component_of(n) == component]
        module.mixq_info = {
            "model": architecture_fingerprint(module),
            "bits": {n: list(bits[n]) for n in mine},
            "keep_fp": sorted(n for n in keep if n in mine),
            "float_only": {n: r for n, r in float_only.items() if component_of(n) == component},
            "not_executed": [n for n in not_run if n in mine],
            "bos_fallback": [n for n in fallback if n in mine],
            "simulate": simulate,
            "calibration": calibration.meta,
            **({"components": quantized} if component == UNET and len(quantized) > 1 else {}),
        }
    if not simulate:
        from mixq.diffusers_quantizer import attach_quantizer

        attach_quantizer(tree.unet, settings)
        for component in quantized:
            if component != UNET:
                refuse_save_pretrained(tree.modules[component], component)


def refuse_save_pretrained(module: nn.Module, component: str):
    """diffusers/transformers save_pretrained would write a quantized VAE or text encoder's integer
    buffers as if they were its weights, and from_pretrained would then leave those layers randomly
    initialized: make it fail, naming the way that works, for this module (and pipe.save_pretrained)."""
    def save_pretrained(*args, **kwargs):
        raise CheckpointError(
            f"pipe.{component} holds mixq-quantized layers, which save_pretrained cannot store (only the UNet has a "
            "diffusers quantization backend): save the quantized pipeline with mixq.save_quantized(pipe, folder) "
            "and load it into the float pipeline with mixq.load_quantized")
    module.save_pretrained = save_pretrained


def check_ranges_cover(calibration: Calibration, names: list[str]):
    """Activation ranges for every layer about to be quantized with integer activations; a component
    calibration never saw is named with the fix."""
    missing = [n for n in names if n not in calibration.layers]
    components = sorted({component_of(n) for n in missing} - {UNET})
    if components:
        raise CalibrationFileError(
            f"these activation ranges were recorded without the {' and '.join(components)} (no range for "
            f"{missing[0]!r}): recalibrate with those components, e.g. mixq.quantize(pipe, components=('unet', "
            f"{', '.join(repr(c) for c in components)})) without calibration=")


# --- summary -------------------------------------------------------------------------------------


def summary(pipe, print_table: bool = False) -> list[dict]:
    """One row per quantizable layer of the UNet and of every other quantized component: name, kind,
    w_bits, a_bits, group, params, bytes, split, bos. Layers of other components carry their
    component's name in front and as their group ("vae.decoder....", group "vae")."""
    unet = get_unet(pipe)
    info = getattr(unet, "mixq_info", {})
    tree = ComponentTree.of(pipe, quantized_components(pipe))
    float_layers = quantizable_layers(tree)
    float_only = float_only_layers(tree)
    rows, wrapped = [], []
    for name, module in tree.named_modules():
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


def quantized_components(pipe) -> tuple[str, ...]:
    """The UNet and every other component of `pipe` that holds quantized layers."""
    from mixq.components import OPTIONAL_COMPONENTS

    return (UNET, *(c for c in OPTIONAL_COMPONENTS
                    if isinstance(getattr(pipe, c, None), nn.Module) and find_quantized_layers(getattr(pipe, c))))


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
    components = sorted({r["group"] for r in rows} - {"content", "quality"})
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
    for component in components:  # the UNet's layers are groups content/quality; others are their own group
        mine = [r for r in rows if r["group"] == component]
        params = sum(r["params"] for r in mine)
        lines.append(f"  of which {component}: {len(mine)} layers, average weight bits "
                     f"{sum(r['params'] * r['w_bits'] for r in mine) / max(params, 1):.2f}, "
                     f"{sum(r['bytes'] for r in mine) / 2**20:.2f} MiB")
    info = info or {}
    if info.get("bos_fallback"):
        lines.append(f"BOS: token 0 varied between prompts in {len(info['bos_fallback'])} layer(s); computed in "
                     "floating point on every call there")
    if info.get("not_executed"):
        lines.append(f"left in floating point, never executed during calibration: {', '.join(info['not_executed'])}")
    return "\n".join(lines)
