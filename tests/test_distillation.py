"""Tests of jax_diffusion.distillation against Salimans & Ho 2022, Algorithm 2, in float64 NumPy.

References: the teacher is the exact denoiser of Gaussian data N(m, s^2), whose x0_hat has the
closed form m + alpha s^2 / (alpha^2 s^2 + sigma^2) (z - alpha m); the two DDIM steps and the
target are transcribed from the paper's algorithm with NumPy tables (conftest.np_schedule).
Invariant: one DDIM step of a student that predicts x_tilde lands where two teacher steps land.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import np_schedule

import jax_diffusion as jd
from jax_diffusion.distillation import distillation_loss, distillation_target, student_timesteps
from jax_diffusion.testing import gaussian_denoiser

T = 200
BETAS = jd.cosine_betas(T)
ABAR = np_schedule(BETAS)["alphas_cumprod"]
M, S = 0.25, 0.6  # the Gaussian data of the exact teacher


def _alpha_sigma(t):
    """Paper's alpha_t, sigma_t; t = -1 is the clean end (1, 0)."""
    t = np.asarray(t)
    abar = np.where(t >= 0, ABAR[np.maximum(t, 0)], 1.0)
    return np.sqrt(abar), np.sqrt(1.0 - abar)


def _col(a, x):
    return np.asarray(a, np.float64).reshape((-1,) + (1,) * (x.ndim - 1))


def _np_x0_hat(z, t, m=M, s=S):
    alpha, sigma = (_col(a, z) for a in _alpha_sigma(t))
    return m + alpha * s**2 / (alpha**2 * s**2 + sigma**2) * (z - alpha * m)


def _np_ddim(z, t, t_prev, m=M, s=S):
    """Algorithm 2's DDIM step: alpha' x_hat + (sigma' / sigma)(z - alpha x_hat)."""
    x_hat = _np_x0_hat(z, t, m, s)
    alpha, sigma = (_col(a, z) for a in _alpha_sigma(t))
    alpha_p, sigma_p = (_col(a, z) for a in _alpha_sigma(t_prev))
    return alpha_p * x_hat + sigma_p / sigma * (z - alpha * x_hat)


def _np_target(z, t, t_mid, t_next, m=M, s=S):
    z2 = _np_ddim(_np_ddim(z, t, t_mid, m, s), t_mid, t_next, m, s)
    alpha, sigma = (_col(a, z) for a in _alpha_sigma(t))
    alpha2, sigma2 = (_col(a, z) for a in _alpha_sigma(t_next))
    return (z2 - sigma2 / sigma * z) / (alpha2 - sigma2 / sigma * alpha)


def _schedule64():
    return jd.Schedule.from_betas(BETAS, dtype=jnp.float64)


# per example: (t, t_mid, t_next), the last two ending at the clean end
T_TRIPLES = np.array([[199, 150, 100], [120, 119, 118], [40, 20, 1], [9, 4, -1], [1, 0, -1]])


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_target_matches_algorithm_2(x64, prediction):
    sched = _schedule64()
    z = np.random.default_rng(0).standard_normal((5, 3, 2))
    t, t_mid, t_next = T_TRIPLES.T
    got = distillation_target(
        sched,
        gaussian_denoiser(sched, M, S, prediction),
        xt=jnp.asarray(z),
        t=jnp.asarray(t),
        t_mid=jnp.asarray(t_mid),
        t_next=jnp.asarray(t_next),
        prediction=prediction,
    )
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, _np_target(z, t, t_mid, t_next), rtol=1e-9, atol=1e-10)
    # at the clean end the target is the teacher's two-step result itself
    clean = t_next == -1
    two_steps = _np_ddim(_np_ddim(z, t, t_mid), t_mid, t_next)
    np.testing.assert_allclose(np.asarray(got)[clean], two_steps[clean], rtol=1e-9, atol=1e-10)


def test_one_student_step_on_the_target_lands_where_two_teacher_steps_land(x64):
    sched = _schedule64()
    teacher = gaussian_denoiser(sched, M, S, "v")
    z = jnp.asarray(np.random.default_rng(1).standard_normal((5, 4)))
    t, t_mid, t_next = (jnp.asarray(a) for a in T_TRIPLES.T)
    target = distillation_target(
        sched, teacher, xt=z, t=t, t_mid=t_mid, t_next=t_next, prediction="v"
    )
    student = jd.ddim_step(lambda x, s: target, sched, z, t, t_next, prediction="x0").x_prev
    mid = jd.ddim_step(teacher, sched, z, t, t_mid, prediction="v").x_prev
    teacher_two = jd.ddim_step(teacher, sched, mid, t_mid, t_next, prediction="v").x_prev
    np.testing.assert_allclose(student, teacher_two, rtol=1e-9, atol=1e-10)
    t, t_mid, t_next = T_TRIPLES.T
    want = _np_ddim(_np_ddim(np.asarray(z), t, t_mid), t_mid, t_next)
    np.testing.assert_allclose(teacher_two, want, rtol=1e-9, atol=1e-10)


def test_single_point_data_gives_the_point_and_a_zero_loss_for_the_teacher_itself(x64):
    # data x0 = m: the exact teacher's x0_hat is m everywhere, so is every two-step target
    sched = _schedule64()
    teacher = gaussian_denoiser(sched, M, 0.0, "v")
    z = jnp.asarray(np.random.default_rng(2).standard_normal((5, 3)))
    t, t_mid, t_next = (jnp.asarray(a) for a in T_TRIPLES.T)
    target = distillation_target(sched, teacher, xt=z, t=t, t_mid=t_mid, t_next=t_next)
    np.testing.assert_allclose(target, np.full((5, 3), M), rtol=1e-10)
    x0 = jnp.full((64, 3), M, jnp.float64)
    grid = jd.sampling_timesteps(T, 8, "trailing")
    loss, m = distillation_loss(sched, teacher, teacher, x0, jax.random.key(0), timesteps=grid)
    assert float(loss) < 1e-20 and m["per_example_loss"].shape == (64,)


@pytest.mark.parametrize("weighting", ["truncated_snr", "none", "min_snr"])
@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_loss_matches_the_paper_with_given_and_drawn_draws(x64, weighting, prediction):
    sched = _schedule64()
    grid = np.array([190, 150, 149, 80, 30, 3])  # teacher: 6 steps; student: 190, 149, 30
    teacher = gaussian_denoiser(sched, M, S, "eps")
    student = gaussian_denoiser(sched, -0.5, 1.3, prediction)  # a wrong student
    rng = np.random.default_rng(3)
    x0 = rng.standard_normal((6, 2, 3)) * S + M
    noise = rng.standard_normal((6, 2, 3))
    step = np.array([0, 1, 2, 2, 1, 0])
    chain = np.append(grid, -1)
    t, t_mid, t_next = chain[2 * step], chain[2 * step + 1], chain[2 * step + 2]
    alpha, sigma = (_col(a, x0) for a in _alpha_sigma(t))
    z = alpha * x0 + sigma * noise
    err = _np_x0_hat(z, t, -0.5, 1.3) - _np_target(z, t, t_mid, t_next)
    snr = ABAR[t] / (1 - ABAR[t])
    lam = {"truncated_snr": np.maximum(snr, 1), "none": np.ones(6), "min_snr": np.minimum(snr, 5)}
    want = lam[weighting] * np.mean(err**2, axis=(1, 2))
    kwargs = dict(timesteps=grid, prediction=prediction, teacher_prediction="eps",
                  weighting=weighting)  # fmt: skip
    draws = (jnp.asarray(step), jnp.asarray(noise))
    loss, m = distillation_loss(sched, student, teacher, x0, None, draws=draws, **kwargs)
    np.testing.assert_allclose(m["per_example_loss"], want, rtol=1e-9)
    np.testing.assert_allclose(loss, want.mean(), rtol=1e-9)
    np.testing.assert_allclose(m["mse"], np.mean(err**2), rtol=1e-9)
    np.testing.assert_array_equal(m["t"], t)
    # drawn: step ~ randint(k1, [B], 0, N), noise ~ normal(k2) with k1, k2 = split(rng)
    key = jax.random.key(5)
    k1, k2 = jax.random.split(key)
    drawn = (jax.random.randint(k1, (6,), 0, 3, jnp.int32), jax.random.normal(k2, x0.shape))
    a = distillation_loss(sched, student, teacher, jnp.asarray(x0), key, **kwargs)[0]
    b = distillation_loss(sched, student, teacher, jnp.asarray(x0), None, draws=drawn, **kwargs)
    assert float(a) == float(b[0])


def test_the_draws_visit_exactly_the_student_steps_and_the_grid_order_does_not_matter():
    sched = jd.Schedule.from_betas(BETAS)
    model = gaussian_denoiser(sched, 0.0, 1.0, "v")
    x0 = jnp.zeros((4000, 1))
    grid = np.array([5, 199, 60, 100, 150, 20, 1, 120])  # any order
    _, m = distillation_loss(sched, model, model, x0, jax.random.key(0), timesteps=grid)
    t = np.asarray(m["t"])
    np.testing.assert_array_equal(student_timesteps(grid), [199, 120, 60, 5])
    assert set(t.tolist()) == {199, 120, 60, 5}
    counts = np.bincount(np.searchsorted([5, 60, 120, 199], t), minlength=4)
    assert np.all(np.abs(counts - 1000) < 4 * np.sqrt(4000 * 0.25 * 0.75))
    ascending = distillation_loss(
        sched, model, model, x0, jax.random.key(0), timesteps=np.sort(grid)
    )
    np.testing.assert_array_equal(ascending[1]["t"], t)


def test_gradients_reach_the_student_only_and_the_loss_jits():
    sched = jd.Schedule.from_betas(BETAS)
    x0 = jax.random.normal(jax.random.key(1), (8, 3))
    grid = jd.sampling_timesteps(T, 4, "trailing")

    def fn(w):
        return lambda x, t: w * x

    def loss(student_w, teacher_w):
        return distillation_loss(sched, fn(student_w), fn(teacher_w), x0, jax.random.key(2),
                                 timesteps=grid)[0]  # fmt: skip

    g_student, g_teacher = jax.jit(jax.grad(loss, argnums=(0, 1)))(0.3, 0.7)
    assert float(g_teacher) == 0.0 and abs(float(g_student)) > 0
    eps = 1e-3
    numeric = (loss(0.3 + eps, 0.7) - loss(0.3 - eps, 0.7)) / (2 * eps)
    np.testing.assert_allclose(g_student, numeric, rtol=1e-3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(timesteps=[100, 50, 10]), r"even number 2N of teacher steps.*got 3: \[100, 50, 10\]"),
        (dict(timesteps=[100, 100]), r"timesteps must be distinct ints in \[0, 199\]"),
        (dict(timesteps=[200, 10]), r"timesteps must be distinct ints in \[0, 199\]"),
        (dict(timesteps=[1.5, 0.5]), "timesteps must be a non-empty 1-D int array"),
        (dict(prediction="score"), "prediction must be one of 'eps', 'x0', 'v'; got 'score'"),
        (dict(teacher_prediction="noise"), "prediction must be one of .*got 'noise'"),
        (dict(weighting="snr_plus_one"), "weighting must be one of .*got 'snr_plus_one'"),
        (dict(student_fn="model"), "student_fn must be a callable student_fn\\(x, t\\); got 'mod"),
        (dict(teacher_fn=None), "teacher_fn must be a callable teacher_fn\\(x, t\\); got None"),
        (dict(x0=jnp.zeros((2, 3), jnp.int32)), "x0 must be a floating array"),
        (dict(rng=None), "rng must be a PRNG key"),
        (dict(draws=(jnp.zeros(3, jnp.int32), jnp.zeros((2, 3)))), r"draws must be \(step \[B\]"),
        (
            dict(draws=(jnp.zeros(2), jnp.zeros((2, 3)))),
            r"draws' step must be ints in \[0, N - 1\] = \[0, 0\] .*got dtype float32",
        ),
        (
            dict(draws=(jnp.array([0, 1]), jnp.zeros((2, 3)))),
            r"draws' step must be ints in \[0, N - 1\] = \[0, 0\] .*got \[0, 1\]",
        ),
        (
            dict(draws=(np.array([-1, 0]), jnp.zeros((2, 3)))),
            r"draws' step must be ints .*got \[-1, 0\]",
        ),
    ],
)
def test_bad_arguments_are_refused_before_any_network_call(kwargs, match):
    sched = jd.Schedule.from_betas(BETAS)

    def never(x, t):
        raise AssertionError("called")

    args = dict(student_fn=never, teacher_fn=never, x0=jnp.zeros((2, 3)), rng=jax.random.key(0))
    args.update(kwargs)
    kw = {k: v for k, v in args.items() if k not in ("student_fn", "teacher_fn", "x0", "rng")}
    kw.setdefault("timesteps", [150, 100])
    with pytest.raises(ValueError, match=match):
        distillation_loss(
            sched, args["student_fn"], args["teacher_fn"], args["x0"], args["rng"], **kw
        )


def test_eps_prediction_at_a_zero_snr_step_and_traced_timesteps_are_refused():
    sched = jd.Schedule.from_betas(jd.rescale_zero_terminal_snr(jd.linear_betas(T)))
    model = gaussian_denoiser(sched, 0.0, 1.0, "v")
    x0, key = jnp.zeros((2, 3)), jax.random.key(0)
    with pytest.raises(ValueError, match=r"prediction='eps' cannot distil the teacher at step 199"):
        distillation_loss(
            sched, model, model, x0, key, timesteps=[199, 100], teacher_prediction="eps"
        )
    with pytest.raises(ValueError, match=r"prediction='eps' cannot distil the student at step"):
        distillation_loss(sched, model, model, x0, key, timesteps=[199, 100], prediction="eps")
    loss, _ = distillation_loss(sched, model, model, x0, key, timesteps=[199, 100])  # v: fine
    assert np.isfinite(float(loss))
    with pytest.raises(ValueError, match="timesteps must be concrete ints"):
        jax.jit(lambda ts: distillation_loss(sched, model, model, x0, key, timesteps=ts)[0])(
            jnp.array([150, 100])
        )
    with pytest.raises(ValueError, match=r"even number 2N.*got 1"):
        student_timesteps([7])


@pytest.mark.parametrize(
    "t, t_mid, t_next",
    [(100, 50, 50), (100, 100, 50), (100, 120, 50), (10, 5, -2), ([9, 9], [4, 9], [1, 1])],
)
def test_target_refuses_steps_out_of_order(t, t_mid, t_next):
    sched = jd.Schedule.from_betas(BETAS)

    def never(x, t):
        raise AssertionError("called")

    with pytest.raises(ValueError, match=r"t, t_mid, t_next must satisfy t > t_mid > t_next >= -1"):
        distillation_target(
            sched, never, xt=jnp.zeros((2, 3)), t=t, t_mid=t_mid, t_next=t_next, prediction="v"
        )


def test_clip_denoised_clips_the_teachers_x0_in_both_steps(x64):
    """Data N(2.5, 0.5^2): the exact teacher's x0_hat lies near 2.5, so clipping it to [-1, 1]
    in both DDIM steps changes the target; the float64 reference clips as Algorithm 2's DDIM
    steps would with a clipped x_hat."""
    m, s = 2.5, 0.5
    sched = _schedule64()
    teacher = gaussian_denoiser(sched, m, s, "v")

    def ddim_clipped(z, t, t_prev):
        x_hat = np.clip(_np_x0_hat(z, t, m, s), -1.0, 1.0)
        alpha, sigma = (_col(a, z) for a in _alpha_sigma(t))
        alpha_p, sigma_p = (_col(a, z) for a in _alpha_sigma(t_prev))
        return alpha_p * x_hat + sigma_p / sigma * (z - alpha * x_hat)

    def want_target(z, t, t_mid, t_next):
        z2 = ddim_clipped(ddim_clipped(z, t, t_mid), t_mid, t_next)
        alpha, sigma = (_col(a, z) for a in _alpha_sigma(t))
        alpha2, sigma2 = (_col(a, z) for a in _alpha_sigma(t_next))
        return (z2 - sigma2 / sigma * z) / (alpha2 - sigma2 / sigma * alpha)

    z = np.random.default_rng(3).standard_normal((5, 3))
    t, t_mid, t_next = T_TRIPLES.T
    got = distillation_target(
        sched,
        teacher,
        xt=jnp.asarray(z),
        t=jnp.asarray(t),
        t_mid=jnp.asarray(t_mid),
        t_next=jnp.asarray(t_next),
        prediction="v",
        clip_denoised=True,
    )
    want = want_target(z, t, t_mid, t_next)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)
    assert np.abs(want - _np_target(z, t, t_mid, t_next, m, s)).max() > 0.1  # clipping matters

    # through the loss: a student predicting x0 = 0 has per-example loss mean(target^2)
    grid = np.array([199, 149, 99, 49])
    step = np.array([0, 1])
    chain = np.append(grid, -1)
    t, t_mid, t_next = chain[2 * step], chain[2 * step + 1], chain[2 * step + 2]
    x0 = np.full((2, 3), m)
    noise = np.random.default_rng(4).standard_normal((2, 3))
    alpha, sigma = (_col(a, x0) for a in _alpha_sigma(t))
    xt = alpha * x0 + sigma * noise
    _, metrics = distillation_loss(
        sched,
        lambda x, t: jnp.zeros_like(x),
        teacher,
        jnp.asarray(x0),
        None,
        timesteps=grid,
        prediction="x0",
        teacher_prediction="v",
        weighting="none",
        clip_denoised=True,
        draws=(jnp.asarray(step), jnp.asarray(noise)),
    )
    want = np.mean(want_target(xt, t, t_mid, t_next) ** 2, axis=1)
    np.testing.assert_allclose(metrics["per_example_loss"], want, rtol=1e-9)
