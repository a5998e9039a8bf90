"""The shipped digits classifier: its checkpoint, features / logits, resolution and loading."""

import json
import pathlib

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_diffusion import digits_classifier
from jax_diffusion.data import load_digits
from jax_diffusion.digits_classifier import digits_features, digits_logits
from jax_diffusion.evaluation import FeatureStats, frechet_distance

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_shipped_classifier_loads_and_reproduces_its_accuracy():
    path = ROOT / "jax_diffusion" / "assets" / "digits_classifier_8x8.msgpack"
    assert path.stat().st_size < 200_000
    images, labels = load_digits(8, "test")
    logits = digits_logits(images)
    assert logits.shape == (297, 10) and logits.dtype == np.float32
    accuracy = np.mean(logits.argmax(1) == labels)
    assert accuracy >= 0.9
    # the recorded number is what the checkpoint gives (one image of slack for platforms)
    assert abs(accuracy - digits_classifier.DIGITS_CLASSIFIER_TEST_ACCURACY) <= 1.5 / 297
    images16, labels16 = load_digits(16, "test")
    assert np.mean(digits_logits(images16).argmax(1) == labels16) >= 0.9


def test_digits_features_shapes_padding_and_16x16_path():
    images, _ = load_digits(8, "test")
    feats = digits_features(images)
    assert feats.shape == (297, 64) and np.isfinite(feats).all()
    # the zero-padded last chunk does not leak into the results
    np.testing.assert_allclose(digits_features(images, batch_size=50), feats, rtol=1e-5, atol=1e-5)
    # 2x2 means exactly undo nearest-neighbour upsampling
    up = load_digits(16, "test", upsample="nearest")[0]
    np.testing.assert_array_equal(digits_classifier.to_digits_resolution(up), images)
    with pytest.raises(ValueError, match=r"images must be \[N, 8, 8, 1\] or \[N, 16, 16, 1\]"):
        digits_features(np.zeros((2, 28, 28, 1)))


def test_to_digits_resolution_is_the_2x2_block_mean():
    # reference: the mean of each 2x2 block, with explicit loops in float64
    x = np.random.default_rng(0).uniform(-1, 1, (3, 16, 16, 1))
    want = np.zeros((3, 8, 8, 1))
    for i in range(8):
        for j in range(8):
            want[:, i, j] = x[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean(axis=(1, 2))
    got = digits_classifier.to_digits_resolution(x)
    assert got.dtype == np.float32 and got.shape == (3, 8, 8, 1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # 8x8 images pass through, as float32
    small = digits_classifier.to_digits_resolution(x[:, :8, :8])
    assert small.dtype == np.float32
    np.testing.assert_array_equal(small, x[:, :8, :8].astype(np.float32))


@pytest.mark.parametrize(
    "images, match",
    [
        (np.zeros((0, 8, 8, 1)), r"images must be \[N, 8, 8, 1\] or .*; got \(0, 8, 8, 1\)"),
        (np.zeros((2, 16, 16, 3)), r"images must be \[N, 8, 8, 1\] or .*; got \(2, 16, 16, 3\)"),
        (np.zeros((2, 8, 8, 1), np.int32), "images must be floating data in .*; got dtype int32"),
    ],
)
def test_to_digits_resolution_rejects_bad_images(images, match):
    with pytest.raises(ValueError, match=match):
        digits_classifier.to_digits_resolution(images)


def fake_classifier(monkeypatch):
    """Replaces the shipped classifier by one whose features are the 64 pixels and whose logits
    are the first 10; returns the list of the batch shapes it is called with."""
    shapes = []

    def apply_fn(params, x):
        shapes.append(x.shape)
        flat = np.asarray(x).reshape(len(x), 64)
        return flat[:, :10], flat

    monkeypatch.setattr(digits_classifier, "load_digits_classifier", lambda: (apply_fn, None))
    return shapes


def test_digits_features_runs_equal_chunks_of_min_batch_size_n(monkeypatch):
    # every call has the same shape [min(batch_size, N), 8, 8, 1] (one compile), as few calls as
    # that allows, and the zero-padding of the last one is cut off
    shapes = fake_classifier(monkeypatch)
    images = np.random.default_rng(0).uniform(-1, 1, (10, 8, 8, 1)).astype(np.float32)
    for batch_size, calls in [(4, 3), (5, 2), (10, 1), (64, 1)]:
        shapes.clear()
        np.testing.assert_array_equal(
            digits_features(images, batch_size=batch_size), images.reshape(10, 64)
        )
        assert shapes == [(min(batch_size, 10), 8, 8, 1)] * calls, batch_size
    shapes.clear()
    np.testing.assert_array_equal(
        digits_logits(images, batch_size=3), images.reshape(10, 64)[:, :10]
    )
    assert shapes == [(3, 8, 8, 1)] * 4
    for fn in (digits_features, digits_logits):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1; got 0"):
            fn(images, batch_size=0)


def test_load_digits_classifier_rejects_other_parameter_shapes(tmp_path):
    # a checkpoint of another architecture (32 features instead of 64) must not load
    model = digits_classifier.DigitsClassifier(feature_dim=32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)
    path = tmp_path / "other.msgpack"
    path.write_bytes(flax.serialization.to_bytes(params))
    with pytest.raises(ValueError, match="other.msgpack does not hold DigitsClassifier params"):
        digits_classifier.load_digits_classifier(str(path))


def test_frechet_distance_of_digits_features_separates_digits_from_noise():
    stats = {}
    noise = np.random.default_rng(0).uniform(-1, 1, (297, 8, 8, 1)).astype(np.float32)
    for name, images in [
        ("test", load_digits(8, "test")[0]),
        ("train", load_digits(8, "train")[0]),
        ("noise", noise),
    ]:
        stats[name] = FeatureStats.from_features(digits_features(images))

    def fd(a, b):
        return frechet_distance(stats[a].mean, stats[a].cov, stats[b].mean, stats[b].cov)

    assert 10 * fd("test", "train") < fd("test", "noise")


def test_training_script_writes_a_loadable_classifier(tmp_path, capsys):
    from experiments import train_digits_classifier

    out = str(tmp_path / "clf.msgpack")
    result = train_digits_classifier.main(["--epochs", "2", "--out", out])
    assert json.loads(capsys.readouterr().out)["test_accuracy"] == result["test_accuracy"]
    assert result["num_params"] == 38282 and result["bytes"] < 200_000
    apply_fn, params = digits_classifier.load_digits_classifier(out)
    images, labels = load_digits(8, "test")
    logits, features = apply_fn(params, images)
    assert features.shape == (297, 64)
    assert np.mean(np.asarray(logits).argmax(1) == labels) == pytest.approx(result["test_accuracy"])
    assert result["test_accuracy"] > 0.5  # two epochs already learn most of it
