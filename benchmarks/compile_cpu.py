"""Eager vs torch.compile on CPU, for quantized UNets: the proving pipeline's and the full-size SDXL-Turbo
architecture's, side by side in one process.

    python -m benchmarks.compile_cpu --proving-run runs/proving \\
        --unet-config ../data/model-configs/sdxl-turbo/unet/config.json --out benchmarks/results

Proving pipeline (shipped weights): one UNet call on a batch of --batch 16x16 latents (its 64x64 images),
float32, for the float UNet, mixq W8A8 and the run's plan.yaml (its activation ranges); each eager, then
compiled (torch.compile, default mode; the first call's time is the compile time). Full-size architecture
(random weights from the real config, bf16, 32x32 latents): float and mixq W8A8 with ranges observed on
one call, eager and compiled. Timings are medians of --rounds calls after a warm-up, with the load average.
Results go to OUT/cpu-compile-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
import time
import types
from pathlib import Path

import torch

from benchmarks.cpu_unet import calibrate, time_forward, unet_inputs
from benchmarks.environment import environment
from mixq.machine import cpu_features


def eager_and_compiled(unet, inputs, rounds: int) -> dict:
    eager = time_forward(unet, inputs, rounds)
    compiled = torch.compile(unet)
    start = time.perf_counter()
    with torch.no_grad():
        compiled(**inputs)
    compile_s = time.perf_counter() - start
    row = time_forward(compiled, inputs, rounds)
    return {"eager_median_s": eager["median_s"], "compiled_median_s": row["median_s"], "compile_s": round(compile_s, 1),
            "speedup": eager["median_s"] / row["median_s"], "load_average_1min": row["load_average_1min"]}


def proving_unet_call(pipe, batch: int) -> dict:
    """The keyword inputs of the proving pipeline's first UNet call on `batch` held-out prompts (one step)."""
    from mixq.calib.collect import capturing_unet_calls
    from mixq.proving import evaluation_prompts
    from mixq.proving.model import SAMPLING

    with capturing_unet_calls(pipe.unet, to_cpu=False) as calls:
        pipe([text for _, text in evaluation_prompts(batch)], output_type="latent",
             generator=torch.Generator().manual_seed(0), **{**SAMPLING, "num_inference_steps": 1})
    call_args, call_kwargs = calls[0][:2]
    return dict(zip(("sample", "timestep"), call_args), **call_kwargs)


def proving_rows(run: Path | None, batch: int, rounds: int) -> dict:
    import mixq
    from mixq.proving import load_pipeline

    base = load_pipeline()
    inputs = proving_unet_call(base, batch)
    variants = {"float32": None, "mixq W8A8": dict(w_bit=8, a_bit=8)}
    if run is not None:
        variants["mixq plan.yaml"] = dict(plan=str(run / "plan.yaml"))
    rows = {}
    for name, settings in variants.items():
        pipe = copy.deepcopy(base)
        if settings is not None:
            calibration = run if run is not None else mixq.calibrate_ranges(pipe, "proving:calibration", 16,
                                                                           progress=False)
            mixq.quantize(pipe, calibration=calibration, progress=False, **settings)
        torch._dynamo.reset()
        rows[name] = eager_and_compiled(pipe.unet, inputs, rounds)
        print(f"proving {name}: {rows[name]}", flush=True)
    return rows


def full_size_rows(config_path: Path, rounds: int, size: int = 32) -> dict:
    import mixq
    from mixq.offline import load_unet_config, unet_from_config

    unet = unet_from_config(load_unet_config(config_path), seed=0, dtype=torch.float32).eval()
    calibration = calibrate(unet, unet_inputs(unet, size, torch.float32))
    unet.to(torch.bfloat16)
    inputs = unet_inputs(unet, size, torch.bfloat16)
    rows = {}
    torch._dynamo.reset()
    rows["bf16"] = eager_and_compiled(unet, inputs, rounds)
    print(f"full-size bf16: {rows['bf16']}", flush=True)
    mixq.quantize(types.SimpleNamespace(unet=unet), w_bit=8, a_bit=8, calibration=calibration, progress=False)
    torch._dynamo.reset()
    rows["mixq W8A8 bf16"] = eager_and_compiled(unet, inputs, rounds)
    print(f"full-size mixq W8A8: {rows['mixq W8A8 bf16']}", flush=True)
    return rows


def report(results: dict) -> str:
    machine = results["machine"]
    lines = [f"# Eager vs torch.compile on CPU ({results['date'][:10]})", "",
             f"Command: `{results['command']}`", "",
             f"Machine: {machine['cpu']}. Versions: {results['environment'].get('versions')}.", ""]
    batch = results.get("batch", 8)
    for section, title in (("proving", f"Proving pipeline UNet, float32, a batch of {batch} 16x16 latents"),
                           ("full_size", "Full-size SDXL-Turbo architecture UNet, bf16, 32x32 latents, batch 1")):
        rows = results.get(section)
        if not rows:
            continue
        lines += [f"## {title}", "", "| variant | eager | compiled | compiled / eager speed-up | compile time |",
                  "|---|---|---|---|---|"]
        for name, r in rows.items():
            lines.append(f"| {name} | {r['eager_median_s'] * 1e3:.1f} ms | {r['compiled_median_s'] * 1e3:.1f} ms | "
                         f"{r['speedup']:.2f}x | {r['compile_s']:.0f} s |")
        lines.append("")
    lines.append("Compile time is the first call's; inductor's on-disk cache shortens it on a rerun (the float32 "
                 "proving UNet's here was cached by an earlier run).")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_cpu", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--proving-run", type=Path, help="a `python -m mixq.calibrate` run folder of the proving "
                                                          "pipeline (plan.yaml and activation ranges)")
    parser.add_argument("--unet-config", type=Path, help="the SDXL-Turbo UNet config.json (omit to skip full size)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": " ".join(["python -m benchmarks.compile_cpu", *(argv if argv is not None else sys.argv[1:])]),
               "machine": {"cpu": environment("cpu")["device"], "int8_features": cpu_features()},
               "environment": environment("cpu")}
    results["batch"] = args.batch
    results["proving"] = proving_rows(args.proving_run, args.batch, args.rounds)
    if args.unet_config:
        results["full_size"] = full_size_rows(args.unet_config, max(2, args.rounds - 2))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"cpu-compile-{results['date'][:10]}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(report(results) + "\n")
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
