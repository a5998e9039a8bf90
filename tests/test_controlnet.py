"""Tests of models.controlnet: the ControlNet and the UNet's residual inputs.

References: the paper's claims checked as invariants (zero convolutions make the controlled
model the UNet itself at initialisation; the copy starts as the UNet's weights; only the
ControlNet trains), and the UNet's own intermediate values, read with `flax.linen.
intercept_methods`, for where each residual lands (diffusers' ControlNet adds them to the skip
connections and the middle block's output, not along the encoder path).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_UNET

from jax_diffusion.models import (
    AttentionBlock,
    ControlNet,
    Downsample,
    ResBlock,
    UNet,
    controlled_model_fn,
    controlnet_params_from_unet,
)

pytestmark = pytest.mark.xdist_group("controlnet")

TINY = TINY_UNET
B, H, C = 2, 8, 1
NUM_SKIPS = 1 + 2 * 1 + 1  # conv_in, one ResBlock per level, one Downsample


@pytest.fixture(scope="module")
def nets():
    unet = UNet(**TINY)
    control = ControlNet.from_unet(unet, hint_channels=(4,))
    assert control == ControlNet(**TINY, hint_channels=(4,))
    x = jax.random.normal(jax.random.key(0), (B, H, H, C))
    t = jnp.array([3, 70], jnp.int32)
    cond = jax.random.uniform(jax.random.key(1), (B, H, H, 2), minval=-1, maxval=1)
    unet_params = jax.jit(unet.init)(jax.random.key(2), x, t)["params"]
    # a UNet that is not at its own init: conv_out is zero-initialised, so perturb every leaf
    leaves, tree = jax.tree.flatten(unet_params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    unet_params = jax.tree.unflatten(
        tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    )
    control_params = jax.jit(control.init)(jax.random.key(4), x, t, cond)["params"]
    return unet, unet_params, control, control_params, x, t, cond


def test_a_new_controlnet_leaves_the_unet_unchanged(nets):
    unet, unet_params, control, control_params, x, t, cond = nets
    base = unet.apply({"params": unet_params}, x, t)
    assert float(jnp.abs(base).max()) > 0.01
    skips, mid = control.apply({"params": control_params}, x, t, cond)
    assert len(skips) == NUM_SKIPS
    assert all(float(jnp.abs(s).max()) == 0.0 for s in [*skips, mid])
    for params in (control_params, controlnet_params_from_unet(control_params, unet_params)):
        fn = controlled_model_fn(unet, unet_params, control, params, cond, scale=2.0)
        np.testing.assert_array_equal(fn(x, t), base)


def test_params_from_unet_copy_the_shared_weights_and_keep_the_new_ones(nets):
    unet, unet_params, control, control_params, *_ = nets
    copied = controlnet_params_from_unet(control_params, unet_params)
    own = {n for n in control_params if n.startswith(("hint_", "zero_conv_", "mid_zero_conv"))}
    assert own == {"hint_0", "hint_1", "mid_zero_conv"} | {f"zero_conv_{i}" for i in range(4)}
    shared = set(control_params) - own
    # the copy: embedding, conv_in, every encoder block and the middle block; no decoder
    assert shared == {n for n in unet_params if not n.startswith(("up_", "norm_out", "conv_out"))}
    for name in shared:
        for a, b in zip(
            jax.tree.leaves(copied[name]), jax.tree.leaves(unet_params[name]), strict=True
        ):
            np.testing.assert_array_equal(a, b)
    for name in own:
        for a, b in zip(
            jax.tree.leaves(copied[name]), jax.tree.leaves(control_params[name]), strict=True
        ):
            np.testing.assert_array_equal(a, b)
    # the copy's encoder then computes the UNet's skips (its hint adds 0 at init)
    x, t, cond = nets[4:]
    ident = jax.tree.map(lambda a: a, copied)
    for i in range(NUM_SKIPS):  # identity 1x1 convs instead of zero ones: the raw features
        c = ident[f"zero_conv_{i}"]["kernel"].shape[-1]
        ident[f"zero_conv_{i}"] = {"kernel": jnp.eye(c)[None, None], "bias": jnp.zeros(c)}
    skips, _ = control.apply({"params": ident}, x, t, cond)
    got = _intercept(unet, unet_params, x, t)
    np.testing.assert_allclose(skips[0], got["conv_in"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(skips[1], got["down_0_res_0"], rtol=1e-6, atol=1e-6)
    # a trained hint adds its features to conv_in's output, and they flow down the encoder
    last = ident["hint_1"]
    ident["hint_1"] = {"kernel": jnp.full_like(last["kernel"], 0.1), "bias": last["bias"]}
    hinted, _ = control.apply({"params": ident}, x, t, cond)
    hidden = jax.nn.silu(
        jax.lax.conv_general_dilated(
            cond,
            ident["hint_0"]["kernel"],
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        + ident["hint_0"]["bias"]
    )
    features = 0.1 * jnp.sum(
        jax.lax.conv_general_dilated(
            hidden,
            jnp.ones((3, 3, 4, 1)),
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        ),
        axis=-1,
        keepdims=True,
    )
    np.testing.assert_allclose(hinted[0], got["conv_in"] + features, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(hinted[1] - skips[1]).max()) > 1e-3


def test_from_unet_copies_every_field():
    unet = UNet(**TINY, num_classes=3, remat=True, dtype=jnp.bfloat16, dropout=0.1)
    control = ControlNet.from_unet(unet, hint_channels=(2, 2))
    assert control.hint_channels == (2, 2)
    for name in (*TINY, "num_classes", "remat", "dtype", "dropout"):
        assert getattr(control, name) == getattr(unet, name)
    with pytest.raises(ValueError, match="unet must be a UNet"):
        ControlNet.from_unet(control)


def test_params_from_unet_refuses_another_architecture(nets):
    _, _, _, control_params, x, t, _ = nets
    other = UNet(**{**TINY, "base_channels": 12, "num_groups": 4})
    other_params = jax.eval_shape(other.init, jax.random.key(0), x, t)["params"]  # shapes only
    with pytest.raises(ValueError, match="build the ControlNet with the UNet's fields"):
        controlnet_params_from_unet(control_params, other_params)
    with pytest.raises(ValueError, match="has no 'label_embed'"):
        cond_net = ControlNet(**TINY, num_classes=3)
        p = jax.eval_shape(cond_net.init, jax.random.key(0), x, t, x, jnp.zeros(B, jnp.int32))
        controlnet_params_from_unet(p["params"], nets[1])


def _intercept(unet, params, x, t, **kw):
    """Outputs of conv_in, the Downsamples, the attention blocks and the encoder / middle
    ResBlocks; inputs of the decoder's ResBlocks."""
    seen = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        name = context.module.name
        if context.method_name == "__call__":
            if name == "conv_in" or isinstance(context.module, Downsample | AttentionBlock):
                seen[name] = out
            elif isinstance(context.module, ResBlock):
                seen[name] = args[0] if name.startswith("up_") else out
        return out

    with nn.intercept_methods(record):
        unet.apply({"params": params}, x, t, **kw)
    return seen


def test_residuals_land_on_the_skips_and_the_middle_output(nets):
    unet, unet_params, _, _, x, t, _ = nets
    plain = _intercept(unet, unet_params, x, t)
    shapes = [(B, 8, 8, 8), (B, 8, 8, 8), (B, 4, 4, 8), (B, 4, 4, 16)]
    keys = jax.random.split(jax.random.key(5), 5)
    skips = [jax.random.normal(k, s) for k, s in zip(keys[:4], shapes, strict=True)]
    mid = jax.random.normal(keys[4], (B, 4, 4, 16))
    seen = _intercept(unet, unet_params, x, t, skip_residuals=skips, mid_residual=mid)
    # the encoder is untouched: residuals go to the copies the decoder concatenates
    for name in ("conv_in", "down_0_res_0", "down_0_downsample", "down_1_attn_0", "mid_res_1"):
        np.testing.assert_array_equal(seen[name], plain[name])
    # decoder inputs: concat(h, skip + residual), the skips popped last-first
    tol = dict(rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(seen["up_1_res_0"][..., :16], plain["mid_res_1"] + mid, **tol)
    np.testing.assert_allclose(
        seen["up_1_res_0"][..., 16:], plain["down_1_attn_0"] + skips[3], **tol
    )
    np.testing.assert_allclose(
        seen["up_1_res_1"][..., -8:], plain["down_0_downsample"] + skips[2], **tol
    )
    np.testing.assert_allclose(
        seen["up_0_res_0"][..., -8:], plain["down_0_res_0"] + skips[1], **tol
    )
    np.testing.assert_allclose(seen["up_0_res_1"][..., -8:], plain["conv_in"] + skips[0], **tol)
    zero = [jnp.zeros(s) for s in shapes]
    np.testing.assert_array_equal(
        unet.apply({"params": unet_params}, x, t, skip_residuals=zero, mid_residual=zero[-1]),
        unet.apply({"params": unet_params}, x, t),
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(skip_residuals=[jnp.zeros((B, 8, 8, 8))] * 3), "one array per encoder output"),
        (dict(skip_residuals=[jnp.zeros((B, 8, 8, 8))] * 4), r"skip_residuals\[2\]"),
        (dict(mid_residual=jnp.zeros((B, 8, 8, 16))), "mid_residual"),
    ],
)
def test_residuals_of_the_wrong_count_or_shape_are_refused(nets, kwargs, match):
    unet, unet_params, _, _, x, t, _ = nets
    with pytest.raises(ValueError, match=match):
        unet.apply({"params": unet_params}, x, t, **kwargs)


def test_cond_of_another_size_is_refused(nets):
    _, _, control, control_params, x, t, _ = nets
    with pytest.raises(ValueError, match="cond must be"):
        control.apply({"params": control_params}, x, t, jnp.zeros((B, 4, 4, 2)))


def test_only_the_controlnet_trains_and_it_changes_the_output(nets):
    unet, unet_params, control, control_params, x, t, cond = nets
    params = controlnet_params_from_unet(control_params, unet_params)
    target = jnp.zeros_like(x)

    def loss(unet_params, params):
        fn = controlled_model_fn(unet, unet_params, control, params, cond)
        return jnp.mean((fn(x, t) - target) ** 2)

    g_unet, g_control = jax.jit(jax.grad(loss, argnums=(0, 1)))(unet_params, params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_unet))
    # zero convs get gradients at once (their inputs are not zero); the hint's first layers
    # only after the zero convs have moved (the paper's section 3.1 argument)
    assert float(jnp.abs(g_control["mid_zero_conv"]["kernel"]).max()) > 0
    assert all(float(jnp.abs(g_control[f"zero_conv_{i}"]["kernel"]).max()) > 0 for i in range(4))
    stepped = jax.tree.map(lambda p, g: p - 1.0 * g, params, g_control)
    loss = jax.jit(loss)
    assert float(loss(unet_params, stepped)) < float(loss(unet_params, params))
    fn = controlled_model_fn(unet, unet_params, control, stepped, cond, scale=0.0)
    np.testing.assert_array_equal(fn(x, t), unet.apply({"params": unet_params}, x, t))
