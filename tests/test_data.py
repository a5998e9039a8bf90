"""Tests for jax_diffusion.data: embedded datasets, the batch order, and the tfds + grain loader.

References: scikit-learn's raw digits, `jax.image.resize`, closed-form toy geometry, the batch
order written out from the module docstring, and a real tfds dataset that the tests build on
local disk (array_record, PNG-encoded images), never a mock.
"""

import collections
import json

import ml_collections
import numpy as np
import pytest
from conftest import _labels, _take
from sklearn.datasets import load_digits as sklearn_load_digits

from jax_diffusion import data

# ----------------------------------------------------------------------------- digits


@pytest.mark.parametrize("image_size", [8, 16])
@pytest.mark.parametrize("split, size", [("train", 1500), ("test", 297), ("all", 1797)])
def test_digits_shapes_dtype_range_classes(image_size, split, size):
    images, labels = data.load_digits(image_size, split)
    assert images.shape == (size, image_size, image_size, 1)
    assert images.dtype == np.float32 and labels.dtype == np.int32
    assert images.min() == -1.0 and images.max() == 1.0
    assert set(labels.tolist()) == set(range(10))
    data.check_images(images)


def test_digits_8x8_are_sklearn_levels_over_8_minus_1():
    raw = sklearn_load_digits()
    images, labels = data.load_digits(8, "all")
    np.testing.assert_array_equal(images[..., 0], raw.images / 8.0 - 1.0)
    np.testing.assert_array_equal(labels, raw.target)
    levels = (images + 1) * 8
    np.testing.assert_array_equal(levels, np.round(levels))


def test_digits_16x16_nearest_is_the_8x8_repeated():
    small, _ = data.load_digits(8, "all")
    big, _ = data.load_digits(16, "all", upsample="nearest")
    for dy in (0, 1):
        for dx in (0, 1):
            np.testing.assert_array_equal(big[:, dy::2, dx::2], small)


def _bilinear_2x_reference(x):
    """Half-pixel-centre 2x bilinear upsampling of [N, H, W, 1], written with Python loops."""
    n, h, w, _ = x.shape
    x = x[..., 0].astype(np.float64)

    def tap(i, size):  # output index -> ((input index, weight), (input index, weight))
        near, other = i // 2, i // 2 + (1 if i % 2 else -1)
        return (near, 0.75), (min(max(other, 0), size - 1), 0.25)

    out = np.zeros((n, 2 * h, 2 * w))
    for i in range(2 * h):
        for j in range(2 * w):
            for a, wa in tap(i, h):
                for b, wb in tap(j, w):
                    out[:, i, j] += wa * wb * x[:, a, b]
    return out[..., None]


def test_digits_16x16_bilinear_is_the_documented_interpolation():
    small, _ = data.load_digits(8, "all")
    big, _ = data.load_digits(16, "all")
    np.testing.assert_allclose(big, _bilinear_2x_reference(small), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("image_size", [8, 16])
def test_digits_train_and_test_partition_all(image_size):
    train, train_labels = data.load_digits(image_size, "train")
    test, test_labels = data.load_digits(image_size, "test")
    everything, all_labels = data.load_digits(image_size, "all")
    np.testing.assert_array_equal(np.concatenate([train, test]), everything)
    np.testing.assert_array_equal(np.concatenate([train_labels, test_labels]), all_labels)


def test_digits_returned_arrays_may_be_modified_without_changing_later_calls():
    raw = sklearn_load_digits()
    for split in ("train", "test", "all"):
        images, labels = data.load_digits(8, split)
        images[:] = 0
        labels[:] = -1
    images, labels = data.load_digits(8, "all")
    np.testing.assert_array_equal(images[..., 0], raw.images / 8.0 - 1.0)
    np.testing.assert_array_equal(labels, raw.target)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image_size=32), "image_size must be one of 8, 16; got 32"),
        (dict(split="val"), "split must be one of"),
        (dict(image_size=16, upsample="cubic"), "upsample must be one of"),
    ],
)
def test_digits_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.load_digits(**kwargs)


# ----------------------------------------------------------------------------- toy 2-D


@pytest.mark.parametrize("name", data.TOY_2D_NAMES)
def test_toy_2d_shapes_scale_determinism(name):
    x, labels = data.toy_2d(name, 5000, seed=3)
    assert x.shape == (5000, 2) and x.dtype == np.float32
    assert labels.shape == (5000,) and labels.dtype == np.int32
    assert np.all(np.abs(x) < 1.6) and np.all((x.std(0) > 0.3) & (x.std(0) < 1.0))
    x_again, labels_again = data.toy_2d(name, 5000, seed=3)
    np.testing.assert_array_equal(x, x_again)
    np.testing.assert_array_equal(labels, labels_again)
    assert not np.array_equal(x, data.toy_2d(name, 5000, seed=4)[0])


def test_eight_gaussians_component_means_and_stds():
    n, sigma = 40000, 0.1
    x, labels = data.toy_2d("eight_gaussians", n, seed=0)
    counts = np.bincount(labels, minlength=8)
    assert len(counts) == 8
    assert np.all(np.abs(counts - n / 8) < 4 * np.sqrt(n * (1 / 8) * (7 / 8)))
    for k in range(8):
        xk = x[labels == k].astype(np.float64)
        centre = np.array([np.cos(k * np.pi / 4), np.sin(k * np.pi / 4)])
        assert np.all(np.abs(xk.mean(0) - centre) < 4 * sigma / np.sqrt(len(xk)))
        assert np.all(np.abs(xk.std(0) - sigma) < 4 * sigma / np.sqrt(2 * len(xk)))


def test_two_moons_lie_on_their_unit_half_circles():
    x, labels = data.toy_2d("two_moons", 4000, seed=1, noise=0.0)
    z = x.astype(np.float64) * 1.5 + np.array([0.5, 0.25])  # undo the documented scaling
    upper, lower = z[labels == 0], z[labels == 1]
    np.testing.assert_allclose(np.linalg.norm(upper, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(lower - [1.0, 0.5], axis=1), 1.0, atol=1e-6)
    assert upper[:, 1].min() >= -1e-6 and lower[:, 1].max() <= 0.5 + 1e-6
    assert abs(len(upper) - 2000) < 4 * np.sqrt(4000 / 4)


def test_swiss_roll_lies_on_the_spiral():
    x, labels = data.toy_2d("swiss_roll", 4000, seed=2, noise=0.0)
    p = x.astype(np.float64) * 4.5 * np.pi
    t = np.linalg.norm(p, axis=1)
    assert t.min() >= 1.5 * np.pi - 1e-4 and t.max() <= 4.5 * np.pi + 1e-4
    np.testing.assert_allclose(p, np.stack([t * np.cos(t), t * np.sin(t)], 1), atol=1e-4)
    np.testing.assert_array_equal(labels, 0)


@pytest.mark.parametrize(
    "name, noise", [("swiss_roll", 0.02), ("two_moons", 0.05), ("eight_gaussians", 0.1)]
)
def test_toy_2d_default_noise_is_the_documented_one(name, noise):
    x, labels = data.toy_2d(name, 500, seed=6)
    x_given, labels_given = data.toy_2d(name, 500, seed=6, noise=noise)
    np.testing.assert_array_equal(x, x_given)
    np.testing.assert_array_equal(labels, labels_given)
    assert not np.array_equal(x, data.toy_2d(name, 500, seed=6, noise=2 * noise)[0])


def test_two_moons_noise_is_measured_before_the_scaling():
    # Undoing x -> (x - (0.5, 0.25)) / 1.5, a point's distance to its moon's unit circle minus 1
    # is the radial part of N(0, noise^2 I): std noise (up to O(noise^2)), for the default 0.05.
    n, sigma = 20000, 0.05
    x, labels = data.toy_2d("two_moons", n, seed=4)
    z = x.astype(np.float64) * 1.5 + np.array([0.5, 0.25])
    centre = np.where(labels[:, None] == 0, [0.0, 0.0], [1.0, 0.5])
    radial = np.linalg.norm(z - centre, axis=1) - 1.0
    assert abs(radial.std() - sigma) < 0.05 * sigma  # ~10 standard errors of the estimate


def test_toy_2d_errors():
    with pytest.raises(ValueError, match="name must be one of .*; got 'spiral'"):
        data.toy_2d("spiral", 10, 0)
    with pytest.raises(ValueError, match="num_samples must be an int >= 1; got 0"):
        data.toy_2d("two_moons", 0, 0)
    for noise in (-0.1, float("inf"), float("nan"), "0.1", True):
        with pytest.raises(ValueError, match=f"noise must be a finite number >= 0; got {noise!r}"):
            data.toy_2d("two_moons", 10, 0, noise=noise)


# ----------------------------------------------------------------------------- checks, dispatch


def test_uint8_to_float_endpoints_grayscale_and_errors():
    image = np.array([[0, 255], [128, 1]], np.uint8)
    out = data.uint8_to_float(image)
    assert out.shape == (2, 2, 1) and out.dtype == np.float32
    np.testing.assert_allclose(out[..., 0], image / 127.5 - 1, rtol=1e-6, atol=1e-6)
    assert out[0, 0, 0] == -1.0 and out[0, 1, 0] == 1.0
    with pytest.raises(ValueError, match="must be uint8.*got dtype float32"):
        data.uint8_to_float(image.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[H, W\] or \[H, W, C\] .*; got shape \(1, 2, 2, 1\)"):
        data.uint8_to_float(image[None, :, :, None])
    with pytest.raises(ValueError, match=r"no empty axis; got shape \(2, 2, 0\)"):
        data.uint8_to_float(image[:, :, None][:, :, :0])
    for size in (0, 4.0, True):
        with pytest.raises(ValueError, match=f"image_size must be an int >= 1; got {size!r}"):
            data.uint8_to_float(image, size)


@pytest.mark.parametrize("shape, size", [((10, 6, 3), 4), ((6, 10, 3), 4), ((9, 5), 2)])
def test_uint8_to_float_crops_the_centred_square_and_resizes_each_channel_with_pil(shape, size):
    import PIL.Image

    image = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    h, w = shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image.reshape(h, w, -1)[top : top + side, left : left + side]
    # the reference: PIL's (antialiased) bilinear filter on each uint8 channel, as documented
    resized = np.stack(
        [
            np.asarray(
                PIL.Image.fromarray(square[:, :, c]).resize((size, size), PIL.Image.BILINEAR)
            )
            for c in range(square.shape[2])
        ],
        axis=-1,
    )
    np.testing.assert_array_equal(data.uint8_to_float(image, size), resized / np.float32(127.5) - 1)
    # no resize when the square already has the size: exactly the centred crop
    np.testing.assert_array_equal(data.uint8_to_float(image, side), square / np.float32(127.5) - 1)


def test_check_images_errors():
    good = np.zeros((2, 4, 4, 1), np.float32)
    assert data.check_images(good) is good
    with pytest.raises(ValueError, match="NHWC"):
        data.check_images(good[0])
    with pytest.raises(ValueError, match="floating"):
        data.check_images(good.astype(np.uint8))
    with pytest.raises(ValueError, match=r"\[-1, 1\]; got range \[0.0, 2.0\]"):
        data.check_images(good + np.float32(2) * (np.arange(2) == 1)[:, None, None, None])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        data.check_images(np.full_like(good, np.nan))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
def test_check_images_accepts_every_floating_dtype_and_still_checks_the_range(dtype):
    # samples of a bfloat16 model are floating data: they were refused as "must be floating
    # data in [-1, 1]; got dtype bfloat16"
    import ml_dtypes

    dtype = getattr(ml_dtypes, dtype, None) or np.dtype(dtype)
    good = np.linspace(-1, 1, 16).reshape(1, 4, 4, 1).astype(dtype)
    np.testing.assert_array_equal(data.check_images(good), good)
    bad = good.copy()
    bad[0, -1, -1, 0] = 2  # was 1
    with pytest.raises(ValueError, match=r"\[-1, 1\]; got range \[-1.0, 2.0\]"):
        data.check_images(bad)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        data.check_data(np.full((2,), np.nan, dtype))


def test_check_data_refuses_complex_values_whose_parts_lie_in_range():
    # complex is inexact, not floating data; NumPy orders it lexicographically, so 0.5 + 5j
    # would pass a range check of its min and max
    for x in (np.zeros(3, np.complex64), np.array([0.5 + 5j])):
        with pytest.raises(
            ValueError, match=r"must be floating data in \[-1, 1\]; got dtype complex"
        ):
            data.check_data(x)


def test_check_images_accepts_an_empty_batch_and_only_rank_4():
    empty = np.zeros((0, 4, 4, 1), np.float32)
    assert data.check_images(empty) is empty
    assert data.check_data(np.zeros((0, 2), np.float32)).shape == (0, 2)
    for shape in [(4, 4, 1), (1, 2, 4, 4, 1)]:
        with pytest.raises(ValueError, match=r"NHWC \[N, H, W, C\]; got shape"):
            data.check_images(np.zeros(shape, np.float32))


@pytest.mark.parametrize("as_dict", [True, False])
def test_get_dataset_digits(as_dict):
    fields = {"name": "digits", "image_size": 16, "split": "test"}
    config = fields if as_dict else ml_collections.ConfigDict(fields)
    it, info = data.get_dataset(config, global_batch_size=8, seed=0)
    assert info == data.DatasetInfo("digits", (16, 16, 1), 10, 297)
    batch = next(it)  # jax.process_count() == 1 here: the local batch is the global batch
    assert batch["image"].shape == (8, 16, 16, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
    json.dumps(it.get_state())


def test_get_dataset_toy_and_process_slices():
    config = ml_collections.ConfigDict({"name": "toy_2d:eight_gaussians", "num_samples": 64})
    full, info = data.get_dataset(config, global_batch_size=8, seed=1)
    assert info == data.DatasetInfo("toy_2d:eight_gaussians", (2,), 8, 64)
    half, _ = data.get_dataset(
        config, global_batch_size=8, seed=1, process_index=1, process_count=2
    )
    np.testing.assert_array_equal(next(half)["image"], next(full)["image"][4:])


@pytest.mark.parametrize(
    "kind, num_classes", [("swiss_roll", 0), ("two_moons", 2), ("eight_gaussians", 8)]
)
def test_get_dataset_toy_draws_num_samples_with_the_seed(kind, num_classes):
    config = {"name": f"toy_2d:{kind}", "num_samples": 64}
    it, info = data.get_dataset(config, global_batch_size=64, seed=3)
    assert info == data.DatasetInfo(f"toy_2d:{kind}", (2,), num_classes, 64)
    batch = next(it)  # one batch of 64: all the samples, shuffled
    x, labels = data.toy_2d(kind, 64, seed=3)
    order, want = np.lexsort(batch["image"].T), np.lexsort(x.T)
    np.testing.assert_array_equal(batch["image"][order], x[want])
    np.testing.assert_array_equal(batch["label"][order], labels[want])
    _, default_info = data.get_dataset({"name": f"toy_2d:{kind}"}, global_batch_size=8, seed=0)
    assert default_info.num_examples == 10000


def test_get_dataset_defaults_only_the_process_argument_not_given():
    # jax.process_index() == 0 and jax.process_count() == 1 here
    config = {"name": "digits"}
    want = next(data.get_dataset(config, global_batch_size=8, seed=2)[0])
    for kwargs in (dict(process_index=0), dict(process_count=1)):
        it, _ = data.get_dataset(config, global_batch_size=8, seed=2, **kwargs)
        got = next(it)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    with pytest.raises(ValueError, match=r"process_index must lie in \[0, 1\); got 1"):
        data.get_dataset(config, global_batch_size=8, seed=2, process_index=1)


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("mnist", {}, "name must be 'digits', 'toy_2d:<kind>'.*got 'mnist'"),
        ("toy_2d:spiral", {}, "toy_2d kind must be one of"),
        ("digits", dict(global_batch_size=9, process_count=2), "divisible by process_count=2"),
        # a field's value is used as given (only a missing or None field takes the default)
        ("digits", dict(image_size=0), "image_size must be one of 8, 16; got 0"),
        ("digits", dict(split=""), "split must be one of 'train', 'test', 'all'; got ''"),
        ("toy_2d:two_moons", dict(num_samples=0), "num_samples must be an int >= 1; got 0"),
        ("digits", dict(drop_remainder="no"), "drop_remainder must be True or False; got 'no'"),
    ],
)
def test_get_dataset_errors(name, kwargs, match):
    fields = {
        k: kwargs.pop(k)
        for k in ("image_size", "split", "num_samples", "drop_remainder")
        if k in kwargs
    }
    kwargs = {"global_batch_size": 8, "seed": 0, "process_index": 0, **kwargs}
    kwargs.setdefault("process_count", 1)
    with pytest.raises(ValueError, match=match):
        data.get_dataset({"name": name, **fields}, **kwargs)


def test_get_dataset_none_fields_take_their_defaults():
    config = ml_collections.ConfigDict(
        {"name": "digits", "image_size": None, "split": None, "drop_remainder": None}
    )
    it, info = data.get_dataset(config, global_batch_size=256, seed=0)
    assert info == data.DatasetInfo("digits", (8, 8, 1), 10, 1500)
    for _ in range(1500 // 256):  # drop_remainder=True: the epoch's tail of 220 is skipped
        next(it)
    assert it.get_state() == {"epoch": 1, "position": 0}


# ----------------------------------------------------------------------------- tfds + grain

_NAME = "jd_data_test_images"
_NUM_TRAIN, _NUM_TEST = 40, 12


@pytest.fixture(scope="module")
def tfds_data(tmp_path_factory):
    """Prepares a small real tfds dataset (array_record, PNG images) on local disk.

    Returns (data_dir, {split: (images [N, 8, 8, 1] uint8, labels [N], levels [N] uint8)}),
    in generation order; the "wide" feature of example i is a 6x10 RGB image whose centred
    6x6 square is `levels[i]` and whose two outer columns each side are 0.
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("grain")
    pytest.importorskip("array_record")
    import PIL.Image

    rng = np.random.default_rng(0)
    generated = {}
    for split, n in (("train", _NUM_TRAIN), ("test", _NUM_TEST)):
        images = rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
        images[:, 0, 0, 0] = np.arange(n)  # all distinct
        generated[split] = (images, np.arange(n) % 3, rng.integers(0, 256, n, dtype=np.uint8))

    class JdDataTestImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {
                "image": tfds.features.Image(shape=(8, 8, 1), encoding_format="png"),
                "wide": tfds.features.Image(shape=(6, 10, 3), encoding_format="png"),
                "varying": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                "rows_vary": tfds.features.Image(shape=(None, 7, 3), encoding_format="png"),
                "columns_vary": tfds.features.Image(shape=(7, None, 3), encoding_format="png"),
                "float_image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.float32),
                "label": tfds.features.ClassLabel(num_classes=3),
            }
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features)
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in generated}

        def _generate_examples(self, split):
            images, labels, levels = generated[split]
            for i in range(len(images)):
                wide = np.zeros((6, 10, 3), np.uint8)
                wide[:, 2:8] = levels[i]
                tall = np.full((6 + i % 3, 7, 3), i, np.uint8)
                # PIL images are encoded with PIL: tfds encodes NumPy arrays with TensorFlow.
                yield (
                    i,
                    {
                        "image": PIL.Image.fromarray(images[i, :, :, 0]),
                        "wide": PIL.Image.fromarray(wide),
                        # 6x7, 7x7 and 8x7: a dataset of images of several sizes
                        "varying": PIL.Image.fromarray(np.full((6 + i % 3, 7, 3), i, np.uint8)),
                        "rows_vary": PIL.Image.fromarray(tall),  # as varying
                        "columns_vary": PIL.Image.fromarray(tall.transpose(1, 0, 2)),
                        "float_image": images[i].astype(np.float32),
                        "label": int(labels[i]),
                    },
                )

    assert JdDataTestImages.name == _NAME
    data_dir = tmp_path_factory.mktemp("tfds")
    builder = JdDataTestImages(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(file_format="array_record")
    return str(data_dir), generated


_TFDS_ARGS = {"global_batch_size": 8, "seed": 0, "process_index": 0, "process_count": 1}


def _tfds_it(data_dir, **kwargs):
    return data.tfds_iterator(_NAME, data_dir=data_dir, **{**_TFDS_ARGS, **kwargs})


def _as_uint8(images):
    """Inverts u / 127.5 - 1 after checking that the floats are exactly such values."""
    u = np.rint((images.astype(np.float64) + 1) * 127.5)
    np.testing.assert_allclose(images, u / 127.5 - 1, rtol=0, atol=1e-6)
    return u.astype(np.uint8)


def _multiset(images_u8, labels):
    return collections.Counter(
        (im.tobytes(), int(lab)) for im, lab in zip(images_u8, labels, strict=True)
    )


def test_tfds_one_epoch_yields_every_generated_image_once(tfds_data):
    data_dir, generated = tfds_data
    it = _tfds_it(data_dir)
    assert it.info == data.DatasetInfo(f"tfds:{_NAME}", (8, 8, 1), 3, _NUM_TRAIN)
    batches = _take(it, _NUM_TRAIN // 8)
    for b in batches:
        assert b["image"].shape == (8, 8, 8, 1) and b["image"].dtype == np.float32
        assert b["label"].shape == (8,) and b["label"].dtype == np.int32
        data.check_images(b["image"])
    got = np.concatenate([b["image"] for b in batches])
    images, labels, _ = generated["train"]
    assert _multiset(_as_uint8(got), _labels(batches)) == _multiset(images, labels)


def test_tfds_order_is_the_array_iterator_order(tfds_data):
    import tensorflow_datasets as tfds

    data_dir, _ = tfds_data
    source = tfds.data_source(_NAME, split="train", data_dir=data_dir, download=False)
    arrays = {
        "image": np.stack([source[i]["image"] for i in range(len(source))]),
        "label": np.array([source[i]["label"] for i in range(len(source))], np.int32),
    }
    ref = data.ArrayIterator(arrays, global_batch_size=8, seed=4, drop_remainder=False)
    it = _tfds_it(data_dir, seed=4, drop_remainder=False)
    for want, got in zip(_take(ref, 12), _take(it, 12), strict=True):
        np.testing.assert_array_equal(_as_uint8(got["image"]), want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])


def test_tfds_deterministic_per_seed(tfds_data):
    data_dir, _ = tfds_data
    a = _labels(_take(_tfds_it(data_dir, seed=1), 10))
    b = _labels(_take(_tfds_it(data_dir, seed=1), 10))
    np.testing.assert_array_equal(a, b)
    ims = [
        np.concatenate([x["image"] for x in _take(_tfds_it(data_dir, seed=s), 2)]) for s in (1, 2)
    ]
    assert not np.array_equal(*ims)


def test_tfds_state_round_trip_through_json(tfds_data):
    data_dir, _ = tfds_data
    it = _tfds_it(data_dir, seed=3)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 7)  # crosses the epoch boundary after step 5
    restored = _tfds_it(data_dir, seed=3)
    next(restored)
    restored.set_state(state)
    for want, got in zip(expected, _take(restored, 7), strict=True):
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])


def test_tfds_process_shards_are_disjoint_and_cover_the_global_batch(tfds_data):
    data_dir, generated = tfds_data
    single = _take(_tfds_it(data_dir, seed=2), 5)
    shards = [
        _take(_tfds_it(data_dir, seed=2, process_index=p, process_count=2), 5) for p in (0, 1)
    ]
    for step, want in enumerate(single):
        parts = [shard[step] for shard in shards]
        assert all(p["image"].shape == (4, 8, 8, 1) for p in parts)
        np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), want["image"])
    per_process = [
        _multiset(_as_uint8(np.concatenate([b["image"] for b in s])), _labels(s)) for s in shards
    ]
    assert not set(per_process[0]) & set(per_process[1])
    images, labels, _ = generated["train"]
    assert per_process[0] + per_process[1] == _multiset(images, labels)


def test_tfds_test_split_and_unlabeled(tfds_data):
    data_dir, generated = tfds_data
    it = _tfds_it(data_dir, split="test", global_batch_size=_NUM_TEST, label_key=None)
    assert it.info.num_examples == _NUM_TEST and it.info.num_classes == 0
    batch = next(it)
    np.testing.assert_array_equal(batch["label"], 0)
    images, _, _ = generated["test"]
    assert sorted(im.tobytes() for im in _as_uint8(batch["image"])) == sorted(
        im.tobytes() for im in images
    )


@pytest.mark.parametrize("image_size", [6, 3])
def test_tfds_center_crop_and_resize(tfds_data, image_size):
    data_dir, generated = tfds_data
    it = _tfds_it(data_dir, split="test", global_batch_size=_NUM_TEST, image_key="wide")
    it_sized = _tfds_it(
        data_dir, split="test", global_batch_size=_NUM_TEST, image_key="wide", image_size=image_size
    )
    assert next(it)["image"].shape == (_NUM_TEST, 6, 10, 3)
    batch = next(it_sized)
    assert batch["image"].shape == (_NUM_TEST, image_size, image_size, 3)
    assert it_sized.info.shape == (image_size, image_size, 3)
    # The centred square is constant, so no zero border column may leak in.
    u = _as_uint8(batch["image"])
    assert np.all(u == u[:, :1, :1, :1])
    assert sorted(u[:, 0, 0, 0].tolist()) == sorted(generated["test"][2].tolist())


def test_tfds_get_dataset(tfds_data):
    data_dir, _ = tfds_data
    config = ml_collections.ConfigDict(
        {"name": f"tfds:{_NAME}", "data_dir": data_dir, "image_size": 4, "split": "test"}
    )
    it, info = data.get_dataset(config, global_batch_size=6, seed=0)
    assert info == data.DatasetInfo(f"tfds:{_NAME}", (4, 4, 1), 3, _NUM_TEST)
    assert next(it)["image"].shape == (6, 4, 4, 1)


@pytest.mark.parametrize("as_dict", [True, False])
def test_tfds_get_dataset_unlabeled_and_image_key(tfds_data, as_dict):
    data_dir, generated = tfds_data
    fields = {
        "name": f"tfds:{_NAME}",
        "data_dir": data_dir,
        "split": "test",
        "image_key": "wide",
        "image_size": 6,
        "label_key": None,  # None: unlabeled (unlike a missing field)
    }
    config = fields if as_dict else ml_collections.ConfigDict(fields)
    it, info = data.get_dataset(config, global_batch_size=_NUM_TEST, seed=0)
    assert info == data.DatasetInfo(f"tfds:{_NAME}", (6, 6, 3), 0, _NUM_TEST)
    batch = next(it)
    np.testing.assert_array_equal(batch["label"], 0)
    u = _as_uint8(batch["image"])  # the centred 6x6 square of "wide" is its level
    assert sorted(u[:, 0, 0, 0].tolist()) == sorted(generated["test"][2].tolist())
    assert np.all(u == u[:, :1, :1, :1])


def test_tfds_drops_the_epoch_remainder_by_default(tfds_data):
    import tensorflow_datasets as tfds

    data_dir, _ = tfds_data
    source = tfds.data_source(_NAME, split="train", data_dir=data_dir, download=False)
    labels_and_images = [(source[i]["label"], source[i]["image"]) for i in range(len(source))]
    g, seed = 16, 5  # 40 examples: 2 batches per epoch, the last 8 entries skipped
    it = data.tfds_iterator(
        _NAME, data_dir=data_dir, global_batch_size=g, seed=seed, process_index=0, process_count=1
    )
    for epoch in range(2):
        perm = np.random.default_rng((seed, epoch)).permutation(_NUM_TRAIN)
        for k in range(2):
            assert it.get_state() == {"epoch": epoch, "position": k * g}
            batch = next(it)
            idx = perm[k * g : (k + 1) * g]
            want_images = np.stack([labels_and_images[i][1] for i in idx])
            np.testing.assert_array_equal(_as_uint8(batch["image"]), want_images)
            np.testing.assert_array_equal(batch["label"], [labels_and_images[i][0] for i in idx])
    assert it.get_state() == {"epoch": 2, "position": 0}


def test_tfds_errors(tfds_data, tmp_path):
    data_dir, _ = tfds_data
    with pytest.raises(ValueError, match="unknown tfds dataset name 'no_such_dataset_jd'"):
        data.tfds_iterator("no_such_dataset_jd", data_dir=data_dir, global_batch_size=8, seed=0)
    with pytest.raises(FileNotFoundError, match="'mnist' is not prepared.*never downloads"):
        data.tfds_iterator("mnist", data_dir=str(tmp_path), global_batch_size=8, seed=0)
    with pytest.raises(ValueError, match="must be uint8.*got dtype float32"):
        _tfds_it(data_dir, image_key="float_image")
    with pytest.raises(ValueError, match="image_key 'img' is not a feature"):
        _tfds_it(data_dir, image_key="img")
    # images of several sizes without image_size: refused up front (a batch of them was a
    # NumPy stack error in a reader thread, mid-training), and cropped to one size with it
    with pytest.raises(ValueError, match=r"'varying' images of tfds dataset .* vary in size "
                       r"\(shape \(None, None, 3\)\); pass image_size"):  # fmt: skip
        _tfds_it(data_dir, image_key="varying")
    batch = next(_tfds_it(data_dir, image_key="varying", image_size=5))
    assert batch["image"].shape == (8, 5, 5, 3)
    for key, shape in (("rows_vary", r"\(None, 7, 3\)"), ("columns_vary", r"\(7, None, 3\)")):
        # one side of several sizes is enough to need image_size
        with pytest.raises(ValueError, match=rf"'{key}' images .* vary in size \(shape {shape}\)"):
            _tfds_it(data_dir, image_key=key)
        assert next(_tfds_it(data_dir, image_key=key, image_size=5))["image"].shape == (8, 5, 5, 3)
    with pytest.raises(ValueError, match="label_key 'class' is not a feature"):
        _tfds_it(data_dir, label_key="class")
    with pytest.raises(ValueError, match=r"divisible by process_count=3; got 8$"):
        _tfds_it(data_dir, process_count=3)
    with pytest.raises(ValueError, match=r"<= the number of examples \(12\); got 16$"):
        _tfds_it(data_dir, split="test", global_batch_size=16)
    with pytest.raises(ValueError, match="label_key 'float_image' must name a tfds ClassLabel"):
        _tfds_it(data_dir, label_key="float_image")
    with pytest.raises(ValueError, match="split must be a tfds split string .*; got None"):
        _tfds_it(data_dir, split=None)
    # arguments that do not depend on the data are checked before the dataset is opened
    for kwargs, match in [
        (dict(global_batch_size=0), "global_batch_size must be an int >= 1; got 0"),
        (dict(seed=-1), "seed must be an int >= 0; got -1"),
        (dict(process_index=5, process_count=2), r"process_index must lie in \[0, 2\); got 5"),
        (dict(drop_remainder="yes"), "drop_remainder must be True or False; got 'yes'"),
        (dict(num_workers=-1), "num_workers must be an int >= 0; got -1"),
        (dict(num_workers=2.0), "num_workers must be an int >= 0; got 2.0"),
        (dict(image_size=0), "image_size must be an int >= 1; got 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            data.tfds_iterator("mnist", data_dir=str(tmp_path), **{**_TFDS_ARGS, **kwargs})


def test_tfds_worker_processes_give_the_same_stream_and_resume(tfds_data):
    data_dir, _ = tfds_data
    reference = _take(_tfds_it(data_dir, seed=6), 7)
    it = _tfds_it(data_dir, seed=6, num_workers=2)
    first = _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    assert state == {"epoch": 0, "position": 24}  # the same state whatever num_workers is
    rest = _take(it, 4)
    for want, got in zip(reference, first + rest, strict=True):
        np.testing.assert_array_equal(got["image"], want["image"])
    # a state saved with workers resumes with workers or without, and the other way round
    in_threads = _tfds_it(data_dir, seed=6)
    _take(in_threads, 3)
    for num_workers, saved in [(0, state), (2, in_threads.get_state())]:
        restored = _tfds_it(data_dir, seed=6, num_workers=num_workers)
        restored.set_state(saved)
        for want, got in zip(reference[3:], _take(restored, 4), strict=True):
            assert type(got["image"]) is np.ndarray  # copied out of grain's shared memory
            np.testing.assert_array_equal(got["image"], want["image"])
            np.testing.assert_array_equal(got["label"], want["label"])


def test_random_flip_mirrors_about_half_the_images_and_is_the_same_on_8_devices():
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    # [B, 1, 2, 1] images (a, b): the mirror is (b, a), so each output says whether it flipped
    b = 4000
    images = jnp.stack([jnp.arange(b), b + jnp.arange(b)], axis=1).astype(jnp.float32)
    images = images.reshape(b, 1, 2, 1)
    key = jax.random.key(3)
    out = np.asarray(data.random_flip(key, images))
    x = np.asarray(images)
    flipped = (out == x[:, :, ::-1]).all(axis=(1, 2, 3))
    assert ((out == x).all(axis=(1, 2, 3)) ^ flipped).all()  # each one or the other
    assert abs(flipped.mean() - 0.5) < 4 * np.sqrt(0.25 / b)  # 4 sigma
    # the documented mask, and the same flips under jit with the batch over 8 devices
    np.testing.assert_array_equal(flipped, np.asarray(jax.random.bernoulli(key, 0.5, (b,))))
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]), ("data",))
    sharded = jax.device_put(images, NamedSharding(mesh, PartitionSpec("data")))
    np.testing.assert_array_equal(jax.jit(data.random_flip)(key, sharded), out)
    with pytest.raises(ValueError, match=r"images must be \[B, H, W, C\]; got shape \(4, 2\)"):
        data.random_flip(key, jnp.zeros((4, 2)))
