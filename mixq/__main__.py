"""`python -m mixq`: the offline demo. Builds a tiny SDXL-architecture pipeline with random
weights (no downloads), quantizes it W8A8 and W4A8 with the integer kernels, and reports the UNet
fidelity against floating point and the size of the quantized layers."""

from __future__ import annotations

import argparse
import copy
import warnings

import torch


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mixq", description=__doc__)
    parser.add_argument("--arch", choices=["sdxl", "sd15"], default="sdxl")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--table", action="store_true", help="print the per-layer table")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)

    import mixq
    from mixq.offline import tiny_pipeline

    pipe = tiny_pipeline(args.arch)
    sampling = dict(num_inference_steps=args.steps, guidance_scale=0.0)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = ["a photo of a cat on a windowsill", "a red bus on a bridge"]

    def generate(p):
        return p(prompts, latents=latents.clone(), output_type="latent", **sampling).images

    reference = generate(pipe)
    calibration = mixq.calibrate_ranges(pipe, num_prompts=args.num_prompts, progress=False, **sampling)
    print(f"tiny {args.arch.upper()} pipeline, {args.steps} step(s), calibrated on {args.num_prompts} built-in prompts")
    for w_bit in (8, 4):
        quantized = mixq.quantize(copy.deepcopy(pipe), w_bit, 8, calibration=calibration)
        rows = mixq.summary(quantized, print_table=args.table and w_bit == 4)
        q_rows = [r for r in rows if r["w_bits"] < 16]
        fp16_bytes = 2 * sum(r["params"] for r in q_rows)
        state = sum(r["bytes"] for r in q_rows)
        sqnr = mixq.sqnr_db(reference, generate(quantized))
        print(f"W{w_bit}A8: {len(q_rows)}/{len(rows)} layers quantized, latent SQNR vs float {sqnr:.1f} dB, "
              f"quantized-layer state {state / 2**10:.0f} KiB = {state / fp16_bytes:.2f}x their fp16 weights")


if __name__ == "__main__":
    main()
