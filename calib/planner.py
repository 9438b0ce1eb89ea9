"""The plan builder: weights and activations allocated separately, per group, the budget split
between groups by a ratio k (content average = k * quality average); every k of the sweep gives a
candidate, and the candidate whose simulated images are closest to the float images wins (MixDQ's
selection rule)."""

from __future__ import annotations

import math

from mixq.calib.allocate import InfeasibleBudgetError, average_bits, build_plans, group_budgets
from mixq.calib.sensitivity import Evaluator, simulated_layers, swapped_layers
from mixq.errors import BudgetError
from mixq.quantizers import FLOAT_BITS

SIDES = {"weight": "w_bits", "activation": "a_bits"}


def sizes_for(side: str, table: dict) -> dict[str, float]:
    """Parameter counts for weights, activation element counts for activations."""
    key = "params" if side == "weight" else "act_numel"
    return {n: float(row[key]) for n, row in table.items()}


def scores_for(side: str, table: dict) -> dict[str, dict[int, float]]:
    return {n: {int(b): float(s) for b, s in row[side].items()} for n, row in table.items()}


def group_averages(bits: dict[str, int], sizes: dict[str, float], groups: dict[str, str]) -> dict[str, float]:
    result = {}
    for group in ("content", "quality"):
        members = {n: b for n, b in bits.items() if groups[n] == group}
        if members:
            result[group] = average_bits(members, sizes)
    result["all"] = average_bits(bits, sizes)
    return result


def smallest_average(candidate_bits: dict[str, list[int]], sizes: dict[str, float]) -> float:
    """The size-weighted average when every layer takes its smallest candidate: no plan goes lower."""
    total = sum(sizes[n] for n in candidate_bits)
    return sum(sizes[n] * min(bits) for n, bits in candidate_bits.items()) / total


def check_budget_feasible(side: str, target: float, candidate_bits: dict[str, list[int]], sizes: dict[str, float]):
    """Refuse (before any work) a budget below what the smallest candidates already average."""
    floor = smallest_average(candidate_bits, sizes)
    if target < floor - 1e-9:
        flag = "--w-bits" if side == "weight" else "--a-bits"
        raise BudgetError(f"{flag} {target:g} is infeasible: with every layer at its smallest candidate bit-width the "
                          f"{side}s already average {floor:.4f} bits; give at least {math.ceil(floor * 100) / 100:.2f}, "
                          "or allow lower bit-widths in the config's bits section")


def skip_reason(side: str, table: dict, target: float, ratio: float) -> str:
    """Why the split k=`ratio` gives no plan: which group's share is below its smallest average."""
    sizes, scores = sizes_for(side, table), scores_for(side, table)
    members = {g: [n for n, row in table.items() if row["group"] == g] for g in ("content", "quality")}
    group_size = {g: sum(sizes[n] for n in names) for g, names in members.items()}
    shares = dict(zip(("content", "quality"), group_budgets(target, ratio, group_size["content"], group_size["quality"])))
    for group, share in shares.items():
        floor = smallest_average({n: list(scores[n]) for n in members[group]}, sizes)
        if share < floor - 1e-9:
            return f"{group} share {share:.2f} bits is below its smallest candidate average {floor:.2f}"
    return "the rounded plan exceeds the budget"


def sweep_side(side: str, table: dict, target: float, ratios, evaluator: Evaluator, pipe, layers, calibration,
               log=print) -> tuple[dict[str, int], list[dict]]:
    """Candidates for one side (the other side in floating point), scored by image MSE. The sweep
    lists every ratio: skipped ones with the reason, and a joint allocation over both groups when
    every ratio was skipped."""
    sizes, groups = sizes_for(side, table), {n: row["group"] for n, row in table.items()}
    try:
        candidates = build_plans(scores_for(side, table), sizes, groups, target, ratios)
    except InfeasibleBudgetError as err:
        raise BudgetError(f"{side} budget: {err}") from None
    sweep = []
    for ratio in [float(r) for r in ratios] + [r for r in candidates if math.isnan(r)]:
        if ratio not in candidates:
            reason = skip_reason(side, table, target, ratio)
            sweep.append({"ratio": ratio, "skipped": reason})
            log(f"  {side} k={ratio:g}: skipped, {reason}")
            continue
        plan = candidates[ratio]
        bits = {n: (b, FLOAT_BITS) if side == "weight" else (FLOAT_BITS, b) for n, b in plan.items()}
        with swapped_layers(pipe.unet, simulated_layers(pipe.unet, layers, bits, calibration)):
            mse = evaluator.image_mse()
        averages = group_averages(plan, sizes, groups)
        joint = math.isnan(ratio)
        sweep.append({"ratio": None if joint else ratio, "image_mse": mse, "plan": plan,
                      **({"joint": "every ratio was skipped: one allocation over both groups"} if joint else {}),
                      **{f"avg_{g}": round(v, 4) for g, v in averages.items()}})
        label = "joint (no split)" if joint else f"k={ratio:g}"
        log(f"  {side} {label}: avg {averages['all']:.3f} bits "
            f"(content {averages.get('content', float('nan')):.3f}, quality {averages.get('quality', float('nan')):.3f}), "
            f"image MSE {mse:.3e}")
    best = min((e for e in sweep if "plan" in e), key=lambda entry: entry["image_mse"])
    best["chosen"] = True
    return best["plan"], sweep


def build_plan(table: dict, budget, evaluator: Evaluator, pipe, layers, calibration, keep_fp, log=print):
    """(plan layers {name: {w_bits, a_bits}}, sweep records) for the budget."""
    log(f"allocating weights: target {budget.w_bits:g} bits")
    weights, weight_sweep = sweep_side("weight", table, budget.w_bits, budget.ratios, evaluator, pipe, layers,
                                       calibration, log)
    log(f"allocating activations: target {budget.a_bits:g} bits")
    activations, act_sweep = sweep_side("activation", table, budget.a_bits, budget.ratios, evaluator, pipe, layers,
                                        calibration, log)
    plan = {name: {"w_bits": int(weights[name]), "a_bits": int(activations[name])} for name in table}
    for name in keep_fp:
        plan[name] = {"w_bits": FLOAT_BITS, "a_bits": FLOAT_BITS}
    return plan, {"weight": weight_sweep, "activation": act_sweep}
