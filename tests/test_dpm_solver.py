"""Tests of jax_diffusion.dpm_solver against float64 NumPy from Lu et al. 2022, Algorithm 2.

The Gaussian data, schedule and exact denoiser come from test_samplers.py, which also keeps the
tests that run every sampler, DPM-Solver++ included (convergence orders, parameterizations,
trajectories, tracing, given timesteps, bad input).
"""

import functools

import chex
import jax
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
    T,
    _exact_x0_hat,
    _gauss,
    _logsnr_linear_schedule,
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


# --------------------------------------------------------------------------------------------
# DPM-Solver++(3M).


def _np_dpm_pp_step(abar, x, m0, t, t_prev, m1=None, t_last=None, m2=None, t_last2=None):
    """One DPM-Solver++ step in float64 NumPy: first order, 2M with m1, 3M with m1 and m2.

    3M from the Taylor expansion x0(lambda_t + u) = m0 + u x0' + u^2 / 2 x0'' integrated against
    exp(u - h) (Lu et al. 2022): D1 ~ h x0', D2 ~ h^2 x0'' / 2, so D2 carries
    2 ((e^-h - 1 + h) / h^2 - 0.5).
    """
    alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
    lam = np.log(alpha / sigma)
    if t_prev == -1:
        return m0
    h = lam[t_prev] - lam[t]
    ratio, a, e = sigma[t_prev] / sigma[t], alpha[t_prev], np.exp(-h) - 1.0
    if m1 is None:
        return ratio * x - a * e * m0
    r0 = (lam[t] - lam[t_last]) / h
    if m2 is None:
        return ratio * x - a * e * ((1.0 + 1.0 / (2.0 * r0)) * m0 - m1 / (2.0 * r0))
    r1 = (lam[t_last] - lam[t_last2]) / h
    d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    return ratio * x - a * e * m0 + a * (e / h + 1.0) * d1 - 2.0 * a * ((e + h) / h**2 - 0.5) * d2


def _wavy(xp):
    """A nonlinear x0 model (any smooth function of x and t), in jnp or np."""
    return lambda x, t: xp.tanh(x) * (1.0 + t[:, None] / 1000.0) + 0.1 * xp.sin(3.0 * x)


def test_dpm_solver_pp_3m_matches_float64_numpy_on_an_uneven_grid(x64):
    """order=3 on an uneven grid with a nonlinear model: first order, 2M, five 3M steps with
    r0 != r1 (r0 from 0.45 to 2.3), then the first-order jump to sigma = 0, every state against the
    float64 NumPy update written from the formulas."""
    schedule = Schedule.from_betas(BETAS, jnp.float64)
    grid = [999, 850, 610, 400, 300, 120, 40, 7]
    x_T = np.asarray(_normal(60, (4, 3), jnp.float64))
    np_model = _wavy(np)
    states, x, hist = [x_T], x_T, []  # hist: (x0_hat, t), newest first
    lam = 0.5 * np.log(ABAR / (1.0 - ABAR))
    ratios = []
    for t, t_prev in zip(grid, [*grid[1:], -1], strict=True):
        m0 = np_model(x, np.full((4,), float(t)))
        args = [a for m, tl in hist[:2] for a in (m, tl)]
        if len(hist) == 2 and t_prev >= 0:
            h = lam[t_prev] - lam[t]
            ratios.append(((lam[t] - lam[hist[0][1]]) / h, (lam[hist[0][1]] - lam[hist[1][1]]) / h))
        x = _np_dpm_pp_step(ABAR, x, m0, t, t_prev, *args)
        hist = [(m0, t), *hist[:1]]
        states.append(x)
    r = np.array(ratios)
    assert len(r) == 5 and np.abs(r - 1).max() > 1 and np.abs(r[:, 0] - r[:, 1]).min() > 0.03
    model = lambda x, t: _wavy(jnp)(x, t.astype(x.dtype))  # noqa: E731
    x0, traj = dpm_solver_pp_sample(
        model, schedule, x_T, order=3, prediction="x0", timesteps=np.array(grid),
        return_trajectory=True,
    )  # fmt: skip
    np.testing.assert_allclose(traj, np.stack(states), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(x0, states[-1], rtol=1e-10, atol=1e-12)


def test_dpm_solver_pp_step_takes_the_order_each_example_has_history_for(x64):
    """Per-example t_last / t_last2: example 0 takes 3M, 1 takes 2M (t_last2 = -1), 2 first
    order (t_last = -1), 3 the jump to sigma = 0, each against float64 NumPy."""
    schedule = Schedule.from_betas(BETAS, jnp.float64)
    x = np.asarray(_normal(61, (4, 3), jnp.float64))
    m1 = np.asarray(_normal(62, (4, 3), jnp.float64))
    m2 = np.asarray(_normal(63, (4, 3), jnp.float64))
    t, t_prev = np.array([400, 400, 400, 400]), np.array([250, 250, 250, -1])
    t_last, t_last2 = np.array([520, 520, -1, 520]), np.array([900, -1, -1, 900])
    model = gaussian_denoiser(schedule, DATA_MEAN, DATA_STD, "eps")
    out = dpm_solver_pp_step(model, schedule, x, t, t_prev, m1, t_last, m2, t_last2)
    m0 = _exact_x0_hat(x, 400)
    want = [
        _np_dpm_pp_step(ABAR, x, m0, 400, 250, m1, 520, m2, 900)[0],
        _np_dpm_pp_step(ABAR, x, m0, 400, 250, m1, 520)[1],
        _np_dpm_pp_step(ABAR, x, m0, 400, 250)[2],
        m0[3],
    ]
    np.testing.assert_allclose(out.x_prev, np.stack(want), rtol=1e-10, atol=1e-12)
    # the 3M correction is not negligible here
    assert np.abs(want[0] - _np_dpm_pp_step(ABAR, x, m0, 400, 250, m1, 520)[0]).max() > 1e-2


def _pf_ode_errors(order, steps, t_end=519):
    """Max error of the state at t_end after integrating the PF-ODE from T - 1 with grids of
    `steps` uniform steps in lambda, against the closed form for N(m, s^2) data."""
    abar, schedule = _logsnr_linear_schedule(jnp.float64)
    model = gaussian_denoiser(schedule, DATA_MEAN, DATA_STD, "eps")
    x_T = np.asarray(_normal(7, (32, 4), jnp.float64))
    # the flow keeps z = (x_t - a_t m) / sqrt(a_t^2 s^2 + sigma_t^2) constant
    var = abar * DATA_STD**2 + 1.0 - abar
    z = (x_T - np.sqrt(abar[-1]) * DATA_MEAN) / np.sqrt(var[-1])
    exact = np.sqrt(abar[t_end]) * DATA_MEAN + np.sqrt(var[t_end]) * z
    errors = []
    for n in steps:
        # the grid's last point is t_end: the state there is the one before the jump to 0
        ts = np.linspace(T - 1, t_end, n + 1).astype(np.int64)
        assert np.all(np.diff(ts) == (t_end - T + 1) // n)  # uniform in t, so in lambda
        _, traj = dpm_solver_pp_sample(
            model, schedule, x_T, order=order, timesteps=ts, return_trajectory=True
        )
        errors.append(np.max(np.abs(np.asarray(traj[-2]) - exact)))
    return np.array(errors)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_dpm_solver_pp_convergence_order_on_the_way(order, x64):
    """Halving the step in lambda divides the global error by 2^order: from t = T - 1 (lambda
    = -6) to t = 519 (lambda = 1.7) on a schedule linear in log-SNR, where the Gaussian data's
    x0_hat turns from the mean to the data (lambda ~ log(1 / s)). Stopping above sigma = 0
    keeps the final first-order jump out of the measurement.
    Measured ratios for 120 -> 240 -> 480 steps: 1.993, 1.996 (order 1); 3.68, 3.85 (2);
    8.57, 8.29 (3); the 3M update of the authors' code and diffusers (D2 without the factor 2):
    4.57, 4.27."""
    steps = (120, 240, 480)
    errors = _pf_ode_errors(order, steps)
    ratios = errors[:-1] / errors[1:]
    assert np.all((0.85 * 2**order < ratios) & (ratios < 1.25 * 2**order)), (ratios, errors)
    if order == 3:
        assert np.all(ratios > 6), ratios
        assert np.all(errors < _pf_ode_errors(2, steps)), errors


def test_dpm_solver_pp_3m_with_few_steps_falls_back_to_lower_orders():
    """One and two model calls take no multistep step (first order, then the jump to sigma =
    0), three take one 2M step: order 3 equals order 2 (and 1) there; four take one 3M step."""
    model = gaussian_denoiser(SCHEDULE, DATA_MEAN, DATA_STD, "x0")
    x_T = _normal(64, (2, 3))
    kw = dict(prediction="x0", return_trajectory=True)
    for n in (1, 2, 3):
        third = dpm_solver_pp_sample(model, SCHEDULE, x_T, num_steps=n, order=3, **kw)
        second = dpm_solver_pp_sample(model, SCHEDULE, x_T, num_steps=n, order=2, **kw)
        np.testing.assert_allclose(third[1], second[1], rtol=RTOL, atol=ATOL)
        assert third[1].shape == (n + 1, 2, 3)
        if n < 3:
            first = dpm_solver_pp_sample(model, SCHEDULE, x_T, num_steps=n, order=1, **kw)
            np.testing.assert_allclose(third[1], first[1], rtol=RTOL, atol=ATOL)
    third = dpm_solver_pp_sample(model, SCHEDULE, x_T, num_steps=4, order=3, **kw)[1]
    second = dpm_solver_pp_sample(model, SCHEDULE, x_T, num_steps=4, order=2, **kw)[1]
    np.testing.assert_allclose(third[:3], second[:3], rtol=RTOL, atol=ATOL)
    assert float(jnp.abs(third[3] - second[3]).max()) > 1e-4


@pytest.mark.parametrize("order", [0, 4, 2.0, "3", True])
def test_dpm_solver_pp_refuses_bad_orders(order):
    with pytest.raises(ValueError, match=rf"order must be an int in \[1, 3\]; got {order!r}"):
        dpm_solver_pp_sample(_gauss(), SCHEDULE, _normal(0, (2, 3)), order=order)


X = jnp.zeros((2, 3))


@pytest.mark.parametrize(
    "args, match",
    [
        ((5, 3, None, -1, X, 9), r"x0_hat_last2 needs x0_hat_last .*; got x0_hat_last=None"),
        ((5, 3, X, 9, X, 9), r"t_last2 must be -1 \(no second history\) or > t_last >= 0 "),
        ((5, 3, X, 9, X, 7), r"t_last2 must be .*\(t_last = 9\); got 7"),
        ((5, 3, X, -1, X, 9), r"t_last2 must be .*\(t_last = -1\); got 9"),
        ((5, 3, X, 9, X, 12.0), r"t_last2 must be an int scalar or int \[B\]; got float"),
        ((5, 3, X, 9, X, jnp.array([12, 13, 14])), r"t_last2 has shape \(3,\) but x has batch"),
    ],
)
def test_dpm_solver_pp_step_refuses_bad_third_order_history(args, match):
    calls = []

    def model(x, t):
        calls.append(t)
        return _gauss()(x, t)

    with pytest.raises(ValueError, match=match):
        dpm_solver_pp_step(model, SCHEDULE, X, *args)
    assert not calls  # checked before the model runs


def test_dpm_solver_pp_3m_jit_vmap_and_one_trace():
    model = gaussian_denoiser(SCHEDULE, DATA_MEAN, DATA_STD, "eps")
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def sample(x_T):
        return dpm_solver_pp_sample(model, SCHEDULE, x_T, num_steps=10, order=3)

    x_T = _normal(65, (4, 2, 3))
    per_seed = np.stack([sample(x_T[i]) for i in range(4)])
    eager = dpm_solver_pp_sample(model, SCHEDULE, x_T[0], num_steps=10, order=3)
    np.testing.assert_allclose(eager, per_seed[0], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(jax.vmap(sample)(x_T), per_seed, rtol=RTOL, atol=ATOL)
    # the jitted step takes traced histories too
    step = jax.jit(functools.partial(dpm_solver_pp_step, model, SCHEDULE))
    args = (x_T[0], 400, 250, x_T[1], 520, x_T[2], 900)
    np.testing.assert_allclose(
        step(*args).x_prev,
        dpm_solver_pp_step(model, SCHEDULE, *args).x_prev,
        rtol=RTOL,
        atol=ATOL,
    )


def test_dpm_solver_pp_3m_step_computes_in_float32_for_bfloat16_x():
    # As the first-order test above, with a 3M history: bfloat16 inputs, promoted to float32
    # and rounded once, match the float64 formula rounded to bfloat16.
    x, m1, m2 = (_normal(s, (2, 4096), jnp.bfloat16) for s in (66, 67, 68))
    model = lambda x, t: jnp.full_like(x, 0.3)  # noqa: E731
    out = dpm_solver_pp_step(model, SCHEDULE, x, 100, 50, m1, 150, m2, 300, prediction="x0")
    assert out.x_prev.dtype == jnp.bfloat16
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    m0 = np.full(x.shape, float(jnp.bfloat16(0.3)))
    want = _np_dpm_pp_step(ABAR, f64(x), m0, 100, 50, f64(m1), 150, f64(m2), 300)
    want = f64(jnp.asarray(want, jnp.bfloat16))
    mismatch = np.mean(f64(out.x_prev) != want)
    assert mismatch < 1e-3, mismatch
