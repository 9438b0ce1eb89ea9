"""The prepared GPU run (benchmarks/gpu_run.sh): its --dry-run exercises every step on CPU and writes
the files a GPU run brings back, and a kernel that disagrees with the reference fails the run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_run import FILES
from tests.test_cli import subprocess_env

REPO = Path(__file__).resolve().parents[1]


def test_dry_run_writes_every_file_and_passes(tmp_path):
    out = tmp_path / "gpu"
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_run.sh"), str(out), "--dry-run"], cwd=REPO,
                            env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES) and len(FILES) <= 8
    checks = json.loads((out / "correctness.json").read_text())
    assert checks and all(c["ok"] for c in checks)
    assert {c["w_bits"] for c in checks} == {8, 4, 2} and {c["a_bits"] for c in checks} == {8, 4}
    assert {c["dtype"] for c in checks} == {"float16", "bfloat16"} and any(c["split_k"] > 1 for c in checks)
    assert {c["kind"] for c in checks} == {"linear", "conv"}
    unet = json.loads((out / "unet.json").read_text())
    measured = {"fp16", "W8A8", "W4A8", "4-bit mixed plan"}
    assert set(unet["variants"]) == measured | ({"torchao int8 dynamic"} if unet["torchao"].startswith("measured") else set())
    report = (out / "report.md").read_text()
    assert "bit for bit the reference" in report and "## Whole UNet" in report
    assert f"torchao int8 dynamic (Int8DynamicActivationInt8WeightConfig): {unet['torchao']}" in report
    assert "correctness:" in (out / "log.txt").read_text()


def test_a_kernel_that_disagrees_fails_the_run(tmp_path):
    code = textwrap.dedent("""
        import os, sys
        os.environ["TRITON_INTERPRET"] = "1"
        import torch
        from mixq.kernels import triton_gemm
        from benchmarks import gpu_run
        correct = triton_gemm.linear
        triton_gemm.linear = lambda *a, **k: correct(*a, **k) + 1
        status = gpu_run.correctness([("linear", 37, 70, 45, 1, 1)], (torch.float16,), "cpu")
        print(sum(not c["ok"] for c in status), len(status))
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    failed, total = map(int, result.stdout.split()[-2:])
    assert failed == total > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with a GPU runs the real thing")
def test_without_a_gpu_the_real_run_says_to_use_dry_run(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_run", str(tmp_path / "x")], cwd=REPO,
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--dry-run" in result.stderr


def test_proportional_bits_split_each_group_by_its_shares():
    from benchmarks.plans import proportional_bits

    params = {f"c{i}": 10 for i in range(10)} | {f"q{i}": 10 for i in range(4)}
    groups = {n: "content" if n.startswith("c") else "quality" for n in params}
    bits = proportional_bits(params, groups, {"content": {8: 0.2, 4: 0.3, 2: 0.5}, "quality": {8: 0.5, 4: 0.5}})
    content = [bits[f"c{i}"] for i in range(10)]
    assert content.count(8) == 2 and content.count(4) == 3 and content.count(2) == 5
    assert [bits[f"q{i}"] for i in range(4)] == [8, 8, 4, 4]
