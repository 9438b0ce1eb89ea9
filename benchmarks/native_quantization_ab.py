"""The native one-pass activation quantization against the torch ops it replaces, side by side in one
process, on the two CPU workloads it matters for:

    python -m benchmarks.native_quantization_ab --vae-config PATH/sdxl-base-1.0/vae/config.json

- the proving pipeline's UNet (shipped weights), W8A8 with ranges from 16 calibration prompts, one call on
  a batch of --batch 16x16 latents in float32, NCHW: many small layers, where per-call work counts
  (issue: the integer layers' fixed cost); the float UNet beside it;
- with --vae-config, an SDXL VAE decoder (random weights from the real config, bf16, channels-last),
  one decode of 64x64 latents (512x512 images), its convolutions W8A8 but for mixq's default float
  layers, ranges from one decode; the bf16 decoder beside it.

The two W8A8 arms are the same layers; only MIXQ_NATIVE differs (0: torch ops, and the layer's own
NaN/Inf reduction). Every 8-bit layer runs on oneDNN's kernels in both (MIXQ_INT8_GEMM=onednn: the fused
GEMM is part of the native library, so MIXQ_NATIVE=0 would otherwise change the kernel too). Their outputs are checked equal bit for bit first. Arms alternate within each of
--rounds rounds; printed: medians, and the per-round ratio torch ops / native (median [min, max]).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch
import torch.nn as nn

from benchmarks.alternating import alternate, environment_set
from benchmarks.environment import environment

ARMS = ("float", "W8A8 torch ops", "W8A8 native")


def native(on: bool):
    return environment_set({"MIXQ_NATIVE": "1" if on else "0"})


def alternate_native(arms: dict, rounds: int) -> dict:
    """arms: name -> (callable, native on?), alternating (benchmarks.alternating.alternate)."""
    return alternate({name: (run, lambda on=on: native(on)) for name, (run, on) in arms.items()}, rounds)


def summary(label: str, samples: dict) -> str:
    medians = {name: statistics.median(v) for name, v in samples.items()}
    ratios = [t / n for t, n in zip(samples["W8A8 torch ops"], samples["W8A8 native"])]
    float_name = next(n for n in samples if n not in ARMS[1:])
    return (f"{label}, {len(ratios)} alternating rounds: "
            + ", ".join(f"{name} median {medians[name] * 1e3:.1f} ms" for name in samples)
            + f"; torch ops / native per round {statistics.median(ratios):.2f}x [{min(ratios):.2f}, {max(ratios):.2f}]"
            + f"; {float_name} / native {medians[float_name] / medians['W8A8 native']:.2f}x"
            + f", {float_name} / torch ops {medians[float_name] / medians['W8A8 torch ops']:.2f}x")


def check_same(run_quantized) -> None:
    with native(False), torch.no_grad():
        expected = run_quantized()
    with native(True), torch.no_grad():
        got = run_quantized()
    assert torch.equal(got, expected), "the native pass changed the quantized outputs"


def proving_unet(batch: int, rounds: int, calibration_prompts: int) -> str:
    import mixq
    from benchmarks.compile_cpu import proving_unet_call
    from mixq.proving import load_pipeline

    pipe = load_pipeline()
    inputs = proving_unet_call(pipe, batch)
    quantized = copy.deepcopy(pipe)
    calibration = mixq.calibrate_ranges(quantized, "proving:calibration", calibration_prompts, progress=False)
    mixq.quantize(quantized, w_bit=8, a_bit=8, calibration=calibration, progress=False)
    check_same(lambda: quantized.unet(**inputs)[0])
    samples = alternate_native({"float32": (lambda: pipe.unet(**inputs), True),
                         "W8A8 torch ops": (lambda: quantized.unet(**inputs), False),
                         "W8A8 native": (lambda: quantized.unet(**inputs), True)}, rounds)
    return summary(f"proving UNet, a batch of {batch} 16x16 latents, float32 NCHW", samples)


def vae_decoder(config_path: Path, size: int, rounds: int) -> str:
    from diffusers import AutoencoderKL

    from mixq.components import DEFAULT_KEEP_FP
    from mixq.kernels import dispatch
    from mixq.layers import resolve_keep_fp, set_submodule
    from mixq.modules import QConv2d, is_supported_conv

    config = json.loads(config_path.read_text())
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config({**config, "force_upcast": False}).eval()
    vae = vae.to(torch.bfloat16).to(memory_format=torch.channels_last)
    latents = torch.randn(1, vae.config.latent_channels, size // 8, size // 8, dtype=torch.bfloat16)
    convs = {f"vae.decoder.{n}": m for n, m in vae.decoder.named_modules()
             if isinstance(m, nn.Conv2d) and is_supported_conv(m)}
    kept = resolve_keep_fp(None, list(convs), DEFAULT_KEEP_FP["vae"])
    convs = {n: m for n, m in convs.items() if n not in kept}
    ranges = {}

    def observe(name):
        def hook(module, args):
            ranges[name] = (float(args[0].min()), float(args[0].max()))
        return hook

    hooks = [m.register_forward_pre_hook(observe(n)) for n, m in convs.items()]
    with torch.no_grad():
        vae.decode(latents)
    for hook in hooks:
        hook.remove()
    quantized = {n: QConv2d.from_float(m, 8, 8, lows=(ranges[n][0],), highs=(ranges[n][1],)) for n, m in convs.items()}
    for layer in quantized.values():
        dispatch.prepare_layer(layer)

    def decode_with(layers):
        def run():
            for name, layer in layers.items():
                set_submodule(vae, name.removeprefix("vae."), layer)
            return vae.decode(latents).sample
        return run

    check_same(decode_with(quantized))
    samples = alternate_native({"bf16": (decode_with(convs), True), "W8A8 torch ops": (decode_with(quantized), False),
                         "W8A8 native": (decode_with(quantized), True)}, rounds)
    return summary(f"SDXL VAE decoder ({len(quantized)} of {len(quantized) + len(kept)} convolutions W8A8), "
                   f"{size}x{size} images, bf16 channels-last", samples)


def main(argv=None) -> int:
    with environment_set({"MIXQ_INT8_GEMM": "onednn"}):
        return native_quantization_ab(argv)


def native_quantization_ab(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.native_quantization_ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="proving UNet batch (16x16 latents)")
    parser.add_argument("--calibration-prompts", type=int, default=16)
    parser.add_argument("--vae-config", type=Path, default=None, help="an SDXL VAE config.json: adds the decoder")
    parser.add_argument("--size", type=int, default=512, help="VAE decoder image size")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    from mixq.kernels import native as native_helpers

    if native_helpers.unavailable_reason() is not None:
        parser.error(f"the native pass is unavailable here: {native_helpers.unavailable_reason()}")
    env = environment("cpu")
    print(f"machine: {env['device']}; load average {env['load_average_1min']}")
    print(proving_unet(args.batch, args.rounds, args.calibration_prompts), flush=True)
    if args.vae_config is not None:
        print(vae_decoder(args.vae_config, args.size, args.rounds), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
