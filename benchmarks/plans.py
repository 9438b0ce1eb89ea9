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


def benchmark_plan(unet, plan_path=None) -> tuple:
    """(the `plan=` argument for mixq.quantize, a one-line description of where it came from).

    A plan file is passed on as a path, so that mixq checks it against this UNet's architecture."""
    if plan_path is None:
        plan = derived_plan(unet)
        return plan, plan["source"]
    return str(plan_path), f"from {Path(plan_path).name}"
