"""The one-off A/B benchmarks run end to end on small inputs and print what their results files quote.

Structure only: the numbers they print are measurements, asserted nowhere.
"""

import json
import re

import pytest

from benchmarks import (held_weights_ab, native_quantization_ab, packed_gemm_layers, proving_unet_ab,
                        sensitivity_batching_ab, unet_speed_ab, vae_layers)
from mixq.kernels import native, onednn
from mixq.offline import SDXL_UNET_STRUCTURE, shrink_unet_config


@pytest.mark.skipif(onednn.unavailable_reason() is not None, reason="needs the oneDNN int8 kernels")
def test_held_weights_ab_compares_both_arms_and_their_bytes(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(shrink_unet_config(SDXL_UNET_STRUCTURE)))
    assert held_weights_ab.main(["--unet-config", str(config), "--latents", "8", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"8x8 latents, 1 alternating rounds: bf16 .* W8A8 held once .* W8A8 layout beside .* held / "
                     r"beside \d", out)
    held, beside = map(int, re.search(r"\((\d+) / (\d+) bytes\)", out).groups())
    assert 0 < held < beside  # the layout alone, against the plain buffer and the layout beside it


def test_vae_layers_ranks_every_decoder_layer_and_checks_the_largest(capsys):
    assert vae_layers.main(["--prompts", "2", "--confirm", "4", "--calibration-prompts", "2"]) == 0
    out = capsys.readouterr().out
    ranked = re.findall(r"^  (vae\.decoder\.\S+) in float: [+-][\d.]+ dB$", out, flags=re.M)
    assert len(ranked) > 10 and any("conv_shortcut" in name for name in ranked)
    assert re.search(r"^largest: vae\.decoder\.\S+ ", out, flags=re.M)
    assert re.search(r"^prompts 2-3: .* n = 2, p = ", out, flags=re.M)


def test_vae_layers_refuses_too_few_prompts_to_confirm():
    with pytest.raises(SystemExit):
        vae_layers.main(["--prompts", "4", "--confirm", "5"])


def test_sensitivity_batching_ab_times_both_arms_on_the_same_layers(capsys):
    assert sensitivity_batching_ab.main(["--every", "101", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"config proving: 2 of 202 layers, up to \d+ candidates per call", out)
    assert re.search(r"^1 alternating rounds: one candidate per call median [\d.]+ s, candidates sharing a call "
                     r"median [\d.]+ s; per-round speed-up [\d.]+x .*rows alike bit for bit: \d of 2$", out, flags=re.M)


@pytest.mark.skipif(native.unavailable_reason() is not None or onednn.unavailable_reason() is not None,
                    reason="needs the native pass and the oneDNN int8 kernels")
def test_native_quantization_ab_times_three_arms_on_the_unet_and_a_decoder(tmp_path, capsys):
    config = tmp_path / "vae.json"
    config.write_text(json.dumps({
        "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "block_out_channels": [32, 32], "layers_per_block": 1, "norm_num_groups": 8,
        "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}))
    assert native_quantization_ab.main(["--batch", "2", "--calibration-prompts", "2", "--rounds", "1",
                                        "--vae-config", str(config), "--size", "32"]) == 0
    out = capsys.readouterr().out
    number = r"[\d.]+"
    assert re.search(rf"^proving UNet, a batch of 2 16x16 latents, float32 NCHW, 1 alternating rounds: float32 median "
                     rf"{number} ms, W8A8 torch ops median {number} ms, W8A8 native median {number} ms; torch ops / "
                     rf"native per round {number}x \[{number}, {number}\]; float32 / native {number}x", out, flags=re.M)
    assert re.search(rf"^SDXL VAE decoder \(\d+ of \d+ convolutions W8A8\), 32x32 images, bf16 channels-last, 1 "
                     rf"alternating rounds: bf16 median {number} ms", out, flags=re.M)


def test_unet_speed_ab_pairs_every_setting_with_bf16(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(shrink_unet_config(SDXL_UNET_STRUCTURE)))
    assert unet_speed_ab.main(["--unet-config", str(config), "--latents", "8", "--rounds", "2",
                               "--unpacked-arms", "--int8-gemm-arms"]) == 0
    out = capsys.readouterr().out
    ratio = r"\(\d+\.\d\dx bf16 \[\d+\.\d\d, \d+\.\d\d\]\)"
    assert re.search(rf"^8x8 latents, 2 alternating rounds: bf16 [\d.]+ s; W8A8 [\d.]+ s {ratio}; W4A8 [\d.]+ s "
                     rf"{ratio}; 4-bit plan [\d.]+ s {ratio}; W8A8, every layer on oneDNN [\d.]+ s {ratio}; W8A8, "
                     rf"every layer on fused GEMM [\d.]+ s {ratio}; W4A8, unpacked per call [\d.]+ s {ratio}; 4-bit "
                     rf"plan, unpacked per call [\d.]+ s {ratio}; load average", out, flags=re.M)


def test_packed_gemm_layers_times_five_arms_of_a_layer(capsys):
    assert packed_gemm_layers.main(["--shapes", "1", "--rounds", "1", "--latents", "32"]) == 0
    out = capsys.readouterr().out
    number = r"[\d.]+"
    ratio = rf"{number}x \[{number}, {number}\]"
    assert re.search(rf"^\| attention projection 1280, 64 rows \| {number} \| {number} \| {number} \| {number} \| "
                     rf"{number} \| {ratio} \| {ratio} \|$", out, flags=re.M)


def test_proving_unet_ab_pairs_every_setting_with_fp32(capsys):
    assert proving_unet_ab.main(["--batches", "2", "--rounds", "1", "--general-path-arms"]) == 0
    out = capsys.readouterr().out
    ratio = r"\(\d+\.\d\dx fp32 \[\d+\.\d\d, \d+\.\d\d\]\)"
    assert re.search(rf"^batch 2, 1 alternating rounds: fp32 [\d.]+ ms; W8A8 [\d.]+ ms {ratio}; W4A8 [\d.]+ ms {ratio}; "
                     rf"4-bit plan [\d.]+ ms {ratio}; W8A8, general path [\d.]+ ms {ratio}; W4A8, general path "
                     rf"[\d.]+ ms {ratio}; load average", out, flags=re.M)
