"""The compiled activation quantization against the eager one, on the full-size UNet: one process, one
quantized model, the switch (MIXQ_CPU_FUSED_QUANTIZE, read at every call) flipped between alternating
rounds, so both arms see the same weights, layouts, caches and machine load.

    python -m benchmarks.fused_quantize_ab --unet-config PATH/sdxl-turbo/unet/config.json --latents 32 64

Prints, per latent size, the median UNet forward with each arm, the bf16 float forward, and the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import types

import torch

from benchmarks.cpu_unet import calibrate, unet_inputs
from benchmarks.environment import environment

ARMS = {"eager": "0", "compiled": "1"}


def timed(unet, inputs) -> float:
    start = time.perf_counter()
    unet(**inputs)
    return time.perf_counter() - start


def main(argv=None) -> int:
    import mixq
    from mixq.offline import load_unet_config, unet_from_config

    parser = argparse.ArgumentParser(prog="python -m benchmarks.fused_quantize_ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet-config", required=True)
    parser.add_argument("--latents", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--rounds", type=int, default=4, help="calls per arm and size (alternating)")
    args = parser.parse_args(argv)
    unet = unet_from_config(load_unet_config(args.unet_config), dtype=torch.bfloat16).eval()
    unet.to(memory_format=torch.channels_last)
    print(f"{environment('cpu')['device']}; torch {torch.__version__}; full-size UNet from its config, random "
          "weights, bf16, channels-last, batch 1")
    all_inputs = {size: unet_inputs(unet, size, torch.bfloat16) for size in args.latents}
    float_s = {}
    with torch.no_grad():
        for size, inputs in all_inputs.items():
            unet(**inputs)
            float_s[size] = statistics.median(timed(unet, inputs) for _ in range(args.rounds))
        calibration = calibrate(unet, all_inputs[args.latents[0]])
    mixq.quantize(types.SimpleNamespace(unet=unet), w_bit=8, a_bit=8, calibration=calibration, progress=False)
    quantized = unet
    before = os.environ.get("MIXQ_CPU_FUSED_QUANTIZE")
    try:
        with torch.no_grad():
            for size, inputs in all_inputs.items():
                times = {arm: [] for arm in ARMS}
                for arm, flag in ARMS.items():  # warm-up of each arm (the first compiled call compiles)
                    os.environ["MIXQ_CPU_FUSED_QUANTIZE"] = flag
                    quantized(**inputs)
                for _ in range(args.rounds):
                    for arm, flag in ARMS.items():
                        os.environ["MIXQ_CPU_FUSED_QUANTIZE"] = flag
                        times[arm].append(timed(quantized, inputs))
                eager, compiled = (statistics.median(times[a]) for a in ARMS)
                print(f"{size}x{size} latents: bf16 {float_s[size]:.3f} s; W8A8 eager quantization {eager:.3f} s "
                      f"({float_s[size] / eager:.2f}x bf16), compiled {compiled:.3f} s ({float_s[size] / compiled:.2f}x "
                      f"bf16); eager / compiled {eager / compiled:.2f}x; load average {os.getloadavg()[0]:.2f}")
    finally:
        if before is None:
            os.environ.pop("MIXQ_CPU_FUSED_QUANTIZE", None)
        else:
            os.environ["MIXQ_CPU_FUSED_QUANTIZE"] = before
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
