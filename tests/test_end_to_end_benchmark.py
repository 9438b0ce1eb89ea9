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
