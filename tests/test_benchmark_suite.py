"""The benchmark suite itself works: the tiny config end to end, one round, into a temporary folder.

Checks the report's structure only; no speed is asserted anywhere.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REPORT_SECTIONS = ("## Setup", "## Latency: UNet step", "## Latency: Whole pipeline, per image", "## Memory",
                   "## Fidelity against the floating-point pipeline", "## Command and environment")
VARIANT_LABELS = ("fp32", "mixq W8A8", "mixq W4A8", "mixq plan")


def test_tiny_suite_runs_end_to_end_and_reports(tmp_path):
    # As a user runs it: not as a pytest-xdist worker, whose variables would make the suite's own pytest
    # run turn pytest-benchmark off.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--config", "tiny", "--quick", "--out", str(tmp_path), "--name", "ci"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    report = (tmp_path / "ci.md").read_text()
    for section in REPORT_SECTIONS:
        assert section in report, f"report lacks {section!r}"
    tables = report.split("## Latency: UNet step")[1]
    for label in VARIANT_LABELS:
        assert f"| {label} |" in tables, f"no row for {label}"
    assert "| torchao int8-dyn |" in report or "torchao is not importable" in report  # a row, or why not

    results = tmp_path / "ci"
    for name in ("latency-memory.png", "grid.png"):
        assert (results / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{name} is not a PNG"
    assert f"]({results.name}/latency-memory.png)" in report and f"]({results.name}/grid.png)" in report

    bench = json.loads((results / "benchmark.json").read_text())
    suites = {b["extra_info"]["suite"] for b in bench["benchmarks"]}
    assert suites == {"unet-step", "pipeline"}
    assert bench["mixq"]["config"]["name"] == "tiny"
    fidelity = json.loads((results / "fidelity.json").read_text())
    assert set(fidelity["variants"]) >= {"w8a8", "w4a8", "plan"}
    assert "python -m benchmarks.run --config tiny --quick" in report


def test_bench_config_refuses_options_that_do_not_apply():
    from benchmarks.config import bench_config

    assert bench_config({}).name == "proving" and bench_config({}).resolution == 64
    with pytest.raises(ValueError, match="proving pipeline ships its own tokenizer"):
        bench_config({"mixq_tokenizer": "some/folder"})
    assert bench_config({"mixq_config": "tiny", "mixq_tokenizer": "some/folder"}).tokenizer == "some/folder"
    with pytest.raises(ValueError, match="needs --unet-config"):
        bench_config({"mixq_config": "sdxl-turbo", "mixq_device": "cpu"})
