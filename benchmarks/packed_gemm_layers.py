"""One layer at a time: the fused packed 4-bit GEMM against the same layer unpacked per call, 8-bit weights
on oneDNN and on the fused GEMM, and bf16, on SDXL-Turbo's layer shapes (batch 1, 64x64 latents or --latents 32), arms alternating in one
process.

    python -m benchmarks.packed_gemm_layers [--rounds 7] [--latents 32]

Each row: the median milliseconds per call of each arm over `rounds` alternating rounds (after one
warm-up call each), and the per-round ratios unpacked / fused and oneDNN / fused (median [min, max]). Random weights and
activations: the kernels' speed does not depend on the values. Outputs of the two 4-bit arms are checked
equal first.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import torch
import torch.nn.functional as F

from benchmarks.alternating import alternate, environment_set, ratio_cell
from benchmarks.environment import environment

# (what, kind, rows or spatial size, input channels, output channels): SDXL-Turbo at 64x64 latents
SHAPES = [
    ("attention projection 1280", "linear", 256, 1280, 1280),
    ("feed-forward 1280 -> 10240", "linear", 256, 1280, 10240),
    ("attention projection 640", "linear", 1024, 640, 640),
    ("conv 3x3 1280", "conv", 16, 1280, 1280),
    ("conv 3x3 640", "conv", 32, 640, 640),
    ("conv 3x3 320", "conv", 64, 320, 320),
]


def shapes_at(latents: int) -> list[tuple]:
    """SHAPES at `latents` x `latents` latents (64 or a power-of-two fraction), named with their size: a
    linear layer's rows scale with the area, a convolution's input side with the side."""
    factor = 64 // latents
    scaled = []
    for what, kind, size, c, n in SHAPES:
        size = size // factor ** 2 if kind == "linear" else size // factor
        name = f"{what}, {size} rows" if kind == "linear" else f"{what}, {size}x{size}"
        scaled.append((name, kind, size, c, n))
    return scaled


def layer_arms(kind: str, size: int, c: int, n: int) -> tuple[dict, torch.Tensor]:
    from mixq.kernels import onednn
    from mixq.quantizers import pack_weight

    g = torch.Generator().manual_seed(0)
    k = c if kind == "linear" else 9 * c
    shape = (size, c) if kind == "linear" else (1, c, size, size)
    x = torch.randn(shape, generator=g).bfloat16()
    if kind == "conv":
        x = x.contiguous(memory_format=torch.channels_last)
    q8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    q4 = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    w_scale, x_scale, x_zero, bias = torch.rand(n, generator=g) / 100, torch.tensor(0.05), torch.tensor(3.0), torch.randn(n)
    float_weight = torch.randn((n, c) if kind == "linear" else (n, c, 3, 3), generator=g).bfloat16()
    w_sums = {8: q8.sum(1, dtype=torch.int32), 4: q4.sum(1, dtype=torch.int32)}  # (held by the layers)
    if kind == "linear":
        w8 = onednn.linear_layout(q8, 8, k)[0]
        run = lambda w, bits: onednn.linear_impl(x, w, bits, w_scale, w_sums[bits], x_scale, x_zero, 8, bias,  # noqa: E731
                                                  torch.bfloat16)
        bf16 = lambda: F.linear(x, float_weight)  # noqa: E731
    else:
        float_weight = float_weight.contiguous(memory_format=torch.channels_last)
        geometry = ((3, 3), (1, 1), (1, 1))
        w8 = onednn.conv_layout(q8, w_scale, c, *geometry, 8)[0]
        run = lambda w, bits: onednn.conv2d_impl(x, w, bits, w_scale, w_sums[bits], x_scale, x_zero, 8, bias,  # noqa: E731
                                                  *geometry, torch.bfloat16)
        bf16 = lambda: F.conv2d(x, float_weight, padding=1)  # noqa: E731
    packed = pack_weight(q4, 4)
    arms = {"bf16": (bf16, contextlib.nullcontext), "W8 oneDNN": (lambda: run(w8, 8), contextlib.nullcontext),
            "W8 fused": (lambda: run(q8, 8), lambda: environment_set({"MIXQ_INT8_GEMM": "mixq"})),
            "W4 fused": (lambda: run(packed, 4), lambda: environment_set({"MIXQ_PACKED_GEMM": "1"})),
            "W4 unpacked per call": (lambda: run(packed, 4), lambda: environment_set({"MIXQ_PACKED_GEMM": "0"}))}
    return arms, x


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.packed_gemm_layers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--shapes", type=int, default=len(SHAPES), help="the first N shapes only (smoke runs)")
    parser.add_argument("--latents", type=int, default=64, choices=(64, 32, 16),
                        help="the layers' shapes at this latent size (default 64: 512x512 images)")
    args = parser.parse_args(argv)
    print(f"{environment('cpu')['device']}; torch {torch.__version__}; ms per call, median of {args.rounds} "
          "alternating rounds", flush=True)
    print("| layer | bf16 | W8 oneDNN | W8 fused | W4 fused | W4 unpacked per call | unpacked / fused per round "
          "| W8 oneDNN / fused per round |")
    print("|---|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for name, kind, size, c, n in shapes_at(args.latents)[:args.shapes]:
            arms, _ = layer_arms(kind, size, c, n)
            fused, unpacked = (arms[a][0] for a in ("W4 fused", "W4 unpacked per call"))
            with environment_set({"MIXQ_PACKED_GEMM": "0"}):
                expected = unpacked()
            if not torch.equal(fused(), expected):
                raise SystemExit(f"{name}: the fused and unpacked 4-bit outputs differ")
            times = alternate(arms, args.rounds)
            cells = " | ".join(f"{statistics.median(t) * 1e3:.2f}" for t in times.values())
            print(f"| {name} | {cells} | {ratio_cell(times['W4 unpacked per call'], times['W4 fused'])} "
                  f"| {ratio_cell(times['W8 oneDNN'], times['W8 fused'])} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
