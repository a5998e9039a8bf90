"""Flow matching with straight paths (rectified flow): the loss, ODE samplers and a bridge.

Lipman et al. 2023 (flow matching, the conditional optimal-transport path with sigma_min = 0)
and Liu et al. 2023 (rectified flow) regress a velocity field on straight lines between data
and noise. With continuous time t in [0, 1], t = 0 the data and t = 1 the noise (the direction
of this library's discrete t, and of Esser et al. 2024, Stable Diffusion 3):

    x_t = (1 - t) x0 + t eps,        u = dx_t / dt = eps - x0,

the model u_hat = model_fn(x_t, t) regresses u (conditional flow matching, Lipman et al.
eq. 23), and sampling integrates dx/dt = u_hat(x, t) from t = 1 (x_1 ~ N(0, I)) to t = 0.
The seed's form E || (x0 - x1) - v(t' x0 + (1 - t') x1, t') ||^2 is the same loss with
t' = 1 - t and v = -u.

Every function takes `model_fn(x [B, ...], t float [B]) -> u_hat [B, ...]` with t in [0, 1].
A network whose time embedding expects the discrete range (this library's UNet) takes the
time scaled, e.g. `model_fn = lambda x, t: unet.apply(params, x, 1000.0 * t)`.

The straight path is a reparameterization of any Gaussian diffusion x = alpha x0 + sigma eps:
x / (alpha + sigma) = (1 - t) x0 + t eps with t = sigma / (alpha + sigma). So a flow model is
also a denoiser: `denoiser_from_flow` turns one into a `model_fn(x, t int)` for every sampler
of this library (DDIM, DPM-Solver++, guidance), and Euler steps on the flow are exactly DDIM
steps on that denoiser (tested).

Imports only jax and numpy.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_diffusion._checks import check_int
from jax_diffusion._checks import check_real as _check_real
from jax_diffusion._sampling import _alpha_sigma, _check_stride, _check_x, _result, _scan
from jax_diffusion.diffusion import (
    _check_rng,
    _is_concrete,
    check_denoising,
    check_prediction,
    check_schedule,
)
from jax_diffusion.likelihood import (
    DIVERGENCES,
    _check_divergence,
    _dequantized_bits_per_dim,
    _standard_normal_log_density,
    _value_and_divergence,
)
from jax_diffusion.losses import LOSS_TYPES, _check_draws, _check_floating_x0, mean_flat
from jax_diffusion.schedules import Schedule, _check_timesteps

__all__ = [
    "DIVERGENCES",
    "FLOW_METHODS",
    "TIME_DISTRIBUTIONS",
    "denoiser_from_flow",
    "eps_from_flow_velocity",
    "flow_bits_per_dim",
    "flow_interpolate",
    "flow_log_likelihood",
    "flow_matching_loss",
    "flow_sample",
    "flow_step",
    "flow_time_draws",
    "flow_timesteps",
    "flow_velocity_target",
    "x0_from_flow_velocity",
]

FlowFn = Callable[[jax.Array, jax.Array], jax.Array]

TIME_DISTRIBUTIONS = ("uniform", "logit_normal")
FLOW_METHODS = ("euler", "heun")


# --------------------------------------------------------------------------------------------
# The path and its conversions.


def _time_like(t, x) -> jax.Array:
    """t (a scalar or [B]) as an array broadcasting against x [B, ...], in x's compute dtype."""
    t = jnp.asarray(t, jnp.promote_types(jnp.result_type(x), jnp.float32))
    if t.ndim == 1:
        t = t.reshape(t.shape + (1,) * (jnp.ndim(x) - 1))
    elif t.ndim > 1:
        raise ValueError(f"t must be a scalar or [B]; got shape {t.shape}")
    return t


def flow_interpolate(x0, eps, t) -> jax.Array:
    """x_t = (1 - t) x0 + t eps, the straight path (Liu et al. 2023, eq. 1; Lipman et al. 2023).

    Args:
      x0: [B, ...] float data.
      eps: [B, ...] noise, x0's shape.
      t: float scalar or [B] in [0, 1] (0: data, 1: noise).

    Returns:
      [B, ...] x_t in the promoted dtype of x0 and eps (>= float32).
    """
    t = _time_like(t, x0)
    return (1.0 - t) * x0 + t * eps


def flow_velocity_target(x0, eps) -> jax.Array:
    """u = eps - x0 = dx_t/dt, the regression target of flow matching (Lipman et al. eq. 23).

    Args:
      x0, eps: [B, ...] data and noise.

    Returns:
      [B, ...] u.
    """
    return jnp.asarray(eps) - jnp.asarray(x0)


def x0_from_flow_velocity(xt, t, u) -> jax.Array:
    """x0 = x_t - t u: the data end of the straight line through x_t with velocity u.

    With u = u_hat(x_t, t) = E[eps - x0 | x_t] this is E[x0 | x_t], the denoised estimate.

    Args:
      xt: [B, ...] x_t.
      t: float scalar or [B] in [0, 1].
      u: [B, ...] velocity.

    Returns:
      [B, ...] x0 (>= float32).
    """
    return xt - _time_like(t, xt) * u


def eps_from_flow_velocity(xt, t, u) -> jax.Array:
    """eps = x_t + (1 - t) u: the noise end of the straight line through x_t with velocity u.

    Args:
      xt: [B, ...] x_t.
      t: float scalar or [B] in [0, 1].
      u: [B, ...] velocity.

    Returns:
      [B, ...] eps (>= float32).
    """
    return xt + (1.0 - _time_like(t, xt)) * u


# --------------------------------------------------------------------------------------------
# Training.


def _check_distribution(distribution, loc, scale) -> None:
    if distribution not in TIME_DISTRIBUTIONS:
        raise ValueError(
            f"time_distribution must be one of 'uniform', 'logit_normal'; got {distribution!r}"
        )
    _check_real("logit_normal_loc", loc)
    _check_real("logit_normal_scale", scale, positive=True)


def flow_time_draws(
    rng,
    batch_size: int,
    *,
    time_distribution: str = "uniform",
    logit_normal_loc: float = 0.0,
    logit_normal_scale: float = 1.0,
    dtype=jnp.float32,
) -> jax.Array:
    """Training times t in (0, 1): uniform (Lipman et al.) or logit-normal (Esser et al. 2024).

    'logit_normal' draws t = sigmoid(loc + scale n), n ~ N(0, 1), which puts more training on
    the middle of the path (Esser et al. 2024, section 3.1, eq. 19; loc = 0, scale = 1 was
    their best).

    Args:
      rng: PRNG key.
      batch_size: B >= 1.
      time_distribution: 'uniform' | 'logit_normal'.
      logit_normal_loc, logit_normal_scale: m and s > 0 of 'logit_normal' (ignored otherwise).
      dtype: float dtype of the result.

    Returns:
      [B] t.
    """
    _check_distribution(time_distribution, logit_normal_loc, logit_normal_scale)
    batch_size = check_int("batch_size", batch_size, 1)
    if time_distribution == "uniform":
        return jax.random.uniform(rng, (batch_size,), dtype)
    n = jax.random.normal(rng, (batch_size,), dtype)
    return jax.nn.sigmoid(logit_normal_loc + logit_normal_scale * n)


def flow_matching_loss(
    model_fn: FlowFn,
    x0,
    rng,
    *,
    time_distribution: str = "uniform",
    logit_normal_loc: float = 0.0,
    logit_normal_scale: float = 1.0,
    loss_type: str = "l2",
    draws: tuple[jax.Array, jax.Array] | None = None,
):
    """Conditional flow matching loss E_t,x0,eps || u_hat(x_t, t) - (eps - x0) ||^2.

    Lipman et al. 2023, eq. 23 with sigma_min = 0 (the rectified-flow loss of Liu et al. 2023),
    as a mean over dimensions and the batch. Its minimizer is u* = E[eps - x0 | x_t]; for data
    N(m, s^2 I) the loss of u* at time t is s^2 / ((1 - t)^2 s^2 + t^2) per dimension (tested).

    Args:
      model_fn: model_fn(x [B, ...], t float [B] in [0, 1]) -> u_hat [B, ...].
      x0: [B, ...] clean data in [-1, 1].
      rng: PRNG key (ignored when `draws` is given).
      time_distribution, logit_normal_loc, logit_normal_scale: how t is drawn
        (see `flow_time_draws`).
      loss_type: 'l2' (squared error) or 'l1' (absolute error).
      draws: (t float [B], noise [B, ...]) to use instead of drawing them from rng.

    Returns:
      (loss, metrics): the scalar loss and a dict with scalars 'loss', 'mse' and per-example
      arrays 't' [B], 'per_example_loss' [B].
    """
    if not callable(model_fn):
        raise ValueError(f"model_fn must be a callable model_fn(x, t); got {model_fn!r}")
    _check_distribution(time_distribution, logit_normal_loc, logit_normal_scale)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of 'l2', 'l1'; got {loss_type!r}")
    _check_floating_x0(x0)
    batch = jnp.shape(x0)[0]
    if draws is None:
        _check_rng(rng, why=" (or pass draws=(t, noise))")
        t_rng, noise_rng = jax.random.split(rng)
        t = flow_time_draws(
            t_rng,
            batch,
            time_distribution=time_distribution,
            logit_normal_loc=logit_normal_loc,
            logit_normal_scale=logit_normal_scale,
            dtype=jnp.promote_types(jnp.result_type(x0), jnp.float32),
        )
        noise = jax.random.normal(noise_rng, jnp.shape(x0), jnp.result_type(x0))
    else:
        t, noise = _check_draws(draws, x0, "t")
    xt = flow_interpolate(x0, noise, t).astype(jnp.result_type(x0))
    u_hat = model_fn(xt, t)
    if jnp.shape(u_hat) != jnp.shape(x0):
        raise ValueError(
            f"model_fn(x, t) must return x's shape {jnp.shape(x0)}; got {jnp.shape(u_hat)}"
        )
    dtype = jnp.promote_types(jnp.result_type(u_hat), jnp.float32)
    err = u_hat.astype(dtype) - flow_velocity_target(x0, noise).astype(dtype)
    mse = mean_flat(jnp.square(err))
    per_example = mse if loss_type == "l2" else mean_flat(jnp.abs(err))
    loss = jnp.mean(per_example)
    return loss, {"loss": loss, "mse": jnp.mean(mse), "t": t, "per_example_loss": per_example}


# --------------------------------------------------------------------------------------------
# Sampling: the ODE dx/dt = u_hat(x, t) from t = 1 to t = 0.


def flow_timesteps(num_steps: int, *, shift: float = 1.0) -> np.ndarray:
    """Times 1 = t_0 > t_1 > ... > t_N = 0 for N ODE steps, uniform before the shift.

    shift s maps t -> s t / (1 + (s - 1) t) (Esser et al. 2024, section 5.3.2, eq. 23): s > 1
    spends more steps at high noise (SD3 samples with s = 3 at 1024^2), s = 1 is uniform.

    Args:
      num_steps: N >= 1.
      shift: s > 0.

    Returns:
      float64 NumPy [N + 1], strictly decreasing from 1 to 0.
    """
    num_steps = check_int("num_steps", num_steps, 1)
    shift = _check_real("shift", shift, positive=True)
    t = np.linspace(1.0, 0.0, num_steps + 1)
    return shift * t / (1.0 + (shift - 1.0) * t)


def _check_method(method) -> None:
    if method not in FLOW_METHODS:
        raise ValueError(f"method must be one of 'euler', 'heun'; got {method!r}")


def _call_flow(model_fn, x, t):
    t_b = jnp.broadcast_to(jnp.asarray(t, _dtype(x)), x.shape[:1])
    out = model_fn(x, t_b)
    if jnp.shape(out) != x.shape:
        raise ValueError(
            f"model_fn(x, t) must return x's shape {x.shape}; got {jnp.shape(out)}. Check the "
            "rank and batch of x_1 against what model_fn returns."
        )
    return out.astype(_dtype(x))


def _dtype(x):
    return jnp.promote_types(x.dtype, jnp.float32)


def _denoised_velocity(model_fn, x, t, clip_denoised, denoised_fn):
    """u_hat(x, t), or with x0_hat = x - t u_hat altered (clip to [-1, 1], then denoised_fn)
    the velocity (x - x0_hat') / t of the straight line through x and the altered x0_hat (at
    this x_t eps_hat is recomputed from x0_hat', as `diffusion.denoised_estimates` does). At
    t = 0, where x0_hat = x and no line is defined, the raw u_hat."""
    u = _call_flow(model_fn, x, t)
    if not clip_denoised and denoised_fn is None:
        return u
    xd = x.astype(u.dtype)
    x0_hat = xd - t * u
    if clip_denoised:
        x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
    if denoised_fn is not None:
        x0_hat = denoised_fn(x0_hat).astype(u.dtype)
    positive = t > 0
    return jnp.where(positive, (xd - x0_hat) / jnp.where(positive, t, 1.0), u)


def flow_step(
    model_fn: FlowFn,
    x,
    t,
    t_next,
    *,
    method: str = "euler",
    clip_denoised: bool = False,
    denoised_fn: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """One ODE step of dx/dt = u_hat(x, t) from t to t_next (either direction).

    'euler': x + (t_next - t) u_hat(x, t), one model call; on the straight path this is the
    DDIM step (Song et al. 2021) of `denoiser_from_flow`. 'heun': the explicit trapezoid rule
    (Heun's second-order method, as Karras et al. 2022, Algorithm 1, but used on every step,
    t = 0 included: the velocity is defined there), two model calls.

    With clip_denoised / denoised_fn every velocity is taken through the altered denoised
    estimate: x0_hat = x - t u_hat is clipped to [-1, 1] (then denoised_fn), and the step
    follows the straight line from x through it, u = (x - x0_hat) / t (raw u_hat at t = 0).
    This is what DDIM's clip_denoised does on `denoiser_from_flow` (tested): an Euler step to
    t_next = 0 lands on the clipped x0_hat.

    Args:
      model_fn: model_fn(x [B, ...], t float [B]) -> u_hat [B, ...].
      x: [B, ...] x at t.
      t, t_next: float scalars in [0, 1] (may be traced).
      method: 'euler' | 'heun'.
      clip_denoised: clip x0_hat to [-1, 1] (a Python bool).
      denoised_fn: None or a callable x0_hat -> x0_hat applied after the clip (e.g.
        `dynamic_threshold`).

    Returns:
      [B, ...] x at t_next, in x's dtype.
    """
    _check_method(method)
    check_denoising(clip_denoised, denoised_fn)
    x = _check_x(x, "x")
    dtype = _dtype(x)
    t, t_next = jnp.asarray(t, dtype), jnp.asarray(t_next, dtype)
    if t.ndim or t_next.ndim:
        raise ValueError(f"t and t_next must be scalars; got shapes {t.shape}, {t_next.shape}")
    xd = x.astype(dtype)
    h = t_next - t
    u = _denoised_velocity(model_fn, x, t, clip_denoised, denoised_fn)
    x_next = xd + h * u
    if method == "heun":
        x_euler = x_next.astype(x.dtype)
        u_next = _denoised_velocity(model_fn, x_euler, t_next, clip_denoised, denoised_fn)
        x_next = xd + h * 0.5 * (u + u_next)
    return x_next.astype(x.dtype)


def _given_times(timesteps) -> np.ndarray:
    if not _is_concrete(timesteps):
        raise ValueError(
            "timesteps must be concrete (they set the chain's length); got a traced array "
            "(close over them instead of passing them as a jit argument)"
        )
    ts = np.asarray(timesteps, np.float64)
    ok = ts.ndim == 1 and ts.size >= 2 and np.all(np.isfinite(ts))
    ok = ok and np.all((ts >= 0) & (ts <= 1)) and np.all(np.diff(ts) < 0)
    if not ok:
        raise ValueError(
            "timesteps must be a 1-D sequence of at least 2 strictly decreasing times in "
            f"[0, 1] (e.g. flow_timesteps(N)); got {np.asarray(timesteps).tolist()}"
        )
    return ts


def flow_sample(
    model_fn: FlowFn,
    x_1,
    *,
    num_steps: int | None = None,
    method: str = "euler",
    shift: float | None = None,
    timesteps=None,
    clip_denoised: bool = False,
    denoised_fn: Callable[[jax.Array], jax.Array] | None = None,
    return_trajectory: bool | int = False,
):
    """Integrates dx/dt = u_hat(x, t) from t = 1 (x_1 ~ N(0, I)) to t = 0 in ONE `lax.scan`.

    The times are `flow_timesteps(num_steps, shift=shift)` or the given `timesteps` (any
    strictly decreasing sequence in [0, 1]; starting below 1 from a noised image is SDEdit,
    Meng et al. 2022). Sampling is deterministic: x_1 carries all the randomness.

    Args:
      model_fn: model_fn(x [B, ...], t float [B] in [0, 1]) -> u_hat [B, ...].
      x_1: [B, ...] float start sample at the first time (N(0, I) at t = 1).
      num_steps: number of steps N >= 1 (None: 50); model calls are N ('euler') or 2N
        ('heun').
      method: 'euler' | 'heun'.
      shift: time shift s > 0 of `flow_timesteps` (None: 1).
      timesteps: concrete float [N + 1] times instead of num_steps / shift.
      clip_denoised, denoised_fn: x0_hat clipping / thresholding at every step, as
        `flow_step`.
      return_trajectory: as every sampler of `jax_diffusion.samplers`: False -> x0; True ->
        (x0, trajectory [N + 1, B, ...]) with x_1 first; an int k >= 1 keeps every k-th state.

    Returns:
      x0 [B, ...] in x_1's dtype, or (x0, trajectory).

    Raises:
      ValueError: a bad argument (named, with its value), or a model_fn whose output does not
        have x_1's shape.
    """
    if not callable(model_fn):
        raise ValueError(f"model_fn must be a callable model_fn(x, t); got {model_fn!r}")
    _check_method(method)
    check_denoising(clip_denoised, denoised_fn)
    x_1 = _check_x(x_1, "x_1")
    stride = _check_stride(return_trajectory)
    if timesteps is not None:
        given = {k: v for k, v in (("num_steps", num_steps), ("shift", shift)) if v is not None}
        if given:
            listed = ", ".join(f"{k}={v!r}" for k, v in given.items())
            raise ValueError(f"pass timesteps or num_steps / shift, not both; got {listed}")
        ts = _given_times(timesteps)
    else:
        ts = flow_timesteps(
            50 if num_steps is None else num_steps, shift=1.0 if shift is None else shift
        )
    n = ts.size - 1
    pairs = jnp.asarray(np.stack([ts[:-1], ts[1:]], axis=1), _dtype(x_1))

    def step(x, pair):
        return flow_step(
            model_fn,
            x,
            pair[0],
            pair[1],
            method=method,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
        )

    x0, trajectory = _scan(step, x_1, pairs, n, stride, lambda x: x)
    return _result(x0, trajectory, stride)


# --------------------------------------------------------------------------------------------
# Likelihood: the instantaneous change of variables along the ODE.


def flow_log_likelihood(
    model_fn: FlowFn,
    x0,
    rng=None,
    *,
    num_steps: int = 32,
    method: str = "heun",
    divergence: str = "hutchinson",
):
    """log p(x0) of the flow model's density, integrating the ODE from t = 0 to t = 1.

    The flow dx/dt = u_hat(x, t) carries N(0, I) at t = 1 to the model's density at t = 0, and
    d log p_t(x_t) / dt = -div u_hat(x_t, t) (Chen et al. 2018, Theorem 1; Grathwohl et al.
    2019, FFJORD; Song et al. 2021, appendix D.2), so

        log p_0(x0) = log N(x_1; 0, I) + integral_0^1 div u_hat(x_t, t) dt,

    with x_t and the integral solved together on `num_steps` uniform steps. 'exact' sums the
    Jacobian's diagonal with one forward-mode product per dimension (D model calls per
    evaluation: small D only); 'hutchinson' estimates it by z^T (du/dx) z with one Rademacher
    z per example held fixed along the path (Hutchinson 1989, as FFJORD): one product per
    evaluation, unbiased, exact where the Jacobian is diagonal. model_fn must treat the
    examples of a batch independently (no batch statistics).

    Args:
      model_fn: model_fn(x [B, ...], t float [B] in [0, 1]) -> u_hat [B, ...].
      x0: [B, ...] float data.
      rng: PRNG key of the probes; required for 'hutchinson'.
      num_steps: ODE steps N >= 1 (model evaluations N for 'euler', 2N for 'heun').
      method: 'euler' | 'heun'.
      divergence: 'exact' | 'hutchinson'.

    Returns:
      (log_p [B] in nats, x_1 [B, ...] the noise x0 maps to), in x0's compute dtype.
    """
    if not callable(model_fn):
        raise ValueError(f"model_fn must be a callable model_fn(x, t); got {model_fn!r}")
    num_steps = check_int("num_steps", num_steps, 1)
    _check_method(method)
    _check_divergence(divergence)
    x0 = _check_x(x0, "x0")
    if divergence == "hutchinson":
        _check_rng(rng, why=" for divergence='hutchinson'")
    dtype = _dtype(x0)
    probe = jax.random.rademacher(rng, x0.shape, dtype) if divergence == "hutchinson" else None

    def drift(x, t):
        return _value_and_divergence(lambda y: _call_flow(model_fn, y, t), x, divergence, probe)

    def step(carry, pair):
        x, log_det = carry
        t, t_next = pair[0], pair[1]
        h = t_next - t
        u, div = drift(x, t)
        if method == "heun":
            u_next, div_next = drift(x + h * u, t_next)
            u, div = 0.5 * (u + u_next), 0.5 * (div + div_next)
        return (x + h * u, log_det + h * div), None

    ts = np.linspace(0.0, 1.0, num_steps + 1)
    pairs = jnp.asarray(np.stack([ts[:-1], ts[1:]], axis=1), dtype)
    init = (x0.astype(dtype), jnp.zeros(x0.shape[:1], dtype))
    (x_1, log_det), _ = jax.lax.scan(step, init, pairs)
    return _standard_normal_log_density(x_1) + log_det, x_1


def flow_bits_per_dim(
    model_fn: FlowFn,
    x0,
    rng,
    *,
    num_steps: int = 32,
    method: str = "heun",
    divergence: str = "hutchinson",
    dequantize: bool = True,
) -> jax.Array:
    """Bits/dim of 8-bit data under a flow model, from `flow_log_likelihood`.

    x0 in [-1, 1] is k / 127.5 - 1 for pixel values k in {0, ..., 255}; with `dequantize`,
    the model's density is taken at x0 + u / 127.5, u ~ U[0, 1) per dimension (uniform
    dequantization: an upper bound on the discrete NLL in expectation; Theis et al. 2016;
    Song et al. 2021, section 4.3). In the units of the pixel values, |dx/dk| = 1 / 127.5:

        bpd = (-log p(x) / D + log 127.5) / log 2.

    rng splits into (dequantization noise, Hutchinson probes).

    Args:
      model_fn, num_steps, method, divergence: as `flow_log_likelihood`.
      x0: [B, ...] data in [-1, 1] on the 8-bit grid.
      rng: PRNG key.
      dequantize: add the uniform dequantization noise (False: the density at x0 itself).

    Returns:
      [B] bits/dim per example.
    """
    kw = dict(num_steps=num_steps, method=method, divergence=divergence)

    def log_likelihood(x, probe_rng):
        return flow_log_likelihood(model_fn, x, probe_rng, **kw)[0]

    return _dequantized_bits_per_dim(log_likelihood, x0, rng, dequantize, "flow_bits_per_dim")


# --------------------------------------------------------------------------------------------
# The bridge to Gaussian diffusion.


def denoiser_from_flow(
    flow_fn: FlowFn, schedule: Schedule, prediction: str = "eps"
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """A flow model as a diffusion denoiser `model_fn(x, t int)` for `schedule`'s samplers.

    For x = alpha_t x0 + sigma_t eps (alpha_t^2 + sigma_t^2 = 1), x / (alpha_t + sigma_t) is
    on the straight path at time t' = sigma_t / (alpha_t + sigma_t); the flow's velocity there
    gives x0_hat = x' - t' u_hat and eps_hat = x' + (1 - t') u_hat (Kingma & Gao 2023,
    appendix; Esser et al. 2024, section 2). The result works with every sampler and guidance
    of this library; with eta = 0, `ddim_sample` on it equals `flow_sample(method='euler')` at
    the times t'(timesteps) (the samples scaled by 1 / (alpha + sigma)).

    Args:
      flow_fn: model_fn(x [B, ...], t float [B] in [0, 1]) -> u_hat [B, ...].
      schedule: the Gaussian schedule whose integer t the samplers pass.
      prediction: what the returned function outputs: 'eps' | 'x0' | 'v'.

    Returns:
      model_fn(x [B, ...], t int [B] in [0, T - 1]) -> [B, ...] in x's dtype.
    """
    if not callable(flow_fn):
        raise ValueError(f"flow_fn must be a callable flow_fn(x, t); got {flow_fn!r}")
    check_schedule(schedule)
    check_prediction(prediction)

    def model_fn(x, t):
        t = _check_timesteps(t, schedule.num_timesteps)
        dtype = _dtype(x)
        alpha, sigma = _alpha_sigma(schedule, t, dtype)
        t_flow = sigma / (alpha + sigma)
        x_flow = x.astype(dtype) / _time_like(alpha + sigma, x)
        u = flow_fn(x_flow.astype(x.dtype), t_flow).astype(dtype)
        x0_hat = x0_from_flow_velocity(x_flow, t_flow, u)
        eps_hat = eps_from_flow_velocity(x_flow, t_flow, u)
        alpha, sigma = _time_like(alpha, x), _time_like(sigma, x)
        if prediction == "eps":
            out = eps_hat
        elif prediction == "x0":
            out = x0_hat
        else:
            out = alpha * eps_hat - sigma * x0_hat
        return out.astype(x.dtype)

    return model_fn
