"""Tests of jax_diffusion.flow_matching against closed forms, float64 NumPy and DDIM.

Gaussian data N(m, s^2 I) has an exact optimal velocity on the straight path
x_t = (1 - t) x0 + t eps: (x0, eps, x_t) are jointly Gaussian, Var(x_t) = (1 - t)^2 s^2 + t^2,
and u* = E[eps | x_t] - E[x0 | x_t] is affine in x_t. Its ODE maps x_1 to m + s x_1 exactly,
and its loss is s^2 / Var(x_t) per dimension at time t.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_diffusion.flow_matching import (
    denoiser_from_flow,
    eps_from_flow_velocity,
    flow_bits_per_dim,
    flow_interpolate,
    flow_log_likelihood,
    flow_matching_loss,
    flow_sample,
    flow_step,
    flow_time_draws,
    flow_timesteps,
    flow_velocity_target,
    x0_from_flow_velocity,
)
from jax_diffusion.samplers import ddim_sample, sampling_timesteps
from jax_diffusion.schedules import Schedule, cosine_betas, linear_betas
from jax_diffusion.testing import gaussian_denoiser

M, S = 0.3, 0.5
PREDICTIONS = ("eps", "x0", "v")


def _normal(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _gaussian_velocity(m, s):
    """u*(x, t) = E[eps | x_t] - E[x0 | x_t] for x0 ~ N(m, s^2), from the joint Gaussian."""

    def u(x, t):
        t = t.reshape(t.shape + (1,) * (x.ndim - 1)).astype(x.dtype)
        var = (1 - t) ** 2 * s**2 + t**2
        resid = x - (1 - t) * m
        e_x0 = m + (1 - t) * s**2 / var * resid
        e_eps = t / var * resid
        return e_eps - e_x0

    return u


def _residual_variance(t, s):
    """Per-dimension E[(eps - x0 - u*)^2 | t] = s^2 / ((1 - t)^2 s^2 + t^2)."""
    return s**2 / ((1 - t) ** 2 * s**2 + t**2)


# --------------------------------------------------------------------------------------------
# The path.


def test_path_and_conversions_match_float64_formulas():
    x0 = np.asarray(_normal(0, (5, 3, 2)), np.float64)
    eps = np.asarray(_normal(1, (5, 3, 2)), np.float64)
    t = np.asarray(jax.random.uniform(jax.random.key(2), (5,)), np.float64)
    tb = t[:, None, None]
    xt_ref = (1 - tb) * x0 + tb * eps
    xt = flow_interpolate(jnp.float32(x0), jnp.float32(eps), jnp.float32(t))
    np.testing.assert_allclose(xt, xt_ref, rtol=1e-5, atol=1e-6)
    u = flow_velocity_target(jnp.float32(x0), jnp.float32(eps))
    np.testing.assert_allclose(u, eps - x0, rtol=1e-5, atol=1e-6)
    # the line through x_t with velocity eps - x0 ends at x0 (t = 0) and eps (t = 1)
    np.testing.assert_allclose(x0_from_flow_velocity(xt, t, u), x0, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(eps_from_flow_velocity(xt, t, u), eps, rtol=1e-5, atol=2e-6)
    # endpoints of the path and a scalar t
    np.testing.assert_array_equal(flow_interpolate(x0, eps, 0.0), x0)
    np.testing.assert_array_equal(flow_interpolate(x0, eps, 1.0), eps)


# --------------------------------------------------------------------------------------------
# The loss.


@pytest.mark.parametrize("time_distribution", ["uniform", "logit_normal"])
def test_loss_of_the_exact_velocity_matches_the_closed_form(time_distribution):
    batch, dim = 8192, 4
    x0 = M + S * _normal(3, (batch, dim))
    loss, metrics = flow_matching_loss(
        _gaussian_velocity(M, S),
        x0,
        jax.random.key(4),
        time_distribution=time_distribution,
        logit_normal_loc=0.5,
        logit_normal_scale=0.8,
    )
    if time_distribution == "uniform":
        grid = np.linspace(0.0, 1.0, 200_001)
        expected = np.trapezoid(_residual_variance(grid, S), grid)
    else:  # E over t = sigmoid(0.5 + 0.8 n), n ~ N(0, 1), by Gauss-Hermite quadrature
        n, w = np.polynomial.hermite_e.hermegauss(80)
        expected = np.sum(w * _residual_variance(1 / (1 + np.exp(-(0.5 + 0.8 * n))), S))
        expected /= np.sqrt(2 * np.pi)
    per_example = np.asarray(metrics["per_example_loss"], np.float64)
    sem = per_example.std() / np.sqrt(batch)
    assert abs(float(loss) - expected) < 4 * sem, (float(loss), expected, sem)
    np.testing.assert_allclose(float(loss), per_example.mean(), rtol=1e-5)
    # a field off the optimum by a constant c costs c^2 more on the same draws
    off, _ = flow_matching_loss(
        lambda x, t: _gaussian_velocity(M, S)(x, t) + 0.3,
        x0,
        jax.random.key(4),
        time_distribution=time_distribution,
        logit_normal_loc=0.5,
        logit_normal_scale=0.8,
    )
    assert abs(float(off) - float(loss) - 0.09) < 4 * 0.6 * np.sqrt(float(loss) / (batch * dim))


def test_loss_with_draws_and_its_gradient_match_numpy():
    x0 = _normal(5, (6, 4, 4, 1))
    t = jax.random.uniform(jax.random.key(6), (6,))
    noise = _normal(7, x0.shape)

    def loss_of(a, loss_type):
        return flow_matching_loss(
            lambda x, tt: a * x, x0, None, draws=(t, noise), loss_type=loss_type
        )[0]

    x0n, tn, nn = (np.asarray(v, np.float64) for v in (x0, t, noise))
    xt = (1 - tn[:, None, None, None]) * x0n + tn[:, None, None, None] * nn
    err = 0.7 * xt - (nn - x0n)
    np.testing.assert_allclose(jax.jit(loss_of, static_argnums=1)(0.7, "l2"), np.mean(err**2), 1e-5)
    np.testing.assert_allclose(loss_of(0.7, "l1"), np.mean(np.abs(err)), rtol=1e-5)
    grad = jax.jit(jax.grad(loss_of), static_argnums=1)(0.7, "l2")
    np.testing.assert_allclose(grad, np.mean(2 * err * xt), rtol=1e-4)


def test_time_draws():
    n = 20_000
    u = np.asarray(flow_time_draws(jax.random.key(8), n), np.float64)
    assert u.shape == (n,) and u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 4 * np.sqrt(1 / 12 / n)
    t = np.asarray(
        flow_time_draws(
            jax.random.key(9),
            n,
            time_distribution="logit_normal",
            logit_normal_loc=-0.4,
            logit_normal_scale=1.5,
        ),
        np.float64,
    )
    logit = np.log(t / (1 - t))
    assert abs(logit.mean() + 0.4) < 4 * 1.5 / np.sqrt(n)
    assert abs(logit.std() - 1.5) < 4 * 1.5 / np.sqrt(2 * n)


# --------------------------------------------------------------------------------------------
# Sampling.


def test_flow_timesteps_and_shift():
    np.testing.assert_allclose(flow_timesteps(4), [1.0, 0.75, 0.5, 0.25, 0.0], atol=0)
    ts = flow_timesteps(10, shift=3.0)
    uniform = np.linspace(1, 0, 11)
    # the shift multiplies the noise-to-signal ratio t / (1 - t) by s (Esser et al. 2024)
    np.testing.assert_allclose(ts[1:-1] / (1 - ts[1:-1]), 3.0 * uniform[1:-1] / (1 - uniform[1:-1]))
    assert ts[0] == 1.0 and ts[-1] == 0.0 and np.all(np.diff(ts) < 0)


def test_single_point_data_is_exact_in_one_euler_step():
    # Straight paths: with x0 = m fixed every trajectory is a line, and Euler follows it exactly
    x_1 = _normal(10, (16, 3))
    np.testing.assert_allclose(
        flow_sample(_gaussian_velocity(M, 0.0), x_1, num_steps=1), M, rtol=0, atol=1e-6
    )


@pytest.mark.parametrize(("method", "order"), [("euler", 1), ("heun", 2)])
def test_convergence_order_to_the_exact_flow_map(method, order, x64):
    x_1 = _normal(11, (64, 2), jnp.float64)
    exact = M + S * np.asarray(x_1)
    errors = [
        np.abs(
            np.asarray(flow_sample(_gaussian_velocity(M, S), x_1, num_steps=n, method=method))
            - exact
        ).max()
        for n in (16, 32, 64)
    ]
    ratios = np.array(errors[:-1]) / np.array(errors[1:])
    np.testing.assert_allclose(ratios, 2.0**order, rtol=0.15)
    assert errors[-1] < (0.04 if order == 1 else 2e-4)  # measured 0.028 and 1.3e-4


def test_heun_step_matches_a_numpy_trapezoid():
    def u(x, t):
        return jnp.sin(3 * x) * t[:, None] - x

    x = _normal(12, (5, 3))
    out = flow_step(u, x, 0.8, 0.55, method="heun")
    xn = np.asarray(x, np.float64)
    u0 = np.sin(3 * xn) * 0.8 - xn
    x_e = xn - 0.25 * u0
    u1 = np.sin(3 * x_e) * 0.55 - x_e
    np.testing.assert_allclose(out, xn - 0.25 * (u0 + u1) / 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(flow_step(u, x, 0.8, 0.55), x_e, rtol=1e-5, atol=1e-6)


def test_jit_vmap_and_trajectory():
    u = _gaussian_velocity(M, S)
    x_1 = _normal(13, (4, 3))
    eager = flow_sample(u, x_1, num_steps=6, method="heun", shift=2.0)
    jitted = jax.jit(functools.partial(flow_sample, u, num_steps=6, method="heun", shift=2.0))
    np.testing.assert_allclose(jitted(x_1), eager, rtol=1e-6, atol=1e-6)
    seeds = jnp.stack([x_1, 2 * x_1])
    batched = jax.vmap(lambda x: flow_sample(u, x, num_steps=6, method="heun", shift=2.0))(seeds)
    np.testing.assert_allclose(batched[0], eager, rtol=1e-6, atol=1e-6)
    x0, traj = flow_sample(u, x_1, num_steps=6, return_trajectory=True)
    assert traj.shape == (7, 4, 3)
    np.testing.assert_array_equal(traj[0], x_1)
    np.testing.assert_array_equal(traj[-1], x0)
    manual = x_1
    for t, t_next in zip(flow_timesteps(6)[:2], flow_timesteps(6)[1:3], strict=True):
        manual = flow_step(u, manual, t, t_next)
    np.testing.assert_allclose(traj[2], manual, rtol=1e-6, atol=1e-6)
    _, every_3 = flow_sample(u, x_1, num_steps=6, return_trajectory=3)
    np.testing.assert_array_equal(every_3, traj[::3])


# --------------------------------------------------------------------------------------------
# The bridge to Gaussian diffusion.


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_bridged_exact_velocity_is_the_exact_denoiser(prediction, x64):
    # Two derivations of E[. | x_t]: on the straight path (here) and on the VP path (testing.py)
    schedule = Schedule.from_betas(cosine_betas(1000), jnp.float64)
    x = _normal(14, (6, 3), jnp.float64) * 1.3
    t = jnp.array([0, 3, 100, 500, 900, 999], jnp.int32)
    got = denoiser_from_flow(_gaussian_velocity(M, S), schedule, prediction)(x, t)
    want = gaussian_denoiser(schedule, M, S, prediction)(x, t)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)


DENOISING = {  # x0_hat alterations, as the samplers take them
    "none": {},
    "clip": {"clip_denoised": True},
    "clip_then_shrink": {"clip_denoised": True, "denoised_fn": lambda x0: 0.8 * x0 + 0.05},
}


@pytest.mark.parametrize("denoising", DENOISING)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_euler_on_the_flow_is_ddim_on_the_bridged_denoiser(prediction, denoising, x64):
    # A nonlinear field (not the Gaussian one), so the identity is not a property of the data;
    # its x0_hat = (1 + 1.5 t) x - t (1 + t) tanh(x) leaves [-1, 1], so the clip is at work.
    def u(x, t):
        return jnp.tanh(x) * (1 + t[:, None]) - 1.5 * x

    schedule = Schedule.from_betas(linear_betas(1000), jnp.float64)
    steps = sampling_timesteps(1000, 12, "trailing")
    x_T = _normal(15, (5, 2), jnp.float64)
    ddim = ddim_sample(
        denoiser_from_flow(u, schedule, prediction),
        schedule,
        x_T,
        timesteps=steps,
        prediction=prediction,
        **DENOISING[denoising],
    )
    abar = np.cumprod(1 - linear_betas(1000))[np.sort(steps)[::-1]]
    alpha, sigma = np.sqrt(abar), np.sqrt(1 - abar)
    times = np.append(sigma / (alpha + sigma), 0.0)
    x_1 = x_T / (alpha[0] + sigma[0])
    flow = flow_sample(u, x_1, timesteps=times, **DENOISING[denoising])
    np.testing.assert_allclose(ddim, flow, rtol=1e-10, atol=1e-10)
    if denoising != "none":
        assert np.abs(flow - flow_sample(u, x_1, timesteps=times)).max() > 0.05


def test_clipped_heun_matches_a_numpy_transcription_down_to_t_0(x64):
    # Every velocity through x0_hat = clip(x - t u, -1, 1): u' = (x - x0_hat) / t, and the raw
    # u at t = 0 (Heun's second evaluation on the last step)
    def u(x, t):
        return jnp.sin(3 * x) * t[:, None] - 1.5 * x

    def u_np(x, t):
        return np.sin(3 * x) * t - 1.5 * x

    def clipped_np(x, t):
        if t == 0:
            return u_np(x, t)
        return (x - np.clip(x - t * u_np(x, t), -1, 1)) / t

    times = [1.0, 0.7, 0.3, 0.0]
    x_1 = _normal(16, (6, 3), jnp.float64) * 1.5
    x = np.asarray(x_1)
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        h = t_next - t
        d = clipped_np(x, t)
        x = x + h * 0.5 * (d + clipped_np(x + h * d, t_next))
    got = flow_sample(u, x_1, timesteps=times, method="heun", clip_denoised=True)
    np.testing.assert_allclose(got, x, rtol=1e-12, atol=1e-12)
    # the Euler step to t = 0 lands on the clipped estimate
    last = flow_step(u, x_1, 0.4, 0.0, clip_denoised=True)
    want = np.clip(np.asarray(x_1) - 0.4 * u_np(np.asarray(x_1), 0.4), -1, 1)
    np.testing.assert_allclose(last, want, rtol=1e-12, atol=1e-12)
    assert np.abs(want).max() == 1.0  # the clip was at work


# --------------------------------------------------------------------------------------------
# Likelihood.


def _gaussian_log_density(x, m, s):
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    return np.sum(-0.5 * ((x - m) / s) ** 2 - np.log(s) - 0.5 * np.log(2 * np.pi), axis=1)


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_log_likelihood_of_the_exact_velocity_is_the_data_density(divergence, x64):
    # the exact field of N(m, s^2) data is affine with a diagonal Jacobian, so Rademacher
    # probes give its divergence exactly too
    x0 = M + S * _normal(16, (6, 2, 2, 1), jnp.float64) * 1.5
    errors = []
    for n in (32, 64, 128):
        log_p, x_1 = flow_log_likelihood(
            _gaussian_velocity(M, S), x0, jax.random.key(17), num_steps=n, divergence=divergence
        )
        errors.append(np.abs(np.asarray(log_p) - _gaussian_log_density(x0, M, S)).max())
    np.testing.assert_allclose(x_1, (np.asarray(x0) - M) / S, rtol=0, atol=2e-4)
    # Heun: second order in the step (measured 1.0e-2, 2.5e-3, 6.0e-4)
    np.testing.assert_allclose(np.array(errors[:-1]) / errors[1:], 4.0, rtol=0.1)
    assert errors[-1] < 1e-3


def test_grad_of_the_log_likelihood_is_the_data_score_in_x_and_in_the_mean(x64):
    # through the scan of Heun steps and their forward-mode divergences: for the exact field
    # of N(m, s^2) data, d log p / dx = -(x - m) / s^2 and d log p / dm = (x - m) / s^2 summed
    x0 = M + S * _normal(22, (3, 2, 2, 1), jnp.float64) * 1.5

    def total(x, m):
        u = _gaussian_velocity(m, S)
        log_p, _ = flow_log_likelihood(u, x, None, num_steps=32, divergence="exact")
        return jnp.sum(log_p)

    grad_x, grad_m = jax.jit(jax.grad(total, argnums=(0, 1)))(x0, M)
    score = (np.asarray(x0) - M) / S**2
    np.testing.assert_allclose(grad_x, -score, rtol=4e-3)  # measured 1.0e-3 (Heun, 32 steps)
    np.testing.assert_allclose(grad_m, score.sum(), rtol=4e-3)
    h = 1e-4
    central = (total(x0, M + h) - total(x0, M - h)) / (2 * h)
    np.testing.assert_allclose(grad_m, central, rtol=1e-6)  # measured 1e-12


def test_divergence_of_a_dense_linear_field_exact_and_hutchinson_unbiased(x64):
    # u(x) = A x: div u = tr A at every point, so log p - log N(x_1) integrates to tr A exactly
    a = np.asarray(_normal(18, (3, 3), jnp.float64)) * 0.5

    def u(x, t):
        return x @ jnp.asarray(a).T

    x0 = _normal(19, (4000, 3), jnp.float64)

    def log_det(divergence, rng=None):
        log_p, x_1 = flow_log_likelihood(u, x0, rng, num_steps=4, divergence=divergence)
        return np.asarray(log_p) - _gaussian_log_density(x_1, 0.0, 1.0)

    np.testing.assert_allclose(log_det("exact"), np.trace(a), rtol=1e-10)
    est = log_det("hutchinson", jax.random.key(20))
    # Var(z^T A z) for Rademacher z: sum over i != j of A_ij^2 + A_ij A_ji
    off = ~np.eye(3, dtype=bool)
    sd = np.sqrt(np.sum((a**2 + a * a.T)[off]))
    assert abs(est.mean() - np.trace(a)) < 4 * sd / np.sqrt(len(est))
    assert abs(est.std() - sd) < 0.1 * sd
    eager = flow_log_likelihood(u, x0[:3], jax.random.key(1), num_steps=3, method="euler")
    jitted = jax.jit(functools.partial(flow_log_likelihood, u, num_steps=3, method="euler"))
    np.testing.assert_allclose(jitted(x0[:3], jax.random.key(1))[0], eager[0], rtol=1e-12)


@pytest.mark.parametrize("dequantize", [False, True])
def test_bits_per_dim_converts_the_density_to_8_bit_pixel_units(dequantize, x64):
    x0 = jnp.asarray(np.random.default_rng(0).integers(0, 256, (5, 4)) / 127.5 - 1.0)
    rng = jax.random.key(21)
    bpd = flow_bits_per_dim(
        _gaussian_velocity(M, S), x0, rng, num_steps=128, divergence="exact", dequantize=dequantize
    )
    x = np.asarray(x0)
    if dequantize:  # the documented split: (dequantization noise, probes)
        x = x + np.asarray(jax.random.uniform(jax.random.split(rng)[0], x.shape)) / 127.5
    want = (-_gaussian_log_density(x, M, S) / 4 + np.log(127.5)) / np.log(2)
    np.testing.assert_allclose(bpd, want, rtol=0, atol=3e-4)  # the ODE's error at 128 steps


# --------------------------------------------------------------------------------------------
# Bad arguments.

_U = _gaussian_velocity(M, S)
_X = jnp.zeros((2, 3))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: flow_sample(_U, _X, method="rk4"),
            "method must be one of 'euler', 'heun'; got 'rk4'",
        ),
        (lambda: flow_sample(_U, _X, num_steps=0), "num_steps must be an int >= 1; got 0"),
        (lambda: flow_sample(_U, _X, num_steps=2.0), "num_steps must be an int >= 1; got 2.0"),
        (lambda: flow_sample(_U, _X, shift=0.0), r"shift must be a finite number > 0; got 0.0"),
        (lambda: flow_sample(_U, _X, timesteps=[0.0, 1.0]), "strictly decreasing"),
        (lambda: flow_sample(_U, _X, timesteps=[1.2, 0.0]), r"in \[0, 1\]"),
        (lambda: flow_sample(_U, _X, timesteps=[1.0]), "at least 2"),
        (
            lambda: flow_sample(_U, _X, timesteps=[1.0, 0.0], num_steps=3),
            "not both; got num_steps=3",
        ),
        (lambda: flow_sample(_U, _X, return_trajectory=0), "return_trajectory must be"),
        (lambda: flow_sample(_U, jnp.zeros((2, 3), jnp.int32)), "x_1 must be a floating array"),
        (lambda: flow_sample(None, _X), "model_fn must be a callable"),
        (lambda: flow_sample(lambda x, t: x[:, :2], _X), r"must return x's shape \(2, 3\)"),
        (lambda: flow_step(_U, _X, jnp.zeros(2), 0.0), "t and t_next must be scalars"),
        (
            lambda: flow_sample(_U, _X, clip_denoised=1),
            "clip_denoised must be True or False; got 1",
        ),
        (lambda: flow_step(_U, _X, 1.0, 0.0, denoised_fn=0.5), "denoised_fn must be a callable"),
        (
            lambda: flow_matching_loss(_U, _X, jax.random.key(0), time_distribution="beta"),
            "time_distribution must be one of 'uniform', 'logit_normal'; got 'beta'",
        ),
        (
            lambda: flow_matching_loss(_U, _X, jax.random.key(0), logit_normal_scale=-1.0),
            "logit_normal_scale must be a finite number > 0; got -1.0",
        ),
        (
            lambda: flow_matching_loss(_U, _X, jax.random.key(0), loss_type="huber"),
            "loss_type must be one of 'l2', 'l1'; got 'huber'",
        ),
        (
            lambda: flow_matching_loss(_U, _X, None, draws=(jnp.zeros(3), _X)),
            r"draws must be \(t \[B\], noise \[B, ...\]\)",
        ),
        (
            lambda: flow_matching_loss(_U, jnp.zeros((2, 3), jnp.int32), None),
            "x0 must be a floating",
        ),
        (lambda: flow_matching_loss(_U, _X, None), "rng"),
        (
            lambda: flow_matching_loss(lambda x, t: x[:, :1], _X, jax.random.key(0)),
            r"must return x's shape \(2, 3\); got \(2, 1\)",
        ),
        (lambda: flow_time_draws(jax.random.key(0), 0), "batch_size must be an int >= 1; got 0"),
        (
            lambda: flow_log_likelihood(_U, _X, None, divergence="trace"),
            "divergence must be one of 'exact', 'hutchinson'; got 'trace'",
        ),
        (lambda: flow_log_likelihood(_U, _X, None), "rng"),
        (lambda: flow_log_likelihood(_U, _X, None, num_steps=0, divergence="exact"), "num_steps"),
        (lambda: flow_log_likelihood(_U, _X, None, method="rk4"), "method must be one of"),
        (
            lambda: flow_bits_per_dim(_U, _X, jax.random.key(0), dequantize=1),
            "dequantize must be True or False; got 1",
        ),
        (lambda: flow_bits_per_dim(_U, _X, None), "rng"),
        (lambda: denoiser_from_flow(_U, "cosine"), "schedule"),
        (
            lambda: denoiser_from_flow(_U, Schedule.from_betas(linear_betas(10)), "score"),
            "prediction",
        ),
        (
            lambda: denoiser_from_flow(_U, Schedule.from_betas(linear_betas(10)))(
                _X, jnp.array([0, 10])
            ),
            r"t must lie in \[0, 9\]",
        ),
    ],
)
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
