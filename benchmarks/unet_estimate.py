"""A whole-UNet latency model: every kernel of one SDXL-Turbo UNet forward, not only its GEMMs.

    python -m benchmarks.unet_estimate --out benchmarks/results/static

benchmarks/static_report.py estimates the 794 Linear/Conv2d layers from compiled SASS. A user waits
for the whole forward: attention, group norms, activations, residual adds, the quantize passes and
one launch per kernel. This module lists every kernel of the forward by running the UNet on PyTorch's
meta device (shapes only, no weights, no arithmetic), and prices each with one model on any GPU:

- matrix work (Linear, Conv2d, attention): max(FLOPs / fp16 tensor peak, bytes / HBM bandwidth);
- attention (`scaled_dot_product_attention`) as one fused kernel, flash-attention style: 4 * B * H *
  Lq * Lk * head_dim FLOPs, reading Q, K, V and writing O once;
- everything else (norms, activations, adds, copies): its input and output bytes at HBM bandwidth;
- plus a fixed cost per kernel, LAUNCH_S, for the gaps between kernels of a CUDA graph;
- view-like ops that move no data (views, transposes, expands) cost nothing.

This is an ideal roofline: every kernel at peak and no fusion beyond what eager PyTorch does, so it is
optimistic for matrix work and pessimistic where a compiler would fuse elementwise ops. It is checked
the only way possible without a GPU: the same model predicts the fp16 UNet on the A100 and the RTX
4080, and MixDQ's published fp16 measurements of that UNet (CUDA graphs; 30.7 ms and 36.1 ms) say
how optimistic it is. The H100 figures, fp16 and quantized, are then scaled by that ratio.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.environment import library_version

LAUNCH_S = 2e-6  # per kernel in a CUDA graph (measured gaps are 1-3 us on recent GPUs)

# View-like ops: they relabel memory and launch no kernel.
FREE_OPS = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "slice", "select", "unsqueeze", "squeeze",
            "detach", "alias", "as_strided", "split", "split_with_sizes", "chunk", "unbind", "reshape", "lift_fresh",
            "_reshape_alias", "empty", "empty_strided", "zeros", "ones", "full", "arange", "scalar_tensor",
            "new_empty", "new_zeros", "sym_size", "sym_stride", "sym_numel", "dim", "is_contiguous", "numel", "size",
            "stride", "item", "_to_copy_noop", "flatten"}
MATRIX_OPS = {"mm", "addmm", "bmm", "baddbmm", "convolution", "_convolution", "matmul", "linear"}


@dataclass(frozen=True)
class GpuSpec:
    """Published dense peaks (spec sheets): fp16 tensor FLOP/s with fp32 accumulation, HBM bytes/s."""

    name: str
    fp16_flops: float
    hbm_bytes: float


GPUS = {
    "H100 SXM": GpuSpec("H100 SXM", 989e12, 3.35e12),
    "A100 SXM 80GB": GpuSpec("A100 SXM 80GB", 312e12, 2.039e12),
    "RTX 4080": GpuSpec("RTX 4080", 97.5e12, 0.7168e12),  # GeForce: fp32 accumulation at half the fp16 rate
}
# MixDQ (ECCV 2024), SDXL-Turbo UNet, fp16, 512x512, batch 1, CUDA graphs.
PUBLISHED_FP16_MS = {"A100 SXM 80GB": 30.7, "RTX 4080": 36.1}


@dataclass(frozen=True)
class Kernel:
    op: str
    kind: str  # "matrix", "attention" or "memory"
    flops: float
    bytes: float


def tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    return 0


class KernelRecorder(TorchDispatchMode):
    """Every aten op that moves data, with its bytes (inputs read, outputs written) and FLOPs."""

    def __init__(self):
        super().__init__()
        self.kernels: list[Kernel] = []
        self.inside_attention = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if self.inside_attention or name in FREE_OPS:
            return out
        moved = tensor_bytes(args) + tensor_bytes(kwargs) + tensor_bytes(out)
        if name in MATRIX_OPS:
            with FlopCounterMode(display=False) as counter:
                func(*args, **kwargs)
            self.kernels.append(Kernel(name, "matrix", float(counter.get_total_flops()), moved))
        elif moved:
            self.kernels.append(Kernel(name, "memory", 0.0, moved))
        return out


class FusedAttention(TorchFunctionMode):
    """scaled_dot_product_attention as one flash-attention kernel (its decomposition is not recorded)."""

    def __init__(self, recorder: KernelRecorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        *batch, lq, d = q.shape
        lk = k.shape[-2]
        heads = math.prod(batch)
        self.recorder.inside_attention += 1
        try:
            out = func(*args, **kwargs)
        finally:
            self.recorder.inside_attention -= 1
        self.recorder.kernels.append(Kernel("sdpa", "attention", 4.0 * heads * lq * lk * d,
                                            float(tensor_bytes([q, k, v, out]))))
        return out


def sdxl_turbo_unet_config() -> dict:
    from mixq.offline import SDXL_UNET_STRUCTURE

    return dict(SDXL_UNET_STRUCTURE)


def trace_kernels(config: dict, latent: int = 64, batch: int = 1, dtype=torch.float16) -> list[Kernel]:
    """The kernels of one UNet forward (SDXL conditioning: 77 text tokens, pooled embeds, time ids)."""
    from mixq.offline import unet_from_config

    unet = unet_from_config(config, dtype=dtype, device="meta")
    with torch.device("meta"):
        sample = torch.randn(batch, config["in_channels"], latent, latent, dtype=dtype)
        text = torch.randn(batch, 77, config["cross_attention_dim"], dtype=dtype)
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        added = {"text_embeds": torch.randn(batch, pooled, dtype=dtype), "time_ids": torch.randn(batch, 6, dtype=dtype)}
        timestep = torch.tensor([999.0])
    recorder = KernelRecorder()
    with torch.no_grad(), FusedAttention(recorder), recorder:
        unet(sample, timestep, encoder_hidden_states=text, added_cond_kwargs=added)
    return recorder.kernels


def kernel_seconds(kernel: Kernel, gpu: GpuSpec) -> float:
    return max(kernel.flops / gpu.fp16_flops, kernel.bytes / gpu.hbm_bytes) + LAUNCH_S


def predict(kernels: list[Kernel], gpu: GpuSpec) -> dict:
    """Seconds per kind of kernel, and the total."""
    by_kind = Counter()
    for kernel in kernels:
        by_kind[kernel.kind] += kernel_seconds(kernel, gpu)
    return {**{kind: by_kind[kind] for kind in ("matrix", "attention", "memory")}, "total": sum(by_kind.values()),
            "kernels": len(kernels), "launch": LAUNCH_S * len(kernels)}


def validation(kernels: list[Kernel]) -> dict:
    """Predicted against published fp16 latency, per GPU, and their mean ratio (measured / predicted)."""
    rows = {}
    for name, measured_ms in PUBLISHED_FP16_MS.items():
        predicted_ms = predict(kernels, GPUS[name])["total"] * 1e3
        rows[name] = {"predicted_ms": predicted_ms, "measured_ms": measured_ms, "ratio": measured_ms / predicted_ms}
    ratios = [r["ratio"] for r in rows.values()]
    return {"gpus": rows, "ratio": math.exp(sum(map(math.log, ratios)) / len(ratios))}


def quantize_passes(static_layers: list[dict]) -> int:
    """Activation-quantization kernels of a quantized UNet: one per quantized layer, except layers that
    reuse the codes of the layer before them (shared_input), and none for layers kept in float."""
    return sum(row["count"] - row["shared_input"] for row in static_layers if not row["kept_in_float"])


def plan_layers_seconds(static_layers: list[dict], layers: list[dict], w_bits: dict[str, int]) -> tuple[float, int]:
    """(seconds, quantize passes) of the Linear/Conv2d layers under a per-layer plan: each layer at its
    shape's compiled-kernel estimate for its weight width (W2 at W4's: the gate compiles both main
    loops to nearly the same length, and the static report has no W2 rows), plus its quantize pass
    unless it reuses the previous layer's codes; layers in floating point at the fp16 roofline."""
    by_shape = {(r["kind"], r["m"], r["k"], r["n"]): r for r in static_layers}
    seconds, passes = 0.0, 0
    for layer in layers:
        row = by_shape[(layer["kind"], layer["m"], layer["k"], layer["n"])]
        bits = w_bits.get(layer["name"], 16)
        if bits >= 16 or row["kept_in_float"] or "w4" not in row:
            seconds += row["fp16_roofline_s"]
            continue
        estimate = row["w8" if bits == 8 else "w4"]
        seconds += estimate["gemm_s"]
        if not layer["shared"]:
            seconds, passes = seconds + estimate["quantize_s"], passes + 1
    return seconds, passes


def mixed_plan_bits(config: dict) -> dict[str, int]:
    """Weight bits of the benchmarks' 4-bit mixed plan (the offline default's shares per group)."""
    from benchmarks.plans import mixed_4bit_plan
    from mixq.offline import unet_from_config

    plan = mixed_4bit_plan(unet_from_config(config, device="meta"))
    return {name: entry["w_bits"] for name, entry in plan["layers"].items()}


def quantized_h100(kernels: list[Kernel], static: dict, layers: list[dict] | None = None,
                   plan_bits: dict[str, int] | None = None) -> dict:
    """H100 whole-UNet estimates: fp16, and W8A8 / W4A8 (and a mixed plan, given the per-layer shapes
    and its bits) with the Linear/Conv2d layers' fp16 roofline replaced by the static report's
    compiled-kernel estimate, quantize passes included (each pass also one more kernel launch)."""
    fp16 = predict(kernels, GPUS["H100 SXM"])
    others = fp16["total"] - static["totals"]["fp16 roofline"]
    result = {"fp16": fp16["total"]}
    for name in ("W8A8", "W4A8"):
        result[name] = (others + static["totals"][f"{name} kernels + quantize passes"]
                        + LAUNCH_S * quantize_passes(static["layers"]))
    if layers is not None and plan_bits is not None:
        seconds, passes = plan_layers_seconds(static["layers"], layers, plan_bits)
        result["4-bit mixed plan"] = others + seconds + LAUNCH_S * passes
    return result


def report(kernels: list[Kernel], static: dict | None, layers: list[dict] | None = None,
           plan_bits: dict[str, int] | None = None) -> tuple[str, dict]:
    checked = validation(kernels)
    ratio = max(1.0, checked["ratio"])
    ratios = sorted(max(1.0, r["ratio"]) for r in checked["gpus"].values())
    h100 = predict(kernels, GPUS["H100 SXM"])
    counts = Counter(k.kind for k in kernels)
    lines = [
        "# Whole-UNet estimate: every kernel of the SDXL-Turbo UNet forward (an estimate, not a measurement)",
        "",
        f"SDXL-Turbo UNet, 512x512 (64x64 latents), batch 1, fp16: {len(kernels)} kernels traced on the meta device "
        f"({counts['matrix']} matrix, {counts['attention']} attention, {counts['memory']} memory-bound), "
        f"{LAUNCH_S * 1e6:.0f} us per kernel for CUDA-graph gaps. The model is in benchmarks/unet_estimate.py.",
        "",
        f"Made {date.today().isoformat()} on a CPU (no GPU) with `python -m benchmarks.unet_estimate --out "
        f"benchmarks/results/static`; torch {torch.__version__}, diffusers {library_version('diffusers')}.",
        "",
        "## The model against published measurements (fp16)",
        "",
        "| GPU | predicted | MixDQ measured | measured / predicted |",
        "| --- | --- | --- | --- |",
    ]
    for name, row in checked["gpus"].items():
        lines.append(f"| {name} | {row['predicted_ms']:.1f} ms | {row['measured_ms']:.1f} ms | {row['ratio']:.2f} |")
    lines += ["", f"Geometric mean ratio: **{checked['ratio']:.2f}**: the model is "
              f"{'optimistic' if checked['ratio'] > 1 else 'pessimistic'}; H100 figures below are multiplied by "
              f"{ratio:.2f}{'' if checked['ratio'] > 1 else ' (1.00: a pessimistic model is not scaled down)'}.", "",
              "## H100 SXM", "",
              "| part (fp16) | model |", "| --- | --- |"]
    for kind in ("matrix", "attention", "memory"):
        lines.append(f"| {kind} kernels | {h100[kind] * 1e3:.2f} ms |")
    lines.append(f"| of which launch gaps | {h100['launch'] * 1e3:.2f} ms |")
    lines.append(f"| total | {h100['total'] * 1e3:.2f} ms |")
    result = {"kernels": len(kernels), "launch_s": LAUNCH_S, "validation": checked, "h100_fp16": h100}
    if static is not None:
        gemm_fp16 = static["totals"]["fp16 roofline"]
        estimates = quantized_h100(kernels, static, layers, plan_bits)
        lines += ["", "Whole UNet on H100 (Linear/Conv2d layers from the compiled-SASS estimate of "
                  "benchmarks/results/static/report.md, quantize passes included, each one more kernel; the rest of "
                  "the forward as in fp16):", "",
                  f"| variant | model | calibrated (x {ratio:.2f}) | range (x {ratios[0]:.2f} .. x {ratios[-1]:.2f}) | "
                  "speed-up over fp16 |", "| --- | --- | --- | --- | --- |"]
        for name, seconds in estimates.items():
            lines.append(f"| {name} | {seconds * 1e3:.2f} ms | {seconds * ratio * 1e3:.2f} ms | "
                         f"{seconds * ratios[0] * 1e3:.1f} .. {seconds * ratios[-1] * 1e3:.1f} ms | "
                         f"{estimates['fp16'] / seconds:.2f}x |")
        lines += ["", f"The Linear/Conv2d layers are {gemm_fp16 * 1e3:.2f} ms of the fp16 model's "
                  f"{h100['total'] * 1e3:.2f} ms: the rest of the forward (attention, norms, activations, adds, "
                  f"launch gaps) bounds what quantizing them can gain. The two published GPUs disagree on how "
                  f"optimistic the model is ({ratios[0]:.2f}x against {ratios[-1]:.2f}x), so the calibrated H100 "
                  "times are uncertain by about that spread; the speed-up column is the model's own, the same at "
                  "any uniform scale."]
        passes = quantize_passes(static["layers"])
        saved = gemm_fp16 - static["totals"]["W8A8 kernels + quantize passes"]
        lines += ["", f"Launches decide it: a quantized UNet adds {passes} activation-quantization kernels. The W8A8 "
                  f"Linear/Conv2d kernels and their passes take {saved * 1e3:.2f} ms less than the fp16 roofline, which "
                  f"the passes' launches eat up unless a CUDA-graph gap is below {saved / passes * 1e6:.2f} us. "
                  "Quantizing inside the op that produces each input, not as kernels of their own, is what would "
                  "let the integer GEMMs' gain reach the user."]
        result["h100"] = {name: {"model_s": s, "calibrated_s": s * ratio} for name, s in estimates.items()}
        result["quantize_passes"] = passes
    return "\n".join(lines) + "\n", result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m benchmarks.unet_estimate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for unet-estimate.md and .json")
    parser.add_argument("--static", type=Path, default=Path("benchmarks/results/static/estimates.json"),
                        help="the static report's estimates.json (the quantized Linear/Conv2d layers)")
    args = parser.parse_args(argv)
    from benchmarks.sdxl_shapes import layer_shapes

    config = sdxl_turbo_unet_config()
    kernels = trace_kernels(config)
    static = json.loads(args.static.read_text()) if args.static.is_file() else None
    text, result = report(kernels, static, layer_shapes(config), mixed_plan_bits(config))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "unet-estimate.md").write_text(text)
    (args.out / "unet-estimate.json").write_text(json.dumps(
        {**result, "gpus": {n: asdict(g) for n, g in GPUS.items()}}, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
