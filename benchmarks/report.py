"""Turn a results folder into a Markdown report with a latency-vs-memory plot.

    python -m benchmarks.report --results benchmarks/results/cpu-2026-01-31

The folder holds what `python -m benchmarks.run` writes: benchmark.json (pytest-benchmark's
--benchmark-json, with the suite's "mixq" section), fidelity.json and grid.png (benchmarks.fidelity)
and run.json (the command and its sub-commands). The report goes beside the folder, as
<folder>.md, and the plot into the folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

BENCHMARK_FILE = "benchmark.json"
FIDELITY_FILE = "fidelity.json"
RUN_FILE = "run.json"
PLOT_FILE = "latency-memory.png"
SUITES = {"unet-step": "UNet step", "pipeline": "Whole pipeline, per image"}
BASELINE, TORCHAO = "fp", "torchao"
MIB = 2**20


# --- reading -------------------------------------------------------------------------------------


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def load_results(results_dir: Path) -> dict:
    bench = read_json(results_dir / BENCHMARK_FILE)
    if bench is None:
        raise FileNotFoundError(f"no {BENCHMARK_FILE} in {results_dir}: run `python -m benchmarks.run` "
                                "(or pytest with --benchmark-json) first")
    return {"bench": bench, "mixq": bench.get("mixq", {}), "fidelity": read_json(results_dir / FIDELITY_FILE),
            "run": read_json(results_dir / RUN_FILE) or {}}


def timing_rows(benchmarks: list[dict], suite: str) -> list[dict]:
    """One row per variant of a suite: label, median/mean/stddev in ms, rounds, memory."""
    rows = []
    for b in benchmarks:
        info = b.get("extra_info", {})
        if info.get("suite") != suite:
            continue
        stats = b["stats"]
        rows.append({"variant": info["variant"], "label": info["label"], "description": info.get("description", ""),
                     "median_ms": stats["median"] * 1e3, "min_ms": stats["min"] * 1e3, "mean_ms": stats["mean"] * 1e3,
                     "stddev_ms": stats["stddev"] * 1e3, "rounds": stats["rounds"], "memory": info.get("memory", {})})
    return rows


def ratio(numerator, denominator) -> float | None:
    if numerator is None or denominator in (None, 0):
        return None
    return numerator / denominator


def by_variant(rows: list[dict]) -> dict[str, dict]:
    return {row["variant"]: row for row in rows}


# --- formatting ----------------------------------------------------------------------------------


def fmt(value, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:,.{digits}f}{suffix}"


def mib(value) -> str:
    return fmt(None if value is None else value / MIB, 2)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def latency_table(rows: list[dict]) -> str:
    variants = by_variant(rows)
    fp = variants.get(BASELINE, {}).get("median_ms")
    torchao = variants.get(TORCHAO, {}).get("median_ms")
    body = [[r["label"], fmt(r["median_ms"]), fmt(r["min_ms"]), f"{fmt(r['mean_ms'])} ± {fmt(r['stddev_ms'])}",
             r["rounds"], fmt(ratio(fp, r["median_ms"]), suffix="x"), fmt(ratio(torchao, r["median_ms"]), suffix="x")]
            for r in rows]
    return markdown_table(["variant", "median ms", "min ms", "mean ± std ms", "rounds", "speedup vs fp",
                           "speedup vs torchao"], body)


def memory_table(rows: list[dict]) -> str:
    fp = by_variant(rows).get(BASELINE, {}).get("memory", {})
    body = []
    for r in rows:
        m = r["memory"]
        body.append([
            r["label"], mib(m.get("unet_bytes")), mib(m.get("text_encoders_bytes")), mib(m.get("vae_bytes")),
            fmt(ratio(fp.get("unet_bytes"), m.get("unet_bytes")), suffix="x"),
            mib(m.get("peak_step_bytes")), fmt(ratio(fp.get("peak_step_bytes"), m.get("peak_step_bytes")), suffix="x"),
            mib(m.get("peak_generation_bytes")),
            fmt(ratio(fp.get("peak_generation_bytes"), m.get("peak_generation_bytes")), suffix="x"),
        ])
    return markdown_table(["variant", "UNet MiB", "text encoders MiB", "VAE MiB", "UNet smaller by",
                           "peak UNet step MiB", "ratio", "peak generation MiB", "ratio"], body)


def fidelity_table(fidelity: dict) -> str:
    optional = fidelity.get("optional_metrics", {})
    content = any("content" in v for v in fidelity["variants"].values())
    body = []
    for name, v in sorted(fidelity["variants"].items(), key=lambda item: item[0] != BASELINE):  # reference first
        if name == BASELINE and not content:
            continue
        row = [v["label"], fmt(v.get("psnr_db")), fmt(v.get("ssim"), 4), fmt(v.get("unet_sqnr_db")),
               fmt(v.get("lpips"), 4) if "lpips" in v else "skipped",
               fmt(v.get("clip_score")) if "clip_score" in v else "skipped"]
        if name == BASELINE:
            row[1:6] = ["reference"] * 5
        body.append(row + ([f"{v['content']['overall']:.1%}" if "content" in v else "n/a"] if content else []))
    headers = ["variant", "PSNR dB", "SSIM", "UNet SQNR dB", "LPIPS", "CLIP score"]
    table = markdown_table(headers + (["content accuracy"] if content else []), body)
    notes = [f"- {metric}: {reason}" for metric, reason in optional.items() if reason != "computed"]
    if "clip_score" in fidelity["variants"].get(BASELINE, {}):
        notes.append(f"- CLIP score of the {fidelity['reference']} reference: {fmt(fidelity['variants'][BASELINE]['clip_score'])}")
    return table + ("\n\n" + "\n".join(notes) if notes else "")


# --- plot ----------------------------------------------------------------------------------------


def plot_latency_memory(suites: dict[str, list[dict]], path: Path, title: str = ""):
    """One panel per suite: median latency against the variant's weight memory, one labelled point each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mixq.io import atomic_path

    panels = [(suite, rows) for suite, rows in suites.items() if rows]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5.5 * max(len(panels), 1), 4), squeeze=False)
    for ax, (suite, rows) in zip(axes[0], panels):
        weights_of = unet_weight_mib if suite == "unet-step" else pipeline_weight_mib
        for r in rows:
            x, y = weights_of(r), r["median_ms"]
            ax.scatter([x], [y], s=40)
            ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xlabel("UNet weights (MiB)" if suite == "unet-step" else "all weights (MiB)")
        ax.set_ylabel("median latency (ms)")
        ax.set_title(SUITES[suite])
        ax.grid(True, alpha=0.3)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_title(mixq: dict) -> str:
    env, cfg = mixq.get("environment", {}), mixq.get("config", {})
    cpu_note = " - CPU: functional numbers, not GPU speed" if env.get("cuda") is None else ""
    return f"{env.get('device', '?')}, {cfg.get('name', '?')} config, {cfg.get('mode', '?')}{cpu_note}"


def unet_weight_mib(row: dict) -> float:
    return row["memory"].get("unet_bytes", 0) / MIB


def pipeline_weight_mib(row: dict) -> float:
    m = row["memory"]
    return sum(m.get(k, 0) for k in ("unet_bytes", "text_encoders_bytes", "vae_bytes")) / MIB


# --- the report ----------------------------------------------------------------------------------


def setup_table(cfg: dict, env: dict, bench: dict) -> str:
    cuda = env.get("cuda") is not None
    if cfg.get("name") == "proving":
        model = "proving-ground pipeline shipped in mixq (SDXL architecture, small widths, trained on flat shapes)"
    elif cfg.get("name") == "tiny":
        model = "tiny SDXL-structured pipeline (mixq.offline), random weights"
    else:
        components = f"from {Path(cfg['components']).name}/" if cfg.get("components") else "SDXL 1.0's (built in)"
        model = (f"SDXL-Turbo UNet architecture from --unet-config; text encoders and VAE configs {components}; "
                 "random weights")
    rows = [
        ["config", cfg.get("name")], ["model", model], ["device", env.get("device")],
        ["floating-point dtype", cfg.get("dtype")],
        ["image", f"{cfg.get('resolution')}x{cfg.get('resolution')}, batch 1, {cfg.get('steps')} step(s), guidance 0"],
        ["mixq kernels", env.get("mixq_kernel_backend", "?")],
        ["UNet mode (all variants)", cfg.get("mode")],
        ["rounds / warm-up calls", f"{cfg.get('rounds')} / {cfg.get('warmup')}"],
        ["timing", "CUDA events around each round" if cuda else "time.perf_counter around each round"],
        ["date", bench.get("datetime", "?")],
    ]
    return markdown_table(["", ""], rows)


def describe_variants(rows: list[dict]) -> str:
    return "\n".join(f"- **{r['label']}**: {r['description']}" for r in rows)


def outcome_notes(mixq: dict, fidelity: dict | None) -> list[str]:
    notes = [f"- `{o['test']}` {o['outcome']} ({o['when']}): {o['reason']}" for o in mixq.get("outcomes", [])]
    for name, reason in (fidelity or {}).get("skipped_variants", {}).items():
        notes.append(f"- fidelity of `{name}` skipped: {reason}")
    return notes


def environment_table(env: dict) -> str:
    versions = env.get("versions", {})
    rows = [["device", env.get("device")], ["python", env.get("python")], ["platform", env.get("platform")],
            ["CUDA", env.get("cuda") or "none"]]
    if env.get("load_average_1min") is not None:
        rows.append(["CPU load average (1 min) when the timings ended", env["load_average_1min"]])
    rows += [[name, version or "not installed"] for name, version in versions.items()]
    return markdown_table(["", ""], rows)


def render(results: dict, folder: str) -> str:
    """The report's Markdown; `folder` is the results folder as seen from the report (for image links)."""
    bench, mixq, fidelity, run = results["bench"], results["mixq"], results["fidelity"], results["run"]
    cfg, env = mixq.get("config", {}), mixq.get("environment", {})
    suites = {suite: timing_rows(bench["benchmarks"], suite) for suite in SUITES}
    cpu = env.get("cuda") is None
    out = [f"# mixq benchmarks: {env.get('device', '?')}, {cfg.get('name', '?')} config, "
           f"{bench.get('datetime', '?')[:10]}", ""]
    if cpu:
        tiny = " on a small model" if cfg.get("name") in ("tiny", "proving") else ""
        backend = env.get("mixq_kernel_backend", "?")
        out += [f"> **CPU numbers from this machine{tiny}: functional, not representative of GPU speed.** "
                f"Quantized layers run on mixq's `{backend}` CPU backend; at small widths each layer's "
                "activation quantization and epilogue cost more than its tiny GEMM saves, so quantized "
                "variants can be slower than floating point here (the full-size UNet on CPU: "
                "`python -m benchmarks.cpu_unet`). Peak memory is measured on CUDA only.", ""]
        load, cores = env.get("load_average_1min"), env.get("cpu_count")
        if load is not None and cores and load > cores:  # the run itself keeps about `cores` busy
            out += [f"> Other processes were busy on this machine during the run (load average {load} on "
                    f"{cores} cores): the timings are noisy; medians are the steadiest figure.", ""]
    out += ["## Setup", "", setup_table(cfg, env, bench), "", "Variants:", "",
            describe_variants(suites["unet-step"] or suites["pipeline"]), ""]
    for suite, title in SUITES.items():
        out += [f"## Latency: {title}", "", latency_table(suites[suite]) if suites[suite] else "_not run_", ""]
    out += ["Speedups are ratios of medians (fp / variant, torchao / variant); n/a where a side did not run.", ""]
    out += ["## Memory", "", memory_table(suites["unet-step"] or suites["pipeline"]), "",
            "Static bytes are every parameter and buffer of a component (packed integer weights, scales and "
            "stored BOS rows for mixq). Peak = the variant's weights + the most memory allocated above them "
            "during one call (torch.cuda.max_memory_allocated), measured before any CUDA graph capture; "
            "'n/a' off CUDA. Ratios are fp / variant.", ""]
    out += [f"![latency vs memory]({folder}/{PLOT_FILE})", ""]
    out += ["## Fidelity against the floating-point pipeline", ""]
    if fidelity:
        out += [f"{len(fidelity['prompts'])} prompts, seeds {fidelity['seeds'][0]}..{fidelity['seeds'][-1]}, "
                f"reference {fidelity['reference']}. PSNR and SSIM (uniform near-global window, as MixDQ) of the "
                "images; SQNR of the first UNet step's output on the reference's inputs.", "",
                fidelity_table(fidelity), "", f"![image grid]({folder}/{fidelity['grid']})", "",
                f"Grid columns: {' | '.join(fidelity['grid_columns'])}.", ""]
        if fidelity.get("content_grid"):
            out += ["Content accuracy: the share of prompts whose image the proving ground's checker finds "
                    "right on every attribute (count, colour, shape, size, position). Each image's verdict:", "",
                    f"![content grid]({folder}/{fidelity['content_grid']})", ""]
        if fidelity.get("content_skipped"):
            out += [f"_{fidelity['content_skipped']}_", ""]
    else:
        out += ["_not run_", ""]
    notes = outcome_notes(mixq, fidelity)
    if notes:
        out += ["## Skipped or failed", "", *notes, ""]
    out += ["## Command and environment", ""]
    if run.get("command"):
        out += ["```", run["command"], "```", ""]
        out += ["which ran:", "", "```", *run.get("steps", []), "```", ""]
    out += [environment_table(env), ""]
    return "\n".join(out)


def write_report(results_dir, out: Path | None = None) -> Path:
    from mixq.io import write_text_atomic

    results_dir = Path(results_dir)
    results = load_results(results_dir)
    suites = {suite: timing_rows(results["bench"]["benchmarks"], suite) for suite in SUITES}
    plot_latency_memory(suites, results_dir / PLOT_FILE, plot_title(results["mixq"]))
    out = Path(out) if out else results_dir.parent / f"{results_dir.name}.md"
    folder = Path(os.path.relpath(results_dir.resolve(), out.resolve().parent)).as_posix()
    write_text_atomic(out, render(results, folder))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", required=True, type=Path, help="a results folder written by benchmarks.run")
    parser.add_argument("--out", type=Path, default=None, help="report path (default: <results>.md beside the folder)")
    args = parser.parse_args(argv)
    print(f"wrote {write_report(args.results, args.out)}")


if __name__ == "__main__":
    main()
