"""Property-style hardening: seeded random hostile checkpoints, YAML files and prompt files.

Every case must either succeed or raise one of mixq's errors (a MixqError, or FileNotFoundError for a
missing file); a failed load or quantize must leave the pipe exactly as it was; and no case may take more
than 1 s or 100 MB (Linux: the memory cap is an address-space limit). The generators are seeded, so a failure names a case that can be replayed."""

from __future__ import annotations

import copy
import json
import random
import resource
import time
from pathlib import Path

import pytest
import torch
import yaml

import mixq
from mixq import checkpoint
from mixq.errors import MixqError
from tests.conftest import capture_unet_call, unet_output

QUICK = dict(num_prompts=2, num_inference_steps=1, guidance_scale=0.0, progress=False)
CASES = {"manifest": 180, "tensor_file": 40, "plan": 90, "sensitivity": 90, "prompts": 120}  # 520 in all
# CPU seconds per case: the slowest case takes about 0.3 s alone, but 1.04-1.13 s was measured under CI's
# load (two test workers on two cores); a runaway parse or load takes far longer.
MAX_SECONDS, MAX_BYTES = 3.0, 100 * 2**20
ALLOWED = (MixqError, FileNotFoundError)

HOSTILE_VALUES = [
    None, True, False, -1, 0, 1, 3, 16, 2**31, 2**63, -2**63, 1e308, float("nan"), float("inf"), 0.5, "",
    "../../etc/passwd", "x" * 5000, "conv2d", "linear", "cached", "float16", [], {}, [[[]]], {"a": {"b": {}}},
    [1], [1, 2], [1, 2, 3], [-1, -1], [0, 0], [2**40, 2**40], ["a", "b"],
]


# --- the harness ---------------------------------------------------------------------------------


def address_space_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmSize:"))
    return int(line.split()[1]) * 1024


class Budget:
    """CPU time of one case (wall time on a shared CI machine measures the neighbours), and a hard cap on the memory it may add: the process's address space is
    limited to its current size + MAX_BYTES while the case runs (every allocation counts, torch's too;
    going over raises MemoryError/RuntimeError, which the case reports as a failure)."""

    def __enter__(self):
        self.limits = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (address_space_bytes() + MAX_BYTES, self.limits[1]))
        self.started = time.process_time()
        return self

    def __exit__(self, *exc):
        self.seconds = time.process_time() - self.started
        resource.setrlimit(resource.RLIMIT_AS, self.limits)
        return False


def run_case(label: str, action) -> str:
    """'ok' or the error type's name; fails on any other exception or on exceeding the budget."""
    outcome = "ok"
    with Budget() as budget:
        try:
            action()
        except ALLOWED as err:
            outcome = type(err).__name__
        except Exception as err:  # noqa: BLE001 (the property under test)
            pytest.fail(f"{label}: raised {type(err).__name__}: {err}"[:2000])
    assert budget.seconds < MAX_SECONDS, f"{label}: took {budget.seconds:.2f} s of CPU time"
    return outcome


def modules_of(pipe) -> list:
    return [(name, id(module)) for name, module in pipe.unet.named_modules()]


class PipeGuard:
    """A float pipe reused across cases: a failed case must leave it as it was. A successful one (a
    harmless edit) legitimately swaps layers in; they are swapped back, which restores the pipe exactly
    since loading never writes into the pipe's own tensors (check_state verifies that at the end)."""

    def __init__(self, master):
        self.pipe = copy.deepcopy(master)
        self.originals = dict(self.pipe.unet.named_modules())
        self.modules = modules_of(self.pipe)
        self.state = {k: v.clone() for k, v in self.pipe.unet.state_dict().items()}

    def check(self, label, outcome):
        if outcome == "ok":
            self.restore()
            return
        assert modules_of(self.pipe) == self.modules, f"{label}: the pipe's modules changed"
        assert getattr(self.pipe.unet, "mixq_info", None) is None, f"{label}: mixq_info was set"

    def restore(self):
        from mixq.layers import set_submodule

        swapped = [name for name, module in self.pipe.unet.named_modules()
                   if name and self.originals.get(name) is not module]
        for name in swapped:
            if name in self.originals:
                set_submodule(self.pipe.unet, name, self.originals[name])
        vars(self.pipe.unet).pop("mixq_info", None)
        assert modules_of(self.pipe) == self.modules

    def check_state(self):
        state = self.pipe.unet.state_dict()
        assert state.keys() == self.state.keys()
        assert all(torch.equal(state[k], v) for k, v in self.state.items())


# --- random hostile edits ------------------------------------------------------------------------


def random_path(value, rng: random.Random, depth: int = 0) -> list:
    """A random path of keys/indices into a JSON-like value (stops early at random)."""
    if depth > 0 and rng.random() < 0.3:
        return []
    if isinstance(value, dict) and value:
        key = rng.choice(list(value))
        return [key, *random_path(value[key], rng, depth + 1)]
    if isinstance(value, list) and value:
        index = rng.randrange(len(value))
        return [index, *random_path(value[index], rng, depth + 1)]
    return []


def hostile_edit(document, rng: random.Random, focus=None):
    """One random edit: replace a value with a hostile one, delete a key, add a key, or nest deeply."""
    root = document if focus is None else focus(document, rng)
    path = random_path(root, rng)
    if not path:
        return
    *parents, last = path
    parent = root
    for key in parents:
        parent = parent[key]
    action = rng.random()
    if action < 0.7:
        parent[last] = copy.deepcopy(rng.choice(HOSTILE_VALUES))
    elif action < 0.85 and isinstance(parent, dict):
        del parent[last]
    elif isinstance(parent, dict):
        parent[rng.choice(["extra", "../x", "", "0"])] = copy.deepcopy(rng.choice(HOSTILE_VALUES))
    else:
        nested = 1
        for _ in range(rng.choice([10, 100, 5000])):
            nested = [nested]
        parent[last] = nested


def layer_focus(manifest, rng):
    """Most edits go to one layer entry: that is where the loader's arithmetic happens."""
    layers = manifest.get("layers")
    if isinstance(layers, dict) and layers and rng.random() < 0.6:
        return layers[rng.choice(list(layers))]
    return manifest


def rehash(folder: Path, manifest: dict):
    """Make the edited manifest pass the integrity checks, as a forger would: the manifest hash in the
    tensor file's header, and the file's size and sha256 in the manifest."""
    path = next(folder.glob("mixq_unet*.safetensors"))
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    header["__metadata__"][checkpoint.MANIFEST_HASH_KEY] = checkpoint.manifest_hash(manifest)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors keeps the data 8-byte aligned
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data[8 + length:])
    if isinstance(manifest.get("weights_file"), dict):
        manifest["weights_file"].update(bytes=path.stat().st_size, sha256=checkpoint.file_sha256(path))


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibration(_tiny_sdxl_master):
    return mixq.calibrate_ranges(_tiny_sdxl_master, **QUICK)


@pytest.fixture(scope="module")
def pristine(_tiny_sdxl_master, calibration, tmp_path_factory) -> Path:
    pipe = mixq.quantize(copy.deepcopy(_tiny_sdxl_master), 4, 8, calibration=calibration, progress=False)
    return mixq.save_quantized(pipe, tmp_path_factory.mktemp("pristine") / "w4a8")


def fresh_copy(pristine: Path, target: Path) -> Path:
    target.mkdir(exist_ok=True)
    for old in target.iterdir():
        old.unlink()
    for path in pristine.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


# --- properties ----------------------------------------------------------------------------------


def test_hostile_manifests_are_refused_cleanly(pristine, _tiny_sdxl_master, tmp_path):
    """Each edited manifest is refused with a mixq error, or loads the very model that was saved:
    never a silently different one."""
    rng, guard, outcomes = random.Random(13), PipeGuard(_tiny_sdxl_master), []
    original = json.loads((pristine / checkpoint.MANIFEST_NAME).read_text())
    call = capture_unet_call(_tiny_sdxl_master, prompts=("a red bus on a bridge",))
    expected = unet_output(mixq.load_quantized(copy.deepcopy(_tiny_sdxl_master), pristine).unet, call)
    for case in range(CASES["manifest"]):
        folder = fresh_copy(pristine, tmp_path / "case")
        manifest = copy.deepcopy(original)
        for _ in range(rng.choice([1, 1, 2, 3])):
            hostile_edit(manifest, rng, focus=layer_focus)
        if case % 2 == 0 and isinstance(manifest, dict):
            try:
                rehash(folder, manifest)
            except RecursionError:
                pass  # nested too deeply to hash: the loader must refuse it unhashed
        try:
            text = json.dumps(manifest)
        except (ValueError, RecursionError):
            text = "[" * 100_000
        (folder / checkpoint.MANIFEST_NAME).write_text(text)
        label = f"manifest case {case}"
        outcome = run_case(label, lambda: mixq.load_quantized(guard.pipe, folder))
        if outcome == "ok":
            assert torch.equal(unet_output(guard.pipe.unet, call), expected), f"{label}: loaded a different model"
        guard.check(label, outcome)
        outcomes.append(outcome)
    guard.check_state()
    print("manifest outcomes:", {o: outcomes.count(o) for o in set(outcomes)})
    assert outcomes.count("CheckpointError") > len(outcomes) // 2  # the edits did reach the checks


def test_hostile_tensor_files_are_refused_cleanly(pristine, _tiny_sdxl_master, tmp_path):
    """Bytes flipped, cut or inserted in the tensor file, with the manifest's record re-hashed."""
    rng, guard = random.Random(7), PipeGuard(_tiny_sdxl_master)
    for case in range(CASES["tensor_file"]):
        folder = fresh_copy(pristine, tmp_path / "case")
        manifest = json.loads((folder / checkpoint.MANIFEST_NAME).read_text())
        path = checkpoint.weights_path(folder, manifest)
        data = bytearray(path.read_bytes())
        header = int.from_bytes(data[:8], "little") + 8
        for _ in range(rng.choice([1, 4, 16])):
            where = rng.randrange(header if rng.random() < 0.7 else len(data))
            choice = rng.random()
            if choice < 0.6:
                data[where] = rng.randrange(256)
            elif choice < 0.8:
                del data[where:where + rng.randrange(1, 64)]
            else:
                data[where:where] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
        path.write_bytes(bytes(data))
        manifest["weights_file"].update(bytes=len(data), sha256=checkpoint.file_sha256(path))
        (folder / checkpoint.MANIFEST_NAME).write_text(json.dumps(manifest))
        label = f"tensor file case {case}"
        guard.check(label, run_case(label, lambda: mixq.load_quantized(guard.pipe, folder)))
    guard.check_state()


def random_yaml_text(document, rng: random.Random) -> str:
    """Dumped YAML, sometimes cut, sometimes with a line duplicated or garbage inserted."""
    text = yaml.safe_dump(document, sort_keys=False)
    choice = rng.random()
    if choice < 0.2:
        text = text[:rng.randrange(len(text) + 1)]
    elif choice < 0.35:
        lines = text.splitlines(keepends=True)
        line = rng.randrange(len(lines))
        text = "".join(lines[:line + 1] + lines[line:])
    elif choice < 0.45:
        where = rng.randrange(len(text) + 1)
        text = text[:where] + rng.choice(["{", ": :", "\t", "- [", "&a *a", "!!python/object:os.system ''",
                                         "\x00", "\ufeff", "? "]) + text[where:]
    return text


def test_hostile_plans_are_refused_cleanly(_tiny_sdxl_master, calibration, tmp_path):
    from mixq.layers import quantizable_layers

    rng, guard = random.Random(5), PipeGuard(_tiny_sdxl_master)
    names = [n for n in quantizable_layers(_tiny_sdxl_master.unet) if n not in ("conv_in", "conv_out")]
    for case in range(CASES["plan"]):
        plan = {"model": "x", "layers": {n: {"w_bits": 4, "a_bits": 8} for n in rng.sample(names, 6)}}
        for _ in range(rng.choice([1, 2])):
            hostile_edit(plan, rng)
        path = tmp_path / "plan.yaml"
        path.write_text(random_yaml_text(plan, rng))
        label = f"plan case {case}: {path.read_text()[:300]!r}"
        outcome = run_case(label, lambda: mixq.quantize(guard.pipe, plan=path, calibration=calibration,
                                                       progress=False))
        guard.check(label, outcome)
    guard.check_state()


def test_hostile_sensitivity_tables_are_refused_cleanly(tmp_path):
    from mixq.calib.allocate import allocate_bits
    from mixq.calib.planner import scores_for, sizes_for
    from mixq.calib.sensitivity import load_table

    rng = random.Random(11)
    row = {"group": "quality", "metric": "sqnr_db", "params": 100, "act_numel": 64,
           "weight": {2: 3.0, 4: 12.0, 8: 30.0}, "activation": {4: 10.0, 8: 28.0}}
    for case in range(CASES["sensitivity"]):
        table = {"layers": {f"layer{i}": copy.deepcopy(row) for i in range(3)}}
        for _ in range(rng.choice([1, 2])):
            hostile_edit(table, rng)
        path = tmp_path / "sensitivity.yaml"
        path.write_text(random_yaml_text(table, rng))

        def load_and_allocate():
            loaded = load_table(path)
            if loaded:
                allocate_bits(scores_for("weight", loaded), sizes_for("weight", loaded), 4.0, time_limit=5)

        run_case(f"sensitivity case {case}: {path.read_text()[:300]!r}", load_and_allocate)


def random_prompt_file(rng: random.Random, folder: Path) -> Path:
    kind = rng.choice(["json-list", "coco", "csv", "tsv", "txt", "bytes"])
    suffix = {"json-list": ".json", "coco": ".json", "csv": ".csv", "tsv": ".tsv", "txt": ".txt", "bytes": ""}[kind]
    path = folder / f"prompts{suffix or rng.choice(['.json', '.csv', '.tsv', '.txt'])}"
    if kind == "json-list":
        items = ["a cat", "a dog", *[copy.deepcopy(rng.choice(HOSTILE_VALUES)) for _ in range(rng.randrange(3))]]
        data = json.dumps(rng.sample(items, len(items))).encode()
    elif kind == "coco":
        document = {"annotations": [{"image_id": i, "caption": f"caption {i}"} for i in range(3)]}
        hostile_edit(document, rng)
        data = json.dumps(document).encode()
    elif kind in ("csv", "tsv"):
        sep = "," if kind == "csv" else "\t"
        header = rng.choice(["text", "caption", "Prompt", "file_name", "", "text" + sep + "text"])
        rows = [rng.choice(["a cat", '"unterminated', "", sep * 3, "\x00", "caf\xe9"]) for _ in range(3)]
        data = ("\n".join([header, *rows]) + "\n").encode(rng.choice(["utf-8", "latin-1", "utf-16"]),
                                                           errors="replace")
    elif kind == "txt":
        data = rng.choice(["a cat\na dog\n", "\n\n", "caf\xe9\n", "\ufefffirst\n"]).encode(
            rng.choice(["utf-8", "latin-1", "utf-16"]), errors="replace")
    else:
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
    if rng.random() < 0.2:
        data = data[:rng.randrange(len(data) + 1)]
    path.write_bytes(data)
    return path


def test_hostile_prompt_files_are_refused_cleanly(tmp_path):
    from mixq.calib.prompts import load_prompts

    rng = random.Random(3)
    for case in range(CASES["prompts"]):
        path = random_prompt_file(rng, tmp_path)
        label = f"prompts case {case} ({path.name}): {path.read_bytes()[:200]!r}"
        result = []
        run_case(label, lambda: result.extend(load_prompts(path)))
        assert all(isinstance(p, str) and p.strip() == p and p for p in result), label
