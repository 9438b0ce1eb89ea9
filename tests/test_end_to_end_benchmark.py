"""The end-to-end benchmark runs on the tiny pipeline and reports every stage of every configuration.

Structure only: no speed target is asserted here (they live in the report).
"""

import json
import re

from benchmarks import end_to_end


def test_cpu_pipeline_benchmark_reports_every_stage_and_configuration(tmp_path):
    out = tmp_path / "results"
    assert end_to_end.main(["--tiny", "--out", str(out), "--size", "64", "--lcm-size", "64", "--rounds", "1"]) == 0
    (report_path,) = out.glob("cpu-pipeline-*.md")
    results = json.loads(report_path.with_suffix(".json").read_text())
    for workload, names in results["configurations"].items():
        assert list(results["latency"][workload]) == names
        for row in results["latency"][workload].values():
            assert row["total"] > 0 and row["UNet"] > 0 and row["VAE decode"] > 0 and row["text encoders"] > 0
            assert abs(sum(row[s] for s in end_to_end.STAGES) - row["total"]) < 1e-6
    report = report_path.read_text()
    assert "| mixq 4-bit plan UNet + VAE + text encoders W8A8 |" in report and "amx_int8" in report
    assert "## LCM-LoRA SDXL: 64x64, 4 step(s)" in report
    assert "| bfloat16 |" in report and "vs bfloat16" in report  # the half-precision baseline on CPU
    # quantized rows carry the per-round paired ratio against the baseline they were interleaved with
    assert "per round: median [min, max]" in report
    assert re.search(r"^\| mixq W8A8 UNet \|.*\| [\d.]+x \[[\d.]+, [\d.]+\] \|", report, flags=re.M)
    assert end_to_end.round_ratios([2.0, 3.0], [1.0, 6.0]) == [2.0, 0.5]


def test_one_unet_setting_quantizes_and_times_only_its_configurations(tmp_path):
    out = tmp_path / "results"
    assert end_to_end.main(["--tiny", "--out", str(out), "--size", "64", "--lcm-size", "64", "--rounds", "1",
                            "--skip-fp32", "--unet-settings", "w8a8"]) == 0
    results = json.loads(next(out.glob("cpu-pipeline-*.json")).read_text())
    assert list(results["quantize_s"]) == ["mixq W8A8 UNet"]
    assert list(results["latency"]["SDXL-Turbo"]) == ["half", "mixq W8A8 UNet", "mixq W8A8 UNet + VAE W8A8",
                                                      "mixq W8A8 UNet + VAE + text encoders W8A8"]
    assert list(results["latency"]["LCM-LoRA SDXL"]) == ["half", "mixq W8A8 UNet", "mixq W8A8 UNet + VAE W8A8"]


def test_one_process_per_configuration_pairs_rounds_and_resumes(tmp_path):
    from benchmarks import end_to_end_processes as processes

    out = tmp_path / "results"
    common = ["--tiny", "--out", str(out), "--size", "64", "--rounds", "2", "--generations", "1",
              "--configurations", "half", "mixq W8A8 UNet + VAE W8A8"]
    assert processes.main(common) == 0
    (json_path,) = out.glob("cpu-pipeline-processes-*.json")
    results = json.loads(json_path.read_text())
    runs = results["runs"]
    # every (round, configuration) ran once, in its own process, the order reversed in the second round
    assert [(r["round"], r["configuration"]) for r in runs] == [
        (0, "half"), (0, "mixq W8A8 UNet + VAE W8A8"), (1, "mixq W8A8 UNet + VAE W8A8"), (1, "half")]
    assert len({r["pid"] for r in runs}) == 4
    by_name = {r["configuration"]: r for r in runs}
    assert by_name["half"]["quantized_layers"]["unet"] == 0 and by_name["half"]["quantize_s"] is None
    quantized = by_name["mixq W8A8 UNet + VAE W8A8"]["quantized_layers"]
    assert quantized["unet"] > 0 and quantized["vae"] > 0 and quantized["text_encoder"] == 0
    for run in runs:
        assert abs(sum(run["row"][s] for s in end_to_end.STAGES) - run["row"]["total"]) < 1e-6
    assert len(processes.paired_ratios(runs, "mixq W8A8 UNet + VAE W8A8")) == 2
    report = json_path.with_suffix(".md").read_text()
    assert re.search(r"^\| mixq W8A8 UNet \+ VAE W8A8 \|.*\| [\d.]+x \[[\d.]+, [\d.]+\] \(2\); geometric mean [\d.]+x, "
                     r"95 % CI \[[\d.]+, [\d.]+\] \|", report, flags=re.M)
    # a resumed run with the same settings keeps the finished processes and runs only the new round
    assert processes.main([*common[:6], "3", *common[7:], "--resume"]) == 0
    resumed = json.loads(json_path.read_text())["runs"]
    assert resumed[:4] == runs and [(r["round"], r["configuration"]) for r in resumed[4:]] == [
        (2, "half"), (2, "mixq W8A8 UNet + VAE W8A8")]


def test_process_benchmark_pairs_only_rounds_both_finished():
    from benchmarks import end_to_end_processes as processes

    runs = [{"round": 0, "configuration": "half", "row": {"total": 3.0}},
            {"round": 0, "configuration": "q", "row": {"total": 2.0}},
            {"round": 1, "configuration": "q", "row": {"total": 1.0}}]
    assert processes.paired_ratios(runs, "q") == [1.5]
    assert processes.round_order(["a", "b", "c"], 1) == ["c", "b", "a"]
    assert processes.round_order(["a", "b", "c"], 2) == ["a", "b", "c"]


def test_process_benchmark_interval_of_per_round_speedups():
    from benchmarks import end_to_end_processes as processes

    assert processes.speedup_interval([1.6]) is None
    geo, low, high = processes.speedup_interval([1.5, 1.6, 1.7, 1.6])
    assert low < geo < high and abs(geo - (1.5 * 1.6 * 1.7 * 1.6) ** 0.25) < 1e-12
    same = processes.speedup_interval([1.6, 1.6])
    assert same == (1.6, 1.6, 1.6) or all(abs(v - 1.6) < 1e-12 for v in same)
