"""The variants the suite compares, each built once per process and kept.

  fp       the floating-point UNet (fp16 on CUDA, fp32 on CPU): the baseline
  w8a8     mixq, every layer W8A8 (conv_in/conv_out kept in floating point, mixq's default)
  w4a8     mixq, every layer W4A8
  plan     mixq with a mixed-precision plan (benchmarks/plans.py, or --plan PATH)
  torchao  torchao Int8DynamicActivationInt8WeightConfig + torch.compile (Linear layers only),
           where torchao is importable

Every variant is a pipeline sharing the reference pipeline's text encoders, VAE, tokenizers and
scheduler, with its own UNet. The reference pipeline itself is never modified: it is the source
of every UNet copy, the calibration run and the fidelity reference. The mixq variants share one
activation-range calibration (the built-in prompts, or the proving grammar's calibration split; the
suite's generation settings).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

import torch

from benchmarks.config import BenchConfig
from benchmarks.measure import component_bytes, peak_bytes_above_resident, synchronize
from benchmarks.models import BENCH_PROMPT, BENCH_SEED, capture_unet_calls, float_pipeline, generator, with_unet
from mixq.calib.collect import run_unet
from benchmarks.modes import capture_in_cuda_graph, compile_module
from benchmarks.plans import benchmark_plan

VARIANTS = ("fp", "w8a8", "w4a8", "plan", "torchao")
UNIFORM_BITS = {"w8a8": (8, 8), "w4a8": (4, 8)}


class VariantUnavailable(Exception):
    """This variant cannot be built here (the reason is the message); the suites skip it."""


@dataclass
class Variant:
    name: str
    label: str  # for tables: "fp16", "mixq W8A8", ...
    description: str
    pipe: object
    memory: dict = field(default_factory=dict)

    @property
    def unet(self):
        return self.pipe.unet


def torchao_unavailable_reason() -> str | None:
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_  # noqa: F401
    except ImportError as err:
        return f"torchao is not importable ({err}); install a torchao release matching this torch to compare"
    return None


def generate(pipe, cfg: BenchConfig, prompt=BENCH_PROMPT, seed=BENCH_SEED, output_type="pt"):
    """One image, as the pipeline suite times it: text encoders, UNet steps, VAE decode."""
    with torch.no_grad():
        return pipe(prompt, generator=generator(seed), output_type=output_type, **cfg.generation_kwargs()).images


class VariantSet:
    """Builds each variant on first request and keeps it; variants apply cfg.mode to their UNet."""

    def __init__(self, cfg: BenchConfig, measure_memory: bool = True):
        self.cfg = cfg
        self.measure_memory = measure_memory
        self.reference = float_pipeline(cfg)
        self._calibration = None
        self._unet_call = None
        self._built: dict[str, Variant] = {}
        self._unavailable: dict[str, str] = {}

    @property
    def unet_call(self):
        """The inputs of the first UNet step for the benchmark prompt and seed."""
        if self._unet_call is None:
            self._unet_call = capture_unet_calls(self.reference, BENCH_PROMPT, BENCH_SEED, self.cfg.generation_kwargs())[0]
        return self._unet_call

    @property
    def calibration(self):
        if self._calibration is None:
            import mixq

            self._calibration = mixq.calibrate_ranges(
                self.reference, self.cfg.calibration_source, self.cfg.calibration_prompts, progress=False,
                **self.cfg.generation_kwargs()
            )
        return self._calibration

    def get(self, name: str) -> Variant:
        if name in self._unavailable:
            raise VariantUnavailable(self._unavailable[name])
        if name not in self._built:
            try:
                self._built[name] = self._build(name)
            except VariantUnavailable as err:
                self._unavailable[name] = str(err)
                raise
        return self._built[name]

    # --- building -------------------------------------------------------------------------------

    def _build(self, name: str) -> Variant:
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}: choose from {VARIANTS}")
        unet = copy.deepcopy(self.reference.unet)
        compiled = False
        if name == "fp":
            variant = Variant(name, self.cfg.fp_label, f"{self.cfg.fp_label}, every layer", with_unet(self.reference, unet))
        elif name == "torchao":
            variant = self._torchao_variant(unet)
            compiled = True
        else:
            variant = self._mixq_variant(name, unet)
        if self.cfg.mode == "compile" and not compiled:
            compile_module(variant.unet)
            compiled = True
        if compiled or self.cfg.is_cuda:
            run_unet(variant.unet, self.unet_call)  # compile, autotune and allocate before measuring memory
        # Measured before any CUDA graph is captured: a graph's private pool would hide its activations.
        variant.memory = self._memory(variant) if self.measure_memory else {}
        if self.cfg.mode == "cuda-graph":
            capture_in_cuda_graph(variant.unet)  # captured on its first call, replayed after
        return variant

    def _mixq_variant(self, name: str, unet) -> Variant:
        import mixq

        pipe = with_unet(self.reference, unet)
        if name == "plan":
            plan, source = benchmark_plan(unet, self.cfg.plan)
            mixq.quantize(pipe, plan=plan, calibration=self.calibration, progress=False)
            label, description = "mixq plan", f"mixed plan ({source}); {average_bits(pipe)}"
        else:
            w_bits, a_bits = UNIFORM_BITS[name]
            mixq.quantize(pipe, w_bits, a_bits, calibration=self.calibration, progress=False)
            label, description = f"mixq W{w_bits}A{a_bits}", f"every layer but conv_in/conv_out; {average_bits(pipe)}"
        return Variant(name, label, description, pipe)

    def _torchao_variant(self, unet) -> Variant:
        reason = torchao_unavailable_reason()
        if reason:
            raise VariantUnavailable(reason)
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantize_(unet, Int8DynamicActivationInt8WeightConfig())
        # torchao's int8 path is only fast compiled (eager runs the dynamic quantization op by op),
        # so it is always compiled, whatever the mode; a CUDA graph is captured around it in that mode.
        compile_module(unet)
        return Variant("torchao", "torchao int8-dyn", "torchao Int8DynamicActivationInt8WeightConfig "
                       "(per-token dynamic int8 activations, int8 weights, Linear only) + torch.compile",
                       with_unet(self.reference, unet))

    def _memory(self, variant: Variant) -> dict:
        device = self.cfg.device
        static = component_bytes(variant.pipe)
        step_extra = peak_bytes_above_resident(lambda: run_unet(variant.unet, self.unet_call), device)
        generation_extra = peak_bytes_above_resident(lambda: generate(variant.pipe, self.cfg), device)
        synchronize(device)
        return {
            **{f"{component}_bytes": size for component, size in static.items()},
            # What a process holding only this variant would peak at: its weights plus the
            # activations and workspace allocated during the call.
            "peak_step_bytes": None if step_extra is None else static["unet"] + step_extra,
            "peak_generation_bytes": None if generation_extra is None else sum(static.values()) + generation_extra,
        }


def average_bits(pipe) -> str:
    """The parameter-weighted average weight bits over all Linear/Conv2d layers (float ones count 16)."""
    import mixq

    rows = mixq.summary(pipe)
    params = sum(r["params"] for r in rows)
    w_avg = sum(r["params"] * r["w_bits"] for r in rows) / max(params, 1)
    return f"{w_avg:.2f} weight bits on average (parameter-weighted, layers left in float count 16)"


def with_eager_mode(cfg: BenchConfig) -> BenchConfig:
    return replace(cfg, mode="eager")
