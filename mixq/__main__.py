"""`python -m mixq`: the offline demo (no downloads). Loads the proving-ground pipeline shipped in
mixq (an SDXL-architecture pipeline trained on flat coloured shapes, 64x64 in 4 steps), quantizes it
W8A8 and W4A8 with the integer kernels, and reports, against floating point, the content accuracy on
held-out prompts (does the image show the shapes, colours, sizes and positions asked for), the
image PSNR and the size of the quantized layers.

`--model tiny-sdxl` / `tiny-sd15` use a tiny pipeline with random weights instead; their images show
nothing, so the demo then reports the SQNR of the output latents only."""

from __future__ import annotations

import argparse
import copy

import torch

TINY = {"tiny-sdxl": "sdxl", "tiny-sd15": "sd15"}


def quantized_state_line(pipe) -> str:
    import mixq

    rows = [r for r in mixq.summary(pipe) if r["w_bits"] < 16]
    state = sum(r["bytes"] for r in rows)
    return (f"{len(rows)} layers quantized, quantized-layer state {state / 2**10:.0f} KiB = "
            f"{state / (2 * sum(r['params'] for r in rows)):.2f}x their fp16 weights")


def proving_demo(args):
    import mixq
    from mixq.proving import evaluation_prompts, generate, load_pipeline, score_images
    from mixq.proving.model import SAMPLING

    pipe = load_pipeline()
    pairs = evaluation_prompts(args.eval_prompts)
    prompts, scenes = [text for _, text in pairs], [scene for scene, _ in pairs]
    calibration = mixq.calibrate_ranges(pipe, "proving:calibration", num_prompts=args.num_prompts, progress=False,
                                        **SAMPLING)
    print(f"proving-ground pipeline, {SAMPLING['num_inference_steps']} steps, calibrated on {args.num_prompts} "
          f"prompts; content accuracy on {len(prompts)} held-out prompts")
    reference = generate(pipe, prompts, seed=0)
    print(f"float: content {score_images(reference, scenes)['content']['overall']:.1%}", flush=True)
    for w_bit in (8, 4):
        quantized = mixq.quantize(copy.deepcopy(pipe), w_bit, 8, calibration=calibration)
        scores = score_images(generate(quantized, prompts, seed=0), scenes, reference)
        print(f"W{w_bit}A8: content {scores['content']['overall']:.1%}, image PSNR {scores['psnr']:.1f} dB, "
              f"{quantized_state_line(quantized)}", flush=True)
        if args.table and w_bit == 4:
            from mixq.api import format_summary

            print(f"\nW4A8 per-layer table:\n{format_summary(mixq.summary(quantized), quantized.unet.mixq_info)}")


def tiny_demo(args):
    import mixq
    from mixq.offline import tiny_pipeline

    pipe = tiny_pipeline(TINY[args.model])
    sampling = dict(num_inference_steps=1, guidance_scale=0.0)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = ["a photo of a cat on a windowsill", "a red bus on a bridge"]

    def generate(p):
        return p(prompts, latents=latents.clone(), output_type="latent", **sampling).images

    reference = generate(pipe)
    calibration = mixq.calibrate_ranges(pipe, num_prompts=args.num_prompts, progress=False, **sampling)
    print(f"{args.model} pipeline (random weights), 1 step, calibrated on {args.num_prompts} built-in prompts; "
          "latent SQNR: the pipeline's output latents against floating point, 2 prompts, fixed noise")
    for w_bit in (8, 4):
        quantized = mixq.quantize(copy.deepcopy(pipe), w_bit, 8, calibration=calibration)
        print(f"W{w_bit}A8: latent SQNR {mixq.sqnr_db(reference, generate(quantized)):.1f} dB, "
              f"{quantized_state_line(quantized)}", flush=True)
        if args.table and w_bit == 4:
            from mixq.api import format_summary

            print(f"\nW4A8 per-layer table:\n{format_summary(mixq.summary(quantized), quantized.unet.mixq_info)}")


def main(argv=None):
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m mixq", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["proving", *TINY], default="proving")
    parser.add_argument("--num-prompts", type=int, default=16, help="calibration prompts")
    parser.add_argument("--eval-prompts", type=int, default=100, help="held-out prompts checked (proving)")
    parser.add_argument("--table", action="store_true", help="print the per-layer table of the W4A8 pipeline")
    args = parser.parse_args(argv)
    (proving_demo if args.model == "proving" else tiny_demo)(args)


if __name__ == "__main__":
    main()
