"""The plan builder: weights and activations allocated separately, per group, the budget split
between groups by a ratio k (content average = k * quality average); every k of the sweep gives a
candidate, and the candidate whose simulated images are closest to the float images wins (MixDQ's
selection rule; `choose_candidate` says how near-ties are broken)."""

from __future__ import annotations

import math

from mixq.calib.allocate import (InfeasibleBudgetError, average_bits, build_plans, candidate_average_bounds,
                                 group_budgets, smallest_feasible_average)
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


def allocation_scores(side: str, table: dict, quality_score: str = "db") -> dict[str, dict[int, float]]:
    """What the integer program maximizes per layer and bit-width: the table's scores, except that with
    quality_score "noise" a quality layer's SQNR s (dB) counts as its negative noise power -10^(-s/10):
    independent errors add as powers, not as decibels, so the sum then tracks the UNet's total error
    (a W2 layer at 10 dB costs 100x one at 30 dB, not a third)."""
    scores = scores_for(side, table)
    if quality_score == "noise":
        for name, row in table.items():
            if row["group"] == "quality":
                scores[name] = {b: -(10.0 ** (-s / 10)) for b, s in scores[name].items()}
    return scores


def group_averages(bits: dict[str, int], sizes: dict[str, float], groups: dict[str, str]) -> dict[str, float]:
    result = {}
    for group in ("content", "quality"):
        members = {n: b for n, b in bits.items() if groups[n] == group}
        if members:
            result[group] = average_bits(members, sizes)
    result["all"] = average_bits(bits, sizes)
    return result


def check_budget_feasible(side: str, target: float, candidate_bits: dict[str, list[int]], sizes: dict[str, float]):
    """Refuse (before any work) a budget below what the smallest candidates already average."""
    floor = smallest_feasible_average(candidate_bits, sizes)
    if target < floor - 1e-9:
        flag = "--w-bits" if side == "weight" else "--a-bits"
        raise BudgetError(f"{flag} {target:g} is infeasible: with every layer at its smallest candidate bit-width the "
                          f"{side}s already average {floor:.4f} bits; give at least {math.ceil(floor * 100) / 100:.2f}, "
                          "or allow lower bit-widths in the config's bits section")


def plan_averages(plan: dict, table: dict) -> dict:
    """side -> group -> size-weighted average bits of a plan ({name: {w_bits, a_bits}}) over the table's layers."""
    groups = {n: row["group"] for n, row in table.items()}
    return {side: group_averages({n: plan[n][key] for n in table}, sizes_for(side, table), groups)
            for side, key in SIDES.items()}


def rounded(averages: dict, digits: int = 4) -> dict:
    return {side: {g: round(float(v), digits) for g, v in groups.items()} for side, groups in averages.items()}


def skip_reason(side: str, table: dict, target: float, ratio: float) -> str:
    """Why the split k=`ratio` is not swept: a group's share below its smallest candidate average
    (infeasible) or above its largest (budget left unused)."""
    sizes, scores = sizes_for(side, table), scores_for(side, table)
    members = {g: [n for n, row in table.items() if row["group"] == g] for g in ("content", "quality")}
    group_size = {g: sum(sizes[n] for n in names) for g, names in members.items()}
    shares = dict(zip(("content", "quality"), group_budgets(target, ratio, group_size["content"], group_size["quality"])))
    for group, share in shares.items():
        floor, top = candidate_average_bounds({n: list(scores[n]) for n in members[group]}, sizes)
        if share < floor - 1e-9:
            return f"{group} share {share:.2f} bits is below its smallest candidate average {floor:.2f}"
        if share > top + 1e-9:
            return f"{group} share {share:.2f} bits is above its largest candidate average {top:.2f} (budget left unused)"
    return "outside the feasible split range"


# Candidates whose image MSE is within this share of the lowest are ties: measured on the offline
# default, 1 and 2 threads change the near-float activation MSEs by 6 % and the weight MSEs not at all
# (4 digits), while different splits differ by 15-100 %.
TIE_TOLERANCE = 0.10


def choose_candidate(sweep: list[dict]) -> dict:
    """MixDQ's rule, the lowest image MSE against the float images, made stable: candidates within
    TIE_TOLERANCE of the lowest MSE are ties, and among them the fewest average bits win (then the
    lower MSE). A rerun whose float rounding differs (another CPU, another thread count) then picks
    the same plan unless the candidates really differ."""
    scored = [e for e in sweep if "plan" in e]
    lowest = min(e["image_mse"] for e in scored)
    for entry in scored:
        entry["tied"] = entry["image_mse"] <= lowest * (1 + TIE_TOLERANCE)
    chosen = min((e for e in scored if e["tied"]), key=lambda e: (round(e["avg_all"], 3), e["image_mse"]))
    chosen["chosen"] = True
    return chosen


def sweep_side(side: str, table: dict, target: float, ratios, evaluator: Evaluator, pipe, layers, calibration,
               log=print, quality_score: str = "db") -> tuple[dict[str, int], list[dict]]:
    """Candidates for one side (the other side in floating point), one per split ratio over the
    feasible range, scored by image MSE; configured ratios outside the range are listed with the
    reason they were skipped."""
    sizes, groups = sizes_for(side, table), {n: row["group"] for n, row in table.items()}
    try:
        candidates = build_plans(allocation_scores(side, table, quality_score), sizes, groups, target, ratios)
    except InfeasibleBudgetError as err:
        raise BudgetError(f"{side} budget: {err}") from None
    sweep = []
    for ratio in sorted(set(float(r) for r in ratios) | set(candidates)):
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
        sweep.append({"ratio": ratio, "image_mse": mse, "plan": plan,
                      **{f"avg_{g}": round(v, 4) for g, v in averages.items()}})
        log(f"  {side} k={ratio:g}: avg {averages['all']:.3f} bits "
            f"(content {averages.get('content', float('nan')):.3f}, quality {averages.get('quality', float('nan')):.3f}), "
            f"image MSE {mse:.3e}")
    chosen = choose_candidate(sweep)
    ties = sum(e.get("tied", False) for e in sweep)
    log(f"  {side}: chose k={chosen['ratio']:g}" + (f" (the fewest bits of {ties} candidates within "
                                                   f"{TIE_TOLERANCE:.0%} of the lowest MSE)" if ties > 1 else ""))
    return chosen["plan"], sweep


def build_plan(table: dict, budget, evaluator: Evaluator, pipe, layers, calibration, keep_fp, log=print):
    """(plan layers {name: {w_bits, a_bits}}, sweep records) for the budget."""
    log(f"allocating weights: target {budget.w_bits:g} bits")
    weights, weight_sweep = sweep_side("weight", table, budget.w_bits, budget.ratios, evaluator, pipe, layers,
                                       calibration, log, budget.quality_score)
    log(f"allocating activations: target {budget.a_bits:g} bits")
    activations, act_sweep = sweep_side("activation", table, budget.a_bits, budget.ratios, evaluator, pipe, layers,
                                        calibration, log, budget.quality_score)
    plan = {name: {"w_bits": int(weights[name]), "a_bits": int(activations[name])} for name in table}
    for name in keep_fp:
        plan[name] = {"w_bits": FLOAT_BITS, "a_bits": FLOAT_BITS}
    return plan, {"weight": weight_sweep, "activation": act_sweep}
