"""Reusing the float model's work upstream of the layer under test (the sensitivity pass).

A sensitivity candidate changes one layer. In a UNet call whose inputs equal a recorded call's, every
module that runs to completion before that layer starts computes exactly what the float model
computed: its output is recorded once and returned instead of being computed again. For the quality
group, whose score replays the recorded calls, that skips the share of every UNet call ahead of the
layer; for the content group, that share of each generation's first step (later steps see the
candidate's effect and run in full). Scores are bit for bit those of running everything
(tests/test_sensitivity_prefix.py): the same kernels on the same inputs give the same tensors.
Calls that score several candidates at once hold `copies` copies of a recorded call's batch
(copy-major); they get the recorded outputs repeated likewise.

Memory: the outputs of every module the UNet calls, for every recorded call. When that exceeds the
budget (2 GiB on the CPU, a quarter of the free memory on a GPU), only modules down to a smaller
nesting depth are recorded (coarser reuse); when even the UNet's direct children do not fit, nothing
is reused. For scale, in float32 with 8 prompts, one SDXL-Turbo call at 512x512 takes 0.13 GiB for
the UNet's direct children, 0.46 GiB down to its blocks and 1.24 GiB down to their resnets and
attention blocks; at 1024x1024 about four times that.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from mixq.calib.collect import repeated_call
from mixq.calib.pipeline import repeat_batch

CPU_RECORDING_BYTES = 2 << 30
GPU_FREE_MEMORY_SHARE = 0.25


def recording_budget(device: torch.device) -> int:
    """Bytes the recorded outputs may take on `device`."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_FREE_MEMORY_SHARE)
    return CPU_RECORDING_BYTES


def depth(name: str) -> int:
    """Nesting depth of a module name: 1 for a direct child of the UNet ("down_blocks"), 2 for "down_blocks.0"."""
    return name.count(".") + 1


def ancestors(name: str) -> list[str]:
    """The names of the modules that contain `name`, outermost first; "" is the UNet itself."""
    parts = name.split(".")
    return [""] + [".".join(parts[:i]) for i in range(1, len(parts))]


def parent(name: str) -> str:
    return name.rpartition(".")[0]


def replayable_output(value) -> bool:
    """Tensors and (nested) tuples/lists of them, or None: outputs a replay can hand back as copies."""
    if value is None or isinstance(value, torch.Tensor):
        return True
    return type(value) in (tuple, list) and all(replayable_output(v) for v in value)


def output_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(output_bytes(v) for v in value)
    return 0


def repeated(value, copies: int = 1):
    """A fresh copy of a recorded output (the caller may modify what it gets in place); with `copies`, for
    a batch of that many copies of the recorded batch, one after another along dim 0 (what a module
    computing row by row returns for that batch)."""
    if isinstance(value, torch.Tensor):
        return repeat_batch(value, copies) if value.dim() and copies != 1 else value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(repeated(v, copies) for v in value)
    return value


def same_value(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # no plain equality (an array, a custom object): treated as a different call
        return False


def same_call(args, kwargs, recorded_args, recorded_kwargs) -> bool:
    """Whether a UNet call has exactly a recorded call's inputs (how the output is returned aside)."""
    strip = lambda kw: {k: v for k, v in kw.items() if k != "return_dict"}  # noqa: E731
    return same_value(tuple(args), tuple(recorded_args)) and same_value(strip(kwargs), strip(recorded_kwargs))


@dataclass
class Trace:
    """One UNet call's module events: when each module started and finished, and how often it ran."""

    start: dict[str, int]
    end: dict[str, int]
    count: dict[str, int]


@contextmanager
def traced(unet, keep=None):
    """Hooks on every named module of the UNet; yields (trace, outputs). With `keep`, outputs holds a copy
    of the output of each module keep(name) accepts (the forward could still modify a returned tensor in
    place); without, each module's output size in bytes, or None where a replay could not hand it back
    (sizes only: holding every output of a full-size UNet call at once could exhaust memory)."""
    trace, outputs, clock, handles = Trace({}, {}, {}), {}, [0], []

    def tick() -> int:
        clock[0] += 1
        return clock[0]

    for name, module in unet.named_modules():
        if not name:
            continue

        def before(module, args, name=name):
            trace.count[name] = trace.count.get(name, 0) + 1
            trace.start.setdefault(name, tick())

        def after(module, args, output, name=name):
            trace.end[name] = tick()
            if keep is None:
                outputs[name] = output_bytes(output) if replayable_output(output) else None
            elif keep(name):
                outputs[name] = repeated(output)

        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield trace, outputs
    finally:
        for handle in handles:
            handle.remove()


class PrefixReuse:
    """Recorded module outputs of the float UNet for `calls` (the evaluator's recorded UNet calls), and
    the means to replay them ahead of a changed layer (`reusing`)."""

    def __init__(self, unet, calls, max_bytes: int | None = None):
        self.unet, self.calls = unet, [(args, kwargs) for args, kwargs, *_ in calls]
        self.trace, self.outputs, self.max_depth = None, [], 0
        self.recorded_bytes = 0
        self.copied_calls: dict[int, list] = {1: self.calls}  # copies -> the recorded calls with that batch
        self.scaling: dict[int, set[str]] = {}  # copies -> recorded modules whose output grows with the batch
        self.replayed = 0  # module calls answered from the recording (a count for tests and logs)
        if self.calls:
            self._record(recording_budget(unet.device) if max_bytes is None else max_bytes)

    @property
    def enabled(self) -> bool:
        return self.max_depth > 0

    def bound_to(self, unet) -> PrefixReuse:
        """This recording, replayed on `unet`, a copy of the recorded UNet (mixq.calib.workers): the
        recorded outputs are shared, read only; what is derived per batch size is the twin's own."""
        twin = copy.copy(self)
        twin.unet, twin.replayed = unet, 0
        twin.copied_calls, twin.scaling = dict(self.copied_calls), dict(self.scaling)
        return twin

    @torch.no_grad()
    def _record(self, max_bytes: int):
        with traced(self.unet) as (trace, output_sizes):
            self._run(self.calls[0])
        sizes = {name: size for name, size in output_sizes.items()  # replayable, run once per call
                 if size is not None and trace.count.get(name) == 1 and name in trace.end}
        self.max_depth = deepest_fitting(sizes, len(self.calls), max_bytes)
        if not self.enabled:
            return
        keep = {name for name in sizes if depth(name) <= self.max_depth}
        for call in self.calls:
            with traced(self.unet, keep=keep.__contains__) as (call_trace, outputs):
                self._run(call)
            if (call_trace.start, call_trace.end) != (trace.start, trace.end):
                self.max_depth, self.outputs = 0, []  # calls run different modules: no common prefix
                return
            self.outputs.append({name: outputs[name] for name in keep})
        self.trace = trace
        self.recorded_bytes = sum(output_bytes(o) for per_call in self.outputs for o in per_call.values())

    def _run(self, call):
        args, kwargs = call
        self.unet(*args, **{**kwargs, "return_dict": False})

    def units_before(self, layer: str) -> list[str]:
        """The largest recorded modules that finish before `layer` starts: children of its ancestors
        (the UNet included) whose whole run precedes it."""
        if not self.enabled or layer not in self.trace.start:
            return []
        begins, enclosing = self.trace.start[layer], set(ancestors(layer))
        recorded = self.outputs[0]
        return [name for name in recorded
                if parent(name) in enclosing and name != layer and self.trace.end[name] < begins]

    def matching_call(self, args, kwargs, copies: int = 1) -> int | None:
        for index, (recorded_args, recorded_kwargs) in enumerate(self.calls_with_copies(copies)):
            if same_call(args, kwargs, recorded_args, recorded_kwargs):
                return index
        return None

    def calls_with_copies(self, copies: int) -> list:
        """The recorded calls with `copies` copies of each one's batch (mixq.calib.collect.repeated_call)."""
        if copies not in self.copied_calls:
            self.copied_calls[copies] = [repeated_call(call, copies) for call in self.calls]
        return self.copied_calls[copies]

    @torch.no_grad()
    def units_scaling_with(self, copies: int) -> set[str]:
        """Recorded modules whose output, for a call with `copies` copies of the batch, is `copies` times
        the recorded one (checked once by running such a call): only those are replayed as repeats."""
        if copies not in self.scaling:
            with traced(self.unet) as (_, sizes):
                self._run(self.calls_with_copies(copies)[0])
            self.scaling[copies] = {name for name, output in self.outputs[0].items()
                                    if sizes.get(name) == copies * output_bytes(output)}
        return self.scaling[copies]

    @contextmanager
    def reusing(self, layer: str, copies: int = 1):
        """While inside, UNet calls with a recorded call's inputs (`copies` copies of its batch) take the
        outputs of the modules ahead of `layer` from the recording; other calls run as usual. `layer`
        may be replaced meanwhile."""
        units = self.units_before(layer)
        if units and copies != 1:
            units = [name for name in units if name in self.units_scaling_with(copies)]
        if not units:
            yield self
            return
        active: list[int | None] = [None]

        def on_call(module, args, kwargs):
            active[0] = self.matching_call(args, kwargs, copies)

        def on_return(module, args, kwargs, output):
            active[0] = None

        def replay(name, original):
            def forward(*args, **kwargs):
                if active[0] is None:
                    return original(*args, **kwargs)
                self.replayed += 1
                return repeated(self.outputs[active[0]][name], copies)
            return forward

        modules = {name: self.unet.get_submodule(name) for name in units}
        own_forward = {name: module.__dict__.get("forward") for name, module in modules.items()}
        handles = [self.unet.register_forward_pre_hook(on_call, with_kwargs=True),
                   self.unet.register_forward_hook(on_return, with_kwargs=True)]
        try:
            for name, module in modules.items():
                module.forward = replay(name, module.forward)
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for name, module in modules.items():
                if own_forward[name] is None:
                    del module.forward
                else:
                    module.forward = own_forward[name]


def deepest_fitting(sizes: dict[str, int], calls: int, max_bytes: int) -> int:
    """The largest nesting depth whose modules' outputs, for every call, fit in `max_bytes` (0: none)."""
    best = 0
    for d in range(1, max((depth(n) for n in sizes), default=0) + 1):
        if calls * sum(size for name, size in sizes.items() if depth(name) <= d) > max_bytes:
            break
        best = d
    return best
