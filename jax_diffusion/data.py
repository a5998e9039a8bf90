"""Datasets as infinite, exactly resumable iterators of NHWC float32 batches in [-1, 1].

The datasets (`get_dataset`, `load_digits`, `toy_2d`, `tfds_iterator`) yield
`{"image": [local_B, ...] float32, "label": [local_B] int32}` NumPy dicts; an `ArrayIterator`
over arrays of your own yields them as given (scale 8-bit images first, as below). Every
iterator has `get_state() -> dict` (JSON-serialisable) and `set_state(state)`, so a checkpoint
stores the data position and a resumed run sees bit-identical batches. Sources: `load_digits`
(scikit-learn's bundled 8x8 digits, no download), `toy_2d` (2-D toy distributions), and
`tfds_iterator` (a tensorflow-datasets dataset prepared locally as array_record, read through
grain WITHOUT TensorFlow; the `data` extra, imported lazily). The iterators themselves live in
`jax_diffusion.iterators` and are re-exported here.

Batch order (`ArrayIterator` and `tfds_iterator` alike): per-epoch permutations of the global
order, each process keeping its contiguous slice, as `jax_diffusion.iterators`' docstring says.

Images are scaled as in Ho et al. 2020, section 3.3 (seed 004, section 4.1): 8-bit pixels
u in {0, ..., 255} become `u / 127.5 - 1`, so 0 -> -1 and 255 -> 1.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jax_diffusion._checks import check_int
from jax_diffusion.iterators import ArrayIterator, GrainIterator, _BatchPlan

__all__ = [
    "ArrayIterator",
    "DatasetInfo",
    "GrainIterator",
    "TOY_2D_NAMES",
    "check_data",
    "check_images",
    "get_dataset",
    "load_digits",
    "random_flip",
    "tfds_iterator",
    "toy_2d",
    "uint8_to_float",
]

TOY_2D_NAMES = ("swiss_roll", "two_moons", "eight_gaussians")
DIGITS_NUM_TEST = 297  # sklearn's 1797 digits -> 1500 train + 297 test.


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the model needs to know about a dataset.

    Attributes:
      name: the dataset name as given to `get_dataset`.
      shape: per-example shape of `batch["image"]`: (H, W, C) for images, (2,) for toy 2-D data.
      num_classes: number of label values (labels lie in [0, num_classes)); 0 when the dataset
        has no labels, in which case `batch["label"]` is all zeros.
      num_examples: examples in the split (one epoch).
    """

    name: str
    shape: tuple[int, ...]
    num_classes: int
    num_examples: int


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def check_images(images: np.ndarray, *, name: str = "images") -> np.ndarray:
    """Checks that `images` is an NHWC floating batch with every value in [-1, 1].

    Args:
      images: [N, H, W, C] floating array, data in [-1, 1].
      name: how the error messages call the array.

    Returns:
      `images`, unchanged.

    Raises:
      ValueError: wrong rank, non-float dtype, NaN/inf, or a value outside [-1, 1].
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"{name} must be NHWC [N, H, W, C]; got shape {images.shape}")
    return check_data(images, name=name)


def check_data(x, *, name: str = "x") -> np.ndarray:
    """Checks that `x` (any shape) is floating with every value finite and in [-1, 1].

    Returns:
      `x` as a NumPy array, values unchanged.

    Raises:
      ValueError: non-float dtype, NaN/inf, or a value outside [-1, 1].
    """
    x = np.asarray(x)
    # jnp.issubdtype: NumPy does not count ml_dtypes' bfloat16 (a JAX model's dtype) as floating
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be floating data in [-1, 1]; got dtype {x.dtype}")
    if x.size and not (np.isfinite(x).all() and -1 <= x.min() <= x.max() <= 1):
        raise ValueError(
            f"{name} must be finite with values in [-1, 1]; got range [{np.min(x)}, {np.max(x)}]"
        )
    return x


def random_flip(rng: jax.Array, images: jax.Array) -> jax.Array:
    """Mirrors each image left-right with probability 1/2: the random horizontal flips of Ho
    et al. 2020 (section 4, CIFAR10). Pure: works under jit, sharded over the batch axis, and
    the same key gives the same flips whatever the number of devices.

    Args:
      rng: PRNG key; example i is flipped where jax.random.bernoulli(rng, 0.5, [B])[i].
      images: [B, H, W, C].

    Returns:
      [B, H, W, C], each example the input's or its mirror image (W axis reversed).
    """
    if jnp.ndim(images) != 4:
        raise ValueError(f"images must be [B, H, W, C]; got shape {jnp.shape(images)}")
    flip = jax.random.bernoulli(rng, 0.5, (jnp.shape(images)[0],))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def uint8_to_float(image: np.ndarray, image_size: int | None = None) -> np.ndarray:
    """Maps one 8-bit image to float32 HWC in [-1, 1]: u / 127.5 - 1 (Ho et al. 2020, 3.3).

    Args:
      image: [H, W] (grayscale) or [H, W, C] uint8 image.
      image_size: if given and the image is not already S x S, the largest centred square is
        cropped and resized to S x S with PIL's antialiased bilinear filter (on the uint8
        pixels, before scaling). None keeps the native size.

    Returns:
      [H, W, C] (or [S, S, C]) float32 in [-1, 1]; grayscale gets C = 1.

    Raises:
      ValueError: dtype not uint8, rank not 2 or 3, an empty axis, or image_size not an int >= 1.
    """
    if image_size is not None:
        image_size = check_int("image_size", image_size, 1)
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 with values in [0, 255]; got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or 0 in image.shape:
        raise ValueError(
            f"image must be [H, W] or [H, W, C] with no empty axis; got shape {image.shape}"
        )
    if image_size is not None and image.shape[:2] != (image_size, image_size):
        image = _center_crop_resize(image, image_size)
    return image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def _center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    import PIL.Image

    h, w, c = image.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    image = image[top : top + side, left : left + side]
    if side == size:
        return image
    channels = [
        np.asarray(PIL.Image.fromarray(image[:, :, i]).resize((size, size), PIL.Image.BILINEAR))
        for i in range(c)
    ]
    return np.stack(channels, axis=-1)


@functools.cache
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int32)


def load_digits(
    image_size: int = 8, split: str = "train", *, upsample: str = "bilinear"
) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled handwritten digits (1797 images, 10 classes), NHWC in [-1, 1].

    The 8x8 images have 17 grey levels 0..16, mapped to [-1, 1] by x / 8 - 1 (the 4-bit
    analogue of u / 127.5 - 1): 0 -> -1 (background), 16 -> 1. The split is fixed: the first
    1500 images are "train", the last 297 "test" (the data come in repeating 0..9 runs, so both
    splits hold every class in near-equal numbers).

    Args:
      image_size: 8 (native) or 16 (2x upsampled).
      split: "train" (1500), "test" (297) or "all" (1797).
      upsample: for image_size 16: "bilinear" (the default: smooth strokes;
        `jax.image.resize(..., "bilinear")`, half-pixel centres, so along each axis
        out[2i] = 3/4 x[i] + 1/4 x[i - 1], out[2i + 1] = 3/4 x[i] + 1/4 x[i + 1], indices clamped
        at the border) or "nearest" (each pixel repeated 2x2).

    Returns:
      images: [N, S, S, 1] float32 in [-1, 1], S = image_size.
      labels: [N] int32 in [0, 10).

    Raises:
      ValueError: unknown image_size, split or upsample.
    """
    _check_choice("image_size", image_size, (8, 16))
    _check_choice("split", split, ("train", "test", "all"))
    _check_choice("upsample", upsample, ("bilinear", "nearest"))
    images, labels = _sklearn_digits()
    num_train = len(images) - DIGITS_NUM_TEST
    select = {"train": slice(0, num_train), "test": slice(num_train, None), "all": slice(None)}
    images, labels = images[select[split]], labels[select[split]].copy()
    images = (images / np.float32(8.0) - np.float32(1.0))[..., None]
    if image_size == 16:
        if upsample == "nearest":
            images = images.repeat(2, axis=1).repeat(2, axis=2)
        else:
            images = np.asarray(jax.image.resize(images, (len(images), 16, 16, 1), "bilinear"))
    return np.ascontiguousarray(images, dtype=np.float32), labels


def toy_2d(
    name: str, num_samples: int, seed: int = 0, *, noise: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Samples a 2-D toy distribution, scaled to roughly [-1, 1].

    * "swiss_roll": t = 1.5 pi (1 + 2u), u ~ U[0, 1]; x = (t cos t, t sin t) / (4.5 pi), so the
      outer end lies on the unit circle. Labels are 0 (no classes). Default noise 0.02.
    * "two_moons": the upper moon (cos a, sin a) and the lower (1 - cos a, 0.5 - sin a),
      a ~ U[0, pi] (scikit-learn's make_moons), then x -> (x - (0.5, 0.25)) / 1.5.
      Labels: moon index 0 (upper) or 1. Default noise 0.05 (before the 1/1.5 scaling).
    * "eight_gaussians": equal mixture of N(c_k, noise^2 I), c_k = (cos(k pi/4), sin(k pi/4)),
      k = 0..7. Labels: component index k. Default noise 0.1.

    Args:
      name: one of TOY_2D_NAMES.
      num_samples: N > 0.
      seed: NumPy seed; the samples are a deterministic function of (name, N, seed, noise).
      noise: standard deviation of the added isotropic Gaussian noise; None for the default.

    Returns:
      x: [N, 2] float32.
      labels: [N] int32.
    """
    _check_choice("name", name, TOY_2D_NAMES)
    num_samples = check_int("num_samples", num_samples, 1)
    rng = np.random.default_rng(check_int("seed", seed, 0))
    if noise is None:
        noise = {"swiss_roll": 0.02, "two_moons": 0.05, "eight_gaussians": 0.1}[name]
    if (
        isinstance(noise, bool)
        or not isinstance(noise, int | float | np.integer | np.floating)
        or not 0 <= noise < np.inf
    ):
        raise ValueError(f"noise must be a finite number >= 0; got {noise!r}")
    if name == "swiss_roll":
        t = 1.5 * np.pi * (1 + 2 * rng.uniform(size=num_samples))
        x = np.stack([t * np.cos(t), t * np.sin(t)], axis=1) / (4.5 * np.pi)
        labels = np.zeros(num_samples, np.int32)
    elif name == "two_moons":
        labels = rng.integers(0, 2, num_samples).astype(np.int32)
        a = rng.uniform(0, np.pi, num_samples)
        upper = np.stack([np.cos(a), np.sin(a)], axis=1)
        lower = np.stack([1 - np.cos(a), 0.5 - np.sin(a)], axis=1)
        x = (np.where(labels[:, None] == 0, upper, lower) - np.array([0.5, 0.25])) / 1.5
        noise = noise / 1.5
    else:
        labels = rng.integers(0, 8, num_samples).astype(np.int32)
        angle = labels * (np.pi / 4)
        x = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    x = x + noise * rng.standard_normal(x.shape)
    return x.astype(np.float32), labels


class _ReadBatch:
    """grain map: global step -> this process's batch, read from a random-access source.

    A module-level class (not a closure) so grain can pickle it into worker processes.
    """

    def __init__(self, source, plan: _BatchPlan, image_key, label_key, image_size):
        self.source, self.plan = source, plan
        self.image_key, self.label_key, self.image_size = image_key, label_key, image_size

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        indices = [int(i) for i in self.plan.indices(step)]
        getitems = getattr(self.source, "__getitems__", None)
        records = getitems(indices) if getitems else [self.source[i] for i in indices]
        images = [self._image(r) for r in records]
        shapes = {im.shape for im in images}
        if len(shapes) != 1:
            raise ValueError(
                f"images in a batch have different shapes {sorted(shapes)}; pass image_size to "
                "crop and resize them to a common size"
            )
        if self.label_key is None:
            labels = np.zeros(len(records), np.int32)
        else:
            labels = np.asarray([r[self.label_key] for r in records], dtype=np.int32)
        return {"image": np.stack(images), "label": labels}

    def _image(self, record) -> np.ndarray:
        if self.image_key not in record:
            raise ValueError(
                f"image_key {self.image_key!r} is not a feature; features are {sorted(record)}"
            )
        return uint8_to_float(record[self.image_key], self.image_size)


def _tfds_builder(name: str, data_dir):
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        first_line = str(e).splitlines()[0]
        raise ValueError(
            f"unknown tfds dataset name {name!r}: not registered in tensorflow_datasets and not "
            f"prepared under data_dir={data_dir!r} ({first_line})"
        ) from None
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"tfds dataset {name!r} is not prepared under data_dir="
            f"{str(builder.data_dir)!r}; this loader never downloads. Prepare it once in the "
            f"array_record format, e.g. `tfds build {name} --file_format=array_record "
            f"--data_dir=DIR` on a machine with network access, and pass data_dir=DIR"
        )
    return builder


def tfds_iterator(
    name: str,
    *,
    split: str = "train",
    data_dir: str | None = None,
    global_batch_size: int,
    seed: int,
    image_size: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    image_key: str = "image",
    label_key: str | None = "label",
    num_workers: int = 0,
    drop_remainder: bool = True,
) -> GrainIterator:
    """Infinite grain iterator over a locally prepared tfds dataset, without TensorFlow.

    Reads `builder.as_data_source(split)` (array_record, random access) through
    `grain.MapDataset`: element s of the dataset is global step s's batch for this process, in
    the batch order of `jax_diffusion.iterators` (the same order `ArrayIterator` gives the same
    examples), so the iterator's state is that of `ArrayIterator` (not grain's, which depends
    on num_workers) and a resumed iterator starts its pipeline at the saved step.
    Needs the `data` extra (tensorflow-datasets, grain, array_record).

    Args:
      name: tfds dataset name, e.g. "mnist", "cifar10", "celeb_a" (with a config:
        "name/config").
      split: tfds split string, e.g. "train", "test", "train[:90%]".
      data_dir: directory holding the prepared dataset (default: tfds's, ~/tensorflow_datasets).
      global_batch_size: examples per step over all processes; divisible by process_count.
      seed: int >= 0, the shuffle seed.
      image_size: crop the centred square and resize to image_size x image_size (see
        `uint8_to_float`); None keeps the native size (all images must then share a shape).
      process_index: this process; default `jax.process_index()`.
      process_count: default `jax.process_count()`.
      image_key: feature holding [H, W] or [H, W, C] uint8 images.
      label_key: integer label feature, or None for an unlabeled dataset (labels are zeros).
      num_workers: grain worker processes (0: threads in this process). With > 0 the calling
        script needs an `if __name__ == "__main__":` guard.
      drop_remainder: as for `ArrayIterator`.

    Returns:
      A `GrainIterator` whose `.info` is the `DatasetInfo`.

    Raises:
      ImportError: tensorflow-datasets / grain missing.
      ValueError: unknown dataset name, images not uint8 or not [H, W(, C)], images of
        several sizes (a declared shape (None, None, C)) without image_size, bad batch size.
      FileNotFoundError: the dataset is not prepared under data_dir.
    """
    try:
        import grain
        import tensorflow_datasets  # noqa: F401 - imported by _tfds_builder
    except ImportError as e:
        raise ImportError(
            f"tfds_iterator needs the data extra: pip install 'jax_diffusion[data]' ({e})"
        ) from e

    num_workers = check_int("num_workers", num_workers, 0)
    if image_size is not None:
        image_size = check_int("image_size", image_size, 1)
    if not isinstance(split, str):
        raise ValueError(f"split must be a tfds split string such as 'train'; got {split!r}")
    process_index, process_count = _default_processes(process_index, process_count)
    _BatchPlan.check_args(global_batch_size, seed, process_index, process_count, drop_remainder)
    builder = _tfds_builder(name, data_dir)
    features = builder.info.features
    num_classes = 0
    if label_key is not None:
        if label_key not in features:
            raise ValueError(
                f"label_key {label_key!r} is not a feature; features are {list(features)}"
            )
        num_classes = getattr(features[label_key], "num_classes", None)
        if not num_classes:
            raise ValueError(
                f"label_key {label_key!r} must name a tfds ClassLabel feature (labels in "
                f"[0, num_classes)), or be None for unlabeled data; it is a "
                f"{type(features[label_key]).__name__}"
            )
    declared = getattr(features[image_key], "shape", None) if image_key in features else None
    if image_size is None and declared is not None and None in tuple(declared)[:2]:
        raise ValueError(
            f"the {image_key!r} images of tfds dataset {name!r} vary in size (shape "
            f"{tuple(declared)}); pass image_size (data.image_size) to crop and resize each "
            "to one square size"
        )
    source = builder.as_data_source(split=split)
    plan = _BatchPlan.create(
        len(source), global_batch_size, seed, process_index, process_count, drop_remainder
    )
    read = _ReadBatch(source, plan, image_key, label_key, image_size)
    first = read._image(source[0])  # fail here, not in a reader thread, on bad images
    info = DatasetInfo(f"tfds:{name}", tuple(first.shape), int(num_classes), len(source))
    read_options = grain.ReadOptions(num_threads=4, prefetch_buffer_size=8)
    if num_workers:
        from absl import flags  # grain workers read absl flags, which raise unless parsed.

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()

    def iterator_from(step: int):
        # element i is global step `step + i`: a resumed run starts its pipeline there
        dataset = grain.MapDataset.range(step, sys.maxsize).map(read)
        dataset = dataset.to_iter_dataset(read_options)
        if num_workers:
            dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
        return iter(dataset)

    return GrainIterator(iterator_from, plan, info)


def _default_processes(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return process_index, process_count


def _field(config, key: str, default=None):
    """config[key], or `default` where the field is missing or None (a ConfigDict placeholder)."""
    value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
    return default if value is None else value


def get_dataset(
    config,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
):
    """Builds the training iterator named by a data config.

    `config` is an ml_collections ConfigDict (or a dict) with `name` and optional fields:

    * name "digits": `load_digits(image_size, split)`; image_size 8 (default) or 16.
    * name "toy_2d:<swiss_roll|two_moons|eight_gaussians>": `toy_2d(kind, num_samples, seed)`
      with `num_samples` (default 10000) drawn with the same seed; `batch["image"]` is [B, 2].
    * name "tfds:<tfds name>": `tfds_iterator(...)` with `split`, `data_dir`, `image_size`,
      `image_key`, `label_key`, `num_workers`.

    `split` defaults to "train", `drop_remainder` to True; a missing or None field takes its
    default (`label_key` None means unlabeled).

    Args:
      config: the data config.
      global_batch_size: examples per step over all processes; divisible by process_count.
      seed: int >= 0, the shuffle seed.
      process_index: default `jax.process_index()`.
      process_count: default `jax.process_count()`.

    Returns:
      (iterator, info): `next(iterator)` gives {"image": [local_B, ...] float32 in [-1, 1],
      "label": [local_B] int32}; `iterator.get_state()` is JSON-serialisable and
      `iterator.set_state(state)` resumes exactly. `info` is a `DatasetInfo`.

    Raises:
      ValueError: unknown name, or bad batch size / process arguments.
    """
    name, split = _field(config, "name"), _field(config, "split", "train")
    process_index, process_count = _default_processes(process_index, process_count)
    batch_args = dict(global_batch_size=global_batch_size, seed=seed, process_index=process_index)
    batch_args.update(
        process_count=process_count, drop_remainder=_field(config, "drop_remainder", True)
    )
    if isinstance(name, str) and name.startswith("tfds:"):
        # label_key: a missing field means "label", None means unlabeled
        label_key = (
            config.get("label_key", "label")
            if isinstance(config, Mapping)
            else getattr(config, "label_key", "label")
        )
        iterator = tfds_iterator(
            name.removeprefix("tfds:"),
            split=split,
            data_dir=_field(config, "data_dir"),
            image_size=_field(config, "image_size"),
            image_key=_field(config, "image_key", "image"),
            label_key=label_key,
            num_workers=_field(config, "num_workers", 0),
            **batch_args,
        )
        return iterator, iterator.info
    if name == "digits":
        images, labels = load_digits(_field(config, "image_size", 8), split)
        check_images(images, name="digits images")
        info = DatasetInfo(name, images.shape[1:], 10, len(images))
    elif isinstance(name, str) and name.startswith("toy_2d:"):
        kind = name.removeprefix("toy_2d:")
        _check_choice("toy_2d kind", kind, TOY_2D_NAMES)
        images, labels = toy_2d(kind, _field(config, "num_samples", 10000), seed)
        num_classes = {"swiss_roll": 0, "two_moons": 2, "eight_gaussians": 8}[kind]
        info = DatasetInfo(name, images.shape[1:], num_classes, len(images))
    else:
        raise ValueError(
            "data config name must be 'digits', 'toy_2d:<kind>' (kind one of "
            f"{', '.join(TOY_2D_NAMES)}) or 'tfds:<tfds dataset name>'; got {name!r}"
        )
    iterator = ArrayIterator({"image": images, "label": labels}, **batch_args)
    return iterator, info
