"""Progressive distillation: a student whose one DDIM step does two of its teacher's.

Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models",
Algorithm 2 (seed 004 section 7, "Progressive Distillation"; the seeds' reason to prefer v
prediction). A teacher sampled with deterministic DDIM (eta = 0) on 2N steps is distilled into a
student (initialised from the teacher) sampled on N steps: at each of its steps the student
regresses x0_hat on the x0 that makes one DDIM step land where two teacher steps land. The
student then becomes the teacher and N halves (1024 -> 512 -> ... -> 4 steps in the paper).

Discrete time (t in [0, T - 1]; -1 is the clean end, alphas_cumprod = 1): the teacher's grid is
`timesteps` = tau_0 > tau_1 > ... > tau_{2N-1}, the student's is `timesteps[::2]`, and student
step i goes from tau_{2i} through the teacher's tau_{2i+1} to tau_{2i+2} (-1 after the last).
Sample the student with `ddim_sample(student_fn, schedule, x_T, timesteps=student_timesteps(
timesteps))` (`timesteps[::2]` when the grid is given in descending order).
Before the last step, x_tilde is the x0 that makes one step land on the teacher's two, not a
clean image: it need not lie in [-1, 1], and clipping the student's x0_hat there
(`clip_denoised`) departs from the steps it learned.

Pure functions of any `teacher_fn(x, t)` / `student_fn(x, t)` (eps, x0 or v outputs); no Flax.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_diffusion._sampling import _alpha_sigma, _check_step_t, _per_example
from jax_diffusion.diffusion import (
    _check_rng,
    _check_zero_snr,
    _is_concrete,
    check_prediction,
    check_schedule,
    predict_x0_eps,
    q_sample,
)
from jax_diffusion.losses import _check_draws, _check_floating_x0, loss_weight, mean_flat
from jax_diffusion.samplers import ddim_step
from jax_diffusion.schedules import Schedule, _check_timestep_subset

__all__ = ["distillation_loss", "distillation_target", "student_timesteps"]

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def student_timesteps(timesteps) -> np.ndarray:
    """The student's grid of a teacher grid of 2N distinct steps: every other step, from the top.

    Args:
      timesteps: the teacher's 2N (>= 2, even) distinct int steps >= 0, in any order.

    Returns:
      int32 [N], strictly descending: tau_0, tau_2, ..., the steps to sample the student at.

    Raises:
      ValueError: timesteps not distinct non-negative concrete ints, or an odd count.
    """
    return _teacher_grid(timesteps, np.iinfo(np.int32).max)[::2]


def _teacher_grid(timesteps, num_timesteps: int) -> np.ndarray:
    """`timesteps` checked (concrete, distinct, in [0, T - 1], an even count), descending int32."""
    if not _is_concrete(timesteps):
        raise ValueError(
            "timesteps must be concrete ints (they set the student's steps); got a traced array "
            "(close over them instead of passing them as a jit argument)"
        )
    grid = _check_timestep_subset(timesteps, num_timesteps)[::-1].astype(np.int32)
    if grid.shape[0] % 2:
        raise ValueError(
            f"timesteps must hold an even number 2N of teacher steps (two per student step); "
            f"got {grid.shape[0]}: {grid.tolist()}"
        )
    return grid


def distillation_target(
    schedule: Schedule,
    teacher_fn: ModelFn,
    *,
    xt,
    t,
    t_mid,
    t_next,
    prediction: str = "v",
    clip_denoised: bool = False,
) -> jax.Array:
    """The student's x0 target x_tilde: two teacher DDIM steps t -> t_mid -> t_next in one.

    Salimans & Ho 2022, Algorithm 2: z' = DDIM(z_t, t -> t_mid), z'' = DDIM(z', t_mid ->
    t_next) with the teacher (eta = 0, Song et al. 2021 eq. 12), then
    x_tilde = (z'' - (sigma_next / sigma_t) z_t) / (alpha_next - (sigma_next / sigma_t) alpha_t),
    the x0_hat whose single DDIM step t -> t_next from z_t gives z''. At t_next = -1 (the clean
    end: alpha = 1, sigma = 0) x_tilde = z''.

    Args:
      schedule: the (not respaced) noise schedule.
      teacher_fn: teacher_fn(x [B, ...], t int32 [B]) -> its `prediction` of x's shape.
      xt: [B, ...] float, z_t.
      t, t_mid, t_next: int scalars or [B], t > t_mid > t_next >= -1.
      prediction: the teacher's parameterization, 'eps' | 'x0' | 'v'.
      clip_denoised: clip the teacher's x0_hat to [-1, 1] in both steps (a Python bool).

    Returns:
      [B, ...] x_tilde in xt's dtype (no stop_gradient: `distillation_loss` applies one).

    Raises:
      ValueError: as `ddim_step` for bad arguments; t, t_mid, t_next not in that order where
        concrete.
    """
    _check_order(t, t_mid, t_next)
    step = dict(eta=0.0, prediction=prediction, clip_denoised=clip_denoised)
    z_mid = ddim_step(teacher_fn, schedule, xt, t, t_mid, **step).x_prev
    z_next = ddim_step(teacher_fn, schedule, z_mid, t_mid, t_next, **step).x_prev
    t = _check_step_t(t, xt, "t")
    t_next = _check_step_t(t_next, xt, "t_next")
    dtype = jnp.promote_types(xt.dtype, jnp.float32)
    alpha, sigma = (_per_example(a, xt) for a in _alpha_sigma(schedule, t, dtype))
    alpha_next, sigma_next = (_per_example(a, xt) for a in _alpha_sigma(schedule, t_next, dtype))
    # multiplied through by sigma_t: one division, finite wherever SNR strictly decreases
    num = sigma * z_next.astype(dtype) - sigma_next * xt.astype(dtype)
    target = num / (sigma * alpha_next - sigma_next * alpha)
    return target.astype(xt.dtype)


def _check_order(t, t_mid, t_next) -> None:
    """t > t_mid > t_next >= -1 where all three are concrete int scalars or [B] (others are
    left to `ddim_step`'s checks)."""
    named = {"t": t, "t_mid": t_mid, "t_next": t_next}
    if not all(_is_concrete(v) for v in named.values()):
        return
    values = [np.asarray(v) for v in named.values()]
    if not all(np.issubdtype(v.dtype, np.integer) and v.ndim <= 1 for v in values):
        return
    try:
        a, b, c = np.broadcast_arrays(*values)
    except ValueError:
        return  # batch sizes that disagree: ddim_step names the argument
    if not (np.all(a > b) and np.all(b > c) and np.all(c >= -1)):
        got = ", ".join(f"{k}={v.tolist()}" for k, v in zip(named, values, strict=True))
        raise ValueError(f"t, t_mid, t_next must satisfy t > t_mid > t_next >= -1; got {got}")


def distillation_loss(
    schedule: Schedule,
    student_fn: ModelFn,
    teacher_fn: ModelFn,
    x0,
    rng,
    *,
    timesteps,
    prediction: str = "v",
    teacher_prediction: str | None = None,
    weighting: str = "truncated_snr",
    clip_denoised: bool = False,
    draws: tuple[jax.Array, jax.Array] | None = None,
):
    """Progressive-distillation loss of a student on the teacher grid `timesteps` (2N steps).

    Per example (Salimans & Ho 2022, Algorithm 2): a student step i ~ U{0, ..., N - 1}, its
    t = tau_{2i} (see the module docstring), eps ~ N(0, I), z_t = q_sample(x0, t, eps); the
    target x_tilde = `distillation_target` (teacher, t -> tau_{2i+1} -> tau_{2i+2}) under
    stop_gradient; the student's x0_hat from student_fn(z_t, t); the loss
    lambda(t) ||x_tilde - x0_hat||^2 (mean over dimensions) with the x0-space weight lambda of
    `weighting`: 'truncated_snr' max(SNR, 1) as in the paper, or 'none' | 'snr' | 'min_snr'
    (`loss_weight` with prediction='x0').

    Args:
      schedule: the noise schedule.
      student_fn, teacher_fn: model_fn(x [B, ...], t int32 [B]) -> [B, ...].
      x0: [B, ...] clean data in [-1, 1].
      rng: PRNG key (ignored when `draws` is given).
      timesteps: the teacher's 2N distinct steps (concrete ints in [0, T - 1], any order); the
        student is then sampled on `student_timesteps(timesteps)`.
      prediction: the student's parameterization, 'eps' | 'x0' | 'v' (v in the paper: eps
        prediction gives no x0 at SNR = 0).
      teacher_prediction: the teacher's; None for `prediction`.
      weighting: lambda(t), see above.
      clip_denoised: clip the teacher's x0_hat to [-1, 1] (a Python bool).
      draws: (step int [B] in [0, N - 1] (checked where concrete; a traced step out of range
        gives a meaningless loss), noise [B, ...]) instead of drawing them: the loss
        otherwise draws step = randint(k1, [B], 0, N), noise = normal(k2, x0.shape) with
        k1, k2 = jax.random.split(rng).

    Returns:
      (loss, metrics): the scalar mean over the batch; metrics 'loss', 'mse' (unweighted
      x0-space squared error), 't' [B] and 'per_example_loss' [B].

    Raises:
      ValueError: bad timesteps (not distinct ints in range, an odd count, traced), bad
        predictions or weighting, x0 not floating, eps prediction of a teacher or student at
        a zero-SNR step, or draws of the wrong shape, dtype or (concrete) range, before any
        network call.
    """
    for name, fn in (("student_fn", student_fn), ("teacher_fn", teacher_fn)):
        if not callable(fn):
            raise ValueError(f"{name} must be a callable {name}(x, t); got {fn!r}")
    check_schedule(schedule)
    grid = _teacher_grid(timesteps, schedule.num_timesteps)
    check_prediction(prediction)
    teacher_prediction = prediction if teacher_prediction is None else teacher_prediction
    check_prediction(teacher_prediction)
    loss_weight(schedule, jnp.zeros((), jnp.int32), prediction="x0", weighting=weighting)
    _check_floating_x0(x0)
    for who, pred in (("the student", prediction), ("the teacher", teacher_prediction)):
        _check_zero_snr(schedule, pred, int(grid[0]), f"distil {who} at")
    num_student = grid.shape[0] // 2
    batch = jnp.shape(x0)[0]
    if draws is None:
        _check_rng(rng, why=" (or pass draws=(step, noise))")
        step_rng, noise_rng = jax.random.split(rng)
        step = jax.random.randint(step_rng, (batch,), 0, num_student, dtype=jnp.int32)
        noise = jax.random.normal(noise_rng, jnp.shape(x0), jnp.result_type(x0))
    else:
        step, noise = _check_draws(draws, x0, "step")
        step = jnp.asarray(step)
        bad_type = not jnp.issubdtype(step.dtype, jnp.integer)
        if bad_type or (_is_concrete(step) and not np.all((0 <= step) & (step < num_student))):
            got = f"dtype {step.dtype}" if bad_type else f"{np.asarray(step).tolist()}"
            raise ValueError(
                f"draws' step must be ints in [0, N - 1] = [0, {num_student - 1}] (the student "
                f"steps of {2 * num_student} teacher timesteps); got {got}"
            )
    chain = jnp.asarray(np.append(grid, -1), jnp.int32)  # tau_0, ..., tau_{2N-1}, -1
    t, t_mid, t_next = chain[2 * step], chain[2 * step + 1], chain[2 * step + 2]
    xt = q_sample(schedule, x0=x0, t=t, noise=noise)
    target = distillation_target(
        schedule,
        teacher_fn,
        xt=xt,
        t=t,
        t_mid=t_mid,
        t_next=t_next,
        prediction=teacher_prediction,
        clip_denoised=clip_denoised,
    )
    target = jax.lax.stop_gradient(target)
    x0_hat, _ = predict_x0_eps(
        schedule, model_output=student_fn(xt, t), xt=xt, t=t, prediction=prediction
    )
    dtype = jnp.promote_types(x0_hat.dtype, jnp.float32)
    mse = mean_flat(jnp.square(x0_hat.astype(dtype) - target.astype(dtype)))
    weight = loss_weight(schedule, t, prediction="x0", weighting=weighting).astype(dtype)
    per_example = weight * mse
    loss = jnp.mean(per_example)
    return loss, {"loss": loss, "mse": jnp.mean(mse), "t": t, "per_example_loss": per_example}
