"""DDIM inversion: data x0 -> x_T along the deterministic DDIM path, for editing real images.

`ddim_invert` runs the steps of `ddim_sample(eta=0)` backwards: it visits the same descending
sequence tau_N > ... > tau_1 (with tau_0 = -1 the clean end, alphas_cumprod = 1) from tau_0 up
to tau_N, and its result is an x_T that `ddim_sample` with the same `num_steps` / `spacing` /
`timesteps` maps back to (nearly) x0. Editing methods invert an image this way, then sample
from x_T under another condition or guidance scale (e.g. Mokady et al. 2023, Null-text
Inversion).

The sampler's step from tau_k to tau_{k-1} (Song et al. 2021, eq. 12 with sigma = 0) is, with
x0_hat and eps_hat the model's estimates at (y, tau_k), y the sample at tau_k,

  x_{tau_{k-1}} = alpha_{k-1} x0_hat + sigma_{k-1} eps_hat
                = alpha_{k-1} / alpha_k (y - sigma_k eps_hat(y)) + sigma_{k-1} eps_hat(y),

so the y it came from solves

  y = alpha_k / alpha_{k-1} (x_{tau_{k-1}} - sigma_{k-1} e(y)) + sigma_k e(y),
  e(y) = eps_hat(y, tau_k),                                                           (*)

implicit in y. The usual inversion (Song et al. 2021, section 4.3) replaces e(y) by the
estimate at the known point, eps_hat(x_{tau_{k-1}}, tau_{k-1}) (at tau_1 on x0 for the first
step, since tau_0 = -1 is no step of the model): one model call per step, exact as the steps
shrink, with a first-order error per step, so the round trip `ddim_sample(ddim_invert(x0))`
misses x0 by O(1 / num_steps). `fixed_point_iters = n > 0` then refines y by n fixed-point
iterations of (*) (Pan et al. 2023, "Effective Real Image Editing with Accelerated Iterative
Diffusion Inversion"; Garibi et al. 2024, ReNoise), n more model calls per step; at
convergence y solves the sampler's step exactly and the round trip returns x0 up to the
iteration's residual. The iteration is a contraction where the step is small against the
model's Lipschitz constant: for the exact denoiser of N(m, 0.5^2) data and 10 steps of the
linear schedule it shrinks the error by 0.31 per iteration on the first steps and 0.58 on the
last ('leading'), so 10 iterations bring the round trip from 0.57 to 2e-5
(tests/test_inversion.py).

No `clip_denoised` / `denoised_fn`: a clipped or thresholded step is not one-to-one (every x0_hat
beyond the clip maps to the same point), so it has no inverse to compute.

Both functions are pure and take any denoiser `model_fn(x, t)` (see `jax_diffusion.samplers`);
`ddim_invert` is one `jax.lax.scan` and works under `jax.jit` and `jax.vmap`, and its
`return_trajectory` follows the samplers' convention, running from x0 (first) to x_T (last).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_diffusion._checks import check_int as _check_int
from jax_diffusion._sampling import (
    ModelFn,
    _alpha_sigma,
    _call_model,
    _check_model_and_schedule,
    _check_step_t,
    _check_stride,
    _check_x,
    _compute_dtype,
    _denoise,
    _per_example,
    _result,
    _scan,
)
from jax_diffusion.diffusion import (
    _check_zero_snr,
    _is_concrete,
    check_prediction,
    check_variance,
    split_learned_range,
)
from jax_diffusion.samplers import _ddim_timesteps
from jax_diffusion.schedules import Schedule

__all__ = ["ddim_invert", "ddim_invert_step"]


def _check_invert_order(schedule: Schedule, t, t_next) -> None:
    """Where the steps are concrete: t in [-1, T - 2], t_next in [t + 1, T - 1]."""
    if not (_is_concrete(t) and _is_concrete(t_next)):
        return
    t_, nxt = np.asarray(t), np.asarray(t_next)
    last = schedule.num_timesteps - 1
    if t_.size and not (-1 <= t_.min() and t_.max() <= last - 1):
        raise ValueError(f"t must lie in [-1, {last - 1}]; got {t_.tolist()}")
    if not np.all((nxt > t_) & (nxt <= last)):
        raise ValueError(
            f"t_next must lie in [t + 1, {last}] (t = {t_.tolist()}); got {nxt.tolist()}"
        )


def ddim_invert_step(
    model_fn: ModelFn,
    schedule: Schedule,
    x: jax.Array,
    t,
    t_next,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    fixed_point_iters: int = 0,
) -> jax.Array:
    """Inverts one deterministic DDIM step: x at step t -> x at step t_next > t.

    The inverse of Song et al. 2021, eq. 12 with sigma = 0 (see the module docstring):
    y = alpha_next / alpha (x - sigma e) + sigma_next e, with e = eps_hat(x, t) (at t_next
    on x where t = -1), then `fixed_point_iters` times e = eps_hat(y, t_next) and the same
    update (Pan et al. 2023). At a fixed point, `ddim_step(model_fn, schedule, y,
    t_next, t)` returns x.

    Args:
      model_fn: denoiser `model_fn(x [B, ...], t int32 [B])`.
      schedule: the (not respaced) noise schedule.
      x: [B, ...] x at step t.
      t: int scalar or [B] in [-1, T - 2]; -1 is the clean end (x is data x0).
      t_next: int scalar or [B] in [t + 1, T - 1].
      prediction: 'eps' | 'x0' | 'v'.
      variance: only the layout of the model output matters: 'learned_range' drops its
        variance half.
      fixed_point_iters: int >= 0, fixed-point refinements of the step (one model call each).

    Returns:
      [B, ...] x at step t_next, in x's dtype.

    Raises:
      ValueError: bad prediction / variance / fixed_point_iters / x, t or t_next out of range
        (where concrete), or a model_fn output that does not match x.
    """
    _check_model_and_schedule(model_fn, schedule)
    check_prediction(prediction)
    check_variance(variance)
    iters = _check_int("fixed_point_iters", fixed_point_iters, 0)
    x = _check_x(x, "x")
    t = _check_step_t(t, x, "t")
    t_next = _check_step_t(t_next, x, "t_next")
    _check_invert_order(schedule, t, t_next)
    dtype = _compute_dtype(x)
    alpha, sigma = (_per_example(v, x) for v in _alpha_sigma(schedule, t, dtype))
    alpha_next, sigma_next = (_per_example(v, x) for v in _alpha_sigma(schedule, t_next, dtype))
    x_c = x.astype(dtype)

    def eps_hat(y, model_t):
        y = y.astype(x.dtype)
        pred, _ = split_learned_range(_call_model(model_fn, y, model_t, variance), y, variance)
        return _denoise(schedule, y, model_t, pred, prediction, False, None)[1].astype(dtype)

    def update(e):
        # x0_hat = (x - sigma e) / alpha is the sampler's x0_hat at the solution y (alpha > 0:
        # t <= T - 2 lies below a zero-terminal-SNR schedule's only alpha = 0)
        return alpha_next * ((x_c - sigma * e) / alpha) + sigma_next * e

    y = update(eps_hat(x, jnp.where(t >= 0, t, t_next)))
    if iters:
        y = jax.lax.fori_loop(0, iters, lambda _, y: update(eps_hat(y, t_next)), y)
    return y.astype(x.dtype)


def ddim_invert(
    model_fn: ModelFn,
    schedule: Schedule,
    x0: jax.Array,
    *,
    num_steps: int | None = None,
    spacing: str | None = None,
    timesteps=None,
    prediction: str = "eps",
    variance: str = "fixed_small",
    fixed_point_iters: int = 0,
    return_trajectory: bool | int = False,
):
    """DDIM inversion x0 -> x_T (Song et al. 2021, section 4.3; Pan et al. 2023 with
    `fixed_point_iters`), the x_T that `ddim_sample(eta=0)` maps back to x0.

    The steps are those of `ddim_sample` with the same `num_steps`, `spacing` and `timesteps`,
    tau_N > ... > tau_1, walked upward: step k goes from tau_{k-1} to tau_k (tau_0 = -1, x0)
    with `ddim_invert_step`, and the result is x at tau_N, where `ddim_sample` starts.

    Args:
      model_fn: denoiser `model_fn(x [B, ...], t int32 [B])`.
      schedule: the noise schedule.
      x0: [B, ...] float data to invert, e.g. images in [-1, 1].
      num_steps: number of steps, in [1, T] (None: 50, or T if smaller), as `ddim_sample`.
      spacing: 'leading' | 'trailing' | 'linspace' (None: 'leading'), as `ddim_sample`.
      timesteps: instead of num_steps and spacing, concrete distinct ints in [0, T - 1], as
        `ddim_sample`.
      prediction: 'eps' | 'x0' | 'v'.
      variance: model-output layout only ('learned_range': drop the variance half).
      fixed_point_iters: int >= 0, fixed-point refinements per step (n model calls more per
        step); 0 is the usual one-call inversion.
      return_trajectory: False, True or a stride k (see `jax_diffusion.samplers`): trajectory
        [num_steps // k + 1, B, ...] from x0 (first) to x_T (last, where k divides num_steps).

    Returns:
      x_T [B, ...] in x0's dtype, or (x_T, trajectory) with `return_trajectory`.

    Raises:
      ValueError: bad prediction / variance / num_steps / spacing / timesteps /
        fixed_point_iters / return_trajectory / x0, a model_fn output that does not match x0,
        or prediction 'eps' with a last step where alphas_cumprod is 0 (a zero-terminal-SNR
        schedule: `ddim_sample` could not map that x_T back).
    """
    _check_model_and_schedule(model_fn, schedule)
    check_prediction(prediction)
    check_variance(variance)
    _check_int("fixed_point_iters", fixed_point_iters, 0)
    x0 = _check_x(x0, "x0")
    stride = _check_stride(return_trajectory)
    ts = _ddim_timesteps(schedule, num_steps, spacing, timesteps)[::-1]  # ascending
    # the x_T an eps model inverts to at a zero-SNR top step is one ddim_sample refuses to start
    # from: refused here, before the work, with ddim_sample's message
    _check_zero_snr(schedule, prediction, int(ts[-1]), doing="invert to")
    ts_from = np.append(-1, ts[:-1])
    xs = (jnp.asarray(ts_from, jnp.int32), jnp.asarray(ts, jnp.int32))

    def step(x, a):
        t, t_next = a
        return ddim_invert_step(
            model_fn,
            schedule,
            x,
            t,
            t_next,
            prediction=prediction,
            variance=variance,
            fixed_point_iters=fixed_point_iters,
        )

    x_T, trajectory = _scan(step, x0, xs, len(ts), stride, lambda x: x)
    return _result(x_T, trajectory, stride)
