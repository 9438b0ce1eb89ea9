"""End to end, one process per configuration: what a user's process measures, paired round by round.

    python -m benchmarks.end_to_end_processes --model-configs PATH/sdxl-base-1.0 \
        --unet-config PATH/sdxl-turbo/unet/config.json --tokenizer PATH/clip-tokenizer [--rounds 3]

benchmarks.end_to_end keeps every configuration in one process and swaps layers between generations,
so its quantized configurations run beside the float layers they replaced (on CPU that slowed the
quantized VAE decoder by about 18 %, benchmarks/held_float_layers.py). Here each configuration runs in
a fresh process that holds only what a user's would: the full-size pipeline built as in
benchmarks.end_to_end (random weights from the real configs, channels-last, bf16 on CPU / fp16 on
CUDA), then, for a quantized configuration, `mixq.calibrate_ranges` on one generation and
`mixq.quantize` of the configuration's components, the float layers freed. Each process generates one
warm-up image and --generations timed ones, per stage (benchmarks.end_to_end.StageClock).

A round runs every configuration once, one process after another, in the opposite order in every other
round (A B, B A, ...), so that the machine's drift falls on all of them alike. The speed-up of a
configuration in a round is the baseline's median total over its own in that round (a paired ratio).
Results are written after every process to OUT/<device>-pipeline-processes-<date>.json and .md; with
--resume, a run picks up the processes that a stopped run with the same settings finished.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.end_to_end import (COMPONENT_SETS, STAGES, UNET_SETTINGS, benchmark_pipeline, generate_timed,
                                   median_row, one_generation_ranges, workload_scheduler, workloads)
from benchmarks.environment import environment
from mixq.io import write_text_atomic
from mixq.machine import cpu_features

BASELINE = "half"
# configuration name -> (UNet setting or None for the float baseline, the components quantized besides the UNet)
CONFIGURATIONS = {BASELINE: (None, ()), **{f"{UNET_SETTINGS[setting][0]}{suffix}": (setting, components)
                                           for setting in UNET_SETTINGS for suffix, components in COMPONENT_SETS}}
DEFAULT_CONFIGURATIONS = (BASELINE, "mixq W8A8 UNet + VAE W8A8")
# settings a resumed run must share with the stopped one
SETTINGS = ("tiny", "model_configs", "unet_config", "tokenizer", "workload", "size", "generations", "device",
            "channels_last", "configurations")


def round_order(configurations: list[str], round_index: int) -> list[str]:
    """The configurations' order in a round: as given in even rounds, reversed in odd ones."""
    return list(configurations) if round_index % 2 == 0 else list(reversed(configurations))


def paired_ratios(runs: list[dict], name: str) -> list[float]:
    """The baseline's median total over the configuration's, in each round both finished."""
    medians = {(r["round"], r["configuration"]): r["row"]["total"] for r in runs}
    return [medians[(i, BASELINE)] / medians[(i, name)] for i in sorted({r["round"] for r in runs})
            if (i, BASELINE) in medians and (i, name) in medians]


def speedup_interval(ratios: list[float]) -> tuple[float, float, float] | None:
    """The geometric mean of per-round speed-ups with its 95 % Student-t interval (on their logarithms);
    None for fewer than two rounds."""
    from mixq.stats import paired_difference

    if len(ratios) < 2:
        return None
    logs = paired_difference([math.log(r) for r in ratios], [0.0] * len(ratios))
    return math.exp(logs["mean"]), math.exp(logs["low"]), math.exp(logs["high"])


def pooled_row(runs: list[dict], name: str) -> dict | None:
    """The median generation (by total; its stages add up to it) over every process of a configuration."""
    generations = [g for r in runs if r["configuration"] == name for g in r["generations"]]
    return sorted(generations, key=lambda g: g["total"])[len(generations) // 2] if generations else None


# --- one configuration, in its own process -------------------------------------------------------


def measure_configuration(args, name: str) -> dict:
    """Build the pipeline, quantize the configuration's components (none for the baseline), then time
    one warm-up and args.generations generations."""
    import mixq
    from benchmarks.plans import mixed_4bit_plan
    from mixq.modules import QuantizedLayer

    setting, components = CONFIGURATIONS[name]
    half = torch.float16 if args.device.startswith("cuda") else torch.bfloat16
    start = time.perf_counter()
    pipe = benchmark_pipeline(args.model_configs, args.unet_config, args.tokenizer, args.device, args.tiny,
                              args.channels_last).to(half)
    gc.collect()
    built_s, quantize_s = time.perf_counter() - start, None
    if setting is not None:
        start, quantized = time.perf_counter(), ("unet", *components)
        calibration = one_generation_ranges(pipe, quantized, args.size)
        kwargs = UNET_SETTINGS[setting][1] or {"plan": mixed_4bit_plan(pipe.unet)["layers"]}
        mixq.quantize(pipe, components=quantized, calibration=calibration, progress=False, **kwargs)
        del calibration
        gc.collect()  # the float layers quantize() replaced: a user's process no longer holds them
        quantize_s = time.perf_counter() - start
    workload = workloads(args.size, args.size)[args.workload]
    with workload_scheduler(pipe, workload["scheduler"]):
        generate_timed(pipe, workload)  # warm-up: oneDNN primitives, lazy initialisation
        generations = [generate_timed(pipe, workload) for _ in range(args.generations)]
    return {"configuration": name, "pid": os.getpid(), "built_s": round(built_s, 1),
            "quantize_s": None if quantize_s is None else round(quantize_s, 1),
            "generations": generations, "row": median_row(pipe, generations),
            "quantized_layers": {c: sum(isinstance(m, QuantizedLayer) for m in getattr(pipe, c).modules())
                                 for c in ("unet", "vae", "text_encoder", "text_encoder_2")}}


# --- the parent: processes in alternating order ------------------------------------------------


def child_command(args, name: str, out: Path) -> list[str]:
    command = [sys.executable, "-m", "benchmarks.end_to_end_processes", "--child", name, "--child-out", str(out),
               "--workload", args.workload, "--size", str(args.size), "--generations", str(args.generations),
               "--device", args.device]
    if args.tiny:
        command.append("--tiny")
    for flag, value in (("--model-configs", args.model_configs), ("--unet-config", args.unet_config),
                        ("--tokenizer", args.tokenizer)):
        if value is not None:
            command += [flag, str(value)]
    return command + ([] if args.channels_last else ["--no-channels-last"])


def child_environment() -> dict:
    """This environment, with the repository importable from any working directory."""
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}


def settings_of(args) -> dict:
    return {key: (str(value) if isinstance(value, Path) else value)
            for key, value in vars(args).items() if key in SETTINGS}


def stem_of(results: dict, out: Path) -> Path:
    slug = results["environment"]["device_slug"]
    return out / f"{'cpu' if slug in (None, 'cpu') else slug}-pipeline-processes-{results['date'][:10]}"


def resumable(args, stem: Path) -> dict | None:
    """A stopped run's results at `stem` when they were made with the same settings."""
    path = stem.with_suffix(".json")
    if not (args.resume and path.exists()):
        return None
    results = json.loads(path.read_text())
    return results if results.get("settings") == settings_of(args) else None


def write(results: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stem = stem_of(results, out)
    write_text_atomic(stem.with_suffix(".json"), json.dumps(results, indent=2))
    write_text_atomic(stem.with_suffix(".md"), report(results))
    return stem.with_suffix(".md")


def run(args) -> dict:
    fresh = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.end_to_end_processes", *sys.argv[1:]]),
        "machine": {"cpu": environment("cpu")["device"], "features": cpu_features(), "machine": platform.machine()},
        "environment": environment(args.device), "threads": torch.get_num_threads(),
        "half": "float16" if args.device.startswith("cuda") else "bfloat16",
        "workload": workloads(args.size, args.size)[args.workload], "settings": settings_of(args),
        "rounds": args.rounds, "runs": [],
    }
    results = resumable(args, stem_of(fresh, args.out)) or fresh
    results.update(rounds=args.rounds, command=fresh["command"])  # a resumed run: the command that finished it
    done = {(r["round"], r["configuration"]) for r in results["runs"]}
    for index in range(args.rounds):
        for name in round_order(args.configurations, index):
            if (index, name) in done:
                continue
            child_out = args.out / f".process-{os.getpid()}.json"
            args.out.mkdir(parents=True, exist_ok=True)
            subprocess.run(child_command(args, name, child_out), check=True, env=child_environment())
            measured = json.loads(child_out.read_text())
            child_out.unlink()
            results["runs"].append({"round": index, "load_average_1min": os.getloadavg()[0], **measured})
            print(f"  round {index + 1}, {name}: {measured['row']['total']:.2f} s "
                  f"(UNet {measured['row']['UNet']:.2f}, VAE {measured['row']['VAE decode']:.2f})", flush=True)
            write(results, args.out)
    return results


def report(results: dict) -> str:
    machine, runs, half = results["machine"], results["runs"], results["half"]
    features = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in machine["features"].items())
    spec = results["workload"]
    names = [n for n in results["settings"]["configurations"] if any(r["configuration"] == n for r in runs)]
    lines = [f"# The whole SDXL pipeline, one process per configuration, {results['date']}", "",
             f"- Command: `{results['command']}`",
             f"- Machine: {machine['cpu']} ({machine['machine']}); {features}; {results['threads']} threads",
             f"- Versions: {', '.join(f'{k} {v}' for k, v in results['environment']['versions'].items() if v)}",
             f"- Workload: {spec['size']}x{spec['size']}, {spec['num_inference_steps']} step(s), guidance "
             f"{spec['guidance_scale']}, batch 1; \"{half}\" is the float baseline and the dtype of every layer "
             "mixq leaves float; each process: one warm-up generation, then "
             f"{results['settings']['generations']} timed ones",
             f"- Rounds finished: {len({r['round'] for r in runs})} of {results['rounds']}, each configuration in "
             "its own fresh process, the order reversed every other round", "",
             "Seconds per image (the median generation over every process of the configuration); speed-up over "
             f"{half} end to end, per round (the baseline's median total over the configuration's, same round), "
             "and of the UNet stage alone:", "",
             "| configuration | " + " | ".join(STAGES) + f" | total | end to end vs {half} | per round: median "
             f"[min, max] (n) | UNet vs {half} | build s | quantize s | RSS GiB |",
             "|---|" + "---|" * (len(STAGES) + 7)]
    base = pooled_row(runs, BASELINE)
    for name in names:
        row, own = pooled_row(runs, name), [r for r in runs if r["configuration"] == name]
        ratios = sorted(paired_ratios(runs, name)) if name != BASELINE else []
        paired = (f"{statistics.median(ratios):.2f}x [{ratios[0]:.2f}, {ratios[-1]:.2f}] ({len(ratios)})"
                  if ratios else "-")
        interval = speedup_interval(ratios)
        if interval:
            paired += f"; geometric mean {interval[0]:.2f}x, 95 % CI [{interval[1]:.2f}, {interval[2]:.2f}]"
        e2e = f"{base['total'] / row['total']:.2f}x" if base else "-"
        unet = f"{base['UNet'] / row['UNet']:.2f}x" if base else "-"
        quantize = f"{statistics.median(r['quantize_s'] for r in own):.0f}" if own[0]["quantize_s"] is not None else "-"
        rss = max(r["row"]["rss_bytes"] or 0 for r in own) / 2**30
        lines.append(f"| {half if name == BASELINE else name} | " + " | ".join(f"{row[s]:.2f}" for s in STAGES)
                     + f" | **{row['total']:.2f}** | {e2e} | {paired} | {unet} | "
                     f"{statistics.median(r['built_s'] for r in own):.0f} | {quantize} | {rss:.1f} |")
    lines += ["", "Totals per process (seconds, round by round):", ""]
    for name in names:
        totals = [f"{r['round'] + 1}: " + ", ".join(f"{g['total']:.2f}" for g in r["generations"])
                  for r in runs if r["configuration"] == name]
        lines.append(f"- {half if name == BASELINE else name}: " + "; ".join(totals))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m benchmarks.end_to_end_processes",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-configs", type=Path, default=None,
                        help="a diffusers SDXL folder with text_encoder/, text_encoder_2/, vae/ config.json "
                             "(default: SDXL 1.0's configs built in)")
    parser.add_argument("--unet-config", type=Path, help="the UNet's config.json (or its folder)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="a CLIP tokenizer folder (default: byte-level)")
    parser.add_argument("--tiny", action="store_true",
                        help="the tiny offline pipeline instead: checks the benchmark runs")
    parser.add_argument("--workload", choices=("SDXL-Turbo", "LCM-LoRA SDXL"), default="SDXL-Turbo")
    parser.add_argument("--size", type=int, default=512, help="image size")
    parser.add_argument("--configurations", nargs="+", choices=list(CONFIGURATIONS),
                        default=list(DEFAULT_CONFIGURATIONS), metavar="NAME",
                        help=f"configurations to run, the baseline first (default: "
                             f"{', '.join(map(repr, DEFAULT_CONFIGURATIONS))}; "
                             f"choices: {', '.join(map(repr, CONFIGURATIONS))})")
    parser.add_argument("--rounds", type=int, default=3, help="rounds: one process per configuration each")
    parser.add_argument("--generations", type=int, default=3, help="timed generations per process")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--resume", action="store_true", help="keep the processes a stopped run with the same "
                        "settings finished (its results under OUT, same date)")
    parser.add_argument("--child", metavar="NAME", help=argparse.SUPPRESS)  # one configuration, in this process
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.child_out.write_text(json.dumps(measure_configuration(args, args.child)))
        return 0
    if args.configurations[0] != BASELINE:
        parser.error(f"--configurations must start with the baseline {BASELINE!r}: every speed-up is over it")
    print(f"report: {write(run(args), args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
