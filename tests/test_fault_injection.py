"""Crash-safety of save_quantized: a process killed (SIGKILL) at every step boundary of a save over an
existing checkpoint leaves the old checkpoint or the new one, each loading bit-identically, and the
next save removes whatever the killed one left behind."""

from __future__ import annotations

import copy
import multiprocessing
import os
import signal
from pathlib import Path

import pytest
import torch

import mixq
from mixq import checkpoint

QUICK = dict(progress=False, num_inference_steps=1, guidance_scale=0.0)


def saved_state(pipe) -> dict:
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def pipes(_tiny_sdxl_master):
    """W8A8 and W4A8 versions of one model (the same calibration) and their UNet states."""
    calibration = mixq.calibrate_ranges(_tiny_sdxl_master, num_prompts=2, **QUICK)
    w8 = mixq.quantize(copy.deepcopy(_tiny_sdxl_master), 8, 8, calibration=calibration, progress=False)
    w4 = mixq.quantize(copy.deepcopy(_tiny_sdxl_master), 4, 8, calibration=calibration, progress=False)
    return {"old": w8, "new": w4, "states": {"old": saved_state(w8), "new": saved_state(w4)}}


def save_killed_at(step: str, pipe, folder: Path):
    """Run save_quantized in a forked child that SIGKILLs itself when the save reaches `step`."""
    def child():
        def crash(reached):
            if reached == step:
                os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.save_step = crash
        mixq.save_quantized(pipe, folder)
        os._exit(0)

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(120)
    assert process.exitcode == -signal.SIGKILL, f"the save was not killed at {step!r} (exit {process.exitcode})"


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("step", checkpoint.SAVE_STEPS)
def test_killed_save_leaves_the_old_or_the_new_checkpoint(step, pipes, _tiny_sdxl_master, tmp_path):
    folder = tmp_path / "checkpoint"
    mixq.save_quantized(pipes["old"], folder)

    save_killed_at(step, pipes["new"], folder)

    loaded = saved_state(mixq.load_quantized(copy.deepcopy(_tiny_sdxl_master), folder))
    switched = checkpoint.SAVE_STEPS.index(step) >= checkpoint.SAVE_STEPS.index("manifest written")
    assert same_state(loaded, pipes["states"]["new" if switched else "old"]), f"killed at {step!r}"

    # The next save completes and leaves exactly one checkpoint: no temporaries, no old tensor file.
    mixq.save_quantized(pipes["new"], folder)
    names = sorted(p.name for p in folder.iterdir())
    assert temporaries(folder) == [] and len(names) == 2 and checkpoint.MANIFEST_NAME in names, names
    assert same_state(saved_state(mixq.load_quantized(copy.deepcopy(_tiny_sdxl_master), folder)),
                      pipes["states"]["new"])


def test_every_step_boundary_is_reached_in_order(pipes, tmp_path, monkeypatch):
    reached = []
    monkeypatch.setattr(checkpoint, "save_step", reached.append)
    mixq.save_quantized(pipes["old"], tmp_path / "a")
    mixq.save_quantized(pipes["new"], tmp_path / "a")
    assert reached == list(checkpoint.SAVE_STEPS) * 2


def test_killed_first_save_leaves_no_checkpoint_that_loads_wrongly(pipes, _tiny_sdxl_master, tmp_path):
    """Killed before the manifest exists: the folder is refused as 'no manifest', never half-loaded."""
    folder = tmp_path / "first"
    save_killed_at("manifest staged", pipes["new"], folder)
    with pytest.raises(mixq.CheckpointError, match="holds no mixq_manifest.json"):
        mixq.load_quantized(copy.deepcopy(_tiny_sdxl_master), folder)
    assert temporaries(folder)  # the staged manifest, removed by the next save
    mixq.save_quantized(pipes["new"], folder)
    assert temporaries(folder) == []
