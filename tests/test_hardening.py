"""Hardening: one test (or a few) per finding of the adversarial review. Each checks behaviour that the
code before the fixes got wrong: a lost checkpoint, silent wrong results from unusual layers, NaN and a
changed negative prompt, unvalidated files, private file modes, a pipe changed by a failed load, and
tracebacks instead of mixq errors."""

from __future__ import annotations

import copy
import json
import os
import struct
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

import mixq
from mixq import checkpoint
from mixq.errors import (BudgetError, CalibrationFileError, CheckpointError, MixqError, NonFiniteActivationError,
                         PlanMismatchError, PromptFileError)

QUICK = dict(num_prompts=2, num_inference_steps=1, guidance_scale=0.0, progress=False)
NAN = float("nan")


# --- shared helpers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibration(_tiny_sdxl_master):
    return mixq.calibrate_ranges(_tiny_sdxl_master, **QUICK)


@pytest.fixture(scope="module")
def w8a8(_tiny_sdxl_master, calibration):
    return mixq.quantize(copy.deepcopy(_tiny_sdxl_master), 8, 8, calibration=calibration, progress=False)


@pytest.fixture
def saved(w8a8, tmp_path) -> Path:
    return mixq.save_quantized(w8a8, tmp_path / "w8a8")


def tensor_file(folder: Path) -> Path:
    (found,) = folder.glob("mixq_unet*.safetensors")
    return found


def pipe_snapshot(pipe) -> dict:
    return {"modules": [(n, id(m)) for n, m in pipe.unet.named_modules()],
            "state": {k: v.clone() for k, v in pipe.unet.state_dict().items()},
            "info": getattr(pipe.unet, "mixq_info", None)}


def assert_pipe_unchanged(pipe, before: dict):
    after = pipe_snapshot(pipe)
    assert after["modules"] == before["modules"] and after["info"] == before["info"]
    for key, value in before["state"].items():
        torch.testing.assert_close(after["state"][key], value, rtol=0, atol=0, equal_nan=True)


def rewrite_checkpoint(folder: Path, edit_manifest=None, edit_tensors=None, raw_tensor_bytes: bytes | None = None):
    """Edit a checkpoint and recompute every hash, as someone forging or hand-editing one would."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tensor_file(folder)
    manifest = json.loads((folder / checkpoint.MANIFEST_NAME).read_text())
    if edit_manifest:
        edit_manifest(manifest)
    if raw_tensor_bytes is not None:
        path.write_bytes(raw_tensor_bytes)
    else:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata())
        if edit_tensors:
            edit_tensors(tensors)
        metadata[checkpoint.MANIFEST_HASH_KEY] = checkpoint.manifest_hash(manifest)
        save_file(tensors, str(path), metadata=metadata)
    manifest["weights_file"].update(bytes=path.stat().st_size, sha256=checkpoint.file_sha256(path))
    (folder / checkpoint.MANIFEST_NAME).write_text(json.dumps(manifest))


def assert_refused(pipe, folder, match, error=CheckpointError):
    before = pipe_snapshot(pipe)
    with pytest.raises(error, match=match):
        mixq.load_quantized(pipe, folder)
    assert_pipe_unchanged(pipe, before)


# --- 1. a crash during save never loses the checkpoint -------------------------------------------


def test_save_failing_before_the_manifest_keeps_the_old_checkpoint(saved, _tiny_sdxl_master, calibration,
                                                                   monkeypatch):
    """Overwrite W8 with W4 and fail the manifest's rename (a crash between the two files)."""
    w4 = mixq.quantize(copy.deepcopy(_tiny_sdxl_master), 4, 8, calibration=calibration, progress=False)
    real_replace = os.replace

    def crash_on_manifest(src, dst, *args, **kwargs):
        if Path(dst).name == checkpoint.MANIFEST_NAME:
            raise OSError("simulated crash")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", crash_on_manifest)
    with pytest.raises(OSError, match="simulated crash"):
        mixq.save_quantized(w4, saved)
    monkeypatch.undo()

    loaded = mixq.load_quantized(copy.deepcopy(_tiny_sdxl_master), saved)
    assert {m.w_bits for m in loaded.unet.modules() if isinstance(m, mixq.QLinear)} == {8}


def test_next_save_removes_temporaries_of_killed_saves(saved, w8a8):
    leftovers = [saved / ".mixq_unet.safetensors.k1ll3d.tmp", saved / ".mixq_manifest.json.k1ll3d.tmp"]
    for path in leftovers:
        path.write_bytes(b"partial")
    mixq.save_quantized(w8a8, saved)
    assert not any(p.exists() for p in leftovers)
    assert sorted(p.name for p in saved.iterdir()) == sorted([checkpoint.MANIFEST_NAME, tensor_file(saved).name])


# --- 2. Linear/Conv2d subclasses with their own forward, 5. unsupported convs in summary() -------------


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class StandardizedConv2d(nn.Conv2d):
    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def replace_layer(unet, name, new):
    old = unet.get_submodule(name)
    with torch.no_grad():
        if new.weight.shape == old.weight.shape:
            new.weight.copy_(old.weight)
            new.bias.copy_(old.bias)
    parent, _, child = name.rpartition(".")
    setattr(unet.get_submodule(parent), child, new)


UNUSUAL = {
    "mid_block.attentions.0.proj_in": "ScaledLinear has its own forward",
    "down_blocks.1.resnets.0.conv2": "StandardizedConv2d has its own forward",
    "up_blocks.2.resnets.0.conv1": "groups=2",
}


@pytest.fixture(scope="module")
def unusual(_tiny_sdxl_master):
    """A tiny SDXL with a ScaledLinear, a weight-standardised conv and a grouped conv, quantized W8A8."""
    pipe = copy.deepcopy(_tiny_sdxl_master)
    unet = pipe.unet
    proj = unet.get_submodule("mid_block.attentions.0.proj_in")
    conv2 = unet.get_submodule("down_blocks.1.resnets.0.conv2")
    conv1 = unet.get_submodule("up_blocks.2.resnets.0.conv1")
    replace_layer(unet, "mid_block.attentions.0.proj_in", ScaledLinear(proj.in_features, proj.out_features))
    replace_layer(unet, "down_blocks.1.resnets.0.conv2",
                  StandardizedConv2d(conv2.in_channels, conv2.out_channels, 3, padding=1))
    replace_layer(unet, "up_blocks.2.resnets.0.conv1",
                  nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, padding=1, groups=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mixq.quantize(pipe, 8, 8, **QUICK)
    return pipe, [str(w.message) for w in caught]


def test_subclasses_with_their_own_forward_stay_in_float_with_a_warning(unusual):
    pipe, messages = unusual
    assert type(pipe.unet.get_submodule("mid_block.attentions.0.proj_in")) is ScaledLinear
    assert type(pipe.unet.get_submodule("down_blocks.1.resnets.0.conv2")) is StandardizedConv2d
    assert any("stay in floating point" in m and "own forward" in m for m in messages), messages


def test_summary_says_why_a_layer_is_not_quantized(unusual):
    pipe, _ = unusual
    rows = {r["name"]: r for r in mixq.summary(pipe)}
    for name, reason in UNUSUAL.items():
        assert name in rows, name
        assert (rows[name]["w_bits"], rows[name]["a_bits"]) == (16, 16)
        assert reason in rows[name]["note"], rows[name]


def test_checkpoint_is_not_loaded_into_a_subclass_layer(saved, _tiny_sdxl_master):
    pipe = copy.deepcopy(_tiny_sdxl_master)
    replace_layer(pipe.unet, "mid_block.attentions.0.proj_in", ScaledLinear(
        *reversed(pipe.unet.get_submodule("mid_block.attentions.0.proj_in").weight.shape)))
    assert_refused(pipe, saved, match="own forward")


# --- 3. NaN / Inf --------------------------------------------------------------------------------


def float_and_quantized_linear(w_bits, a_bits):
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    return linear, mixq.QLinear.from_float(linear, w_bits, a_bits, lows=(-2.0,), highs=(2.0,))


@pytest.mark.parametrize("w_bits,a_bits", [(8, 8), (4, 8), (16, 8)])
def test_quantized_linear_propagates_nan_like_float(w_bits, a_bits):
    linear, q = float_and_quantized_linear(w_bits, a_bits)
    x = torch.randn(3, 16)
    x[1, 5] = NAN
    x[2, 0] = float("inf")
    y = q(x)
    assert torch.equal(~torch.isfinite(y), ~torch.isfinite(linear(x)))
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all()


def test_huge_finite_inputs_are_not_mistaken_for_non_finite():
    # Their fp32 sum overflows to Inf: the quick all-finite check must defer to the exact one.
    _, q = float_and_quantized_linear(8, 8)
    x = torch.zeros(2, 16)
    x[0, :4] = 3e38
    x[1, 0] = NAN
    y = q(x)
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all()


@pytest.mark.parametrize("w_bits", [8, 16])
def test_quantized_conv_propagates_nan_where_float_does(w_bits):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    q = mixq.QConv2d.from_float(conv, w_bits, 8, lows=(-2.0,), highs=(2.0,))
    x = torch.randn(2, 4, 9, 9)
    x[0, 1, 4, 4] = NAN
    y = q(x)
    assert torch.isnan(y).any()
    assert torch.equal(torch.isnan(y), torch.isnan(conv(x)))


@pytest.mark.parametrize("bad", [NAN, float("inf")])
def test_non_finite_weights_are_refused_naming_the_layer(_tiny_sdxl_master, calibration, bad):
    pipe = copy.deepcopy(_tiny_sdxl_master)
    with torch.no_grad():
        pipe.unet.get_submodule("mid_block.attentions.0.proj_in").weight[3, 1] = bad
    before = pipe_snapshot(pipe)
    with pytest.raises(NonFiniteActivationError, match="'mid_block.attentions.0.proj_in'"):
        mixq.quantize(pipe, 8, 8, calibration=calibration, progress=False)
    assert_pipe_unchanged(pipe, before)


# --- 4. a negative prompt / guidance other than the calibrated one -------------------------------


def test_cached_bos_row_is_not_used_for_another_token_0():
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    bos = torch.randn(16)
    q = mixq.QLinear.from_float(linear, 8, 8, lows=(-3.0,), highs=(3.0,), bos_mode="cached", bos_input=bos)
    x = torch.randn(2, 5, 16)
    x[:, 0] = bos
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(q(x)[:, 0], q.bos_output.expand(2, -1))  # the calibrated token 0: cached, silent

    x[1, 0] = 0.0  # classifier-free guidance with a zeroed negative embedding
    with pytest.warns(UserWarning, match="token 0 .* differs .* Calibrate with the guidance"):
        y = q(x)
    expected = F.linear(x[:, :1], q.float_weight(x.dtype), q.bias)
    assert torch.allclose(y[:, :1], expected)
    assert torch.allclose(y[1, 0], linear.bias, atol=1e-6)


# --- 5. hand-edited files that were accepted silently --------------------------------------------


def sensitivity_row(params=100, **changes):
    row = {"group": "quality", "metric": "sqnr_db", "params": params, "act_numel": 64,
           "weight": {2: 3.0, 4: 12.0, 8: 30.0}, "activation": {4: 10.0, 8: 28.0}}
    row.update(changes)
    return row


@pytest.mark.parametrize("row,match", [
    (sensitivity_row(params=-5000), "params -5000 is not a positive integer"),
    (sensitivity_row(weight={3: 5.0, 8: 30.0}), "bit-width 3"),
    (sensitivity_row(activation={4: NAN, 8: 28.0}), "not a finite number"),
    (sensitivity_row(weight={2: float("inf"), 8: 1.0}), "not a finite number"),
    ("truncated", "not a mapping"),
    ({"group": "quality"}, "missing params"),
])
def test_sensitivity_table_rows_are_validated(tmp_path, row, match):
    from mixq.calib.sensitivity import load_table

    path = tmp_path / "sensitivity.yaml"
    path.write_text(yaml.safe_dump({"layers": {"a": sensitivity_row(), "b": row}}))
    with pytest.raises(CalibrationFileError, match=f"sensitivity.yaml: layers\\['b'\\]: .*{match}"):
        load_table(path)


def test_truncated_sensitivity_file_is_refused_or_reads_as_complete_rows(tmp_path):
    """Cut anywhere, the file is a CalibrationFileError or a table of complete rows (the unmeasured
    layers are then measured again); never a TypeError/KeyError/AttributeError."""
    from mixq.calib.sensitivity import load_table

    path = tmp_path / "sensitivity.yaml"
    text = yaml.safe_dump({"layers": {"a": sensitivity_row(), "b": sensitivity_row()}})
    refused = 0
    for cut in range(1, len(text), 5):
        path.write_text(text[:cut])
        try:
            table = load_table(path)
        except CalibrationFileError as err:
            assert "sensitivity.yaml" in str(err)
            refused += 1
            continue
        assert set(table) <= {"a", "b"}
        assert all(set(row) >= {"group", "params", "act_numel", "weight", "activation"} for row in table.values())
    assert refused > 0


def test_duplicate_plan_keys_are_refused(tmp_path):
    from mixq.plan import read_plan

    path = tmp_path / "plan.yaml"
    path.write_text("layers:\n  a: {w_bits: 4, a_bits: 8}\n  a: {w_bits: 8, a_bits: 8}\n")
    with pytest.raises(PlanMismatchError, match="duplicate key 'a'"):
        read_plan(path)


def test_plan_bits_for_a_keep_fp_layer_are_not_dropped_silently():
    from mixq.plan import resolve_bits

    names = ["conv_in", "mid.proj"]
    plan = {"conv_in": {"w_bits": 8, "a_bits": 8}, "mid.proj": {"w_bits": 4, "a_bits": 8}}
    with pytest.warns(UserWarning, match="keep_fp keeps in floating point \\(conv_in\\)"):
        bits = resolve_bits(names, {"conv_in"}, 8, 8, plan=plan)
    assert bits == {"conv_in": (16, 16), "mid.proj": (4, 8)}


def test_allocation_refuses_non_finite_scores_and_unknown_bits():
    from mixq.calib.allocate import allocate_bits

    sizes = {"a": 10.0, "b": 20.0}
    with pytest.raises(CalibrationFileError, match="'b'.*score at 4 bits is nan"):
        allocate_bits({"a": {2: 1.0, 4: 2.0}, "b": {2: 1.0, 4: NAN}}, sizes, 3.0)
    with pytest.raises(CalibrationFileError, match="bit-width 3"):
        allocate_bits({"a": {3: 1.0, 4: 2.0}, "b": {2: 1.0, 4: 2.0}}, sizes, 3.5)
    with pytest.raises(BudgetError, match="finite"):
        allocate_bits({"a": {2: 1.0, 4: 2.0}}, sizes, float("inf"))


# --- 6. files follow the umask -------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_follow_the_umask(w8a8, calibration, tmp_path, umask):
    previous = os.umask(umask)
    try:
        folder = mixq.save_quantized(w8a8, tmp_path / "ckpt")
        calibration.save(tmp_path / "activation_ranges.safetensors")
    finally:
        os.umask(previous)
    files = [*folder.iterdir(), tmp_path / "activation_ranges.safetensors"]
    assert len(files) == 3
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name


# --- 8. a manifest that passes the hash checks is still validated before the pipe is touched -------


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.update(mixq_info=[]), "mixq_info is list"),
    (lambda m: next(e for e in m["layers"].values() if e["split_at"]).update(split_at=-3), "split_at -3"),
    (lambda m: next(iter(m["layers"].values())).update(kind="conv3d"), "kind 'conv3d'"),
    (lambda m: next(iter(m["layers"].values())).update(w_bits="8"), "bits"),
    (lambda m: next(iter(m["layers"].values())).update(out_features=2 ** 40), "counts of channels"),
    (lambda m: next(iter(m["layers"].values())).update(bos_mode=None), "bos_mode"),
    (lambda m: m["model"].update(base_hash="x"), "base_hash"),
    (lambda m: m.update(layers={}), "layers is not a non-empty object"),
    (lambda m: m["weights_file"].update(name="../mixq_unet.safetensors"), "not a mixq tensor file name"),
])
def test_rehashed_malformed_manifest_is_refused_before_touching_the_pipe(saved, tiny_sdxl, edit, match):
    rewrite_checkpoint(saved, edit_manifest=edit)
    assert_refused(tiny_sdxl, saved, match=match)


def test_rehashed_nan_scales_are_refused(saved, tiny_sdxl):
    def poison(tensors):
        key = next(k for k in tensors if k.endswith(".w_scale"))
        tensors[key][0] = NAN

    rewrite_checkpoint(saved, edit_tensors=poison)
    assert_refused(tiny_sdxl, saved, match="NaN or Inf")


def test_huge_safetensors_header_is_a_checkpoint_error(saved, tiny_sdxl):
    rewrite_checkpoint(saved, raw_tensor_bytes=struct.pack("<Q", 1 << 40) + b"{}")
    assert_refused(tiny_sdxl, saved, match="not a readable safetensors file")


def test_deeply_nested_manifest_is_a_checkpoint_error(saved, tiny_sdxl):
    (saved / checkpoint.MANIFEST_NAME).write_text('{"a":' * 100_000 + "1" + "}" * 100_000)
    assert_refused(tiny_sdxl, saved, match="nested too deeply")


# --- 9. malformed inputs are mixq errors that name the file and the place ------------------------


@pytest.mark.parametrize("name,content,match", [
    ("coco.json", json.dumps({"annotations": [{"image_id": 1, "caption": 5}]}), r"annotations\[0\].caption is int"),
    ("coco.json", json.dumps({"annotations": None}), "'annotations' is NoneType"),
    ("coco.json", json.dumps({"annotations": [{"image_id": [1], "caption": "a"}]}), "image_id is list"),
    ("deep.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("latin.txt", "a caf\xe9 in paris\n".encode("latin-1"), "line 1 is not UTF-8 .*0xe9.* save it as UTF-8"),
], ids=["caption-int", "annotations-null", "image-id-list", "deep-json", "latin-1"])
def test_malformed_prompt_files_are_prompt_file_errors(tmp_path, name, content, match):
    from mixq.calib.prompts import load_prompts

    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(PromptFileError, match=f"{name}.*{match}"):
        load_prompts(path)


@pytest.mark.parametrize("name,content", [
    ("plain.txt", "first\nsecond\n"),
    ("coco.csv", "text,file_name\nfirst,x.jpg\nsecond,y.jpg\n"),
    ("parti.tsv", "Prompt\tCategory\nfirst\tA\nsecond\tB\n"),
])
def test_byte_order_mark_is_not_part_of_the_first_prompt_or_column(tmp_path, name, content):
    from mixq.calib.prompts import load_prompts

    path = tmp_path / name
    path.write_bytes("\ufeff".encode() + content.encode())
    assert load_prompts(path) == ["first", "second"]


@pytest.mark.parametrize("lows,highs,match", [
    ([NAN], [1.0], "NaN or Inf"),
    ([-1.0], [float("inf")], "NaN or Inf"),
    ([2.0], [1.0], "low above its high"),
])
def test_bad_activation_ranges_file_is_a_calibration_file_error(calibration, tmp_path, lows, highs, match):
    broken = copy.deepcopy(calibration)
    name = next(n for n, r in broken.layers.items() if len(r.lows) == 1)
    broken.layers[name].lows, broken.layers[name].highs = lows, highs
    broken.save(tmp_path / "activation_ranges.safetensors")
    with pytest.raises(CalibrationFileError, match=f"activation_ranges.safetensors: layer '{name}'.*{match}"):
        mixq.Calibration.load(tmp_path / "activation_ranges.safetensors")


def test_quantized_unet_can_be_materialised_from_meta(w8a8):
    unet = copy.deepcopy(w8a8.unet)
    unet.to("meta").to_empty(device="cpu")
    scales = [m.w_scale for m in unet.modules() if isinstance(m, mixq.QLinear)]
    assert scales and all(s.device.type == "cpu" and s.dtype == torch.float32 for s in scales)


def test_every_error_family_is_a_mixq_error():
    from mixq.calib.allocate import InfeasibleBudgetError

    assert issubclass(InfeasibleBudgetError, BudgetError) and issubclass(BudgetError, MixqError)


def test_checkpoint_without_stored_bos_inputs_still_loads(saved, w8a8, tiny_sdxl):
    """Checkpoints saved before the BOS input was stored load, without the run-time token-0 check."""
    def drop_bos_inputs(tensors):
        for key in [k for k in tensors if k.endswith(".bos_input")]:
            del tensors[key]

    rewrite_checkpoint(saved, edit_tensors=drop_bos_inputs)
    loaded = mixq.load_quantized(tiny_sdxl, saved)
    cached = [m for m in loaded.unet.modules() if isinstance(m, mixq.QLinear) and m.bos_mode == "cached"]
    assert cached and all(m.bos_input is None for m in cached)
    expected = dict(w8a8.unet.state_dict())
    state = loaded.unet.state_dict()
    assert set(expected) - set(state) == {k for k in expected if k.endswith(".bos_input")}
    assert all(torch.equal(state[k], expected[k]) for k in state)
