"""Tests of jax_diffusion.edm (Karras et al. 2022) against float64 NumPy and closed forms.

References: EDM eq. 5 and Algorithm 1 transcribed in float64 NumPy (in the coordinates y =
x / alpha, s = sigma / alpha), and the probability-flow ODE's closed-form map for N(m, s^2)
data, x_T -> m + s (x_T - alpha_T m) / sqrt(alpha_T^2 s^2 + sigma_T^2), which a second-order
solver approaches 4x faster per doubling of the steps, DDIM (first order) 2x.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_diffusion import ddim_sample, ddim_step, heun_sample, heun_step, karras_timesteps
from jax_diffusion.schedules import Schedule, cosine_betas, linear_betas, rescale_zero_terminal_snr
from jax_diffusion.testing import gaussian_denoiser

T = 1000
BETAS = linear_betas(T)
ABAR = np.cumprod(1.0 - BETAS)
M, S = 0.3, 0.5


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


def _np_heun(x, steps, x0_fn):
    """EDM Algorithm 1 (deterministic) in y = x / alpha, s = sigma / alpha, float64."""
    abar = ABAR
    y = x / np.sqrt(abar[steps[0]])
    s_of = lambda t: 0.0 if t < 0 else np.sqrt((1 - abar[t]) / abar[t])  # noqa: E731
    for i, t in enumerate(steps):
        t_next = steps[i + 1] if i + 1 < len(steps) else -1
        s, s_next = s_of(t), s_of(t_next)
        d = (y - x0_fn(y * np.sqrt(abar[t]), t)) / s
        y_next = y + (s_next - s) * d
        if t_next >= 0:
            d2 = (y_next - x0_fn(y_next * np.sqrt(abar[t_next]), t_next)) / s_next
            y_next = y + (s_next - s) * 0.5 * (d + d2)
        y = y_next
    return y


def test_heun_matches_a_float64_transcription_of_algorithm_1(x64):
    schedule = Schedule.from_betas(BETAS, jnp.float64)
    steps = np.array([999, 700, 400, 150, 30, 3])

    def x0_np(x, t):  # a nonlinear denoiser
        return np.tanh(0.8 * x) * (1.0 + t / 2000.0)

    def model_fn(x, t):
        return jnp.tanh(0.8 * x) * (1.0 + t[:, None] / 2000.0)

    x_T = jax.random.normal(jax.random.key(0), (4, 3), jnp.float64)
    got = heun_sample(model_fn, schedule, x_T, timesteps=steps, prediction="x0")
    want = _np_heun(np.asarray(x_T), steps, x0_np)
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
    ],
)
def test_bad_arguments_raise_value_error(call, match):
    schedule = Schedule.from_betas(BETAS)
    with pytest.raises(ValueError, match=match):
        call(schedule, gaussian_denoiser(schedule, M, S), jnp.zeros((2, 3)))
