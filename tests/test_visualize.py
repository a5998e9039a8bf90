"""Image grids: layout, pixel mapping, the saved file and bad input."""

import numpy as np
import pytest
from PIL import Image

from jax_diffusion.visualize import image_grid, save_image_grid


def test_grid_layout_and_pixel_values():
    # 5 constant 2x3 images with values -1, -0.5, 0, 0.5, 1 (and one out of range, clipped)
    values = np.array([-1.0, -0.5, 0.0, 0.5, 3.0])
    images = np.broadcast_to(values[:, None, None, None], (5, 2, 3, 1))
    grid = image_grid(images, padding=1, pad_value=7)
    # ceil(sqrt(5)) = 3 columns, 2 rows; each cell is (2 + 1) x (3 + 1) plus the outer border
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1, 1) and grid.dtype == np.uint8
    expected = np.round((np.clip(values, -1, 1) + 1) * 127.5)  # 0, 64, 128, 191, 255
    for i, value in enumerate(expected):
        r, c = divmod(i, 3)
        cell = grid[1 + 3 * r : 3 + 3 * r, 1 + 4 * c : 4 + 4 * c, 0]
        assert np.all(cell == value), (i, cell)
    assert np.all(grid[0] == 7) and np.all(grid[:, 0] == 7)  # the border
    assert np.all(grid[4:6, 9:12] == 7)  # the empty sixth cell


def test_scale_and_columns():
    images = np.linspace(-1, 1, 2 * 2 * 2 * 3).reshape(2, 2, 2, 3)
    grid = image_grid(images, ncol=1, padding=0, scale=2)
    assert grid.shape == (8, 4, 3)
    # nearest-neighbour upscaling: every source pixel becomes a 2x2 block
    np.testing.assert_array_equal(grid[0:2, 0:2], np.broadcast_to(grid[0, 0], (2, 2, 3)))
    np.testing.assert_array_equal(grid[::2, ::2], image_grid(images, ncol=1, padding=0))


def test_save_round_trips_through_png(tmp_path):
    images = np.random.default_rng(0).uniform(-1, 1, (4, 5, 5, 3))
    path = save_image_grid(images, tmp_path / "sub" / "grid.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path)), image_grid(images))


@pytest.mark.parametrize(
    "images, kwargs, match",
    [
        (np.zeros((0, 4, 4, 1)), {}, "at least one image"),
        (np.zeros((2, 4, 4)), {}, r"shape \[N, H, W, 1 or 3\]"),
        (np.zeros((2, 4, 4, 2)), {}, r"shape \[N, H, W, 1 or 3\]"),
        (np.zeros((2, 4, 4, 1)), {"scale": 0}, "scale must be a positive int"),
    ],
)
def test_bad_input_raises_value_error(images, kwargs, match):
    with pytest.raises(ValueError, match=match):
        image_grid(images, **kwargs)


def test_unknown_extension_raises_before_writing(tmp_path):
    with pytest.raises(ValueError, match="image extension"):
        save_image_grid(np.zeros((1, 2, 2, 1)), tmp_path / "grid.xyz")
    assert list(tmp_path.iterdir()) == []
