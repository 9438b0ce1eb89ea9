"""How time and memory are measured: a CUDA-event clock, weight bytes, peak allocated memory."""

from __future__ import annotations

import time

import torch
import torch.nn as nn


class CudaEventClock:
    """A clock on the GPU's timeline, for pytest-benchmark's `timer`.

    Each reading records an event on the current stream and waits for it, then returns the
    elapsed time since the first event, in seconds. pytest-benchmark reads the clock before and
    after each round, so a round's duration is the GPU time between two events that enclose the
    work, as CUDA-event timing measures it (launch gaps included, host-side queueing excluded).
    """

    def __init__(self):
        self.origin = self._record()

    @staticmethod
    def _record() -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        event.synchronize()
        return event

    def __call__(self) -> float:
        return self.origin.elapsed_time(self._record()) / 1e3

    def __repr__(self):
        return "CudaEventClock()"


def benchmark_timer(is_cuda: bool):
    return CudaEventClock() if is_cuda else time.perf_counter


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Storage bytes of a tensor; tensor subclasses (torchao's quantized weights) count their inner tensors."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def module_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of `module` (each tensor counted once), and of the weight
    layouts quantized layers hold in place of buffers."""
    from mixq.modules import QuantizedLayer

    seen = set()
    total = sum(m.held_layout_bytes() for m in module.modules() if isinstance(m, QuantizedLayer))
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor_bytes(tensor)
    return total


def component_bytes(pipe) -> dict[str, int]:
    """Static weight bytes of the pipeline's UNet, text encoders (together) and VAE."""
    components = pipe.components
    encoders = [components.get(name) for name in ("text_encoder", "text_encoder_2")]
    return {
        "unet": module_bytes(components["unet"]),
        "text_encoders": sum(module_bytes(m) for m in encoders if isinstance(m, nn.Module)),
        "vae": module_bytes(components["vae"]),
    }


def peak_bytes_above_resident(fn, device) -> int | None:
    """Peak allocated CUDA memory during fn() minus what was allocated before it (activations and
    workspace); None off CUDA, where torch keeps no allocator statistics."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
