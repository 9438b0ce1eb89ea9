"""mixq as a diffusers quantization backend, beside bitsandbytes, GGUF, torchao and the others.

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet",
                                                quantization_config=mixq.MixqConfig(plan="runs/x/plan.yaml",
                                                                                    calibration="runs/x"))
    unet.save_pretrained("sdxl-turbo-mixq")      # config.json carries the quantization_config
    unet = UNet2DConditionModel.from_pretrained("sdxl-turbo-mixq")   # after `import mixq`: pre-quantized

diffusers has no public way to add a backend: `register()` (run by `import mixq`) adds mixq to the two
mappings of diffusers.quantizers.auto, which diffusers reads at call time (from_pretrained and
PipelineQuantizationConfig both look there).

A saved folder is a plain diffusers model folder: config.json and diffusion_pytorch_model.safetensors
(sharded or not, pushed to the Hub by diffusers' own code). The quantized layers' buffers are the same
packed tensors `save_quantized` writes, and the record that describes them is the same manifest
(`checkpoint.build_manifest`), stored as `quantization_config["manifest"]`; loading runs the same checks
as `load_quantized`:
- before any tensor is read: format version (newer refused, older upgraded), every manifest field,
  the architecture fingerprint against the model built from config.json, each layer against the float
  layer it replaces;
- the safetensors metadata (written by `get_state_dict_and_metadata`) records the manifest's hash and its
  layer entries, so an edited config.json is refused, and a sha256 over every tensor of the model, so an
  altered weights file is refused (a truncated one does not parse: diffusers refuses it, naming the file);
- after loading: the base hash (the tensors outside the quantized layers) and the whole-model hash.
Unlike save_quantized, the files are written by diffusers, one after the other and not atomically: an
interrupted save leaves a folder that is refused on load, never one that loads wrong weights.
"""

from __future__ import annotations

import hashlib
import json
from enum import Enum
from pathlib import Path

import torch
import torch.nn as nn

from mixq.api import quantize_unet
from mixq.checkpoint import (
    MANIFEST_HASH_KEY,
    TENSOR_FILE_FORMAT_KEY,
    base_state,
    build_manifest,
    check_architecture,
    check_base_hash,
    check_format_version,
    check_layers_match_tensor_file,
    check_manifest_fields,
    check_stored_fields,
    empty_quantized_layer,
    layers_to_replace,
    layers_to_save,
    manifest_hash,
    tensor_file_metadata,
    tensor_file_metadata_of,
    upgrade_manifest,
)
from mixq.errors import CheckpointError, ConfigError
from mixq.kernels import dispatch
from mixq.layers import set_submodule
from mixq.modules import QuantizedLayer
from mixq.quantizers import check_activation_bits, check_weight_bits

QUANT_METHOD = "mixq"
# Keys of the safetensors metadata a mixq save_pretrained writes (beside checkpoint.tensor_file_metadata's).
STATE_HASH_KEY = "mixq_state_sha256"
# A manifest here has every field save_quantized's has except the record of its own tensor file.
CONFIG_MANIFEST_FIELDS = ("format_version", "mixq_version", "model", "layers", "mixq_info", "components")


class MixqMethod(str, Enum):
    """diffusers reads `quant_method.value` (for its telemetry); a str Enum serializes as "mixq"."""

    MIXQ = QUANT_METHOD


def _diffusers_config_base():
    from diffusers.quantizers.quantization_config import QuantizationConfigMixin

    return QuantizationConfigMixin


def _diffusers_quantizer_base():
    from diffusers.quantizers.base import DiffusersQuantizer

    return DiffusersQuantizer


class MixqConfig(_diffusers_config_base()):
    """How to quantize a UNet while diffusers loads it, and, once quantized, the record of how it was.

    w_bit / a_bit: uniform bits, as in mixq.quantize (weights 2/4/8, activations 4/8, 16 = float); a
        `plan` (a plan.yaml path or a mapping name -> {w_bits, a_bits}) overrides them per layer.
    calibration: the activation ranges (a `python -m mixq.calibrate` run folder or its
        activation_ranges.safetensors); required unless every layer keeps float activations.
    keep_fp: layer names or glob patterns kept in floating point (default conv_in, conv_out).
    manifest: filled by mixq once the model is quantized (what `save_quantized` records); a config read
        from a saved folder has it, and then the model loads pre-quantized, without calibration data.
    """

    def __init__(self, w_bit: int = 8, a_bit: int = 8, plan=None, calibration=None, keep_fp=None, manifest=None,
                 quant_method=QUANT_METHOD, **unknown):
        if unknown:
            raise ConfigError(f"MixqConfig got unknown field(s) {sorted(unknown)}: it takes w_bit, a_bit, plan, "
                              "calibration, keep_fp (and manifest, which mixq writes)")
        if str(getattr(quant_method, "value", quant_method)) != QUANT_METHOD:
            raise ConfigError(f"MixqConfig is for quant_method {QUANT_METHOD!r}, not {quant_method!r}")
        try:
            check_weight_bits(w_bit)
            check_activation_bits(a_bit)
        except ValueError as err:
            raise ConfigError(f"MixqConfig: {err}") from None
        if plan is not None and not isinstance(plan, (str, Path, dict)):
            raise ConfigError(f"MixqConfig: plan must be a plan.yaml path or a mapping, not {type(plan).__name__}")
        if calibration is not None and not isinstance(calibration, (str, Path)):
            raise ConfigError("MixqConfig: calibration must be a run folder or an activation_ranges.safetensors path "
                              f"(it is stored in config.json), not {type(calibration).__name__}")
        if manifest is not None and not isinstance(manifest, dict):
            raise CheckpointError("the quantization_config's manifest is not an object: config.json is damaged; "
                                  "save the model again")
        self.quant_method = MixqMethod.MIXQ
        self.w_bit, self.a_bit = w_bit, a_bit
        self.plan = str(plan) if isinstance(plan, Path) else plan
        self.calibration = None if calibration is None else str(calibration)
        self.keep_fp = None if keep_fp is None else [keep_fp] if isinstance(keep_fp, str) else list(keep_fp)
        self.manifest = manifest
        # The quantized model this config describes, see to_dict. A plain reference (the model holds this
        # config too): copy.deepcopy(pipe) then gives a copy whose config describes the copy.
        self._model = None

    @property
    def is_quantized(self) -> bool:
        return self.manifest is not None or self._model is not None

    def to_dict(self) -> dict:
        """JSON-ready; for a quantized model, its manifest as it is now, e.g. after a cast to float16
        (save_pretrained writes config.json first, from this)."""
        manifest = self.manifest if self._model is None else manifest_of(self._model)
        return {"quant_method": QUANT_METHOD, "w_bit": self.w_bit, "a_bit": self.a_bit, "plan": self.plan,
                "calibration": self.calibration, "keep_fp": self.keep_fp, "manifest": manifest}

    def __iter__(self):
        yield from self.to_dict().items()

    def __repr__(self):
        return f"MixqConfig(w_bit={self.w_bit}, a_bit={self.a_bit}, plan={self.plan!r}, " \
               f"calibration={self.calibration!r}, keep_fp={self.keep_fp!r}, quantized={self.is_quantized})"

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def manifest_of(model: nn.Module) -> dict:
    return build_manifest(model, layers_to_save(model))


class MixqQuantizer(_diffusers_quantizer_base()):
    """The diffusers side: quantize after the float weights load, or load pre-quantized layers."""

    requires_calibration = False
    required_packages = ["mixq"]
    use_keep_in_fp32_modules = False

    def __init__(self, quantization_config: MixqConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.requested_dtype = None
        self.file_metadata: dict | None = None
        self.checkpoint_files: list[str] = []

    # --- before loading ------------------------------------------------------------------------------

    def validate_environment(self, *args, **kwargs):
        config = self.quantization_config
        if self.pre_quantized and config.manifest is None:
            raise CheckpointError("this model's config.json names the mixq quantization method but holds no manifest: "
                                  "it was not saved by mixq; save the quantized model again")
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and any(str(d) in ("disk", "cpu_offload") for d in device_map.values()):
            raise ConfigError("mixq layers cannot be offloaded to disk: pass device_map=None or a map to devices")

    def update_torch_dtype(self, torch_dtype):
        # diffusers would cast every floating tensor of the file to torch_dtype as it loads, the fp32 scales
        # of the quantized layers too; load them as stored and cast the model after (QuantizedLayer keeps
        # its scales fp32 through .to()).
        self.requested_dtype = torch_dtype
        return None

    def maybe_update_loaded_keys(self, loaded_keys, checkpoint_files):
        self.checkpoint_files = [str(f) for f in checkpoint_files or []]
        if self.pre_quantized and self.checkpoint_files:
            self.file_metadata = read_file_metadata(self.checkpoint_files[0])
        return loaded_keys

    def preprocess_model(self, model, **kwargs):
        # Not diffusers' own: it sets model.is_quantized, after which ModelMixin.to() refuses any dtype,
        # while a mixq model casts like a float one (its scales stay float32: QuantizedLayer._apply).
        model.quantization_method = self.quantization_config.quant_method
        return self._process_model_before_weight_loading(model, **kwargs)

    def _process_model_before_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            return model
        manifest = checked_config_manifest(self.quantization_config.manifest, self.file_metadata,
                                           self.checkpoint_files[0] if self.checkpoint_files else "the weights file")
        check_architecture(manifest["model"], model)
        targets = layers_to_replace(manifest["layers"], model)
        for name, float_layer in targets.items():
            entry = manifest["layers"][name]
            set_submodule(model, name, empty_quantized_layer(entry, float_layer.weight.dtype, device="meta"))
        self.manifest = manifest
        return model

    # --- while loading: a quantized layer's buffers, exactly as stored -------------------------------------

    def check_if_quantized_param(self, model, param_value, param_name, state_dict, **kwargs) -> bool:
        module_name, _, _ = param_name.rpartition(".")
        return self.pre_quantized and isinstance(model.get_submodule(module_name), QuantizedLayer)

    def check_quantized_param_shape(self, param_name, current_param, loaded_param):
        if current_param.shape != loaded_param.shape:
            raise CheckpointError(f"tensor {param_name!r} is {list(loaded_param.shape)} in the weights file, the layer "
                                  f"its manifest describes needs {list(current_param.shape)}: the folder is damaged "
                                  "or mixed from two saves; save the model again")
        return True

    def create_quantized_param(self, model, param_value, param_name, target_device, *args, **kwargs):
        module_name, _, key = param_name.rpartition(".")
        module = model.get_submodule(module_name)
        expected = module._buffers.get(key)
        if expected is None:
            raise CheckpointError(f"the weights file holds {param_name!r}, which the manifest's layer does not have")
        if param_value.shape != expected.shape or param_value.is_floating_point() != expected.is_floating_point():
            raise CheckpointError(f"tensor {param_name!r} is {param_value.dtype} {list(param_value.shape)}, the layer "
                                  f"needs {expected.dtype} {list(expected.shape)}: save the model again")
        if not param_value.is_floating_point() and param_value.dtype != expected.dtype:
            raise CheckpointError(f"tensor {param_name!r} is {param_value.dtype}, the layer stores {expected.dtype}: "
                                  "save the model again")
        if param_value.is_floating_point() and not torch.isfinite(param_value).all():
            raise CheckpointError(f"tensor {param_name!r} holds NaN or Inf values: the weights file is damaged")
        module._buffers[key] = param_value.to(device=target_device, dtype=expected.dtype)

    # --- after loading -------------------------------------------------------------------------------

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            verify_loaded_model(model, self.manifest, self.file_metadata)
            for layer in model.modules():
                if isinstance(layer, QuantizedLayer):
                    layer.refresh_input_key()
                    dispatch.prepare_layer(layer)
            model.mixq_info = {**self.manifest["mixq_info"], "checkpoint": self.checkpoint_files[0]}
            bind(self.quantization_config, model, manifest=self.manifest)
        else:
            config = self.quantization_config
            model.hf_quantizer = self  # quantize_unet binds this config to the model (attach_quantizer)
            quantize_unet(model, config.w_bit, config.a_bit, calibration=config.calibration, plan=config.plan,
                          keep_fp=config.keep_fp)  # attaches this quantizer's config (attach_quantizer)
        if self.requested_dtype is not None:
            model.to(self.requested_dtype)
        return model

    # --- saving --------------------------------------------------------------------------------------

    def get_state_dict_and_metadata(self, state_dict, safe_serialization=False):
        if not safe_serialization:
            raise CheckpointError("mixq saves safetensors only: call save_pretrained(..., safe_serialization=True) "
                                  "(the default)")
        model = self.quantization_config._model
        manifest = manifest_of(model) if model is not None else self.quantization_config.manifest
        metadata = tensor_file_metadata(manifest)
        metadata[STATE_HASH_KEY] = state_sha256(state_dict)
        return state_dict, metadata

    @property
    def is_serializable(self):
        return True

    @property
    def is_trainable(self):
        return False

    @property
    def is_compileable(self) -> bool:
        return True


# --- the pieces, as functions --------------------------------------------------------------------------


def attach_quantizer(unet: nn.Module, settings: dict):
    """Make a UNet that mixq just quantized save and reload the diffusers way (save_pretrained /
    from_pretrained / push_to_hub): its config gets a MixqConfig, and it gets the quantizer diffusers
    looks for at save time. Models that are not diffusers ModelMixins are left alone."""
    if not hasattr(unet, "register_to_config"):
        return
    plan = settings.get("plan")
    existing = getattr(getattr(unet, "hf_quantizer", None), "quantization_config", None)
    config = existing if isinstance(existing, MixqConfig) else MixqConfig(
        w_bit=settings.get("w_bit", 8), a_bit=settings.get("a_bit", 8),
        plan=plan if isinstance(plan, (str, Path)) else None, calibration=None, keep_fp=settings.get("keep_fp"))
    bind(config, unet)


def bind(config: MixqConfig, model: nn.Module, manifest: dict | None = None):
    config._model = model
    if manifest is not None:
        config.manifest = manifest
    model.register_to_config(quantization_config=config)
    model.hf_quantizer = getattr(model, "hf_quantizer", None) or MixqQuantizer(config, pre_quantized=True)
    model.hf_quantizer.quantization_config = config
    model.quantization_method = config.quant_method


def checked_config_manifest(manifest: dict, metadata: dict | None, weights_file: str) -> dict:
    """The manifest of a saved folder, checked as load_quantized checks its manifest file: format version,
    fields, and (from the weights file's metadata) that config.json was not edited after saving."""
    where = "config.json (quantization_config.manifest)"
    check_format_version(manifest)
    check_stored_fields(manifest, where, fields=CONFIG_MANIFEST_FIELDS)
    if not metadata or MANIFEST_HASH_KEY not in metadata or STATE_HASH_KEY not in metadata:
        raise CheckpointError(f"{weights_file} has no mixq metadata: it was not written by a mixq save_pretrained, or "
                              "comes from another save; save the quantized model again")
    if metadata[MANIFEST_HASH_KEY] != manifest_hash(manifest) or \
            metadata.get(TENSOR_FILE_FORMAT_KEY) != str(manifest["format_version"]):
        raise CheckpointError(f"{where} was edited after saving, or the weights file comes from another save (its "
                              f"metadata records another manifest): restore the original or save the model again")
    upgraded = upgrade_manifest(manifest)
    check_manifest_fields(upgraded, where, fields=CONFIG_MANIFEST_FIELDS)
    check_layers_match_tensor_file(upgraded, metadata, Path(where), Path(weights_file))
    return upgraded


def verify_loaded_model(model: nn.Module, manifest: dict, metadata: dict):
    """After diffusers filled the model: the base model is the one quantized (the same base hash as
    load_quantized checks) and every tensor is the one saved."""
    check_base_hash(manifest["model"]["base_hash"], base_state(model, manifest["layers"]))
    if state_sha256(model.state_dict()) != metadata[STATE_HASH_KEY]:
        raise CheckpointError("the weights file's tensors do not match the sha256 recorded when it was saved: it is "
                              "damaged or altered; save or download the model again")


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over (key, dtype, shape, bytes) of every tensor, floats as float32 (so a model loaded into a
    wider dtype hashes as saved; half-precision values are exact in float32)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach()
        if tensor.is_floating_point():
            tensor = tensor.float()
        flat = tensor.contiguous().cpu().reshape(-1)
        digest.update(f"{key}:{list(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def read_file_metadata(path: str) -> dict:
    if not str(path).endswith(".safetensors"):
        raise CheckpointError(f"{path} is not a safetensors file: mixq models are saved and loaded as safetensors")
    return tensor_file_metadata_of(Path(path))


# --- registration ---------------------------------------------------------------------------------------


def register():
    """Add mixq to diffusers' quantization backends (idempotent). Raises if diffusers moved the mappings,
    so that a diffusers release that changes them fails loudly (tests/test_diffusers_backend.py)."""
    from diffusers.quantizers import auto

    for mapping, value in ((auto.AUTO_QUANTIZER_MAPPING, MixqQuantizer),
                           (auto.AUTO_QUANTIZATION_CONFIG_MAPPING, MixqConfig)):
        if not isinstance(mapping, dict):
            raise RuntimeError("diffusers.quantizers.auto no longer holds its backends in dicts: this diffusers "
                               "release is not supported by this mixq version")
        mapping[QUANT_METHOD] = value

