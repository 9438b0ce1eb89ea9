"""One prepared run for a lent GPU: environment, kernel correctness, kernel timings, the full UNet.

    benchmarks/gpu_run.sh OUT             # on the GPU machine, from the repository root
    python -m benchmarks.gpu_run OUT --dry-run   # the same code paths on CPU, tiny shapes (CI)

Everything goes into the folder OUT, at most 8 files (FILES), so that they can all be brought back:

- environment.json: GPU, driver, CUDA, torch, triton, diffusers, Python, the mixq commit;
- correctness.json: the compiled Triton kernels (TRITON_INTERPRET=0) against the exact torch
  reference on the SDXL-Turbo shapes: linear and conv, W8/W4/W2, A8/A4, fp16 and bf16, and split-K.
  Outputs must be bit for bit the reference's; a mismatch makes the run exit 1, after writing
  everything else;
- kernels.json: per shape, mixq W8A8 / W4A8 (autotuned, the cache written to autotune.json in OUT)
  against cuBLAS fp16 (`F.linear` / `F.conv2d`) and `torch._int_mm`; triton.testing.do_bench medians;
- unet.json: the full SDXL-Turbo UNet architecture (random weights, 64x64 latents = 512x512, batch 1,
  one step) captured in a CUDA graph: fp16, W8A8, W4A8 and a plan with the weight shares of the offline default's 4-bit plan
  (and torchao's int8 dynamic quantization when torchao is installed); median of
  ROUNDS replays timed with CUDA events after warm-up, and peak memory;
- report.md: the measurements beside the static estimates (benchmarks/results/static);
- log.txt: what the run printed.

--dry-run runs on CPU in Triton's interpreter with tiny shapes and the tiny UNet (eager, no graph),
writing the same files, so the first GPU run fails only on what only a GPU can show.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from datetime import date
from pathlib import Path

FILES = ("environment.json", "correctness.json", "kernels.json", "unet.json", "autotune.json", "report.md",
         "log.txt")
ROUNDS = 20
TUNING_SECONDS_PER_SHAPE = 5  # 22 tuned kernel shapes in the run (11 shapes, W8 and W4): 2 minutes at most
STATIC = Path(__file__).resolve().parent / "results" / "static"

# (kind, M tokens or H=W pixels side, K or C in, N out, kernel, stride): the SDXL-Turbo shapes with the
# most weight bytes or time (benchmarks/sdxl_turbo_shapes.csv), and tiny stand-ins for the dry run.
GPU_SHAPES = [("linear", 1024, 640, 640, 1, 1), ("linear", 1024, 640, 5120, 1, 1), ("linear", 1024, 2560, 640, 1, 1),
              ("linear", 256, 1280, 1280, 1, 1), ("linear", 256, 1280, 10240, 1, 1), ("linear", 256, 5120, 1280, 1, 1),
              ("conv", 64, 320, 320, 3, 1), ("conv", 32, 640, 640, 3, 1), ("conv", 16, 1280, 1280, 3, 1),
              ("conv", 64, 320, 320, 3, 2), ("conv", 16, 1920, 1280, 1, 1)]
DRY_SHAPES = [("linear", 37, 70, 45, 1, 1), ("conv", 9, 24, 20, 3, 1), ("conv", 9, 24, 20, 3, 2)]


def log(message: str):
    print(message, flush=True)


# --- environment -------------------------------------------------------------------------------


def environment(device: str) -> dict:
    import torch

    from benchmarks.environment import library_version

    record = {"date": date.today().isoformat(), "device": device, "python": platform.python_version(),
              "torch": torch.__version__, "cuda": torch.version.cuda, "triton": library_version("triton"),
              "diffusers": library_version("diffusers"), "mixq_commit": git_commit(),
              "triton_interpret": os.environ.get("TRITON_INTERPRET", "0")}
    if device == "cuda":
        record["gpu"] = torch.cuda.get_device_name()
        record["driver"] = command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    else:
        from mixq.machine import describe_cpu

        record["cpu"] = describe_cpu()
    return record


def command_output(command: list[str]) -> str | None:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit() -> str | None:
    return command_output(["git", "-C", str(Path(__file__).resolve().parents[1]), "rev-parse", "HEAD"])


# --- correctness -------------------------------------------------------------------------------


def layer_params(kind, size, c_in, n, kernel, w_bits, a_bits, dtype, device, seed):
    """Input, packed layer parameters and geometry for one case (weights and inputs seeded)."""
    import torch

    from mixq.modules import conv_weight_as_matrix
    from mixq.quantizers import activation_qparams, pack_weight, quantize_weight, weight_row_sums

    g = torch.Generator().manual_seed(seed)
    if kind == "linear":
        x = torch.randn(size, c_in, generator=g)
        weight = torch.randn(n, c_in, generator=g) / c_in ** 0.5
    else:
        x = torch.randn(1, c_in, size, size, generator=g).to(memory_format=torch.channels_last)
        weight = conv_weight_as_matrix(torch.randn(n, c_in, kernel, kernel, generator=g) / (c_in * kernel ** 2) ** 0.5)
    x = (x * 2 + 0.5).to(device=device, dtype=dtype)
    q, w_scale = quantize_weight(weight, w_bits)
    scale, zero = activation_qparams(float(x.min()), float(x.max()), a_bits)
    params = dict(qweight=pack_weight(q, w_bits).to(device), w_bits=w_bits, w_scale=w_scale.to(device),
                  w_sum=weight_row_sums(q).to(device), x_scale=torch.tensor(scale, device=device),
                  x_zero=torch.tensor(float(zero), device=device), a_bits=a_bits,
                  bias=torch.randn(n, generator=g).to(device=device, dtype=dtype))
    return x, params


def correctness(shapes, dtypes, device: str) -> list[dict]:
    """Every case's verdict: the Triton kernels' outputs against the reference, bit for bit (bf16 in the
    interpreter within one unit in the last place: it truncates where compiled kernels round)."""
    cases = [dict(kind=kind, size=size, c_in=c_in, n=n, kernel=kernel, stride=stride, w_bits=w_bits, a_bits=a_bits,
                  dtype=str(dtype).removeprefix("torch."), split_k=split)
             for kind, size, c_in, n, kernel, stride in shapes for w_bits in (8, 4, 2) for a_bits in (8, 4)
             for dtype in dtypes
             for split in ((1, 4) if (kind == "linear" and w_bits == 4 and a_bits == 8) else (1,))]
    with environment_variable("MIXQ_AUTOTUNE", "0"):  # default configs: tuning is the timing step's
        return [{**case, **check_case(case, device, seed)} for seed, case in enumerate(cases)]


def check_case(case: dict, device: str, seed: int) -> dict:
    """{"ok", "max_ulps"} of one case, or {"ok": False, "error"} when it cannot run."""
    from dataclasses import replace

    import torch

    from mixq.kernels import reference, triton_conv, triton_gemm
    from mixq.kernels.autotune import SMALL_TILE

    dtype, k = getattr(torch, case["dtype"]), case["kernel"]
    try:
        x, p = layer_params(case["kind"], case["size"], case["c_in"], case["n"], k, case["w_bits"], case["a_bits"],
                            dtype, device, seed)
        if case["kind"] == "linear":
            config = replace(SMALL_TILE, split_k=case["split_k"]) if case["split_k"] > 1 else None
            got, want = triton_gemm.linear(x, **p, config=config), reference.quantized_linear(x, **p)
        else:
            geometry = dict(kernel_size=(k, k), stride=(case["stride"],) * 2, padding=(k // 2, k // 2))
            got, want = triton_conv.conv2d(x, **p, **geometry), reference.quantized_conv2d(x, **p, **geometry)
        if got.shape != want.shape:
            return {"ok": False, "error": f"shape {tuple(got.shape)}, expected {tuple(want.shape)}"}
        ulps = int((got.view(torch.int16).int() - want.view(torch.int16).int()).abs().max())
        allowed = 1 if (dtype == torch.bfloat16 and triton_gemm.INTERPRETED) else 0
        return {"ok": ulps <= allowed, "max_ulps": ulps}
    except Exception as error:  # a case that cannot run is a failure, reported with the others
        return {"ok": False, "error": f"{type(error).__name__}: {error}"[:500]}


@contextlib.contextmanager
def environment_variable(name: str, value: str):
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


# --- kernel timings ----------------------------------------------------------------------------


def timed(fn, device: str, rounds: int) -> float:
    """Median seconds of fn()."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def kernel_timings(shapes, device: str, rounds: int) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from mixq.kernels import reference, triton_conv, triton_gemm
    from mixq.quantizers import quantize_activation

    dtype = torch.float16 if device == "cuda" else torch.float32
    rows = []
    for kind, size, c_in, n, kernel, stride in shapes:
        row = dict(kind=kind, size=size, c_in=c_in, n=n, kernel=kernel, stride=stride)
        x, p8 = layer_params(kind, size, c_in, n, kernel, 8, 8, dtype, device, seed=1)
        geometry = dict(kernel_size=(kernel, kernel), stride=(stride, stride), padding=(kernel // 2, kernel // 2))
        weight = torch.randn(n, c_in * kernel * kernel, device=device, dtype=dtype)
        if kind == "linear":
            row["fp16_s"] = timed(lambda: F.linear(x, weight, p8["bias"]), device, rounds)
            if device == "cuda":
                w_t = p8["qweight"].t()
                row["int_mm_s"] = timed(lambda: reference.epilogue(
                    torch._int_mm(quantize_activation(x, p8["x_scale"], p8["x_zero"], 8), w_t), p8["x_scale"],
                    p8["x_zero"], p8["w_scale"], p8["w_sum"], p8["bias"], x.dtype), device, rounds)
        else:
            w4d = weight.view(n, kernel, kernel, c_in).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
            row["fp16_s"] = timed(lambda: F.conv2d(x, w4d, p8["bias"], stride, kernel // 2), device, rounds)
        for w_bits in (8, 4):
            _, p = layer_params(kind, size, c_in, n, kernel, w_bits, 8, dtype, device, seed=1)
            call = (lambda: triton_gemm.linear(x, **p)) if kind == "linear" else \
                (lambda: triton_conv.conv2d(x, **p, **geometry))
            row[f"w{w_bits}a8_s"] = timed(call, device, rounds)
        rows.append(row)
        log(f"kernels: {kind} {size} {c_in}->{n}: " + ", ".join(
            f"{k} {v * 1e6:.1f} us" for k, v in row.items() if k.endswith("_s")))
    return rows


# --- the full UNet -----------------------------------------------------------------------------


def unet_timings(device: str, rounds: int) -> dict:
    """fp16 and quantized UNet forwards: CUDA-graph replays on a GPU, eager on CPU (dry run)."""
    import copy
    import types

    import torch

    import mixq
    from benchmarks.cpu_unet import calibrate, unet_inputs
    from benchmarks.plans import mixed_4bit_plan
    from mixq.offline import SDXL_UNET_STRUCTURE, shrink_unet_config, unet_from_config

    dtype = torch.float16 if device == "cuda" else torch.float32
    config = dict(SDXL_UNET_STRUCTURE) if device == "cuda" else shrink_unet_config(dict(SDXL_UNET_STRUCTURE))
    latent = 64 if device == "cuda" else 16
    base = unet_from_config(config, seed=0, dtype=dtype, device=device)  # made in place on the GPU
    inputs = {k: v.to(device) if hasattr(v, "to") else {a: b.to(device) for a, b in v.items()}
              for k, v in unet_inputs(base, latent, dtype).items()}
    calibration = calibrate(base, inputs)
    variants = {"fp16": None, "W8A8": dict(w_bit=8, a_bit=8), "W4A8": dict(w_bit=4, a_bit=8),
                "4-bit mixed plan": dict(plan=mixed_4bit_plan(base))}
    results = {"latents": latent, "dtype": str(dtype), "graph": device == "cuda", "variants": {}}
    for name, options in variants.items():
        unet = base if options is None else copy.deepcopy(base)
        if options is not None:
            mixq.quantize(types.SimpleNamespace(unet=unet), calibration=calibration, progress=False, **options)
        results["variants"][name] = forward_time(unet, inputs, device, rounds)
        log(f"unet: {name}: {results['variants'][name]['median_s'] * 1e3:.2f} ms")
        if unet is not base:
            del unet
    results["torchao"] = torchao_int8_dynamic(base, inputs, device, rounds, results["variants"])
    return results


def torchao_int8_dynamic(base, inputs, device: str, rounds: int, variants: dict) -> str:
    """torchao's int8 dynamic-activation int8-weight UNet beside mixq's, when torchao is installed
    (the GPU image has none; `pip install torchao` adds the row). Returns what happened, for the report;
    a failure here is recorded, not fatal: the row is a comparison, not mixq's correctness."""
    import copy

    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError as err:
        return f"not measured: torchao is not installed ({err})"
    try:
        unet = copy.deepcopy(base)
        quantize_(unet, Int8DynamicActivationInt8WeightConfig())
        variants["torchao int8 dynamic"] = forward_time(unet, inputs, device, rounds)
    except Exception as err:  # noqa: BLE001 (recorded in the report)
        return f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    log(f"unet: torchao int8 dynamic: {variants['torchao int8 dynamic']['median_s'] * 1e3:.2f} ms")
    import torchao

    return f"measured with torchao {torchao.__version__}"


def forward_time(unet, inputs, device: str, rounds: int) -> dict:
    import torch

    with torch.no_grad():
        if device != "cuda":
            return {"median_s": timed(lambda: unet(**inputs), device, rounds), "peak_bytes": None}
        torch.cuda.synchronize()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up outside the graph: autotuning, compilation, lazy state
                unet(**inputs)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            unet(**inputs)
        times = []
        for _ in range(3 + rounds):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return {"median_s": statistics.median(times[3:]), "rounds": rounds,
                "peak_bytes": torch.cuda.max_memory_allocated()}


# --- report ------------------------------------------------------------------------------------


def static_estimates() -> dict:
    """(kind, M, K, N) -> the static report's per-shape estimate (seconds), where it has one."""
    path = STATIC / "estimates.json"
    if not path.is_file():
        return {}
    return {(r["kind"], r["m"], r["k"], r["n"]): r for r in json.loads(path.read_text())["layers"]}


def gemm_dims(kind, size, c_in, n, kernel, stride) -> tuple:
    if kind == "linear":
        return ("linear", size, c_in, n)
    out = (size + stride - 1) // stride
    return ("conv", out * out, c_in * kernel * kernel, n)


def write_report(out: Path, env: dict, checks: list[dict], kernels: list[dict], unet: dict):
    failed = [c for c in checks if not c["ok"]]
    estimates = static_estimates()
    lines = [f"# GPU run, {env['date']}: {env.get('gpu') or env.get('cpu')} (dry run: {env['device'] != 'cuda'})", "",
             f"torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, diffusers {env['diffusers']}, "
             f"driver {env.get('driver')}, mixq {env['mixq_commit']}. Command: `benchmarks/gpu_run.sh OUT`.", "",
             f"## Correctness: {len(checks) - len(failed)} of {len(checks)} cases bit for bit the reference", ""]
    lines += [f"- FAILED {c}" for c in failed[:20]] or ["Every case matches."]
    lines += ["", "## Kernels (median per call) against the static estimate", "",
              "| shape | fp16 | _int_mm | mixq W8A8 | mixq W4A8 | static W8 | static W4 | W8A8 / fp16 |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in kernels:
        key = gemm_dims(row["kind"], row["size"], row["c_in"], row["n"], row["kernel"], row["stride"])
        est = estimates.get(key, {})
        static = [f"{est[w]['gemm_s'] * 1e6:.1f} us" if w in est else "-" for w in ("w8", "w4")]
        lines.append(f"| {row['kind']} M={key[1]} K={key[2]} N={key[3]} | {row['fp16_s'] * 1e6:.1f} us | "
                     f"{row['int_mm_s'] * 1e6:.1f} us | " if "int_mm_s" in row else
                     f"| {row['kind']} M={key[1]} K={key[2]} N={key[3]} | {row['fp16_s'] * 1e6:.1f} us | - | ")
        lines[-1] += (f"{row['w8a8_s'] * 1e6:.1f} us | {row['w4a8_s'] * 1e6:.1f} us | {static[0]} | {static[1]} | "
                      f"{row['fp16_s'] / row['w8a8_s']:.2f}x |")
    lines += ["", f"## Whole UNet ({unet['latents']}x{unet['latents']} latents, batch 1, "
              f"{'CUDA graph' if unet['graph'] else 'eager'})", "", "| variant | median | peak memory | vs fp16 |",
              "| --- | --- | --- | --- |"]
    base = unet["variants"]["fp16"]["median_s"]
    for name, row in unet["variants"].items():
        peak = f"{row['peak_bytes'] / 2**30:.2f} GiB" if row.get("peak_bytes") else "-"
        lines.append(f"| {name} | {row['median_s'] * 1e3:.2f} ms | {peak} | {base / row['median_s']:.2f}x |")
    lines += ["", f"torchao int8 dynamic (Int8DynamicActivationInt8WeightConfig): {unet.get('torchao', 'not run')}."]
    whole = STATIC / "unet-estimate.json"
    if whole.is_file():
        h100 = json.loads(whole.read_text()).get("h100", {})
        lines += ["", "Static whole-UNet estimate for H100 (benchmarks/results/static/unet-estimate.md), calibrated: "
                  + ", ".join(f"{k} {v['calibrated_s'] * 1e3:.1f} ms" for k, v in h100.items()) + "."]
    (out / "report.md").write_text("\n".join(lines) + "\n")


# --- the run -----------------------------------------------------------------------------------


def run(out: Path, dry_run: bool, rounds: int) -> int:
    import torch

    device = "cpu" if dry_run else "cuda"
    env = environment(device)
    (out / "environment.json").write_text(json.dumps(env, indent=1) + "\n")
    log(f"environment: {env.get('gpu') or env.get('cpu')}, torch {env['torch']}, triton {env['triton']}")
    shapes = DRY_SHAPES if dry_run else GPU_SHAPES
    dtypes = (torch.float16, torch.bfloat16)
    checks = correctness(shapes, dtypes, device)
    (out / "correctness.json").write_text(json.dumps(checks, indent=1) + "\n")
    failed = sum(not c["ok"] for c in checks)
    log(f"correctness: {len(checks) - failed} of {len(checks)} cases match the reference")
    kernels = kernel_timings(shapes, device, rounds)
    (out / "kernels.json").write_text(json.dumps(kernels, indent=1) + "\n")
    with environment_variable("MIXQ_AUTOTUNE", "0"):  # the UNet uses what the kernel step tuned, else defaults
        unet = unet_timings(device, rounds)
    (out / "unet.json").write_text(json.dumps(unet, indent=1) + "\n")
    autotune = out / "autotune.json"
    if not autotune.exists():
        autotune.write_text("{}\n")  # nothing was tuned (dry run: fixed configs)
    write_report(out, env, checks, kernels, unet)
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m benchmarks.gpu_run",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="results folder (created; at most 8 files are written)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes (CI)")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported
    else:
        os.environ["TRITON_INTERPRET"] = "0"
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA device; run with --dry-run to exercise this script on CPU", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["MIXQ_AUTOTUNE_CACHE"] = str((args.out / "autotune.json").resolve())
    os.environ.setdefault("MIXQ_AUTOTUNE_SECONDS", str(TUNING_SECONDS_PER_SHAPE))
    captured = io.StringIO()
    status = 1
    with contextlib.redirect_stdout(Tee(sys.stdout, captured)):
        try:
            status = run(args.out, args.dry_run, args.rounds if not args.dry_run else min(args.rounds, 2))
        except Exception:  # the log must come back even when a step breaks
            traceback.print_exc(file=sys.stdout)
        finally:
            (args.out / "log.txt").write_text(captured.getvalue())
    return status


class Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self):
        for stream in self.streams:
            stream.flush()


if __name__ == "__main__":
    sys.exit(main())
