"""Reverse-process samplers: DDPM, DDIM and (re-exported) DPM-Solver++(2M/3M), each one `lax.scan`.

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

DPM-Solver++(2M) and (3M) (`dpm_solver_pp_sample`, `dpm_solver_pp_step`,
`dpm_solver_pp_timesteps`; Lu et al. 2022) live in `jax_diffusion.dpm_solver` and are re-exported
here, as are EDM's Heun sampler with its optional churn and rho-spaced steps (`heun_sample`,
`heun_step`, `churn_step`, `churn_timesteps`, `karras_timesteps`; Karras et al. 2022) from
`jax_diffusion.edm`; what this docstring says of
every sampler holds for them too. Classifier-free and
classifier guidance and dynamic thresholding live in `jax_diffusion.guidance` and are
re-exported here as well: `classifier_free_guidance` wraps a conditional model into a
`model_fn`, `classifier_guidance` adds a classifier's gradient to a `model_fn`,
`dynamic_threshold` is a `denoised_fn`.

Arguments are validated eagerly: a bad static argument raises `ValueError` naming the argument,
the value received and what is allowed, before any tracing work; a `model_fn` whose output does
not match x_T raises `ValueError` when the step is traced, before anything is compiled.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_diffusion._checks import check_int as _check_int
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
    _is_real,
    check_denoising,
    check_prediction,
    check_variance,
    p_mean_variance,
    split_learned_range,
)
from jax_diffusion.dpm_solver import (
    dpm_solver_pp_sample,
    dpm_solver_pp_step,
    dpm_solver_pp_timesteps,
)
from jax_diffusion.edm import churn_step, churn_timesteps, heun_sample, heun_step, karras_timesteps
from jax_diffusion.guidance import (
    classifier_free_guidance,
    classifier_grad,
    classifier_guidance,
    dynamic_threshold,
)
from jax_diffusion.schedules import Schedule

__all__ = [
    "SPACINGS",
    "StepOutput",
    "churn_step",
    "churn_timesteps",
    "classifier_free_guidance",
    "classifier_grad",
    "classifier_guidance",
    "ddim_sample",
    "ddim_step",
    "ddpm_sample",
    "ddpm_step",
    "dpm_solver_pp_sample",
    "dpm_solver_pp_step",
    "dpm_solver_pp_timesteps",
    "dynamic_threshold",
    "heun_sample",
    "heun_step",
    "karras_timesteps",
    "sampling_timesteps",
]

SPACINGS = ("leading", "trailing", "linspace")


# --------------------------------------------------------------------------------------------
# Validation helpers (eager, on static / concrete arguments).


def _check_spacing(spacing: str) -> str:
    if spacing not in SPACINGS:
        raise ValueError(
            f"spacing must be one of 'leading', 'trailing', 'linspace'; got {spacing!r}"
        )
    return spacing


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


def _ddim_timesteps(schedule: Schedule, num_steps, spacing, timesteps) -> np.ndarray:
    """The steps `ddim_sample` visits, descending: `timesteps`, or else
    `sampling_timesteps(T, num_steps, spacing)` with num_steps None -> min(50, T) and spacing
    None -> 'leading'. Shared with `ddim_invert`, which walks the same steps upward."""
    if timesteps is not None:
        return _given_timesteps(schedule, timesteps, num_steps=num_steps, spacing=spacing)
    spacing = "leading" if spacing is None else spacing
    if num_steps is None:  # the default, fitted to a schedule of fewer than 50 steps
        num_steps = min(50, schedule.num_timesteps)
    return sampling_timesteps(schedule.num_timesteps, num_steps, spacing)


def _respaced(schedule: Schedule, timesteps) -> tuple[Schedule, np.ndarray]:
    """The ancestral chain's schedule and the model's step at each of its indices, descending:
    (schedule, [T - 1, ..., 0]) for timesteps None, else (`schedule.respace(timesteps)`, the
    given steps sorted descending), index i of the respaced schedule being the original step
    `model_ts[::-1][i]`. Shared with `repaint_sample`."""
    if timesteps is None:
        return schedule, np.arange(schedule.num_timesteps, dtype=np.int32)[::-1]
    if not _is_concrete(schedule.alphas_cumprod):
        raise ValueError(
            "timesteps needs a concrete schedule to respace; got a traced schedule "
            "(close over the schedule instead of passing it as a jit argument)"
        )
    model_ts = _given_timesteps(schedule, timesteps)
    return schedule.respace(model_ts), model_ts


# --------------------------------------------------------------------------------------------
# Step pieces (those shared with DPM-Solver++ are in jax_diffusion._sampling).


def _sqrt_clamped(u: jax.Array) -> jax.Array:
    """sqrt(max(u, 0)) whose derivative is 0, not inf * 0 = NaN, where u <= 0 (clamped)."""
    positive = u > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, u, 1.0)), 0.0)


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
    sched, model_ts = _respaced(schedule, timesteps)
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
      num_steps: number of model calls, in [1, T] (None: 50, or T if smaller).
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
    ts = _ddim_timesteps(schedule, num_steps, spacing, timesteps)
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
