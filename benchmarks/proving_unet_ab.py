"""The proving pipeline's UNet (trained weights, small widths) in fp32 against mixq W8A8, W4A8 and the
offline default's 4-bit plan proportions, arms alternating in one process, at several batch sizes: where
the fixed cost of each quantized layer call, not its GEMM, decides the speed.

    python -m benchmarks.proving_unet_ab [--batches 1 8 50] [--rounds 9]

The UNet's inputs are those of the pipeline's first step for a shapes-grammar prompt (64x64 images, 16x16
latents); the ranges come from one fp32 call on them (speed does not depend on their values). With
--general-path-arms, W8A8 and W4A8 also run with MIXQ_PREPARED_CALLS=0 (every layer call through the
backend-neutral interface instead of its prepared kernel call: the A/B of kernels/prepared_calls.py).
Prints, per batch size, each arm's median milliseconds and its per-round speed-up over fp32 (fp32's time
over the arm's in the same round: median [min, max]).
"""

from __future__ import annotations

import argparse
import os

import torch

from benchmarks.alternating import speedup_cells
from benchmarks.cpu_unet import calibrate
from benchmarks.environment import environment
from benchmarks.held_weights_ab import alternating_times
from benchmarks.unet_speed_ab import quantized_layers


def unet_call(pipe, batch: int) -> dict:
    """The keyword inputs of the UNet's first call when the pipeline generates `batch` images."""
    captured = {}
    hook = pipe.unet.register_forward_pre_hook(lambda module, args, kwargs: captured.setdefault("call", (args, kwargs)),
                                               with_kwargs=True)
    try:
        pipe(["two red circles"] * batch, num_inference_steps=1, guidance_scale=0.0, height=64, width=64,
             output_type="latent")
    finally:
        hook.remove()
    args, kwargs = captured["call"]
    return {"sample": args[0], "timestep": args[1], **kwargs} if len(args) > 1 else {"sample": args[0], **kwargs}


def main(argv=None) -> int:
    from benchmarks.plans import mixed_4bit_plan
    from mixq.layers import quantizable_layers
    from mixq.proving.model import load_pipeline

    parser = argparse.ArgumentParser(prog="python -m benchmarks.proving_unet_ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 50])
    parser.add_argument("--rounds", type=int, default=9, help="calls per arm and batch size (alternating)")
    parser.add_argument("--general-path-arms", action="store_true",
                        help="also W8A8 and W4A8 with MIXQ_PREPARED_CALLS=0")
    args = parser.parse_args(argv)
    pipe = load_pipeline()
    unet = pipe.unet.eval()
    with torch.no_grad():
        calibration = calibrate(unet, unet_call(pipe, args.batches[0]))
    print(f"{environment('cpu')['device']}; torch {torch.__version__}; the proving UNet, fp32, NCHW", flush=True)
    originals = {n: unet.get_submodule(n) for n in quantizable_layers(unet)}
    arms = {"W8A8": quantized_layers(unet, originals, calibration, w_bit=8, a_bit=8),
            "W4A8": quantized_layers(unet, originals, calibration, w_bit=4, a_bit=8),
            "4-bit plan": quantized_layers(unet, originals, calibration, plan=mixed_4bit_plan(unet)["layers"])}
    arms = {"fp32": {n: originals[n] for n in arms["W8A8"]}, **arms}
    environments = {}
    if args.general_path_arms:
        for arm in ("W8A8", "W4A8"):
            arms[f"{arm}, general path"] = arms[arm]
            environments[f"{arm}, general path"] = {"MIXQ_PREPARED_CALLS": "0"}
    with torch.no_grad():
        for batch in args.batches:
            inputs = unet_call(pipe, batch)
            times = alternating_times(unet, arms, inputs, args.rounds, environments)
            print(f"batch {batch}, {args.rounds} alternating rounds: {speedup_cells(times, 'fp32', 'ms')}; "
                  f"load average {os.getloadavg()[0]:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
