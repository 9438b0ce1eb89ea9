"""Compile the Triton kernels ahead of time for H100 (sm_90) and A100 (sm_80) and read their SASS.

No GPU is needed: Triton compiles for a GPUTarget on any machine, and its wheel ships ptxas,
cuobjdump and nvdisasm. Each variant (kernel x block config x weight bits x output dtype x target)
is compiled through the specialisation a real launch takes: the real launcher (triton_gemm.linear,
triton_conv.conv2d) runs on CPU tensors with the kernels swapped for a recorder, and the recorded
arguments go through the JIT's own binder (divisibility and alignment attributes, constexprs)
into triton.compile. For each cubin we record:

- the int8 tensor-core instruction (IGMMA on sm_90, IMMA on sm_80) and how many per K-step,
- registers, local memory (spill) bytes, spill instructions in total and inside the main loop,
- shared memory (Triton's dynamic allocation),
- SASS instructions per K-step of the main loop: the loop is the backward branch whose body
  holds the tensor-core MMAs; Triton's pipeliner does not unroll it, so one pass is one K-step.
  The body has no inner branches in these kernels, so the static count is the executed count;
- the instructions of the activation-quantization kernel the launcher runs first (per tile).

    python -m benchmarks.sass_gate [--full] [--jobs 2] --out results.json [--only w_bits=2 block_k=64]

runs the CI subset (the default configs) or, with --full, every candidate config; it must run
without TRITON_INTERPRET (the interpreter replaces the kernels). benchmarks/static_report.py turns
the result into the roofline estimate, and benchmarks/test_static_gate.py asserts on it in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

TARGETS = {"sm_90": 90, "sm_80": 80}
MMA_OPCODE = {"sm_90": "IGMMA", "sm_80": "IMMA"}
# Shared memory a block may use: 227 KB on H100, 163 KB on A100.
SHARED_MEMORY_LIMIT = {"sm_90": 227 * 1024, "sm_80": 163 * 1024}
KERNELS = ("linear", "conv3x3", "conv3x3s2")


@dataclass(frozen=True)
class Variant:
    kernel: str  # one of KERNELS
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    w_bits: int
    dtype: str  # the layer's input / output dtype: float16 or bfloat16
    target: str  # sm_90 or sm_80
    split_k: int = 1

    def config_name(self) -> str:
        split = f" split{self.split_k}" if self.split_k > 1 else ""
        return f"{self.block_m}x{self.block_n}x{self.block_k}/{self.num_warps}w/{self.num_stages}s{split}"


# --- compiling through the real launchers ------------------------------------------------------


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the call."""

    def __init__(self, kernel, calls: list):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.kernel, args, kwargs))


def recorded_launches(variant: Variant) -> list:
    """(kernel, args, kwargs) of every launch the real launcher makes for this variant, on CPU
    tensors of a representative SDXL shape (all sizes multiples of 128, like SDXL's)."""
    import torch

    from mixq.kernels import autotune, triton_conv, triton_gemm, triton_quantize

    calls: list = []
    patched = {(triton_gemm, "_linear_kernel"), (triton_gemm, "_epilogue_kernel"),
               (triton_conv, "_conv2d_kernel"), (triton_quantize, "_quantize_kernel")}
    saved = {(module, name): getattr(module, name) for module, name in patched}
    for (module, name), kernel in saved.items():
        setattr(module, name, _Recorder(kernel, calls))
    try:
        dtype = getattr(torch, variant.dtype)
        config = autotune.Config(variant.block_m, variant.block_n, variant.block_k, num_warps=variant.num_warps,
                                 num_stages=variant.num_stages, split_k=variant.split_k)
        n, c = 1280, 1280
        per_byte = 8 // variant.w_bits
        vectors = dict(w_scale=torch.empty(n), w_sum=torch.empty(n, dtype=torch.int32),
                       x_scale=torch.tensor(0.05), x_zero=torch.tensor(3.0), a_bits=8,
                       bias=torch.empty(n, dtype=dtype))
        packed_dtype = torch.int8 if variant.w_bits == 8 else torch.uint8
        if variant.kernel == "linear":
            x = torch.empty(1024, c, dtype=dtype)
            qweight = torch.empty(n, c // per_byte, dtype=packed_dtype)
            triton_gemm.linear(x, qweight, variant.w_bits, config=config, **vectors)
        else:
            step = 2 if variant.kernel == "conv3x3s2" else 1
            x = torch.empty(1, c, 32, 32, dtype=dtype).to(memory_format=torch.channels_last)
            qweight = torch.empty(n, 9 * c // per_byte, dtype=packed_dtype)
            triton_conv.conv2d(x, qweight, variant.w_bits, kernel_size=(3, 3), stride=(step, step),
                               padding=(1, 1), config=config, **vectors)
    finally:
        for (module, name), kernel in saved.items():
            setattr(module, name, kernel)
    return calls


def compile_launch(kernel, args, kwargs, target_name: str):
    """triton.compile on the specialisation that kernel[grid](*args, **kwargs) would compile. MMA_V2,
    which the launcher derives from the GPU it runs on (here a CPU tensor's device), is set from the
    target: mma.sync on sm_80, wgmma on sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    if "MMA_V2" in kwargs:
        kwargs = {**kwargs, "MMA_V2": TARGETS[target_name] < 90}
    target = GPUTarget("cuda", TARGETS[target_name], 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


# --- reading the SASS --------------------------------------------------------------------------


def tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
LABEL = re.compile(r"^(\.L_x_\d+):")
BRANCH_TARGET = re.compile(r"BRA\s+`\((\.L_x_\d+)\)")


def parse_sass(text: str) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """(address, instruction) in order, and label -> address of the instruction that follows it."""
    instructions, labels, pending = [], {}, []
    for line in text.splitlines():
        label = LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        match = INSTRUCTION.match(line)
        if match:
            if opcode(match.group(2)) == "NOP":  # alignment padding, never executed
                continue
            address = int(match.group(1), 16)
            for name in pending:
                labels[name] = address
            pending = []
            instructions.append((address, match.group(2)))
    return instructions, labels


def opcode(instruction: str) -> str:
    """The opcode without predicate and modifiers: '@P0 BRA `(.L_x_1)' -> 'BRA'."""
    words = instruction.split()
    word = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
    return word.split(".")[0]


def main_loop(instructions, labels, mma: str) -> list[str] | None:
    """The body of the innermost backward-branch loop that issues the tensor-core MMAs."""
    loops = []
    for index, (address, text) in enumerate(instructions):
        target = BRANCH_TARGET.search(text)
        if opcode(text) == "BRA" and target and labels.get(target.group(1), address + 1) <= address:
            start = next(i for i, (a, _) in enumerate(instructions) if a == labels[target.group(1)])
            body = [t for _, t in instructions[start:index + 1]]
            if any(opcode(t) == mma for t in body):
                loops.append(body)
    return min(loops, key=len) if loops else None


def resource_usage(cubin: Path) -> dict:
    out = subprocess.run([tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                         check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return dict(registers=int(usage.group(1)), stack_bytes=int(usage.group(2)), local_bytes=int(usage.group(4)))


SPILL_OPCODES = ("STL", "LDL")


def disassembled(compiled) -> tuple[str, dict]:
    """The SASS text of a compiled kernel and its resource usage (registers, stack, local memory)."""
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
        return sass, resource_usage(cubin)


def analyse(compiled, variant: Variant) -> dict:
    """The gate's measurements of one compiled kernel."""
    sass, usage = disassembled(compiled)
    instructions, labels = parse_sass(sass)
    mma = MMA_OPCODE[variant.target]
    loop = main_loop(instructions, labels, mma) or []
    loop_ops = [opcode(t) for t in loop]
    all_ops = [opcode(t) for _, t in instructions]
    return dict(
        compiled=True,
        mma_opcode=mma if mma in all_ops else None,
        mma_per_k_step=loop_ops.count(mma),
        int8_mma=any(mma in t and ".S8" in t for _, t in instructions),
        loop_found=bool(loop),
        instructions_per_k_step=len(loop),
        instructions_total=len(instructions),
        # wgmma waits for zero outstanding groups: the tensor core and the loop body do not overlap there
        mma_drains_per_k_step=sum("DEPBAR" in t and "0x0" in t and "gsb0" in t for t in loop),
        spill_instructions=sum(op in SPILL_OPCODES for op in all_ops),  # STL/LDL: local memory
        spill_instructions_in_loop=sum(op in SPILL_OPCODES for op in loop_ops),
        shared_bytes=compiled.metadata.shared,
        shared_limit=SHARED_MEMORY_LIMIT[variant.target],
        **usage,
    )


def quantize_pass_cost(compiled, kwargs: dict) -> dict:
    """The quantize kernel is straight-line code, one tile per program: its static instruction count
    (the division's rarely taken slow paths included, so an upper bound) is what a thread executes."""
    instructions, _ = parse_sass(disassembled(compiled)[0])
    return dict(instructions=len(instructions), num_warps=kwargs["num_warps"],
                elements_per_program=kwargs["BLOCK_P"] * kwargs["BLOCK_C"])


def measure(variant: Variant) -> dict:
    """Compile one variant's GEMM/conv kernel (and check its quantize/epilogue kernels compile)."""
    import triton

    record = dict(variant=asdict(variant), config=variant.config_name(), triton_version=triton.__version__)
    try:
        launches = recorded_launches(variant)
        main = [c for c in launches if c[0].__name__ in ("_linear_kernel", "_conv2d_kernel")]
        helpers = [c for c in launches if c not in main]
        record.update(analyse(compile_launch(*main[0], variant.target), variant))
        for kernel, args, kwargs in helpers:
            compiled = compile_launch(kernel, args, kwargs, variant.target)
            if kernel.__name__ == "_quantize_kernel":
                record["quantize"] = quantize_pass_cost(compiled, kwargs)
    except Exception as error:  # a variant that does not compile is a result, reported by the gate
        record.update(compiled=False, error=f"{type(error).__name__}: {str(error).splitlines()[0][:300]}")
    return record


# --- which variants ----------------------------------------------------------------------------


def variant_of(kernel: str, config, w_bits: int, dtype: str, target: str) -> Variant:
    return Variant(kernel, config.block_m, config.block_n, config.block_k, config.num_warps, config.num_stages,
                   w_bits, dtype, target, config.split_k)


def ci_variants() -> list[Variant]:
    """The default configs (large and small tile), every weight width, linear and 3x3 conv, both
    targets; one split-K and one bfloat16 variant, and the large tile's 256 K-step, per target."""
    from mixq.kernels.autotune import LARGE_TILE, SMALL_TILE, widened

    found = []
    for target in TARGETS:
        for tile in (LARGE_TILE, SMALL_TILE):
            for w_bits in (8, 4, 2):
                for kernel in ("linear", "conv3x3"):
                    found.append(variant_of(kernel, tile, w_bits, "float16", target))
        found.append(variant_of("linear", replace(SMALL_TILE, split_k=4), 4, "float16", target))
        found.append(variant_of("conv3x3s2", LARGE_TILE, 8, "bfloat16", target))
        for w_bits in (8, 4, 2):  # the large tile with a 256-wide K-step, as autotuning offers it
            found.append(variant_of("linear", widened(LARGE_TILE, 2), w_bits, "float16", target))
    return found


def full_variants() -> list[Variant]:
    """Every candidate tile as autotuning offers it (also widened to a 256 K-step) and narrowed to
    BLOCK_K 64, every kernel and weight width, both targets, fp16; bf16 and split-K for the default
    tiles. Tiles that autotuning never offers for a weight width (autotune.fits_in_registers, at the
    representative shape's 1280 channels) are left out."""
    from mixq.kernels.autotune import K_WIDENINGS, LARGE_TILE, SMALL_TILE, TILES, fits_in_registers, widened

    found = []
    for target in TARGETS:
        for tile in TILES:
            configs = [widened(tile, widening) for widening in K_WIDENINGS] + [replace(tile, block_k=64)]
            for config in configs:
                for w_bits in (8, 4, 2):
                    if not fits_in_registers(1280, config, w_bits):
                        continue
                    for kernel in KERNELS:
                        found.append(variant_of(kernel, config, w_bits, "float16", target))
        for tile in (LARGE_TILE, SMALL_TILE):
            for w_bits in (8, 4, 2):
                found.append(variant_of("linear", tile, w_bits, "bfloat16", target))
                found.append(variant_of("linear", replace(tile, split_k=4), w_bits, "float16", target))
    return found


def run(variants: list[Variant], jobs: int) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("the gate compiles real kernels: run it without TRITON_INTERPRET")
    if jobs <= 1:
        return [measure(v) for v in variants]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(measure, variants, chunksize=2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every candidate config (minutes), not the CI subset")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the per-variant records")
    parser.add_argument("--only", nargs="*", default=[], metavar="KEY=VALUE",
                        help="recompile only variants with these fields (e.g. w_bits=2 block_k=64) and replace "
                             "their records in --out, keeping the others")
    args = parser.parse_args(argv)
    variants = full_variants() if args.full else ci_variants()
    wanted = dict(item.split("=", 1) for item in args.only)
    variants = [v for v in variants if all(str(asdict(v)[key]) == value for key, value in wanted.items())]
    records = run(variants, args.jobs)
    if wanted and args.out.exists():
        listed = {json.dumps(asdict(v), sort_keys=True) for v in (full_variants() if args.full else ci_variants())}
        redone = {json.dumps(r["variant"], sort_keys=True) for r in records}
        kept = [r for r in json.loads(args.out.read_text())
                if json.dumps(r["variant"], sort_keys=True) in listed - redone]
        records = kept + records
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=1) + "\n")
    failed = [r for r in records if not r["compiled"]]
    print(f"{len(records)} variants, {len(failed)} failed to compile", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
