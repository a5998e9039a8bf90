"""Tests of jax_diffusion.dpm_solver against float64 NumPy from Lu et al. 2022, Algorithm 2.

The Gaussian data, schedule and exact denoiser come from test_samplers.py, which also keeps the
tests that run every sampler, DPM-Solver++ included (convergence orders, parameterizations,
trajectories, tracing, given timesteps, bad input).
"""

import jax.numpy as jnp
import numpy as np
import pytest
from test_samplers import (
    ABAR,
    ATOL,
    BETAS,
    DATA_MEAN,
    DATA_STD,
    RTOL,
    SCHEDULE,
    _exact_x0_hat,
    _gauss,
    _normal,
)

from jax_diffusion.dpm_solver import dpm_solver_pp_sample, dpm_solver_pp_step
from jax_diffusion.schedules import Schedule
from jax_diffusion.testing import gaussian_denoiser


@pytest.mark.parametrize("order", [1, 2])
def test_dpm_solver_pp_three_steps_match_lu_et_al(order, x64):
    # Three model calls on round(linspace(0, 999, 4)) reversed: first order, then (order 2) one
    # 2M step using the first call's x0_hat, then the first-order jump to sigma = 0 (Lu et al.
    # 2022, Algorithm 2), in float64 NumPy with the exact denoiser; the trajectory too.
    schedule = Schedule.from_betas(BETAS, jnp.float64)
    alpha, sigma = np.sqrt(ABAR), np.sqrt(1.0 - ABAR)
    lam = np.log(alpha / sigma)
    x_T = np.asarray(_normal(40, (4, 3), jnp.float64))
    states, x, x0_last, t_last = [x_T], x_T, None, None
    for t, t_prev in [(999, 666), (666, 333), (333, -1)]:
        x0_hat = _exact_x0_hat(x, t)
        if t_prev == -1:
            x = x0_hat
        else:
            h = lam[t_prev] - lam[t]
            d = x0_hat
            if order == 2 and x0_last is not None:
                r = (lam[t] - lam[t_last]) / h
                d = (1.0 + 1.0 / (2.0 * r)) * x0_hat - x0_last / (2.0 * r)
            x = sigma[t_prev] / sigma[t] * x - alpha[t_prev] * (np.exp(-h) - 1.0) * d
        x0_last, t_last = x0_hat, t
        states.append(x)
    model = gaussian_denoiser(schedule, DATA_MEAN, DATA_STD, "eps")
    x0, traj = dpm_solver_pp_sample(
        model, schedule, x_T, num_steps=3, order=order, return_trajectory=True
    )
    np.testing.assert_allclose(traj, np.stack(states), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(x0, states[-1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("t, t_prev", [(100, 50), (20, 10)])
def test_dpm_solver_pp_step_computes_in_float32_for_bfloat16_x(t, t_prev):
    # A bfloat16 x is promoted to float32 inside the step and rounded once at the end: with an
    # x0 model (0.3 in bfloat16, exact) the first-order step equals the float64 formula of Lu et
    # al. 2022 rounded to bfloat16, which bfloat16 arithmetic misses on ~40% of the elements.
    x = _normal(46, (2, 4096), jnp.bfloat16)
    model = lambda x, t: jnp.full_like(x, 0.3)  # noqa: E731
    out = dpm_solver_pp_step(model, SCHEDULE, x, t, t_prev, prediction="x0").x_prev
    assert out.dtype == jnp.bfloat16
    alpha, sigma = np.sqrt(ABAR), np.sqrt(1.0 - ABAR)
    ratio = sigma[t_prev] / sigma[t]
    x0 = float(jnp.bfloat16(0.3))
    want = ratio * np.asarray(x, np.float64) + (alpha[t_prev] - ratio * alpha[t]) * x0
    want = np.asarray(jnp.asarray(want, jnp.bfloat16), np.float64)
    mismatch = np.mean(np.asarray(out, np.float64) != want)
    assert mismatch < 1e-3, mismatch


def test_dpm_solver_pp_last_step_to_sigma_zero_is_first_order():
    """At t_prev = -1 (sigma = 0) the step returns the data prediction x0_hat, with no
    multistep correction from x0_hat_last (Lu et al. 2022: lambda -> inf there)."""
    x = _normal(3, (4, 3))
    first = dpm_solver_pp_step(_gauss(), SCHEDULE, x, 20, -1)
    x0_hat = _gauss("x0")(x, jnp.full((4,), 20))
    np.testing.assert_allclose(first.x0_hat, x0_hat, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(first.x_prev, x0_hat, rtol=RTOL, atol=ATOL)
    corrected = dpm_solver_pp_step(_gauss(), SCHEDULE, x, 20, -1, x0_hat + 1.0, 60)
    np.testing.assert_allclose(corrected.x_prev, x0_hat, rtol=RTOL, atol=ATOL)
    # while a step to sigma > 0 does use it
    mid = dpm_solver_pp_step(_gauss(), SCHEDULE, x, 20, 10, x0_hat + 1.0, 60)
    plain = dpm_solver_pp_step(_gauss(), SCHEDULE, x, 20, 10)
    assert float(jnp.abs(mid.x_prev - plain.x_prev).max()) > 1e-3


def test_dpm_solver_pp_2m_step_matches_lu_et_al_on_an_uneven_grid(x64):
    """One DPM-Solver++(2M) step with h_last != h, against Lu et al. 2022 (Algorithm 2) in float64
    NumPy: r = h_last / h, D = (1 + 1 / (2r)) x0_hat - x0_hat_last / (2r), x_prev =
    (sigma_prev / sigma) x - alpha_prev (exp(-h) - 1) D. The samplers' grids are uniform or
    smooth in lambda, where r -> 1 and inverting r leaves the method second order."""
    schedule = Schedule.from_betas(BETAS, jnp.float64)
    abar = np.cumprod(1.0 - np.asarray(BETAS, np.float64))
    alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
    lam = np.log(alpha / sigma)
    t_last, t, t_prev = 700, 400, 30  # h_last / h = 0.61 here
    x = np.asarray(_normal(5, (4, 3), jnp.float64))
    x0_last = np.asarray(_normal(6, (4, 3), jnp.float64))
    model = gaussian_denoiser(schedule, DATA_MEAN, DATA_STD, "eps")
    out = dpm_solver_pp_step(model, schedule, x, t, t_prev, x0_last, t_last)
    # the exact denoiser of N(m, s^2) data: E[x0 | x_t] = m + a s^2 (x - a m) / (a^2 s^2 + sigma^2)
    a, m, s2 = alpha[t], DATA_MEAN, DATA_STD**2
    x0_hat = m + a * s2 * (x - a * m) / (a * a * s2 + sigma[t] ** 2)
    np.testing.assert_allclose(out.x0_hat, x0_hat, rtol=1e-10, atol=1e-12)
    h, h_last = lam[t_prev] - lam[t], lam[t] - lam[t_last]
    r = h_last / h
    assert abs(r - 1) > 0.3
    d = (1 + 1 / (2 * r)) * x0_hat - x0_last / (2 * r)
    want = sigma[t_prev] / sigma[t] * x - alpha[t_prev] * (np.exp(-h) - 1) * d
    np.testing.assert_allclose(out.x_prev, want, rtol=1e-10, atol=1e-12)


def test_dpm_solver_pp_takes_a_numpy_or_jax_int_order():
    # jnp.int32(2) passed the old `order not in (1, 2)` check, then failed inside the scan
    x_T = _normal(43, (2, 3))
    want = dpm_solver_pp_sample(_gauss(), SCHEDULE, x_T, num_steps=4, order=2)
    for order in (jnp.int32(2), np.int64(2)):
        got = dpm_solver_pp_sample(_gauss(), SCHEDULE, x_T, num_steps=4, order=order)
        np.testing.assert_array_equal(got, want)
