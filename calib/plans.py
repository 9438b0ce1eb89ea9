"""Plans from a finished run folder, and the same-budget baselines a plan is judged against.

    from mixq.calib.plans import plan_at, random_plan, inverted_plan
    plan = plan_at("runs/proving", w_bits=3.7)               # the calibrated plan at another budget
    baseline = random_plan("runs/proving", w_bits=3.7, seed=0)
    pipe = mixq.quantize(pipe, plan=plan, calibration="runs/proving")

Every function returns a plan document shaped like plan.yaml (model fingerprint, budget, averages,
layers), which `mixq.quantize(plan=...)` and `save_quantized` accept. The baselines use the run's
candidate bit-widths per group and the same budget:

- random: each layer a random candidate of its own table, then moved one candidate at a time, in
  random order, until the size-weighted average is as close under the budget as single moves get;
- inverted: the planner's own allocation with each layer's scores mirrored within its group (for
  every bit-width, the most sensitive layer gets the least sensitive layer's score), at the same
  split ratio as the plan: what the ranking is worth, everything else equal.
"""

from __future__ import annotations

import random
from pathlib import Path

from mixq.calib.allocate import allocate_groups, average_bits
from mixq.calib.planner import allocation_scores, plan_averages, rounded, scores_for, sizes_for
from mixq.quantizers import FLOAT_BITS


def random_bits(candidates: dict[str, list[int]], sizes: dict[str, float], target: float, seed: int) -> dict[str, int]:
    """layer -> a random candidate, then adjusted to the largest average <= target that single
    random moves reach. Deterministic for a seed (Python's own generator, the same on every platform)."""
    rng = random.Random(seed)
    names = list(candidates)
    options = {n: sorted(candidates[n]) for n in names}
    bits = {n: rng.choice(options[n]) for n in names}
    total = sum(sizes[n] for n in names)
    used = sum(sizes[n] * bits[n] for n in names)
    while used > target * total + 1e-9:  # lower random layers until within the budget
        n = rng.choice([m for m in names if bits[m] > options[m][0]])
        lower = options[n][options[n].index(bits[n]) - 1]
        used -= sizes[n] * (bits[n] - lower)
        bits[n] = lower
    while True:  # then raise random layers while the budget allows
        room = target * total + 1e-9 - used
        raisable = [m for m in names if bits[m] < options[m][-1]
                    and sizes[m] * (options[m][options[m].index(bits[m]) + 1] - bits[m]) <= room]
        if not raisable:
            return bits
        n = rng.choice(raisable)
        higher = options[n][options[n].index(bits[n]) + 1]
        used += sizes[n] * (higher - bits[n])
        bits[n] = higher


def inverted_scores(scores: dict[str, dict[int, float]], groups: dict[str, str]) -> dict[str, dict[int, float]]:
    """Each bit-width's scores mirrored within each group: s -> max + min - s over the group's layers,
    so the ranking reverses while the range of scores stays the same."""
    inverted = {n: {} for n in scores}
    for group in set(groups.values()):
        members = [n for n in scores if groups[n] == group]
        for bits in {b for n in members for b in scores[n]}:
            values = [scores[n][bits] for n in members if bits in scores[n]]
            top, bottom = max(values), min(values)
            for n in members:
                if bits in scores[n]:
                    inverted[n][bits] = top + bottom - scores[n][bits]
    return inverted


def plan_document(layer_bits: dict[str, dict[str, int]], table: dict, keep_fp, model: str, budget: dict,
                  layer_order) -> dict:
    """A plan.yaml-shaped mapping: keep-fp layers at 16/16, layers in module order."""
    layers = {**layer_bits, **{n: {"w_bits": FLOAT_BITS, "a_bits": FLOAT_BITS} for n in keep_fp}}
    return {"model": model, "budget": budget, "averages": rounded(plan_averages(layer_bits, table)),
            "layers": {n: layers[n] for n in layer_order if n in layers}}


def baseline_layers(table: dict, kind: str, w_bits: float, a_bits: float, seed: int = 0,
                    ratios: dict[str, float] | None = None, quality_score: str = "db") -> dict[str, dict[str, int]]:
    """{layer: {w_bits, a_bits}} of a random (`kind="random"`) or inverted (`"inverted"`) allocation;
    the inverted one mirrors the scores the plan's integer program used (`quality_score`)."""
    groups = {n: row["group"] for n, row in table.items()}
    per_side = {}
    for side, target in (("weight", w_bits), ("activation", a_bits)):
        sizes, scores = sizes_for(side, table), scores_for(side, table)
        if kind == "random":
            # Each side its own stream: the weight draws do not depend on the activation candidates.
            per_side[side] = random_bits({n: list(s) for n, s in scores.items()}, sizes, target,
                                         seed * 2 + (side == "activation"))
        elif kind == "inverted":
            ratio = (ratios or {}).get(side, 1.0)
            objective = allocation_scores(side, table, quality_score)
            per_side[side] = allocate_groups(inverted_scores(objective, groups), sizes, groups, target, ratio)
        else:
            raise ValueError(f"unknown baseline {kind!r}: 'random' or 'inverted'")
        assert average_bits(per_side[side], sizes) <= target + 1e-6
    return {n: {"w_bits": int(per_side["weight"][n]), "a_bits": int(per_side["activation"][n])} for n in table}


def chosen_ratios(sweeps: dict) -> dict[str, float]:
    """The split ratio the plan chose per side, from allocation.yaml's sweeps (1.0 where unknown)."""
    chosen = {}
    for side, sweep in (sweeps or {}).items():
        for entry in sweep:
            if entry.get("chosen") and entry.get("ratio") is not None:
                chosen[side] = float(entry["ratio"])
    return chosen


# --- from a run folder --------------------------------------------------------------------------


def stored_config(folder):
    """The run's config, as the folder recorded it."""
    from mixq.calib.config import config_from_data
    from mixq.errors import RunFolderError

    folder.require(folder.config, "collect")
    data = folder.stored_config()
    if not data:
        raise RunFolderError(f"{folder.config} is empty: rerun `python -m mixq.calibrate --out {folder.root}`")
    return config_from_data(data)


def _session(run_folder, pipe=None, log=None):
    from mixq.calib.pipeline import load_pipeline
    from mixq.calib.run import RunFolder, Session

    folder = RunFolder(Path(run_folder))
    config = stored_config(folder)
    if pipe is None:
        pipe = load_pipeline(config.model, progress=False)
    return Session(config, folder, pipe, None, progress=False, log=log or (lambda *_: None))


def budget_of(config, w_bits, a_bits) -> dict:
    """The config's budget section with the given (not None) weight and activation budgets."""
    budget = dict(config.to_dict()["budget"])
    budget.update({k: float(v) for k, v in (("w_bits", w_bits), ("a_bits", a_bits)) if v is not None})
    return budget


def plan_at(run_folder, w_bits: float | None = None, a_bits: float | None = None, *, pipe=None, log=None) -> dict:
    """The calibrated plan at another budget, from a run folder's sensitivity table: the same split
    sweep and selection as `python -m mixq.calibrate --stage allocate`, without writing anything.
    `pipe`: the run's pipeline when already loaded (the selection generates a few images)."""
    from mixq.calib.run import compute_plan

    session = _session(run_folder, pipe, log)
    plan, _ = compute_plan(session, budget_of(session.config, w_bits, a_bits))
    return plan


def random_plan(run_folder, w_bits: float | None = None, a_bits: float | None = None, seed: int = 0) -> dict:
    """A random allocation at the budget (the run's budget where not given); no model is loaded."""
    return _baseline(run_folder, "random", w_bits, a_bits, seed)


def inverted_plan(run_folder, w_bits: float | None = None, a_bits: float | None = None) -> dict:
    """The planner fed the mirrored sensitivity ranking, at the plan's split ratios; no model is loaded."""
    return _baseline(run_folder, "inverted", w_bits, a_bits)


def _baseline(run_folder, kind: str, w_bits, a_bits, seed: int = 0) -> dict:
    from mixq.calib.runfolder import RunFolder
    from mixq.calib.sensitivity import load_table
    from mixq.errors import RunFolderError
    from mixq.io import read_yaml

    folder = RunFolder(Path(run_folder))
    config = stored_config(folder)
    folder.require(folder.sensitivity, "sensitivity")
    folder.require(folder.plan, "allocate")
    plan = read_yaml(folder.plan, error=RunFolderError)
    budget = budget_of(config, w_bits, a_bits)
    table = load_table(folder.sensitivity)
    sweeps = (read_yaml(folder.allocation) or {}).get("sweeps", {}) if folder.allocation.exists() else {}
    layers = baseline_layers(table, kind, budget["w_bits"], budget["a_bits"], seed, chosen_ratios(sweeps),
                             config.budget.quality_score)
    keep = [n for n, e in plan["layers"].items() if n not in table]
    return plan_document(layers, table, keep, plan["model"], {**budget, "baseline": kind, "seed": seed},
                         list(plan["layers"]))
