"""Digits classifier: the small CNN whose features and logits measure samples of the digits.

`DigitsClassifier` is a small CNN p(y | x) on the embedded 8x8 digits, trained on their train
split (`python3 -m experiments.train_digits_classifier`) and shipped as
`assets/digits_classifier_8x8.msgpack` (`load_digits_classifier`). Its 64 penultimate
activations (`digits_features`) give a Frechet distance and precision/recall, its softmax
(`digits_logits`) an Inception-style score and its argmax the accuracy of class-conditional
samples; the metrics themselves are in `jax_diffusion.evaluation`, which re-exports these names.
16x16 images are 2x2-mean downsampled to the classifier's 8x8 first (`to_digits_resolution`).
This is a CPU-scale STAND-IN for FID, NOT FID: numbers are comparable only with other numbers
from the same extractor and the same number of samples, never with published FIDs.
"""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from jax_diffusion._checks import check_int
from jax_diffusion.data import check_data

__all__ = [
    "DIGITS_CLASSIFIER_TEST_ACCURACY",
    "DigitsClassifier",
    "digits_features",
    "digits_logits",
    "load_digits_classifier",
    "to_digits_resolution",
]

# Accuracy of the shipped checkpoint on load_digits(8, "test") (297 images), as printed by
# `python3 -m experiments.train_digits_classifier`; tests check the checkpoint reproduces it.
DIGITS_CLASSIFIER_TEST_ACCURACY = 285 / 297  # 0.9596; 0.9529 on the 16x16 (bilinear) test digits
_ASSET = "digits_classifier_8x8.msgpack"


class DigitsClassifier(nn.Module):
    """Small CNN p(y | x) on 8x8 digits; its penultimate activations are the features.

      h        = relu(Conv3x3(16)(x))                 [B, 8, 8, 16]
      h        = relu(Conv3x3(32, stride 2)(h))       [B, 4, 4, 32]
      features = relu(Dense(64)(flatten(h)))          [B, 64]
      logits   = Dense(10)(features)                  [B, 10]

    38k parameters. Trained by `experiments/train_digits_classifier.py`.

    Attributes:
      num_classes: number of classes (10 digits).
      feature_dim: width of the feature layer.
    """

    num_classes: int = 10
    feature_dim: int = 64

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(logits [B, num_classes], features [B, feature_dim]) of x: [B, 8, 8, 1] in [-1, 1]."""
        h = nn.relu(nn.Conv(16, (3, 3), name="conv1")(x))
        h = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2), name="conv2")(h))
        features = nn.relu(nn.Dense(self.feature_dim, name="features")(h.reshape(len(h), -1)))
        return nn.Dense(self.num_classes, name="logits")(features), features


def to_digits_resolution(images) -> np.ndarray:
    """Brings digit images to the classifier's 8x8: 16x16 images are 2x2-mean downsampled.

    The 2x2 mean exactly inverts `load_digits(16, upsample="nearest")`; for the default
    bilinear upsampling it returns the 8x8 digit blurred by [1/8, 3/4, 1/8] along each axis.

    Args:
      images: [N, 8, 8, 1] or [N, 16, 16, 1] float images in [-1, 1], N >= 1.

    Returns:
      [N, 8, 8, 1] float32.

    Raises:
      ValueError: any other shape, a non-float dtype, or values not finite and in [-1, 1].
    """
    images = check_data(images, name="images").astype(np.float32)
    if images.ndim != 4 or images.shape[1:] not in ((8, 8, 1), (16, 16, 1)) or not len(images):
        raise ValueError(f"images must be [N, 8, 8, 1] or [N, 16, 16, 1]; got {images.shape}")
    if images.shape[1] == 16:
        images = images.reshape(len(images), 8, 2, 8, 2, 1).mean(axis=(2, 4))
    return images


@functools.cache
def load_digits_classifier(path: str | None = None) -> tuple[Callable, Any]:
    """Loads the shipped digits classifier (or a checkpoint written by the training script).

    Args:
      path: a `flax.serialization.to_bytes(params)` file; None for the packaged
        `jax_diffusion/assets/digits_classifier_8x8.msgpack`.

    Returns:
      (apply_fn, params): `apply_fn(params, x [B, 8, 8, 1]) -> (logits [B, 10], features
      [B, 64])`, jitted.

    Raises:
      ValueError: the file's parameter shapes do not match `DigitsClassifier`.
    """
    if path is None:
        data = importlib.resources.files("jax_diffusion").joinpath("assets", _ASSET).read_bytes()
    else:
        with open(path, "rb") as f:
            data = f.read()
    model = DigitsClassifier()
    target = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    params = flax.serialization.msgpack_restore(data)
    got = jax.tree.map(lambda x: tuple(np.shape(x)), params)
    want = jax.tree.map(lambda x: tuple(x.shape), target)
    if got != want:
        raise ValueError(f"{path or _ASSET} does not hold DigitsClassifier params: {got}")
    params = jax.tree.map(jnp.asarray, params)
    return jax.jit(lambda p, x: model.apply({"params": p}, x)), params


def _classify(images, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(logits [N, 10], features [N, 64]) of digits, in fixed-size padded chunks (one compile)."""
    x = to_digits_resolution(images)
    n = len(x)
    bs = min(batch_size, n)
    x = np.concatenate([x, np.zeros((-n % bs, 8, 8, 1), np.float32)])
    apply_fn, params = load_digits_classifier()
    out = [jax.device_get(apply_fn(params, x[i : i + bs])) for i in range(0, len(x), bs)]
    return np.concatenate([o[0] for o in out])[:n], np.concatenate([o[1] for o in out])[:n]


def digits_features(images, *, batch_size: int = 500) -> np.ndarray:
    """The shipped digits classifier's 64 penultimate activations (for Frechet distance, P/R).

    Args:
      images: [N, 8, 8, 1] or [N, 16, 16, 1] float images in [-1, 1] (16x16 are 2x2-mean
        downsampled first, see `to_digits_resolution`).
      batch_size: images per classifier call (the last chunk is zero-padded: one compile).

    Returns:
      [N, 64] float32 features.
    """
    return _classify(images, check_int("batch_size", batch_size, 1))[1]


def digits_logits(images, *, batch_size: int = 500) -> np.ndarray:
    """The shipped digits classifier's [N, 10] float32 logits (softmax: `inception_score`).

    Args: as for `digits_features`.
    """
    return _classify(images, check_int("batch_size", batch_size, 1))[0]
