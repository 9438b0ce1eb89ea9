"""Quantized checkpoints: save -> load round trips, size on disk, and refusals that leave the pipe as it was."""

from __future__ import annotations

import copy
import itertools
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import mixq
from mixq import checkpoint
from mixq.checkpoint import MANIFEST_NAME, CheckpointError
from mixq.layers import quantizable_layers
from mixq.modules import QConv2d, QLinear, QuantizedLayer
from mixq.offline import tiny_sdxl_pipeline
from tests.conftest import capture_unet_call, unet_output

QUICK = dict(progress=False, num_prompts=2, num_inference_steps=1, guidance_scale=0.0)
ONE_PROMPT = ("a red bus on a bridge",)  # the integer CPU kernels are slow: one UNet input row per check


# --- helpers -------------------------------------------------------------------------------------


def folder_bytes(folder) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def unet_snapshot(unet) -> dict:
    return {
        "modules": [(name, type(m)) for name, m in unet.named_modules()],
        "state": {k: v.clone() for k, v in unet.state_dict().items()},
        "mixq_info": getattr(unet, "mixq_info", None),
    }


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def assert_load_fails(pipe, path, match, error=CheckpointError, **kwargs):
    """The load raises `error` and the pipe's UNet is exactly as before."""
    before = unet_snapshot(pipe.unet)
    with pytest.raises(error, match=match):
        mixq.load_quantized(pipe, path, **kwargs)
    after = unet_snapshot(pipe.unet)
    assert after["modules"] == before["modules"]
    assert after["mixq_info"] == before["mixq_info"]
    assert_same_state(after["state"], before["state"])


def tensor_file(folder: Path) -> Path:
    return checkpoint.weights_path(folder, json.loads((folder / MANIFEST_NAME).read_text()))


def copy_checkpoint(folder, tmp_path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def edit_manifest(folder: Path, edit):
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    edit(manifest)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


def mixed_plan(unet, keep=("conv_in", "conv_out")) -> dict:
    """Cycles through weight-only, activation-only, 2/4/8-bit weights and 4/8-bit activations."""
    bits = itertools.cycle([(2, 8), (4, 16), (8, 8), (16, 8), (4, 4), (8, 16), (4, 8)])
    return {name: {"w_bits": w, "a_bits": a} for name, (w, a) in zip(
        [n for n in quantizable_layers(unet) if n not in keep], bits)}


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_call(_tiny_sdxl_master):
    return capture_unet_call(_tiny_sdxl_master, prompts=ONE_PROMPT)


@pytest.fixture(scope="module")
def w4a8(_tiny_sdxl_master, sdxl_call, tmp_path_factory):
    """A W4A8 tiny SDXL pipeline, its checkpoint folder and UNet output (shared: tests must not change them)."""
    pipe = mixq.quantize(copy.deepcopy(_tiny_sdxl_master), 4, 8, **QUICK)
    folder = mixq.save_quantized(pipe, tmp_path_factory.mktemp("checkpoints") / "w4a8")
    return SimpleNamespace(pipe=pipe, folder=folder, output=unet_output(pipe.unet, sdxl_call))


# --- round trips ---------------------------------------------------------------------------------


def test_uniform_w4a8_round_trip_is_bit_identical(w4a8, tiny_sdxl, sdxl_call):
    assert sorted(p.name for p in w4a8.folder.iterdir()) == sorted([MANIFEST_NAME, tensor_file(w4a8.folder).name])
    assert not torch.equal(w4a8.output, unet_output(tiny_sdxl.unet, sdxl_call))  # it is quantized

    loaded = mixq.load_quantized(tiny_sdxl, w4a8.folder)

    assert loaded is tiny_sdxl
    assert torch.equal(unet_output(loaded.unet, sdxl_call), w4a8.output)
    assert_same_state(loaded.unet.state_dict(), w4a8.pipe.unet.state_dict())
    assert loaded.unet.mixq_info["bits"] == w4a8.pipe.unet.mixq_info["bits"]
    assert loaded.unet.mixq_info["checkpoint"] == str(w4a8.folder)
    assert mixq.summary(loaded) == mixq.summary(w4a8.pipe)
    # The two features that carry extra state are covered: split activations and cached BOS rows.
    layers = json.loads((w4a8.folder / MANIFEST_NAME).read_text())["layers"]
    assert any(e["split_at"] for e in layers.values())
    assert any(e["bos_mode"] == "cached" for e in layers.values())


def test_mixed_plan_round_trip_is_bit_identical(_tiny_sd15_master, tmp_path):
    call = capture_unet_call(_tiny_sd15_master, prompts=ONE_PROMPT)
    plan = mixed_plan(_tiny_sd15_master.unet)
    quantized = mixq.quantize(copy.deepcopy(_tiny_sd15_master), plan=plan, **QUICK)
    mixq.save_quantized(quantized, tmp_path / "mixed")

    loaded = mixq.load_quantized(copy.deepcopy(_tiny_sd15_master), tmp_path / "mixed")

    assert torch.equal(unet_output(loaded.unet, call), unet_output(quantized.unet, call))
    assert_same_state(loaded.unet.state_dict(), quantized.unet.state_dict())
    found = {(m.w_bits, m.a_bits) for m in loaded.unet.modules() if isinstance(m, QuantizedLayer)}
    assert found == {(2, 8), (4, 16), (8, 8), (16, 8), (4, 4), (8, 16), (4, 8)}
    for name, module in loaded.unet.named_modules():
        if name in plan and isinstance(module, QuantizedLayer):
            assert (module.w_bits, module.a_bits) == (plan[name]["w_bits"], plan[name]["a_bits"]), name


def test_loading_builds_layers_from_integers_only(w4a8, tiny_sdxl, monkeypatch):
    """No float weight is made for a quantized layer: the quantize-from-float paths are never called."""
    def forbidden(*args, **kwargs):
        raise AssertionError("load_quantized must not quantize float weights")

    monkeypatch.setattr(QuantizedLayer, "load_float_weight", forbidden)
    monkeypatch.setattr(QLinear, "from_float", forbidden)
    monkeypatch.setattr(QConv2d, "from_float", forbidden)
    mixq.load_quantized(tiny_sdxl, w4a8.folder)

    layers = {n: m for n, m in tiny_sdxl.unet.named_modules() if isinstance(m, QuantizedLayer)}
    assert len(layers) == len([m for m in w4a8.pipe.unet.modules() if isinstance(m, QuantizedLayer)])
    for name, layer in layers.items():
        buffers = dict(layer.named_buffers())
        assert "weight" not in buffers, name  # W4: only packed integers
        assert buffers["qweight_0"].dtype == torch.uint8
        assert all(not b.is_meta for b in buffers.values()), name


def test_loads_into_the_dtype_of_the_pipeline(w4a8, _tiny_sdxl_master, tmp_path):
    half = copy.deepcopy(_tiny_sdxl_master).to(torch.float16)
    mixq.load_quantized(half, w4a8.folder)  # saved in float32
    # The same as casting the quantized float32 pipeline: biases and BOS rows follow, scales stay fp32.
    assert_same_state(half.unet.state_dict(), copy.deepcopy(w4a8.pipe.unet).to(torch.float16).state_dict())

    mixq.save_quantized(half, tmp_path / "fp16")
    wide = mixq.load_quantized(copy.deepcopy(_tiny_sdxl_master), tmp_path / "fp16")  # fp32 pipe, fp16 save
    half_state, wide_state = half.unet.state_dict(), wide.unet.state_dict()
    for name, layer in wide.unet.named_modules():
        if isinstance(layer, QuantizedLayer):
            assert layer.bias is None or layer.bias.dtype == torch.float32, name
            for key in layer.state_dict():
                full = f"{name}.{key}"
                assert torch.equal(wide_state[full], half_state[full].to(wide_state[full].dtype)), full
    bf16 = copy.deepcopy(_tiny_sdxl_master).to(torch.bfloat16)
    assert_load_fails(bf16, tmp_path / "fp16", match="cannot be verified against this bfloat16 pipeline")


# --- size on disk --------------------------------------------------------------------------------


def test_size_on_disk_follows_the_bits(tmp_path):
    # base_width 32 (8.4 M parameters). At the default width 16 (2.2 M) the fixed per-layer bookkeeping
    # (safetensors header and manifest entries, per-channel scales, sums and biases of ~300 layers) weighs as
    # much as 0.12x of the fp16 file: W4A8 0.37x, W8A8 0.61x there; on SDXL's 2.6 B weights it is negligible.
    pipe = tiny_sdxl_pipeline(base_width=32)
    copy.deepcopy(pipe.unet).to(torch.float16).save_pretrained(tmp_path / "fp16")
    fp16_bytes = folder_bytes(tmp_path / "fp16")
    calibration = mixq.calibrate_ranges(pipe, num_prompts=2, progress=False, num_inference_steps=1, guidance_scale=0.0)

    ratios = {}
    for w_bits, a_bits in [(4, 8), (8, 8)]:
        quantized = mixq.quantize(copy.deepcopy(pipe), w_bits, a_bits, calibration=calibration)
        quantized.unet.to(torch.float16)  # the fp16 pipeline's checkpoint: biases in fp16, scales stay fp32
        folder = mixq.save_quantized(quantized, tmp_path / f"w{w_bits}a{a_bits}")
        ratios[w_bits] = folder_bytes(folder) / fp16_bytes
    print(f"checkpoint / fp16 save_pretrained bytes: W4A8 {ratios[4]:.3f}, W8A8 {ratios[8]:.3f}")
    assert ratios[4] <= 0.32
    assert ratios[8] <= 0.57


# --- refusals ------------------------------------------------------------------------------------


def test_wrong_architecture_is_refused(w4a8, tiny_sd15):
    assert_load_fails(tiny_sd15, w4a8.folder, match="another UNet architecture.*config differences: "
                                                     "addition_embed_type 'text_time' in the checkpoint vs None here")


def test_other_weights_of_the_same_architecture_are_refused(w4a8, tiny_sdxl):
    with torch.no_grad():
        tiny_sdxl.unet.conv_in.weight.add_(1e-3)  # conv_in is kept in floating point: taken from the pipe
    assert_load_fails(tiny_sdxl, w4a8.folder, match="not the model this checkpoint was made from")


def test_truncated_file_is_refused(w4a8, tiny_sdxl, tmp_path):
    folder = copy_checkpoint(w4a8.folder, tmp_path)
    data = tensor_file(folder).read_bytes()
    tensor_file(folder).write_bytes(data[: len(data) // 2])
    assert_load_fails(tiny_sdxl, folder, match="truncated")


def test_altered_tensor_file_is_refused(w4a8, tiny_sdxl, tmp_path):
    folder = copy_checkpoint(w4a8.folder, tmp_path)
    data = bytearray(tensor_file(folder).read_bytes())
    data[-5] ^= 0xFF  # one packed weight byte: same size, still valid safetensors
    tensor_file(folder).write_bytes(bytes(data))
    assert_load_fails(tiny_sdxl, folder, match="does not match the sha256")


def test_edited_manifest_is_refused(w4a8, tiny_sdxl, tmp_path):
    folder = copy_checkpoint(w4a8.folder, tmp_path)
    # 8 -> 4 activation bits keeps every buffer's shape: only the hash can tell.
    edit_manifest(folder, lambda m: m["layers"]["down_blocks.1.attentions.0.proj_in"].update(a_bits=4))
    assert_load_fails(tiny_sdxl, folder, match="was edited after saving")


def test_edited_tensor_hash_in_manifest_is_refused(w4a8, tiny_sdxl, tmp_path):
    folder = copy_checkpoint(w4a8.folder, tmp_path)
    edit_manifest(folder, lambda m: m["weights_file"].update(sha256="0" * 64))
    assert_load_fails(tiny_sdxl, folder, match="does not match the sha256")


def test_unknown_format_version_is_refused(w4a8, tiny_sdxl, tmp_path):
    folder = copy_checkpoint(w4a8.folder, tmp_path)
    edit_manifest(folder, lambda m: m.update(format_version=checkpoint.FORMAT_VERSION + 1))
    assert_load_fails(tiny_sdxl, folder, match="newer than this mixq .* upgrade mixq")
    edit_manifest(folder, lambda m: m.update(format_version="1"))
    assert_load_fails(tiny_sdxl, folder, match="no integer format_version")


def test_older_format_versions_migrate_or_say_why_not(w4a8, _tiny_sdxl_master, monkeypatch):
    saved, newer = checkpoint.FORMAT_VERSION, checkpoint.FORMAT_VERSION + 1
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", newer)  # the saved format is now the older one
    assert_load_fails(copy.deepcopy(_tiny_sdxl_master), w4a8.folder, match=f"no migration from format {saved} to {newer}")

    monkeypatch.setitem(checkpoint.MIGRATIONS, saved, f"format {saved} stored weights in another order")
    assert_load_fails(copy.deepcopy(_tiny_sdxl_master), w4a8.folder, match="cannot be read .*another order")

    monkeypatch.setitem(checkpoint.MIGRATIONS, saved, lambda manifest: {**manifest, "format_version": newer})
    loaded = mixq.load_quantized(copy.deepcopy(_tiny_sdxl_master), w4a8.folder)
    assert_same_state(loaded.unet.state_dict(), w4a8.pipe.unet.state_dict())


def rewrite_as_older_format(folder: Path, version: int) -> Path:
    """The checkpoint in `folder` as mixq wrote it in format `version` (1 or 2): packed weights
    offset-binary; format 1 also with the fixed tensor-file name and no stored BOS inputs."""
    from safetensors.torch import load_file, save_file

    from mixq.quantizers import flip_field_sign_bits

    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    path = tensor_file(folder)
    tensors = load_file(str(path))
    for name, entry in manifest["layers"].items():
        if entry["w_bits"] in (2, 4):
            for key in [k for k in tensors if k.startswith(f"{name}.qweight_")]:
                tensors[key] = flip_field_sign_bits(tensors[key], entry["w_bits"])
    manifest["format_version"] = version
    new_path = path
    if version == 1:
        tensors = {k: v for k, v in tensors.items() if not k.endswith(".bos_input")}
        del manifest["weights_file"]["name"]
        new_path = folder / checkpoint.WEIGHTS_NAME
    # What older mixq wrote: only the manifest's hash (the format and layer records came later).
    metadata = {checkpoint.MANIFEST_HASH_KEY: checkpoint.manifest_hash(manifest)}
    path.unlink()
    save_file(tensors, str(new_path), metadata=metadata)
    manifest["weights_file"].update(bytes=new_path.stat().st_size, sha256=checkpoint.file_sha256(new_path))
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    return folder


def test_format_1_checkpoints_still_load(w4a8, tiny_sdxl, tmp_path):
    """Format 1: the fixed tensor-file name, no name in the manifest, no stored BOS inputs,
    offset-binary packed weights."""
    folder = rewrite_as_older_format(copy_checkpoint(w4a8.folder, tmp_path), 1)
    loaded = mixq.load_quantized(tiny_sdxl, folder)
    expected = {k: v for k, v in w4a8.pipe.unet.state_dict().items() if not k.endswith(".bos_input")}
    assert_same_state(loaded.unet.state_dict(), expected)


def test_format_2_offset_binary_weights_load_as_twos_complement(w4a8, tiny_sdxl, tmp_path):
    folder = rewrite_as_older_format(copy_checkpoint(w4a8.folder, tmp_path), 2)
    stored = json.loads((folder / MANIFEST_NAME).read_text())
    assert stored["format_version"] == 2 and any(e["w_bits"] == 4 for e in stored["layers"].values())
    loaded = mixq.load_quantized(tiny_sdxl, folder)
    assert_same_state(loaded.unet.state_dict(), w4a8.pipe.unet.state_dict())


def test_not_a_checkpoint_is_refused(tiny_sdxl, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("no download expected"))
    assert_load_fails(tiny_sdxl, tmp_path, match="holds no mixq_manifest.json")
    assert_load_fails(tiny_sdxl, tmp_path / "missing" / "folder", match="no checkpoint folder", error=FileNotFoundError)


def test_already_quantized_pipe_is_refused(w4a8):
    assert_load_fails(copy.deepcopy(w4a8.pipe), w4a8.folder, match="already quantized")


def test_save_refuses_what_is_not_a_quantized_unet(tiny_sdxl, tmp_path):
    with pytest.raises(CheckpointError, match="no quantized layers"):
        mixq.save_quantized(tiny_sdxl, tmp_path / "float")
    mixq.quantize(tiny_sdxl, 8, 8, simulate=True, **QUICK)
    with pytest.raises(CheckpointError, match="fake-quant simulations"):
        mixq.save_quantized(tiny_sdxl, tmp_path / "simulated")
    assert not (tmp_path / "float").exists() and not (tmp_path / "simulated").exists()


def test_failed_save_keeps_the_previous_checkpoint(w4a8, tiny_sdxl, tmp_path, monkeypatch):
    import safetensors.torch

    folder = copy_checkpoint(w4a8.folder, tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        mixq.save_quantized(w4a8.pipe, folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted([MANIFEST_NAME, tensor_file(folder).name])  # no temp files
    mixq.load_quantized(tiny_sdxl, folder)


# --- the Hub -------------------------------------------------------------------------------------


def test_hub_repo_id_downloads_only_the_checkpoint_files(w4a8, _tiny_sdxl_master, tmp_path, monkeypatch):
    import huggingface_hub

    shutil.copytree(w4a8.folder, tmp_path / "repo" / "w4a8")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tmp_path / "repo")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = mixq.load_quantized(copy.deepcopy(_tiny_sdxl_master), "someone/tiny-sdxl-mixq", revision="v1",
                                 subfolder="w4a8")

    assert calls == [("someone/tiny-sdxl-mixq", {"revision": "v1", "token": None,
                                                 "allow_patterns": [f"w4a8/{MANIFEST_NAME}", f"w4a8/{checkpoint.WEIGHTS_PATTERN}"]})]
    assert_same_state(loaded.unet.state_dict(), w4a8.pipe.unet.state_dict())


def test_hub_download_failure_is_a_clear_error(tiny_sdxl, monkeypatch):
    import huggingface_hub

    def offline(repo_id, **kwargs):
        raise OSError("could not resolve host huggingface.co")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert_load_fails(tiny_sdxl, "someone/missing-model", match="downloading it from the Hugging Face Hub failed")
