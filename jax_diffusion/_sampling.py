"""Pieces shared by the reverse-process samplers: argument checks, step arithmetic, the scan.

Private: `jax_diffusion.samplers` (DDPM, DDIM) and `jax_diffusion.dpm_solver` (DPM-Solver++)
both build on these, and `samplers` re-exports `StepOutput`. The conventions they implement
(t indexing, `return_trajectory`, eager validation) are described in `jax_diffusion.samplers`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_diffusion.diffusion import (
    _is_concrete,
    check_denoising,
    check_prediction,
    check_schedule,
    check_variance,
    denoised_estimates,
)
from jax_diffusion.schedules import Schedule, _check_timestep_subset

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


def _check_x(x, name: str = "x_T") -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim < 1 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"{name} must be a floating array [B, ...] with a leading batch axis; "
            f"got shape {x.shape} and dtype {x.dtype}"
        )
    return x


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


def _check_t_order(schedule, t, t_prev, t_last=None, t_last2=None) -> None:
    """Where the steps are concrete: t in [0, T - 1], t_prev in [-1, t - 1], t_last -1 or > t,
    t_last2 -1 or > t_last (and -1 where t_last is)."""
    if not all(_is_concrete(a) for a in (t, t_prev, t_last, t_last2) if a is not None):
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
        if t_last2 is not None:
            last2 = np.asarray(t_last2)
            if not np.all((last2 == -1) | ((last2 > last) & (last >= 0))):
                raise ValueError(
                    "t_last2 must be -1 (no second history) or > t_last >= 0 (t_last = "
                    f"{last.tolist()}); got {last2.tolist()}"
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
