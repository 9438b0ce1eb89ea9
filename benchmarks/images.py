"""Image grids for the benchmark report: small pure functions on [0, 1] numpy images."""

from __future__ import annotations

import math

import numpy as np


def to_uint8(image) -> np.ndarray:
    """[0, 1] float image -> uint8 [H, W, 3]."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def upscale_nearest(image: np.ndarray, factor: int) -> np.ndarray:
    return image.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else image


def downscale_box(image: np.ndarray, factor: int) -> np.ndarray:
    """Average over factor x factor blocks (edge rows/columns that do not fill a block are dropped)."""
    if factor <= 1:
        return image
    h, w = image.shape[0] // factor, image.shape[1] // factor
    blocks = image[:h * factor, :w * factor].reshape(h, factor, w, factor, -1)
    return blocks.mean(axis=(1, 3))


def resize_to_cell(image: np.ndarray, min_cell: int, max_cell: int) -> np.ndarray:
    """Enlarge (nearest neighbour) or shrink (box average) by an integer factor toward the cell size."""
    side = max(image.shape[:2])
    if side < min_cell:
        return upscale_nearest(image, math.ceil(min_cell / side))
    if side > max_cell:
        return downscale_box(image, math.ceil(side / max_cell))
    return image


def image_grid(rows, gap: int = 4, background: int = 255, min_cell: int = 128, max_cell: int = 128) -> np.ndarray:
    """rows: a list of rows, each a list of same-sized [0, 1] images -> one uint8 [H, W, 3] grid.

    Cells are brought near [min_cell, max_cell] pixels by integer factors: tiny models' 32x32
    images are enlarged pixel for pixel, 512x512 ones are shrunk so the PNG stays small.
    """
    images = [[np.asarray(image, dtype=np.float64) for image in row] for row in rows]
    if not images or not images[0]:
        raise ValueError("image_grid needs at least one row with one image")
    if any(image.shape[:2] != images[0][0].shape[:2] for row in images for image in row):
        raise ValueError("every image of a grid must have the same size")
    cells = [[to_uint8(resize_to_cell(image, min_cell, max_cell)) for image in row] for row in images]
    cell_h, cell_w = cells[0][0].shape[:2]
    columns = max(len(row) for row in cells)
    grid = np.full((len(cells) * (cell_h + gap) - gap, columns * (cell_w + gap) - gap, 3), background, np.uint8)
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            top, left = r * (cell_h + gap), c * (cell_w + gap)
            grid[top:top + cell_h, left:left + cell_w] = cell
    return grid


def labelled_grid(rows, column_labels, header: int = 20, **grid_kwargs):
    """image_grid with a header line naming each column; returns a PIL image."""
    from PIL import Image, ImageDraw

    body = image_grid(rows, **grid_kwargs)
    gap = grid_kwargs.get("gap", 4)
    columns = max(len(row) for row in rows)
    cell_w = (body.shape[1] + gap) // columns - gap
    canvas = Image.new("RGB", (body.shape[1], body.shape[0] + header), "white")
    canvas.paste(Image.fromarray(body), (0, header))
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(column_labels):
        draw.text((c * (cell_w + gap) + 2, 4), str(label), fill="black")
    return canvas
