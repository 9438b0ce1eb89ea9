"""The bit plan of the benchmarks' mixed-precision variant: one place, to be replaced by a real plan.

A real plan comes from `python -m mixq.calibrate` (runs/NAME/plan.yaml, passed with `--plan`). Without
one, the suite derives a plan deterministically from layer names alone, so that a benchmark needs no
calibration run, in the spirit of MixDQ's published SDXL-Turbo plans (about 5 weight bits on
average, 8-bit activations):

  quality group (convs, self-attention, projections, embeddings)  W8A8
  content group (cross-attention `attn2` and feed-forward `ff`)   W4A8

The content group holds most of the transformer weights, so this lands near MixDQ's W5A8
operating point in size; it is not tuned for quality.
"""

from __future__ import annotations

from pathlib import Path

from mixq.layers import DEFAULT_KEEP_FP, quantizable_layers
from mixq.quantizers import FLOAT_BITS

DERIVED_BITS = {"quality": (8, 8), "content": (4, 8)}


def derived_plan(unet) -> dict:
    """{"layers": {name: {w_bits, a_bits}}, "source": ...} for every quantizable layer of `unet`."""
    layers = {}
    for name, info in quantizable_layers(unet).items():
        # conv_in/conv_out stay in floating point (quantize's default keep_fp); say so in the plan.
        w_bits, a_bits = (FLOAT_BITS, FLOAT_BITS) if name in DEFAULT_KEEP_FP else DERIVED_BITS[info.group]
        layers[name] = {"w_bits": w_bits, "a_bits": a_bits}
    return {"source": "derived: quality group W8A8, content group (attn2, ff) W4A8", "layers": layers}


# The offline default's 4-bit plan (`python -m mixq.calibrate`, 3.99 average weight bits, all A8; the
# 2-core Xeon run of benchmarks/results/cpu-calibration-threads-2026-12-06.md): the share of each
# group's weights at each bit-width. Speed depends on how many bytes run at which width, not on which
# layer gets which, so a plan with these shares stands in for a calibrated one on a random-weight model.
DEFAULT_RUN_WEIGHT_SHARES = {"quality": {8: 0.102, 4: 0.898}, "content": {8: 0.078, 4: 0.306, 2: 0.616}}


def proportional_bits(params: dict[str, int], groups: dict[str, str], shares: dict) -> dict[str, int]:
    """Weight bits per layer so that each group's parameters split by `shares`: layers in the given order,
    each taking the bit-width whose slice of the group's cumulative parameters holds its midpoint."""
    bits = {}
    for group, split in shares.items():
        names = [n for n in params if groups[n] == group]
        total, done = sum(params[n] for n in names), 0
        bounds, edge = [], 0.0
        for width, share in split.items():
            edge += share
            bounds.append((edge, width))
        for name in names:
            middle = (done + params[name] / 2) / total
            bits[name] = next((w for edge, w in bounds if middle <= edge), bounds[-1][1])
            done += params[name]
    return bits


def mixed_4bit_plan(unet) -> dict:
    """The default run's 4-bit proportions on `unet` (A8 everywhere; conv_in/conv_out in floating point)."""
    layers = {n: info for n, info in quantizable_layers(unet).items() if n not in DEFAULT_KEEP_FP}
    bits = proportional_bits({n: i.params for n, i in layers.items()}, {n: i.group for n, i in layers.items()},
                             DEFAULT_RUN_WEIGHT_SHARES)
    plan = {n: {"w_bits": FLOAT_BITS, "a_bits": FLOAT_BITS} for n in quantizable_layers(unet) if n in DEFAULT_KEEP_FP}
    plan.update({n: {"w_bits": b, "a_bits": 8} for n, b in bits.items()})
    return {"source": "the offline default's 4-bit plan's weight shares per group", "layers": plan}


def benchmark_plan(unet, plan_path=None) -> tuple:
    """(the `plan=` argument for mixq.quantize, a one-line description of where it came from).

    A plan file is passed on as a path, so that mixq checks it against this UNet's architecture."""
    if plan_path is None:
        plan = derived_plan(unet)
        return plan, plan["source"]
    return str(plan_path), f"from {Path(plan_path).name}"
