"""An H100 time estimate for every SDXL-Turbo layer, from the compiled SASS (no GPU).

    python -m benchmarks.sass_gate --full --out benchmarks/results/static/sass-variants.json
    python -m benchmarks.static_report benchmarks/results/static/sass-variants.json benchmarks/results/static

This is an ESTIMATE, not a measurement. The model, per layer (M, N, K) and kernel config:

- issue time: every warp executes the main loop's SASS instructions once per K-step, plus the rest
  of the kernel once; an SM issues 4 warp-instructions per clock (one per scheduler). Per program:
  warps * (instructions_per_k_step * k_steps + other_instructions) / 4 clocks;
- tensor-core time: 2 * BLOCK_M * BLOCK_N * BLOCK_K * k_steps / 8192 clocks per program (the int8
  dense peak, 1979 TOP/s = 132 SMs x 8192 ops x 1.83 GHz);
- programs are spread over 132 SMs in whole waves: compute time = ceil(programs / 132) *
  max(issue, tensor) / 1.83 GHz (perfect overlap of issue and tensor work, and no latency stalls:
  an optimistic bound, which the MMA drains counted by the gate can only lengthen: Triton's
  pipeliner keeps only wgmma with an fp32 accumulator in flight across loop iterations, so every
  int8 K-step ends waiting for its own MMAs, and only the other warpgroups on the SM hide that);
- memory time: (int8 codes of the input + packed weights + fp16 output + split-K partials) /
  3.35 TB/s, every byte from HBM once (re-reads of tiles and conv taps assumed to hit L2; the
  int32 partial buffer of a split K, at most 5 MB here against H100's 50 MB L2, is written back
  once, while its zeroing, the atomic adds and the epilogue pass's read hit L2);
- the HBM floor of a shape is the same sum without partials: no kernel moving those bytes once
  can be faster, so where it exceeds twice the int8 peak time, 50 % of peak is out of reach;
- "other instructions" are the kernel's static SASS outside the main loop, all counted as executed
  (some are branches not taken), so the fixed cost per program is overestimated;
- GEMM time = max(compute, memory); the quantize pass that makes the codes (read fp16, write
  int8) is added at HBM bandwidth, or at the compiled quantize kernel's issue rate where that is
  slower (its static instruction count, slow paths of the division included), in separate
  columns: the input was usually just written by the previous op and may still sit in L2, so it
  is a pessimistic addition. In the UNet totals a layer
  that reads the tensor the layer before it read (self-attention's to_k and to_v, cross-attention's
  to_v: shared_input in the shapes CSV) reuses those codes and adds no pass, as the Triton backend
  does when the activation parameters are equal (uniform A8 here; a mixed plan may differ).

fp16 is estimated "the same way" without compiling anything, as an ideal roofline: max(2MNK /
989 TFLOP/s, bytes / 3.35 TB/s) with fp16 inputs, weights and outputs: a lower bound on any fp16
kernel's time, so the comparison favours fp16. The config of each shape is the candidate (tile,
BLOCK_K, split-K) with the lowest estimate, as autotuning would pick on a GPU. conv_in and
conv_out stay in floating point (the reference's kept layers) and count as fp16 in every UNet
total. The UNet total covers the 794 Linear and Conv2d layers only, not attention or norms.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import dataclass
from datetime import date
from pathlib import Path

SHAPES_CSV = Path(__file__).resolve().parent / "sdxl_turbo_shapes.csv"
SWEEP_NAME = "benchmarks/results/static/sass-variants.json"


@dataclass(frozen=True)
class Gpu:
    name: str = "H100 SXM"
    sms: int = 132
    int8_ops: float = 1979e12
    fp16_flops: float = 989e12
    hbm_bytes: float = 3.35e12
    int8_ops_per_clock_per_sm: int = 8192
    warp_instructions_per_clock_per_sm: int = 4

    @property
    def clock_hz(self) -> float:
        return self.int8_ops / (self.sms * self.int8_ops_per_clock_per_sm)


H100 = Gpu()
KEPT_IN_FLOAT = ("conv_in", "conv_out")


@dataclass(frozen=True)
class Shape:
    kind: str  # linear (including 1x1 convs) or conv (3x3)
    m: int
    k: int
    n: int
    kernel: int
    stride: int
    count: int
    example: str
    shared_input: int = 0  # of the count, layers that reuse the codes of the layer before them

    @property
    def channels(self) -> int:
        """What BLOCK_K must divide for the unmasked main loop."""
        return self.k // (self.kernel * self.kernel)

    @property
    def gate_kernel(self) -> str:
        if self.kind == "linear":
            return "linear"
        return "conv3x3s2" if self.stride == 2 else "conv3x3"

    @property
    def kept_in_float(self) -> bool:
        return self.example in KEPT_IN_FLOAT

    def ops(self) -> int:
        return 2 * self.m * self.n * self.k

    def label(self) -> str:
        geometry = f" {self.kernel}x{self.kernel}/{self.stride}" if self.kind == "conv" else ""
        return f"{self.kind}{geometry} M={self.m} N={self.n} K={self.k}"


def load_shapes(path: Path = SHAPES_CSV) -> list[Shape]:
    with open(path) as f:
        rows = [row for row in csv.DictReader(line for line in f if not line.startswith("#"))]
    return [Shape(r["kind"], int(r["m"]), int(r["k"]), int(r["n"]), int(r["kernel"]), int(r["stride"]),
                  int(r["count"]), r["example"], int(r.get("shared_input") or 0)) for r in rows]


# --- the model ---------------------------------------------------------------------------------


def fp16_roofline_s(shape: Shape, gpu: Gpu = H100) -> float:
    bytes_moved = 2 * (shape.m * shape.k + shape.n * shape.k + shape.m * shape.n)
    return max(shape.ops() / gpu.fp16_flops, bytes_moved / gpu.hbm_bytes)


def input_pixels(shape: Shape) -> int:
    """Rows of the layer's input: tokens, or input pixels of a convolution (not its im2col rows)."""
    return shape.m * shape.stride * shape.stride if shape.kind == "conv" else shape.m


def quantize_pass_s(shape: Shape, record: dict | None = None, gpu: Gpu = H100) -> float:
    """Read fp16, write int8 codes, at HBM bandwidth; or longer, where the compiled quantize kernel
    (record["quantize"], from the gate) issues more instructions than that time allows."""
    elements = input_pixels(shape) * shape.channels
    memory_s = elements * 3 / gpu.hbm_bytes
    if record is None or "quantize" not in record:
        return memory_s
    q = record["quantize"]
    warp_instructions = math.ceil(elements / q["elements_per_program"]) * q["num_warps"] * q["instructions"]
    issue_s = warp_instructions / (gpu.sms * gpu.warp_instructions_per_clock_per_sm * gpu.clock_hz)
    return max(memory_s, issue_s)


def hbm_floor_s(shape: Shape, w_bits: int, gpu: Gpu = H100) -> float:
    """The int8 codes of the input, the packed weights and the fp16 output, each moved once."""
    codes = input_pixels(shape) * shape.channels  # a convolution's taps re-read its codes from L2
    return (codes + shape.n * shape.k * w_bits // 8 + 2 * shape.m * shape.n) / gpu.hbm_bytes


def gemm_estimate(shape: Shape, record: dict, split: int, w_bits: int, gpu: Gpu = H100) -> dict:
    """The estimate of one kernel config (a sass_gate record) with a split of K on one shape."""
    v = record["variant"]
    programs = math.ceil(shape.m / v["block_m"]) * math.ceil(shape.n / v["block_n"]) * split
    k_steps = math.ceil(math.ceil(shape.k / v["block_k"]) / split)
    per_step = record["instructions_per_k_step"]
    other = record["instructions_total"] - per_step
    issue = v["num_warps"] * (per_step * k_steps + other) / gpu.warp_instructions_per_clock_per_sm
    tensor = 2 * v["block_m"] * v["block_n"] * v["block_k"] * k_steps / gpu.int8_ops_per_clock_per_sm
    compute_s = math.ceil(programs / gpu.sms) * max(issue, tensor) / gpu.clock_hz
    partials = 4 * shape.m * shape.n if split > 1 else 0  # int32, written back once (module docstring)
    memory_s = hbm_floor_s(shape, w_bits, gpu) + partials / gpu.hbm_bytes
    gemm_s = max(compute_s, memory_s)
    bound = "memory" if memory_s >= compute_s else ("issue" if issue > tensor else "tensor")
    return dict(config=f"{record['config'].split(' split')[0]}{f' split{split}' if split > 1 else ''}",
                gemm_s=gemm_s, bound=bound, programs=programs, instructions_per_k_step=per_step,
                quantize_s=quantize_pass_s(shape, record, gpu))


def best_estimate(shape: Shape, w_bits: int, records: list[dict], target: str = "sm_90") -> dict | None:
    """The candidate with the lowest estimate (what autotuning would pick), over the compiled
    records of this shape's kernel whose BLOCK_K divides its channels."""
    from mixq.kernels.autotune import Config, useful_splits

    best = None
    for record in records:
        v = record["variant"]
        if (v["kernel"], v["w_bits"], v["target"], v["dtype"], v["split_k"]) != (
                shape.gate_kernel, w_bits, target, "float16", 1) or not record.get("loop_found"):
            continue
        if shape.channels % v["block_k"] or record["shared_bytes"] > record["shared_limit"]:
            continue  # needs masks, or the GPU would refuse the launch
        config = Config(v["block_m"], v["block_n"], v["block_k"])
        for split in useful_splits(shape.m, shape.n, shape.k, config):
            estimate = gemm_estimate(shape, record, split, w_bits)
            if best is None or estimate["gemm_s"] < best["gemm_s"]:
                best = estimate
    return best


def layer_rows(shapes: list[Shape], records: list[dict], bits=(8, 4)) -> list[dict]:
    rows = []
    for shape in shapes:
        row = dict(shape=shape.label(), example=shape.example, count=shape.count, shared_input=shape.shared_input,
                   m=shape.m, n=shape.n, k=shape.k,
                   kind=shape.kind, kept_in_float=shape.kept_in_float, ops=shape.ops(),
                   int8_peak_s=shape.ops() / H100.int8_ops, fp16_peak_s=shape.ops() / H100.fp16_flops,
                   fp16_roofline_s=fp16_roofline_s(shape))
        for w_bits in bits:
            estimate = None if shape.kept_in_float else best_estimate(shape, w_bits, records)
            if estimate:
                row[f"w{w_bits}"] = dict(estimate, hbm_floor_s=hbm_floor_s(shape, w_bits))
        rows.append(row)
    return rows


def unet_totals(rows: list[dict], bits=(8, 4)) -> dict:
    """Sum over all layers (times their counts); layers kept in float, or without a compiled
    kernel, count at the fp16 roofline."""
    totals = {"fp16 roofline": sum(r["count"] * r["fp16_roofline_s"] for r in rows)}
    for w_bits in bits:
        gemm = sum(r["count"] * (r[f"w{w_bits}"]["gemm_s"] if f"w{w_bits}" in r else r["fp16_roofline_s"])
                   for r in rows)
        quantize = sum((r["count"] - r["shared_input"]) * r[f"w{w_bits}"]["quantize_s"] for r in rows
                       if f"w{w_bits}" in r)
        totals[f"W{w_bits}A8 kernels"] = gemm
        totals[f"W{w_bits}A8 kernels + quantize passes"] = gemm + quantize
    return totals


# --- writing the report ------------------------------------------------------------------------


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.2f}"


def pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%"


def shape_table(rows: list[dict], w_bits: int) -> list[str]:
    lines = [f"| shape | layers | config (best estimate) | instr/K-step | bound | est. us | % int8 peak | "
             f"+quantize us | % int8 peak with quantize | int8 peak us | fp16 peak us | fp16 roofline us |",
             "|" + " --- |" * 12]
    for r in rows:
        e = r.get(f"w{w_bits}")
        if e is None:
            note = "kept in fp16" if r["kept_in_float"] else "no compiled config"
            lines.append(f"| {r['shape']} | {r['count']} | {note} | | | | | | | {us(r['int8_peak_s'])} | "
                         f"{us(r['fp16_peak_s'])} | {us(r['fp16_roofline_s'])} |")
            continue
        with_quantize = e["gemm_s"] + e["quantize_s"]
        lines.append(f"| {r['shape']} | {r['count']} | {e['config']} | {e['instructions_per_k_step']} | {e['bound']} | "
                     f"{us(e['gemm_s'])} | {pct(r['int8_peak_s'], e['gemm_s'])} | {us(with_quantize)} | "
                     f"{pct(r['int8_peak_s'], with_quantize)} | {us(r['int8_peak_s'])} | {us(r['fp16_peak_s'])} | "
                     f"{us(r['fp16_roofline_s'])} |")
    return lines


def variant_table(records: list[dict]) -> list[str]:
    lines = ["| target | kernel | config | w bits | dtype | MMA | MMA/K-step | instr/K-step | MMA drains/K-step | "
             "registers | spill instr (loop) | stack bytes | shared KB |", "|" + " --- |" * 13]
    for r in records:
        v = r["variant"]
        if not r["compiled"]:
            lines.append(f"| {v['target']} | {v['kernel']} | {r['config']} | {v['w_bits']} | {v['dtype']} | "
                         f"FAILED: {r['error']} |")
            continue
        lines.append(f"| {v['target']} | {v['kernel']} | {r['config']} | {v['w_bits']} | {v['dtype']} | "
                     f"{r['mma_opcode']} | {r['mma_per_k_step']} | {r['instructions_per_k_step']} | "
                     f"{r['mma_drains_per_k_step']} | {r['registers']} | {r['spill_instructions']} "
                     f"({r['spill_instructions_in_loop']}) | {r['stack_bytes']} | {r['shared_bytes'] / 1024:.0f} |")
    return lines


def instructions_per_128_k(record: dict) -> float:
    return record["instructions_per_k_step"] * 128 / record["variant"]["block_k"]


def packed_weight_costs(records: list[dict], target: str = "sm_90") -> list[dict]:
    """Per kernel and tile (fp16, no split), each weight width's main-loop instructions per 128
    values of K, at the same K-step as w8 and at its own cheapest K-step that fits shared memory."""
    fitting = [r for r in records if r.get("loop_found") and r["shared_bytes"] <= r["shared_limit"]
               and r["variant"]["target"] == target and r["variant"]["dtype"] == "float16"
               and r["variant"]["split_k"] == 1]
    groups = {}
    for r in fitting:
        v = r["variant"]
        groups.setdefault((v["kernel"], v["block_m"], v["block_n"], v["num_warps"]), []).append(r)
    rows = []
    for (kernel, block_m, block_n, warps), group in sorted(groups.items()):
        def best(w_bits, block_k=None):
            found = [instructions_per_128_k(r) for r in group if r["variant"]["w_bits"] == w_bits
                     and block_k in (None, r["variant"]["block_k"])]
            return min(found) if found else None
        w8_at_128 = best(8, 128)
        if w8_at_128 is None or best(8) is None:
            continue
        row = dict(kernel=kernel, tile=f"{block_m}x{block_n}/{warps}w", w8_at_128=w8_at_128, w8_best=best(8))
        for w_bits in (4, 2):
            row[f"w{w_bits}_at_128"], row[f"w{w_bits}_best"] = best(w_bits, 128), best(w_bits)
        rows.append(row)
    return rows


def packed_weight_table(records: list[dict]) -> list[str]:
    def ratio(value, base):
        return "" if value is None else f"{value:.0f} ({value / base:.2f}x)"

    lines = ["| kernel | tile | w8 | w4 | w2 | w8, cheapest K-step | w4, cheapest | w2, cheapest |",
             "|" + " --- |" * 8]
    for r in packed_weight_costs(records):
        cells = [r["kernel"], r["tile"], f"{r['w8_at_128']:.0f}", ratio(r["w4_at_128"], r["w8_at_128"]),
                 ratio(r["w2_at_128"], r["w8_at_128"]), f"{r['w8_best']:.0f}", ratio(r["w4_best"], r["w8_best"]),
                 ratio(r["w2_best"], r["w8_best"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def criteria(rows: list[dict], w_bits: int) -> list[str]:
    """The issue's targets for M >= 256 quantized shapes, per shape that misses them."""
    checked = [r for r in rows if r["m"] >= 256 and f"w{w_bits}" in r]
    below_half = [r for r in checked if r["int8_peak_s"] / r[f"w{w_bits}"]["gemm_s"] < 0.5]
    slower = [r for r in checked if r[f"w{w_bits}"]["gemm_s"] >= r["fp16_peak_s"]]
    lines = [f"- W{w_bits}A8, {len(checked)} quantized shapes with M >= 256: {len(checked) - len(below_half)} at >= 50% "
             f"of int8 peak, {len(checked) - len(slower)} faster than the fp16 peak time (GEMM kernel; the quantize "
             "pass is in the table)."]
    for r in below_half:
        e = r[f"w{w_bits}"]
        lines.append(f"  - below 50%: {r['shape']} ({pct(r['int8_peak_s'], e['gemm_s'])}, {e['bound']}-bound; its "
                     f"HBM floor allows at most {pct(r['int8_peak_s'], max(r['int8_peak_s'], e['hbm_floor_s']))})")
    for r in slower:
        e = r[f"w{w_bits}"]
        lines.append(f"  - not faster than fp16 peak: {r['shape']} ({us(e['gemm_s'])} us against "
                     f"{us(r['fp16_peak_s'])}; no fp16 kernel beats its roofline, {us(r['fp16_roofline_s'])} us)")
    return lines


def plot(rows: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["m"] >= 76 and not r["kept_in_float"] and "w8" in r]
    x = range(len(shown))
    fig, ax = plt.subplots(figsize=(14, 6))
    ax.plot(x, [r["int8_peak_s"] * 1e6 for r in shown], "k_", markersize=14, label="int8 peak (1979 TOP/s)")
    ax.plot(x, [r["fp16_peak_s"] * 1e6 for r in shown], "r_", markersize=14, label="fp16 peak (989 TFLOP/s)")
    ax.plot(x, [r["fp16_roofline_s"] * 1e6 for r in shown], "rx", label="fp16 roofline (peak or HBM)")
    ax.plot(x, [r["w8"]["gemm_s"] * 1e6 for r in shown], "bo", label="W8A8 estimate")
    ax.plot(x, [r["w4"]["gemm_s"] * 1e6 for r in shown], "g^", label="W4A8 estimate")
    ax.plot(x, [(r["w4"]["gemm_s"] + r["w4"]["quantize_s"]) * 1e6 for r in shown], "g.", label="W4A8 + quantize pass")
    ax.set_yscale("log")
    ax.set_ylabel("time per layer, us (estimate)")
    ax.set_xticks(list(x), [r["shape"] for r in shown], rotation=80, fontsize=7)
    ax.set_title("SDXL-Turbo 512x512 layers on H100 SXM: static estimate from compiled sm_90 SASS (not measured)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def model_description() -> str:
    """The estimate's model, as the module docstring states it."""
    return "**" + __doc__[__doc__.index("This is an ESTIMATE"):].strip().replace(
        "not a measurement.", "not a measurement.**", 1)


def write_report(records: list[dict], out_dir: Path, command: str) -> dict:
    shapes = load_shapes()
    rows = layer_rows(shapes, records)
    totals = unet_totals(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    fp16 = totals["fp16 roofline"]
    lines = ["# Static performance report: Triton kernels on H100 (estimate from compiled SASS, no GPU)", "",
             f"Made by `python -m benchmarks.sass_gate --full --out {SWEEP_NAME}` (the compiled variants, "
             f"{len(records)} here) then `{command}`, on a machine without a GPU, on {date.today().isoformat()}; "
             f"compiled with Triton {', '.join(sorted({r.get('triton_version', '?') for r in records}))} and the "
             "ptxas it bundles.", ""] + ["> " + line for line in model_description().splitlines()] + ["",
             "## Whole UNet (794 Linear/Conv2d layers, SDXL-Turbo 512x512, batch 1)", "",
             "| variant | estimated ms | speed-up vs fp16 roofline |", "| --- | --- | --- |"]
    for name, seconds in totals.items():
        lines.append(f"| {name} | {seconds * 1e3:.3f} | {fp16 / seconds:.2f}x |")
    for w_bits in (8, 4):
        lines += ["", f"## Per shape, W{w_bits}A8 (sm_90)", ""] + criteria(rows, w_bits) + [""] + shape_table(rows, w_bits)
    lines += ["", "## Packed weights against int8 weights (sm_90)", "",
              "Main-loop SASS instructions per 128 values of K: first at a 128 K-step for every width, then at "
              "each width's cheapest K-step (64, 128 or 256) whose pipeline stages fit shared memory. The ratio "
              "is to w8 in the same columns; the issue's target is 1.25x.", ""] + packed_weight_table(records)
    lines += ["", "## Compiled variants", "", "Instructions per K-step: SASS instructions in the main loop's body "
              "(one pass = one K-step). MMA drains: waits for all outstanding wgmma groups inside the loop.", ""]
    lines += variant_table(records)
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    (out_dir / "estimates.json").write_text(json.dumps(dict(gpu=H100.name, totals=totals, layers=rows), indent=1) + "\n")
    plot(rows, out_dir / "estimates.png")
    return totals


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m benchmarks.static_report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("records", help="the JSON that `python -m benchmarks.sass_gate --full --out ...` wrote")
    parser.add_argument("out_dir", help="folder for report.md, estimates.json and estimates.png")
    args = parser.parse_args(argv)
    records = json.loads(Path(args.records).read_text())
    totals = write_report(records, Path(args.out_dir), "python -m benchmarks.static_report " + " ".join(argv))
    for name, seconds in totals.items():
        print(f"{name}: {seconds * 1e3:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
