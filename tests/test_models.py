"""Tests of jax_diffusion.models: time embedding, UNet, MLPDenoiser, label dropout, adapters.

The networks are tiny (8 base channels, 8x8 inputs, batch 2) and shapes are shared across tests
so that XLA compiles each configuration once. References come from outside the code under
test: a float64 NumPy transcription of the sinusoidal embedding formula, the ADM channel
bookkeeping written out by hand, a binomial bound, and invariants (zero-init output, remat
equivalence, batch independence).
"""

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_UNET

from jax_diffusion import backend
from jax_diffusion.models import (
    MLPDenoiser,
    UNet,
    drop_labels,
    make_conditional_model_fn,
    make_model_fn,
    timestep_embedding,
)

B, H, W, C = 2, 8, 8, 3
NUM_CLASSES = 3
TINY = TINY_UNET


def _inputs(seed=0):
    x = jax.random.normal(jax.random.key(seed), (B, H, W, C), jnp.float32)
    t = jnp.array([3, 517], jnp.int32)
    y = jnp.array([0, 2], jnp.int32)
    return x, t, y


def _perturb(params, seed, scale=0.2, only=None):
    """Replaces every all-zero leaf (zero-init convs, biases) by scale * N(0, 1) (NumPy draws).

    With `only`, perturbs just the leaves whose path contains that name.
    """
    rng = np.random.default_rng(seed)

    def perturb(path, leaf):
        hit = (only is None or only in jax.tree_util.keystr(path)) and not np.any(np.asarray(leaf))
        if not hit:
            return leaf
        return jnp.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(perturb, params)


def _normal_params(shapes, seed, scale):
    """scale * N(0, 1) arrays (NumPy draws) of the shapes and dtypes of a params tree."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: jnp.asarray(scale * rng.standard_normal(a.shape), a.dtype), shapes
    )


class _Net:
    """A model, its jitted apply and its init / perturbed params, built once per module."""

    def __init__(self, model, conditional):
        self.model = model
        self.conditional = conditional
        x, t, y = _inputs()
        self.y = y if conditional else None
        init = jax.jit(model.init, compiler_options=backend.compiler_options(run_once=True))
        self.params = init(jax.random.key(1), x, t, self.y)["params"]
        self.perturbed = _perturb(self.params, 2)
        self.apply = jax.jit(model.apply, static_argnames="train")

    def __call__(self, params, x, t, y=None, **kw):
        return self.apply({"params": params}, x, t, y, **kw)


# the tests of the two module-scoped models run on one xdist worker, so each is built once
ON_THE_TINY_UNETS = pytest.mark.xdist_group("tiny_unets")


@pytest.fixture(scope="module")
def uncond():
    # Dropout > 0 only matters with train=True, so this one model serves the dropout test too.
    return _Net(UNet(**TINY, dropout=0.3), conditional=False)


@pytest.fixture(scope="module")
def cond():
    return _Net(UNet(**TINY, num_classes=NUM_CLASSES), conditional=True)


# --------------------------------------------------------------------------- time embedding


def _np_timestep_embedding(t, dim, shift=0.0):
    """Seed formula, float64: PE(t, 2i) = sin(t / 10000^(2i/d)), PE(t, 2i+1) = cos(...);
    with a shift s the exponent is i / (d/2 - s) (DDPM's TensorFlow code: s = 1)."""
    t = np.asarray(t, np.float64)
    pe = np.zeros((t.shape[0], dim), np.float64)
    for i in range(dim // 2):
        period = 10000.0 ** (2 * i / dim) if shift == 0 else 10000.0 ** (i / (dim / 2 - shift))
        pe[:, 2 * i] = np.sin(t / period)
        pe[:, 2 * i + 1] = np.cos(t / period)
    return pe


@pytest.mark.parametrize("dim", [2, 8, 64])
@pytest.mark.parametrize("kind", ["int", "float"])
def test_timestep_embedding_matches_numpy_formula(dim, kind):
    if kind == "int":
        t = np.array([0, 1, 7, 250, 999], np.int32)
    else:
        t = np.array([0.0, 0.25, 3.5, 101.75, 999.0], np.float32)
    got = jax.jit(timestep_embedding, static_argnums=1)(jnp.asarray(t), dim)
    assert got.shape == (t.shape[0], dim) and got.dtype == jnp.float32
    want = _np_timestep_embedding(t, dim)
    # The float32 phase t * freq carries ~eps32 * |t| absolute error; scale atol per row.
    atol = 1e-6 + 4 * np.finfo(np.float32).eps * np.maximum(np.abs(t), 1.0)[:, None]
    assert np.all(np.abs(np.asarray(got, np.float64) - want) <= atol)


@pytest.mark.parametrize("shift", [1.0, 1.5, -2.0])
def test_timestep_embedding_freq_shift_matches_numpy_formula(shift):
    t = np.array([0, 1, 7, 250, 999], np.int32)
    got = jax.jit(timestep_embedding, static_argnums=(1, 2, 3))(jnp.asarray(t), 8, 10000.0, shift)
    want = _np_timestep_embedding(t, 8, shift)
    atol = 1e-6 + 4 * np.finfo(np.float32).eps * np.maximum(np.abs(t), 1.0)[:, None]
    assert np.all(np.abs(np.asarray(got, np.float64) - want) <= atol)
    # shift 1: the lowest frequency is exactly 1 / max_period (DDPM's TensorFlow embedding)
    if shift == 1.0:
        low = np.asarray(timestep_embedding(jnp.array([10000.0 * np.pi / 2]), 8, freq_shift=1))
        np.testing.assert_allclose(low[0, -2:], [1.0, 0.0], atol=1e-6)


@pytest.mark.parametrize("shift", [4, 4.5, np.inf, np.nan, True, "1"])
def test_timestep_embedding_rejects_a_freq_shift_not_below_half_the_dim(shift):
    with pytest.raises(ValueError, match=r"freq_shift must be a finite number below dim/2 = 4"):
        timestep_embedding(jnp.array([1]), 8, freq_shift=shift)


def test_timestep_embedding_is_interleaved():
    emb = np.asarray(timestep_embedding(jnp.array([0]), 6))
    # At t = 0 every sin is 0 and every cos is 1, so the layout is visible directly.
    np.testing.assert_array_equal(emb[0], [0, 1, 0, 1, 0, 1])


@pytest.mark.parametrize("dim", [7, 0, -2])
def test_timestep_embedding_rejects_bad_dim(dim):
    with pytest.raises(ValueError, match="dim must be a positive even integer"):
        timestep_embedding(jnp.arange(3), dim)


def test_timestep_embedding_rejects_bad_t_rank():
    with pytest.raises(ValueError, match="t must have shape"):
        timestep_embedding(jnp.zeros((2, 1)), 8)
    with pytest.raises(ValueError, match="max_period must be a finite number > 0; got 0.0"):
        timestep_embedding(jnp.arange(3), 4, max_period=0.0)  # used to give NaN columns


def test_timestep_embedding_max_period_sets_the_base():
    """PE(t, 2i) = sin(t / P^(2i/d)), PE(t, 2i+1) = cos(...) for another base P (float64)."""
    t = np.array([0, 3, 40], np.int32)
    got = np.asarray(timestep_embedding(jnp.asarray(t), 6, max_period=100.0), np.float64)
    freqs = 100.0 ** (-np.arange(3) * 2 / 6)
    want = np.stack([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], -1).reshape(3, 6)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_timestep_embedding_rejects_a_scalar_t():
    with pytest.raises(ValueError, match=r"t must have shape \[B\] \(rank 1\); got shape \(\)"):
        timestep_embedding(jnp.asarray(5), 8)


@pytest.mark.parametrize("dim", [8.0, True, np.float32(8)])
def test_timestep_embedding_rejects_a_dim_that_is_not_an_int(dim):
    with pytest.raises(ValueError, match="dim must be a positive even integer"):
        timestep_embedding(jnp.arange(3), dim)


@pytest.mark.parametrize("max_period", [np.inf, -10.0, True, np.nan])
def test_timestep_embedding_rejects_a_max_period_that_is_not_finite_and_positive(max_period):
    with pytest.raises(ValueError, match="max_period must be a finite number > 0"):
        timestep_embedding(jnp.arange(3), 4, max_period=max_period)


# --------------------------------------------------------------------------- input checks


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, np.float16, "float64"])
def test_check_field_dtype_accepts_floating_dtypes(dtype):
    from jax_diffusion.models.layers import check_field_dtype

    check_field_dtype("dtype", dtype)  # no error


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.complex64, jnp.bool_, "not a dtype", 3.5])
def test_check_field_dtype_rejects_other_dtypes(dtype):
    from jax_diffusion.models.layers import check_field_dtype

    with pytest.raises(ValueError, match="param_dtype must be a floating dtype such as float32"):
        check_field_dtype("param_dtype", dtype)


@pytest.mark.parametrize(
    "x_shape, t_shape, y, num_classes, match",
    [
        ((2, 3), (2,), None, None, r"x must have rank 4 \(\[B, H, W, C\]\); got shape \(2, 3\)"),
        ((2, 4, 4, 3), (2, 1), None, None, r"t must have shape \[B\] = \(2,\)"),
        ((2, 4, 4, 3), (2,), np.zeros((2, 1), np.int32), 3, r"y must have shape \[B\] = \(2,\)"),
        ((2, 4, 4, 3), (2,), np.zeros(3, np.int32), 3, r"y must have shape \[B\] = \(2,\)"),
        ((2, 4, 4, 3), (2,), np.zeros(2, np.float32), 3, "y must be an integer array; got dtype"),
        ((2, 4, 4, 3), (2,), np.zeros(2, np.int32), None, "y must be None"),
        ((2, 4, 4, 3), (2,), None, 3, r"y is required when num_classes=3"),
        # one past the null label, alone
        ((2, 4, 4, 3), (2,), np.array([3, 4], np.int32), 3, r"y must lie in \[0, 3\].*max 4"),
        ((2, 4, 4, 3), (2,), np.array([-1, 0], np.int32), 3, r"y must lie.*got min -1, max 0"),
    ],
)
def test_check_denoiser_inputs_rejects(x_shape, t_shape, y, num_classes, match):
    from jax_diffusion.models.layers import check_denoiser_inputs

    x, t = jnp.zeros(x_shape), jnp.zeros(t_shape, jnp.int32)
    y = None if y is None else jnp.asarray(y)
    with pytest.raises(ValueError, match=match):
        check_denoiser_inputs(x, t, y, num_classes, data_rank=4, data_desc="[B, H, W, C]")


def test_check_denoiser_inputs_accepts_the_null_label_and_an_empty_batch():
    from jax_diffusion.models.layers import check_denoiser_inputs

    kw = dict(data_rank=2, data_desc="[B, D]")
    y = jnp.array([0, 3, 2], jnp.int8)  # 3 = num_classes is the null label
    check_denoiser_inputs(jnp.zeros((3, 2)), jnp.zeros(3), y, 3, **kw)
    empty = jnp.zeros((0,), jnp.int32)
    check_denoiser_inputs(jnp.zeros((0, 2)), empty, empty, 3, **kw)  # nothing to range-check


# --------------------------------------------------------------------------- UNet structure


def test_unet_adm_skip_structure():
    """Channel bookkeeping of ADM's skip concatenation, written out for the TINY config.

    Pushed (channels @ size): conv_in 8@8, down_0_res_0 8@8, down_0_downsample 8@4,
    down_1_res_0 16@4. Decoder level 1 (16 ch) pops 16 then 8; level 0 (8 ch) pops 8 then 8.
    """
    x, t, _ = _inputs()
    shapes = jax.eval_shape(UNet(**TINY).init, jax.random.key(0), x, t)["params"]
    conv1_in = {k: v["conv1"]["kernel"].shape for k, v in shapes.items() if "res" in k}
    assert conv1_in == {
        "down_0_res_0": (3, 3, 8, 8),
        "down_1_res_0": (3, 3, 8, 16),
        "mid_res_0": (3, 3, 16, 16),
        "mid_res_1": (3, 3, 16, 16),
        "up_1_res_0": (3, 3, 16 + 16, 16),
        "up_1_res_1": (3, 3, 16 + 8, 16),
        "up_0_res_0": (3, 3, 16 + 8, 8),
        "up_0_res_1": (3, 3, 8 + 8, 8),
    }
    # 1x1 skip convs exactly where the channel count changes.
    with_skip = {k for k, v in shapes.items() if "res" in k and "skip" in v}
    assert with_skip == {"down_1_res_0", "up_1_res_0", "up_1_res_1", "up_0_res_0", "up_0_res_1"}
    attn = {k for k in shapes if "attn" in k}
    assert attn == {"down_1_attn_0", "mid_attn", "up_1_attn_0", "up_1_attn_1"}
    assert shapes["time_dense1"]["kernel"].shape == (32, 32)  # 4 * base_channels
    assert shapes["conv_out"]["kernel"].shape == (3, 3, 8, C)
    # Scale-shift norm projects the embedding to 2 * channels (scale and shift), else to channels.
    assert shapes["down_1_res_0"]["emb_proj"]["kernel"].shape == (32, 2 * 16)
    plain = jax.eval_shape(UNet(**TINY, use_scale_shift_norm=False).init, jax.random.key(0), x, t)
    assert plain["params"]["down_1_res_0"]["emb_proj"]["kernel"].shape == (32, 16)


# --------------------------------------------------------------------------- UNet outputs


@pytest.mark.parametrize("conditional", [False, True])
@ON_THE_TINY_UNETS
def test_unet_shape_dtype_and_zero_output_at_init(conditional, uncond, cond):
    net = cond if conditional else uncond
    x, t, _ = _inputs()
    out = net(net.params, x, t, net.y)
    assert out.shape == (B, H, W, C) and out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), 0.0)

    params = _perturb(net.params, 3, only="conv_out")
    out = np.asarray(net(params, x, t, net.y))
    assert np.all(np.isfinite(out)) and np.abs(out).max() > 1e-3


@pytest.mark.parametrize("out_channels", [2 * C, 1, 5])
def test_unet_out_channels_override(out_channels):
    model = UNet(**TINY, out_channels=out_channels)
    x, t, _ = _inputs()
    out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x, t)[0])
    assert out.shape == (B, H, W, out_channels) and out.dtype == jnp.float32


@pytest.mark.parametrize(
    "hw, attention_resolutions, want_attn",
    [
        # non-square: attention_resolutions name feature-map heights (8 -> 4 here, widths 4 -> 2)
        ((8, 4), (4,), {"down_1_attn_0", "mid_attn", "up_1_attn_0", "up_1_attn_1"}),
        ((8, 4), (8,), {"down_0_attn_0", "mid_attn", "up_0_attn_0", "up_0_attn_1"}),
        # sides need only be divisible by 2 ** (len(channel_mults) - 1) = 2: 6 -> 3, 10 -> 5
        ((6, 10), (3,), {"down_1_attn_0", "mid_attn", "up_1_attn_0", "up_1_attn_1"}),
    ],
)
def test_unet_accepts_non_square_sides_divisible_by_its_downsampling(
    hw, attention_resolutions, want_attn
):
    model = UNet(**{**TINY, "attention_resolutions": attention_resolutions})
    x = jnp.zeros((B, *hw, C))
    t = jnp.zeros((B,), jnp.int32)
    out, variables = jax.eval_shape(model.init_with_output, jax.random.key(0), x, t)
    assert out.shape == (B, *hw, C) and out.dtype == jnp.float32
    assert {k for k in variables["params"] if "attn" in k} == want_attn


def test_unet_embeds_fractional_timesteps_as_they_are():
    """A float t (e.g. from a continuous-time sampler) reaches the time MLP as PE(t), unrounded.

    Stops the forward pass at time_dense0, so nothing past the embedding runs or needs params."""
    x, _, _ = _inputs()
    t = jnp.array([3.5, 100.25], jnp.float32)
    seen = []

    class _Stop(Exception):
        pass

    def stop_at_the_time_mlp(next_fun, args, kwargs, context):
        if context.module.name == "time_dense0":
            seen.append(np.asarray(args[0], np.float64))
            raise _Stop
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(stop_at_the_time_mlp), pytest.raises(_Stop):
        UNet(**TINY).apply({"params": {}}, x, t)
    np.testing.assert_allclose(seen[0], _np_timestep_embedding(t, 8), atol=1e-5)


@pytest.mark.parametrize("conditional", [False, True])
@ON_THE_TINY_UNETS
def test_unet_time_embedding_influences_output(conditional, uncond, cond):
    net = cond if conditional else uncond
    x, t, _ = _inputs()
    x = jnp.broadcast_to(x[:1], x.shape)  # same image (and label) twice, different t
    y = None if net.y is None else jnp.broadcast_to(net.y[:1], net.y.shape)
    out = np.asarray(net(net.perturbed, x, t, y))
    assert np.abs(out[0] - out[1]).max() > 1e-3
    # Each example depends only on its own t (GroupNorm and attention are per example).
    swapped = np.asarray(net(net.perturbed, x, t[::-1], y))
    np.testing.assert_allclose(swapped[::-1], out, rtol=1e-5, atol=1e-5)


@ON_THE_TINY_UNETS
def test_unet_class_label_influences_output(cond):
    x, t, y = _inputs()
    out = np.asarray(cond(cond.perturbed, x, t, y))
    other = np.asarray(cond(cond.perturbed, x, t, (y + 1) % NUM_CLASSES))
    null = np.asarray(cond(cond.perturbed, x, t, jnp.full_like(y, NUM_CLASSES)))
    assert np.abs(out - other).max() > 1e-3
    assert np.all(np.isfinite(null)) and np.abs(out - null).max() > 1e-3
    # The null label is a real row of the table, not an out-of-range lookup.
    assert cond.params["label_embed"]["embedding"].shape == (NUM_CLASSES + 1, 32)


@ON_THE_TINY_UNETS
def test_unet_bfloat16_compute(uncond):
    x, t, _ = _inputs()
    model = UNet(**TINY, dtype=jnp.bfloat16)
    params = jax.eval_shape(model.init, jax.random.key(1), x, t)["params"]
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(params)}
    assert dtypes == {jnp.dtype(jnp.float32)}
    out16 = jax.jit(model.apply)({"params": uncond.perturbed}, x, t)
    assert out16.dtype == jnp.float32 and out16.shape == (B, H, W, C)
    out32 = np.asarray(uncond(uncond.perturbed, x, t))
    err = np.abs(np.asarray(out16) - out32).max()
    # bfloat16 keeps 8 significant bits (eps = 2**-7); a few layers compound that.
    assert err <= 0.05 * np.abs(out32).max(), err


def test_unet_remat_same_output_and_gradients():
    # One level keeps the two gradient compiles cheap; ResBlocks and attention are both remat'd.
    cfg = {**TINY, "channel_mults": (1,), "attention_resolutions": (H,)}
    plain = UNet(**cfg)
    remat = UNet(**cfg, remat=True)
    x, t, _ = _inputs()
    params = _normal_params(jax.eval_shape(plain.init, jax.random.key(0), x, t)["params"], 4, 0.3)

    def loss(model, params):
        return jnp.mean(model.apply({"params": params}, x, t) ** 2)

    # remat=True must actually put checkpointed (remat) calls in the computation.
    jaxpr = {
        m.remat: str(jax.make_jaxpr(lambda p, m=m: loss(m, p))(params)) for m in (plain, remat)
    }
    assert "remat" in jaxpr[True] and "remat" not in jaxpr[False]
    # remat must not rename parameters: the same params tree works for both.
    l0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(plain, p)))(params)
    l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(params)
    np.testing.assert_allclose(l1, l0, rtol=1e-5, atol=1e-7)
    assert jax.tree.structure(g0) == jax.tree.structure(g1)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    grads = jax.tree.leaves(g0)
    assert all(np.all(np.isfinite(g)) for g in grads)
    assert all(np.abs(np.asarray(g)).max() > 0 for g in grads)


@ON_THE_TINY_UNETS
def test_unet_dropout(uncond):
    x, t, _ = _inputs()
    p = uncond.perturbed
    a = uncond(p, x, t, train=True, rngs={"dropout": jax.random.key(10)})
    b = uncond(p, x, t, train=True, rngs={"dropout": jax.random.key(11)})
    a2 = uncond(p, x, t, train=True, rngs={"dropout": jax.random.key(10)})
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4
    np.testing.assert_array_equal(a, a2)
    e1 = uncond(p, x, t, train=False)
    e2 = uncond(p, x, t, train=False)
    np.testing.assert_array_equal(e1, e2)
    assert np.abs(np.asarray(a) - np.asarray(e1)).max() > 1e-4


@pytest.mark.parametrize(
    "kwargs, shape, t_shape, with_y, match",
    [
        ({}, (B, H, W), (B,), False, "x must have rank 4"),
        ({}, (B, H, W, C), (B + 1,), False, r"t must have shape \[B\]"),
        ({}, (B, H, W, C), (), False, r"t must have shape \[B\]"),
        ({"num_classes": NUM_CLASSES}, (B, H, W, C), (B,), False, "y is required"),
        ({}, (B, H, W, C), (B,), True, "y must be None"),
        ({}, (B, 7, W, C), (B,), False, "divisible by"),
        ({"channel_mults": (1, 2, 2)}, (B, H, 6, C), (B,), False, "divisible by"),
        ({"num_groups": 3}, (B, H, W, C), (B,), False, "num_groups must divide"),
        ({"base_channels": 0}, (B, H, W, C), (B,), False, "base_channels"),
        ({"num_heads": 3}, (B, H, W, C), (B,), False, "num_heads must divide"),
        # conv_in's base_channels are normalised too: 12 % 8 != 0 failed deep in GroupNorm
        (
            {"base_channels": 12, "channel_mults": (2,), "num_groups": 8, "num_heads": 1},
            (B, H, W, C),
            (B,),
            False,
            r"num_groups must divide every level's channel count \[12, 24\]",
        ),
        ({"channel_mults": (1, 1.5)}, (B, H, W, C), (B,), False, "channel_mults must be a non"),
        ({"num_res_blocks": 1.5}, (B, H, W, C), (B,), False, "num_res_blocks must be an int"),
        ({"base_channels": 8.0}, (B, H, W, C), (B,), False, "base_channels must be an int >= 1"),
        ({"dtype": jnp.int32}, (B, H, W, C), (B,), False, "dtype must be a floating dtype"),
        # a size the UNet never reaches used to be ignored without a word
        (
            {"attention_resolutions": (16,)},
            (B, H, W, C),
            (B,),
            False,
            r"attention_resolutions must name feature-map sizes of this UNet, \[4, 8\]",
        ),
        # one level deeper than the UNet goes (8 -> 4 only) is not a size it reaches either
        (
            {"attention_resolutions": (2,)},
            (B, H, W, C),
            (B,),
            False,
            r"attention_resolutions must name feature-map sizes of this UNet, \[4, 8\]",
        ),
        ({"channel_mults": ()}, (B, H, W, C), (B,), False, "channel_mults must be a non"),
        ({"channel_mults": (True, 2)}, (B, H, W, C), (B,), False, "channel_mults must be a non"),
        # a single number for a sequence (ADM's command line takes "16,8") used to end in a bare
        # TypeError ("'int' object is not iterable"), as did dropout=None
        ({"channel_mults": 2}, (B, H, W, C), (B,), False, "channel_mults must be a non"),
        ({"channel_mults": "12"}, (B, H, W, C), (B,), False, "channel_mults must be a non"),
        (
            {"attention_resolutions": 4},
            (B, H, W, C),
            (B,),
            False,
            r"attention_resolutions must be a sequence of feature-map sizes .*; got 4",
        ),
        # a string is no sequence of sizes: "8" would be read as the size '8', never matched
        (
            {"attention_resolutions": "8"},
            (B, H, W, C),
            (B,),
            False,
            r"attention_resolutions must be a sequence of feature-map sizes .*; got '8'",
        ),
        ({"dropout": None}, (B, H, W, C), (B,), False, r"dropout must be in \[0, 1\); got None"),
        # a truthy string used to switch the option on
        (
            {"use_scale_shift_norm": "no"},
            (B, H, W, C),
            (B,),
            False,
            "use_scale_shift_norm must be True or False; got 'no'",
        ),
        ({"remat": 1}, (B, H, W, C), (B,), False, "remat must be True or False; got 1"),
        ({"base_channels": 9}, (B, H, W, C), (B,), False, "base_channels must be a positive even"),
        ({"dropout": 1.0}, (B, H, W, C), (B,), False, r"dropout must be in \[0, 1\); got 1.0"),
        ({"out_channels": 0}, (B, H, W, C), (B,), False, "out_channels must be an int >= 1"),
        ({"num_classes": 0}, (B, H, W, C), (B,), True, "num_classes must be an int >= 1"),
        # a zero multiplier is a level with no channels; zeros used to fail (if at all) deep inside
        ({"channel_mults": (1, 0)}, (B, H, W, C), (B,), False, "channel_mults must be a non"),
        ({"num_res_blocks": 0}, (B, H, W, C), (B,), False, "num_res_blocks must be an int >= 1"),
        ({"num_heads": 0}, (B, H, W, C), (B,), False, "num_heads must be an int >= 1; got 0"),
        ({"num_groups": 0}, (B, H, W, C), (B,), False, "num_groups must be an int >= 1; got 0"),
        ({"param_dtype": jnp.int32}, (B, H, W, C), (B,), False, "param_dtype must be a floating"),
        # non-square: attention_resolutions are heights, so 8 is level 0 (8 channels) ...
        (
            {"num_heads": 16, "attention_resolutions": (8,)},
            (B, H, 4, C),
            (B,),
            False,
            r"num_heads must divide the channel count of every attention layer \[8, 16\]",
        ),
        # ... and a width (6 here) is not a feature-map size of this UNet
        (
            {"attention_resolutions": (6,)},
            (B, H, 6, C),
            (B,),
            False,
            r"attention_resolutions must name feature-map sizes of this UNet, \[4, 8\]",
        ),
        ({"num_head_channels": 0}, (B, H, W, C), (B,), False, "num_head_channels must be an"),
        (
            {"num_head_channels": 3},
            (B, H, W, C),
            (B,),
            False,
            r"num_head_channels must divide the channel count of every attention layer \[16\]",
        ),
        ({"norm_epsilon": 0.0}, (B, H, W, C), (B,), False, "norm_epsilon must be a finite number"),
        ({"norm_epsilon": "1e-5"}, (B, H, W, C), (B,), False, "norm_epsilon must be a finite"),
        (
            {"downsample_padding": "valid"},
            (B, H, W, C),
            (B,),
            False,
            r"downsample_padding must be one of \['same', 'symmetric'\]; got 'valid'",
        ),
        (
            {"time_freq_shift": 4},
            (B, H, W, C),
            (B,),
            False,
            r"time_freq_shift must be a finite number below base_channels / 2 = 4; got 4",
        ),
        ({"time_freq_shift": None}, (B, H, W, C), (B,), False, "time_freq_shift must be a"),
        # the middle block always has attention (16 channels here), even with none listed
        (
            {"num_heads": 3, "attention_resolutions": ()},
            (B, H, W, C),
            (B,),
            False,
            r"num_heads must divide the channel count of every attention layer \[16\]",
        ),
    ],
)
def test_unet_value_errors(kwargs, shape, t_shape, with_y, match):
    model = UNet(**{**TINY, **kwargs})
    x = jnp.zeros(shape)
    t = jnp.zeros(t_shape, jnp.int32)
    y = jnp.zeros((B,), jnp.int32) if with_y else None
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(model.init, jax.random.key(0), x, t, y)


# --------------------------------------------------------------------------- MLP denoiser


def test_mlp_denoiser_shapes_and_time_dependence():
    model = MLPDenoiser(hidden_dim=16, num_layers=2, time_embed_dim=8)
    x = jax.random.normal(jax.random.key(0), (4, 2))
    t = jnp.array([0, 10, 100, 999])
    params = model.init(jax.random.key(1), x, t)["params"]
    out = model.apply({"params": params}, x, t)
    assert out.shape == (4, 2) and out.dtype == jnp.float32
    same_x = jnp.broadcast_to(x[:1], x.shape)
    out = np.asarray(model.apply({"params": params}, same_x, t))
    assert np.abs(out[0] - out[3]).max() > 1e-4
    wide = MLPDenoiser(out_dim=4, hidden_dim=16, num_layers=1, time_embed_dim=8)
    assert jax.eval_shape(wide.init_with_output, jax.random.key(0), x, t)[0].shape == (4, 4)


def test_mlp_denoiser_bfloat16_compute_returns_float32_close_to_float32_compute():
    x = jax.random.normal(jax.random.key(0), (4, 2))
    t = jnp.array([0, 10, 100, 999])
    kw = dict(hidden_dim=16, num_layers=2, time_embed_dim=8)
    shapes = jax.eval_shape(MLPDenoiser(**kw).init, jax.random.key(1), x, t)["params"]
    params = _normal_params(shapes, 8, 0.5)
    out32 = np.asarray(MLPDenoiser(**kw).apply({"params": params}, x, t))
    out16 = MLPDenoiser(**kw, dtype=jnp.bfloat16).apply({"params": params}, x, t)
    assert out16.dtype == jnp.float32 and out16.shape == (4, 2)
    # bfloat16 keeps 8 significant bits (eps = 2**-7); a few layers compound that.
    err = np.abs(np.asarray(out16) - out32).max()
    assert 0 < err <= 0.05 * np.abs(out32).max(), err


def test_mlp_denoiser_class_conditioning():
    model = MLPDenoiser(hidden_dim=16, num_layers=2, time_embed_dim=8, num_classes=NUM_CLASSES)
    x = jnp.broadcast_to(jax.random.normal(jax.random.key(0), (1, 2)), (NUM_CLASSES + 1, 2))
    t = jnp.full((NUM_CLASSES + 1,), 5)
    y = jnp.arange(NUM_CLASSES + 1)  # includes the null label NUM_CLASSES
    params = model.init(jax.random.key(1), x, t, y)["params"]
    assert params["label_embed"]["embedding"].shape == (NUM_CLASSES + 1, 16)
    out = np.asarray(model.apply({"params": params}, x, t, y))
    assert np.all(np.isfinite(out))
    for i in range(1, NUM_CLASSES + 1):
        assert np.abs(out[i] - out[0]).max() > 1e-4
    with pytest.raises(ValueError, match="y is required"):
        model.apply({"params": params}, x, t)
    with pytest.raises(ValueError, match="x must have rank 2"):
        model.apply({"params": params}, x[None], t, y)


# --------------------------------------------------------------------------- label dropout


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drop_labels_rate(p):
    n = 20000
    y = jnp.arange(n, dtype=jnp.int32) % 7
    out = np.asarray(jax.jit(drop_labels, static_argnums=3)(jax.random.key(0), y, p, 7))
    dropped = out == 7
    # Labels that are kept are untouched.
    np.testing.assert_array_equal(out[~dropped], np.asarray(y)[~dropped])
    sigma = np.sqrt(n * p * (1 - p))
    assert abs(dropped.sum() - n * p) <= 4 * sigma


def test_drop_labels_edge_cases():
    y = jnp.array([0, 1, 2, 3, 1], jnp.int32)
    rng = jax.random.key(0)
    np.testing.assert_array_equal(drop_labels(rng, y, 0.0, 4), y)
    out = drop_labels(rng, y, 1.0, 4)
    np.testing.assert_array_equal(out, np.full(5, 4))
    assert out.dtype == y.dtype
    with pytest.raises(ValueError, match="p must be in"):
        drop_labels(rng, y, 1.5, 4)
    with pytest.raises(ValueError, match="p must be in"):
        drop_labels(rng, y, jnp.float32(1.5), 4)
    # float labels came back as floats, a float null label was truncated (3.5 -> 3), and one
    # past the dtype raised NumPy's OverflowError
    for args, match in [
        ((y.astype(jnp.float32), 0.5, 4), r"y must be an integer array .*got dtype float32"),
        ((y, 0.5, 3.5), r"null_label must be an int \(num_classes\); got 3.5"),
        ((y, 0.5, True), r"null_label must be an int \(num_classes\); got True"),
        ((y.astype(jnp.int8), 0.5, 300), r"null_label=300 does not fit y's dtype int8 \(values"),
    ]:
        with pytest.raises(ValueError, match=match):
            drop_labels(rng, *args)


def test_drop_labels_takes_a_null_label_up_to_the_ends_of_its_dtype_but_not_past_them():
    rng = jax.random.key(0)
    for dtype, lo, hi in [(jnp.int8, -128, 127), (jnp.uint8, 0, 255)]:
        y = jnp.array([0, 1, 2], dtype)
        for null_label in (lo, hi):
            out = drop_labels(rng, y, 1.0, null_label)
            assert out.dtype == dtype
            np.testing.assert_array_equal(out, np.full(3, null_label))
        for null_label in (lo - 1, hi + 1):
            with pytest.raises(ValueError, match=f"null_label={null_label} does not fit y's"):
                drop_labels(rng, y, 0.5, null_label)


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.uint8, jnp.int32])
@pytest.mark.parametrize("null_label", [3, np.int64(3)])  # e.g. num_classes read from NumPy
def test_drop_labels_keeps_the_label_dtype(dtype, null_label):
    y = jnp.array([0, 1, 2, 1], dtype)
    out = drop_labels(jax.random.key(1), y, 1.0, null_label)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, np.full(4, 3))


def test_mlp_denoiser_value_errors():
    x, t = jnp.zeros((5, 2)), jnp.zeros((5,), jnp.int32)
    for kwargs, match in [
        (dict(dropout=1.5), r"dropout must be in \[0, 1\); got 1.5"),
        (dict(out_dim=0), "out_dim must be an int >= 1; got 0"),
        (dict(time_embed_dim=7), "time_embed_dim must be a positive even int"),
        (dict(hidden_dim=16.0), "hidden_dim must be an int >= 1; got 16.0"),
        (dict(num_layers=-1), "num_layers must be an int >= 0; got -1"),
        (dict(num_classes=0), "num_classes must be an int >= 1; got 0"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\); got 1.0"),
        (dict(time_embed_dim=0), "time_embed_dim must be an int >= 2; got 0"),
        (dict(dtype=jnp.int32), "dtype must be a floating dtype"),
        (dict(param_dtype=jnp.int32), "param_dtype must be a floating dtype"),
        (dict(dropout=None), r"dropout must be in \[0, 1\); got None"),
    ]:
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(MLPDenoiser(**kwargs).init, jax.random.key(0), x, t)


def test_mlp_dropout_takes_numpy_numbers_but_not_a_bool():
    # a rate read from a NumPy array (np.float32 is no Python float) is a number; a bool is not
    # (False == 0 would pass the range check: "no dropout" is 0.0)
    x, t = jnp.zeros((5, 2)), jnp.zeros((5,), jnp.int32)
    for dropout in (np.float32(0.5), np.int64(0)):
        jax.eval_shape(MLPDenoiser(dropout=dropout).init, jax.random.key(0), x, t)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\); got False"):
        jax.eval_shape(MLPDenoiser(dropout=False).init, jax.random.key(0), x, t)


def test_out_of_range_labels_are_rejected_where_concrete():
    # past the embedding table jnp.take gave NaN; -1 wrapped around to the null label
    model = MLPDenoiser(hidden_dim=8, num_layers=1, time_embed_dim=4, num_classes=3)
    x, t = jnp.zeros((5, 2)), jnp.zeros((5,), jnp.int32)
    params = model.init(jax.random.key(0), x, t, jnp.zeros((5,), jnp.int32))["params"]
    for y in ([0, 3, -1, 1, 2], [0, 1, 2, 4, 100]):
        with pytest.raises(ValueError, match=r"y must lie in \[0, 3\] \(3 is the null label\)"):
            model.apply({"params": params}, x, t, jnp.asarray(y, jnp.int32))
    ok = model.apply({"params": params}, x, t, jnp.asarray([0, 1, 2, 3, 3], jnp.int32))
    assert np.isfinite(np.asarray(ok)).all()


# --------------------------------------------------------------------------- model_fn adapters


@ON_THE_TINY_UNETS
def test_make_model_fn_matches_apply(uncond, cond):
    x, t, y = _inputs()
    fn = jax.jit(make_model_fn(uncond.model, uncond.perturbed))
    np.testing.assert_allclose(fn(x, t), uncond(uncond.perturbed, x, t), rtol=1e-6, atol=1e-6)

    want = cond(cond.perturbed, x, t, y)
    fn_y = jax.jit(make_model_fn(cond.model, cond.perturbed, y=y))
    np.testing.assert_allclose(fn_y(x, t), want, rtol=1e-6, atol=1e-6)
    fn_c = jax.jit(make_conditional_model_fn(cond.model, cond.perturbed))
    np.testing.assert_allclose(fn_c(x, t, y), want, rtol=1e-6, atol=1e-6)


def test_make_model_fn_passes_train_and_rngs():
    model = MLPDenoiser(hidden_dim=16, num_layers=1, time_embed_dim=8, dropout=0.5)
    x = jax.random.normal(jax.random.key(0), (4, 2))
    t = jnp.array([0, 10, 100, 999])
    params = model.init(jax.random.key(1), x, t)["params"]
    rngs = {"dropout": jax.random.key(10)}
    got = make_model_fn(model, params, train=True, rngs=rngs)(x, t)
    want = model.apply({"params": params}, x, t, train=True, rngs=rngs)
    np.testing.assert_array_equal(got, want)
    eval_out = make_model_fn(model, params)(x, t)
    assert np.abs(np.asarray(got) - np.asarray(eval_out)).max() > 1e-4


def test_make_conditional_model_fn_runs_the_model_in_eval_mode():
    model = MLPDenoiser(
        hidden_dim=16, num_layers=1, time_embed_dim=8, num_classes=NUM_CLASSES, dropout=0.5
    )
    x = jax.random.normal(jax.random.key(0), (4, 2))
    t = jnp.array([0, 10, 100, 999])
    y = jnp.array([0, 1, 2, NUM_CLASSES])
    params = model.init(jax.random.key(1), x, t, y)["params"]
    got = make_conditional_model_fn(model, params)(x, t, y)
    np.testing.assert_array_equal(got, model.apply({"params": params}, x, t, y, train=False))
    rngs = {"dropout": jax.random.key(2)}
    train = model.apply({"params": params}, x, t, y, train=True, rngs=rngs)
    assert np.abs(np.asarray(got) - np.asarray(train)).max() > 1e-4  # dropout does act in train


def test_models_are_linen_modules():
    assert issubclass(UNet, nn.Module) and issubclass(MLPDenoiser, nn.Module)


def _np_softmax(logits):
    """Float64 softmax over the last axis."""
    w = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return w / w.sum(axis=-1, keepdims=True)


def _np_attention(x, p, num_heads, num_groups, eps=1e-6):
    """Float64 NumPy self-attention block from its formula (Vaswani et al. 2017 eq. 1):
    x + proj_out(MHA(qkv(GroupNorm(x)))), heads taken as consecutive d_head slices of q, k, v."""
    x = np.asarray(x, np.float64)
    b, hgt, wid, c = x.shape
    g = {k: {n: np.asarray(a, np.float64) for n, a in v.items()} for k, v in p.items()}
    h = _np_group_norm(x, g["norm"]["scale"], g["norm"]["bias"], num_groups, eps)
    h = h.reshape(b, hgt * wid, c)
    qkv = h @ g["qkv"]["kernel"] + g["qkv"]["bias"]
    d = c // num_heads
    out = np.zeros((b, hgt * wid, c))
    for n in range(b):
        for head in range(num_heads):
            q, k, v = (qkv[n, :, j * c + head * d : j * c + (head + 1) * d] for j in range(3))
            logits = q @ k.T / np.sqrt(d)
            out[n, :, head * d : (head + 1) * d] = _np_softmax(logits) @ v
    out = out @ g["proj_out"]["kernel"] + g["proj_out"]["bias"]
    return x + out.reshape(b, hgt, wid, c)


def test_attention_block_matches_a_float64_numpy_reference():
    from jax_diffusion.models.layers import AttentionBlock

    block = AttentionBlock(num_heads=2, num_groups=4)
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 16), jnp.float32) * 2 + 0.5
    shapes = jax.eval_shape(block.init, jax.random.key(1), x)["params"]
    # random values everywhere: proj_out is zero at init, which would hide the attention
    params = _normal_params(shapes, 2, 0.5)
    got = jax.jit(block.apply)({"params": params}, x)
    want = _np_attention(x, params, num_heads=2, num_groups=4)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def _np_conv(x, kernel, bias):
    """Float64 NHWC convolution, stride 1, 'same' zero padding (kernel [kh, kw, C_in, C_out],
    kh and kw odd), as a cross-correlation: out[i, j] = sum x[i + di - kh // 2, j + dj - kw // 2]
    kernel[di, dj] + bias, written as a sum over the kernel taps."""
    kh, kw = kernel.shape[:2]
    b, hgt, wid, _ = x.shape
    xp = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    out = np.zeros((b, hgt, wid, kernel.shape[-1]))
    for di in range(kh):
        for dj in range(kw):
            out += xp[:, di : di + hgt, dj : dj + wid, :] @ kernel[di, dj]
    return out + bias


def _np_silu(x):
    return x / (1 + np.exp(-x))


def _np_res_block(x, emb, p, num_groups, use_scale_shift_norm, eps=1e-6):
    """Float64 NumPy residual block from its formula (DDPM app. B; ADM section 3, "AdaGN"):

    h = conv3x3(SiLU(GroupNorm(x)))
    h = GroupNorm(h) * (1 + scale) + shift, (scale, shift) = Dense(SiLU(emb))   (ADM)
        GroupNorm(h + Dense(SiLU(emb)))                                         (DDPM)
    GroupNorm(h)                                                            (emb None)
    out = skip(x) + conv3x3(SiLU(h)), skip a 1x1 conv when the channel count changes."""
    x = np.asarray(x, np.float64)
    g = {k: {n: np.asarray(a, np.float64) for n, a in v.items()} for k, v in p.items()}
    h = _np_group_norm(x, g["norm1"]["scale"], g["norm1"]["bias"], num_groups, eps)
    h = _np_conv(_np_silu(h), g["conv1"]["kernel"], g["conv1"]["bias"])
    c = h.shape[-1]
    if emb is not None:
        e = _np_silu(np.asarray(emb, np.float64)) @ g["emb_proj"]["kernel"]
        e = (e + g["emb_proj"]["bias"])[:, None, None, :]  # [B, 1, 1, E']
    if emb is None:
        h = _np_group_norm(h, g["norm2"]["scale"], g["norm2"]["bias"], num_groups, eps)
    elif use_scale_shift_norm:
        scale, shift = e[..., :c], e[..., c:]
        h = _np_group_norm(h, g["norm2"]["scale"], g["norm2"]["bias"], num_groups, eps)
        h = h * (1 + scale) + shift
    else:
        h = _np_group_norm(h + e, g["norm2"]["scale"], g["norm2"]["bias"], num_groups, eps)
    h = _np_conv(_np_silu(h), g["conv2"]["kernel"], g["conv2"]["bias"])
    skip = _np_conv(x, g["skip"]["kernel"], g["skip"]["bias"]) if "skip" in g else x
    return skip + h


@pytest.mark.parametrize("out_channels", [8, 16])  # 16: the 1x1 skip conv
@pytest.mark.parametrize("conditioning", ["scale_shift", "additive", "none"])
def test_res_block_matches_a_float64_numpy_reference(out_channels, conditioning):
    """ADM's and DDPM's conditioning, and no embedding at all (emb None: the autoencoder's
    blocks, which have no 'emb_proj')."""
    from jax_diffusion.models.layers import ResBlock

    ssn = conditioning == "scale_shift"
    block = ResBlock(out_channels=out_channels, num_groups=4, use_scale_shift_norm=ssn)
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8), jnp.float32) * 2 + 0.5
    emb = None
    if conditioning != "none":
        emb = jax.random.normal(jax.random.key(1), (2, 12), jnp.float32)
    shapes = jax.eval_shape(block.init, jax.random.key(2), x, emb)["params"]
    assert ("skip" in shapes) == (out_channels != 8)
    assert ("emb_proj" in shapes) == (emb is not None)
    # random values everywhere: conv2 is zero at init, which would hide everything but the skip
    params = _normal_params(shapes, 3, 0.5)
    got = jax.jit(block.apply)({"params": params}, x, emb)
    assert got.shape == (2, 4, 4, out_channels) and got.dtype == jnp.float32
    want = _np_res_block(x, emb, params, 4, ssn)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- GroupNorm


def _np_group_norm(x, scale, bias, num_groups, eps=1e-6):
    """Float64 NumPy GroupNorm from Wu & He 2018 eqs. 1-3 (two-pass variance)."""
    x = np.asarray(x, np.float64)
    b, c = x.shape[0], x.shape[-1]
    xg = x.reshape(b, -1, num_groups, c // num_groups)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    y = ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape)
    return y * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)


@pytest.mark.parametrize(
    "shape, groups", [((2, 4, 4, 16), 4), ((3, 5, 6, 8), 8), ((2, 7, 12), 3), ((2, 3, 3, 6), 1)]
)
def test_group_norm_matches_a_float64_numpy_reference(shape, groups):
    from jax_diffusion.models import group_norm

    rng = np.random.default_rng(0)
    x = rng.normal(1.5, 2.0, shape).astype(np.float32)
    scale, bias = rng.normal(size=(2, shape[-1])).astype(np.float32)
    got = jax.jit(group_norm, static_argnums=3)(x, scale, bias, groups)
    assert got.dtype == jnp.float32
    want = _np_group_norm(x, scale, bias, groups)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


def test_group_norm_gradients_match_flax_group_norm():
    """Same function as flax.linen.GroupNorm, so the same gradients (checked by autodiff of
    both) for the input, the scale and the bias."""
    from jax_diffusion.models import group_norm

    rng = np.random.default_rng(1)
    x, ct = rng.normal(0.5, 1.5, (2, 2, 4, 4, 12)).astype(np.float32)
    scale, bias = rng.normal(size=(2, 12)).astype(np.float32)

    def ours(x, scale, bias):
        return jnp.sum(nn.silu(group_norm(x, scale, bias, 3)) * ct)

    def flax_gn(x, scale, bias):
        y = nn.GroupNorm(num_groups=3).apply({"params": {"scale": scale, "bias": bias}}, x)
        return jnp.sum(nn.silu(y) * ct)

    got = jax.grad(ours, argnums=(0, 1, 2))(x, scale, bias)
    want = jax.grad(flax_gn, argnums=(0, 1, 2))(x, scale, bias)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


def test_group_norm_module_has_flax_group_norm_parameters_and_dtypes():
    from jax_diffusion.models import GroupNorm

    x = jnp.ones((2, 4, 4, 8), jnp.bfloat16)
    ours = GroupNorm(num_groups=4).init(jax.random.key(0), x)
    theirs = nn.GroupNorm(num_groups=4).init(jax.random.key(0), x)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    assert GroupNorm(num_groups=4).apply(ours, x).dtype == jnp.float32  # as flax: promoted
    assert GroupNorm(num_groups=4, dtype=jnp.bfloat16).apply(ours, x).dtype == jnp.bfloat16


@pytest.mark.parametrize("groups", [0, 3, 16])
def test_group_norm_rejects_groups_that_do_not_divide_the_channels(groups):
    from jax_diffusion.models import group_norm

    x = jnp.ones((2, 4, 4, 8))
    with pytest.raises(ValueError, match=f"num_groups.*channel count 8.*got {groups}"):
        group_norm(x, jnp.ones(8), jnp.zeros(8), groups)


def test_group_norm_epsilon_defaults_and_module_defaults_match_flax():
    """epsilon 1e-6 (flax.linen.GroupNorm's default) in the function and the module, 32 groups
    by default in the module; the input's variance (~1e-6) is of the order of epsilon, so
    another epsilon would show (float64 reference, Wu & He 2018 eqs. 1-3)."""
    from jax_diffusion.models import GroupNorm, group_norm

    rng = np.random.default_rng(4)
    x = (1e-3 * rng.normal(size=(2, 2, 2, 64))).astype(np.float32)
    scale, bias = rng.normal(size=(2, 64)).astype(np.float32)
    want = _np_group_norm(x, scale, bias, 32, eps=1e-6)
    np.testing.assert_allclose(
        np.asarray(group_norm(x, scale, bias, 32)), want, rtol=1e-4, atol=1e-4
    )
    got = GroupNorm().apply({"params": {"scale": scale, "bias": bias}}, x)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    got = GroupNorm(num_groups=4, epsilon=1e-3).apply({"params": {"scale": scale, "bias": bias}}, x)
    want = _np_group_norm(x, scale, bias, 4, eps=1e-3)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_group_norm_of_constant_groups_with_a_large_offset_is_finite():
    """var = E[x^2] - E[x]^2 cancels in float32 (x^2 ~ 1e6 has an ulp of 0.06), to a negative
    number for some of these channels, and is clipped at 0: each constant group maps to its
    bias (float64: exactly; here up to the float32 rounding of the mean, ~6e-5 / sqrt(eps))."""
    from jax_diffusion.models import group_norm

    x = np.broadcast_to((1000 + 0.1 * np.arange(8)).astype(np.float32), (2, 3, 3, 8))
    bias = np.linspace(-1.0, 1.0, 8).astype(np.float32)
    got = np.asarray(group_norm(x, np.ones(8, np.float32), bias, 8))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, np.broadcast_to(bias, x.shape), atol=0.25)


def test_group_norm_statistics_and_output_are_float32_for_bfloat16_inputs():
    """Statistics in float32 at least: bfloat16 x, scale and bias give a float32 result with
    float32 accuracy (the bfloat16 values are exact in the float64 reference)."""
    from jax_diffusion.models import group_norm

    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(3.0, 0.5, (2, 4, 4, 8)), jnp.bfloat16)
    scale, bias = (jnp.asarray(a, jnp.bfloat16) for a in rng.normal(size=(2, 8)))
    got = group_norm(x, scale, bias, 2)
    assert got.dtype == jnp.float32
    want = _np_group_norm(*(np.asarray(a, np.float64) for a in (x, scale, bias)), 2)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- attention core


def _plain_attention(q, k, v):
    """The formula with jax.nn.softmax, differentiated by JAX's own autodiff (the reference)."""
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1])
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(logits, axis=-1), v)


def _qkv(seed, n=6, m=5, d=4):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(2, 3, n, d)).astype(np.float32) * 1.5
    k, v = (rng.normal(size=(2, 3, m, d)).astype(np.float32) for _ in range(2))
    return q, k, v


def test_dot_product_attention_matches_a_float64_numpy_reference():
    from jax_diffusion.models import dot_product_attention

    q, k, v = _qkv(0)
    logits = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), k) / 2.0  # sqrt(d = 4)
    want = np.einsum("bhqk,bhkd->bhqd", _np_softmax(logits), v)
    got = jax.jit(dot_product_attention)(q, k, v)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_dot_product_attention_gradients_and_jvp_match_autodiff_of_the_formula():
    """Its own softmax JVP rule gives the derivatives JAX computes through exp / sum / divide,
    in reverse mode (grad) and forward mode (jvp)."""
    from jax_diffusion.models import dot_product_attention

    q, k, v = _qkv(1)
    ct = np.random.default_rng(2).normal(size=q.shape[:3] + v.shape[-1:]).astype(np.float32)

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v) * ct)

    got = jax.grad(loss(dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(_plain_attention), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
    tangents = _qkv(3)
    _, got = jax.jvp(dot_product_attention, (q, k, v), tangents)
    _, want = jax.jvp(_plain_attention, (q, k, v), tangents)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_dot_product_attention_bfloat16_inputs():
    from jax_diffusion.models import dot_product_attention

    q, k, v = _qkv(4)
    got = dot_product_attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)))
    assert got.dtype == jnp.bfloat16
    want = np.asarray(_plain_attention(q, k, v))
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0.05, atol=0.05)


def test_dot_product_attention_bfloat16_logits_are_not_rounded_to_bfloat16():
    """bfloat16 q, k, v with logits up to ~30 (a trained network's peaked attention): against
    float64 attention of the same bfloat16 values, the error is that of the two roundings
    that remain, the weights to bfloat16 (2^-9 relative, summed against |v|) and the output
    (2^-9 |out|). Logits rounded to bfloat16 as well add up to |logit| 2^-9 to the exponent:
    0.048 here op by op, against a bound of 0.012. (XLA:CPU's jit happens to skip that rounding,
    as it computes bfloat16 dots in float32; the jaxpr asks for a bfloat16 result, which other
    backends may well round to.)"""
    from jax_diffusion.models import dot_product_attention

    rng = np.random.default_rng(0)
    shape = (2, 2, 16, 32)
    q, k = (jnp.asarray(3.0 * rng.standard_normal(shape), jnp.bfloat16) for _ in range(2))
    v = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    jaxpr = jax.make_jaxpr(dot_product_attention)(q, k, v).jaxpr
    logits_dot = next(e for e in _all_eqns(jaxpr) if e.primitive.name == "dot_general")
    assert logits_dot.outvars[0].aval.dtype == jnp.float32
    q64, k64, v64 = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bhqd,bhkd->bhqk", q64, k64) / np.sqrt(32)
    assert 20 < np.abs(logits).max() < 40
    want = np.einsum("bhqk,bhkd->bhqd", _np_softmax(logits), v64)
    bound = 2.0**-9 * (np.abs(v64).max() + np.abs(want).max())
    for fn in (dot_product_attention, jax.jit(dot_product_attention)):
        got = np.asarray(fn(q, k, v), np.float64)
        assert np.abs(got - want).max() <= bound


def test_dot_product_attention_large_logits():
    """Logits in the thousands: the softmax subtracts the row maximum, so exp does not overflow
    (float64 reference, which does the same)."""
    from jax_diffusion.models import dot_product_attention

    q, k, v = _qkv(5)
    q = q * 300.0
    logits = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), k) / 2.0
    assert np.abs(logits).max() > 1000
    want = np.einsum("bhqk,bhkd->bhqd", _np_softmax(logits), v)
    got = np.asarray(jax.jit(dot_product_attention)(q, k, v))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_dot_product_attention_softmax_runs_in_float32_for_bfloat16_inputs():
    """The exp / max / sum of the softmax see float32 operands whatever the input dtype."""
    from jax_diffusion.models import dot_product_attention

    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in _qkv(4))
    jaxpr = jax.make_jaxpr(dot_product_attention)(q, k, v).jaxpr
    ops = [e for e in _all_eqns(jaxpr) if e.primitive.name in ("exp", "reduce_max", "reduce_sum")]
    assert {e.primitive.name for e in ops} == {"exp", "reduce_max", "reduce_sum"}
    assert {v.aval.dtype for e in ops for v in e.invars} == {jnp.dtype(jnp.float32)}


def test_dot_product_attention_second_derivatives_match_autodiff_of_the_formula():
    """The JVP rule is itself differentiable: a Hessian-vector product (forward over reverse)
    agrees with JAX's autodiff of the plain formula."""
    from jax_diffusion.models import dot_product_attention

    q, k, v = _qkv(6, n=3, m=4, d=2)
    ct = np.random.default_rng(7).normal(size=q.shape).astype(np.float32)
    dq = np.random.default_rng(8).normal(size=q.shape).astype(np.float32)

    def hvp(f):
        grad = jax.grad(lambda q: jnp.sum(f(q, k, v) * ct))
        return np.asarray(jax.jit(lambda q, dq: jax.jvp(grad, (q,), (dq,))[1])(q, dq))

    np.testing.assert_allclose(
        hvp(dot_product_attention), hvp(_plain_attention), rtol=1e-4, atol=1e-5
    )


def test_attention_block_rejects_heads_that_do_not_divide_the_channels():
    from jax_diffusion.models import AttentionBlock

    x = jnp.zeros((2, 4, 4, 16))
    with pytest.raises(
        ValueError, match="num_heads must divide the channel count 16.*got num_heads=3"
    ):
        jax.eval_shape(AttentionBlock(num_heads=3, num_groups=4).init, jax.random.key(0), x)


# --------------------------------------------------------------------------- Upsample


@pytest.mark.parametrize("shape, channels", [((2, 3, 5, 4), 6), ((1, 4, 4, 8), 8)])
def test_upsample_matches_nearest_x2_then_conv3x3_in_float64_numpy(shape, channels):
    """Upsample (four 2x2 phase convolutions) is nearest x2 then a 3x3 convolution with zero
    padding (DDPM / ADM), edges included (H != W)."""
    from jax_diffusion.models.layers import Upsample

    module = Upsample(channels)
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    shapes = jax.eval_shape(module.init, jax.random.key(1), x)["params"]
    assert jax.tree.map(lambda a: a.shape, shapes) == {
        "conv": {"kernel": (3, 3, shape[-1], channels), "bias": (channels,)}
    }
    params = _normal_params(shapes, 2, 0.5)
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)["conv"]

    def np_upsample(x, kernel, bias):
        up = np.repeat(np.repeat(np.asarray(x, np.float64), 2, axis=1), 2, axis=2)
        return _np_conv(up, kernel, bias)

    got = jax.jit(module.apply)({"params": params}, x)
    assert got.shape == (shape[0], 2 * shape[1], 2 * shape[2], channels)
    np.testing.assert_allclose(np.asarray(got), np_upsample(x, **p64), rtol=1e-5, atol=1e-5)


def test_upsample_has_flax_conv_parameters_init_gradients_and_dtypes():
    """Same parameter tree and initial values as nn.Conv on the upsampled input (checkpoints of
    either load in the other), the same gradients, and nn.Conv's compute dtype."""
    from jax_diffusion.models.layers import Upsample

    class Direct(nn.Module):  # the textbook form: nearest x2, then nn.Conv, named like ours
        channels: int
        dtype: Any = jnp.float32

        @nn.compact
        def __call__(self, x):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            return nn.Conv(self.channels, (3, 3), padding=1, dtype=self.dtype, name="conv")(x)

    x = jax.random.normal(jax.random.key(0), (2, 4, 3, 8), jnp.float32)
    ours = Upsample(16).init(jax.random.key(5), x)
    chex.assert_trees_all_equal(ours, Direct(16).init(jax.random.key(5), x))
    params = {"params": _normal_params(ours["params"], 6, 0.5)}
    r = jax.random.normal(jax.random.key(7), (2, 8, 6, 16))

    def grads(module):
        return jax.grad(lambda v, x: jnp.sum(module.apply(v, x) * r), argnums=(0, 1))(params, x)

    chex.assert_trees_all_close(grads(Upsample(16)), grads(Direct(16)), rtol=1e-5, atol=1e-5)
    for dtype in (jnp.float32, jnp.bfloat16):
        got = Upsample(16, dtype=dtype).apply(params, x)
        want = Direct(16, dtype=dtype).apply(params, x)
        assert got.dtype == want.dtype == dtype
        tol = 1e-5 if dtype == jnp.float32 else 0.1
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol
        )


def test_upsample_conv_dtype_and_taps_merged_in_the_kernel_dtype():
    """upsample_conv's default dtype is the promoted dtype of x, kernel and bias; in bfloat16
    the merged taps are summed in the kernel's float32 first. On a 1x1 input of 1, each output
    of the direct form (nearest x2, conv3x3, zero padding) is w[0] + w[1] or w[1] + w[2] of the
    kernel's column 1: 2^-8 + (1 + 2^-8) = 1 + 2^-7, exact in bfloat16, while 1 + 2^-8 alone
    rounds to 1 there (a tie to even)."""
    from jax_diffusion.models.layers import upsample_conv

    x = jnp.ones((1, 1, 1, 1), jnp.bfloat16)
    kernel = np.zeros((3, 3, 1, 1), np.float32)
    kernel[:, 1, 0, 0] = [2**-8, 1 + 2**-8, 2**-8]
    bias = np.zeros(1, np.float32)
    assert float(jnp.asarray(1 + 2**-8, jnp.bfloat16)) == 1.0
    assert jax.eval_shape(upsample_conv, x, kernel, bias).dtype == jnp.float32
    got = jax.jit(upsample_conv, static_argnames="dtype")(x, kernel, bias, dtype=jnp.bfloat16)
    assert got.dtype == jnp.bfloat16
    want = _np_conv(np.ones((1, 2, 2, 1)), kernel.astype(np.float64), bias)
    np.testing.assert_array_equal(want, np.full((1, 2, 2, 1), 1 + 2**-7))
    np.testing.assert_array_equal(np.asarray(got, np.float64), want)


@pytest.mark.parametrize("padding, start", [("symmetric", 0), ("same", 1)])
def test_downsample_is_a_stride_2_conv3x3_in_float64_numpy(padding, start):
    """Downsample: 3x3 convolution, stride 2. Zero padding 1 = the stride-1 'same' convolution
    read at even positions (ADM); TensorFlow's SAME (pad one after only, DDPM's code) reads
    input rows 2i .. 2i + 2, the stride-1 convolution at odd positions."""
    from jax_diffusion.models.layers import Downsample

    module = Downsample(6, padding=padding)
    x = jax.random.normal(jax.random.key(0), (2, 6, 4, 4), jnp.float32)
    shapes = jax.eval_shape(module.init, jax.random.key(1), x)["params"]
    params = _normal_params(shapes, 2, 0.5)
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)["conv"]
    got = jax.jit(module.apply)({"params": params}, x)
    want = _np_conv(np.asarray(x, np.float64), **p64)[:, start::2, start::2]
    assert got.shape == want.shape == (2, 3, 2, 6)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- UNet wiring


def _np_unet(model, params, x, t, y=None):
    """Float64 NumPy UNet from the documented layout (module docstring; DDPM app. B / ADM),
    built from the NumPy blocks above and the module's parameters looked up by name:

      emb = Dense(SiLU(Dense(PE(t)))) [+ label_embed[y]]
      encoder: conv_in, then per level num_res_blocks x (ResBlock [+ Attention]) and a
               stride-2 conv (all levels but the last); every output is pushed
      middle:  ResBlock, Attention, ResBlock
      decoder: per level (num_res_blocks + 1) x (concat(h, pop()) -> ResBlock [+ Attention]),
               then nearest x2 + conv3x3 (all levels but the first)
      out:     conv3x3(SiLU(GroupNorm(h)))

    Returns the output and the set of parameter names it read."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    used = set()

    def get(name):
        used.add(name)
        return p[name]

    def dense(v, name):
        return v @ get(name)["kernel"] + get(name)["bias"]

    groups, ssn, eps = model.num_groups, model.use_scale_shift_norm, model.norm_epsilon
    start = 1 if model.downsample_padding == "same" else 0  # see the Downsample test

    def attention(h, name):
        heads = model.num_heads
        if model.num_head_channels is not None:
            heads = h.shape[-1] // model.num_head_channels
        return _np_attention(h, get(name), heads, groups, eps)

    emb = _np_timestep_embedding(np.asarray(t), model.base_channels, model.time_freq_shift)
    emb = dense(_np_silu(dense(emb, "time_dense0")), "time_dense1")
    if model.num_classes is not None:
        emb = emb + get("label_embed")["embedding"][np.asarray(y)]

    def block(h, level_name, i):
        h = _np_res_block(h, emb, get(f"{level_name}_res_{i}"), groups, ssn, eps)
        if h.shape[1] in model.attention_resolutions:
            h = attention(h, f"{level_name}_attn_{i}")
        return h

    last = len(model.channel_mults) - 1
    h = _np_conv(np.asarray(x, np.float64), **get("conv_in"))
    hs = [h]
    for level in range(last + 1):
        for i in range(model.num_res_blocks):
            h = block(h, f"down_{level}", i)
            hs.append(h)
        if level != last:
            h = _np_conv(h, **get(f"down_{level}_downsample")["conv"])[:, start::2, start::2]
            hs.append(h)
    h = _np_res_block(h, emb, get("mid_res_0"), groups, ssn, eps)
    h = attention(h, "mid_attn")
    h = _np_res_block(h, emb, get("mid_res_1"), groups, ssn, eps)
    for level in reversed(range(last + 1)):
        for i in range(model.num_res_blocks + 1):
            h = block(np.concatenate([h, hs.pop()], axis=-1), f"up_{level}", i)
        if level != 0:
            up = np.repeat(np.repeat(h, 2, axis=1), 2, axis=2)
            h = _np_conv(up, **get(f"up_{level}_upsample")["conv"])
    assert not hs  # every pushed activation is consumed exactly once
    norm = get("norm_out")
    h = _np_silu(_np_group_norm(h, norm["scale"], norm["bias"], groups, eps))
    return _np_conv(h, **get("conv_out")), used


@ON_THE_TINY_UNETS
def test_unet_matches_a_float64_numpy_transcription_of_the_adm_layout(cond):
    """Skip order and concatenation order, where attention sits, the middle block, where the
    time and class embedding enter (null label included) and the output head, all at once."""
    x, t, _ = _inputs()
    # random values everywhere: the zero-init convs would hide all but the skip paths
    params = _normal_params(cond.params, 5, 0.3)
    for y in (jnp.array([0, 2], jnp.int32), jnp.array([NUM_CLASSES, 1], jnp.int32)):
        got = np.asarray(cond(params, x, t, y))
        want, used = _np_unet(cond.model, params, x, t, y)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert used == set(params)  # no parameter is left out of the computation


def test_unet_with_two_blocks_per_level_and_additive_norm_matches_the_numpy_transcription():
    """num_res_blocks = 2 (skips of equal width within a level), attention at the top level,
    DDPM's additive embedding, and a learned-variance head (out_channels = 2C)."""
    model = UNet(
        **{**TINY, "num_res_blocks": 2, "attention_resolutions": (H,)},
        use_scale_shift_norm=False,
        out_channels=2 * C,
    )
    x, t, _ = _inputs(1)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, t)["params"]
    params = _normal_params(shapes, 6, 0.3)
    got = np.asarray(jax.jit(model.apply)({"params": params}, x, t))
    assert got.shape == (B, H, W, 2 * C)
    want, used = _np_unet(model, params, x, t)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert used == set(params)


def test_unet_with_the_diffusers_conventions_matches_the_numpy_transcription():
    """The fields that reproduce diffusers' UNet2DModel (jax_diffusion.convert): a large
    GroupNorm epsilon (visible on inputs of small variance), TF-SAME downsampling, per-layer
    head counts from num_head_channels (2 heads at 8 channels, 4 at 16) and a shifted time
    embedding."""
    model = UNet(
        **{**TINY, "attention_resolutions": (H, H // 2)},
        num_head_channels=4,
        norm_epsilon=1e-2,
        downsample_padding="same",
        time_freq_shift=1.0,
    )
    x, t, _ = _inputs(2)
    x = 0.1 * x
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, t)["params"]
    params = _normal_params(shapes, 7, 0.3)
    got = np.asarray(jax.jit(model.apply)({"params": params}, x, t))
    want, used = _np_unet(model, params, x, t)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert used == set(params)
    # and each field matters at this tolerance
    for field, default in [
        ("num_head_channels", None),
        ("norm_epsilon", 1e-6),
        ("downsample_padding", "symmetric"),
        ("time_freq_shift", 0.0),
    ]:
        other = np.asarray(model.clone(**{field: default}).apply({"params": params}, x, t))
        assert np.abs(other - want).max() > 1e-3, field


@ON_THE_TINY_UNETS
def test_unet_only_the_documented_layers_start_at_zero(cond):
    """Zero at init: every bias, the GroupNorm shifts, and the kernels of the last conv of each
    ResBlock, of each attention output projection and of conv_out (so eps_hat = 0 at init);
    every other kernel (conv_in included), the label table and the GroupNorm scales are not."""
    zero, nonzero = set(), set()
    for path, leaf in jax.tree_util.tree_leaves_with_path(cond.params):
        keys = tuple(k.key for k in path)
        (zero if not np.any(np.asarray(leaf)) else nonzero).add(keys)
    names = set(cond.params)
    want_zero = {k for k in zero | nonzero if k[-1] == "bias"}
    want_zero |= {(n, "conv2", "kernel") for n in names if "_res_" in n}
    want_zero |= {(n, "proj_out", "kernel") for n in names if "attn" in n}
    want_zero |= {("conv_out", "kernel")}
    assert ("conv_in", "kernel") in nonzero and ("label_embed", "embedding") in nonzero
    assert zero == want_zero


def _all_eqns(jaxpr):
    """Every equation of a jaxpr, those of its sub-jaxprs (jit, remat, custom_jvp) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _all_eqns(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _all_eqns(sub)


@pytest.mark.parametrize("net", ["unet", "mlp"])
def test_every_matmul_and_conv_runs_in_the_compute_dtype(net):
    """dtype=bfloat16 is the compute dtype of every layer (stem, blocks, attention, Downsample,
    Upsample, head); param_dtype=bfloat16 stores every parameter in bfloat16."""
    x, t, y = _inputs()
    if net == "unet":
        make = lambda **kw: UNet(**TINY, num_classes=NUM_CLASSES, **kw)  # noqa: E731
    else:
        x = x[:, 0, 0, :2]
        make = lambda **kw: MLPDenoiser(  # noqa: E731
            hidden_dim=16, num_layers=2, time_embed_dim=8, num_classes=NUM_CLASSES, **kw
        )
    params = jax.eval_shape(make(param_dtype=jnp.bfloat16).init, jax.random.key(0), x, t, y)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    params = jax.eval_shape(make().init, jax.random.key(0), x, t, y)
    jaxpr = jax.make_jaxpr(make(dtype=jnp.bfloat16).apply)(params, x, t, y).jaxpr
    dtypes = [
        tuple(v.aval.dtype for v in eqn.invars)
        for eqn in _all_eqns(jaxpr)
        if eqn.primitive.name in ("dot_general", "conv_general_dilated")
    ]
    assert len(dtypes) >= 10  # the MLP: 2 time Dense, dense_in, 3 per block, dense_out
    assert set(dtypes) == {(jnp.dtype(jnp.bfloat16),) * 2}


def test_unet_remat_checkpoints_every_res_block_and_attention():
    cfg = {**TINY, "channel_mults": (1,), "attention_resolutions": (H,)}
    x, t, _ = _inputs()
    params = jax.eval_shape(UNet(**cfg).init, jax.random.key(0), x, t)
    jaxpr = jax.make_jaxpr(UNet(**cfg, remat=True).apply)(params, x, t).jaxpr
    names = [eqn.primitive.name for eqn in _all_eqns(jaxpr)]
    # encoder ResBlock + attention, middle ResBlock, attention, ResBlock, and the decoder's
    # two ResBlock + attention pairs: one checkpointed call each
    assert sum("remat" in n or "checkpoint" in n for n in names) == 2 + 3 + 4


def _np_mlp_denoiser(model, params, x, t, y=None):
    """Float64 NumPy MLPDenoiser from its documented formula (mlp.py docstring):
    emb = Dense(SiLU(Dense(PE(t)))) [+ label_embed[y]], h = Dense(x),
    h = h + Dense(SiLU(Dense(SiLU(h)) + Dense(emb))) per block, out = Dense(SiLU(h))."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

    def dense(v, name):
        return v @ p[name]["kernel"] + p[name]["bias"]

    emb = _np_timestep_embedding(np.asarray(t), model.time_embed_dim)
    emb = dense(_np_silu(dense(emb, "time_dense0")), "time_dense1")
    if model.num_classes is not None:
        emb = emb + p["label_embed"]["embedding"][np.asarray(y)]
    h = dense(np.asarray(x, np.float64), "dense_in")
    for i in range(model.num_layers):
        r = dense(_np_silu(h), f"block_{i}_dense0") + dense(emb, f"block_{i}_emb")
        h = h + dense(_np_silu(r), f"block_{i}_dense1")
    return dense(_np_silu(h), "dense_out")


def test_mlp_denoiser_matches_a_float64_numpy_transcription():
    model = MLPDenoiser(
        out_dim=3, hidden_dim=16, num_layers=2, time_embed_dim=8, num_classes=NUM_CLASSES
    )
    x = jax.random.normal(jax.random.key(0), (4, 2))
    t = jnp.array([0, 10, 100, 999])
    y = jnp.array([0, 1, 2, NUM_CLASSES])  # the null label too
    shapes = jax.eval_shape(model.init, jax.random.key(1), x, t, y)["params"]
    params = _normal_params(shapes, 7, 0.5)
    got = np.asarray(jax.jit(model.apply)({"params": params}, x, t, y))
    assert got.shape == (4, 3)
    want = _np_mlp_denoiser(model, params, x, t, y)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dot_product_attention_of_float64_inputs_is_float64_accurate(x64):
    """float64 q, k, v: the result is float64 and float64-accurate against a float64 NumPy
    reference; logits and softmax fixed at float32 left a ~1e-7 error in a float64 result."""
    from jax_diffusion.models import dot_product_attention

    q, k, v = (a.astype(np.float64) for a in _qkv(6))
    logits = np.einsum("bhqd,bhkd->bhqk", q, k) / 2.0  # sqrt(d = 4)
    want = np.einsum("bhqk,bhkd->bhqd", _np_softmax(logits), v)
    got = jax.jit(dot_product_attention)(*(jnp.asarray(a) for a in (q, k, v)))
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-10)


class _GaussianVelocity(nn.Module):
    """The exact flow velocity of N(m, s^2) data at the network's time input tau = 50 t, with
    one unused parameter (a network has params) and the label and train flag ignored."""

    m: float = 0.2
    s: float = 0.6

    @nn.compact
    def __call__(self, x, tau, y=None, *, train=False):
        self.param("unused", nn.initializers.zeros, ())
        t = (tau / 50.0).reshape(tau.shape + (1,) * (x.ndim - 1))
        var = (1 - t) ** 2 * self.s**2 + t**2
        resid = x - (1 - t) * self.m
        return t / var * resid - (self.m + (1 - t) * self.s**2 / var * resid)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_flow_denoiser_of_the_exact_velocity_is_the_exact_gaussian_denoiser(prediction):
    """FlowDenoiser at integer t (betas, time_scale, prediction) against testing.py's denoiser
    of the same data, derived on the variance-preserving path instead."""
    from jax_diffusion import Schedule, cosine_betas
    from jax_diffusion.models import FlowDenoiser
    from jax_diffusion.testing import gaussian_denoiser

    betas = cosine_betas(50)
    model = FlowDenoiser(_GaussianVelocity(), tuple(betas.tolist()), prediction, 50.0)
    x = 1.5 * jax.random.normal(jax.random.key(0), (4, 2, 2, 1))
    t = jnp.array([0, 7, 30, 49], jnp.int32)
    params = model.init(jax.random.key(1), x, t)
    want = gaussian_denoiser(Schedule.from_betas(betas), 0.2, 0.6, prediction)(x, t)
    np.testing.assert_allclose(model.apply(params, x, t), want, rtol=2e-5, atol=2e-5)
    # the velocity method is the network at tau = time_scale * t
    tf = jnp.array([0.1, 0.4, 0.6, 0.9])
    np.testing.assert_allclose(
        model.apply(params, x, tf, method="velocity"),
        _GaussianVelocity().apply({"params": {"unused": 0.0}}, x, 50.0 * tf),
        rtol=1e-6,
    )
