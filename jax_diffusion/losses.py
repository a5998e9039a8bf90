"""Training losses and the variational bound (Ho et al. 2020; Nichol & Dhariwal 2021).

All functions are pure and work under `jit`, `vmap`, `grad` and `pmap`. Per-example
quantities are means over all non-batch axes ("mean_flat"), as in improved-diffusion.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_diffusion.diffusion import (
    _check_rng,
    _check_zero_snr,
    _is_concrete,
    _is_real,
    check_prediction,
    check_schedule,
    check_variance,
    p_mean_variance,
    q_posterior_mean_variance,
    q_sample,
    split_learned_range,
    training_target,
)
from jax_diffusion.schedules import Schedule

__all__ = [
    "LOSS_TYPES",
    "WEIGHTINGS",
    "NLLBpd",
    "autoencoder_loss",
    "diffusion_loss",
    "discretized_gaussian_log_likelihood",
    "loss_weight",
    "mean_flat",
    "nll_bpd",
    "normal_kl",
    "prior_bpd",
    "training_draws",
    "vlb_terms_bpd",
]

LOSS_TYPES = ("l2", "l1")
WEIGHTINGS = ("none", "snr", "min_snr", "truncated_snr")
_LN2 = math.log(2.0)


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over all axes but the first: [B, ...] -> [B]."""
    return jnp.mean(x, axis=tuple(range(1, jnp.ndim(x))))


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats, elementwise (broadcasting).

    KL = 0.5 (-1 + logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2)).
    """
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
    )


def _sum_flat(x: jax.Array) -> jax.Array:
    """Sum over all axes but the first: [B, ...] -> [B]."""
    return jnp.sum(x, axis=tuple(range(1, jnp.ndim(x))))


def _standard_normal_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) in nats per example: [B, ...] -> [B]."""
    return _sum_flat(normal_kl(mean, logvar, 0.0, 0.0))


def _log1mexp(x):
    """log(1 - exp(x)) for x <= 0, accurate on both sides of -log 2 (Maechler 2012)."""
    x = jnp.minimum(x, 0.0)
    near = x > -_LN2
    # each branch sees only inputs it is accurate and finite for, so gradients stay finite
    x_near = jnp.where(near, x, -_LN2)
    x_far = jnp.where(near, -_LN2, x)
    return jnp.where(near, jnp.log(-jnp.expm1(x_near)), jnp.log1p(-jnp.exp(x_far)))


def discretized_gaussian_log_likelihood(x, *, means, log_scales) -> jax.Array:
    """log-likelihood of 8-bit data under a discretized Gaussian decoder (Ho et al. 2020, eq. 13).

    Each value x of the 256-level grid in [-1, 1] owns the bin [x - 1/255, x + 1/255]; the
    edge bins extend to -inf and +inf. The normal CDF is the tanh approximation
    Phi(u) ~ 0.5 (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3))) used by DDPM / improved-diffusion.

    Since 0.5 (1 + tanh(z)) = sigmoid(2 z), every log-probability is evaluated in log space
    with log-sigmoid and a stable log(1 - exp(.)), so it stays accurate in float32 far in the
    tails where the difference of two CDFs underflows (improved-diffusion clamps it at 1e-12,
    which caps the log-likelihood at -27.6 nats; this does not).

    Args:
      x: [B, ...] data on the 8-bit grid, in [-1, 1].
      means: [B, ...] decoder means.
      log_scales: log standard deviations, broadcastable to x.

    Returns:
      [B, ...] log-probabilities in nats.
    """
    dtype = jnp.promote_types(jnp.result_type(x, means, log_scales), jnp.float32)
    x, means, log_scales = (jnp.asarray(a, dtype) for a in (x, means, log_scales))
    inv_stdv = jnp.exp(-log_scales)
    centered = x - means

    def logits(u):  # Phi(u) ~ sigmoid(logits(u))
        return 2.0 * math.sqrt(2.0 / math.pi) * (u + 0.044715 * u**3)

    a = logits(inv_stdv * (centered + 1.0 / 255.0))  # upper edge of the bin
    b = logits(inv_stdv * (centered - 1.0 / 255.0))  # lower edge
    log_cdf_plus = jax.nn.log_sigmoid(a)  # log Phi(upper)
    log_one_minus_cdf_min = jax.nn.log_sigmoid(-b)  # log (1 - Phi(lower))
    # log(sigmoid(a) - sigmoid(b)), factored on the side away from the saturated tail.
    # The unused side gets a harmless argument so that its gradient cannot poison the result.
    use_right = a + b > 0.0
    d_left = jnp.where(use_right, -1.0, jax.nn.log_sigmoid(b) - jax.nn.log_sigmoid(a))
    d_right = jnp.where(use_right, jax.nn.log_sigmoid(-a) - jax.nn.log_sigmoid(-b), -1.0)
    left = jax.nn.log_sigmoid(a) + _log1mexp(d_left)
    right = jax.nn.log_sigmoid(-b) + _log1mexp(d_right)
    log_cdf_delta = jnp.where(use_right, right, left)
    return jnp.where(
        x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
    )


def prior_bpd(schedule: Schedule, *, x0) -> jax.Array:
    """Prior term KL(q(x_T | x0) || N(0, I)) in bits/dim (Ho et al. 2020, L_T in eq. 5).

    Args:
      x0: [B, ...] clean data.

    Returns:
      [B] bits per dimension.
    """
    check_schedule(schedule)
    dtype = jnp.promote_types(jnp.result_type(x0), jnp.float32)
    last = schedule.num_timesteps - 1
    alpha = schedule.sqrt_alphas_cumprod[last].astype(dtype)
    var = 1.0 - schedule.alphas_cumprod[last].astype(dtype)
    kl = normal_kl(alpha * x0.astype(dtype), jnp.log(var), 0.0, 0.0)
    return mean_flat(kl) / _LN2


def vlb_terms_bpd(
    schedule: Schedule,
    *,
    model_output,
    x0,
    xt,
    t,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = False,
) -> jax.Array:
    """One term of the variational bound per example, in bits/dim (Ho et al. 2020, eq. 5).

    For t > 0: L_{t} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)); for t = 0 the decoder
    negative log-likelihood -log p(x0 | x_1) under the discretized Gaussian.

    Args:
      model_output: [B, ...] network output at (xt, t) (doubled channels for learned_range).
      x0: [B, ...] clean data on the 8-bit grid in [-1, 1].
      xt: [B, ...] = q_sample(x0, t, noise).
      t: int [B].

    Returns:
      [B] bits per dimension.
    """
    true_mean, _, true_logvar = q_posterior_mean_variance(schedule, x0=x0, xt=xt, t=t)
    out = p_mean_variance(
        schedule,
        model_output=model_output,
        xt=xt,
        t=t,
        prediction=prediction,
        variance=variance,
        clip_denoised=clip_denoised,
    )
    dtype = jnp.promote_types(out.mean.dtype, jnp.float32)
    kl = mean_flat(
        normal_kl(
            true_mean.astype(dtype),
            true_logvar.astype(dtype),
            out.mean.astype(dtype),
            out.log_variance.astype(dtype),
        )
    )
    decoder_nll = -mean_flat(
        discretized_gaussian_log_likelihood(
            x0, means=out.mean, log_scales=0.5 * out.log_variance.astype(dtype)
        )
    )
    return jnp.where(jnp.asarray(t) == 0, decoder_nll, kl) / _LN2


class NLLBpd(NamedTuple):
    """The full variational bound on -log p(x0) in bits/dim, with its parts.

    total_bpd = prior_bpd + kl_bpd + decoder_bpd, each [B]; terms_bpd [B, T] holds the term of
    every step t (index 0: decoder NLL).
    """

    total_bpd: jax.Array
    prior_bpd: jax.Array
    kl_bpd: jax.Array
    decoder_bpd: jax.Array
    terms_bpd: jax.Array


def nll_bpd(
    schedule: Schedule,
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x0,
    rng,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = False,
) -> NLLBpd:
    """Full-chain variational bound in bits/dim: L_T + sum_{t>1} L_{t-1} + L_0 (Ho et al. eq. 5).

    In paper steps t = 1..T. With this package's index t = paper step t + 1: the prior
    `prior_bpd`, the KL terms at indices 1..T-1 (`vlb_terms_bpd`) and the decoder NLL at
    index 0, each counted once (T terms plus the prior).

    Evaluates every one of the T terms with a single-sample x_t per example, in one `lax.scan`
    over t (T model calls, constant compile time). Noise at step t comes from fold_in(rng, t).

    Args:
      model_fn: model_fn(x [B, ...], t int [B]) -> model output.
      x0: [B, ...] data on the 8-bit grid in [-1, 1].
      rng: PRNG key.

    Returns:
      NLLBpd of [B] arrays (and terms_bpd [B, T]).
    """
    check_schedule(schedule)
    check_prediction(prediction)
    check_variance(variance)
    _check_floating_x0(x0)
    _check_rng(rng, why=" for nll_bpd's noise")
    _check_zero_snr(schedule, prediction, schedule.num_timesteps - 1, "evaluate the bound at")
    batch = jnp.shape(x0)[0]

    def body(_, t_scalar):
        t = jnp.full((batch,), t_scalar, dtype=jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(rng, t_scalar), jnp.shape(x0), x0.dtype)
        xt = q_sample(schedule, x0=x0, t=t, noise=noise)
        term = vlb_terms_bpd(
            schedule,
            model_output=model_fn(xt, t),
            x0=x0,
            xt=xt,
            t=t,
            prediction=prediction,
            variance=variance,
            clip_denoised=clip_denoised,
        )
        return None, term

    _, terms = jax.lax.scan(body, None, jnp.arange(schedule.num_timesteps, dtype=jnp.int32))
    terms = terms.T  # [B, T]
    prior = prior_bpd(schedule, x0=x0)
    kl = jnp.sum(terms[:, 1:], axis=1)
    decoder = terms[:, 0]
    return NLLBpd(prior + kl + decoder, prior, kl, decoder, terms)


def _check_nonnegative(name: str, value, *, zero_ok: bool) -> None:
    """`value` must be a real scalar (Python, NumPy or JAX; traced allowed), finite and > 0
    (>= 0 where `zero_ok`) where it is concrete; else ValueError naming `name` and the value."""
    allowed = f"a finite real scalar {'>= 0' if zero_ok else '> 0'}"
    ok = _is_real(value) and jnp.ndim(value) == 0
    if ok and _is_concrete(value):
        x = float(value)
        ok = math.isfinite(x) and (x >= 0 if zero_ok else x > 0)
    if not ok:
        raise ValueError(f"{name} must be {allowed}; got {value!r}")


def loss_weight(
    schedule: Schedule, t, *, prediction: str, weighting: str, min_snr_gamma: float = 5.0
) -> jax.Array:
    """Per-example weight of the parameterization's squared error (shape of t).

    Each weighting is defined in x0 space, lambda(t) times ||x0 - x0_hat||^2, and converted to
    the space of `prediction` using ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2 and
    ||v - v_hat||^2 = (SNR + 1) ||x0 - x0_hat||^2:
      'none': weight 1 on the parameterization's own error (L_simple, Ho et al. 2020, eq. 14).
      'snr': lambda = SNR, i.e. the eps-space L_simple whatever the parameterization.
      'min_snr': lambda = min(SNR, gamma) (Hang et al. 2023, Min-SNR-gamma).
      'truncated_snr': lambda = max(SNR, 1) (Salimans & Ho 2022, "truncated SNR" weighting).
    Every weight stays finite at SNR = 0 (zero-terminal schedules) and at t = 0: the forms are
    written so that no small SNR is divided by, except 'truncated_snr' with eps prediction,
    whose weight 1 / SNR is genuinely unbounded as SNR -> 0 (eps prediction carries no
    information about x0 there) and is capped at 1 / eps of the dtype (8.4e6 in float32).
    """
    check_schedule(schedule)
    check_prediction(prediction)
    if weighting not in WEIGHTINGS:
        raise ValueError(
            f"weighting must be one of 'none', 'snr', 'min_snr', 'truncated_snr'; got {weighting!r}"
        )
    _check_nonnegative("min_snr_gamma", min_snr_gamma, zero_ok=False)
    snr = schedule.snr(t)  # checks t; in at least float32
    if weighting == "none":
        return jnp.ones_like(snr)
    gamma = jnp.asarray(min_snr_gamma, snr.dtype)
    if prediction == "x0":
        lam_over = {"snr": snr, "min_snr": jnp.minimum(snr, gamma), "truncated_snr": None}
        return lam_over[weighting] if weighting != "truncated_snr" else jnp.maximum(snr, 1.0)
    if prediction == "v":
        lam = {"snr": snr, "min_snr": jnp.minimum(snr, gamma)}.get(weighting)
        return (jnp.maximum(snr, 1.0) if lam is None else lam) / (snr + 1.0)
    # eps: lambda / SNR, written without dividing by a small SNR where the limit is finite.
    if weighting == "snr":
        return jnp.ones_like(snr)
    if weighting == "min_snr":
        return gamma / jnp.maximum(snr, gamma)
    # truncated_snr: max(SNR, 1) / SNR = 1 / min(SNR, 1), infinite at SNR = 0; capped.
    return 1.0 / jnp.maximum(jnp.minimum(snr, 1.0), jnp.finfo(snr.dtype).eps)


def _check_floating_x0(x0) -> None:
    """x0 must be floating, with a batch axis and at least one element (a mean over an empty
    batch or example is NaN)."""
    dtype = getattr(x0, "dtype", None)
    if (
        dtype is None
        or not jnp.issubdtype(dtype, jnp.floating)
        or not jnp.ndim(x0)
        or not jnp.size(x0)
    ):
        raise ValueError(
            "x0 must be a floating array [B, ...] with B >= 1 and at least one element per "
            "example (e.g. images scaled to [-1, 1]); got "
            + (f"dtype {dtype} and shape {jnp.shape(x0)}" if dtype is not None else repr(x0))
        )


def _check_draws(draws, x0, name: str):
    """A loss's `draws=(name [B], noise [B, ...])` against x0 [B, ...]; else ValueError."""
    first, noise = draws
    batch = jnp.shape(x0)[0]
    if jnp.shape(first) != (batch,) or jnp.shape(noise) != jnp.shape(x0):
        raise ValueError(
            f"draws must be ({name} [B], noise [B, ...]) with x0's shape {jnp.shape(x0)}; "
            f"got {name} {jnp.shape(first)} and noise {jnp.shape(noise)}"
        )
    return first, noise


def training_draws(schedule: Schedule, x0, rng) -> tuple[jax.Array, jax.Array]:
    """The randomness of one `diffusion_loss` call: t ~ U{0, ..., T-1} [B] and eps ~ N(0, I).

    Args:
      schedule: the noise schedule (T = schedule.num_timesteps).
      x0: [B, ...] clean data (only its shape and dtype are used).
      rng: PRNG key.

    Returns:
      (t int32 [B], noise [B, ...] of x0's dtype): exactly what diffusion_loss(..., x0, rng)
      draws, so a batch can be split after drawing (gradient accumulation) without changing
      the loss.
    """
    check_schedule(schedule)
    _check_floating_x0(x0)
    _check_rng(rng, why=" (or pass draws=(t, noise) to diffusion_loss)")
    batch = jnp.shape(x0)[0]
    t_rng, noise_rng = jax.random.split(rng)
    t = jax.random.randint(t_rng, (batch,), 0, schedule.num_timesteps, dtype=jnp.int32)
    noise = jax.random.normal(noise_rng, jnp.shape(x0), jnp.result_type(x0))
    return t, noise


def diffusion_loss(
    schedule: Schedule,
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x0,
    rng,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    loss_type: str = "l2",
    weighting: str = "none",
    min_snr_gamma: float = 5.0,
    vlb_weight: float = 0.001,
    draws: tuple[jax.Array, jax.Array] | None = None,
):
    """Denoising training loss: L_simple and its weighted / hybrid variants.

    Samples t ~ U{0, ..., T-1} and eps ~ N(0, I) per example, builds x_t = q_sample(x0, t, eps)
    and regresses model_fn(x_t, t) on the target of `prediction` (eps, x0 or v; Ho et al. 2020,
    Algorithm 1 and eq. 14, as a mean over dimensions). With variance='learned_range' the loss is
    the hybrid L_simple + vlb_weight * L_vlb of Nichol & Dhariwal 2021 (section 3.1): the VLB
    term is computed with the mean prediction under stop-gradient, so it trains the variance
    only, and L_vlb is its single-step estimate T * L_t (in bits/dim).

    Args:
      schedule: the noise schedule.
      model_fn: model_fn(x [B, ...], t int [B]) -> [B, ...] (doubled channels for learned_range).
      x0: [B, ...] clean data in [-1, 1].
      rng: PRNG key.
      prediction: 'eps' | 'x0' | 'v'.
      variance: 'fixed_small' | 'fixed_large' | 'learned_range'.
      loss_type: 'l2' (squared error) or 'l1' (absolute error). The weights of `loss_weight`
        convert squared errors between spaces; an absolute error converts with their square
        roots, so with 'l1' a weighting other than 'none' means a different x0-space
        weighting for each parameterization.
      weighting: 'none' | 'snr' | 'min_snr' | 'truncated_snr' (see `loss_weight`).
      min_snr_gamma: gamma of 'min_snr'.
      vlb_weight: lambda of the hybrid loss.
      draws: (t int [B], noise [B, ...]) to use instead of drawing them from `rng` (which is
        then ignored); `training_draws(schedule, x0, rng)` gives the ones drawn otherwise.

    Returns:
      (loss, metrics): scalar loss (mean over the batch) and a dict with scalars 'loss', 'mse'
      (unweighted mean squared error of the prediction) and, for learned_range, 'vlb_bpd';
      and per-example arrays 't' [B] and 'per_example_loss' [B].
    """
    check_prediction(prediction)
    check_variance(variance)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of 'l2', 'l1'; got {loss_type!r}")
    loss_weight(
        schedule,
        jnp.zeros((), jnp.int32),
        prediction=prediction,
        weighting=weighting,
        min_snr_gamma=min_snr_gamma,
    )  # validates weighting and gamma before any work
    _check_nonnegative("vlb_weight", vlb_weight, zero_ok=True)
    _check_floating_x0(x0)
    if variance == "learned_range":
        last = schedule.num_timesteps - 1
        _check_zero_snr(schedule, prediction, last, "take the hybrid loss's bound term at")
    if draws is None:
        t, noise = training_draws(schedule, x0, rng)
    else:
        t, noise = _check_draws(draws, x0, "t")
    xt = q_sample(schedule, x0=x0, t=t, noise=noise)
    model_output = model_fn(xt, t)
    pred, var_values = split_learned_range(model_output, xt, variance)
    target = training_target(schedule, x0=x0, eps=noise, t=t, prediction=prediction)
    dtype = jnp.promote_types(pred.dtype, jnp.float32)
    err = pred.astype(dtype) - target.astype(dtype)
    mse = mean_flat(jnp.square(err))
    per_example = mse if loss_type == "l2" else mean_flat(jnp.abs(err))
    weight = loss_weight(
        schedule, t, prediction=prediction, weighting=weighting, min_snr_gamma=min_snr_gamma
    )
    per_example = weight.astype(dtype) * per_example
    metrics = {}
    if variance == "learned_range":
        frozen = jnp.concatenate([jax.lax.stop_gradient(pred), var_values], axis=-1)
        vlb = vlb_terms_bpd(
            schedule,
            model_output=frozen,
            x0=x0,
            xt=xt,
            t=t,
            prediction=prediction,
            variance=variance,
        )
        per_example = per_example + vlb_weight * schedule.num_timesteps * vlb
        metrics["vlb_bpd"] = jnp.mean(vlb)
    loss = jnp.mean(per_example)
    metrics.update(loss=loss, mse=jnp.mean(mse), t=t, per_example_loss=per_example)
    return loss, metrics


def autoencoder_loss(
    x: jax.Array,
    x_rec: jax.Array,
    mean: jax.Array,
    logvar: jax.Array,
    *,
    kl_weight=1e-6,
    loss_type: str = "l1",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Latent diffusion's autoencoder objective (Rombach et al. 2022, sec. 3.1 and app. G).

    L = mean over the batch of [ sum_pixels rec(x, x_rec) + kl_weight KL(N(mean, exp(logvar))
    || N(0, I)) ], rec = |x - x_rec| ('l1', the paper's) or (x - x_rec)^2 ('l2'), the KL summed
    over each example's latent entries: the paper's KL-regularised loss without its perceptual
    (LPIPS) and adversarial terms, with their per-example sums, so kl_weight has the paper's
    scale (1e-6).

    Args:
      x: [B, ...] data.
      x_rec: [B, ...] its reconstruction (shape of x).
      mean, logvar: [B, ...] the encoder's q(z | x) (a `models.DiagonalGaussian` unpacks into
        them: `autoencoder_loss(x, x_rec, *posterior)`).
      kl_weight: finite real >= 0 (may be traced).
      loss_type: 'l1' | 'l2'.

    Returns:
      (loss scalar float32, metrics): "reconstruction" and "kl" [B] per example (nats for the
      KL), "loss" the scalar.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}; got {loss_type!r}")
    _check_nonnegative("kl_weight", kl_weight, zero_ok=True)
    for name, a in (("x", x), ("x_rec", x_rec), ("mean", mean), ("logvar", logvar)):
        if jnp.ndim(a) < 1 or not jnp.issubdtype(jnp.result_type(a), jnp.floating):
            raise ValueError(
                f"{name} must be a float array [B, ...]; got {jnp.result_type(a)} "
                f"of shape {jnp.shape(a)}"
            )
    if jnp.shape(x_rec) != jnp.shape(x):
        raise ValueError(f"x_rec must have the shape of x {jnp.shape(x)}; got {jnp.shape(x_rec)}")
    if jnp.shape(logvar) != jnp.shape(mean) or jnp.shape(mean)[0] != jnp.shape(x)[0]:
        raise ValueError(
            f"mean and logvar must share one shape [B, ...] with B = x's {jnp.shape(x)[0]}; got "
            f"{jnp.shape(mean)} and {jnp.shape(logvar)}"
        )
    err = x_rec.astype(jnp.float32) - x.astype(jnp.float32)
    rec = _sum_flat(jnp.abs(err) if loss_type == "l1" else jnp.square(err))
    kl = _standard_normal_kl(mean.astype(jnp.float32), logvar.astype(jnp.float32))
    loss = jnp.mean(rec + kl_weight * kl)
    return loss, {"loss": loss, "reconstruction": rec, "kl": kl}
