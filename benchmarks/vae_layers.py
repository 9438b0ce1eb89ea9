"""Which VAE decoder layers cost the most pixels at W8A8, on the proving ground: each decoder layer kept in
floating point in turn (UNet and the rest of the decoder W8A8), then the best one checked on more
held-out prompts with a paired test against quantizing it too.

    python -m benchmarks.vae_layers --prompts 200 --confirm 1000

The base keeps the decoder's structural defaults in float (conv_in, conv_out, mid-block attention)
and quantizes every other decoder layer, the up-block shortcuts included. Per-image PSNR against the
float pipeline's images, same prompts and seeds everywhere; the paired test runs on all --confirm
prompts and, separately, on those after the first --prompts (not used to pick the layer).
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np

SAMPLING = dict(num_inference_steps=4, guidance_scale=0.0, height=64, width=64)
SEED = 42


def main(argv=None) -> int:
    import mixq
    from benchmarks.environment import environment
    from mixq.components import DEFAULT_KEEP_FP, ComponentTree
    from mixq.layers import find_quantized_layers
    from mixq.proving.evaluate import evaluation_prompts, generate
    from mixq.proving.model import load_pipeline
    from mixq.stats import paired_difference, per_image_psnr

    parser = argparse.ArgumentParser(prog="python -m benchmarks.vae_layers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=200, help="held-out prompts for the per-layer search")
    parser.add_argument("--confirm", type=int, default=1000, help="held-out prompts for the paired check")
    parser.add_argument("--calibration-prompts", type=int, default=32)
    args = parser.parse_args(argv)
    if args.prompts < 2 or args.confirm < args.prompts + 2:
        parser.error("--prompts must be at least 2 and --confirm at least --prompts + 2 (the paired check also "
                     "runs on the prompts after the first --prompts)")
    start = time.perf_counter()
    print(f"{environment('cpu')['device']}; proving-ground pipeline, UNet W8A8 everywhere", flush=True)
    pipe = load_pipeline()
    calibration = mixq.calibrate_ranges(pipe, "proving:calibration", num_prompts=args.calibration_prompts,
                                        progress=False, components=("unet", "vae"), **SAMPLING)
    prompts = [text for _, text in evaluation_prompts(max(args.prompts, args.confirm))]
    float_images = generate(pipe, prompts, SEED, sampling=SAMPLING)
    base_keep = [p for p in DEFAULT_KEEP_FP["vae"] if "conv_shortcut" not in p]

    def psnr_with(count, components=("unet", "vae"), keep_fp=None):
        pipe_q = mixq.quantize(copy.deepcopy(pipe), 8, 8, components=components, calibration=calibration,
                               keep_fp=keep_fp, progress=False)
        images = generate(pipe_q, prompts[:count], SEED, sampling=SAMPLING)
        return per_image_psnr(float_images[:count], images), pipe_q

    unet_only, _ = psnr_with(args.prompts, components=("unet",))
    base, pipe_q = psnr_with(args.prompts, keep_fp=base_keep)
    decoder_layers = [n for n in find_quantized_layers(ComponentTree.of(pipe_q, ("unet", "vae"))) if n.startswith("vae.")]
    print(f"{args.prompts} prompts, mean per-image PSNR against float: UNet W8A8 alone {unet_only.mean():.2f} dB; "
          f"+ decoder W8A8 ({len(decoder_layers)} layers) {base.mean():.2f} dB", flush=True)
    gains = {}
    for name in decoder_layers:
        kept, _ = psnr_with(args.prompts, keep_fp=[*base_keep, name])
        gains[name] = float(kept.mean() - base.mean())
        print(f"  {name} in float: {gains[name]:+.2f} dB", flush=True)
    best = max(gains, key=gains.get)
    print(f"largest: {best} ({gains[best]:+.2f} dB; next {sorted(gains.values())[-2]:+.2f} dB)", flush=True)
    base, _ = psnr_with(args.confirm, keep_fp=base_keep)
    kept, _ = psnr_with(args.confirm, keep_fp=[*base_keep, best])
    unet_only, _ = psnr_with(args.confirm, components=("unet",))
    for label, rows in ((f"all {args.confirm}", slice(None)), (f"prompts {args.prompts}-{args.confirm - 1}",
                                                                 slice(args.prompts, None))):
        d = paired_difference(kept[rows], base[rows])
        print(f"{label}: {best} in float minus W8A8: {d['mean']:+.2f} dB [{d['low']:+.2f}, {d['high']:+.2f}], "
              f"n = {d['n']}, p = {d['p']:.2g}")
    cost = paired_difference(unet_only, base)
    print(f"decoder W8A8 cost against the UNet alone: {cost['mean']:.2f} dB with {best} quantized, "
          f"{np.mean(unet_only - kept):.2f} dB with it in float; {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
