"""Tests of jax_diffusion.consistency against closed forms and a float64 NumPy transcription.

For Gaussian data N(m, s^2) the probability-flow ODE keeps the standardised value
z = (x_t - alpha_t m) / sqrt(alpha_t^2 s^2 + sigma_t^2) of a trajectory fixed, so the exact
consistency function is f*(x_t, t) = (alpha_0 m + sqrt(alpha_0^2 s^2 + sigma_0^2) z) / alpha_0.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_diffusion.consistency import (
    consistency_distillation_loss,
    consistency_function,
    consistency_sample,
    consistency_training_loss,
)
from jax_diffusion.schedules import Schedule, cosine_betas, linear_betas, rescale_zero_terminal_snr
from jax_diffusion.testing import gaussian_denoiser

T = 1000
BETAS = cosine_betas(T)
ABAR = np.cumprod(1.0 - BETAS)
M, S = 0.3, 0.5


def _schedule(dtype=jnp.float32):
    return Schedule.from_betas(BETAS, dtype)


def _normal(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _exact_f(t_is_array=True):
    """f* of N(M, S^2) data, as a jnp function of (x, t int [B])."""
    abar = jnp.asarray(ABAR)

    def f(x, t):
        a, v = abar[t].reshape(-1, *(1,) * (x.ndim - 1)), abar[0]
        z = (x - jnp.sqrt(a) * M) / jnp.sqrt(a * S**2 + 1 - a)
        return ((jnp.sqrt(v) * M + jnp.sqrt(v * S**2 + 1 - v) * z) / jnp.sqrt(v)).astype(x.dtype)

    return f


def test_parameterization_coefficients_and_boundary_match_the_paper(x64):
    schedule = _schedule(jnp.float64)
    t = jnp.array([0, 1, 10, 300, 999])
    s = np.sqrt((1 - ABAR) / ABAR)[np.asarray(t)]
    s0 = np.sqrt((1 - ABAR[0]) / ABAR[0])
    c_skip = 0.25 / ((s - s0) ** 2 + 0.25)
    c_out = 0.5 * (s - s0) / np.sqrt(0.25 + s**2)
    ones = consistency_function(lambda x, t: jnp.ones_like(x), schedule)
    zeros = consistency_function(lambda x, t: jnp.zeros_like(x), schedule)
    alpha = np.sqrt(ABAR[np.asarray(t)])[:, None]
    np.testing.assert_allclose(ones(jnp.zeros((5, 1)), t)[:, 0], c_out, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(zeros(jnp.asarray(alpha), t)[:, 0], c_skip, rtol=1e-12)
    # the boundary: f(x, 0) = x / alpha_0 whatever the network says
    x = _normal(0, (3, 4), jnp.float64)
    wild = consistency_function(lambda x, t: 1e6 * jnp.sin(x), schedule, sigma_data=0.3)
    np.testing.assert_allclose(wild(x, jnp.zeros(3, jnp.int32)), x / np.sqrt(ABAR[0]), rtol=1e-12)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_a_denoiser_as_the_network_gives_x0_hat_at_high_noise(prediction, x64):
    # prediction set: F = the denoiser's x0_hat and c_out = (s - s0) / sqrt((s - s0)^2 + sd^2)
    schedule = _schedule(jnp.float64)
    t = jnp.array([0, 30, 300, 999])
    x = 1.3 * _normal(9, (4, 2), jnp.float64)
    f = consistency_function(
        gaussian_denoiser(schedule, M, S, prediction), schedule, prediction=prediction
    )
    abar, abar0 = ABAR[np.asarray(t)][:, None], ABAR[0]
    s, s0 = np.sqrt((1 - abar) / abar), np.sqrt((1 - abar0) / abar0)
    xn = np.asarray(x)
    x0_hat = M + np.sqrt(abar) * S**2 / (abar * S**2 + 1 - abar) * (xn - np.sqrt(abar) * M)
    c_skip = 0.25 / ((s - s0) ** 2 + 0.25)
    c_out = (s - s0) / np.sqrt((s - s0) ** 2 + 0.25)
    want = c_skip * xn / np.sqrt(abar) + c_out * x0_hat
    np.testing.assert_allclose(f(x, t), want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(f(x, t)[0], xn[0] / np.sqrt(abar0), rtol=1e-12)  # the boundary
    np.testing.assert_allclose(f(x, t)[-1], x0_hat[-1], rtol=1e-3)  # c_out ~ 1 at t = 999


def _np_loss(x0, n, noise, grid, teacher, student, target):
    """Algorithm 2 in float64 NumPy: DDIM teacher step t_{n+1} -> t_n, squared error."""
    t_next, t = grid[n + 1], grid[n]
    a_n, a = ABAR[t_next][:, None], ABAR[t][:, None]
    x_next = np.sqrt(a_n) * x0 + np.sqrt(1 - a_n) * noise
    eps = teacher(x_next, t_next)
    x0_hat = (x_next - np.sqrt(1 - a_n) * eps) / np.sqrt(a_n)
    x_hat = np.sqrt(a) * x0_hat + np.sqrt(1 - a) * eps
    return np.mean((student(x_next, t_next) - target(x_hat, t)) ** 2, axis=1)


def test_distillation_loss_matches_a_float64_transcription_of_algorithm_2(x64):
    schedule = _schedule(jnp.float64)
    grid = np.array([0, 5, 40, 200, 600, 999])
    x0 = M + S * _normal(1, (6, 3), jnp.float64)
    n = jnp.array([0, 1, 2, 3, 4, 2])
    noise = _normal(2, (6, 3), jnp.float64)

    def net(scale):
        return lambda x, t: jnp.tanh(scale * x) + t[:, None] / 1000.0

    student = consistency_function(net(1.0), schedule)
    target = consistency_function(net(0.7), schedule)
    teacher = gaussian_denoiser(schedule, M, S, "eps")
    loss, metrics = consistency_distillation_loss(
        student, target, teacher, schedule, x0, None, timesteps=grid[::-1], draws=(n, noise)
    )
    ref = _np_loss(
        np.asarray(x0),
        np.asarray(n),
        np.asarray(noise),
        grid,
        lambda x, t: np.asarray(teacher(jnp.asarray(x), jnp.asarray(t))),
        lambda x, t: np.asarray(student(jnp.asarray(x), jnp.asarray(t))),
        lambda x, t: np.asarray(target(jnp.asarray(x), jnp.asarray(t))),
    )
    np.testing.assert_allclose(metrics["per_example_loss"], ref, rtol=1e-10)
    np.testing.assert_allclose(loss, ref.mean(), rtol=1e-10)
    np.testing.assert_array_equal(metrics["t"], grid[np.asarray(n) + 1])
    # pseudo-Huber on the same pairs: sqrt(D * mse + c^2) - c
    huber, _ = consistency_distillation_loss(
        student,
        target,
        teacher,
        schedule,
        x0,
        None,
        timesteps=grid,
        draws=(n, noise),
        distance="pseudo_huber",
        huber_c=0.01,
    )
    np.testing.assert_allclose(huber, np.mean(np.sqrt(3 * ref + 1e-4) - 0.01), rtol=1e-10)


def test_the_exact_consistency_function_has_a_vanishing_loss_as_the_grid_refines(x64):
    # f* is consistent along the exact ODE; the DDIM teacher's local error is O(h^2), so the
    # squared loss falls ~16x per halving of the step
    schedule = _schedule(jnp.float64)
    x0 = M + S * _normal(3, (2048, 2), jnp.float64)
    f = _exact_f()
    teacher = gaussian_denoiser(schedule, M, S, "v")
    losses = []
    for num in (11, 21, 41):
        grid = np.linspace(0, 800, num).round().astype(int)
        loss, _ = consistency_distillation_loss(
            f, f, teacher, schedule, x0, jax.random.key(4), timesteps=grid, teacher_prediction="v"
        )
        losses.append(float(loss))
    ratios = np.array(losses[:-1]) / np.array(losses[1:])
    assert np.all(ratios > 8), (losses, ratios)
    # a perturbed f is far from consistent at every grid
    off = lambda x, t: f(x, t) * (1 + 0.1 * (t[:, None] > 0))  # noqa: E731
    loss_off, _ = consistency_distillation_loss(
        off, off, teacher, schedule, x0, jax.random.key(4), timesteps=grid, teacher_prediction="v"
    )
    assert float(loss_off) > 100 * losses[-1]


def test_sampling_with_the_exact_consistency_function(x64):
    schedule = _schedule(jnp.float64)
    x_T = _normal(5, (20_000, 1), jnp.float64)
    f = _exact_f()
    one = consistency_sample(f, schedule, x_T, timesteps=[999])
    np.testing.assert_allclose(one, f(x_T, jnp.full(20_000, 999)), rtol=1e-12)
    # the multistep chain keeps the data marginal: f* of the re-noised estimate is again
    # N(M, std0^2), std0^2 = (alpha_0^2 S^2 + sigma_0^2) / alpha_0^2
    out, traj = consistency_sample(
        f, schedule, x_T, jax.random.key(6), timesteps=[999, 500, 100], return_trajectory=True
    )
    assert traj.shape == (4, 20_000, 1)
    np.testing.assert_array_equal(traj[0], x_T)
    np.testing.assert_array_equal(traj[1], one)
    np.testing.assert_array_equal(traj[-1], out)
    std0 = np.sqrt((ABAR[0] * S**2 + 1 - ABAR[0]) / ABAR[0])
    x = np.asarray(out)[:, 0]
    assert abs(x.mean() - M) < 4 * std0 / np.sqrt(len(x))
    assert abs(x.std() - std0) < 4 * std0 / np.sqrt(2 * len(x))
    jitted = jax.jit(functools.partial(consistency_sample, f, schedule, timesteps=[999, 500, 100]))
    np.testing.assert_allclose(jitted(x_T[:8], jax.random.key(6)), out[:8], rtol=1e-12)


def test_distillation_loss_trains_a_network_under_jit_and_grad():
    schedule = _schedule()
    x0 = M + S * _normal(7, (16, 2))
    teacher = gaussian_denoiser(schedule, M, S, "eps")
    grid = np.linspace(0, 999, 8).round().astype(int)

    def loss_of(w_student, w_target, rng):
        student = consistency_function(lambda x, t: w_student * x, schedule)
        target = consistency_function(lambda x, t: w_target * x, schedule)
        return consistency_distillation_loss(
            student, target, teacher, schedule, x0, rng, timesteps=grid
        )[0]

    key = jax.random.key(8)
    g_student, g_target = jax.jit(jax.grad(loss_of, argnums=(0, 1)))(0.3, 0.3, key)
    h = 1e-2  # the loss is quadratic in w_student: central differences are exact up to rounding
    fd = (loss_of(0.3 + h, 0.3, key) - loss_of(0.3 - h, 0.3, key)) / (2 * h)
    np.testing.assert_allclose(g_student, fd, rtol=1e-3)
    assert g_target == 0  # the target network gets no gradient (stop_gradient, theta^-)


def test_training_loss_matches_a_float64_transcription_of_algorithm_3(x64):
    schedule = _schedule(jnp.float64)
    grid = np.array([0, 5, 40, 200, 600, 999])
    x0 = M + S * _normal(1, (6, 3), jnp.float64)
    n = np.array([0, 1, 2, 3, 4, 2])
    noise = _normal(2, (6, 3), jnp.float64)
    student = consistency_function(lambda x, t: jnp.tanh(x) + t[:, None] / 1000.0, schedule)
    target = consistency_function(lambda x, t: jnp.tanh(0.7 * x), schedule)
    loss, metrics = consistency_training_loss(
        student, target, schedule, x0, None, timesteps=grid[::-1], draws=(jnp.asarray(n), noise)
    )
    # Algorithm 3 in VP form: x_{n+1} and x_n share x0 and z
    x0n, z = np.asarray(x0), np.asarray(noise)
    a = np.sqrt(ABAR)[:, None]
    s = np.sqrt(1.0 - ABAR)[:, None]
    t_next, t = grid[n + 1], grid[n]
    x_next = a[t_next] * x0n + s[t_next] * z
    x_n = a[t] * x0n + s[t] * z
    out = np.asarray(student(jnp.asarray(x_next), jnp.asarray(t_next)))
    tgt = np.asarray(target(jnp.asarray(x_n), jnp.asarray(t)))
    ref = np.mean((out - tgt) ** 2, axis=1)
    np.testing.assert_allclose(metrics["per_example_loss"], ref, rtol=1e-10)
    np.testing.assert_allclose(loss, ref.mean(), rtol=1e-10)
    np.testing.assert_array_equal(metrics["t"], t_next)


def test_training_loss_is_distillation_with_an_exact_teacher_plus_its_variance(x64):
    # Gaussian data, f* linear: E[f*(x_n) | x_{n+1}] = f*(E[x_n | x_{n+1}]) and E[x_n | x_{n+1}]
    # is the DDIM step of the exact denoiser. So (Song et al. 2023, Theorem 2, here exact) the
    # training loss's gradient is the distillation loss's in expectation, and the losses differ
    # by E[k_n^2 Var(x_n | x_{n+1})], k_n the slope of f* at t_n.
    schedule = _schedule(jnp.float64)
    grid = np.linspace(0, 900, 10).round().astype(int)
    batch = 200_000
    x0 = M + S * _normal(3, (batch, 1), jnp.float64)
    n = jax.random.randint(jax.random.key(4), (batch,), 0, grid.size - 1)
    noise = _normal(5, (batch, 1), jnp.float64)
    f = _exact_f()
    teacher = gaussian_denoiser(schedule, M, S, "x0")

    def losses(theta):
        student = lambda x, t: f(x, t) + theta * x  # noqa: E731
        kw = dict(timesteps=grid, draws=(n, noise))
        ct, m_ct = consistency_training_loss(student, f, schedule, x0, None, **kw)
        cd, m_cd = consistency_distillation_loss(
            student, f, teacher, schedule, x0, None, teacher_prediction="x0", **kw
        )
        return ct, cd, m_ct["per_example_loss"], m_cd["per_example_loss"]

    ct, cd, per_ct, per_cd = losses(0.0)
    abar_n, abar_next = ABAR[grid[np.asarray(n)]], ABAR[grid[np.asarray(n) + 1]]
    a_n, a_next = np.sqrt(abar_n), np.sqrt(abar_next)
    s_n, s_next = np.sqrt(1 - abar_n), np.sqrt(1 - abar_next)
    cov = a_n * a_next * S**2 + s_n * s_next
    cond_var = a_n**2 * S**2 + s_n**2 - cov**2 / (a_next**2 * S**2 + s_next**2)
    v0 = ABAR[0]
    slope = np.sqrt(v0 * S**2 + 1 - v0) / np.sqrt(v0) / np.sqrt(abar_n * S**2 + 1 - abar_n)
    predicted = slope**2 * cond_var
    gap = np.asarray(per_ct) - np.asarray(per_cd)
    se = gap.std() / np.sqrt(batch)
    assert float(cd) < 0.05 * float(ct)  # f* is nearly consistent along the DDIM steps
    assert abs(gap.mean() - predicted.mean()) < 4 * se, (gap.mean(), predicted.mean(), se)
    # the gradients with respect to theta agree in expectation
    g_ct = jax.grad(lambda th: losses(th)[0])(0.0)
    g_cd = jax.grad(lambda th: losses(th)[1])(0.0)
    x_next = np.asarray(jnp.sqrt(jnp.asarray(abar_next))[:, None] * x0 + s_next[:, None] * noise)
    # per-example d/dtheta difference: 2 x_{n+1} (T_cd - T_ct); its spread bounds the MC error
    spread = 2 * np.abs(x_next[:, 0]) * np.sqrt(predicted)
    se_g = spread.std() / np.sqrt(batch) + np.sqrt(np.mean(spread**2) / batch)
    assert abs(float(g_cd)) > 10 * se_g
    assert abs(float(g_ct) - float(g_cd)) < 4 * se_g, (g_ct, g_cd, se_g)


def test_training_loss_of_the_exact_function_falls_with_the_step(x64):
    # unlike distillation (~16x per halving), the one-sample target adds a variance O(h^2): ~4x
    schedule = _schedule(jnp.float64)
    x0 = M + S * _normal(3, (4096, 2), jnp.float64)
    f = _exact_f()
    losses = []
    for num in (11, 21, 41):
        grid = np.linspace(0, 800, num).round().astype(int)
        loss, _ = consistency_training_loss(f, f, schedule, x0, jax.random.key(4), timesteps=grid)
        losses.append(float(loss))
    ratios = np.array(losses[:-1]) / np.array(losses[1:])
    assert np.all((ratios > 3) & (ratios < 5.5)), (losses, ratios)


_F = consistency_function(lambda x, t: x, Schedule.from_betas(linear_betas(10)))
_S = Schedule.from_betas(linear_betas(10))
_X = jnp.zeros((2, 3))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: consistency_function(None, _S), "net_fn must be a callable"),
        (lambda: consistency_function(lambda x, t: x, _S, sigma_data=0.0), "sigma_data must be"),
        (lambda: consistency_function(lambda x, t: x, _S, prediction="score"), "prediction"),
        (
            lambda: consistency_function(
                lambda x, t: x, Schedule.from_betas(rescale_zero_terminal_snr(linear_betas(10)))
            ),
            "alphas_cumprod > 0 at every step",
        ),
        (lambda: _F(_X, jnp.array([0, 10])), r"t must lie in \[0, 9\]"),
        (
            lambda: consistency_distillation_loss(
                _F, _F, _F, _S, _X, None, timesteps=[0, 5], distance="l1"
            ),
            "distance must be one of 'l2', 'pseudo_huber'; got 'l1'",
        ),
        (
            lambda: consistency_distillation_loss(_F, _F, _F, _S, _X, None, timesteps=[3]),
            "at least 2 steps",
        ),
        (
            lambda: consistency_distillation_loss(_F, _F, _F, _S, _X, None, timesteps=[0, 10]),
            r"timesteps must be distinct ints in \[0, 9\]",
        ),
        (lambda: consistency_distillation_loss(_F, _F, _F, _S, _X, None, timesteps=[0, 5]), "rng"),
        (
            lambda: consistency_distillation_loss(
                _F, _F, _F, _S, _X, None, timesteps=[0, 5], draws=(jnp.array([0, 1]), _X)
            ),
            r"n must lie in \[0, 0\]; got \[0, 1\]",
        ),
        (
            lambda: consistency_distillation_loss(
                _F, _F, _F, _S, _X, None, timesteps=[0, 5], huber_c=-1.0, distance="pseudo_huber"
            ),
            "huber_c must be a finite number > 0",
        ),
        (
            lambda: consistency_distillation_loss(_F, None, _F, _S, _X, None, timesteps=[0, 5]),
            "target_fn",
        ),
        (
            lambda: consistency_training_loss(_F, None, _S, _X, None, timesteps=[0, 5]),
            "target_fn must be a callable",
        ),
        (
            lambda: consistency_training_loss(_F, _F, _S, _X, None, timesteps=[0, 5]),
            "rng",
        ),
        (
            lambda: consistency_training_loss(
                _F, _F, _S, _X, None, timesteps=[0, 5], distance="l1"
            ),
            "distance must be one of",
        ),
        (lambda: consistency_sample(_F, _S, _X, None, timesteps=[9, 3]), "rng"),
        (lambda: consistency_sample(_F, _S, _X, timesteps=[]), "timesteps must be a non-empty"),
        (
            lambda: consistency_sample(_F, _S, _X, timesteps=[9], return_trajectory=-1),
            "return_traj",
        ),
    ],
)
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
