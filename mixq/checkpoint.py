"""Quantized UNet checkpoints: calibrate once, save, and load anywhere without recalibrating.
(Also of the opt-in components quantized with it: VAE decoder, text encoders; see "Components" below.)

    mixq.quantize(pipe, w_bit=4, a_bit=8)
    mixq.save_quantized(pipe, "sdxl-turbo-w4a8")             # share it: huggingface_hub.upload_folder
    mixq.load_quantized(float_pipe, "owner/sdxl-turbo-w4a8")  # a local folder or a Hub repo id

A checkpoint is a folder with two files:

    mixq_unet.<hash>.safetensors
                           every buffer of every QLinear/QConv2d, named "<layer>.<buffer>": packed integer
                           weights, per-channel scales, weight sums, activation scale/zero, BOS rows, biases
    mixq_manifest.json     format version, mixq version, the model's fingerprint, config and base hash, one
                           entry per quantized layer (kind, bits, shapes, split, BOS mode, dtype), the
                           quantization record (unet.mixq_info), and the size and sha256 of the tensor file

Only the quantized layers are stored. The rest of the UNet (norms, embeddings, conv_in/conv_out, layers
kept in floating point) is taken from the pipeline the checkpoint is loaded into, an unquantized pipeline
of the same model: that is what makes the size on disk follow the bits.

What "the same model" means, and how it is checked
- Architecture: `architecture_fingerprint(unet)`, a hash of the UNet's layer structure, must match. The manifest
  keeps the config too, so that a mismatch names the fields that differ.
- Weights, the "base hash": a sha256 over every tensor the loader takes from the pipeline, i.e. the UNet's
  state_dict minus the quantized layers (key, dtype, shape and bytes, in key order). Those tensors and the
  checkpoint together determine the loaded UNet, so a match means the loaded UNet is the one that was
  saved, and a mismatch means it would not be. The float weights of the quantized layers are deliberately
  left out: the checkpoint replaces them, so they cannot change the result (and they no longer exist in
  the quantized UNet being saved). A consequence worth knowing: a checkpoint of an LCM-LoRA-fused UNet
  also loads into the plain base pipeline and gives the same UNet, because LCM-LoRA only changes layers
  that are quantized; when a LoRA-changed layer is kept in floating point (keep_fp), only a pipeline with
  the same LoRA fused matches.
- Dtype: a float32 save records the base hash also with its tensors rounded to float16 and bfloat16, so
  it verifies against a half-precision pipeline of the same model; a float32 pipeline is rounded down to
  verify against a half-precision save. The layers load into the dtype and device of the layers they
  replace.
- Integrity: the manifest records the size and sha256 of the tensor file (truncated or altered tensors),
  and the tensor file's metadata records the sha256 of the manifest (an edited manifest).

Everything is checked before the pipeline is touched, the whole manifest included (types and ranges of
every field, finite scales): any failure raises CheckpointError (or FileNotFoundError) and leaves it as
it was.

Saving is atomic as a whole. The tensor file is named by the first hex digits of its sha256 and the
manifest, which names it, is written last with one rename: until that rename the old manifest and its
tensor file are untouched, after it the new pair is complete. The old tensor file and temporaries of
interrupted saves are removed after the switch (and by the next save, if the process dies first).
Two processes: a save holds the folder exclusively and a load holds it shared (mixq.locks), so a
second save waits for the first and a load sees one whole checkpoint. The tensor file's metadata also
records the manifest's format version and layer entries, so a manifest edited after saving is refused
even when its hashes were recomputed to match.
Components: when `mixq.quantize(..., components=...)` quantized the VAE decoder or the text encoders
too, their layers go into the same tensor file and manifest under their qualified names
("vae.decoder.up_blocks.0.resnets.0.conv1", mixq.components), and the manifest's `components` holds,
for each, what `model` holds for the UNet (class, fingerprint, config, base hash) and its quantization
record. Loading checks each component like the UNet and swaps all of them in, or none.

Format 1 checkpoints (the fixed name mixq_unet.safetensors, no name in the manifest) still load, and
formats 1 and 2 (offset-binary packed weights) are converted to format 3's two's-complement fields as
they load.

Format versions: FORMAT_VERSION is what this code writes. A newer version is refused with a request to
upgrade mixq; an older one is upgraded through MIGRATIONS, one version at a time, or refused with the
reason recorded there.
"""

from __future__ import annotations

import hashlib
import json
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from mixq.kernels import dispatch
from mixq._version import __version__
from mixq.api import check_cpu_weights, get_unet, quantized_components, refuse_save_pretrained
from mixq.components import OPTIONAL_COMPONENTS, UNET, ComponentTree, component_of, local_name
from mixq.errors import CheckpointError, MixqError
from mixq.io import TEMP_SUFFIX, publish, require_utf8_path, storage_errors, temporary_sibling
from mixq.layers import find_lora_layers, find_quantized_layers, float_only_reason, set_submodule
from mixq.locks import folder_lock
from mixq.modules import (BOS_MODES, FakeQuantConv2d, FakeQuantLinear, QConv2d, QLinear, QuantizedLayer,
                          is_supported_conv)
from mixq.plan import architecture_fingerprint
from mixq.quantizers import ACTIVATION_BITS, FIELD_SIGN_BITS, FLOAT_BITS, WEIGHT_BITS, flip_field_sign_bits

# 2: the tensor file is named by its hash (weights_file.name) and BOS-cached layers store bos_input.
# 3: packed 4/2-bit weights hold two's-complement fields (mixq.quantizers), not offset-binary ones.
# 4: `components`: the opt-in components quantized with the UNet (empty for a UNet-only checkpoint).
FORMAT_VERSION = 4
MANIFEST_NAME = "mixq_manifest.json"
WEIGHTS_STEM, WEIGHTS_SUFFIX = "mixq_unet", ".safetensors"
WEIGHTS_NAME = WEIGHTS_STEM + WEIGHTS_SUFFIX  # the tensor file of checkpoints saved before versioned names
WEIGHTS_PATTERN = WEIGHTS_STEM + "*" + WEIGHTS_SUFFIX
WEIGHTS_HASH_CHARS = 16  # a saved tensor file is "mixq_unet.<first 16 hex digits of its sha256>.safetensors"
MANIFEST_HASH_KEY = "mixq_manifest_sha256"  # in the tensor file's metadata


def _from_format_1(manifest: dict) -> dict:
    """Format 1 had the fixed tensor-file name and no stored BOS inputs (both optional on load)."""
    return {**manifest, "format_version": 2}


# Set by a migration: the packed weights are offset-binary and are converted as they are loaded.
OFFSET_BINARY_WEIGHTS = "offset_binary_weights"


def _from_format_2(manifest: dict) -> dict:
    """Formats 1 and 2 stored packed weights offset-binary: load_layer flips their fields' sign bits."""
    return {**manifest, "format_version": 3, OFFSET_BINARY_WEIGHTS: True}


def _from_format_3(manifest: dict) -> dict:
    """Format 3 checkpoints hold the UNet only."""
    return {**manifest, "format_version": 4, "components": {}}


# Older format version -> a function that upgrades a manifest by one version, or a sentence that says why
# that version cannot be read.
MIGRATIONS: dict[int, Callable[[dict], dict] | str] = {1: _from_format_1, 2: _from_format_2, 3: _from_format_3}

# A float32 save also records its base hash at these precisions (see the module docstring).
HALF_DTYPES = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}

# Buffers that checkpoints saved by earlier mixq versions lack; a layer loaded without one does without
# (bos_input: the run-time check that token 0 is still the calibrated one).
OPTIONAL_BUFFERS = ("bos_input",)

MANIFEST_FIELDS = ("format_version", "mixq_version", "model", "layers", "mixq_info", "components", "weights_file")
MODEL_FIELDS = ("fingerprint", "config", "base_hash")
COMPONENT_FIELDS = ("model", "mixq_info")
LAYER_FIELDS = ("kind", "w_bits", "a_bits", "in_features", "out_features", "kernel_size", "split_at",
                "part_sizes", "bos_mode", "has_bias", "dtype")
CONV_FIELDS = ("stride", "padding")




# --- saving --------------------------------------------------------------------------------------


def save_quantized(pipe, path) -> Path:
    """Write the quantized layers of `pipe.unet` to the folder `path` (created if needed); returns it.

    Saving over an existing checkpoint is atomic as a whole: the tensors go to a new file named by
    their content hash, and the manifest naming that file replaces the old one in a single rename.
    A crash before that rename leaves the old checkpoint loadable, after it the new one; files of
    the old checkpoint and temporaries of interrupted saves are removed by the next save."""
    get_unet(pipe)
    tree = ComponentTree.of(pipe, quantized_components(pipe))
    layers = layers_to_save(tree)
    tensors = {f"{name}.{key}": tensor.detach().contiguous().cpu()
               for name, layer in layers.items() for key, tensor in layer.state_dict().items()}
    manifest = build_manifest(tree, layers)
    folder = Path(path)
    require_utf8_path(folder, CheckpointError)
    folder.mkdir(parents=True, exist_ok=True)
    # One saver at a time, and no loader beside it: the cleanup below deletes every tensor file the new
    # manifest does not name, which is only safe while nobody else writes or reads the folder.
    with folder_lock(folder, what="saving"):
        save_step("start")
        remove_stale_temporaries(folder)
        save_step("temporaries removed")
        manifest["weights_file"] = write_tensor_file(folder, tensors, tensor_file_metadata(manifest))
        save_step("tensors written")
        with temporary_sibling(folder / MANIFEST_NAME) as tmp:
            tmp.write_text(json.dumps(manifest, indent=1) + "\n")
            save_step("manifest staged")
            publish(tmp, folder / MANIFEST_NAME)  # the switch from the old checkpoint to the new one
        save_step("manifest written")
        remove_unreferenced_tensor_files(folder, keep=manifest["weights_file"]["name"])
        save_step("done")
    return folder


def build_manifest(tree, layers: dict[str, QuantizedLayer]) -> dict:
    """Everything a loader checks and needs besides the tensors (weights_file is added once they are
    written). `tree`: a UNet, or a ComponentTree of it and the other quantized components. The diffusers
    backend stores the same record in config.json (mixq.diffusers_quantizer)."""
    tree = tree if isinstance(tree, ComponentTree) else ComponentTree({UNET: tree})
    return json_normalized({
        "format_version": FORMAT_VERSION,
        "mixq_version": __version__,
        "model": model_record(tree.unet, local_layer_names(layers, UNET)),
        "layers": {name: layer_entry(layer) for name, layer in layers.items()},
        "mixq_info": getattr(tree.unet, "mixq_info", {}),
        "components": {name: {"model": model_record(module, local_layer_names(layers, name)),
                              "mixq_info": getattr(module, "mixq_info", {})}
                       for name, module in tree.modules.items() if name != UNET},
    })


def model_record(module: nn.Module, quantized_names) -> dict:
    """What identifies a component's model: class, fingerprint, config, and the hash of the tensors a
    loader takes from the pipeline (`quantized_names`: the quantized layers, local to the module)."""
    return {"class": type(module).__name__, "fingerprint": architecture_fingerprint(module),
            "config": unet_config(module), "base_hash": base_hash_record(base_state(module, quantized_names))}


def local_layer_names(names, component: str) -> list[str]:
    """The names of `component`'s layers among the qualified `names`, local to the component's module."""
    return [local_name(n) for n in names if component_of(n) == component]


# The step boundaries of save_quantized, in order (the fault-injection tests crash the save at each).
SAVE_STEPS = ("start", "temporaries removed", "tensors staged", "tensors written", "manifest staged",
              "manifest written", "done")


def save_step(step: str):
    """Called at each step boundary of save_quantized; a no-op (tests replace it to crash the save there)."""


# Copied into the tensor file's metadata at save: the loader refuses a manifest whose format version or
# layer entries differ from these (a hand-edited manifest with recomputed hashes would otherwise load a
# different model: another activation bit-width, or weights read in the wrong packing).
TENSOR_FILE_FORMAT_KEY, TENSOR_FILE_LAYERS_KEY = "mixq_format_version", "mixq_layers"


def tensor_file_metadata(manifest: dict) -> dict[str, str]:
    return {MANIFEST_HASH_KEY: manifest_hash(manifest), TENSOR_FILE_FORMAT_KEY: str(manifest["format_version"]),
            TENSOR_FILE_LAYERS_KEY: json.dumps(manifest["layers"], sort_keys=True, separators=(",", ":"))}


def write_tensor_file(folder: Path, tensors: dict, metadata: dict[str, str]) -> dict:
    """The tensors as a file named by its content hash; returns the manifest's record of it."""
    from safetensors.torch import save_file

    with temporary_sibling(folder / WEIGHTS_NAME) as tmp:
        with storage_errors(folder / WEIGHTS_NAME):
            save_file(tensors, str(tmp), metadata=metadata)
        sha256 = file_sha256(tmp)
        record = {"name": versioned_weights_name(sha256), "bytes": tmp.stat().st_size, "sha256": sha256}
        save_step("tensors staged")
        publish(tmp, folder / record["name"])
    return record


def versioned_weights_name(sha256: str) -> str:
    return f"{WEIGHTS_STEM}.{sha256[:WEIGHTS_HASH_CHARS]}{WEIGHTS_SUFFIX}"


def is_weights_name(name: str) -> bool:
    """A tensor-file name a manifest may give: the format-1 fixed name or a versioned one (no paths)."""
    return isinstance(name, str) and (name == WEIGHTS_NAME or re.fullmatch(
        rf"{re.escape(WEIGHTS_STEM)}\.[0-9a-f]{{{WEIGHTS_HASH_CHARS}}}{re.escape(WEIGHTS_SUFFIX)}", name) is not None)


def remove_stale_temporaries(folder: Path):
    """Temporary files left by interrupted saves of this folder."""
    for name in (WEIGHTS_NAME, MANIFEST_NAME):
        for stale in folder.glob(f".{name}.*{TEMP_SUFFIX}"):
            stale.unlink(missing_ok=True)


def remove_unreferenced_tensor_files(folder: Path, keep: str):
    """Tensor files of replaced checkpoints (only after the new manifest is in place), and temporaries."""
    remove_stale_temporaries(folder)
    for path in folder.iterdir():
        if path.name != keep and is_weights_name(path.name):
            path.unlink(missing_ok=True)


def layers_to_save(unet: nn.Module) -> dict[str, QuantizedLayer]:
    fake = [n for n, m in unet.named_modules() if isinstance(m, (FakeQuantLinear, FakeQuantConv2d))]
    if fake:
        raise CheckpointError(
            f"{len(fake)} layer(s) are fake-quant simulations (quantize(..., simulate=True)), e.g. {fake[0]!r}: they "
            "hold float weights, not a deployable model; quantize with simulate=False to save")
    lora = find_lora_layers(unet)
    if lora and any(isinstance(unet.get_submodule(n).get_base_layer(), QuantizedLayer) for n in lora):
        raise CheckpointError(
            f"the quantized UNet holds LoRA adapters ({len(lora)} layers, e.g. {lora[0]!r}), which are not part of a "
            "mixq checkpoint: unload them first (pipe.unload_lora_weights()), save, and load the LoRA again after "
            "loading the checkpoint")
    if lora:
        raise CheckpointError(
            f"the UNet holds {len(lora)} unfused LoRA layer(s) (e.g. {lora[0]!r}), which a checkpoint of the "
            "quantized layers would drop; fuse the LoRA before quantizing "
            "(pipe.fuse_lora(); pipe.unload_lora_weights())")
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, QuantizedLayer)}
    if not layers:
        raise CheckpointError("this UNet has no quantized layers: quantize it first (mixq.quantize(pipe, ...)), "
                              "then save")
    return layers


def layer_entry(layer: QuantizedLayer) -> dict:
    """What it takes to rebuild the layer empty (see empty_quantized_layer) and check it fits its place."""
    entry = {
        "kind": layer.kind, "w_bits": layer.w_bits, "a_bits": layer.a_bits,
        "in_features": layer.in_features, "out_features": layer.out_features,
        "kernel_size": list(layer.kernel_size), "split_at": layer.split_at, "part_sizes": list(layer.part_sizes),
        "bos_mode": layer.bos_mode, "has_bias": layer.bias is not None,
        "dtype": dtype_name(layer_float_dtype(layer)),
    }
    if isinstance(layer, QConv2d):
        entry.update(stride=list(layer.stride), padding=list(layer.padding))
    return entry


def layer_float_dtype(layer: QuantizedLayer) -> torch.dtype | None:
    """The dtype of the layer's pipeline-dtype buffers (bias, BOS row, float weight); None if it has none."""
    fp32_always = QuantizedLayer._FP32_BUFFERS
    dtypes = [b.dtype for n, b in layer.named_buffers() if n not in fp32_always and b.is_floating_point()]
    return dtypes[0] if dtypes else None


def unet_config(unet) -> dict:
    """The model's config (a diffusers FrozenDict, or a transformers PretrainedConfig) as plain JSON."""
    config = getattr(unet, "config", {})
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json_normalized({k: v for k, v in config.items()
                            if not k.startswith("_") and k not in ("quantization_config", "transformers_version")})


# --- hashes --------------------------------------------------------------------------------------


def base_state(unet: nn.Module, quantized_names) -> dict[str, torch.Tensor]:
    """The UNet tensors a loader takes from the pipeline: its state_dict outside the quantized layers."""
    prefixes = tuple(f"{name}." for name in quantized_names)
    return {key: t for key, t in unet.state_dict().items() if not key.startswith(prefixes)}


def base_hash(state: dict[str, torch.Tensor], dtype: torch.dtype) -> str:
    """sha256 over (key, dtype, shape, bytes) of every tensor, floats rounded to `dtype`, in key order."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach()
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        flat = tensor.contiguous().cpu().reshape(-1)
        digest.update(f"{key}:{dtype_name(flat.dtype)}:{list(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def base_hash_record(state: dict[str, torch.Tensor]) -> dict:
    saved = float_dtype(state)
    dtypes = (saved, *HALF_DTYPES) if saved == torch.float32 else (saved,)
    return {"dtype": dtype_name(saved), "tensors": len(state),
            "sha256": {dtype_name(d): base_hash(state, d) for d in dtypes}}


def float_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    return next((t.dtype for _, t in sorted(state.items()) if t.is_floating_point()), torch.float32)


def manifest_hash(manifest: dict) -> str:
    """sha256 of the manifest without its record of the tensor file (which is written after it)."""
    body = {k: v for k, v in manifest.items() if k != "weights_file"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def json_normalized(value):
    """As it reads back from JSON (tuples become lists, unknown objects strings): hashes must agree."""
    return json.loads(json.dumps(value, default=str))


def dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in FLOAT_DTYPES:
        raise CheckpointError(f"unknown floating-point dtype {name!r} in the manifest (known: {sorted(FLOAT_DTYPES)})")
    return FLOAT_DTYPES[name]


# --- loading -------------------------------------------------------------------------------------


def load_quantized(pipe, path, *, revision: str | None = None, subfolder: str | None = None,
                   token: str | bool | None = None, cpu_weights: str = "packed"):
    """Swap the quantized layers of the checkpoint at `path` into `pipe.unet` and return `pipe`.

    pipe: an unquantized pipeline of the model the checkpoint was made from (see the module docstring
        for what must match); the layers take the dtype and device of the layers they replace.
    path: a local checkpoint folder, or a Hugging Face Hub repo id ("owner/name"); for a repo,
        `revision` (branch, tag or commit), `subfolder` and `token` are passed to the download.
    cpu_weights: "packed" or "int8", as in mixq.quantize (how 4/2-bit weights live on an x86 CPU).
    """
    check_cpu_weights(cpu_weights)
    folder = checkpoint_folder(path, revision=revision, subfolder=subfolder, token=token)
    require_utf8_path(folder, CheckpointError)
    # Shared with other loaders, never beside a save: the manifest and the tensor file it names are read
    # as one pair, even while another process saves into the folder.
    with folder_lock(folder, shared=True, what="loading"):
        return load_checkpoint_into(pipe, folder, path, cpu_weights)


def load_checkpoint_into(pipe, folder: Path, path, cpu_weights: str = "packed"):
    manifest = read_manifest(folder)
    check_format_version(manifest)
    check_stored_fields(manifest, folder / MANIFEST_NAME)
    weights = weights_path(folder, manifest)
    stored = check_integrity(weights, manifest)
    manifest = upgrade_manifest(manifest)
    check_manifest_fields(manifest, str(folder / MANIFEST_NAME))
    check_layers_match_tensor_file(manifest, stored, folder / MANIFEST_NAME, weights)

    get_unet(pipe)
    components = manifest["components"]
    tree = pipeline_components(pipe, components)
    records = {UNET: manifest["model"], **{name: c["model"] for name, c in components.items()}}
    for name, module in tree.modules.items():
        check_loadable(module, name)
        check_architecture(records[name], module, name)
    targets = layers_to_replace(manifest["layers"], tree)
    for name, module in tree.modules.items():
        check_base_hash(records[name]["base_hash"], base_state(module, local_layer_names(targets, name)), name)
    replacements = build_quantized_layers(manifest["layers"], weights, targets,
                                          offset_binary=manifest.get(OFFSET_BINARY_WEIGHTS, False))
    for layer in replacements.values():
        dispatch.prepare_layer(layer, cpu_weights)  # kernel weight layouts, made once here rather than per call

    for name, layer in replacements.items():
        set_submodule(tree, name, layer)
    tree.unet.mixq_info = {**manifest["mixq_info"], "checkpoint": str(path)}
    for name, component in components.items():
        tree.modules[name].mixq_info = {**component["mixq_info"], "checkpoint": str(path)}
        refuse_save_pretrained(tree.modules[name], name)
    return pipe


def pipeline_components(pipe, components: dict) -> ComponentTree:
    """The pipeline's modules of the checkpoint's components; a missing one is refused, named."""
    missing = [name for name in components if not isinstance(getattr(pipe, name, None), nn.Module)]
    if missing:
        raise CheckpointError(f"this checkpoint also quantizes the pipeline's {missing[0]}, which {type(pipe).__name__} "
                              "lacks: load it into a pipeline of the model it was made from")
    return ComponentTree.of(pipe, (UNET, *components))


def checkpoint_folder(path, *, revision=None, subfolder=None, token=None) -> Path:
    """A local folder as is; anything else that reads as an "owner/name" repo id is downloaded."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local / subfolder if subfolder else local
    if local.exists():
        raise CheckpointError(f"{path} is a file: pass the checkpoint folder that holds {MANIFEST_NAME} and "
                              f"{WEIGHTS_NAME}")
    if not is_hub_repo_id(str(path)):
        raise FileNotFoundError(f"no checkpoint folder at {path}, and it is not a Hugging Face Hub repo id "
                                "('owner/name')")
    return download_checkpoint(str(path), revision=revision, subfolder=subfolder, token=token)


def is_hub_repo_id(text: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if text.count("/") != 1:  # a checkpoint repo always has an owner; anything else is a missing local path
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def download_checkpoint(repo_id: str, *, revision=None, subfolder=None, token=None) -> Path:
    """Only the two checkpoint files are fetched (a repo may hold the whole pipeline beside them)."""
    from huggingface_hub import snapshot_download

    from mixq.hub import load_failure_message

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        root = snapshot_download(repo_id, revision=revision, token=token,
                                 allow_patterns=[prefix + MANIFEST_NAME, prefix + WEIGHTS_PATTERN])
    except Exception as err:  # network, authentication, missing repo or revision: all end here for the user
        raise CheckpointError(load_failure_message(repo_id, err, what="the checkpoint", local_fix="a local checkpoint "
                                                   "folder (mixq.save_quantized writes one)")) from err
    return Path(root) / prefix if prefix else Path(root)


MAX_MANIFEST_BYTES = 64 << 20  # an SDXL manifest is well under 1 MiB


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder} holds no {MANIFEST_NAME}: not a mixq checkpoint "
                              "(mixq.save_quantized writes one)")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise CheckpointError(f"{path} has {path.stat().st_size:,} bytes, far more than a mixq manifest: the checkpoint "
                              "is damaged or not a mixq checkpoint; save or download it again")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        detail = "nested too deeply" if isinstance(err, RecursionError) else err
        raise CheckpointError(f"{path} is not valid JSON ({detail}): the checkpoint is damaged; "
                              "save or download it again") from err
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path} is not a mixq manifest (a JSON object is expected)")
    return manifest


def check_format_version(manifest: dict):
    """Refuse versions this code cannot read, before anything else in the manifest is trusted."""
    version = manifest.get("format_version")
    writer = f"mixq {manifest.get('mixq_version', '?')}"
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"the manifest has no integer format_version (got {version!r}): not a mixq "
                              "checkpoint, or a damaged one")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint format version {version} (written by {writer}) is newer than this mixq {__version__} can "
            f"read (format {FORMAT_VERSION}): upgrade mixq (pip install -U mixq)")
    for old in range(version, FORMAT_VERSION):
        step = MIGRATIONS.get(old)
        cannot = f"checkpoint format version {version} (written by {writer}) cannot be read by mixq {__version__}"
        if step is None:
            raise CheckpointError(f"{cannot}: there is no migration from format {old} to {old + 1}; load it with "
                                  f"{writer}, or quantize the model again and save it with this version")
        if isinstance(step, str):
            raise CheckpointError(f"{cannot}: {step}")


def upgrade_manifest(manifest: dict) -> dict:
    """Apply MIGRATIONS one version at a time (check_format_version has made sure they exist)."""
    for old in range(manifest["format_version"], FORMAT_VERSION):
        manifest = MIGRATIONS[old](dict(manifest))
        if manifest.get("format_version") != old + 1:
            raise RuntimeError(f"the migration from checkpoint format {old} must return a format {old + 1} manifest")
    return manifest


def weights_path(folder: Path, manifest: dict) -> Path:
    """The tensor file the manifest names (checkpoints from before versioned names: mixq_unet.safetensors)."""
    record = manifest.get("weights_file")
    if not (isinstance(record, dict) and is_count(record.get("bytes")) and isinstance(record.get("sha256"), str)):
        raise CheckpointError(f"{folder / MANIFEST_NAME} has no weights_file record (bytes, sha256): it is damaged or "
                              "was not written by mixq.save_quantized; save or download the checkpoint again")
    name = record.get("name", WEIGHTS_NAME)
    if not is_weights_name(name):
        raise CheckpointError(f"{folder / MANIFEST_NAME} names the tensor file {name!r}, which is not a mixq tensor "
                              "file name: the manifest is damaged; save or download the checkpoint again")
    return folder / name


def check_integrity(path: Path, manifest: dict) -> dict:
    """The tensor file at `path` is the one the manifest was saved with, whole, and the manifest is
    unedited; returns the tensor file's metadata."""
    record, folder = manifest["weights_file"], path.parent
    if not path.is_file():
        raise CheckpointError(f"{folder} has a manifest but no {path.name}: copy or download the whole folder")
    size, expected = path.stat().st_size, record["bytes"]
    if size < expected:
        raise CheckpointError(f"{path} is truncated: {size:,} of {expected:,} bytes (an interrupted copy or download); "
                              "fetch it again")
    if size != expected:
        raise CheckpointError(f"{path} has {size:,} bytes but its manifest records {expected:,}: the file was altered "
                              "or comes from another save; save or download the checkpoint again")
    if file_sha256(path) != record["sha256"]:
        raise CheckpointError(f"{path} does not match the sha256 recorded in {MANIFEST_NAME}: the file is damaged, "
                              "altered, or comes from another save; save or download the checkpoint again")
    try:
        expected_hash = manifest_hash(manifest)
    except RecursionError as err:
        raise CheckpointError(f"{folder / MANIFEST_NAME} is nested too deeply to be a mixq manifest: the checkpoint is "
                              "damaged; save or download it again") from err
    stored = tensor_file_metadata_of(path)
    if stored.get(MANIFEST_HASH_KEY) != expected_hash:
        raise CheckpointError(f"{folder / MANIFEST_NAME} was edited after saving (it no longer matches the hash "
                              f"recorded in {path.name}): restore the original manifest or save the checkpoint "
                              "again")
    if TENSOR_FILE_FORMAT_KEY in stored and stored[TENSOR_FILE_FORMAT_KEY] != str(manifest.get("format_version")):
        raise CheckpointError(f"{folder / MANIFEST_NAME}: field 'format_version' is {manifest.get('format_version')!r} "
                              f"but {path.name} was saved as format {stored[TENSOR_FILE_FORMAT_KEY]}: the manifest was "
                              "edited; restore the original or save the checkpoint again")
    return stored


def check_layers_match_tensor_file(manifest: dict, stored: dict, where: Path, tensor_file: Path):
    """The layer entries the tensor file was saved with (`stored`: its metadata; checkpoints saved
    before they were recorded there are checked by their hashes alone). Run after the entries' own
    checks, which name malformed values more precisely."""
    if TENSOR_FILE_LAYERS_KEY in stored:
        try:
            saved_layers = json.loads(stored[TENSOR_FILE_LAYERS_KEY])
            if not isinstance(saved_layers, dict):
                raise ValueError("not an object")
        except (ValueError, RecursionError):
            raise CheckpointError(f"{tensor_file} has unreadable layer metadata: the file is damaged; save or "
                                  "download the checkpoint again") from None
        layers = manifest.get("layers")
        if layers != saved_layers:
            field = first_layer_difference(layers, saved_layers)
            raise CheckpointError(f"{where}: field {field} differs from what {tensor_file.name} was saved with: the "
                                  "manifest was edited; restore the original or save the checkpoint again")


def first_layer_difference(layers, saved: dict) -> str:
    """The first field at which two manifests' layer entries differ, e.g. "layers['x'].a_bits"."""
    if not isinstance(layers, dict):
        return "layers"
    for name in sorted(set(layers) | set(saved), key=str):
        mine, theirs = layers.get(name), saved.get(name)
        if mine != theirs:
            if isinstance(mine, dict) and isinstance(theirs, dict):
                key = next(k for k in sorted(set(mine) | set(theirs), key=str) if mine.get(k) != theirs.get(k))
                return f"layers[{name!r}].{key}"
            return f"layers[{name!r}]"
    return "layers"


def check_stored_fields(manifest: dict, where, fields=MANIFEST_FIELDS):
    """A stored manifest has `fields` and nothing else, in every format: anything more (for example
    the offset_binary_weights flag that only a migration sets, in memory) is refused."""
    unknown = sorted(str(k) for k in manifest if k not in fields)
    if unknown:
        raise CheckpointError(f"{where}: field {unknown[0]!r} does not belong to a format-{manifest['format_version']} "
                              "manifest: the manifest was edited or written by another tool; restore the original or "
                              "save the checkpoint again")


@contextmanager
def open_tensor_file(path: Path):
    """safe_open, with a malformed file (bad header, huge header, bad offsets) reported as a CheckpointError."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            yield file
    except (SafetensorError, OSError, RuntimeError, ValueError, OverflowError) as err:
        if isinstance(err, MixqError):
            raise
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}): the checkpoint is damaged; "
                              "save or download it again") from err


def tensor_file_metadata_of(weights_path: Path) -> dict:
    with open_tensor_file(weights_path) as f:
        return dict(f.metadata() or {})


def check_manifest_fields(manifest: dict, where: str = MANIFEST_NAME, fields=MANIFEST_FIELDS):
    """Every field the loader reads has the type and range it needs, checked before the pipe is touched
    (hashes prove a manifest unedited, not well-formed: a re-hashed or hand-made one reaches here)."""
    missing = [f for f in fields if f not in manifest]
    model = manifest.get("model")
    if isinstance(model, dict):
        missing += [f"model.{f}" for f in MODEL_FIELDS if f not in model]
    if missing:
        raise CheckpointError(f"{where} lacks {', '.join(missing[:5])}: it was not written by mixq.save_quantized "
                              "or is damaged; save or download the checkpoint again")
    problems = manifest_problems(manifest)
    if problems:
        raise CheckpointError(f"{where} is malformed ({'; '.join(problems[:3])}"
                              f"{f'; and {len(problems) - 3} more' if len(problems) > 3 else ''}): it was not "
                              "written by mixq.save_quantized or is damaged; save or download the checkpoint again")


def manifest_problems(manifest: dict) -> list[str]:
    problems = model_problems(manifest["model"], "model")
    if not isinstance(manifest["mixq_info"], dict):
        problems.append(f"mixq_info is {type(manifest['mixq_info']).__name__}, not an object")
    problems += components_problems(manifest.get("components", {}))
    layers = manifest["layers"]
    if not isinstance(layers, dict) or not layers:
        return problems + ["layers is not a non-empty object"]
    for name, entry in layers.items():
        problems += [f"layers[{name!r}]: {p}" for p in layer_entry_problems(entry)]
    components = manifest.get("components") if isinstance(manifest.get("components"), dict) else {}
    unlisted = sorted({component_of(n) for n in layers} - {UNET} - set(components))
    problems += [f"layers of {c} but no components[{c!r}] record" for c in unlisted]
    problems += [f"components[{c!r}] has no layers" for c in components
                 if not any(component_of(n) == c for n in layers)]
    return problems


def model_problems(model, where: str) -> list[str]:
    if not isinstance(model, dict):
        return [f"{where} is not an object"]
    missing = [f for f in MODEL_FIELDS if f not in model]
    if missing:
        return [f"{where} lacks {', '.join(missing)}"]
    problems = []
    if not isinstance(model["fingerprint"], str):
        problems.append(f"{where}.fingerprint is not a string")
    if not isinstance(model["config"], dict):
        problems.append(f"{where}.config is not an object")
    return problems + [p.replace("model.", f"{where}.", 1) for p in base_hash_problems(model["base_hash"])]


def components_problems(components) -> list[str]:
    if not isinstance(components, dict):
        return ["components is not an object"]
    problems = []
    for name, record in components.items():
        where = f"components[{name!r}]"
        if name not in OPTIONAL_COMPONENTS:
            problems.append(f"{where} is not one of {OPTIONAL_COMPONENTS}")
        elif not isinstance(record, dict) or sorted(record) != sorted(COMPONENT_FIELDS):
            problems.append(f"{where} is not an object of {', '.join(COMPONENT_FIELDS)}")
        else:
            problems += model_problems(record["model"], f"{where}.model")
            if not isinstance(record["mixq_info"], dict):
                problems.append(f"{where}.mixq_info is not an object")
    return problems


def base_hash_problems(record) -> list[str]:
    if not isinstance(record, dict):
        return ["model.base_hash is not an object"]
    problems = []
    if not is_dtype_name(record.get("dtype")):
        problems.append(f"model.base_hash.dtype {record.get('dtype')!r} is not one of {sorted(FLOAT_DTYPES)}")
    hashes = record.get("sha256")
    if not (isinstance(hashes, dict) and hashes and all(is_dtype_name(k) and isinstance(v, str)
                                                        for k, v in hashes.items())):
        problems.append("model.base_hash.sha256 is not an object of dtype -> hash")
    if not is_count(record.get("tensors")):
        problems.append("model.base_hash.tensors is not a count")
    return problems


MAX_FEATURES = 1 << 20  # channels of one layer; far above any UNet, far below an allocation that would hurt


def is_dtype_name(value) -> bool:
    return isinstance(value, str) and value in FLOAT_DTYPES


def is_count(value, low: int = 0, high: int = 1 << 40) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def is_pair(value, low: int, high: int = 64) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(is_count(v, low, high) for v in value)


def layer_entry_problems(entry) -> list[str]:
    """Why one manifest layer entry cannot describe a QLinear/QConv2d (empty when it can)."""
    if not isinstance(entry, dict):
        return ["not an object"]
    kind = entry.get("kind")
    needed = LAYER_FIELDS + (CONV_FIELDS if kind == "conv2d" else ())
    missing = [f for f in needed if f not in entry]
    if missing:
        return [f"lacks {', '.join(missing)}"]
    problems = []
    if kind not in ("linear", "conv2d"):
        problems.append(f"kind {kind!r} is not linear or conv2d")
    w, a = entry["w_bits"], entry["a_bits"]
    if not (is_count(w) and w in (*WEIGHT_BITS, FLOAT_BITS)) or not (is_count(a) and a in (*ACTIVATION_BITS, FLOAT_BITS)) \
            or (w, a) == (FLOAT_BITS, FLOAT_BITS):
        problems.append(f"bits (w {w!r}, a {a!r}) are not a quantized pair of {WEIGHT_BITS}/{ACTIVATION_BITS}/16")
    if not is_count(entry["in_features"], 1, MAX_FEATURES) or not is_count(entry["out_features"], 1, MAX_FEATURES):
        problems.append("in_features/out_features are not counts of channels")
    if not is_pair(entry["kernel_size"], 1) or (kind == "linear" and entry["kernel_size"] != [1, 1]):
        problems.append(f"kernel_size {entry['kernel_size']!r} is not a pair of sizes (1, 1 for linear)")
    if kind == "conv2d" and not (is_pair(entry["stride"], 1) and is_pair(entry["padding"], 0)):
        problems.append("stride/padding are not pairs of counts")
    split = entry["split_at"]
    if split is not None and not (is_count(split, 1) and is_count(entry["in_features"]) and split < entry["in_features"]):
        problems.append(f"split_at {split!r} is not inside the input channels")
    if not (isinstance(entry["part_sizes"], list) and all(is_count(p, 1) for p in entry["part_sizes"])):
        problems.append("part_sizes is not a list of counts")
    if entry["bos_mode"] not in BOS_MODES or (entry["bos_mode"] != "none" and kind != "linear"):
        problems.append(f"bos_mode {entry['bos_mode']!r} is not one of {BOS_MODES} (none for conv2d)")
    if not isinstance(entry["has_bias"], bool):
        problems.append("has_bias is not true/false")
    if entry["dtype"] is not None and not is_dtype_name(entry["dtype"]):
        problems.append(f"dtype {entry['dtype']!r} is not one of {sorted(FLOAT_DTYPES)}")
    return problems


def check_loadable(unet: nn.Module, component: str = UNET):
    what = "the UNet" if component == UNET else f"the pipeline's {component}"
    lora = find_lora_layers(unet)
    if lora:
        raise CheckpointError(
            f"{what} holds {len(lora)} unfused LoRA layer(s) (e.g. {lora[0]!r}): loading would replace them and "
            "drop the adapter. Fuse it first (pipe.fuse_lora(); pipe.unload_lora_weights()) if the checkpoint was "
            "made from the fused model, or load into the pipeline without the LoRA")
    done = find_quantized_layers(unet)
    if done:
        raise CheckpointError(f"{what} is already quantized ({len(done)} quantized layers, e.g. {done[0]!r}): "
                              "load the checkpoint into the floating-point pipeline")


def check_architecture(model: dict, unet: nn.Module, component: str = UNET):
    expected, actual = model["fingerprint"], architecture_fingerprint(unet)
    if expected == actual:
        return
    differing = config_differences(model["config"], unet_config(unet))
    what = "UNet" if component == UNET else component
    raise CheckpointError(
        f"this checkpoint was made for another {what} architecture (fingerprint {expected}; this pipeline's {what} is "
        f"{actual}; config differences: {differing or 'none listed'}): load it into a pipeline of the model it "
        "was quantized from")


def config_differences(saved: dict, current: dict, limit: int = 4) -> str:
    keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    shown = [f"{k} {saved.get(k)!r} in the checkpoint vs {current.get(k)!r} here" for k in keys[:limit]]
    return "; ".join(shown) + (f"; and {len(keys) - limit} more" if len(keys) > limit else "")


def layers_to_replace(entries: dict, unet: nn.Module) -> dict[str, nn.Module]:
    """name -> the float layer of `unet` each manifest entry replaces, after checking it fits."""
    targets, problems = {}, []
    for name, entry in entries.items():
        try:
            module = unet.get_submodule(name)
        except AttributeError:
            problems.append(f"{name}: no such layer")
            continue
        problem = layer_mismatch(entry, module)
        if problem:
            problems.append(f"{name}: {problem}")
        else:
            targets[name] = module
    if problems:
        raise CheckpointError(f"{len(problems)} layer(s) of the checkpoint do not fit this UNet "
                              f"({'; '.join(problems[:3])}): it was made for another model")
    return targets


def layer_mismatch(entry: dict, module: nn.Module) -> str | None:
    """Why the float `module` cannot be replaced by the layer `entry` describes, or None."""
    if isinstance(module, (nn.Linear, nn.Conv2d)) and float_only_reason(module):
        return f"mixq keeps this layer in floating point: {float_only_reason(module)}"
    if entry["kind"] == "linear" and isinstance(module, nn.Linear):
        found = {"in_features": module.in_features, "out_features": module.out_features}
    elif entry["kind"] == "conv2d" and isinstance(module, nn.Conv2d):
        if not is_supported_conv(module):
            return "the UNet's Conv2d is of a kind mixq does not quantize (groups, dilation or padding mode)"
        found = {"in_features": module.in_channels, "out_features": module.out_channels,
                 "kernel_size": list(module.kernel_size), "stride": list(module.stride),
                 "padding": list(module.padding)}
    else:
        return f"the checkpoint holds a {entry['kind']} layer, the UNet a {type(module).__name__}"
    found["has_bias"] = module.bias is not None
    differing = [f"{key} {entry[key]} in the checkpoint vs {value} here"
                 for key, value in found.items() if entry[key] != value]
    return ", ".join(differing) or None


def check_base_hash(record: dict, state: dict[str, torch.Tensor], component: str = UNET):
    recorded = record["sha256"]
    saved, here = parse_dtype(record["dtype"]), float_dtype(state)
    if dtype_name(here) in recorded:
        dtype = here
    elif here.itemsize > saved.itemsize:
        dtype = saved  # a wider pipeline is rounded down to the precision of the save
    else:
        raise CheckpointError(
            f"this checkpoint was saved from a {dtype_name(saved)} UNet and cannot be verified against this "
            f"{dtype_name(here)} pipeline: load it into a pipeline in one of {sorted(recorded)}, then cast it")
    if base_hash(state, dtype) != recorded[dtype_name(dtype)]:
        raise CheckpointError(
            f"the pipeline's {'UNet' if component == UNET else component} is not the model this checkpoint was made "
            "from: the weights the checkpoint does not "
            f"store ({len(state)} tensors here, {record['tensors']} when saved: norms, embeddings, conv_in/conv_out, "
            "layers kept in floating point) differ from the ones it was quantized with. Load it into that model "
            "(with the same LoRA fused, if one was fused before quantizing)")


def build_quantized_layers(entries: dict, weights_path: Path, targets: dict[str, nn.Module],
                           offset_binary: bool = False) -> dict[str, QuantizedLayer]:
    """Every layer of the checkpoint, built empty and filled from the tensor file; no float weights are
    made. offset_binary: packed weights stored as formats before 3 did."""
    with open_tensor_file(weights_path) as file:
        stored = set(file.keys())
        layers = {}
        for name, entry in entries.items():
            float_layer = targets[name]
            try:
                layers[name] = load_layer(name, entry, file, stored, float_layer.weight.dtype,
                                          float_layer.weight.device, offset_binary)
            except (ValueError, TypeError, RuntimeError) as err:  # a manifest entry no layer can be built from
                if isinstance(err, MixqError):
                    raise
                raise CheckpointError(f"layer {name!r} of {MANIFEST_NAME} cannot be rebuilt ({err}): the checkpoint "
                                      "is damaged; save or download it again") from err
    expected = {f"{name}.{key}" for name, layer in layers.items() for key in layer.state_dict()}
    unexpected = sorted(stored - expected)
    if unexpected:
        raise CheckpointError(f"{weights_path} holds {len(unexpected)} tensor(s) its manifest does not describe "
                              f"(e.g. {unexpected[0]!r}): manifest and tensors disagree; save the checkpoint again")
    return layers


def load_layer(name: str, entry: dict, file, stored: set[str], dtype: torch.dtype, device,
               offset_binary: bool = False) -> QuantizedLayer:
    """One layer: check each stored tensor against the layer as saved, then cast it to `dtype`/`device`
    (packed weights of an older format converted to this one's fields)."""
    as_saved = empty_quantized_layer(entry, parse_dtype(entry["dtype"]) or dtype).state_dict()
    layer = empty_quantized_layer(entry, dtype)
    if list(layer.part_sizes) != entry["part_sizes"]:
        raise CheckpointError(f"layer {name!r}: part sizes {entry['part_sizes']} in the manifest, {layer.part_sizes} "
                              "rebuilt from it: the manifest is inconsistent; save the checkpoint again")
    state = {}
    for key, target in layer.state_dict().items():
        full = f"{name}.{key}"
        if full not in stored and key in OPTIONAL_BUFFERS:
            setattr(layer, key, None)
            continue
        if full not in stored:
            raise CheckpointError(f"the tensor file has no {full!r}, which the manifest's layer needs: "
                                  "save the checkpoint again")
        tensor = file.get_tensor(full)
        saved = as_saved[key]
        if tensor.dtype != saved.dtype or tensor.shape != saved.shape:
            raise CheckpointError(f"tensor {full!r} is {dtype_name(tensor.dtype)} {list(tensor.shape)}, the "
                                  f"manifest's layer needs {dtype_name(saved.dtype)} {list(saved.shape)}: save the "
                                  "checkpoint again")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"tensor {full!r} holds NaN or Inf values: the checkpoint is damaged or was made "
                                  "from a model with non-finite weights; quantize and save it again")
        if offset_binary and key.startswith("qweight_") and layer.w_bits in FIELD_SIGN_BITS:
            tensor = flip_field_sign_bits(tensor, layer.w_bits)
        state[key] = tensor.to(device=device, dtype=target.dtype)
    layer.load_state_dict(state, strict=True, assign=True)  # replaces the meta buffers
    return layer


def empty_quantized_layer(entry: dict, dtype: torch.dtype, device="meta") -> QuantizedLayer:
    """The layer a manifest entry describes, its buffers on `device` (meta: nothing is allocated)."""
    shared = {"split_at": entry["split_at"], "has_bias": entry["has_bias"], "dtype": dtype, "device": device}
    if entry["kind"] == "linear":
        return QLinear(entry["out_features"], entry["in_features"], entry["w_bits"], entry["a_bits"],
                       bos_mode=entry["bos_mode"], **shared)
    if entry["kind"] == "conv2d":
        return QConv2d(entry["out_features"], entry["in_features"], entry["w_bits"], entry["a_bits"],
                       entry["kernel_size"], entry["stride"], entry["padding"], **shared)
    raise CheckpointError(f"unknown layer kind {entry['kind']!r} in the manifest (known: linear, conv2d)")
