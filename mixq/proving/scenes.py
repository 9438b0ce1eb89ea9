"""Synthetic compositional scenes: flat shapes in named colours at named places, their captions, and
their images, all deterministic from a seed.

A scene is one object at a named position ("a small red circle on the left") or two objects in a
relation ("a large blue square above a small yellow triangle"). Images are 64x64 RGB by default, on a
dark grey background, anti-aliased by supersampling. Every scene belongs to one split (train,
calibration or evaluation) by a stable hash of its specification, so evaluation prompts never occur in
training or calibration, whatever the seeds.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

import numpy as np

COLORS = {  # name -> RGB; far apart from each other and from the background
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
BACKGROUND = (60, 60, 60)
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.11, "large": 0.2}  # half-extent as a fraction of the image side
POSITIONS = {  # centre as fractions of (width, height); y grows downwards
    "on the left": (0.25, 0.5),
    "on the right": (0.75, 0.5),
    "at the top": (0.5, 0.25),
    "at the bottom": (0.5, 0.75),
    "in the center": (0.5, 0.5),
}
RELATIONS = {  # relation of the first object to the second -> unit offset of the first from the second
    "above": (0.0, -1.0),
    "below": (0.0, 1.0),
    "to the left of": (-1.0, 0.0),
    "to the right of": (1.0, 0.0),
}
SPLITS = ("train", "calibration", "evaluation")
SPLIT_SHARES = {"calibration": 0.05, "evaluation": 0.1}  # the rest is train
JITTER = 0.04  # random shift of a scene's objects, fraction of the image side


@dataclass(frozen=True)
class Shape:
    shape: str
    color: str
    size: str

    def words(self) -> str:
        return f"{self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """One object with a position, or two objects with the relation of the first to the second."""

    objects: tuple[Shape, ...]
    position: str | None = None
    relation: str | None = None

    def __post_init__(self):
        for obj in self.objects:
            if obj.shape not in SHAPES or obj.color not in COLORS or obj.size not in SIZES:
                raise ValueError(f"unknown shape, colour or size in {obj}: choose from {SHAPES}, {tuple(COLORS)}, "
                                 f"{tuple(SIZES)}")
        if len(self.objects) == 1 and self.position not in POSITIONS:
            raise ValueError(f"a one-object scene needs a position from {tuple(POSITIONS)}, got {self.position!r}")
        if len(self.objects) == 2:
            if self.relation not in RELATIONS:
                raise ValueError(f"a two-object scene needs a relation from {tuple(RELATIONS)}, got {self.relation!r}")
            if self.objects[0].color == self.objects[1].color:
                raise ValueError("the two objects of a scene must differ in colour (the checker tells them apart "
                                 "by it)")
        if len(self.objects) not in (1, 2):
            raise ValueError(f"scenes hold one or two objects, got {len(self.objects)}")

    def key(self) -> str:
        """Canonical text of the specification (paraphrases share it)."""
        if len(self.objects) == 1:
            return f"{self.objects[0].words()} | {self.position}"
        return f"{self.objects[0].words()} | {self.relation} | {self.objects[1].words()}"

    def split(self) -> str:
        fraction = int(hashlib.sha256(self.key().encode()).hexdigest()[:8], 16) / 16**8
        if fraction < SPLIT_SHARES["evaluation"]:
            return "evaluation"
        if fraction < SPLIT_SHARES["evaluation"] + SPLIT_SHARES["calibration"]:
            return "calibration"
        return "train"


# --- sampling and captions -----------------------------------------------------------------------

ONE_OBJECT_TEMPLATES = ("a {a} {where}", "{where}, a {a}", "there is a {a} {where}", "a picture of a {a} {where}")
TWO_OBJECT_TEMPLATES = ("a {a} {rel} a {b}", "there is a {a} {rel} a {b}", "a picture of a {a} {rel} a {b}")


def random_shape(rng: random.Random, exclude_color: str | None = None) -> Shape:
    colors = [c for c in COLORS if c != exclude_color]
    return Shape(rng.choice(SHAPES), rng.choice(colors), rng.choice(tuple(SIZES)))


def random_scene(rng: random.Random, two_objects_share: float = 0.5) -> Scene:
    first = random_shape(rng)
    if rng.random() >= two_objects_share:
        return Scene((first,), position=rng.choice(tuple(POSITIONS)))
    return Scene((first, random_shape(rng, exclude_color=first.color)), relation=rng.choice(tuple(RELATIONS)))


def templates(scene: Scene) -> tuple[str, ...]:
    return ONE_OBJECT_TEMPLATES if len(scene.objects) == 1 else TWO_OBJECT_TEMPLATES


def caption(scene: Scene, variant: int = 0) -> str:
    """The scene's caption; `variant` picks one of its paraphrases (templates(scene))."""
    template = templates(scene)[variant]
    if len(scene.objects) == 1:
        return template.format(a=scene.objects[0].words(), where=scene.position)
    a, b = scene.objects
    return template.format(a=a.words(), rel=scene.relation, b=b.words())


def paraphrases(scene: Scene) -> list[str]:
    return [caption(scene, variant) for variant in range(len(templates(scene)))]


def scenes(split: str, count: int, seed: int) -> list[tuple[Scene, str]]:
    """`count` (scene, caption) pairs of one split, deterministic from the seed; distinct scenes while
    the split has enough of them."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose from {SPLITS}")
    rng = random.Random(f"{split}:{seed}")
    seen, pairs, tries = set(), [], 0
    while len(pairs) < count:
        scene = random_scene(rng)
        tries += 1
        if scene.split() != split or (scene.key() in seen and tries < 200 * count):
            continue
        seen.add(scene.key())
        pairs.append((scene, caption(scene, rng.randrange(len(templates(scene))))))
    return pairs


# --- images ----------------------------------------------------------------------------------------


def place(scene: Scene, rng: random.Random) -> list[tuple[float, float]]:
    """Centres (fractions of the image side) of the scene's objects: the named position, or the two
    objects apart along the relation's axis, shifted together by a random jitter."""
    dx, dy = rng.uniform(-JITTER, JITTER), rng.uniform(-JITTER, JITTER)
    if len(scene.objects) == 1:
        x, y = POSITIONS[scene.position]
        return [(x + dx, y + dy)]
    ux, uy = RELATIONS[scene.relation]
    # Each centre sits `offset` from the middle: the objects are at least 0.08 apart (two large ones)
    # and 0.4 between centres, and both stay inside the image whatever the jitter.
    gap = 0.08
    offset = max((SIZES[scene.objects[0].size] + SIZES[scene.objects[1].size] + gap) / 2, 0.2)
    return [(0.5 + dx + ux * offset, 0.5 + dy + uy * offset), (0.5 + dx - ux * offset, 0.5 + dy - uy * offset)]


def shape_mask(shape: str, cx: float, cy: float, r: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean coverage of one shape (centre cx, cy and half-extent r, all in pixels)."""
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r**2
    if shape == "square":
        return (np.abs(xs - cx) <= r) & (np.abs(ys - cy) <= r)
    # An upward isosceles triangle filling the square's height: apex at the top, base at the bottom.
    t = (ys - (cy - r)) / (2 * r)
    return (t >= 0) & (t <= 1) & (np.abs(xs - cx) <= r * t)


def render(scene: Scene, seed: int = 0, size: int = 64, supersample: int = 4) -> np.ndarray:
    """The scene as uint8 RGB [size, size, 3]; the object placement jitter follows the seed."""
    rng = random.Random(f"render:{seed}:{scene.key()}")
    n = size * supersample
    coords = (np.arange(n) + 0.5) / supersample
    xs, ys = np.meshgrid(coords, coords)
    image = np.empty((n, n, 3), dtype=np.float32)
    image[:] = BACKGROUND
    for obj, (cx, cy) in zip(scene.objects, place(scene, rng)):
        mask = shape_mask(obj.shape, cx * size, cy * size, SIZES[obj.size] * size, xs, ys)
        image[mask] = COLORS[obj.color]
    image = image.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))
    return np.round(image).astype(np.uint8)


# --- captions back to scenes -----------------------------------------------------------------------

def _object_group(name: str) -> str:
    return (f"(?P<{name}_size>{'|'.join(SIZES)}) (?P<{name}_color>{'|'.join(COLORS)}) "
            f"(?P<{name}_shape>{'|'.join(SHAPES)})")


def _pattern(template: str) -> re.Pattern:
    """A template as a regex with named groups (a_size, a_color, ..., where, rel)."""
    fields = {"a": _object_group("a"), "b": _object_group("b"), "where": f"(?P<where>{'|'.join(POSITIONS)})",
              "rel": f"(?P<rel>{'|'.join(RELATIONS)})"}
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    regex = "".join(re.escape(part) if i % 2 == 0 else fields[part] for i, part in enumerate(parts))
    return re.compile(regex + r"\.?")


_PATTERNS = [_pattern(t) for t in ONE_OBJECT_TEMPLATES + TWO_OBJECT_TEMPLATES]


def parse_caption(text: str) -> Scene:
    """The scene a caption of this grammar describes (any paraphrase; case and spacing are free)."""
    normal = " ".join(text.lower().split())
    for pattern in _PATTERNS:
        match = pattern.fullmatch(normal)
        if match:
            g = match.groupdict()
            first = Shape(g["a_shape"], g["a_color"], g["a_size"])
            if "where" in g:
                return Scene((first,), position=g["where"])
            return Scene((first, Shape(g["b_shape"], g["b_color"], g["b_size"])), relation=g["rel"])
    raise ValueError(f"{text!r} is not a caption of the shapes grammar: expected e.g. {caption(EXAMPLE)!r} or "
                     f"{caption(EXAMPLE_PAIR)!r}")


EXAMPLE = Scene((Shape("circle", "red", "small"),), position="on the left")
EXAMPLE_PAIR = Scene((Shape("square", "blue", "large"), Shape("triangle", "yellow", "small")), relation="above")
