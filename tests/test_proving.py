"""The proving ground's scenes and content checker (mixq.proving)."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil

import numpy as np
import pytest
import torch

from mixq.proving import (Scene, Shape, accuracy, background_noise, check, edge_sharpness, find_objects,
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


def pixel_flood_largest_region(mask):
    """The exact reference: a breadth-first flood fill per region, pixel by pixel; the first region
    found in raster order wins ties."""
    from collections import deque

    seen, best = np.zeros_like(mask), []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        region, queue = [], deque([start])
        seen[start] = True
        while queue:
            y, x = queue.popleft()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(region) > len(best):
            best = region
    if not best:
        return None
    out = np.zeros_like(mask)
    out[tuple(np.array(best).T)] = True
    return out


@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 0.6, 0.9])
def test_largest_region_joins_runs_as_the_pixel_flood_fill_does(density):
    from mixq.proving.content import largest_region

    rng = np.random.default_rng(int(density * 100))
    masks = [rng.random((rng.integers(1, 24), rng.integers(1, 24))) < density for _ in range(300)]
    # Spirals, U shapes and equal-sized twins: regions joined only far from where they start, and ties.
    masks += [np.array([[1, 0, 1], [1, 0, 1], [1, 1, 1]], bool), np.array([[1, 1, 0, 1, 1]], bool),
              np.array([[1, 0], [0, 1]], bool), np.array([[0, 1], [1, 0]], bool), np.zeros((4, 4), bool)]
    for mask in masks:
        expected, found = pixel_flood_largest_region(mask), largest_region(mask)
        assert (found is None) == (expected is None)
        if expected is not None:
            np.testing.assert_array_equal(found, expected)


def test_palette_labels_are_those_of_the_euclidean_distances():
    from mixq.proving.content import MAX_COLOR_DISTANCE, PALETTE, palette_labels

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)
    image[0, :len(PALETTE)] = PALETTE  # exact palette colours; the background's cut-off, on and just past it
    image[1, :2] = PALETTE[0] + np.array([[-60, -60, 30], [-60, -60, 31]])
    assert np.linalg.norm(image[1, 0] - PALETTE[0]) == MAX_COLOR_DISTANCE
    distances = np.linalg.norm(image.astype(np.float64)[:, :, None] - PALETTE[None, None], axis=-1)
    expected = np.where(distances.min(-1) > MAX_COLOR_DISTANCE, -1, distances.argmin(-1))
    for candidate in (image, image.astype(np.float32)):
        np.testing.assert_array_equal(palette_labels(candidate), expected)
    assert palette_labels(image)[1, :2].tolist() == [0, -1]


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


def box_blurred(image: np.ndarray, times: int) -> np.ndarray:
    blurred = image.astype(np.float32)
    for _ in range(times):  # a 3x3 box blur
        padded = np.pad(blurred, ((1, 1), (1, 1), (0, 0)), mode="edge")
        blurred = sum(padded[dy:dy + 64, dx:dx + 64] for dy in range(3) for dx in range(3)) / 9
    return np.round(blurred).astype(np.uint8)


@pytest.mark.parametrize("size", ["small", "large"])
def test_soft_shapes_are_classified_by_their_outline(size):
    """A small triangle whose corners a generator rounded off is still a triangle (its bounding-box
    fill alone would say circle), and circles and squares are not mistaken for each other."""
    for shape in ("circle", "square", "triangle"):
        scene = Scene((Shape(shape, "green", size),), position="in the center")
        for times in (0, 1, 2):
            (found,) = find_objects(box_blurred(render(scene), times))
            assert found.shape == shape, (shape, size, times)


def stored_dtypes(folder) -> set[str]:
    from safetensors import safe_open

    dtypes = set()
    for path in folder.rglob("*.safetensors"):
        with safe_open(path, "pt") as f:
            dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}
    return dtypes


def test_shipped_pipeline_loads_through_diffusers_and_draws_what_is_asked():
    """The package data is a diffusers save_pretrained folder of fp16 safetensors within 20 MB, loaded
    by StableDiffusionXLPipeline.from_pretrained, and its float images pass the checker on held-out
    prompts (the README's 200-prompt figure is the full measurement)."""
    from diffusers import StableDiffusionXLPipeline

    from mixq.proving import PIPELINE_FOLDER, evaluation_prompts, generate, load_pipeline, score_images

    files = [p for p in PIPELINE_FOLDER.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    assert {p.parent.name for p in files if p.suffix == ".safetensors"} == {"unet", "vae", "text_encoder",
                                                                             "text_encoder_2"}
    assert stored_dtypes(PIPELINE_FOLDER) == {"F16"}
    pipe = StableDiffusionXLPipeline.from_pretrained(PIPELINE_FOLDER)
    assert pipe.unet.config.addition_embed_type == "text_time" and pipe.text_encoder_2.config.projection_dim
    pipe = load_pipeline()
    assert pipe.unet.dtype == torch.float32
    pairs = evaluation_prompts(40)
    scores = score_images(generate(pipe, [text for _, text in pairs], seed=0), [scene for scene, _ in pairs])
    assert scores["content"]["overall"] >= 0.8, scores


def test_shipping_replaces_the_package_folder_whole(tmp_path):
    from mixq.offline import tiny_sdxl_pipeline
    from mixq.proving.model import ship

    folder = tmp_path / "pipeline"
    (folder / "stale").mkdir(parents=True)
    (tmp_path / "pipeline.old").mkdir()  # left by a save that died between its renames
    pipe = tiny_sdxl_pipeline(seed=0)
    ship(pipe, folder)
    assert not (folder / "stale").exists() and (folder / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]  # no staging or old copy left
    assert stored_dtypes(folder) == {"F16"}
    assert pipe.unet.dtype == torch.float32  # the caller's pipeline is not cast


def test_shipped_tokenizers_load_from_their_vocabulary_files_alone(tmp_path):
    """transformers 4.x's slow CLIPTokenizer reads vocab.json and merges.txt only: from those alone
    the shipped tokenizers give the ids that tokenizer.json gives."""
    from transformers import CLIPTokenizer

    from mixq.proving import PIPELINE_FOLDER, evaluation_prompts

    texts = [text for _, text in evaluation_prompts(20)]
    for name in ("tokenizer", "tokenizer_2"):
        alone = tmp_path / name
        alone.mkdir()
        for file in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            shutil.copy(PIPELINE_FOLDER / name / file, alone / file)
        expected = CLIPTokenizer.from_pretrained(PIPELINE_FOLDER / name)(texts).input_ids
        assert CLIPTokenizer.from_pretrained(alone)(texts).input_ids == expected
        assert max(len(ids) for ids in expected) < 20  # the grammar's words are single tokens


def test_missing_shipped_pipeline_says_how_to_make_it(tmp_path, monkeypatch):
    from mixq.errors import ModelLoadError
    from mixq.proving import model

    monkeypatch.setattr(model, "PIPELINE_FOLDER", tmp_path / "absent")
    with pytest.raises(ModelLoadError, match="python -m mixq.proving.train .* --ship"):
        model.load_pipeline()


def test_proving_prompt_sets_keep_evaluation_held_out():
    from mixq.calib.prompts import load_prompts
    from mixq.errors import PromptFileError
    from mixq.proving import evaluation_prompts

    calibration = load_prompts("proving:calibration", 64)
    assert len(set(calibration)) == 64
    held_out = {scene.key() for scene, _ in evaluation_prompts(500)}
    assert not held_out & {parse_caption(text).key() for text in calibration}
    with pytest.raises(PromptFileError, match="proving:calibration.*held out"):
        load_prompts("proving:evaluation", 8)


def test_demo_reports_content_accuracy_of_quantized_pipelines(capsys):
    from mixq.__main__ import main as demo

    demo(["--num-prompts", "4", "--eval-prompts", "6"])
    lines = capsys.readouterr().out.splitlines()
    accuracy_of = {}
    for line in lines:
        match = re.match(r"(float|W8A8|W4A8): content (\d+\.\d)%", line)
        if match:
            accuracy_of[match.group(1)] = float(match.group(2))
    assert set(accuracy_of) == {"float", "W8A8", "W4A8"} and all(0 <= v <= 100 for v in accuracy_of.values())
    assert accuracy_of["float"] >= 80 and accuracy_of["W8A8"] >= 80  # 99.5 % and 99.0 % on 200 prompts
    assert any("W4A8" in line and "image PSNR" in line and "fp16 weights" in line for line in lines)
