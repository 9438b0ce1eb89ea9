"""The proving ground: synthetic scenes of flat shapes whose content can be checked, for measuring what
quantization does to what an image shows.

    from mixq.proving import scenes, render, check, accuracy
    pairs = scenes("evaluation", 200, seed=0)           # (Scene, caption) pairs, disjoint from training
    verdict = check(image, "a small red circle above a large blue square")

    pipe = load_pipeline()                               # the trained pipeline shipped in mixq
    images = generate(pipe, [text for _, text in evaluation_prompts(200)], seed=0)
    verdicts = verdicts_for(images, [scene for scene, _ in evaluation_prompts(200)])  # one per prompt
    pipe.load_lora_weights(LORA_FOLDER)                  # a shipped LoRA that swaps red and blue (mixq.proving.lora)
"""

from .content import Verdict, accuracy, background_noise, check, edge_sharpness, find_objects
from .evaluate import evaluation_prompts, generate, save_grid, score_images, verdicts_for
from .lora import LORA_FOLDER
from .model import PIPELINE_FOLDER, SAMPLING, load_pipeline
from .scenes import Scene, Shape, caption, paraphrases, parse_caption, random_scene, render, scenes

__all__ = ["LORA_FOLDER", "PIPELINE_FOLDER", "SAMPLING", "Scene", "Shape", "Verdict", "accuracy", "background_noise", "caption", "check",
           "edge_sharpness", "evaluation_prompts", "find_objects", "generate", "load_pipeline", "paraphrases",
           "parse_caption", "random_scene", "render", "save_grid", "scenes", "score_images", "verdicts_for"]
