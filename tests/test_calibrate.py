"""`python -m mixq.calibrate` end to end on the offline tiny pipeline: plan, report, resume, stages,
errors. A reduced config (fewer prompts and candidate bits) keeps it quick on 2 cores."""

import copy
from pathlib import Path

import pytest
import yaml

import mixq
from mixq.calib import sensitivity as sensitivity_module
from mixq.calib.config import ConfigError, load_config
from mixq.calibrate import main
from tests.conftest import capture_unet_call, unet_output

FAST_CONFIG = {
    "name": "tiny-test",
    "model": {"id": "offline:tiny-sdxl"},
    "sampling": {"num_inference_steps": 1, "guidance_scale": 0.0, "seed": 7},
    "calibration": {"num_prompts": 4, "sensitivity_prompts": 2, "batch_size": 4},
    "keep_fp": ["conv_in", "conv_out"],
    "bits": {"weight_content": [2, 4, 8], "weight_quality": [4, 8], "activation": [8]},
    "budget": {"w_bits": 4.0, "a_bits": 8.0, "ratios": [0.8, 1.0, 1.25]},
}


def write_config(path, **overrides):
    config = copy.deepcopy(FAST_CONFIG)
    for section, values in overrides.items():
        config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibration")
    config = write_config(root / "config.yaml")
    out = root / "run"
    assert main(["--config", config, "--out", str(out), "--no-progress"]) == 0
    return config, out


def test_run_writes_plan_tables_ranges_and_report(finished_run):
    _, out = finished_run
    for name in ("plan.yaml", "sensitivity.yaml", "allocation.yaml", "activation_ranges.safetensors", "report.md",
                 "sensitivity.png", "bits.png", "group_bits.png"):
        assert (out / name).stat().st_size > 0, name
    assert not list(out.glob(".*.tmp")), "temporary files left behind"
    report = (out / "report.md").read_text()
    for heading in ("## Plan", "## Fidelity against floating point", "## Budget split sweep", "## Sensitivity"):
        assert heading in report
    table = yaml.safe_load((out / "sensitivity.yaml").read_text())["layers"]
    row = table["down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"]
    assert row["group"] == "content" and row["metric"] == "ssim" and set(row["weight"]) == {2, 4, 8}
    row = table["down_blocks.1.resnets.0.conv1"]
    assert row["group"] == "quality" and row["metric"] == "sqnr_db" and set(row["weight"]) == {4, 8}
    assert row["weight"][8] > row["weight"][4]  # more bits, less noise


def test_plan_meets_the_budget_in_both_groups(finished_run):
    _, out = finished_run
    plan = yaml.safe_load((out / "plan.yaml").read_text())
    sweeps = yaml.safe_load((out / "allocation.yaml").read_text())["sweeps"]
    table = yaml.safe_load((out / "sensitivity.yaml").read_text())["layers"]
    layers = plan["layers"]
    assert layers["conv_in"] == {"w_bits": 16, "a_bits": 16}
    params = {n: row["params"] for n, row in table.items()}
    chosen = next(e for e in sweeps["weight"] if e.get("chosen"))
    for group in ("content", "quality"):
        members = [n for n in table if table[n]["group"] == group]
        avg = sum(params[n] * layers[n]["w_bits"] for n in members) / sum(params[n] for n in members)
        assert avg == pytest.approx(chosen[f"avg_{group}"], abs=1e-3)
    content_size = sum(params[n] for n in table if table[n]["group"] == "content")
    quality_size = sum(params[n] for n in table if table[n]["group"] == "quality")
    from mixq.calib.allocate import group_budgets

    content_budget, quality_budget = group_budgets(4.0, chosen["ratio"], content_size, quality_size)
    assert chosen["avg_content"] <= content_budget + 1e-6 and chosen["avg_quality"] <= quality_budget + 1e-6
    overall = sum(params[n] * layers[n]["w_bits"] for n in table) / sum(params.values())
    assert overall <= 4.0 + 1e-6
    assert {layers[n]["w_bits"] for n in table} > {4}  # really mixed


def test_plan_beats_uniform_quantization_at_the_same_average_bits(finished_run, _tiny_sdxl_master):
    _, out = finished_run
    pipe = copy.deepcopy(_tiny_sdxl_master)
    call = capture_unet_call(pipe)
    reference = unet_output(pipe.unet, call)
    planned = mixq.quantize(copy.deepcopy(pipe), plan=str(out / "plan.yaml"), calibration=str(out))
    uniform = mixq.quantize(copy.deepcopy(pipe), 4, 8, calibration=str(out))
    planned_sqnr = mixq.sqnr_db(reference, unet_output(planned.unet, call))
    uniform_sqnr = mixq.sqnr_db(reference, unet_output(uniform.unet, call))
    print(f"UNet SQNR: mixed plan {planned_sqnr:.2f} dB, uniform W4A8 {uniform_sqnr:.2f} dB")
    assert planned_sqnr > uniform_sqnr
    report = (out / "report.md").read_text()
    # The report's sentence follows its paired test over the few recorded UNet outputs of this small run.
    verdict = next(line for line in report.splitlines() if line.startswith("The mixed plan") and "uniform W4" in line)
    assert ("is better than uniform W4" in verdict) == ("no significant difference" not in verdict)
    assert "WORSE" not in verdict


def test_allocate_stage_alone_reuses_sensitivities(finished_run, monkeypatch, tmp_path):
    config, out = finished_run

    def must_not_measure(*args, **kwargs):
        raise AssertionError("the allocate stage re-measured a layer")

    monkeypatch.setattr(sensitivity_module, "measure_layer", must_not_measure)
    assert main(["--config", config, "--out", str(out), "--stage", "allocate", "--w-bits", "3.5", "--no-progress"]) == 0
    plan = yaml.safe_load((out / "plan.yaml").read_text())
    table = yaml.safe_load((out / "sensitivity.yaml").read_text())["layers"]
    params = {n: row["params"] for n, row in table.items()}
    avg = sum(params[n] * plan["layers"][n]["w_bits"] for n in table) / sum(params.values())
    assert avg <= 3.5 + 1e-6
    assert plan["budget"]["w_bits"] == 3.5
    # Back to the budget the other tests read.
    assert main(["--config", config, "--out", str(out), "--stage", "allocate", "--no-progress"]) == 0


def test_config_errors_name_the_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**FAST_CONFIG, "sampling": {"num_inference_step": 2}}))
    assert main(["--config", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "unknown config field sampling.'num_inference_step'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="'bits.weight_content'.*unsupported weight bit-width 3"):
        load_config(write_config(tmp_path / "b.yaml", bits={"weight_content": [3, 4]}))
    with pytest.raises(ConfigError, match="'budget.w_bits' must be float"):
        load_config(write_config(tmp_path / "c.yaml", budget={"w_bits": "four"}))
    assert load_config(None).name == "proving"
    assert load_config("sdxl-turbo").model.id == "stabilityai/sdxl-turbo"


def test_budget_below_the_smallest_candidate_is_refused(finished_run, capsys):
    config, out = finished_run
    assert main(["--config", config, "--out", str(out), "--stage", "allocate", "--w-bits", "1.5"]) == 2
    assert "is outside 2..8" in capsys.readouterr().err
    assert main(["--config", config, "--out", str(out), "--stage", "allocate", "--w-bits", "2.1"]) == 2
    err = capsys.readouterr().err
    assert "infeasible" in err and "smallest candidate bit-width the weights already average" in err
    assert main(["--config", config, "--out", str(out), "--stage", "allocate", "--no-progress"]) == 0


def test_plan_and_ranges_from_another_model_are_refused(finished_run, tiny_sd15):
    _, out = finished_run
    with pytest.raises(mixq.PlanMismatchError, match="another model"):
        mixq.quantize(tiny_sd15, plan=str(out / "plan.yaml"), calibration=str(out))
    with pytest.raises(ValueError, match="another model"):
        mixq.quantize(tiny_sd15, 8, 8, calibration=str(out))
    assert not any(isinstance(m, mixq.QLinear) for m in tiny_sd15.unet.modules())


def test_changed_measurement_settings_need_a_new_folder(finished_run, tmp_path, capsys):
    _, out = finished_run
    other = write_config(tmp_path / "other.yaml", sampling={"num_inference_steps": 2})
    assert main(["--config", other, "--out", str(out), "--stage", "allocate"]) == 2
    assert "sampling.num_inference_steps: 1 -> 2" in capsys.readouterr().err


def test_missing_prompts_file_is_a_clear_error(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml")
    assert main(["--config", config, "--out", str(tmp_path / "r"), "--prompts", str(tmp_path / "nope.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_killed_process_resumes_without_remeasuring(tmp_path):
    """A real SIGKILL in the middle of the sensitivity stage: the table on disk stays valid, and the
    rerun measures only the layers that were not finished."""
    import os
    import signal
    import subprocess
    import sys
    import time

    config = write_config(tmp_path / "c.yaml", bits={"weight_content": [4], "weight_quality": [4], "activation": [8]})
    out = tmp_path / "run"
    table_path = out / "sensitivity.yaml"
    command = [sys.executable, "-m", "mixq.calibrate", "--config", config, "--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            if table_path.exists() and len((yaml.safe_load(table_path.read_text()) or {}).get("layers", {})) >= 20:
                break
            time.sleep(0.2)
        assert process.poll() is None, "the run finished before it could be killed"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    done_before = yaml.safe_load(table_path.read_text())["layers"]
    assert len(done_before) >= 20 and not (out / "plan.yaml").exists()

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    final = yaml.safe_load(table_path.read_text())["layers"]
    assert f"resuming, {len(done_before)} of {len(final)} layers already measured" in rerun.stdout
    assert f"measured {len(final) - len(done_before)} layers" in rerun.stdout
    assert all(final[name] == row for name, row in done_before.items())
    assert (out / "plan.yaml").exists()


def run_small_proving(root: Path, name: str, content_prompts: int, **extra) -> Path:
    """The offline default's model and prompt set, shrunk (most layers kept float, few prompts), run
    end to end into root/run; `extra`: more config fields."""
    config = write_config(root / "proving.yaml", name=name, model={"id": "offline:proving"},
                          sampling={"num_inference_steps": 4, "guidance_scale": 0.0, "height": 64, "width": 64,
                                    "seed": 1},
                          calibration={"prompts": "proving:calibration", "num_prompts": 4, "sensitivity_prompts": 2,
                                       "batch_size": 4},
                          keep_fp=["conv_in", "conv_out", "down_blocks.*", "up_blocks.*"],
                          evaluation={"content_prompts": content_prompts, "grid_prompts": 2}, **extra)
    out = root / "run"
    assert main(["--config", config, "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def proving_run(tmp_path_factory):
    return run_small_proving(tmp_path_factory.mktemp("proving"), "proving-test", content_prompts=6)


def test_the_offline_default_ends_with_the_plan_and_says_how_to_add_the_content_check(tmp_path):
    """The offline default skips the 1000-prompt content check (the first command ends with the plan); its
    report names the flag that adds it, which .ci/run runs for the quality gate."""
    default = load_config(None)
    assert default.model.id == "offline:proving" and default.evaluation.content_prompts == 0
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "python -m mixq.calibrate --content-prompts 1000" in ci
    out = run_small_proving(tmp_path, "proving-no-content", content_prompts=0)
    report = (out / "report.md").read_text()
    assert "Not checked in this run" in report and "--content-prompts 1000" in report
    assert not (out / "content.yaml").exists()


def test_proving_report_has_content_of_every_configuration(proving_run):
    """The report gains the content table (float, uniform W8A8/W4A8, W2A8 content-only, the plan, the
    plan without BOS handling, the same-budget baselines), content.yaml and the verdict grid."""
    from mixq.calib.content import INVERTED_NAME, PLAN_NAME, RANDOM_SEEDS, random_name

    out = proving_run
    content = yaml.safe_load((out / "content.yaml").read_text())
    names = [row["name"] for row in content["rows"]]
    assert names[:6] == ["float", "uniform W8A8", "uniform W4A8", "W2A8 content group only", PLAN_NAME,
                         PLAN_NAME + " without BOS handling"]
    assert names[6:] == [INVERTED_NAME, *(random_name(seed) for seed in RANDOM_SEEDS)]  # same-budget baselines
    rows = {row["name"]: row for row in content["rows"]}
    assert rows["float"]["ssim"] == 1.0 and rows["uniform W4A8"]["psnr"] < rows["uniform W8A8"]["psnr"]
    assert rows["uniform W4A8"]["w_avg"] == 4.0 and 4.0 < rows["W2A8 content group only"]["w_avg"] < 16.0
    assert all(0.0 <= row["content"]["overall"] <= 1.0 for row in rows.values())
    # The shipped model draws what is asked (99.5 % on 200 prompts); W8A8 of a few blocks keeps it.
    assert rows["float"]["content"]["overall"] >= 0.8 and rows["uniform W8A8"]["content"]["overall"] >= 0.8
    report = (out / "report.md").read_text()
    assert "## Content on held-out prompts" in report and "![content grid](content_grid.png)" in report
    assert "uniform W4A8 (4.00 avg weight bits, 8.00 activation)" in report and "McNemar p = " in report
    assert (out / "content_grid.png").stat().st_size > 0


def test_rebudget_reuses_the_plan_independent_content_rows(proving_run, monkeypatch, capsys):
    """A new budget generates only the plan and its no-BOS twin; the cached rows equal fresh ones, and
    a cache under another key (here: damaged) is regenerated, not trusted."""
    from mixq.calib.content import PLAN_INDEPENDENT

    out = proving_run
    first = yaml.safe_load((out / "content.yaml").read_text())["rows"]
    capsys.readouterr()
    assert main(["--out", str(out), "--stage", "allocate", "--w-bits", "5", "--no-progress"]) == 0
    said = capsys.readouterr().out
    reused = [line for line in said.splitlines() if line.endswith("(reused)")]
    assert len(reused) == len(PLAN_INDEPENDENT), said
    again = yaml.safe_load((out / "content.yaml").read_text())["rows"]

    def own(rows):  # a row's own measurements (its comparison with the plan changes with the plan)
        return [{k: v for k, v in row.items() if k != "vs_plan"} for row in rows[:len(PLAN_INDEPENDENT)]]

    assert own(again) == own(first)
    assert yaml.safe_load((out / "plan.yaml").read_text())["budget"]["w_bits"] == 5.0

    (out / "content-cache.safetensors").write_bytes(b"not a safetensors file")
    assert main(["--out", str(out), "--stage", "allocate", "--w-bits", "4", "--no-progress"]) == 0
    assert "(reused)" not in capsys.readouterr().out
    regenerated = yaml.safe_load((out / "content.yaml").read_text())["rows"]
    assert own(regenerated) == own(first)
    assert regenerated == first  # back at the first budget: the same plan, the same rows
