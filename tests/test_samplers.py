"""Tests of jax_diffusion.samplers against exact denoisers, closed forms and float64 NumPy.

No training anywhere: Gaussian data N(m, s^2 I) has an exact MMSE denoiser
(`jax_diffusion.testing.gaussian_denoiser`) that is affine in x_t, so every sampler step is
affine-Gaussian in x and its marginal can be propagated step by step in float64 NumPy, and the
probability-flow ODE has a closed-form endpoint.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import OPTIMIZED
from jax.sharding import PartitionSpec as P

from jax_diffusion import samplers
from jax_diffusion.edm import heun_sample
from jax_diffusion.guidance import dynamic_threshold
from jax_diffusion.samplers import (
    ddim_sample,
    ddim_step,
    ddpm_sample,
    ddpm_step,
    dpm_solver_pp_sample,
    dpm_solver_pp_step,
    dpm_solver_pp_timesteps,
    sampling_timesteps,
)
from jax_diffusion.schedules import Schedule, cosine_betas, linear_betas, rescale_zero_terminal_snr
from jax_diffusion.testing import gaussian_denoiser

T = 1000
BETAS = linear_betas(T)  # float64 NumPy, the reference for every propagated quantity
ABAR = np.cumprod(1.0 - BETAS)
SCHEDULE = Schedule.from_betas(BETAS, jnp.float32)
DATA_MEAN, DATA_STD = 0.3, 0.5
PREDICTIONS = ("eps", "x0", "v")
RTOL, ATOL = 1e-5, 1e-6


def _normal(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _learned_range(model_fn, frac_v):
    """Appends a constant variance channel block v (frac = (v + 1) / 2) to a denoiser's output."""

    def fn(x, t):
        out = model_fn(x, t)
        return jnp.concatenate([out, jnp.full_like(out, frac_v)], axis=-1)

    return fn


# --------------------------------------------------------------------------------------------
# Timestep sequences.


def test_sampling_timesteps_values():
    np.testing.assert_array_equal(sampling_timesteps(1000, 50, "leading"), np.arange(980, -1, -20))
    np.testing.assert_array_equal(sampling_timesteps(1000, 50, "trailing"), np.arange(999, 0, -20))
    np.testing.assert_array_equal(
        sampling_timesteps(1000, 50, "linspace"), np.round(np.linspace(0, 999, 50))[::-1]
    )
    assert sampling_timesteps(1000, 50, "linspace")[0] == 999
    # T / n not an integer: rounded, not floored (diffusers' round(arange(T, 0, -T / n)) - 1)
    np.testing.assert_array_equal(sampling_timesteps(1000, 3, "trailing"), [999, 666, 332])
    np.testing.assert_array_equal(sampling_timesteps(10, 4, "trailing"), [9, 7, 4, 1])
    ts = dpm_solver_pp_timesteps(1000, 20)
    np.testing.assert_array_equal(ts, np.round(np.linspace(0, 999, 21))[::-1][:-1])
    assert ts[0] == 999 and ts[-1] == 50 and ts.shape == (20,)


@pytest.mark.parametrize("num_timesteps", [1, 2, 7, 10, 1000])
@pytest.mark.parametrize("spacing", samplers.SPACINGS)
def test_sampling_timesteps_distinct_descending(num_timesteps, spacing):
    steps = range(1, num_timesteps + 1) if num_timesteps < 100 else [1, 3, 7, 333, 999, 1000]
    for n in steps:
        ts = sampling_timesteps(num_timesteps, n, spacing)
        assert ts.shape == (n,) and ts.dtype == np.int32
        assert np.all(np.diff(ts) < 0) and ts[-1] >= 0 and ts[0] <= num_timesteps - 1


# --------------------------------------------------------------------------------------------
# Single-point data: DDIM (eta = 0) returns mu exactly, along a closed-form trajectory.


@pytest.mark.parametrize("spacing", samplers.SPACINGS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddim_single_point_returns_mu_along_closed_form(prediction, spacing):
    mu = np.linspace(-0.8, 0.9, 4 * 4 * 2).reshape(4, 4, 2)
    model = gaussian_denoiser(SCHEDULE, jnp.asarray(mu, jnp.float32), 0.0, prediction)
    x_T = _normal(0, (3, 4, 4, 2)) * 2.0  # any x_T, not only typical ones
    x0, traj = ddim_sample(
        model, SCHEDULE, x_T, num_steps=20, spacing=spacing, prediction=prediction,
        return_trajectory=True,
    )  # fmt: skip
    np.testing.assert_allclose(x0, np.broadcast_to(mu, x0.shape), rtol=RTOL, atol=ATOL)
    # sqrt(abar_k) mu + sqrt(1 - abar_k) eps_T, eps_T read off x_T at the first step.
    ts = sampling_timesteps(T, 20, spacing)
    abar = np.append(ABAR[ts], 1.0).reshape(-1, 1, 1, 1, 1)
    eps_T = (np.asarray(x_T, np.float64) - np.sqrt(abar[0]) * mu) / np.sqrt(1.0 - abar[0])
    expected = np.sqrt(abar) * mu + np.sqrt(1.0 - abar) * eps_T
    assert traj.shape == (21, 3, 4, 4, 2)
    np.testing.assert_array_equal(traj[0], x_T)
    np.testing.assert_array_equal(traj[-1], x0)
    np.testing.assert_allclose(traj, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_float32_eps_ddim_from_the_last_cosine_step_matches_float64(spacing):
    """DDIM (eta = 0, Song et al. 2021, eq. 12) from t = T - 1 of a cosine schedule, where
    alpha = 4.9e-5: float32 with eps prediction against a float64 NumPy chain of the exact
    Gaussian denoiser. x0_hat = (x_t - sigma eps_hat) / alpha must divide last; scaling by
    1 / alpha first made the samples 5.6e-5 off (diffusers' FlaxDDIMScheduler: 2.0e-6)."""
    betas = cosine_betas(T)
    abar = np.cumprod(1.0 - betas)
    sched = Schedule.from_betas(betas, jnp.float32)
    model = gaussian_denoiser(sched, DATA_MEAN, DATA_STD, "eps")
    x_T = _normal(1, (4, 64))
    got = ddim_sample(model, sched, x_T, num_steps=50, spacing=spacing, prediction="eps")
    x = np.asarray(x_T, np.float64)
    ts = sampling_timesteps(T, 50, spacing)
    for abar_t, abar_p in zip(abar[ts], np.append(abar[ts[1:]], 1.0), strict=True):
        a, s2 = np.sqrt(abar_t), DATA_STD**2
        x0_hat = DATA_MEAN + a * s2 / (abar_t * s2 + 1.0 - abar_t) * (x - a * DATA_MEAN)
        eps_hat = (x - a * x0_hat) / np.sqrt(1.0 - abar_t)
        x = np.sqrt(abar_p) * x0_hat + np.sqrt(1.0 - abar_p) * eps_hat
    np.testing.assert_allclose(got, x, rtol=RTOL, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Gaussian data: marginals of the stochastic samplers, propagated analytically.


def _affine_denoiser(abar_t):
    """x0_hat = c x + e for data N(DATA_MEAN, DATA_STD^2) at alphas_cumprod abar_t."""
    a, s2 = np.sqrt(abar_t), DATA_STD**2
    c = a * s2 / (abar_t * s2 + 1.0 - abar_t)
    return c, DATA_MEAN - c * a * DATA_MEAN


def _ddpm_marginal(abar, variance, frac=None):
    """Mean and std of DDPM's x_0 from x_T ~ N(0, 1) along a chain with alphas_cumprod `abar`.

    Each step is x_{t-1} = A_t x_t + B_t + sigma_t z (Ho et al. 2020, eqs. 7, 11 with the exact
    x0_hat), so mean and variance propagate exactly.
    """
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    beta = 1.0 - abar / abar_prev
    mean, var = 0.0, 1.0
    for t in range(len(abar) - 1, -1, -1):
        c, e = _affine_denoiser(abar[t])
        coef1 = beta[t] * np.sqrt(abar_prev[t]) / (1.0 - abar[t])
        coef2 = (1.0 - abar_prev[t]) * np.sqrt(1.0 - beta[t]) / (1.0 - abar[t])
        beta_tilde = beta[t] * (1.0 - abar_prev[t]) / (1.0 - abar[t])
        if t == 0:  # no noise at the last step
            noise_var = 0.0
        elif variance == "fixed_small":
            noise_var = beta_tilde
        elif variance == "fixed_large":
            noise_var = beta[t]
        else:  # Nichol & Dhariwal 2021, eq. 15
            noise_var = np.exp(frac * np.log(beta[t]) + (1.0 - frac) * np.log(beta_tilde))
        a_t = coef1 * c + coef2
        mean = a_t * mean + coef1 * e
        var = a_t**2 * var + noise_var
    return mean, np.sqrt(var)


def _ddim_marginal(ts, eta):
    """Mean and std of DDIM's output (Song et al. 2021, eq. 12) from x_T ~ N(0, 1)."""
    mean, var = 0.0, 1.0
    abar_seq = np.append(ABAR[ts], 1.0)
    for abar_t, abar_p in zip(abar_seq[:-1], abar_seq[1:], strict=True):
        c, e = _affine_denoiser(abar_t)
        a, sigma = np.sqrt(abar_t), np.sqrt(1.0 - abar_t)
        sigma_eta2 = eta**2 * (1.0 - abar_p) / (1.0 - abar_t) * (1.0 - abar_t / abar_p)
        d = np.sqrt(1.0 - abar_p - sigma_eta2)
        # x_prev = sqrt(abar_p) x0_hat + d eps_hat + sigma_eta z, eps_hat = (x - a x0_hat) / sigma
        a_t = np.sqrt(abar_p) * c + d * (1.0 - a * c) / sigma
        mean = a_t * mean + np.sqrt(abar_p) * e - d * a * e / sigma
        var = a_t**2 * var + sigma_eta2
    return mean, np.sqrt(var)


def test_propagated_marginals_match_the_measured_values():
    # The numbers quoted in the issue, measured independently of this propagation code.
    assert _ddpm_marginal(ABAR, "fixed_small")[1] == pytest.approx(0.4961, abs=1e-4)
    assert _ddpm_marginal(ABAR, "fixed_large")[1] == pytest.approx(0.5008, abs=1e-4)
    assert _ddim_marginal(sampling_timesteps(T, 50), 1.0)[1] == pytest.approx(0.444, abs=5e-4)
    assert _ddim_marginal(sampling_timesteps(T, T), 1.0)[1] == pytest.approx(0.4961, abs=1e-4)


def _assert_moments_within_4_sigma(samples, mean, std):
    x = np.asarray(samples, np.float64).ravel()
    n = x.size
    # Elements are iid Gaussian: SE(mean) = std / sqrt(n), SE(std) ~= std / sqrt(2 n).
    assert abs(x.mean() - mean) < 4.0 * std / np.sqrt(n), (x.mean(), mean)
    assert abs(x.std() - std) < 4.0 * std / np.sqrt(2 * n), (x.std(), std)


MC_SHAPE = (2**14, 4)  # 65536 iid samples: 4-sigma bound on the std ~ 0.0055


@pytest.mark.parametrize(
    "prediction, variance, num_steps",
    [
        ("eps", "fixed_small", None),
        ("eps", "fixed_large", None),
        ("eps", "learned_range", None),
        ("x0", "fixed_small", None),
        ("v", "fixed_large", None),
        ("eps", "fixed_large", 100),  # respaced: 100 of the 1000 steps
    ],
)
def test_ddpm_gaussian_matches_propagated_marginal(prediction, variance, num_steps):
    model = gaussian_denoiser(SCHEDULE, DATA_MEAN, DATA_STD, prediction)
    frac = 0.3
    if variance == "learned_range":
        model = _learned_range(model, 2.0 * frac - 1.0)
    timesteps = None if num_steps is None else sampling_timesteps(T, num_steps)
    x0 = jax.jit(
        lambda x, rng: ddpm_sample(
            model, SCHEDULE, x, rng, prediction=prediction, variance=variance, timesteps=timesteps
        ),
        compiler_options=OPTIMIZED,  # a long run: XLA's own optimisation
    )(_normal(1, MC_SHAPE), jax.random.key(2))
    abar = ABAR if timesteps is None else ABAR[np.sort(timesteps)]
    mean, std = _ddpm_marginal(abar, variance, frac)
    _assert_moments_within_4_sigma(x0, mean, std)


@pytest.mark.parametrize("num_steps", [50, 1000])
def test_ddim_eta1_gaussian_matches_propagated_marginal(num_steps):
    model = gaussian_denoiser(SCHEDULE, DATA_MEAN, DATA_STD, "eps")
    x0 = jax.jit(
        lambda x, rng: ddim_sample(model, SCHEDULE, x, rng, num_steps=num_steps, eta=1.0),
        compiler_options=OPTIMIZED,  # a long run: XLA's own optimisation
    )(_normal(3, MC_SHAPE), jax.random.key(4))
    mean, std = _ddim_marginal(sampling_timesteps(T, num_steps), 1.0)
    _assert_moments_within_4_sigma(x0, mean, std)


def test_ddim_eta1_on_all_steps_is_ddpm_fixed_small():
    # Song et al. 2021, section 4.1: eta = 1 with t_prev = t - 1 is the DDPM posterior step.
    model = gaussian_denoiser(SCHEDULE, DATA_MEAN, DATA_STD, "eps")
    x_T, rng = _normal(5, (8, 3)), jax.random.key(6)
    ddim = ddim_sample(model, SCHEDULE, x_T, rng, num_steps=T, eta=1.0)
    ddpm = ddpm_sample(model, SCHEDULE, x_T, rng, variance="fixed_small")
    # Two float32 formulas for the same mean, 1000 steps apart: measured max diff 3e-6.
    np.testing.assert_allclose(ddim, ddpm, rtol=RTOL, atol=1e-5)


@pytest.mark.parametrize("eta", [0.5, 1.5])
def test_ddim_gradient_wrt_eta_matches_finite_differences(eta, x64):
    # eta may be traced, e.g. to tune the stochasticity by gradient: the derivative must exist
    # where the direction term sqrt(sigma_prev^2 - sigma_eta^2) is clamped at 0 (every
    # sampler's last step, t_prev = -1; steps where eta > 1). Reference: float64 central
    # differences of the same sampler.
    schedule = Schedule.from_betas(linear_betas(20, 1e-3, 0.2), jnp.float64)
    model = gaussian_denoiser(schedule, DATA_MEAN, DATA_STD, "eps")
    x_T, rng = _normal(8, (4, 3), jnp.float64), jax.random.key(9)

    @jax.jit
    def total(eta):
        return ddim_sample(model, schedule, x_T, rng, num_steps=5, eta=eta).sum()

    h = 1e-5
    finite_difference = (total(eta + h) - total(eta - h)) / (2 * h)
    np.testing.assert_allclose(jax.jit(jax.grad(total))(eta), finite_difference, rtol=1e-6)

    def last_step(eta):  # returns x0_hat whatever eta is
        return ddim_step(model, schedule, x_T, 4, -1, rng, eta=eta).x_prev.sum()

    assert jax.jit(jax.grad(last_step))(eta) == 0.0


# --------------------------------------------------------------------------------------------
# Convergence orders to the exact probability-flow ODE endpoint.


def _logsnr_linear_schedule(dtype):
    """A schedule whose log-SNR is linear in t, from 20 at t = 0 to -12 at t = T - 1.

    The samplers' grids are uniform in t, so here they are uniform in lambda = logsnr / 2, the
    variable in which DPM-Solver's order is stated (Lu et al. 2022: global error O(h_max^k),
    h_max the largest step in lambda), and the final jump to sigma = 0 from sigma^2 < 1e-8 adds
    no error floor. On the linear schedule sigma^2 ~ t near t = 0: the last steps of a grid
    uniform in t stay O(1) wide in lambda for every num_steps, and the jump from t >= 1 leaves a
    floor of order sigma^2(1) / s^2, so DPM-Solver++(2M) there stalls near 2e-4 from 64 steps on.
    """
    logsnr = np.linspace(20.0, -12.0, T)
    abar = 1.0 / (1.0 + np.exp(-logsnr))
    return abar, Schedule.from_betas(1.0 - abar / np.concatenate([[1.0], abar[:-1]]), dtype)


@pytest.mark.parametrize(
    "sampler, expected_order",
    [
        (functools.partial(ddim_sample, spacing="trailing"), 1.0),  # x_T at t = T - 1
        (functools.partial(dpm_solver_pp_sample, order=1), 1.0),
        (functools.partial(dpm_solver_pp_sample, order=2), 2.0),
    ],
    ids=["ddim", "dpm_solver_pp_1", "dpm_solver_pp_2m"],
)
def test_convergence_order_to_probability_flow_endpoint(sampler, expected_order, x64):
    abar, schedule = _logsnr_linear_schedule(jnp.float64)
    model = gaussian_denoiser(schedule, DATA_MEAN, DATA_STD, "eps")
    x_T = np.asarray(_normal(7, (32, 4), jnp.float64))
    # The PF-ODE maps each marginal N(a m, a^2 s^2 + sigma^2) to the next affinely, keeping
    # z = (x - a m) / sqrt(a^2 s^2 + sigma^2): at sigma = 0 the endpoint is m + s z.
    a_T = np.sqrt(abar[-1])
    z = (x_T - a_T * DATA_MEAN) / np.sqrt(abar[-1] * DATA_STD**2 + 1.0 - abar[-1])
    exact = DATA_MEAN + DATA_STD * z
    steps = np.array([32, 64, 128, 256])
    errors = [
        np.max(np.abs(np.asarray(sampler(model, schedule, x_T, num_steps=int(n))) - exact))
        for n in steps
    ]
    # diffrax test_ode_order style: slope of log error against log step size.
    order = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    # Measured: 0.973 (DDIM), 0.971 (DPM-Solver++1), 1.952 (DPM-Solver++(2M)).
    assert abs(order - expected_order) < 0.1, (order, errors)
    assert np.all(np.diff(errors) < 0), errors


# --------------------------------------------------------------------------------------------
# Parameterizations and variance layouts.


def _run(sampler_name, model, x_T, rng, **kw):
    if sampler_name == "ddpm":
        return ddpm_sample(model, SCHEDULE, x_T, rng, timesteps=sampling_timesteps(T, 50), **kw)
    if sampler_name == "ddim":
        return ddim_sample(model, SCHEDULE, x_T, rng, num_steps=20, eta=1.0, **kw)
    if sampler_name == "heun":
        return heun_sample(model, SCHEDULE, x_T, num_steps=20, **kw)
    return dpm_solver_pp_sample(model, SCHEDULE, x_T, num_steps=20, **kw)


SAMPLERS = ("ddpm", "ddim", "dpm_solver_pp", "heun")


@pytest.mark.parametrize("sampler_name", SAMPLERS)
def test_all_parameterizations_and_layouts_agree(sampler_name):
    # The exact denoisers in eps / x0 / v imply the same x0_hat, so the samples must agree; a
    # learned_range output (variance half ignored by DDIM / DPM-Solver) too.
    x_T, rng = _normal(8, (6, 5)), jax.random.key(9)
    results = {}
    for prediction in PREDICTIONS:
        model = gaussian_denoiser(SCHEDULE, DATA_MEAN, DATA_STD, prediction)
        results[prediction] = _run(sampler_name, model, x_T, rng, prediction=prediction)
    model = _learned_range(gaussian_denoiser(SCHEDULE, DATA_MEAN, DATA_STD, "eps"), -1.0)
    # frac = 0: learned_range gives log beta_tilde, i.e. DDPM's fixed_small.
    results["learned_range"] = _run(sampler_name, model, x_T, rng, variance="learned_range")
    for key, value in results.items():
        np.testing.assert_allclose(value, results["eps"], rtol=RTOL, atol=ATOL, err_msg=key)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("sampler_name", SAMPLERS)
def test_dtype_is_preserved(sampler_name, dtype):
    model = gaussian_denoiser(SCHEDULE, DATA_MEAN, 0.0, "eps")
    x0 = _run(sampler_name, model, _normal(10, (4, 3), dtype), jax.random.key(11))
    assert x0.dtype == dtype
    np.testing.assert_allclose(np.asarray(x0, np.float32), DATA_MEAN, atol=2e-2)


# --------------------------------------------------------------------------------------------
# x0 handling: static clipping and dynamic thresholding inside the samplers.


@pytest.mark.parametrize("sampler_name", SAMPLERS)
@pytest.mark.parametrize(
    "mu, kw, expected",
    [
        (2.0, dict(clip_denoised=True), 1.0),
        (2.0, dict(denoised_fn=dynamic_threshold), 1.0),  # s = 2: 2 -> 2 / 2
        (-0.5, dict(denoised_fn=dynamic_threshold), -0.5),  # s = 1: untouched
    ],
)
def test_samplers_apply_x0_clipping_and_thresholding(sampler_name, mu, kw, expected):
    # Single-point data: x0_hat = mu at every step; the last step of each sampler returns the
    # (clipped / thresholded) x0_hat.
    model = gaussian_denoiser(SCHEDULE, mu, 0.0, "eps")
    x0 = _run(sampler_name, model, _normal(13, (3, 4)), jax.random.key(14), **kw)
    np.testing.assert_allclose(x0, expected, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------------------------
# Trajectories.


@pytest.mark.parametrize("sampler_name", SAMPLERS)
def test_trajectory_strides(sampler_name):
    model = gaussian_denoiser(SCHEDULE, DATA_MEAN, DATA_STD, "eps")
    x_T, rng = _normal(19, (2, 3)), jax.random.key(20)
    num_steps = 50 if sampler_name == "ddpm" else 20
    x0, full = _run(sampler_name, model, x_T, rng, return_trajectory=True)
    assert full.shape == (num_steps + 1, 2, 3)
    np.testing.assert_array_equal(full[0], x_T)
    np.testing.assert_array_equal(full[-1], x0)
    # Different programs (with / without the buffer): equal up to XLA's float32 fusion choices.
    np.testing.assert_allclose(_run(sampler_name, model, x_T, rng), x0, rtol=RTOL, atol=ATOL)
    for k in (3, 5):  # 3 does not divide either num_steps, 5 divides both
        x0_k, traj = _run(sampler_name, model, x_T, rng, return_trajectory=k)
        assert traj.shape == (num_steps // k + 1, 2, 3)
        np.testing.assert_allclose(traj, full[::k], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(x0_k, x0, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("stride", [1, 3])
@pytest.mark.parametrize("sampler_name", SAMPLERS)
def test_trajectory_is_held_once(sampler_name, stride):
    # The scan writes the trajectory in place into the buffer it returns: compared with the same
    # sampler without a trajectory, the compiled program adds the trajectory as its output and
    # (almost) nothing as temporaries, where a sliced copy of the scan buffer added it twice.
    model = gaussian_denoiser(SCHEDULE, DATA_MEAN, DATA_STD, "eps")
    x_T, rng = _normal(28, (64, 128)), jax.random.key(29)  # 32 KiB per state

    def memory(trajectory):
        fn = jax.jit(lambda x, r: _run(sampler_name, model, x, r, return_trajectory=trajectory))
        mem = fn.lower(x_T, rng).compile().memory_analysis()
        if mem is None:
            pytest.skip("memory_analysis() is not implemented on this backend")
        return mem.temp_size_in_bytes, mem.output_size_in_bytes

    num_steps = 50 if sampler_name == "ddpm" else 20
    traj_bytes = (num_steps // stride + 1) * x_T.nbytes
    temp_plain, _ = memory(False)
    temp_traj, out_traj = memory(stride)
    assert out_traj >= traj_bytes + x_T.nbytes
    assert temp_traj - temp_plain <= 2 * x_T.nbytes, (temp_plain, temp_traj, traj_bytes)


# --------------------------------------------------------------------------------------------
# One compiled program: traced once, jit / vmap / shard_map / pmap.


@pytest.mark.parametrize("sampler_name", SAMPLERS)
def test_scan_body_traced_once(sampler_name):
    traces = []
    base = gaussian_denoiser(SCHEDULE, DATA_MEAN, DATA_STD, "eps")

    def model(x, t):
        traces.append(t.shape)
        return base(x, t)

    rng = jax.random.key(21)
    if sampler_name == "ddpm":
        ddpm_sample(model, SCHEDULE, _normal(22, (2, 3)), rng)  # all 1000 steps
    elif sampler_name == "ddim":
        ddim_sample(model, SCHEDULE, _normal(22, (2, 3)), rng, num_steps=T, eta=0.5)
    elif sampler_name == "heun":
        heun_sample(model, SCHEDULE, _normal(22, (2, 3)), num_steps=T)
    else:
        dpm_solver_pp_sample(model, SCHEDULE, _normal(22, (2, 3)), num_steps=T - 1)
    # Heun's step calls the model twice: at x_t and, in the corrector's branch, at the Euler point
    assert traces == [(2,)] * (2 if sampler_name == "heun" else 1)

    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def sample(x_T, rng):
        return _run(sampler_name, base, x_T, rng)

    for seed in (23, 24, 25):
        sample(_normal(seed, (2, 3)), jax.random.key(seed))


def _mesh():
    return jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))


@pytest.mark.parametrize("sampler_name", SAMPLERS)
def test_jit_vmap_shard_map_and_pmap_equal_unsharded(sampler_name):
    assert jax.device_count() == 8
    model = gaussian_denoiser(SCHEDULE, DATA_MEAN, DATA_STD, "eps")
    sample = jax.jit(lambda rng, x_T: _run(sampler_name, model, x_T, rng))
    rngs = jax.random.split(jax.random.key(26), 8)
    x_T = _normal(27, (8, 2, 3))
    per_seed = np.stack([sample(rngs[i], x_T[i]) for i in range(8)])
    # Un-jitted equals jitted.
    np.testing.assert_allclose(_run(sampler_name, model, x_T[0], rngs[0]), per_seed[0], RTOL, ATOL)
    # vmap over seeds.
    np.testing.assert_allclose(jax.vmap(sample)(rngs, x_T), per_seed, rtol=RTOL, atol=ATOL)
    # shard_map over 8 devices: each shard samples its own slice of the batch with its key.
    sharded = jax.jit(
        jax.shard_map(
            lambda r, x: sample(r[0], x[0])[None],
            mesh=_mesh(),
            in_specs=(P("d"), P("d")),
            out_specs=P("d"),
        )
    )(rngs, x_T)
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_allclose(sharded, per_seed, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(jax.pmap(sample)(rngs, x_T), per_seed, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------------------------
# Option plumbing: step counts, noise and keys, trajectories, model_t, rank and dtype.


def _exact_x0_hat(x, t):
    """x0_hat of the exact N(DATA_MEAN, DATA_STD^2) denoiser at step t, float64."""
    c, e = _affine_denoiser(ABAR[t])
    return c * np.asarray(x, np.float64) + e


@pytest.mark.parametrize(
    "sampler_name, kw, t_first",
    [
        ("ddim", dict(spacing="leading"), 0),  # (n - 1) (T // n) = 0
        ("ddim", dict(spacing="linspace"), 0),  # round(linspace(0, T - 1, 1)) = [0]
        ("ddim", dict(spacing="trailing"), T - 1),
        ("ddim", dict(spacing="trailing", eta=1.0), T - 1),  # no noise on the step to t = -1
        ("dpm_solver_pp", dict(), T - 1),
    ],
)
def test_one_step_returns_the_denoised_estimate_at_the_first_step(sampler_name, kw, t_first):
    # num_steps = 1 is a single jump from the only step to the clean end, which returns x0_hat
    # there (Song et al. 2021 eq. 12 with abar_prev = 1; Lu et al. 2022 with sigma_prev = 0).
    # An x0 model: eps would divide float32 roundoff by alpha = 0.006 at t = 999.
    model = gaussian_denoiser(SCHEDULE, DATA_MEAN, DATA_STD, "x0")
    x_T = _normal(30, (2, 3))
    sampler = ddim_sample if sampler_name == "ddim" else dpm_solver_pp_sample
    if sampler_name == "ddim":
        kw = dict(kw, rng=jax.random.key(31))
    x0, traj = sampler(
        model, SCHEDULE, x_T, num_steps=1, prediction="x0", return_trajectory=True, **kw
    )
    np.testing.assert_allclose(x0, _exact_x0_hat(x_T, t_first), rtol=RTOL, atol=ATOL)
    assert traj.shape == (2, 2, 3)
    np.testing.assert_array_equal(traj[0], x_T)
    np.testing.assert_array_equal(traj[1], x0)


def test_ddpm_step_adds_noise_except_at_t_0():
    # Ho et al. 2020, Algorithm 2: x_{t-1} = mu(x_t, t) + sigma_t z with z = 0 at t = 0 and
    # sigma_t^2 = beta_tilde_t (fixed_small). Reference: the posterior mean (eq. 7) of the exact
    # denoiser's x0_hat, float64; per example t = [0, 1, 500].
    model = gaussian_denoiser(SCHEDULE, DATA_MEAN, DATA_STD, "eps")
    t = np.array([0, 1, 500])
    x = _normal(32, (3, 8192))
    abar_prev = np.append(1.0, ABAR[:-1])
    for seed in (33, 34):
        x_prev = np.asarray(ddpm_step(model, SCHEDULE, x, jnp.asarray(t), jax.random.key(seed))[0])
        for i, ti in enumerate(t):
            x_i = np.asarray(x[i], np.float64)
            coef1 = BETAS[ti] * np.sqrt(abar_prev[ti]) / (1.0 - ABAR[ti])
            coef2 = (1.0 - abar_prev[ti]) * np.sqrt(1.0 - BETAS[ti]) / (1.0 - ABAR[ti])
            residual = x_prev[i] - (coef1 * _exact_x0_hat(x_i, ti) + coef2 * x_i)
            if ti == 0:
                np.testing.assert_allclose(residual, 0.0, atol=1e-5)
            else:
                std = np.sqrt(BETAS[ti] * (1.0 - abar_prev[ti]) / (1.0 - ABAR[ti]))
                _assert_moments_within_4_sigma(residual, 0.0, std)


def test_ddpm_step_calls_the_model_at_model_t_on_a_respaced_schedule():
    # ddpm_step indexes the respaced schedule with t and calls the model with the original step
    # model_t: an x0 model's output is x0_hat at model_t = sorted(timesteps)[t].
    timesteps = sampling_timesteps(T, 10)  # 900, 800, ..., 0
    respaced = SCHEDULE.respace(timesteps)
    model = gaussian_denoiser(SCHEDULE, DATA_MEAN, DATA_STD, "x0")
    x = _normal(35, (2, 3))
    out = ddpm_step(model, respaced, x, 7, KEY, prediction="x0", model_t=700)
    np.testing.assert_allclose(out.x0_hat, _exact_x0_hat(x, 700), rtol=RTOL, atol=ATOL)


def test_ddpm_respaced_short_chain_matches_propagated_marginal():
    # Five respaced steps with large betas: a key reused across steps (correlated noise) or the
    # model called at the wrong original steps moves the std by far more than 4 sigma.
    timesteps = np.array([999, 750, 500, 250, 0])
    model = gaussian_denoiser(SCHEDULE, DATA_MEAN, DATA_STD, "eps")
    x0 = ddpm_sample(
        model, SCHEDULE, _normal(36, MC_SHAPE), jax.random.key(37), timesteps=timesteps
    )
    mean, std = _ddpm_marginal(ABAR[np.sort(timesteps)], "fixed_small")
    _assert_moments_within_4_sigma(x0, mean, std)


def test_ddim_eta1_five_steps_matches_propagated_marginal():
    # As above for DDIM: one independent noise draw per step (Song et al. 2021, eq. 12).
    model = gaussian_denoiser(SCHEDULE, DATA_MEAN, DATA_STD, "eps")
    x_T, rng = _normal(38, MC_SHAPE), jax.random.key(39)
    x0 = ddim_sample(model, SCHEDULE, x_T, rng, num_steps=5, eta=1.0, spacing="trailing")
    mean, std = _ddim_marginal(sampling_timesteps(T, 5, "trailing"), 1.0)
    _assert_moments_within_4_sigma(x0, mean, std)


def test_ddim_and_dpm_solver_pp_on_given_timesteps_match_float64_chains(x64):
    """`timesteps` instead of num_steps / spacing: the sequences the samplers build themselves
    give the same samples, and uneven ones given in any order (the DDIM paper's quadratic
    sequence, section D.2; an uneven DPM grid) match float64 NumPy chains of Song et al. 2021
    eq. 12 (eta = 0) and Lu et al. 2022 Algorithm 2 with the exact denoiser."""
    schedule = Schedule.from_betas(BETAS, jnp.float64)
    model = gaussian_denoiser(schedule, DATA_MEAN, DATA_STD, "eps")
    x_T = np.asarray(_normal(50, (4, 3), jnp.float64))
    for spacing in ("leading", "trailing"):
        given = ddim_sample(model, schedule, x_T, timesteps=sampling_timesteps(T, 7, spacing))
        built = ddim_sample(model, schedule, x_T, num_steps=7, spacing=spacing)
        np.testing.assert_array_equal(given, built)
    given = dpm_solver_pp_sample(model, schedule, x_T, timesteps=dpm_solver_pp_timesteps(T, 7))
    np.testing.assert_array_equal(given, dpm_solver_pp_sample(model, schedule, x_T, num_steps=7))

    alpha, sigma = np.sqrt(ABAR), np.sqrt(1.0 - ABAR)
    quadratic = np.unique((np.linspace(0, np.sqrt(0.8 * T), 10) ** 2).astype(np.int64))
    assert len(quadratic) == 10 and quadratic[-1] == 800
    x = x_T
    for t, t_prev in zip(quadratic[::-1], [*quadratic[::-1][1:], -1], strict=True):
        x0_hat = _exact_x0_hat(x, t)
        eps_hat = (x - alpha[t] * x0_hat) / sigma[t]
        a_prev, s_prev = (alpha[t_prev], sigma[t_prev]) if t_prev >= 0 else (1.0, 0.0)
        x = a_prev * x0_hat + s_prev * eps_hat
    shuffled = np.random.default_rng(0).permutation(quadratic)
    got = ddim_sample(model, schedule, x_T, timesteps=shuffled)
    np.testing.assert_allclose(got, x, rtol=1e-10, atol=1e-12)

    grid = [999, 610, 300, 120, 7]  # lambda steps far from uniform
    lam = np.log(alpha / sigma)
    x, x0_last, t_last = x_T, None, None
    for t, t_prev in zip(grid, [*grid[1:], -1], strict=True):
        x0_hat = _exact_x0_hat(x, t)
        if t_prev == -1:
            x = x0_hat
        else:
            h, d = lam[t_prev] - lam[t], x0_hat
            if x0_last is not None:
                r = (lam[t] - lam[t_last]) / h
                d = (1.0 + 1.0 / (2.0 * r)) * x0_hat - x0_last / (2.0 * r)
            x = sigma[t_prev] / sigma[t] * x - alpha[t_prev] * (np.exp(-h) - 1.0) * d
        x0_last, t_last = x0_hat, t
    got = dpm_solver_pp_sample(model, schedule, x_T, timesteps=np.array(grid[::-1]))
    np.testing.assert_allclose(got, x, rtol=1e-10, atol=1e-12)


def test_stochastic_ddim_on_given_timesteps_is_ddim_on_the_sequence_it_builds():
    """eta > 0 draws one key per visited step: with `timesteps` as many as the steps given,
    the same keys (and so the same samples) as num_steps / spacing building that sequence."""
    model = gaussian_denoiser(SCHEDULE, DATA_MEAN, DATA_STD, "eps")
    x_T = _normal(44, (4, 3))
    for spacing, n in (("leading", 7), ("trailing", 3)):
        given = ddim_sample(
            model, SCHEDULE, x_T, KEY, eta=1.0, timesteps=sampling_timesteps(T, n, spacing)
        )
        built = ddim_sample(model, SCHEDULE, x_T, KEY, eta=1.0, num_steps=n, spacing=spacing)
        np.testing.assert_array_equal(given, built)


def test_ddim_and_dpm_solver_pp_defaults_are_the_documented_50_leading_and_20_steps_or_fewer():
    model = gaussian_denoiser(SCHEDULE, DATA_MEAN, DATA_STD, "eps")
    x_T = _normal(45, (2, 3))
    np.testing.assert_array_equal(
        ddim_sample(model, SCHEDULE, x_T),
        ddim_sample(model, SCHEDULE, x_T, timesteps=sampling_timesteps(T, 50, "leading")),
    )
    np.testing.assert_array_equal(
        dpm_solver_pp_sample(model, SCHEDULE, x_T),
        dpm_solver_pp_sample(model, SCHEDULE, x_T, timesteps=dpm_solver_pp_timesteps(T, 20)),
    )
    # a schedule of fewer steps: every step (DPM-Solver++: T - 1), not an error naming a
    # num_steps=50 the caller never passed
    short = Schedule.from_betas(linear_betas(12))
    model = gaussian_denoiser(short, DATA_MEAN, DATA_STD, "eps")
    np.testing.assert_array_equal(
        ddim_sample(model, short, x_T), ddim_sample(model, short, x_T, timesteps=np.arange(12))
    )
    np.testing.assert_array_equal(
        dpm_solver_pp_sample(model, short, x_T),
        dpm_solver_pp_sample(model, short, x_T, timesteps=dpm_solver_pp_timesteps(12, 11)),
    )


def test_trajectory_stride_numpy_int_and_above_num_steps():
    # A NumPy int stride works like the Python int; a stride above num_steps keeps x_T only
    # (num_steps // k + 1 = 1 slot) while x0 is still returned. NumPy / JAX bools and ints
    # work as Python's.
    model = gaussian_denoiser(SCHEDULE, DATA_MEAN, DATA_STD, "eps")
    x_T = _normal(41, (2, 3))
    x0, full = ddim_sample(model, SCHEDULE, x_T, num_steps=4, return_trajectory=True)
    x0_np, full_np = ddim_sample(
        model, SCHEDULE, x_T, num_steps=jnp.int32(4), return_trajectory=np.bool_(True)
    )
    np.testing.assert_array_equal(full_np, full)
    no_trajectory = ddim_sample(model, SCHEDULE, x_T, num_steps=4, return_trajectory=np.bool_(0))
    np.testing.assert_array_equal(no_trajectory, x0_np)
    x0_2, traj_2 = ddim_sample(model, SCHEDULE, x_T, num_steps=4, return_trajectory=np.int64(2))
    np.testing.assert_allclose(traj_2, full[::2], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(x0_2, x0, rtol=RTOL, atol=ATOL)
    x0_7, traj_7 = ddim_sample(model, SCHEDULE, x_T, num_steps=4, return_trajectory=7)
    assert traj_7.shape == (1, 2, 3)
    np.testing.assert_array_equal(traj_7[0], x_T)
    np.testing.assert_allclose(x0_7, x0, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("sampler_name", ["ddpm", "ddim"])
def test_raw_uint32_key_samples_like_the_typed_key(sampler_name):
    # rng may be a raw jax.random.PRNGKey: the same draws as the typed key wrapping its data.
    model = gaussian_denoiser(SCHEDULE, DATA_MEAN, DATA_STD, "eps")
    x_T, raw = _normal(42, (2, 3)), jax.random.PRNGKey(43)
    typed = jax.random.wrap_key_data(raw)
    np.testing.assert_array_equal(
        _run(sampler_name, model, x_T, raw), _run(sampler_name, model, x_T, typed)
    )


@pytest.mark.parametrize("sampler_name", SAMPLERS)
def test_rank_one_x_T_is_a_batch_of_scalars(sampler_name):
    # x_T [B]: only the batch axis is required. Single-point data: every sampler returns mu.
    model = gaussian_denoiser(SCHEDULE, -0.4, 0.0, "eps")
    x0 = _run(sampler_name, model, _normal(44, (5,)), jax.random.key(45))
    assert x0.shape == (5,)
    np.testing.assert_allclose(x0, -0.4, rtol=RTOL, atol=ATOL)


def test_ddim_traced_eta_is_not_treated_as_zero():
    # eta may be traced (e.g. a jit argument): it must then be used, not read as the static 0
    # of deterministic DDIM. Reference: the same sampler with eta concrete (an invariant of
    # jit), and eta = 0 differs.
    model = gaussian_denoiser(SCHEDULE, DATA_MEAN, DATA_STD, "eps")
    x_T, rng = _normal(47, (2, 3)), jax.random.key(48)

    def sample(eta):
        return ddim_sample(model, SCHEDULE, x_T, rng, num_steps=5, eta=eta, spacing="trailing")

    traced = jax.jit(sample)(1.0)
    np.testing.assert_allclose(traced, sample(1.0), rtol=RTOL, atol=ATOL)
    assert float(jnp.abs(traced - sample(0.0)).max()) > 1e-2


# --------------------------------------------------------------------------------------------
# Bad input.


def _gauss(prediction="eps"):
    return gaussian_denoiser(SCHEDULE, 0.0, 1.0, prediction)


X = jnp.zeros((2, 3))
KEY = jax.random.key(0)

BAD_INPUTS = {
    "spacing": (lambda: ddim_sample(_gauss(), SCHEDULE, X, spacing="cosine"), r"spacing.*'cosine'"),
    "prediction": (
        lambda: ddim_sample(_gauss(), SCHEDULE, X, prediction="noise"),
        r"prediction must be one of 'eps', 'x0', 'v'; got 'noise'",
    ),
    "variance": (
        lambda: ddpm_sample(_gauss(), SCHEDULE, X, KEY, variance="big"),
        r"variance.*'big'",
    ),
    "num_steps_zero": (
        lambda: ddim_sample(_gauss(), SCHEDULE, X, num_steps=0),
        r"num_steps.*got 0",
    ),
    "num_steps_too_many": (
        lambda: ddim_sample(_gauss(), SCHEDULE, X, num_steps=T + 1),
        r"num_steps must be an int in \[1, 1000\]; got 1001",
    ),
    "num_steps_float": (lambda: ddim_sample(_gauss(), SCHEDULE, X, num_steps=20.0), r"num_steps"),
    "dpm_num_steps": (
        lambda: dpm_solver_pp_sample(_gauss(), SCHEDULE, X, num_steps=T),
        r"num_steps must be an int in \[1, 999\]; got 1000",
    ),
    "timesteps_spacing": (lambda: sampling_timesteps(T, 10, "log"), r"spacing.*'log'"),
    "dpm_order": (lambda: dpm_solver_pp_sample(_gauss(), SCHEDULE, X, order=4), r"order.*4"),
    "dpm_one_step_schedule": (  # said "num_steps must be an int in [1, 0]"
        lambda: dpm_solver_pp_timesteps(1, 1),
        r"num_timesteps must be an int >= 2; got 1",
    ),
    "model_rank": (
        lambda: ddim_sample(lambda x, t: _gauss()(x, t)[..., 0], SCHEDULE, X),
        r"model_fn\(x, t\) must return shape \(2, 3\).*got \(2,\)",
    ),
    "model_batch": (
        lambda: ddpm_sample(lambda x, t: _gauss()(x, t)[:1], SCHEDULE, X, KEY),
        r"model_fn\(x, t\) must return shape \(2, 3\).*got \(1, 3\)",
    ),
    "model_learned_range": (
        lambda: dpm_solver_pp_sample(_gauss(), SCHEDULE, X, variance="learned_range"),
        r"model_fn\(x, t\) must return shape \(2, 6\).*learned_range",
    ),
    "x_T_rank": (lambda: ddim_sample(_gauss(), SCHEDULE, jnp.float32(0.0)), r"x_T must be"),
    "x_T_dtype": (lambda: ddim_sample(_gauss(), SCHEDULE, jnp.zeros((2, 3), jnp.int32)), r"x_T"),
    "eta_negative": (lambda: ddim_sample(_gauss(), SCHEDULE, X, KEY, eta=-0.5), r"eta.*-0.5"),
    "eta_without_rng": (lambda: ddim_sample(_gauss(), SCHEDULE, X, eta=1.0), r"rng.*eta"),
    "ddpm_without_rng": (lambda: ddpm_sample(_gauss(), SCHEDULE, X, None), r"rng"),
    "trajectory_stride": (
        lambda: ddim_sample(_gauss(), SCHEDULE, X, return_trajectory=0),
        r"return_trajectory.*got 0",
    ),
    "ddim_timesteps_and_num_steps": (
        lambda: ddim_sample(_gauss(), SCHEDULE, X, timesteps=[9, 5], num_steps=2),
        r"pass timesteps or num_steps / spacing, not both; got timesteps and num_steps=2$",
    ),
    "dpm_timesteps_and_num_steps": (
        lambda: dpm_solver_pp_sample(_gauss(), SCHEDULE, X, timesteps=[9, 5], num_steps=2),
        r"pass timesteps or num_steps, not both; got timesteps and num_steps=2$",
    ),
    "ddim_timesteps_out_of_range": (
        lambda: ddim_sample(_gauss(), SCHEDULE, X, timesteps=[5, T]),
        r"timesteps must be distinct ints in \[0, 999\]; got \[5, 1000\]",
    ),
    "ddim_timesteps_and_spacing": (
        lambda: ddim_sample(_gauss(), SCHEDULE, X, timesteps=[9, 5], spacing="trailing"),
        r"pass timesteps or num_steps / spacing, not both; got timesteps and spacing='trailing'$",
    ),
    "dpm_timesteps_negative": (
        lambda: dpm_solver_pp_sample(_gauss(), SCHEDULE, X, timesteps=[5, -1]),
        r"timesteps must be distinct ints in \[0, 999\]; got \[-1, 5\]",
    ),
    "ddpm_timesteps_negative": (
        lambda: ddpm_sample(_gauss(), SCHEDULE, X, KEY, timesteps=[-1, 5]),
        r"timesteps must be distinct ints in \[0, 999\]; got \[-1, 5\]",
    ),
    "ddim_timesteps_empty": (
        lambda: ddim_sample(_gauss(), SCHEDULE, X, timesteps=np.array([], np.int32)),
        r"timesteps must be a non-empty 1-D int array",
    ),
    "dpm_timesteps_duplicate": (
        lambda: dpm_solver_pp_sample(_gauss(), SCHEDULE, X, timesteps=[5, 9, 5]),
        r"timesteps must be distinct ints in \[0, 999\]; got \[5, 5, 9\]",
    ),
    "ddim_timesteps_float": (
        lambda: ddim_sample(_gauss(), SCHEDULE, X, timesteps=[9.0, 5.0]),
        r"timesteps must be a non-empty 1-D int array",
    ),
    "ddim_traced_timesteps": (
        lambda: jax.jit(lambda ts: ddim_sample(_gauss(), SCHEDULE, X, timesteps=ts))(
            jnp.array([5, 1])
        ),
        r"timesteps must be concrete ints",
    ),
    "respace_duplicates": (
        lambda: ddpm_sample(_gauss(), SCHEDULE, X, KEY, timesteps=[5, 5, 9]),
        r"timesteps",
    ),
    "respace_traced_schedule": (
        lambda: jax.jit(lambda s: ddpm_sample(_gauss(), s, X, KEY, timesteps=[0, 9]))(SCHEDULE),
        r"timesteps needs a concrete schedule",
    ),
    "step_t_batch": (
        lambda: ddim_step(_gauss(), SCHEDULE, X, jnp.array([3, 2, 1]), 0),
        r"t has shape \(3,\) but x has batch size 2",
    ),
    # a truthy non-bool used to clip to [-1, 1] silently (0.5 read as a threshold, "no", [0])
    "clip_threshold": (
        lambda: ddim_sample(_gauss(), SCHEDULE, X, clip_denoised=0.5),
        r"clip_denoised must be True or False; got 0.5",
    ),
    "clip_string": (
        lambda: ddpm_step(_gauss(), SCHEDULE, X, 5, KEY, clip_denoised="no"),
        r"clip_denoised must be True or False; got 'no'",
    ),
    "eta_inf": (lambda: ddim_sample(_gauss(), SCHEDULE, X, KEY, eta=np.inf), r"eta must be a fini"),
    "eta_none": (lambda: ddim_sample(_gauss(), SCHEDULE, X, KEY, eta=None), r"eta must .*None"),
    "eta_str": (lambda: ddim_sample(_gauss(), SCHEDULE, X, KEY, eta="1"), r"eta must .*got '1'"),
    "dpm_order_float": (
        lambda: dpm_solver_pp_sample(_gauss(), SCHEDULE, X, order=2.0),
        r"order must be an int in \[1, 3\]; got 2.0",
    ),
    "ddpm_traced_timesteps": (  # was JAX's TracerArrayConversionError from inside respace
        lambda: jax.jit(lambda ts: ddpm_sample(_gauss(), SCHEDULE, X, KEY, timesteps=ts))(
            jnp.array([1, 5])
        ),
        r"timesteps must be concrete ints",
    ),
    "rng_int": (lambda: ddpm_sample(_gauss(), SCHEDULE, X, 0), r"rng must be a PRNG key.*got 0"),
    # a batch of keys was refused by split / normal deep inside, naming none of the arguments
    "rng_batch_of_keys": (
        lambda: ddpm_sample(_gauss(), SCHEDULE, X, jax.random.split(KEY, 2)),
        r"rng must be a single PRNG key for ddpm_sample; got a batch of keys of shape \(2,\)",
    ),
    "rng_batch_of_raw_keys": (
        lambda: ddim_sample(_gauss(), SCHEDULE, X, jnp.zeros((2, 2), jnp.uint32), eta=1.0),
        r"rng must be a single PRNG key when eta is not 0; got a batch of keys of shape \(2, 2\)",
    ),
    "step_rng_batch_of_keys": (
        lambda: ddpm_step(_gauss(), SCHEDULE, X, 5, jax.random.split(KEY, 2)),
        r"rng must be a single PRNG key for the noise of a DDPM step",
    ),
    "model_none": (lambda: ddim_sample(None, SCHEDULE, X), r"model_fn must be a callable"),
    "schedule_array": (
        lambda: ddim_sample(_gauss(), BETAS, X),
        r"schedule must be a jax_diffusion Schedule .*got ndarray",
    ),
    "step_t_prev_not_below_t": (
        lambda: ddim_step(_gauss(), SCHEDULE, X, 5, 7),
        r"t_prev must lie in \[-1, t - 1\] \(t = 5\); got 7",
    ),
    "step_t_prev_below_minus_one": (
        lambda: ddim_step(_gauss(), SCHEDULE, X, 5, -7),
        r"t_prev must lie in \[-1, t - 1\]",
    ),
    "step_t_past_the_end": (
        lambda: dpm_solver_pp_step(_gauss(), SCHEDULE, X, T + 5, 3),
        r"t must lie in \[0, 999\]; got 1005",
    ),
    "step_t_last_not_above_t": (
        lambda: dpm_solver_pp_step(_gauss(), SCHEDULE, X, 5, 3, X, 5),
        r"t_last must be -1 \(no history\) or > t \(t = 5\); got 5",
    ),
    "eps_at_zero_terminal_snr": (
        lambda: ddim_sample(_gauss(), ZERO_SNR, X, spacing="trailing", num_steps=10),
        r"prediction='eps' cannot sample from step 999, where alphas_cumprod is 0",
    ),
    # ddpm_sample and dpm_solver_pp_sample start at T - 1 as well
    "ddpm_eps_at_zero_terminal_snr": (
        lambda: ddpm_sample(_gauss(), ZERO_SNR, X, KEY),
        r"prediction='eps' cannot sample from step 999, where alphas_cumprod is 0",
    ),
    "dpm_eps_at_zero_terminal_snr": (
        lambda: dpm_solver_pp_sample(_gauss(), ZERO_SNR, X, num_steps=10),
        r"prediction='eps' cannot sample from step 999, where alphas_cumprod is 0",
    ),
    "x_T_int_message": (
        lambda: ddim_sample(_gauss(), SCHEDULE, jnp.zeros((2, 3), jnp.int32)),
        r"x_T must be a floating array \[B, \.\.\.\] with a leading batch axis; got shape "
        r"\(2, 3\) and dtype int32",
    ),
    "step_x_int": (  # the step functions name their argument x, not x_T
        lambda: ddim_step(_gauss(), SCHEDULE, jnp.zeros((2, 3), jnp.int32), 5, 0),
        r"^x must be a floating array \[B, \.\.\.\]",
    ),
    # a bool is not a number here: eta=True is rejected, not read as 1
    "eta_bool": (
        lambda: ddim_sample(_gauss(), SCHEDULE, X, KEY, eta=True),
        r"eta must be a finite scalar >= 0; got True",
    ),
    "eta_nan": (
        lambda: ddim_sample(_gauss(), SCHEDULE, X, KEY, eta=float("nan")),
        r"eta must be a finite scalar >= 0; got nan",
    ),
    "step_eta_without_rng": (
        lambda: ddim_step(_gauss(), SCHEDULE, X, 5, 0, eta=0.5),
        r"rng must be a PRNG key \(jax.random.key\(seed\)\) when eta is not 0; got None",
    ),
    "trajectory_float_stride": (
        lambda: ddim_sample(_gauss(), SCHEDULE, X, return_trajectory=2.0),
        r"return_trajectory must be a bool or a positive int stride k; got 2.0",
    ),
    "dpm_order_bool": (
        lambda: dpm_solver_pp_sample(_gauss(), SCHEDULE, X, order=True),
        r"order must be an int in \[1, 3\]; got True",
    ),
    # the edges of the step ranges: t in [0, T - 1], t_prev in [-1, t - 1]
    "step_t_at_T": (
        lambda: ddim_step(_gauss(), SCHEDULE, X, T, 0),
        r"t must lie in \[0, 999\]; got 1000",
    ),
    "step_t_negative": (
        lambda: ddim_step(_gauss(), SCHEDULE, X, -1, -1),
        r"t must lie in \[0, 999\]; got -1",
    ),
    "step_t_prev_minus_two": (
        lambda: ddim_step(_gauss(), SCHEDULE, X, 5, -2),
        r"t_prev must lie in \[-1, t - 1\] \(t = 5\); got -2",
    ),
    "step_t_prev_equal_t": (
        lambda: dpm_solver_pp_step(_gauss(), SCHEDULE, X, 5, 5),
        r"t_prev must lie in \[-1, t - 1\] \(t = 5\); got 5",
    ),
    "step_t_float": (
        lambda: ddim_step(_gauss(), SCHEDULE, X, 5.0, 0),
        r"t must be an int scalar or int \[B\]; got float32\[\]",
    ),
    "step_t_rank": (
        lambda: ddpm_step(_gauss(), SCHEDULE, X, jnp.full((2, 1), 5), KEY),
        r"t must be an int scalar or int \[B\]; got int32\[2, 1\]",
    ),
}
ZERO_SNR = Schedule.from_betas(rescale_zero_terminal_snr(BETAS), jnp.float32)


def test_zero_terminal_snr_samples_with_v_and_from_below_the_last_step_with_eps():
    v_model = gaussian_denoiser(ZERO_SNR, 0.0, 1.0, "v")
    x0_model = gaussian_denoiser(ZERO_SNR, 0.0, 1.0, "x0")
    for sample in (
        lambda: ddim_sample(v_model, ZERO_SNR, X, prediction="v", spacing="trailing"),
        lambda: dpm_solver_pp_sample(v_model, ZERO_SNR, X, prediction="v"),
        lambda: ddpm_sample(v_model, ZERO_SNR, X, KEY, prediction="v"),
        # x0 prediction needs no division by alpha: it samples from step T - 1 too
        lambda: ddim_sample(x0_model, ZERO_SNR, X, prediction="x0", spacing="trailing"),
        # leading spacing never visits step T - 1, where the eps model has no x0
        lambda: ddim_sample(_gauss(), ZERO_SNR, X, num_steps=10),
    ):
        assert np.isfinite(np.asarray(sample())).all()


def test_eps_samples_from_the_last_step_of_a_float16_schedule_whose_alphas_cumprod_underflows():
    # the cosine schedule's last alpha_bar, 2.4e-9, is 0 in float16, its sqrt 4.9e-5 is not:
    # x0 = (x_t - sigma eps) / alpha is defined, and this is no zero-terminal-SNR schedule
    cosine16 = Schedule.from_betas(cosine_betas(T), jnp.float16)
    assert float(cosine16.alphas_cumprod[-1]) == 0.0 < float(cosine16.sqrt_alphas_cumprod[-1])

    def model(x, t):
        return jnp.zeros_like(x)

    out = ddim_sample(model, cosine16, X.astype(jnp.float16), spacing="trailing", num_steps=5)
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_the_argument(case):
    fn, pattern = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=pattern):
        fn()
