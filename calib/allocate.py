"""Bit allocation by integer programming (MixDQ section "mixed-precision allocation").

`allocate_bits` is the core: one binary variable per (layer, bits), exactly one bit-width per
layer, maximize the summed score subject to a size-weighted average-bits budget; solved with
PuLP's bundled CBC. `group_budgets` splits a target between the content and quality groups by a
ratio k, and `build_plans` sweeps k over the whole feasible range (`ratio_range`) to produce the
candidate plans the calibration pipeline scores. The two groups' scores are in different metrics
(image SSIM, UNet SQNR in dB) and are never summed into one objective.
"""

from __future__ import annotations

import math
import warnings

import pulp

from mixq.errors import BudgetError, CalibrationFileError
from mixq.quantizers import ACTIVATION_BITS, WEIGHT_BITS


class InfeasibleBudgetError(BudgetError):
    pass


def check_allocation_inputs(scores: dict, sizes: dict, avg_bits: float):
    """Finite scores at known bit-widths, positive sizes and a finite budget: what CBC needs to be meaningful
    (a NaN score otherwise fails inside PuLP, a 3-bit candidate only when the plan is applied)."""
    if not isinstance(avg_bits, (int, float)) or isinstance(avg_bits, bool) or not math.isfinite(avg_bits):
        raise BudgetError(f"the average-bits budget must be a finite number, got {avg_bits!r}")
    known = tuple(sorted(set(WEIGHT_BITS) | set(ACTIVATION_BITS)))
    for name, table in scores.items():
        if not isinstance(table, dict) or not table:
            raise CalibrationFileError(f"layer {name!r}: no scores per bit-width; remeasure its sensitivity")
        for bits, score in table.items():
            if isinstance(bits, bool) or bits not in known:
                raise CalibrationFileError(f"layer {name!r}: bit-width {bits!r} is not one of {known}; "
                                           "remove it from the sensitivity table")
            if not isinstance(score, (int, float)) or not math.isfinite(score):
                raise CalibrationFileError(f"layer {name!r}: the score at {bits} bits is {score!r}, not a finite "
                                           "number; remeasure its sensitivity")
        size = sizes.get(name)
        if size is not None and not (isinstance(size, (int, float)) and math.isfinite(size) and size > 0):
            raise CalibrationFileError(f"layer {name!r}: size {size!r} is not a positive number")


def smallest_feasible_average(candidates: dict[str, list[int]], sizes: dict[str, float]) -> float:
    return candidate_average_bounds(candidates, sizes)[0]


def candidate_average_bounds(candidates: dict[str, list[int]], sizes: dict[str, float]) -> tuple[float, float]:
    """(smallest, largest) size-weighted average: every layer at its smallest / largest candidate."""
    total = sum(sizes[n] for n in candidates)
    return (sum(sizes[n] * min(bits) for n, bits in candidates.items()) / total,
            sum(sizes[n] * max(bits) for n, bits in candidates.items()) / total)


def require_feasible(scores: dict, sizes: dict, avg_bits: float) -> dict[str, list[int]]:
    """The layers' candidate bit-widths, after checking the inputs and that the budget is not below
    what the smallest candidates average (InfeasibleBudgetError naming that average otherwise)."""
    check_allocation_inputs(scores, sizes, avg_bits)
    candidates = {n: sorted(int(b) for b in table) for n, table in scores.items()}
    floor = smallest_feasible_average(candidates, sizes)
    if avg_bits < floor - 1e-9:
        raise InfeasibleBudgetError(
            f"average of {avg_bits:g} bits is infeasible: the smallest candidate bit-widths already average "
            f"{floor:.4f} bits; raise the budget to at least that, or allow lower bit-widths"
        )
    return candidates


def allocate_bits(scores: dict[str, dict[int, float]], sizes: dict[str, float], avg_bits: float,
                  time_limit: float = 60.0) -> dict[str, int]:
    """layer -> bits maximizing sum(scores[layer][bits]) s.t. sum(size * bits) <= avg_bits * sum(size).

    scores: layer -> {bits: score}, higher is better; each layer chooses among the bit-widths of its
    own table. Raises InfeasibleBudgetError naming the smallest feasible average.
    """
    if not scores:
        return {}
    missing = [n for n in scores if n not in sizes]
    if missing:
        raise CalibrationFileError(f"no size for layer(s) {missing[:3]}")
    candidates = require_feasible(scores, sizes, avg_bits)
    with warnings.catch_warnings():
        # PuLP 3.x announces API changes for 4.0; this code pins pulp<4 (setup.py).
        warnings.simplefilter("ignore", DeprecationWarning)
        return _solve(scores, sizes, candidates, avg_bits, time_limit)


def _solve(scores, sizes, candidates, avg_bits, time_limit):
    problem = pulp.LpProblem("mixq_bit_allocation", pulp.LpMaximize)
    choose = {
        (n, b): pulp.LpVariable(f"x_{i}_{b}", cat="Binary")
        for i, n in enumerate(scores) for b in candidates[n]
    }
    problem += pulp.lpSum(float(scores[n][b]) * var for (n, b), var in choose.items())
    for n in scores:
        problem += pulp.lpSum(choose[n, b] for b in candidates[n]) == 1
    total = sum(sizes[n] for n in scores)
    # Normalised by the total size so the coefficients stay O(bits) and CBC's tolerances behave.
    problem += pulp.lpSum(sizes[n] / total * b * var for (n, b), var in choose.items()) <= avg_bits + 1e-9
    # gapRel/gapAbs 0: prove optimality instead of stopping at CBC's default tolerance.
    # "preprocess off": the bundled CBC 2.10.3's integer preprocessing fixes variables wrongly on
    # some of these knapsacks (found by the brute-force test) and reports a suboptimal plan as optimal.
    solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=0, gapAbs=0, options=["preprocess off"])
    status = problem.solve(solver)
    if pulp.LpStatus[status] != "Optimal":
        raise InfeasibleBudgetError(f"CBC found no optimal allocation (status {pulp.LpStatus[status]})")
    return {n: next(b for b in candidates[n] if choose[n, b].value() > 0.5) for n in scores}


def average_bits(bits: dict[str, int], sizes: dict[str, float]) -> float:
    total = sum(sizes[n] for n in bits)
    return sum(sizes[n] * b for n, b in bits.items()) / total if total else 0.0


def group_budgets(target: float, ratio: float, content_size: float, quality_size: float) -> tuple[float, float]:
    """(content avg, quality avg) with content = ratio * quality and the size-weighted mean = target."""
    quality = target * (content_size + quality_size) / (ratio * content_size + quality_size)
    return ratio * quality, quality


def ratio_range(target: float, content_size: float, quality_size: float, content_bounds: tuple[float, float],
                quality_bounds: tuple[float, float]) -> tuple[float, float]:
    """The split ratios k whose shares keep each group between its smallest and largest candidate
    averages: below that a group cannot meet its share, above it the share leaves budget unused.
    The shares are monotone in k (content rises, quality falls), so the range is an interval."""
    fraction = content_size / (content_size + quality_size)

    def k_where_content_is(avg):  # k * target / (k * f + 1 - f) = avg
        return avg * (1 - fraction) / (target - avg * fraction) if target > avg * fraction else math.inf

    def k_where_quality_is(avg):  # target / (k * f + 1 - f) = avg
        return (target / avg - 1 + fraction) / fraction

    low = max(k_where_content_is(content_bounds[0]), k_where_quality_is(quality_bounds[1]))
    high = min(k_where_content_is(content_bounds[1]), k_where_quality_is(quality_bounds[0]))
    if target >= content_bounds[1] * fraction + quality_bounds[1] * (1 - fraction) - 1e-9:
        top = content_bounds[1] / quality_bounds[1]  # every layer at its largest candidate
        return top, top
    return low, high


def split_ratios(configured, low: float, high: float) -> list[float]:
    """The ratios a budget split sweeps: the configured ones inside [low, high], both ends of the
    range (rounded inwards), and midpoints of the widest gaps while fewer than configured, so the sweep
    always covers the whole feasible range, whatever the budget."""
    low, high = math.ceil(low * 1e4) / 1e4, math.floor(high * 1e4) / 1e4
    if high <= low:
        return [round((low + high) / 2, 4)]
    ratios = sorted({float(r) for r in configured if low <= r <= high} | {low, high})
    while len(ratios) < len(list(configured)):  # bisect the widest gap
        i = max(range(len(ratios) - 1), key=lambda j: ratios[j + 1] - ratios[j])
        ratios.insert(i + 1, round((ratios[i] + ratios[i + 1]) / 2, 4))
    return ratios


def group_members(scores, groups) -> dict[str, dict]:
    return {g: {n: s for n, s in scores.items() if groups[n] == g} for g in ("content", "quality")}


def feasible_split(scores, sizes, groups, target: float) -> tuple[float, float]:
    """ratio_range for these layers' candidates (content and quality groups both non-empty)."""
    by_group = group_members(scores, groups)
    size = {g: sum(sizes[n] for n in members) for g, members in by_group.items()}
    bounds = {g: candidate_average_bounds({n: list(table) for n, table in members.items()}, sizes)
              for g, members in by_group.items()}
    return ratio_range(target, size["content"], size["quality"], bounds["content"], bounds["quality"])


def allocate_groups(scores, sizes, groups: dict[str, str], target: float, ratio: float) -> dict[str, int]:
    """Allocate the content and quality groups separately under the split budgets: each group's score
    is in its own metric (SSIM, dB), so they are never added into one objective."""
    by_group = group_members(scores, groups)
    group_size = {g: sum(sizes[n] for n in layer_scores) for g, layer_scores in by_group.items()}
    if not group_size["content"] or not group_size["quality"]:
        return allocate_bits(scores, sizes, target)  # one group, one metric
    content_avg, quality_avg = group_budgets(target, ratio, group_size["content"], group_size["quality"])
    # A ratio that asks a group for less than its smallest feasible average raises InfeasibleBudgetError.
    plan = {}
    for group, avg in (("content", content_avg), ("quality", quality_avg)):
        plan.update(allocate_bits(by_group[group], sizes, avg))
    return plan


def build_plans(scores, sizes, groups, target: float, ratios) -> dict[float, dict[str, int]]:
    """Candidate plans, one per ratio of split_ratios (the configured ratios in the feasible range
    and that range's ends), each within the overall target. Raises InfeasibleBudgetError when the
    target is below the smallest candidates' average."""
    by_group = group_members(scores, groups)
    if not by_group["content"] or not by_group["quality"]:
        return {1.0: allocate_bits(scores, sizes, target)}
    require_feasible(scores, sizes, target)
    plans = {}
    for ratio in split_ratios(ratios, *feasible_split(scores, sizes, groups, target)):
        plan = allocate_groups(scores, sizes, groups, target, ratio)
        if average_bits(plan, sizes) <= target + 1e-6:
            plans[float(ratio)] = plan
    return plans
