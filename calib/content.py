"""The report's content check (config section `evaluation`, for proving-ground models): the mixed plan
against float and uniform quantization on what the images show, not only on their pixels.

Every configuration runs on the real integer layers and generates the same held-out evaluation
prompts (mixq.proving.evaluate) with the same seeds; the float pipeline's images are the reference
for PSNR/SSIM. The configurations:

- float; uniform W8A8; uniform W4A8 (keep-fp layers stay float in all of them);
- W2A8 on the content group only, the rest float: what low bits in the layers the content metric
  guards do to content;
- the mixed plan (plan.yaml); the same plan without BOS handling (the token-0 row of the text
  embedding quantized with the rest, its range included), MixDQ's first ablation;
- same-budget baselines (mixq.calib.plans): the inverted sensitivity ranking and random allocations;
- with opt-in components (config `components`), uniform W8A8 and the plan with the VAE decoder, then
  also the text encoders, quantized W8A8 (average bits stay the UNet's).

Every configuration is compared with the plan on the same prompts (`paired_comparisons`): exact
McNemar on the per-prompt verdicts, a paired interval on per-image PSNR; the report claims better
or worse only at p < 0.01 (mixq.stats.SIGNIFICANCE).
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
from mixq.stats import SIGNIFICANCE, describe_p, mcnemar_exact, paired_difference, per_image_psnr, wilson_interval

FLOAT = (FLOAT_BITS, FLOAT_BITS)
PLAN_NAME = "mixed plan"
UNIFORM_W4_NAME = "uniform W4A8"
GRID_COLUMNS = ("float", "uniform W8A8", UNIFORM_W4_NAME, PLAN_NAME)
W2_CONTENT_NAME = "W2A8 content group only"
PLAN_INDEPENDENT = ("float", "uniform W8A8", UNIFORM_W4_NAME, W2_CONTENT_NAME)  # the same at every budget
NO_BOS_NAME = PLAN_NAME + " without BOS handling"
INVERTED_NAME = "inverted ranking (same budget)"
RANDOM_SEEDS = (0, 1, 2)
# The report adds the opt-in components in these steps, each on top of the ones before.
COMPONENT_STEPS = ((("vae",), "VAE decoder"), (("text_encoder", "text_encoder_2"), "text encoders"))


def content_cpu_weights() -> str:
    """How the content check holds 4/2-bit weights on x86 CPUs (mixq.quantize's cpu_weights): packed, as
    users serve them by default, where they run on the fused packed GEMM (the default report 1.17x faster
    than with int8 weights, benchmarks/results/cpu-packed-gemm-2026-12-07.md); else unpacked once to int8,
    the same integer sums, about 1.3x faster than unpacking on every call
    (benchmarks/results/cpu-report-speed-2026-12-07.md)."""
    from mixq.kernels import native

    return "packed" if native.packed_gemm_unavailable_reason() is None else "int8"


def random_name(seed: int) -> str:
    return f"random allocation, seed {seed} (same budget)"


@dataclass(frozen=True)
class Configuration:
    name: str
    bits: dict  # layer name -> (w_bits, a_bits); layers not named stay float
    bos_aware: bool = True


def component_names(component_layers: list[str]) -> list[str]:
    """The names of the rows with opt-in components (see component_configurations)."""
    return [c.name for c in component_configurations(component_layers, {}, {})]


def component_configurations(component_layers: list[str], uniform_w8: dict, plan_bits: dict) -> list[Configuration]:
    """Uniform W8A8 and the plan, each with the components of COMPONENT_STEPS added cumulatively at W8A8."""
    from mixq.components import component_of

    rows, added, label = [], {}, ""
    for members, title in COMPONENT_STEPS:
        step = {n: (8, 8) for n in component_layers if component_of(n) in members}
        if not step:
            continue
        added, label = {**added, **step}, f"{label} + {title} W8A8"
        rows += [Configuration(f"uniform W8A8{label}", {**uniform_w8, **added}),
                 Configuration(f"{PLAN_NAME}{label}", {**plan_bits, **added})]
    return rows


def configurations(quantizable: list[str], groups: dict[str, str], plan: dict,
                   baselines: dict[str, dict] | None = None,
                   component_layers: list[str] = ()) -> list[Configuration]:
    """The report's configurations over the quantizable layers (keep-fp layers excluded);
    `baselines`: name -> {layer: {w_bits, a_bits}} of same-budget baselines, appended;
    `component_layers`: the W8A8 layers of opt-in components, for the rows that add them."""
    def uniform(w, a, members=quantizable):
        return {n: (w, a) for n in members}

    plan_bits = {n: (int(plan[n]["w_bits"]), int(plan[n]["a_bits"])) for n in quantizable}
    content = [n for n in quantizable if groups[n] == "content"]
    return [Configuration("float", {}), Configuration("uniform W8A8", uniform(8, 8)),
            Configuration(UNIFORM_W4_NAME, uniform(4, 8)), Configuration(W2_CONTENT_NAME, uniform(2, 8, content)),
            Configuration(PLAN_NAME, plan_bits), Configuration(NO_BOS_NAME, plan_bits, False),
            *[Configuration(name, {n: (int(b[n]["w_bits"]), int(b[n]["a_bits"])) for n in quantizable})
              for name, b in (baselines or {}).items()],
            *component_configurations(list(component_layers), uniform(8, 8), plan_bits)]


def average_bits_of(configuration: Configuration, table: dict) -> tuple[float, float]:
    """Size-weighted average weight and activation bits over the table's layers (float counts 16)."""
    bits = {n: configuration.bits.get(n, FLOAT) for n in table}
    return (average_bits({n: b[0] for n, b in bits.items()}, sizes_for("weight", table)),
            average_bits({n: b[1] for n, b in bits.items()}, sizes_for("activation", table)))


def generate_with(pipe, layers: dict, calibration, config: Configuration, prompts: list[str], seed: int,
                  sampling: dict, cpu_weights: str | None = None) -> np.ndarray:
    """The images of `prompts` with the configuration's layers quantized on the real integer path
    (the float UNet restored after); `cpu_weights` as in mixq.quantize, by default content_cpu_weights()."""
    from mixq.api import layers_components
    from mixq.components import ComponentTree
    from mixq.kernels import dispatch
    from mixq.proving.evaluate import generate

    tree = ComponentTree.of(pipe, layers_components(config.bits))
    replacements = {}
    for n, (w, a) in config.bits.items():
        if (w, a) != FLOAT:
            replacements[n] = build_quantized_layer(tree.get_submodule(n), layers[n], w, a, calibration,
                                                    bos_aware=config.bos_aware)
            dispatch.prepare_layer(replacements[n], cpu_weights or content_cpu_weights())
    with swapped_layers(tree, replacements):
        return generate(pipe, prompts, seed, sampling=sampling)


def content_comparison(pipe, layers: dict, calibration, table: dict, plan: dict, count: int, seed: int,
                       sampling: dict, log=print, cache: ContentCache | None = None,
                       baselines: dict[str, dict] | None = None,
                       plan_cache: ContentCache | None = None, component_layers: list[str] = ()) -> tuple[list[dict], dict]:
    """One row per configuration (average bits, content accuracy, quality, statistics against the
    plan), and the images and verdicts of every configuration for the grid. Each cache holds the
    configurations it names, generated and scored once and reused while its key holds: `cache` the
    plan-independent ones, `plan_cache` those of one plan and its baselines."""
    from mixq.proving.evaluate import evaluation_prompts, score_images, verdicts_for

    pairs = evaluation_prompts(count)
    prompts, scenes = [text for _, text in pairs], [scene for scene, _ in pairs]
    groups = {n: row["group"] for n, row in table.items()}
    caches = [c for c in (cache, plan_cache) if c is not None]
    cached = {name: entry for c in caches for name, entry in c.load().items()}
    rows, images, verdicts = [], {}, {}
    for config in configurations(list(table), groups, plan, baselines, component_layers):
        if config.name in cached:
            images[config.name], verdicts[config.name], row = cached[config.name]
        else:
            images[config.name] = generate_with(pipe, layers, calibration, config, prompts, seed, sampling)
            verdicts[config.name] = verdicts_for(images[config.name], scenes)
            w_avg, a_avg = average_bits_of(config, table)
            row = {"name": config.name, "w_avg": w_avg, "a_avg": a_avg,
                   **score_images(images[config.name], scenes, images["float"], verdicts[config.name])}
        rows.append(row)
        reused = " (reused)" if config.name in cached else ""
        log(f"report: content check {config.name}: {row['content']['overall']:.1%} of {count} prompts right{reused}")
    by_name = {row["name"]: row for row in rows}
    for c in caches:
        if not set(c.names) <= set(cached):
            c.save({name: (images[name], verdicts[name], by_name[name]) for name in c.names})
    rows = [{**row, **content_statistics(verdicts[row["name"]])} for row in rows]
    paired_comparisons(rows, images, verdicts)
    component_comparisons(rows, images, verdicts)
    return rows, {"prompts": prompts, "images": images, "verdicts": verdicts}


def content_statistics(verdicts: list) -> dict:
    """n, prompts right, the 95 % Wilson interval, and the per-prompt verdicts as a 0/1 string."""
    correct = [v.correct for v in verdicts]
    low, high = wilson_interval(sum(correct), len(correct))
    return {"n": len(correct), "correct": int(sum(correct)), "interval": [round(low, 4), round(high, 4)],
            "per_prompt": "".join("1" if c else "0" for c in correct)}


def paired_comparisons(rows: list[dict], images: dict, verdicts: dict):
    """Adds `vs_plan` to every row but the plan's: the plan's content minus the row's, its exact
    McNemar p-value, and the plan's per-image PSNR (against float) minus the row's, with its interval."""
    plan_psnr = per_image_psnr(images["float"], images[PLAN_NAME])
    plan_correct = [v.correct for v in verdicts[PLAN_NAME]]
    plan_row = next(r for r in rows if r["name"] == PLAN_NAME)
    for row in rows:
        if row["name"] == PLAN_NAME:
            continue
        correct = [v.correct for v in verdicts[row["name"]]]
        row["vs_plan"] = {"content_difference": round(plan_row["content"]["overall"] - row["content"]["overall"], 4),
                          "mcnemar_p": mcnemar_exact(plan_correct, correct)}
        if row["name"] != "float" and len(correct) > 1:  # PSNR is measured against the float images
            psnr = paired_difference(plan_psnr, per_image_psnr(images["float"], images[row["name"]]))
            row["vs_plan"]["psnr_difference"] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in psnr.items()}


def unet_only_base(name: str) -> str | None:
    """The UNet-only configuration a row with opt-in components adds them to (None for other rows)."""
    for base in ("uniform W8A8", PLAN_NAME):
        if name.startswith(f"{base} + "):
            return base
    return None


def component_comparisons(rows: list[dict], images: dict, verdicts: dict):
    """Adds `vs_unet_only` to every row with opt-in components: its content minus that of the same UNet
    configuration alone, the exact McNemar p-value, and its per-image PSNR (against float) minus the
    UNet-only one's, with its interval."""
    for row in rows:
        base = unet_only_base(row["name"])
        if base is None:
            continue
        base_row = next(r for r in rows if r["name"] == base)
        correct, base_correct = ([v.correct for v in verdicts[n]] for n in (row["name"], base))
        row["vs_unet_only"] = {"base": base, "mcnemar_p": mcnemar_exact(correct, base_correct),
                               "content_difference": round(row["content"]["overall"] - base_row["content"]["overall"], 4)}
        if len(correct) > 1:
            psnr = paired_difference(per_image_psnr(images["float"], images[row["name"]]),
                                     per_image_psnr(images["float"], images[base]))
            row["vs_unet_only"]["psnr_difference"] = {k: (round(v, 3) if isinstance(v, float) else v)
                                                      for k, v in psnr.items()}


def component_sentence(row: dict) -> str:
    """What the report states about adding components to a UNet configuration (significance as above)."""
    vs = row["vs_unet_only"]
    p, n, difference = vs["mcnemar_p"], row["n"], vs["content_difference"]
    if p < SIGNIFICANCE:
        content = f"{'more' if difference > 0 else 'LESS'} content than {vs['base']} alone ({difference * 100:+.1f} points"
    else:
        content = f"no significant difference in content from {vs['base']} alone ({difference * 100:+.1f} points"
    d = vs.get("psnr_difference")
    if d is None:
        return f"{row['name']}: {content}, n = {n}, McNemar {describe_p(p)})."
    psnr = (f"per-image PSNR against float {'higher' if d['mean'] > 0 else 'LOWER'} by {abs(d['mean']):.2f} dB"
            if d["p"] < SIGNIFICANCE else "no significant difference in per-image PSNR")
    return (f"{row['name']}: {content}, n = {n}, McNemar {describe_p(p)}); {psnr} ({d['mean']:+.2f} dB, 95 % "
            f"interval [{d['low']:+.2f}, {d['high']:+.2f}]).")


def comparison_sentence(plan: dict, other: dict) -> str:
    """What the report states about the plan against one configuration: better or worse only when
    the paired test says so at SIGNIFICANCE, otherwise that there is no significant difference."""
    vs = other["vs_plan"]
    a, b, p, n = plan["content"]["overall"], other["content"]["overall"], vs["mcnemar_p"], plan["n"]
    bits = f"{other['name']} ({other['w_avg']:.2f} avg weight bits, {other['a_avg']:.2f} activation)"
    if p < SIGNIFICANCE:
        verb = "keeps more content than" if a > b else "keeps LESS content than"
        content = f"The mixed plan {verb} {bits}: {a:.1%} vs {b:.1%} (n = {n}, McNemar {describe_p(p)})"
    else:
        content = (f"The mixed plan and {bits}: no significant difference in content, {a:.1%} vs {b:.1%} "
                   f"(n = {n}, McNemar {describe_p(p)})")
    d = vs.get("psnr_difference")
    if d is None:
        return f"{content}."
    if d["p"] < SIGNIFICANCE:
        psnr = f"per-image PSNR {'higher' if d['mean'] > 0 else 'LOWER'} by {abs(d['mean']):.2f} dB"
    else:
        psnr = "no significant difference in per-image PSNR"
    return f"{content}; {psnr} (plan minus other {d['mean']:+.2f} dB, 95 % interval [{d['low']:+.2f}, {d['high']:+.2f}])."


class ContentCache:
    """Some configurations' images, verdicts and rows in a run folder, under a key of everything they
    depend on (model, ranges, layers and groups, prompts, seed, sampling, kernel backend, versions,
    and for the plan's own configurations the plan): a new budget then generates and scores only the
    plan and its baselines, and a report rerun on the same plan nothing. A cache under another key, or
    unreadable, is ignored and rewritten."""

    def __init__(self, path: Path, key: str, names=PLAN_INDEPENDENT):
        self.path, self.key, self.names = Path(path), key, tuple(names)

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
                    for name in self.names}
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


def comparison_sentences(rows: list[dict]) -> list[str]:
    """The plan against the uniform configuration at the nearest budget, the inverted ranking and
    each random allocation (those present), one sentence each."""
    by_name = {r["name"]: r for r in rows}
    plan = by_name[PLAN_NAME]
    uniform = min((by_name[n] for n in ("uniform W8A8", UNIFORM_W4_NAME)), key=lambda r: abs(r["w_avg"] - plan["w_avg"]))
    others = [uniform] + [r for r in rows if r["name"] == INVERTED_NAME or r["name"].startswith("random allocation")]
    return [comparison_sentence(plan, other) for other in others]
