"""Reusing the float UNet's work ahead of the layer under test (mixq.calib.prefix) gives the same scores,
bit for bit, as running every candidate through the whole UNet, in both groups, and really skips work;
a memory limit makes it coarser or turns it off, never wrong."""

import numpy as np
import pytest
import torch

from mixq.api import calibrate_ranges
from mixq.calib.collect import collect_reference
from mixq.calib.prefix import PrefixReuse, ancestors, deepest_fitting, same_call
from mixq.calib.sensitivity import Evaluator, evaluator_at_current_precision, measure_layer, measure_noise_floor
from mixq.layers import quantizable_layers

KWARGS = {"num_inference_steps": 2, "guidance_scale": 0.0}
PROMPTS = ["a red cube on a blue floor", "two green spheres at dawn", "a yellow cone beside a lake"]
CANDIDATES = {"weight": [2, 8], "activation": [4, 8]}


@pytest.fixture(scope="module")
def setup(_tiny_sdxl_master):
    pipe = _tiny_sdxl_master
    layers = quantizable_layers(pipe.unet)
    calibration = calibrate_ranges(pipe, PROMPTS, batch_size=4, seed=1, progress=False, layers=layers, **KWARGS)
    # One candidate per call: replaying the recording is exact; candidates sharing a call, whose batch
    # differs from the recording's, are tested in tests/test_sensitivity_batching.py.
    evaluator = Evaluator(pipe, collect_reference(pipe, PROMPTS, 1, KWARGS, 4), 1, KWARGS, 4, candidates_per_call=1)
    plain = evaluator_at_current_precision(evaluator, reuse_prefix=False)
    reusing = evaluator_at_current_precision(evaluator)
    return pipe, layers, calibration, plain, reusing


def late_layers(layers, group: str, count: int = 2) -> list[str]:
    """Layers of `group` from the second half of the UNet (most work ahead of them to reuse)."""
    names = [n for n in layers if layers[n].group == group]
    return names[len(names) // 2:][:count]


@pytest.mark.parametrize("group", ["quality", "content"])
def test_scores_are_bit_for_bit_those_of_the_whole_unet(setup, group):
    pipe, layers, calibration, plain, reusing = setup
    assert reusing.prefix.enabled
    for name in late_layers(layers, group):
        before = reusing.prefix.replayed
        expected = measure_layer(plain, pipe.unet, layers[name], calibration, CANDIDATES)
        got = measure_layer(reusing, pipe.unet, layers[name], calibration, CANDIDATES)
        assert got == expected, name
        assert reusing.prefix.replayed > before, f"nothing was reused ahead of {name}"


def test_noise_floor_is_the_same(setup):
    pipe, layers, _, plain, reusing = setup
    probes = late_layers(layers, "quality", 1) + late_layers(layers, "content", 1)
    assert measure_noise_floor(reusing, pipe.unet, probes) == measure_noise_floor(plain, pipe.unet, probes)


def test_only_work_that_precedes_the_layer_is_reused(setup):
    pipe, layers, _, _, reusing = setup
    prefix = reusing.prefix
    name = late_layers(layers, "quality", 1)[0]
    units = prefix.units_before(name)
    assert units and "conv_in" in units and "down_blocks" not in units  # a ModuleList is not a call
    for unit in units:
        assert not name.startswith(unit + "."), f"{unit} contains {name}"
        assert prefix.trace.end[unit] < prefix.trace.start[name]
    # Ahead of the first layer only the time and added-condition embeddings run.
    assert prefix.units_before("conv_in") and all("embedding" in u or "proj" in u for u in prefix.units_before("conv_in"))


def test_the_unet_is_restored_and_other_inputs_run_in_full(setup):
    pipe, layers, _, plain, reusing = setup
    name = late_layers(layers, "quality", 1)[0]
    call = reusing.calls[0]
    args, kwargs = call[0], dict(call[1])
    other = (args[0] + 0.5, *args[1:])  # inputs no recording holds
    with torch.no_grad():
        expected = pipe.unet(*other, **{**kwargs, "return_dict": False})[0]
        before = reusing.prefix.replayed
        with reusing.reusing_work_before(name):
            got = pipe.unet(*other, **{**kwargs, "return_dict": False})[0]
        assert reusing.prefix.replayed == before and torch.equal(got, expected)
    assert all("forward" not in m.__dict__ for m in pipe.unet.modules())


def test_a_memory_limit_coarsens_or_disables_reuse(setup):
    pipe, layers, calibration, plain, reusing = setup
    full = reusing.prefix
    small = PrefixReuse(pipe.unet, plain.calls, max_bytes=full.recorded_bytes // 4)
    assert 0 < small.max_depth < full.max_depth and small.recorded_bytes <= full.recorded_bytes // 4
    coarse = Evaluator(plain.pipe, plain.reference, plain.seed, plain.pipeline_kwargs, plain.batch_size, prefix=small,
                       candidates_per_call=1)  # as `plain`: bit for bit needs the recording's batch
    name = late_layers(layers, "quality", 1)[0]
    assert measure_layer(coarse, pipe.unet, layers[name], calibration, CANDIDATES) == \
        measure_layer(plain, pipe.unet, layers[name], calibration, CANDIDATES)
    assert not PrefixReuse(pipe.unet, plain.calls, max_bytes=1).enabled


def test_helpers():
    assert ancestors("down_blocks.1.attentions.0") == ["", "down_blocks", "down_blocks.1", "down_blocks.1.attentions"]
    assert deepest_fitting({"a": 10, "a.b": 10, "a.b.c": 100}, calls=2, max_bytes=40) == 2
    assert deepest_fitting({"a": 10}, calls=2, max_bytes=10) == 0
    x = torch.ones(2)
    assert same_call((x, 1), {"y": x, "return_dict": True}, (x.clone(), 1), {"y": x})
    assert not same_call((x, 1), {"y": x}, (x + 1, 1), {"y": x})
    assert not same_call((x, 1), {"y": x}, (x.double(), 1), {"y": x})
    array = np.ones(2)  # no plain equality: a different call, not an error
    assert not same_call((array,), {}, (array.copy(),), {})
