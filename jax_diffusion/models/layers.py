"""Building blocks of the diffusion networks: time embedding, GroupNorm, ResBlock, attention,
resampling.

All image modules are NHWC. Parameters are stored in `param_dtype` (float32); `dtype` is the
compute dtype (bfloat16 on accelerators). Normalisation statistics and the attention softmax
are computed in float32 whatever the compute dtype.

References:
  Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (DDPM), appendix B.
  Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models".
  Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis" (ADM), section 3.
  Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", algorithm 1.
  Vaswani et al. 2017, "Attention Is All You Need", section 3.5.
  Wu & He 2018, "Group Normalization", equations 1-3.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_diffusion.schedules import _is_number

Dtype = Any

__all__ = [
    "AttentionBlock",
    "DOWNSAMPLE_PADDINGS",
    "check_dropout",
    "check_field_dtype",
    "Downsample",
    "GroupNorm",
    "ResBlock",
    "check_denoiser_inputs",
    "Upsample",
    "dot_product_attention",
    "drop_labels",
    "group_norm",
    "timestep_embedding",
    "upsample_conv",
]

_zeros = nn.initializers.zeros


def check_field_dtype(name: str, value) -> None:
    """A module's compute or parameter dtype, which must be a floating type."""
    try:
        ok = jnp.issubdtype(jnp.dtype(value), jnp.floating)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name} must be a floating dtype such as float32 or bfloat16; got {value!r}"
        )


def check_dropout(value) -> None:
    """A module's dropout rate, which must be a real number in [0, 1)."""
    if not (_is_number(value) and 0.0 <= value < 1.0):
        raise ValueError(f"dropout must be in [0, 1); got {value!r}")


def timestep_embedding(
    t: jax.Array, dim: int, max_period: float = 10000.0, freq_shift: float = 0.0
) -> jax.Array:
    """Sinusoidal embedding PE(t) of a (discrete or continuous) timestep.

    For i = 0, ..., dim/2 - 1 (Vaswani et al. 2017, section 3.5; used for t by Ho et al. 2020):

        PE(t, 2i)     = sin(t / max_period^(i / (dim/2 - freq_shift)))
        PE(t, 2i + 1) = cos(t / max_period^(i / (dim/2 - freq_shift)))

    i.e. sin and cos are interleaved along the feature axis. freq_shift = 0 is the
    Transformer's max_period^(2i/dim); freq_shift = 1 spreads the frequencies from 1 to exactly
    1 / max_period, as DDPM's TensorFlow code (and diffusers' `freq_shift=1`) does. The
    frequencies are computed in float64 NumPy (they depend only on `dim`), the phases t * freq
    in float32, so the absolute error of an entry is about float32 eps * |t|.

    Args:
      t: [B] int or float, timesteps (e.g. int32 in [0, num_timesteps - 1]).
      dim: embedding dimension d, a positive even integer.
      max_period: the base 10000 of the formula; sets the lowest frequency 1 / max_period.
      freq_shift: the shift s of the exponent's denominator dim/2 - s; a finite number
        below dim/2.

    Returns:
      [B, dim] float32 embedding.

    Raises:
      ValueError: if `dim` is not a positive even integer, `max_period` not > 0, `freq_shift`
        not a finite number < dim/2 or `t` is not rank 1.
    """
    if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim <= 0 or dim % 2:
        raise ValueError(f"dim must be a positive even integer; got {dim!r}")
    if isinstance(max_period, bool) or not 0 < float(max_period) < np.inf:
        raise ValueError(f"max_period must be a finite number > 0; got {max_period!r}")
    half = dim // 2
    if not (_is_number(freq_shift) and -np.inf < freq_shift < half):
        raise ValueError(
            f"freq_shift must be a finite number below dim/2 = {half}; got {freq_shift!r}"
        )
    t = jnp.asarray(t)
    if t.ndim != 1:
        raise ValueError(f"t must have shape [B] (rank 1); got shape {t.shape}")
    if freq_shift == 0:  # the original expression, so default embeddings stay bit-identical
        freqs = np.power(float(max_period), -2.0 * np.arange(half, dtype=np.float64) / dim)
    else:
        exponent = -np.arange(half, dtype=np.float64) / (half - float(freq_shift))
        freqs = np.power(float(max_period), exponent)
    args = t.astype(jnp.float32)[:, None] * jnp.asarray(freqs, dtype=jnp.float32)[None, :]
    # [B, half, 2] -> [B, dim] puts sin at even and cos at odd indices.
    return jnp.stack([jnp.sin(args), jnp.cos(args)], axis=-1).reshape(t.shape[0], dim)


def check_denoiser_inputs(
    x: jax.Array,
    t: jax.Array,
    y: jax.Array | None,
    num_classes: int | None,
    *,
    data_rank: int,
    data_desc: str,
) -> None:
    """Checks the shapes of a denoiser's inputs (x, t, y) at trace time.

    Args:
      x: [B, ...] data of rank `data_rank`.
      t: must be [B].
      y: must be [B] int when num_classes is set, None otherwise.
      num_classes: the model's num_classes field (None: unconditional).
      data_rank: required rank of x.
      data_desc: shape description of x for the message, e.g. "[B, H, W, C]".

    Raises:
      ValueError: naming the argument, the value received and what is allowed.
    """
    if x.ndim != data_rank:
        raise ValueError(f"x must have rank {data_rank} ({data_desc}); got shape {x.shape}")
    batch = x.shape[0]
    if t.shape != (batch,):
        raise ValueError(f"t must have shape [B] = ({batch},) matching x; got shape {t.shape}")
    if num_classes is None and y is not None:
        raise ValueError("y must be None when num_classes is None (unconditional model); got y")
    if num_classes is not None:
        if y is None:
            raise ValueError(
                f"y is required when num_classes={num_classes}; pass labels in "
                f"[0, {num_classes}] ({num_classes} is the null label); got None"
            )
        if y.shape != (batch,):
            raise ValueError(f"y must have shape [B] = ({batch},); got shape {y.shape}")
        if not jnp.issubdtype(y.dtype, jnp.integer):
            raise ValueError(f"y must be an integer array; got dtype {y.dtype}")
        # concrete labels are range-checked: past the table jnp.take gives NaN, and -1 wraps
        # around to the null label
        if y.size and not isinstance(y, jax.core.Tracer):
            values = np.asarray(y)  # NumPy: inside a trace, y.min() would be staged
            low, high = int(values.min()), int(values.max())
            if low < 0 or high > num_classes:
                raise ValueError(
                    f"y must lie in [0, {num_classes}] ({num_classes} is the null label); "
                    f"got min {low}, max {high}"
                )


def drop_labels(rng: jax.Array, y: jax.Array, p: float, null_label: int) -> jax.Array:
    """Replaces each class label by the null label with probability p.

    Label dropout for classifier-free guidance training (Ho & Salimans 2022, algorithm 1,
    p_uncond): one network learns both eps(x_t, t, y) and eps(x_t, t, null).

    Args:
      rng: PRNG key.
      y: [B] int, class labels in [0, num_classes - 1].
      p: drop probability in [0, 1]; p = 0 keeps every label, p = 1 drops every label.
      null_label: the reserved label, `num_classes` for the models of this package.

    Returns:
      [B] labels with the dtype of `y`, each independently equal to `null_label` with
      probability p and to the original label otherwise.

    Raises:
      ValueError: if `p` is a concrete number outside [0, 1], `y` is not an integer array, or
        `null_label` is not an int that `y`'s dtype holds.
    """
    concrete = not isinstance(p, jax.core.Tracer) and np.ndim(p) == 0
    if concrete and not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"p must be in [0, 1]; got {p!r}")
    y = jnp.asarray(y)
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"y must be an integer array of class labels; got dtype {y.dtype}")
    if isinstance(null_label, bool) or not isinstance(null_label, (int, np.integer)):
        raise ValueError(f"null_label must be an int (num_classes); got {null_label!r}")
    bounds = jnp.iinfo(y.dtype)
    if not bounds.min <= null_label <= bounds.max:
        raise ValueError(
            f"null_label={null_label} does not fit y's dtype {y.dtype} (values in "
            f"[{bounds.min}, {bounds.max}]); pass labels of a wider integer dtype"
        )
    drop = jax.random.bernoulli(rng, p, y.shape)
    return jnp.where(drop, jnp.asarray(null_label, dtype=y.dtype), y)


def group_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int, epsilon: float = 1e-6
) -> jax.Array:
    """Group normalisation of channels-last features (Wu & He 2018, eqs. 1-3).

    The C channels are split into `num_groups` consecutive groups; each example's group is
    normalised by the mean and variance over its positions and channels, then scaled and shifted
    per channel: y = (x - mean_g) / sqrt(var_g + epsilon) * scale + bias. The statistics are
    taken in float32 (at least), with var = E[x^2] - E[x]^2 clipped at 0, as flax.linen.GroupNorm
    does by default (`use_fast_variance`).

    The statistics are summed per channel over the positions first ([B, C]) and only then over
    each group's channels: on XLA:CPU that is a reduction along the contiguous channel axis, where
    flax.linen.GroupNorm reduces a [B, H, W, G, C/G] view over three strided axes. Fwd + bwd
    with SiLU, 2-core AMD EPYC: [8, 32, 32, 64] 5.2-5.6 -> 1.8 ms, [128, 8, 8, 64]
    6.4-7.5 -> 1.7-2.7 ms (PyTorch's fused kernel: 2.1-3.2 and 2.3-2.6 ms).

    Args:
      x: [B, ..., C] features (any float dtype).
      scale: [C] per-channel scale.
      bias: [C] per-channel shift.
      num_groups: number of groups G; must divide C.
      epsilon: added to the variance.

    Returns:
      [B, ..., C] normalised features in the promoted dtype of x, scale, bias and float32.

    Raises:
      ValueError: if num_groups does not divide C.
    """
    b, c = x.shape[0], x.shape[-1]
    if num_groups < 1 or c % num_groups:
        raise ValueError(
            f"num_groups must be a positive divisor of the channel count {c}; got {num_groups}"
        )
    dtype = jnp.promote_types(jnp.result_type(x, scale, bias), jnp.float32)
    xf = x.astype(dtype)
    axes = tuple(range(1, x.ndim - 1))
    count = float(np.prod(x.shape[1:-1])) * (c // num_groups)

    def group_mean(per_channel_sum):  # [B, C] -> [B, G] -> back to [B, C]
        m = per_channel_sum.reshape(b, num_groups, c // num_groups).sum(axis=-1) / count
        return jnp.repeat(m, c // num_groups, axis=1)

    mean = group_mean(jnp.sum(xf, axis=axes))
    mean_sq = group_mean(jnp.sum(xf * xf, axis=axes))
    var = jnp.maximum(mean_sq - mean * mean, 0.0)
    mul = lax.rsqrt(var + epsilon) * scale.astype(dtype)
    bcast = (b,) + (1,) * len(axes) + (c,)
    return (xf - mean.reshape(bcast)) * mul.reshape(bcast) + bias.astype(dtype)


class GroupNorm(nn.Module):
    """Group normalisation layer over [B, ..., C] with a learned per-channel scale and bias.

    A drop-in for flax.linen.GroupNorm(num_groups) as used here: the same parameters ('scale'
    ones, 'bias' zeros, shape [C]), the same formula and float32 statistics, so checkpoints are
    interchangeable; computed by `group_norm`, which is faster on CPU.

    Attributes:
      num_groups: number of groups; must divide the channel count.
      epsilon: added to the variance.
      dtype: compute (output) dtype; default the promoted dtype of the input and parameters.
      param_dtype: parameter dtype.
    """

    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps [B, ..., C] features to normalised [B, ..., C] features in `dtype`."""
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        y = group_norm(x, scale, bias, self.num_groups, self.epsilon)
        return y.astype(self.dtype or jnp.promote_types(x.dtype, self.param_dtype))


class ResBlock(nn.Module):
    """Residual block with timestep conditioning (Ho et al. 2020 app. B; ADM section 3).

    h = conv3x3(SiLU(GroupNorm(x)))
    h = GroupNorm(h) * (1 + scale) + shift      if use_scale_shift_norm (ADM "AdaGN")
        GroupNorm(h + Dense(SiLU(emb)))         otherwise (DDPM)
        GroupNorm(h)                            with emb None (the autoencoder's blocks)
    h = conv3x3_zero(dropout(SiLU(h)))
    out = skip(x) + h, skip = 1x1 conv when the channel count changes, identity otherwise.

    The last conv is zero-initialised, so the block is the identity (or the 1x1 skip) at init.

    Attributes:
      out_channels: number of output channels.
      dropout: dropout rate before the last conv (uses the 'dropout' rng when train=True).
      use_scale_shift_norm: ADM scale-shift conditioning instead of additive conditioning.
      num_groups: GroupNorm groups; must divide the input and output channel counts.
      epsilon: GroupNorm epsilon.
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    out_channels: int
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    num_groups: int = 8
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array | None, train: bool = False) -> jax.Array:
        """Applies the block.

        Args:
          x: [B, H, W, C_in] features.
          emb: [B, E] time (+ class) embedding, or None: no conditioning (and no 'emb_proj'
            parameters).
          train: enables dropout.

        Returns:
          [B, H, W, out_channels] features in the compute dtype.
        """
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm_kw = dict(num_groups=self.num_groups, epsilon=self.epsilon, **kw)
        h = GroupNorm(name="norm1", **norm_kw)(x)
        h = nn.silu(h)
        h = nn.Conv(self.out_channels, (3, 3), padding=1, name="conv1", **kw)(h)

        if emb is None:
            h = GroupNorm(name="norm2", **norm_kw)(h)
        elif self.use_scale_shift_norm:
            n_emb = 2 * self.out_channels
            emb_out = nn.Dense(n_emb, name="emb_proj", **kw)(nn.silu(emb))[:, None, None, :]
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = GroupNorm(name="norm2", **norm_kw)(h)
            h = h * (1 + scale) + shift
        else:
            emb_out = nn.Dense(self.out_channels, name="emb_proj", **kw)(nn.silu(emb))
            h = GroupNorm(name="norm2", **norm_kw)(h + emb_out[:, None, None, :])
        h = nn.silu(h)
        h = nn.Dropout(rate=self.dropout, deterministic=not train)(h)
        h = nn.Conv(self.out_channels, (3, 3), padding=1, kernel_init=_zeros, name="conv2", **kw)(h)

        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), name="skip", **kw)(x)
        return x.astype(h.dtype) + h


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """softmax(x) along `axis`, differentiated by its own JVP rule (below).

    jax.nn.softmax has the same rule but uses it only under the `jax_softmax_custom_jvp` config
    flag (off by default in jax 0.10, and process-wide); without it autodiff goes through the
    exp / sum / divide and the backward pass makes several passes over the [B, heads, N, N]
    weights. Attention fwd + bwd at [8, 4, 256, 32] (2-core AMD EPYC): 39.6-43.8 -> 22.6 ms.
    """
    e = jnp.exp(x - jnp.max(x, axis, keepdims=True))
    return e / jnp.sum(e, axis, keepdims=True)


@_softmax.defjvp
def _softmax_jvp(axis, primals, tangents):
    # d softmax(x) = y * (dx - sum(y * dx)): linear in dx, so reverse mode transposes it
    (x,), (dx,) = primals, tangents
    y = _softmax(x, axis)
    return y, y * (dx - jnp.sum(y * dx, axis, keepdims=True))


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Scaled dot-product attention softmax(q k^T / sqrt(d)) v (Vaswani et al. 2017, eq. 1).

    The logits q k^T are accumulated and returned in at least float32 (`preferred_element_type`;
    float64 inputs keep float64) and the softmax is taken in that dtype: logits rounded to
    bfloat16 first (spacing 2^-8 |logit|) would err by up to |logit| * 2^-9 in the exponent, 7%
    in the weights at logits of 35. The softmax is differentiated with its closed-form JVP
    (`_softmax`), so both forward and reverse mode work and the backward pass is four matmuls
    and two elementwise passes over the weights.

    Args:
      q: [B, heads, N, d] queries.
      k: [B, heads, M, d] keys.
      v: [B, heads, M, d] values.

    Returns:
      [B, heads, N, d] attention output in v's dtype.
    """
    # at least float32: a float64 caller would otherwise get float32 weights (~1e-7 error)
    acc = jnp.promote_types(jnp.result_type(q, k), jnp.float32)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=acc)
    logits = logits / np.sqrt(q.shape[-1]).astype(acc)
    weights = _softmax(logits.astype(acc), -1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", weights, v)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection.

    out = x + Dense_zero(MHA(qkv(GroupNorm(x)))), softmax(q k^T / sqrt(d_head)) v
    (Vaswani et al. 2017 eq. 1; as in DDPM app. B and ADM). The output projection is
    zero-initialised, so the block is the identity at init.

    Attributes:
      num_heads: attention heads; must divide the channel count.
      num_groups: GroupNorm groups; must divide the channel count.
      epsilon: GroupNorm epsilon.
      dtype: compute dtype (the softmax is taken in float32).
      param_dtype: parameter dtype.
    """

    num_heads: int = 4
    num_groups: int = 8
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies self-attention.

        Args:
          x: [B, H, W, C] features, C divisible by num_heads.

        Returns:
          [B, H, W, C] features in the compute dtype.

        Raises:
          ValueError: if num_heads does not divide C.
        """
        b, hgt, wid, c = x.shape
        if c % self.num_heads:
            raise ValueError(
                f"num_heads must divide the channel count {c} at attention layers; "
                f"got num_heads={self.num_heads}"
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d_head = c // self.num_heads
        h = GroupNorm(num_groups=self.num_groups, epsilon=self.epsilon, name="norm", **kw)(x)
        qkv = nn.Dense(3 * c, name="qkv", **kw)(h.reshape(b, hgt * wid, c))
        # Heads first ([B, heads, HW, d_head]) so both products are plain batched matmuls:
        # with the heads in the middle ("bqhd,bkhd->bhqk") XLA:CPU's dots ran the attention
        # fwd+bwd 2.5x slower (55 vs 22 ms at [8, 256, 128], 4 heads, AMD EPYC).
        qkv = qkv.reshape(b, hgt * wid, 3 * self.num_heads, d_head).transpose(0, 2, 1, 3)
        q, k, v = jnp.split(qkv, 3, axis=1)
        out = dot_product_attention(q, k, v).transpose(0, 2, 1, 3)
        out = out.reshape(b, hgt * wid, c)
        out = nn.Dense(c, kernel_init=_zeros, name="proj_out", **kw)(out)
        return x.astype(out.dtype) + out.reshape(b, hgt, wid, c)


DOWNSAMPLE_PADDINGS = {"symmetric": ((1, 1), (1, 1)), "same": ((0, 1), (0, 1))}


class Downsample(nn.Module):
    """Halves H and W with a 3x3 stride-2 convolution (as in DDPM / ADM).

    Attributes:
      channels: output channels.
      padding: 'symmetric' pads one zero row / column on each side (ADM, PyTorch's
        padding=1); 'same' pads one after only, TensorFlow's SAME padding on even sizes, as
        DDPM's original code (and diffusers' downsample_padding=0) does. Same parameters.
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    channels: int
    padding: str = "symmetric"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps [B, H, W, C] to [B, H/2, W/2, channels] (H, W even)."""
        if self.padding not in DOWNSAMPLE_PADDINGS:
            raise ValueError(
                f"padding must be one of {sorted(DOWNSAMPLE_PADDINGS)}; got {self.padding!r}"
            )
        return nn.Conv(
            self.channels,
            (3, 3),
            strides=(2, 2),
            padding=DOWNSAMPLE_PADDINGS[self.padding],
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )(x)


def _upsample_phase_kernels(kernel: jax.Array) -> list[list[jax.Array]]:
    """The 2x2 kernels of a nearest x2 upsampling followed by a 3x3 convolution.

    Output pixel (2i + p, 2j + q) of conv3x3(upsample(x)) reads upsampled rows 2i + p - 1 ..
    2i + p + 1, i.e. input rows (i - 1, i, i) for p = 0 and (i, i, i + 1) for p = 1; merging the
    taps that read the same input row (and likewise for columns) leaves a 2x2 kernel per phase:
    rows (w[0], w[1] + w[2]) at offsets (-1, 0) for p = 0, (w[0] + w[1], w[2]) at (0, +1) for
    p = 1.

    Args:
      kernel: [3, 3, C_in, C_out] kernel of the convolution.

    Returns:
      k[p][q]: [2, 2, C_in, C_out] kernel of output phase (p, q).
    """
    w = kernel
    rows = [jnp.stack([w[0], w[1] + w[2]]), jnp.stack([w[0] + w[1], w[2]])]  # [2, 3, Ci, Co]
    return [
        [
            jnp.stack([r[:, 0], r[:, 1] + r[:, 2]], axis=1),
            jnp.stack([r[:, 0] + r[:, 1], r[:, 2]], axis=1),
        ]
        for r in rows
    ]


def upsample_conv(
    x: jax.Array, kernel: jax.Array, bias: jax.Array, *, dtype: Dtype | None = None
) -> jax.Array:
    """conv3x3(nearest_x2(x)) + bias (zero padding 1), computed without upsampling x.

    Each of the four output phases (2i + p, 2j + q) is a 2x2 convolution of x itself with the
    merged taps of `_upsample_phase_kernels`, zero-padded on the side where that phase reads
    past the edge: 4 x 4 instead of 4 x 9 multiply-adds per input pixel and channel pair. Equal
    to the direct form up to float rounding (merged taps are summed first), with the same
    parameters. Fwd + bwd on a 2-core AMD EPYC (`benchmarks/cpu_breakdown.py --upsample`):
    [8, 16, 16, 128] 59 -> 27 ms, [32, 16, 16, 128] 395 -> 180 ms; one gradient of the whole
    cifar UNet 0.94 -> 0.90 s at batch 8, 3.27 -> 3.17 s at batch 32.

    Args:
      x: [B, H, W, C_in] features.
      kernel: [3, 3, C_in, C_out] kernel (cross-correlation, as flax.linen.Conv).
      bias: [C_out] bias.
      dtype: compute dtype; default the promoted dtype of x, kernel and bias. The merged taps
        are summed in the kernel's own dtype (e.g. float32 parameters) and then cast.

    Returns:
      [B, 2H, 2W, C_out] in `dtype`.
    """
    dtype = jnp.result_type(x, kernel, bias) if dtype is None else dtype
    b, hgt, wid, _ = x.shape
    k = [[kq.astype(dtype) for kq in kp] for kp in _upsample_phase_kernels(kernel)]
    x = x.astype(dtype)
    dn = ("NHWC", "HWIO", "NHWC")
    phases = [
        [
            lax.conv_general_dilated(
                x, k[p][q], (1, 1), ((1 - p, p), (1 - q, q)), dimension_numbers=dn
            )
            for q in range(2)
        ]
        for p in range(2)
    ]
    # [B, H, 2 (p), W, 2 (q), C_out] -> [B, 2H, 2W, C_out]
    out = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)
    return out.reshape(b, 2 * hgt, 2 * wid, kernel.shape[-1]) + bias.astype(dtype)


class _UpsampleConv(nn.Module):
    """The 3x3 convolution of `Upsample`: flax.linen.Conv's parameters (names, shapes and
    initialisers, so checkpoints and initial values are those of `nn.Conv`), applied by
    `upsample_conv`."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (3, 3, x.shape[-1], self.features)
        kernel = self.param("kernel", nn.linear.default_kernel_init, shape, self.param_dtype)
        bias = self.param("bias", _zeros, (self.features,), self.param_dtype)
        # nn.Conv's compute dtype; the taps are merged in the parameters' dtype first
        dtype = nn.dtypes.canonicalize_dtype(x, kernel, bias, dtype=self.dtype)
        return upsample_conv(x, kernel, bias, dtype=dtype)


class Upsample(nn.Module):
    """Doubles H and W: nearest-neighbour x2 followed by a 3x3 convolution (DDPM / ADM).

    Computed as four 2x2 convolutions of the input, one per output phase (`upsample_conv`): the
    same function and parameters ('conv' / 'kernel' [3, 3, C_in, channels], 'bias') as nn.Conv
    applied to the upsampled features, with 4/9 of the multiply-adds.

    Attributes:
      channels: output channels.
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps [B, H, W, C] to [B, 2H, 2W, channels]."""
        return _UpsampleConv(
            self.channels, dtype=self.dtype, param_dtype=self.param_dtype, name="conv"
        )(x)
