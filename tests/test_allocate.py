"""Bit allocation: optimal against brute force, fast at SDXL scale, clear when infeasible."""

import itertools
import random
import time

import pytest

from mixq.calib.allocate import (
    InfeasibleBudgetError,
    allocate_bits,
    average_bits,
    build_plans,
    group_budgets,
)


def brute_force(scores, sizes, avg_bits):
    names = list(scores)
    total = sum(sizes.values())
    best, best_plan = float("-inf"), None
    for choice in itertools.product(*(sorted(scores[n]) for n in names)):
        if sum(sizes[n] * b for n, b in zip(names, choice)) <= avg_bits * total + 1e-9:
            value = sum(scores[n][b] for n, b in zip(names, choice))
            if value > best:
                best, best_plan = value, dict(zip(names, choice))
    return best, best_plan


@pytest.mark.parametrize("seed", range(40))
def test_allocation_is_optimal_against_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 7)
    scores, sizes = {}, {}
    for i in range(n):
        bits = rng.choice([[2, 4, 8], [4, 8], [2, 4, 8]])
        base = rng.uniform(0, 10)
        # monotone in bits like real sensitivities, with random gaps
        scores[f"l{i}"] = {b: base + sum(rng.uniform(0, 5) for _ in range(b)) for b in bits}
        sizes[f"l{i}"] = rng.choice([64, 256, 1000, 4096])
    floor = sum(sizes[k] * min(scores[k]) for k in scores) / sum(sizes.values())
    avg = rng.uniform(floor, 7.0)
    best, _ = brute_force(scores, sizes, avg)
    plan = allocate_bits(scores, sizes, avg)
    assert set(plan) == set(scores) and all(plan[k] in scores[k] for k in plan)
    assert average_bits(plan, sizes) <= avg + 1e-9
    assert sum(scores[k][plan[k]] for k in plan) == pytest.approx(best, rel=1e-9, abs=1e-9)


def test_allocation_is_fast_at_sdxl_scale():
    rng = random.Random(0)
    scores = {f"layer{i}": {2: rng.uniform(0, 10), 4: rng.uniform(10, 30), 8: rng.uniform(30, 60)} for i in range(800)}
    sizes = {n: rng.choice([409600, 1638400, 6553600, 26214400]) for n in scores}
    start = time.perf_counter()
    plan = allocate_bits(scores, sizes, 4.0)
    elapsed = time.perf_counter() - start
    assert average_bits(plan, sizes) <= 4.0 + 1e-9
    assert elapsed < 10, f"allocate_bits took {elapsed:.1f} s for 800 layers x 3 bit-widths"


def test_infeasible_budget_names_the_smallest_feasible_average():
    scores = {"a": {4: 1.0, 8: 2.0}, "b": {2: 1.0, 4: 2.0}}
    sizes = {"a": 1, "b": 1}
    with pytest.raises(InfeasibleBudgetError, match=r"smallest candidate bit-widths already average 3\.0000"):
        allocate_bits(scores, sizes, 2.5)


def test_group_budgets_split_keeps_the_overall_average():
    content, quality = group_budgets(4.0, 1.2, content_size=300, quality_size=700)
    assert content == pytest.approx(1.2 * quality)
    assert (300 * content + 700 * quality) / 1000 == pytest.approx(4.0)


def test_build_plans_respects_budget_in_both_groups():
    rng = random.Random(3)
    scores, sizes, groups = {}, {}, {}
    for i in range(30):
        group = "content" if i % 2 else "quality"
        bits = [2, 4, 8] if group == "content" else [4, 8]
        scores[f"l{i}"] = {b: rng.uniform(0, 1) + b for b in bits}
        sizes[f"l{i}"] = rng.randint(10, 1000)
        groups[f"l{i}"] = group
    plans = build_plans(scores, sizes, groups, 5.0, [0.6, 0.8, 1.0, 1.2])
    assert plans
    c_size = sum(sizes[n] for n in scores if groups[n] == "content")
    q_size = sum(sizes[n] for n in scores if groups[n] == "quality")
    for ratio, plan in plans.items():
        c_budget, q_budget = group_budgets(5.0, ratio, c_size, q_size)
        assert average_bits({n: b for n, b in plan.items() if groups[n] == "content"}, sizes) <= c_budget + 1e-9
        assert average_bits({n: b for n, b in plan.items() if groups[n] == "quality"}, sizes) <= q_budget + 1e-9
        assert average_bits(plan, sizes) <= 5.0 + 1e-9
