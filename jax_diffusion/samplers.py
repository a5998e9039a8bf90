"""Reverse-process samplers: DDPM, DDIM and DPM-Solver++(2M), each one `lax.scan`.

A denoiser is any callable `model_fn(x, t) -> model_output` with x [B, ...] and t int32 [B]
(index t is the paper's step t + 1); the output is an eps, x0 or v prediction of x's shape, or
twice x's channels on the last axis for `variance="learned_range"`. Samplers never import Flax:
close over parameters, e.g. `model_fn = lambda x, t: model.apply(params, x, t)`.

Each sampler is ONE `jax.lax.scan` over its steps, so its compile time does not grow with the
number of steps and its memory is O(1) in steps (unless a trajectory is requested). Every step
is also exposed as a small pure function (`ddpm_step`, `ddim_step`, `dpm_solver_pp_step`) for
custom loops. All of them work under `jax.jit`, `jax.vmap` (e.g. over a batch of seeds),
`jax.pmap` and `jax.shard_map`.

`return_trajectory` (every sampler): False returns x0 [B, ...]; True returns `(x0, trajectory)`
with trajectory [num_steps + 1, B, ...]: x_T first, then the state after each step, the last
entry equal to x0. A positive int k keeps only the states after steps 0, k, 2k, ...,
k * (num_steps // k), trajectory [num_steps // k + 1, B, ...] written in place into a buffer of
that size and returned as is (the compiled program holds the trajectory once, memory
O(num_steps / k)); x0 is its last entry only when k divides num_steps.

Classifier-free guidance and dynamic thresholding live in `jax_diffusion.guidance` and are
re-exported here: `classifier_free_guidance` wraps a conditional model into a `model_fn`,
`dynamic_threshold` is a `denoised_fn`.

Arguments are validated eagerly: a bad static argument raises `ValueError` naming the argument,
the value received and what is allowed, before any tracing work; a `model_fn` whose output does
not match x_T raises `ValueError` when the step is traced, before anything is compiled.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_diffusion._checks import check_int as _check_int
from jax_diffusion.diffusion import (
    _check_rng,
    _check_zero_snr,
    _is_concrete,
    _is_real,
    check_denoising,
    check_prediction,
    check_schedule,
    check_variance,
    denoised_estimates,
    p_mean_variance,
    split_learned_range,
)
from jax_diffusion.guidance import classifier_free_guidance, dynamic_threshold
from jax_diffusion.schedules import Schedule, _check_timestep_subset

__all__ = [
    "SPACINGS",
    "StepOutput",
    "classifier_free_guidance",
    "ddim_sample",
    "ddim_step",
    "ddpm_sample",
    "ddpm_step",
    "dpm_solver_pp_sample",
    "dpm_solver_pp_step",
    "dpm_solver_pp_timesteps",
    "dynamic_threshold",
    "sampling_timesteps",
]

SPACINGS = ("leading", "trailing", "linspace")

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
DenoisedFn = Callable[[jax.Array], jax.Array]


class StepOutput(NamedTuple):
    """Result of one sampler step.

    x_prev: [B, ...] the sample at the next (less noisy) step, in x's dtype.
    x0_hat: [B, ...] the denoised estimate used by the step (after clipping / thresholding).
    """

    x_prev: jax.Array
    x0_hat: jax.Array


# --------------------------------------------------------------------------------------------
# Validation helpers (eager, on static / concrete arguments).


def _check_spacing(spacing: str) -> str:
    if spacing not in SPACINGS:
        raise ValueError(
            f"spacing must be one of 'leading', 'trailing', 'linspace'; got {spacing!r}"
        )
    return spacing


def _check_x(x, name: str = "x_T") -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim < 1 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"{name} must be a floating array [B, ...] with a leading batch axis; "
            f"got shape {x.shape} and dtype {x.dtype}"
        )
    return x


def _check_eta(eta) -> bool:
    """Validates eta >= 0; returns True when eta is statically zero (deterministic DDIM)."""
    if not _is_real(eta) or jnp.ndim(eta) != 0:
        raise ValueError(f"eta must be a finite scalar >= 0; got {eta!r}")
    if _is_concrete(eta):
        value = float(eta)
        if not 0.0 <= value < math.inf:
            raise ValueError(f"eta must be a finite scalar >= 0; got {eta!r}")
        return value == 0.0
    return False


def _check_stride(return_trajectory) -> int | None:
    """False/None -> None; True -> 1; a positive int k -> k."""
    if return_trajectory is None or isinstance(return_trajectory, bool | np.bool_):
        return 1 if return_trajectory else None
    if isinstance(return_trajectory, int | np.integer) and return_trajectory >= 1:
        return int(return_trajectory)
    raise ValueError(
        f"return_trajectory must be a bool or a positive int stride k; got {return_trajectory!r}"
    )


def _check_model_and_schedule(model_fn, schedule) -> None:
    if not callable(model_fn):
        raise ValueError(f"model_fn must be a callable model_fn(x, t); got {model_fn!r}")
    check_schedule(schedule)


def _check_t_order(schedule, t, t_prev, t_last=None) -> None:
    """Where the steps are concrete: t in [0, T - 1], t_prev in [-1, t - 1], t_last -1 or > t."""
    if not all(_is_concrete(a) for a in (t, t_prev, t_last) if a is not None):
        return
    t_, prev = np.asarray(t), np.asarray(t_prev)
    num_timesteps = schedule.num_timesteps
    if t_.size and not (0 <= t_.min() and t_.max() <= num_timesteps - 1):
        raise ValueError(f"t must lie in [0, {num_timesteps - 1}]; got {t_.tolist()}")
    if not np.all((prev >= -1) & (prev < t_)):
        raise ValueError(f"t_prev must lie in [-1, t - 1] (t = {t_.tolist()}); got {prev.tolist()}")
    if t_last is not None:
        last = np.asarray(t_last)
        if not np.all((last == -1) | (last > t_)):
            raise ValueError(
                f"t_last must be -1 (no history) or > t (t = {t_.tolist()}); got {last.tolist()}"
            )


def _check_common(
    model_fn, schedule, x_T, prediction, variance, clip_denoised, denoised_fn, return_trajectory
):
    _check_model_and_schedule(model_fn, schedule)
    check_prediction(prediction)
    check_variance(variance)
    check_denoising(clip_denoised, denoised_fn)
    return _check_x(x_T), _check_stride(return_trajectory)


# --------------------------------------------------------------------------------------------
# Timestep sequences.


def sampling_timesteps(num_timesteps: int, num_steps: int, spacing: str = "leading") -> np.ndarray:
    """The descending subsequence of steps a DDIM-style sampler visits.

    For `num_timesteps=1000, num_steps=50`:
      'leading':  980, 960, ..., 20, 0        (arange(n) * (T // n), the DDIM paper / diffusers)
      'trailing': 999, 979, ..., 39, 19       (round(T - arange(n) * T / n) - 1, Lin et al. 2024,
                                               table 2: starts at the last step)
      'linspace': round(linspace(0, T - 1, n)) reversed: 999, 979, ..., 20, 0.
    'leading' starts at (n - 1) (T // n) and 'linspace' with n = 1 at 0: with few steps they
    skip the noisiest steps, where x_T ~ N(0, I) is what the chain expects, and the samples
    come out biased (n = 1 returns x_T almost unchanged). 'trailing' always starts at T - 1
    (Lin et al. 2024, section 3.3); 'leading' is the DDIM paper's and diffusers' default.

    diffusers: 'leading' is its steps_offset=0 (Stable Diffusion's steps_offset=1 visits
    981, ..., 1: add 1 and run `ddim_step`). Its 'trailing', round(arange(T, 0, -T / n)) - 1,
    accumulates T / n in floating point, so where T - i T / n ends in .5 it can round the other
    way (T = 1000, n = 48: 936 where this gives 937), and for some n it returns n + 1 steps,
    the last one -1 (T = 1000, n = 61); this sequence has exactly n distinct steps.

    Args:
      num_timesteps: T, the schedule length.
      num_steps: n, in [1, T].
      spacing: 'leading' | 'trailing' | 'linspace'.

    Returns:
      [n] int32 NumPy array, strictly descending, in [0, T - 1].

    Raises:
      ValueError: unknown spacing or num_steps outside [1, T].
    """
    num_timesteps = _check_int("num_timesteps", num_timesteps, 1)
    num_steps = _check_int("num_steps", num_steps, 1, num_timesteps)
    _check_spacing(spacing)
    i = np.arange(num_steps)
    if spacing == "leading":
        ts = i * (num_timesteps // num_steps)
    elif spacing == "trailing":
        ts = np.round(num_timesteps - i * (num_timesteps / num_steps)) - 1
    else:
        ts = np.round(np.linspace(0, num_timesteps - 1, num_steps))
    # Raw values are >= 1 apart for n <= T, so rounding keeps them distinct.
    return np.sort(ts.astype(np.int32))[::-1].copy()


def dpm_solver_pp_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """Steps at which DPM-Solver++ calls the model: round(linspace(0, T-1, n+1)) reversed, minus 0.

    The first entry is T - 1 (where x_T is taken); after the last entry the solver steps to
    sigma = 0. num_steps must lie in [1, T - 1] so that the n + 1 grid points are distinct.

    Returns:
      [num_steps] int32 NumPy array, strictly descending, in [1, T - 1].
    """
    num_timesteps = _check_int("num_timesteps", num_timesteps, 2)  # n + 1 distinct points
    num_steps = _check_int("num_steps", num_steps, 1, num_timesteps - 1)
    ts = np.round(np.linspace(0, num_timesteps - 1, num_steps + 1)).astype(np.int64)[::-1]
    return ts[:-1].astype(np.int32)


def _given_timesteps(schedule: Schedule, timesteps, **instead) -> np.ndarray:
    """A sampler's `timesteps` argument: concrete distinct ints in [0, T - 1], any order,
    returned strictly descending as int32. `instead` holds the arguments that choose the steps
    otherwise (e.g. num_steps, spacing): set together with timesteps they are an error."""
    given = {name: value for name, value in instead.items() if value is not None}
    if given:
        listed = ", ".join(f"{name}={value!r}" for name, value in given.items())
        raise ValueError(
            f"pass timesteps or {' / '.join(instead)}, not both; got timesteps and {listed}"
        )
    if not _is_concrete(timesteps):
        raise ValueError(
            "timesteps must be concrete ints (they set the chain's length); got a traced "
            "array (close over them instead of passing them as a jit argument)"
        )
    return _check_timestep_subset(timesteps, schedule.num_timesteps)[::-1].astype(np.int32)


# --------------------------------------------------------------------------------------------
# Shared step pieces.


def _compute_dtype(x):
    return jnp.promote_types(x.dtype, jnp.float32)


def _per_example(values: jax.Array, x: jax.Array) -> jax.Array:
    """A scalar stays a scalar; [B] becomes [B, 1, ..., 1] to broadcast against x [B, ...]."""
    if values.ndim == 1:
        values = values.reshape(values.shape + (1,) * (x.ndim - 1))
    return values


def _check_step_t(t, x, name: str) -> jax.Array:
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.integer) or t.ndim > 1:
        raise ValueError(f"{name} must be an int scalar or int [B]; got {t.dtype}{list(t.shape)}")
    if t.ndim == 1 and t.shape[0] != x.shape[0]:
        raise ValueError(f"{name} has shape {t.shape} but x has batch size {x.shape[0]}")
    return t


def _call_model(model_fn, x, t, variance: str):
    """model_fn(x, t broadcast to [B]), its output shape checked against x and `variance`."""
    t_b = jnp.broadcast_to(t, x.shape[:1]).astype(jnp.int32)
    out = model_fn(x, t_b)
    want = x.shape if variance != "learned_range" else x.shape[:-1] + (2 * x.shape[-1],)
    got = jnp.shape(out)
    if got != want:
        raise ValueError(
            f"model_fn(x, t) must return shape {want} for x of shape {x.shape} "
            f"(variance={variance!r}); got {got}. Check the rank and batch of x_T against "
            "what model_fn returns."
        )
    return out


def _denoise(schedule, x, t, pred, prediction, clip_denoised, denoised_fn):
    return denoised_estimates(
        schedule,
        model_output=pred,
        xt=x,
        t=t,
        prediction=prediction,
        clip_denoised=clip_denoised,
        denoised_fn=denoised_fn,
    )


def _sqrt_clamped(u: jax.Array) -> jax.Array:
    """sqrt(max(u, 0)) whose derivative is 0, not inf * 0 = NaN, where u <= 0 (clamped)."""
    positive = u > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, u, 1.0)), 0.0)


def _alpha_sigma(schedule: Schedule, t: jax.Array, dtype):
    """(alpha_t, sigma_t) from the float64-built tables; t = -1 is the clean end (1, 0).

    Gathering sqrt tables instead of taking sqrt(1 - alphas_cumprod) in float32 keeps sigma
    accurate where alphas_cumprod rounds to 1.
    """
    i = jnp.maximum(t, 0)
    alpha = jnp.where(t >= 0, schedule.sqrt_alphas_cumprod[i], 1.0).astype(dtype)
    sigma = jnp.where(t >= 0, schedule.sqrt_one_minus_alphas_cumprod[i], 0.0).astype(dtype)
    return alpha, sigma


# --------------------------------------------------------------------------------------------
# DDPM.


def ddpm_step(
    model_fn: ModelFn,
    schedule: Schedule,
    x: jax.Array,
    t,
    rng,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = False,
    denoised_fn: DenoisedFn | None = None,
    model_t=None,
) -> StepOutput:
    """One ancestral step x_{t-1} ~ p(x_{t-1} | x_t) (Ho et al. 2020, Algorithm 2).

    x_prev = mu_theta(x_t, t) + sigma_t z, z ~ N(0, I), with no noise where t = 0.

    Args:
      model_fn: denoiser `model_fn(x [B, ...], t int32 [B])`.
      schedule: the schedule whose index `t` this step takes (possibly `Schedule.respace`d).
      x: [B, ...] x_t.
      t: int scalar or [B], index into `schedule`.
      rng: PRNG key for z.
      prediction: 'eps' | 'x0' | 'v'.
      variance: 'fixed_small' | 'fixed_large' | 'learned_range' (see `p_mean_variance`).
      clip_denoised: clip x0_hat to [-1, 1].
      denoised_fn: optional x0_hat -> x0_hat map applied after clipping, e.g. `dynamic_threshold`.
      model_t: the step passed to model_fn; defaults to `t`. With a respaced schedule pass the
        original step (`sorted(timesteps)[t]`).

    Returns:
      StepOutput(x_prev, x0_hat).
    """
    _check_model_and_schedule(model_fn, schedule)
    check_prediction(prediction)
    check_variance(variance)
    check_denoising(clip_denoised, denoised_fn)
    _check_rng(rng, why=" for the noise of a DDPM step")
    x = _check_x(x, "x")
    t = _check_step_t(t, x, "t")
    model_t = t if model_t is None else _check_step_t(model_t, x, "model_t")
    out = _call_model(model_fn, x, model_t, variance)
    pmv = p_mean_variance(
        schedule,
        model_output=out,
        xt=x,
        t=t,
        prediction=prediction,
        variance=variance,
        clip_denoised=clip_denoised,
        denoised_fn=denoised_fn,
    )
    dtype = _compute_dtype(x)
    noise = jax.random.normal(rng, x.shape, dtype)
    nonzero = _per_example((t != 0).astype(dtype), x)
    std = jnp.exp(0.5 * pmv.log_variance.astype(dtype))
    x_prev = pmv.mean.astype(dtype) + nonzero * std * noise
    return StepOutput(x_prev.astype(x.dtype), pmv.x0_hat.astype(x.dtype))


# --------------------------------------------------------------------------------------------
# The scan driver.


def _scan(step_fn, carry, xs, num_steps: int, stride: int | None, x_of):
    """Runs `carry = step_fn(carry, xs[i])` for every i in ONE lax.scan.

    With a stride k it also returns the states after steps 0, k, 2k, ..., in a buffer of
    exactly num_steps // k + 1 slots written in place and returned as is, so the compiled
    program holds one trajectory, O(num_steps / k), not O(num_steps).
    """
    if stride is None:
        carry, _ = jax.lax.scan(lambda c, a: (step_fn(c, a), None), carry, xs)
        return carry, None
    num_saved = num_steps // stride + 1
    x_start = x_of(carry)
    buf = jnp.zeros((num_saved, *x_start.shape), x_start.dtype).at[0].set(x_start)

    def body(state, a):
        c, buf, i = state
        c = step_fn(c, a)
        i = i + 1
        x = x_of(c)
        # Slot i // k holds the state after step (i // k) k: an off-stride step rewrites the
        # slot's own value rather than using a scratch slot, which would have to be sliced off
        # (a second copy of the trajectory) at the end.
        slot = i // stride
        if stride > 1:
            kept = jax.lax.dynamic_index_in_dim(buf, slot, 0, keepdims=False)
            x = jnp.where(i % stride == 0, x, kept)
        buf = jax.lax.dynamic_update_index_in_dim(buf, x, slot, 0)
        return (c, buf, i), None

    (carry, buf, _), _ = jax.lax.scan(body, (carry, buf, jnp.int32(0)), xs)
    return carry, buf


def _result(x0, trajectory, stride):
    return x0 if stride is None else (x0, trajectory)


def ddpm_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    x_T: jax.Array,
    rng,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = False,
    denoised_fn: DenoisedFn | None = None,
    timesteps=None,
    return_trajectory: bool | int = False,
):
    """Ancestral sampling from p(x_0) (Ho et al. 2020, Algorithm 2; seed 004 section 4.5).

    For t = T-1, ..., 0: x_{t-1} = mu_theta(x_t, t) + sigma_t z, no noise at the last step.
    With `timesteps`, the chain runs on that subsequence of steps with the respaced betas of
    Nichol & Dhariwal 2021, section 4 (`Schedule.respace`); model_fn is called with the
    original steps.

    Args:
      model_fn: denoiser `model_fn(x [B, ...], t int32 [B])`.
      schedule: the noise schedule (T = num_timesteps).
      x_T: [B, ...] float, the start of the chain, typically N(0, I).
      rng: PRNG key; split into one key per step.
      prediction: 'eps' | 'x0' | 'v'.
      variance: 'fixed_small' (beta_tilde), 'fixed_large' (beta) or 'learned_range'
        (Nichol & Dhariwal 2021, eq. 15; model output has twice the channels).
      clip_denoised: clip x0_hat to [-1, 1] at every step.
      denoised_fn: optional x0_hat -> x0_hat map, e.g. `dynamic_threshold`.
      timesteps: None (all T steps) or concrete distinct ints in [0, T - 1], e.g.
        `sampling_timesteps(T, 250)`. Needs a concrete schedule (close over it rather than
        passing it as a traced jit argument).
      return_trajectory: False, True or a stride k (see the module docstring).

    Returns:
      x0 [B, ...] in x_T's dtype, or (x0, trajectory) with `return_trajectory`.

    Raises:
      ValueError: bad prediction / variance / timesteps / return_trajectory, missing rng, or a
        model_fn output that does not match x_T.
    """
    x_T, stride = _check_common(
        model_fn, schedule, x_T, prediction, variance, clip_denoised, denoised_fn, return_trajectory
    )
    _check_rng(rng, why=" for ddpm_sample")
    if timesteps is None:
        sched = schedule
        index = np.arange(schedule.num_timesteps)[::-1]
        model_ts = index
    else:
        if not _is_concrete(schedule.alphas_cumprod):
            raise ValueError(
                "timesteps needs a concrete schedule to respace; got a traced schedule "
                "(close over the schedule instead of passing it as a jit argument)"
            )
        model_ts = _given_timesteps(schedule, timesteps)
        sched = schedule.respace(model_ts)
        index = np.arange(sched.num_timesteps)[::-1]
    _check_zero_snr(schedule, prediction, int(model_ts[0]))
    num_steps = index.shape[0]
    xs = (
        jnp.asarray(index, jnp.int32),
        jnp.asarray(model_ts, jnp.int32),
        jax.random.split(rng, num_steps),
    )

    kw = dict(prediction=prediction, variance=variance, denoised_fn=denoised_fn)
    kw.update(clip_denoised=clip_denoised)
    step_fn = functools.partial(ddpm_step, model_fn, sched, **kw)

    def step(x, a):
        t, model_t, key = a
        return step_fn(x, t, key, model_t=model_t).x_prev

    x0, trajectory = _scan(step, x_T, xs, num_steps, stride, lambda x: x)
    return _result(x0, trajectory, stride)


# --------------------------------------------------------------------------------------------
# DDIM.


def ddim_step(
    model_fn: ModelFn,
    schedule: Schedule,
    x: jax.Array,
    t,
    t_prev,
    rng=None,
    *,
    eta=0.0,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = False,
    denoised_fn: DenoisedFn | None = None,
) -> StepOutput:
    """One DDIM step from step t to step t_prev < t (Song et al. 2021, eq. 12).

    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z,
    sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev) (eq. 16).
    eta = 0 is deterministic (the probability-flow ODE's first-order exponential integrator);
    eta = 1 with t_prev = t - 1 is the DDPM step with variance beta_tilde. For eta > 1 the
    direction coefficient is clamped at 0 instead of going NaN.

    Args:
      model_fn: denoiser `model_fn(x [B, ...], t int32 [B])`.
      schedule: the (not respaced) noise schedule.
      x: [B, ...] x at step t.
      t: int scalar or [B] in [0, T - 1].
      t_prev: int scalar or [B] in [-1, t - 1]; -1 means the clean end (alphas_cumprod = 1),
        where the step returns x0_hat.
      rng: PRNG key for z; required unless eta is statically 0.
      eta: scalar >= 0 (may be traced, then rng is required).
      prediction: 'eps' | 'x0' | 'v'.
      variance: only the layout of the model output matters: 'learned_range' drops its
        variance half, which DDIM does not use.
      clip_denoised, denoised_fn: x0_hat clipping / thresholding; eps_hat is recomputed from
        the altered x0_hat.

    Returns:
      StepOutput(x_prev, x0_hat).
    """
    _check_model_and_schedule(model_fn, schedule)
    check_prediction(prediction)
    check_variance(variance)
    check_denoising(clip_denoised, denoised_fn)
    deterministic = _check_eta(eta)
    if not deterministic:
        _check_rng(rng, why=" when eta is not 0")
    x = _check_x(x, "x")
    t = _check_step_t(t, x, "t")
    t_prev = _check_step_t(t_prev, x, "t_prev")
    _check_t_order(schedule, t, t_prev)
    pred, _ = split_learned_range(_call_model(model_fn, x, t, variance), x, variance)
    x0_hat, eps_hat = _denoise(schedule, x, t, pred, prediction, clip_denoised, denoised_fn)
    dtype = _compute_dtype(x)
    alpha, sigma = (_per_example(v, x) for v in _alpha_sigma(schedule, t, dtype))
    alpha_prev, sigma_prev = (_per_example(v, x) for v in _alpha_sigma(schedule, t_prev, dtype))
    x0_hat, eps_hat = x0_hat.astype(dtype), eps_hat.astype(dtype)
    if deterministic:
        x_prev = alpha_prev * x0_hat + sigma_prev * eps_hat
    else:
        # 1 - abar_t / abar_prev, from whichever tables avoid cancellation: the sigma^2 difference
        # where abar_prev is near 1, the alpha^2 ratio where it is small.
        abar_prev = alpha_prev**2
        ratio_gap = jnp.where(
            abar_prev > 0.5,
            (sigma**2 - sigma_prev**2) / abar_prev,
            1.0 - alpha**2 / jnp.maximum(abar_prev, jnp.finfo(dtype).tiny),
        )
        eta = jnp.asarray(eta, dtype)
        sigma_eta = eta * sigma_prev / sigma * _sqrt_clamped(ratio_gap)
        # clamped at 0 for eta > 1 and on the last step (sigma_prev = sigma_eta = 0), where
        # a plain sqrt would make the gradient with respect to a traced eta NaN
        direction = _sqrt_clamped(sigma_prev**2 - sigma_eta**2)
        noise = jax.random.normal(rng, x.shape, dtype)
        x_prev = alpha_prev * x0_hat + direction * eps_hat + sigma_eta * noise
    return StepOutput(x_prev.astype(x.dtype), x0_hat.astype(x.dtype))


def ddim_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    x_T: jax.Array,
    rng=None,
    *,
    num_steps: int | None = None,
    eta=0.0,
    spacing: str | None = None,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = False,
    denoised_fn: DenoisedFn | None = None,
    timesteps=None,
    return_trajectory: bool | int = False,
):
    """DDIM sampling (Song et al. 2021, eq. 12) over a descending subsequence of the steps.

    The sequence is `sampling_timesteps(T, num_steps, spacing)`, or the given `timesteps`. x_T
    is taken at its first entry; each step goes from its t to the NEXT entry of the sequence
    (not t - T // num_steps), and the last step to alphas_cumprod = 1, returning that step's
    x0_hat.

    diffusers' DDIMScheduler equivalents: this is set_alpha_to_one=True with clip_sample=False
    (its default is clip_sample=True: pass clip_denoised=True). Its set_alpha_to_one=False
    (Stable Diffusion) ends at alphas_cumprod[0] instead: loop `ddim_step` with t_prev = 0 on
    the last step. With eta = 0 the samples agree with FlaxDDIMScheduler's (diffusers 0.30.3,
    the exact Gaussian denoiser) to 1e-12 in float64 (to 2e-6 in float32) for 'leading' and,
    driven on this sequence, 'trailing'.

    Args:
      model_fn: denoiser `model_fn(x [B, ...], t int32 [B])`.
      schedule: the noise schedule.
      x_T: [B, ...] float start sample.
      rng: PRNG key, required unless eta is statically 0 (deterministic sampling).
      num_steps: number of model calls, in [1, T] (None: 50).
      eta: scalar >= 0; 0 deterministic, 1 the DDPM-like (beta_tilde) posterior variance.
      spacing: 'leading' | 'trailing' | 'linspace' (see `sampling_timesteps`; None:
        'leading'). Use 'trailing' to start at t = T - 1 (Lin et al. 2024).
      prediction: 'eps' | 'x0' | 'v'.
      variance: model-output layout only ('learned_range': drop the variance half).
      clip_denoised, denoised_fn: x0_hat clipping / thresholding at every step.
      timesteps: instead of num_steps and spacing, the steps to visit: concrete distinct ints
        in [0, T - 1], any order (visited descending), e.g. the DDIM paper's quadratic
        sequence for CIFAR10 (section D.2) or diffusers' steps_offset=1 sequence
        `sampling_timesteps(T, n) + 1`.
      return_trajectory: False, True or a stride k (see the module docstring).

    Returns:
      x0 [B, ...] in x_T's dtype, or (x0, trajectory) with `return_trajectory`.
    """
    x_T, stride = _check_common(
        model_fn, schedule, x_T, prediction, variance, clip_denoised, denoised_fn, return_trajectory
    )
    deterministic = _check_eta(eta)
    if not deterministic:
        _check_rng(rng, why=" when eta is not 0")
    if timesteps is None:
        spacing = "leading" if spacing is None else spacing
        ts = sampling_timesteps(
            schedule.num_timesteps, 50 if num_steps is None else num_steps, spacing
        )
    else:
        ts = _given_timesteps(schedule, timesteps, num_steps=num_steps, spacing=spacing)
    num_steps = len(ts)
    _check_zero_snr(schedule, prediction, int(ts[0]))
    ts_prev = np.append(ts[1:], -1)
    keys = None if deterministic else jax.random.split(rng, num_steps)
    xs = (jnp.asarray(ts, jnp.int32), jnp.asarray(ts_prev, jnp.int32), keys)

    kw = dict(prediction=prediction, variance=variance, denoised_fn=denoised_fn)
    kw.update(clip_denoised=clip_denoised)
    eta = 0.0 if deterministic else eta
    step_fn = functools.partial(ddim_step, model_fn, schedule, eta=eta, **kw)

    def step(x, a):
        t, t_prev, key = a
        return step_fn(x, t, t_prev, key).x_prev

    x0, trajectory = _scan(step, x_T, xs, num_steps, stride, lambda x: x)
    return _result(x0, trajectory, stride)


# --------------------------------------------------------------------------------------------
# DPM-Solver++(2M).


def dpm_solver_pp_step(
    model_fn: ModelFn,
    schedule: Schedule,
    x: jax.Array,
    t,
    t_prev,
    x0_hat_last: jax.Array | None = None,
    t_last=-1,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = False,
    denoised_fn: DenoisedFn | None = None,
) -> StepOutput:
    """One DPM-Solver++ step from step t to t_prev < t (Lu et al. 2022, Algorithm 2, 2M).

    With lambda = log(alpha / sigma), h = lambda_{t_prev} - lambda_t and data prediction D:
      x_prev = (sigma_prev / sigma_t) x - alpha_prev (exp(-h) - 1) D,
    first order (DPM-Solver++1 = DDIM) with D = x0_hat, second order with the previous model
    evaluation (x0_hat_last at t_last): r = h_last / h,
      D = (1 + 1 / (2r)) x0_hat - x0_hat_last / (2r).

    Args:
      model_fn: denoiser `model_fn(x [B, ...], t int32 [B])`.
      schedule: the noise schedule.
      x: [B, ...] x at step t.
      t: int scalar or [B] in [0, T - 1].
      t_prev: int scalar or [B] in [-1, t - 1]; -1 means sigma = 0, where the step is first
        order and returns x0_hat (a multistep correction is unbounded as lambda -> inf).
      x0_hat_last: [B, ...] x0_hat of the previous model evaluation, or None for first order.
      t_last: int scalar or [B], the step of that evaluation (> t); -1 (or x0_hat_last=None)
        selects the first-order update, so a scan can start with a dummy x0_hat_last.
      prediction, variance, clip_denoised, denoised_fn: as in `ddim_step`; thresholding acts
        on the data prediction, which is also what the multistep correction extrapolates.

    Returns:
      StepOutput(x_prev, x0_hat); feed x0_hat (and t) as x0_hat_last (t_last) to the next step.
    """
    _check_model_and_schedule(model_fn, schedule)
    check_prediction(prediction)
    check_variance(variance)
    check_denoising(clip_denoised, denoised_fn)
    x = _check_x(x, "x")
    t = _check_step_t(t, x, "t")
    t_prev = _check_step_t(t_prev, x, "t_prev")
    if x0_hat_last is not None:
        t_last = _check_step_t(t_last, x, "t_last")
    _check_t_order(schedule, t, t_prev, None if x0_hat_last is None else t_last)
    pred, _ = split_learned_range(_call_model(model_fn, x, t, variance), x, variance)
    x0_hat, _ = _denoise(schedule, x, t, pred, prediction, clip_denoised, denoised_fn)
    dtype = _compute_dtype(x)
    x0_hat = x0_hat.astype(dtype)
    alpha, sigma = _alpha_sigma(schedule, t, dtype)
    alpha_prev, sigma_prev = _alpha_sigma(schedule, t_prev, dtype)
    d = x0_hat
    if x0_hat_last is not None:
        second = (t_last >= 0) & (t_prev >= 0)
        # Half log-SNRs from the float64-built table; dummy finite values where unused.
        lam = 0.5 * schedule.logsnr_table.astype(dtype)
        lam_t = lam[t]
        h = jnp.where(second, lam[jnp.maximum(t_prev, 0)] - lam_t, 1.0)
        h_last = jnp.where(second, lam_t - lam[jnp.maximum(t_last, 0)], 1.0)
        c = _per_example(jnp.where(second, h / (2.0 * h_last), 0.0), x)
        d = x0_hat + c * (x0_hat - x0_hat_last.astype(dtype))
    # alpha_prev (1 - exp(-h)) = alpha_prev - (sigma_prev / sigma) alpha: finite at sigma_prev = 0.
    ratio = _per_example(sigma_prev / sigma, x)
    coef_d = _per_example(alpha_prev, x) - ratio * _per_example(alpha, x)
    x_prev = ratio * x.astype(dtype) + coef_d * d
    return StepOutput(x_prev.astype(x.dtype), x0_hat.astype(x.dtype))


def dpm_solver_pp_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    x_T: jax.Array,
    *,
    num_steps: int | None = None,
    order: int = 2,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = False,
    denoised_fn: DenoisedFn | None = None,
    timesteps=None,
    return_trajectory: bool | int = False,
):
    """DPM-Solver++(2M) multistep sampling of the probability-flow ODE (Lu et al. 2022, Alg. 2).

    x_T is taken at t = T - 1; the model is called at `dpm_solver_pp_timesteps(T, num_steps)`
    (round(linspace(0, T - 1, num_steps + 1)) reversed, without the final 0), or at the given
    `timesteps` (x_T then taken at the largest). The first step is first order (no history
    yet), the middle ones second order, and the last step goes to sigma = 0, returning the last
    x0_hat. Deterministic: no rng.

    This is diffusers' PyTorch DPMSolverMultistepScheduler (dpmsolver++, midpoint) with its
    default final_sigmas_type="zero". FlaxDPMSolverMultistepScheduler (diffusers 0.30.3) agrees
    on every step but the last (to 1e-12 in float64), which it takes in second order to t = 0,
    leaving noise sigma_0: on N(0.3, 0.5^2) data with the exact denoiser and 20 steps of a
    cosine schedule its samples have std 0.546, these 0.498. To reproduce it, loop
    `dpm_solver_pp_step` with t_prev = 0 on the last step.

    Args:
      model_fn: denoiser `model_fn(x [B, ...], t int32 [B])`.
      schedule: the noise schedule.
      x_T: [B, ...] float start sample at the first step (t = T - 1 unless `timesteps` says).
      num_steps: number of model calls, in [1, T - 1] (None: 20).
      order: 2 (DPM-Solver++(2M)) or 1 (DPM-Solver++1, i.e. DDIM with eta = 0 on this grid).
      prediction, variance, clip_denoised, denoised_fn: as in `ddim_sample`; dynamic
        thresholding (`denoised_fn=dynamic_threshold`) is the combination Lu et al. recommend
        for guided sampling.
      timesteps: instead of num_steps, the steps at which the model is called: concrete
        distinct ints in [0, T - 1], any order (visited descending; x_T is taken at the
        largest, and after the smallest the solver steps to sigma = 0), e.g. a log-SNR-uniform
        grid (Lu et al. 2022's choice for low-resolution pixel models).
      return_trajectory: False, True or a stride k (see the module docstring).

    Returns:
      x0 [B, ...] in x_T's dtype, or (x0, trajectory) with `return_trajectory`.
    """
    x_T, stride = _check_common(
        model_fn, schedule, x_T, prediction, variance, clip_denoised, denoised_fn, return_trajectory
    )
    order = _check_int("order", order, 1, 2)  # a Python int: the scan body branches on it
    if timesteps is None:
        ts = dpm_solver_pp_timesteps(schedule.num_timesteps, 20 if num_steps is None else num_steps)
    else:
        ts = _given_timesteps(schedule, timesteps, num_steps=num_steps)
    num_steps = len(ts)
    _check_zero_snr(schedule, prediction, int(ts[0]))
    ts_prev = np.append(ts[1:], -1)
    xs = (jnp.asarray(ts, jnp.int32), jnp.asarray(ts_prev, jnp.int32))

    kw = dict(prediction=prediction, variance=variance, denoised_fn=denoised_fn)
    kw.update(clip_denoised=clip_denoised)
    step_fn = functools.partial(dpm_solver_pp_step, model_fn, schedule, **kw)

    def step(carry, a):
        x, x0_hat_last, t_last = carry
        t, t_prev = a
        out = step_fn(x, t, t_prev, x0_hat_last if order == 2 else None, t_last)
        return out.x_prev, out.x0_hat, t

    carry = (x_T, jnp.zeros_like(x_T), jnp.int32(-1))
    (x0, _, _), trajectory = _scan(step, carry, xs, num_steps, stride, lambda c: c[0])
    return _result(x0, trajectory, stride)
