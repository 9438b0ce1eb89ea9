"""The proving ground: synthetic scenes of flat shapes whose content can be checked, for measuring what
quantization does to what an image shows.

    from mixq.proving import scenes, render, check, accuracy
    pairs = scenes("evaluation", 200, seed=0)           # (Scene, caption) pairs, disjoint from training
    verdict = check(image, "a small red circle above a large blue square")
"""

from .content import Verdict, accuracy, background_noise, check, edge_sharpness, find_objects
from .scenes import Scene, Shape, caption, paraphrases, parse_caption, random_scene, render, scenes

__all__ = ["Scene", "Shape", "Verdict", "accuracy", "background_noise", "caption", "check", "edge_sharpness",
           "find_objects", "paraphrases", "parse_caption", "random_scene", "render", "scenes"]
