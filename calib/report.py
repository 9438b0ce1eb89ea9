"""report.md and its PNG plots for a calibration run."""

from __future__ import annotations

import datetime
from pathlib import Path

from mixq.calib.planner import TIE_TOLERANCE
from mixq.io import atomic_path, write_text_atomic

GROUP_COLORS = {"content": "tab:orange", "quality": "tab:blue"}
CONTENT_CHECK_SKIPPED = [
    "## Content on held-out prompts", "",
    "Not checked in this run (`evaluation.content_prompts` is 0, the offline default's setting, so that the first "
    "command ends with the plan). `python -m mixq.calibrate --out RUN --content-prompts 1000` adds it to this "
    "folder, rerunning only the report (about 4-5 minutes on 2 cores): float, uniform W8A8 and W4A8, the plan "
    "with and without BOS handling and same-budget random and inverted allocations, checked on 1000 held-out "
    "prompts, with paired tests against the plan.", ""]
# How 4/2-bit weights ran for the content check on an x86 CPU (mixq.calib.content.content_cpu_weights).
WEIGHT_MODE_SENTENCES = {
    "packed": "On x86 CPUs, 4/2-bit weights ran packed, as served by default (the fused packed GEMM).",
    "int8": "On x86 CPUs, 4/2-bit weights ran unpacked to int8 (`cpu_weights=\"int8\"`): the integer sums of the "
            "packed default, only faster where the fused packed GEMM cannot run.",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    _pyplot().close(fig)


def plot_sensitivity(table: dict, path: Path):
    _save(sensitivity_figure(table), path)


def sensitivity_figure(table: dict):
    plt = _pyplot()
    names = list(table)
    fig, axes = plt.subplots(2, 2, figsize=(13, 7), sharex=True)
    for row, side in enumerate(("weight", "activation")):
        for col, group in enumerate(("quality", "content")):
            ax = axes[row][col]
            index = [i for i, n in enumerate(names) if table[n]["group"] == group]
            bits = sorted({int(b) for i in index for b in table[names[i]][side]})
            for b in bits:
                ax.plot(index, [table[names[i]][side].get(b, float("nan")) for i in index], ".", label=f"{b}-bit", ms=4)
            metric = "UNet SQNR (dB)" if group == "quality" else "image SSIM"
            ax.set_title(f"{side}s, {group} group: {metric}", fontsize=10)
            # SSIMs near 1 would otherwise be labelled as offsets ("1e-5+9.999e-1").
            ax.ticklabel_format(axis="y", useOffset=False, style="plain")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("layer index (module order)")
    fig.suptitle("Per-layer sensitivity: one layer quantized, the rest in floating point")
    return fig


def plot_bits(plan: dict, table: dict, path: Path):
    plt = _pyplot()
    names = [n for n in table if n in plan]
    fig, axes = plt.subplots(2, 1, figsize=(13, 5), sharex=True)
    for ax, key, label in ((axes[0], "w_bits", "weight bits"), (axes[1], "a_bits", "activation bits")):
        for group, color in GROUP_COLORS.items():
            index = [i for i, n in enumerate(names) if table[n]["group"] == group]
            ax.bar(index, [plan[names[i]][key] for i in index], color=color, width=1.0, label=group)
        ax.set_ylabel(label)
        ax.legend(fontsize=8, loc="upper right")
    axes[1].set_xlabel("layer index (module order)")
    fig.suptitle("Chosen bits along the network")
    _save(fig, path)


def plot_group_averages(averages: dict, targets: dict, path: Path):
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, side in zip(axes, ("weight", "activation")):
        groups = ["content", "quality", "all"]
        values = [averages[side].get(g, 0.0) for g in groups]
        ax.bar(groups, values, color=[GROUP_COLORS["content"], GROUP_COLORS["quality"], "tab:gray"])
        ax.axhline(targets[side], color="red", ls="--", label=f"budget {targets[side]:g}")
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=9)
        ax.set_title(f"{side}s: size-weighted average bits", fontsize=10)
        ax.legend(fontsize=8)
    _save(fig, path)


def _table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _fmt(value, digits=2):
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def sweep_rows(sweep: list[dict]) -> list[list[str]]:
    """One row per ratio of the sweep: skipped ratios say why, ties are marked."""
    rows = []
    for e in sweep:
        if "skipped" in e:
            rows.append([_fmt(e["ratio"]), "-", "-", "-", "-", f"skipped: {e['skipped']}"])
            continue
        note = "yes" if e.get("chosen") else "tie (within tolerance of the lowest MSE)" if e.get("tied") else ""
        rows.append([_fmt(e["ratio"], 4), _fmt(e.get("avg_content", float("nan"))),
                     _fmt(e.get("avg_quality", float("nan"))), _fmt(e["avg_all"], 3), f"{e['image_mse']:.3e}", note])
    return rows


def most_sensitive(table: dict, group: str, count: int = 5) -> str:
    """The layers hurt most by their lowest weight bit-width; for SSIM the loss 1 - SSIM is shown
    (the SSIMs themselves all print as 1 at 3 significant digits)."""
    members = sorted((min(row["weight"].items())[1], n) for n, row in table.items() if row["group"] == group)
    if group == "quality":
        return ", ".join(f"`{n}` {s:.3g} dB" for s, n in members[:count])
    return ", ".join(f"`{n}` 1-SSIM {1 - s:.2e}" for s, n in members[:count])


def content_section(rows: list[dict], grid: str | None) -> list[str]:
    """The content table, the paired comparisons with the plan (and the grid) of a proving-ground
    model's report."""
    from mixq.calib.content import PLAN_NAME, comparison_sentences, content_cpu_weights

    n = rows[0]["n"]
    lines = ["## Content on held-out prompts (real integer kernels)", "",
             (f"The content checker's verdicts on the images of {n} held-out evaluation prompts of the shapes grammar "
              "(never used in training or calibration), same seeds for every configuration, with 95 % Wilson "
              "intervals; PSNR/SSIM against the float images; edge sharpness (higher is crisper) and background "
              "noise (RMS, lower is cleaner) need no reference. The random allocations and the inverted ranking "
              "have the plan's budget and candidate bit-widths (mixq.calib.plans). " + WEIGHT_MODE_SENTENCES[content_cpu_weights()]),
             "",
             _table(["configuration", "avg W bits", "avg A bits", "content [95 % interval]", "count", "colour", "shape",
                     "size", "position", "PSNR (dB)", "SSIM", "sharpness", "bg noise"], [
                 [r["name"], _fmt(r["w_avg"]), _fmt(r["a_avg"]),
                  f"{r['content']['overall']:.1%} [{r['interval'][0]:.1%}, {r['interval'][1]:.1%}]",
                  *[f"{r['content'][k]:.1%}" for k in ("count", "color", "shape", "size", "position")],
                  _fmt(r["psnr"]), _fmt(r["ssim"], 4), _fmt(r["edge_sharpness"]), _fmt(r["background_noise"])]
                 for r in rows]), "",
             f"### The mixed plan against each configuration (paired, n = {n})", "",
             ("Content: the plan's share right minus the other's, exact McNemar test on the per-prompt verdicts. "
              "PSNR: mean over images of the plan's per-image PSNR against float minus the other's, with its 95 % "
              "interval. Better or worse is claimed only at p < 0.01."), "",
             _table(["configuration", "content difference", "McNemar p", "per-image PSNR difference (dB) [95 %]"], [
                 [r["name"], f"{r['vs_plan']['content_difference'] * 100:+.1f} points", f"{r['vs_plan']['mcnemar_p']:.2g}",
                  "{mean:+.2f} [{low:+.2f}, {high:+.2f}]".format(**r["vs_plan"]["psnr_difference"])
                  if "psnr_difference" in r["vs_plan"] else "-"]
                 for r in rows if r["name"] != PLAN_NAME]), ""]
    lines += [f"- {sentence}" for sentence in comparison_sentences(rows)] + [""]
    lines += components_section(rows)
    if grid:
        lines += [f"![content grid]({grid})", ""]
    return lines


def components_section(rows: list[dict]) -> list[str]:
    """The opt-in components' rows against the same UNet configuration alone (none: no lines)."""
    from mixq.calib.content import component_sentence

    added = [r for r in rows if "vs_unet_only" in r]
    if not added:
        return []
    return [f"### Quantized VAE decoder and text encoders against the UNet alone (paired, n = {added[0]['n']})", "",
            "Content and per-image PSNR against float of each configuration minus those of the same UNet "
            "configuration with the other components in floating point.", "",
            _table(["configuration", "against", "content difference", "McNemar p",
                    "per-image PSNR difference (dB) [95 %]"], [
                [r["name"], r["vs_unet_only"]["base"], f"{r['vs_unet_only']['content_difference'] * 100:+.1f} points",
                 f"{r['vs_unet_only']['mcnemar_p']:.2g}",
                 "{mean:+.2f} [{low:+.2f}, {high:+.2f}]".format(**r["vs_unet_only"]["psnr_difference"])
                 if "psnr_difference" in r["vs_unet_only"] else "-"] for r in added]), "",
            *[f"- {component_sentence(r)}" for r in added], ""]


def write_report(path: Path, *, config, budget: dict, command: str, averages: dict, sweeps: dict,
                 comparison: list[dict], table: dict, timings: dict, versions: dict, plots: dict,
                 noise_floor: str = "", content: list[dict] | None = None, frontier: dict | None = None):
    """report.md for the plan beside it: `budget` and `averages` are the plan's; `noise_floor` is the
    sensitivity measurement's floor, said next to the scores."""
    from mixq.proving import model as proving_model

    c = config
    lines = [
        f"# mixq calibration report: {c.name}",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- command: `{command}`",
        f"- model: `{c.model.id}` ({c.model.dtype}{', LoRA ' + c.model.lora + ' fused' if c.model.lora else ''})",
        f"- sampling: {c.sampling.num_inference_steps} step(s), guidance {c.sampling.guidance_scale:g}, seed {c.sampling.seed}",
        f"- calibration: {c.calibration.num_prompts} prompts for ranges, {c.calibration.sensitivity_prompts} for "
        f"sensitivity and plan selection ({c.calibration.prompts or 'built-in prompt set'})",
        f"- machine: {versions.get('device', '?')}; " + ", ".join(f"{k} {v}" for k, v in versions.items() if k != "device"),
        "- stage times: " + (", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
                             or "none before the report in this command (earlier stages' files reused)"),
        "",
        "## Plan",
        "",
        _table(["side", "budget", "content avg", "quality avg", "all avg"], [
            [side, f"{float(budget['w_bits'] if side == 'weight' else budget['a_bits']):g}",
             _fmt(averages[side].get("content", float("nan"))), _fmt(averages[side].get("quality", float("nan"))),
             _fmt(averages[side]["all"])]
            for side in ("weight", "activation")
        ]),
        "",
        "Averages are size-weighted (parameters for weights, activation elements for activations) over the "
        f"quantized layers; keep-fp layers ({', '.join(c.keep_fp)}) stay in floating point.",
        "",
        f"![average bits]({plots['groups']})",
        "",
        "## Fidelity against floating point (real integer kernels)",
        "",
        "UNet SQNR over the saved UNet calls of the sensitivity prompts; image PSNR/SSIM of the generated "
        "images, same prompts and seeds.",
        "",
        _table(["configuration", "avg weight bits", "avg act bits", "UNet SQNR (dB)", "image PSNR (dB)", "image SSIM"], [
            [r["name"], _fmt(r["w_avg"]), _fmt(r["a_avg"]), _fmt(r["unet_sqnr"]), _fmt(r["image_psnr"]), _fmt(r["image_ssim"], 4)]
            for r in comparison
        ]),
        "",
    ]
    verdicts = [r for r in comparison if r.get("verdict")]
    lines += [r["verdict"] for r in verdicts] + [""]
    if content:
        lines += content_section(content, plots.get("content_grid"))
    elif config.model.id == proving_model.MODEL_ID:
        lines += CONTENT_CHECK_SKIPPED
    if frontier and frontier.get("points"):
        from mixq.calib.frontier import sweep_section

        lines += sweep_section(frontier)
    lines += ["## Budget split sweep", "",
              ("Each ratio k sets content avg = k x quality avg within the budget; the sweep covers every ratio at "
               "which both groups' shares lie between their smallest and largest candidate averages (its ends "
               "included), so the two groups' metrics are never added. The plan with the lowest image MSE against "
               "the float images is chosen (the other side in floating point while sweeping); candidates within "
               f"{TIE_TOLERANCE:.0%} of the lowest MSE are ties, and the one with the fewest bits among them wins."), ""]
    if budget.get("quality_score", "db") == "noise":
        lines += ["The quality group's integer program sums each layer's noise power 10^(-SQNR/10) "
                  "(`budget.quality_score: noise`), not its SQNR in dB.", ""]
    for side, sweep in sweeps.items():
        lines += [f"**{side}s** (budget {float(budget['w_bits'] if side == 'weight' else budget['a_bits']):g})", "",
                  _table(["k", "content avg", "quality avg", "all avg", "image MSE", "chosen"], sweep_rows(sweep)), ""]
    lines += ["## Sensitivity", ""] + ([noise_floor, ""] if noise_floor else [])
    lines += [f"![sensitivity]({plots['sensitivity']})", "", f"![bits]({plots['bits']})", ""]
    lines += ["Most sensitive layers to low-bit weights (lowest score at the smallest candidate):", ""]
    for group in ("quality", "content"):
        lines += [f"- {group} ({'UNet SQNR' if group == 'quality' else 'image SSIM'}): {most_sensitive(table, group)}"]
    lines += [""]
    write_text_atomic(path, "\n".join(lines))
