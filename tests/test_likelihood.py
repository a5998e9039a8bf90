"""Tests of jax_diffusion.likelihood (the probability-flow ODE's log-likelihood of a discrete
model) against a closed form, a float64 NumPy transcription and the trace of a dense map.

Gaussian data N(m, s^2 I) with its exact denoiser: x_t ~ N(alpha_t m, v_t), v_t = alpha_t^2 s^2 +
sigma_t^2, and the exact probability-flow map is affine, x_t = alpha_t m + sqrt(v_t / v_0)
(x - alpha_0 m). So the model's density at step 0 is log N(x_T; 0, I) + D/2 log(v_T / v_0) with
x_T that map's image: the ODE's answer for every parameterization.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_diffusion.likelihood import ode_bits_per_dim, ode_log_likelihood
from jax_diffusion.schedules import Schedule, cosine_betas, linear_betas, rescale_zero_terminal_snr
from jax_diffusion.testing import gaussian_denoiser

M, S = 0.3, 0.5
T = 1000


def _normal(seed, shape, dtype=jnp.float64):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _closed_form(betas, x0, m, s):
    """(log p [B], x_T [B, ...]) of the exact flow of N(m, s^2) data, from step 0 to T - 1."""
    abar = np.cumprod(1.0 - np.asarray(betas, np.float64))
    x0 = np.asarray(x0, np.float64)
    v0, v_T = abar[0] * s**2 + 1 - abar[0], abar[-1] * s**2 + 1 - abar[-1]
    x_T = np.sqrt(abar[-1]) * m + np.sqrt(v_T / v0) * (x0 - np.sqrt(abar[0]) * m)
    flat = x_T.reshape(len(x_T), -1)
    dims = flat.shape[1]
    log_prior = -0.5 * np.sum(flat**2, axis=1) - 0.5 * dims * np.log(2 * np.pi)
    return log_prior + 0.5 * dims * np.log(v_T / v0), x_T


BETAS = {"linear": linear_betas(T), "cosine": cosine_betas(T)}


@pytest.mark.parametrize("schedule_name", BETAS)
def test_exact_denoiser_gives_the_closed_form_at_second_order(schedule_name, x64):
    betas = BETAS[schedule_name]
    schedule = Schedule.from_betas(betas, jnp.float64)
    x0 = M + 1.5 * S * _normal(0, (4, 2, 2, 1))
    want, want_x_T = _closed_form(betas, x0, M, S)
    model = gaussian_denoiser(schedule, M, S)
    errors = []
    for n in (32, 64, 128):
        log_p, x_T = ode_log_likelihood(model, schedule, x0, num_steps=n, divergence="exact")
        errors.append(np.abs(np.asarray(log_p) - want).max())
    # measured (linear): 0.24, 0.060, 0.015; (cosine): 1.1, 0.31, 0.081; the cosine schedule's
    # last step (s from 640 to 20,000) is where a trapezoid in s (not log s) lost 50 nats
    np.testing.assert_allclose(np.array(errors[:-1]) / errors[1:], 4.0, rtol=0.15)
    assert errors[-1] < (0.02 if schedule_name == "linear" else 0.1)
    np.testing.assert_allclose(x_T, want_x_T, rtol=0, atol=0.03)


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_every_parameterization_and_divergence_gives_the_same_density(prediction, divergence, x64):
    # The exact denoiser's Jacobian is diagonal, so Rademacher probes are exact for it too
    betas = BETAS["linear"]
    schedule = Schedule.from_betas(betas, jnp.float64)
    x0 = M + 1.5 * S * _normal(1, (3, 5))
    want, _ = _closed_form(betas, x0, M, S)
    log_p, _ = ode_log_likelihood(
        gaussian_denoiser(schedule, M, S, prediction),
        schedule,
        x0,
        jax.random.key(2),
        prediction=prediction,
        num_steps=256,
        divergence=divergence,
    )
    np.testing.assert_allclose(log_p, want, rtol=0, atol=0.01)  # measured 0.005


def _model_np(x, t):
    return np.tanh(x) * (1.0 + t / 500.0) + 0.2 * x


def test_matches_a_float64_numpy_transcription_on_given_steps(x64):
    # A nonlinear denoiser with a learned-range output layout (its variance half is dropped),
    # on given steps in any order: Heun in s = sigma / alpha for y = x / alpha, the divergence
    # (here the analytic diagonal) by the trapezoid in log s, the prior and both alpha ends
    def model(x, t):
        assert t.dtype == jnp.int32 and t.shape == x.shape[:1]
        eps = jnp.tanh(x) * (1.0 + t[:, None] / 500.0) + 0.2 * x
        return jnp.concatenate([eps, jnp.zeros_like(x)], axis=-1)

    betas = np.asarray(linear_betas(T), np.float64)
    schedule = Schedule.from_betas(betas, jnp.float64)
    steps = [40, 0, 999, 7, 300]
    x0 = _normal(3, (4, 3))
    abar = np.cumprod(1 - betas)
    ts = np.sort(steps)
    alpha, s = np.sqrt(abar[ts]), np.sqrt((1 - abar[ts]) / abar[ts])

    def slope(y, i):
        x = alpha[i] * y
        eps = _model_np(x, ts[i])
        div = np.sum(alpha[i] * ((1 - np.tanh(x) ** 2) * (1 + ts[i] / 500.0) + 0.2), axis=1)
        return eps, div

    y, log_det = np.asarray(x0) / alpha[0], np.zeros(4)
    for i in range(len(ts) - 1):
        f, d = slope(y, i)
        y_e = y + (s[i + 1] - s[i]) * f
        f_e, d_e = slope(y_e, i + 1)
        log_det += np.log(s[i + 1] / s[i]) * 0.5 * (s[i] * d + s[i + 1] * d_e)
        y = y + (s[i + 1] - s[i]) * 0.5 * (f + f_e)
    x_T = alpha[-1] * y
    want = np.sum(-0.5 * x_T**2 - 0.5 * np.log(2 * np.pi), axis=1) + log_det
    want += 3 * (np.log(alpha[-1]) - np.log(alpha[0]))
    for divergence in ("exact", "hutchinson"):
        log_p, got_x_T = ode_log_likelihood(
            model,
            schedule,
            x0,
            jax.random.key(4),
            variance="learned_range",
            timesteps=steps,
            divergence=divergence,
        )
        np.testing.assert_allclose(log_p, want, rtol=1e-10)
        np.testing.assert_allclose(got_x_T, x_T, rtol=1e-10)


def test_hutchinson_is_unbiased_for_a_dense_map_and_exact_sums_the_diagonal(x64):
    # eps_hat = x A^T: the divergence in y is alpha tr A at every point, so the exact log-det is
    # tr A times integral alpha ds, and Hutchinson's estimates scatter around it
    a = np.asarray(_normal(5, (3, 3))) * 0.3
    schedule = Schedule.from_betas(linear_betas(T), jnp.float64)
    steps = [0, 10, 100, 500, 999]

    def model(x, t):
        return x @ jnp.asarray(a).T

    x0 = jnp.broadcast_to(_normal(6, (1, 3)), (4096, 3))
    run = functools.partial(ode_log_likelihood, model, schedule, x0, timesteps=steps)
    exact, _ = run(divergence="exact")
    np.testing.assert_allclose(exact, exact[0], rtol=1e-12)
    estimates, _ = run(jax.random.key(7), divergence="hutchinson")
    spread = np.std(estimates) / np.sqrt(len(estimates))
    assert np.std(estimates) > 1e-3  # off-diagonal terms: the probes do vary
    assert abs(np.mean(estimates) - exact[0]) < 4 * spread


def test_bits_per_dim_converts_the_density_to_8_bit_pixel_units(x64):
    schedule = Schedule.from_betas(linear_betas(T), jnp.float64)
    model = gaussian_denoiser(schedule, M, S)
    k = jax.random.randint(jax.random.key(8), (3, 2, 2, 1), 0, 256)
    x0 = k.astype(jnp.float64) / 127.5 - 1.0
    rng = jax.random.key(9)
    deq_rng, probe_rng = jax.random.split(rng)
    kw = dict(num_steps=32)
    # without dequantization: -log p / D in nats of x, plus log 127.5 for pixel units, in bits
    log_p, _ = ode_log_likelihood(model, schedule, x0, probe_rng, **kw)
    bpd = ode_bits_per_dim(model, schedule, x0, rng, dequantize=False, **kw)
    np.testing.assert_allclose(bpd, (-np.asarray(log_p) / 4 + np.log(127.5)) / np.log(2), 1e-12)
    # with it: the density at x0 + u / 127.5, u ~ U[0, 1) from the first half of the key
    shifted = x0 + jax.random.uniform(deq_rng, x0.shape, jnp.float64) / 127.5
    log_p, _ = ode_log_likelihood(model, schedule, shifted, probe_rng, **kw)
    bpd = ode_bits_per_dim(model, schedule, x0, rng, **kw)
    np.testing.assert_allclose(bpd, (-np.asarray(log_p) / 4 + np.log(127.5)) / np.log(2), 1e-12)


def test_jit_and_vmap():
    schedule = Schedule.from_betas(linear_betas(T))
    model = gaussian_denoiser(schedule, M, S, "v")
    x0 = _normal(10, (3, 4), jnp.float32)
    run = functools.partial(ode_log_likelihood, model, schedule, prediction="v", num_steps=16)
    eager, x_T = run(x0, jax.random.key(11))
    jitted, _ = jax.jit(run)(x0, jax.random.key(11))
    np.testing.assert_allclose(jitted, eager, rtol=1e-5)
    assert eager.dtype == x_T.dtype == jnp.float32
    batched, _ = jax.vmap(run, in_axes=(0, None))(jnp.stack([x0, x0]), jax.random.key(11))
    np.testing.assert_allclose(batched[1], eager, rtol=1e-5)


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_grad_in_the_data_is_the_closed_form_score_and_in_a_parameter_its_finite_difference(
    divergence, x64
):
    # Maximum-likelihood training and likelihood guidance differentiate through the ODE (a
    # scan of Heun steps around forward-mode divergences). Against the exact flow's score,
    # d log p / dx = -sqrt(v_T / v_0) x_T, and in the data mean the denoiser closes over,
    # against a central difference of the ODE's own answer (its discretization included).
    betas = BETAS["linear"]
    schedule = Schedule.from_betas(betas, jnp.float64)
    x0 = M + 1.5 * S * _normal(4, (3, 2, 2, 1))
    key = jax.random.key(5)

    def total(x, m):
        model = gaussian_denoiser(schedule, m, S)
        log_p, _ = ode_log_likelihood(model, schedule, x, key, num_steps=64, divergence=divergence)
        return jnp.sum(log_p)

    abar = np.cumprod(1.0 - np.asarray(betas, np.float64))
    v0, v_T = abar[0] * S**2 + 1 - abar[0], abar[-1] * S**2 + 1 - abar[-1]
    _, x_T = _closed_form(betas, x0, M, S)
    grad_x, grad_m = jax.jit(jax.grad(total, argnums=(0, 1)))(x0, M)
    np.testing.assert_allclose(grad_x, -np.sqrt(v_T / v0) * x_T, rtol=0.02)  # measured 0.008
    h = 1e-4
    central = (total(x0, M + h) - total(x0, M - h)) / (2 * h)
    np.testing.assert_allclose(grad_m, central, rtol=1e-6)  # measured 5e-11
    # the closed form's derivative in m: x_T moves by sqrt(abar_T) - sqrt(v_T / v0 abar_0)
    dx_T = np.sqrt(abar[-1]) - np.sqrt(v_T / v0) * np.sqrt(abar[0])
    np.testing.assert_allclose(grad_m, -np.sum(x_T) * dx_T, rtol=0.02)  # measured 0.008


_SCHEDULE = Schedule.from_betas(linear_betas(10))
_MODEL = gaussian_denoiser(_SCHEDULE, 0.0, 1.0)
_X = jnp.zeros((2, 3))
_KEY = jax.random.key(0)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: ode_log_likelihood(_MODEL, _SCHEDULE, _X, _KEY, divergence="trace"),
            "divergence must be one of 'exact', 'hutchinson'; got 'trace'",
        ),
        (lambda: ode_log_likelihood(_MODEL, _SCHEDULE, _X), "rng"),
        (
            lambda: ode_log_likelihood(_MODEL, _SCHEDULE, _X, _KEY, num_steps=1),
            r"num_steps / timesteps must give at least 2 steps .*got steps \[9\]",
        ),
        (
            lambda: ode_log_likelihood(_MODEL, _SCHEDULE, _X, _KEY, num_steps=11),
            "num_steps",
        ),
        (
            lambda: ode_log_likelihood(_MODEL, _SCHEDULE, _X, _KEY, timesteps=[3]),
            "at least 2 steps",
        ),
        (
            lambda: ode_log_likelihood(_MODEL, _SCHEDULE, _X, _KEY, timesteps=[0, 3], num_steps=4),
            "not both",
        ),
        (lambda: ode_log_likelihood(_MODEL, _SCHEDULE, _X, _KEY, rho=0.0), "rho"),
        (
            lambda: ode_log_likelihood(_MODEL, _SCHEDULE, _X, _KEY, prediction="score"),
            "prediction",
        ),
        (
            lambda: ode_log_likelihood(
                _MODEL,
                Schedule.from_betas(rescale_zero_terminal_snr(linear_betas(10))),
                _X,
                _KEY,
                prediction="v",
                timesteps=[0, 5, 9],
            ),
            r"0 < alphas_cumprod < 1 at every step it visits; steps \[9\]",
        ),
        (
            lambda: jax.jit(lambda sch: ode_log_likelihood(_MODEL, sch, _X, _KEY)[0])(_SCHEDULE),
            "concrete schedule",
        ),
        (
            lambda: ode_log_likelihood(_MODEL, _SCHEDULE, jnp.zeros((2, 3), jnp.int32), _KEY),
            "x0 must be a floating",
        ),
        (lambda: ode_log_likelihood(None, _SCHEDULE, _X, _KEY), "model_fn"),
        (
            lambda: ode_log_likelihood(lambda x, t: x[:, :2], _SCHEDULE, _X, _KEY),
            r"must return shape \(2, 3\)",
        ),
        (
            lambda: ode_bits_per_dim(_MODEL, _SCHEDULE, _X, _KEY, dequantize=1),
            "dequantize must be True or False; got 1",
        ),
        (lambda: ode_bits_per_dim(_MODEL, _SCHEDULE, _X, None), "rng"),
    ],
)
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
