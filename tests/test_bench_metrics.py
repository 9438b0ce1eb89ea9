"""Image metrics (mixq.metrics) and the benchmark report's grids (benchmarks/images.py)."""

import math

import numpy as np
import pytest
import torch

from benchmarks.images import image_grid, labelled_grid
from mixq.metrics import batch_ssim, box_means, near_global_window, psnr, ssim


def random_image(shape=(32, 32, 3), seed=0):
    return np.random.default_rng(seed).random(shape)


def brute_force_ssim(a, b, window, data_range=1.0):
    """SSIM by explicit loops over windows: the definition, for checking the integral-image version."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    scores = []
    for i in range(a.shape[0] - window + 1):
        for j in range(a.shape[1] - window + 1):
            x, y = a[i:i + window, j:j + window], b[i:i + window, j:j + window]
            mx, my = x.mean(), y.mean()
            vx, vy, cov = x.var(), y.var(), ((x - mx) * (y - my)).mean()
            scores.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(scores))


def test_identical_images_have_infinite_psnr_and_unit_ssim():
    image = random_image()
    assert psnr(image, image) == math.inf
    assert ssim(image, image) == pytest.approx(1.0)
    assert ssim(image, image, window=7) == pytest.approx(1.0)


def test_psnr_of_a_known_error():
    reference = np.zeros((8, 8, 3))
    assert psnr(reference, reference + 0.1) == pytest.approx(20.0)  # MSE 0.01 -> 10*log10(1/0.01)
    assert psnr(reference, reference + 0.01) == pytest.approx(40.0)
    assert psnr(reference * 255, reference * 255 + 25.5, data_range=255) == pytest.approx(20.0)


def test_global_ssim_matches_the_closed_form():
    # Window = whole image: one window, so SSIM is the formula on whole-image statistics.
    a = np.array([[0.0, 1.0], [1.0, 0.0]])  # mean 0.5, variance 0.25
    b = np.full((2, 2), 0.5)  # same mean, no variance, no covariance
    c1, c2 = 0.01**2, 0.03**2
    expected = ((2 * 0.25 + c1) * c2) / ((0.25 + 0.25 + c1) * (0.25 + c2))
    assert ssim(a, b, window=2) == pytest.approx(expected)


def test_inverted_image_has_negative_ssim():
    a = random_image((16, 16))
    assert ssim(a, 1.0 - a) < -0.9


def test_ssim_agrees_with_the_definition_for_local_windows():
    a, b = random_image((12, 10), seed=1), random_image((12, 10), seed=2)
    b = 0.7 * a + 0.3 * b  # correlated, so the score is far from 0
    for window in (3, 5, 9):
        assert ssim(a, b, window=window) == pytest.approx(brute_force_ssim(a, b, window), rel=1e-9)


def test_default_ssim_window_is_near_global():
    assert near_global_window(512, 512) == 511
    assert near_global_window(32, 48) == 31
    assert near_global_window(33, 64) == 33
    a, b = random_image((9, 9, 1), seed=3), random_image((9, 9, 1), seed=4)
    assert ssim(a, b) == pytest.approx(brute_force_ssim(a[..., 0], b[..., 0], 9))


def test_ssim_and_psnr_reject_mismatched_images():
    with pytest.raises(ValueError, match="shape"):
        psnr(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="window"):
        ssim(np.zeros((4, 4)), np.zeros((4, 4)), window=5)


def test_box_means():
    x = np.arange(16, dtype=float).reshape(4, 4)
    means = box_means(x, 2)
    assert means.shape == (3, 3)
    assert means[0, 0] == pytest.approx((0 + 1 + 4 + 5) / 4)
    assert box_means(x, 4)[0, 0] == pytest.approx(x.mean())


@pytest.mark.parametrize("shape", [(8, 3, 64, 64), (3, 3, 17, 20), (2, 1, 9, 9)])
def test_batch_ssim_is_the_mean_of_per_image_ssim_bit_for_bit(shape):
    # Sensitivity ranks content layers by SSIMs that differ from 1 in the 6th decimal: the batched
    # computation must not move a single bit.
    generator = torch.Generator().manual_seed(sum(shape))
    reference = torch.rand(shape, generator=generator)
    images = (reference + 1e-3 * torch.randn(shape, generator=generator)).clamp(0, 1)
    per_image = [ssim(r, i) for r, i in zip(reference.permute(0, 2, 3, 1).numpy(), images.permute(0, 2, 3, 1).numpy())]
    assert batch_ssim(reference, images) == float(np.mean(per_image))
    assert batch_ssim(reference, reference) == 1.0


def test_box_means_of_a_batch_are_each_slice_alone():
    x = np.random.default_rng(0).random((2, 3, 11, 13))
    together = box_means(x, 5)
    assert all(np.array_equal(together[n, c], box_means(np.ascontiguousarray(x[n, c]), 5)) for n in range(2) for c in range(3))


def test_batch_ssim_rejects_mismatched_batches():
    with pytest.raises(ValueError, match="N, C, H, W"):
        batch_ssim(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 9))


def test_image_grid_places_and_enlarges_cells():
    black, white = np.zeros((2, 2, 3)), np.ones((2, 2))
    grid = image_grid([[black, white], [white, black]], gap=1, min_cell=4, max_cell=4)
    # cells enlarged 2x (4 px), 1 px gaps: 2 * 4 + 1 pixels each way
    assert grid.shape == (9, 9, 3) and grid.dtype == np.uint8
    assert (grid[:4, :4] == 0).all() and (grid[:4, 5:] == 255).all() and (grid[5:, :4] == 255).all()
    assert (grid[4, :] == 255).all()  # the gap uses the white background


def test_image_grid_shrinks_large_images_by_block_averages():
    image = np.zeros((8, 8, 3))
    image[:4, :4] = 1.0  # one white quadrant
    grid = image_grid([[image]], min_cell=2, max_cell=2)
    assert grid.shape == (2, 2, 3)
    assert grid[0, 0].tolist() == [255, 255, 255] and grid[1, 1].tolist() == [0, 0, 0]


def test_image_grid_rejects_mixed_sizes():
    with pytest.raises(ValueError, match="same size"):
        image_grid([[np.zeros((2, 2, 3)), np.zeros((3, 3, 3))]])


def test_labelled_grid_adds_a_header():
    grid = labelled_grid([[random_image((8, 8, 3)), random_image((8, 8, 3))]], ["fp16", "W8A8"], gap=2,
                         min_cell=8, max_cell=8)
    assert grid.size == (8 * 2 + 2, 8 + 20)
