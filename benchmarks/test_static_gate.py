"""CI's static performance gate: the kernels compiled for H100 (sm_90) and A100 (sm_80), no GPU.

The CI subset of benchmarks/sass_gate.py (the default configs, every weight width, linear and
3x3 conv, split-K and bf16 samples, both targets) is compiled in a subprocess without
TRITON_INTERPRET (other test modules turn the interpreter on in this process), then:
everything compiles, the int8 tensor-core MMA is there, nothing spills inside the main loop,
shared memory fits, and the main loop stays within an instruction budget per K-step, so a
regression in the generated code fails CI. The full sweep and the roofline report are commands
(see benchmarks/static_report.py); here the report code runs on the subset too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Executed SASS instructions of the main loop per 128 values of K, by target and weight bits, with headroom
# over what the kernels compile to today (sm_90: 85 / 102 / 104 for linear w8 / w4 / w2 at
# 128x128x128, 8 warps; the 3x3 conv adds ~30 for its tap addressing; sm_80: 143 / 222 / 230).
# The target for w8 at 128x128x128 / 8 warps on sm_90 is 300.
INSTRUCTION_BUDGET = {
    ("sm_90", 8): 150, ("sm_90", 4): 170, ("sm_90", 2): 170,
    ("sm_80", 8): 220, ("sm_80", 4): 300, ("sm_80", 2): 300,
}
# Packed weights against int8 ones, same kernel and tile, sm_90: at 128x128x128 linear 1.20x /
# 1.22x and conv 1.13x / 1.13x today, at 64x64x128 linear 1.24x / 1.25x (the unpack, per 4 packed
# bytes: an and for the top lane, a shift and an and for each other lane). The issue asks 1.25x;
# the budget leaves ptxas's scheduling a few instructions of room.
PACKED_RATIO_BUDGET = 1.3
# SASS instructions of the activation-quantization kernel per 64x64 tile (4 warps, 32 values a
# thread): 912-1008 today on both targets, most of it the IEEE division (slow paths included).
QUANTIZE_BUDGET = 1100
W8_TARGET = 300


def triton_can_compile() -> bool:
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError:
        return False
    from benchmarks.sass_gate import tool

    return all(Path(tool(name)).exists() for name in ("ptxas", "nvdisasm", "cuobjdump"))


pytestmark = pytest.mark.skipif(not triton_can_compile(), reason="needs Triton's NVIDIA backend (ptxas, nvdisasm)")


@pytest.fixture(scope="module")
def gate_records(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("gate") / "ci.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    subprocess.run([sys.executable, "-m", "benchmarks.sass_gate", "--out", str(out), "--jobs", "2"], cwd=REPO,
                   env=env, check=True, capture_output=True, text=True, timeout=900)
    return json.loads(out.read_text())


def describe(record: dict) -> str:
    v = record["variant"]
    return f"{v['target']} {v['kernel']} {record['config']} w{v['w_bits']} {v['dtype']}"


def test_every_variant_compiles_to_int8_tensor_core_mma(gate_records):
    assert len(gate_records) >= 24
    failed = [f"{describe(r)}: {r['error']}" for r in gate_records if not r["compiled"]]
    assert not failed
    for record in gate_records:
        assert record["int8_mma"] and record["loop_found"], describe(record)
        assert record["mma_per_k_step"] >= 1, describe(record)


def test_no_spills_in_the_main_loop_and_shared_memory_fits(gate_records):
    for record in gate_records:
        assert record["spill_instructions_in_loop"] == 0, describe(record)
        assert record["shared_bytes"] <= record["shared_limit"], describe(record)


def test_main_loop_instruction_budget(gate_records):
    """The budget is per 128 values of K, so that a 256-wide K-step gets twice a 128-wide one's."""
    from benchmarks.static_report import instructions_per_128_k

    def budget(record):
        return INSTRUCTION_BUDGET[record["variant"]["target"], record["variant"]["w_bits"]]

    over = [f"{describe(r)}: {instructions_per_128_k(r):.0f} per 128 K > {budget(r)}"
            for r in gate_records if instructions_per_128_k(r) > budget(r)]
    assert not over
    large_w8 = [r for r in gate_records if r["variant"]["target"] == "sm_90" and r["variant"]["w_bits"] == 8
                and r["config"].startswith("128x128x128/8w")]
    assert large_w8 and all(r["instructions_per_k_step"] <= W8_TARGET for r in large_w8)


def test_packed_weights_per_value_of_k_at_the_cheapest_k_step(gate_records):
    """The large tile at its 128 and 256 K-steps (CI subset): per 128 values of K, packed weights at
    their cheapest K-step that fits against w8 at its own."""
    from benchmarks.static_report import packed_weight_costs

    large = [r for r in packed_weight_costs(gate_records) if r["kernel"] == "linear" and r["tile"] == "128x128/8w"]
    assert large
    for w_bits in (4, 2):
        assert large[0][f"w{w_bits}_best"] <= PACKED_RATIO_BUDGET * large[0]["w8_best"], large[0]


def test_packed_weights_cost_little_more_than_int8_ones(gate_records):
    """w4 / w2 main loops against w8 with the same kernel, tile and target (sm_90)."""
    by_variant = {(r["variant"]["kernel"], r["config"], r["variant"]["dtype"], r["variant"]["w_bits"]): r
                  for r in gate_records if r["variant"]["target"] == "sm_90"}
    compared = 0
    for (kernel, config, dtype, w_bits), record in by_variant.items():
        w8 = by_variant.get((kernel, config, dtype, 8))
        if w_bits == 8 or w8 is None:
            continue
        ratio = record["instructions_per_k_step"] / w8["instructions_per_k_step"]
        assert ratio <= PACKED_RATIO_BUDGET, f"{describe(record)}: {ratio:.2f}x the w8 loop"
        compared += 1
    assert compared >= 4


def test_quantize_kernel_instruction_budget(gate_records):
    costs = [r["quantize"] for r in gate_records if "quantize" in r]
    assert len(costs) == len(gate_records)
    assert all(c["elements_per_program"] == 4096 and c["instructions"] <= QUANTIZE_BUDGET for c in costs), costs


def test_roofline_report_from_the_subset(gate_records, tmp_path):
    from benchmarks.static_report import write_report

    totals = write_report(gate_records, tmp_path, "test")
    assert (tmp_path / "report.md").read_text().count("| linear M=1024 N=5120 K=640 |") == 2
    assert (tmp_path / "estimates.png").stat().st_size > 0
    # Quantized kernels beat the fp16 roofline over the whole UNet, even with their quantize passes.
    assert totals["W8A8 kernels + quantize passes"] < totals["fp16 roofline"]
