"""Image grids: NHWC arrays in [-1, 1] to a PNG a person can look at, and image files (and
inpainting masks) back to such arrays."""

from __future__ import annotations

import math
import os

import numpy as np
from etils import epath
from PIL import Image

from jax_diffusion._checks import check_int

__all__ = ["image_grid", "load_images", "load_mask", "save_image_grid", "to_uint8"]


def to_uint8(images) -> np.ndarray:
    """Pixels of images in [-1, 1] (clipped) as uint8: round((x + 1) * 127.5), the inverse of
    `data.uint8_to_float` on its grid."""
    return np.round((np.clip(np.asarray(images, np.float32), -1.0, 1.0) + 1.0) * 127.5).astype(
        np.uint8
    )


def image_grid(
    images, *, ncol: int | None = None, padding: int = 1, scale: int = 1, pad_value: int = 128
) -> np.ndarray:
    """Tiles [N, H, W, C] images in [-1, 1] into one uint8 image [rows*(H+p)+p, cols*(W+p)+p, C].

    Args:
      images: [N, H, W, C] with C in {1, 3}, values in [-1, 1] (clipped).
      ncol: images per row, >= 1 (None: ceil(sqrt(N))).
      padding: pixels of border between images (after scaling), >= 0.
      scale: integer nearest-neighbour upscaling of each image (small digits are easier to see).
      pad_value: grey level of the border in [0, 255] (mid-grey separates black-background
        images).
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must have shape [N, H, W, 1 or 3]; got {images.shape}")
    if images.shape[0] == 0:
        raise ValueError(f"images must hold at least one image; got shape {images.shape}")
    if scale < 1:
        raise ValueError(f"scale must be a positive int; got {scale}")
    # checked here, or ncol = 0 would silently mean the default and a negative padding or a
    # pad_value outside uint8 would fail later with a message naming no argument
    ncol = check_int("ncol", ncol, 1, none_ok=True)
    padding = check_int("padding", padding, 0)
    pad_value = check_int("pad_value", pad_value, 0, 255)
    n, h, w, c = images.shape
    images = np.repeat(np.repeat(images, scale, axis=1), scale, axis=2)
    h, w = h * scale, w * scale
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = np.full(
        (nrow * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, np.uint8
    )
    pixels = to_uint8(images)
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = pixels[i]
    return grid


def save_image_grid(images, path: str | os.PathLike, **kwargs) -> str | os.PathLike:
    """Writes `image_grid(images, **kwargs)` as an image at `path` (directories created).

    Args:
      images: [N, H, W, C] with C in {1, 3}, values in [-1, 1] (clipped).
      path: a local path or a URI `etils.epath` understands (e.g. gs://bucket/grid.png); the
        format follows the extension, as in `PIL.Image.save` (.png for a lossless grid).
      **kwargs: passed to `image_grid`.

    Returns:
      `path`, as given.

    Raises:
      ValueError: if the extension names no image format PIL can write.
    """
    grid = image_grid(images, **kwargs)
    out = epath.Path(path)
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None:
        raise ValueError(f"path must end in an image extension such as '.png'; got {path!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as f:
        Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(f, format=fmt)
    return path


def _open(path: str | os.PathLike) -> Image.Image:
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no image file {os.fspath(path)!r}")
    with path.open("rb") as f:
        image = Image.open(f)
        image.load()
    return image


def load_images(paths, shape: tuple[int, int, int]) -> np.ndarray:
    """Reads image files into float32 [N, H, W, C] in [-1, 1], pixel k as k / 127.5 - 1.

    Each file (any format PIL reads) is converted to grayscale (C = 1) or RGB (C = 3) and, when
    its size is not H x W, resized to it with PIL's bicubic filter, as diffusers' img2img
    pipelines do.

    Args:
      paths: image file paths (local or URIs `etils.epath` understands).
      shape: [H, W, C] with C in {1, 3}, e.g. a run's image shape.

    Raises:
      ValueError: an empty path list or a shape with C not in {1, 3}; FileNotFoundError: a
        missing file.
    """
    paths = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    if not paths:
        raise ValueError("paths must name at least one image file; got none")
    h, w, c = shape
    if c not in (1, 3):
        raise ValueError(f"shape must be [H, W, 1 or 3]; got {tuple(shape)}")
    out = []
    for path in paths:
        image = _open(path).convert("L" if c == 1 else "RGB")
        if image.size != (w, h):
            image = image.resize((w, h), Image.Resampling.BICUBIC)
        pixels = np.asarray(image, np.float32).reshape(h, w, c)
        out.append(pixels / 127.5 - 1.0)
    return np.stack(out)


def load_mask(path: str | os.PathLike, shape: tuple[int, ...]) -> np.ndarray:
    """Reads an inpainting mask file as float32 [H, W, 1]: 1 where a pixel is kept, 0 where it
    is to be filled in (`editing.repaint_sample`'s convention).

    In the file, as in diffusers' inpainting pipelines, white (gray level >= 128) marks the
    pixels to fill and black the ones to keep. A mask of another size is resized to H x W by
    nearest neighbour (no gray seam).

    Raises:
      ValueError: a mask that keeps every pixel (nothing to fill); FileNotFoundError: a
        missing file.
    """
    h, w = shape[0], shape[1]
    image = _open(path).convert("L")
    if image.size != (w, h):
        image = image.resize((w, h), Image.Resampling.NEAREST)
    keep = (np.asarray(image) < 128).astype(np.float32)[..., None]
    if keep.all():
        raise ValueError(
            f"mask {os.fspath(path)!r} has no white pixel: nothing to fill in (white, gray level "
            ">= 128, marks the pixels to fill; black the ones kept)"
        )
    return keep
