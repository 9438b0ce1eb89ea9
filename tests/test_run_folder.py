"""A calibration run folder tells the truth: re-budgeting keeps config.yaml, plan.yaml and report.md
in agreement; bad budgets, missing prompts and infeasible budgets are refused before the model loads
with nothing written; a failed run never blocks its folder; changed inputs are refused naming what
changed; unchanged stages are skipped; `--help`'s examples run as printed; the report's sweep,
footer, plot axis and sensitive-layer list are right; the demo table and benchmark results too."""

from __future__ import annotations

import hashlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

import mixq.calib.config as config_module
import mixq.calib.run as run_module
from mixq.calib import sensitivity as sensitivity_module
from mixq.calibrate import main, parse_args
from tests.test_cli import save_tiny_pipeline, write_small_config


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(run_module, "load_pipeline", refuse)


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def report_plan_rows(report: str) -> dict:
    """{side: (budget, all avg)} from report.md's Plan table."""
    rows = {}
    for side in ("weight", "activation"):
        cells = re.search(rf"^\| {side} \| (.*?) \|$", report, re.M).group(1).split(" | ")
        rows[side] = (float(cells[0]), float(cells[3]))
    return rows


def recomputed_weight_average(folder: Path) -> float:
    table = yaml.safe_load((folder / "sensitivity.yaml").read_text())["layers"]
    plan = yaml.safe_load((folder / "plan.yaml").read_text())["layers"]
    params = {n: row["params"] for n, row in table.items()}
    return sum(params[n] * plan[n]["w_bits"] for n in table) / sum(params.values())


def assert_folder_agrees(folder: Path, w_bits: float):
    config = yaml.safe_load((folder / "config.yaml").read_text())
    plan = yaml.safe_load((folder / "plan.yaml").read_text())
    report = report_plan_rows((folder / "report.md").read_text())
    assert config["budget"]["w_bits"] == plan["budget"]["w_bits"] == report["weight"][0] == w_bits
    actual = recomputed_weight_average(folder)
    assert actual <= w_bits + 1e-6
    assert plan["averages"]["weight"]["all"] == pytest.approx(actual, abs=1e-4)
    assert report["weight"][1] == pytest.approx(actual, abs=0.005)
    assert report["activation"][0] == config["budget"]["a_bits"]


# --- re-budgeting -------------------------------------------------------------------------------


def test_rebudget_4_to_3_5_to_5_keeps_config_plan_and_report_in_agreement(folder, monkeypatch, capsys):
    monkeypatch.setattr(sensitivity_module, "measure_layer", lambda *a, **k: pytest.fail("re-measured a layer"))
    assert_folder_agrees(folder, 4.0)
    for budget in (3.5, 5.0):
        # As --help prints it: no --config, the folder's own config is used.
        assert main(["--out", str(folder), "--stage", "allocate", "--w-bits", str(budget), "--no-progress"]) == 0
        assert_folder_agrees(folder, budget)
    assert "k=nan" not in capsys.readouterr().out
    # Regenerating the report alone keeps describing the 5-bit plan and does not rewrite the budget.
    assert main(["--out", str(folder), "--stage", "report", "--no-progress"]) == 0
    assert_folder_agrees(folder, 5.0)
    history = sorted(p.name for p in (folder / "plans").iterdir())
    assert history == ["w3.50-a8.00.yaml", "w4.00-a8.00.yaml", "w5.00-a8.00.yaml"]
    old = yaml.safe_load((folder / "plans" / "w3.50-a8.00.yaml").read_text())
    assert old["budget"]["w_bits"] == 3.5 and old["averages"]["weight"]["all"] <= 3.5 + 1e-6


def test_sweep_lists_skipped_ratios_and_why(folder):
    assert main(["--out", str(folder), "--stage", "allocate", "--w-bits", "3.5", "--no-progress"]) == 0
    sweeps = yaml.safe_load((folder / "allocation.yaml").read_text())["sweeps"]
    ratios = yaml.safe_load((folder / "config.yaml").read_text())["budget"]["ratios"]
    report = (folder / "report.md").read_text()
    weight_table = report.split("**weights**", 1)[1].split("**activations**", 1)[0]
    skipped = [e for e in sweeps["weight"] if "skipped" in e]
    swept = [e for e in sweeps["weight"] if "skipped" not in e]
    assert skipped, "at 3.5 bits the quality group (4-bit minimum) cannot take k >= 1"
    assert {e["ratio"] for e in skipped} <= set(ratios)  # only configured ratios are skipped, each listed
    assert set(ratios) <= {e["ratio"] for e in sweeps["weight"]}
    assert len(swept) >= len(ratios) and sum(e.get("chosen", False) for e in swept) == 1  # the range is filled in
    for entry in skipped:
        assert f"| {entry['ratio']:.2f} | - | - | - | - | skipped: {entry['skipped']} |" in weight_table
        assert "below its smallest candidate average" in entry["skipped"]
    assert "None" not in weight_table and "nan" not in weight_table and "joint" not in weight_table


# --- refused before the model loads, nothing written ---------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--w-bits", "9"], "--w-bits 9 (config field 'budget.w_bits') is outside 2..8"),
    (["--w-bits", "-2"], "--w-bits -2 (config field 'budget.w_bits') is outside 2..8"),
    (["--a-bits", "4"], "--a-bits 4 (config field 'budget.a_bits') is outside 8..8"),
    (["--prompts", "goood.txt"], "prompts file goood.txt does not exist"),
])
def test_bad_budget_or_prompts_refused_before_loading_nothing_written(tmp_path, capsys, no_model_load, flags, message):
    config = write_small_config(tmp_path / "small.yaml")
    out = tmp_path / "fresh"
    assert main(["--config", config, "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--w-bits", "9"], "is outside 2..8"),
    (["--w-bits", "-2"], "is outside 2..8"),
    (["--w-bits", "2.5"], "infeasible: with every layer at its smallest candidate bit-width the weights already "
                          "average"),
    (["--prompts", "goood.txt", "--stage", "collect"], "does not exist"),
])
def test_refusals_leave_a_finished_folder_unchanged(folder, capsys, no_model_load, flags, message):
    before = snapshot(folder)
    assert main(["--out", str(folder), *flags]) == 2
    assert message in capsys.readouterr().err
    assert snapshot(folder) == before


def test_infeasible_budget_on_a_fresh_folder_is_refused_before_anything_is_written(tmp_path, capsys):
    # The exact floor needs the layer sizes (the model), but nothing runs or is written before it.
    config = write_small_config(tmp_path / "small.yaml")
    out = tmp_path / "fresh"
    assert main(["--config", config, "--out", str(out), "--w-bits", "2.2", "--no-progress"]) == 2
    assert "infeasible" in capsys.readouterr().err
    assert not out.exists()


def test_a_failed_run_never_blocks_its_folder(tmp_path, capsys):
    """Issue 13, finding 7: a typo in --prompts, then the corrected run into the same --out."""
    config = write_small_config(tmp_path / "small.yaml")
    out = tmp_path / "run"
    prompts = tmp_path / "good.txt"
    prompts.write_text("a red bus\na cat on a sofa\n")
    assert main(["--config", config, "--out", str(out), "--prompts", str(tmp_path / "goood.txt")]) == 2
    assert not out.exists()
    # A folder left by an older version (config.yaml written before the failure) does not block either.
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump({**yaml.safe_load(Path(config).read_text()),
                                                     "calibration": {"prompts": "goood.txt"}}))
    args = ["--config", config, "--out", str(out), "--prompts", str(prompts), "--stage", "collect", "--no-progress"]
    assert main(args) == 0, capsys.readouterr().err
    assert yaml.safe_load((out / "config.yaml").read_text())["calibration"]["prompts"] == str(prompts)


def test_changed_inputs_are_refused_naming_what_changed(folder, tmp_path, capsys, no_model_load):
    assert main(["--out", str(folder), "--steps", "2", "--stage", "allocate"]) == 2
    err = capsys.readouterr().err
    assert "sampling.num_inference_steps: 1 -> 2" in err and "use a new --out folder" in err
    other = write_small_config(tmp_path / "other.yaml", keep_fp=["conv_in"])
    assert main(["--config", other, "--out", str(folder), "--stage", "allocate"]) == 2
    assert "keep_fp:" in capsys.readouterr().err


def test_changed_prompt_file_contents_are_refused(tmp_path, capsys):
    config = write_small_config(tmp_path / "small.yaml")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red bus\na cat on a sofa\n")
    out = tmp_path / "run"
    args = ["--config", config, "--out", str(out), "--prompts", str(prompts), "--stage", "collect", "--no-progress"]
    assert main(args) == 0
    prompts.write_text("a red bus\na dog in the snow\n")
    before = snapshot(out)
    assert main(args) == 2
    assert "the calibration prompts (content hash)" in capsys.readouterr().err
    assert snapshot(out) == before


def test_unchanged_stages_are_skipped(folder, monkeypatch, capsys):
    monkeypatch.setattr(sensitivity_module, "measure_layer", lambda *a, **k: pytest.fail("re-measured a layer"))
    monkeypatch.setattr(run_module, "calibrate_ranges", lambda *a, **k: pytest.fail("re-collected"))
    before = snapshot(folder)
    assert main(["--out", str(folder), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "collect: skipped" in out and "sensitivity: skipped" in out
    assert "allocate: wrote" not in out and "report: wrote" not in out
    assert snapshot(folder) == before


# --- --help examples ------------------------------------------------------------------------------


def help_examples(capsys) -> list[str]:
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    return [line.split("#")[0].strip() for line in text.splitlines() if line.strip().startswith("python -m mixq.calibrate")]


def test_help_examples_run_as_printed(tmp_path, monkeypatch, capsys):
    """Every example that needs no download runs, word for word, in a fresh folder (the offline
    default config shrunk to the small one to keep it quick); the others parse and name a shipped
    config. The local-folder example gets a saved pipeline at its path."""
    examples = help_examples(capsys)
    assert len(examples) >= 6
    monkeypatch.chdir(tmp_path)
    small_default = write_small_config(tmp_path / "small-default.yaml", name="proving",
                                       evaluation={"content_prompts": 4, "grid_prompts": 0})
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG", small_default)
    offline = [e for e in examples if "--config" not in e]
    assert any("--model" in e for e in offline) and any("--stage allocate" in e for e in offline)
    for example in offline:
        words = shlex.split(example)[3:]
        if "--model" in words:
            save_tiny_pipeline(Path(words[words.index("--model") + 1]))
        assert main([*words, "--no-progress"]) == 0, (example, capsys.readouterr().err)
    rebudgeted = yaml.safe_load(Path("runs/proving/plan.yaml").read_text())
    assert rebudgeted["budget"]["w_bits"] == 3.5
    from mixq.configs.shipped import shipped_configs

    for example in examples:
        args = parse_args(shlex.split(example)[3:])
        assert args.config is None or args.config in shipped_configs()


# --- report, demo, benchmarks ---------------------------------------------------------------------


def test_report_has_no_footer_and_sensible_content_values(finished):
    report = (finished / "report.md").read_text()
    assert not re.search(r"^Python \d", report, re.M)
    content_line = next(line for line in report.splitlines() if line.startswith("- content"))
    values = [float(v) for v in re.findall(r"1-SSIM ([0-9.e+-]+)", content_line)]
    assert values and all(0 <= v < 1 for v in values) and len(set(values)) > 1
    quality_line = next(line for line in report.splitlines() if line.startswith("- quality"))
    assert re.search(r"\d dB", quality_line)


def test_sensitivity_plot_has_no_offset_notation(finished):
    from mixq.calib.report import sensitivity_figure

    table = yaml.safe_load((finished / "sensitivity.yaml").read_text())["layers"]
    figure = sensitivity_figure(table)
    figure.canvas.draw()
    for ax in figure.axes:
        assert ax.yaxis.get_offset_text().get_text() == ""
    content_ax = figure.axes[1]
    labels = [t.get_text() for t in content_ax.get_yticklabels() if t.get_text()]
    assert labels and all("e" not in label and "+" not in label for label in labels)


def test_demo_table_follows_both_results_aligned_and_names_its_metric(capsys):
    from mixq.__main__ import main as demo

    demo(["--model", "tiny-sdxl", "--table", "--num-prompts", "2"])
    lines = capsys.readouterr().out.splitlines()
    w8 = next(i for i, line in enumerate(lines) if line.startswith("W8A8:"))
    w4 = next(i for i, line in enumerate(lines) if line.startswith("W4A8:"))
    header = next(i for i, line in enumerate(lines) if line.startswith("layer "))
    assert w8 < w4 < header and "W4A8 per-layer table" in lines[header - 1]
    assert any("latent SQNR" in line and "against floating point" in line for line in lines[:w8])
    rows = [line for line in lines[header + 2:] if line and not line.startswith("-")][:-1]
    kind_column = lines[header].index(" kind ")
    assert len(rows) > 300 and all(row[kind_column] == " " and row[kind_column + 1] in "lc" for row in rows)


def test_benchmarks_never_overwrite_existing_results(tmp_path, monkeypatch):
    import benchmarks.run as bench

    assert bench.results_name(tmp_path, "cpu-2026-01-01", explicit=False, overwrite=False) == "cpu-2026-01-01"
    (tmp_path / "cpu-2026-01-01").mkdir()
    (tmp_path / "cpu-2026-01-01-2.md").write_text("committed")
    assert bench.results_name(tmp_path, "cpu-2026-01-01", explicit=False, overwrite=False) == "cpu-2026-01-01-3"
    assert bench.results_name(tmp_path, "cpu-2026-01-01", explicit=False, overwrite=True) == "cpu-2026-01-01"
    with pytest.raises(ValueError, match="already exists"):
        bench.results_name(tmp_path, "cpu-2026-01-01", explicit=True, overwrite=False)
    # The command itself: the committed folder is left alone, the run goes to a new name.
    (tmp_path / "cpu-2026-01-01" / "run.json").write_text("committed")
    monkeypatch.setattr(bench.subprocess, "call", lambda step: 1)
    import datetime

    class Day(datetime.date):
        @classmethod
        def today(cls):
            return cls(2026, 1, 1)

    monkeypatch.setattr(bench.datetime, "date", Day)
    assert bench.run(["--config", "tiny", "--quick", "--out", str(tmp_path)]) == 1
    assert (tmp_path / "cpu-2026-01-01" / "run.json").read_text() == "committed"
    assert (tmp_path / "cpu-2026-01-01-3" / "run.json").is_file()
