"""Fidelity evidence: paired statistics, the budget split over its feasible range, the near-tie rule,
same-budget baselines, the frontier sweep, and the quality gate on the offline default's run."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import yaml

from mixq.calib.allocate import average_bits, build_plans, feasible_split, group_budgets, split_ratios
from mixq.calib.planner import TIE_TOLERANCE, choose_candidate
from mixq.calib.plans import inverted_scores, random_bits
from mixq.stats import (mcnemar_exact, paired_difference, per_image_psnr, student_t_cdf, student_t_quantile,
                        wilson_interval)

# --- statistics -----------------------------------------------------------------------------------


def test_wilson_interval_contains_the_rate_and_narrows_with_n():
    low, high = wilson_interval(990, 1000)
    assert low < 0.99 < high and high - low < 0.015
    wide = wilson_interval(99, 100)
    assert wide[1] - wide[0] > high - low
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_mcnemar_counts_only_discordant_pairs():
    same = [True] * 50 + [False] * 50
    assert mcnemar_exact(same, same) == 1.0
    a = [True] * 10 + [True] * 90
    b = [False] * 10 + [True] * 90
    assert mcnemar_exact(a, b) == pytest.approx(2 / 2 ** 10)  # 10 discordant pairs, all one way
    assert mcnemar_exact(a, b) == mcnemar_exact(b, a)
    balanced = [True, False] * 10
    assert mcnemar_exact(balanced, [not x for x in balanced]) == 1.0
    with pytest.raises(ValueError, match="different lengths"):
        mcnemar_exact([True], [True, False])


def test_paired_difference_interval_and_p_value():
    rng = np.random.default_rng(0)
    base = rng.normal(30, 5, 500)
    shifted = paired_difference(base + 1.0 + rng.normal(0, 0.5, 500), base)
    assert shifted["low"] < 1.0 < shifted["high"] and shifted["p"] < 1e-6
    null = paired_difference(base + rng.normal(0, 0.5, 500), base)
    assert null["low"] < 0 < null["high"] and null["p"] > 0.01


@pytest.mark.parametrize(("df", "quantile"), [(1, 12.7062), (2, 4.3027), (7, 2.3646), (30, 2.0423), (1000, 1.9623)])
def test_student_t_quantiles_match_the_tables(df, quantile):
    assert student_t_quantile(0.975, df) == pytest.approx(quantile, abs=1e-4)
    assert student_t_cdf(quantile, df) == pytest.approx(0.975, abs=1e-5)  # the table has 4 decimals


def test_two_paired_samples_are_not_significant_however_consistent():
    d = paired_difference([20.0, 21.0], [17.0, 18.2])
    assert d["p"] > 0.01 and d["low"] > 0  # the normal approximation would say p = 1e-36


def test_per_image_psnr_is_finite_for_identical_images():
    images = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    noisy = images.copy()
    noisy[1, 0, 0, 0] ^= 64
    psnr = per_image_psnr(images, noisy)
    assert np.all(np.isfinite(psnr)) and psnr[1] < psnr[0] == psnr[2]


# --- the budget split -----------------------------------------------------------------------------


def two_group_table(seed=0, layers=12):
    rng = random.Random(seed)
    scores, sizes, groups = {}, {}, {}
    for i in range(layers):
        group = "content" if i % 2 else "quality"
        bits = [2, 4, 8] if group == "content" else [4, 8]
        base = rng.uniform(0, 1)
        scores[f"l{i}"] = {b: base + sum(rng.uniform(0, 1) for _ in range(b)) for b in bits}
        sizes[f"l{i}"] = rng.choice([100, 400, 1600])
        groups[f"l{i}"] = group
    return scores, sizes, groups


def group_average(plan, sizes, groups, group):
    return average_bits({n: b for n, b in plan.items() if groups[n] == group}, sizes)


@pytest.mark.parametrize("target", [3.2, 3.6, 4.0, 5.0, 7.9])
def test_split_sweeps_the_whole_feasible_range_and_never_mixes_metrics(target):
    """Every ratio the sweep uses gives each group a share within its own candidates, each group is
    allocated alone under its share, and both ends of the feasible range are swept."""
    scores, sizes, groups = two_group_table()
    low, high = feasible_split(scores, sizes, groups, target)
    ratios = split_ratios([0.7, 0.85, 1.0, 1.15, 1.3], low, high)
    assert ratios[0] >= low - 1e-9 and ratios[-1] <= high + 1e-9
    assert ratios[0] - low < 1e-3 and high - ratios[-1] < 1e-3
    plans = build_plans(scores, sizes, groups, target, [0.7, 0.85, 1.0, 1.15, 1.3])
    assert sorted(plans) == ratios
    content_size = sum(sizes[n] for n in scores if groups[n] == "content")
    quality_size = sum(sizes[n] for n in scores if groups[n] == "quality")
    for ratio, plan in plans.items():
        content_share, quality_share = group_budgets(target, ratio, content_size, quality_size)
        assert group_average(plan, sizes, groups, "content") <= content_share + 1e-6
        assert group_average(plan, sizes, groups, "quality") <= quality_share + 1e-6
        assert average_bits(plan, sizes) <= target + 1e-6


def test_a_budget_where_no_configured_ratio_is_feasible_still_sweeps_splits():
    scores, sizes, groups = two_group_table(seed=3)
    low, high = feasible_split(scores, sizes, groups, 3.3)
    assert not any(low <= r <= high for r in (1.15, 1.3))
    plans = build_plans(scores, sizes, groups, 3.3, [1.15, 1.3])
    assert len(plans) >= 2 and all(low - 1e-3 <= r <= high + 1e-3 for r in plans)


def test_at_the_largest_budget_the_split_is_the_one_that_uses_every_largest_candidate():
    scores, sizes, groups = two_group_table()
    low, high = feasible_split(scores, sizes, groups, 8.0)
    assert low == high == 1.0
    plans = build_plans(scores, sizes, groups, 8.0, [0.7, 1.0, 1.3])
    assert list(plans) == [1.0] and set(plans[1.0].values()) == {8}


def test_near_ties_go_to_the_fewest_bits_and_real_differences_to_the_lowest_mse():
    def entry(ratio, mse, bits):
        return {"ratio": ratio, "image_mse": mse, "avg_all": bits, "plan": {}}

    tied = [entry(0.7, 1.00e-4, 3.99), entry(0.85, 1.00e-4 * (1 + TIE_TOLERANCE / 2), 3.94), entry(1.0, 3e-4, 3.90)]
    assert choose_candidate(tied)["ratio"] == 0.85
    apart = [entry(0.7, 1.00e-4, 3.99), entry(0.85, 1.00e-4 * (1 + 2 * TIE_TOLERANCE), 3.94)]
    assert choose_candidate(apart)["ratio"] == 0.7
    assert [e.get("chosen", False) for e in apart] == [True, False]


def test_noise_objective_counts_a_w2_layer_by_its_error_power():
    """With quality_score "noise" the program weighs a quality layer's 10 dB (W2) as 100x the error of
    a 30 dB one; summed decibels would call it a third. Content scores are left as measured."""
    from mixq.calib.planner import allocation_scores

    table = {"q": {"group": "quality", "weight": {2: 10.0, 4: 30.0}, "activation": {8: 40.0}},
             "c": {"group": "content", "weight": {2: 0.99, 4: 0.999}, "activation": {8: 1.0}}}
    db, noise = allocation_scores("weight", table), allocation_scores("weight", table, "noise")
    assert db == {"q": {2: 10.0, 4: 30.0}, "c": {2: 0.99, 4: 0.999}}
    assert noise["q"] == {2: pytest.approx(-0.1), 4: pytest.approx(-0.001)} and noise["c"] == db["c"]


def test_noise_objective_spares_the_layer_whose_error_would_dominate():
    """Two quality layers of equal size and one bit-width to give up: in dB the program takes W2 where
    the dB loss is smallest, which here is the layer whose W2 error power is largest."""
    from mixq.calib.allocate import allocate_bits
    from mixq.calib.planner import allocation_scores

    table = {"a": {"group": "quality", "weight": {2: 5.0, 4: 30.0}, "activation": {8: 40.0}},   # W2: -25 dB, power 0.316
             "b": {"group": "quality", "weight": {2: 20.0, 4: 60.0}, "activation": {8: 40.0}}}  # W2: -40 dB, power 0.01
    sizes = {"a": 1.0, "b": 1.0}
    assert allocate_bits(allocation_scores("weight", table), sizes, 3.0) == {"a": 2, "b": 4}
    assert allocate_bits(allocation_scores("weight", table, "noise"), sizes, 3.0) == {"a": 4, "b": 2}


def test_an_unknown_quality_score_is_refused():
    from mixq.calib.config import ConfigError, config_from_data, load_config

    data = load_config("proving-low-bit").to_dict()
    assert data["budget"]["quality_score"] == "noise" and 2 in data["bits"]["weight_quality"]
    data["budget"]["quality_score"] = "decibels"
    with pytest.raises(ConfigError, match="budget.quality_score"):
        config_from_data(data)


# --- baselines --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_random_allocation_meets_the_budget_as_closely_as_single_moves_allow(seed):
    scores, sizes, groups = two_group_table(seed)
    candidates = {n: sorted(s) for n, s in scores.items()}
    bits = random_bits(candidates, sizes, 4.0, seed)
    assert bits == random_bits(candidates, sizes, 4.0, seed)  # reproducible
    assert all(bits[n] in candidates[n] for n in bits)
    total = sum(sizes.values())
    used = sum(sizes[n] * b for n, b in bits.items())
    assert used <= 4.0 * total + 1e-9
    for n, b in bits.items():  # no layer can take its next candidate within the budget
        if b < candidates[n][-1]:
            step = candidates[n][candidates[n].index(b) + 1] - b
            assert used + sizes[n] * step > 4.0 * total
    assert random_bits(candidates, sizes, 4.0, seed + 100) != bits or len(bits) < 4


def test_inverted_scores_reverse_the_ranking_within_each_group():
    scores, _, groups = two_group_table()
    inverted = inverted_scores(scores, groups)
    for group in ("content", "quality"):
        members = [n for n in scores if groups[n] == group]
        for bits in (4, 8):
            order = sorted(members, key=lambda n: scores[n][bits])
            assert sorted(members, key=lambda n: inverted[n][bits]) == order[::-1]
            assert max(inverted[n][bits] for n in members) == pytest.approx(max(scores[n][bits] for n in members))


# --- the sweep stage and the report's statistics (small proving run) ---------------------------------


@pytest.fixture(scope="module")
def small_proving_run(tmp_path_factory):
    from tests.test_calibrate import run_small_proving

    return run_small_proving(tmp_path_factory.mktemp("proving-fidelity"), "proving-fidelity", content_prompts=12)


def test_report_states_intervals_paired_tests_and_same_budget_baselines(small_proving_run):
    from mixq.calib.content import INVERTED_NAME, PLAN_NAME, RANDOM_SEEDS, random_name

    content = yaml.safe_load((small_proving_run / "content.yaml").read_text())
    rows = {row["name"]: row for row in content["rows"]}
    assert {INVERTED_NAME, *(random_name(s) for s in RANDOM_SEEDS)} <= set(rows)
    plan = rows[PLAN_NAME]
    for row in rows.values():
        assert row["n"] == 12 and len(row["per_prompt"]) == 12
        assert row["correct"] == row["per_prompt"].count("1")
        assert row["interval"][0] <= row["content"]["overall"] <= row["interval"][1]
        if row["name"] != PLAN_NAME:
            discordant = sum(a != b for a, b in zip(plan["per_prompt"], row["per_prompt"]))
            assert row["vs_plan"]["mcnemar_p"] == pytest.approx(
                mcnemar_exact([c == "1" for c in plan["per_prompt"]], [c == "1" for c in row["per_prompt"]]))
            assert discordant > 0 or row["vs_plan"]["mcnemar_p"] == 1.0
    budget = yaml.safe_load((small_proving_run / "plan.yaml").read_text())["budget"]
    for seed in RANDOM_SEEDS:
        assert rows[random_name(seed)]["w_avg"] <= float(budget["w_bits"]) + 1e-6
    report = (small_proving_run / "report.md").read_text()
    assert "### The mixed plan against each configuration (paired, n = 12)" in report
    # 12 prompts cannot make any difference significant: the report must not claim one.
    assert "no significant difference in content" in report
    assert "keeps more content than" not in report and "keeps LESS content than" not in report


def test_sweep_writes_the_frontier_and_the_report_shows_it(small_proving_run, tmp_path, capsys):
    import shutil

    from mixq.calibrate import main

    run = tmp_path / "run"
    shutil.copytree(small_proving_run, run)
    assert main(["--out", str(run), "--stage", "sweep", "--w-bits", "3.6,4.5", "--no-progress"]) == 0
    sweep = yaml.safe_load((run / "sweep.yaml").read_text())
    assert [p["w_bits"] for p in sweep["points"]] == [3.6, 4.5]
    for point in sweep["points"]:
        assert point["plan"]["w_avg"] <= point["w_bits"] + 1e-6 and len(point["random"]) == 3
        assert all(r["w_avg"] <= point["w_bits"] + 1e-6 and 0 <= r["p_vs_plan"] <= 1 for r in point["random"])
    assert {"float", "uniform W8A8", "uniform W4A8"} <= set(sweep["uniform"])
    assert (run / "frontier.png").stat().st_size > 0
    assert "## Frontier: bits against quality" in (run / "report.md").read_text()
    capsys.readouterr()
    # Resumes: the same sweep again generates nothing new.
    assert main(["--out", str(run), "--stage", "sweep", "--w-bits", "3.6,4.5", "--no-progress"]) == 0
    assert capsys.readouterr().out.count("reused") >= 2


@pytest.mark.parametrize(("args", "message"), [
    (["--w-bits", "4,3.6"], "strictly increasing"),
    (["--w-bits", "3.6,3.6"], "strictly increasing"),
    (["--w-bits", "1.5,4"], "outside the feasible range"),
    (["--w-bits", "4,9"], "outside the feasible range"),
    (["--w-bits", "3.6,4", "--a-bits", "8,8,8"], "one activation budget or one per weight budget"),
    (["--w-bits", "3.6,nan"], "not a finite number"),
    ([], "needs weight budgets"),
])
def test_bad_sweep_budgets_fail_before_anything_runs(small_proving_run, args, message, capsys, monkeypatch):
    import mixq.calib.run as run_module
    from mixq.calibrate import main

    monkeypatch.setattr(run_module, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    before = sorted(p.name for p in small_proving_run.iterdir())
    assert main(["--out", str(small_proving_run), "--stage", "sweep", *args, "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in small_proving_run.iterdir()) == before


def test_a_budget_list_outside_the_sweep_is_refused(small_proving_run, capsys):
    from mixq.calibrate import main

    assert main(["--out", str(small_proving_run), "--stage", "allocate", "--w-bits", "3.6,4", "--no-progress"]) == 2
    assert "a list of budgets is for --stage sweep" in capsys.readouterr().err


def test_plan_at_and_baselines_from_a_run_folder(small_proving_run):
    import mixq
    from mixq.calib.plans import inverted_plan, plan_at, random_plan
    from mixq.proving.model import load_pipeline

    plan = plan_at(small_proving_run, w_bits=4.5)
    assert plan["budget"]["w_bits"] == 4.5 and plan["averages"]["weight"]["all"] <= 4.5 + 1e-6
    stored = yaml.safe_load((small_proving_run / "plan.yaml").read_text())
    assert list(plan["layers"]) == list(stored["layers"]) and plan["model"] == stored["model"]
    again = plan_at(small_proving_run)  # the run's own budget: the plan the allocate stage wrote
    assert again["layers"] == stored["layers"]
    for baseline in (random_plan(small_proving_run, w_bits=4.5, seed=1), inverted_plan(small_proving_run)):
        assert baseline["averages"]["weight"]["all"] <= baseline["budget"]["w_bits"] + 1e-6
        assert list(baseline["layers"]) == list(stored["layers"])
    pipe = mixq.quantize(load_pipeline(), plan=random_plan(small_proving_run, seed=2), calibration=small_proving_run,
                         progress=False)
    rows = {row["name"]: row for row in mixq.summary(pipe)}
    expected = random_plan(small_proving_run, seed=2)["layers"]
    assert all(rows[n]["w_bits"] == bits["w_bits"] for n, bits in expected.items() if bits["w_bits"] != 16)


# --- the quality gate --------------------------------------------------------------------------------


def default_run_folder() -> Path:
    """The offline default's run folder that CI's main job (`python -m mixq.calibrate`) has just
    written, named by MIXQ_DEFAULT_RUN (.ci/run sets it)."""
    folder = os.environ.get("MIXQ_DEFAULT_RUN")
    if not folder:
        pytest.skip("MIXQ_DEFAULT_RUN not set: the quality gate reads the default run that CI's main job writes "
                    "(run `python -m mixq.calibrate` and set MIXQ_DEFAULT_RUN=runs/proving to check it locally)")
    return Path(folder)


def test_ci_runs_the_quality_gate():
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "export MIXQ_DEFAULT_RUN=runs/proving" in ci


def test_quality_gate_the_plan_beats_random_allocations_at_the_default_budget():
    """On 1000 held-out prompts of the offline default, the calibrated plan keeps significantly more
    content (exact McNemar, p < 0.01) than every random allocation at the same budget: a change that
    breaks the sensitivity measurement or the ILP fails here."""
    from mixq.calib.content import PLAN_NAME, RANDOM_SEEDS, random_name
    from mixq.stats import SIGNIFICANCE

    folder = default_run_folder()
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["model"]["id"] == "offline:proving" and config["budget"]["w_bits"] == 4.0
    content = yaml.safe_load((folder / "content.yaml").read_text())
    assert content["prompts"] >= 1000
    rows = {row["name"]: row for row in content["rows"]}
    plan = rows[PLAN_NAME]
    for seed in RANDOM_SEEDS:
        random_row = rows[random_name(seed)]
        assert math.isclose(random_row["w_avg"], plan["w_avg"], abs_tol=0.05)
        assert plan["content"]["overall"] > random_row["content"]["overall"]
        assert random_row["vs_plan"]["mcnemar_p"] < SIGNIFICANCE, (seed, random_row["vs_plan"])
