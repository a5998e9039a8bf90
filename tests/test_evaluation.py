"""Evaluation metrics against scipy, closed forms, brute-force references and invariants."""

import json
import math
import os
import pathlib
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.special
from hypothesis import given, settings
from hypothesis import strategies as st

import jax_diffusion as jd
from jax_diffusion import cli, evaluation, generate, train
from jax_diffusion.checkpoints import CheckpointManager
from jax_diffusion.data import load_digits
from jax_diffusion.evaluation import (
    FeatureStats,
    bits_per_dim,
    digits_features,
    digits_logits,
    evaluate_workdir,
    frechet_distance,
    inception_score,
    precision_recall,
)
from jax_diffusion.run_config import get_schedule
from jax_diffusion.testing import gaussian_denoiser

ROOT = pathlib.Path(__file__).resolve().parents[1]


def random_gaussian(rng, d, rank=None):
    """A mean [d] and a PSD covariance [d, d] of the given rank (full by default)."""
    a = rng.standard_normal((d, rank or d))
    return rng.standard_normal(d), a @ a.T / (rank or d)


def scipy_fd(mu1, cov1, mu2, cov2):
    """The textbook formula, with scipy's general (Schur) square root of C1 C2."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singular C1 C2: scipy warns, the trace is still fine
        covmean = scipy.linalg.sqrtm(cov1 @ cov2)
    diff = mu1 - mu2
    return diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean).real


# ------------------------------------------------------------------------- Frechet distance


@pytest.mark.parametrize("d", [1, 2, 8, 32, 64])
@pytest.mark.parametrize("seed", [0, 1])
def test_frechet_distance_matches_scipy_on_random_spd(d, seed):
    rng = np.random.default_rng(seed)
    mu1, cov1 = random_gaussian(rng, d)
    mu2, cov2 = random_gaussian(rng, d)
    np.testing.assert_allclose(
        frechet_distance(mu1, cov1, mu2, cov2), scipy_fd(mu1, cov1, mu2, cov2), rtol=1e-10
    )


@pytest.mark.parametrize("d, rank", [(2, 1), (8, 4), (32, 16), (64, 3)])
def test_frechet_distance_rank_deficient(d, rank):
    rng = np.random.default_rng(d)
    mu1, cov1 = random_gaussian(rng, d, rank)
    mu2, cov2 = random_gaussian(rng, d, rank)
    got = frechet_distance(mu1, cov1, mu2, cov2)
    # Second reference without C1 C2: Tr (C1 C2)^{1/2} is the nuclear norm of C1^{1/2} C2^{1/2}.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about singular input
        s1, s2 = scipy.linalg.sqrtm(cov1).real, scipy.linalg.sqrtm(cov2).real
    nuclear = np.linalg.svd(s1 @ s2, compute_uv=False).sum()
    ref = (mu1 - mu2) @ (mu1 - mu2) + np.trace(cov1) + np.trace(cov2) - 2 * nuclear
    # the square roots of eigenvalues that are 0 up to rounding (~1e-16) are ~1e-8
    np.testing.assert_allclose(got, ref, rtol=1e-7)
    np.testing.assert_allclose(got, scipy_fd(mu1, cov1, mu2, cov2), rtol=1e-7)
    # same singular covariance: only the means differ
    np.testing.assert_allclose(
        frechet_distance(mu1, cov1, mu2, cov1), (mu1 - mu2) @ (mu1 - mu2), rtol=1e-7, atol=1e-7
    )


@pytest.mark.parametrize("d", [1, 5, 40])
def test_frechet_distance_invariants(d):
    rng = np.random.default_rng(d)
    mu1, cov1 = random_gaussian(rng, d)
    mu2, cov2 = random_gaussian(rng, d)
    fd = frechet_distance(mu1, cov1, mu2, cov2)
    scale = np.trace(cov1) + np.trace(cov2)
    assert frechet_distance(mu1, cov1, mu1, cov1) <= 1e-10 * scale
    np.testing.assert_allclose(frechet_distance(mu2, cov2, mu1, cov1), fd, rtol=1e-10)
    # a rigid motion x -> Q x + b applied to both Gaussians leaves the distance unchanged
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    b = rng.standard_normal(d)
    moved = frechet_distance(q @ mu1 + b, q @ cov1 @ q.T, q @ mu2 + b, q @ cov2 @ q.T)
    np.testing.assert_allclose(moved, fd, rtol=1e-9)
    assert fd > 0


@pytest.mark.parametrize("rotate", [False, True])
def test_frechet_distance_closed_form_for_commuting_covariances(rotate):
    # C1 = Q diag(a) Q^T, C2 = Q diag(b) Q^T commute: d^2 = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2
    rng = np.random.default_rng(3)
    d = 16
    a, b = rng.uniform(0.0, 3.0, d), rng.uniform(0.0, 3.0, d)
    a[:3] = 0.0  # singular too
    q = np.linalg.qr(rng.standard_normal((d, d)))[0] if rotate else np.eye(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    np.testing.assert_allclose(got, want, rtol=1e-7)


def test_frechet_distance_rejects_bad_arguments():
    mu, cov = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="mu1 and mu2"):
        frechet_distance(mu, cov, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"cov2 must be \[D, D\]"):
        frechet_distance(mu, cov, mu, np.eye(4))
    with pytest.raises(ValueError, match=r"cov1 must be symmetric \(.*<= 1e-6\); got 1"):
        frechet_distance(mu, np.triu(np.ones((3, 3))), mu, cov)
    with pytest.raises(ValueError, match="mu2 must be finite"):
        frechet_distance(mu, cov, np.full(3, np.nan), cov)
    # an indefinite "covariance" used to give 0.0 (its negative eigenvalues were clipped and
    # the traces cancelled): the value of identical distributions
    with pytest.raises(ValueError, match=r"cov1 must be positive semi-definite; got smallest"):
        frechet_distance(mu, -cov, mu, cov)
    with pytest.raises(ValueError, match="cov2 must be positive semi-definite"):
        frechet_distance(mu, cov, mu, np.diag([1.0, -1.0, 1.0]))
    # rounding-level negative eigenvalues of a singular covariance are accepted
    rank1 = np.outer([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) * (1 + 1e-15)
    assert frechet_distance(mu, rank1, mu, rank1) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_refuses_complex_and_non_numeric_arguments():
    # a complex mean used to lose its imaginary part with only a ComplexWarning: identical
    # real parts gave 0.0 for two different Gaussians
    mu, cov = np.zeros(2), np.eye(2)
    with pytest.raises(ValueError, match="mu1 must be a real-valued array; got dtype complex128"):
        frechet_distance(mu + 1j, cov, mu, cov)
    with pytest.raises(ValueError, match="cov2 must be a real-valued array; got dtype complex"):
        frechet_distance(mu, cov, mu, cov * (1 + 1j))
    with pytest.raises(ValueError, match="mu2 must be a real-valued array; got dtype <U"):
        frechet_distance(mu, cov, ["a", "b"], cov)


def test_frechet_distance_symmetry_is_relative_to_the_largest_entry():
    # max |C - C^T| / max |C| <= 1e-6, whatever the scale of C
    mu = np.zeros(2)

    def off_diagonal(scale, asymmetry):
        c = scale * np.eye(2)
        c[0, 1] = scale * asymmetry
        return c

    # a 1e-9 relative asymmetry of a covariance of scale 1e8 (0.1 absolute) is rounding
    big = off_diagonal(1e8, 1e-9)
    assert frechet_distance(mu, big, mu, 1e8 * np.eye(2)) == pytest.approx(0.0, abs=1e8 * 1e-8)
    for c, got in [(off_diagonal(1.0, 1e-4), "0.0001"), (off_diagonal(1e-8, 1e-3), "0.001")]:
        with pytest.raises(ValueError, match=rf"cov2 must be symmetric \(.*\); got {got}$"):
            frechet_distance(mu, np.eye(2), mu, c)


def test_frechet_distance_psd_tolerance_follows_each_covariance_s_own_dtype():
    # the docstring's bound on the smallest eigenvalue: -1e-8 times the largest for float64,
    # -100 eps(float32) = -1.19e-5 times it for float32 (-100 * 2^-7 for bfloat16), none
    # below 0 for exact integers
    mu, eye = np.zeros(3), np.eye(3)

    def smallest(e, dtype):
        return np.diag([1.0, 0.5, e]).astype(dtype)

    def closed_form(diagonal):
        # Tr C1 + Tr C2 - 2 Tr (C1 C2)^(1/2) for commuting covariances (here one is I),
        # eigenvalue by eigenvalue, the square root of a negative one taken as 0
        return sum(a + 1.0 - 2.0 * math.sqrt(max(a, 0.0)) for a in diagonal)

    accepted = [
        (smallest(-1e-9, np.float64), 1),
        (smallest(-1e-6, np.float32), 2),
        (smallest(-1e-3, jnp.bfloat16), 2),
    ]
    for cov, which in accepted:
        args = (mu, cov, mu, eye) if which == 1 else (mu, eye, mu, cov)
        want = closed_form(np.diag(cov).astype(np.float64))
        assert frechet_distance(*args) == pytest.approx(want, rel=1e-6)
    for cov, name in [
        (smallest(-1e-7, np.float64), "cov1"),
        (smallest(-1e-4, np.float32), "cov2"),
        (np.diag([1, 1, -1]), "cov1"),  # int64: its -1 is no rounding
    ]:
        args = (mu, cov, mu, eye) if name == "cov1" else (mu, eye, mu, cov)
        with pytest.raises(ValueError, match=f"{name} must be positive semi-definite"):
            frechet_distance(*args)


def test_frechet_distance_accepts_float32_covariances_of_rank_deficient_features():
    # Statistics computed in float32 (as jnp.cov does by default) of features of rank 8 < D = 32:
    # rounding leaves eigenvalues of about -1e-7 times the largest, which are not indefiniteness.
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200, 8)) @ rng.standard_normal((8, 32))
    b = rng.standard_normal((200, 8)) @ rng.standard_normal((8, 32)) + 0.5

    def f32_stats(feats):
        x = feats.astype(np.float32)
        mu = x.mean(axis=0)
        centred = x - mu
        return mu, centred.T @ centred / np.float32(len(x) - 1)

    (mu1, cov1), (mu2, cov2) = f32_stats(a), f32_stats(b)
    assert cov1.dtype == np.float32
    want = scipy_fd(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    np.testing.assert_allclose(frechet_distance(mu1, cov1, mu2, cov2), want, rtol=1e-4)
    assert frechet_distance(mu1, cov1, mu1, cov1) <= 1e-6 * np.trace(cov1)
    # a truly indefinite float32 matrix is still refused
    with pytest.raises(ValueError, match="cov2 must be positive semi-definite"):
        frechet_distance(mu1, cov1, mu2, -cov2)


# ----------------------------------------------------------------------------- FeatureStats


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_feature_stats_equals_np_cov(offset):
    rng = np.random.default_rng(0)
    features = offset + rng.standard_normal((500, 12)) @ rng.standard_normal((12, 12))
    sizes = [1, 7, 100, 1, 250, 141]
    stats = FeatureStats()
    for chunk in np.split(features, np.cumsum(sizes)[:-1]):
        stats.update(chunk.astype(np.float64))
    assert stats.n == 500
    np.testing.assert_allclose(stats.mean, features.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(features, rowvar=False), rtol=1e-9, atol=1e-9)
    # merging two halves accumulated separately gives the same statistics
    merged = FeatureStats.from_features(features[:123]).merge(
        FeatureStats.from_features(features[123:])
    )
    np.testing.assert_allclose(merged.cov, stats.cov, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(FeatureStats().merge(merged).mean, stats.mean, rtol=1e-12)


def test_feature_stats_errors():
    stats = FeatureStats.from_features(np.ones((1, 3)))
    with pytest.raises(ValueError, match="cov needs at least 2"):
        _ = stats.cov
    with pytest.raises(ValueError, match="D = 3"):
        stats.update(np.ones((2, 4)))
    with pytest.raises(ValueError, match="features must be a 2-D"):
        stats.update(np.ones(3))
    # an array for merge's FeatureStats: AttributeError '_n'
    with pytest.raises(ValueError, match="other must be a FeatureStats .*update.*got ndarray"):
        stats.merge(np.ones((2, 3)))


# ----------------------------------------------------------------------- precision / recall


def brute_force_precision_recall(real, fake, k):
    """Kynkaanniemi et al. 2019 eq. 1-2 with explicit loops."""

    def radii(x):
        return np.array([np.sort(np.linalg.norm(x - p, axis=1))[k] for p in x])

    def covered(points, centres, r):
        return np.mean([np.any(np.linalg.norm(centres - p, axis=1) <= r) for p in points])

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_brute_force(k):
    rng = np.random.default_rng(k)
    real = rng.standard_normal((120, 6))
    fake = 0.7 * rng.standard_normal((90, 6)) + 0.5
    got = precision_recall(real, fake, k=k, batch_size=17)
    want = brute_force_precision_recall(real, fake, k)
    assert got.precision == pytest.approx(want[0], abs=1e-12)
    assert got.recall == pytest.approx(want[1], abs=1e-12)
    assert 0 < got.precision < 1 and 0 < got.recall < 1  # the case is not degenerate


def test_precision_recall_closed_cases():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 8))
    assert precision_recall(x, x.copy()) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)
    # real: two far-apart modes; fake: only the first -> the fakes are realistic (up to the
    # tails that 3-NN balls of 500 points miss), half the real data is missed
    modes = np.concatenate([rng.standard_normal((500, 2)), 50 + rng.standard_normal((500, 2))])
    pr = precision_recall(modes, rng.standard_normal((500, 2)))
    assert pr.precision > 0.95
    assert 0.45 < pr.recall <= 0.5


def test_precision_recall_counts_points_on_the_ball_boundary():
    # k-NN balls are closed (Kynkaanniemi et al. 2019: ||phi - phi_r|| <= NND_k(phi_r))
    real = np.arange(6.0)[:, None]
    assert precision_recall(real, real + 1.0, k=1) == (1.0, 1.0)  # each edge point at distance 1
    same = np.zeros((4, 2))
    assert precision_recall(same, same, k=3) == (1.0, 1.0)  # radius 0: only equality counts


def test_precision_recall_rejects_bad_arguments():
    x = np.zeros((10, 2))
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        precision_recall(x, x, k=0)
    with pytest.raises(ValueError, match="fake_features must have at least 4 rows"):
        precision_recall(x, x[:3], k=3)
    with pytest.raises(ValueError, match="same D"):
        precision_recall(x, np.zeros((10, 3)))
    with pytest.raises(ValueError, match=r"real_features must be .* with D >= 1; got shape"):
        precision_recall(np.zeros((6, 0)), np.zeros((6, 0)))
    with pytest.raises(ValueError, match="real_features must be a real-valued array"):
        precision_recall(x + 1j, x)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_metrics_accept_low_precision_features(dtype):
    # bfloat16 is a real float dtype (features from a bfloat16 network); it used to be refused
    # as "not a real-valued array" because NumPy does not count it as a number
    rng = np.random.default_rng(0)
    real = np.asarray(jnp.asarray(rng.standard_normal((40, 5)), dtype))
    fake = np.asarray(jnp.asarray(0.5 + rng.standard_normal((30, 5)), dtype))
    real64, fake64 = real.astype(np.float64), fake.astype(np.float64)  # the same values, exactly
    assert tuple(precision_recall(real, fake)) == brute_force_precision_recall(real64, fake64, 3)
    stats = FeatureStats.from_features(real)
    np.testing.assert_allclose(stats.cov, np.cov(real64, rowvar=False), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.mean, real64.mean(axis=0), rtol=1e-12, atol=1e-12)


def test_feature_stats_of_boolean_features_are_those_of_their_0_1_values():
    # bool is a real dtype (binary features) though NumPy and JAX do not count it as a number
    x = np.random.default_rng(1).random((50, 4)) < 0.3
    stats = FeatureStats.from_features(x)
    np.testing.assert_allclose(stats.mean, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(x.astype(np.float64), rowvar=False), atol=1e-12)


def test_precision_recall_does_not_depend_on_a_common_shift():
    # ||a||^2 + ||b||^2 - 2 a.b cancelled for features far from the origin (offset 1e7 with
    # spread 1 changed the answer); the brute-force reference below has no such term
    rng = np.random.default_rng(5)
    real, fake = rng.standard_normal((50, 4)), 0.5 + rng.standard_normal((60, 4))

    def reference(real, fake, k=3):
        def radii(x):
            d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
            return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

        def inside(points, centres):
            d = np.sqrt(((points[:, None] - centres[None]) ** 2).sum(-1))
            return float((d <= radii(centres)[None]).any(axis=1).mean())

        return inside(fake, real), inside(real, fake)

    want = reference(real, fake)
    for offset in (0.0, 1e7):
        assert tuple(precision_recall(real + offset, fake + offset)) == want


# ---------------------------------------------------------------------------- Inception score


@pytest.mark.parametrize("c", [2, 10])
def test_inception_score_closed_forms(c):
    assert inception_score(np.full((50, c), 1.0 / c)) == pytest.approx(1.0, abs=1e-12)
    one_hot = np.eye(c)[np.arange(10 * c) % c]
    assert inception_score(one_hot) == pytest.approx(c, rel=1e-12)
    # confident predictions of a single class: no diversity
    assert inception_score(np.eye(c)[np.zeros(30, int)]) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("q", [0.6, 0.9, 0.99])
def test_inception_score_two_class_mixture(q):
    # half the samples p = (q, 1 - q), half (1 - q, q): p(y) uniform, KL = log 2 - H(q)
    probs = np.array([[q, 1 - q], [1 - q, q]] * 20)
    entropy = -(q * math.log(q) + (1 - q) * math.log(1 - q))
    assert inception_score(probs) == pytest.approx(2 * math.exp(-entropy), rel=1e-12)


def test_inception_score_of_unequal_kls_is_exp_of_their_mean():
    # IS = exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016), the mean inside the exp
    probs = np.array([[1.0, 0.0], [0.5, 0.5], [0.2, 0.8]])
    marginal = probs.mean(0)
    kls = scipy.special.rel_entr(probs, marginal).sum(1)
    assert len(set(np.round(kls, 6))) == 3
    assert inception_score(probs) == pytest.approx(math.exp(kls.mean()), rel=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(2, 12), st.integers(0, 2**31 - 1))
def test_inception_score_bounds_and_permutation_invariance(n, c, seed):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(c, 0.3), size=n)
    score = inception_score(probs)
    assert 1.0 - 1e-9 <= score <= c + 1e-9
    perm = rng.permutation(c)
    assert inception_score(probs[rng.permutation(n)][:, perm]) == pytest.approx(score, rel=1e-9)


def test_inception_score_rejects_non_probabilities():
    with pytest.raises(ValueError, match=r"rows summing to 1 .*max \|row sum - 1\| 2$"):
        inception_score(np.ones((4, 3)))
    with pytest.raises(ValueError, match=r"probs must be a 2-D array \[N, D\] with D >= 1"):
        inception_score(np.ones((3, 0)))
    with pytest.raises(ValueError, match=r"probs must be a 2-D array"):
        inception_score(np.ones(3) / 3)


# ----------------------------------------------------------------------------------- bits/dim


def gaussian_grid_data(n, mean, std, seed=0):
    x = mean + std * np.random.default_rng(seed).standard_normal((n, 4, 4, 1))
    return (np.round((np.clip(x, -1, 1) + 1) * 127.5) / 127.5 - 1).astype(np.float32)


def test_bits_per_dim_of_the_exact_gaussian_denoiser():
    schedule = jd.Schedule.from_betas(jd.cosine_betas(100))
    mean, std = 0.2, 0.3
    x0 = gaussian_grid_data(64, mean, std)
    results = {}
    for prediction in ("eps", "x0", "v"):
        calls = []
        exact = gaussian_denoiser(schedule, mean, std, prediction)

        def model_fn(x, t, exact=exact, calls=calls):
            calls.append(x.shape)
            return exact(x, t)

        r = bits_per_dim(
            schedule,
            model_fn,
            x0,
            jax.random.key(1),
            batch_size=24,  # 24 + 24 + 16 padded to 24
            prediction=prediction,
            variance="fixed_small",
            progress=False,
        )
        assert calls == [(24, 4, 4, 1)]  # one trace for all three batches
        assert r["num_examples"] == 64
        parts = r["prior_bpd"] + r["kl_bpd"] + r["decoder_bpd"]
        assert all(np.isfinite(v) for v in r.values())
        np.testing.assert_allclose(parts, r["total_bpd"], rtol=1e-6)
        results[prediction] = r["total_bpd"]
        # a bound on -log2 p(x): above the entropy of the 8-bit-quantised N(0.2, 0.3^2)
        entropy = (0.5 * math.log(2 * math.pi * math.e * std**2) - math.log(2 / 255)) / math.log(2)
        assert r["total_bpd"] > entropy - 4 * r["total_bpd_stderr"]
    # the same denoiser in three parameterizations is the same model
    np.testing.assert_allclose(results["x0"], results["eps"], rtol=1e-5)
    np.testing.assert_allclose(results["v"], results["eps"], rtol=1e-5)


def test_bits_per_dim_padding_counts_every_example_once():
    # Single-point data x0 = m with its exact x0 denoiser: every term of an image c (constant)
    # depends on c only, not on the noise, so any batching must give the mean of the per-image
    # values. Image 0 is an outlier: padding the last batch with it would show.
    schedule = jd.Schedule.from_betas(jd.cosine_betas(50))
    m = 0.2
    values = np.array([0.9, 0.2, 0.25, 0.1, 0.3, 0.15, 0.2, 0.35, 0.05, 0.2])
    images = np.round((values[:, None, None, None] + 1) * 127.5) / 127.5 - 1
    images = np.broadcast_to(images, (10, 2, 2, 1)).astype(np.float32)

    def bpd(x, batch_size):
        return bits_per_dim(
            schedule,
            gaussian_denoiser(schedule, m, 0.0, "x0"),
            x,
            jax.random.key(0),
            batch_size=batch_size,
            prediction="x0",
            variance="fixed_small",
            progress=False,
        )

    per_image = [bpd(images[i : i + 1], 1)["total_bpd"] for i in range(10)]
    assert per_image[0] > 2 * max(per_image[1:])
    stderr = np.std(per_image, ddof=1) / math.sqrt(10)  # of the mean of 10 examples
    for batch_size in (3, 4, 10, 64):
        r = bpd(images, batch_size)
        assert r["num_examples"] == 10
        np.testing.assert_allclose(r["total_bpd"], np.mean(per_image), rtol=1e-4)
        np.testing.assert_allclose(r["total_bpd_stderr"], stderr, rtol=1e-3)


def test_bits_per_dim_batches_draw_different_noise():
    # one image four times, one per batch: with noise-dependent terms (data of std 0.3) the four
    # results differ only if batch i draws its own noise, fold_in(rng, i)
    schedule = jd.Schedule.from_betas(jd.cosine_betas(100))
    x0 = np.repeat(gaussian_grid_data(1, 0.2, 0.3), 4, axis=0)
    r = bits_per_dim(
        schedule,
        gaussian_denoiser(schedule, 0.2, 0.3, "eps"),
        x0,
        jax.random.key(1),
        batch_size=1,
        prediction="eps",
        variance="fixed_small",
        progress=False,
    )
    assert r["total_bpd_stderr"] > 1e-3 * r["total_bpd"]


def test_bits_per_dim_of_a_model_returning_nan_is_a_floating_point_error():
    # the NaN mean went into evaluate's JSON, which then was not valid JSON
    schedule = jd.Schedule.from_betas(jd.cosine_betas(10))
    fn = gaussian_denoiser(schedule, 0.0, 0.5)

    def nan_on_example_1(x, t):
        return fn(x, t).at[1].set(jnp.nan)

    x = np.zeros((3, 2, 2, 1), np.float32)
    kw = dict(prediction="eps", variance="fixed_small", progress=False)
    assert math.isfinite(bits_per_dim(schedule, fn, x, jax.random.key(0), **kw)["total_bpd"])
    with pytest.raises(FloatingPointError, match="bits/dim of 1 of 3 examples are not finite"):
        bits_per_dim(schedule, nan_on_example_1, x, jax.random.key(0), **kw)


def test_bits_per_dim_rejects_bad_arguments():
    schedule = jd.Schedule.from_betas(jd.cosine_betas(10))
    fn = gaussian_denoiser(schedule, 0.0, 0.5)
    x = np.zeros((2, 2, 2, 1), np.float32)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="prediction"):
        bits_per_dim(schedule, fn, x, key, prediction="noise", variance="fixed_small")
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        bits_per_dim(schedule, fn, x, key, batch_size=0, prediction="eps", variance="fixed_small")
    with pytest.raises(ValueError, match="at least one example"):
        bits_per_dim(schedule, fn, x[:0], key, prediction="eps", variance="fixed_small")
    # an int seed used to end in jax.random.fold_in's TypeError about "key data"
    with pytest.raises(ValueError, match=r"rng must be a PRNG key \(jax.random.key\(seed\)\)"):
        bits_per_dim(schedule, fn, x, 0, prediction="eps", variance="fixed_small")
    with pytest.raises(ValueError, match="schedule must be a jax_diffusion Schedule"):
        bits_per_dim(jd.cosine_betas(10), fn, x, key, prediction="eps", variance="fixed_small")
    # data must be as the model saw it in training: floats in [-1, 1]
    for bad, match in [
        (x + np.nan, r"images must be finite with values in \[-1, 1\]; got range \[nan"),
        (x + 255, r"images must be finite with values in \[-1, 1\]; got range \[255"),
        (x.astype(np.uint8), "images must be floating data in .*; got dtype uint8"),
    ]:
        with pytest.raises(ValueError, match=match):
            bits_per_dim(schedule, fn, bad, key, prediction="eps", variance="fixed_small")
    with pytest.raises(ValueError, match=r"images must be finite with values in \[-1, 1\]"):
        digits_features(np.full((2, 8, 8, 1), 3.0, np.float32))


def test_bits_per_dim_of_half_precision_images_is_computed_in_float32():
    schedule = jd.Schedule.from_betas(jd.cosine_betas(10))
    fn = gaussian_denoiser(schedule, 0.0, 0.5)
    x = (np.arange(-8, 8, dtype=np.float32) / 8).reshape(2, 2, 2, 2)
    key = jax.random.key(0)
    kw = dict(prediction="eps", variance="fixed_small", progress=False)
    want = bits_per_dim(schedule, fn, x, key, **kw)["total_bpd"]
    half = x.astype(np.float16)  # these values are exact in float16
    assert bits_per_dim(schedule, fn, half, key, **kw)["total_bpd"] == want


def test_bits_per_dim_of_one_batch_is_the_mean_of_nll_bpd_and_the_prior_its_closed_form():
    # One batch (batch_size >= N): each term is the mean of `losses.nll_bpd` with the key
    # fold_in(rng, 0) and the same prediction / variance / clip_denoised; the prior term is
    # also checked against KL(q(x_T | x_0) || N(0, I)) / (D ln 2) in float64 NumPy.
    from jax_diffusion.losses import nll_bpd

    betas = np.linspace(0.02, 0.3, 10)  # alpha_bar_T = 0.17: a prior term well above 0
    schedule = jd.Schedule.from_betas(betas)
    x0 = gaussian_grid_data(5, 0.1, 0.6)

    def model_fn(x, t):  # a poor eps model whose x0_hat leaves [-1, 1] at large t
        calls.append(x.shape)
        return 2.5 * x

    key = jax.random.key(3)
    calls = []
    kw = dict(prediction="eps", variance="fixed_large", clip_denoised=True)
    r = bits_per_dim(schedule, model_fn, x0, key, batch_size=64, progress=False, **kw)
    assert calls == [(5, 4, 4, 1)]  # batches of min(batch_size, N)

    @jax.jit
    def reference(x, key):  # the same options, then each of the two options changed
        options = [kw, kw | dict(variance="fixed_small"), kw | dict(clip_denoised=False)]
        return [nll_bpd(schedule, model_fn, x, key, **o) for o in options]

    want, *others = reference(x0, jax.random.fold_in(key, 0))
    for name in ("total", "prior", "kl", "decoder"):
        got, ref = r[f"{name}_bpd"], float(np.mean(getattr(want, f"{name}_bpd")))
        np.testing.assert_allclose(got, ref, rtol=1e-6, err_msg=name)
    # both options matter here, so the comparison above pins that they are passed on
    for other in others:
        assert abs(float(np.mean(other.total_bpd)) - r["total_bpd"]) > 1e-3 * r["total_bpd"]
    abar_t = np.prod(1.0 - np.asarray(betas, np.float64))
    x = x0.astype(np.float64)
    kl = 0.5 * (abar_t * x**2 + (1 - abar_t) - 1 - np.log(1 - abar_t))
    np.testing.assert_allclose(r["prior_bpd"], kl.mean() / np.log(2), rtol=1e-4)


def test_bits_per_dim_of_a_single_example_has_no_stderr():
    schedule = jd.Schedule.from_betas(jd.cosine_betas(10))
    fn = gaussian_denoiser(schedule, 0.0, 0.5)
    x = gaussian_grid_data(1, 0.0, 0.5)
    r = bits_per_dim(schedule, fn, x, jax.random.key(0), prediction="eps", variance="fixed_small")
    assert r["num_examples"] == 1 and r["total_bpd_stderr"] is None
    assert math.isfinite(r["total_bpd"])


# ---------------------------------------------------------------------------- evaluate_workdir

EXPECTED_KEYS = {
    "workdir",
    "step",
    "num_samples",
    "sampler",
    "num_steps",
    "spacing",
    "s_churn",
    "guidance",
    "guidance_rescale",
    "seed",
    "image_size",
    "fd_test",
    "fd_train",
    "fd_train_vs_test",
    "precision",
    "recall",
    "inception_score",
    "inception_score_test",
    "sample_seconds",
}
BPD_KEYS = {"bpd", "bpd_prior", "bpd_kl", "bpd_decoder", "bpd_stderr", "bpd_examples"}


@pytest.fixture(scope="module")
def smoke_workdir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("smoke"))
    config = f"{ROOT / 'experiments' / 'configs' / 'default.py'}:smoke"
    assert cli.main(["train", "--config", config, "--workdir", workdir]) == 0
    return workdir


# the tests of the smoke run on one xdist worker, so that the module fixture trains it once
ON_THE_SMOKE_RUN = pytest.mark.xdist_group("evaluation_smoke_run")


@ON_THE_SMOKE_RUN
def test_evaluate_workdir_on_a_smoke_run(smoke_workdir):
    # the default batch size: the same sampling program as the CLI test below (one compile)
    metrics = evaluate_workdir(smoke_workdir, num_samples=16, bpd_examples=5, progress=False)
    assert set(metrics) == EXPECTED_KEYS | BPD_KEYS
    json.dumps(metrics)  # JSON-able as returned
    assert metrics["step"] == 2 and metrics["num_samples"] == 16
    assert metrics["sampler"] == "ddim" and metrics["num_steps"] == 3
    assert metrics["spacing"] == "leading"  # the smoke config's
    assert metrics["guidance"] is None and metrics["bpd_examples"] == 5
    for key in EXPECTED_KEYS | BPD_KEYS:
        if isinstance(metrics[key], float):
            assert math.isfinite(metrics[key]), key
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert 1 <= metrics["inception_score"] <= 10
    assert metrics["inception_score_test"] > 8  # confident and balanced on real digits
    # two training steps: the samples are far from the digits, the real splits are close
    assert metrics["fd_test"] > 3 * metrics["fd_train_vs_test"]
    parts = metrics["bpd_prior"] + metrics["bpd_kl"] + metrics["bpd_decoder"]
    np.testing.assert_allclose(parts, metrics["bpd"], rtol=1e-6)
    with pytest.raises(ValueError, match="num_samples must be an int >= 4"):
        evaluate_workdir(smoke_workdir, num_samples=3)


@ON_THE_SMOKE_RUN
def test_cli_evaluate_prints_and_writes_the_same_json(smoke_workdir, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    argv = ["evaluate", "--workdir", smoke_workdir, "--num", "16", "--steps", "3"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["num_samples"] == 16 and printed["num_steps"] == 3
    for key in ("fd_test", "fd_train", "precision", "recall", "inception_score"):
        assert math.isfinite(printed[key]), key
    # the CLI splits each batch over the 8 devices: the metrics of one device's samples
    one_device = evaluate_workdir(smoke_workdir, num_samples=16, num_steps=3, progress=False)
    for key in ("fd_test", "fd_train", "precision", "recall", "inception_score"):
        np.testing.assert_allclose(printed[key], one_device[key], rtol=1e-5, err_msg=key)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        # each used to be replaced by the config's value or silently ignored or truncated
        (dict(num_steps=0), "num_steps must be an int >= 1; got 0"),
        (
            dict(sampler=""),
            "sampler must be one of 'ddpm', 'ddim', 'dpm\\+\\+', 'euler', 'heun' or None; got ''",
        ),
        (dict(guidance=5.0), "guidance needs a class-conditional model.*got guidance=5.0"),
        # out of the run's range: reported after the restore and the first sampling batch
        (dict(num_steps=51), r"num_steps for sampler 'ddim' must be an int in \[1, 50\]"),
        (dict(bpd_examples=1000), r"bpd_examples must be an int in \[0, 297\]; got 1000"),
        (dict(seed=2**64), r"seed must be an int in \[0, 4294967295\]"),
        (dict(sampler="ddpm", num_steps=3), "num_steps applies to 'ddim', 'dpm\\+\\+' and 'heun'"),
    ],
)
@ON_THE_SMOKE_RUN
def test_evaluate_workdir_rejects_bad_arguments(smoke_workdir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        evaluate_workdir(smoke_workdir, num_samples=8, progress=False, **kwargs)


def digits_by_class():
    """[10, n, 8, 8, 1]: the first n test digits of each class, n the smallest class size."""
    images, labels = load_digits(8, "test")
    per_class = min(np.bincount(labels))
    return np.stack([images[labels == c][:per_class] for c in range(10)]), per_class


def test_evaluate_workdir_class_accuracy_follows_the_sampled_labels(tmp_path, monkeypatch):
    # A class-conditional run whose "sampler" returns real test digits of the requested labels:
    # the accuracy must be the classifier's, which only holds if the labels it is scored
    # against are the ones each batch was sampled with (3 batches, the last one truncated).
    config = cli.load_config(f"{ROOT / 'experiments' / 'configs' / 'digits_cond.py'}:smoke")
    workdir = str(tmp_path)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json())
    with open(os.path.join(workdir, "data_info.json"), "w") as f:
        json.dump({"shape": [8, 8, 1], "num_classes": 10}, f)
    model = train.create_model(config, channels=1)
    # zero params of the right structure are enough (the sampler is replaced), and instant
    abstract = jax.eval_shape(
        lambda: train.create_train_state(config, model, jax.random.PRNGKey(0), (8, 8, 1))
    )
    state = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract)
    ckpt = CheckpointManager(workdir)
    ckpt.save(state, {}, force=True)
    ckpt.close()

    table, per_class = digits_by_class()
    table = jnp.asarray(table)

    calls = []

    def fake_sample(config, model, params, schedule, rng, *, shape, num, labels=None, **kwargs):
        options = ("sampler", "num_steps", "guidance", "spacing")
        calls.append((num, {k: kwargs.get(k) for k in options}))
        labels = jnp.arange(num) % 10 if labels is None else labels  # generate.sample's default
        return table[labels, jnp.arange(num) % per_class]

    monkeypatch.setattr(generate, "sample", fake_sample)
    metrics = evaluate_workdir(workdir, num_samples=40, batch_size=16, progress=False)
    assert set(metrics) == EXPECTED_KEYS | {"class_accuracy"}
    assert metrics["guidance"] == config.sample.guidance
    assert metrics["class_accuracy"] >= 0.9
    assert metrics["precision"] == 1.0  # every "sample" is a test digit
    # batches of batch_size, the given sampling options passed on (traced once: one call)
    calls.clear()
    options = dict(sampler="ddim", num_steps=4, spacing="trailing", guidance=2.5)
    metrics = evaluate_workdir(workdir, num_samples=40, batch_size=32, progress=False, **options)
    assert calls == [(32, options)]
    assert metrics["guidance"] == 2.5 and metrics["spacing"] == "trailing"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(seed=2**32), r"seed must be an int in \[0, 4294967295\]; got 4294967296"),
        (dict(seed=-1), r"seed must be an int in \[0, 4294967295\]; got -1"),
        (dict(bpd_examples=298), r"bpd_examples must be an int in \[0, 297\]; got 298"),
        (dict(bpd_examples=-1), r"bpd_examples must be an int in \[0, 297\]; got -1"),
        (dict(ode_bpd_examples=298), r"ode_bpd_examples must be an int in \[0, 297\]; got 298"),
        (dict(ode_bpd_examples=1, ode_steps=1), "ode_steps must be an int >= 2; got 1"),
        (dict(ode_steps=8), "ode_steps applies to the ODE bits/dim; pass ode_bpd_examples > 0"),
        (dict(batch_size=0), "batch_size must be an int >= 1; got 0"),
        (dict(num_samples=3), "num_samples must be an int >= 4; got 3"),
        (
            dict(sampler="DDIM"),
            r"sampler must be one of 'ddpm', 'ddim', 'dpm\+\+', 'euler', 'heun' or None; got 'DD",
        ),
        (dict(spacing="cosine"), r"spacing must be one of \('leading', .*; got 'cosine'"),
        (dict(sampler="ddpm", num_steps=3), r"num_steps applies to 'ddim', 'dpm\+\+' and 'heun'"),
        (dict(mesh="data"), r"mesh must be a jax.sharding.Mesh with a 'data' axis .*got 'data'"),
    ],
)
def test_evaluate_workdir_checks_its_arguments_before_loading_the_run(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        evaluate_workdir(str(tmp_path / "missing"), progress=False, **kwargs)


def test_evaluate_workdir_checks_the_sampling_choices_against_the_run_before_the_restore(tmp_path):
    # a config.json and no checkpoint: a check left to train.sample would come after the
    # restore, which fails first here ("no checkpoint")
    config = cli.load_config(f"{ROOT / 'experiments' / 'configs' / 'default.py'}:smoke")
    (tmp_path / "config.json").write_text(config.to_json())
    T = config.diffusion.num_timesteps
    for kwargs, match in [
        (dict(num_steps=T + 1), rf"num_steps for sampler 'ddim' must be an int in \[1, {T}\]"),
        (dict(sampler="dpm++", num_steps=T), rf"num_steps for sampler 'dpm\+\+'.*\[1, {T - 1}\]"),
        (dict(guidance=3.0), r"guidance needs a class-conditional model.*got guidance=3.0"),
        (dict(sampler="dpm++", spacing="trailing"), r"spacing .* with sampler 'ddim' only"),
        (dict(guidance_rescale=0.7), "guidance_rescale needs a class-conditional model"),
        (dict(ode_bpd_examples=1, ode_steps=T + 1), rf"ode_steps must be in \[2, {T}\] .*{T + 1}"),
    ]:
        with pytest.raises(ValueError, match=match):
            evaluate_workdir(str(tmp_path), num_samples=4, progress=False, **kwargs)
    assert os.listdir(tmp_path) == ["config.json"]


def test_evaluate_workdir_accepts_the_boundary_values(tmp_path):
    # the largest seed and bpd_examples and the smallest num_samples / batch_size pass the
    # checks: the call gets as far as the (missing) run
    with pytest.raises(FileNotFoundError, match="no training run"):
        evaluate_workdir(
            str(tmp_path / "missing"),
            num_samples=4,
            batch_size=1,
            seed=2**32 - 1,
            bpd_examples=297,
            num_steps=1,
            progress=False,
        )


class RecordingModel:
    """Stands in for the UNet in the model_fn of bits/dim: records the labels it gets."""

    def __init__(self):
        self.labels, self.methods = [], []

    def apply(self, variables, x, t, y, method=None):
        self.methods.append(method)
        if y is None:
            self.labels.append(None)
        else:  # traced under the ODE's scan
            jax.debug.callback(lambda y: self.labels.append(np.asarray(y)), y)
        return jnp.zeros_like(x)


@pytest.fixture
def fake_run(monkeypatch):
    """A class-conditional digits "run" with no checkpoint and no network, all instant.

    `_restore_ema_params` gives the digits_cond smoke config (its variance set to 'fixed_large'),
    step 7 and a RecordingModel. The "sampler" returns 1.5 x real test digits of the requested
    labels (so partly outside [-1, 1]; sample `nan_first` NaN when set) and records its static
    arguments once per trace and its key and labels once per call. `bits_per_dim` is replaced
    by a recorder returning distinct made-up values.
    """
    config = cli.load_config(f"{ROOT / 'experiments' / 'configs' / 'digits_cond.py'}:smoke")
    config.diffusion.variance = "fixed_large"
    model = RecordingModel()
    params = {"w": jnp.zeros(())}
    monkeypatch.setattr(
        evaluation, "_restore_ema_params", lambda workdir: (config, (8, 8, 1), model, params, 7)
    )
    monkeypatch.setattr(train, "load_run_config", lambda workdir: config)
    table, per_class = digits_by_class()
    rec = types.SimpleNamespace(
        config=config, model=model, table=table, per_class=per_class, nan_first=False
    )
    rec.static, rec.keys, rec.labels, rec.bpd, rec.rescales = [], [], [], [], []

    def record(key, y):
        rec.keys.append(np.asarray(key))
        rec.labels.append(np.asarray(y))

    def fake_sample(config, model, params, schedule, rng, *, shape, num, labels, **kwargs):
        rec.static.append(dict(shape=shape, num=num, **kwargs))
        rec.rescales.append(config.sample.get("guidance_rescale"))
        jax.debug.callback(record, rng, labels, ordered=True)
        x = 1.5 * jnp.asarray(table)[labels, jnp.arange(num) % per_class]
        return x.at[0].set(jnp.nan) if rec.nan_first else x

    def fake_bits_per_dim(schedule, model_fn, images, rng, **kwargs):
        model_fn(jnp.zeros((2, 8, 8, 1)), jnp.zeros((2,), jnp.int32))
        rec.bpd.append(dict(images=np.asarray(images), rng=np.asarray(rng), **kwargs))
        parts = dict(total_bpd=1.5, prior_bpd=0.25, kl_bpd=0.75, decoder_bpd=0.5)
        stderr = 0.125 if len(images) > 1 else None  # as bits_per_dim's
        return parts | dict(total_bpd_stderr=stderr, num_examples=len(images))

    monkeypatch.setattr(generate, "sample", fake_sample)
    monkeypatch.setattr(evaluation, "bits_per_dim", fake_bits_per_dim)
    return rec


def test_evaluate_workdir_guidance_rescale_reaches_the_sampler_and_leaves_the_run(fake_run):
    m = evaluate_workdir("run", num_samples=4, guidance_rescale=0.7, progress=False)
    assert m["guidance_rescale"] == 0.7 and fake_run.rescales[-1] == 0.7
    assert fake_run.config.sample.guidance_rescale == 0.0  # the run's own config: untouched
    m = evaluate_workdir("run", num_samples=4, progress=False)
    assert m["guidance_rescale"] == 0.0 and fake_run.rescales[-1] == 0.0
    for value, match in [
        (1.5, r"guidance_rescale must be in \[0, 1\]; got 1.5"),
        (-0.1, r"guidance_rescale must be in \[0, 1\]; got -0.1"),
        ("0.7", "guidance_rescale must be a finite number; got '0.7'"),
    ]:
        with pytest.raises(ValueError, match=match):
            evaluate_workdir("run", num_samples=4, guidance_rescale=value, progress=False)


def test_evaluate_workdir_passes_seed_keys_labels_and_options_on(fake_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = evaluate_workdir(
        "run",
        num_samples=10,
        sampler="dpm++",
        num_steps=5,
        guidance=0.5,
        seed=123,
        batch_size=4,
        bpd_examples=3,
        progress=False,
    )
    # one trace; 3 batches of 4, batch i with fold_in(PRNGKey(seed), i), labels arange(12) % 10
    want = dict(shape=(8, 8, 1), num=4, mesh=None, sampler="dpm++", num_steps=5, guidance=0.5)
    want["spacing"] = want["s_churn"] = None  # None: the config's (dpm++ rejects either)
    assert fake_run.static == [want]
    root = jax.random.PRNGKey(123)
    want_keys = [jax.random.fold_in(root, i) for i in range(3)]
    np.testing.assert_array_equal(np.stack(fake_run.keys), np.stack(want_keys))
    np.testing.assert_array_equal(np.concatenate(fake_run.labels), np.arange(12) % 10)
    # bits/dim of the first 3 test digits with its own key fold_in(PRNGKey(seed), 2**31 - 1),
    # the batch size, the run's parameterization, and the null label num_classes
    (bpd,) = fake_run.bpd
    np.testing.assert_array_equal(bpd["images"], load_digits(8, "test")[0][:3])
    np.testing.assert_array_equal(bpd["rng"], jax.random.fold_in(root, 2**31 - 1))
    assert (bpd["batch_size"], bpd["prediction"], bpd["variance"]) == (4, "eps", "fixed_large")
    np.testing.assert_array_equal(fake_run.model.labels[-1], [10, 10])
    # what is reported
    assert m["workdir"] == str(tmp_path / "run") and m["step"] == 7 and m["seed"] == 123
    assert (m["sampler"], m["num_steps"], m["guidance"]) == ("dpm++", 5, 0.5)
    assert m["num_samples"] == 10 and m["image_size"] == 8
    assert {k: m[k] for k in BPD_KEYS} == dict(
        bpd=1.5, bpd_prior=0.25, bpd_kl=0.75, bpd_decoder=0.5, bpd_stderr=0.125, bpd_examples=3
    )
    assert m["spacing"] is None and m["s_churn"] is None  # dpm++ has its own grid, no churn
    # heun: the churn given, or the config's (0 where it has none)
    kw_heun = dict(num_samples=4, sampler="heun", num_steps=3, progress=False)
    assert evaluate_workdir("run", s_churn=40.0, **kw_heun)["s_churn"] == 40.0
    assert fake_run.static[-1]["s_churn"] == 40.0
    assert evaluate_workdir("run", **kw_heun)["s_churn"] == 0.0
    assert fake_run.static[-1]["s_churn"] is None
    fake_run.config.sample.s_churn = 5.0
    assert evaluate_workdir("run", **kw_heun)["s_churn"] == 5.0
    with pytest.raises(ValueError, match="s_churn is EDM's churn, for sampler 'heun' on a"):
        evaluate_workdir("run", s_churn=1.0, num_samples=4, sampler="dpm++", progress=False)
    # ddim: the spacing given, or the config's
    kw = dict(num_samples=4, sampler="ddim", num_steps=2, progress=False)
    assert evaluate_workdir("run", spacing="trailing", **kw)["spacing"] == "trailing"
    assert fake_run.static[-1]["spacing"] == "trailing"
    assert evaluate_workdir("run", **kw)["spacing"] == fake_run.config.sample.spacing
    fake_run.config.sample.spacing = "linspace"  # not the default: read from the config
    assert evaluate_workdir("run", **kw)["spacing"] == "linspace"
    assert fake_run.static[-1]["spacing"] is None
    mesh = train.make_mesh()
    evaluate_workdir("run", mesh=mesh, **kw)
    assert fake_run.static[-1]["mesh"] is mesh
    with pytest.raises(ValueError, match="with sampler 'ddim' only; got .* sampler 'ddpm'"):
        evaluate_workdir("run", spacing="trailing", **{**kw, "sampler": "ddpm", "num_steps": None})


@pytest.mark.parametrize("process", ["ddpm", "flow"])
def test_evaluate_workdir_ode_bits_per_dim_of_a_zero_model_match_the_closed_form(
    fake_run, process, monkeypatch
):
    # The recording model outputs 0 (as eps, or as a flow's velocity): the ODE leaves y = x /
    # alpha (x itself for a flow) unchanged and the divergence is 0, so log p(x) is
    # log N(alpha_T x / alpha_0; 0, I) + D log(alpha_T / alpha_0) (log N(x; 0, I) for a flow)
    # at the dequantized digit x. 3 digits in batches of 2: batch i with fold_in(key, i), its
    # first half the dequantization noise, key = fold_in(PRNGKey(seed), 2**31 - 2).
    fake_run.config.diffusion.process = process
    name = "flow_bits_per_dim" if process == "flow" else "ode_bits_per_dim"
    steps_seen, real = [], getattr(evaluation, name)

    def spy(*args, **kwargs):
        steps_seen.append(kwargs.get("num_steps"))
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, name, spy)
    kw = dict(num_samples=4, seed=9, batch_size=2, ode_bpd_examples=3, progress=False)
    m = evaluate_workdir("run", **kw)
    # the default steps (T = 50 < 128 for the smoke run; a flow run's 32), or the ones given
    default = 32 if process == "flow" else fake_run.config.diffusion.num_timesteps
    assert m["ode_steps"] == default and set(steps_seen) == {default}
    m_given = evaluate_workdir("run", ode_steps=5, **kw)
    assert m_given["ode_steps"] == 5 and steps_seen[-1] == 5
    np.testing.assert_allclose(m_given["ode_bpd"], m["ode_bpd"], rtol=1e-6)  # a zero model
    assert set(BPD_KEYS) & set(m) == set()  # no variational bound asked for
    key = jax.random.fold_in(jax.random.PRNGKey(9), 2**31 - 2)
    digits = load_digits(8, "test")[0][:3].astype(np.float64)
    noise = [
        jax.random.uniform(jax.random.split(jax.random.fold_in(key, i))[0], (2, 8, 8, 1))
        for i in range(2)
    ]
    x = digits + np.concatenate(noise)[:3] / 127.5
    if process == "ddpm":
        log_abar = get_schedule(fake_run.config.diffusion)._log_alphas_cumprod()
        ratio = np.exp(0.5 * (log_abar[-1] - log_abar[0]))
        x_T, log_det = ratio * x, 64 * np.log(ratio)
    else:
        x_T, log_det = x, 0.0
    flat = x_T.reshape(3, -1)
    log_p = -0.5 * np.sum(flat**2, axis=1) - 32 * np.log(2 * np.pi) + log_det
    bpd = (-log_p / 64 + np.log(127.5)) / np.log(2)
    np.testing.assert_allclose(m["ode_bpd"], bpd.mean(), rtol=1e-5)
    # (for the ddpm run alpha_T x is ~0: every digit gets nearly the same bits/dim)
    stderr = bpd.std(ddof=1) / np.sqrt(3)
    np.testing.assert_allclose(m["ode_bpd_stderr"], stderr, rtol=1e-3, atol=1e-6)
    assert m["ode_bpd_examples"] == 3
    # the unconditional model: the null label, and the velocity of a flow run
    np.testing.assert_array_equal(fake_run.model.labels[-1], [10, 10])
    assert fake_run.model.methods[-1] == ("velocity" if process == "flow" else None)


def test_evaluate_workdir_metrics_of_the_clipped_samples_match_references(fake_run):
    # References: NumPy moments and the scipy Frechet formula (scipy_fd), the brute-force
    # precision / recall and a scipy softmax for the scores, on digits_features / digits_logits
    # of the samples the fake sampler returns, clipped to [-1, 1].
    m = evaluate_workdir(
        "run", num_samples=12, sampler="ddpm", seed=5, bpd_examples=1, progress=False
    )
    # one batch of min(batch_size, num_samples); ddpm has no num_steps; the config's guidance
    assert fake_run.static == [
        dict(shape=(8, 8, 1), num=12, mesh=None, sampler="ddpm", num_steps=None, guidance=3.0)
        | dict(spacing=None, s_churn=None)
    ]
    assert m["num_steps"] is None and m["guidance"] == 3.0
    assert m["bpd_examples"] == 1 and m["bpd_stderr"] is None  # JSON null, not a number
    labels = np.arange(12) % 10
    samples = np.clip(1.5 * fake_run.table[labels, np.arange(12) % fake_run.per_class], -1, 1)
    test, train_ = load_digits(8, "test")[0], load_digits(8, "train")[0]
    fake_f, test_f, train_f = (
        digits_features(x).astype(np.float64) for x in (samples, test, train_)
    )

    def fd(a, b):
        return scipy_fd(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))

    np.testing.assert_allclose(m["fd_test"], fd(fake_f, test_f), rtol=1e-6)
    np.testing.assert_allclose(m["fd_train"], fd(fake_f, train_f), rtol=1e-6)
    np.testing.assert_allclose(m["fd_train_vs_test"], fd(train_f, test_f), rtol=1e-6)
    precision, recall = brute_force_precision_recall(test_f, fake_f, k=3)
    assert (m["precision"], m["recall"]) == (pytest.approx(precision), pytest.approx(recall))

    def score(logits):
        p = scipy.special.softmax(logits.astype(np.float64), axis=1)
        return math.exp(scipy.special.rel_entr(p, p.mean(0)).sum(1).mean())

    fake_logits = digits_logits(samples)
    assert m["inception_score"] == pytest.approx(score(fake_logits), rel=1e-9)
    assert m["inception_score_test"] == pytest.approx(score(digits_logits(test)), rel=1e-9)
    assert m["class_accuracy"] == np.mean(fake_logits.argmax(1) == labels)


def test_evaluate_workdir_raises_on_non_finite_samples(fake_run):
    fake_run.nan_first = True
    with pytest.raises(FloatingPointError, match="1 of 4 samples are not finite"):
        evaluate_workdir("run", num_samples=4, progress=False)
