"""Layers measured side by side (mixq.calib.workers): the same table, byte for byte, as one at a time;
each evaluator used by one thread at a time; 1x1 convolutions measured with every thread; the thread
count restored, also after an error; the worker count follows the device, torchrun, memory and
MIXQ_SENSITIVITY_WORKERS."""

import copy
import threading
import time
from types import SimpleNamespace

import pytest
import torch
import yaml

from mixq.api import calibrate_ranges
from mixq.calib import sensitivity, workers
from mixq.calib.collect import collect_reference
from mixq.calib.config import BitsConfig
from mixq.calib.sensitivity import (Evaluator, candidate_bits, evaluator_at_current_precision, measure_layer,
                                    measure_sensitivity)
from mixq.errors import ConfigError
from mixq.layers import quantizable_layers

KWARGS = {"num_inference_steps": 2, "guidance_scale": 0.0}
PROMPTS = ["a red cube on a blue floor", "two green spheres at dawn", "a yellow cone beside a lake"]
BITS = BitsConfig(weight_content=[2, 8], weight_quality=[4, 8], activation=[4, 8])


@pytest.fixture(scope="module")
def small_pass(_tiny_sdxl_master):
    pipe = copy.deepcopy(_tiny_sdxl_master)
    layers = quantizable_layers(pipe.unet)
    calibration = calibrate_ranges(pipe, PROMPTS, batch_size=4, seed=1, progress=False, layers=layers, **KWARGS)
    evaluator = Evaluator(pipe, collect_reference(pipe, PROMPTS, 1, KWARGS, 4), 1, KWARGS, 4)
    names = list(layers)
    one_by_one = [n for n in names if workers.sums_depend_on_threads(pipe.unet.get_submodule(n))][:2]
    chosen = sorted(set(names[::6][:10]) | set(one_by_one), key=names.index)
    return pipe, {n: layers[n] for n in chosen}, calibration, evaluator, one_by_one


def table_bytes(small_pass, tmp_path, monkeypatch, count: str, threads: int, measured: list | None = None) -> bytes:
    """The table a pass writes with MIXQ_SENSITIVITY_WORKERS=count and `threads` threads; `measured`
    collects (layer, thread name, intra-op threads, evaluator) of every layer measurement."""
    pipe, layers, calibration, evaluator, _ = small_pass
    monkeypatch.setenv(workers.WORKERS_VARIABLE, count)
    original = sensitivity.measure_layer

    def recording(evaluator, unet, info, *args):
        measured.append((info.name, threading.current_thread().name, torch.get_num_threads(), evaluator))
        return original(evaluator, unet, info, *args)

    path = tmp_path / f"sensitivity-{count}-{threads}.yaml"
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if measured is not None:
            sensitivity.measure_layer = recording
        measure_sensitivity(pipe, layers, calibration, evaluator, BITS, path, progress=False, log=lambda m: None)
        assert torch.get_num_threads() == threads  # the pass gave the thread count back
    finally:
        sensitivity.measure_layer = original
        torch.set_num_threads(before)
    return path.read_bytes()


def test_side_by_side_rows_are_those_of_one_evaluator(small_pass, tmp_path, monkeypatch):
    """Side by side, a row is what the pass's own evaluator (its float reference and recorded prefix
    made with every thread) measures with one thread, whichever copy measured it; 1x1 convolutions and
    the noise floor are measured with every thread, as one at a time."""
    pipe, layers, calibration, evaluator, one_by_one = small_pass
    assert one_by_one, "the tiny UNet has 1x1 shortcut convolutions"
    measured = []
    together = yaml.safe_load(table_bytes(small_pass, tmp_path, monkeypatch, "2", threads=2, measured=measured))
    alone = yaml.safe_load(table_bytes(small_pass, tmp_path, monkeypatch, "1", threads=2))
    assert together["measurement"] == alone["measurement"]
    assert list(together["layers"]) == list(layers)  # module order, whatever order they finished in
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        precise = evaluator_at_current_precision(evaluator)
        torch.set_num_threads(1)
        for name, info in layers.items():
            expected = (alone["layers"][name] if name in one_by_one else
                        measure_layer(precise, pipe.unet, info, calibration,
                                      candidate_bits(info.group, BITS.weight_content, BITS.weight_quality,
                                                     BITS.activation)))
            assert together["layers"][name] == expected, name
    finally:
        torch.set_num_threads(before)
    assert sorted(name for name, *_ in measured) == sorted(layers)
    evaluators = {id(e) for *_, e in measured}
    assert len(evaluators) == 2, "two evaluators, each on its own copy of the pipeline"
    for name, thread, threads, _ in measured:
        if name in one_by_one:  # after the others, on this thread, with every thread
            assert thread == threading.current_thread().name and threads == 2, name
        else:
            assert thread.startswith("mixq-sensitivity") and threads == 1, name
    assert [name for name, *_ in measured][-len(one_by_one):] == one_by_one


def test_each_evaluator_is_used_by_one_thread_at_a_time_and_errors_restore_the_threads():
    busy, overlaps, lock = set(), [], threading.Lock()

    def measure(evaluator, name):
        with lock:
            overlaps.append(evaluator in busy)
            busy.add(evaluator)
        time.sleep(0.01)
        with lock:
            busy.discard(evaluator)
        if name == "boom":
            raise RuntimeError("a layer failed")
        return name.upper()

    before = torch.get_num_threads()
    results = list(workers.side_by_side(["a", "b"], [f"l{i}" for i in range(12)], measure))
    assert sorted(r[:2] for r in results) == sorted((f"l{i}", f"L{i}") for i in range(12))
    assert not any(overlaps) and torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="a layer failed"):
        list(workers.side_by_side(["a", "b"], ["l0", "boom", "l2", "l3"], measure))
    assert torch.get_num_threads() == before


def test_worker_count_follows_device_processes_memory_and_the_variable(monkeypatch):
    cpu = SimpleNamespace(device=torch.device("cpu"), components={"unet": torch.nn.Linear(256, 256)})
    monkeypatch.delenv(workers.WORKERS_VARIABLE, raising=False)
    monkeypatch.setattr(workers, "available_memory_bytes", lambda: 1 << 34)
    assert workers.worker_count(cpu, threads=2) == 2
    assert workers.worker_count(cpu, threads=4) == 4
    assert workers.worker_count(cpu, threads=1) == 1
    assert workers.worker_count(cpu, threads=2, processes=2) == 1  # torchrun's processes share the cores
    assert workers.worker_count(SimpleNamespace(device=torch.device("cuda"), components={}), threads=8) == 1
    size = workers.model_bytes(cpu)
    assert size == (256 * 256 + 256) * 4
    monkeypatch.setattr(workers, "available_memory_bytes", lambda: int(size / workers.MEMORY_SHARE) + 1)
    assert workers.worker_count(cpu, threads=4) == 2  # room for one copy only
    monkeypatch.setattr(workers, "available_memory_bytes", lambda: size)
    assert workers.worker_count(cpu, threads=4) == 1
    monkeypatch.setattr(workers, "available_memory_bytes", lambda: None)
    assert workers.worker_count(cpu, threads=4) == 1
    monkeypatch.setenv(workers.WORKERS_VARIABLE, "3")
    assert workers.worker_count(cpu, threads=1) == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(workers.WORKERS_VARIABLE, bad)
        with pytest.raises(ConfigError, match="MIXQ_SENSITIVITY_WORKERS"):
            workers.worker_count(cpu, threads=2)


def test_a_pipeline_that_cannot_be_copied_is_measured_one_layer_at_a_time(small_pass, tmp_path, monkeypatch):
    pipe, layers, calibration, evaluator, _ = small_pass
    monkeypatch.setenv(workers.WORKERS_VARIABLE, "2")

    def refuse(self):
        raise TypeError("cannot pickle 'torch._C.Generator'")

    monkeypatch.setattr(Evaluator, "on_copied_pipeline", refuse)
    messages = []
    few = dict(list(layers.items())[:3])
    rows = measure_sensitivity(pipe, few, calibration, evaluator, BITS, tmp_path / "table.yaml", progress=False,
                               log=messages.append)
    assert list(rows) == list(few)
    assert any("one layer at a time: the pipeline could not be copied (cannot pickle" in m for m in messages)
