"""The calibration pipeline over one run folder: collect -> sensitivity -> allocate -> report.

Every stage reads and writes plain files in the folder, so any stage can be rerun alone (a new
budget on old sensitivities) and an interrupted run resumes: finished stages are reused, and the
sensitivity table continues from its last finished layer.

    config.yaml                     the resolved config the folder was made with
    activation_ranges.safetensors   per-layer activation ranges (+ BOS rows)
    reference.safetensors           float images and UNet calls for the sensitivity prompts
    sensitivity.yaml                layer -> group, metric, scores per bit (weights, activations)
    allocation.yaml                 the budget-split sweep
    plan.yaml                       layer -> {w_bits, a_bits}: mixq.quantize(pipe, plan=...)
    report.md, *.png                the report
"""

from __future__ import annotations

import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from mixq.api import RANGES_FILENAME, build_quantized_layer, calibrate_ranges
from mixq.calib.collect import REFERENCE_FILENAME, Reference, collect_reference
from mixq.calib.config import Config
from mixq.calib.distributed import current_world
from mixq.calib.pipeline import load_pipeline
from mixq.calib.planner import SIDES, build_plan, group_averages, sizes_for
from mixq.calib.prompts import load_prompts
from mixq.calib.report import plot_bits, plot_group_averages, plot_sensitivity, write_report
from mixq.calib.sensitivity import Evaluator, load_table, measure_sensitivity, swapped_layers
from mixq.calibration import Calibration
from mixq.io import read_yaml, write_yaml_atomic
from mixq.layers import quantizable_layers, resolve_keep_fp
from mixq.metrics import batch_psnr, batch_ssim
from mixq.plan import architecture_fingerprint
from mixq.quantizers import FLOAT_BITS

STAGES = ("collect", "sensitivity", "allocate", "report")
# Config sections a finished stage depends on; changing them needs a new run folder.
MEASUREMENT_SECTIONS = ("model", "sampling", "calibration", "keep_fp", "bits")


class RunFolder:
    def __init__(self, root):
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.ranges = self.root / RANGES_FILENAME
        self.reference = self.root / REFERENCE_FILENAME
        self.sensitivity = self.root / "sensitivity.yaml"
        self.allocation = self.root / "allocation.yaml"
        self.plan = self.root / "plan.yaml"
        self.report = self.root / "report.md"

    def require(self, path: Path, stage: str):
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run `python -m mixq.calibrate --stage {stage} --out {self.root}` "
                                    "first (or without --stage to run everything)")


def check_same_measurements(folder: RunFolder, config: Config):
    """A run folder holds measurements of one model and setting; refuse to mix in another."""
    if not folder.config.exists():
        return
    stored = read_yaml(folder.config) or {}
    current = config.to_dict()
    changed = [s for s in MEASUREMENT_SECTIONS if stored.get(s) != current.get(s)]
    if changed:
        raise ValueError(
            f"{folder.root} was calibrated with different {', '.join(changed)} settings; use a new --out folder "
            "(only the budget may change between runs of one folder)"
        )


def versions(device) -> dict:
    import diffusers

    import mixq

    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
            "mixq": mixq.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def run(config: Config, out, stages=STAGES, progress: bool = True, log=print, command: str | None = None) -> Path:
    folder = RunFolder(out)
    folder.root.mkdir(parents=True, exist_ok=True)
    check_same_measurements(folder, config)
    write_yaml_atomic(folder.config, config.to_dict())
    timings = {}

    pipe = load_pipeline(config.model)
    unet = pipe.unet
    all_layers = quantizable_layers(unet)
    keep = resolve_keep_fp(config.keep_fp, all_layers)
    layers = {n: info for n, info in all_layers.items() if n not in keep}
    pipeline_kwargs = config.pipeline_kwargs()
    cal = config.calibration
    log(f"{config.name}: {len(all_layers)} Linear/Conv2d layers, {len(layers)} quantizable ({len(keep)} kept in floating point)")

    started = time.monotonic()
    world = current_world()  # under torchrun: process 0 collects, all measure sensitivity, process 0 finishes
    if "collect" in stages and world.is_main:
        prompts = load_prompts(cal.prompts, cal.num_prompts)
        log(f"collect: activation ranges over {len(prompts)} prompts")
        calibration = calibrate_ranges(pipe, prompts, batch_size=cal.batch_size, seed=config.sampling.seed,
                                       progress=progress, layers=all_layers, **pipeline_kwargs)
        calibration.save(folder.ranges)
        sensitivity_prompts = prompts[:cal.sensitivity_prompts]
        log(f"collect: float reference for {len(sensitivity_prompts)} sensitivity prompts")
        collect_reference(pipe, sensitivity_prompts, config.sampling.seed, pipeline_kwargs, cal.batch_size).save(folder.reference)
        timings["collect"] = time.monotonic() - started
    world.barrier()

    folder.require(folder.ranges, "collect")
    folder.require(folder.reference, "collect")
    calibration = Calibration.load(folder.ranges)
    if calibration.meta.get("model") not in (None, architecture_fingerprint(unet)):
        raise ValueError(f"{folder.ranges} was calibrated on another model; use a new --out folder")
    evaluator = Evaluator(pipe, Reference.load(folder.reference), config.sampling.seed, pipeline_kwargs, cal.batch_size)

    if "sensitivity" in stages:
        started = time.monotonic()
        measure_sensitivity(pipe, layers, calibration, evaluator, config.bits, folder.sensitivity, progress, log)
        timings["sensitivity"] = time.monotonic() - started
    if not world.is_main:
        return folder.root

    folder.require(folder.sensitivity, "sensitivity")
    table = load_table(folder.sensitivity)
    unfinished = [n for n in layers if n not in table]
    if unfinished:
        raise RuntimeError(f"{folder.sensitivity} misses {len(unfinished)} layers: rerun `--stage sensitivity` to finish it")
    table = {n: table[n] for n in layers}  # module order

    if "allocate" in stages:
        started = time.monotonic()
        plan, sweeps = build_plan(table, config.budget, evaluator, pipe, layers, calibration, sorted(keep), log)
        plan = {n: plan[n] for n in all_layers}  # module order
        write_yaml_atomic(folder.allocation, {"budget": config.to_dict()["budget"], "sweeps": sweeps})
        write_yaml_atomic(folder.plan, {"model": architecture_fingerprint(unet), "budget": config.to_dict()["budget"],
                                        "layers": plan})
        timings["allocate"] = time.monotonic() - started
        log(f"allocate: wrote {folder.plan}")

    if "report" in stages:
        started = time.monotonic()
        folder.require(folder.plan, "allocate")
        plan_file = read_yaml(folder.plan)
        sweeps = (read_yaml(folder.allocation) or {}).get("sweeps", {})
        comparison = compare_with_uniform(evaluator, pipe, all_layers, keep, plan_file["layers"], table, calibration,
                                          config, log)
        averages = plan_averages(plan_file["layers"], table)
        plots = {"sensitivity": "sensitivity.png", "bits": "bits.png", "groups": "group_bits.png"}
        plot_sensitivity(table, folder.root / plots["sensitivity"])
        plot_bits(plan_file["layers"], table, folder.root / plots["bits"])
        plot_group_averages(averages, {"weight": config.budget.w_bits, "activation": config.budget.a_bits},
                            folder.root / plots["groups"])
        timings["report"] = time.monotonic() - started
        write_report(folder.report, config=config, command=command or "python -m mixq.calibrate", averages=averages,
                     sweeps=sweeps, comparison=comparison, table=table, timings=timings,
                     versions=versions(unet.device), plots=plots)
        log(f"report: wrote {folder.report}")
    return folder.root


def plan_averages(plan: dict, table: dict) -> dict:
    groups = {n: row["group"] for n, row in table.items()}
    result = {}
    for side, key in SIDES.items():
        bits = {n: plan[n][key] for n in table}
        result[side] = group_averages(bits, sizes_for(side, table), groups)
    return result


def evaluate_real(evaluator: Evaluator, pipe, layers, bits: dict, calibration) -> dict:
    """Fidelity of the pipeline with `bits` on the real integer path (the float UNet restored after)."""
    replacements = {
        name: build_quantized_layer(pipe.unet.get_submodule(name), layers[name], w, a, calibration)
        for name, (w, a) in bits.items() if (w, a) != (FLOAT_BITS, FLOAT_BITS)
    }
    with swapped_layers(pipe.unet, replacements):
        sqnr = evaluator.unet_sqnr()
        images = evaluator.images()
    reference = evaluator.reference.images
    return {"unet_sqnr": sqnr, "image_psnr": batch_psnr(reference, images), "image_ssim": batch_ssim(reference, images)}


def compare_with_uniform(evaluator, pipe, layers, keep, plan: dict, table: dict, calibration, config, log) -> list[dict]:
    """The plan against uniform weight bits at the budget (same activation bits as the plan)."""
    sizes_w = sizes_for("weight", table)
    total = sum(sizes_w.values())
    plan_bits = {n: (plan[n]["w_bits"], plan[n]["a_bits"]) for n in layers}
    w_avg = sum(sizes_w[n] * plan[n]["w_bits"] for n in table) / total
    a_plan = {n: plan[n]["a_bits"] for n in table}
    sizes_a = sizes_for("activation", table)
    a_avg = sum(sizes_a[n] * a_plan[n] for n in table) / sum(sizes_a.values())
    rows = [{"name": "mixed plan (plan.yaml)", "w_avg": w_avg, "a_avg": a_avg,
             **evaluate_real(evaluator, pipe, layers, plan_bits, calibration)}]
    target = config.budget.w_bits
    uniform_bits = sorted({b for b in (int(target), int(-(-target // 1))) if b in (2, 4, 8)})
    for w in uniform_bits:
        bits = {n: (FLOAT_BITS, FLOAT_BITS) if n in keep else (w, a_plan[n]) for n in layers}
        rows.append({"name": f"uniform W{w} (same activations)", "w_avg": float(w), "a_avg": a_avg,
                     **evaluate_real(evaluator, pipe, layers, bits, calibration)})
    plan_row = rows[0]
    for row in rows[1:]:
        if abs(row["w_avg"] - plan_row["w_avg"]) < 0.5 or row["w_avg"] >= plan_row["w_avg"]:
            better = plan_row["unet_sqnr"] > row["unet_sqnr"]
            row["verdict"] = (f"The mixed plan ({plan_row['w_avg']:.2f} avg weight bits) is "
                              f"{'better' if better else 'NOT better'} than {row['name']} ({row['w_avg']:.2f} bits): "
                              f"UNet SQNR {plan_row['unet_sqnr']:.2f} vs {row['unet_sqnr']:.2f} dB.")
            log(row["verdict"])
    return rows


def command_line(argv) -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, "-m", "mixq.calibrate", *argv])
