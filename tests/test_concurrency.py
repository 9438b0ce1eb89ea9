"""Two processes, one folder: savers take turns, a load during a save gets the old or the new checkpoint,
two re-budgets of one run folder leave config, plan and report in agreement. Real processes (fork),
with interleavings forced through the save-step hook, and a seeded randomized stress."""

from __future__ import annotations

import copy
import multiprocessing
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

import mixq
from mixq import checkpoint
from mixq.errors import MixqError
from tests.conftest import capture_unet_call, unet_output
from tests.test_cli import subprocess_env, write_small_config
from tests.test_run_folder import assert_folder_agrees

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="fork and flock semantics of Linux")
QUICK = dict(progress=False, num_inference_steps=1, guidance_scale=0.0)
FORK = multiprocessing.get_context("fork")
STRESS_ROUNDS = int(os.environ.get("MIXQ_STRESS_ROUNDS", "12"))


@pytest.fixture(scope="module")
def models(_tiny_sdxl_master):
    """Two quantized versions of one model (W8A8, W4A8), their UNet outputs on one input, a float copy."""
    calibration = mixq.calibrate_ranges(_tiny_sdxl_master, num_prompts=2, **QUICK)
    call = capture_unet_call(_tiny_sdxl_master, prompts=("a red bus on a bridge",))
    pipes = {bits: mixq.quantize(copy.deepcopy(_tiny_sdxl_master), bits, 8, calibration=calibration, progress=False)
             for bits in (8, 4)}
    outputs = {bits: unet_output(pipe.unet, call) for bits, pipe in pipes.items()}
    return {"pipes": pipes, "outputs": outputs, "call": call, "float": _tiny_sdxl_master}


def loaded_output(models, folder) -> torch.Tensor:
    pipe = mixq.load_quantized(copy.deepcopy(models["float"]), folder)
    return unet_output(pipe.unet, models["call"])


def which_model(models, output) -> int | None:
    return next((bits for bits, expected in models["outputs"].items() if torch.equal(output, expected)), None)


def in_child(target, *args) -> multiprocessing.Process:
    process = FORK.Process(target=target, args=args)
    process.start()
    return process


def save_pausing_at(step: str, pipe, folder: Path, flags: Path):
    """Child: save, stopping at `step` until the file flags/go exists (flags/paused says it stopped)."""
    def pause(reached):
        if reached == step:
            (flags / "paused").touch()
            while not (flags / "go").exists():
                time.sleep(0.01)
    checkpoint.save_step = pause
    mixq.save_quantized(pipe, folder)
    os._exit(0)


def save_then_exit(pipe, folder: Path):
    mixq.save_quantized(pipe, folder)
    os._exit(0)


def load_into_file(models, folder: Path, result: Path):
    """Child: load, then write which saved model came out (or the error's type)."""
    try:
        bits = which_model(models, loaded_output(models, folder))
        result.write_text(f"model {bits}")
    except MixqError as err:
        result.write_text(f"error {type(err).__name__}: {err}")
    except Exception as err:  # noqa: BLE001 (reported to the parent, which fails the test)
        result.write_text(f"raw {type(err).__name__}: {err}")
    os._exit(0)


def wait_for(path: Path, seconds: float = 60):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.01)


@pytest.mark.parametrize("step", ["tensors written", "manifest written"])
def test_a_second_saver_waits_for_the_first_and_nothing_is_lost(models, tmp_path, step):
    folder, flags = tmp_path / "ckpt", tmp_path / "flags"
    flags.mkdir()
    mixq.save_quantized(models["pipes"][8], folder)  # the checkpoint that was there before
    first = in_child(save_pausing_at, step, models["pipes"][4], folder, flags)
    wait_for(flags / "paused")
    second = in_child(save_then_exit, models["pipes"][8], folder)
    time.sleep(1.0)
    assert second.is_alive(), "the second save ran while the first held the folder"
    (flags / "go").touch()
    first.join(60)
    second.join(60)
    assert first.exitcode == 0 and second.exitcode == 0
    assert which_model(models, loaded_output(models, folder)) == 8  # the save that finished last
    assert len(list(folder.glob(checkpoint.WEIGHTS_PATTERN))) == 1 and not list(folder.glob(".*.tmp"))


def test_a_load_during_a_save_gets_the_new_checkpoint_whole(models, tmp_path):
    folder, flags, result = tmp_path / "ckpt", tmp_path / "flags", tmp_path / "result"
    flags.mkdir()
    mixq.save_quantized(models["pipes"][8], folder)
    saver = in_child(save_pausing_at, "tensors written", models["pipes"][4], folder, flags)
    wait_for(flags / "paused")
    loader = in_child(load_into_file, models, folder, result)
    time.sleep(1.0)
    assert loader.is_alive() and not result.exists(), "the load read the folder in the middle of a save"
    (flags / "go").touch()
    saver.join(60)
    loader.join(120)
    assert result.read_text() == "model 4"


def test_stress_concurrent_saves_and_loads(models, tmp_path):
    """Rounds of two savers over an existing checkpoint and a loader, at natural timing with random
    start delays: every load gives one of the saved models, and the folder always ends loadable."""
    rng = random.Random(5)
    folder = tmp_path / "ckpt"
    mixq.save_quantized(models["pipes"][8], folder)
    outcomes = []
    for round_ in range(STRESS_ROUNDS):
        result = tmp_path / f"load{round_}"
        children = []
        for action in rng.sample(["save8", "save4", "load"], 3):
            time.sleep(rng.uniform(0, 0.05))
            if action == "load":
                children.append(in_child(load_into_file, models, folder, result))
            else:
                children.append(in_child(save_then_exit, models["pipes"][int(action[-1])], folder))
        for child in children:
            child.join(120)
            assert child.exitcode == 0, f"round {round_}: a child failed (exit {child.exitcode})"
        outcome = result.read_text()
        assert outcome in ("model 8", "model 4"), f"round {round_}: {outcome}"
        assert which_model(models, loaded_output(models, folder)) in (8, 4), f"round {round_}: folder unloadable"
        outcomes.append(outcome)
    print(f"{STRESS_ROUNDS} rounds: loads {dict((o, outcomes.count(o)) for o in set(outcomes))}")


def test_concurrent_rebudgets_leave_config_plan_and_report_in_agreement(tmp_path):
    config = write_small_config(tmp_path / "config.yaml")
    out = tmp_path / "run"
    command = [sys.executable, "-m", "mixq.calibrate", "--no-progress"]
    first = subprocess.run([*command, "--config", config, "--out", str(out)], env=subprocess_env(),
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    # A handshake, so that the order does not depend on how fast either process starts: the first re-budget
    # says when it has reached its report stage (holding the folder) and stays there until the second has said
    # it is waiting. If the lock failed, the second would run to its end without waiting, and the test fails
    # below. The first gives up holding after 300 s, so a broken handshake ends in a failure, not a hang.
    in_report, released = tmp_path / "first-rebudget-in-report", tmp_path / "first-rebudget-released"
    slow_report = textwrap.dedent(f"""
        import pathlib, sys, time
        import mixq.calib.run as run
        write_report = run.write_report

        def held_write_report(*args, **kwargs):
            pathlib.Path({str(in_report)!r}).touch()
            deadline = time.monotonic() + 300
            while not pathlib.Path({str(released)!r}).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            return write_report(*args, **kwargs)

        run.write_report = held_write_report
        from mixq.calibrate import main
        sys.exit(main({["--no-progress", "--out", str(out), "--stage", "allocate", "--w-bits", "3.5"]!r}))
    """)
    first_rebudget = subprocess.Popen([sys.executable, "-c", slow_report], env=subprocess_env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not in_report.exists() and first_rebudget.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not in_report.exists():
        released.touch()
        pytest.fail(f"the first re-budget never reached its report: {first_rebudget.communicate()[1][-2000:]}")
    second_rebudget = subprocess.Popen([*command, "--out", str(out), "--stage", "allocate", "--w-bits", "5.0"],
                                       env=subprocess_env(PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    second_said = []
    for line in second_rebudget.stdout:  # up to the waiting message, or to the end if it never waits
        second_said.append(line)
        if "waiting until it is done" in line:
            break
    released.touch()
    processes = [first_rebudget, second_rebudget]
    outputs = [p.communicate(timeout=600) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [err[-2000:] for _, err in outputs]
    assert "waiting until it is done" in "".join(second_said), "the second re-budget did not wait for the first"
    plan = yaml.safe_load((out / "plan.yaml").read_text())["budget"]["w_bits"]
    assert plan == 5.0  # the second re-budget ran after the first
    assert_folder_agrees(out, plan)
    # A plain rerun finds the folder consistent and current: nothing to redo.
    rerun = subprocess.run([*command, "--out", str(out)], env=subprocess_env(), capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0 and "allocate:" not in rerun.stdout and "report:" not in rerun.stdout
    assert_folder_agrees(out, plan)
