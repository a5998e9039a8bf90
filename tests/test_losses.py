"""Losses and the variational bound against float64 references, closed forms and invariants."""

import math

import chex
import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest
from conftest import np_schedule

import jax_diffusion as jd
from jax_diffusion import losses
from jax_diffusion.testing import (
    gaussian_denoiser,
    gaussian_posterior_moments,
    gaussian_residual_variance,
)

T = 1000


@pytest.fixture(scope="module")
def linear():
    return jd.Schedule.from_betas(jd.linear_betas(T))


def np_normal_kl(m1, lv1, m2, lv2):
    # KL between univariate normals, written from the definition with variances
    v1, v2 = np.exp(lv1), np.exp(lv2)
    return np.log(np.sqrt(v2) / np.sqrt(v1)) + (v1 + (m1 - m2) ** 2) / (2 * v2) - 0.5


def test_normal_kl_matches_closed_form(x64):
    rng = np.random.default_rng(0)
    m1, lv1, m2, lv2 = rng.standard_normal((4, 50))
    got = jd.normal_kl(m1, lv1, m2, lv2)
    np.testing.assert_allclose(got, np_normal_kl(m1, lv1, m2, lv2), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(jd.normal_kl(m1, lv1, m1, lv1), 0.0, atol=1e-14)


def mp_discretized_loglik(x, mean, log_scale):
    """Ho et al. 2020 decoder, written directly with the tanh CDF at 400 significant digits."""
    mpmath.mp.dps = 400  # enough digits that 1 - tanh(z) keeps e^-900 tails

    def cdf(u):
        return (
            1 + mpmath.tanh(mpmath.sqrt(2 / mpmath.pi) * (u + mpmath.mpf("0.044715") * u**3))
        ) / 2

    out = []
    for xi, mi, si in zip(
        *(np.broadcast_arrays(x, mean, log_scale)[k].ravel() for k in range(3)), strict=True
    ):
        xi, mi, inv = (
            mpmath.mpf(float(xi)),
            mpmath.mpf(float(mi)),
            mpmath.exp(-mpmath.mpf(float(si))),
        )
        upper = cdf(inv * (xi - mi + mpmath.mpf(1) / 255))
        lower = cdf(inv * (xi - mi - mpmath.mpf(1) / 255))
        p = upper if xi < -0.999 else (1 - lower if xi > 0.999 else upper - lower)
        out.append(float(mpmath.log(p)))
    return np.array(out).reshape(np.shape(x))


def test_discretized_loglik_matches_float64_reference(x64):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(8, 40)) / 127.5 - 1.0
    means = np.clip(x + 0.05 * rng.standard_normal(x.shape), -1.2, 1.2)
    log_scales = rng.uniform(np.log(1e-2), np.log(0.3), size=x.shape)
    got = jd.discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales)
    want = mp_discretized_loglik(x, means, log_scales)
    np.testing.assert_allclose(got, want, rtol=1e-9)


def test_discretized_likelihood_sums_to_one_over_the_grid():
    grid = jnp.arange(256) / 127.5 - 1.0
    for mean, log_scale in [(0.0, -2.0), (0.7, -4.0), (-0.99, -1.0), (0.3, -6.0)]:
        ll = jd.discretized_gaussian_log_likelihood(
            grid, means=jnp.full(256, mean), log_scales=jnp.full(256, log_scale)
        )
        np.testing.assert_allclose(jnp.sum(jnp.exp(ll)), 1.0, rtol=1e-5)


def test_discretized_loglik_accurate_in_float32_far_in_the_tails():
    # Bins 10-60 standard deviations from the mean: the CDF difference underflows the naive
    # float32 form (improved-diffusion clamps at log(1e-12) = -27.6).
    x = np.array([0.0, 0.2, -0.2, 0.5, 0.996, -0.996])
    mean = np.array([0.1, 0.0, 0.0, 0.0, 0.9, -0.9])
    log_scale = np.log(np.array([0.01, 0.012, 0.012, 0.03, 0.009, 0.009]))
    want = mp_discretized_loglik(x, mean, log_scale)
    assert np.all(want < -40.0)
    got = jd.discretized_gaussian_log_likelihood(
        jnp.asarray(x, jnp.float32),
        means=jnp.asarray(mean, jnp.float32),
        log_scales=jnp.asarray(log_scale, jnp.float32),
    )
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=2e-4)


def test_prior_bpd_closed_form(x64, linear):
    x0 = np.random.default_rng(2).uniform(-1, 1, (3, 4, 4, 1))
    abar_T = np.prod(1 - jd.linear_betas(T))
    kl = np_normal_kl(np.sqrt(abar_T) * x0, np.log(1 - abar_T), 0.0, 0.0)
    want = kl.reshape(3, -1).mean(1) / math.log(2)
    s64 = jd.Schedule.from_betas(jd.linear_betas(T), dtype=jnp.float64)
    np.testing.assert_allclose(jd.prior_bpd(s64, x0=x0), want, rtol=1e-10)


def _grid_data(rng, shape):
    return rng.integers(0, 256, size=shape) / 127.5 - 1.0


def test_vlb_terms_zero_kl_for_true_noise_and_decoder_at_t0(x64):
    sched = jd.Schedule.from_betas(jd.linear_betas(T), dtype=jnp.float64)
    rng = np.random.default_rng(3)
    x0 = _grid_data(rng, (4, 6))
    eps = rng.standard_normal(x0.shape)
    t = jnp.array([0, 1, 400, 999])
    xt = jd.q_sample(sched, x0=x0, t=t, noise=eps)
    terms = jd.vlb_terms_bpd(sched, model_output=eps, x0=x0, xt=xt, t=t)
    # the exact noise gives the true posterior mean: KL(q || p) = 0 with sigma^2 = beta_tilde
    np.testing.assert_allclose(terms[1:], 0.0, atol=1e-9)
    # t = 0: decoder NLL with mean mu_tilde(x_1, x0) = x0 and log scale 0.5 log beta_tilde_1
    r_var = np_schedule(jd.linear_betas(T))["posterior_variance"][1]
    mean0 = np.asarray(jd.q_posterior_mean_variance(sched, x0=x0, xt=xt, t=t)[0])[0]
    want = -mp_discretized_loglik(x0[0], mean0, 0.5 * np.log(r_var)).mean() / math.log(2)
    np.testing.assert_allclose(terms[0], want, rtol=1e-9)
    # a wrong prediction gives positive KL
    worse = jd.vlb_terms_bpd(sched, model_output=eps + 0.1, x0=x0, xt=xt, t=t)
    assert np.all(np.asarray(worse[1:]) > 1e-6)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_vlb_kl_terms_match_float64_kl_of_q_from_p(x64, variance):
    """L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)), in that order (Ho et al. eq. 5),
    against float64 NumPy from the paper's posterior (eqs. 6-7), for x0 predictions that are
    clipped to [-1, 1] (clip_denoised) or not. With sigma^2 = beta (fixed_large) the variances
    differ, so the KL's direction matters."""
    betas = jd.linear_betas(T)
    sched = jd.Schedule.from_betas(betas, dtype=jnp.float64)
    r = np_schedule(betas)
    rng = np.random.default_rng(6)
    x0 = _grid_data(rng, (4, 6))
    t = np.array([1, 5, 400, 999])
    xt = np.asarray(jd.q_sample(sched, x0=x0, t=t, noise=rng.standard_normal(x0.shape)))
    pred = 1.5 * rng.standard_normal(x0.shape)  # x0 predictions, many outside [-1, 1]

    def posterior_mean(x0_):  # Ho et al. eq. 7
        return r["posterior_mean_coef1"][t, None] * x0_ + r["posterior_mean_coef2"][t, None] * xt

    q_logvar = np.log(r["posterior_variance"][t])[:, None]
    p_var = r["posterior_variance"][t] if variance == "fixed_small" else r["betas"][t]
    for clip in (False, True):
        x0_hat = np.clip(pred, -1, 1) if clip else pred
        kl = np_normal_kl(
            posterior_mean(x0), q_logvar, posterior_mean(x0_hat), np.log(p_var)[:, None]
        )
        want = kl.mean(1) / math.log(2)
        got = jd.vlb_terms_bpd(
            sched,
            model_output=pred,
            x0=x0,
            xt=xt,
            t=t,
            prediction="x0",
            variance=variance,
            clip_denoised=clip,
        )
        np.testing.assert_allclose(got, want, rtol=1e-9)


def test_nll_bpd_is_the_sum_of_its_per_step_terms(linear):
    x0 = jnp.asarray(_grid_data(np.random.default_rng(4), (2, 4, 4, 1)), jnp.float32)
    model_fn = gaussian_denoiser(linear, 0.0, 0.5, "eps")
    rng = jax.random.key(5)
    calls = []

    def counting(x, t):
        calls.append(1)
        return model_fn(x, t)

    out = jax.jit(lambda x, k: jd.nll_bpd(linear, counting, x, k))(x0, rng)
    assert len(calls) == 1  # one traced call: the T steps are a lax.scan, not a Python loop
    assert out.terms_bpd.shape == (2, T)
    np.testing.assert_allclose(
        out.total_bpd, out.prior_bpd + out.kl_bpd + out.decoder_bpd, rtol=1e-6
    )
    for step in (0, 1, 617, 999):
        t = jnp.full((2,), step)
        noise = jax.random.normal(jax.random.fold_in(rng, step), x0.shape)
        xt = jd.q_sample(linear, x0=x0, t=t, noise=noise)
        want = jd.vlb_terms_bpd(linear, model_output=model_fn(xt, t), x0=x0, xt=xt, t=t)
        np.testing.assert_allclose(out.terms_bpd[:, step], want, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(out.prior_bpd, jd.prior_bpd(linear, x0=x0))
    np.testing.assert_allclose(out.kl_bpd, out.terms_bpd[:, 1:].sum(1), rtol=1e-6)
    np.testing.assert_array_equal(out.decoder_bpd, out.terms_bpd[:, 0])
    assert np.all(np.isfinite(out.total_bpd)) and np.all(np.asarray(out.total_bpd) > 0)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_loss_of_the_exact_gaussian_denoiser_is_analytic(linear, prediction):
    """With data N(m, s^2 I) the optimal denoiser's per-step loss is Var(target | x_t)."""
    m, s, dim, batch = 0.3, 0.5, 16, 4096
    x0 = m + s * jax.random.normal(jax.random.key(6), (batch, dim))
    model_fn = gaussian_denoiser(linear, m, s, prediction)
    loss, metrics = jax.jit(
        lambda x, k: jd.diffusion_loss(linear, model_fn, x, k, prediction=prediction)
    )(x0, jax.random.key(7))
    var_t = gaussian_residual_variance(linear, metrics["t"], s, prediction)
    # per example: mean over `dim` squares of N(0, var_t) residuals -> mean var_t, var 2 var_t^2/dim
    err = np.asarray(metrics["per_example_loss"], np.float64) - np.asarray(var_t, np.float64)
    sigma = np.sqrt(np.sum(2.0 * np.asarray(var_t, np.float64) ** 2 / dim)) / batch
    assert abs(err.mean()) < 4 * sigma, (err.mean(), sigma)
    np.testing.assert_allclose(loss, np.mean(metrics["per_example_loss"]), rtol=1e-6)
    np.testing.assert_allclose(metrics["mse"], loss, rtol=1e-6)
    # t is uniform over [0, T-1]
    t = np.asarray(metrics["t"])
    assert t.min() >= 0 and t.max() <= T - 1 and abs(t.mean() - (T - 1) / 2) < 4 * 289 / 64


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("weighting", ["none", "snr", "min_snr", "truncated_snr"])
def test_loss_weights_match_their_x0_space_definitions(prediction, weighting):
    sched = jd.Schedule.from_betas(jd.cosine_betas(T))
    t = jnp.array([0, 10, 300, 700, 999])
    w = np.asarray(jd.loss_weight(sched, t, prediction=prediction, weighting=weighting), float)
    abar = np.cumprod(1 - jd.cosine_betas(T))[np.asarray(t)]
    snr = abar / (1 - abar)
    lam = {"none": None, "snr": snr, "min_snr": np.minimum(snr, 5.0), "truncated_snr": None}
    lam["truncated_snr"] = np.maximum(snr, 1.0)
    to_space = {"eps": snr, "x0": np.ones_like(snr), "v": snr + 1}[prediction]
    want = np.ones_like(snr) if weighting == "none" else lam[weighting] / to_space
    if weighting == "truncated_snr" and prediction == "eps":  # documented cap of 1 / SNR
        want = np.minimum(want, 1 / np.finfo(np.float32).eps)
    np.testing.assert_allclose(w, want, rtol=2e-5)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("weighting", ["none", "snr", "min_snr", "truncated_snr"])
def test_weighted_losses_finite_at_zero_snr_and_t0(prediction, weighting):
    sched = jd.Schedule.from_betas(jd.rescale_zero_terminal_snr(jd.linear_betas(T)))
    t = jnp.array([0, T - 1])
    w = jd.loss_weight(sched, t, prediction=prediction, weighting=weighting)
    assert np.all(np.isfinite(w)) and np.all(np.asarray(w) >= 0)

    def model_fn(x, t):
        return 0.5 * x

    x0 = jnp.ones((64, 3))
    loss, _ = jd.diffusion_loss(
        sched, model_fn, x0, jax.random.key(0), prediction=prediction, weighting=weighting
    )
    g = jax.grad(
        lambda a: jd.diffusion_loss(
            sched,
            lambda x, t: a * x,
            x0,
            jax.random.key(0),
            prediction=prediction,
            weighting=weighting,
        )[0]
    )(0.5)
    assert np.isfinite(loss) and np.isfinite(g)


def test_l1_loss_and_snr_weighting_of_x0_equals_eps_loss(linear):
    x0 = jax.random.normal(jax.random.key(8), (32, 5))
    rng = jax.random.key(9)

    def eps_model(x, t):
        return 0.9 * x

    def x0_model(x, t):  # the same denoiser, expressed as an x0 prediction
        return jd.x0_from_eps(linear, xt=x, t=t, eps=eps_model(x, t))

    eps_loss, m1 = jd.diffusion_loss(linear, eps_model, x0, rng)
    snr_x0, m2 = jd.diffusion_loss(linear, x0_model, x0, rng, prediction="x0", weighting="snr")
    np.testing.assert_allclose(snr_x0, eps_loss, rtol=1e-3)
    np.testing.assert_array_equal(m1["t"], m2["t"])
    l1, _ = jd.diffusion_loss(linear, eps_model, x0, rng, loss_type="l1")
    t_rng, n_rng = jax.random.split(rng)
    noise = jax.random.normal(n_rng, x0.shape)
    xt = jd.q_sample(linear, x0=x0, t=m1["t"], noise=noise)
    np.testing.assert_allclose(l1, jnp.mean(jnp.abs(0.9 * xt - noise)), rtol=1e-5)


def test_a_raw_rbg_key_of_four_words_draws_as_its_typed_key():
    # jax.random.PRNGKey under the rbg implementations is uint32 [4], not [2]
    sched = jd.Schedule.from_betas(jd.linear_betas(5))
    x0 = jnp.zeros((4, 2))
    with jax.default_prng_impl("rbg"):
        raw = jax.random.PRNGKey(7)
        assert raw.shape == (4,) and raw.dtype == jnp.uint32
        t, noise = jd.training_draws(sched, x0, raw)
        t_typed, noise_typed = jd.training_draws(
            sched, x0, jax.random.wrap_key_data(raw, impl="rbg")
        )
    np.testing.assert_array_equal(t, t_typed)
    np.testing.assert_array_equal(noise, noise_typed)


def test_training_draws_are_uniform_over_every_step():
    """t ~ U{0, ..., T-1} (Ho et al. Algorithm 1 with t shifted to [0, T-1]), ends included."""
    sched = jd.Schedule.from_betas(jd.linear_betas(5))
    t, noise = jd.training_draws(sched, jnp.zeros((5000, 2)), jax.random.key(3))
    counts = np.bincount(np.asarray(t), minlength=5)
    assert counts.shape == (5,)  # nothing outside [0, 4]
    # each count ~ Binomial(5000, 1/5): mean 1000, sd 28
    np.testing.assert_allclose(counts, 1000, atol=150)
    assert noise.shape == (5000, 2) and abs(float(noise.std()) - 1) < 0.03


def test_given_draws_are_the_ones_the_loss_draws_itself(linear):
    """training_draws(rng) is what diffusion_loss(rng) draws, so a batch split after drawing
    (gradient accumulation over micro-batches) has the full batch's loss."""
    x0 = jax.random.normal(jax.random.key(12), (8, 5))
    rng = jax.random.key(13)

    def model_fn(x, t):
        return 0.8 * x + 1e-3 * t[:, None]

    loss, metrics = jd.diffusion_loss(linear, model_fn, x0, rng, prediction="v")
    t, noise = jd.training_draws(linear, x0, rng)
    np.testing.assert_array_equal(t, metrics["t"])
    np.testing.assert_array_equal(noise, jax.random.normal(jax.random.split(rng)[1], x0.shape))
    given, _ = jd.diffusion_loss(linear, model_fn, x0, None, prediction="v", draws=(t, noise))
    assert float(given) == float(loss)
    halves = [
        jd.diffusion_loss(
            linear, model_fn, x0[j::2], None, prediction="v", draws=(t[j::2], noise[j::2])
        )[0]
        for j in (0, 1)
    ]
    np.testing.assert_allclose(np.mean(halves), loss, rtol=1e-6)


def test_x0_of_shape_b_is_a_batch_of_scalars(linear):
    # [B, ...] with no example axes: one number per example (only [] and empty arrays are
    # refused); L_simple against float64 NumPy from Ho et al. 2020, eq. 14
    x0 = jnp.asarray([-0.5, 0.0, 0.25, 1.0])
    t = jnp.asarray([0, 3, 500, T - 1], jnp.int32)
    noise = jnp.asarray([0.3, -1.2, 0.7, 2.0])
    loss, _ = jd.diffusion_loss(linear, lambda x, t: 0.5 * x, x0, None, draws=(t, noise))
    abar = np_schedule(jd.linear_betas(T))["alphas_cumprod"][np.asarray(t)]
    x0_64, noise_64 = np.asarray(x0, np.float64), np.asarray(noise, np.float64)
    xt = np.sqrt(abar) * x0_64 + np.sqrt(1 - abar) * noise_64
    np.testing.assert_allclose(loss, np.mean((0.5 * xt - noise_64) ** 2), rtol=1e-5)


def test_hybrid_loss_trains_variance_only_through_the_vlb(linear):
    x0 = jnp.asarray(_grid_data(np.random.default_rng(10), (8, 4, 4, 1)), jnp.float32)
    rng = jax.random.key(11)

    def loss_for(scale_mean, scale_var, vlb_weight):
        def model_fn(x, t):
            return jnp.concatenate([scale_mean * x, jnp.tanh(scale_var * x)], axis=-1)

        return jd.diffusion_loss(
            linear, model_fn, x0, rng, variance="learned_range", vlb_weight=vlb_weight
        )[0]

    g_mean_hybrid = jax.grad(loss_for, argnums=0)(0.7, 0.3, 0.001)
    g_mean_simple = jax.grad(loss_for, argnums=0)(0.7, 0.3, 0.0)
    np.testing.assert_allclose(g_mean_hybrid, g_mean_simple, rtol=1e-6)  # stop-gradient on mean
    g_var = jax.grad(loss_for, argnums=1)(0.7, 0.3, 0.001)
    assert np.isfinite(g_var) and abs(float(g_var)) > 0
    loss, metrics = jd.diffusion_loss(
        linear, lambda x, t: jnp.concatenate([x, 0 * x], -1), x0, rng, variance="learned_range"
    )
    np.testing.assert_allclose(loss, metrics["mse"] + 0.001 * T * metrics["vlb_bpd"], rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss_type="l3"), "loss_type must be one of 'l2', 'l1'; got 'l3'"),
        (dict(weighting="p2"), "weighting must be one of .*got 'p2'"),
        (dict(prediction="score"), "prediction must be one of 'eps', 'x0', 'v'; got 'score'"),
        (dict(variance="learned"), "variance must be one of .*got 'learned'"),
        (dict(min_snr_gamma=0.0), "min_snr_gamma must be a finite real scalar > 0; got 0.0"),
        (dict(min_snr_gamma=math.inf), "min_snr_gamma must be .*; got inf"),
        (dict(min_snr_gamma="5"), "min_snr_gamma must be .*; got '5'"),
        (dict(min_snr_gamma=jnp.ones(2)), "min_snr_gamma must be a finite real scalar"),
        # a negative hybrid weight rewards a worse variational bound
        (dict(variance="learned_range", vlb_weight=-1.0), "vlb_weight must be .* >= 0; got -1.0"),
        (dict(variance="learned_range", vlb_weight=np.float32(-1)), "vlb_weight must be .*-1"),
        (dict(variance="learned_range", vlb_weight=jnp.float32(-1)), "vlb_weight must be .*-1"),
        (dict(variance="learned_range", vlb_weight=True), "vlb_weight must be .*got True"),
        (dict(variance="learned_range", vlb_weight="0.1"), "vlb_weight must be .*got '0.1'"),
        (
            dict(draws=(jnp.zeros((2,), jnp.int32), jnp.zeros((2, 2)))),
            r"with x0's shape \(2, 3\); got t \(2,\) and noise \(2, 2\)",
        ),
        (
            dict(draws=(jnp.zeros((3,), jnp.int32), jnp.zeros((2, 3)))),
            r"draws must be \(t \[B\], noise \[B, ...\]\) with x0's shape \(2, 3\); got t \(3,\)",
        ),
    ],
)
def test_bad_loss_arguments_raise_before_the_model_runs(linear, kwargs, match):
    _raises_before_the_model_runs(
        linear, lambda s, f, x, k: jd.diffusion_loss(s, f, x, k, **kwargs), match
    )


def _raises_before_the_model_runs(schedule, call, match):
    """call(schedule, model_fn, x0 [2, 3], key) raises a ValueError matching `match` without
    ever calling model_fn."""
    calls = []

    def model_fn(x, t):
        calls.append(1)
        return x

    with pytest.raises(ValueError, match=match):
        call(schedule, model_fn, jnp.ones((2, 3)), jax.random.key(0))
    assert not calls


def _zero_snr():
    return jd.Schedule.from_betas(jd.rescale_zero_terminal_snr(jd.linear_betas(T)))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda s, f, x, k: jd.diffusion_loss(s, f, x, None), r"rng must be a PRNG key .*None"),
        (lambda s, f, x, k: jd.nll_bpd(s, f, x, None), r"rng must be a PRNG key .*nll_bpd"),
        (
            lambda s, f, x, k: jd.diffusion_loss(s, f, x.astype(jnp.int32), k),
            r"x0 must be a floating array \[B, ...\] .*got dtype int32 and shape \(2, 3\)",
        ),
        (lambda s, f, x, k: jd.nll_bpd(s, f, x.astype(jnp.uint8), k), "x0 must be a floating"),
        # a scalar x0 has no batch axis: an IndexError from deep inside
        (
            lambda s, f, x, k: jd.training_draws(s, x[0, 0], k),
            r"x0 must be a floating array \[B, ...\] .*got dtype float32 and shape \(\)",
        ),
        # an empty batch (or example) gave a NaN loss and bound
        (lambda s, f, x, k: jd.diffusion_loss(s, f, x[:0], k), r"B >= 1.*shape \(0, 3\)"),
        (lambda s, f, x, k: jd.nll_bpd(s, f, x[:, :0], k), r"B >= 1.*shape \(2, 0\)"),
        # with the draws given no training_draws checks x0
        (
            lambda s, f, x, k: jd.diffusion_loss(
                s, f, x.astype(jnp.int32), None, draws=(jnp.zeros(2, jnp.int32), x)
            ),
            r"x0 must be a floating array \[B, ...\] .*got dtype int32 and shape \(2, 3\)",
        ),
        (lambda s, f, x, k: jd.diffusion_loss(s.betas, f, x, k), "schedule must be a jax_diff"),
        (lambda s, f, x, k: jd.nll_bpd(s.betas, f, x, k), "schedule must be a jax_diffusion"),
        (lambda s, f, x, k: jd.prior_bpd(s.betas, x0=x), "schedule must be a jax_diffusion"),
        (lambda s, f, x, k: jd.training_draws(s, x, None), "rng must be a PRNG key"),
        # a batch of keys: split / fold_in refused it deep inside, naming no argument
        (
            lambda s, f, x, k: jd.diffusion_loss(s, f, x, jax.random.split(k, 2)),
            r"rng must be a single PRNG key .*got a batch of keys of shape \(2,\)",
        ),
        (
            lambda s, f, x, k: jd.nll_bpd(s, f, x, jax.random.split(k, 2)),
            r"rng must be a single PRNG key for nll_bpd's noise",
        ),
        # uint32 of the wrong length: JAX's own "invalid PRNG key data" from deep inside
        (lambda s, f, x, k: jd.diffusion_loss(s, f, x, jnp.zeros(3, jnp.uint32)), "rng must be"),
        # eps has no x0 where alphas_cumprod is 0: the bound and the hybrid loss were NaN
        (
            lambda s, f, x, k: jd.nll_bpd(_zero_snr(), f, x, k),
            r"prediction='eps' cannot evaluate the bound at step 999, where alphas_cumprod is 0",
        ),
        (
            lambda s, f, x, k: jd.diffusion_loss(_zero_snr(), f, x, k, variance="learned_range"),
            r"prediction='eps' cannot take the hybrid loss's bound term at step 999",
        ),
    ],
)
def test_loss_functions_name_a_wrong_schedule_x0_or_rng_before_the_model_runs(linear, call, match):
    _raises_before_the_model_runs(linear, call, match)


def test_loss_is_traced_once_per_shape(linear):
    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(x0, rng):
        return jd.diffusion_loss(linear, lambda x, t: 0.5 * x, x0, rng)[0]

    for i in range(3):
        assert np.isfinite(step(jnp.ones((4, 2)) * i, jax.random.key(i)))


def test_discretized_loglik_gradients_finite_everywhere():
    grid = jnp.arange(256) / 127.5 - 1.0
    x = jnp.tile(grid, 4)
    means = jnp.repeat(jnp.array([-1.1, 0.0, 0.5, 1.05]), 256)

    def total(means, log_scales):
        return jnp.sum(
            jd.discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales)
        )

    for log_scale in (-7.0, -3.0, 0.0):
        gm, gs = jax.grad(total, argnums=(0, 1))(means, jnp.full(x.shape, log_scale))
        assert np.all(np.isfinite(gm)) and np.all(np.isfinite(gs)), log_scale


def _np_targets(x0, noise, t, prediction):
    """x_t (Ho eq. 4), the regression target (Salimans & Ho sec. 4 for v) and SNR, float64."""
    abar = np_schedule(jd.linear_betas(T))["alphas_cumprod"][t][:, None]
    xt = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
    v = np.sqrt(abar) * noise - np.sqrt(1 - abar) * x0
    target = {"eps": noise, "x0": x0, "v": v}[prediction]
    return xt, target, (abar / (1 - abar))[:, 0]


@pytest.mark.parametrize("loss_type", ["l2", "l1"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_min_snr_loss_matches_float64_reference(linear, prediction, loss_type):
    """Per-example loss = w(t) * mean |pred - target|^p with the Min-SNR-gamma weight of a
    non-default gamma (Hang et al. 2023), min(SNR, gamma) converted to the prediction's space."""
    gamma = 0.5
    rng = np.random.default_rng(14)
    x0, noise = (rng.standard_normal((4, 6)).astype(np.float32) for _ in range(2))
    t = np.array([0, 10, 500, 999])
    xt, target, snr = _np_targets(x0.astype(float), noise.astype(float), t, prediction)
    err = 0.9 * xt - target
    per = np.mean(err**2 if loss_type == "l2" else np.abs(err), axis=1)
    to_space = {"eps": snr, "x0": np.ones_like(snr), "v": snr + 1}[prediction]
    want = np.minimum(snr, gamma) / to_space * per
    loss, metrics = jd.diffusion_loss(
        linear,
        lambda x, t: 0.9 * x,
        jnp.asarray(x0),
        None,
        prediction=prediction,
        loss_type=loss_type,
        weighting="min_snr",
        min_snr_gamma=gamma,
        draws=(jnp.asarray(t), jnp.asarray(noise)),
    )
    np.testing.assert_allclose(metrics["per_example_loss"], want, rtol=1e-4)
    np.testing.assert_allclose(loss, want.mean(), rtol=1e-4)
    np.testing.assert_allclose(metrics["mse"], np.mean(err**2), rtol=1e-4)


def test_min_snr_gamma_and_vlb_weight_may_be_traced(linear):
    """Under jit and vmap (a sweep over gamma and the hybrid weight in one program) the loss
    equals the one computed with each pair as Python floats."""
    x0 = jax.random.normal(jax.random.key(3), (4, 6))
    draws = (jnp.array([0, 10, 500, 999]), jax.random.normal(jax.random.key(4), (4, 6)))

    def loss(gamma, vlb_weight):
        return jd.diffusion_loss(
            linear,
            lambda x, t: jnp.concatenate([0.9 * x, jnp.zeros_like(x)], -1),
            x0,
            None,
            weighting="min_snr",
            min_snr_gamma=gamma,
            variance="learned_range",
            vlb_weight=vlb_weight,
            draws=draws,
        )[0]

    gammas, weights = [0.5, 5.0], [0.0, 0.1]
    swept = jax.jit(jax.vmap(loss))(jnp.array(gammas), jnp.array(weights))
    eager = [loss(g, w) for g, w in zip(gammas, weights, strict=True)]
    np.testing.assert_allclose(swept, eager, rtol=1e-6)
    assert eager[0] != eager[1]


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_hybrid_vlb_reads_the_mean_in_the_prediction_space(linear, prediction):
    """The exact x0 / v prediction with v_var = -1 (sigma^2 = beta_tilde) makes p equal to the
    posterior q(x_{t-1} | x_t, x0): every VLB term for t > 0 is KL(q || q) = 0."""
    rng = np.random.default_rng(15)
    x0, noise = (rng.standard_normal((4, 6)) for _ in range(2))
    t = np.array([1, 10, 500, 999])
    _, target, _ = _np_targets(x0, noise, t, prediction)
    out = jnp.asarray(np.concatenate([target, -np.ones_like(target)], -1), jnp.float32)
    loss, metrics = jd.diffusion_loss(
        linear,
        lambda x, t: out,
        jnp.asarray(x0, jnp.float32),
        None,
        prediction=prediction,
        variance="learned_range",
        draws=(jnp.asarray(t), jnp.asarray(noise, jnp.float32)),
    )
    assert abs(float(metrics["vlb_bpd"])) < 1e-6 and abs(float(loss)) < 1e-6


def test_bfloat16_loss_and_prior_are_computed_in_float32():
    x0 = jnp.asarray(np.random.default_rng(16).uniform(-1, 1, (4, 32)), jnp.bfloat16)
    t, noise = jd.training_draws(jd.Schedule.from_betas(jd.linear_betas(T)), x0, jax.random.key(1))
    assert t.dtype == jnp.int32 and noise.dtype == jnp.bfloat16
    # prior: KL(N(alpha_T x0, 1 - abar_T) || N(0, 1)) of a short schedule, where it is O(1)
    betas = jd.linear_betas(10)
    abar = np.prod(1 - betas)
    x64 = np.asarray(x0, np.float64)
    kl = np_normal_kl(np.sqrt(abar) * x64, np.log(1 - abar), 0.0, 0.0)
    got = jd.prior_bpd(jd.Schedule.from_betas(betas), x0=x0)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, kl.mean(1) / math.log(2), rtol=1e-5)
    # loss: the model returns x_t itself; the squared error is taken in float32
    sched = jd.Schedule.from_betas(betas)
    noise = jnp.asarray(np.random.default_rng(17).standard_normal(x0.shape), jnp.bfloat16)
    t = jnp.array([0, 3, 6, 9])
    xt = jd.q_sample(sched, x0=x0, t=t, noise=noise)
    loss, metrics = jd.diffusion_loss(
        sched, lambda x, t: x, x0, None, prediction="x0", draws=(t, noise)
    )
    want = np.mean((np.asarray(xt, np.float64) - x64) ** 2, axis=1)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(metrics["per_example_loss"], want, rtol=1e-5)


def test_loss_weight_checks_prediction_and_t(linear):
    with pytest.raises(ValueError, match="prediction must be one of .*got 'score'"):
        jd.loss_weight(linear, jnp.zeros(2, jnp.int32), prediction="score", weighting="snr")
    # indexing would clamp t = T to the last step's weight without a word
    with pytest.raises(ValueError, match=r"t must lie in \[0, 999\]; got values in \[0, 1000\]"):
        jd.loss_weight(linear, jnp.array([0, T]), prediction="v", weighting="snr")


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("weighting", ["snr", "min_snr", "truncated_snr"])
def test_loss_weights_of_a_float16_schedule_are_finite_where_its_snr_exceeds_float16(
    prediction, weighting
):
    # cosine, T = 4000 (improved-diffusion's): SNR 1.0e5 at t = 0, above float16's 65504;
    # exp(logsnr) in float16 gave inf, and v's SNR / (SNR + 1) NaN
    betas = jd.cosine_betas(4000)
    sched = jd.Schedule.from_betas(betas, dtype=jnp.float16)
    t = np.array([0, 1, 2000, 3998])
    w = jd.loss_weight(sched, jnp.asarray(t), prediction=prediction, weighting=weighting)
    w = np.asarray(w, np.float64)
    abar = np.cumprod(1 - betas)[t]
    snr = abar / (1 - abar)
    lam = {"snr": snr, "min_snr": np.minimum(snr, 5.0), "truncated_snr": np.maximum(snr, 1.0)}
    to_space = {"eps": snr, "x0": np.ones_like(snr), "v": snr + 1}[prediction]
    # the float16 log-SNR table holds log SNR to ~3 decimal digits
    np.testing.assert_allclose(w, lam[weighting] / to_space, rtol=1e-2)


def test_vlb_kl_of_bfloat16_inputs_is_taken_in_float32(linear):
    """bf16 x0 / x_t / model output: the KL terms (t > 0) are computed in float32 from the
    bf16 means and log variances, so they match float64 normal_kl of those same bf16 values
    to float32 accuracy (a KL taken in bf16 is off by ~1e-2 relative)."""
    rng = np.random.default_rng(18)
    x0, xt, out = (jnp.asarray(rng.standard_normal((4, 64)), jnp.bfloat16) for _ in range(3))
    t = jnp.array([1, 10, 500, 999])
    got = jd.vlb_terms_bpd(linear, model_output=out, x0=x0, xt=xt, t=t)
    assert got.dtype == jnp.float32
    q_mean, _, q_logvar = jd.q_posterior_mean_variance(linear, x0=x0, xt=xt, t=t)
    p = jd.p_mean_variance(linear, model_output=out, xt=xt, t=t)
    f64 = [np.asarray(a, np.float64) for a in (q_mean, q_logvar, p.mean, p.log_variance)]
    want = np_normal_kl(*f64).mean(axis=1) / math.log(2)
    np.testing.assert_allclose(got, want, rtol=1e-4)


def _np_gaussian_conditional(abar, m, s, xt, prediction):
    """E[target | x_t] and Var(target | x_t) for data x0 ~ N(m, s^2), in float64 NumPy.

    Written as the conditioning of a jointly Gaussian pair (Schur complement), not from the
    module's simplified formulas: target = a x0 + b eps with eps ~ N(0, 1) independent of x0,
    x_t = alpha x0 + sigma eps (Ho et al. 2020 eq. 4), and v = alpha eps - sigma x0 (Salimans &
    Ho 2022), so Cov(target, x_t) = a alpha s^2 + b sigma, Var(x_t) = alpha^2 s^2 + sigma^2,
    Var(target) = a^2 s^2 + b^2.
    """
    alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
    a, b = {"eps": (0.0, 1.0), "x0": (1.0, 0.0), "v": (-sigma, alpha)}[prediction]
    cov = a * alpha * s**2 + b * sigma
    var_xt = alpha**2 * s**2 + sigma**2
    mean = a * m + cov / var_xt * (xt - alpha * m)
    return mean, a**2 * s**2 + b**2 - cov**2 / var_xt


STEPS = np.array([0, 1, 2, 10, 250, 500, 998, 999])


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_gaussian_denoiser_and_residual_variance_match_float64_gaussian_conditioning(
    linear, prediction
):
    """Deterministic, at every kind of step: the loss test above only sees the per-step
    variance through a noisy mean, which a slightly wrong (e.g. one step off) table passes."""
    m, s = 0.3, 0.5
    abar = np_schedule(jd.linear_betas(T))["alphas_cumprod"][STEPS][:, None]
    xt = np.random.default_rng(19).standard_normal((len(STEPS), 64)).astype(np.float32)
    want_mean, want_var = _np_gaussian_conditional(abar, m, s, xt.astype(np.float64), prediction)
    got = gaussian_denoiser(linear, m, s, prediction)(jnp.asarray(xt), jnp.asarray(STEPS))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want_mean, rtol=1e-5, atol=1e-6)
    var = gaussian_residual_variance(linear, jnp.asarray(STEPS), s, prediction)
    assert var.shape == STEPS.shape
    # float32 alphas_cumprod near 1 leaves 1 - abar (1e-4 at t = 0) only ~3e-4 relative accuracy
    np.testing.assert_allclose(var, want_var[:, 0], rtol=1e-3)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_gaussian_denoiser_of_bfloat16_inputs_rounds_a_float32_result_once(linear, prediction):
    """bf16 x_t: the output is bf16, and within half a bf16 ulp (2**-8 relative) of the float64
    answer for those bf16 inputs, as when the moments are taken in float32 and rounded once;
    coefficients, mean or arithmetic in bf16 are off by several ulps on some elements."""
    m, s = 0.3, 0.5
    abar = np_schedule(jd.linear_betas(T))["alphas_cumprod"][STEPS][:, None]
    xt = jnp.asarray(np.random.default_rng(20).standard_normal((len(STEPS), 512)), jnp.bfloat16)
    want, _ = _np_gaussian_conditional(abar, m, s, np.asarray(xt, np.float64), prediction)
    got = gaussian_denoiser(linear, m, s, prediction)(xt, jnp.asarray(STEPS))
    assert got.dtype == jnp.bfloat16
    err = np.abs(np.asarray(got, np.float64) - want)
    assert np.all(err <= 2.0**-8 * np.abs(want) + 1e-6), err.max()


def test_gaussian_testing_helpers_reject_an_unknown_prediction(linear):
    with pytest.raises(ValueError, match="prediction must be one of .*got 'score'"):
        gaussian_denoiser(linear, 0.0, 1.0, prediction="score")
    with pytest.raises(ValueError, match="prediction must be one of .*got 'score'"):
        gaussian_residual_variance(linear, jnp.zeros(2, jnp.int32), 1.0, prediction="score")


@pytest.mark.parametrize("bad_t", [[0, T], [-1, 3]])
def test_gaussian_testing_helpers_reject_a_step_outside_the_schedule(linear, bad_t):
    """A bare table[t] clamps t = T to T - 1 and wraps t = -1 to T - 1: the "exact" denoiser
    would silently answer for another step. Concrete steps are range-checked like every other
    function of the package; traced ones (inside a sampler's scan) still run."""
    x = jnp.ones((2, 3), jnp.float32)
    t = jnp.asarray(bad_t, jnp.int32)
    match = rf"t must lie in \[0, {T - 1}\]"
    with pytest.raises(ValueError, match=match):
        gaussian_posterior_moments(linear, x, t, 0.0, 1.0)
    with pytest.raises(ValueError, match=match):
        gaussian_denoiser(linear, 0.0, 1.0, "v")(x, t)
    with pytest.raises(ValueError, match=match):
        gaussian_residual_variance(linear, t, 1.0)
    with pytest.raises(ValueError, match="t must be an integer array"):
        gaussian_residual_variance(linear, jnp.asarray([0.5, 1.5]), 1.0)
    traced = jax.jit(gaussian_denoiser(linear, 0.0, 1.0, "eps"))(x, jnp.asarray([0, T - 1]))
    assert traced.shape == x.shape and bool(jnp.all(jnp.isfinite(traced)))


def test_every_loss_function_the_package_exports_is_in_the_module_all():
    # training_draws was exported by jax_diffusion (and used by train.py) but missing from
    # losses.__all__, so `from jax_diffusion.losses import *` and API docs left it out
    exported = {
        name
        for name in dir(jd)
        if getattr(getattr(jd, name), "__module__", None) == "jax_diffusion.losses"
    }
    assert "training_draws" in exported
    assert exported <= set(losses.__all__)
