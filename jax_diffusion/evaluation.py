"""Sample-quality and likelihood metrics: Frechet distance, precision/recall, IS, bits/dim.

The metric functions take features / class probabilities from ANY extractor or classifier and
compute in float64 NumPy:

* `frechet_distance` between two Gaussians fitted to features (Heusel et al. 2017; FID
  when the features are Inception-v3 pool3 activations), with `FeatureStats` accumulating the
  mean and covariance over batches.
* `precision_recall` with k-NN radii manifolds (Kynkaanniemi et al. 2019, section 3).
* `inception_score`: exp E_x KL(p(y | x) || p(y)) (Salimans et al. 2016, section 4).
* `bits_per_dim`: the full variational bound of a diffusion model on a dataset
  (Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021, section 3), batched.

For the embedded digits, the features and logits come from the shipped `DigitsClassifier`, a
small CNN (`jax_diffusion.digits_classifier`, whose names are re-exported here). Its 64
penultimate activations give a Frechet distance, its softmax an Inception-style score and its
argmax the accuracy of class-conditional samples. This is a CPU-scale STAND-IN for FID, NOT
FID: numbers are comparable only with other numbers from the same extractor and the same number
of samples (the Frechet distance of N samples is biased upward by O(1/N)), never with published
FIDs. `evaluate_workdir` applies all of this to a training run.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_diffusion._checks import check_int
from jax_diffusion.backend import compiler_options
from jax_diffusion.data import check_data
from jax_diffusion.diffusion import _check_rng, check_prediction, check_schedule, check_variance
from jax_diffusion.digits_classifier import (
    DIGITS_CLASSIFIER_TEST_ACCURACY,
    DigitsClassifier,
    _classify,
    digits_features,
    digits_logits,
    load_digits_classifier,
    to_digits_resolution,
)
from jax_diffusion.flow_matching import flow_bits_per_dim
from jax_diffusion.guidance import check_guidance_rescale
from jax_diffusion.likelihood import ode_bits_per_dim
from jax_diffusion.losses import nll_bpd
from jax_diffusion.samplers import SPACINGS
from jax_diffusion.schedules import Schedule

__all__ = [
    "DIGITS_CLASSIFIER_TEST_ACCURACY",
    "DigitsClassifier",
    "FeatureStats",
    "PrecisionRecall",
    "bits_per_dim",
    "digits_features",
    "digits_logits",
    "evaluate_workdir",
    "frechet_distance",
    "inception_score",
    "load_digits_classifier",
    "precision_recall",
    "to_digits_resolution",
]


def _real_array(name: str, x, shape: str = "") -> np.ndarray:
    """x as a NumPy array of real numbers (bfloat16 included: jnp.issubdtype knows the
    ml_dtypes floats, NumPy does not); complex (whose imaginary part a float64 cast would drop
    with only a warning), string or object input is a ValueError naming `name`."""
    x = np.asarray(x)
    if np.iscomplexobj(x) or not (jnp.issubdtype(x.dtype, jnp.number) or x.dtype == bool):
        raise ValueError(f"{name} must be a real-valued array{shape}; got dtype {x.dtype}")
    return x


def _as_matrix(name: str, x, *, min_rows: int = 1) -> np.ndarray:
    x = _real_array(name, x, " [N, D]").astype(np.float64)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a 2-D array [N, D] with D >= 1; got shape {x.shape}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} must have at least {min_rows} rows; got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} must be finite; got {np.size(x) - np.isfinite(x).sum()} NaN/inf")
    return x


# ----------------------------------------------------------------------------- Frechet distance


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """The symmetric PSD square root V diag(sqrt(max(w, 0))) V^T of a symmetric matrix."""
    w, v = np.linalg.eigh(cov)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _psd_tolerance(cov) -> float:
    """Relative size of the negative eigenvalues that rounding in cov's own dtype can leave."""
    dtype = getattr(cov, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        return 1e-8
    return max(1e-8, 100.0 * float(jnp.finfo(dtype).eps))


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """Frechet (2-Wasserstein) distance^2 between N(mu1, cov1) and N(mu2, cov2).

    d^2 = ||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1 C2)^{1/2})  (Dowson & Landau 1982; the FID of
    Heusel et al. 2017). Tr (C1 C2)^{1/2} is computed as the sum of sqrt(max(eig(M), 0)) of the
    symmetric PSD matrix M = C1^{1/2} C2 C1^{1/2}, which has the eigenvalues of C1 C2, in
    float64 with `eigh`: no complex intermediates, and well-defined for singular
    (rank-deficient) covariances, where `scipy.linalg.sqrtm(C1 @ C2)` is ill-conditioned.

    Args:
      mu1: [D] mean of the first Gaussian (e.g. of generated-image features).
      cov1: [D, D] symmetric positive semi-definite covariance.
      mu2: [D] mean of the second Gaussian (e.g. of real-image features).
      cov2: [D, D] symmetric positive semi-definite covariance.

    Returns:
      The squared distance as a Python float >= 0 (rounding below 0 is clipped to 0).

    Raises:
      ValueError: shapes that are not [D] / [D, D] with one D, non-finite, non-symmetric or
        indefinite covariances (an eigenvalue below -tol times the largest magnitude; tol is
        1e-8 for float64 covariances and 100 times the machine epsilon of a lower-precision
        float dtype, 1.2e-5 for float32, whose rounding alone leaves a singular covariance
        with negative eigenvalues of ~1e-7 times the largest).
    """
    mu1, cov1, mu2, cov2 = (
        _real_array(name, value)
        for name, value in (("mu1", mu1), ("cov1", cov1), ("mu2", mu2), ("cov2", cov2))
    )
    tols = {"cov1": _psd_tolerance(cov1), "cov2": _psd_tolerance(cov2)}
    mu1, mu2 = mu1.astype(np.float64), mu2.astype(np.float64)
    cov1, cov2 = cov1.astype(np.float64), cov2.astype(np.float64)
    if mu1.ndim != 1 or mu1.shape != mu2.shape or mu1.size == 0:
        raise ValueError(f"mu1 and mu2 must both be [D]; got shapes {mu1.shape}, {mu2.shape}")
    d = mu1.shape[0]
    for name, value in (("mu1", mu1), ("cov1", cov1), ("mu2", mu2), ("cov2", cov2)):
        if name.startswith("cov") and value.shape != (d, d):
            raise ValueError(f"{name} must be [D, D] = [{d}, {d}]; got shape {value.shape}")
        if not np.isfinite(value).all():
            raise ValueError(f"{name} must be finite; got NaN or inf")
    for name, value in (("cov1", cov1), ("cov2", cov2)):
        scale = max(np.abs(value).max(), 1e-300)
        asymmetry = np.abs(value - value.T).max() / scale
        if asymmetry > 1e-6:
            raise ValueError(
                f"{name} must be symmetric (max |C - C^T| / max |C| <= 1e-6); got {asymmetry:.3g}"
            )
        w = np.linalg.eigvalsh(0.5 * (value + value.T))
        if w[0] < -tols[name] * max(np.abs(w).max(), 1e-300):
            raise ValueError(
                f"{name} must be positive semi-definite; got smallest eigenvalue {w[0]:.3g} "
                f"(largest {w[-1]:.3g})"
            )
    sqrt1 = _psd_sqrt(0.5 * (cov1 + cov1.T))
    m = sqrt1 @ cov2 @ sqrt1
    eig = np.linalg.eigvalsh(0.5 * (m + m.T))
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_covmean
    return max(float(fd), 0.0)


class FeatureStats:
    """Streaming mean and covariance of features, in float64, merge-able across batches/hosts.

    Keeps (n, mean, M2 = sum of centred outer products) and combines batches with the pairwise
    update of Chan, Golub & LeVeque 1979: exact (no E[x x^T] - mu mu^T cancellation) and
    independent of how the features were split. `cov` equals `np.cov` of all features
    concatenated (unbiased, denominator n - 1).
    """

    def __init__(self):
        self._n = 0
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None

    @classmethod
    def from_features(cls, features) -> FeatureStats:
        """The statistics of one [N, D] array of features."""
        return cls().update(features)

    def _combine(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        if self._n == 0:
            self._n, self._mean, self._m2 = n_b, mean_b.copy(), m2_b.copy()
            return
        if mean_b.shape != self._mean.shape:
            d, got = self._mean.shape[0], mean_b.shape[0]
            raise ValueError(f"features must have D = {d} columns like the earlier; got D = {got}")
        n = self._n + n_b
        delta = mean_b - self._mean
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (self._n * n_b / n)
        self._mean = self._mean + delta * (n_b / n)
        self._n = n

    def update(self, features) -> FeatureStats:
        """Adds features [B, D] (B >= 1, any float dtype) and returns self, for chaining.

        Raises:
          ValueError: not 2-D, empty, non-finite, or D different from earlier batches.
        """
        x = _as_matrix("features", features)
        mean = x.mean(axis=0)
        centred = x - mean
        self._combine(x.shape[0], mean, centred.T @ centred)
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """A new FeatureStats holding the features of both `self` and `other`."""
        if not isinstance(other, FeatureStats):
            raise ValueError(
                f"other must be a FeatureStats (use update() for an array of features); got "
                f"{type(other).__name__}"
            )
        out = FeatureStats()
        for stats in (self, other):
            if stats._n:
                out._combine(stats._n, stats._mean, stats._m2)
        return out

    @property
    def n(self) -> int:
        """Number of feature vectors seen."""
        return self._n

    @property
    def mean(self) -> np.ndarray:
        """[D] float64 mean."""
        if self._n == 0:
            raise ValueError("mean needs at least 1 feature vector; got n = 0")
        return self._mean.copy()

    @property
    def cov(self) -> np.ndarray:
        """[D, D] float64 unbiased covariance (as np.cov(features, rowvar=False))."""
        if self._n < 2:
            raise ValueError(f"cov needs at least 2 feature vectors; got n = {self._n}")
        return self._m2 / (self._n - 1)


# ------------------------------------------------------------------ precision / recall and IS


class PrecisionRecall(NamedTuple):
    """Improved precision and recall (Kynkaanniemi et al. 2019), each a float in [0, 1]."""

    precision: float
    recall: float


def _sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[len(a), len(b)] squared Euclidean distances, ||a||^2 + ||b||^2 - 2 a.b, clipped at 0."""
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d2, 0.0)


def _knn_radii2(x: np.ndarray, k: int, batch_size: int) -> np.ndarray:
    """Squared distance of each row of x to its k-th nearest OTHER row."""
    radii = np.empty(len(x))
    for start in range(0, len(x), batch_size):
        d2 = _sq_distances(x[start : start + batch_size], x)
        rows = np.arange(d2.shape[0])
        d2[rows, start + rows] = 0.0  # self is the 0-th neighbour, so index k is the k-th other
        radii[start : start + batch_size] = np.partition(d2, k, axis=1)[:, k]
    return radii


def _coverage(points: np.ndarray, centres: np.ndarray, radii2: np.ndarray, batch_size: int):
    """Fraction of points inside at least one ball B(centre_j, radius_j)."""
    inside = 0
    for start in range(0, len(points), batch_size):
        d2 = _sq_distances(points[start : start + batch_size], centres)
        inside += int((d2 <= radii2[None, :]).any(axis=1).sum())
    return inside / len(points)


def precision_recall(
    real_features, fake_features, *, k: int = 3, batch_size: int = 1024
) -> PrecisionRecall:
    """Improved precision and recall with k-NN manifolds (Kynkaanniemi et al. 2019, section 3).

    Each set's manifold is the union of balls around its points, the radius of a point being
    the distance to its k-th nearest neighbour in the same set (k = 3 in the paper). Precision
    is the fraction of fake points inside the real manifold (quality); recall is the fraction of
    real points inside the fake manifold (coverage). The paper uses equal set sizes: recall
    grows with the number of fake points.

    Args:
      real_features: [N_real, D] features of real data, N_real > k.
      fake_features: [N_fake, D] features of generated data, N_fake > k.
      k: neighbourhood size, int >= 1.
      batch_size: rows per block of the pairwise-distance computation (memory ~ batch_size * N).

    Returns:
      PrecisionRecall(precision, recall).

    Raises:
      ValueError: bad shapes, non-finite features, k or batch_size out of range.
    """
    k = check_int("k", k, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    real = _as_matrix("real_features", real_features, min_rows=k + 1)
    fake = _as_matrix("fake_features", fake_features, min_rows=k + 1)
    if real.shape[1] != fake.shape[1]:
        got = f"{real.shape[1]} and {fake.shape[1]}"
        raise ValueError(f"real_features and fake_features must have the same D; got {got}")
    # distances do not depend on a common shift; removing one keeps ||a||^2 + ||b||^2 - 2 a.b
    # from cancelling catastrophically for features far from the origin
    centre = real.mean(axis=0)
    real, fake = real - centre, fake - centre
    precision = _coverage(fake, real, _knn_radii2(real, k, batch_size), batch_size)
    recall = _coverage(real, fake, _knn_radii2(fake, k, batch_size), batch_size)
    return PrecisionRecall(precision, recall)


def inception_score(probs) -> float:
    """Inception-style score exp(E_x KL(p(y | x) || p(y))) of any classifier's predictions.

    Salimans et al. 2016, section 4, with p(y) the mean of p(y | x) over the N samples (a single
    split; the paper reports mean and std over 10 splits of 5000). It lies in [1, C]: 1 when
    every sample gets the same prediction, C for confident predictions balanced over C classes.

    Args:
      probs: [N, C] class probabilities p(y | x_i) (softmax outputs), rows summing to 1.

    Returns:
      The score as a Python float.

    Raises:
      ValueError: not [N, C], negative or non-finite entries, rows not summing to 1 (+-1e-3).
    """
    p = _as_matrix("probs", probs)
    row_error = np.abs(p.sum(axis=1) - 1.0).max()
    if p.min() < 0 or row_error > 1e-3:
        raise ValueError(
            "probs must be non-negative with rows summing to 1 (softmax outputs); got min "
            f"{p.min():.3g} and max |row sum - 1| {row_error:.3g}"
        )
    p = p / p.sum(axis=1, keepdims=True)
    p_y = p.mean(axis=0)
    safe = np.where(p > 0, p, 1.0)  # 0 log 0 = 0
    kl = (p * (np.log(safe) - np.log(np.where(p_y > 0, p_y, 1.0))[None, :])).sum(axis=1)
    return float(np.exp(kl.mean()))


def _softmax64(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------------------- bits/dim


def bits_per_dim(
    schedule: Schedule,
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    images,
    rng: jax.Array,
    *,
    batch_size: int = 250,
    prediction: str,
    variance: str,
    clip_denoised: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Negative log-likelihood bound of a dataset in bits/dim: L_T + sum_t L_{t-1} + L_0.

    The full-chain variational bound of Ho et al. 2020, eq. 5, every one of the T terms
    evaluated (`losses.nll_bpd`, one x_t sample per example and step), averaged over `images`.
    The decoder L_0 is the 8-bit discretized Gaussian (Ho et al. 2020, eq. 13) for any data:
    each value x owns the bin [x - 1/255, x + 1/255] (the edge values -1 and 1 a half-line).
    The digits' 17 grey levels g / 8 - 1 are NOT on the 8-bit grid u / 127.5 - 1 (only -1 and 1
    are), so for them L_0 is the mass of a bin of the 8-bit width centred on each grey level:
    a bits/dim on the 8-bit scale, but neither the likelihood of the digits rounded to the 8-bit
    grid (which differs in L_0) nor that of a 17-level model.

    Batches have `min(batch_size, N)` examples; the last one is padded with copies of the first
    examples, whose results are dropped, so `nll_bpd` is compiled once and every example counts
    once. Batch i draws its noise from fold_in(rng, i).

    Args:
      schedule: the noise schedule the model was trained with.
      model_fn: model_fn(x [B, ...], t int [B]) -> model output (doubled channels for
        learned_range), e.g. `lambda x, t: model.apply({"params": ema_params}, x, t, None)`.
      images: [N, ...] data in [-1, 1] (on the 8-bit grid for a true discrete likelihood), N >= 1.
      rng: PRNG key.
      batch_size: examples per jitted call.
      prediction: 'eps' | 'x0' | 'v', what model_fn outputs (required: a mismatch is silent).
      variance: 'fixed_small' | 'fixed_large' | 'learned_range'.
      clip_denoised: clip x0_hat to [-1, 1] in the reverse mean.
      progress: show a tqdm progress bar.

    Returns:
      {"total_bpd", "prior_bpd", "kl_bpd", "decoder_bpd"}: means over the N examples (total =
      prior + kl + decoder), "total_bpd_stderr": the standard error of the total's mean (data
      and noise together; None for N = 1), and "num_examples": N.

    Raises:
      ValueError: unknown prediction or variance, schedule not a Schedule, rng not a PRNG key,
        empty images, images not floating, not finite or outside [-1, 1], batch_size < 1.
      FloatingPointError: the bound of some example is NaN or inf (the model's output was).
    """
    check_prediction(prediction)
    check_variance(variance)
    check_schedule(schedule)
    _check_rng(rng, why=" for the bound's noise")  # before fold_in, which fails obscurely
    batch_size = check_int("batch_size", batch_size, 1)
    images = check_data(images, name="images")
    n = len(images) if images.ndim else 0
    if n == 0:
        raise ValueError(f"images must hold at least one example; got shape {images.shape}")
    if images.dtype.itemsize < 4:  # in float16 / bfloat16 the bound is off by ~0.3-2%
        images = images.astype(np.float32)

    kwargs = dict(prediction=prediction, variance=variance, clip_denoised=clip_denoised)
    parts = _per_example_batches(
        lambda x, key: nll_bpd(schedule, model_fn, x, key, **kwargs)[:4],
        images,
        rng,
        batch_size,
        desc="bits/dim",
        progress=progress,
    )
    names = ("total_bpd", "prior_bpd", "kl_bpd", "decoder_bpd")
    out = {name: float(p.mean()) for name, p in zip(names, parts, strict=True)}
    out["total_bpd_stderr"] = _finite_stderr(parts[0])
    out["num_examples"] = n
    return out


def _per_example_batches(fn, images: np.ndarray, rng, batch_size: int, *, desc, progress):
    """[fn's outputs over all of images, float64 [N] each] from the jitted fn(x [b, ...], key)
    -> tuple of [b] arrays on batches of b = min(batch_size, N): the last batch is padded with
    copies of the first examples, whose results are dropped, so fn compiles once and every
    example counts once. Batch i uses fold_in(rng, i)."""
    from tqdm.auto import tqdm

    n = len(images)
    bs = min(batch_size, n)
    batch_fn = jax.jit(fn, compiler_options=compiler_options())
    parts: list[list[np.ndarray]] = []
    for i in tqdm(range(-(-n // bs)), desc=desc, disable=not progress, leave=False):
        x = images[i * bs : (i + 1) * bs]
        keep = len(x)
        if keep < bs:
            x = np.concatenate([x, images[: bs - keep]])
        outputs = jax.device_get(batch_fn(x, jax.random.fold_in(rng, i)))
        parts = parts or [[] for _ in outputs]
        for acc, value in zip(parts, outputs, strict=True):
            acc.append(np.asarray(value, np.float64)[:keep])
    return [np.concatenate(p) for p in parts]


def _finite_stderr(values: np.ndarray) -> float | None:
    """The standard error of the mean of per-example bits/dim (None for one example), after
    checking they are finite: a NaN mean would be written as JSON's invalid NaN."""
    n = np.size(values)
    if not np.isfinite(values).all():
        raise FloatingPointError(
            f"the bits/dim of {n - np.isfinite(values).sum()} of {n} examples are "
            "not finite: the model returned NaN or inf (a diverged run?)"
        )
    return float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else None


# ------------------------------------------------------------------------ evaluate a workdir


def _restore_ema_params(workdir: str):
    """(config, example shape, model, EMA params, step) of a digits training run."""
    from jax_diffusion import train

    config, shape, model, params, step = train.load_run(workdir)
    if config.data.name != "digits":
        raise ValueError(f"workdir must hold a run on data.name 'digits'; got {config.data.name!r}")
    return config, shape, model, params, step


def evaluate_workdir(
    workdir: str,
    *,
    num_samples: int = 1000,
    sampler: str | None = None,
    num_steps: int | None = None,
    guidance: float | None = None,
    spacing: str | None = None,
    s_churn: float | None = None,
    seed: int = 0,
    guidance_rescale: float | None = None,
    batch_size: int = 250,
    bpd_examples: int = 0,
    ode_bpd_examples: int = 0,
    ode_steps: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Samples from a digits training run's latest EMA params and measures the samples.

    Restores the latest checkpoint of `workdir` (`jax-diffusion train` output with
    `config.json` and `data_info.json`), draws `num_samples` images with `train.sample` in
    batches of `batch_size` (batch i uses fold_in(PRNGKey(seed), i); the last batch is drawn
    at full size and truncated: one compile), clips them to [-1, 1] and compares them with the
    digits in the shipped classifier's feature space: a CPU-scale stand-in for FID, not FID.
    Compare only runs evaluated with the same num_samples.

    Class-conditional models (config.model.num_classes set) sample the labels
    arange(num_samples) % num_classes (balanced); `class_accuracy` is the fraction of samples
    the classifier assigns to the label they were sampled with. Bits/dim of a conditional
    model are those of the unconditional (null-label) model p(x).

    Args:
      workdir: the training run's directory.
      num_samples: number of generated images, >= 4 (recall's 3-NN radii need 4).
      sampler: 'ddpm' | 'ddim' | 'dpm++' | 'heun' (| 'euler' for a flow run); None for
        config.sample.sampler.
      num_steps: sampling steps (ddim, dpm++; an error with ddpm, which runs all T steps);
        None for config.sample.num_steps.
      guidance: classifier-free guidance scale w (conditional models); None for the config's.
      guidance_rescale: phi in [0, 1] of `classifier_free_guidance` (conditional models);
        None for the config's sample.guidance_rescale (0 where it has none).
      spacing: ddim's steps, 'leading' | 'trailing' | 'linspace'; None for the config's.
      s_churn: EDM's churn for heun on a ddpm run, >= 0; None for config.sample.s_churn.
      seed: sampling seed in [0, 2**32) (bits/dim uses fold_in(PRNGKey(seed), 2**31 - 1), the
        ODE bits/dim fold_in(PRNGKey(seed), 2**31 - 2)).
      batch_size: images per sampling (and bits/dim) call.
      bpd_examples: if > 0, also the bits/dim of the first `bpd_examples` test digits, at most
        297 (T network calls per example: slow for T = 1000).
      ode_bpd_examples: if > 0, also their exact bits/dim by the probability-flow ODE, at most
        297: `likelihood.ode_bits_per_dim` (128 rho-spaced steps, 254 network calls with one
        Hutchinson probe per example), or for a flow run `flow_matching.flow_bits_per_dim`
        (32 Heun steps), both of uniformly dequantized digits on the 8-bit scale.
      ode_steps: the ODE's steps for ode_bpd_examples, >= 2 (a ddpm run: at most its T
        steps); None for the defaults above. Its error is second order in the step: compare
        ode_bpd at n and 2n to see how far it is from converged.
      mesh: a mesh with a 'data' axis (`train.make_mesh()`) to split each sampling batch over
        its devices (the samples are a one-device run's up to float rounding), or None for one
        device. Bits/dim runs on one device.
      progress: show tqdm progress bars.

    Returns:
      A JSON-able dict: run info ("workdir", "step", "num_samples", "sampler", "num_steps",
      "spacing" (ddim's, else None), "s_churn" (heun's on a ddpm run, else None), "guidance",
      "guidance_rescale" (both None for an unconditional model),
      "seed", "image_size"); "fd_test" / "fd_train": Frechet distance of the samples' features
      to those of the digits test (297) / train (1500) split; "fd_train_vs_test": the
      same between the two real splits, a floor set by finite sample sizes; "precision",
      "recall" (k = 3) against the test split; "inception_score" of the samples and
      "inception_score_test" of the test digits (9.06 at 8x8; the maximum is 10);
      "class_accuracy" for conditional models; "bpd", "bpd_prior", "bpd_kl", "bpd_decoder",
      "bpd_stderr", "bpd_examples" when bpd_examples > 0; "ode_bpd", "ode_bpd_stderr",
      "ode_bpd_examples", "ode_steps" when ode_bpd_examples > 0; "sample_seconds".

    Raises:
      ValueError: a non-digits run, or arguments out of range.
      FloatingPointError: some samples, or the bits/dim of some test digits, are NaN or inf.
    """
    from jax_diffusion import data as data_lib
    from jax_diffusion import generate, run_config, train

    num_samples = check_int("num_samples", num_samples, 4)
    batch_size = check_int("batch_size", batch_size, 1)
    bpd_examples = check_int("bpd_examples", bpd_examples, 0, data_lib.DIGITS_NUM_TEST)
    ode_examples = check_int("ode_bpd_examples", ode_bpd_examples, 0, data_lib.DIGITS_NUM_TEST)
    if ode_steps is not None:
        ode_steps = check_int("ode_steps", ode_steps, 2)
        if not ode_examples:
            raise ValueError(
                f"ode_steps applies to the ODE bits/dim; pass ode_bpd_examples > 0 with it "
                f"(got ode_steps={ode_steps}, ode_bpd_examples=0)"
            )
    seed = check_int("seed", seed, 0, 2**32 - 1)  # PRNGKey keeps 32 bits
    if sampler is not None and sampler not in run_config.SAMPLERS:
        raise ValueError(
            f"sampler must be one of {run_config.SAMPLER_NAMES} or None; got {sampler!r}"
        )
    if num_steps is not None:
        num_steps = check_int("num_steps", num_steps, 1)
        if sampler == "ddpm":  # before the run is read (train.sample says so too, later)
            raise ValueError(
                f"num_steps applies to 'ddim', 'dpm++' and 'heun'; sampler 'ddpm' runs all the "
                f"run's steps (got num_steps={num_steps})"
            )
    if spacing is not None and spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS} or None; got {spacing!r}")
    mesh = generate._check_mesh(mesh)
    # then against the run's config (the steps' range, guidance), before the run is restored
    check = dict(sampler=sampler, num_steps=num_steps, spacing=spacing, guidance=guidance)
    check.update(s_churn=s_churn)
    saved_config = train.load_run_config(workdir)
    sampler, steps_used, spacing_used, churn_used = train.check_sampling(
        saved_config, **check
    )  # with the config's defaults filled in
    flow_run = saved_config.diffusion.get("process", "ddpm") == "flow"
    if guidance_rescale is not None:
        if saved_config.model.get("num_classes", None) is None:
            raise ValueError(
                f"guidance_rescale needs a class-conditional model (this run has no classes); "
                f"got guidance_rescale={guidance_rescale}"
            )
        guidance_rescale = check_guidance_rescale(guidance_rescale)
    if ode_steps is not None and not flow_run:
        num_timesteps = saved_config.diffusion.num_timesteps
        if ode_steps > num_timesteps:
            raise ValueError(
                f"ode_steps must be in [2, {num_timesteps}] (the run's diffusion steps); "
                f"got {ode_steps}"
            )
    config, shape, model, params, step = _restore_ema_params(workdir)
    num_classes = config.model.get("num_classes", None)
    schedule = train.get_schedule(config.diffusion)
    if guidance_rescale is not None:
        config = config.copy_and_resolve_references()
        config.sample.guidance_rescale = guidance_rescale
    s = config.sample
    guidance = (s.guidance if guidance is None else guidance) if num_classes else None
    rescale = float(s.get("guidance_rescale", 0.0)) if num_classes else None

    rng = jax.random.PRNGKey(seed)
    t0 = time.perf_counter()
    # num_steps and spacing as given: train.sample takes None as the config's, and rejects
    # num_steps with ddpm and spacing with a sampler other than ddim
    samples, labels = train.sample_in_batches(
        config,
        model,
        params,
        schedule,
        rng,
        shape=shape,
        num=num_samples,
        batch_size=batch_size,
        mesh=mesh,
        progress=progress,
        sampler=sampler,
        num_steps=num_steps,
        guidance=guidance,
        spacing=spacing,
        s_churn=s_churn,
    )
    sample_seconds = time.perf_counter() - t0
    train.check_finite_samples(samples)

    test_images = data_lib.load_digits(shape[0], "test")[0]
    fake_logits, fake_feats = _classify(np.clip(samples, -1.0, 1.0))
    test_logits, test_feats = _classify(test_images)
    train_feats = _classify(data_lib.load_digits(shape[0], "train")[0])[1]
    fake, test, trn = (FeatureStats.from_features(x) for x in (fake_feats, test_feats, train_feats))
    pr = precision_recall(test_feats, fake_feats, k=3)
    metrics: dict[str, Any] = {
        "workdir": os.path.abspath(workdir),
        "step": step,
        "num_samples": num_samples,
        "sampler": sampler,
        "num_steps": None if sampler == "ddpm" else steps_used,
        "spacing": spacing_used if sampler == "ddim" else None,
        "s_churn": churn_used,
        "guidance": None if guidance is None else float(guidance),
        "guidance_rescale": rescale,
        "seed": seed,
        "image_size": shape[0],
        "fd_test": frechet_distance(fake.mean, fake.cov, test.mean, test.cov),
        "fd_train": frechet_distance(fake.mean, fake.cov, trn.mean, trn.cov),
        "fd_train_vs_test": frechet_distance(trn.mean, trn.cov, test.mean, test.cov),
        "precision": pr.precision,
        "recall": pr.recall,
        "inception_score": inception_score(_softmax64(fake_logits)),
        "inception_score_test": inception_score(_softmax64(test_logits)),
    }
    if num_classes:
        predicted = fake_logits.argmax(axis=1)
        metrics["class_accuracy"] = float(np.mean(predicted == labels))

    def unconditional(x, t, method=None):  # p(x): the null label of a conditional model
        null = None if not num_classes else jnp.full((x.shape[0],), num_classes, jnp.int32)
        return model.apply({"params": params}, x, t, null, method=method)

    d = config.diffusion
    if bpd_examples:
        x0 = test_images[:bpd_examples]
        kwargs = dict(prediction=d.prediction, variance=d.variance, progress=progress)
        bpd_rng = jax.random.fold_in(rng, 2**31 - 1)
        bpd = bits_per_dim(schedule, unconditional, x0, bpd_rng, batch_size=batch_size, **kwargs)
        metrics.update(bpd=bpd["total_bpd"], bpd_stderr=bpd["total_bpd_stderr"])
        metrics.update({f"bpd_{k}": bpd[f"{k}_bpd"] for k in ("prior", "kl", "decoder")})
        metrics["bpd_examples"] = bpd["num_examples"]
    if ode_examples:
        if flow_run:
            ode_steps = 32 if ode_steps is None else ode_steps

            def ode_bpd(x, key):
                velocity = functools.partial(unconditional, method="velocity")
                return (flow_bits_per_dim(velocity, x, key, num_steps=ode_steps),)
        else:
            ode_steps = min(128, schedule.num_timesteps) if ode_steps is None else ode_steps

            def ode_bpd(x, key):
                kw = dict(prediction=d.prediction, variance=d.variance, num_steps=ode_steps)
                return (ode_bits_per_dim(unconditional, schedule, x, key, **kw),)

        (values,) = _per_example_batches(
            ode_bpd,
            test_images[:ode_examples],
            jax.random.fold_in(rng, 2**31 - 2),
            batch_size,
            desc="ODE bits/dim",
            progress=progress,
        )
        metrics.update(ode_bpd=float(values.mean()), ode_bpd_stderr=_finite_stderr(values))
        metrics.update(ode_bpd_examples=ode_examples, ode_steps=ode_steps)
    metrics["sample_seconds"] = sample_seconds
    return metrics
