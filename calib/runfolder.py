"""A calibration run folder and the record that keeps it consistent.

A run folder holds the measurements of one model under one setting, and the plan for one budget:

    config.yaml                     the config that produced the plan beside it (budget included)
    run.yaml                        what the measurements were made from, and each derived stage's inputs
    activation_ranges.safetensors   collect: per-layer activation ranges (+ BOS rows)
    reference.safetensors           collect: float images and UNet calls for the sensitivity prompts
    sensitivity.yaml                sensitivity: layer -> group, metric, scores per bit
    allocation.yaml                 allocate: the budget-split sweep (skipped ratios and why)
    plan.yaml                       allocate: layer -> {w_bits, a_bits}, its budget and averages
    plans/w<W>-a<A>.yaml            allocate: every plan solved in this folder, by budget
    report.md, *.png                report: describes plan.yaml

`run.yaml` records the measurement inputs (config sections, a hash of the prompts used, the model's
fingerprint, the mixq version). Changing any of them in a folder that holds measurements is refused,
naming what changed; only the budget may change. The derived stages (allocate, report) record a
digest of their inputs, so a stage whose inputs are unchanged is skipped and one whose inputs changed
is rerun: the report always describes the plan beside it.

Nothing is recorded before a stage has produced a file, so a run that fails early (a typo in the
prompts path, a model that does not load) never blocks its folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from mixq.errors import RunFolderError
from mixq.io import read_yaml, write_yaml_atomic

# Config sections the measurements depend on; only `budget` may change within a folder.
MEASUREMENT_SECTIONS = ("model", "sampling", "calibration", "keep_fp", "bits")
RECORD_FILENAME = "run.yaml"


class RunFolder:
    def __init__(self, root):
        from mixq.api import RANGES_FILENAME
        from mixq.calib.collect import REFERENCE_FILENAME

        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.record = self.root / RECORD_FILENAME
        self.ranges = self.root / RANGES_FILENAME
        self.reference = self.root / REFERENCE_FILENAME
        self.sensitivity = self.root / "sensitivity.yaml"
        self.allocation = self.root / "allocation.yaml"
        self.plan = self.root / "plan.yaml"
        self.plans = self.root / "plans"
        self.report = self.root / "report.md"

    # --- what the folder holds ----------------------------------------------------------------

    def measured(self) -> bool:
        """Whether a measuring stage has written anything (only then do the inputs bind the folder)."""
        return any(p.exists() for p in (self.ranges, self.reference, self.sensitivity))

    def collected(self) -> bool:
        return self.ranges.exists() and self.reference.exists()

    def require(self, path: Path, stage: str):
        if not path.exists():
            raise RunFolderError(f"{path} is missing: run `python -m mixq.calibrate --out {self.root} --stage {stage}` "
                                 "first (or without --stage to run every stage)")

    def stored_config(self) -> dict | None:
        """The config recorded in the folder (None when there is none)."""
        return read_yaml(self.config) if self.config.is_file() else None

    def read_record(self) -> dict:
        return (read_yaml(self.record) or {}) if self.record.is_file() else {}

    # --- measurement inputs -------------------------------------------------------------------

    def recorded_inputs(self) -> dict:
        """The inputs the folder's measurements were made from ({} when nothing was measured). A folder
        written before run.yaml existed is compared by its config.yaml."""
        if not self.measured():
            return {}
        record = self.read_record()
        if "inputs" in record:
            return record["inputs"]
        stored = self.stored_config() or {}
        return {"config": {s: stored.get(s) for s in MEASUREMENT_SECTIONS}} if stored else {}

    def inputs_key(self) -> str:
        """A digest of the recorded inputs: what results derived from this folder's measurements
        (sensitivity shards, cached report rows) are keyed by."""
        return digest("inputs", self.recorded_inputs())

    def check_inputs(self, inputs: dict):
        """Refuse inputs that differ from the recorded ones, naming every difference. Keys absent
        from `inputs` (e.g. the model fingerprint before the model has loaded) are not compared."""
        recorded = self.recorded_inputs()
        changes = describe_changes(recorded, inputs)
        if changes:
            raise RunFolderError(
                f"{self.root} holds measurements made from other inputs: {'; '.join(changes)}. Only the budget "
                f"(--w-bits, --a-bits) may change in a run folder: use a new --out folder, or delete {self.root} "
                "to measure again")

    def record_inputs(self, inputs: dict):
        record = self.read_record()
        record["inputs"] = inputs
        write_yaml_atomic(self.record, record)

    # --- derived stages -----------------------------------------------------------------------

    def stage_is_current(self, stage: str, digest: str, output: Path) -> bool:
        return output.exists() and self.read_record().get("stages", {}).get(stage) == digest

    def mark_stage(self, stage: str, digest: str):
        record = self.read_record()
        record.setdefault("stages", {})[stage] = digest
        write_yaml_atomic(self.record, record)

    def write_config(self, config: dict):
        """config.yaml, with the budget of the plan beside it when there is one (a failed or pending
        re-budget never makes the folder contradict itself)."""
        config = dict(config)
        if self.plan.is_file():
            config["budget"] = (read_yaml(self.plan) or {}).get("budget", config["budget"])
        write_yaml_atomic(self.config, config)

    def history_path(self, budget: dict) -> Path:
        """plans/w4.00-a8.00.yaml; a budget with more digits keeps them all (w3.996-a8.00), so two
        budgets never share a file."""
        return self.plans / f"w{budget_text(budget['w_bits'])}-a{budget_text(budget['a_bits'])}.yaml"

    def write_plan(self, plan: dict):
        """plan.yaml, and the same plan under plans/ by budget (earlier budgets' plans stay there)."""
        write_yaml_atomic(self.history_path(plan["budget"]), plan)
        write_yaml_atomic(self.plan, plan)


def budget_text(bits) -> str:
    bits = float(bits)
    return f"{bits:.2f}" if round(bits, 2) == bits else repr(bits)


# --- fingerprints -------------------------------------------------------------------------------


def measurement_inputs(config, prompts: list[str] | None = None, model_fingerprint: str | None = None) -> dict:
    """What the measurements depend on; `prompts` / `model_fingerprint` only once known."""
    import mixq

    data = config.to_dict()
    inputs = {"mixq": mixq.__version__, "config": {s: data[s] for s in MEASUREMENT_SECTIONS}}
    if data["components"] != ["unet"]:  # UNet-only folders recorded before components existed stay valid
        inputs["config"]["components"] = data["components"]
    if prompts is not None:
        inputs["prompts_sha256"] = digest(json.dumps(list(prompts)))
    if model_fingerprint is not None:
        inputs["model_fingerprint"] = model_fingerprint
    return inputs


def describe_changes(recorded: dict, current: dict) -> list[str]:
    """Human-readable differences, e.g. "sampling.num_inference_steps: 1 -> 2"."""
    changes = []
    for key, now in current.items():
        if key not in recorded:
            continue
        before = recorded[key]
        if key == "config":
            changes += [f"{path}: {old!r} -> {new!r}" for path, old, new in _leaf_differences(before, now)]
        elif before != now:
            label = {"mixq": "mixq version", "prompts_sha256": "the calibration prompts (content hash)",
                     "model_fingerprint": "the model (architecture or weights fingerprint)"}.get(key, key)
            changes.append(f"{label}: {before} -> {now}")
    return changes


def _leaf_differences(before, now, path=""):
    if isinstance(before, dict) and isinstance(now, dict):
        for key in list(before) + [k for k in now if k not in before]:
            yield from _leaf_differences(before.get(key), now.get(key), f"{path}.{key}" if path else key)
    elif before != now:
        yield path, before, now


def model_fingerprint(unet) -> str:
    """The UNet's architecture fingerprint plus a sampled digest of its weights: a different
    checkpoint of the same architecture (another seed, a fine-tune, a fused LoRA) gets another one.
    Sampling keeps it cheap on a full-size UNet (64 values per tensor)."""
    from mixq.plan import architecture_fingerprint

    h = hashlib.sha256(architecture_fingerprint(unet).encode())
    for name, tensor in unet.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].to("cpu", torch.float32)
        h.update(name.encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]
