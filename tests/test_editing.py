"""Tests of jax_diffusion.editing (RePaint, SDEdit) against float64 NumPy and closed forms.

References: RePaint's walk written out by hand from the paper's description (Lugmayr et al.
2022, section 4.2), Algorithm 1 transcribed in float64 NumPy from Ho et al. 2020 eqs. 4, 6, 7
(conftest.np_schedule), the exact conditional of correlated Gaussian data (which inpainting
should sample), and the probability-flow ODE's closed-form map for N(m, s^2) data (SDEdit).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import OPTIMIZED, np_schedule

from jax_diffusion import (
    ddpm_sample,
    repaint_sample,
    repaint_timesteps,
    sampling_timesteps,
    sdedit,
    sdedit_timesteps,
)
from jax_diffusion.schedules import Schedule, linear_betas
from jax_diffusion.testing import gaussian_denoiser

DATA_MEAN, DATA_STD = 0.3, 0.5


# --------------------------------------------------------------------------------------------
# repaint_timesteps


def test_repaint_walk_small_case_written_out():
    # 6 steps, jumps of 2 at states 0 and 2 (range(0, 6 - 2, 2)), each stretch walked 3 times
    want = [5, 4, 3, 2, 3, 4, 3, 2, 3, 4, 3, 2, 1, 0, 1, 2, 1, 0, 1, 2, 1, 0, -1]
    np.testing.assert_array_equal(repaint_timesteps(6, 2, 3), want)


@pytest.mark.parametrize(
    "num_steps, jump_length, jump_n_sample",
    [(250, 10, 10), (100, 10, 2), (37, 5, 4), (20, 1, 3), (10, 10, 10), (10, 20, 5), (1, 1, 3)],
)
def test_repaint_walk_shape(num_steps, jump_length, jump_n_sample):
    walk = repaint_timesteps(num_steps, jump_length, jump_n_sample)
    assert walk.dtype == np.int32
    assert walk[0] == num_steps - 1 and walk[-1] == -1
    assert set(np.abs(np.diff(walk)).tolist()) <= {1}
    assert walk.min() == -1 and walk[:-1].min() >= 0 and walk.max() == num_steps - 1
    points = len(range(0, num_steps - jump_length, jump_length))
    moves_up = jump_length * (jump_n_sample - 1) * points
    assert int(np.sum(np.diff(walk) == 1)) == moves_up
    assert len(walk) == num_steps + 1 + 2 * moves_up


def test_repaint_walk_without_resampling_is_the_plain_chain():
    for walk in (repaint_timesteps(50, 10, 1), repaint_timesteps(8, 8, 10)):
        np.testing.assert_array_equal(walk, np.arange(walk[0], -2, -1))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_steps=0), "num_steps"),
        (dict(num_steps=10, jump_length=0), "jump_length"),
        (dict(num_steps=10, jump_n_sample=0), "jump_n_sample"),
        (dict(num_steps=10, jump_length=2.0), "jump_length"),
    ],
)
def test_repaint_walk_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        repaint_timesteps(**kwargs)


# --------------------------------------------------------------------------------------------
# repaint_sample: transcription, special cases


def _np_repaint(betas, walk, x0_known, mask, x_T, keys, eps_fn):
    """RePaint Algorithm 1 along `walk` in float64, the noise drawn from the documented keys."""
    ref = np_schedule(betas)
    abar = ref["alphas_cumprod"]
    x = np.asarray(x_T, np.float64)
    for s, s_next, key in zip(walk[:-1], walk[1:], keys, strict=True):
        if s_next < s:  # down: Ho et al. 2020 eq. 7 posterior mean from eq. 4's x0_hat
            eps = eps_fn(x, s)
            x0_hat = (x - np.sqrt(1.0 - abar[s]) * eps) / np.sqrt(abar[s])
            mean = ref["posterior_mean_coef1"][s] * x0_hat + ref["posterior_mean_coef2"][s] * x
            z2 = np.asarray(jax.random.normal(key, x.shape), np.float64)
            x_unknown = mean + (np.sqrt(ref["posterior_variance"][s]) * z2 if s > 0 else 0.0)
            z1 = np.asarray(jax.random.normal(jax.random.fold_in(key, 1), x.shape), np.float64)
            x_known = (
                x0_known
                if s == 0
                else np.sqrt(abar[s - 1]) * x0_known + np.sqrt(1 - abar[s - 1]) * z1
            )
            x = mask * x_known + (1.0 - mask) * x_unknown
        else:  # up: Ho et al. 2020 eq. 2
            z = np.asarray(jax.random.normal(key, x.shape), np.float64)
            x = np.sqrt(1.0 - betas[s_next]) * x + np.sqrt(betas[s_next]) * z
    return x


def _nonlinear_eps(abar):
    """A smooth nonlinear eps model, the same in NumPy (float64) and JAX."""

    def np_fn(x, t):
        return np.tanh(0.7 * x + 0.1 * t) * np.sqrt(1.0 - abar[t]) + 0.2 * x

    def jax_fn(x, t):
        tt = t.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
        return (
            jnp.tanh(0.7 * x + 0.1 * tt)
            * jnp.sqrt(1.0 - jnp.asarray(abar, x.dtype)[t]).reshape(tt.shape)
            + 0.2 * x
        )

    return np_fn, jax_fn


def test_repaint_matches_float64_transcription():
    betas = np.linspace(0.05, 0.4, 6)
    schedule = Schedule.from_betas(betas, jnp.float32)
    np_eps, jax_eps = _nonlinear_eps(np.cumprod(1.0 - betas))
    x_T = jax.random.normal(jax.random.key(0), (3, 4, 2))
    x0_known = jax.random.uniform(jax.random.key(1), (3, 4, 2), minval=-1, maxval=1)
    mask = np.array([[1.0], [0.0], [1.0], [0.25]])  # [H, C=1], broadcast; one fractional pixel
    rng = jax.random.key(2)
    got = repaint_sample(
        jax_eps, schedule, x0_known, mask, x_T, rng, jump_length=2, jump_n_sample=3
    )
    walk = repaint_timesteps(6, 2, 3)
    keys = jax.random.split(rng, len(walk) - 1)
    want = _np_repaint(betas, walk, np.asarray(x0_known), mask, np.asarray(x_T), keys, np_eps)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_repaint_with_nothing_known_is_ddpm_sample_bit_for_bit():
    schedule = Schedule.from_betas(linear_betas(40), jnp.float32)
    model = gaussian_denoiser(schedule, DATA_MEAN, DATA_STD, "v")
    x_T = jax.random.normal(jax.random.key(0), (5, 3))
    rng = jax.random.key(1)
    kw = dict(prediction="v")
    junk = jnp.full((5, 3), 9.0)  # never read where mask = 0
    got = repaint_sample(model, schedule, junk, 0.0 * x_T, x_T, rng, jump_n_sample=1, **kw)
    np.testing.assert_array_equal(got, ddpm_sample(model, schedule, x_T, rng, **kw))
    ts = sampling_timesteps(40, 7)
    got = repaint_sample(
        model, schedule, junk, 0.0 * x_T, x_T, rng, jump_n_sample=1, timesteps=ts, **kw
    )
    np.testing.assert_array_equal(got, ddpm_sample(model, schedule, x_T, rng, timesteps=ts, **kw))


def test_repaint_keeps_known_pixels_exactly_and_fills_the_rest():
    schedule = Schedule.from_betas(linear_betas(30), jnp.float32)
    model = gaussian_denoiser(schedule, DATA_MEAN, DATA_STD)
    x_T = jax.random.normal(jax.random.key(0), (4, 6))
    x0_known = jax.random.uniform(jax.random.key(1), (6,), minval=-1, maxval=1)  # one image
    mask = np.array([1, 1, 0, 0, 1, 0], bool)
    out = repaint_sample(model, schedule, x0_known, mask, x_T, jax.random.key(2), jump_length=5)
    np.testing.assert_array_equal(np.asarray(out)[:, mask], np.broadcast_to(x0_known[mask], (4, 3)))
    unknown = np.asarray(out)[:, ~mask]
    assert np.all(np.isfinite(unknown)) and np.ptp(unknown, axis=0).min() > 0  # drawn per chain


def test_repaint_under_jit_vmap_and_trajectory():
    schedule = Schedule.from_betas(linear_betas(12), jnp.float32)
    model = gaussian_denoiser(schedule, DATA_MEAN, DATA_STD, "x0")
    x0_known, mask = jnp.ones((2, 3)), jnp.array([1.0, 0.0, 0.0])

    def run(key, **kw):
        x_T = jax.random.normal(key, (2, 3))
        return repaint_sample(
            model,
            schedule,
            x0_known,
            mask,
            x_T,
            jax.random.fold_in(key, 1),
            prediction="x0",
            jump_length=3,
            jump_n_sample=2,
            **kw,
        )

    keys = jax.random.split(jax.random.key(0), 3)
    batched = jax.jit(jax.vmap(run))(keys)
    for i in range(3):
        np.testing.assert_allclose(batched[i], run(keys[i]), rtol=1e-6, atol=1e-6)
    x0, traj = run(keys[0], return_trajectory=True)
    walk = repaint_timesteps(12, 3, 2)
    assert traj.shape == (len(walk), 2, 3)
    np.testing.assert_array_equal(traj[-1], x0)
    np.testing.assert_array_equal(traj[0], jax.random.normal(keys[0], (2, 3)))


# --------------------------------------------------------------------------------------------
# repaint_sample: the conditional of correlated Gaussian data


def _correlated_gaussian_eps(schedule, mean, cov):
    """E[eps | x_t] for data N(mean, cov) in float64: x0_hat = m + a cov (a^2 cov + s^2 I)^-1
    (x_t - a m), written in cov's eigenbasis."""
    lam, u = np.linalg.eigh(cov)
    lam, u, mean = jnp.asarray(lam), jnp.asarray(u), jnp.asarray(mean)

    def model_fn(x, t):
        a = schedule.sqrt_alphas_cumprod[t][:, None]
        s = schedule.sqrt_one_minus_alphas_cumprod[t][:, None]
        r = (x - a * mean) @ u
        x0_hat = mean + (r * (a * lam / (a**2 * lam + s**2))) @ u.T
        return (x - a * x0_hat) / s

    return model_fn


def test_repaint_resampling_approaches_the_exact_conditional(x64):
    # Two pixels with correlation 0.95; the first known. Replacement alone (jump_n_sample=1)
    # does not let the second one follow the first (Lugmayr et al. 2022, section 4.2); the
    # exact answer is the Gaussian conditional N(m1 + rho (x1 - m0), s^2 (1 - rho^2)).
    schedule = Schedule.from_betas(linear_betas(100), jnp.float64)
    mean, s, rho = np.array([0.3, -0.2]), 0.5, 0.95
    model = _correlated_gaussian_eps(schedule, mean, s**2 * np.array([[1.0, rho], [rho, 1.0]]))
    known, mask = jnp.array([0.8, 0.0]), jnp.array([1.0, 0.0])
    want_mean, want_std = mean[1] + rho * (0.8 - mean[0]), s * np.sqrt(1 - rho**2)
    x_T = jax.random.normal(jax.random.key(0), (8000, 2), jnp.float64)
    errors = []
    for jump_n_sample in (1, 2, 10):
        out = jax.jit(
            lambda x, r, n=jump_n_sample: repaint_sample(
                model, schedule, known, mask, x, r, jump_length=10, jump_n_sample=n
            ),
            compiler_options=OPTIMIZED,  # a long run: XLA's own optimisation
        )(x_T, jax.random.key(1))
        filled = np.asarray(out[:, 1])
        errors.append((abs(filled.mean() - want_mean), abs(filled.std() - want_std)))
    (mean_err_1, std_err_1), (mean_err_2, _), (mean_err_10, std_err_10) = errors
    # measured with 20000 chains: 0.111 / 0.052 / 0.010 off in the mean; std 0.216 / 0.157
    # at 1 / 10 passes against 0.156; the standard error of the mean here is 0.0018
    assert mean_err_1 > 0.08 and std_err_1 > 0.04
    assert mean_err_10 < 0.5 * mean_err_2 < 0.5 * mean_err_1
    assert mean_err_10 < 0.02 and std_err_10 < 0.01


# --------------------------------------------------------------------------------------------
# sdedit


def test_sdedit_timesteps_follow_diffusers_strength():
    schedule = Schedule.from_betas(linear_betas(1000), jnp.float32)
    np.testing.assert_array_equal(
        sdedit_timesteps(schedule, 0.5, 10), [400, 300, 200, 100, 0]
    )  # 'leading' 10 steps are 900, 800, ..., 0; int(0.5 * 10) = 5 kept
    np.testing.assert_array_equal(
        sdedit_timesteps(schedule, 0.75, 10), [600, 500, 400, 300, 200, 100, 0]
    )
    np.testing.assert_array_equal(sdedit_timesteps(schedule, 1.0, 4), [750, 500, 250, 0])
    np.testing.assert_array_equal(
        sdedit_timesteps(schedule, 0.5, timesteps=[999, 10, 500, 0]), [10, 0]
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(strength=0.0), "strength"),
        (dict(strength=1.5), "strength"),
        (dict(strength=True), "strength"),
        (dict(strength=0.05, num_steps=10), "keeps no step"),
        (dict(num_steps=0), "num_steps"),
    ],
)
def test_sdedit_rejects(kwargs, match):
    schedule = Schedule.from_betas(linear_betas(100), jnp.float32)
    model = gaussian_denoiser(schedule, DATA_MEAN, DATA_STD)
    with pytest.raises(ValueError, match=match):
        sdedit(model, schedule, jnp.zeros((2, 3)), jax.random.key(0), **kwargs)


def test_sdedit_converges_to_the_ode_map_of_gaussian_data(x64):
    # The probability-flow ODE of N(m, s^2) data maps x_t0 to m + s (x_t0 - alpha m) /
    # sqrt(alpha^2 s^2 + sigma^2) (x_t0 is N(alpha m, alpha^2 s^2 + sigma^2) and the flow is
    # linear); with x_t0 = alpha g + sigma z that is the closed form below. DDIM is its
    # first-order solver: the error falls ~4x with 4x the steps.
    schedule = Schedule.from_betas(linear_betas(1000), jnp.float64)
    model = gaussian_denoiser(schedule, DATA_MEAN, DATA_STD)
    guide = 2.0 * jax.random.normal(jax.random.key(1), (256, 4), jnp.float64)
    rng = jax.random.key(3)
    z = jax.random.normal(jax.random.split(rng)[0], guide.shape, jnp.float64)
    for strength in (0.3, 1.0):
        errs = []
        for num_steps in (50, 200, 1000):
            t0 = sdedit_timesteps(schedule, strength, num_steps)[0]
            a, s = np.sqrt(np.cumprod(1.0 - linear_betas(1000))[t0]), None
            s = np.sqrt(1.0 - a**2)
            want = DATA_MEAN + DATA_STD * (a * (guide - DATA_MEAN) + s * z) / np.sqrt(
                a**2 * DATA_STD**2 + s**2
            )
            out = sdedit(model, schedule, guide, rng, strength=strength, num_steps=num_steps)
            errs.append(float(jnp.max(jnp.abs(out - want))))
        # measured: 0.168 / 0.041 / 0.0087 at strength 0.3, 0.107 / 0.028 / 0.0059 at 1.0
        assert errs[0] > 3 * errs[1] > 9 * errs[2] and errs[2] < 0.012


def test_sdedit_single_point_data_and_ancestral_variant():
    schedule = Schedule.from_betas(linear_betas(200), jnp.float32)
    guide = jax.random.normal(jax.random.key(0), (3, 2, 2))
    point = gaussian_denoiser(schedule, DATA_MEAN, 0.0, "x0")
    for eta in (0.0, 1.0):
        out = sdedit(
            point,
            schedule,
            guide,
            jax.random.key(1),
            strength=0.6,
            eta=eta,
            num_steps=20,
            prediction="x0",
        )
        np.testing.assert_allclose(out, DATA_MEAN, atol=1e-6)
    # eta = 1 draws fresh noise from the second key: another result than eta = 0
    model = gaussian_denoiser(schedule, DATA_MEAN, DATA_STD)
    ode = sdedit(model, schedule, guide, jax.random.key(1), num_steps=20)
    sde = sdedit(model, schedule, guide, jax.random.key(1), num_steps=20, eta=1.0)
    assert not np.allclose(ode, sde, atol=1e-3)
    # the trajectory starts at q(x_t0 | guide) with t0 = 90 (the last 10 of 190, 180, ..., 0)
    _, traj = sdedit(
        model, schedule, guide, jax.random.key(1), num_steps=20, return_trajectory=True
    )
    assert traj.shape == (11, 3, 2, 2)
    abar = np.cumprod(1.0 - linear_betas(200))[90]
    z = jax.random.normal(jax.random.split(jax.random.key(1))[0], guide.shape)
    want = np.sqrt(abar) * np.asarray(guide, np.float64) + np.sqrt(1 - abar) * np.asarray(z)
    np.testing.assert_allclose(traj[0], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(traj[-1], ode)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(mask=np.array([0.0, 1.5, 0.0])), "mask must lie in"),
        (dict(mask=np.ones((2, 2))), "mask must broadcast"),
        (dict(x0_known=np.ones((3, 3))), "x0_known must broadcast"),
        (dict(x0_known=np.ones(3, bool)), "x0_known must be a float"),
        (dict(mask=np.array([0, 2, 0])), "mask must lie in"),
        (dict(mask=np.array(["a", "b", "c"])), "mask must be a float, int or bool"),
        (dict(rng=None), "rng"),
        (dict(jump_length=0), "jump_length"),
        (dict(prediction="score"), "prediction"),
        (dict(timesteps=[3, 3]), "timesteps"),
    ],
)
def test_repaint_rejects(change, match):
    schedule = Schedule.from_betas(linear_betas(10), jnp.float32)
    args = dict(
        x0_known=np.zeros(3, np.float32),
        mask=np.array([1.0, 0.0, 0.0]),
        x_T=np.zeros((2, 3), np.float32),
        rng=jax.random.key(0),
    )
    args.update(change)
    kw = {k: args.pop(k) for k in list(args) if k not in ("x0_known", "mask", "x_T", "rng")}
    model = gaussian_denoiser(schedule, DATA_MEAN, DATA_STD)
    with pytest.raises(ValueError, match=match):
        repaint_sample(
            model, schedule, args["x0_known"], args["mask"], args["x_T"], args["rng"], **kw
        )
