"""Batched evaluation of the sensitivity prompts: every candidate costs one UNet call per step for all
prompts (when they fit in calibration.batch_size), and its scores agree with prompt-by-prompt
evaluation far below the differences between candidates. (Not bit for bit: a CPU GEMM's blocking
depends on the batch, which moves outputs by ~1e-6, the float32 noise floor.)

On small models the candidates of a layer also share one call (CandidateStack): one UNet call per step
for every candidate and prompt, with the same scores."""

import pytest
import torch

from mixq.api import build_quantized_layer, calibrate_ranges
from mixq.calib.collect import collect_reference, repeated_call
from mixq.calib.sensitivity import (CANDIDATE_BATCH_LATENT_PIXELS, CandidateStack, Evaluator,
                                    candidates_sharing_a_call, evaluator_at_current_precision, measure_layer)
from mixq.layers import quantizable_layers
from mixq.quantizers import FLOAT_BITS

KWARGS = {"num_inference_steps": 1, "guidance_scale": 0.0}
PROMPTS = ["a red cube on a blue floor", "two green spheres at dawn", "a yellow cone beside a lake"]
CANDIDATES = {"weight": [4, 8], "activation": [8]}
LAYERS = ("down_blocks.1.resnets.0.conv1", "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2")


@pytest.fixture(scope="module")
def setup(_tiny_sdxl_master):
    pipe = _tiny_sdxl_master
    layers = quantizable_layers(pipe.unet)
    calibration = calibrate_ranges(pipe, PROMPTS, batch_size=4, seed=1, progress=False, layers=layers, **KWARGS)
    evaluators = {size: Evaluator(pipe, collect_reference(pipe, PROMPTS, 1, KWARGS, size), 1, KWARGS, size,
                                  candidates_per_call=1)
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


# --- candidates sharing a call ------------------------------------------------------------------

CONTENT_LAYER = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
ALL_CANDIDATES = {"weight": [2, 4, 8], "activation": [4, 8]}


@pytest.fixture(scope="module")
def stacked(setup):
    """(plain, stacked) evaluators in float32 on the same inputs: one candidate per call, all per call;
    the stacked one also reuses the work ahead of the layer."""
    pipe, layers, calibration, evaluators = setup
    batched = evaluators[len(PROMPTS)]
    plain = evaluator_at_current_precision(batched, reuse_prefix=False)
    stacked = evaluator_at_current_precision(batched)
    stacked.candidates_per_call = 5
    return plain, stacked


def distortion(score: float, group: str) -> float:
    """What a score measures the loss of: 1 - SSIM (content group), the noise power of an SQNR in dB
    (quality group)."""
    return 1.0 - score if group == "content" else 10.0 ** (-score / 10.0)


@pytest.mark.parametrize("name", [*LAYERS, CONTENT_LAYER])
def test_candidates_sharing_a_call_score_as_one_at_a_time(setup, stacked, name):
    pipe, layers, calibration, _ = setup
    plain, together = stacked
    together.prefix.units_scaling_with(5)  # its one probe call, made once per batch size
    replayed = together.prefix.replayed
    calls = count_unet_calls(pipe.unet, lambda: measure_layer(together, pipe.unet, layers[name], calibration,
                                                              ALL_CANDIDATES))
    got = measure_layer(together, pipe.unet, layers[name], calibration, ALL_CANDIDATES)
    expected = measure_layer(plain, pipe.unet, layers[name], calibration, ALL_CANDIDATES)
    assert calls == KWARGS["num_inference_steps"]  # one call per step for all five candidates
    assert together.prefix.replayed > replayed, "the stacked calls reused nothing ahead of the layer"
    group = layers[name].group
    assert distortion(expected["weight"][2], group) > 2 * distortion(expected["weight"][8], group)
    for side in ("weight", "activation"):
        assert got[side].keys() == expected[side].keys()
        for bits, score in expected[side].items():
            # The copies run the same kernels on the same values; only a GEMM whose blocking follows the
            # batch moves them, by the float32 noise: a candidate's distortion changes by far less than 1 %
            # of itself, or by less than the metric's own floor (1e-10: SSIM's float noise is ~1e-12; 100 dB
            # SQNR), whereas a mixed-up twin is off by factors. (Seen: 0 on an AMX Xeon; up to 1e-4 of the
            # distortion, or 1e-14 absolute, on an AVX512-VNNI EPYC.)
            expected_loss, loss = distortion(score, group), distortion(got[side][bits], group)
            assert abs(loss - expected_loss) <= 1e-2 * expected_loss + 1e-10, (side, bits, got[side][bits], score)
    assert all(type(m) is not CandidateStack for m in pipe.unet.modules()), "a stack was left in the UNet"


def test_a_stack_runs_each_twin_on_its_copy(setup):
    pipe, layers, calibration, _ = setup
    name = LAYERS[1]
    module, info = pipe.unet.get_submodule(name), layers[name]
    twins = [build_quantized_layer(module, info, w, a, calibration, simulate=True)
             for w, a in ((4, FLOAT_BITS), (FLOAT_BITS, 4), (8, 8))]
    x = torch.randn(2, 16, module.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stacked = CandidateStack(twins)(x.repeat(3, 1, 1))
        for i, twin in enumerate(twins):
            assert torch.equal(stacked[2 * i:2 * i + 2], twin(x))
        with pytest.raises(RuntimeError, match="does not split into 3 candidate copies"):
            CandidateStack(twins)(x)


def test_how_many_candidates_share_a_call():
    def call(batch, size):
        return (torch.zeros(batch, 4, size, size), torch.tensor(1.0)), {}, None

    small = [call(8, 8)]
    assert candidates_sharing_a_call(small, {"guidance_scale": 0.0}) == CANDIDATE_BATCH_LATENT_PIXELS // (8 * 64)
    assert candidates_sharing_a_call(small, {"guidance_scale": 1.0}) > 1
    assert candidates_sharing_a_call(small, {"guidance_scale": 5.0}) == 1  # classifier-free guidance
    assert candidates_sharing_a_call(small, {}) == 1  # the pipeline's own default guidance
    assert candidates_sharing_a_call([call(8, 64)], {"guidance_scale": 0.0}) == 1  # SDXL at 512x512


def test_a_repeated_call_repeats_only_batched_inputs():
    sample, timestep, text = torch.randn(2, 4, 8, 8), torch.tensor(3.0), torch.randn(2, 77, 32)
    added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}
    args, kwargs = repeated_call(((sample, timestep), {"encoder_hidden_states": text, "added_cond_kwargs": added}), 3)
    assert torch.equal(args[0], torch.cat([sample] * 3)) and args[1] is timestep
    assert torch.equal(kwargs["encoder_hidden_states"], torch.cat([text] * 3))
    assert torch.equal(kwargs["added_cond_kwargs"]["time_ids"], torch.cat([added["time_ids"]] * 3))
