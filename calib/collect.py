"""Collection: activation ranges over the calibration prompts, and the reference data the
sensitivity pass compares against (float images and the UNet's inputs/outputs at every step for
the sensitivity prompts).

Memory stays bounded: ranges are running EMA statistics, and only the sensitivity prompts'
UNet calls (a handful of prompts x steps) are kept.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mixq.calib.pipeline import encode_prompts, generate, repeat_batch
from mixq.io import atomic_path, storage_errors

REFERENCE_FILENAME = "reference.safetensors"


# --- capturing UNet calls ---------------------------------------------------------------------


@contextmanager
def capturing_unet_calls(unet, to_cpu: bool = True):
    """Records (args, kwargs, float32 output) of every UNet call; tensors moved to the CPU unless
    to_cpu=False (benchmarks replay the calls on the device)."""
    calls, pending = [], []
    keep = _to_cpu if to_cpu else (lambda value: value)

    def before(module, args, kwargs):
        pending.append((keep(args), keep(dict(kwargs))))

    def after(module, args, kwargs, output):
        inputs, kw = pending.pop()
        calls.append((inputs, kw, keep(unet_sample(output).detach().float())))

    handles = [unet.register_forward_pre_hook(before, with_kwargs=True),
               unet.register_forward_hook(after, with_kwargs=True)]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def unet_sample(output) -> torch.Tensor:
    """The predicted sample of a UNet call, whether it returned a tuple or an output object."""
    return output[0] if isinstance(output, (tuple, list)) else output.sample


@torch.no_grad()
def run_unet(unet, call) -> torch.Tensor:
    """Replay a recorded (args, kwargs[, output]) UNet call; returns the predicted sample."""
    args, kwargs = call[0], call[1]
    return unet_sample(unet(*args, **{**kwargs, "return_dict": False}))


def call_sample(call) -> torch.Tensor:
    """The latents a recorded UNet call ran on ([batch, channels, height, width])."""
    args, kwargs = call[0], call[1]
    return args[0] if args else kwargs["sample"]


def repeated_call(call, copies: int):
    """(args, kwargs) of a recorded UNet call whose batch holds `copies` copies of the recorded batch, one
    after another: every input with the batch as its first dimension repeated (a scalar timestep stays)."""
    if copies == 1:
        return tuple(call[0]), dict(call[1])
    batch = call_sample(call).shape[0]

    def repeat(value):
        if isinstance(value, torch.Tensor):
            return repeat_batch(value, copies) if value.dim() > 0 and value.shape[0] == batch else value
        if isinstance(value, dict):
            return {k: repeat(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return type(value)(repeat(v) for v in value)
        return value

    return repeat(tuple(call[0])), repeat(dict(call[1]))


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _encode(value, key: str, tensors: dict):
    """Nested call arguments -> a JSON-able structure whose tensors live in `tensors`."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.contiguous().clone()  # UNet calls share tensors; safetensors refuses shared storage
        return {"tensor": key}
    if isinstance(value, dict):
        return {"dict": {k: _encode(v, f"{key}.{k}", tensors) for k, v in value.items()}}
    if isinstance(value, (tuple, list)):
        return {"list": [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"cannot record a UNet argument of type {type(value).__name__} ({key})")


def _decode(node, tensors):
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "dict" in node:
        return {k: _decode(v, tensors) for k, v in node["dict"].items()}
    if "list" in node:
        return [_decode(v, tensors) for v in node["list"]]
    return node["value"]


def to_device(value, device, dtype):
    """Tensors of a nested structure moved to `device`; floating tensors (not scalars) cast to `dtype`."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype if value.is_floating_point() and value.dim() > 0 else value.dtype)
    if isinstance(value, dict):
        return {k: to_device(v, device, dtype) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device, dtype) for v in value)
    return value


# --- the reference data -------------------------------------------------------------------------


@dataclass
class Reference:
    """Float-pipeline results for the sensitivity prompts."""

    prompts: list[str]
    conditioning: dict  # pipeline kwargs with the cached text embeddings
    images: torch.Tensor  # [P, 3, H, W] in [0, 1], float32
    unet_calls: list  # (args, kwargs, float output) per UNet call

    def calls_on(self, device, dtype):
        for args, kwargs, output in self.unet_calls:
            yield to_device(args, device, dtype), to_device(kwargs, device, dtype), output

    def save(self, path):
        tensors = {"images": self.images.contiguous()}
        structure = {
            "prompts": self.prompts,
            "conditioning": _encode(_to_cpu(self.conditioning), "conditioning", tensors),
            "calls": [
                {"args": _encode(list(args), f"call{i}.args", tensors),
                 "kwargs": _encode(kwargs, f"call{i}.kwargs", tensors),
                 "output": _encode(out, f"call{i}.output", tensors)}
                for i, (args, kwargs, out) in enumerate(self.unet_calls)
            ],
        }
        with atomic_path(path) as tmp, storage_errors(path):
            save_file(tensors, str(tmp), metadata={"structure": json.dumps(structure)})

    @classmethod
    def load(cls, path) -> "Reference":
        with safe_open(str(path), framework="pt") as f:
            structure = json.loads(f.metadata()["structure"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        calls = [(_decode(c["args"], tensors), _decode(c["kwargs"], tensors), _decode(c["output"], tensors))
                 for c in structure["calls"]]
        return cls(prompts=structure["prompts"], conditioning=_decode(structure["conditioning"], tensors),
                   images=tensors["images"], unet_calls=calls)


def collect_reference(pipe, prompts: list[str], seed: int, pipeline_kwargs: dict, batch_size: int) -> Reference:
    """Generate the float images for `prompts` with fixed seeds, recording every UNet call."""
    conditioning = encode_prompts(pipe, prompts, pipeline_kwargs.get("guidance_scale", 0.0))
    with capturing_unet_calls(pipe.unet) as calls:
        images = generate(pipe, conditioning, seed, pipeline_kwargs, batch_size=batch_size)
    return Reference(prompts=list(prompts), conditioning=conditioning, images=images, unet_calls=list(calls))
