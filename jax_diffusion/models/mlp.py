"""A small MLP denoiser for low-dimensional toy data (2-D mixtures, swiss roll, ...).

  emb = MLP(PE(t)) [+ Embed(y)]                     Dense(hidden), SiLU, Dense(hidden)
  h   = Dense(hidden)(x)
  h   = h + Dense(SiLU(Dense(SiLU(h)) + Dense(emb)))     num_layers residual blocks
  out = Dense(out_dim)(SiLU(h))

The time embedding is the sinusoidal PE(t) of Ho et al. 2020 / Vaswani et al. 2017; class
conditioning uses the null-label convention of classifier-free guidance (Ho & Salimans 2022):
the label table has num_classes + 1 rows and row num_classes is the null label.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_diffusion._checks import check_int
from jax_diffusion.models.layers import (
    check_denoiser_inputs,
    check_dropout,
    check_field_dtype,
    timestep_embedding,
)

Dtype = Any

__all__ = ["MLPDenoiser"]


class MLPDenoiser(nn.Module):
    """Residual MLP eps_theta(x_t, t[, y]) for [B, D] data.

    Attributes:
      out_dim: output width; None means the data width D.
      hidden_dim: width of the hidden layers.
      num_layers: number of residual blocks (depth).
      time_embed_dim: width of the sinusoidal time embedding (even).
      num_classes: None for an unconditional model; otherwise the label embedding has
        num_classes + 1 rows, row `num_classes` being the null label.
      dropout: dropout rate inside the residual blocks (only when train=True).
      dtype: compute dtype; the output is always float32.
      param_dtype: parameter dtype.
    """

    out_dim: int | None = None
    hidden_dim: int = 128
    num_layers: int = 3
    time_embed_dim: int = 32
    num_classes: int | None = None
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        y: jax.Array | None = None,
        *,
        train: bool = False,
    ) -> jax.Array:
        """Predicts the network output for a batch of vectors.

        Args:
          x: [B, D] float, noisy data x_t.
          t: [B] int (or float), timesteps.
          y: [B] int labels in [0, num_classes] (num_classes = null label), required iff
            num_classes is set, else None.
          train: enables dropout (needs rngs={'dropout': key} in apply).

        Returns:
          [B, out_dim] float32.

        Raises:
          ValueError: on a bad field value or input shape.
        """
        check_int("hidden_dim", self.hidden_dim, 1)
        check_int("num_layers", self.num_layers, 0)
        check_int("time_embed_dim", self.time_embed_dim, 2)
        if self.time_embed_dim % 2:
            raise ValueError(
                f"time_embed_dim must be a positive even int (sin and cos pairs); "
                f"got {self.time_embed_dim}"
            )
        if self.out_dim is not None:
            check_int("out_dim", self.out_dim, 1)
        if self.num_classes is not None:
            check_int("num_classes", self.num_classes, 1)
        check_dropout(self.dropout)
        check_field_dtype("dtype", self.dtype)
        check_field_dtype("param_dtype", self.param_dtype)
        x = jnp.asarray(x)
        t = jnp.asarray(t)
        y = None if y is None else jnp.asarray(y)
        check_denoiser_inputs(x, t, y, self.num_classes, data_rank=2, data_desc="[B, D]")
        out_dim = x.shape[-1] if self.out_dim is None else self.out_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        emb = timestep_embedding(t, self.time_embed_dim)
        emb = nn.Dense(self.hidden_dim, name="time_dense0", **kw)(emb)
        emb = nn.Dense(self.hidden_dim, name="time_dense1", **kw)(nn.silu(emb))
        if self.num_classes is not None:
            emb = emb + nn.Embed(self.num_classes + 1, self.hidden_dim, name="label_embed", **kw)(y)

        h = nn.Dense(self.hidden_dim, name="dense_in", **kw)(x.astype(self.dtype))
        for i in range(self.num_layers):
            r = nn.Dense(self.hidden_dim, name=f"block_{i}_dense0", **kw)(nn.silu(h))
            r = r + nn.Dense(self.hidden_dim, name=f"block_{i}_emb", **kw)(emb)
            r = nn.Dropout(rate=self.dropout, deterministic=not train)(nn.silu(r))
            h = h + nn.Dense(self.hidden_dim, name=f"block_{i}_dense1", **kw)(r)
        out = nn.Dense(out_dim, name="dense_out", **kw)(nn.silu(h))
        return out.astype(jnp.float32)
