"""Guidance and x0 thresholding for any sampler: classifier-free guidance, dynamic thresholding.

Both are plain function transforms that plug into the samplers of `jax_diffusion.samplers`
(which re-exports them): `classifier_free_guidance` turns a conditional `model_fn(x, t, y)`
into a denoiser `model_fn(x, t)`, and `dynamic_threshold` is an `x0_hat -> x0_hat` map for a
sampler's `denoised_fn`. Like the samplers they import only jax and numpy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_diffusion.diffusion import _is_concrete, _is_real, check_variance

__all__ = ["classifier_free_guidance", "dynamic_threshold"]

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def _per_example(values: jax.Array, x: jax.Array) -> jax.Array:
    """A scalar stays a scalar; [B] becomes [B, 1, ..., 1] to broadcast against x [B, ...]."""
    if values.ndim == 1:
        values = values.reshape(values.shape + (1,) * (x.ndim - 1))
    return values


def classifier_free_guidance(
    model_fn: Callable[[jax.Array, jax.Array, Any], jax.Array],
    guidance_scale,
    null_label,
    *,
    y,
    variance: str = "fixed_small",
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

    Returns:
      `guided(x [B, ...], t int [] or [B]) -> [B, ...]`, a denoiser for any sampler.
    """
    check_variance(variance)
    if not callable(model_fn):
        raise ValueError(f"model_fn must be a callable model_fn(x, t, y); got {model_fn!r}")
    if isinstance(guidance_scale, list | tuple):
        guidance_scale = jnp.asarray(guidance_scale)
    if not _is_real(guidance_scale) or jnp.ndim(guidance_scale) > 1:
        shape = f"shape {jnp.shape(guidance_scale)}" if _is_real(guidance_scale) else ""
        raise ValueError(
            f"guidance_scale must be a scalar or [B]; got {shape or repr(guidance_scale)}"
        )
    if _is_concrete(guidance_scale) and not np.isfinite(np.asarray(guidance_scale)).all():
        raise ValueError(f"guidance_scale must be finite; got {guidance_scale!r}")
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
        guided_pred = guided_pred.astype(out.dtype)
        if variance == "learned_range":
            return jnp.concatenate([guided_pred, cond_var], axis=-1)
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
