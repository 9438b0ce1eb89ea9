"""The report's content check (config section `evaluation`, for proving-ground models): the mixed plan
against float and uniform quantization on what the images show, not only on their pixels.

Every configuration runs on the real integer layers and generates the same held-out evaluation
prompts (mixq.proving.evaluate) with the same seeds; the float pipeline's images are the reference
for PSNR/SSIM. The configurations:

- float; uniform W8A8; uniform W4A8 (keep-fp layers stay float in all of them);
- W2A8 on the content group only, the rest float: what low bits in the layers the content metric
  guards do to content;
- the mixed plan (plan.yaml); the same plan without BOS handling (the token-0 row of the text
  embedding quantized with the rest, its range included), MixDQ's first ablation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixq.api import build_quantized_layer
from mixq.calib.planner import average_bits, sizes_for
from mixq.calib.sensitivity import swapped_layers
from mixq.proving.content import Verdict
from mixq.quantizers import FLOAT_BITS

FLOAT = (FLOAT_BITS, FLOAT_BITS)
PLAN_NAME = "mixed plan"
UNIFORM_W4_NAME = "uniform W4A8"
GRID_COLUMNS = ("float", "uniform W8A8", UNIFORM_W4_NAME, PLAN_NAME)
W2_CONTENT_NAME = "W2A8 content group only"
PLAN_INDEPENDENT = ("float", "uniform W8A8", UNIFORM_W4_NAME, W2_CONTENT_NAME)  # the same at every budget


@dataclass(frozen=True)
class Configuration:
    name: str
    bits: dict  # layer name -> (w_bits, a_bits); layers not named stay float
    bos_aware: bool = True


def configurations(quantizable: list[str], groups: dict[str, str], plan: dict) -> list[Configuration]:
    """The report's configurations over the quantizable layers (keep-fp layers excluded)."""
    def uniform(w, a, members=quantizable):
        return {n: (w, a) for n in members}

    plan_bits = {n: (int(plan[n]["w_bits"]), int(plan[n]["a_bits"])) for n in quantizable}
    content = [n for n in quantizable if groups[n] == "content"]
    return [Configuration("float", {}), Configuration("uniform W8A8", uniform(8, 8)),
            Configuration(UNIFORM_W4_NAME, uniform(4, 8)), Configuration(W2_CONTENT_NAME, uniform(2, 8, content)),
            Configuration(PLAN_NAME, plan_bits), Configuration(PLAN_NAME + " without BOS handling", plan_bits, False)]


def average_bits_of(configuration: Configuration, table: dict) -> tuple[float, float]:
    """Size-weighted average weight and activation bits over the table's layers (float counts 16)."""
    bits = {n: configuration.bits.get(n, FLOAT) for n in table}
    return (average_bits({n: b[0] for n, b in bits.items()}, sizes_for("weight", table)),
            average_bits({n: b[1] for n, b in bits.items()}, sizes_for("activation", table)))


def content_comparison(pipe, layers: dict, calibration, table: dict, plan: dict, count: int, seed: int,
                       sampling: dict, log=print, cache: ContentCache | None = None) -> tuple[list[dict], dict]:
    """One row per configuration (average bits, content accuracy, quality), and the images and
    verdicts of every configuration for the grid. With a `cache`, the configurations that do not
    depend on the plan are generated and scored once and reused while the cache's key holds."""
    from mixq.proving.evaluate import evaluation_prompts, generate, score_images, verdicts_for

    pairs = evaluation_prompts(count)
    prompts, scenes = [text for _, text in pairs], [scene for scene, _ in pairs]
    groups = {n: row["group"] for n, row in table.items()}
    cached = cache.load() if cache is not None else {}
    rows, images, verdicts = [], {}, {}
    for config in configurations(list(table), groups, plan):
        if config.name in cached:
            images[config.name], verdicts[config.name], row = cached[config.name]
        else:
            replacements = {n: build_quantized_layer(pipe.unet.get_submodule(n), layers[n], w, a, calibration,
                                                     bos_aware=config.bos_aware)
                            for n, (w, a) in config.bits.items() if (w, a) != FLOAT}
            with swapped_layers(pipe.unet, replacements):
                images[config.name] = generate(pipe, prompts, seed, sampling=sampling)
            verdicts[config.name] = verdicts_for(images[config.name], scenes)
            w_avg, a_avg = average_bits_of(config, table)
            row = {"name": config.name, "w_avg": w_avg, "a_avg": a_avg,
                   **score_images(images[config.name], scenes, images["float"], verdicts[config.name])}
        rows.append(row)
        reused = " (reused)" if config.name in cached else ""
        log(f"report: content check {config.name}: {row['content']['overall']:.1%} of {count} prompts right{reused}")
    if cache is not None and not set(PLAN_INDEPENDENT) <= set(cached):
        by_name = {row["name"]: row for row in rows}
        cache.save({name: (images[name], verdicts[name], by_name[name]) for name in PLAN_INDEPENDENT})
    return rows, {"prompts": prompts, "images": images, "verdicts": verdicts}


class ContentCache:
    """The plan-independent configurations' images, verdicts and rows in a run folder, under a key of
    everything they depend on (model, ranges, layers and groups, prompts, seed, sampling, kernel
    backend, versions): a new budget then generates and scores only the plan. A cache under another
    key, or unreadable, is ignored and rewritten."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = Path(path), key

    def load(self) -> dict[str, tuple[np.ndarray, list, dict]]:
        """name -> (images, verdicts, row); empty when there is no valid cache for this key."""
        import json

        from safetensors import SafetensorError
        from safetensors.numpy import load_file, safe_open

        if not self.path.is_file():
            return {}
        try:
            with safe_open(str(self.path), framework="numpy") as f:
                metadata = f.metadata() or {}
            if metadata.get("key") != self.key:
                return {}
            rows, arrays = json.loads(metadata["rows"]), load_file(str(self.path))
            return {name: (arrays[f"images/{name}"], [Verdict(*map(bool, v)) for v in arrays[f"verdicts/{name}"]],
                           rows[name])
                    for name in PLAN_INDEPENDENT}
        except (OSError, SafetensorError, ValueError, KeyError, TypeError):
            return {}

    def save(self, entries: dict[str, tuple[np.ndarray, list, dict]]):
        import json
        from dataclasses import astuple

        from safetensors.numpy import save_file

        from mixq.io import atomic_path, storage_errors

        arrays = {}
        for name, (images, verdicts, _) in entries.items():
            arrays[f"images/{name}"] = np.ascontiguousarray(images)
            arrays[f"verdicts/{name}"] = np.array([astuple(v) for v in verdicts], dtype=np.uint8)
        rows = json.dumps({name: row for name, (_, _, row) in entries.items()})
        with atomic_path(self.path) as tmp, storage_errors(self.path):
            save_file(arrays, str(tmp), metadata={"key": self.key, "rows": rows})


def plan_against_uniform(rows: list[dict]) -> str:
    """The sentence the report states, whichever way it comes out."""
    by_name = {r["name"]: r for r in rows}
    plan, uniform = by_name[PLAN_NAME], by_name[UNIFORM_W4_NAME]
    a, b = plan["content"]["overall"], uniform["content"]["overall"]
    verb = "keeps more content than" if a > b else "keeps as much content as" if a == b else "keeps LESS content than"
    return (f"The mixed plan ({plan['w_avg']:.2f} avg weight bits) {verb} uniform W4A8 "
            f"({uniform['w_avg']:.2f} bits): {a:.1%} vs {b:.1%} of the evaluation prompts right.")
