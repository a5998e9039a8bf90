"""A velocity network seen as a diffusion denoiser: how the training loop runs flow matching.

`FlowDenoiser` wraps any network `net(x, t, y, train=)` (the `UNet`, the `MLPDenoiser`) that
predicts the flow-matching velocity u = eps - x0 on the straight path x_t = (1 - t) x0 + t eps
(`jax_diffusion.flow_matching`). `velocity` is the trained output; calling the module with an
integer step t of a Gaussian schedule returns the denoiser `flow_matching.denoiser_from_flow`
makes of it, so the samplers, guidance and bits/dim of the library take a flow model like any
other.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from jax_diffusion.flow_matching import denoiser_from_flow
from jax_diffusion.schedules import Schedule

__all__ = ["FlowDenoiser"]


class FlowDenoiser(nn.Module):
    """A velocity network `net` as a denoiser of the Gaussian schedule with `betas`.

    Attributes:
      net: the network, called `net(x, time_scale * t, y, train=train)`; its time embedding
        sees the flow's t in [0, 1] scaled to the discrete range [0, time_scale].
      betas: the Gaussian schedule's betas (a tuple of floats, so the module stays hashable).
      prediction: what `__call__` returns: 'eps' | 'x0' | 'v'.
      time_scale: the factor on t before the network (the schedule's T by default in
        `run_config.create_model`).
    """

    net: nn.Module
    betas: tuple[float, ...]
    prediction: str = "eps"
    time_scale: float = 1000.0

    def velocity(self, x: jax.Array, t: jax.Array, y=None, *, train: bool = False) -> jax.Array:
        """u_hat(x_t, t): x [B, ...] on the straight path, t float [B] in [0, 1] -> [B, ...]."""
        return self.net(x, self.time_scale * t, y, train=train)

    def __call__(self, x: jax.Array, t: jax.Array, y=None, *, train: bool = False) -> jax.Array:
        """The denoiser's `prediction` at integer steps t [B] in [0, T - 1] of x [B, ...]."""
        schedule = Schedule.from_betas(np.asarray(self.betas, np.float64))

        def flow_fn(x, t):
            return self.velocity(x, t, y, train=train)

        return denoiser_from_flow(flow_fn, schedule, self.prediction)(x, t)
