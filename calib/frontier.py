"""`python -m mixq.calibrate --out RUN --stage sweep --w-bits 3.4,3.6,4.0`: the bits-vs-quality
frontier of a finished run.

At every budget of the list the calibrated plan (the same split sweep and selection as the allocate
stage) and random allocations at the same budget (mixq.calib.plans, seeds 0-2) generate the held-out
content prompts on the real integer kernels; content accuracy with its interval, image PSNR against
float and the paired McNemar test of the plan against each random allocation go into sweep.yaml,
beside the uniform configurations (float, W8A8, W4A8) from the report's cache. frontier.png plots
them and the report shows both. sweep.yaml is written after every budget, so an interrupted sweep
resumes at the next one; a point is reused while its key (sensitivity table, ranges, prompts,
budget) holds.
"""

from __future__ import annotations

import math

import numpy as np

from mixq.calib.allocate import candidate_average_bounds
from mixq.calib.planner import scores_for, sizes_for
from mixq.errors import BudgetError
from mixq.stats import mcnemar_exact, per_image_psnr, wilson_interval

SWEEP_FILENAME = "sweep.yaml"
FRONTIER_PLOT = "frontier.png"
UNIFORM_POINTS = ("float", "uniform W8A8", "uniform W4A8")


def parse_budget_list(text: str, flag: str) -> list[float]:
    """'3.4,3.6,4' -> [3.4, 3.6, 4.0], or a BudgetError naming the flag and the entry."""
    values = []
    for part in str(text).split(","):
        try:
            value = float(part)
        except ValueError:
            raise BudgetError(f"{flag} {text!r}: {part!r} is not a number; give budgets like 3.4,3.6,4") from None
        if not math.isfinite(value):
            raise BudgetError(f"{flag} {text!r}: {part!r} is not a finite number")
        values.append(value)
    return values


def check_sweep_budgets(w_budgets: list[float], a_budgets: list[float], table: dict):
    """Before anything runs: weight budgets strictly increasing, every budget between what the
    smallest and the largest candidates average, and one activation budget or one per weight budget."""
    if not w_budgets:
        raise BudgetError("--stage sweep needs weight budgets: --w-bits 3.4,3.6,4")
    if any(b <= a for a, b in zip(w_budgets, w_budgets[1:])):
        raise BudgetError(f"--w-bits {','.join(f'{b:g}' for b in w_budgets)}: the sweep's budgets must be strictly "
                          "increasing; list each once, smallest first")
    if len(a_budgets) not in (1, len(w_budgets)):
        raise BudgetError(f"--a-bits: give one activation budget or one per weight budget ({len(w_budgets)}), "
                          f"not {len(a_budgets)}")
    for side, budgets, flag in (("weight", w_budgets, "--w-bits"), ("activation", a_budgets, "--a-bits")):
        floor, top = candidate_average_bounds({n: list(bits) for n, bits in scores_for(side, table).items()},
                                              sizes_for(side, table))
        outside = [b for b in budgets if b < floor - 1e-9 or b > top + 1e-9]
        if outside:
            raise BudgetError(f"{flag}: {', '.join(f'{b:g}' for b in outside)} outside the feasible range of this run's "
                              f"{side} candidates, {floor:.4f} to {top:g} bits; give budgets within it")


def point_summary(verdicts, images, float_images, w_avg: float, a_avg: float) -> dict:
    correct = [v.correct for v in verdicts]
    low, high = wilson_interval(sum(correct), len(correct))
    summary = {"w_avg": round(w_avg, 4), "a_avg": round(a_avg, 4), "content": round(float(np.mean(correct)), 4),
               "interval": [round(low, 4), round(high, 4)], "n": len(correct)}
    if float_images is not None:
        summary["mean_image_psnr"] = round(float(np.mean(per_image_psnr(float_images, images))), 3)
    return summary


def frontier_figure(points: list[dict], uniform: dict):
    from mixq.calib.report import _pyplot

    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    plan_x = [p["plan"]["w_avg"] for p in points]

    def error_bars(summary):
        return [[summary["content"] - summary["interval"][0]], [summary["interval"][1] - summary["content"]]]

    for p in points:
        left.errorbar([p["plan"]["w_avg"]], [p["plan"]["content"] * 100], yerr=np.array(error_bars(p["plan"])) * 100,
                      fmt="o", color="tab:orange", capsize=3)
        for r in p["random"]:
            left.errorbar([r["w_avg"]], [r["content"] * 100], yerr=np.array(error_bars(r)) * 100, fmt="x",
                          color="tab:gray", capsize=2, alpha=0.8)
            right.plot([r["w_avg"]], [r["mean_image_psnr"]], "x", color="tab:gray")
    left.plot(plan_x, [p["plan"]["content"] * 100 for p in points], "-", color="tab:orange", label="mixq plan")
    right.plot(plan_x, [p["plan"]["mean_image_psnr"] for p in points], "o-", color="tab:orange", label="mixq plan")
    left.plot([], [], "x", color="tab:gray", label="random allocation, same budget")
    right.plot([], [], "x", color="tab:gray", label="random allocation, same budget")
    for name, marker in (("uniform W4A8", "s"), ("uniform W8A8", "D")):
        if name in uniform and uniform[name]["w_avg"] <= max(plan_x) + 0.5:
            left.plot([uniform[name]["w_avg"]], [uniform[name]["content"] * 100], marker, color="tab:blue", label=name)
            right.plot([uniform[name]["w_avg"]], [uniform[name]["mean_image_psnr"]], marker, color="tab:blue", label=name)
    if "float" in uniform:
        left.axhline(uniform["float"]["content"] * 100, color="black", ls="--", lw=1, label="float")
    left.set_ylabel("content accuracy (%), 95 % interval")
    right.set_ylabel("mean per-image PSNR vs float (dB)")
    for ax in (left, right):
        ax.set_xlabel("average weight bits (size-weighted)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    n = points[0]["plan"]["n"] if points else 0
    fig.suptitle(f"Bits against quality on {n} held-out prompts (real integer kernels)")
    return fig


def sweep_section(sweep: dict) -> list[str]:
    """The report's frontier section from sweep.yaml's content."""
    from mixq.calib.report import _table

    points, uniform = sweep["points"], sweep.get("uniform", {})
    rows = []
    for p in points:
        plan, randoms = p["plan"], p["random"]
        worst_p = max(r["p_vs_plan"] for r in randoms)
        rows.append([f"{p['w_bits']:g} / {p['a_bits']:g}", f"{plan['w_avg']:.3f}",
                     f"{plan['content']:.1%} [{plan['interval'][0]:.1%}, {plan['interval'][1]:.1%}]",
                     f"{plan['mean_image_psnr']:.2f}",
                     ", ".join(f"{r['content']:.1%}" for r in randoms),
                     f"{np.mean([r['mean_image_psnr'] for r in randoms]):.2f}", f"{worst_p:.2g}"])
    lines = ["## Frontier: bits against quality", "",
             (f"Written by `--stage sweep` ({sweep['command']}): at each budget the calibrated plan and random "
              f"allocations at the same budget (seeds {', '.join(str(s) for s in sweep['seeds'])}), on "
              f"{points[0]['plan']['n'] if points else 0} held-out prompts; the largest McNemar p-value of the plan "
              "against its random allocations in the last column."), "",
             _table(["budget W / A", "plan avg W bits", "plan content [95 %]", "plan PSNR (dB)", "random content",
                     "random PSNR (dB)", "max p vs random"], rows), ""]
    if uniform:
        lines += ["Uniform points: " + "; ".join(
            f"{name} {u['w_avg']:.2f} bits, {u['content']:.1%}" + (f", {u['mean_image_psnr']:.2f} dB" if name != "float" else "")
            for name, u in uniform.items()) + ".", ""]
    lines += [f"![frontier]({FRONTIER_PLOT})", ""]
    return lines


def sweep_stage(s, w_budgets: list[float], a_budgets: list[float]):
    """The frontier of the session's run folder (see the module docstring)."""
    from mixq.calib.content import RANDOM_SEEDS, Configuration, ContentCache, average_bits_of, generate_with
    from mixq.calib.plans import baseline_layers
    from mixq.calib.run import compute_plan, content_cache_key
    from mixq.calib.runfolder import digest, file_digest
    from mixq.io import read_yaml, write_yaml_atomic
    from mixq.proving.evaluate import evaluation_prompts, verdicts_for

    table, folder = s.table(), s.folder
    check_sweep_budgets(w_budgets, a_budgets, table)
    count = s.config.evaluation.content_prompts
    if not count:
        raise BudgetError("--stage sweep scores content on held-out prompts: set evaluation.content_prompts in the "
                          "config (the proving config does) ")
    pairs = evaluation_prompts(count)
    prompts, scenes = [text for _, text in pairs], [scene for scene, _ in pairs]
    seed, sampling = s.config.sampling.seed, s.config.pipeline_kwargs()
    quantizable = list(table)

    key = content_cache_key(s, table)
    cached = ContentCache(folder.root / "content-cache.safetensors", key).load()
    uniform_bits = {"float": {}, "uniform W8A8": {n: (8, 8) for n in quantizable},
                    "uniform W4A8": {n: (4, 8) for n in quantizable}}
    float_images = cached["float"][0] if "float" in cached else None
    uniform = {}
    for name in UNIFORM_POINTS:
        config = Configuration(name, uniform_bits[name])
        if name in cached:
            images, verdicts = cached[name][0], cached[name][1]
        else:
            s.log(f"sweep: {name} on {count} prompts")
            images = generate_with(s.pipe, s.layers, s.calibration, config, prompts, seed, sampling)
            verdicts = verdicts_for(images, scenes)
        float_images = images if name == "float" else float_images
        uniform[name] = point_summary(verdicts, images, float_images, *average_bits_of(config, table))

    path = folder.root / SWEEP_FILENAME
    previous = read_yaml(path) if path.exists() else {}
    done = {p["key"]: p for p in (previous or {}).get("points", []) if isinstance(p, dict) and "key" in p}
    measured = digest("sweep", key, file_digest(folder.sensitivity), file_digest(folder.reference))
    record = {"command": s.command, "seeds": list(RANDOM_SEEDS), "prompts": count, "uniform": uniform,
              "points": []}
    for i, w_bits in enumerate(w_budgets):
        a_bits = a_budgets[i] if len(a_budgets) > 1 else a_budgets[0]
        point_key = digest(measured, w_bits, a_bits, s.config.budget.ratios)
        if point_key in done:
            s.log(f"sweep: W {w_bits:g} / A {a_bits:g} reused")
            record["points"].append(done[point_key])
            continue
        budget = {**s.config.to_dict()["budget"], "w_bits": float(w_bits), "a_bits": float(a_bits)}
        plan, _ = compute_plan(s, budget)
        plan_config = Configuration("plan", {n: (plan["layers"][n]["w_bits"], plan["layers"][n]["a_bits"])
                                             for n in quantizable})
        images = generate_with(s.pipe, s.layers, s.calibration, plan_config, prompts, seed, sampling)
        plan_verdicts = verdicts_for(images, scenes)
        point = {"key": point_key, "w_bits": float(w_bits), "a_bits": float(a_bits),
                 "plan": point_summary(plan_verdicts, images, float_images, *average_bits_of(plan_config, table)),
                 "random": []}
        for seed_r in RANDOM_SEEDS:
            layers_r = baseline_layers(table, "random", w_bits, a_bits, seed_r)
            config_r = Configuration(f"random {seed_r}", {n: (b["w_bits"], b["a_bits"]) for n, b in layers_r.items()})
            images_r = generate_with(s.pipe, s.layers, s.calibration, config_r, prompts, seed, sampling)
            verdicts_r = verdicts_for(images_r, scenes)
            point["random"].append({"seed": seed_r, **point_summary(verdicts_r, images_r, float_images,
                                                                     *average_bits_of(config_r, table)),
                                    "p_vs_plan": mcnemar_exact([v.correct for v in plan_verdicts],
                                                               [v.correct for v in verdicts_r])})
        record["points"].append(point)
        write_yaml_atomic(path, record)  # after every budget: an interrupted sweep resumes at the next one
        randoms = ", ".join(f"{r['content']:.1%}" for r in point["random"])
        s.log(f"sweep: W {w_bits:g} / A {a_bits:g}: plan {point['plan']['w_avg']:.3f} bits, content "
              f"{point['plan']['content']:.1%}; random {randoms}")
    write_yaml_atomic(path, record)
    from mixq.calib.report import _save

    _save(frontier_figure(record["points"], uniform), folder.root / FRONTIER_PLOT)
    s.log(f"sweep: wrote {path} and {folder.root / FRONTIER_PLOT}")
