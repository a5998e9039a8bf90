"""Consistency models: one network that maps every point of an ODE trajectory to its origin.

Song, Dhariwal, Chen & Sutskever 2023, "Consistency Models" (seed 004 section 7, "Progressive
Distillation / Consistency Models"): a consistency function f(x_t, t) returns the start of the
probability-flow ODE trajectory through x_t, so one network call samples, and a few calls with
re-noising in between refine (Algorithm 1). Consistency distillation (Algorithm 2) trains f
from a diffusion teacher by making f agree on adjacent points of the teacher's ODE; consistency
training (Algorithm 3) needs no teacher: the adjacent point shares x_t's data and noise.

Discrete time, as the rest of the library (t in [0, T - 1]). In the coordinates of Karras et
al. 2022, x_t / alpha_t = x0 + s_t eps with s_t = sigma_t / alpha_t, and the trajectory's
origin is step 0, s_min = s_0 (the paper's epsilon). The parameterization (Song et al. 2023,
eq. 7 and appendix C) with a free network F(x_t, t):

    f(x_t, t) = c_skip(t) x_t / alpha_t + c_out(t) F(x_t, t),
    c_skip = sigma_data^2 / ((s_t - s_0)^2 + sigma_data^2),
    c_out = sigma_data (s_t - s_0) / sqrt(sigma_data^2 + s_t^2),

so f(x, 0) = x / alpha_0 exactly (the boundary condition). f's outputs live in data space
(x0 + s_0 eps at t = 0, s_0 ~ 1e-2 for the linear and cosine schedules).

Imports only jax and numpy; `net_fn`, teacher and consistency functions are any callables.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_diffusion._checks import check_real
from jax_diffusion._sampling import (
    _alpha_sigma,
    _check_stride,
    _check_x,
    _given_timesteps,
    _per_example,
    _result,
    _scan,
)
from jax_diffusion.diffusion import (
    _check_rng,
    _is_concrete,
    check_prediction,
    check_schedule,
    predict_x0_eps,
    q_sample,
)
from jax_diffusion.losses import _check_draws, _check_floating_x0
from jax_diffusion.samplers import ddim_step
from jax_diffusion.schedules import Schedule, _check_timesteps

__all__ = [
    "DISTANCES",
    "consistency_distillation_loss",
    "consistency_function",
    "consistency_training_loss",
    "consistency_sample",
]

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
DISTANCES = ("l2", "pseudo_huber")


def consistency_function(
    net_fn: ModelFn,
    schedule: Schedule,
    *,
    sigma_data: float = 0.5,
    prediction: str | None = None,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """f(x_t, t) = c_skip(t) x_t / alpha_t + c_out(t) F(x_t, t) (Song et al. 2023, eq. 7).

    c_skip and c_out as in the module docstring (appendix C of the paper, in the noise-to-signal
    ratio s_t = sigma_t / alpha_t): f(x, 0) = x / alpha_0 whatever the network outputs.

    With `prediction` set, net_fn is a diffusion denoiser of that parameterization (e.g. the
    teacher, to start a student from its weights, as Song et al. initialise from the
    pretrained model): F is its x0_hat, and c_out = (s_t - s_0) / sqrt((s_t - s_0)^2 +
    sigma_data^2), which goes to 1, so that f -> x0_hat at high noise (the form of latent
    consistency models, Luo et al. 2023).

    Args:
      net_fn: the network F(x [B, ...], t int32 [B]) -> [B, ...] (trained only through f),
        or a denoiser of `prediction`.
      schedule: the noise schedule (alphas_cumprod > 0 at every step: s_t must be finite).
      sigma_data: the data's standard deviation in c_skip / c_out (0.5 in the paper).
      prediction: None (net_fn is the free network F) or 'eps' | 'x0' | 'v'.

    Returns:
      f(x [B, ...], t int [B] in [0, T - 1]) -> [B, ...] in x's dtype.
    """
    if not callable(net_fn):
        raise ValueError(f"net_fn must be a callable net_fn(x, t); got {net_fn!r}")
    check_schedule(schedule)
    sigma_data = check_real("sigma_data", sigma_data, positive=True)
    if prediction is not None:
        check_prediction(prediction)
    if _is_concrete(schedule.alphas_cumprod) and not np.all(
        np.asarray(schedule.alphas_cumprod) > 0
    ):
        raise ValueError(
            "consistency_function needs alphas_cumprod > 0 at every step (s_t = sigma_t / "
            "alpha_t finite); this schedule reaches 0 (zero terminal SNR)"
        )

    def f(x, t):
        t = _check_timesteps(t, schedule.num_timesteps)
        dtype = jnp.promote_types(x.dtype, jnp.float32)
        alpha, sigma = _alpha_sigma(schedule, t, dtype)
        alpha_0, sigma_0 = _alpha_sigma(schedule, jnp.zeros((), jnp.int32), dtype)
        s, s_0 = sigma / alpha, sigma_0 / alpha_0
        c_skip = sigma_data**2 / ((s - s_0) ** 2 + sigma_data**2)
        out = net_fn(x, t)
        if prediction is None:
            c_out = sigma_data * (s - s_0) / jnp.sqrt(sigma_data**2 + s**2)
        else:
            c_out = (s - s_0) / jnp.sqrt((s - s_0) ** 2 + sigma_data**2)
            out = predict_x0_eps(schedule, model_output=out, xt=x, t=t, prediction=prediction)[0]
        out = out.astype(dtype)
        scaled = x.astype(dtype) / _per_example(alpha, x)
        return (_per_example(c_skip, x) * scaled + _per_example(c_out, x) * out).astype(x.dtype)

    return f


def _grid(schedule: Schedule, timesteps) -> np.ndarray:
    grid = _given_timesteps(schedule, timesteps)[::-1]  # ascending
    if grid.size < 2:
        raise ValueError(f"timesteps must hold at least 2 steps; got {grid.tolist()}")
    return grid.astype(np.int32)


def _distance(a, b, distance: str, huber_c):
    diff = (a - b).reshape(a.shape[0], -1)
    if distance == "l2":
        return jnp.mean(jnp.square(diff), axis=1)
    dims = diff.shape[1]
    c = 0.00054 * math.sqrt(dims) if huber_c is None else huber_c
    return jnp.sqrt(jnp.sum(jnp.square(diff), axis=1) + c**2) - c


def consistency_distillation_loss(
    student_fn: ModelFn,
    target_fn: ModelFn,
    teacher_fn: ModelFn,
    schedule: Schedule,
    x0,
    rng,
    *,
    timesteps,
    teacher_prediction: str = "eps",
    distance: str = "l2",
    huber_c: float | None = None,
    draws: tuple[jax.Array, jax.Array] | None = None,
):
    """Consistency distillation (Song et al. 2023, Algorithm 2) on the grid `timesteps`.

    Per example: n ~ U{0, ..., N - 2} on the ascending grid t_0 < ... < t_{N-1}, eps ~ N(0, I),
    x_{n+1} = q_sample(x0, t_{n+1}, eps); the teacher's deterministic DDIM step (the ODE solver
    Phi) gives x_hat_n from x_{n+1}; the loss is d(student_fn(x_{n+1}, t_{n+1}),
    stop_gradient(target_fn(x_hat_n, t_n))) with lambda = 1. student_fn / target_fn are
    consistency functions (`consistency_function` of the network with params theta and of
    its EMA theta^-).

    Args:
      student_fn, target_fn: consistency functions f(x [B, ...], t int32 [B]) -> [B, ...].
      teacher_fn: the diffusion teacher model_fn(x, t) -> its `teacher_prediction`.
      schedule: the noise schedule of the teacher.
      x0: [B, ...] clean data.
      rng: PRNG key (ignored when `draws` is given).
      timesteps: the grid, N >= 2 distinct concrete ints in [0, T - 1] (any order); include
        step 0 so that the boundary condition anchors the chain (e.g.
        `np.linspace(0, T - 1, N).round().astype(int)`).
      teacher_prediction: 'eps' | 'x0' | 'v'.
      distance: 'l2' (mean squared error over dimensions) or 'pseudo_huber'
        sqrt(||a - b||^2 + c^2) - c (Song & Dhariwal 2023, improved consistency training).
      huber_c: c of 'pseudo_huber' (None: 0.00054 sqrt(D), their choice).
      draws: (n int [B] in [0, N - 2], noise [B, ...]) instead of drawing them; otherwise
        n = randint(k1, [B], 0, N - 1), noise = normal(k2, x0.shape), k1, k2 = split(rng).

    Returns:
      (loss, metrics): the scalar mean over the batch; metrics 'loss', 't' [B] (t_{n+1}) and
      'per_example_loss' [B].
    """
    for name, fn in (
        ("student_fn", student_fn),
        ("target_fn", target_fn),
        ("teacher_fn", teacher_fn),
    ):
        if not callable(fn):
            raise ValueError(f"{name} must be a callable {name}(x, t); got {fn!r}")
    check_prediction(teacher_prediction)

    def teacher_step(x_next, t_next, t, x0, noise):
        step = ddim_step(teacher_fn, schedule, x_next, t_next, t, prediction=teacher_prediction)
        return step.x_prev

    return _consistency_loss(
        student_fn, target_fn, teacher_step, schedule, x0, rng, timesteps, distance, huber_c, draws
    )


def consistency_training_loss(
    student_fn: ModelFn,
    target_fn: ModelFn,
    schedule: Schedule,
    x0,
    rng,
    *,
    timesteps,
    distance: str = "l2",
    huber_c: float | None = None,
    draws: tuple[jax.Array, jax.Array] | None = None,
):
    """Consistency training, without a teacher (Song et al. 2023, Algorithm 3) on `timesteps`.

    As `consistency_distillation_loss`, with the teacher's ODE step replaced by the same noise at
    the adjacent point: x_n = q_sample(x0, t_n, eps) beside x_{n+1} = q_sample(x0, t_{n+1}, eps)
    (the paper's x + t_n z, in the VP coordinates of the schedule). This is the DDIM step whose
    denoiser knows x0, the one-sample estimate of the score that the paper's Theorem 2 uses: for
    an l2 distance its gradient equals the distillation loss's with an exact teacher in
    expectation, up to O(step size). The paper's schedule of N (growing during training) and the
    improved recipe (Song & Dhariwal 2023: pseudo-Huber, lognormal step sampling) are left to
    the training loop: pass the grid of the current N.

    Args:
      student_fn, target_fn: consistency functions f(x [B, ...], t int32 [B]) -> [B, ...] (the
        network with params theta and, for the target, theta^- = stop_gradient(theta) in the
        improved recipe or an EMA of theta in the original).
      schedule: the noise schedule.
      x0: [B, ...] clean data.
      rng: PRNG key (ignored when `draws` is given).
      timesteps: the grid, N >= 2 distinct concrete ints in [0, T - 1] (any order); include
        step 0.
      distance, huber_c, draws: as `consistency_distillation_loss`.

    Returns:
      (loss, metrics) as `consistency_distillation_loss`.
    """
    for name, fn in (("student_fn", student_fn), ("target_fn", target_fn)):
        if not callable(fn):
            raise ValueError(f"{name} must be a callable {name}(x, t); got {fn!r}")

    def same_noise(x_next, t_next, t, x0, noise):
        return q_sample(schedule, x0=x0, t=t, noise=noise)

    return _consistency_loss(
        student_fn, target_fn, same_noise, schedule, x0, rng, timesteps, distance, huber_c, draws
    )


def _consistency_loss(
    student_fn, target_fn, step_back, schedule, x0, rng, timesteps, distance, huber_c, draws
):
    """The loss of Algorithms 2 and 3: d(student(x_{n+1}, t_{n+1}), target(x_n, t_n)) with
    x_n = step_back(x_{n+1}, t_{n+1}, t_n, x0, eps) under stop_gradient."""
    check_schedule(schedule)
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of 'l2', 'pseudo_huber'; got {distance!r}")
    if huber_c is not None:
        huber_c = check_real("huber_c", huber_c, positive=True)
    _check_floating_x0(x0)
    grid = _grid(schedule, timesteps)
    batch = jnp.shape(x0)[0]
    if draws is None:
        _check_rng(rng, why=" (or pass draws=(n, noise))")
        n_rng, noise_rng = jax.random.split(rng)
        n = jax.random.randint(n_rng, (batch,), 0, grid.size - 1, dtype=jnp.int32)
        noise = jax.random.normal(noise_rng, jnp.shape(x0), jnp.result_type(x0))
    else:
        n, noise = _check_draws(draws, x0, "n")
        n = jnp.asarray(n)
        if _is_concrete(n) and n.size and not (0 <= n.min() and n.max() <= grid.size - 2):
            raise ValueError(f"n must lie in [0, {grid.size - 2}]; got {np.asarray(n).tolist()}")
    grid = jnp.asarray(grid)
    t_next, t = grid[n + 1], grid[n]
    x_next = q_sample(schedule, x0=x0, t=t_next, noise=noise)
    x_n = step_back(x_next, t_next, t, x0, noise)
    target = jax.lax.stop_gradient(target_fn(x_n, t))
    dtype = jnp.promote_types(jnp.result_type(x0), jnp.float32)
    out = student_fn(x_next, t_next).astype(dtype)
    per_example = _distance(out, target.astype(dtype), distance, huber_c)
    loss = jnp.mean(per_example)
    return loss, {"loss": loss, "t": t_next, "per_example_loss": per_example}


def consistency_sample(
    f: ModelFn,
    schedule: Schedule,
    x_T,
    rng=None,
    *,
    timesteps,
    return_trajectory: bool | int = False,
):
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1), one `lax.scan`.

    With timesteps tau_1 > tau_2 > ... > tau_K: x = f(x_T, tau_1); then for k = 2..K,
    x_tau = q_sample(x, tau_k, z) with fresh z ~ N(0, I) and x = f(x_tau, tau_k). One step
    (K = 1) is deterministic and needs no rng.

    Args:
      f: a consistency function f(x [B, ...], t int32 [B]) -> [B, ...].
      schedule: the noise schedule.
      x_T: [B, ...] start noise at tau_1 (N(0, I) where alphas_cumprod[tau_1] ~ 0).
      rng: PRNG key, required for K > 1.
      timesteps: K >= 1 distinct concrete ints in [0, T - 1] (any order; visited descending).
      return_trajectory: False -> x; True or a stride k -> (x, trajectory [K // k + 1, B, ...])
        of the estimates after each step (x_T first), as the samplers of this library.

    Returns:
      [B, ...] samples in x_T's dtype, or (samples, trajectory).
    """
    if not callable(f):
        raise ValueError(f"f must be a callable f(x, t); got {f!r}")
    check_schedule(schedule)
    x_T = _check_x(x_T)
    stride = _check_stride(return_trajectory)
    ts = _given_timesteps(schedule, timesteps)  # descending
    if ts.size > 1:
        _check_rng(rng, why=" for more than one step (fresh noise between steps)")
    batch = x_T.shape[0]
    # step 1 takes x_T as it is; each later step re-noises the previous estimate first
    keys = jax.random.split(rng if ts.size > 1 else jax.random.key(0), ts.size)
    first = np.arange(ts.size) == 0

    def step(x, a):
        t, key, is_first = a
        t_b = jnp.full((batch,), t, jnp.int32)
        z = jax.random.normal(key, x.shape, x.dtype)
        noised = q_sample(schedule, x0=x, t=t_b, noise=z).astype(x.dtype)
        return f(jnp.where(is_first, x, noised), t_b)

    out, trajectory = _scan(step, x_T, (jnp.asarray(ts), keys, first), ts.size, stride, lambda x: x)
    return _result(out, trajectory, stride)
