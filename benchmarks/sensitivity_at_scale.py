"""Sensitivity on the full-size SDXL-Turbo UNet architecture (random weights): the noise floor in the
serving dtype and in the measurement dtype, the candidate ordering on a seeded random sample of
layers, and the measured time per layer.

    python benchmarks/sensitivity_at_scale.py --unet-config path/to/sdxl-turbo/unet/config.json \
        --size 256 --sample 40 --serving-sample 6 --out ordering-256.json
    python benchmarks/sensitivity_at_scale.py --unet-config ... --size 512 --sample 4 --flops --batch-timing 8 \
        --out timing-512.json

The pipeline around the UNet is small (two 2-layer CLIP text encoders of the real widths, a narrow
VAE with SDXL's 8x downsampling): the UNet is what sensitivity spends its time on, and a content
layer's time adds a VAE decode (the real SDXL VAE's decode is timed separately with --vae-config).
Needs ~16 GB of memory (the UNet is built in float32, then cast). Results go to --out as JSON,
rewritten after every layer.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch


def full_size_pipeline(unet_config, dtype, seed: int = 0):
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    from mixq.offline import (byte_level_clip_tokenizer, default_scheduler, load_unet_config, tiny_text_encoder,
                              unet_from_config)

    tokenizer = byte_level_clip_tokenizer()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16, 16, 16],
                        layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=8).eval()
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        # SDXL's context is cat(CLIP-L 768, OpenCLIP-bigG 1280) = 2048; the pooled projection is 1280.
        text_encoder=tiny_text_encoder(len(tokenizer), False, seed + 2, width=768),
        text_encoder_2=tiny_text_encoder(len(tokenizer), True, seed + 3, width=1280),
        tokenizer=tokenizer, tokenizer_2=tokenizer,
        unet=unet_from_config(load_unet_config(unet_config), seed=seed),
        scheduler=default_scheduler(), force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype)


def ordering(row: dict, side: str) -> bool:
    """More bits, better score: strictly increasing over the candidates measured."""
    scores = [row[side][b] for b in sorted(row[side])]
    return all(a < b for a, b in zip(scores, scores[1:]))


def summarize(rows: dict, floor: dict | None) -> dict:
    """Ordering counts over all rows; for the quality group (SQNR in dB), the W8 - W4 gaps and how far
    W8 sits below the noise floor."""
    quality = [r for r in rows.values() if r.get("group") == "quality" and {4, 8} <= set(map(int, r["weight"]))]
    gaps = [weight_score(r, 8) - weight_score(r, 4) for r in quality]
    summary = {
        "rows": len(rows),
        "weight_ordered": sum(ordering(r, "weight") for r in rows.values()),
        "activation_ordered": sum(ordering(r, "activation") for r in rows.values()),
        "quality_rows": len(quality),
        "quality_w8_w4_gap_db_min": min(gaps, default=None),
        "quality_w8_w4_gap_db_median": sorted(gaps)[len(gaps) // 2] if gaps else None,
        "quality_w8_w4_gap_at_least_3db": sum(g >= 3 for g in gaps),
    }
    if floor and quality:
        summary["quality_w8_below_floor_db_min"] = min(floor["sqnr_db"] - weight_score(r, 8) for r in quality)
    return summary


def weight_score(row: dict, bits: int) -> float:
    return {int(b): v for b, v in row["weight"].items()}[bits]


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def main(argv=None):
    from mixq.api import calibrate_ranges
    from mixq.calib.collect import collect_reference, run_unet
    from mixq.calib.prompts import load_prompts
    from mixq.calib.sensitivity import (Evaluator, evaluator_at_current_precision, measure_layer,
                                        measure_noise_floor, measurement_precision, noise_floor_probes)
    from mixq.layers import quantizable_layers

    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet-config", required=True)
    parser.add_argument("--dtype", default="bfloat16", help="serving dtype of the pipeline")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--prompts", type=int, default=1, help="sensitivity prompts")
    parser.add_argument("--range-prompts", type=int, default=2, help="prompts for activation ranges")
    parser.add_argument("--sample", type=int, default=20, help="random layers measured in the measurement dtype")
    parser.add_argument("--layers", default=None, help="comma-separated layer names instead of a random sample")
    parser.add_argument("--serving-sample", type=int, default=0, help="of those, how many also in the serving dtype")
    parser.add_argument("--weight-bits", default="2,4,8")
    parser.add_argument("--quality-weight-bits", default=None, help="default: --weight-bits")
    parser.add_argument("--activation-bits", default="4,8")
    parser.add_argument("--flops", action="store_true", help="count one UNet call's FLOPs (batch 1)")
    parser.add_argument("--batch-timing", type=int, default=0, help="time one fp32 UNet call at this batch")
    parser.add_argument("--vae-config", default=None, help="time one decode of this VAE config at --size (fp32)")
    parser.add_argument("--skip-floor", action="store_true", help="no noise floor in the measurement dtype")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    result = {"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads()}
    out = Path(args.out)

    def save():
        out.write_text(json.dumps(result, indent=1))

    def bits(text):
        return [int(b) for b in text.split(",")]

    weight_bits = bits(args.weight_bits)
    quality_bits = bits(args.quality_weight_bits) if args.quality_weight_bits else weight_bits
    dtype = getattr(torch, args.dtype)
    pipe, result["build_s"] = timed(lambda: full_size_pipeline(args.unet_config, dtype, args.seed))
    unet = pipe.unet
    layers = quantizable_layers(unet)
    kwargs = {"num_inference_steps": 1, "guidance_scale": 0.0, "height": args.size, "width": args.size}
    prompts = load_prompts(None, max(args.range_prompts, args.prompts))
    calibration, result["ranges_s"] = timed(lambda: calibrate_ranges(
        pipe, prompts[:args.range_prompts], batch_size=8, seed=42, progress=False, layers=layers, **kwargs))
    reference, result["reference_s"] = timed(lambda: collect_reference(pipe, prompts[:args.prompts], 42, kwargs, 8))
    serving = Evaluator(pipe, reference, 42, kwargs, 8)
    result["unet_params"] = sum(p.numel() for p in unet.parameters())
    result["layers"] = len(layers)
    names = list(layers)
    sample = sorted(random.Random(args.seed).sample(names, min(args.sample, len(names))), key=names.index)
    if args.layers:
        sample = args.layers.split(",")
    probes = noise_floor_probes(names)

    def candidates(name):
        return {"weight": quality_bits if layers[name].group == "quality" else weight_bits,
                "activation": bits(args.activation_bits)}

    if args.serving_sample:
        result["serving_floor"], result["serving_floor_s"] = timed(lambda: measure_noise_floor(serving, unet, probes))
        save()
        print(f"{args.dtype} floor {result['serving_floor']} ({result['serving_floor_s']:.1f} s)", flush=True)
        result["serving_rows"] = {}
        for name in sample[:args.serving_sample]:
            row, seconds = timed(lambda: measure_layer(serving, unet, layers[name], calibration, candidates(name)))
            result["serving_rows"][name] = {**row, "seconds": seconds}
            save()
            print(f"{args.dtype} {name}: {row['weight']} {row['activation']} ({seconds:.1f} s)", flush=True)

    with measurement_precision(pipe) as measurement_dtype:
        result["measurement_dtype"] = str(measurement_dtype)
        precise, result["rereference_s"] = timed(lambda: evaluator_at_current_precision(serving))
        if args.flops:
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            with counter:
                run_unet(unet, precise.calls[0])
            result["unet_flops_batch1"] = counter.get_total_flops() / len(prompts[:args.prompts])
            save()
        if args.batch_timing:
            args_, kw, _ = precise.calls[0]
            repeat = lambda t: t.expand(args.batch_timing, *t.shape[1:]).contiguous() if t.dim() else t  # noqa: E731
            from mixq.calib.collect import to_device

            def batched(value):
                if isinstance(value, torch.Tensor):
                    return repeat(value)
                if isinstance(value, dict):
                    return {k: batched(v) for k, v in value.items()}
                if isinstance(value, (list, tuple)):
                    return type(value)(batched(v) for v in value)
                return value

            call = (batched(to_device(args_, unet.device, unet.dtype)), batched(kw))
            _, result[f"unet_call_batch{args.batch_timing}_s"] = timed(lambda: run_unet(unet, call))
            _, result["unet_call_batch1_s"] = timed(lambda: run_unet(unet, precise.calls[0]))
            save()
        if not args.skip_floor:
            result["floor"], result["floor_s"] = timed(lambda: measure_noise_floor(precise, unet, probes))
            print(f"floor {result['floor']} ({result['floor_s']:.1f} s)", flush=True)
        result["rows"] = {}
        for name in sample:
            row, seconds = timed(lambda: measure_layer(precise, unet, layers[name], calibration, candidates(name)))
            result["rows"][name] = {**row, "seconds": seconds}
            save()
            print(f"{result['measurement_dtype']} {name}: {row['weight']} {row['activation']} ({seconds:.1f} s)",
                  flush=True)
    del pipe, unet, precise, serving

    if args.vae_config:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(args.vae_config)).eval()
        latent = torch.randn(1, 4, args.size // 8, args.size // 8)
        with torch.no_grad():
            _, result["real_vae_decode_fp32_s"] = timed(lambda: vae.decode(latent))
    result["summary"] = summarize(result["rows"], result.get("floor"))
    save()
    print(json.dumps(result["summary"]))


if __name__ == "__main__":
    main()
