"""Run everything and write the report: the UNet and pipeline suites, fidelity, then the report.

    python -m benchmarks.run --out benchmarks/results                  # proving (offline default)
    python -m benchmarks.run --config tiny --quick --out bench-out       # random-weight tiny, seconds
    python -m benchmarks.run --config sdxl-turbo --unet-config PATH/unet/config.json \\
        --mixq-mode cuda-graph --prompts PATH/PartiPrompts.tsv --out benchmarks/results

Run from the repository root. Results go to OUT/<device>-<date>/ (benchmark.json, fidelity.json,
grid.png, latency-memory.png, run.json) and the report to OUT/<device>-<date>.md. Existing results are
never overwritten: a second run on the same day writes <device>-<date>-2, and so on (--overwrite
replaces them; an explicit --name that exists is refused without it). --quick runs one
round with no warm-up and two fidelity prompts: it checks that the suite works, quickly.
Options after `--` go to pytest unchanged (e.g. -- -k "w8a8 or fp").
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
from pathlib import Path

from benchmarks.config import CONFIGS, add_options, bench_config, option_dest, options_as_argv
from benchmarks.report import BENCHMARK_FILE, RUN_FILE, write_report

SUITES = ("test_bench_unet.py", "test_bench_pipeline.py")
QUICK = {"mixq_rounds": 1, "mixq_warmup": 0}
QUICK_FIDELITY_PROMPTS = 2
TIMING_ONLY = ("mixq_rounds", "mixq_warmup", "mixq_mode")  # fidelity runs eager, untimed


def parse_args(argv=None):
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results root folder")
    parser.add_argument("--name", default=None, help="results name (default: <device>-<date>, then -2, -3, ...)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing results of the same name")
    parser.add_argument("--quick", action="store_true", help="one round, no warm-up, two fidelity prompts")
    parser.add_argument("--prompts", default=None, help="fidelity prompts file (default: mixq's built-in set; "
                                                            "proving: held-out evaluation prompts)")
    parser.add_argument("--num-prompts", type=int, default=None, help="fidelity prompts (default: proving 50, tiny 4, "
                                                                          "sdxl-turbo 8)")
    parser.add_argument("--clip-model", default=None, help="local CLIP model folder for CLIP score")
    parser.add_argument("--skip-fidelity", action="store_true", help="latency and memory only")
    add_options(parser.add_argument)
    # --config is the short spelling of --mixq-config here; pytest reserves --config* for itself.
    parser.add_argument("--config", dest=option_dest("--mixq-config"), choices=CONFIGS,
                        default=argparse.SUPPRESS, help="same as --mixq-config")
    if argv is None:
        argv = sys.argv[1:]
    ours, pytest_extra = split_at_double_dash(argv)
    args = parser.parse_args(ours)
    args.pytest_extra = pytest_extra
    return args


def split_at_double_dash(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def suite_options(args) -> dict:
    values = dict(vars(args))
    if args.quick:
        values.update({k: v for k, v in QUICK.items() if values.get(k) is None})
    return values


def pytest_command(options: dict, json_path: Path, extra: list[str]) -> list[str]:
    here = Path(__file__).resolve().parent
    return [sys.executable, "-m", "pytest", *(str(here / suite) for suite in SUITES), *options_as_argv(options),
            f"--benchmark-json={json_path}", "-p", "no:cacheprovider", "-q", "-rsf", *extra]


def fidelity_command(options: dict, args, out: Path) -> list[str]:
    model_options = {k: v for k, v in options.items() if k not in TIMING_ONLY}
    cmd = [sys.executable, "-m", "benchmarks.fidelity", "--out", str(out), *options_as_argv(model_options)]
    num_prompts = args.num_prompts or (QUICK_FIDELITY_PROMPTS if args.quick else None)
    for flag, value in (("--prompts", args.prompts), ("--num-prompts", num_prompts), ("--clip-model", args.clip_model)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd


def shown(cmd: list[str]) -> str:
    """A command as a person would type it (python for the interpreter path, repo-relative suites)."""
    root = Path(__file__).resolve().parent.parent
    words = ["python" if word == sys.executable else word for word in cmd]
    words = [word[len(str(root)) + 1:] if word.startswith(str(root) + "/") else word for word in words]
    return shlex.join(words)


def results_taken(out: Path, name: str) -> bool:
    return (out / name).exists() or (out / f"{name}.md").exists()


def results_name(out: Path, base: str, explicit: bool, overwrite: bool) -> str:
    """A name whose folder and report do not exist yet (committed results are never replaced
    unless --overwrite)."""
    if overwrite or not results_taken(out, base):
        return base
    if explicit:
        raise ValueError(f"{out / base} already exists: pick another --name, or pass --overwrite to replace it")
    suffix = 2
    while results_taken(out, f"{base}-{suffix}"):
        suffix += 1
    return f"{base}-{suffix}"


def run(argv=None) -> int:
    args = parse_args(argv)
    options = suite_options(args)
    try:
        cfg = bench_config(options)  # fail on bad options before minutes of work
    except ValueError as err:
        print(f"python -m benchmarks.run: {err}", file=sys.stderr)
        return 2
    from benchmarks.environment import device_slug

    base = args.name or f"{device_slug(cfg.device)}-{datetime.date.today().isoformat()}"
    try:
        name = results_name(args.out, base, explicit=args.name is not None, overwrite=args.overwrite)
    except ValueError as err:
        print(f"python -m benchmarks.run: {err}", file=sys.stderr)
        return 2
    results = args.out / name
    results.mkdir(parents=True, exist_ok=True)
    steps = [pytest_command(options, results / BENCHMARK_FILE, args.pytest_extra)]
    if not args.skip_fidelity:
        steps.append(fidelity_command(options, args, results))
    from mixq.io import write_text_atomic

    command = shlex.join(["python", "-m", "benchmarks.run", *(sys.argv[1:] if argv is None else argv)])
    write_text_atomic(results / RUN_FILE, json.dumps({"command": command, "steps": [shown(s) for s in steps]}, indent=2))
    failures = []
    for step in steps:
        print(f"$ {shown(step)}", flush=True)
        code = subprocess.call(step)
        if code != 0:
            failures.append(f"{shown(step)} exited with {code}")
    if not (results / BENCHMARK_FILE).is_file():
        print("no benchmark results were written; see the pytest output above", file=sys.stderr)
        return 1
    report = write_report(results)
    print(f"report: {report}")
    for failure in failures:
        print(f"warning: {failure} (the report lists what ran)", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(run())
