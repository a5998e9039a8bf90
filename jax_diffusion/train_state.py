"""The training state pytree and the optimizer / EMA factories."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jax_diffusion._checks import check_int
from jax_diffusion.diffusion import _is_concrete, _is_real

__all__ = ["TrainState", "ema_decay", "make_optimizer", "update_ema"]


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly (the data iterator state is saved beside it).

    Fields:
      step: int32 scalar, the number of train steps taken (skipped non-finite steps included).
      params: model parameters (the 'params' collection).
      ema_params: exponential moving average of params (used for sampling and evaluation),
        kept in at least float32 whatever the params' dtype (see `update_ema`).
      opt_state: optax state of `tx`.
      rng: raw uint32 PRNG key [2]; step k uses fold_in(rng, k), so randomness does not depend
        on the number of devices or on where a run was resumed.
      bad_steps: int32, consecutive non-finite steps so far (0 after a good step).
      skipped_steps: int32, non-finite steps skipped in the whole run.
      apply_fn, tx: static (not part of the pytree, not checkpointed).
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array
    bad_steps: jax.Array
    skipped_steps: jax.Array
    apply_fn: Callable = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, *, apply_fn, params, tx, rng) -> TrainState:
        """A fresh state at step 0 with ema_params = params (floating leaves in at least
        float32: a bfloat16 average would never move, see `update_ema`)."""
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=jax.tree.map(_ema_copy, params),
            opt_state=tx.init(params),
            rng=rng,
            bad_steps=jnp.zeros((), jnp.int32),
            skipped_steps=jnp.zeros((), jnp.int32),
            apply_fn=apply_fn,
            tx=tx,
        )

    def checkpoint_items(self) -> dict:
        """The pytree that is saved: every field but the static ones (apply_fn, tx), including
        the fields a subclass adds (e.g. `batch_stats`), by name."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.metadata.get("pytree_node", True)
        }


def _check_real(name: str, value, allowed: str, ok: Callable[[float], bool]) -> None:
    """ValueError naming `name` and `value` unless it is a concrete finite real scalar (Python,
    NumPy or JAX; not a bool) with ok(value)."""
    number = _is_real(value) and _is_concrete(value) and jnp.ndim(value) == 0
    if not (number and math.isfinite(float(value)) and ok(float(value))):
        raise ValueError(f"{name} must be a finite number {allowed}; got {value!r}")


def make_optimizer(
    *,
    learning_rate: float,
    num_steps: int,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
) -> optax.GradientTransformation:
    """AdamW with linear warmup, then cosine decay or a constant rate, after global-norm clipping.

    Args:
      learning_rate: peak learning rate, a finite number > 0.
      num_steps: total number of steps (an int >= 0); the cosine schedule reaches 0 there.
      warmup_steps: an int in [0, num_steps]; the rate rises linearly from
        learning_rate / warmup_steps to learning_rate over these steps.
      schedule: 'cosine' or 'constant' after the warmup.
      weight_decay: AdamW's decoupled weight decay, a finite number >= 0.
      grad_clip: global-norm clipping threshold, a finite number > 0, or None (off). A value
        <= 0 is refused: optax scales by grad_clip / norm, so 0 stops training and a negative
        value flips the gradient (gradient ascent).
      b1, b2: Adam's moment decays, each in [0, 1).

    Returns:
      optax.inject_hyperparams(adamw) chained after clip_by_global_norm, so the current learning
      rate is readable from the optimizer state.

    Raises:
      ValueError: an argument outside the ranges above, naming it and the value.
    """
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be one of 'cosine', 'constant'; got {schedule!r}")
    _check_real("learning_rate", learning_rate, "> 0", lambda v: v > 0)
    num_steps = check_int("num_steps", num_steps, 0)
    warmup_steps = check_int("warmup_steps", warmup_steps, 0, num_steps)
    _check_real("weight_decay", weight_decay, ">= 0", lambda v: v >= 0)
    if grad_clip is not None:
        _check_real("grad_clip", grad_clip, "> 0 or None (off)", lambda v: v > 0)
    _check_real("b1", b1, "in [0, 1)", lambda v: 0 <= v < 1)
    _check_real("b2", b2, "in [0, 1)", lambda v: 0 <= v < 1)
    # warmup starts at learning_rate / warmup_steps, not 0, so that no step is wasted
    warmup = max(warmup_steps, 1)
    init = learning_rate / warmup
    if schedule == "cosine":
        # at least one cosine step after the warmup's `warmup` (>= 1) steps: optax refuses 0
        # decay steps (num_steps 0 or 1 without warmup)
        lr = optax.warmup_cosine_decay_schedule(
            init, learning_rate, warmup, max(num_steps, warmup + 1)
        )
    else:
        lr = optax.join_schedules(
            [
                optax.linear_schedule(init, learning_rate, warmup),
                optax.constant_schedule(learning_rate),
            ],
            [warmup],
        )
    adamw = optax.inject_hyperparams(optax.adamw)(
        learning_rate=lr, b1=b1, b2=b2, weight_decay=weight_decay
    )
    if grad_clip is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(grad_clip), adamw)


def _ema_copy(p):
    """A copy of a parameter leaf for the EMA: floating leaves promoted to at least float32."""
    p = jnp.asarray(p)
    if jnp.issubdtype(p.dtype, jnp.floating):
        return jnp.array(p, dtype=jnp.promote_types(p.dtype, jnp.float32))
    return jnp.array(p)


def ema_decay(step: jax.Array, decay: float, warmup: bool = True) -> jax.Array:
    """EMA decay at a step: min(decay, (1 + step) / (10 + step)) with warmup, else `decay`.

    The warmup form (TensorFlow's ExponentialMovingAverage num_updates) keeps early averages
    from being dominated by the random initialisation.

    Raises:
      ValueError: a concrete `decay` outside [0, 1].
    """
    if _is_concrete(decay):  # traced: checked by whoever made it
        _check_real("decay", decay, "in [0, 1]", lambda v: 0.0 <= v <= 1.0)
    decay = jnp.asarray(decay, jnp.float32)
    if not warmup:
        return decay
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def update_ema(ema_params, params, decay):
    """ema <- decay * ema + (1 - decay) * params, leaf by leaf, in the EMA's dtype.

    Args:
      ema_params: the average, a pytree of arrays. Keep it in float32 (as `TrainState.create`
        does) even for bfloat16 params: a bfloat16 average loses every update smaller than half
        its spacing (2^-9 to 2^-8 of |ema|): with decay 0.999 it stops moving as soon as
        |params - ema| < 1.9 |ema|.
      params: the new params, a pytree of the same structure (any float dtype).
      decay: a scalar in [0, 1] (a Python float, or an array, e.g. `ema_decay(step, d)`).

    Returns:
      The updated average, with the dtypes of `ema_params`.
    """
    decay = jnp.asarray(decay)
    return jax.tree.map(
        lambda e, p: e + (1.0 - decay).astype(e.dtype) * (p.astype(e.dtype) - e),
        ema_params,
        params,
    )
