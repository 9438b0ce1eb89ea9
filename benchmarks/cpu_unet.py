"""The CPU rows: one full-size UNet forward in fp32, bf16, mixq W8A8 / W4A8 / the 4-bit mixed plan (4/2-bit
weights packed, and unpacked once with cpu_weights="int8") and torchao int8, side by side in one
process, plus quantize()'s peak resident memory and each variant's resident weight bytes.

    python -m benchmarks.cpu_unet --unet-config PATH/sdxl-turbo/unet/config.json --out benchmarks/results

The UNet is built from the real config with random weights (seeded). Inputs are one denoising step:
latents [1, 4, S, S] for each --latents S, 77 text tokens, SDXL's added conditions. mixq's layers are
quantized from the bf16 model with activation ranges observed on one fp32 call at the first latent
size (random weights: the numbers are speed and memory, not image quality). The float layers are kept
aside while a quantized variant is measured, so that every variant quantizes the same float model.
torchao (Int8DynamicActivationInt8WeightConfig + torch.compile, Linear layers only) runs last, where
importable, since it quantizes the float model in place.

Timings are wall-clock medians of --rounds calls after one warm-up call, with the machine's load
average recorded: other processes on a shared CPU slow everything down. Results go to
OUT/cpu-unet-<date>.json and OUT/cpu-unet-<date>.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch

from benchmarks.environment import environment
from mixq.machine import cpu_features

TEXT_TOKENS = 77


# --- resident memory (Linux) ---------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int | None:
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


# --- model and inputs ----------------------------------------------------------------------------


def unet_inputs(unet, size: int, dtype) -> dict:
    # One prompt's conditioning at every size: the text embedding (its BOS row in particular) is the one
    # mixq calibrated with, as in serving, where the BOS row is the same for every prompt.
    text = torch.Generator().manual_seed(0)
    cfg = unet.config
    added = {}
    if cfg.addition_embed_type == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": torch.randn(1, text_dim, generator=text).to(dtype),
                 "time_ids": torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]], dtype=dtype)}
    encoder_hidden_states = torch.randn(1, TEXT_TOKENS, cfg.cross_attention_dim, generator=text).to(dtype)
    latents = torch.Generator().manual_seed(size)
    return dict(sample=torch.randn(1, cfg.in_channels, size, size, generator=latents).to(dtype),
                timestep=torch.tensor(999), encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added)


def calibrate(unet, inputs):
    from mixq.calibration import Calibration, observing
    from mixq.layers import quantizable_layers
    from mixq.plan import architecture_fingerprint

    calibration = Calibration(meta={"model": architecture_fingerprint(unet), "source": "one random UNet call"})
    with torch.no_grad(), observing(unet, quantizable_layers(unet), calibration):
        unet(**inputs)
    return calibration


def time_forward(unet, inputs, rounds: int) -> dict:
    with torch.no_grad():
        unet(**inputs)  # warm-up: lazy initialisation, oneDNN primitive creation, compilation
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            unet(**inputs)
            times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "rounds": rounds,
            "load_average_1min": round(os.getloadavg()[0], 2)}


def settle_memory():
    """Free what is unreachable and hand freed heap memory back, so that RSS differences between two points
    count live memory, not what the allocator kept from an earlier variant."""
    from mixq.memory import release_freed_memory

    gc.collect()
    release_freed_memory()


def quantized_bytes(unet) -> dict:
    """Resident bytes of the quantized layers: what they hold (buffers, and the oneDNN layouts 8-bit layers
    hold instead of plain buffers), and the oneDNN layouts kept beside packed 4/2-bit weights."""
    from mixq.kernels import onednn
    from mixq.layers import find_quantized_layers

    layers = [unet.get_submodule(n) for n in find_quantized_layers(unet)]
    return {"layer_buffers": sum(layer.state_bytes() for layer in layers), "onednn_layouts": onednn.packed_weights.nbytes()}


def int8_weights_plus_scales(layers) -> int:
    """One byte per weight and an fp32 scale per output channel: the floor for 8-bit layers' resident bytes."""
    return sum(layer.out_features * (layer.in_features * layer.kernel_size[0] * layer.kernel_size[1] + 4)
               for layer in layers)


def float_layer_bytes(modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


# --- the run -------------------------------------------------------------------------------------


def mixq_variants(unet, w_bits) -> dict[str, dict]:
    """name -> mixq.quantize keyword arguments: uniform W{w}A8, the 4-bit mixed plan, and the 4/2-bit
    ones again with cpu_weights="int8"."""
    from benchmarks.plans import mixed_4bit_plan

    variants = {f"mixq W{w}A8": {"w_bit": w, "a_bit": 8} for w in w_bits}
    variants["mixq 4-bit plan"] = {"plan": mixed_4bit_plan(unet)["layers"]}
    for name, kwargs in list(variants.items()):
        if kwargs.get("w_bit") != 8:
            variants[f"{name} int8-weights"] = {**kwargs, "cpu_weights": "int8"}
    return variants


def measure_mixq(unet, calibration, name, quantize_kwargs, sizes, all_inputs, rounds, results, profile=False):
    import mixq
    from mixq.layers import find_quantized_layers, set_submodule

    shim = types.SimpleNamespace(unet=unet)
    originals = {n: unet.get_submodule(n) for n in mixq.layers.quantizable_layers(unet)}
    settle_memory()
    before = rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    mixq.quantize(shim, calibration=calibration, progress=False, **quantize_kwargs)
    quantize_s = time.perf_counter() - start
    peak = peak_rss_bytes()
    quantized = find_quantized_layers(unet)
    q_bytes = quantized_bytes(unet)
    replaced_float = float_layer_bytes(originals[n] for n in quantized)
    settle_memory()
    memory = {
        "rss_before_bytes": before, "peak_rss_bytes": peak, "quantize_s": round(quantize_s, 1),
        "rss_after_bytes": rss_bytes(),  # the float layers stay resident (kept aside): the rise is mixq's
        "quantized_bytes": q_bytes, "replaced_float_bytes": replaced_float,
        "int8_weights_plus_scales_bytes": int8_weights_plus_scales(unet.get_submodule(n) for n in quantized),
        # Above float model + quantized layers (both resident during quantize, by design):
        "excess_over_float_plus_quantized_bytes": None if peak is None else peak - before - sum(q_bytes.values()),
    }
    results["quantize_memory"][name] = memory
    print(f"{name}: quantize {quantize_s:.1f} s, peak RSS {peak / 2**30:.2f} GiB (before {before / 2**30:.2f} GiB, "
          f"quantized {sum(q_bytes.values()) / 2**30:.2f} GiB)", flush=True)
    for size in sizes:
        results["latency"].setdefault(f"{name} bf16", {})[str(size)] = row = time_forward(unet, all_inputs[size],
                                                                                         rounds[size])
        print(f"  {name} {size}x{size}: {row['median_s']:.3f} s", flush=True)
    if profile:
        results["profiles"][name] = op_profile(unet, all_inputs[sizes[0]])
    for n, module in originals.items():  # back to the float model
        set_submodule(unet, n, module)
    del originals, shim
    settle_memory()


def op_profile(unet, inputs, rows: int = 15) -> str:
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        unet(**inputs)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def measure_torchao(unet, sizes, all_inputs, rounds, results):
    from benchmarks.variants import torchao_unavailable_reason

    reason = torchao_unavailable_reason()
    if reason:
        results["notes"].append(f"torchao: {reason}")
        return
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantize_(unet, Int8DynamicActivationInt8WeightConfig())
    # One static graph per latent size: a second size would otherwise recompile with dynamic shapes,
    # which takes many minutes for this UNet and serves no purpose here.
    unet.forward = torch.compile(unet.forward, dynamic=False)
    for size in sizes:
        start = time.perf_counter()
        with torch.no_grad():
            unet(**all_inputs[size])  # compilation
        compile_s = time.perf_counter() - start
        row = time_forward(unet, all_inputs[size], rounds[size])
        row["compile_s"] = round(compile_s, 1)
        results["latency"].setdefault("torchao int8-dyn + compile bf16", {})[str(size)] = row
        print(f"  torchao {size}x{size}: {row['median_s']:.3f} s (compile {compile_s:.0f} s)", flush=True)


def save(results: dict, out: Path) -> Path:
    """Written after every variant, so that an interrupted run keeps what it measured."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"cpu-unet-{results['date'][:10]}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
    stem.with_suffix(".md").write_text(report(results))
    return stem.with_suffix(".md")


def run(args) -> dict:
    from mixq.offline import load_unet_config, unet_from_config

    torch.manual_seed(0)
    sizes = args.latents
    rounds = {s: (args.rounds if s <= 32 else max(1, args.rounds - 1)) for s in sizes}
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.cpu_unet", *sys.argv[1:]]),
        "machine": {"cpu": environment("cpu")["device"], "features": cpu_features(), "machine": platform.machine()},
        "environment": environment("cpu"),
        "latency": {k: {} for k in ("fp32", "bf16")},
        "quantize_memory": {}, "profiles": {}, "notes": [],
    }
    unet = unet_from_config(load_unet_config(args.unet_config), seed=0, dtype=torch.float32).eval()
    results["parameters"] = sum(p.numel() for p in unet.parameters())
    results["channels_last"] = args.channels_last
    if args.channels_last:  # the layout CPU convolutions, float and mixq's, run fastest in (inputs follow)
        unet.to(memory_format=torch.channels_last)
    fp32_inputs = {s: unet_inputs(unet, s, torch.float32) for s in sizes}
    calibration = calibrate(unet, fp32_inputs[sizes[0]])
    for size in sizes:
        results["latency"]["fp32"][str(size)] = row = time_forward(unet, fp32_inputs[size], rounds[size])
        print(f"  fp32 {size}x{size}: {row['median_s']:.3f} s", flush=True)
    save(results, args.out)
    unet.to(torch.bfloat16)
    gc.collect()
    bf16_inputs = {s: unet_inputs(unet, s, torch.bfloat16) for s in sizes}
    for size in sizes:
        results["latency"]["bf16"][str(size)] = row = time_forward(unet, bf16_inputs[size], rounds[size])
        print(f"  bf16 {size}x{size}: {row['median_s']:.3f} s", flush=True)
    results["float_model_bytes"] = {"bf16": sum(p.numel() * p.element_size() for p in unet.parameters())}
    save(results, args.out)
    for name, kwargs in mixq_variants(unet, args.w_bits).items():
        measure_mixq(unet, calibration, name, kwargs, sizes, bf16_inputs, rounds, results, profile=args.profile)
        save(results, args.out)
    if not args.skip_torchao:
        measure_torchao(unet, sizes, bf16_inputs, rounds, results)
    return results


# --- the report ----------------------------------------------------------------------------------


def gib(n) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def report(results: dict) -> str:
    sizes = sorted({s for rows in results["latency"].values() for s in rows}, key=int)
    machine = results["machine"]
    features = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in machine["features"].items())
    lines = [
        f"# CPU: full-size UNet forward, {results['date']}",
        "",
        f"- Command: `{results['command']}`",
        f"- Machine: {machine['cpu']} ({machine['machine']}); {features}",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in results['environment']['versions'].items() if v)}",
        f"- mixq backend: `{results['environment']['mixq_kernel_backend']}`; UNet parameters: {results['parameters']:,}; "
        f"weights {'channels-last' if results.get('channels_last') else 'NCHW'} in every variant",
        "",
        "UNet forward, batch 1, median wall-clock seconds (speed-up over fp32 / over bf16):",
        "",
        "| variant | " + " | ".join(f"{s}x{s} latents" for s in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    fp32, bf16 = results["latency"]["fp32"], results["latency"]["bf16"]
    for name, rows in results["latency"].items():
        if not rows:
            continue
        cells = []
        for s in sizes:
            row = rows.get(s)
            if row is None:
                cells.append("-")
                continue
            ratio = ""
            if s in fp32 and s in bf16:
                ratio = f" ({fp32[s]['median_s'] / row['median_s']:.2f}x / {bf16[s]['median_s'] / row['median_s']:.2f}x)"
            cells.append(f"{row['median_s']:.3f}{ratio}, load {row['load_average_1min']}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "quantize() memory (from the bf16 model; RSS on Linux):", "",
              "| variant | RSS before | peak RSS | RSS rise | quantized layers (+ oneDNN layouts beside them) | "
              "resident / the same layers in bf16 | resident / int8 weights + scales | peak above float + quantized "
              "| time |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, m in results["quantize_memory"].items():
        q = m["quantized_bytes"]
        held = q["layer_buffers"] + q["onednn_layouts"]
        floor = m.get("int8_weights_plus_scales_bytes")
        rise = None if m.get("rss_after_bytes") is None else m["rss_after_bytes"] - m["rss_before_bytes"]
        lines.append(f"| {name} | {gib(m['rss_before_bytes'])} | {gib(m['peak_rss_bytes'])} | {gib(rise)} | "
                     f"{gib(q['layer_buffers'])} (+ {gib(q['onednn_layouts'])}) | "
                     f"{held / m['replaced_float_bytes']:.2f}x | {'n/a' if not floor else f'{held / floor:.3f}x'} | "
                     f"{gib(m['excess_over_float_plus_quantized_bytes'])} | {m['quantize_s']} s |")
    if "float_model_bytes" in results:
        lines += ["", f"bf16 float model: {gib(results['float_model_bytes']['bf16'])}."]
    for note in results["notes"]:
        lines.append(f"- {note}")
    for name, table in results["profiles"].items():
        lines += ["", f"Per-op profile, {name}, first latent size:", "", "```", table.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m benchmarks.cpu_unet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet-config", required=True, help="the model's unet/config.json (or its folder)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--latents", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per size (one fewer above 32x32)")
    parser.add_argument("--w-bits", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--profile", action="store_true", help="per-op profile of each mixq variant")
    parser.add_argument("--skip-torchao", action="store_true")
    parser.add_argument("--channels-last", action="store_true", help="UNet weights and latents channels-last")
    args = parser.parse_args(argv)
    print(f"report: {save(run(args), args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
