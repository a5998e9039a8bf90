"""The training state pytree and the optimizer / EMA factories."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

__all__ = ["TrainState", "ema_decay", "make_optimizer", "update_ema"]


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly (the data iterator state is saved beside it).

    Fields:
      step: int32 scalar, the number of train steps taken (skipped non-finite steps included).
      params: model parameters (the 'params' collection).
      ema_params: exponential moving average of params (used for sampling and evaluation).
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
        """A fresh state at step 0 with ema_params = params."""
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=jax.tree.map(jnp.array, params),
            opt_state=tx.init(params),
            rng=rng,
            bad_steps=jnp.zeros((), jnp.int32),
            skipped_steps=jnp.zeros((), jnp.int32),
            apply_fn=apply_fn,
            tx=tx,
        )

    def checkpoint_items(self) -> dict:
        """The pytree that is saved: every field but the static apply_fn and tx."""
        return {
            "step": self.step,
            "params": self.params,
            "ema_params": self.ema_params,
            "opt_state": self.opt_state,
            "rng": self.rng,
            "bad_steps": self.bad_steps,
            "skipped_steps": self.skipped_steps,
        }


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

    Returns:
      optax.inject_hyperparams(adamw) chained after clip_by_global_norm, so the current learning
      rate is readable from the optimizer state.
    """
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be one of 'cosine', 'constant'; got {schedule!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0; got {learning_rate!r}")
    if warmup_steps < 0 or warmup_steps > num_steps:
        raise ValueError(f"warmup_steps must lie in [0, num_steps={num_steps}]; got {warmup_steps}")
    # warmup starts at learning_rate / warmup_steps, not 0, so that no step is wasted
    warmup = max(warmup_steps, 1)
    init = learning_rate / warmup
    if schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(
            init, learning_rate, warmup, max(num_steps, warmup_steps + 1)
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


def ema_decay(step: jax.Array, decay: float, warmup: bool = True) -> jax.Array:
    """EMA decay at a step: min(decay, (1 + step) / (10 + step)) with warmup, else `decay`.

    The warmup form (TensorFlow's ExponentialMovingAverage num_updates) keeps early averages
    from being dominated by the random initialisation.
    """
    decay = jnp.asarray(decay, jnp.float32)
    if not warmup:
        return decay
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def update_ema(ema_params, params, decay: jax.Array):
    """ema <- decay * ema + (1 - decay) * params, leaf by leaf."""
    return jax.tree.map(
        lambda e, p: e + (1.0 - decay).astype(e.dtype) * (p - e), ema_params, params
    )
