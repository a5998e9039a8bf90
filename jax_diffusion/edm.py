"""Karras et al. 2022 (EDM) sampling on a discrete schedule: rho-spaced steps, Heun's method, churn.

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

EDM's stochastic sampler (Algorithm 2) adds "churn" before each Heun step: the noise level is
raised from s_i to s_hat = (1 + gamma_i) s_i, gamma_i = min(S_churn / n, sqrt(2) - 1) where
S_tmin <= s_i <= S_tmax (else 0), by fresh noise, y_hat = y + S_noise sqrt(s_hat^2 - s_i^2) z,
and the Heun step starts from (y_hat, s_hat). With S_noise = 1 that is a draw from the forward
process q(x_{t_hat} | x_t), so it leaves the marginals exact while the ODE steps that follow
remove the errors of the earlier ones (EDM section 4). On the discrete schedule s_hat is rounded
to the step t_hat >= t nearest in log s (`churn_timesteps`); `churn_step` is one noise increase.
`heun_sample(..., rng=key, s_churn=...)` runs Algorithm 2; s_churn = 0 (the default) is
Algorithm 1.

`heun_sample` is one `jax.lax.scan` (the final Euler step is a `lax.cond` branch inside it, so
no model call is wasted), takes any denoiser `model_fn(x, t)` and works under `jax.jit`,
`jax.vmap` and the samplers' `return_trajectory`. Imports only jax and numpy.
"""

from __future__ import annotations

import functools
import math
import numbers

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
    _check_rng,
    _check_zero_snr,
    _is_concrete,
    check_denoising,
    check_prediction,
    check_schedule,
    check_variance,
    split_learned_range,
)
from jax_diffusion.schedules import Schedule

__all__ = ["churn_step", "churn_timesteps", "heun_sample", "heun_step", "karras_timesteps"]


def _log_s(schedule: Schedule) -> np.ndarray:
    """log s_t = log(sigma_t / alpha_t) per step, float64, increasing; +inf where alpha_t = 0."""
    with np.errstate(divide="ignore"):
        log_abar = schedule._log_alphas_cumprod()  # float64
        return 0.5 * (np.log(-np.expm1(log_abar)) - log_abar)


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
    log_s = _log_s(schedule)
    if not np.all(np.isfinite(log_s)):
        raise ValueError("karras_timesteps needs alphas_cumprod > 0 at every step")
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


def _check_churn(s_churn, s_tmin, s_tmax) -> tuple[float, float, float]:
    s_churn = _check_real("s_churn", s_churn)
    s_tmin = _check_real("s_tmin", s_tmin)
    if s_churn < 0:
        raise ValueError(f"s_churn must be >= 0 (0: no churn); got {s_churn!r}")
    if s_tmin < 0:
        raise ValueError(f"s_tmin must be >= 0 (a noise level sigma / alpha); got {s_tmin!r}")
    ok = isinstance(s_tmax, numbers.Real) and not isinstance(s_tmax, bool)
    if not (ok and float(s_tmax) >= s_tmin):  # NaN fails too
        raise ValueError(
            f"s_tmax must be a number >= s_tmin = {s_tmin} (inf: no bound); got {s_tmax!r}"
        )
    return s_churn, s_tmin, float(s_tmax)


def _check_s_noise(s_noise) -> float:
    s_noise = _check_real("s_noise", s_noise)
    if s_noise < 0:
        raise ValueError(f"s_noise must be >= 0 (1: the forward process's noise); got {s_noise!r}")
    return s_noise


def churn_timesteps(
    schedule: Schedule, timesteps, s_churn: float, *, s_tmin: float = 0.0, s_tmax: float = math.inf
) -> np.ndarray:
    """The raised steps t_hat_i of EDM's stochastic sampler (Karras et al. 2022, Algorithm 2).

    gamma_i = min(s_churn / n, sqrt(2) - 1) where s_tmin <= s_{t_i} <= s_tmax, else 0 (n the
    number of steps, s_t = sigma_t / alpha_t); t_hat_i is the step nearest in log s to
    (1 + gamma_i) s_{t_i}, kept in [t_i, T - 1]. So the top step T - 1 gets no churn, and a
    gamma_i too small to reach the next step up gets none either (the model is only trained at
    the discrete steps).

    Args:
      schedule: a concrete schedule.
      timesteps: the sampler's steps, concrete distinct ints in [0, T - 1], descending (e.g.
        `karras_timesteps`).
      s_churn: >= 0; 0 gives t_hat = timesteps. EDM uses 40-80 on ImageNet-64.
      s_tmin, s_tmax: the window of noise levels s = sigma / alpha that get churn, 0 <= s_tmin
        <= s_tmax (inf allowed).

    Returns:
      int32 [n], t_hat_i >= t_i, for the steps in descending order.

    Raises:
      ValueError: bad timesteps / s_churn / s_tmin / s_tmax, or a traced schedule.
    """
    ts = _given_timesteps(schedule, timesteps)
    s_churn, s_tmin, s_tmax = _check_churn(s_churn, s_tmin, s_tmax)
    if not _is_concrete(schedule.alphas_cumprod):
        raise ValueError(
            "churn_timesteps needs a concrete schedule; got a traced one (call it outside jit)"
        )
    log_s = _log_s(schedule)
    s = np.exp(log_s[ts])
    window = (s >= s_tmin) & (s <= s_tmax) & np.isfinite(s)
    gamma = np.where(window, min(s_churn / len(ts), math.sqrt(2.0) - 1.0), 0.0)
    target = log_s[ts] + np.log1p(gamma)
    with np.errstate(invalid="ignore"):  # inf - inf at a zero-SNR step, never the nearest
        distance = np.abs(log_s[None, :] - target[:, None])
    nearest = np.nanargmin(np.where(np.isnan(distance), np.inf, distance), axis=1)
    return np.where(gamma > 0, np.maximum(nearest, ts), ts).astype(np.int32)


def churn_step(
    schedule: Schedule, x: jax.Array, t, t_hat, rng, *, s_noise: float = 1.0
) -> jax.Array:
    """EDM's noise increase (Algorithm 2, lines 5-6): x at step t to x_hat at step t_hat >= t.

    In y = x / alpha, y_hat = y + s_noise sqrt(s_hat^2 - s^2) z, z ~ N(0, I); in x,

      x_hat = (alpha_hat / alpha) x + s_noise sigma_hat sqrt(1 - SNR(t_hat) / SNR(t)) z,

    which for s_noise = 1 is the forward process q(x_{t_hat} | x_t) (Ho et al. 2020, eq. 4
    composed from t to t_hat). Where t_hat = t it returns x unchanged.

    Args:
      schedule: the noise schedule.
      x: [B, ...] x at step t.
      t, t_hat: int scalars or [B], 0 <= t <= t_hat <= T - 1.
      rng: PRNG key for z.
      s_noise: >= 0, EDM's S_noise (1.007 on ImageNet-64): noise slightly above the forward
        process's, to offset the denoiser's tendency to remove too much.

    Returns:
      x_hat [B, ...] in x's dtype.
    """
    check_schedule(schedule)
    _check_rng(rng, why=" for the noise of a churn step")
    s_noise = _check_s_noise(s_noise)
    x = _check_x(x, "x")
    t = _check_step_t(t, x, "t")
    t_hat = _check_step_t(t_hat, x, "t_hat")
    if _is_concrete(t) and _is_concrete(t_hat):
        t_, hat = np.asarray(t), np.asarray(t_hat)
        last = schedule.num_timesteps - 1
        if not (np.all((0 <= t_) & (t_ <= hat)) and np.all(hat <= last)):
            raise ValueError(
                f"churn_step needs 0 <= t <= t_hat <= {last}; got t = {t_.tolist()}, "
                f"t_hat = {hat.tolist()}"
            )
    dtype = _compute_dtype(x)
    alpha, _ = (_per_example(v, x) for v in _alpha_sigma(schedule, t, dtype))
    alpha_hat, sigma_hat = (_per_example(v, x) for v in _alpha_sigma(schedule, t_hat, dtype))
    # 1 - SNR(t_hat) / SNR(t) = -expm1(logsnr_hat - logsnr), exact to a rounding where t_hat = t
    gap = _per_example(schedule.logsnr_table[t_hat] - schedule.logsnr_table[t], x).astype(dtype)
    std = s_noise * sigma_hat * jnp.sqrt(-jnp.expm1(gap))
    z = jax.random.normal(rng, x.shape, dtype)
    return (alpha_hat / alpha * x.astype(dtype) + std * z).astype(x.dtype)


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
    rng=None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
):
    """EDM's sampler (Karras et al. 2022): deterministic (Algorithm 1) or with churn (Algorithm 2).

    Heun steps between `karras_timesteps(schedule, num_steps, rho)` (or the given `timesteps`),
    then an Euler step from the last of them into the clean end: 2 n - 1 model calls for n
    steps. x_T is taken at the first step (T - 1 for the rho-spaced ones). With s_churn > 0,
    before each step the chain is noised from t_i up to t_hat_i = `churn_timesteps(...)[i]`
    (`churn_step`) and the Heun step starts there; the model calls are the same.

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
      rng: PRNG key, needed where s_churn > 0 (key i of `jax.random.split(rng, n)` draws step
        i's noise); unused at s_churn = 0.
      s_churn, s_tmin, s_tmax: EDM's churn and the window of s = sigma / alpha that gets it
        (see `churn_timesteps`); s_churn = 0 is Algorithm 1. EDM's ImageNet-64 settings: 40-80,
        0.05, 50.
      s_noise: the churn noise's scale (see `churn_step`; EDM: 1.003-1.007).

    Returns:
      x0 [B, ...] in x_T's dtype, or (x0, trajectory).

    Raises:
      ValueError: bad arguments (see `karras_timesteps`, `churn_timesteps`, `heun_step`), or
        s_churn > 0 without rng.
    """
    x_T, stride = _check_common(
        model_fn, schedule, x_T, prediction, variance, clip_denoised, denoised_fn, return_trajectory
    )
    if timesteps is not None:
        ts = _given_timesteps(schedule, timesteps, num_steps=num_steps)
    else:
        n = min(18, schedule.num_timesteps) if num_steps is None else num_steps
        ts = karras_timesteps(schedule, n, rho)
    s_churn = _check_churn(s_churn, s_tmin, s_tmax)[0]
    s_noise = _check_s_noise(s_noise)
    if s_churn > 0:
        _check_rng(rng, why=" for heun_sample with s_churn > 0")
        ts_hat = churn_timesteps(schedule, ts, s_churn, s_tmin=s_tmin, s_tmax=s_tmax)
    else:
        ts_hat = ts
    _check_zero_snr(schedule, prediction, int(ts_hat.max()))
    ts_prev = np.append(ts[1:], -1).astype(np.int32)
    xs = (jnp.asarray(ts, jnp.int32), jnp.asarray(ts_hat), jnp.asarray(ts_prev))
    if s_churn > 0:
        xs += (jax.random.split(rng, len(ts)),)
    kw = dict(prediction=prediction, variance=variance, denoised_fn=denoised_fn)
    step_fn = functools.partial(heun_step, model_fn, schedule, clip_denoised=clip_denoised, **kw)

    def step(x, a):
        t, t_hat, t_prev = a[:3]
        if s_churn > 0:
            x = churn_step(schedule, x, t, t_hat, a[3], s_noise=s_noise)
        return step_fn(x, t_hat, t_prev).x_prev

    x0, trajectory = _scan(step, x_T, xs, len(ts), stride, lambda x: x)
    return _result(x0, trajectory, stride)
