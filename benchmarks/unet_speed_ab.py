"""Full-size UNet speed of mixq's CPU settings against bf16, arms alternating in one process: the paired
version of benchmarks/cpu_unet.py's speed rows, whose sequential timings drift with the machine.

    python -m benchmarks.unet_speed_ab --unet-config PATH/sdxl-turbo/unet/config.json --latents 32 64

One bf16 UNet (random weights from the real config, channels-last, batch 1); mixq W8A8, W4A8 and the
offline default's 4-bit plan proportions (benchmarks.plans.mixed_4bit_plan), 4/2-bit weights packed (the
default), each quantized once from the same float layers with ranges from one fp32 call, swapped in
between alternating calls. With --unpacked-arms, W4A8 and the plan also run with MIXQ_PACKED_GEMM=0 (the
same layers, their weights unpacked on every call instead of the fused packed GEMM), for the A/B of that
GEMM. Prints, per latent size, each arm's median and its per-round speed-up over bf16 (bf16's time over
the arm's in the same round: median [min, max]). With --int8-gemm-arms, W8A8 also runs with every 8-bit
layer on oneDNN and with every one on the fused GEMM (MIXQ_INT8_GEMM), beside the default split.
"""

from __future__ import annotations

import argparse
import os
import types

import torch

from benchmarks.alternating import environment_set, speedup_cells
from benchmarks.cpu_unet import calibrate, unet_inputs
from benchmarks.environment import environment
from benchmarks.held_weights_ab import alternating_times


def quantized_layers(unet, originals: dict, calibration, **settings) -> dict:
    """mixq's layers for `settings`, quantized from the float layers, which are then put back."""
    import mixq
    from mixq.layers import find_quantized_layers, set_submodule

    mixq.quantize(types.SimpleNamespace(unet=unet), calibration=calibration, progress=False, **settings)
    layers = {n: unet.get_submodule(n) for n in find_quantized_layers(unet)}
    for name in layers:
        set_submodule(unet, name, originals[name])
    return layers


def main(argv=None) -> int:
    from benchmarks.plans import mixed_4bit_plan
    from mixq.layers import quantizable_layers
    from mixq.offline import load_unet_config, unet_from_config

    parser = argparse.ArgumentParser(prog="python -m benchmarks.unet_speed_ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet-config", required=True)
    parser.add_argument("--latents", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--rounds", type=int, default=5, help="calls per arm and size (alternating)")
    parser.add_argument("--unpacked-arms", action="store_true",
                        help="also W4A8 and the plan with MIXQ_PACKED_GEMM=0 (weights unpacked per call)")
    parser.add_argument("--int8-gemm-arms", action="store_true",
                        help="also W8A8 with every 8-bit layer on oneDNN, and every one on the fused GEMM "
                             "(MIXQ_INT8_GEMM=onednn / mixq; by default convolutions run fused where there is no AMX)")
    args = parser.parse_args(argv)
    unet = unet_from_config(load_unet_config(args.unet_config), dtype=torch.float32).eval()
    with torch.no_grad():
        calibration = calibrate(unet, unet_inputs(unet, args.latents[0], torch.float32))
    unet.to(torch.bfloat16).to(memory_format=torch.channels_last)
    print(f"{environment('cpu')['device']}; torch {torch.__version__}; full-size UNet from its config, random "
          "weights, bf16, channels-last, batch 1", flush=True)
    originals = {n: unet.get_submodule(n) for n in quantizable_layers(unet)}
    arms = {"W8A8": quantized_layers(unet, originals, calibration, w_bit=8, a_bit=8),
            "W4A8": quantized_layers(unet, originals, calibration, w_bit=4, a_bit=8),
            "4-bit plan": quantized_layers(unet, originals, calibration, plan=mixed_4bit_plan(unet)["layers"])}
    arms = {"bf16": {n: originals[n] for n in arms["W8A8"]}, **arms}
    environments = {}
    if args.int8_gemm_arms:
        for choice, label in (("onednn", "oneDNN"), ("mixq", "fused GEMM")):
            arm, variables = f"W8A8, every layer on {label}", {"MIXQ_INT8_GEMM": choice}
            with environment_set(variables):  # (laid out for that GEMM when quantized)
                arms[arm] = quantized_layers(unet, originals, calibration, w_bit=8, a_bit=8)
            environments[arm] = variables
    if args.unpacked_arms:
        for arm in ("W4A8", "4-bit plan"):
            arms[f"{arm}, unpacked per call"] = arms[arm]
            environments[f"{arm}, unpacked per call"] = {"MIXQ_PACKED_GEMM": "0"}
    with torch.no_grad():
        for size in args.latents:
            inputs = unet_inputs(unet, size, torch.bfloat16)
            times = alternating_times(unet, arms, inputs, args.rounds, environments)
            print(f"{size}x{size} latents, {args.rounds} alternating rounds: {speedup_cells(times, 'bf16')}; "
                  f"load average {os.getloadavg()[0]:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
