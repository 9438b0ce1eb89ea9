"""Leftovers and forged fields: stale sensitivity shards, manifest fields edited with their hashes
recomputed, huge prompts and plans, budgets that would share a plans/ file, non-UTF-8 paths, a full
disk. Each is refused with an error that names the file and field, or handled without loss."""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import mixq
from mixq import checkpoint
from mixq.calib.prompts import MAX_PROMPT_CHARS, load_prompts
from mixq.calibrate import main
from mixq.errors import CheckpointError, MixqError, PlanMismatchError, StorageError
from tests.conftest import capture_unet_call, unet_output
from tests.test_cli import write_small_config
from tests.test_hardening_properties import rehash

QUICK = dict(progress=False, num_inference_steps=1, guidance_scale=0.0)


# --- sensitivity shards ---------------------------------------------------------------------------


def plant_shard(out: Path, data) -> Path:
    folder = out / "sensitivity-shards"
    folder.mkdir(exist_ok=True)
    path = folder / "rank1.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_stale_shard_is_ignored_reported_and_never_moves_the_plan(folder, capsys):
    plan_before = (folder / "plan.yaml").read_bytes()
    table = yaml.safe_load((folder / "sensitivity.yaml").read_text())["layers"]
    name, row = next(iter(table.items()))
    forged = copy.deepcopy(row)
    forged["weight"] = {bits: 999.0 for bits in row["weight"]}
    shard = plant_shard(folder, {"layers": {name: forged}})  # no run key: a leftover of another run
    capsys.readouterr()
    assert main(["--out", str(folder), "--stage", "sensitivity", "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert f"ignoring {shard}" in said
    assert yaml.safe_load((folder / "sensitivity.yaml").read_text())["layers"][name] == row
    assert (folder / "plan.yaml").read_bytes() == plan_before


def test_a_matching_shard_with_a_bad_row_is_an_error_naming_the_shard(folder, capsys):
    from mixq.calib.runfolder import RunFolder

    table = yaml.safe_load((folder / "sensitivity.yaml").read_text())["layers"]
    name, row = next(iter(table.items()))
    bad = {**row, "weight": {bits: "abc" for bits in row["weight"]}}
    run_key = RunFolder(folder).inputs_key()
    shard = plant_shard(folder, {"run": run_key, "layers": {name: bad}})
    assert main(["--out", str(folder), "--stage", "sensitivity", "--no-progress"]) == 2
    message = capsys.readouterr().err
    assert str(shard) in message and "not a finite number" in message and "sensitivity.yaml:" not in message


def test_a_shard_that_is_a_list_is_an_error_naming_it(folder, capsys):
    shard = plant_shard(folder, [1, 2, 3])
    assert main(["--out", str(folder), "--stage", "sensitivity", "--no-progress"]) == 2
    message = capsys.readouterr().err
    assert str(shard) in message and "Traceback" not in message


def test_matching_shard_rows_are_merged_then_removed(folder, capsys):
    """A single-process run finishing what a sharded one left: rows of this run's inputs are used,
    and the shard goes once they are in the table."""
    from mixq.calib.runfolder import RunFolder

    table_file = yaml.safe_load((folder / "sensitivity.yaml").read_text())
    name, row = list(table_file["layers"].items())[-1]
    del table_file["layers"][name]
    (folder / "sensitivity.yaml").write_text(yaml.safe_dump(table_file, sort_keys=False))
    shard = plant_shard(folder, {"run": RunFolder(folder).inputs_key(), "layers": {name: row}})
    assert main(["--out", str(folder), "--stage", "sensitivity", "--no-progress"]) == 0
    said, count = capsys.readouterr().out, len(table_file["layers"]) + 1
    assert f"resuming, {count} of {count} layers already measured" in said  # the shard had the missing row
    assert "sensitivity: measured 1 layers" not in said
    assert yaml.safe_load((folder / "sensitivity.yaml").read_text())["layers"][name] == row
    assert not shard.exists() and not shard.parent.exists()


# --- forged manifest fields ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(_tiny_sdxl_master, tmp_path_factory):
    calibration = mixq.calibrate_ranges(_tiny_sdxl_master, num_prompts=2, **QUICK)
    pipe = mixq.quantize(copy.deepcopy(_tiny_sdxl_master), 4, 8, calibration=calibration, progress=False)
    folder = tmp_path_factory.mktemp("saved") / "ckpt"
    mixq.save_quantized(pipe, folder)
    return folder


def forged_copy(saved: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "forged"
    shutil.copytree(saved, folder)
    manifest = json.loads((folder / checkpoint.MANIFEST_NAME).read_text())
    edit(manifest)
    rehash(folder, manifest)  # as a tool or a hand edit would: the integrity hashes match the edit
    (folder / checkpoint.MANIFEST_NAME).write_text(json.dumps(manifest))
    return folder


def first_layer(manifest) -> str:
    return next(name for name, entry in manifest["layers"].items() if entry["a_bits"] == 8)


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.update(offset_binary_weights=True), "'offset_binary_weights'"),
    (lambda m: m.update(offset_binary_weights="no"), "'offset_binary_weights'"),
    (lambda m: m["layers"][first_layer(m)].update(a_bits=4), ".a_bits"),
    (lambda m: m["layers"][first_layer(m)].update(w_bits=8), ".w_bits"),
    (lambda m: m.update(format_version=2), "'format_version'"),
])
def test_forged_fields_are_refused_naming_the_file_and_field(saved, _tiny_sdxl_master, tmp_path, edit, field):
    folder = forged_copy(saved, tmp_path, edit)
    pipe = copy.deepcopy(_tiny_sdxl_master)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(CheckpointError) as error:
        mixq.load_quantized(pipe, folder)
    assert checkpoint.MANIFEST_NAME in str(error.value) and field in str(error.value)
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in before.items())


def test_an_unforged_checkpoint_still_loads_identically(saved, _tiny_sdxl_master, tmp_path):
    folder = forged_copy(saved, tmp_path, lambda m: m["mixq_info"].update(note="harmless"))
    call = capture_unet_call(_tiny_sdxl_master, prompts=("a red bus on a bridge",))
    a = unet_output(mixq.load_quantized(copy.deepcopy(_tiny_sdxl_master), saved).unet, call)
    b = unet_output(mixq.load_quantized(copy.deepcopy(_tiny_sdxl_master), folder).unet, call)
    assert torch.equal(a, b)


# --- inputs ----------------------------------------------------------------------------------------


def test_a_huge_prompt_is_cut_with_one_short_warning(tmp_path):
    text = "a red circle " * 500_000  # 6.5 MB on one line
    path = tmp_path / "prompts.txt"
    path.write_text(text + "\na blue square\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prompts = load_prompts(str(path))
    assert [len(p) for p in prompts] == [MAX_PROMPT_CHARS, len("a blue square")]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and len(messages[0]) < 200 and "red circle" not in messages[0]


def test_prompts_beyond_the_text_encoder_are_fitted_without_echoing_them(_tiny_sdxl_master, capfd):
    from mixq.calib.prompts import fit_prompts_to_text_encoder

    long = "a photo of " + " ".join(f"red{i} circle" for i in range(300))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fitted = fit_prompts_to_text_encoder(_tiny_sdxl_master, [long, "a cat"])
        mixq.calibrate_ranges(copy.deepcopy(_tiny_sdxl_master), fitted, **QUICK)
    assert fitted[1] == "a cat" and len(fitted[0]) < len(long)
    assert len(_tiny_sdxl_master.tokenizer(fitted[0]).input_ids) <= _tiny_sdxl_master.tokenizer.model_max_length
    assert [str(w.message) for w in caught if "tokens" in str(w.message)] == [
        "1 prompt(s) longer than the text encoder's 77 tokens were cut to fit (the text beyond cannot change the image)"]
    assert "red299" not in capfd.readouterr().err


def test_a_plan_far_larger_than_any_model_is_refused_before_parsing(tmp_path, _tiny_sdxl_master):
    path = tmp_path / "plan.yaml"
    path.write_text("".join(f"layer.{i}.weight_with_a_long_name: {{w_bits: 4, a_bits: 8}}\n" for i in range(100_000)))
    with pytest.raises(PlanMismatchError, match="bytes"):
        mixq.quantize(copy.deepcopy(_tiny_sdxl_master), plan=path, **QUICK)


def test_a_budget_with_more_digits_never_overwrites_another_plan(folder):
    four = (folder / "plans" / "w4.00-a8.00.yaml").read_bytes()
    assert main(["--out", str(folder), "--stage", "allocate", "--w-bits", "3.996", "--no-progress"]) == 0
    assert (folder / "plans" / "w4.00-a8.00.yaml").read_bytes() == four
    assert yaml.safe_load((folder / "plans" / "w3.996-a8.00.yaml").read_text())["budget"]["w_bits"] == 3.996


NON_UTF8 = os.fsdecode(b"run-\xff")


def test_non_utf8_folders_are_refused_up_front(saved, _tiny_sdxl_master, tmp_path, capsys):
    pipe = mixq.load_quantized(copy.deepcopy(_tiny_sdxl_master), saved)
    with pytest.raises(CheckpointError, match="not a valid UTF-8 path"):
        mixq.save_quantized(pipe, tmp_path / NON_UTF8)
    assert not (tmp_path / NON_UTF8).exists()
    config = write_small_config(tmp_path / "config.yaml")
    assert main(["--config", config, "--out", str(tmp_path / NON_UTF8), "--no-progress"]) == 2
    assert "not a valid UTF-8 path" in capsys.readouterr().err
    assert not (tmp_path / NON_UTF8).exists()


def test_a_full_disk_is_an_os_error_and_the_old_checkpoint_survives(saved, _tiny_sdxl_master, tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    folder = tmp_path / "ckpt"
    shutil.copytree(saved, folder)
    before = sorted((p.name, p.read_bytes()) for p in folder.iterdir())
    pipe = mixq.load_quantized(copy.deepcopy(_tiny_sdxl_master), saved)

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(StorageError) as error:
        mixq.save_quantized(pipe, folder)
    assert isinstance(error.value, OSError) and isinstance(error.value, MixqError)
    assert "No space left" in str(error.value)
    assert sorted((p.name, p.read_bytes()) for p in folder.iterdir()) == before
