"""The plan builder: weights and activations allocated separately, per group, the budget split
between groups by a ratio k (content average = k * quality average); every k of the sweep gives a
candidate, and the candidate whose simulated images are closest to the float images wins (MixDQ's
selection rule)."""

from __future__ import annotations

import math

from mixq.calib.allocate import average_bits, build_plans
from mixq.calib.sensitivity import Evaluator, simulated_layers, swapped_layers
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


def sweep_side(side: str, table: dict, target: float, ratios, evaluator: Evaluator, pipe, layers, calibration,
               log=print) -> tuple[dict[str, int], list[dict]]:
    """Candidates for one side (the other side in floating point), scored by image MSE."""
    sizes, groups = sizes_for(side, table), {n: row["group"] for n, row in table.items()}
    candidates = build_plans(scores_for(side, table), sizes, groups, target, ratios)
    skipped = [r for r in ratios if float(r) not in candidates]
    if skipped:
        log(f"  {side} k={', '.join(f'{r:g}' for r in skipped)}: skipped, a group's share of the budget is below "
            "its smallest candidate bit-width")
    sweep = []
    for ratio, plan in candidates.items():
        bits = {n: (b, FLOAT_BITS) if side == "weight" else (FLOAT_BITS, b) for n, b in plan.items()}
        with swapped_layers(pipe.unet, simulated_layers(pipe.unet, layers, bits, calibration)):
            mse = evaluator.image_mse()
        averages = group_averages(plan, sizes, groups)
        sweep.append({"ratio": None if math.isnan(ratio) else ratio, "image_mse": mse, "plan": plan,
                      **{f"avg_{g}": round(v, 4) for g, v in averages.items()}})
        log(f"  {side} k={ratio:g}: avg {averages['all']:.3f} bits "
            f"(content {averages.get('content', float('nan')):.3f}, quality {averages.get('quality', float('nan')):.3f}), "
            f"image MSE {mse:.3e}")
    best = min(sweep, key=lambda entry: entry["image_mse"])
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
