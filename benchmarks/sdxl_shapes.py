"""The GEMM shapes of every Linear and Conv2d of an SDXL UNet at one resolution, from its config.

    python -m benchmarks.sdxl_shapes path/to/sdxl-turbo/unet/config.json > benchmarks/sdxl_turbo_shapes.csv

builds the UNet from the config on the meta device (no weights, no memory), runs one forward pass
at 512x512 (64x64 latents), batch 1 (SDXL-Turbo's guidance 0), 77 text tokens, and writes one row
per distinct layer shape with its count. M is the GEMM's rows (tokens, or output pixels); the
cross-attention to_k / to_v rows exclude the BOS token, which mixq computes once in floating point.
shared_input counts the layers of a row that read the very tensor the layer before them read
(self-attention's to_k and to_v, cross-attention's to_v): with equal activation parameters they
reuse its int8 codes instead of quantizing it again.
The static report (benchmarks/static_report.py) reads the CSV, so CI needs neither the config nor
diffusers' model code.
"""

from __future__ import annotations

import csv
import json
import sys
from collections import Counter

import torch
import torch.nn as nn

FIELDS = ("kind", "m", "k", "n", "kernel", "stride", "count", "shared_input", "example")


def layer_shapes(config: dict, latent: int = 64, tokens: int = 77) -> list[dict]:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    rows = []
    previous_input = [None]

    def record(name, module):
        def hook(_, inputs, output):
            x = inputs[0]
            shared = x is previous_input[0]
            previous_input[0] = x
            if isinstance(module, nn.Linear):
                m = x.numel() // x.shape[-1]
                if "attn2.to_k" in name or "attn2.to_v" in name:
                    m -= x.shape[0]  # the BOS row of each prompt
                rows.append(dict(kind="linear", m=m, k=module.in_features, n=module.out_features, kernel=1,
                                 stride=1, name=name, shared=shared))
            else:
                kh, kw = module.kernel_size
                kind = "linear" if (kh, kw) == (1, 1) and module.stride == (1, 1) else "conv"
                rows.append(dict(kind=kind, m=output.shape[0] * output.shape[2] * output.shape[3],
                                 k=module.in_channels * kh * kw, n=module.out_channels, kernel=kh,
                                 stride=module.stride[0], name=name, shared=shared))
        return hook

    for name, module in unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.register_forward_hook(record(name, module))
    sample = torch.empty(1, config["in_channels"], latent, latent, device="meta")
    text = torch.empty(1, tokens, config["cross_attention_dim"], device="meta")
    added = {"text_embeds": torch.empty(1, config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"], device="meta"),
             "time_ids": torch.empty(1, 6, device="meta")}
    with torch.no_grad():
        unet(sample, torch.tensor([999.0], device="meta"), text, added_cond_kwargs=added)
    return rows


def shape_table(rows: list[dict]) -> list[dict]:
    def shape(r):
        return r["kind"], r["m"], r["k"], r["n"], r["kernel"], r["stride"]

    counts = Counter(shape(r) for r in rows)
    shared = Counter(shape(r) for r in rows if r["shared"])
    examples = {}
    for r in rows:
        examples.setdefault(shape(r), r["name"])
    return [dict(zip(FIELDS, (*key, count, shared[key], examples[key]))) for key, count in sorted(counts.items())]


def main(argv: list[str]) -> int:
    config = json.loads(open(argv[0]).read())
    rows = layer_shapes(config)
    writer = csv.DictWriter(sys.stdout, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(shape_table(rows))
    print(f"# {len(rows)} layers", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
