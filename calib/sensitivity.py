"""Metric-decoupled sensitivity: quantize one layer at a time (weights-only, then activations-only,
at each candidate bit-width) with fake-quant twins, the rest of the model in floating point.

- quality group: SQNR (dB) of the UNet output against the float output over the saved UNet calls;
- content group (attn2 / ff): SSIM of the generated image against the float image for the same
  prompt and seed.

The table is written atomically after every layer, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch

from mixq.api import build_quantized_layer
from mixq.calib.collect import Reference, run_unet
from mixq.calib.pipeline import generate
from mixq.calibration import Calibration
from mixq.errors import CalibrationFileError
from mixq.io import read_yaml, write_yaml_atomic
from mixq.layers import LayerInfo, set_submodule
from mixq.metrics import batch_ssim, sqnr_db
from mixq.quantizers import ACTIVATION_BITS, FLOAT_BITS, WEIGHT_BITS

SQNR_CAP_DB = 200.0  # a layer whose quantization changes nothing would score +inf
METRICS = {"quality": "sqnr_db", "content": "ssim"}


@contextmanager
def swapped_layers(unet, replacements: dict):
    """Temporarily put `replacements` (name -> module) into the UNet; the originals come back."""
    originals = {name: unet.get_submodule(name) for name in replacements}
    try:
        for name, module in replacements.items():
            set_submodule(unet, name, module)
        yield unet
    finally:
        for name, module in originals.items():
            set_submodule(unet, name, module)


def simulated_layers(unet, layers: dict[str, LayerInfo], bits: dict[str, tuple[int, int]],
                     calibration: Calibration) -> dict:
    """Fake-quant twins for every layer of `bits` that is not 16/16."""
    return {
        name: build_quantized_layer(unet.get_submodule(name), layers[name], w, a, calibration, simulate=True)
        for name, (w, a) in bits.items() if (w, a) != (FLOAT_BITS, FLOAT_BITS)
    }


class Evaluator:
    """Scores the pipeline's current state against the reference."""

    def __init__(self, pipe, reference: Reference, seed: int, pipeline_kwargs: dict, batch_size: int = 8):
        self.pipe, self.reference, self.seed = pipe, reference, seed
        self.pipeline_kwargs, self.batch_size = pipeline_kwargs, batch_size
        unet = pipe.unet
        self.calls = list(reference.calls_on(unet.device, unet.dtype))

    @torch.no_grad()
    def unet_sqnr(self) -> float:
        outputs, expected = [], []
        for call in self.calls:
            outputs.append(run_unet(self.pipe.unet, call).float().cpu())
            expected.append(call[2])
        return sqnr_db(torch.cat(expected), torch.cat(outputs))

    def images(self) -> torch.Tensor:
        return generate(self.pipe, self.reference.conditioning, self.seed, self.pipeline_kwargs, self.batch_size)

    def image_ssim(self) -> float:
        return batch_ssim(self.reference.images, self.images())

    def image_mse(self) -> float:
        return float((self.images() - self.reference.images).pow(2).mean())

    def score(self, group: str) -> float:
        if group == "content":
            return self.image_ssim()
        return min(self.unet_sqnr(), SQNR_CAP_DB)


def candidate_bits(group: str, weight_content, weight_quality, activation) -> dict[str, list[int]]:
    return {"weight": list(weight_content if group == "content" else weight_quality), "activation": list(activation)}


def measure_layer(evaluator: Evaluator, unet, info: LayerInfo, calibration: Calibration,
                  candidates: dict[str, list[int]]) -> dict:
    """One layer's row of the table: scores per bit, weights-only and activations-only."""
    row = {"group": info.group, "metric": METRICS[info.group], "params": info.params,
           "act_numel": calibration.ranges(info.name).numel, "weight": {}, "activation": {}}
    module = unet.get_submodule(info.name)
    for side, bit_list in candidates.items():
        for bits in bit_list:
            w, a = (bits, FLOAT_BITS) if side == "weight" else (FLOAT_BITS, bits)
            twin = build_quantized_layer(module, info, w, a, calibration, simulate=True)
            with swapped_layers(unet, {info.name: twin}):
                # Full precision: content-group SSIMs differ from 1 in the 5th-7th decimal.
                row[side][int(bits)] = float(evaluator.score(info.group))
    return row


def load_table(path) -> dict:
    if not path.exists():
        return {}
    return checked_table(read_yaml(path, error=CalibrationFileError), path)


TABLE_BITS = {"weight": WEIGHT_BITS, "activation": ACTIVATION_BITS}


def checked_table(data, path) -> dict:
    """The `layers` of a sensitivity file, every row checked (a hand-edited or truncated file would
    otherwise give a plan whose real average misses the budget, or fail deep inside allocation)."""
    if data is None:
        return {}
    layers = data.get("layers", {}) if isinstance(data, dict) else None
    if not isinstance(layers, dict):
        raise CalibrationFileError(f"{path}: expected a mapping with a 'layers' mapping of layer -> row; delete the "
                                   "file and rerun `--stage sensitivity`")
    for name, row in layers.items():
        problem = table_row_problem(row)
        if problem:
            raise CalibrationFileError(f"{path}: layers[{name!r}]: {problem}; fix the row, or delete it (or the file) "
                                       "and rerun `--stage sensitivity` to measure it again")
    return dict(layers)


def table_row_problem(row) -> str | None:
    """Why one sensitivity row is unusable, or None."""
    if not isinstance(row, dict):
        return f"the row is {type(row).__name__}, not a mapping"
    missing = [k for k in ("group", "params", "act_numel", "weight", "activation") if k not in row]
    if missing:
        return f"missing {', '.join(missing)}"
    if not isinstance(row["group"], str) or row["group"] not in METRICS:
        return f"group {row['group']!r} is not one of {sorted(METRICS)}"
    for key in ("params", "act_numel"):
        if not (isinstance(row[key], int) and not isinstance(row[key], bool) and row[key] > 0):
            return f"{key} {row[key]!r} is not a positive integer"
    for side, allowed in TABLE_BITS.items():
        scores = row[side]
        if not isinstance(scores, dict) or not scores:
            return f"{side} is not a non-empty mapping of bits -> score"
        for bits, score in scores.items():
            if isinstance(bits, bool) or bits not in allowed:
                return f"{side} bit-width {bits!r} is not one of {allowed}"
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                return f"{side} score at {bits} bits is {score!r}, not a finite number"
    return None


def measure_sensitivity(pipe, layers: dict[str, LayerInfo], calibration: Calibration, evaluator: Evaluator,
                        bits_config, table_path, progress: bool = True, log=print) -> dict:
    """Fills (or resumes) the sensitivity table at `table_path`; returns layer -> row."""
    from tqdm.auto import tqdm

    table = load_table(table_path)
    stale = sorted(set(table) - set(layers))
    if stale:
        raise ValueError(f"{table_path} holds layers this model does not have (e.g. {stale[:2]}): it belongs to "
                         "another model or keep-fp setting; use a new --out folder")
    todo = [name for name in layers if name not in table]
    if table:
        log(f"sensitivity: resuming, {len(table)} of {len(layers)} layers already measured")
    started = time.monotonic()
    for name in tqdm(todo, desc="sensitivity", unit="layer", disable=not progress):
        info = layers[name]
        candidates = candidate_bits(info.group, bits_config.weight_content, bits_config.weight_quality,
                                    bits_config.activation)
        table[name] = measure_layer(evaluator, pipe.unet, info, calibration, candidates)
        write_yaml_atomic(table_path, {"layers": table})
    if todo:
        log(f"sensitivity: measured {len(todo)} layers in {time.monotonic() - started:.1f} s")
    return table

