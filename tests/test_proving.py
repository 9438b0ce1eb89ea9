"""The proving ground's scenes and content checker (mixq.proving)."""

from __future__ import annotations

import dataclasses
import json
import random
import re

import numpy as np
import pytest
import torch

from mixq.proving import (Scene, Shape, accuracy, background_noise, caption, check, edge_sharpness, find_objects,
                          paraphrases, parse_caption, random_scene, render, scenes)
from mixq.proving.scenes import COLORS, RELATIONS


def test_scenes_and_images_are_deterministic_from_the_seed():
    assert scenes("train", 20, seed=3) == scenes("train", 20, seed=3)
    assert scenes("train", 20, seed=3) != scenes("train", 20, seed=4)
    scene = scenes("evaluation", 1, seed=0)[0][0]
    assert np.array_equal(render(scene, seed=1), render(scene, seed=1))
    assert not np.array_equal(render(scene, seed=1), render(scene, seed=2))  # placement jitter


def test_evaluation_prompts_never_occur_in_training_or_calibration():
    held_out = {caption_ for _, caption_ in scenes("evaluation", 300, seed=0)}
    assert len(held_out) >= 200
    seen = set()
    for split in ("train", "calibration"):
        for scene, _ in scenes(split, 2000, seed=0):
            seen.update(paraphrases(scene))
    assert not held_out & seen
    assert {scene.split() for scene, _ in scenes("evaluation", 300, seed=0)} == {"evaluation"}


def test_every_paraphrase_parses_back_to_its_scene():
    rng = random.Random(0)
    for _ in range(500):
        scene = random_scene(rng)
        for text in paraphrases(scene):
            assert parse_caption(text) == scene
            assert parse_caption("  " + text.upper() + ". ") == scene


@pytest.mark.parametrize("text", ["a red circle", "a small red hexagon on the left", "a dog"])
def test_text_outside_the_grammar_is_refused_with_an_example(text):
    with pytest.raises(ValueError, match="not a caption of the shapes grammar.*e.g."):
        parse_caption(text)


def test_invalid_scenes_are_refused():
    red = Shape("circle", "red", "small")
    with pytest.raises(ValueError, match="position"):
        Scene((red,), position="somewhere")
    with pytest.raises(ValueError, match="differ in colour"):
        Scene((red, Shape("square", "red", "large")), relation="above")
    with pytest.raises(ValueError, match="unknown shape"):
        Scene((Shape("star", "red", "small"),), position="on the left")


def test_checker_reads_every_clean_render_correctly():
    verdicts = [check(render(scene, seed=i), text)
                for i, (scene, text) in enumerate(scenes("train", 150, 0) + scenes("evaluation", 150, 0))]
    assert accuracy(verdicts)["overall"] == 1.0


def test_checker_survives_moderate_noise_and_accepts_tensors():
    rng = np.random.default_rng(0)
    verdicts = []
    for scene, _ in scenes("evaluation", 100, seed=1):
        noisy = render(scene).astype(np.float32) + rng.normal(0, 12, (64, 64, 3))
        verdicts.append(check(torch.from_numpy(np.clip(noisy, 0, 255) / 255).permute(2, 0, 1), scene))
    assert accuracy(verdicts)["overall"] >= 0.95


def other(options, current):
    return next(o for o in options if o != current)


def test_checker_catches_each_kind_of_wrong_content():
    pair = Scene((Shape("square", "blue", "large"), Shape("triangle", "yellow", "small")), relation="above")
    image = render(pair)
    assert check(image, pair).correct
    a, b = pair.objects
    wrong = {
        "color": dataclasses.replace(pair, objects=(dataclasses.replace(a, color="red"), b)),
        "shape": dataclasses.replace(pair, objects=(dataclasses.replace(a, shape="circle"), b)),
        "size": dataclasses.replace(pair, objects=(a, dataclasses.replace(b, size="large"))),
        "position": dataclasses.replace(pair, relation=other(RELATIONS, "above")),
    }
    for attribute, prompt in wrong.items():
        verdict = check(image, prompt)
        assert not getattr(verdict, attribute) and not verdict.correct, attribute
    single = Scene((a,), position="on the left")
    assert not check(image, single).count  # two objects where one was asked for
    assert check(render(single), single).correct
    assert not check(render(single), dataclasses.replace(single, position="on the right")).position


def test_blank_and_blurred_images_are_judged_by_what_they_show():
    scene = Scene((Shape("circle", "green", "large"),), position="in the center")
    blank = np.zeros((64, 64, 3), dtype=np.uint8)
    assert find_objects(blank) == [] and not check(blank, scene).color
    sharp = render(scene).astype(np.float32)
    blurred = sharp.copy()
    for _ in range(3):  # a 3x3 box blur, three times
        padded = np.pad(blurred, ((1, 1), (1, 1), (0, 0)), mode="edge")
        blurred = sum(padded[dy:dy + 64, dx:dx + 64] for dy in range(3) for dx in range(3)) / 9
    assert edge_sharpness(blurred.astype(np.uint8)) < 0.6 * edge_sharpness(sharp.astype(np.uint8))
    noisy = sharp + np.random.default_rng(0).normal(0, 10, sharp.shape)
    assert background_noise(sharp.astype(np.uint8)) < 1.0 < background_noise(np.clip(noisy, 0, 255).astype(np.uint8))


def test_accuracy_counts_each_attribute():
    scene = Scene((Shape("square", "orange", "small"),), position="at the top")
    image = render(scene)
    good, moved = check(image, scene), check(image, dataclasses.replace(scene, position="at the bottom"))
    rates = accuracy([good, moved])
    assert rates["position"] == 0.5 and rates["color"] == 1.0 and rates["overall"] == 0.5
    assert len(COLORS) >= 6
    with pytest.raises(ValueError):
        accuracy([])


def test_grammar_tokenizer_makes_each_word_one_token_and_survives_a_pipeline_round_trip(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from mixq.offline import tiny_sdxl_pipeline
    from mixq.proving.tokenizer import grammar_clip_tokenizer, grammar_words

    tokenizer = grammar_clip_tokenizer()
    assert all(len(tokenizer.tokenize(word)) == 1 for word in grammar_words())
    text = scenes("evaluation", 1, seed=0)[0][1]
    ids = tokenizer(text, padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tokenizer.bos_token_id
    words = re.findall(r"[a-z]+|,", text)  # CLIP splits punctuation off words
    assert ids[1:len(words) + 1] == [tokenizer.convert_tokens_to_ids(w + "</w>") for w in words]
    assert len(tokenizer.tokenize("a dog")) > 2  # outside the grammar, text still tokenizes (bytes)

    pipe = tiny_sdxl_pipeline(tokenizer=tokenizer)
    pipe.save_pretrained(tmp_path)
    loaded = StableDiffusionXLPipeline.from_pretrained(tmp_path)
    assert loaded.tokenizer.get_vocab() == tokenizer.get_vocab()
    kwargs = dict(prompt=text, num_inference_steps=2, guidance_scale=0.0, height=64, width=64, output_type="np",
                  generator=torch.Generator().manual_seed(0))
    image = loaded(**kwargs).images[0]
    assert image.shape == (64, 64, 3)
    kwargs["generator"] = torch.Generator().manual_seed(0)
    assert np.allclose(image, pipe(**kwargs).images[0], atol=1e-5)


def test_training_runs_resumes_and_saves_a_loadable_pipeline(tmp_path, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    from mixq.proving import train

    args = ["--out", str(tmp_path), "--vae-steps", "2", "--pool", "16", "--batch", "2", "--base-width", "16",
            "--text-width", "32", "--save-every", "1", "--eval-prompts", "2", "--quiet"]
    stages = []
    original = train.run_stage
    monkeypatch.setattr(train, "run_stage", lambda name, *a: (stages.append(name), original(name, *a))[1])
    assert train.main(args + ["--unet-steps", "2"]) == 0
    state = torch.load(tmp_path / "train-state.pt", weights_only=False)
    assert (state["stage"], state["step"]) == ("unet", 2) and "vae" in state["done"]
    # A longer run in the same folder continues: the VAE is not trained again, the UNet from step 2.
    assert train.main(args + ["--unet-steps", "3"]) == 0
    assert stages == ["vae", "unet", "unet"]
    assert torch.load(tmp_path / "train-state.pt", weights_only=False)["step"] == 3
    result = json.loads((tmp_path / "evaluation.json").read_text())
    assert set(result["evaluation"]) >= {"color", "shape", "overall"}
    assert 0.0 <= result["vae_reconstruction"]["overall"] <= 1.0
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "pipeline")
    assert pipe.scheduler.config.prediction_type == "sample"
    assert pipe.vae.config.scaling_factor == pytest.approx(json.loads((tmp_path / "evaluation.json").read_text())
                                                           ["vae_scaling_factor"])
