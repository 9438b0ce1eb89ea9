"""`python -m mixq`: the offline demo. Builds a tiny SDXL-architecture pipeline with random
weights (no downloads), quantizes it W8A8 and W4A8 with the integer kernels, and reports the
fidelity against floating point and the size of the quantized layers.

The fidelity here is the SQNR of the pipeline's output latents (two prompts, fixed noise), a
different metric from the UNet-output SQNR the README and calibration reports quote."""

from __future__ import annotations

import argparse
import copy

import torch

METRIC_NOTE = ("latent SQNR: the pipeline's output latents against floating point, 2 prompts, fixed noise "
               "(README and calibration reports quote UNet-output SQNR, a different metric)")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mixq", description=__doc__)
    parser.add_argument("--arch", choices=["sdxl", "sd15"], default="sdxl")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--table", action="store_true", help="print the per-layer table of the W4A8 pipeline")
    args = parser.parse_args(argv)

    import mixq
    from mixq.api import format_summary
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
    print(METRIC_NOTE)
    tables = {}
    for w_bit in (8, 4):
        quantized = mixq.quantize(copy.deepcopy(pipe), w_bit, 8, calibration=calibration)
        rows = mixq.summary(quantized)
        tables[w_bit] = rows, getattr(quantized.unet, "mixq_info", None)
        q_rows = [r for r in rows if r["w_bits"] < 16]
        fp16_bytes = 2 * sum(r["params"] for r in q_rows)
        state = sum(r["bytes"] for r in q_rows)
        sqnr = mixq.sqnr_db(reference, generate(quantized))
        print(f"W{w_bit}A8: {len(q_rows)}/{len(rows)} layers quantized, latent SQNR {sqnr:.1f} dB, "
              f"quantized-layer state {state / 2**10:.0f} KiB = {state / fp16_bytes:.2f}x their fp16 weights",
              flush=True)
    if args.table:
        rows, info = tables[4]
        print(f"\nW4A8 per-layer table ({len(rows)} layers):")
        print(format_summary(rows, info))


if __name__ == "__main__":
    main()
