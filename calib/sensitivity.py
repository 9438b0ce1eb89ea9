"""Metric-decoupled sensitivity: quantize one layer at a time (weights-only, then activations-only,
at each candidate bit-width) with fake-quant twins, the rest of the model in floating point.

- quality group: SQNR (dB) of the UNet output against the float output over the saved UNet calls;
- content group (attn2 / ff): SSIM of the generated image against the float image for the same
  prompt and seed.

Precision. In half precision one layer's effect drowns in rounding noise: any change to one layer
re-rounds every later operation, so on the full-size SDXL-Turbo UNet in bf16 every candidate of
every layer scores about 40 dB, W2 and W8 alike. The pass therefore runs the UNet and VAE in
float32 (text encoders too; full fp32 matmuls on CUDA too: TF32 rounds matmul inputs to fp16's 10 mantissa bits)
against a float32 reference recomputed on the same inputs, whatever the serving dtype; casting
fp16/bf16 weights to fp32 and back is exact. The noise floor of that measurement (the score of a
change exact arithmetic would not see: one layer's weights moved by one unit in the last place) is
measured and stored with the table, so readers can tell resolved scores from noise.

Batching: the saved UNet calls and the images are evaluated in batches of `calibration.batch_size`
prompts, so with sensitivity_prompts <= batch_size every candidate costs one UNet call per step. On
small models several candidates of a layer also share a call (`CandidateStack`): its batch holds one
copy of the prompts per candidate, so the per-call overhead that dominates small models counts once.
A copy computes what it would alone up to the float32 rounding of kernels whose blocking follows the
batch (tests/test_sensitivity_batching.py); on the proving ground the table is byte for byte the same.

Resuming and sharding: finished rows are written atomically after every layer (to the table, or
to this process's shard under torchrun, see mixq.calib.distributed); a rerun measures only what is
missing.
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import contextmanager, nullcontext
from itertools import chain
from pathlib import Path

import torch

from mixq.api import build_quantized_layer
from mixq.calib.collect import Reference, call_sample, repeated_call, run_unet, to_device
from mixq.calib.distributed import (World, current_world, merge_shard_rows, remove_all_shards, remove_shards,
                                    shard, shard_paths, write_shard)
from mixq.calib.pipeline import generate
from mixq.calib.prefix import PrefixReuse
from mixq.calib.workers import (WORKERS_VARIABLE, model_bytes, one_by_one, parallelism_text, side_by_side,
                                sums_depend_on_threads, worker_count)
from mixq.calibration import Calibration
from mixq.errors import CalibrationFileError
from mixq.io import TableText, read_yaml, write_text_atomic
from mixq.layers import LayerInfo, set_submodule
from mixq.metrics import batch_ssim, sqnr_db
from mixq.quantizers import ACTIVATION_BITS, FLOAT_BITS, WEIGHT_BITS

SQNR_CAP_DB = 200.0  # a layer whose quantization changes nothing would score +inf
METRICS = {"quality": "sqnr_db", "content": "ssim"}
MEASUREMENT_DTYPE = torch.float32
NOISE_FLOOR_PROBES = 3  # layers whose one-ulp perturbation gives the floor (the worst of them)
ESTIMATE_AFTER_LAYERS = 3  # log the measured time per layer and the expected total after this many
# Candidates of a layer share a UNet call while its batch's latents hold at most this many pixels (8
# prompts of 64x64 latents: one candidate per call for SDXL at 512x512; all of them on the proving
# ground, 8 prompts of 16x16 latents: up to 16).
CANDIDATE_BATCH_LATENT_PIXELS = 1 << 15


@contextmanager
def swapped_layers(unet, replacements: dict):
    """Temporarily put `replacements` (name -> module) into the UNet; the originals come back."""
    originals = {name: unet.get_submodule(name) for name in replacements}
    try:
        for name, module in replacements.items():
            set_submodule(unet, name, module)
        yield unet
    finally:
        for name, module in originals.items():
            set_submodule(unet, name, module)


def simulated_layers(unet, layers: dict[str, LayerInfo], bits: dict[str, tuple[int, int]],
                     calibration: Calibration) -> dict:
    """Fake-quant twins for every layer of `bits` that is not 16/16."""
    return {
        name: build_quantized_layer(unet.get_submodule(name), layers[name], w, a, calibration, simulate=True)
        for name, (w, a) in bits.items() if (w, a) != (FLOAT_BITS, FLOAT_BITS)
    }


class CandidateStack(torch.nn.Module):
    """Stands in for a layer while several of its candidates are scored in one call: the batch is
    `len(twins)` copies of the prompts' batch, one after another, and twin i computes copy i."""

    def __init__(self, twins: list):
        super().__init__()
        self.twins = torch.nn.ModuleList(twins)

    def forward(self, x, *args, **kwargs):
        copies = len(self.twins)
        if x.shape[0] % copies:
            raise RuntimeError(f"a batch of {x.shape[0]} inputs does not split into {copies} candidate copies")
        return torch.cat([twin(part, *args, **kwargs) for twin, part in zip(self.twins, x.chunk(copies))])


def candidates_sharing_a_call(calls: list, pipeline_kwargs: dict) -> int:
    """How many candidates one UNet call scores. One under classifier-free guidance (the pipeline puts
    the unconditional half of the batch ahead of the conditional one, so copies would interleave) and
    for calls whose latents are large (memory); else as many as CANDIDATE_BATCH_LATENT_PIXELS allows."""
    guidance = pipeline_kwargs.get("guidance_scale")
    if not calls or guidance is None or guidance > 1.0:
        return 1
    latent_pixels = max(call_sample(call)[:, 0].numel() for call in calls)
    return max(1, CANDIDATE_BATCH_LATENT_PIXELS // latent_pixels)


class Evaluator:
    """Scores the pipeline's current state against the reference."""

    def __init__(self, pipe, reference: Reference, seed: int, pipeline_kwargs: dict, batch_size: int = 8,
                 prefix: PrefixReuse | None = None, candidates_per_call: int | None = None):
        self.pipe, self.reference, self.seed = pipe, reference, seed
        self.pipeline_kwargs, self.batch_size = pipeline_kwargs, batch_size
        unet = pipe.unet
        self.calls = list(reference.calls_on(unet.device, unet.dtype))
        self.prefix = prefix  # the float UNet's recorded work, reused ahead of a changed layer
        self.candidates_per_call = (candidates_sharing_a_call(self.calls, pipeline_kwargs)
                                    if candidates_per_call is None else candidates_per_call)

    def on_copied_pipeline(self) -> Evaluator:
        """This evaluator on a copy of the pipeline, for measuring another layer at the same time
        (mixq.calib.workers); the reference and the recorded float work are shared, read only."""
        pipe = copy.deepcopy(self.pipe)
        prefix = self.prefix.bound_to(pipe.unet) if self.prefix is not None else None
        return Evaluator(pipe, self.reference, self.seed, self.pipeline_kwargs, self.batch_size, prefix=prefix,
                         candidates_per_call=self.candidates_per_call)

    def reusing_work_before(self, layer: str, copies: int = 1):
        """Scores computed inside are the same; UNet work ahead of `layer` comes from the recording."""
        return self.prefix.reusing(layer, copies) if self.prefix is not None else nullcontext()

    def scores_with(self, group: str, layer: str, twins: list) -> list[float]:
        """The score with each of `twins` in place of `layer`, all in one evaluation (several twins: a
        CandidateStack, each computing its own copy of the batch)."""
        copies = len(twins)
        stand_in = twins[0] if copies == 1 else CandidateStack(twins)
        with self.reusing_work_before(layer, copies), swapped_layers(self.pipe.unet, {layer: stand_in}):
            return self.scores_of_copies(group, copies)

    @torch.no_grad()
    def scores_of_copies(self, group: str, copies: int) -> list[float]:
        """The group's score (content: image SSIM; quality: UNet SQNR, capped) of each of `copies` copies
        of the batch, as the current UNet computes them."""
        if group == "content":
            images = generate(self.pipe, self.reference.conditioning, self.seed, self.pipeline_kwargs,
                              self.batch_size, copies=copies).view(copies, *self.reference.images.shape)
            return [batch_ssim(self.reference.images, one) for one in images]
        outputs = [run_unet(self.pipe.unet, repeated_call(call, copies)).float().cpu().chunk(copies)
                   for call in self.calls]
        return [min(self.unet_sqnr([(call[2], o[i]) for call, o in zip(self.calls, outputs)]), SQNR_CAP_DB)
                for i in range(copies)]

    @torch.no_grad()
    def unet_outputs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(recorded float output, current output) of every recorded UNet call."""
        return [(call[2], run_unet(self.pipe.unet, call).float().cpu()) for call in self.calls]

    def unet_sqnr(self, outputs=None) -> float:
        """SQNR over all recorded outputs; `outputs`: unet_outputs() when already computed."""
        pairs = self.unet_outputs() if outputs is None else outputs
        return sqnr_db(torch.cat([e for e, _ in pairs]), torch.cat([o for _, o in pairs]))

    @staticmethod
    def sqnr_per_output(outputs) -> list[float]:
        """The SQNR of each prompt's UNet output at each recorded step (the rows of every call)."""
        return [min(sqnr_db(e, o), SQNR_CAP_DB) for expected, output in outputs
                for e, o in zip(expected.float().cpu(), output)]

    def images(self) -> torch.Tensor:
        return generate(self.pipe, self.reference.conditioning, self.seed, self.pipeline_kwargs, self.batch_size)

    def image_ssim(self) -> float:
        return batch_ssim(self.reference.images, self.images())

    def image_mse(self) -> float:
        return float((self.images() - self.reference.images).pow(2).mean())


def candidate_bits(group: str, weight_content, weight_quality, activation) -> dict[str, list[int]]:
    return {"weight": list(weight_content if group == "content" else weight_quality), "activation": list(activation)}


def measure_layer(evaluator: Evaluator, unet, info: LayerInfo, calibration: Calibration,
                  candidates: dict[str, list[int]]) -> dict:
    """One layer's row of the table: scores per bit, weights-only and activations-only."""
    row = {"group": info.group, "metric": METRICS[info.group], "params": info.params,
           "act_numel": calibration.ranges(info.name).numel, "weight": {}, "activation": {}}
    module = unet.get_submodule(info.name)
    choices = [(side, int(bits)) for side, bit_list in candidates.items() for bits in bit_list]
    per_call = evaluator.candidates_per_call
    for start in range(0, len(choices), per_call):
        chunk = choices[start:start + per_call]
        twins = [build_quantized_layer(module, info, *((bits, FLOAT_BITS) if side == "weight" else (FLOAT_BITS, bits)),
                                       calibration, simulate=True) for side, bits in chunk]
        for (side, bits), score in zip(chunk, evaluator.scores_with(info.group, info.name, twins)):
            row[side][bits] = float(score)  # full precision: content SSIMs differ from 1 in the 5th-7th decimal
    return row


def load_table(path) -> dict:
    if not path.exists():
        return {}
    return checked_table(read_yaml(path, error=CalibrationFileError), path)


TABLE_BITS = {"weight": WEIGHT_BITS, "activation": ACTIVATION_BITS}


def checked_table(data, path) -> dict:
    """The `layers` of a sensitivity file, every row checked (a hand-edited or truncated file would
    otherwise give a plan whose real average misses the budget, or fail deep inside allocation)."""
    if data is None:
        return {}
    layers = data.get("layers", {}) if isinstance(data, dict) else None
    if not isinstance(layers, dict):
        raise CalibrationFileError(f"{path}: expected a mapping with a 'layers' mapping of layer -> row; delete the "
                                   "file and rerun `--stage sensitivity`")
    for name, row in layers.items():
        problem = table_row_problem(row)
        if problem:
            raise CalibrationFileError(f"{path}: layers[{name!r}]: {problem}; fix the row, or delete it (or the file) "
                                       "and rerun `--stage sensitivity` to measure it again")
    return dict(layers)


def table_row_problem(row) -> str | None:
    """Why one sensitivity row is unusable, or None."""
    if not isinstance(row, dict):
        return f"the row is {type(row).__name__}, not a mapping"
    missing = [k for k in ("group", "params", "act_numel", "weight", "activation") if k not in row]
    if missing:
        return f"missing {', '.join(missing)}"
    if not isinstance(row["group"], str) or row["group"] not in METRICS:
        return f"group {row['group']!r} is not one of {sorted(METRICS)}"
    for key in ("params", "act_numel"):
        if not (isinstance(row[key], int) and not isinstance(row[key], bool) and row[key] > 0):
            return f"{key} {row[key]!r} is not a positive integer"
    for side, allowed in TABLE_BITS.items():
        scores = row[side]
        if not isinstance(scores, dict) or not scores:
            return f"{side} is not a non-empty mapping of bits -> score"
        for bits, score in scores.items():
            if isinstance(bits, bool) or bits not in allowed:
                return f"{side} bit-width {bits!r} is not one of {allowed}"
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                return f"{side} score at {bits} bits is {score!r}, not a finite number"
    return None


# --- measurement precision and its noise floor ------------------------------------------------


def measurement_dtype(serving: torch.dtype) -> torch.dtype:
    """float32 for a half-precision pipeline; float32 / float64 pipelines are measured as they are."""
    return serving if torch.finfo(serving).bits >= 32 else MEASUREMENT_DTYPE


@contextmanager
def full_precision_matmuls():
    """No TF32 while measuring (CUDA): it rounds matmul inputs to 10 mantissa bits, fp16's resolution."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextmanager
def measurement_precision(pipe):
    """The pipeline's models in the measurement dtype, restored afterwards (fp16/bf16 -> fp32 -> back is
    exact). The text encoders too: the pipeline casts given text embeddings to their dtype."""
    target = measurement_dtype(pipe.unet.dtype)
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    originals = [m.dtype for m in modules]
    try:
        for module, dtype in zip(modules, originals):
            if torch.finfo(dtype).bits < torch.finfo(target).bits:
                module.to(target)
        with full_precision_matmuls():
            yield target
    finally:
        for module, dtype in zip(modules, originals):
            if module.dtype != dtype:
                module.to(dtype)


@torch.no_grad()
def evaluator_at_current_precision(evaluator: Evaluator, reuse_prefix: bool = True) -> Evaluator:
    """The same prompts, seeds and UNet inputs, with the float reference recomputed by the pipeline
    as it is now: scores then compare runs of one precision, not fp32 against fp16 rounding.
    `reuse_prefix`: record the float UNet's work on those inputs for reuse (mixq.calib.prefix)."""
    pipe, reference = evaluator.pipe, evaluator.reference
    unet = pipe.unet
    conditioning = to_device(reference.conditioning, unet.device, unet.dtype)
    calls = [(args, kwargs, run_unet(unet, (args, kwargs)).float().cpu())
             for args, kwargs, _ in reference.calls_on(unet.device, unet.dtype)]
    images = generate(pipe, conditioning, evaluator.seed, evaluator.pipeline_kwargs, evaluator.batch_size)
    recomputed = Reference(prompts=reference.prompts, conditioning=conditioning, images=images, unet_calls=calls)
    precise = Evaluator(pipe, recomputed, evaluator.seed, evaluator.pipeline_kwargs, evaluator.batch_size,
                        candidates_per_call=evaluator.candidates_per_call)
    if reuse_prefix:
        precise.prefix = PrefixReuse(unet, precise.calls)
    return precise


def one_ulp_perturbed(module, seed: int):
    """A copy of `module` whose every weight moved to a neighbouring representable value (random
    direction): a change exact arithmetic would not notice, so its score is the measurement's noise."""
    twin = copy.deepcopy(module)
    weight = twin.weight.data
    upward = torch.rand(weight.shape, generator=torch.Generator().manual_seed(seed)) < 0.5
    direction = torch.where(upward, math.inf, -math.inf).to(device=weight.device, dtype=weight.dtype)
    twin.weight.data = torch.nextafter(weight, direction)
    return twin


def noise_floor_probes(names: list[str], count: int = NOISE_FLOOR_PROBES) -> list[str]:
    """`count` layers spread evenly over the model (first, middle, last for 3)."""
    if len(names) <= count:
        return list(names)
    return [names[round(i * (len(names) - 1) / (count - 1))] for i in range(count)] if count > 1 else names[:1]


@torch.no_grad()
def measure_noise_floor(evaluator: Evaluator, unet, probes: list[str]) -> dict:
    """Both metrics for one-ulp perturbations of the probe layers; the floor is the worst (lowest)
    score: a candidate scoring near it is not resolved from rounding noise."""
    sqnrs, ssims = [], []
    for seed, name in enumerate(probes):
        perturbed = one_ulp_perturbed(unet.get_submodule(name), seed)
        with evaluator.reusing_work_before(name), swapped_layers(unet, {name: perturbed}):
            sqnrs.append(min(evaluator.unet_sqnr(), SQNR_CAP_DB))
            ssims.append(evaluator.image_ssim())
    return {"method": "one layer's weights moved by one unit in the last place; worst of the probe layers",
            "probe_layers": list(probes), "sqnr_db": min(sqnrs), "ssim": min(ssims)}


def prefix_line(prefix: PrefixReuse | None) -> str:
    if prefix is None or not prefix.enabled:
        return ("sensitivity: every candidate runs the whole UNet (the float UNet's module outputs do not fit the "
                "memory budget, or its recorded calls run different modules)")
    return (f"sensitivity: reusing the float UNet's work ahead of each layer ({prefix.recorded_bytes / 2**20:.0f} MiB "
            f"of module outputs, {len(prefix.calls)} UNet calls)")


def load_measurement(path) -> dict | None:
    """The table's record of how it was measured (dtype, serving dtype, noise floor); None for old tables."""
    return read_table_file(path).get("measurement")


def noise_floor_line(measurement: dict | None) -> str:
    """One sentence for the report, next to the scores."""
    if not measurement:
        return "Noise floor: not recorded (table measured by an older mixq)."
    floor = measurement["noise_floor"]
    return (f"Measured in {measurement['dtype']} (serving dtype {measurement['serving_dtype']}); noise floor "
            f"(one layer moved by one unit in the last place): UNet SQNR {floor['sqnr_db']:.1f} dB, image SSIM "
            f"1 - {1 - floor['ssim']:.1e}. Scores near the floor are not resolved.")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- the time estimate --------------------------------------------------------------------------


class LayerClock:
    """Measured seconds per layer, per group, and the expected time of the layers left."""

    def __init__(self):
        self.seconds: dict[str, list[float]] = {}

    def record(self, group: str, seconds: float):
        self.seconds.setdefault(group, []).append(seconds)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.seconds.values())

    def per_layer(self, group: str | None = None) -> float:
        """Mean seconds of `group`'s measured layers (of all layers when the group has none yet)."""
        samples = self.seconds.get(group) or [s for v in self.seconds.values() for s in v]
        return sum(samples) / len(samples) if samples else math.nan

    def expected_seconds(self, groups_left: list[str]) -> float:
        return sum(self.per_layer(group) for group in groups_left)


def format_duration(seconds: float) -> str:
    if math.isnan(seconds):
        return "unknown"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def estimate_line(clock: LayerClock, groups_left: list[str], world: World, workers: int = 1) -> str:
    """The first estimate of the time left; `workers` layers are measured at a time (mixq.calib.workers)."""
    per_group = ", ".join(f"{g} {clock.per_layer(g):.2f} s" for g in sorted(clock.seconds))
    where = "this process" if world.size == 1 else f"each of the {world.size} processes"
    return (f"sensitivity: {clock.per_layer():.2f} s per layer over the first {clock.count} ({per_group}); "
            f"expected {format_duration(clock.expected_seconds(groups_left) / workers)} for the "
            f"{len(groups_left)} layers left on {where}")


# --- the pass -----------------------------------------------------------------------------------


def read_table_file(path) -> dict:
    path = Path(path)
    return (read_yaml(path) or {}) if path.exists() else {}


def in_layer_order(rows: dict, layers: dict) -> dict:
    """Rows in module order: the file is the same whatever order (or process) measured them."""
    return {name: rows[name] for name in layers if name in rows}


def write_table(path, measurement: dict | None, rows: dict, texts: TableText | None = None):
    """`texts`: the TableText of a table rewritten after every layer (rows emitted once)."""
    write_text_atomic(path, (texts or TableText()).text({"measurement": measurement} if measurement else {}, rows))


def check_no_stale_rows(rows: dict, layers: dict, where):
    stale = sorted(set(rows) - set(layers))
    if stale:
        raise CalibrationFileError(f"{where} holds layers this model does not have (e.g. {stale[:2]}): it belongs to "
                                   "another model or keep-fp setting; use a new --out folder")


def measured_rows(evaluators: list[Evaluator], todo: list[str], layers: dict, calibration: Calibration, bits_config,
                  progress: bool, say, world: World, threads=None):
    """(name, row) for every layer of `todo`, as they are measured: one at a time with one evaluator,
    several at a time with several (mixq.calib.workers); with a progress bar and, after the first few
    layers, the measured time per layer and the expected rest."""
    from tqdm.auto import tqdm

    clock, left, workers = LayerClock(), list(todo), len(evaluators)

    def measure(evaluator: Evaluator, name: str) -> dict:
        info = layers[name]
        candidates = candidate_bits(info.group, bits_config.weight_content, bits_config.weight_quality,
                                    bits_config.activation)
        return measure_layer(evaluator, evaluator.pipe.unet, info, calibration, candidates)

    if workers > 1:  # then the layers whose kernels sum by thread count, with every thread
        unet = evaluators[0].pipe.unet
        alone = [name for name in todo if sums_depend_on_threads(unet.get_submodule(name))]
        results = chain(side_by_side(evaluators, [name for name in todo if name not in alone], measure),
                        one_by_one(evaluators[0], alone, measure))
    else:
        results = one_by_one(evaluators[0], todo, measure)
    with tqdm(total=len(todo), desc="sensitivity", unit="layer", smoothing=0, disable=not progress) as bar:
        for name, row, seconds in results:
            clock.record(layers[name].group, seconds)
            left.remove(name)
            yield name, row
            bar.update()
            groups_left = [layers[n].group for n in left]
            if clock.count == ESTIMATE_AFTER_LAYERS and groups_left:
                say(f"{estimate_line(clock, groups_left, world, workers)}, "
                    f"{parallelism_text(workers, torch.get_num_threads())}")
            # several evaluators keep one thread each: the count is chosen once, before the pass
            threads_now = threads.maybe_rechoose() if threads is not None and workers == 1 else torch.get_num_threads()
            bar.set_postfix_str(f"about {format_duration(clock.expected_seconds(groups_left) / workers)} left, "
                                f"{parallelism_text(workers, threads_now)}", refresh=False)


def matching_shards(table_path: Path, run: str | None, say) -> dict[Path, dict]:
    """The shard files measured from this run's inputs (`run`, the key of run.yaml's inputs), each
    checked like sensitivity.yaml; shards of other inputs (a leftover of an earlier run, a copied
    folder) are reported and never merged."""
    found = {}
    for path in shard_paths(table_path):
        data = read_yaml(path, error=CalibrationFileError)
        if not isinstance(data, dict):
            raise CalibrationFileError(f"{path}: expected a mapping with a 'layers' mapping of layer -> row, got "
                                       f"{type(data).__name__}; delete the file and rerun")
        if run is None or data.get("run") != run:
            say(f"sensitivity: ignoring {path}: it was not measured from this folder's inputs (model, config, "
                "prompts, candidates); delete it if it is a leftover")
            continue
        checked_table(data, path)
        found[path] = data
    return found


def measure_sensitivity(pipe, layers: dict[str, LayerInfo], calibration: Calibration, evaluator: Evaluator,
                        bits_config, table_path, progress: bool = True, log=print, threads=None,
                        run: str | None = None) -> dict:
    """Fills (or resumes) the sensitivity table at `table_path`; returns layer -> row.

    Under torchrun every process measures its share of the layers into its own shard, and process 0
    writes the merged table (the same file a single process writes). `run` keys the inputs the rows
    are measured from: shards under another key are ignored."""
    world = current_world()
    table_path = Path(table_path)
    say = lambda message: log(world.log_prefix + message)  # noqa: E731
    stored, shards = read_table_file(table_path), matching_shards(table_path, run, say)
    # The table's own rows win over shard rows (a shard can only add layers the table lacks).
    known = {**{n: r for s in shards.values() for n, r in (s.get("layers") or {}).items()}, **load_table(table_path)}
    check_no_stale_rows(known, layers, table_path)
    measurement = stored.get("measurement") or next((s["measurement"] for s in shards.values()
                                                     if s.get("measurement")), None)
    done = set().union(*world.all_gather(sorted(known)))
    todo = [name for name in shard(list(layers), world) if name not in done]
    if done:
        say(f"sensitivity: resuming, {len(done)} of {len(layers)} layers already measured")

    my_share = set(shard(list(layers), world))
    mine = {name: row for name, row in known.items() if name in my_share}
    texts = TableText()

    def save():
        if world.size == 1:
            write_table(table_path, measurement, in_layer_order(mine, layers), texts)
        else:
            write_shard(table_path, world.rank, in_layer_order(mine, layers), measurement if world.is_main else None,
                        run, texts)

    started, serving_dtype = time.monotonic(), pipe.unet.dtype
    needs_floor = world.is_main and measurement is None
    if todo or needs_floor:  # a finished table costs no float32 reference
        with measurement_precision(pipe) as dtype:
            precise = evaluator_at_current_precision(evaluator)
            if needs_floor:
                floor = measure_noise_floor(precise, pipe.unet, noise_floor_probes(list(layers)))
                measurement = {"dtype": dtype_name(dtype), "serving_dtype": dtype_name(serving_dtype),
                               "noise_floor": floor}
                save()  # a resumed run keeps this floor
            if world.is_main:
                say(prefix_line(precise.prefix))
                floor = measurement["noise_floor"]
                say(f"sensitivity: measured in {measurement['dtype']}; noise floor SQNR {floor['sqnr_db']:.1f} dB, "
                    f"SSIM 1 - {1 - floor['ssim']:.1e}")
            evaluators = [precise]
            workers = worker_count(pipe, torch.get_num_threads(), world.size) if todo else 1
            if workers > 1:
                try:
                    evaluators += [precise.on_copied_pipeline() for _ in range(workers - 1)]
                    say(f"sensitivity: {workers} layers at a time, each on its own copy of the pipeline "
                        f"({model_bytes(pipe) / 2**20:.0f} MiB) with 1 thread ({WORKERS_VARIABLE}=1: one at a time)")
                except Exception as error:  # a pipeline deepcopy cannot copy (hooks, compiled modules)
                    evaluators = [precise]
                    say(f"sensitivity: one layer at a time: the pipeline could not be copied ({error})")
            for name, row in measured_rows(evaluators, todo, layers, calibration, bits_config,
                                           progress and world.is_main, say, world, threads):
                mine[name] = row
                save()
    if todo:
        say(f"sensitivity: measured {len(todo)} layers in {time.monotonic() - started:.1f} s")
    if world.size == 1:
        if shards:  # their rows are in the table now: the shards go
            save()
            for path in shards:
                path.unlink(missing_ok=True)
            remove_shards(table_path, [])  # the shard folder, once empty
        return in_layer_order(mine, layers)
    return merge_shards(world, table_path, layers, known, mine, measurement)


def merge_shards(world: World, table_path: Path, layers: dict, known: dict, mine: dict, measurement) -> dict:
    """Every process's rows to everyone; process 0 writes the table, then the shards go."""
    merged = merge_shard_rows([known, *world.all_gather(mine)], layers)
    if world.is_main:
        write_table(table_path, measurement, merged)
    world.barrier()  # the merged table is on disk before any shard disappears
    if world.is_main:
        remove_all_shards(table_path)
    else:
        remove_shards(table_path, [world.rank])
    return merged
