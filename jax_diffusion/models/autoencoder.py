"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, sec. 3.1 and app. G).

Latent diffusion runs the diffusion process on z = E(x), a spatially downsampled code of the
data, and decodes its samples with x = D(z): the diffusion model then works on f^2 times fewer
positions (f = 2^(len(channel_mults) - 1), the downsampling factor). The encoder outputs a
diagonal Gaussian q(z | x) = N(mean, exp(logvar)); training (`losses.autoencoder_loss`) adds a
small KL(q(z | x) || N(0, I)) to the reconstruction error so that the code stays near unit
scale ("KL-reg.", weight ~1e-6 in the paper).

    x [B, H, W, C] -> Encoder -> quant_conv -> (mean, logvar) [B, H/f, W/f, latent_channels] each
    z [B, H/f, W/f, latent_channels] -> post_quant_conv -> Decoder -> x_rec [B, H, W, C]

The layout is the paper's "KL-f" autoencoder (as in diffusers' AutoencoderKL): the encoder is
conv_in, per level `num_res_blocks` ResBlocks and a stride-2 Downsample (padded after only; not
after the last level), a middle ResBlock, single-head attention and ResBlock, then GroupNorm,
SiLU and conv_out to 2 * latent_channels; the 1x1 quant_conv follows. The decoder mirrors it:
the 1x1 post_quant_conv, conv_in, the middle, per level (deepest first) `num_res_blocks + 1`
ResBlocks and a nearest-x2 Upsample (not after the shallowest level), GroupNorm, SiLU, conv_out.
The blocks are the UNet's (`layers.ResBlock` without a time embedding, `layers.AttentionBlock`).

Latent diffusion trains the diffusion model on scale_factor * z, scale_factor = 1 / std(z) over
training latents (`latent_scale_factor`; Rombach et al. 2022 sec. 4.3.2 and app. G, 0.18215 for
Stable Diffusion's autoencoder), and decodes a sample z0 as D(z0 / scale_factor).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_diffusion.losses import _standard_normal_kl
from jax_diffusion.models.layers import (
    AttentionBlock,
    Downsample,
    GroupNorm,
    ResBlock,
    Upsample,
    check_field_dtype,
)

__all__ = ["AutoencoderKL", "DiagonalGaussian", "latent_scale_factor"]

Dtype = jnp.dtype | type

# the clamp of logvar in Rombach et al.'s DiagonalGaussianDistribution (and diffusers')
LOGVAR_RANGE = (-30.0, 20.0)


class DiagonalGaussian(NamedTuple):
    """q(z | x) = N(mean, exp(logvar)), elementwise; a pytree (passes through jit and vmap).

    Attributes:
      mean: [B, h, w, z] mean.
      logvar: [B, h, w, z] log-variance (clamped to LOGVAR_RANGE by the encoder).
    """

    mean: jax.Array
    logvar: jax.Array

    def sample(self, rng: jax.Array) -> jax.Array:
        """A draw z = mean + exp(logvar / 2) * noise (reparameterised: differentiable in both)."""
        noise = jax.random.normal(rng, self.mean.shape, self.mean.dtype)
        return self.mean + jnp.exp(0.5 * self.logvar) * noise

    def mode(self) -> jax.Array:
        """The mean (the mode of a Gaussian)."""
        return self.mean

    def kl(self) -> jax.Array:
        """KL(N(mean, exp(logvar)) || N(0, I)) in nats per example: [B], summed over the rest."""
        return _standard_normal_kl(self.mean, self.logvar)


def latent_scale_factor(z: jax.Array) -> jax.Array:
    """1 / std of the latents z (all entries together): the scale of latent diffusion's inputs.

    Rombach et al. 2022 (sec. 4.3.2, app. G) rescale the autoencoder's latents to unit standard
    deviation before diffusion, with the factor estimated on a batch of training latents.

    Args:
      z: [B, ...] latents (e.g. `DiagonalGaussian.sample` of training images), B * prod(...) >= 2.

    Returns:
      float32 scalar 1 / std(z).
    """
    if z.size < 2:
        raise ValueError(f"latent_scale_factor needs at least 2 entries of z; got shape {z.shape}")
    return 1.0 / jnp.std(jnp.asarray(z, jnp.float32))


def _check_fields(module) -> None:
    """AutoencoderKL's field checks, before any parameter is made."""
    if not isinstance(module.remat, bool):
        raise ValueError(f"remat must be True or False; got {module.remat!r}")
    for name in ("channels", "base_channels", "latent_channels", "num_res_blocks", "num_groups"):
        value = getattr(module, name)
        low = 0 if name == "num_res_blocks" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
    mults = module.channel_mults
    if (
        not isinstance(mults, Sequence)
        or not mults
        or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in mults)
    ):
        raise ValueError(f"channel_mults must be a non-empty sequence of ints >= 1; got {mults!r}")
    for m in mults:
        if (module.base_channels * m) % module.num_groups:
            raise ValueError(
                f"num_groups={module.num_groups} must divide every level's channel count "
                f"base_channels * channel_mults = {[module.base_channels * m for m in mults]}"
            )
    check_field_dtype("dtype", module.dtype)
    check_field_dtype("param_dtype", module.param_dtype)


def _check_input(x: jax.Array, channels: int, factor: int, name: str, what: str) -> None:
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(f"{name} must be [B, H, W, {channels}] ({what}); got shape {x.shape}")
    if x.shape[1] % factor or x.shape[2] % factor:
        raise ValueError(
            f"{name}'s height and width must be multiples of the downsampling factor {factor}; "
            f"got shape {x.shape}"
        )


class _Half(nn.Module):
    """The fields the encoder, the decoder and AutoencoderKL share (AutoencoderKL documents
    them)."""

    latent_channels: int = 4
    base_channels: int = 128
    channel_mults: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    def blocks(self) -> tuple[type[nn.Module], type[nn.Module], dict, dict]:
        """(ResBlock class, AttentionBlock class, conv kwargs, block kwargs), rematerialised
        under remat (the ResBlocks are called without `train`: no dropout here)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        res = nn.remat(ResBlock) if self.remat else ResBlock
        attn = nn.remat(AttentionBlock) if self.remat else AttentionBlock
        return res, attn, kw, dict(num_groups=self.num_groups, **kw)


class Encoder(_Half):
    """x [B, H, W, C] -> features [B, H/f, W/f, 2 * latent_channels] (see the module docstring)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        res, attn, kw, block = self.blocks()
        h = nn.Conv(self.base_channels, (3, 3), padding=1, name="conv_in", **kw)(x)
        for level, mult in enumerate(self.channel_mults):
            for i in range(self.num_res_blocks):
                h = res(self.base_channels * mult, name=f"down_{level}_res_{i}", **block)(h, None)
            if level != len(self.channel_mults) - 1:
                h = Downsample(h.shape[-1], padding="same", name=f"down_{level}_downsample", **kw)(
                    h
                )
        h = _middle(h, res, attn, block)
        h = nn.silu(GroupNorm(name="norm_out", **block)(h))
        return nn.Conv(2 * self.latent_channels, (3, 3), padding=1, name="conv_out", **kw)(h)


class Decoder(_Half):
    """z features [B, h, w, latent_channels] -> x [B, h f, w f, out_channels]."""

    out_channels: int = 3

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        res, attn, kw, block = self.blocks()
        top = self.base_channels * self.channel_mults[-1]
        h = nn.Conv(top, (3, 3), padding=1, name="conv_in", **kw)(z)
        h = _middle(h, res, attn, block)
        for level in reversed(range(len(self.channel_mults))):
            for i in range(self.num_res_blocks + 1):
                ch = self.base_channels * self.channel_mults[level]
                h = res(ch, name=f"up_{level}_res_{i}", **block)(h, None)
            if level != 0:
                h = Upsample(h.shape[-1], name=f"up_{level}_upsample", **kw)(h)
        h = nn.silu(GroupNorm(name="norm_out", **block)(h))
        return nn.Conv(self.out_channels, (3, 3), padding=1, name="conv_out", **kw)(h)


def _middle(h: jax.Array, res, attn, block: dict) -> jax.Array:
    """ResBlock, single-head attention, ResBlock at the lowest resolution (both halves)."""
    ch = h.shape[-1]
    h = res(ch, name="mid_res_0", **block)(h, None)
    h = attn(num_heads=1, name="mid_attn", **block)(h)
    return res(ch, name="mid_res_1", **block)(h, None)


class AutoencoderKL(_Half):
    """Latent diffusion's KL-regularised autoencoder (Rombach et al. 2022), NHWC.

    `ae.apply(variables, x, method="encode")` gives q(z | x) as a `DiagonalGaussian`,
    `ae.apply(variables, z, method="decode")` the reconstruction; `ae.apply(variables, x, rng)`
    does both (a draw of z with rng; the mean without) and returns (x_rec, posterior), as
    `losses.autoencoder_loss` wants them. `ae.init(rng, x)` makes the parameters.

    Attributes:
      channels: C, the data's channel count (the decoder's output); keyword-only.
      latent_channels: z channels (4 in Stable Diffusion).
      base_channels: channels of the first level (128 in Stable Diffusion).
      channel_mults: per-level multipliers; the downsampling factor f is 2^(len - 1)
        ((1, 2, 4, 4): f = 8).
      num_res_blocks: ResBlocks per encoder level (the decoder has one more).
      num_groups: GroupNorm groups; must divide every level's channel count.
      dtype: compute dtype (e.g. jnp.bfloat16); the posterior and the output are float32.
      param_dtype: parameter dtype.
      remat: recompute the ResBlock and attention activations in the backward pass
        (flax.linen.remat) to save memory, as diffusers' gradient checkpointing does.
    """

    channels: int = dataclasses.field(kw_only=True)  # after the shared fields' defaults

    @property
    def downsampling_factor(self) -> int:
        """f: the encoder divides the height and width by it."""
        return 2 ** (len(self.channel_mults) - 1)

    def setup(self):
        _check_fields(self)
        net = {f.name: getattr(self, f.name) for f in dataclasses.fields(_Half) if f.init}
        net = {k: v for k, v in net.items() if k not in ("parent", "name")}
        net["channel_mults"] = tuple(self.channel_mults)
        self.encoder = Encoder(**net)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.quant_conv = nn.Conv(2 * self.latent_channels, (1, 1), **kw)
        self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1), **kw)
        self.decoder = Decoder(out_channels=self.channels, **net)

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """q(z | x) for x [B, H, W, channels] (H, W multiples of f): mean and logvar, each
        [B, H/f, W/f, latent_channels] float32, logvar clamped to LOGVAR_RANGE."""
        _check_input(x, self.channels, self.downsampling_factor, "x", "data")
        moments = self.quant_conv(self.encoder(x)).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return DiagonalGaussian(mean, jnp.clip(logvar, *LOGVAR_RANGE))

    def decode(self, z: jax.Array) -> jax.Array:
        """x_rec [B, h f, w f, channels] float32 for latents z [B, h, w, latent_channels]."""
        _check_input(z, self.latent_channels, 1, "z", "latents")
        return self.decoder(self.post_quant_conv(z)).astype(jnp.float32)

    def __call__(
        self, x: jax.Array, rng: jax.Array | None = None
    ) -> tuple[jax.Array, DiagonalGaussian]:
        """(decode(z), q(z | x)): z a draw of q(z | x) with rng, its mean without."""
        posterior = self.encode(x)
        z = posterior.mode() if rng is None else posterior.sample(rng)
        return self.decode(z), posterior
