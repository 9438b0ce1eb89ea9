"""What holding the float layers costs a quantized pipeline on CPU (the end-to-end benchmark holds them).

    python -m benchmarks.held_float_layers --model-configs PATH/sdxl-base-1.0 \
        --unet-config PATH/sdxl-turbo/unet/config.json --tokenizer PATH/clip-tokenizer

One process, phases in this order, each three generations (SDXL-Turbo, 512x512, 1 step, per stage) and
three lone `vae.decode` calls: bf16; mixq W8A8 UNet + VAE decoder with the float layers still referenced
(as benchmarks.end_to_end holds them to alternate configurations); the same quantized pipeline after the
float layers are freed (a user's process after `mixq.quantize`). Phases are not interleaved: compare
them for direction, not as a paired ratio. Prints one line per phase.
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    import mixq
    from benchmarks.end_to_end import (benchmark_pipeline, float_layers, generate_timed, one_generation_ranges,
                                       workloads)

    parser = argparse.ArgumentParser(prog="python -m benchmarks.held_float_layers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-configs", type=Path, required=True, help="a diffusers SDXL folder (text encoders, VAE)")
    parser.add_argument("--unet-config", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args(argv)

    pipe = benchmark_pipeline(args.model_configs, args.unet_config, args.tokenizer).to(torch.bfloat16)
    gc.collect()
    workload = workloads(args.size, args.size)["SDXL-Turbo"]
    latents = torch.randn(1, pipe.vae.config.latent_channels, args.size // 8, args.size // 8, dtype=torch.bfloat16)

    def lone_decode() -> float:
        with torch.no_grad():
            start = time.perf_counter()
            pipe.vae.decode(latents)
            return time.perf_counter() - start

    def phase(name: str, rounds: int = 3):
        generate_timed(pipe, workload)  # warm-up
        lone_decode()
        generations, decodes = [], []
        for _ in range(rounds):
            row = generate_timed(pipe, workload)
            generations.append(f"{row['total']:.2f} (UNet {row['UNet']:.2f}, VAE {row['VAE decode']:.2f})")
            decodes.append(f"{lone_decode():.2f}")
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        print(f"{name}: generations {', '.join(generations)} s; lone VAE decodes {', '.join(decodes)} s; "
              f"peak RSS so far {rss:.1f} GiB", flush=True)

    phase("bf16")
    floats = float_layers(pipe)
    calibration = one_generation_ranges(pipe, ("unet", "vae"), args.size)
    mixq.quantize(pipe, components=("unet", "vae"), calibration=calibration, progress=False, w_bit=8, a_bit=8)
    gc.collect()
    phase("W8A8 UNet + VAE, float layers held")
    del floats
    gc.collect()
    phase("W8A8 UNet + VAE, float layers freed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
