"""Batched evaluation of the sensitivity prompts: every candidate costs one UNet call per step for all
prompts (when they fit in calibration.batch_size), and its scores agree with prompt-by-prompt
evaluation far below the differences between candidates. (Not bit for bit: a CPU GEMM's blocking
depends on the batch, which moves outputs by ~1e-6, the float32 noise floor.)"""

import pytest

from mixq.api import calibrate_ranges
from mixq.calib.collect import collect_reference
from mixq.calib.sensitivity import Evaluator, measure_layer
from mixq.layers import quantizable_layers

KWARGS = {"num_inference_steps": 1, "guidance_scale": 0.0}
PROMPTS = ["a red cube on a blue floor", "two green spheres at dawn", "a yellow cone beside a lake"]
CANDIDATES = {"weight": [4, 8], "activation": [8]}
LAYERS = ("down_blocks.1.resnets.0.conv1", "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2")


@pytest.fixture(scope="module")
def setup(_tiny_sdxl_master):
    pipe = _tiny_sdxl_master
    layers = quantizable_layers(pipe.unet)
    calibration = calibrate_ranges(pipe, PROMPTS, batch_size=4, seed=1, progress=False, layers=layers, **KWARGS)
    evaluators = {size: Evaluator(pipe, collect_reference(pipe, PROMPTS, 1, KWARGS, size), 1, KWARGS, size)
                  for size in (1, len(PROMPTS))}
    return pipe, layers, calibration, evaluators


def count_unet_calls(unet, action) -> int:
    calls = []
    handle = unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        action()
    finally:
        handle.remove()
    return len(calls)


@pytest.mark.parametrize("name", LAYERS)
def test_one_unet_call_per_candidate_for_all_prompts(setup, name):
    pipe, layers, calibration, evaluators = setup
    batched = evaluators[len(PROMPTS)]
    calls = count_unet_calls(pipe.unet, lambda: measure_layer(batched, pipe.unet, layers[name], calibration, CANDIDATES))
    assert calls == len(CANDIDATES["weight"]) + len(CANDIDATES["activation"])
    one_by_one = evaluators[1]
    calls = count_unet_calls(pipe.unet, lambda: measure_layer(one_by_one, pipe.unet, layers[name], calibration, CANDIDATES))
    assert calls == len(PROMPTS) * 3


@pytest.mark.parametrize("name", LAYERS)
def test_batched_scores_agree_with_prompt_by_prompt_scores(setup, name):
    pipe, layers, calibration, evaluators = setup
    rows = {size: measure_layer(e, pipe.unet, layers[name], calibration, CANDIDATES) for size, e in evaluators.items()}
    batched, single = rows[len(PROMPTS)], rows[1]
    gap = batched["weight"][8] - batched["weight"][4]  # dB for the quality group, SSIM for the content group
    deviation = max(abs(batched[s][b] - single[s][b]) for s in CANDIDATES for b in CANDIDATES[s])
    assert gap > 0 and deviation < 0.01 * gap, (gap, deviation)
