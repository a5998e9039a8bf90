"""Exact denoisers with closed forms, for validating losses and samplers without training.

For Gaussian data x0 ~ N(m, s^2 I) and x_t = alpha_t x0 + sigma_t eps, the pair (x0, x_t) is
jointly Gaussian, so the optimal (minimum-MSE) denoiser is linear in x_t:

  x_t ~ N(alpha_t m, (alpha_t^2 s^2 + sigma_t^2) I),
  E[x0 | x_t]  = m + alpha_t s^2 / (alpha_t^2 s^2 + sigma_t^2) (x_t - alpha_t m),
  E[eps | x_t] = sigma_t / (alpha_t^2 s^2 + sigma_t^2) (x_t - alpha_t m),
  E[v | x_t]   = alpha_t E[eps | x_t] - sigma_t E[x0 | x_t].

With s = 0 (single-point data x0 = m) E[x0 | x_t] = m exactly. Use these as `model_fn` for any
sampler or loss: a correct sampler with the exact denoiser of single-point data returns m.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jax_diffusion.diffusion import check_prediction
from jax_diffusion.schedules import Schedule, _check_timesteps

__all__ = ["gaussian_denoiser", "gaussian_posterior_moments", "gaussian_residual_variance"]


def _per_example(table, t, x):
    # checked like the rest of the package: a bare table[t] clamps t >= T and wraps t < 0
    t = _check_timesteps(t, table.shape[0])
    c = table[t].astype(jnp.promote_types(x.dtype, jnp.float32))
    return c.reshape(c.shape + (1,) * (x.ndim - jnp.ndim(t)))


def gaussian_posterior_moments(schedule: Schedule, x, t, mean, std):
    """E[x0 | x_t] and E[eps | x_t] for data N(mean, std^2 I).

    Args:
      schedule: the noise schedule.
      x: [B, ...] noisy data x_t.
      t: int [B] (or []) in [0, T - 1].
      mean: data mean, a scalar or an array broadcastable to x.shape[1:].
      std: data standard deviation (scalar or broadcastable), >= 0.

    Returns:
      (x0_hat, eps_hat), [B, ...] each, in the computation dtype (>= float32).

    Raises:
      ValueError: t not an integer array, or (where concrete) outside [0, T - 1].
    """
    alpha = _per_example(schedule.sqrt_alphas_cumprod, t, x)
    sigma = _per_example(schedule.sqrt_one_minus_alphas_cumprod, t, x)
    dtype = alpha.dtype
    m = jnp.asarray(mean, dtype)
    s2 = jnp.asarray(std, dtype) ** 2
    xd = x.astype(dtype)
    var_xt = alpha**2 * s2 + sigma**2
    resid = xd - alpha * m
    x0_hat = m + alpha * s2 / var_xt * resid
    eps_hat = sigma / var_xt * resid
    return x0_hat, eps_hat


def gaussian_denoiser(
    schedule: Schedule, mean, std, prediction: str = "eps"
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The exact MMSE denoiser `model_fn(x, t)` of data N(mean, std^2 I) for a parameterization.

    Args:
      schedule: the noise schedule the sampler or loss uses.
      mean: data mean (scalar or broadcastable to one example's shape).
      std: data standard deviation; 0 gives single-point data x0 = mean.
      prediction: 'eps' | 'x0' | 'v', what the returned function outputs.

    Returns:
      model_fn(x [B, ...], t int [B]) -> [B, ...] in x's dtype; it raises ValueError for a t
      outside [0, T - 1] where t is concrete (as `gaussian_posterior_moments`).
    """
    check_prediction(prediction)

    def model_fn(x, t):
        x0_hat, eps_hat = gaussian_posterior_moments(schedule, x, t, mean, std)
        if prediction == "eps":
            out = eps_hat
        elif prediction == "x0":
            out = x0_hat
        else:
            alpha = _per_example(schedule.sqrt_alphas_cumprod, t, x)
            sigma = _per_example(schedule.sqrt_one_minus_alphas_cumprod, t, x)
            out = alpha * eps_hat - sigma * x0_hat
        return out.astype(x.dtype)

    return model_fn


def gaussian_residual_variance(schedule: Schedule, t, std, prediction: str = "eps"):
    """Per-dimension E[(target - E[target | x_t])^2] at step t for data N(m, std^2 I).

    This is the value of the unweighted L2 training loss of the exact denoiser at step t:
    Var(eps | x_t) = alpha^2 s^2 / (alpha^2 s^2 + sigma^2), Var(x0 | x_t) = s^2 sigma^2 /
    (alpha^2 s^2 + sigma^2), and Var(v | x_t) = Var(x0 | x_t) / sigma^2 since
    x0 = alpha x_t - sigma v.

    Args:
      t: int timesteps in [0, T - 1], any shape.
      std: data standard deviation (scalar).

    Returns:
      Array of t's shape (float32 or the schedule's dtype).

    Raises:
      ValueError: unknown prediction, t not an integer array or (where concrete) outside
        [0, T - 1].
    """
    check_prediction(prediction)
    abar = schedule.alphas_cumprod[_check_timesteps(t, schedule.num_timesteps)]
    s2 = jnp.asarray(std, abar.dtype) ** 2
    denom = abar * s2 + (1.0 - abar)
    if prediction == "eps":
        return abar * s2 / denom
    var_x0 = s2 * (1.0 - abar) / denom
    if prediction == "x0":
        return var_x0
    return s2 / denom
