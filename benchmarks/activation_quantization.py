"""CPU activation quantization, side by side in one process: the chunked pass into fresh codes (what the
oneDNN backend did before) and into the reused per-thread codes buffer (what its kernels do now), over
activation sizes from a small UNet layer's to a VAE decoder's at 512x512.

    python -m benchmarks.activation_quantization > benchmarks/results/cpu-activation-quantization-<date>.md

Medians of 5 rounds (variants alternating within each round) of a loop of calls; every variant's codes are
checked against the reference first.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch

from benchmarks.environment import environment
from mixq.kernels import onednn, reference
from mixq.machine import cpu_features

SIZES = [1 << 15, 1 << 16, 1 << 17, 1 << 18, 1 << 20, 1 << 22, 1 << 25]
VARIANTS = {"fresh codes (before)": False, "reused buffer (now)": True}  # name: reuse


def median_us(run, calls: int, rounds: int) -> dict[str, float]:
    samples = {name: [] for name in VARIANTS}
    for _ in range(rounds):
        for name, reuse in VARIANTS.items():
            run(reuse)
            start = time.perf_counter()
            for _ in range(calls):
                run(reuse)
            samples[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.activation_quantization", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    scale, zero = torch.tensor(0.05), torch.tensor(3.0)
    env = environment("cpu")
    print(f"# CPU activation quantization ({datetime.date.today()})\n")
    features = " ".join(flag for flag, present in cpu_features().items() if present) or "none"
    print(f"Machine: {env['device']} (all int8/bf16 flags: {features}); torch {torch.__version__}; load average "
          f"at the start {env['load_average_1min']}.")
    print("Command: `python -m benchmarks.activation_quantization`. uint8 codes (8-bit activations) of a flat "
          "activation; microseconds per call, medians.\n")
    print("| elements | input | " + " | ".join(VARIANTS) + " | before / now |")
    print("|---|---|" + "---|" * (len(VARIANTS) + 1))
    for numel in SIZES:
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randn(numel, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
            expected = reference.quantize_input(x, scale, zero, 8).to(torch.int16) + 128
            for reuse in VARIANTS.values():
                codes = onednn.quantize_input_unsigned(x, scale, zero, 8, reuse=reuse)
                assert torch.equal(codes.to(torch.int16), expected)
            times = median_us(lambda reuse: onednn.quantize_input_unsigned(x, scale, zero, 8, reuse=reuse),
                              max(5, min(2000, (1 << 24) // numel)), args.rounds)
            before, now = times["fresh codes (before)"], times["reused buffer (now)"]
            print(f"| {numel:,} | {str(dtype)[6:]} | " + " | ".join(f"{t:.1f}" for t in times.values())
                  + f" | {before / now:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
