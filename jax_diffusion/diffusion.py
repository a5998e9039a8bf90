"""Gaussian diffusion process math: q(x_t | x0), posterior, parameterizations, p(x_{t-1} | x_t).

Every function is pure, keyword-argument friendly and works under `jit`, `vmap`, `grad` and
`pmap`. Arrays `x0`, `xt`, `eps`, `v` are [B, ...] (any rank); `t` is an int array [B] in
[0, num_timesteps - 1] (index t is the paper's step t + 1). A scalar `t` is also accepted, for
use inside `jax.vmap` over single examples. Coefficients are gathered per example and broadcast
over the trailing axes. Results have the dtype of the data arguments (bfloat16 stays bfloat16;
the arithmetic itself runs in at least float32).

Notation: alpha_t = sqrt(alphas_cumprod[t]), sigma_t = sqrt(1 - alphas_cumprod[t]),
x_t = alpha_t x0 + sigma_t eps, v = alpha_t eps - sigma_t x0 (Salimans & Ho 2022, section 4).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_diffusion.schedules import Schedule, _check_timesteps

__all__ = [
    "PREDICTIONS",
    "VARIANCES",
    "PMeanVariance",
    "check_denoising",
    "check_prediction",
    "check_schedule",
    "check_t",
    "check_variance",
    "denoised_estimates",
    "eps_from_score",
    "eps_from_v",
    "eps_from_x0",
    "p_mean_variance",
    "predict_x0_eps",
    "q_mean_variance",
    "q_posterior_mean_variance",
    "q_sample",
    "score_from_eps",
    "split_learned_range",
    "training_target",
    "v_from_x0_eps",
    "x0_from_eps",
    "x0_from_v",
]

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")


def check_prediction(prediction: str) -> str:
    """Raises ValueError unless `prediction` is one of 'eps', 'x0', 'v'."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of 'eps', 'x0', 'v'; got {prediction!r}")
    return prediction


def check_denoising(clip_denoised, denoised_fn) -> None:
    """Raises ValueError unless clip_denoised is a bool and denoised_fn None or a callable.

    clip_denoised selects the computation (a Python bool): a truthy string or a threshold such
    as 0.5 would otherwise silently clip to [-1, 1].
    """
    if not isinstance(clip_denoised, bool | np.bool_):
        raise ValueError(f"clip_denoised must be True or False; got {clip_denoised!r}")
    if denoised_fn is not None and not callable(denoised_fn):
        raise ValueError(
            f"denoised_fn must be a callable x0_hat -> x0_hat or None; got {denoised_fn!r}"
        )


def check_variance(variance: str) -> str:
    """Raises ValueError unless `variance` is one of VARIANCES."""
    if variance not in VARIANCES:
        raise ValueError(
            f"variance must be one of 'fixed_small', 'fixed_large', 'learned_range'; "
            f"got {variance!r}"
        )
    return variance


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _is_real(x) -> bool:
    """A real number: a Python int or float (not a bool), or a NumPy / JAX array or tracer of
    an integer or floating dtype (any shape). Not None, a string or a list."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return isinstance(x, int | float) and not isinstance(x, bool)
    return jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)


def _check_rng(rng, name: str = "rng", why: str = "") -> None:
    """ONE key: a typed key (jax.random.key) of shape [] or a raw uint32 one
    (jax.random.PRNGKey: [2], or [4] for the rbg implementations). A batch of keys is refused
    here, naming the argument: split / fold_in / normal would refuse it further in, naming
    none of the caller's arguments."""
    dtype = getattr(rng, "dtype", None)
    raw = dtype == jnp.uint32 and jnp.ndim(rng) >= 1 and jnp.shape(rng)[-1] in (2, 4)
    if dtype is None or not (jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) or raw):
        raise ValueError(f"{name} must be a PRNG key (jax.random.key(seed)){why}; got {rng!r}")
    if jnp.ndim(rng) != (1 if raw else 0):
        raise ValueError(
            f"{name} must be a single PRNG key{why}; got a batch of keys of shape "
            f"{jnp.shape(rng)} (jax.vmap over the keys to draw one result per key)"
        )


def check_schedule(schedule) -> None:
    """ValueError unless `schedule` is a `Schedule` (a common slip: passing the betas)."""
    if not isinstance(schedule, Schedule):
        raise ValueError(
            "schedule must be a jax_diffusion Schedule (e.g. Schedule.from_betas(betas)); got "
            f"{type(schedule).__name__}"
        )


def _check_zero_snr(schedule, prediction: str, t_first: int, doing: str = "sample from") -> None:
    """eps prediction cannot give x0 where alphas_cumprod is 0 (a zero-terminal-SNR schedule's
    last step): x0 = (x_t - sigma eps) / alpha divides by 0, and every result would be NaN.
    Read from alpha itself: a float16 alphas_cumprod underflows to 0 long before its sqrt."""
    table = schedule.sqrt_alphas_cumprod
    if prediction == "eps" and _is_concrete(table) and np.asarray(table)[t_first] == 0.0:
        raise ValueError(
            f"prediction='eps' cannot {doing} step {t_first}, where alphas_cumprod is 0 "
            "(a zero-terminal-SNR schedule): x0 = (x_t - sigma eps) / alpha is undefined; "
            "train with prediction='v' or 'x0' (Lin et al. 2024)"
        )


def check_t(schedule: Schedule, t, x=None, *, name: str = "x") -> jax.Array:
    """Validates timesteps: integer dtype, shape [] or [B] matching `x`, in range when concrete.

    Shape and dtype are checked at trace time; the range only where `t` is a concrete value.
    """
    check_schedule(schedule)
    t = _check_timesteps(t, schedule.num_timesteps)
    if t.ndim > 1:
        raise ValueError(f"t must have shape [B] or []; got shape {t.shape}")
    if x is not None and t.ndim == 1:
        x_shape = jnp.shape(x)
        if len(x_shape) < 1 or x_shape[0] != t.shape[0]:
            raise ValueError(
                f"t has batch size {t.shape[0]} but {name} has shape {x_shape}; "
                "t must have shape [B] matching the leading axis"
            )
    return t


def _compute_dtype(**arrays):
    """At least float32, from the named floating arrays; ValueError naming one that is not a
    floating array (an integer x0 would otherwise give silently truncated integer results)."""
    for name, x in arrays.items():
        dtype = getattr(x, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            got = f"dtype {dtype}" if dtype is not None else type(x).__name__
            raise ValueError(f"{name} must be a floating array (float32, bfloat16, ...); got {got}")
    return jnp.promote_types(jnp.result_type(*arrays.values()), jnp.float32)


def _coef(table: jax.Array, t: jax.Array, x: jax.Array, dtype) -> jax.Array:
    """table[t] shaped to broadcast against x: [B, 1, ..., 1] for t [B], a scalar for t []."""
    c = table[t].astype(dtype)
    if t.ndim == 1:
        c = c.reshape(c.shape + (1,) * (jnp.ndim(x) - 1))
    return c


def _alpha_sigma(schedule: Schedule, t, x, dtype):
    return (
        _coef(schedule.sqrt_alphas_cumprod, t, x, dtype),
        _coef(schedule.sqrt_one_minus_alphas_cumprod, t, x, dtype),
    )


def _check_same_shape(**arrays):
    # np.shape: jnp.shape of a list is deprecated; a list is then named by _compute_dtype
    shapes = {k: np.shape(v) for k, v in arrays.items()}
    if len(set(shapes.values())) > 1:
        desc = ", ".join(f"{k} {s}" for k, s in shapes.items())
        raise ValueError(f"arrays must have the same shape; got {desc}")


def q_sample(schedule: Schedule, *, x0, t, noise) -> jax.Array:
    """Samples q(x_t | x0) = N(alpha_t x0, sigma_t^2 I) (Ho et al. 2020, eq. 4).

    Args:
      schedule: the noise schedule.
      x0: [B, ...] clean data (images in [-1, 1]).
      t: int [B] timesteps in [0, T - 1].
      noise: [B, ...] standard normal eps, same shape as x0.

    Returns:
      x_t = alpha_t x0 + sigma_t eps, [B, ...] in `jnp.result_type(x0, noise)` (x0's dtype
      when noise has it too; computed in at least float32).
    """
    _check_same_shape(x0=x0, noise=noise)
    dtype = _compute_dtype(x0=x0, noise=noise)
    t = check_t(schedule, t, x0, name="x0")
    alpha, sigma = _alpha_sigma(schedule, t, x0, dtype)
    out = alpha * x0.astype(dtype) + sigma * noise.astype(dtype)
    return out.astype(jnp.result_type(x0, noise))


def q_mean_variance(schedule: Schedule, *, x0, t):
    """Mean and variance of q(x_t | x0) (Ho et al. 2020, eq. 4).

    Args:
      schedule: the noise schedule.
      x0: [B, ...] float, clean data.
      t: int [B] (or [] for the whole batch), in [0, num_timesteps - 1].

    Returns:
      (mean [B, ...], variance [B, 1, ...], log_variance [B, 1, ...]) in x0's dtype (the
      variances [] for a scalar t); mean = sqrt(alpha_bar_t) x0, variance = 1 - alpha_bar_t.

    Raises:
      ValueError: x0 not a floating array, t not an int of shape [B] or [], or a concrete t
        outside [0, num_timesteps - 1].
    """
    dtype = _compute_dtype(x0=x0)
    t = check_t(schedule, t, x0, name="x0")
    alpha, sigma = _alpha_sigma(schedule, t, x0, dtype)
    variance = sigma**2
    out_dtype = jnp.result_type(x0)
    return (
        (alpha * x0.astype(dtype)).astype(out_dtype),
        variance.astype(out_dtype),
        jnp.log(variance).astype(out_dtype),
    )


def q_posterior_mean_variance(schedule: Schedule, *, x0, xt, t):
    """Mean and variance of the posterior q(x_{t-1} | x_t, x0) (Ho et al. 2020, eqs. 6-7).

    mu_tilde = coef1 x0 + coef2 x_t, coef1 = beta_t sqrt(alpha_bar_{t-1}) / (1 - alpha_bar_t),
    coef2 = (1 - alpha_bar_{t-1}) sqrt(1 - beta_t) / (1 - alpha_bar_t);
    beta_tilde = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t.

    Args:
      schedule: the noise schedule.
      x0: [B, ...] float, clean data.
      xt: [B, ...] float, noisy data at step t.
      t: int [B] (or []), in [0, num_timesteps - 1].

    Returns:
      (mean [B, ...], variance [B, 1, ...], log_variance_clipped [B, 1, ...]); at t = 0 the
      variance is 0 and its log is clipped to that of t = 1 (improved-diffusion).

    Raises:
      ValueError: x0 and xt of different shapes or not floating, or a bad t (as
        `q_mean_variance`).
    """
    _check_same_shape(x0=x0, xt=xt)
    dtype = _compute_dtype(x0=x0, xt=xt)
    t = check_t(schedule, t, xt, name="xt")
    out_dtype = jnp.result_type(x0, xt)
    c1 = _coef(schedule.posterior_mean_coef1, t, xt, dtype)
    c2 = _coef(schedule.posterior_mean_coef2, t, xt, dtype)
    mean = c1 * x0.astype(dtype) + c2 * xt.astype(dtype)
    var = _coef(schedule.posterior_variance, t, xt, dtype)
    logvar = _coef(schedule.posterior_log_variance_clipped, t, xt, dtype)
    return mean.astype(out_dtype), var.astype(out_dtype), logvar.astype(out_dtype)


def _affine(schedule, t, a_table_fn, x, y, *, x_name, y_name):
    """Shared body of the conversions: (a(t) * x + b(t) * y) / d(t), per-example coefficients.

    `a_table_fn` returns (a, b) or (a, b, d). The division comes last: x0 = (x_t - sigma eps) /
    alpha formed as x_t / alpha - (sigma / alpha) eps rounds both terms to ulp(x_t / alpha)
    before they cancel, which at a tiny alpha (a cosine schedule's last step, alpha = 5e-5)
    made a float32 x0 ~3e-3 off; divided last it is rounded once (~1e-7).
    """
    _check_same_shape(**{x_name: x, y_name: y})
    dtype = _compute_dtype(**{x_name: x, y_name: y})
    t = check_t(schedule, t, x, name=x_name)
    a, b, *d = a_table_fn(schedule, t, x, dtype)
    out = a * x.astype(dtype) + b * y.astype(dtype)
    if d:
        out = out / d[0]
    return out.astype(jnp.result_type(x, y))


def x0_from_eps(schedule: Schedule, *, xt, t, eps) -> jax.Array:
    """x0 = (x_t - sigma_t eps) / alpha_t (Ho et al. 2020, eq. 4 inverted; seed 004 section 4.4).

    Undefined where alphas_cumprod[t] = 0 (zero-terminal-SNR schedules at t = T - 1): the result
    is inf/nan there. Use `prediction="v"` with such schedules.
    """

    def coefs(schedule, t, x, dtype):
        alpha, sigma = _alpha_sigma(schedule, t, x, dtype)
        return 1.0, -sigma, alpha

    return _affine(schedule, t, coefs, xt, eps, x_name="xt", y_name="eps")


def eps_from_x0(schedule: Schedule, *, xt, t, x0) -> jax.Array:
    """eps = (x_t - alpha_t x0) / sigma_t; finite for every t since alphas_cumprod < 1."""

    def coefs(schedule, t, x, dtype):
        alpha, sigma = _alpha_sigma(schedule, t, x, dtype)
        return 1.0, -alpha, sigma

    return _affine(schedule, t, coefs, xt, x0, x_name="xt", y_name="x0")


def x0_from_v(schedule: Schedule, *, xt, t, v) -> jax.Array:
    """x0 = alpha_t x_t - sigma_t v (Salimans & Ho 2022, section 4); finite for every t."""

    def coefs(schedule, t, x, dtype):
        alpha, sigma = _alpha_sigma(schedule, t, x, dtype)
        return alpha, -sigma

    return _affine(schedule, t, coefs, xt, v, x_name="xt", y_name="v")


def eps_from_v(schedule: Schedule, *, xt, t, v) -> jax.Array:
    """eps = sigma_t x_t + alpha_t v (Salimans & Ho 2022, section 4); finite for every t."""

    def coefs(schedule, t, x, dtype):
        alpha, sigma = _alpha_sigma(schedule, t, x, dtype)
        return sigma, alpha

    return _affine(schedule, t, coefs, xt, v, x_name="xt", y_name="v")


def v_from_x0_eps(schedule: Schedule, *, x0, eps, t) -> jax.Array:
    """v = alpha_t eps - sigma_t x0 (Salimans & Ho 2022, eq. in section 4; seed 000 step 1)."""

    def coefs(schedule, t, x, dtype):
        alpha, sigma = _alpha_sigma(schedule, t, x, dtype)
        return -sigma, alpha

    return _affine(schedule, t, coefs, x0, eps, x_name="x0", y_name="eps")


def score_from_eps(schedule: Schedule, *, t, eps) -> jax.Array:
    """The score grad_{x_t} log q(x_t) = -eps / sigma_t, from an eps prediction.

    With the optimal eps_hat = E[eps | x_t] this is the exact score of the marginal q(x_t):
    eps prediction is denoising score matching (Vincent 2011; Ho et al. 2020, section 3.2;
    seed 001, "connection to score"), and Tweedie's formula x0_hat = (x_t + sigma_t^2 score)
    / alpha_t is `x0_from_eps`. Finite for every t, since alphas_cumprod < 1 (sigma_t > 0).

    Args:
      schedule: the noise schedule.
      t: int [B] (or []) in [0, T - 1].
      eps: [B, ...] float, the noise or its estimate at step t.

    Returns:
      [B, ...] the score, in eps's dtype (computed in at least float32).

    Raises:
      ValueError: eps not a floating array, or t invalid (`check_t`).
    """
    dtype = _compute_dtype(eps=eps)
    t = check_t(schedule, t, eps, name="eps")
    sigma = _coef(schedule.sqrt_one_minus_alphas_cumprod, t, eps, dtype)
    return (-eps.astype(dtype) / sigma).astype(eps.dtype)


def eps_from_score(schedule: Schedule, *, t, score) -> jax.Array:
    """eps = -sigma_t score, the inverse of `score_from_eps`: a score model as a denoiser.

    Args:
      schedule: the noise schedule.
      t: int [B] (or []) in [0, T - 1].
      score: [B, ...] float, grad_{x_t} log q(x_t) or its estimate at step t.

    Returns:
      [B, ...] eps, in score's dtype (computed in at least float32).

    Raises:
      ValueError: score not a floating array, or t invalid (`check_t`).
    """
    dtype = _compute_dtype(score=score)
    t = check_t(schedule, t, score, name="score")
    sigma = _coef(schedule.sqrt_one_minus_alphas_cumprod, t, score, dtype)
    return (-sigma * score.astype(dtype)).astype(score.dtype)


def predict_x0_eps(schedule: Schedule, *, model_output, xt, t, prediction: str):
    """Turns a model output of any parameterization into (x0_hat, eps_hat).

    Args:
      model_output: [B, ...] the network's eps, x0 or v prediction (same shape as xt).
      xt: [B, ...] noisy input at step t.
      t: int [B].
      prediction: 'eps' | 'x0' | 'v'.

    Returns:
      (x0_hat, eps_hat), both [B, ...]. With prediction='eps', x0_hat is undefined where
      alphas_cumprod[t] = 0 (see `x0_from_eps`).
    """
    check_prediction(prediction)
    if prediction == "eps":
        eps = model_output
        return x0_from_eps(schedule, xt=xt, t=t, eps=eps), eps
    if prediction == "x0":
        x0 = model_output
        return x0, eps_from_x0(schedule, xt=xt, t=t, x0=x0)
    v = model_output
    return x0_from_v(schedule, xt=xt, t=t, v=v), eps_from_v(schedule, xt=xt, t=t, v=v)


def training_target(schedule: Schedule, *, x0, eps, t, prediction: str) -> jax.Array:
    """The regression target of a parameterization: eps, x0 or v = alpha_t eps - sigma_t x0.

    Raises:
      ValueError: unknown prediction, x0 and eps of different shapes or not floating, or t
        invalid (`check_t`), for every prediction (eps and x0 are returned as they are).
    """
    check_prediction(prediction)
    if prediction == "v":
        return v_from_x0_eps(schedule, x0=x0, eps=eps, t=t)  # checks x0, eps and t
    # the checks of the 'v' branch, so that a wrong t or eps is not accepted only because the
    # target happens not to need it
    _check_same_shape(x0=x0, eps=eps)
    _compute_dtype(x0=x0, eps=eps)
    check_t(schedule, t, x0, name="x0")
    return eps if prediction == "eps" else x0


def denoised_estimates(
    schedule: Schedule,
    *,
    model_output,
    xt,
    t,
    prediction: str,
    clip_denoised: bool = False,
    denoised_fn: Callable[[jax.Array], jax.Array] | None = None,
):
    """(x0_hat, eps_hat) from a prediction, after optional clipping / thresholding of x0_hat.

    When x0_hat is altered (clip to [-1, 1], then `denoised_fn`), eps_hat is recomputed from it
    at this x_t, as improved-diffusion does, so both describe the same point.

    Args:
      model_output: [B, ...] the eps, x0 or v prediction (without learned-variance channels).
      xt: [B, ...]; t: int [B] or [].
      clip_denoised: a Python bool (static: it selects the computation).
      denoised_fn: None or a callable x0_hat -> x0_hat.

    Raises:
      ValueError: clip_denoised not a bool, or denoised_fn not callable (`check_denoising`).
    """
    check_denoising(clip_denoised, denoised_fn)
    x0_hat, eps_hat = predict_x0_eps(
        schedule, model_output=model_output, xt=xt, t=t, prediction=prediction
    )
    if clip_denoised or denoised_fn is not None:
        if clip_denoised:
            x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
        if denoised_fn is not None:
            x0_hat = denoised_fn(x0_hat)
        eps_hat = eps_from_x0(schedule, xt=xt, t=t, x0=x0_hat)
    return x0_hat, eps_hat


class PMeanVariance(NamedTuple):
    """Reverse-process Gaussian p(x_{t-1} | x_t) and the denoised estimates behind it.

    mean: [B, ...]; variance, log_variance: [B, 1, ...] (fixed) or [B, ...] (learned_range);
    x0_hat, eps_hat: [B, ...].
    """

    mean: jax.Array
    variance: jax.Array
    log_variance: jax.Array
    x0_hat: jax.Array
    eps_hat: jax.Array


def split_learned_range(model_output, xt, variance: str):
    """Splits a model output into (prediction, variance_values or None) after checking its shape."""
    check_variance(variance)
    out_shape, x_shape = jnp.shape(model_output), jnp.shape(xt)
    if variance == "learned_range":
        if len(x_shape) < 2:  # [B] has no channel axis: the last axis would be the batch
            raise ValueError(
                f"variance='learned_range' needs xt with a channel axis, [B, ..., C], for the "
                f"doubled output channels; got xt of shape {x_shape}"
            )
        want = x_shape[:-1] + (2 * x_shape[-1],)
        if out_shape != want:
            raise ValueError(
                f"variance='learned_range' needs model_output with twice the channels of xt on "
                f"the last axis, shape {want}; got {out_shape}"
            )
        pred, var_values = jnp.split(model_output, 2, axis=-1)
        return pred, var_values
    if out_shape != x_shape:
        raise ValueError(
            f"model_output must have the shape of xt {x_shape} for variance={variance!r}; "
            f"got {out_shape}"
        )
    return model_output, None


def p_mean_variance(
    schedule: Schedule,
    *,
    model_output,
    xt,
    t,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = False,
    denoised_fn: Callable[[jax.Array], jax.Array] | None = None,
) -> PMeanVariance:
    """Mean and variance of the reverse step p(x_{t-1} | x_t) from any parameterization.

    The mean is the posterior mean mu_tilde_t(x_t, x0_hat) (Ho et al. 2020, eq. 7; for eps
    prediction it equals (x_t - beta_t / sigma_t eps_hat) / sqrt(1 - beta_t), eq. 11).

    Args:
      schedule: the noise schedule.
      model_output: [B, ...] the network output; with variance='learned_range' it has twice the
        channels of xt on the last axis: [prediction, v] with v in [-1, 1].
      xt: [B, ...] noisy input at step t.
      t: int [B].
      prediction: 'eps' | 'x0' | 'v'.
      variance: 'fixed_small' (sigma^2 = beta_tilde, log from posterior_log_variance_clipped),
        'fixed_large' (sigma^2 = beta, with the t = 0 entry taken as beta_tilde at t = 1, as in
        improved-diffusion), or 'learned_range' (Nichol & Dhariwal 2021, eq. 15:
        log sigma^2 = frac log beta_t + (1 - frac) log beta_tilde_t, frac = (v + 1) / 2).
      clip_denoised: clip x0_hat to [-1, 1] before forming the mean.
      denoised_fn: optional map applied to x0_hat (after clipping), e.g. dynamic thresholding.
        When x0_hat is altered, eps_hat is recomputed from it so that both stay consistent.

    Returns:
      PMeanVariance(mean, variance, log_variance, x0_hat, eps_hat): mean, x0_hat and eps_hat
      [B, ...]; variance and log_variance [B, 1, ...] for the fixed variances, [B, ...] for
      'learned_range'.

    Raises:
      ValueError: unknown prediction / variance, model_output of the wrong shape, or a bad t
        (as `q_mean_variance`).
    """
    check_prediction(prediction)
    pred, var_values = split_learned_range(model_output, xt, variance)
    t = check_t(schedule, t, xt, name="xt")
    x0_hat, eps_hat = denoised_estimates(
        schedule,
        model_output=pred,
        xt=xt,
        t=t,
        prediction=prediction,
        clip_denoised=clip_denoised,
        denoised_fn=denoised_fn,
    )
    mean, post_var, post_logvar = q_posterior_mean_variance(schedule, x0=x0_hat, xt=xt, t=t)
    dtype = _compute_dtype(xt=xt)
    out_dtype = mean.dtype
    if variance == "fixed_small":
        var, logvar = post_var, post_logvar
    elif variance == "fixed_large":
        large = jnp.concatenate([schedule.posterior_variance[1:2], schedule.betas[1:]])
        if schedule.num_timesteps == 1:
            large = schedule.betas
        var = _coef(large, t, xt, dtype).astype(out_dtype)
        logvar = jnp.log(var.astype(dtype)).astype(out_dtype)
    else:
        min_log = _coef(schedule.posterior_log_variance_clipped, t, xt, dtype)
        max_log = _coef(jnp.log(schedule.betas), t, xt, dtype)
        frac = (var_values.astype(dtype) + 1.0) / 2.0
        logvar_c = frac * max_log + (1.0 - frac) * min_log
        logvar = logvar_c.astype(out_dtype)
        var = jnp.exp(logvar_c).astype(out_dtype)
    return PMeanVariance(mean, var, logvar, x0_hat, eps_hat)
