"""The eps_theta(x_t, t[, y]) UNet (DDPM / ADM family) and model_fn adapters.

Architecture (Ho et al. 2020 app. B; Nichol & Dhariwal 2021; Dhariwal & Nichol 2021 (ADM)):

  emb = MLP(PE(t)) [+ Embed(y)]                       Dense(4*ch), SiLU, Dense(4*ch)
  encoder: conv3x3, then per level num_res_blocks x (ResBlock [+ Attention]) and a
           strided-conv Downsample (all levels but the last); every output is pushed
  middle:  ResBlock, Attention, ResBlock
  decoder: per level (num_res_blocks + 1) x (concat(h, pop()) -> ResBlock [+ Attention]),
           then a nearest x2 + conv Upsample (all levels but the first)
  out:     GroupNorm, SiLU, conv3x3 (zero-initialised, so eps_hat = 0 at init)

The samplers and losses take a plain `model_fn(x_t, t)`; `make_model_fn` and
`make_conditional_model_fn` close a network and its params over that signature so that
the math modules never import Flax.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax_diffusion._checks import check_int
from jax_diffusion.models.layers import (
    DOWNSAMPLE_PADDINGS,
    AttentionBlock,
    Downsample,
    GroupNorm,
    ResBlock,
    Upsample,
    check_denoiser_inputs,
    check_dropout,
    check_field_dtype,
    timestep_embedding,
)
from jax_diffusion.schedules import _is_number

Dtype = Any

__all__ = ["UNet", "make_conditional_model_fn", "make_model_fn"]


class UNet(nn.Module):
    """UNet noise-prediction network eps_theta(x_t, t[, y]) (DDPM app. B, ADM section 3).

    Attributes:
      base_channels: channels of the first level (`ch`); the embedding width is 4 * ch.
      channel_mults: channels of level l are base_channels * channel_mults[l]; there are
        len(channel_mults) resolutions, each half of the previous.
      num_res_blocks: ResBlocks per encoder level (the decoder has one more per level).
      attention_resolutions: spatial sizes (feature-map height) at which self-attention
        follows each ResBlock; the middle block always has attention.
      num_heads: attention heads (used where num_head_channels is None).
      num_head_channels: channels per attention head; None for num_heads heads everywhere,
        otherwise a layer of C channels has C // num_head_channels heads (ADM's
        num_head_channels; diffusers' attention_head_dim).
      dropout: ResBlock dropout rate (active only when train=True, 'dropout' rng).
      out_channels: output channels; None means the input channel count. Double it for a
        learned variance (Nichol & Dhariwal 2021, learned_range).
      use_scale_shift_norm: ADM scale-shift (AdaGN) conditioning in the ResBlocks.
      num_classes: None for an unconditional model; otherwise the label embedding has
        num_classes + 1 rows, row `num_classes` being the null label of classifier-free
        guidance (Ho & Salimans 2022).
      num_groups: GroupNorm groups; must divide every level's channel count.
      norm_epsilon: epsilon of every GroupNorm (diffusers' norm_eps).
      downsample_padding: 'symmetric' (ADM) or 'same' (DDPM's TensorFlow SAME padding,
        diffusers' downsample_padding=0); see `Downsample`.
      time_freq_shift: the frequency shift of the sinusoidal time embedding (0: ADM's
        10000^(-2i/ch); 1: DDPM's 10000^(-i/(ch/2 - 1)), diffusers' freq_shift=1); see
        `timestep_embedding`.
      dtype: compute dtype (e.g. jnp.bfloat16); params stay in param_dtype and the output is
        always float32.
      param_dtype: parameter dtype.
      remat: recompute ResBlock / attention activations in the backward pass
        (flax.linen.remat) to save memory.
    """

    base_channels: int = 64
    channel_mults: Sequence[int] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: Sequence[int] = (16,)
    num_heads: int = 4
    num_head_channels: int | None = None
    dropout: float = 0.0
    out_channels: int | None = None
    use_scale_shift_norm: bool = True
    num_classes: int | None = None
    num_groups: int = 8
    norm_epsilon: float = 1e-6
    downsample_padding: str = "symmetric"
    time_freq_shift: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    def _check_config(self) -> None:
        """Validates the static fields; raises ValueError."""
        check_int("base_channels", self.base_channels, 1)
        if self.base_channels % 2:
            raise ValueError(
                f"base_channels must be a positive even int (it is the sinusoidal embedding "
                f"width); got {self.base_channels}"
            )
        mults = _as_tuple(self.channel_mults)
        if (
            mults is None
            or len(mults) == 0
            or any(isinstance(m, bool) or not isinstance(m, int | np.integer) for m in mults)
            or any(m <= 0 for m in mults)
        ):
            raise ValueError(
                f"channel_mults must be a non-empty sequence of positive ints; got {mults}"
            )
        check_int("num_res_blocks", self.num_res_blocks, 1)
        check_int("num_heads", self.num_heads, 1)
        check_int("num_head_channels", self.num_head_channels, 1, none_ok=True)
        if not (_is_number(self.norm_epsilon) and 0 < self.norm_epsilon < np.inf):
            raise ValueError(f"norm_epsilon must be a finite number > 0; got {self.norm_epsilon!r}")
        if self.downsample_padding not in DOWNSAMPLE_PADDINGS:
            raise ValueError(
                f"downsample_padding must be one of {sorted(DOWNSAMPLE_PADDINGS)}; got "
                f"{self.downsample_padding!r}"
            )
        half = self.base_channels // 2
        if not (_is_number(self.time_freq_shift) and -np.inf < self.time_freq_shift < half):
            raise ValueError(
                f"time_freq_shift must be a finite number below base_channels / 2 = {half}; "
                f"got {self.time_freq_shift!r}"
            )
        check_int("num_groups", self.num_groups, 1)
        if _as_tuple(self.attention_resolutions) is None:
            raise ValueError(
                "attention_resolutions must be a sequence of feature-map sizes such as (16,) "
                f"or () (attention only in the middle block); got {self.attention_resolutions!r}"
            )
        check_dropout(self.dropout)
        for name in ("use_scale_shift_norm", "remat"):
            if not isinstance(getattr(self, name), bool | np.bool_):
                raise ValueError(f"{name} must be True or False; got {getattr(self, name)!r}")
        if self.out_channels is not None:
            check_int("out_channels", self.out_channels, 1)
        if self.num_classes is not None:
            check_int("num_classes", self.num_classes, 1)
        check_field_dtype("dtype", self.dtype)
        check_field_dtype("param_dtype", self.param_dtype)
        # conv_in's output (base_channels wide) is normalised and concatenated too
        channels = sorted({self.base_channels} | {self.base_channels * m for m in mults})
        if any(c % self.num_groups for c in channels):
            raise ValueError(
                f"num_groups must divide every level's channel count {channels} (base_channels "
                f"and base_channels * channel_mults); got num_groups={self.num_groups}"
            )

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        y: jax.Array | None = None,
        *,
        train: bool = False,
        skip_residuals: Sequence[jax.Array] | None = None,
        mid_residual: jax.Array | None = None,
    ) -> jax.Array:
        """Predicts the network output (eps_hat, x0_hat or v_hat) for a batch.

        Args:
          x: [B, H, W, C] float, noisy data x_t; H and W divisible by
            2 ** (len(channel_mults) - 1).
          t: [B] int (or float), timesteps, e.g. in [0, num_timesteps - 1].
          y: [B] int class labels in [0, num_classes] (num_classes = null label), required
            iff num_classes is set, else None.
          train: enables dropout (needs rngs={'dropout': key} in apply).
          skip_residuals: optional, one array per encoder output (conv_in, every ResBlock,
            every Downsample, in order) added to that skip connection before the decoder
            concatenates it; with `mid_residual` (added to the middle block's output) these
            are a `ControlNet`'s outputs (Zhang & Agrawala 2023, eq. 2; diffusers'
            down_block_additional_residuals / mid_block_additional_residual).
          mid_residual: optional [B, H / 2^L, W / 2^L, C_mid], see skip_residuals.

        Returns:
          [B, H, W, out_channels] float32.

        Raises:
          ValueError: on a bad field value or input shape (checked before any work).
        """
        hs, h, res_block, attention = _encode(self, x, t, y, train)
        if skip_residuals is not None:
            hs = _add_residuals(hs, skip_residuals)
        if mid_residual is not None:
            (h,) = _add_residuals([h], [mid_residual], "mid_residual")
        ch, eps = self.base_channels, self.norm_epsilon
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        out_channels = x.shape[-1] if self.out_channels is None else self.out_channels

        # Decoder: num_res_blocks + 1 blocks per level, each consuming one skip.
        for level, mult in reversed(list(enumerate(self.channel_mults))):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop().astype(h.dtype)], axis=-1)
                h = res_block(h, ch * mult, f"up_{level}_res_{i}")
                if h.shape[1] in self.attention_resolutions:
                    h = attention(h, f"up_{level}_attn_{i}")
            if level != 0:
                h = Upsample(h.shape[-1], name=f"up_{level}_upsample", **kw)(h)

        h = nn.silu(GroupNorm(num_groups=self.num_groups, epsilon=eps, name="norm_out", **kw)(h))
        h = nn.Conv(
            out_channels,
            (3, 3),
            padding=1,
            kernel_init=nn.initializers.zeros,
            name="conv_out",
            **kw,
        )(h)
        return h.astype(jnp.float32)


def _add_residuals(hs: list, residuals, name: str = "skip_residuals") -> list:
    """hs[i] + residuals[i], each residual checked against its skip's shape."""
    residuals = list(residuals)
    if len(residuals) != len(hs):
        raise ValueError(
            f"{name} must hold one array per encoder output ({len(hs)} for this UNet); got "
            f"{len(residuals)}"
        )
    out = []
    for i, (h, r) in enumerate(zip(hs, residuals, strict=True)):
        if jnp.shape(r) != h.shape:
            raise ValueError(f"{name}[{i}] must have shape {h.shape}; got {jnp.shape(r)}")
        out.append(h + jnp.asarray(r).astype(h.dtype))
    return out


def _encode(m: UNet, x, t, y, train: bool, hint: Callable | None = None):
    """The checks, embedding, encoder and middle block of UNet `m` (shared by `ControlNet`).

    Called inside `m`'s compact __call__, so the submodules it creates are m's, named as in
    the UNet. hint: optional h -> h + features(condition), applied to conv_in's output.

    Returns:
      (hs, h, res_block, attention): the encoder's outputs in order (the skips), the middle
      block's output, and the block factories (for the decoder) closed over the embedding.
    """
    m._check_config()
    x = jnp.asarray(x)
    t = jnp.asarray(t)
    y = None if y is None else jnp.asarray(y)
    check_denoiser_inputs(x, t, y, m.num_classes, data_rank=4, data_desc="[B, H, W, C]")
    factor = 2 ** (len(m.channel_mults) - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
        raise ValueError(
            f"x height and width must be divisible by 2**(len(channel_mults)-1) = {factor}; "
            f"got H={x.shape[1]}, W={x.shape[2]}"
        )

    sizes = sorted({x.shape[1] // 2**level for level in range(len(m.channel_mults))})
    unused = sorted(set(m.attention_resolutions) - set(sizes))
    if unused:
        raise ValueError(
            f"attention_resolutions must name feature-map sizes of this UNet, {sizes} for "
            f"H={x.shape[1]} (or be empty: attention only in the middle block); got "
            f"{tuple(m.attention_resolutions)}, with {unused} never reached"
        )
    ch = m.base_channels
    last = len(m.channel_mults) - 1
    attn_channels = {ch * m.channel_mults[-1]} | {
        ch * mult
        for level, mult in enumerate(m.channel_mults)
        if x.shape[1] // 2**level in m.attention_resolutions
    }
    if m.num_head_channels is not None:
        if any(c % m.num_head_channels for c in attn_channels):
            raise ValueError(
                f"num_head_channels must divide the channel count of every attention layer "
                f"{sorted(attn_channels)}; got num_head_channels={m.num_head_channels}"
            )
    elif any(c % m.num_heads for c in attn_channels):
        raise ValueError(
            f"num_heads must divide the channel count of every attention layer "
            f"{sorted(attn_channels)}; got num_heads={m.num_heads}"
        )
    kw = dict(dtype=m.dtype, param_dtype=m.param_dtype)
    eps = m.norm_epsilon
    # ResBlock.__call__(self, x, emb, train): `train` (index 3, self = 0) selects dropout
    # in Python, so it must be static under remat.
    res_cls = nn.remat(ResBlock, static_argnums=(3,)) if m.remat else ResBlock
    attn_cls = nn.remat(AttentionBlock) if m.remat else AttentionBlock

    def res_block(h, out_ch, name):
        block = res_cls(
            out_channels=out_ch,
            dropout=m.dropout,
            use_scale_shift_norm=m.use_scale_shift_norm,
            num_groups=m.num_groups,
            epsilon=eps,
            name=name,
            **kw,
        )
        return block(h, emb, train)

    def attention(h, name):
        heads = m.num_heads
        if m.num_head_channels is not None:
            heads = h.shape[-1] // m.num_head_channels
        block = attn_cls(num_heads=heads, num_groups=m.num_groups, epsilon=eps, name=name, **kw)
        return block(h)

    # Time (+ class) embedding, DDPM app. B / ADM.
    emb = timestep_embedding(t, ch, freq_shift=m.time_freq_shift)
    emb = nn.Dense(4 * ch, name="time_dense0", **kw)(emb)
    emb = nn.Dense(4 * ch, name="time_dense1", **kw)(nn.silu(emb))
    if m.num_classes is not None:
        emb = emb + nn.Embed(m.num_classes + 1, 4 * ch, name="label_embed", **kw)(y)

    # Encoder: every block output is kept for the decoder's skip concatenation.
    h = nn.Conv(ch, (3, 3), padding=1, name="conv_in", **kw)(x.astype(m.dtype))
    if hint is not None:
        h = hint(h)
    hs = [h]
    for level, mult in enumerate(m.channel_mults):
        for i in range(m.num_res_blocks):
            h = res_block(h, ch * mult, f"down_{level}_res_{i}")
            if h.shape[1] in m.attention_resolutions:
                h = attention(h, f"down_{level}_attn_{i}")
            hs.append(h)
        if level != last:
            h = Downsample(
                h.shape[-1], padding=m.downsample_padding, name=f"down_{level}_downsample", **kw
            )(h)
            hs.append(h)

    h = res_block(h, h.shape[-1], "mid_res_0")
    h = attention(h, "mid_attn")
    h = res_block(h, h.shape[-1], "mid_res_1")
    return hs, h, res_block, attention


def _as_tuple(value) -> tuple | None:
    """`value` as a tuple, or None where it is not a sequence (an int, None, a string)."""
    if isinstance(value, str | bytes):
        return None
    try:
        return tuple(value)
    except TypeError:
        return None


def make_model_fn(
    model: nn.Module,
    params: Any,
    *,
    y: jax.Array | None = None,
    train: bool = False,
    rngs: dict[str, jax.Array] | None = None,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Closes a network over its params as `model_fn(x_t, t) -> output`.

    This is the signature the samplers and losses take (they never import Flax).

    Args:
      model: a Flax module called as model(x, t, y, train=...), e.g. UNet or MLPDenoiser.
      params: the 'params' collection of the model's variables.
      y: optional [B] int labels fixed for every call (class-conditional sampling).
      train: passed to the model (dropout on when True; then rngs must hold 'dropout').
      rngs: optional rngs for apply, e.g. {'dropout': key}.

    Returns:
      model_fn(x, t) = model.apply({'params': params}, x, t, y, train=train, rngs=rngs).
    """

    def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        return model.apply({"params": params}, x, t, y, train=train, rngs=rngs)

    return model_fn


def make_conditional_model_fn(
    model: nn.Module, params: Any
) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """Closes a class-conditional network over its params as `model_fn(x_t, t, y)`.

    Classifier-free guidance calls it with the labels and with the null label
    (Ho & Salimans 2022, eq. 6).

    Args:
      model: a class-conditional Flax module (num_classes set).
      params: the 'params' collection of the model's variables.

    Returns:
      model_fn(x, t, y) = model.apply({'params': params}, x, t, y) in eval mode.
    """

    def model_fn(x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
        return model.apply({"params": params}, x, t, y)

    return model_fn
