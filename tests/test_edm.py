"""Tests of jax_diffusion.edm (Karras et al. 2022) against float64 NumPy and closed forms.

References: EDM eq. 5 and Algorithm 1 transcribed in float64 NumPy (in the coordinates y =
x / alpha, s = sigma / alpha), and the probability-flow ODE's closed-form map for N(m, s^2)
data, x_T -> m + s (x_T - alpha_T m) / sqrt(alpha_T^2 s^2 + sigma_T^2), which a second-order
solver approaches 4x faster per doubling of the steps, DDIM (first order) 2x. For the
stochastic sampler (Algorithm 2): its transcription with the same noise draws, and, for Gaussian
data, the exact mean and variance of its output propagated step by step in float64 (every step
is affine in y with Gaussian noise).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import OPTIMIZED

from jax_diffusion import (
    churn_step,
    churn_timesteps,
    ddim_sample,
    ddim_step,
    heun_sample,
    heun_step,
    karras_timesteps,
)
from jax_diffusion.schedules import Schedule, cosine_betas, linear_betas, rescale_zero_terminal_snr
from jax_diffusion.testing import gaussian_denoiser

T = 1000
BETAS = linear_betas(T)
ABAR = np.cumprod(1.0 - BETAS)
M, S = 0.3, 0.5
KEY = jax.random.key(0)


def _log_s(abar):
    return 0.5 * np.log((1.0 - abar) / abar)


@pytest.mark.parametrize("num_steps, rho", [(18, 7.0), (40, 7.0), (10, 1.0), (5, 3.0)])
def test_karras_steps_follow_eq_5(num_steps, rho):
    schedule = Schedule.from_betas(BETAS)
    steps = karras_timesteps(schedule, num_steps, rho)
    assert steps.dtype == np.int32 and steps[0] == T - 1 and steps[-1] == 0
    assert np.all(np.diff(steps) < 0)
    s_max, s_min = np.exp(_log_s(ABAR[-1])), np.exp(_log_s(ABAR[0]))
    i = np.arange(num_steps) / (num_steps - 1)
    want = (s_max ** (1 / rho) + i * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    # the chosen step is the nearest in log s: none of its neighbours is nearer
    log_s = _log_s(ABAR)
    err = np.abs(log_s[steps] - np.log(want))
    for step, e, target in zip(steps, err, np.log(want), strict=True):
        for other in (step - 1, step + 1):
            if 0 <= other < T:
                assert e <= abs(log_s[other] - target) + 1e-12


def test_karras_steps_stay_distinct_where_rounding_collides():
    # linear, T = 20, 8 steps: the nearest steps are 19, 12, 8, 5, 2, 1, 1, 0 (rho = 7 crowds
    # the low end); the repeat moves the steps above it up until they are distinct
    linear = Schedule.from_betas(linear_betas(20))
    np.testing.assert_array_equal(karras_timesteps(linear, 8), [19, 12, 8, 5, 3, 2, 1, 0])
    # cosine, T = 24, 20 steps: the nearest steps repeat at the top (23 six times, 22 six
    # times); they move down
    schedule = Schedule.from_betas(cosine_betas(24))
    steps = karras_timesteps(schedule, 20)
    assert len(steps) == 20 and len(set(steps.tolist())) == 20
    assert steps[0] == 23 and steps[-1] == 0 and np.all(np.diff(steps) < 0)
    np.testing.assert_array_equal(karras_timesteps(schedule, 24), np.arange(23, -1, -1))
    np.testing.assert_array_equal(karras_timesteps(schedule, 1), [23])


def _s_of(t):
    return 0.0 if t < 0 else np.sqrt((1 - ABAR[t]) / ABAR[t])


def _np_heun(x, steps, x0_fn, hats=None, noise=None, s_noise=1.0):
    """EDM Algorithm 1 (deterministic) in y = x / alpha, s = sigma / alpha, float64; with
    `hats` and `noise`, Algorithm 2: y_hat = y + s_noise sqrt(s_hat^2 - s^2) z_i before step i."""
    abar = ABAR
    y = x / np.sqrt(abar[steps[0]])
    for i, t in enumerate(steps):
        if hats is not None:
            y = y + s_noise * np.sqrt(_s_of(hats[i]) ** 2 - _s_of(t) ** 2) * noise[i]
            t = hats[i]
        t_next = steps[i + 1] if i + 1 < len(steps) else -1
        s, s_next = _s_of(t), _s_of(t_next)
        d = (y - x0_fn(y * np.sqrt(abar[t]), t)) / s
        y_next = y + (s_next - s) * d
        if t_next >= 0:
            d2 = (y_next - x0_fn(y_next * np.sqrt(abar[t_next]), t_next)) / s_next
            y_next = y + (s_next - s) * 0.5 * (d + d2)
        y = y_next
    return y


def _np_churn_steps(steps, s_churn, s_tmin=0.0, s_tmax=np.inf):
    """Algorithm 2, line 4, on the discrete steps: gamma_i in the window, then the step
    nearest in log s to (1 + gamma_i) s_i, by a search over every step, never below t_i."""
    log_s = _log_s(ABAR)
    hats = []
    for t in steps:
        s = np.exp(log_s[t])
        gamma = min(s_churn / len(steps), np.sqrt(2.0) - 1.0) if s_tmin <= s <= s_tmax else 0.0
        if gamma == 0.0:
            hats.append(t)
            continue
        target = np.log(s * (1.0 + gamma))
        best = min(range(T), key=lambda u: abs(log_s[u] - target))
        hats.append(max(best, t))
    return np.array(hats)


def _x0_np(x, t):  # a nonlinear x0 denoiser, float64 NumPy ...
    return np.tanh(0.8 * x) * (1.0 + t / 2000.0)


def _x0_model(x, t):  # ... and the same as a model_fn
    return jnp.tanh(0.8 * x) * (1.0 + t[:, None] / 2000.0)


def test_heun_matches_a_float64_transcription_of_algorithm_1(x64):
    schedule = Schedule.from_betas(BETAS, jnp.float64)
    steps = np.array([999, 700, 400, 150, 30, 3])
    x_T = jax.random.normal(jax.random.key(0), (4, 3), jnp.float64)
    got = heun_sample(_x0_model, schedule, x_T, timesteps=steps, prediction="x0")
    want = _np_heun(np.asarray(x_T), steps, _x0_np)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_heun_is_second_order_on_the_ode_of_gaussian_data(x64):
    schedule = Schedule.from_betas(BETAS, jnp.float64)
    model = gaussian_denoiser(schedule, M, S, "v")
    x_T = jax.random.normal(jax.random.key(1), (256, 2), jnp.float64)
    a, sg = np.sqrt(ABAR[-1]), np.sqrt(1 - ABAR[-1])
    exact = M + S * (np.asarray(x_T) - a * M) / np.sqrt(a**2 * S**2 + sg**2)
    heun_err, ddim_err = [], []
    for n in (8, 16, 32):
        steps = karras_timesteps(schedule, n)
        out = heun_sample(model, schedule, x_T, timesteps=steps, prediction="v")
        heun_err.append(float(np.abs(np.asarray(out) - exact).max()))
        out = ddim_sample(model, schedule, x_T, timesteps=steps, prediction="v")
        ddim_err.append(float(np.abs(np.asarray(out) - exact).max()))
    heun_ratio = np.array(heun_err[:-1]) / np.array(heun_err[1:])
    ddim_ratio = np.array(ddim_err[:-1]) / np.array(ddim_err[1:])
    assert np.all(heun_ratio > 3.0), (heun_err, heun_ratio)
    assert np.all((ddim_ratio > 1.6) & (ddim_ratio < 2.6)), (ddim_err, ddim_ratio)
    # measured: Heun 0.737 / 0.145 / 0.031, DDIM 0.637 / 0.325 / 0.166; at equal model calls
    # (63) DDIM on karras_timesteps(63) is 0.085 off, Heun's 32 steps 0.031
    same_calls = ddim_sample(
        model, schedule, x_T, timesteps=karras_timesteps(schedule, 63), prediction="v"
    )
    assert heun_err[-1] < 0.5 * float(np.abs(np.asarray(same_calls) - exact).max())


@pytest.mark.parametrize(
    "num_steps, s_churn, s_tmin, s_tmax",
    [(18, 40.0, 0.05, 50.0), (18, 5.0, 0.0, np.inf), (40, 80.0, 0.0, 1.0), (8, 1e3, 0.5, 5.0)],
)
def test_churn_steps_follow_algorithm_2(num_steps, s_churn, s_tmin, s_tmax):
    schedule = Schedule.from_betas(BETAS)
    steps = karras_timesteps(schedule, num_steps)
    hats = churn_timesteps(schedule, steps, s_churn, s_tmin=s_tmin, s_tmax=s_tmax)
    assert hats.dtype == np.int32
    np.testing.assert_array_equal(hats, _np_churn_steps(steps, s_churn, s_tmin, s_tmax))
    churned = hats > steps
    assert churned.any() and not churned.all()  # the top step (and, here, some more) has none
    np.testing.assert_array_equal(churn_timesteps(schedule, steps, 0.0), steps)
    # ascending input: the steps are taken descending, as the samplers take them
    np.testing.assert_array_equal(churn_timesteps(schedule, steps[::-1], s_churn,
                                                  s_tmin=s_tmin, s_tmax=s_tmax), hats)  # fmt: skip


def test_churn_step_is_the_forward_process_from_t_to_t_hat():
    # x_t drawn from the marginal of N(M, S^2) data; after churn_step to t_hat it must follow
    # the marginal at t_hat (s_noise = 1), and the noise it adds must have variance
    # s_noise^2 (1 - abar_hat / abar), per example where t and t_hat are [B].
    schedule = Schedule.from_betas(BETAS)
    n = 2**16
    for t, t_hat in ((3, 9), (400, 650), (990, 999)):
        a, sg = np.sqrt(ABAR[t]), np.sqrt(1 - ABAR[t])
        x = a * M + np.sqrt(a**2 * S**2 + sg**2) * jax.random.normal(jax.random.key(t), (n, 1))
        got = np.asarray(churn_step(schedule, x, t, t_hat, jax.random.key(5)), np.float64)
        a_hat, sg_hat = np.sqrt(ABAR[t_hat]), np.sqrt(1 - ABAR[t_hat])
        want_std = np.sqrt(a_hat**2 * S**2 + sg_hat**2)
        assert abs(got.mean() - a_hat * M) < 4 * want_std / np.sqrt(n)
        assert abs(got.std() - want_std) < 4 * want_std / np.sqrt(2 * n)
    x = jax.random.normal(jax.random.key(6), (3, 2**15))
    t, t_hat = jnp.array([0, 100, 700]), jnp.array([4, 100, 800])
    got = np.asarray(churn_step(schedule, x, t, t_hat, jax.random.key(7), s_noise=1.5))
    for i in range(3):
        ratio = np.sqrt(ABAR[t_hat[i]] / ABAR[t[i]])
        residual = got[i] - ratio * np.asarray(x[i], np.float64)
        std = 1.5 * np.sqrt(1.0 - ABAR[t_hat[i]] / ABAR[t[i]])
        if t[i] == t_hat[i]:
            np.testing.assert_array_equal(got[i], x[i])  # no churn: x unchanged, bit for bit
        else:
            assert abs(residual.mean()) < 4 * std / np.sqrt(residual.size)
            assert abs(residual.std() - std) < 4 * std / np.sqrt(2 * residual.size)


def test_stochastic_heun_matches_a_float64_transcription_of_algorithm_2(x64):
    schedule = Schedule.from_betas(BETAS, jnp.float64)
    steps = np.array([999, 700, 400, 150, 30, 3])
    x_T = jax.random.normal(jax.random.key(0), (4, 3), jnp.float64)
    rng = jax.random.key(8)
    # the documented draws: key i of split(rng, n) gives step i's z
    noise = [
        np.asarray(jax.random.normal(k, x_T.shape, jnp.float64)) for k in jax.random.split(rng, 6)
    ]
    hats = _np_churn_steps(steps, 6.0)
    assert np.sum(hats > steps) == 5  # all but the top step churn
    got = heun_sample(
        _x0_model, schedule, x_T, timesteps=steps, prediction="x0", rng=rng, s_churn=6.0,
        s_noise=1.007,
    )  # fmt: skip
    want = _np_heun(np.asarray(x_T), steps, _x0_np, hats, noise, s_noise=1.007)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    # s_churn = 0 is Algorithm 1, whatever the key
    np.testing.assert_array_equal(
        heun_sample(_x0_model, schedule, x_T, timesteps=steps, prediction="x0", rng=rng),
        heun_sample(_x0_model, schedule, x_T, timesteps=steps, prediction="x0"),
    )


def _np_churn_moments(steps, hats, var_y, s_noise=1.0):
    """Mean and std of Algorithm 2's output for N(M, S^2) data and its exact denoiser, from y_T
    with mean M and variance var_y: in u = y - M, D(y; s) - M = S^2 / (S^2 + s^2) u, so every
    Heun step is u -> B u and every churn adds s_noise^2 (s_hat^2 - s^2) to the variance."""
    slope = lambda s: s / (S**2 + s**2)  # noqa: E731  (y - D(y; s)) / s = slope(s) u
    var = var_y
    for i, t in enumerate(steps):
        var += s_noise**2 * (_s_of(hats[i]) ** 2 - _s_of(t) ** 2)
        t_next = steps[i + 1] if i + 1 < len(steps) else -1
        s, s_next = _s_of(hats[i]), _s_of(t_next)
        a = 1.0 + (s_next - s) * slope(s)
        b = a if t_next < 0 else 1.0 + (s_next - s) * 0.5 * (slope(s) + slope(s_next) * a)
        var *= b**2
    return M, np.sqrt(var)


def test_churn_forgets_a_wrong_start_and_matches_the_propagated_moments():
    # x_T 1.5x too wide: the ODE (s_churn = 0) carries the error to x0 (std ~ 1.5 S), churn
    # washes it out (std -> S as the steps grow); both agree with the exact propagation.
    schedule = Schedule.from_betas(BETAS)
    model = gaussian_denoiser(schedule, M, S, "eps")
    a, sg = np.sqrt(ABAR[-1]), np.sqrt(1 - ABAR[-1])
    std_T = 1.5 * np.sqrt(a**2 * S**2 + sg**2)
    x_T = a * M + std_T * jax.random.normal(jax.random.key(9), (2**14, 4))
    steps = karras_timesteps(schedule, 128)
    sample = jax.jit(
        lambda x, rng, churn: heun_sample(
            model, schedule, x, timesteps=steps, rng=rng, s_churn=churn
        ),
        static_argnums=2,
        compiler_options=OPTIMIZED,  # a long run: XLA's own optimisation
    )
    stds = {}
    for churn in (0.0, 40.0):
        x0 = np.asarray(sample(x_T, jax.random.key(10), churn), np.float64).ravel()
        hats = _np_churn_steps(steps, churn)
        mean, std = _np_churn_moments(steps, hats, (std_T / a) ** 2)
        assert abs(x0.mean() - mean) < 4 * std / np.sqrt(x0.size), (churn, x0.mean(), mean)
        assert abs(x0.std() - std) < 4 * std / np.sqrt(2 * x0.size), (churn, x0.std(), std)
        stds[churn] = std
    assert abs(stds[0.0] - 1.5 * S) < 0.01 and abs(stds[40.0] - S) < 0.01, stds


def test_heun_step_into_the_clean_end_is_ddim_and_a_traced_t_prev_branches():
    schedule = Schedule.from_betas(BETAS)
    model = gaussian_denoiser(schedule, M, S, "eps")
    x = jax.random.normal(jax.random.key(2), (3, 4))
    last = heun_step(model, schedule, x, 20, -1)
    np.testing.assert_array_equal(last.x_prev, ddim_step(model, schedule, x, 20, -1).x_prev)
    for t_prev in (-1, 5):
        eager = heun_step(model, schedule, x, 20, t_prev).x_prev
        traced = jax.jit(lambda tp: heun_step(model, schedule, x, 20, tp).x_prev)(t_prev)
        np.testing.assert_allclose(traced, eager, rtol=1e-6, atol=1e-6)
    per_example = heun_step(model, schedule, x, 20, jnp.array([-1, 5, 5])).x_prev
    np.testing.assert_allclose(per_example[0], heun_step(model, schedule, x, 20, -1).x_prev[0])
    np.testing.assert_allclose(
        per_example[1:], heun_step(model, schedule, x, 20, 5).x_prev[1:], rtol=1e-6
    )


def test_heun_sample_under_jit_vmap_with_a_trajectory():
    schedule = Schedule.from_betas(BETAS)
    model = gaussian_denoiser(schedule, M, S, "x0")
    x_T = jax.random.normal(jax.random.key(3), (3, 2, 2))
    out, traj = heun_sample(
        model, schedule, x_T, num_steps=6, prediction="x0", return_trajectory=True
    )
    assert traj.shape == (7, 3, 2, 2)
    np.testing.assert_array_equal(traj[0], x_T)
    np.testing.assert_array_equal(traj[-1], out)
    batched = jax.jit(
        jax.vmap(lambda x: heun_sample(model, schedule, x[None], num_steps=6, prediction="x0")[0])
    )(x_T)
    np.testing.assert_allclose(batched, out, rtol=1e-5, atol=1e-6)
    point = gaussian_denoiser(schedule, M, 0.0, "x0")  # single-point data: exact in any steps
    np.testing.assert_allclose(
        heun_sample(point, schedule, x_T, num_steps=3, prediction="x0"), M, atol=1e-5
    )


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda s, m, x: karras_timesteps(s, 0), "num_steps"),
        (lambda s, m, x: karras_timesteps(s, 1001), "num_steps"),
        (lambda s, m, x: karras_timesteps(s, 10, rho=0.0), "rho"),
        (
            lambda s, m, x: karras_timesteps(
                Schedule.from_betas(rescale_zero_terminal_snr(linear_betas(10))), 4
            ),
            "alphas_cumprod > 0",
        ),
        (lambda s, m, x: heun_sample(m, s, x, num_steps=4, timesteps=[3, 1]), "not both"),
        (lambda s, m, x: heun_sample(m, s, x, prediction="score"), "prediction"),
        (lambda s, m, x: heun_step(m, s, x, 5, 5), "t_prev"),
        (lambda s, m, x: heun_sample(m, s, x, s_churn=1.0), "rng"),
        (lambda s, m, x: heun_sample(m, s, x, rng=KEY, s_churn=-1.0), "s_churn"),
        (lambda s, m, x: heun_sample(m, s, x, rng=KEY, s_churn=np.nan), "s_churn"),
        (lambda s, m, x: heun_sample(m, s, x, rng=KEY, s_churn=1.0, s_tmin=-0.1), "s_tmin"),
        (lambda s, m, x: heun_sample(m, s, x, rng=KEY, s_churn=1.0, s_tmin=2, s_tmax=1), "s_tmax"),
        (lambda s, m, x: heun_sample(m, s, x, rng=KEY, s_churn=1.0, s_tmax=np.nan), "s_tmax"),
        (lambda s, m, x: heun_sample(m, s, x, rng=KEY, s_churn=1.0, s_noise=-1.0), "s_noise"),
        (lambda s, m, x: churn_timesteps(s, [5, 5], 1.0), "timesteps"),
        (lambda s, m, x: churn_step(s, x, 5, 4, KEY), "t_hat"),
        (lambda s, m, x: churn_step(s, x, 5, 1000, KEY), "t_hat"),
        (lambda s, m, x: churn_step(s, x, 5, 6, jax.random.split(KEY)), "single PRNG key"),
        (lambda s, m, x: churn_step(s, x, 5, 6, None), "PRNG key"),
    ],
)
def test_bad_arguments_raise_value_error(call, match):
    schedule = Schedule.from_betas(BETAS)
    with pytest.raises(ValueError, match=match):
        call(schedule, gaussian_denoiser(schedule, M, S), jnp.zeros((2, 3)))
