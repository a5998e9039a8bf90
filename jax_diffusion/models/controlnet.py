"""ControlNet: spatial conditioning for a trained, frozen UNet (Zhang & Agrawala 2023).

A ControlNet is a trainable copy of the UNet's embedding, encoder and middle block (seed 004,
section 7, "Improved Control and Conditioning"). A condition image c (an edge map, a sketch, a
low-resolution or masked image: anything aligned with x) enters through a small conv encoder
whose last layer is zero-initialised, added to the copy's conv_in output; each of the copy's
encoder outputs and its middle output passes through a zero-initialised 1x1 convolution (the
paper's "zero convolutions") and is added to the matching skip connection / middle output of the
frozen UNet (paper eq. 2; diffusers' ControlNetModel):

  h_skip_l <- h_skip_l + scale * ZeroConv_l(F_copy,l(x_t, t, c)),   l = 0 .. L
  h_mid    <- h_mid    + scale * ZeroConv_mid(F_copy,mid(x_t, t, c)).

At initialisation every zero convolution outputs 0, so the controlled model is exactly the
frozen UNet, and training starts from it; `controlnet_params_from_unet` copies the UNet's
weights into the copy (the paper's initialisation). Only the ControlNet's params are trained:
the UNet's params are closed over, not differentiated (`controlled_model_fn`). The UNet must be
a trained one: fresh from `init` its zero-initialised conv_out outputs 0 whatever the residuals,
and the ControlNet would get no gradient.

`ControlNet` subclasses `UNet`, so it takes the same fields (`ControlNet.from_unet(unet,
hint_channels=(16, 32))` copies them), and creates its copy with the UNet's own code and
parameter names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_diffusion._checks import check_int
from jax_diffusion.models.unet import UNet, _as_tuple, _encode

__all__ = ["ControlNet", "controlled_model_fn", "controlnet_params_from_unet"]

# the ControlNet's own parameters; everything else it holds is a copy of the UNet's
_OWN = ("hint_", "zero_conv_", "mid_zero_conv")


class ControlNet(UNet):
    """The trainable encoder copy of a `UNet` plus a condition encoder and zero convolutions.

    Attributes (besides the `UNet` fields, which must equal the controlled UNet's):
      hint_channels: widths of the condition encoder's 3x3 conv + SiLU layers (at the input's
        resolution); a zero-initialised 3x3 conv then maps to base_channels.

    Called as `controlnet.apply(variables, x, t, cond, y)`; returns `(skip_residuals,
    mid_residual)` for `UNet.__call__`.
    """

    hint_channels: Sequence[int] = (16, 32)

    @classmethod
    def from_unet(cls, unet: UNet, **fields) -> ControlNet:
        """A ControlNet with every field of `unet` (remat and dtypes included), plus `fields`
        (e.g. hint_channels)."""
        if not isinstance(unet, UNet) or isinstance(unet, ControlNet):
            raise ValueError(f"unet must be a UNet; got {type(unet).__name__}")
        shared = {
            f.name: getattr(unet, f.name)
            for f in dataclasses.fields(UNet)
            if f.init and f.name not in ("parent", "name")
        }
        return cls(**shared, **fields)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        cond: jax.Array,
        y: jax.Array | None = None,
        *,
        train: bool = False,
    ) -> tuple[list[jax.Array], jax.Array]:
        """The residuals that steer the UNet towards `cond`.

        Args:
          x: [B, H, W, C] float, x_t (as for the UNet).
          t: [B] timesteps.
          cond: [B, H, W, C_cond] float, the condition image, aligned with x.
          y: [B] int labels for a class-conditional UNet, else None.
          train: enables dropout.

        Returns:
          (skip_residuals, mid_residual): a list of one [B, h, w, c] array per UNet encoder
          output and the middle block's [B, h, w, c]; all zero at initialisation.

        Raises:
          ValueError: bad fields, or cond not [B, H, W, C_cond] with x's batch and size.
        """
        widths = _as_tuple(self.hint_channels)
        if widths is None:
            raise ValueError(
                f"hint_channels must be a sequence of ints; got {self.hint_channels!r}"
            )
        for i, w in enumerate(widths):
            check_int(f"hint_channels[{i}]", w, 1)
        cond = jnp.asarray(cond)
        x_shape = jnp.shape(x)
        if cond.ndim != 4 or cond.shape[:3] != tuple(x_shape[:3]):
            raise ValueError(
                f"cond must be [B, H, W, C_cond] with x's B, H, W {tuple(x_shape[:3])}; got "
                f"shape {cond.shape}"
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def hint(h):
            c = cond.astype(self.dtype)
            for i, width in enumerate(widths):
                c = nn.silu(nn.Conv(width, (3, 3), padding=1, name=f"hint_{i}", **kw)(c))
            c = nn.Conv(
                h.shape[-1],
                (3, 3),
                padding=1,
                kernel_init=nn.initializers.zeros,
                name=f"hint_{len(widths)}",
                **kw,
            )(c)
            return h + c

        hs, h, _, _ = _encode(self, x, t, y, train, hint=hint)

        def zero_conv(h, name):
            conv = nn.Conv(h.shape[-1], (1, 1), kernel_init=nn.initializers.zeros, name=name, **kw)
            return conv(h).astype(jnp.float32)

        skips = [zero_conv(h_i, f"zero_conv_{i}") for i, h_i in enumerate(hs)]
        return skips, zero_conv(h, "mid_zero_conv")


def controlnet_params_from_unet(control_params: Any, unet_params: Any) -> Any:
    """`control_params` with every parameter the ControlNet shares with the UNet replaced by
    the UNet's (time / label embedding, conv_in, encoder, middle block): the paper's
    initialisation of the trainable copy. The condition encoder and zero convolutions keep
    their own values.

    Args:
      control_params: the 'params' of an initialised `ControlNet`.
      unet_params: the 'params' of the UNet it controls (the same fields).

    Returns:
      A new params pytree of control_params' structure.

    Raises:
      ValueError: a shared parameter missing from the UNet or of another shape (the two
        modules' fields differ).
    """
    shared = [name for name in control_params if not name.startswith(_OWN)]
    for name in shared:  # every check before any copy
        if name not in unet_params:
            raise ValueError(
                f"unet_params has no {name!r}: build the ControlNet with the UNet's fields"
            )
        want = jax.tree.map(jnp.shape, control_params[name])
        got = jax.tree.map(jnp.shape, unet_params[name])
        if want != got:
            raise ValueError(
                f"unet_params[{name!r}] has shapes {got}, the ControlNet's {want}: build the "
                "ControlNet with the UNet's fields"
            )
    return {
        # copies of the UNet's arrays: the ControlNet's are trained apart
        name: jax.tree.map(jnp.array, unet_params[name]) if name in shared else sub
        for name, sub in control_params.items()
    }


def controlled_model_fn(
    unet: UNet,
    unet_params: Any,
    controlnet: ControlNet,
    control_params: Any,
    cond: jax.Array,
    *,
    y: jax.Array | None = None,
    scale: float | jax.Array = 1.0,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """`model_fn(x, t)` of the UNet steered by a ControlNet, for any sampler or loss.

    The UNet's params are wrapped in `jax.lax.stop_gradient`: differentiating a loss of this
    model_fn with respect to control_params trains the ControlNet and leaves the UNet frozen.

    Args:
      unet, unet_params: the frozen UNet and its 'params'.
      controlnet, control_params: the ControlNet and its 'params'.
      cond: [B, H, W, C_cond] condition images, one per example of the x it will be called on.
      y: optional [B] labels of a class-conditional UNet.
      scale: the conditioning strength (0: the UNet alone; diffusers'
        controlnet_conditioning_scale).

    Returns:
      model_fn(x [B, H, W, C], t [B]) -> the UNet's output [B, H, W, out_channels].
    """
    frozen = jax.lax.stop_gradient(unet_params)

    def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        skips, mid = controlnet.apply({"params": control_params}, x, t, cond, y)
        return unet.apply(
            {"params": frozen},
            x,
            t,
            y,
            skip_residuals=[scale * s for s in skips],
            mid_residual=scale * mid,
        )

    return model_fn
