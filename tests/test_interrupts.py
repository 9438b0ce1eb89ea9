"""Ctrl-C (SIGINT) and SIGTERM at every stage of `python -m mixq.calibrate`: one line naming the stage
and how to resume, exit status 130 / 143, no traceback, and a rerun of the same command that ends
with the files an uninterrupted run writes."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from tests.test_cli import subprocess_env, write_small_config

# Where in each stage the signal arrives: a function the stage calls, replaced by one that signals
# the process and then carries on (as a real Ctrl-C lands wherever the program happens to be).
SIGNAL_POINTS = {
    "collect": ("mixq.calib.run", "collect_reference", 1),  # ranges written, the float reference not yet
    "sensitivity": ("mixq.calib.sensitivity", "measure_layer", 3),  # after two finished layers
    "allocate": ("mixq.calib.run", "build_plan", 1),
    "report": ("mixq.calib.run", "write_report", 1),
}
COMPARED_FILES = ("sensitivity.yaml", "plan.yaml", "config.yaml")
COMPARED_TENSOR_FILES = ("activation_ranges.safetensors", "reference.safetensors")


def interrupting_command(stage: str, signum: int, args: list[str]) -> list[str]:
    module, function, on_call = SIGNAL_POINTS[stage]
    code = textwrap.dedent(f"""
        import importlib, os, sys
        module = importlib.import_module({module!r})
        original, calls = getattr(module, {function!r}), []
        def signalling(*args, **kwargs):
            calls.append(1)
            if len(calls) == {on_call}:
                os.kill(os.getpid(), {int(signum)})
            return original(*args, **kwargs)
        setattr(module, {function!r}, signalling)
        from mixq.calibrate import main
        sys.exit(main({args!r}))
    """)
    return [sys.executable, "-c", code]


def same_safetensors(a: Path, b: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        return (fa.metadata() == fb.metadata() and sorted(fa.keys()) == sorted(fb.keys())
                and all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys()))


def run(command, cwd) -> subprocess.CompletedProcess:
    # The child gets SIGINT's default disposition, as a command started from a terminal has: pytest itself
    # may run as a background job, whose children inherit an ignored SIGINT (and never see Ctrl-C).
    return subprocess.run(command, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=600,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def cli_args(config: str, out: Path) -> list[str]:
    return ["--config", config, "--out", str(out), "--no-progress"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    config = write_small_config(root / "config.yaml")
    result = run([sys.executable, "-m", "mixq.calibrate", *cli_args(config, root / "run")], root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


@pytest.mark.parametrize("stage, signum", [
    ("collect", signal.SIGINT), ("sensitivity", signal.SIGINT), ("allocate", signal.SIGINT),
    ("report", signal.SIGINT), ("sensitivity", signal.SIGTERM), ("report", signal.SIGTERM),
])
def test_interrupt_prints_one_line_and_the_rerun_resumes(stage, signum, uninterrupted, tmp_path):
    config = write_small_config(tmp_path / "config.yaml")
    out = tmp_path / "run"
    stopped = run(interrupting_command(stage, signum, cli_args(config, out)), tmp_path)

    assert stopped.returncode == 128 + signum, stopped.stderr[-3000:]
    lines = [line for line in stopped.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stopped.stderr[-3000:]
    assert lines[0].startswith(f"interrupted during {stage}") and "rerun the same command to resume" in lines[0]
    if stage == "sensitivity":
        assert "(2 of " in lines[0]  # two layers were finished and saved before the signal
    assert not [p.name for p in out.rglob(".*.tmp")], "an interrupted write left a temporary file"

    resumed = run([sys.executable, "-m", "mixq.calibrate", *cli_args(config, out)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in COMPARED_FILES:
        assert (out / name).read_bytes() == (uninterrupted / name).read_bytes(), f"{name} differs after the resume"
    for name in COMPARED_TENSOR_FILES:  # the same tensors and metadata (the header's order may differ)
        assert same_safetensors(out / name, uninterrupted / name), f"{name} differs after the resume"
    report = (out / "report.md").read_text()
    assert yaml.safe_load((out / "plan.yaml").read_text())["budget"]["w_bits"] == 4.0 and "# " in report


def test_interrupt_while_loading_says_nothing_was_written(tmp_path):
    config = write_small_config(tmp_path / "config.yaml")
    out = tmp_path / "run"
    code = textwrap.dedent(f"""
        import os, signal, sys
        import mixq.calib.run as run
        def interrupted_load(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGINT)
        run.load_pipeline = interrupted_load
        from mixq.calibrate import main
        sys.exit(main({cli_args(config, out)!r}))
    """)
    stopped = run([sys.executable, "-c", code], tmp_path)
    assert stopped.returncode == 130
    assert stopped.stderr.strip().startswith("interrupted before any stage started (nothing was written)")
    assert not out.exists() or not any(out.iterdir())
