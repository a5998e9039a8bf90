"""Tests of jax_diffusion.inversion against float64 NumPy, closed forms and round trips.

The denoiser is the exact one of Gaussian data N(m, s^2 I) (`jax_diffusion.testing`), whose
eps estimate is written out again here in NumPy: eps_hat(x, t) = sigma_t / (alpha_t^2 s^2 +
sigma_t^2) (x - alpha_t m). The references are the inversion recurrence transcribed from the
formulas (module docstring; Song et al. 2021, section 4.3; Pan et al. 2023), the closed-form
path of single-point data, the sampler it inverts (`ddim_sample` / `ddim_step`) and the
probability-flow ODE's closed-form endpoint.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_diffusion
from jax_diffusion import ddim_invert, ddim_invert_step, ddim_sample, ddim_step
from jax_diffusion.schedules import Schedule, linear_betas, rescale_zero_terminal_snr
from jax_diffusion.testing import gaussian_denoiser

T = 1000
BETAS = linear_betas(T)
ABAR = np.cumprod(1.0 - BETAS)  # float64, the reference tables
SCHEDULE = Schedule.from_betas(BETAS, jnp.float32)
DATA_MEAN, DATA_STD = 0.3, 0.5
PREDICTIONS = ("eps", "x0", "v")
RTOL, ATOL = 1e-5, 1e-6
# sampling_timesteps(1000, 8, "trailing") written out: round(1000 - 125 i) - 1, ascending
TRAILING_8 = np.arange(124, T, 125)


def _data(seed, shape, dtype=jnp.float32):
    return (DATA_MEAN + DATA_STD * jax.random.normal(jax.random.key(seed), shape)).astype(dtype)


def _alpha_sigma(t):
    return (1.0, 0.0) if t < 0 else (np.sqrt(ABAR[t]), np.sqrt(1.0 - ABAR[t]))


def _eps_hat(x, t, mean=DATA_MEAN, std=DATA_STD):
    """E[eps | x_t = x] for data N(mean, std^2), float64."""
    a, s = _alpha_sigma(t)
    return s / (a**2 * std**2 + s**2) * (x - a * mean)


def _np_invert(x0, ts_up, fixed_point_iters):
    """The inversion recurrence in float64: the states at tau_0 = -1, tau_1, ..., tau_N."""
    x, t_prev, states = np.asarray(x0, np.float64), -1, [np.asarray(x0, np.float64)]
    for t in ts_up:
        a_p, s_p = _alpha_sigma(t_prev)
        a, s = _alpha_sigma(t)
        e = _eps_hat(x, t if t_prev < 0 else t_prev)
        y = a / a_p * (x - s_p * e) + s * e
        for _ in range(fixed_point_iters):
            e = _eps_hat(y, t)
            y = a / a_p * (x - s_p * e) + s * e
        x, t_prev = y, t
        states.append(x)
    return np.stack(states)


# --------------------------------------------------------------------------------------------
# Float64 NumPy transcription of the recurrence.


@pytest.mark.parametrize("fixed_point_iters", [0, 3])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_matches_float64_numpy_recurrence(prediction, fixed_point_iters, x64):
    schedule = Schedule.from_betas(BETAS, jnp.float64)
    model = gaussian_denoiser(schedule, DATA_MEAN, DATA_STD, prediction)
    x0 = _data(0, (4, 3), jnp.float64)
    x_T, traj = ddim_invert(
        model, schedule, x0, num_steps=8, spacing="trailing", prediction=prediction,
        fixed_point_iters=fixed_point_iters, return_trajectory=True,
    )  # fmt: skip
    want = _np_invert(x0, TRAILING_8, fixed_point_iters)
    assert x_T.dtype == jnp.float64 and traj.shape == (9, 4, 3)
    np.testing.assert_allclose(traj, want, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(traj[-1], x_T)


def test_given_timesteps_and_learned_range_layout_match_float64_numpy(x64):
    # timesteps in any order are walked upward; 'learned_range' drops the variance half
    schedule = Schedule.from_betas(BETAS, jnp.float64)
    base = gaussian_denoiser(schedule, DATA_MEAN, DATA_STD, "v")

    def model(x, t):
        out = base(x, t)
        return jnp.concatenate([out, jnp.full_like(out, 0.3)], axis=-1)

    x0 = _data(1, (2, 3, 2), jnp.float64)
    got = ddim_invert(
        model, schedule, x0, timesteps=[500, 7, 999, 250], prediction="v",
        variance="learned_range", fixed_point_iters=2,
    )  # fmt: skip
    np.testing.assert_allclose(got, _np_invert(x0, [7, 250, 500, 999], 2)[-1], 1e-10, 1e-10)


def test_fixed_point_solves_the_ddim_step_it_inverts(x64):
    # At convergence ddim_step (the sampler's code, Song et al. 2021 eq. 12) undoes the step,
    # from an intermediate step and, per example, from the clean end (t = -1).
    schedule = Schedule.from_betas(BETAS, jnp.float64)
    model = gaussian_denoiser(schedule, DATA_MEAN, DATA_STD, "x0")

    @jax.jit
    def round_trips(x, t, t_next):
        def back(iters):
            y = ddim_invert_step(
                model, schedule, x, t, t_next, prediction="x0", fixed_point_iters=iters
            )
            return ddim_step(model, schedule, y, t_next, t, prediction="x0").x_prev

        return back(40), back(0)

    x = _data(2, (3, 4), jnp.float64)
    for t, t_next in [([124] * 3, [249] * 3), ([-1, 40, 600], [9, 90, 700])]:
        exact, naive = round_trips(x, jnp.array(t), jnp.array(t_next))
        np.testing.assert_allclose(exact, x, rtol=1e-10, atol=1e-10)
        assert np.abs(naive - x).max() > 1e-4  # the naive step is not the exact inverse


# --------------------------------------------------------------------------------------------
# Single-point data: a closed-form path, and the sampler returns the data.


@pytest.mark.parametrize("fixed_point_iters", [0, 5])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_single_point_data_follows_the_closed_form_path(prediction, fixed_point_iters):
    # eps_hat(x, t) = (x - alpha_t mu) / sigma_t. The first step reads eps at tau_1 on x0 = mu:
    # e = mu (1 - alpha_1) / sigma_1, and y = alpha_1 mu + sigma_1 e = mu. Every later step then
    # finds the same e at its start, x_k = alpha_k mu + sigma_k e, which is also the fixed
    # point of the exact step, so x_T = alpha_N mu + sigma_N e, and DDIM brings it back to mu.
    mu = np.linspace(-0.8, 0.9, 6).reshape(3, 2)
    model = gaussian_denoiser(SCHEDULE, jnp.asarray(mu, jnp.float32), 0.0, prediction)
    x0 = jnp.broadcast_to(jnp.asarray(mu, jnp.float32), (2, 3, 2))
    kw = dict(num_steps=8, spacing="trailing", prediction=prediction)
    x_T, traj = ddim_invert(
        model, SCHEDULE, x0, fixed_point_iters=fixed_point_iters, return_trajectory=True, **kw
    )
    alpha = np.sqrt(ABAR[TRAILING_8]).reshape(-1, 1, 1)
    sigma = np.sqrt(1.0 - ABAR[TRAILING_8]).reshape(-1, 1, 1)
    e = mu * (1.0 - alpha[0]) / sigma[0]
    want = np.concatenate([mu[None, None], (alpha * mu + sigma * e)[:, None]])  # [9, 1, 3, 2]
    assert traj.shape == (9, 2, 3, 2)
    np.testing.assert_allclose(traj, np.broadcast_to(want, traj.shape), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ddim_sample(model, SCHEDULE, x_T, **kw), x0, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------------------------
# Gaussian data: round trips through ddim_sample and the ODE's endpoint.


def _round_trip_error(x0, num_steps, fixed_point_iters, schedule=SCHEDULE):
    model = gaussian_denoiser(schedule, DATA_MEAN, DATA_STD, "eps")
    kw = dict(num_steps=num_steps, spacing="leading")
    x_T = ddim_invert(model, schedule, x0, fixed_point_iters=fixed_point_iters, **kw)
    return float(jnp.abs(ddim_sample(model, schedule, x_T, **kw) - x0).max())


def test_naive_round_trip_error_is_first_order_in_the_steps():
    # Measured (float32, 16 x 8 draws): 0.566, 0.318, 0.170 at 10, 20, 40 steps.
    x0 = _data(3, (16, 8))
    errors = [_round_trip_error(x0, n, 0) for n in (10, 20, 40)]
    assert errors[-1] > 0.05, errors  # not exact: eps is read at the wrong point
    for coarse, fine in zip(errors[:-1], errors[1:], strict=True):
        assert 1.6 < coarse / fine < 2.3, errors


def test_fixed_point_round_trip_is_exact_to_the_iteration_residual(x64):
    # Measured: 10 steps, 10 iterations: 1.8e-5 in float32 and float64; 20 iterations: 6.7e-9
    # in float64 (the last steps contract by 0.58 per iteration, see the module docstring).
    x0 = _data(3, (16, 8))
    assert _round_trip_error(x0, 10, 10) < 1e-4
    schedule = Schedule.from_betas(BETAS, jnp.float64)
    x0 = _data(3, (16, 8), jnp.float64)
    errors = [_round_trip_error(x0, 10, n, schedule) for n in (5, 10, 20)]
    assert errors[2] < 1e-7 and errors[0] > errors[1] > errors[2], errors


def test_exact_inverse_converges_to_the_probability_flow_endpoint(x64):
    # The probability-flow ODE moves N(m, s^2) data affinely: x_t = alpha_t m +
    # sqrt(alpha_t^2 s^2 + sigma_t^2) / s (x0 - m). The exact inverse of first-order DDIM
    # reaches that endpoint at first order (measured: 0.90, 0.41, 0.20 at 10, 20, 40 steps).
    schedule = Schedule.from_betas(BETAS, jnp.float64)
    model = gaussian_denoiser(schedule, DATA_MEAN, DATA_STD, "eps")
    x0 = _data(4, (8, 4), jnp.float64)
    a, s = _alpha_sigma(T - 1)
    want = a * DATA_MEAN + np.sqrt(a**2 * DATA_STD**2 + s**2) / DATA_STD * (x0 - DATA_MEAN)
    errors = []
    for n in (10, 20, 40):
        x_T = ddim_invert(
            model, schedule, x0, num_steps=n, spacing="trailing", fixed_point_iters=20
        )
        errors.append(float(jnp.abs(x_T - want).max()))
    for coarse, fine in zip(errors[:-1], errors[1:], strict=True):
        assert 1.8 < coarse / fine < 2.4, errors


# --------------------------------------------------------------------------------------------
# jit, vmap, trajectories, dtypes.


def test_jit_and_vmap_equal_eager_and_trace_once():
    model = gaussian_denoiser(SCHEDULE, DATA_MEAN, DATA_STD, "v")
    kw = dict(num_steps=6, spacing="linspace", prediction="v", fixed_point_iters=2)
    x0 = _data(5, (4, 2, 3))
    eager = np.stack([ddim_invert(model, SCHEDULE, x0[i], **kw) for i in range(4)])
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def invert(x0):
        return ddim_invert(model, SCHEDULE, x0, **kw)

    for i in range(4):
        np.testing.assert_allclose(invert(x0[i]), eager[i], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(jax.vmap(invert)(x0), eager, rtol=RTOL, atol=ATOL)


def test_return_trajectory_and_stride():
    model = gaussian_denoiser(SCHEDULE, DATA_MEAN, DATA_STD, "eps")
    x0 = _data(6, (2, 3))
    x_T, traj = ddim_invert(model, SCHEDULE, x0, num_steps=7, return_trajectory=True)
    assert traj.shape == (8, 2, 3)
    np.testing.assert_array_equal(traj[0], x0)
    np.testing.assert_array_equal(traj[-1], x_T)
    np.testing.assert_array_equal(ddim_invert(model, SCHEDULE, x0, num_steps=7), x_T)
    x_T3, traj3 = ddim_invert(model, SCHEDULE, x0, num_steps=7, return_trajectory=3)
    assert traj3.shape == (3, 2, 3)  # after steps 0, 3, 6: 7 // 3 + 1 states
    np.testing.assert_array_equal(traj3, traj[::3])
    np.testing.assert_array_equal(x_T3, x_T)


def test_default_steps_are_ddim_sample_defaults_and_dtype_is_kept():
    # 50 'leading' steps, or T on a shorter schedule: the single-point path ends at
    # alpha_N mu + sigma_N e (tau_1 = 0; tau_N = 980 for T = 1000, T - 1 for T = 20).
    for num_timesteps, t_last in [(T, 980), (20, 19)]:
        betas = linear_betas(num_timesteps)
        abar = np.cumprod(1.0 - betas)
        sched = Schedule.from_betas(betas, jnp.float32)
        model = gaussian_denoiser(sched, 0.5, 0.0, "eps")
        x_T = ddim_invert(model, sched, jnp.full((2, 3), 0.5))
        e = 0.5 * (1.0 - np.sqrt(abar[0])) / np.sqrt(1.0 - abar[0])
        want = np.sqrt(abar[t_last]) * 0.5 + np.sqrt(1.0 - abar[t_last]) * e
        np.testing.assert_allclose(x_T, np.full((2, 3), want), rtol=RTOL, atol=ATOL)
    # bfloat16 in, bfloat16 out (computed in float32 inside the step)
    model = gaussian_denoiser(SCHEDULE, DATA_MEAN, DATA_STD, "eps")
    x0 = _data(7, (2, 3))
    x_T16 = ddim_invert(model, SCHEDULE, x0.astype(jnp.bfloat16), num_steps=5, spacing="trailing")
    assert x_T16.dtype == jnp.bfloat16
    x_T = ddim_invert(model, SCHEDULE, x0, num_steps=5, spacing="trailing")
    np.testing.assert_allclose(np.asarray(x_T16, np.float32), x_T, rtol=0.05, atol=0.05)


def test_exported_from_the_package_only():
    assert jax_diffusion.ddim_invert is ddim_invert
    assert jax_diffusion.ddim_invert_step is ddim_invert_step
    assert not hasattr(jax_diffusion.samplers, "ddim_invert")


# --------------------------------------------------------------------------------------------
# Bad input.


def _gauss(prediction="eps"):
    return gaussian_denoiser(SCHEDULE, 0.0, 1.0, prediction)


X = jnp.zeros((2, 3))

BAD_INPUTS = {
    "fixed_point_iters_negative": (
        lambda: ddim_invert(_gauss(), SCHEDULE, X, fixed_point_iters=-1),
        r"^fixed_point_iters must be an int >= 0; got -1$",
    ),
    "fixed_point_iters_float": (
        lambda: ddim_invert(_gauss(), SCHEDULE, X, fixed_point_iters=2.0),
        r"^fixed_point_iters must be an int >= 0; got 2.0$",
    ),
    "fixed_point_iters_bool": (
        lambda: ddim_invert_step(_gauss(), SCHEDULE, X, -1, 5, fixed_point_iters=True),
        r"^fixed_point_iters must be an int >= 0; got True$",
    ),
    "x0_int": (
        lambda: ddim_invert(_gauss(), SCHEDULE, jnp.zeros((2, 3), jnp.int32)),
        r"^x0 must be a floating array \[B, \.\.\.\] with a leading batch axis; got shape "
        r"\(2, 3\) and dtype int32",
    ),
    "x0_scalar": (lambda: ddim_invert(_gauss(), SCHEDULE, jnp.float32(0.0)), r"^x0 must be"),
    "prediction": (
        lambda: ddim_invert(_gauss(), SCHEDULE, X, prediction="noise"),
        r"prediction must be one of 'eps', 'x0', 'v'; got 'noise'",
    ),
    "variance": (lambda: ddim_invert(_gauss(), SCHEDULE, X, variance="big"), r"variance.*'big'"),
    "spacing": (lambda: ddim_invert(_gauss(), SCHEDULE, X, spacing="cosine"), r"spacing.*'cosine'"),
    "num_steps_too_many": (
        lambda: ddim_invert(_gauss(), SCHEDULE, X, num_steps=T + 1),
        r"num_steps must be an int in \[1, 1000\]; got 1001",
    ),
    "timesteps_and_num_steps": (
        lambda: ddim_invert(_gauss(), SCHEDULE, X, timesteps=[9, 5], num_steps=2),
        r"pass timesteps or num_steps / spacing, not both; got timesteps and num_steps=2$",
    ),
    "timesteps_out_of_range": (
        lambda: ddim_invert(_gauss(), SCHEDULE, X, timesteps=[5, T]),
        r"timesteps must be distinct ints in \[0, 999\]; got \[5, 1000\]",
    ),
    "trajectory_stride": (
        lambda: ddim_invert(_gauss(), SCHEDULE, X, return_trajectory=0),
        r"return_trajectory must be a bool or a positive int stride k; got 0",
    ),
    "model_none": (lambda: ddim_invert(None, SCHEDULE, X), r"model_fn must be a callable"),
    # ddim_sample refuses to start an eps model there, so the inversion has no round trip
    "eps_at_zero_snr": (
        lambda: ddim_invert(
            lambda x, t: x,
            Schedule.from_betas(rescale_zero_terminal_snr(BETAS)),
            X,
            num_steps=10,
            spacing="trailing",
        ),
        r"prediction='eps' cannot invert to step 999, where alphas_cumprod is 0",
    ),
    "schedule_array": (lambda: ddim_invert(_gauss(), BETAS, X), r"schedule must be a"),
    "model_learned_range": (
        lambda: ddim_invert(_gauss(), SCHEDULE, X, variance="learned_range"),
        r"model_fn\(x, t\) must return shape \(2, 6\).*learned_range",
    ),
    "step_x_int": (
        lambda: ddim_invert_step(_gauss(), SCHEDULE, jnp.zeros((2, 3), jnp.int32), -1, 5),
        r"^x must be a floating array",
    ),
    "step_t_below_minus_one": (
        lambda: ddim_invert_step(_gauss(), SCHEDULE, X, -2, 5),
        r"^t must lie in \[-1, 998\]; got -2$",
    ),
    "step_t_last": (
        lambda: ddim_invert_step(_gauss(), SCHEDULE, X, T - 1, T - 1),
        r"^t must lie in \[-1, 998\]; got 999$",
    ),
    "step_t_next_not_above_t": (
        lambda: ddim_invert_step(_gauss(), SCHEDULE, X, 5, 5),
        r"^t_next must lie in \[t \+ 1, 999\] \(t = 5\); got 5$",
    ),
    "step_t_next_past_the_end": (
        lambda: ddim_invert_step(_gauss(), SCHEDULE, X, jnp.array([3, 4]), jnp.array([9, T])),
        r"^t_next must lie in \[t \+ 1, 999\] \(t = \[3, 4\]\); got \[9, 1000\]$",
    ),
    "step_t_float": (
        lambda: ddim_invert_step(_gauss(), SCHEDULE, X, 5.0, 9),
        r"^t must be an int scalar or int \[B\]; got float32\[\]",
    ),
    "step_t_next_batch": (
        lambda: ddim_invert_step(_gauss(), SCHEDULE, X, 5, jnp.array([7, 8, 9])),
        r"^t_next has shape \(3,\) but x has batch size 2",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_the_argument(case):
    fn, pattern = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=pattern):
        fn()


def test_a_v_model_inverts_to_the_zero_snr_top_step_and_samples_back():
    # what the eps refusal above is not: v (and x0) models are defined at alphas_cumprod = 0
    schedule = Schedule.from_betas(rescale_zero_terminal_snr(BETAS))
    model = gaussian_denoiser(schedule, DATA_MEAN, DATA_STD, "v")
    x0 = _data(3, (4, 2))
    kw = dict(num_steps=10, spacing="trailing", prediction="v")
    x_T = ddim_invert(model, schedule, x0, fixed_point_iters=10, **kw)
    back = ddim_sample(model, schedule, x_T, **kw)
    assert np.all(np.isfinite(np.asarray(x_T)))
    np.testing.assert_allclose(back, x0, atol=1e-3)
