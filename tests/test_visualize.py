"""Image grids: layout, pixel mapping, the saved file and bad input."""

import numpy as np
import pytest
from PIL import Image

from jax_diffusion.data import uint8_to_float
from jax_diffusion.visualize import image_grid, load_images, load_mask, save_image_grid, to_uint8


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
        (np.zeros((2, 4, 4, 4)), {}, r"shape \[N, H, W, 1 or 3\]; got \(2, 4, 4, 4\)"),
        (np.zeros((2, 4, 4, 1)), {"scale": 0}, "scale must be a positive int"),
        (np.zeros((2, 4, 4, 1)), {"ncol": 0}, "ncol must be an int >= 1 or None; got 0"),
        (np.zeros((2, 4, 4, 1)), {"padding": -1}, "padding must be an int >= 0; got -1"),
        (
            np.zeros((2, 4, 4, 1)),
            {"pad_value": 256},
            r"pad_value must be an int in \[0, 255\]; got 256",
        ),
        (
            np.zeros((2, 4, 4, 1)),
            {"pad_value": -1},
            r"pad_value must be an int in \[0, 255\]; got -1",
        ),
    ],
)
def test_bad_input_raises_value_error(images, kwargs, match):
    with pytest.raises(ValueError, match=match):
        image_grid(images, **kwargs)


def test_unknown_extension_raises_before_writing(tmp_path):
    with pytest.raises(ValueError, match="image extension"):
        save_image_grid(np.zeros((1, 2, 2, 1)), tmp_path / "grid.xyz")
    assert list(tmp_path.iterdir()) == []


def test_default_border_is_one_mid_grey_pixel():
    # the documented defaults: padding 1, pad_value 128 (mid-grey), scale 1
    grid = image_grid(-np.ones((2, 2, 3, 1)), ncol=2)
    assert grid.shape == (2 + 2, 2 * (3 + 1) + 1, 1)
    border = np.ones(grid.shape, bool)
    border[1:3, 1:4] = border[1:3, 5:8] = False
    assert np.all(grid[border] == 128) and np.all(grid[~border] == 0)


def test_save_grayscale_as_a_one_channel_image_with_any_case_extension(tmp_path):
    # a 1-channel grid is written as a greyscale ("L") image, not RGB(A); the extension is
    # matched like PIL's own registry, case-insensitively; the path comes back as given
    images = np.random.default_rng(1).uniform(-1, 1, (3, 4, 4, 1))
    path = tmp_path / "GRID.PNG"
    assert save_image_grid(images, path, pad_value=255) is path
    with Image.open(path) as saved:
        assert saved.format == "PNG" and saved.mode == "L"
        np.testing.assert_array_equal(np.asarray(saved), image_grid(images, pad_value=255)[..., 0])


def test_to_uint8_inverts_uint8_to_float_and_clips():
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(to_uint8(uint8_to_float(pixels))[..., 0], pixels)
    # the nearest of the 256 levels (x + 1) / 2 * 255, and outside [-1, 1] the end levels
    x = np.array([-3.0, -1.0, -0.999, 0.0, 0.5, 1.0, 2.0], np.float32)
    want = np.clip(np.floor((np.clip(x, -1, 1) + 1) / 2 * 255 + 0.5), 0, 255)
    np.testing.assert_array_equal(to_uint8(x), want.astype(np.uint8))


def test_to_uint8_rounds_to_the_nearest_level_even_close_to_half_way():
    # x 0.45 of a level above or below each of the 256 levels: the level itself, which takes
    # ~1e-5 of precision near 255 (a float16 (x + 1) * 127.5 is up to 0.12 off there)
    levels = np.arange(256.0)
    for offset in (0.45, -0.45):
        x = (np.clip(levels + offset, 0.0, 255.0) / 127.5 - 1.0).astype(np.float32)
        np.testing.assert_array_equal(to_uint8(x), levels.astype(np.uint8), err_msg=offset)


def _level(k):
    """Pixel values k in {0, ..., 255} as data in [-1, 1], float64: k / 127.5 - 1."""
    return np.asarray(k, np.float64) / 127.5 - 1.0


def test_load_images_reads_pixels_k_as_k_over_127_5_minus_1_in_the_run_s_channels(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    Image.fromarray(rgb).save(tmp_path / "c.png")
    got = load_images([tmp_path / "g.png", str(tmp_path / "c.png")], (8, 8, 1))
    assert got.shape == (2, 8, 8, 1) and got.dtype == np.float32
    np.testing.assert_allclose(got[0, ..., 0], _level(gray), rtol=0, atol=1e-6)
    # RGB to gray by ITU-R 601-2 luma, as PIL's convert("L"): L = R 299/1000 + G 587/1000 + ...
    luma = np.asarray(Image.fromarray(rgb).convert("L"))
    np.testing.assert_allclose(got[1, ..., 0], _level(luma), rtol=0, atol=1e-6)
    rgb_got = load_images(tmp_path / "c.png", (8, 8, 3))[0]
    np.testing.assert_allclose(rgb_got, _level(rgb), rtol=0, atol=1e-6)
    gray_as_rgb = load_images(tmp_path / "g.png", (8, 8, 3))[0]
    np.testing.assert_allclose(gray_as_rgb, np.repeat(_level(gray)[..., None], 3, -1), atol=1e-6)


def test_load_images_resizes_bicubically_and_rejects_what_it_cannot_read(tmp_path):
    big = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (32, 1))  # a horizontal ramp
    Image.fromarray(big).save(tmp_path / "big.png")
    got = load_images(tmp_path / "big.png", (8, 16, 1))[0, ..., 0]
    want = np.asarray(Image.fromarray(big).resize((16, 8), Image.Resampling.BICUBIC))
    np.testing.assert_allclose(got, _level(want), rtol=0, atol=1e-6)
    assert np.all(np.diff(got[0]) > 0)  # still a ramp, left to right
    with pytest.raises(FileNotFoundError, match="no image file .*missing.png"):
        load_images([tmp_path / "missing.png"], (8, 8, 1))
    with pytest.raises(ValueError, match="at least one image file"):
        load_images([], (8, 8, 1))
    with pytest.raises(ValueError, match=r"shape must be \[H, W, 1 or 3\]; got \(8, 8, 2\)"):
        load_images(tmp_path / "big.png", (8, 8, 2))


def test_load_mask_keeps_black_fills_white_and_resizes_by_nearest_neighbour(tmp_path):
    mask = np.zeros((16, 16), np.uint8)
    mask[:, 8:] = 255  # fill the right half
    mask[0, 0] = 127  # below 128: kept
    Image.fromarray(mask).save(tmp_path / "m.png")
    got = load_mask(tmp_path / "m.png", (16, 16, 1))
    assert got.shape == (16, 16, 1) and got.dtype == np.float32
    np.testing.assert_array_equal(got[..., 0], (mask < 128).astype(np.float32))
    small = load_mask(tmp_path / "m.png", (8, 8, 3))[..., 0]
    assert set(np.unique(small)) == {0.0, 1.0}  # no gray seam
    np.testing.assert_array_equal(small, np.repeat([[1.0] * 4 + [0.0] * 4], 8, axis=0))
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "black.png")
    with pytest.raises(ValueError, match="has no white pixel: nothing to fill in"):
        load_mask(tmp_path / "black.png", (4, 4, 1))
    with pytest.raises(FileNotFoundError, match="no image file"):
        load_mask(tmp_path / "none.png", (4, 4, 1))
