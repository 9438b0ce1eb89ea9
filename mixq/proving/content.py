"""A deterministic content checker for the shapes grammar (GenEval-style): does an image show what its
prompt asked for?

Pixels are assigned to the nearest named colour (or the background, or nothing when far from all);
each colour's largest connected region is an object. Its shape is the one whose ideal outline, fitted
to the region's bounding box, overlaps the region best (intersection over union: robust to the
rounded corners of a small, slightly soft triangle, which a fill-ratio rule reads as a circle), its
size comes from the box's side, its position from its centroid. A verdict holds one boolean per attribute (count, colour, shape, size, position or
relation); `accuracy` turns many verdicts into per-attribute and overall rates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .scenes import BACKGROUND, COLORS, POSITIONS, SHAPES, SIZES, Scene, parse_caption, shape_mask

PALETTE_NAMES = ("background", *COLORS)
PALETTE = np.array([BACKGROUND, *COLORS.values()], dtype=np.float32)
PALETTE_INT = PALETTE.astype(np.int32)
MAX_COLOR_DISTANCE = 90.0  # RGB distance beyond which a pixel belongs to no named colour
MIN_AREA_FRACTION = 0.008  # regions smaller than this share of the image are noise, not objects
SIZE_THRESHOLD = SIZES["small"] + SIZES["large"]  # box side (fraction of the image) between the two sizes
ATTRIBUTES = ("count", "color", "shape", "size", "position")


@dataclass(frozen=True)
class DetectedObject:
    color: str
    area: int
    centroid: tuple[float, float]  # fractions of (width, height)
    box_side: float  # the bounding box's longer side, fraction of the image side
    fill: float  # area / bounding-box area
    shape: str  # best_fitting_shape of the region

    @property
    def size(self) -> str:
        return "large" if self.box_side >= SIZE_THRESHOLD else "small"

    @property
    def position(self) -> str:
        x, y = self.centroid
        return min(POSITIONS, key=lambda name: (POSITIONS[name][0] - x) ** 2 + (POSITIONS[name][1] - y) ** 2)


@dataclass(frozen=True)
class Verdict:
    count: bool
    color: bool
    shape: bool
    size: bool
    position: bool  # the named position of one object, or the relation between two

    @property
    def correct(self) -> bool:
        return all(asdict(self).values())


def as_rgb_uint8(image) -> np.ndarray:
    """[H, W, 3] uint8 from a uint8 array, a float array in [0, 1], a PIL image or a [3, H, W] tensor."""
    if hasattr(image, "detach"):  # a torch tensor, channels first
        image = image.detach().cpu().float().permute(1, 2, 0).numpy()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    if image.dtype != np.uint8:
        image = np.clip(np.round(image.astype(np.float32) * 255), 0, 255).astype(np.uint8)
    return image


def palette_labels(image: np.ndarray) -> np.ndarray:
    """Per pixel of an integer-valued RGB image, the index into PALETTE_NAMES of the nearest colour, or
    -1 when none is near. Squared distances are exact in int32 and rank as the distances do, so the
    labels are those of the Euclidean distances, at less than half their cost."""
    offsets = image.astype(np.int32)[:, :, None, :] - PALETTE_INT[None, None]
    squared = np.einsum("hwpc,hwpc->hwp", offsets, offsets)
    labels = squared.argmin(axis=-1)
    labels[squared.min(axis=-1) > MAX_COLOR_DISTANCE**2] = -1
    return labels


def horizontal_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row, first column and one-past-last column of every horizontal run of True, in raster order."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    rows, starts = np.nonzero(edges == 1)
    _, stops = np.nonzero(edges == -1)
    return rows, starts, stops


def largest_region(mask: np.ndarray) -> np.ndarray | None:
    """The largest 4-connected region of a boolean mask, as a boolean mask (None if empty); of equal
    largest regions, the one reached first in raster order. Runs of pixels are joined, not pixels:
    union-find over runs that overlap a run of the row above, tens of Python steps per region rather
    than one per pixel."""
    row_of, starts, stops = horizontal_runs(mask)
    if not len(row_of):
        return None
    first_run_of_row = np.searchsorted(row_of, np.arange(mask.shape[0] + 1)).tolist()
    row_of, starts, stops = row_of.tolist(), starts.tolist(), stops.tolist()
    parent = list(range(len(row_of)))

    def root(run: int) -> int:
        while parent[run] != run:
            parent[run] = parent[parent[run]]
            run = parent[run]
        return run

    for run, row in enumerate(row_of):
        for above in range(first_run_of_row[row - 1], first_run_of_row[row]) if row else ():
            if starts[above] < stops[run] and stops[above] > starts[run]:
                a, b = root(run), root(above)
                parent[max(a, b)] = min(a, b)  # a region's root is its first run in raster order
    sizes: dict[int, int] = {}
    for run in range(len(row_of)):
        sizes[root(run)] = sizes.get(root(run), 0) + stops[run] - starts[run]
    best = max(sizes, key=lambda r: (sizes[r], -r))
    out = np.zeros_like(mask)
    for run in range(len(row_of)):
        if root(run) == best:
            out[row_of[run], starts[run]:stops[run]] = True
    return out


def shape_overlaps(crop: np.ndarray) -> dict[str, float]:
    """IoU of a region (cropped to its bounding box) with each shape's ideal mask drawn in that box, as
    the renderer draws it (a square box of the longer side, centred on the crop)."""
    height, width = crop.shape
    ys, xs = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    half = max(height, width) / 2
    overlaps = {}
    for shape in SHAPES:
        ideal = shape_mask(shape, width / 2, height / 2, half, xs, ys)
        overlaps[shape] = float((ideal & crop).sum() / (ideal | crop).sum())
    return overlaps


def best_fitting_shape(crop: np.ndarray) -> str:
    overlaps = shape_overlaps(crop)
    return max(overlaps, key=overlaps.get)


def find_objects(image) -> list[DetectedObject]:
    """One object per named colour whose largest region is big enough, largest first."""
    image = as_rgb_uint8(image)
    height, width = image.shape[:2]
    labels = palette_labels(image)
    found = []
    for index, name in enumerate(PALETTE_NAMES[1:], start=1):
        region = largest_region(labels == index)
        if region is None or region.sum() < MIN_AREA_FRACTION * height * width:
            continue
        ys, xs = np.nonzero(region)
        box_w, box_h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        crop = region[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        found.append(DetectedObject(
            color=name, area=int(region.sum()),
            centroid=((xs.mean() + 0.5) / width, (ys.mean() + 0.5) / height),
            box_side=max(box_w / width, box_h / height), fill=float(region.sum() / (box_w * box_h)),
            shape=best_fitting_shape(crop)))
    return sorted(found, key=lambda obj: -obj.area)


def relation_between(first: DetectedObject, second: DetectedObject) -> str:
    dx, dy = first.centroid[0] - second.centroid[0], first.centroid[1] - second.centroid[1]
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"
    return "to the left of" if dx < 0 else "to the right of"


def check(image, prompt: Scene | str) -> Verdict:
    """The verdict on one image against its prompt (a Scene, or a caption of the grammar)."""
    scene = parse_caption(prompt) if isinstance(prompt, str) else prompt
    detected = {obj.color: obj for obj in find_objects(image)}
    matched = [detected.get(obj.color) for obj in scene.objects]
    present = all(m is not None for m in matched)
    if len(scene.objects) == 1:
        where = present and matched[0].position == scene.position
    else:
        where = present and relation_between(*matched) == scene.relation
    return Verdict(
        count=len(detected) == len(scene.objects),
        color=present,
        shape=present and all(m.shape == obj.shape for m, obj in zip(matched, scene.objects)),
        size=present and all(m.size == obj.size for m, obj in zip(matched, scene.objects)),
        position=bool(where),
    )


def accuracy(verdicts: list[Verdict]) -> dict[str, float]:
    """Share of verdicts right on each attribute, and on all of them ("overall")."""
    if not verdicts:
        raise ValueError("no verdicts to summarise")
    rates = {name: float(np.mean([getattr(v, name) for v in verdicts])) for name in ATTRIBUTES}
    rates["overall"] = float(np.mean([v.correct for v in verdicts]))
    return rates


# --- no-reference quality ------------------------------------------------------------------------


def background_noise(image) -> float:
    """RMS distance (0-255 RGB units) of the background pixels from the background colour: speckle and
    blotches that a clean image of flat shapes does not have. Pixels within 2 of an object's border
    are left out (anti-aliasing mixes colours there)."""
    image = as_rgb_uint8(image).astype(np.float32)
    background = eroded(palette_labels(image) == 0, 2)
    if not background.any():
        return float("nan")
    return float(np.sqrt(((image[background] - PALETTE[0]) ** 2).sum(axis=-1).mean()))


def eroded(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels of the mask whose whole (2 radius + 1)-square neighbourhood is in it."""
    padded = np.pad(mask, radius, constant_values=True)
    height, width = mask.shape
    out = np.ones_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out &= padded[dy:dy + height, dx:dx + width]
    return out


def edge_sharpness(image) -> float:
    """Mean of the strongest 2 % of horizontal and vertical colour steps (0-255 units): high for crisp
    shape borders, low for blurred ones."""
    image = as_rgb_uint8(image).astype(np.float32)
    steps = np.concatenate([np.linalg.norm(np.diff(image, axis=0), axis=-1).ravel(),
                            np.linalg.norm(np.diff(image, axis=1), axis=-1).ravel()])
    top = max(1, int(0.02 * steps.size))
    return float(np.sort(steps)[-top:].mean())
