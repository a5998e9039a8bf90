"""Karras et al. 2022 (EDM) sampling on a discrete schedule: rho-spaced steps and Heun's method.

In the coordinates of Karras et al. 2022, y = x_t / alpha_t = x0 + s_t eps with s_t = sigma_t /
alpha_t, the probability-flow ODE is dy/ds = (y - D(y; s)) / s = eps_hat, D the denoiser's x0
estimate. Its Euler step from s_t to s_prev is exactly DDIM (eta = 0); EDM's Algorithm 1 adds
Heun's correction, the average of the slopes at both ends (second order, two model calls per
step), and takes an Euler step into s = 0 at the end (2 n - 1 model calls for n steps):

  y_euler = y + (s_prev - s) eps_hat(y, s),
  y_prev  = y + (s_prev - s) (eps_hat(y, s) + eps_hat(y_euler, s_prev)) / 2.

`karras_timesteps` picks the steps: s_i = (s_max^(1/rho) + i / (n - 1) (s_min^(1/rho) -
s_max^(1/rho)))^rho (EDM eq. 5, rho = 7), s_max = s_{T-1}, s_min = s_0, each rounded to the
discrete step nearest in log s (the model is only trained there; diffusers'
use_karras_sigmas passes fractional steps instead). Every sampler of the library takes them as
`timesteps=`.

`heun_sample` is one `jax.lax.scan` (the final Euler step is a `lax.cond` branch inside it, so
no model call is wasted), takes any denoiser `model_fn(x, t)` and works under `jax.jit`,
`jax.vmap` and the samplers' `return_trajectory`. Imports only jax and numpy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_diffusion._checks import check_int as _check_int
from jax_diffusion._checks import check_real as _check_real
from jax_diffusion._sampling import (
    DenoisedFn,
    ModelFn,
    StepOutput,
    _alpha_sigma,
    _call_model,
    _check_common,
    _check_model_and_schedule,
    _check_step_t,
    _check_t_order,
    _check_x,
    _compute_dtype,
    _denoise,
    _given_timesteps,
    _per_example,
    _result,
    _scan,
)
from jax_diffusion.diffusion import (
    _check_zero_snr,
    _is_concrete,
    check_denoising,
    check_prediction,
    check_variance,
    split_learned_range,
)
from jax_diffusion.schedules import Schedule

__all__ = ["heun_sample", "heun_step", "karras_timesteps"]


def karras_timesteps(schedule: Schedule, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """EDM's rho-spaced steps (Karras et al. 2022, eq. 5) on a discrete schedule, descending.

    Args:
      schedule: a concrete schedule with alphas_cumprod in (0, 1) at every step.
      num_steps: n, in [1, T] (n = 1: [T - 1]).
      rho: > 0; 7 in EDM, larger crowds the steps towards s_min; 1 spaces s uniformly.

    Returns:
      int32 [n], strictly descending from T - 1 to 0 (for n >= 2): each entry the step nearest
      in log s to the continuous s_i; where rounding would repeat a step, the later ones move
      down by one (and, at the top, the earlier ones), so there are always n distinct steps.

    Raises:
      ValueError: bad num_steps / rho, a traced schedule or one with alphas_cumprod = 0.
    """
    num_timesteps = schedule.num_timesteps
    num_steps = _check_int("num_steps", num_steps, 1, num_timesteps)
    rho = _check_real("rho", rho, positive=True)
    if not _is_concrete(schedule.alphas_cumprod):
        raise ValueError(
            "karras_timesteps needs a concrete schedule; got a traced one (call it outside jit)"
        )
    log_abar = schedule._log_alphas_cumprod()  # float64
    if not np.all(np.isfinite(log_abar)):
        raise ValueError("karras_timesteps needs alphas_cumprod > 0 at every step")
    log_s = 0.5 * (np.log(-np.expm1(log_abar)) - log_abar)  # log(sigma / alpha), increasing
    if num_steps == 1:
        return np.array([num_timesteps - 1], np.int32)
    s_max, s_min = np.exp(log_s[-1]), np.exp(log_s[0])
    ramp = np.linspace(0.0, 1.0, num_steps)
    s = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    steps = np.abs(log_s[None, :] - np.log(s)[:, None]).argmin(axis=1)
    for i in range(num_steps - 2, -1, -1):  # distinct: push repeats up from the bottom ...
        steps[i] = max(steps[i], steps[i + 1] + 1)
    steps[0] = min(steps[0], num_timesteps - 1)  # ... and down from the top if that overshot
    for i in range(1, num_steps):
        steps[i] = min(steps[i], steps[i - 1] - 1)
    return steps.astype(np.int32)


def heun_step(
    model_fn: ModelFn,
    schedule: Schedule,
    x: jax.Array,
    t,
    t_prev,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = False,
    denoised_fn: DenoisedFn | None = None,
) -> StepOutput:
    """One step of EDM's Algorithm 1 from step t to step t_prev < t (Heun; Euler into t_prev = -1).

    Args:
      model_fn: denoiser `model_fn(x [B, ...], t int32 [B])`.
      schedule: the noise schedule.
      x: [B, ...] x at step t.
      t: int scalar (or [B]) in [0, T - 1].
      t_prev: int scalar (or [B]) in [-1, t - 1]; -1 is the clean end, reached by an Euler
        step (one model call), any other by Heun's (two). A traced scalar t_prev selects with
        `lax.cond`; a [B] t_prev makes both (the correction masked off where t_prev = -1).
      prediction: 'eps' | 'x0' | 'v'.
      variance: model-output layout only ('learned_range': drop the variance half).
      clip_denoised, denoised_fn: applied to both x0 estimates; eps is recomputed from them.

    Returns:
      StepOutput(x_prev, x0_hat at (x, t)).
    """
    _check_model_and_schedule(model_fn, schedule)
    check_prediction(prediction)
    check_variance(variance)
    check_denoising(clip_denoised, denoised_fn)
    x = _check_x(x, "x")
    t = _check_step_t(t, x, "t")
    t_prev = _check_step_t(t_prev, x, "t_prev")
    _check_t_order(schedule, t, t_prev)
    dtype = _compute_dtype(x)

    def estimates(y, step):
        pred, _ = split_learned_range(_call_model(model_fn, y, step, variance), y, variance)
        x0_hat, eps_hat = _denoise(schedule, y, step, pred, prediction, clip_denoised, denoised_fn)
        return x0_hat.astype(dtype), eps_hat.astype(dtype)

    alpha, sigma = (_per_example(v, x) for v in _alpha_sigma(schedule, t, dtype))
    alpha_p, sigma_p = (_per_example(v, x) for v in _alpha_sigma(schedule, t_prev, dtype))
    x0_a, eps_a = estimates(x, t)
    x_euler = alpha_p * x0_a + sigma_p * eps_a  # = DDIM's step

    def corrected():
        _, eps_b = estimates(x_euler.astype(x.dtype), jnp.maximum(t_prev, 0))
        # y_prev = y + (s_prev - s) (eps_a + eps_b) / 2, times alpha_prev; sigma_p = alpha_p s_p
        s_gap = sigma_p - alpha_p * sigma / alpha
        return alpha_p / alpha * x.astype(dtype) + s_gap * 0.5 * (eps_a + eps_b)

    last = np.asarray(t_prev) < 0 if _is_concrete(t_prev) else None
    if last is not None and np.all(last):
        x_prev = x_euler
    elif last is not None and not np.any(last):
        x_prev = corrected()
    elif t_prev.ndim == 0:  # traced: one branch runs
        x_prev = jax.lax.cond(t_prev < 0, lambda: x_euler, corrected)
    else:  # per example, some at the clean end
        x_prev = jnp.where(_per_example(t_prev, x) < 0, x_euler, corrected())
    return StepOutput(x_prev.astype(x.dtype), x0_a.astype(x.dtype))


def heun_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    x_T: jax.Array,
    *,
    num_steps: int | None = None,
    rho: float = 7.0,
    timesteps=None,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = False,
    denoised_fn: DenoisedFn | None = None,
    return_trajectory: bool | int = False,
):
    """EDM's deterministic sampler (Karras et al. 2022, Algorithm 1) on the probability-flow ODE.

    Heun steps between `karras_timesteps(schedule, num_steps, rho)` (or the given `timesteps`),
    then an Euler step from the last of them into the clean end: 2 n - 1 model calls for n
    steps. x_T is taken at the first step (T - 1 for the rho-spaced ones).

    Args:
      model_fn: denoiser `model_fn(x [B, ...], t int32 [B])`.
      schedule: the noise schedule (concrete: the steps are chosen in NumPy).
      x_T: [B, ...] float start sample.
      num_steps: n, in [1, T] (None: 18, EDM's CIFAR-10 choice, or T if smaller).
      rho: the spacing exponent of `karras_timesteps`.
      timesteps: instead of num_steps / rho, the steps: concrete distinct ints in [0, T - 1],
        visited descending.
      prediction: 'eps' | 'x0' | 'v'.
      variance: model-output layout only.
      clip_denoised, denoised_fn: x0 clipping / thresholding at every model call.
      return_trajectory: False, True or a stride k (see `jax_diffusion.samplers`).

    Returns:
      x0 [B, ...] in x_T's dtype, or (x0, trajectory).

    Raises:
      ValueError: bad arguments (see `karras_timesteps`, `heun_step`).
    """
    x_T, stride = _check_common(
        model_fn, schedule, x_T, prediction, variance, clip_denoised, denoised_fn, return_trajectory
    )
    if timesteps is not None:
        ts = _given_timesteps(schedule, timesteps, num_steps=num_steps)
    else:
        n = min(18, schedule.num_timesteps) if num_steps is None else num_steps
        ts = karras_timesteps(schedule, n, rho)
    _check_zero_snr(schedule, prediction, int(ts[0]))
    ts_prev = np.append(ts[1:], -1).astype(np.int32)
    xs = (jnp.asarray(ts, jnp.int32), jnp.asarray(ts_prev))
    kw = dict(prediction=prediction, variance=variance, denoised_fn=denoised_fn)
    step_fn = functools.partial(heun_step, model_fn, schedule, clip_denoised=clip_denoised, **kw)

    def step(x, a):
        t, t_prev = a
        return step_fn(x, t, t_prev).x_prev

    x0, trajectory = _scan(step, x_T, xs, len(ts), stride, lambda x: x)
    return _result(x0, trajectory, stride)
