"""The calibration pipeline over one run folder: collect -> sensitivity -> allocate -> report.

Every stage reads and writes plain files in the folder (see mixq.calib.runfolder for the layout and
the record that keeps it consistent), so any stage can be rerun alone (a new budget on old
sensitivities) and an interrupted run resumes: finished stages are reused, and the sensitivity
table continues from its last finished layer.

Order of work, so that bad input costs nothing: `preflight` checks the config, the budget, the
prompts, the model path and the folder's recorded inputs before the model loads; then the model
loads and its fingerprint and the exact budget floor are checked; only then is anything written.
Each stage is one function `<stage>_stage(session)`; `run` decides which of them run.
"""

from __future__ import annotations

import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from mixq.api import build_quantized_layer, calibrate_ranges
from mixq.calib.collect import Reference, collect_reference
from mixq.calib.config import BudgetConfig, Config, validate
from mixq.calib.distributed import current_world
from mixq.calib.frontier import SWEEP_FILENAME
from mixq.calib.pipeline import check_model_source, load_pipeline
from mixq.calib.planner import SIDES, build_plan, check_budget_feasible, plan_averages, rounded, sizes_for
from mixq.calib.prompts import fit_prompts_to_text_encoder, load_prompts
from mixq.calib.report import plot_bits, plot_group_averages, plot_sensitivity, write_report
from mixq.calib.runfolder import (MEASUREMENT_SECTIONS, RunFolder, digest, file_digest, measurement_inputs,
                                  model_fingerprint)
from mixq.calib.sensitivity import (Evaluator, candidate_bits, load_measurement, load_table, measure_sensitivity,
                                    noise_floor_line, read_table_file, swapped_layers)
from mixq.calibration import Calibration
from mixq.errors import BudgetError, CalibrationFileError, PromptFileError, RunFolderError
from mixq.io import read_yaml, require_utf8_path, write_yaml_atomic
from mixq.layers import quantizable_layers, resolve_keep_fp
from mixq.locks import folder_lock
from mixq.metrics import batch_psnr, batch_ssim
from mixq.plan import architecture_fingerprint
from mixq.quantizers import FLOAT_BITS
from mixq.threads import ThreadPolicy

STAGES = ("collect", "sensitivity", "allocate", "report")
EXTRA_STAGES = ("sweep",)  # run only when asked for (--stage sweep), on a finished run
DERIVED_STAGES = ("allocate", "report")  # cheap views of the measurements, kept in step with them

__all__ = ["STAGES", "MEASUREMENT_SECTIONS", "RunFolder", "RunState", "run", "preflight", "command_line"]


@dataclass
class RunState:
    """Where a run is, for the one line an interrupted run prints (see mixq.calibrate)."""

    folder: RunFolder | None = None
    stage: str | None = None  # None: before the first stage (checks, model loading)
    layers: int = 0

    def interrupted_line(self) -> str:
        if self.stage is None:
            return "interrupted before any stage started (nothing was written); rerun the same command to start"
        detail = ""
        if self.stage == "sensitivity" and self.folder is not None:
            measured = len(read_table_file(self.folder.sensitivity).get("layers") or {})
            detail = f" ({measured} of {self.layers} layers measured)"
        return f"interrupted during {self.stage}{detail}; rerun the same command to resume"


@dataclass
class Session:
    """What the stages share: the config, the folder, the loaded pipeline and its layers."""

    config: Config
    folder: RunFolder
    pipe: object
    prompts: list[str] | None
    progress: bool = True
    log: object = print
    command: str = "python -m mixq.calibrate"
    timings: dict = field(default_factory=dict)
    threads: ThreadPolicy | None = None  # None: leave torch's thread count alone (library callers)
    sweep: tuple[list[float], list[float]] | None = None  # --stage sweep: (weight budgets, activation budgets)

    @cached_property
    def all_layers(self) -> dict:
        return quantizable_layers(self.pipe.unet)

    @cached_property
    def keep(self) -> set[str]:
        return resolve_keep_fp(self.config.keep_fp, self.all_layers)

    @cached_property
    def component_layers(self) -> dict:
        """The W8A8 layers of the opt-in components (config `components`), under their qualified names
        and without each component's default keep-fp layers; they take no part in sensitivity or the plan."""
        from mixq.api import resolve_component_keep_fp
        from mixq.components import UNET, ComponentTree, component_of

        others = [c for c in self.config.components if c != UNET]
        if not others:
            return {}
        layers = {n: info for n, info in quantizable_layers(ComponentTree.of(self.pipe, (UNET, *others))).items()
                  if component_of(n) != UNET}
        kept = resolve_component_keep_fp(None, layers)  # each component's defaults
        return {n: info for n, info in layers.items() if n not in kept}

    @cached_property
    def layers(self) -> dict:
        return {n: info for n, info in self.all_layers.items() if n not in self.keep}

    @cached_property
    def calibration(self) -> Calibration:
        self.folder.require(self.folder.ranges, "collect")
        calibration = Calibration.load(self.folder.ranges)
        if calibration.meta.get("model") not in (None, architecture_fingerprint(self.pipe.unet)):
            raise CalibrationFileError(f"{self.folder.ranges} was calibrated on another model; use a new --out folder")
        return calibration

    @cached_property
    def evaluator(self) -> Evaluator:
        self.folder.require(self.folder.reference, "collect")
        return Evaluator(self.pipe, Reference.load(self.folder.reference), self.config.sampling.seed,
                         self.config.pipeline_kwargs(), self.config.calibration.batch_size)

    def table(self) -> dict:
        """The finished sensitivity table, in module order."""
        self.folder.require(self.folder.sensitivity, "sensitivity")
        table = load_table(self.folder.sensitivity)
        unfinished = [n for n in self.layers if n not in table]
        if unfinished:
            raise RunFolderError(f"{self.folder.sensitivity} misses {len(unfinished)} layers: rerun "
                                 f"`python -m mixq.calibrate --out {self.folder.root} --stage sensitivity` to finish it")
        return {n: table[n] for n in self.layers}


# --- before anything loads ----------------------------------------------------------------------


def prompts_for(config: Config) -> list[str]:
    """The calibration prompts, read now so that a missing or malformed file is reported before the
    model loads (minutes on a full-size model)."""
    cal = config.calibration
    try:
        return load_prompts(cal.prompts, cal.num_prompts)
    except PromptFileError:
        raise
    except (OSError, ValueError, TypeError) as err:  # the loader's plain errors (missing file, empty set)
        raise PromptFileError(f"--prompts / config field 'calibration.prompts': {err}") from None


def preflight(config: Config, folder: RunFolder, stages, sweep=None) -> list[str] | None:
    """Every check that needs no model, in the order a user would fix them. Returns the prompts when
    the collect stage will need them. Raises a MixqError; writes nothing."""
    validate(config)
    require_utf8_path(folder.root, RunFolderError)
    check_model_source(config.model)
    needs_prompts = "collect" in stages and (len(stages) == 1 or not folder.collected())
    prompts = prompts_for(config) if needs_prompts else None
    folder.check_inputs(measurement_inputs(config, prompts))
    first = min(STAGES.index(s) if s in STAGES else STAGES.index("allocate") for s in stages)
    for path, stage in ((folder.ranges, "collect"), (folder.reference, "collect"), (folder.sensitivity, "sensitivity"),
                        (folder.plan, "allocate")):
        if STAGES.index(stage) < first:
            folder.require(path, stage)
    if folder.sensitivity.exists():
        check_budget_against_table(config, load_table(folder.sensitivity))
        if sweep is not None:
            from mixq.calib.frontier import check_sweep_budgets

            check_sweep_budgets(*sweep, load_table(folder.sensitivity))
    return prompts


def check_budget_against_table(config: Config, table: dict):
    for side, key in SIDES.items():
        target = config.budget.w_bits if side == "weight" else config.budget.a_bits
        candidates = {n: [int(b) for b in row[side]] for n, row in table.items()}
        if candidates:
            check_budget_feasible(side, target, candidates, sizes_for(side, table))


def check_budget_against_layers(config: Config, layers: dict):
    """The weight budget's exact floor from the layer sizes (the table does not exist yet)."""
    bits = config.bits
    candidates = {n: candidate_bits(info.group, bits.weight_content, bits.weight_quality, bits.activation)["weight"]
                  for n, info in layers.items()}
    if candidates:
        check_budget_feasible("weight", config.budget.w_bits, candidates, {n: float(i.params) for n, i in layers.items()})


# --- the stages ---------------------------------------------------------------------------------


def collect_stage(s: Session):
    cal, folder = s.config.calibration, s.folder
    given = s.prompts if s.prompts is not None else prompts_for(s.config)  # recorded as given, below
    prompts = fit_prompts_to_text_encoder(s.pipe, given)
    s.log(f"collect: activation ranges over {len(prompts)} prompts")
    calibration = calibrate_ranges(s.pipe, prompts, batch_size=cal.batch_size, seed=s.config.sampling.seed,
                                   progress=s.progress, layers={**s.all_layers, **s.component_layers},
                                   **s.config.pipeline_kwargs())
    calibration.save(folder.ranges)
    sensitivity_prompts = prompts[:cal.sensitivity_prompts]
    s.log(f"collect: float reference for {len(sensitivity_prompts)} sensitivity prompts")
    collect_reference(s.pipe, sensitivity_prompts, s.config.sampling.seed, s.config.pipeline_kwargs(),
                      cal.batch_size).save(folder.reference)
    s.__dict__.pop("calibration", None)  # reload what was just written
    s.__dict__.pop("evaluator", None)
    record_measurement_inputs(s, given)


def sensitivity_stage(s: Session):
    measure_sensitivity(s.pipe, s.layers, s.calibration, s.evaluator, s.config.bits, s.folder.sensitivity,
                        s.progress, s.log, threads=s.threads, run=s.folder.inputs_key())


def compute_plan(s: Session, budget: dict) -> tuple[dict, dict]:
    """(plan.yaml's content, the split sweeps) at `budget` (the config's budget section, as a dict)."""
    table = s.table()
    plan, sweeps = build_plan(table, BudgetConfig(**budget), s.evaluator, s.pipe, s.layers, s.calibration,
                              sorted(s.keep), s.log)
    plan = {n: plan[n] for n in s.all_layers}  # module order
    return ({"model": architecture_fingerprint(s.pipe.unet), "budget": budget,
             "averages": rounded(plan_averages(plan, table)), "layers": plan}, sweeps)


def allocate_stage(s: Session):
    budget = s.config.to_dict()["budget"]
    plan, sweeps = compute_plan(s, budget)
    write_yaml_atomic(s.folder.allocation, {"budget": budget, "sweeps": sweeps})
    s.folder.write_plan(plan)
    s.folder.write_config(s.config.to_dict())
    s.log(f"allocate: wrote {s.folder.plan} (also {s.folder.history_path(budget).relative_to(s.folder.root)})")


def report_stage(s: Session):
    folder, table = s.folder, s.table()
    folder.require(folder.plan, "allocate")
    plan_file = read_yaml(folder.plan)
    plan, budget = plan_file["layers"], plan_file["budget"]
    sweeps = (read_yaml(folder.allocation) or {}).get("sweeps", {}) if folder.allocation.exists() else {}
    comparison = compare_with_uniform(s.evaluator, s.pipe, s.all_layers, s.keep, plan, table, s.calibration,
                                      float(budget["w_bits"]), s.log)
    averages = plan_averages(plan, table)
    plots = {"sensitivity": "sensitivity.png", "bits": "bits.png", "groups": "group_bits.png"}
    plot_sensitivity(table, folder.root / plots["sensitivity"])
    plot_bits(plan, table, folder.root / plots["bits"])
    plot_group_averages(averages, {"weight": budget["w_bits"], "activation": budget["a_bits"]},
                        folder.root / plots["groups"])
    content = content_stage(s, plan, budget, table, plots)
    sweep_file = folder.root / SWEEP_FILENAME
    write_report(folder.report, config=s.config, budget=budget, command=s.command, averages=averages, sweeps=sweeps,
                 comparison=comparison, table=table, timings=s.timings, versions=versions(s.pipe.unet.device),
                 plots=plots, noise_floor=noise_floor_line(load_measurement(folder.sensitivity)), content=content,
                 frontier=read_yaml(sweep_file) if sweep_file.exists() else None)
    s.log(f"report: wrote {folder.report}")


def content_stage(s: Session, plan: dict, budget: dict, table: dict, plots: dict) -> list[dict] | None:
    """The content check of the report (config section `evaluation`): rows for the table, content.yaml
    and the image grid; None when the config asks for none."""
    evaluation = s.config.evaluation
    if not evaluation.content_prompts:
        return None
    from mixq.calib.content import (GRID_COLUMNS, NO_BOS_NAME, PLAN_NAME, ContentCache, component_names,
                                    content_comparison)
    from mixq.proving.evaluate import save_grid

    key = content_cache_key(s, table)
    baselines = same_budget_baselines(s, table, budget)
    cache = ContentCache(s.folder.root / "content-cache.safetensors", key)
    allocation = file_digest(s.folder.allocation) if s.folder.allocation.exists() else ""
    plan_cache = ContentCache(s.folder.root / "content-plan-cache.safetensors",
                              digest(key, file_digest(s.folder.plan), allocation),
                              names=(PLAN_NAME, NO_BOS_NAME, *baselines, *component_names(list(s.component_layers))))
    rows, grid = content_comparison(s.pipe, {**s.all_layers, **s.component_layers}, s.calibration, table, plan,
                                    evaluation.content_prompts, s.config.sampling.seed, s.config.pipeline_kwargs(),
                                    s.log, cache=cache, baselines=baselines, plan_cache=plan_cache,
                                    component_layers=list(s.component_layers))
    write_yaml_atomic(s.folder.root / "content.yaml", {"prompts": evaluation.content_prompts, "rows": rows})
    shown = min(evaluation.grid_prompts, evaluation.content_prompts)
    if shown:
        plots["content_grid"] = "content_grid.png"
        save_grid(s.folder.root / plots["content_grid"], grid["prompts"][:shown],
                  {name: grid["images"][name][:shown] for name in GRID_COLUMNS},
                  {name: grid["verdicts"][name][:shown] for name in GRID_COLUMNS})
    return rows


def same_budget_baselines(s: Session, table: dict, budget: dict) -> dict[str, dict]:
    """The inverted ranking and random allocations at the plan's budget (and, for the inverted one,
    its split ratios), for the content comparison."""
    from mixq.calib.content import INVERTED_NAME, RANDOM_SEEDS, random_name
    from mixq.calib.plans import baseline_layers, chosen_ratios

    w_bits, a_bits = float(budget["w_bits"]), float(budget["a_bits"])
    sweeps = (read_yaml(s.folder.allocation) or {}).get("sweeps", {}) if s.folder.allocation.exists() else {}
    baselines = {INVERTED_NAME: baseline_layers(table, "inverted", w_bits, a_bits, ratios=chosen_ratios(sweeps),
                                                quality_score=s.config.budget.quality_score)}
    for seed in RANDOM_SEEDS:
        baselines[random_name(seed)] = baseline_layers(table, "random", w_bits, a_bits, seed)
    return baselines


def content_cache_key(s: Session, table: dict) -> str:
    """Everything the plan-independent content images depend on: a change to any of them regenerates."""
    from mixq.calib.content import content_cpu_weights
    from mixq.kernels.dispatch import selected_backend

    kernels = selected_backend(torch.zeros(1, device=s.pipe.unet.device)), content_cpu_weights()
    # The recorded inputs cover the model's fingerprint, the sampling, keep-fp and candidate settings and
    # the mixq version (run() has checked them against this pipeline); the table gives layers and groups.
    return digest("content-images", s.folder.inputs_key(), file_digest(s.folder.ranges),
                  [(n, row["group"]) for n, row in table.items()], s.config.evaluation.content_prompts, kernels,
                  torch.__version__)


STAGE_FUNCTIONS = {"collect": collect_stage, "sensitivity": sensitivity_stage, "allocate": allocate_stage,
                   "report": report_stage}


def record_measurement_inputs(s: Session, prompts):
    """After collect: the folder now holds measurements of these inputs (and the config that made them)."""
    s.folder.record_inputs(measurement_inputs(s.config, prompts, model_fingerprint(s.pipe.unet)))
    s.folder.write_config(s.config.to_dict())


def stage_digest(s: Session, stage: str) -> str | None:
    """What a derived stage's output depends on; None while its input files do not exist."""
    folder = s.folder
    if stage == "allocate":
        if not folder.sensitivity.exists():
            return None
        return digest("allocate", file_digest(folder.sensitivity), s.config.to_dict()["budget"])
    if stage == "report":
        if not (folder.plan.exists() and folder.sensitivity.exists()):
            return None
        allocation = file_digest(folder.allocation) if folder.allocation.exists() else ""
        sweep = folder.root / SWEEP_FILENAME
        return digest("report", file_digest(folder.plan), allocation, file_digest(folder.sensitivity),
                      s.config.to_dict()["evaluation"], file_digest(sweep) if sweep.exists() else "")
    return None


def stage_outputs(folder: RunFolder) -> dict:
    return {"allocate": folder.plan, "report": folder.report}


def should_run(s: Session, stage: str, requested, forced: bool) -> bool:
    """Requested stages run (a single --stage always does); with every stage requested, collect is
    skipped when its files exist (the recorded inputs match, preflight checked), and a derived stage
    when its inputs are unchanged. After any stage, derived stages whose inputs changed run too,
    so the plan and report never describe something else."""
    if stage in DERIVED_STAGES:
        current = stage_digest(s, stage)
        if current is None:
            return stage in requested and forced  # will fail with "run ... first"
        if stage in requested and forced:
            return True
        return not s.folder.stage_is_current(stage, current, stage_outputs(s.folder)[stage])
    if stage not in requested:
        return False
    if stage == "collect" and not forced and s.folder.collected():
        s.log("collect: skipped, activation ranges and reference already in the folder")
        return False
    if stage == "sensitivity" and not forced and set(s.layers) <= set(load_table(s.folder.sensitivity)):
        s.log(f"sensitivity: skipped, all {len(s.layers)} layers already measured")
        return False
    return True


def run(config: Config, out, stages=STAGES, progress: bool = True, log=print, command: str | None = None,
        threads: ThreadPolicy | None = None, state: RunState | None = None, sweep=None) -> Path:
    """Run the stages into the folder `out`. `threads` chooses torch's CPU threads at each stage (and
    during sensitivity, as the machine's load changes); `state` is kept up to date with the stage.
    `sweep`: (weight budgets, activation budgets) for the stage "sweep"."""
    folder = RunFolder(out)
    stages = tuple(stages)
    if "sweep" in stages and sweep is None:
        raise BudgetError("--stage sweep needs weight budgets: --w-bits 3.4,3.6,4")
    state = state if state is not None else RunState()
    state.folder = folder
    prompts = preflight(config, folder, stages, sweep)
    pipe = load_pipeline(config.model, progress)
    s = Session(config, folder, pipe, prompts, progress, log, command or "python -m mixq.calibrate", threads=threads,
                sweep=sweep)
    state.layers = len(s.layers)
    inputs = measurement_inputs(config, prompts, model_fingerprint(pipe.unet))
    folder.check_inputs(inputs)
    check_budget_against_layers(config, s.layers)
    log(f"{config.name}: {len(s.all_layers)} Linear/Conv2d layers, {len(s.layers)} quantizable "
        f"({len(s.keep)} kept in floating point)")
    world = current_world()
    if not world.is_main:  # process 0 holds the folder for all of them
        return run_stages(s, stages, state)
    folder.root.mkdir(parents=True, exist_ok=True)
    # One run at a time per folder: two runs (say, two re-budgets) would otherwise interleave their
    # plan, config and report. A second run waits, then checks the folder again as it now is.
    with folder_lock(folder.root, what="running", say=log):
        folder.check_inputs(inputs)
        return run_stages(s, stages, state)


def run_stages(s: Session, stages: tuple, state: RunState) -> Path:
    folder, pipe, config, threads = s.folder, s.pipe, s.config, s.threads
    forced = len(stages) == 1
    # Under torchrun: process 0 collects while the others wait, every process measures its share of
    # the sensitivity table, and process 0 alone allocates and reports.
    world = current_world()
    for stage in STAGES:
        runs_here = world.is_main or stage == "sensitivity"
        if runs_here and should_run(s, stage, stages, forced):
            state.stage = stage
            if threads is not None and pipe.device.type == "cpu":
                threads.choose()
            started = time.monotonic()
            STAGE_FUNCTIONS[stage](s)
            s.timings[stage] = time.monotonic() - started
            current = stage_digest(s, stage)
            if stage in DERIVED_STAGES and current is not None:
                folder.mark_stage(stage, current)
        if stage == "collect":
            world.barrier()
        if stage == "sensitivity" and not world.is_main:
            return folder.root
        if stage == "allocate" and "sweep" in stages:
            # The sweep follows the measurements; the report after it then shows the frontier.
            from mixq.calib.frontier import sweep_stage

            state.stage = "sweep"
            started = time.monotonic()
            sweep_stage(s, *s.sweep)
            s.timings["sweep"] = time.monotonic() - started
    if folder.measured() and not folder.config.exists():
        folder.write_config(config.to_dict())
    return folder.root


def versions(device) -> dict:
    import diffusers

    import mixq

    from mixq.machine import describe_cpu

    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {describe_cpu()}",
            "mixq": mixq.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def evaluate_real(evaluator: Evaluator, pipe, layers, bits: dict, calibration) -> dict:
    """Fidelity of the pipeline with `bits` on the real integer path (the float UNet restored after)."""
    replacements = {
        name: build_quantized_layer(pipe.unet.get_submodule(name), layers[name], w, a, calibration)
        for name, (w, a) in bits.items() if (w, a) != (FLOAT_BITS, FLOAT_BITS)
    }
    with swapped_layers(pipe.unet, replacements):
        outputs = evaluator.unet_outputs()  # one pass: the overall and the per-output SQNR both come from it
        images = evaluator.images()
    sqnr, per_output = evaluator.unet_sqnr(outputs), evaluator.sqnr_per_output(outputs)
    reference = evaluator.reference.images
    return {"unet_sqnr": sqnr, "image_psnr": batch_psnr(reference, images), "image_ssim": batch_ssim(reference, images),
            "sqnr_per_output": per_output}


def compare_with_uniform(evaluator, pipe, layers, keep, plan: dict, table: dict, calibration, target: float,
                         log) -> list[dict]:
    """The plan against uniform weight bits at the budget (same activation bits as the plan)."""
    averages = plan_averages(plan, table)
    w_avg, a_avg = averages["weight"]["all"], averages["activation"]["all"]
    plan_bits = {n: (plan[n]["w_bits"], plan[n]["a_bits"]) for n in layers}
    a_plan = {n: plan[n]["a_bits"] for n in table}
    rows = [{"name": "mixed plan (plan.yaml)", "w_avg": w_avg, "a_avg": a_avg,
             **evaluate_real(evaluator, pipe, layers, plan_bits, calibration)}]
    uniform_bits = sorted({b for b in (int(target), int(-(-target // 1))) if b in (2, 4, 8)})
    for w in uniform_bits:
        bits = {n: (FLOAT_BITS, FLOAT_BITS) if n in keep else (w, a_plan[n]) for n in layers}
        rows.append({"name": f"uniform W{w} (same activations)", "w_avg": float(w), "a_avg": a_avg,
                     **evaluate_real(evaluator, pipe, layers, bits, calibration)})
    plan_row = rows[0]
    for row in rows[1:]:
        if abs(row["w_avg"] - plan_row["w_avg"]) < 0.5 or row["w_avg"] >= plan_row["w_avg"]:
            row["verdict"] = sqnr_verdict(plan_row, row)
            log(row["verdict"])
    for row in rows:
        row.pop("sqnr_per_output")
    return rows


def sqnr_verdict(plan_row: dict, row: dict) -> str:
    """The plan against another configuration on UNet SQNR, paired over every prompt's output at
    every step; better or worse only when the paired difference is significant."""
    from mixq.stats import SIGNIFICANCE, describe_p, paired_difference

    plan = f"The mixed plan ({plan_row['w_avg']:.2f} avg weight bits)"
    other = f"{row['name']} ({row['w_avg']:.2f} bits)"
    if len(plan_row["sqnr_per_output"]) < 2:
        return (f"{plan} and {other}: UNet SQNR {plan_row['unet_sqnr']:.2f} vs {row['unet_sqnr']:.2f} dB over one "
                "output, too few for a paired test (raise calibration.sensitivity_prompts).")
    d = paired_difference(plan_row["sqnr_per_output"], row["sqnr_per_output"])
    said = (f"UNet SQNR {plan_row['unet_sqnr']:.2f} vs {row['unet_sqnr']:.2f} dB; per output, plan minus other "
            f"{d['mean']:+.2f} dB [{d['low']:+.2f}, {d['high']:+.2f}], n = {d['n']}, {describe_p(d['p'])}")
    if d["p"] >= SIGNIFICANCE:
        return f"{plan} and {other}: no significant difference in UNet SQNR ({said})."
    return f"{plan} is {'better' if d['mean'] > 0 else 'WORSE'} than {other} in UNet SQNR ({said})."


def command_line(argv) -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, "-m", "mixq.calibrate", *argv])
