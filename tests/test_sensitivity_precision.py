"""Sensitivity of a half-precision pipeline is measured in float32 against a float32 reference, above
a measured noise floor: on a small bf16 model more bits score better for nearly every layer, and the
floor recorded with the table is the one of the measurement, far above the serving precision's."""

import copy
import math
import random

import pytest
import torch
import yaml

from mixq.api import calibrate_ranges
from mixq.calib.collect import collect_reference
from mixq.calib.config import BitsConfig
from mixq.calib.distributed import World
from mixq.calib.sensitivity import (Evaluator, LayerClock, estimate_line, load_measurement, measure_noise_floor,
                                    measure_sensitivity, measurement_precision, noise_floor_line, noise_floor_probes,
                                    one_ulp_perturbed)
from mixq.layers import quantizable_layers

KWARGS = {"num_inference_steps": 1, "guidance_scale": 0.0}
PROMPTS = ["a red cube on a blue floor", "two green spheres at dawn", "a yellow cone beside a lake"]
SERVING = torch.bfloat16  # 8 mantissa bits: the noisier of the two half-precision types


@pytest.fixture(scope="module")
def half_precision_run(_tiny_sdxl_master, tmp_path_factory):
    pipe = copy.deepcopy(_tiny_sdxl_master).to(SERVING)
    layers = quantizable_layers(pipe.unet)
    calibration = calibrate_ranges(pipe, PROMPTS, batch_size=4, seed=1, progress=False, layers=layers, **KWARGS)
    evaluator = Evaluator(pipe, collect_reference(pipe, PROMPTS[:2], 1, KWARGS, 4), 1, KWARGS, 4)
    names = list(layers)
    sample = sorted(random.Random(0).sample(names, 40), key=names.index)
    before = {n: p.clone() for n, p in pipe.unet.state_dict().items()}
    table_path = tmp_path_factory.mktemp("sensitivity") / "sensitivity.yaml"
    messages = []
    table = measure_sensitivity(pipe, {n: layers[n] for n in sample}, calibration, evaluator,
                                BitsConfig(weight_content=[2, 4, 8], weight_quality=[2, 4, 8], activation=[4, 8]),
                                table_path, progress=False, log=messages.append)
    return pipe, evaluator, table, table_path, before, messages


def strictly_increasing(scores: dict) -> bool:
    values = [scores[b] for b in sorted(scores)]
    return all(a < b for a, b in zip(values, values[1:]))


def test_more_bits_score_better_for_nearly_every_layer(half_precision_run):
    _, _, table, _, _, _ = half_precision_run
    ordered = [strictly_increasing(row["weight"]) for row in table.values()]
    assert sum(ordered) >= 0.95 * len(ordered), [n for n, ok in zip(table, ordered) if not ok]
    assert sum(strictly_increasing(row["activation"]) for row in table.values()) >= 0.95 * len(table)


def test_quality_scores_are_resolved_above_the_recorded_floor(half_precision_run):
    _, _, table, table_path, _, _ = half_precision_run
    measurement = yaml.safe_load(table_path.read_text())["measurement"]
    assert measurement["dtype"] == "float32" and measurement["serving_dtype"] == "bfloat16"
    floor = measurement["noise_floor"]["sqnr_db"]
    quality = [row for row in table.values() if row["group"] == "quality"]
    assert len(quality) >= 10
    gaps = [row["weight"][8] - row["weight"][4] for row in quality]
    assert sum(g >= 3.0 for g in gaps) >= 0.95 * len(gaps), gaps
    assert sum(row["weight"][8] <= floor - 3.0 for row in quality) >= 0.95 * len(quality), floor


def test_content_scores_are_resolved_above_the_floor(half_precision_run):
    _, _, table, table_path, _, _ = half_precision_run
    floor_ssim = yaml.safe_load(table_path.read_text())["measurement"]["noise_floor"]["ssim"]
    content = [row for row in table.values() if row["group"] == "content"]
    assert len(content) >= 10
    # W8's image change is at least twice the change of a one-ulp perturbation
    assert sum(1 - row["weight"][8] >= 2 * (1 - floor_ssim) for row in content) >= 0.95 * len(content)


def test_the_serving_precision_could_not_resolve_what_float32_does(half_precision_run):
    pipe, evaluator, _, table_path, _, _ = half_precision_run
    probes = noise_floor_probes(list(quantizable_layers(pipe.unet)))
    serving_floor = measure_noise_floor(evaluator, pipe.unet, probes)["sqnr_db"]
    measured_floor = yaml.safe_load(table_path.read_text())["measurement"]["noise_floor"]["sqnr_db"]
    assert measured_floor > serving_floor + 30.0


def test_pipeline_is_back_in_its_serving_dtype_with_the_same_weights(half_precision_run):
    pipe, _, _, _, before, _ = half_precision_run
    assert pipe.unet.dtype == SERVING and pipe.vae.dtype == SERVING
    after = pipe.unet.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_the_time_estimate_is_logged_after_the_first_layers(half_precision_run):
    _, _, table, _, _, messages = half_precision_run
    estimates = [m for m in messages if "s per layer over the first 3" in m]
    assert len(estimates) == 1 and f"for the {len(table) - 3} layers left" in estimates[0]


def test_one_ulp_perturbation_moves_every_weight_to_a_neighbour():
    layer = torch.nn.Linear(16, 8).to(torch.bfloat16)
    twin = one_ulp_perturbed(layer, seed=0)
    w, v = layer.weight.data, twin.weight.data
    assert torch.all(w != v) and torch.equal(twin.bias, layer.bias)
    up, down = torch.nextafter(w, torch.full_like(w, math.inf)), torch.nextafter(w, torch.full_like(w, -math.inf))
    assert torch.all((v == up) | (v == down)) and (v == up).any() and (v == down).any()


def test_measurement_precision_leaves_float32_pipelines_alone(_tiny_sdxl_master):
    unet = _tiny_sdxl_master.unet
    weight = unet.conv_in.weight
    with measurement_precision(_tiny_sdxl_master) as dtype:
        assert dtype == torch.float32 and unet.conv_in.weight is weight


def test_probes_spread_over_the_model():
    names = [f"l{i}" for i in range(10)]
    assert noise_floor_probes(names) == ["l0", "l4", "l9"]
    assert noise_floor_probes(names[:2]) == ["l0", "l1"]


def test_clock_weighs_the_layers_left_by_their_group():
    clock = LayerClock()
    for group, seconds in (("quality", 1.0), ("quality", 3.0), ("content", 10.0)):
        clock.record(group, seconds)
    assert clock.per_layer("quality") == 2.0 and clock.per_layer() == pytest.approx(14 / 3)
    assert clock.expected_seconds(["quality", "content", "content"]) == pytest.approx(22.0)
    line = estimate_line(clock, ["quality"] * 90, World(0, 2))
    assert "over the first 3" in line and "expected 3 min for the 90 layers left on each of the 2" in line




def test_report_sentence_names_the_floor(half_precision_run):
    _, _, _, table_path, _, _ = half_precision_run
    line = noise_floor_line(load_measurement(table_path))
    assert line.startswith("Measured in float32 (serving dtype bfloat16)") and "dB" in line
    assert "not recorded" in noise_floor_line(None)
