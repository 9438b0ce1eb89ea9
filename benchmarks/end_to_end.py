"""End to end: the whole text-to-image pipeline, per stage, for float and quantized components.

    python -m benchmarks.end_to_end --model-configs PATH/sdxl-base-1.0 --unet-config PATH/sdxl-turbo/unet \
        --tokenizer PATH/clip-tokenizer --out benchmarks/results [--device cuda]

A full-size SDXL pipeline with random weights (seeded) from the real configs: both text encoders, the
UNet, the VAE. A user waits for the image, not for a UNet call, so every configuration generates one
image and is timed per stage: prompt encoding (tokenizers and text encoders), the UNet calls, the VAE
decode, post-processing to PIL, and the rest (scheduler, latents). Two workloads: SDXL-Turbo (512x512,
1 step, guidance 0) and LCM-LoRA SDXL (--lcm-size, 4 steps with LCMScheduler, guidance 1; the fused
LoRA leaves SDXL's architecture, hence its speed, unchanged, so the same pipeline serves both).

Configurations, side by side in one process: fp32, the half-precision pipeline ("half": bf16 on CPU,
fp16 on CUDA), then mixq on the half-precision pipeline: the UNet at
W8A8 or at the offline default's 4-bit plan proportions (benchmarks.plans.mixed_4bit_plan), alone, with
the VAE decoder W8A8, and with the VAE decoder and both text encoders W8A8. The UNet's and the VAE's
weights are channels-last in every configuration (--no-channels-last: NCHW), the layout in which CPU
convolutions, float and quantized, run fastest. Activation ranges come
from one observed half-precision generation at the Turbo size (random weights: speed, not image quality). Each
UNet setting is quantized once with every component; each configuration's layers (float where it leaves
a component float) are swapped into the one pipeline before each of its generations.

Per workload, the half-precision and quantized configurations generate in turn, round by round (one
warm-up generation each first), so that the machine's drift over the minutes of a run falls on all of
them alike; fp32 runs on its own before the cast. The median of --rounds generations (its stages sum to
its total), the machine's load average beside them (CPU); results go to OUT/<device>-pipeline-<date>.json
and .md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from benchmarks.cpu_unet import rss_bytes
from benchmarks.environment import environment
from mixq.machine import cpu_features

PROMPT = "a photo of a cat sitting on a windowsill"
STAGES = ("text encoders", "UNet", "VAE decode", "post-processing", "other")
EVERY = ("unet", "vae", "text_encoder", "text_encoder_2")
# (configuration suffix, the components quantized besides the UNet)
COMPONENT_SETS = (("", ()), (" + VAE W8A8", ("vae",)),
                  (" + VAE + text encoders W8A8", ("vae", "text_encoder", "text_encoder_2")))
# --unet-settings: configuration label and quantize() arguments (None: the 4-bit plan's layers)
UNET_SETTINGS = {"w8a8": ("mixq W8A8 UNet", {"w_bit": 8, "a_bit": 8}), "plan": ("mixq 4-bit plan UNet", None)}
LCM_CONFIGURATIONS = ("mixq W8A8 UNet", "mixq W8A8 UNet + VAE W8A8", "mixq 4-bit plan UNet + VAE W8A8")


# --- the pipeline --------------------------------------------------------------------------------


def build_pipeline(model_configs: Path, unet_config: Path, tokenizer: Path | None, device: str = "cpu"):
    """A full-size StableDiffusionXLPipeline in fp32 on `device` with random weights from the real configs."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from benchmarks.models import component_configs
    from mixq.offline import (SDXL_UNET_STRUCTURE, default_scheduler, load_tokenizer, load_unet_config,
                              unet_from_config)

    te_config, te2_config, vae_config = component_configs(model_configs)
    with torch.device(device):  # random init on the device itself: minutes faster on a GPU
        config = dict(SDXL_UNET_STRUCTURE) if unet_config is None else load_unet_config(unet_config)
        unet = unet_from_config(config, seed=0, dtype=torch.float32, device=device)
        torch.manual_seed(1)
        text_encoder, text_encoder_2 = CLIPTextModel(te_config), CLIPTextModelWithProjection(te2_config)
        vae = AutoencoderKL.from_config({**vae_config, "force_upcast": False})  # served SDXL VAEs are fp16-safe
    tok = load_tokenizer(tokenizer)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tok,
                                     tokenizer_2=tok, unet=unet, scheduler=default_scheduler(),
                                     force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=torch.float32)  # the configs' torch_dtype made some modules fp16


def benchmark_pipeline(model_configs, unet_config, tokenizer, device: str = "cpu", tiny: bool = False,
                       channels_last: bool = True):
    """The benchmarks' fp32 pipeline: the full-size one built from the configs (`tiny`: the tiny offline
    one), its UNet and VAE channels-last unless told otherwise (the layout CPU convolutions, float and
    mixq's, run fastest in; a later cast keeps it)."""
    if tiny:
        from mixq.offline import tiny_sdxl_pipeline

        pipe = tiny_sdxl_pipeline(seed=0, device=device)
        pipe.set_progress_bar_config(disable=True)
    else:
        pipe = build_pipeline(model_configs, unet_config, tokenizer, device)
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    return pipe


def one_generation_ranges(pipe, components, size: int):
    """Activation ranges of `components` from one SDXL-Turbo generation of PROMPT (random weights: the
    quantized configurations' speed, not their image quality)."""
    import mixq

    return mixq.calibrate_ranges(pipe, [PROMPT], components=components, progress=False, batch_size=1,
                                 num_inference_steps=1, guidance_scale=0.0, height=size, width=size)


def workloads(turbo_size: int, lcm_size: int) -> dict:
    return {
        "SDXL-Turbo": {"size": turbo_size, "num_inference_steps": 1, "guidance_scale": 0.0, "scheduler": None},
        "LCM-LoRA SDXL": {"size": lcm_size, "num_inference_steps": 4, "guidance_scale": 1.0,
                          "scheduler": "LCMScheduler"},
    }


@contextmanager
def workload_scheduler(pipe, name: str | None):
    if name is None:
        yield
        return
    import diffusers

    before = pipe.scheduler
    pipe.scheduler = getattr(diffusers, name).from_config(before.config)
    try:
        yield
    finally:
        pipe.scheduler = before


# --- per-stage timing ----------------------------------------------------------------------------


class StageClock:
    """Seconds spent in each stage of one generation: wraps encode_prompt, vae.decode and the image
    processor's postprocess, and hooks the UNet's forward (summed over its calls)."""

    def __init__(self, pipe):
        self.pipe, self.seconds = pipe, {}
        cuda = pipe.unet.device.type == "cuda"
        self.sync = torch.cuda.synchronize if cuda else (lambda: None)  # GPU work is asynchronous

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def _wrapped(self, stage, function):
        def timed(*args, **kwargs):
            start = self.now()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + self.now() - start
        return timed

    @contextmanager
    def attached(self):
        pipe, started = self.pipe, []
        originals = [(pipe, "encode_prompt"), (pipe.vae, "decode"), (pipe.image_processor, "postprocess")]
        for (owner, attr), stage in zip(originals, ("text encoders", "VAE decode", "post-processing")):
            setattr(owner, attr, self._wrapped(stage, getattr(owner, attr)))

        def before(module, args):
            started.append(self.now())

        def after(module, args, output):
            self.seconds["UNet"] = self.seconds.get("UNet", 0.0) + self.now() - started.pop()

        hooks = [pipe.unet.register_forward_pre_hook(before), pipe.unet.register_forward_hook(after)]
        try:
            yield self
        finally:
            for h in hooks:
                h.remove()
            for owner, attr in originals:
                del owner.__dict__[attr]  # the class's method again


def generate_timed(pipe, workload: dict) -> dict:
    clock = StageClock(pipe)
    with torch.no_grad(), clock.attached():
        start = clock.now()
        pipe(PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=workload["num_inference_steps"],
             guidance_scale=workload["guidance_scale"], height=workload["size"], width=workload["size"],
             output_type="pil")
        total = clock.now() - start
    stages = {s: clock.seconds.get(s, 0.0) for s in STAGES[:-1]}
    stages["other"] = total - sum(stages.values())
    return {"total": total, **stages}


def time_workload(pipe, workload: dict, rounds: int) -> dict:
    """The median of `rounds` generations (by total time; its stages add up to it) after one warm-up
    (oneDNN primitives, lazy initialisation)."""
    with workload_scheduler(pipe, workload["scheduler"]):
        generate_timed(pipe, workload)
        runs = [generate_timed(pipe, workload) for _ in range(rounds)]
    return median_row(pipe, runs)


def median_row(pipe, runs: list[dict]) -> dict:
    row = dict(sorted(runs, key=lambda r: r["total"])[len(runs) // 2])  # the median generation, its stages
    row.update(rounds=len(runs), totals=[round(r["total"], 3) for r in runs], rss_bytes=rss_bytes(),
               load_average_1min=round(os.getloadavg()[0], 2) if pipe.unet.device.type == "cpu" else None)
    return row


# --- quantized configurations ----------------------------------------------------------------------


def float_layers(pipe) -> dict:
    """Every quantizable layer of every component, by qualified name (the float modules themselves)."""
    from mixq.components import ComponentTree
    from mixq.layers import quantizable_layers

    return layers_now(pipe, quantizable_layers(ComponentTree.of(pipe, EVERY)))


def layers_now(pipe, names) -> dict:
    """The modules at `names` (qualified) in the pipeline now, float or quantized."""
    from mixq.components import ComponentTree

    tree = ComponentTree.of(pipe, EVERY)
    return {n: tree.get_submodule(n) for n in names}


def set_layers(pipe, modules: dict):
    from mixq.components import ComponentTree
    from mixq.layers import set_submodule

    tree = ComponentTree.of(pipe, EVERY)
    for name, module in modules.items():
        set_submodule(tree, name, module)


def quantized_layer_sets(pipe, label: str, quantize_kwargs: dict, calibration, floats: dict, results: dict) -> dict:
    """Quantize the UNet (and every other component) once for a UNet setting, then put the float layers
    back; returns configuration name -> the layers it runs with (quantized for the UNet and the
    components its suffix names, float elsewhere)."""
    import mixq
    from mixq.components import component_of

    start = time.perf_counter()
    mixq.quantize(pipe, components=EVERY, calibration=calibration, progress=False, **quantize_kwargs)
    results["quantize_s"][label] = round(time.perf_counter() - start, 1)
    quantized = {n: m for n, m in layers_now(pipe, floats).items() if m is not floats[n]}
    set_layers(pipe, floats)  # the float pipeline again
    for component in EVERY:
        getattr(pipe, component).__dict__.pop("mixq_info", None)
    return {f"{label}{suffix}": {n: (quantized[n] if component_of(n) in ("unet", *components) else floats[n])
                                 for n in quantized}
            for suffix, components in COMPONENT_SETS}


def time_interleaved(pipe, workload: dict, layer_sets: dict, floats: dict, rounds: int) -> dict:
    """time_workload for several configurations at once, their generations interleaved round by round
    (each configuration's layers swapped in before its generation), so that the machine's drift over the
    minutes a run takes falls on every configuration alike; one warm-up generation each first."""
    def generate_with(name):
        set_layers(pipe, {**floats, **layer_sets[name]})
        return generate_timed(pipe, workload)

    runs = {name: [] for name in layer_sets}
    with workload_scheduler(pipe, workload["scheduler"]):
        for name in layer_sets:
            generate_with(name)
        for _ in range(rounds):
            for name in layer_sets:
                runs[name].append(generate_with(name))
    set_layers(pipe, floats)
    return {name: median_row(pipe, generations) for name, generations in runs.items()}


# --- the run -------------------------------------------------------------------------------------


def run(args) -> dict:
    from benchmarks.plans import mixed_4bit_plan

    loads = workloads(args.size, args.lcm_size)
    half = torch.float16 if args.device.startswith("cuda") else torch.bfloat16
    rounds = {"SDXL-Turbo": args.rounds, "LCM-LoRA SDXL": args.lcm_rounds}
    labels = [UNET_SETTINGS[setting][0] for setting in args.unet_settings]
    quantized_names = [f"{label}{suffix}" for label in labels for suffix, _ in COMPONENT_SETS]
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.end_to_end", *sys.argv[1:]]),
        "machine": {"cpu": environment("cpu")["device"], "features": cpu_features(), "machine": platform.machine()},
        "environment": environment(args.device), "threads": torch.get_num_threads(), "half": str(half)[6:],
        "channels_last": args.channels_last,
        "workloads": {k: {key: v for key, v in w.items()} for k, w in loads.items()},
        "configurations": {
            "SDXL-Turbo": ["fp32", "half", *quantized_names],
            "LCM-LoRA SDXL": ["half", *(n for n in LCM_CONFIGURATIONS if n.startswith(tuple(labels)))],
        },
        "latency": {k: {} for k in loads}, "quantize_s": {}, "notes": [],
    }
    out = args.out

    def save():
        write(results, out)

    pipe = benchmark_pipeline(args.model_configs, args.unet_config, args.tokenizer, args.device, args.tiny,
                              args.channels_last)
    results["parameters"] = {c: sum(p.numel() for p in getattr(pipe, c).parameters()) for c in EVERY}
    turbo = loads["SDXL-Turbo"]
    if "fp32" in results["configurations"]["SDXL-Turbo"] and not args.skip_fp32:
        results["latency"]["SDXL-Turbo"]["fp32"] = row = time_workload(pipe, turbo, args.rounds)
        print(f"  SDXL-Turbo fp32: {row['total']:.2f} s", flush=True)
        save()
    pipe.to(half)  # keeps the memory format
    gc.collect()
    start = time.perf_counter()
    calibration = one_generation_ranges(pipe, EVERY, args.size)
    results["calibrate_s"] = round(time.perf_counter() - start, 1)
    floats = float_layers(pipe)
    plan = mixed_4bit_plan(pipe.unet)
    if "plan" in args.unet_settings:
        results["plan_source"] = plan["source"]
    layer_sets = {"half": {}}
    for setting in args.unet_settings:
        label, kwargs = UNET_SETTINGS[setting][0], UNET_SETTINGS[setting][1] or {"plan": plan["layers"]}
        layer_sets.update(quantized_layer_sets(pipe, label, kwargs, calibration, floats, results))
        gc.collect()
    for workload, spec in loads.items():
        names = [n for n in results["configurations"][workload] if n in layer_sets]
        rows = time_interleaved(pipe, spec, {n: layer_sets[n] for n in names}, floats, rounds[workload])
        for name in names:
            results["latency"][workload][name] = row = rows[name]
            print(f"  {workload} {name}: {row['total']:.2f} s (UNet {row['UNet']:.2f}, VAE {row['VAE decode']:.2f}, "
                  f"text {row['text encoders']:.2f})", flush=True)
        save()
    return results


# --- the report ----------------------------------------------------------------------------------


def write(results: dict, out: Path) -> Path:
    """Written after every configuration, so that an interrupted run keeps what it measured."""
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if results["environment"]["device_slug"] in (None, "cpu") else results["environment"]["device_slug"]
    stem = out / f"{device}-pipeline-{results['date'][:10]}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
    stem.with_suffix(".md").write_text(report(results))
    return stem.with_suffix(".md")


def report(results: dict) -> str:
    machine = results["machine"]
    features = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in machine["features"].items())
    lines = [f"# The whole SDXL pipeline, per stage, {results['date']}", "",
             f"- Command: `{results['command']}`",
             f"- Machine: {machine['cpu']} ({machine['machine']}); {features}"
             + ("" if results["environment"]["device_slug"] in (None, "cpu")
                else f"; device {results['environment']['device']}"),
             f"- \"half\" is {results['half']}: the float baseline, and the dtype of every layer mixq leaves float; "
             f"UNet and VAE {'channels-last' if results.get('channels_last') else 'NCHW'} in every configuration",
             f"- Versions: {', '.join(f'{k} {v}' for k, v in results['environment']['versions'].items() if v)}",
             f"- Parameters: {', '.join(f'{k} {v / 1e6:.0f} M' for k, v in results.get('parameters', {}).items())}",
             f"- 4-bit plan: {results.get('plan_source', 'not run')}; activation ranges from one half-precision generation "
             f"({results.get('calibrate_s', '-')} s); quantize (every component): "
             f"{', '.join(f'{k} {v} s' for k, v in results['quantize_s'].items()) or '-'}", ""]
    for workload, rows in results["latency"].items():
        spec = results["workloads"][workload]
        lines += [f"## {workload}: {spec['size']}x{spec['size']}, {spec['num_inference_steps']} step(s), guidance "
                  f"{spec['guidance_scale']}, batch 1", "",
                  f"Seconds per image (the median generation); speed-up over {results['half']} end to end and of "
                  "the UNet stage alone:", "",
                  "| configuration | " + " | ".join(STAGES) + f" | total | end to end vs {results['half']} | "
                  f"per round: median [min, max] | UNet vs {results['half']} | load |",
                  "|---|" + "---|" * (len(STAGES) + 5)]
        base = rows.get("half")
        for name, row in rows.items():
            e2e = f"{base['total'] / row['total']:.2f}x" if base else "-"
            unet = f"{base['UNet'] / row['UNet']:.2f}x" if base else "-"
            paired = "-"
            if base and name not in ("half", "fp32"):  # generated in the same rounds as the baseline
                ratios = sorted(round_ratios(base["totals"], row["totals"]))
                paired = f"{ratios[len(ratios) // 2]:.2f}x [{ratios[0]:.2f}, {ratios[-1]:.2f}]"
            label = results["half"] if name == "half" else name
            lines.append(f"| {label} | " + " | ".join(f"{row[s]:.2f}" for s in STAGES)
                         + f" | **{row['total']:.2f}** | {e2e} | {paired} | {unet} | {row['load_average_1min']} |")
        lines += ["", "Per round: the baseline's total over the configuration's in each round of interleaved "
                  "generations (a paired ratio, robust to the machine's drift between rounds).", ""]
    lines += [f"- {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


def round_ratios(base_totals: list[float], totals: list[float]) -> list[float]:
    """Speed-up over the baseline in each round: its total over the configuration's, round by round."""
    return [b / t for b, t in zip(base_totals, totals)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m benchmarks.end_to_end", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-configs", type=Path, default=None,
                        help="a diffusers SDXL folder with text_encoder/, text_encoder_2/, vae/ config.json "
                             "(default: SDXL 1.0's configs built in)")
    parser.add_argument("--unet-config", type=Path, help="the UNet's config.json (or its folder); default: SDXL-Turbo's "
                        "block structure built in (mixq.offline.SDXL_UNET_STRUCTURE)")
    parser.add_argument("--tiny", action="store_true", help="the tiny offline pipeline instead: checks the benchmark runs")
    parser.add_argument("--tokenizer", type=Path, default=None, help="a CLIP tokenizer folder (default: byte-level)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--size", type=int, default=512, help="SDXL-Turbo image size")
    parser.add_argument("--lcm-size", type=int, default=1024, help="LCM-LoRA SDXL image size")
    parser.add_argument("--rounds", type=int, default=3, help="timed SDXL-Turbo generations per configuration")
    parser.add_argument("--lcm-rounds", type=int, default=1, help="timed LCM-LoRA generations per configuration")
    parser.add_argument("--skip-fp32", action="store_true")
    parser.add_argument("--unet-settings", nargs="+", choices=list(UNET_SETTINGS), default=list(UNET_SETTINGS),
                        help="the UNet settings to quantize (default: both). The run holds every setting's quantized "
                             "layers beside the float ones: one setting needs less memory (about 12 GB instead of 16 "
                             "at full size)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                        help="keep the UNet and VAE in NCHW (default: channels-last for every configuration)")
    args = parser.parse_args(argv)
    print(f"report: {write(run(args), args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
