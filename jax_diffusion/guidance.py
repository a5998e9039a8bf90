"""Guidance and x0 thresholding for any sampler: classifier(-free) guidance, dynamic thresholding.

All are plain function transforms that plug into the samplers of `jax_diffusion.samplers`
(which re-exports them): `classifier_free_guidance` turns a conditional `model_fn(x, t, y)`
into a denoiser `model_fn(x, t)`, `classifier_guidance` adds a noisy classifier's gradient to
a denoiser `model_fn(x, t)` (with `classifier_grad` to build that gradient), and
`dynamic_threshold` is an `x0_hat -> x0_hat` map for a sampler's `denoised_fn`. Like the
samplers they import only jax and numpy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_diffusion._checks import check_real
from jax_diffusion._sampling import _per_example
from jax_diffusion.diffusion import (
    _alpha_sigma,
    _is_concrete,
    _is_real,
    check_prediction,
    check_schedule,
    check_t,
    check_variance,
)
from jax_diffusion.schedules import Schedule

__all__ = [
    "classifier_free_guidance",
    "classifier_grad",
    "classifier_guidance",
    "dynamic_threshold",
]

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def classifier_free_guidance(
    model_fn: Callable[[jax.Array, jax.Array, Any], jax.Array],
    guidance_scale,
    null_label,
    *,
    y,
    variance: str = "fixed_small",
    guidance_rescale: float = 0.0,
) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6; seed 004 section 4.5).

    Wraps a conditional `model_fn(x, t, y)` into a denoiser `guided(x, t)` for labels `y`:
      out = out(x, t, null) + w (out(x, t, y) - out(x, t, null)),
    as in diffusers (guidance_scale). The paper's eq. 6, (1 + w') eps(x, y) - w' eps(x), is
    the same combination with w' = w - 1: its w' = 0 (no guidance) is this w = 1. Both
    branches are evaluated in ONE batched model call on [x; x], [t; t], [y; null] (2B
    examples). The combination is done in the model's output space, which for 'eps', 'x0' and
    'v' equals guiding eps: each parameterization is affine in the output at a fixed x_t,
    eps = a(t) x_t + b(t) out, and the weights (1 - w) + w sum to 1. With variance='learned_range'
    only the prediction half is guided; the variance half is the conditional branch's.

    `guidance_rescale` phi > 0 counters the over-exposure of large w (Lin et al. 2024, "Common
    Diffusion Noise Schedules and Sample Steps are Flawed", section 3.4, Algorithm 2; diffusers'
    `guidance_rescale`): the guided output is scaled per example towards the conditional
    branch's standard deviation (over all but the batch axis), out = out_cfg (phi std(cond) /
    std(out_cfg) + 1 - phi); the paper uses phi = 0.7 with w = 7.5. This rescale is applied to
    the model's output as is (as diffusers does, e.g. to v for a v model) and, unlike the
    combination above, depends on the parameterization. An example whose guided output is
    constant (std 0) is left unscaled.

    Usage: `ddim_sample(classifier_free_guidance(f, 3.0, num_classes, y=labels), schedule, x_T)`.

    Args:
      model_fn: conditional denoiser `model_fn(x [N, ...], t int32 [N], y) -> [N, ...]`.
      guidance_scale: w, a real scalar or [B] (a list, a NumPy or JAX array; may be traced),
        finite where concrete. 0 gives the unconditional model and 1 the conditional one
        (both exactly), > 1 amplifies guidance.
      null_label: the "no condition" label, broadcast to each leaf of y (e.g. num_classes
        for integer labels, or a null embedding [..] for embeddings), or a pytree with y's
        structure holding one null label per leaf.
      y: the labels, an array [B, ...] or a pytree of them, batch-aligned with x.
      variance: model-output layout: 'learned_range' means the last axis holds
        [prediction, variance values].
      guidance_rescale: phi in [0, 1], a Python or NumPy number (0: plain guidance, exactly).

    Returns:
      `guided(x [B, ...], t int [] or [B]) -> [B, ...]`, a denoiser for any sampler.
    """
    check_variance(variance)
    phi = check_guidance_rescale(guidance_rescale)
    if not callable(model_fn):
        raise ValueError(f"model_fn must be a callable model_fn(x, t, y); got {model_fn!r}")
    guidance_scale = _check_guidance_scale(guidance_scale, nonnegative=False)
    leaves = jax.tree.leaves(y)
    if not leaves:
        raise ValueError(f"y must be an array [B, ...] or a pytree of them; got {y!r}")
    for leaf in leaves:
        if jnp.ndim(leaf) < 1:
            raise ValueError(
                "y must be an array [B, ...] or a pytree of them (a Python list is a pytree of "
                f"scalars: pass jnp.asarray(labels)); got a leaf of shape {jnp.shape(leaf)}"
            )
    null_tree = jax.tree.structure(null_label)
    if null_tree == jax.tree.structure(0):  # one null label (a scalar or an array) for every leaf
        null_label = jax.tree.map(lambda _: null_label, y)
    elif null_tree != jax.tree.structure(y):
        raise ValueError(
            "null_label must be one label (broadcast to each leaf of y) or a pytree with y's "
            f"structure {jax.tree.structure(y)}; got {null_tree}"
        )

    def stack_null(leaf, null):
        leaf = jnp.asarray(leaf)
        null = jnp.asarray(null, leaf.dtype)
        try:
            null = jnp.broadcast_to(null, leaf.shape)
        except ValueError:
            raise ValueError(
                f"null_label must broadcast to each leaf of y; got shape {null.shape} for a "
                f"leaf of shape {leaf.shape}"
            ) from None
        return jnp.concatenate([leaf, null])

    y_both = jax.tree.map(stack_null, y, null_label)

    def guided(x, t):
        batch = x.shape[0]
        for leaf in leaves:
            if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != batch:
                raise ValueError(
                    f"y must have batch size {batch} matching x; got a leaf of shape "
                    f"{jnp.shape(leaf)}"
                )
        if jnp.ndim(guidance_scale) == 1 and jnp.shape(guidance_scale)[0] != batch:
            raise ValueError(
                f"guidance_scale must be a scalar or [B] = [{batch}]; got shape "
                f"{jnp.shape(guidance_scale)}"
            )
        t = jnp.broadcast_to(t, (batch,))
        out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), y_both)
        if jnp.shape(out)[0] != 2 * batch:
            raise ValueError(
                f"model_fn must return a batch of {2 * batch} (conditional + null branches); "
                f"got shape {jnp.shape(out)}"
            )
        if variance == "learned_range" and (jnp.ndim(out) < 2 or jnp.shape(out)[-1] % 2):
            raise ValueError(
                "model_fn must return [prediction, variance values] on the last axis (an even "
                f"number of channels) with variance='learned_range'; got shape {jnp.shape(out)}"
            )
        cond, uncond = out[:batch], out[batch:]
        if variance == "learned_range":
            cond, cond_var = jnp.split(cond, 2, axis=-1)
            uncond, _ = jnp.split(uncond, 2, axis=-1)
        w = jnp.asarray(guidance_scale, jnp.promote_types(out.dtype, jnp.float32))
        w = _per_example(w, out)
        # anchored at the nearer branch (as C++'s std::lerp): w = 0 gives uncond and w = 1 cond
        # bit for bit, where uncond + 1 * (cond - uncond) is off by a rounding of uncond; both
        # forms have the derivative cond - uncond in w
        diff = cond - uncond
        guided_pred = jnp.where(w < 0.5, uncond + w * diff, cond + (w - 1) * diff)
        if phi > 0:
            guided_pred = _rescaled(guided_pred, cond, phi)
        guided_pred = guided_pred.astype(out.dtype)
        if variance == "learned_range":
            return jnp.concatenate([guided_pred, cond_var], axis=-1)
        return guided_pred

    return guided


def check_guidance_rescale(value, name: str = "guidance_rescale") -> float:
    """`value` as a float after checking it is a number in [0, 1] (`classifier_free_guidance`'s
    phi); else ValueError naming `name` and the value."""
    phi = check_real(name, value)
    if not 0.0 <= phi <= 1.0:
        raise ValueError(f"{name} must be in [0, 1]; got {value!r}")
    return phi


def _rescaled(guided: jax.Array, cond: jax.Array, phi: float) -> jax.Array:
    """guided [B, ...] (phi std(cond) / std(guided) + 1 - phi), stds per example over all but
    the batch axis (Lin et al. 2024, Algorithm 2); a factor of 1 where std(guided) = 0."""
    axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(cond, axis=axes, keepdims=True)
    std_guided = jnp.std(guided, axis=axes, keepdims=True)
    nonzero = std_guided > 0
    ratio = std_cond / jnp.where(nonzero, std_guided, 1.0)  # no 0 / 0 in the gradient either
    return guided * jnp.where(nonzero, phi * ratio + (1.0 - phi), 1.0)


def classifier_grad(log_prob_fn: Callable[[jax.Array, jax.Array], jax.Array]) -> ModelFn:
    """grad_{x_t} log p_phi(y | x_t, t) from a noisy classifier's per-example log-probability.

    Returns `grad_fn(x, t) = jax.grad(lambda x: jnp.sum(log_prob_fn(x, t)))(x)`: the gradient of
    the batch sum is the per-example gradient because example i's log-probability depends on
    x[i] alone (true of a classifier in inference mode; not of one whose batch statistics
    couple the examples, such as batch norm in training mode). For a classifier `clf(x, t)`
    returning logits [B, K] and labels y [B]:

      log_prob_fn = lambda x, t: jax.nn.log_softmax(clf(x, t))[jnp.arange(x.shape[0]), y]

    which is what ADM's `cond_fn` differentiates (guided-diffusion, scripts/classifier_sample.py).

    Args:
      log_prob_fn: `log_prob_fn(x [B, ...] float, t int [B] or []) -> [B]`, log p_phi(y | x_t, t)
        for each example's own label y (closed over).

    Returns:
      `grad_fn(x [B, ...], t) -> [B, ...]` in x's dtype, the `grad_log_prob_fn` of
      `classifier_guidance`.

    Raises:
      ValueError: log_prob_fn not callable; when grad_fn is traced, log_prob_fn not returning
        one value per example, [B].
    """
    if not callable(log_prob_fn):
        raise ValueError(
            f"log_prob_fn must be a callable log_prob_fn(x, t) -> [B]; got {log_prob_fn!r}"
        )

    def total(x, t):
        log_prob = log_prob_fn(x, t)
        if jnp.shape(log_prob) != jnp.shape(x)[:1]:
            raise ValueError(
                f"log_prob_fn(x, t) must return [B] = {list(jnp.shape(x)[:1])}, one "
                f"log-probability per example; got shape {list(jnp.shape(log_prob))}"
            )
        return jnp.sum(log_prob)

    def grad_fn(x, t):
        return jax.grad(total)(x, t)

    return grad_fn


def _check_guidance_scale(guidance_scale, *, nonnegative: bool):
    """guidance_scale: a real scalar or [B] (a list or tuple is made an array), finite (and
    >= 0 if `nonnegative`) where concrete; returned as an array or the scalar given."""
    allowed = ", >= 0" if nonnegative else ""
    if isinstance(guidance_scale, list | tuple):
        guidance_scale = jnp.asarray(guidance_scale)
    if not _is_real(guidance_scale) or jnp.ndim(guidance_scale) > 1:
        got = f"shape {jnp.shape(guidance_scale)}" if _is_real(guidance_scale) else ""
        raise ValueError(
            f"guidance_scale must be a scalar or [B]{allowed}; got {got or repr(guidance_scale)}"
        )
    if _is_concrete(guidance_scale):
        values = np.asarray(guidance_scale, np.float64)
        if not (np.isfinite(values) & (values >= 0 if nonnegative else True)).all():
            raise ValueError(
                f"guidance_scale must be finite{' and >= 0' if nonnegative else ''}; got "
                f"{np.asarray(guidance_scale)!r}"
            )
    return guidance_scale


def classifier_guidance(
    model_fn: ModelFn,
    grad_log_prob_fn: ModelFn,
    schedule: Schedule,
    guidance_scale,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
) -> ModelFn:
    """Classifier guidance (Dhariwal & Nichol 2021, section 4.2, Algorithm 2) for any sampler.

    Wraps a denoiser `model_fn(x, t)` into `guided(x, t)` with the same output
    parameterization, whose eps is shifted by the gradient of a noisy classifier:
      eps_hat' = eps_hat - s sqrt(1 - alphas_cumprod[t]) grad_{x_t} log p_phi(y | x_t, t),
    i.e. the score gains s grad log p_phi: score' = score + s grad log p_phi(y | x_t), the
    score of the tilted marginal p_t(x_t) p_phi(y | x_t)^s (s = 1: of p_t(x_t | y), by Bayes).
    The model's eps, x0 or v output is converted to eps_hat, shifted and converted back, which
    at a fixed x_t is the same as adding c(t) s grad to the output, with c = -sigma_t (eps),
    sigma_t^2 / alpha_t (x0: x0_hat' = (x_t - sigma_t eps_hat') / alpha_t, Tweedie's formula
    with the guided score) and -sigma_t / alpha_t (v = (eps - sigma_t x_t) / alpha_t); so
    s = 0 returns the model's output exactly (given a finite gradient). Where
    alphas_cumprod[t] = 0 (a zero-terminal-SNR schedule's last step) x_t = eps carries no
    information about x0 or y, so the true gradient is 0, and no x0 or v could express a
    shifted eps anyway: the x0 / v output is returned unchanged there. With
    variance='learned_range' the variance half of the output (the last axis holds
    [prediction, variance values]) is returned untouched.

    Algorithm 1 instead shifts the ancestral (DDPM) mean by s Sigma grad, Sigma the step's
    variance. Through the DDPM mean mu = (x_t - beta_t / sigma_t eps_hat) / sqrt(1 - beta_t)
    (Ho et al. 2020, eq. 11) Algorithm 2 shifts it by s beta_t / sqrt(1 - beta_t) grad: the
    same to first order in beta_t (Sigma = beta_t, or beta_tilde_t -> beta_t for large t).
    Algorithm 2, implemented here, needs no sampler change and guides DDPM, DDIM and
    DPM-Solver++ alike. ADM's released code (openai/guided-diffusion, `--classifier_scale`)
    scales the same gradient, so its classifier_scale is s: its DDPM sampling uses Algorithm 1
    (`condition_mean`), its DDIM sampling Algorithm 2 (`condition_score`). It shifts the x0 that
    `clip_denoised` has clipped; here the sampler clips the guided x0.

    Usage, with a classifier `clf(x, t) -> logits [B, K]` trained on noisy x_t and labels y [B]:

      log_prob = lambda x, t: jax.nn.log_softmax(clf(x, t))[jnp.arange(x.shape[0]), y]
      grad_fn = classifier_grad(log_prob)   # or jax.grad of log_prob(x, t).sum() by hand
      guided = classifier_guidance(model_fn, grad_fn, schedule, 1.0, prediction="v")
      x0 = ddim_sample(guided, schedule, x_T, prediction="v")

    Args:
      model_fn: the denoiser `model_fn(x [B, ...], t) -> [B, ...]` ([B, ..., 2C] with
        variance='learned_range'), predicting `prediction`.
      grad_log_prob_fn: `grad_log_prob_fn(x [B, ...], t) -> [B, ...]`, grad_{x_t} of
        log p_phi(y | x_t, t) for each example's label (see `classifier_grad`).
      schedule: the (not respaced) schedule of the steps t that model_fn receives; samplers
        call model_fn with these original steps even on a respaced chain.
      guidance_scale: s, a real scalar or [B] (a list, a NumPy or JAX array; may be traced),
        finite and >= 0 where concrete; 0 gives the model's output, 1 the conditional
        p(x | y), s > 1 the sharper p(x) p(y | x)^s.
      prediction: what model_fn predicts and guided returns: 'eps' | 'x0' | 'v'.
      variance: model-output layout: 'learned_range' means the last axis holds
        [prediction, variance values] (pass the sampler's variance).

    Returns:
      `guided(x [B, ...] float, t int [B] or []) -> [B, ...]` in model_fn's output dtype (the
      arithmetic in at least float32); t is passed unchanged to model_fn and grad_log_prob_fn.

    Raises:
      ValueError: unknown prediction or variance, schedule not a Schedule, a callable missing,
        guidance_scale not a real scalar or [B] or (where concrete) negative or not finite;
        when guided is traced, a bad t (`check_t`), a [B] scale of another batch, or outputs of
        model_fn / grad_log_prob_fn of the wrong shape.
    """
    check_prediction(prediction)
    check_variance(variance)
    check_schedule(schedule)
    if not callable(model_fn):
        raise ValueError(f"model_fn must be a callable model_fn(x, t); got {model_fn!r}")
    if not callable(grad_log_prob_fn):
        raise ValueError(
            "grad_log_prob_fn must be a callable grad_log_prob_fn(x, t) -> [B, ...] (e.g. "
            f"classifier_grad(log_prob_fn)); got {grad_log_prob_fn!r}"
        )
    guidance_scale = _check_guidance_scale(guidance_scale, nonnegative=True)

    def guided(x, t):
        x = jnp.asarray(x)
        if x.ndim < 1 or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(
                "x must be a floating array [B, ...] with a leading batch axis; got shape "
                f"{x.shape} and dtype {x.dtype}"
            )
        if variance == "learned_range" and x.ndim < 2:  # the last axis would be the batch
            raise ValueError(
                "variance='learned_range' needs x with a channel axis, [B, ..., C], for the "
                f"doubled output channels; got x of shape {x.shape}"
            )
        t_checked = check_t(schedule, t, x)
        batch = x.shape[0]
        if jnp.ndim(guidance_scale) == 1 and jnp.shape(guidance_scale)[0] != batch:
            raise ValueError(
                f"guidance_scale must be a scalar or [B] = [{batch}]; got shape "
                f"{jnp.shape(guidance_scale)}"
            )
        out = model_fn(x, t)
        want = x.shape[:-1] + (2 * x.shape[-1],) if variance == "learned_range" else x.shape
        if jnp.shape(out) != want:
            raise ValueError(
                f"model_fn(x, t) must return shape {want} for x of shape {x.shape} "
                f"(variance={variance!r}); got {jnp.shape(out)}"
            )
        grad = grad_log_prob_fn(x, t)
        if jnp.shape(grad) != x.shape:
            raise ValueError(
                f"grad_log_prob_fn(x, t) must return x's shape {x.shape}, one gradient per "
                f"example; got {jnp.shape(grad)}"
            )
        pred, var_values = out, None
        if variance == "learned_range":
            pred, var_values = jnp.split(out, 2, axis=-1)
        dtype = jnp.promote_types(pred.dtype, jnp.float32)
        alpha, sigma = _alpha_sigma(schedule, t_checked, x, dtype)
        if prediction == "eps":
            coef = -sigma
        else:
            # divided where alpha > 0 only, so that neither the value nor its gradient is NaN
            # where alphas_cumprod = 0 (there the true gradient is 0: see the docstring)
            nonzero = alpha > 0
            over_alpha = jnp.where(nonzero, sigma / jnp.where(nonzero, alpha, 1.0), 0.0)
            coef = sigma * over_alpha if prediction == "x0" else -over_alpha
        s = _per_example(jnp.asarray(guidance_scale, dtype), x)
        guided_pred = (pred.astype(dtype) + coef * s * grad.astype(dtype)).astype(pred.dtype)
        if variance == "learned_range":
            return jnp.concatenate([guided_pred, var_values], axis=-1)
        return guided_pred

    return guided


def dynamic_threshold(x0: jax.Array, quantile=0.995, max_value=None) -> jax.Array:
    """Dynamic thresholding of x0_hat (Saharia et al. 2022, section 2.3).

    Per sample, s = max(quantile_p(|x0|), 1) over all non-batch axes; x0 is clipped to [-s, s]
    and divided by s, so it lands in [-1, 1] while saturated pixels are pushed inwards. With
    s = 1 it reduces to static clipping. Pass it as `denoised_fn=dynamic_threshold` (or
    `functools.partial(dynamic_threshold, quantile=0.99)`) to any sampler.

    Args:
      x0: [B, ...] x0_hat.
      quantile: p in (0, 1], a quantile (0.995), not a percent (99.5); may be traced.
        The quantile interpolates linearly between order statistics (`jnp.quantile`).
      max_value: None, or a cap >= 1 on s: s = min(max(quantile_p(|x0|), 1), max_value)
        (diffusers' `sample_max_value`, as DeepFloyd IF uses it); 1 is static clipping.

    Returns:
      [B, ...] thresholded x0, in x0's dtype.

    Raises:
      ValueError: quantile outside (0, 1], max_value below 1, or x0 without a batch axis.
    """
    x0 = jnp.asarray(x0)
    if x0.ndim < 1 or not jnp.issubdtype(x0.dtype, jnp.floating):
        raise ValueError(
            "x0 must be a floating array [B, ...] with a leading batch axis; "
            f"got shape {x0.shape} and dtype {x0.dtype}"
        )
    if not _is_real(quantile) or jnp.ndim(quantile) != 0:
        got = f"shape {jnp.shape(quantile)}" if _is_real(quantile) else repr(quantile)
        raise ValueError(f"quantile must be a scalar in (0, 1]; got {got}")
    if _is_concrete(quantile) and not 0.0 < float(quantile) <= 1.0:
        raise ValueError(
            "quantile must lie in (0, 1] (a quantile such as 0.995, not a percent); "
            f"got {quantile!r}"
        )
    if max_value is not None:
        if not _is_real(max_value) or jnp.ndim(max_value) != 0:
            raise ValueError(f"max_value must be None or a scalar >= 1; got {max_value!r}")
        if _is_concrete(max_value) and not float(max_value) >= 1.0:
            raise ValueError(f"max_value must be None or a scalar >= 1; got {max_value!r}")
    dtype = jnp.promote_types(x0.dtype, jnp.float32)
    flat = jnp.abs(x0.astype(dtype)).reshape(x0.shape[0], math.prod(x0.shape[1:]))
    s = jnp.maximum(jnp.quantile(flat, jnp.asarray(quantile, dtype), axis=1), 1.0)
    if max_value is not None:
        s = jnp.minimum(s, jnp.asarray(max_value, dtype))
    s = _per_example(s, x0)
    return (jnp.clip(x0.astype(dtype), -s, s) / s).astype(x0.dtype)
