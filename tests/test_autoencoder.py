"""Tests of latent diffusion's autoencoder: models.AutoencoderKL, DiagonalGaussian,
latent_scale_factor and losses.autoencoder_loss.

References: a float64 NumPy transcription of the network from its layout (Rombach et al. 2022's
KL-f autoencoder, written from the module docstring with test_models' NumPy blocks), the
Gaussian KL and the loss written from their formulas in float64, the moments of many draws.
The network is tiny (8 base channels, two levels, 8x8 inputs) and its shapes are shared.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_models import (
    _all_eqns,
    _normal_params,
    _np_attention,
    _np_conv,
    _np_group_norm,
    _np_res_block,
    _np_silu,
)

from jax_diffusion import autoencoder_loss
from jax_diffusion.models import AutoencoderKL, DiagonalGaussian, latent_scale_factor

TINY = dict(
    latent_channels=2, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, num_groups=4
)
AE = AutoencoderKL(channels=3, **TINY)
X = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3), minval=-1, maxval=1)


@pytest.fixture(scope="module")
def params():
    """Random values everywhere (the ResBlocks' last convs are zero at init, which would hide
    them), small enough that logvar stays inside the clamp."""
    shapes = jax.eval_shape(AE.init, jax.random.key(1), X)["params"]
    return _normal_params(shapes, 2, 0.3)


def _np_autoencoder(x, z, params, model):
    """Float64 NumPy KL-f autoencoder (the module docstring's layout): returns (mean, logvar) of
    q(z | x), the decoding of z, and the set of parameter names read."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    used = set()

    def get(part, name):
        used.add((part, name))
        return p[part][name] if part else p[name]

    groups, last = model.num_groups, len(model.channel_mults) - 1

    def middle(h, part):
        h = _np_res_block(h, None, get(part, "mid_res_0"), groups, False)
        h = _np_attention(h, get(part, "mid_attn"), 1, groups)
        return _np_res_block(h, None, get(part, "mid_res_1"), groups, False)

    def out(h, part):
        norm = get(part, "norm_out")
        h = _np_silu(_np_group_norm(h, norm["scale"], norm["bias"], groups))
        return _np_conv(h, **get(part, "conv_out"))

    h = _np_conv(np.asarray(x, np.float64), **get("encoder", "conv_in"))
    for level in range(last + 1):
        for i in range(model.num_res_blocks):
            h = _np_res_block(h, None, get("encoder", f"down_{level}_res_{i}"), groups, False)
        if level != last:  # stride 2, padded after only: rows 2i .. 2i + 2 (test_models)
            h = _np_conv(h, **get("encoder", f"down_{level}_downsample")["conv"])[:, 1::2, 1::2]
    h = out(middle(h, "encoder"), "encoder")
    moments = _np_conv(h, **get(None, "quant_conv"))
    mean, logvar = np.split(moments, 2, axis=-1)

    h = _np_conv(np.asarray(z, np.float64), **get(None, "post_quant_conv"))
    h = middle(_np_conv(h, **get("decoder", "conv_in")), "decoder")
    for level in reversed(range(last + 1)):
        for i in range(model.num_res_blocks + 1):
            h = _np_res_block(h, None, get("decoder", f"up_{level}_res_{i}"), groups, False)
        if level != 0:
            up = np.repeat(np.repeat(h, 2, axis=1), 2, axis=2)
            h = _np_conv(up, **get("decoder", f"up_{level}_upsample")["conv"])
    return mean, logvar, out(h, "decoder"), used


def test_encoder_and_decoder_match_a_float64_numpy_transcription(params):
    z = jax.random.normal(jax.random.key(3), (2, 4, 4, 2))
    posterior = jax.jit(lambda p, x: AE.apply({"params": p}, x, method="encode"))(params, X)
    x_rec = jax.jit(lambda p, z: AE.apply({"params": p}, z, method="decode"))(params, z)
    mean, logvar, want_rec, used = _np_autoencoder(X, z, params, AE)
    assert isinstance(posterior, DiagonalGaussian)
    assert posterior.mean.shape == posterior.logvar.shape == (2, 4, 4, 2)
    assert x_rec.shape == X.shape and x_rec.dtype == jnp.float32
    assert np.abs(logvar).max() < 20  # inside the clamp, so the clamp is not under test here
    np.testing.assert_allclose(np.asarray(posterior.mean), mean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(posterior.logvar), logvar, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(x_rec), want_rec, rtol=1e-4, atol=1e-4)
    # every parameter was read by the transcription: nothing in the network is left out of it
    top = {(part, name) for part in ("encoder", "decoder") for name in params[part]}
    assert used == top | {(None, "quant_conv"), (None, "post_quant_conv")}
    assert set(params) == {"encoder", "decoder", "quant_conv", "post_quant_conv"}


def test_call_decodes_a_draw_with_rng_and_the_mean_without(params):
    rng = jax.random.key(4)
    v = {"params": params}
    posterior = AE.apply(v, X, method="encode")
    x_mean, post = AE.apply(v, X)
    x_draw, _ = AE.apply(v, X, rng)
    np.testing.assert_array_equal(post.mean, posterior.mean)
    np.testing.assert_allclose(x_mean, AE.apply(v, posterior.mean, method="decode"), atol=1e-6)
    z = posterior.mean + jnp.exp(0.5 * posterior.logvar) * jax.random.normal(rng, (2, 4, 4, 2))
    np.testing.assert_allclose(z, posterior.sample(rng), atol=1e-6)
    np.testing.assert_allclose(x_draw, AE.apply(v, z, method="decode"), atol=1e-5)
    assert not np.allclose(x_draw, x_mean, atol=1e-3)


def test_logvar_is_clamped_to_the_papers_range(params):
    """A large bias of quant_conv's logvar half pushes every logvar out of [-30, 20]."""
    for bias, want in ((1e3, 20.0), (-1e3, -30.0)):
        p = jax.tree.map(lambda a: a, params)
        p["quant_conv"] = dict(p["quant_conv"], bias=p["quant_conv"]["bias"].at[2:].set(bias))
        posterior = AE.apply({"params": p}, X, method="encode")
        np.testing.assert_array_equal(posterior.logvar, want)


def test_downsampling_factor_non_square_inputs_and_bfloat16_compute(params):
    ae = AutoencoderKL(
        channels=1,
        latent_channels=3,
        base_channels=8,
        channel_mults=(1, 1, 2),
        num_res_blocks=0,
        num_groups=4,
    )
    assert ae.downsampling_factor == 4 and AE.downsampling_factor == 2
    x = jnp.zeros((1, 8, 12, 1))
    shapes = jax.eval_shape(ae.init, jax.random.key(0), x)
    out, posterior = jax.eval_shape(ae.apply, shapes, x)
    assert posterior.mean.shape == (1, 2, 3, 3) and out.shape == (1, 8, 12, 1)
    bf = AutoencoderKL(channels=3, dtype=jnp.bfloat16, **TINY)
    got, post = jax.jit(bf.apply)({"params": params}, X)
    want, post32 = jax.jit(AE.apply)({"params": params}, X)
    assert got.dtype == post.mean.dtype == jnp.float32
    assert 0 < np.abs(got - want).max() < 0.1 * np.abs(want).max()


def test_remat_gives_the_same_loss_and_gradients_and_param_dtype_sets_the_params(params):
    remat = AutoencoderKL(channels=3, remat=True, **TINY)

    def loss(model, p):
        x_rec, posterior = model.apply({"params": p}, X, jax.random.key(5))
        return autoencoder_loss(X, x_rec, *posterior)[0]

    # one checkpointed call per ResBlock and attention: encoder 2 + 3 (middle), decoder 3 + 4
    jaxpr = jax.make_jaxpr(lambda p: remat.apply({"params": p}, X))(params).jaxpr
    names = [eqn.primitive.name for eqn in _all_eqns(jaxpr)]
    assert sum("remat" in n or "checkpoint" in n for n in names) == 2 + 3 + 3 + 4
    want, want_grads = jax.jit(jax.value_and_grad(lambda p: loss(AE, p)))(params)
    got, grads = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(params)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, want_grads
    )
    bf16 = AutoencoderKL(channels=3, param_dtype=jnp.bfloat16, **TINY)
    shapes = jax.eval_shape(bf16.init, jax.random.key(0), X)["params"]
    assert {a.dtype for a in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.bfloat16)}
    assert jax.eval_shape(bf16.apply, {"params": shapes}, X)[0].dtype == jnp.float32


def test_diagonal_gaussian_draws_and_kl_follow_their_formulas():
    mean = jnp.array([[0.5, -2.0, 0.0]])
    logvar = jnp.array([[0.0, np.log(0.25), np.log(4.0)]])
    g = DiagonalGaussian(mean, logvar)
    draws = jax.vmap(g.sample)(jax.random.split(jax.random.key(0), 200_000))[:, 0]
    se = np.sqrt(np.exp(logvar[0]) / 200_000)
    assert np.all(np.abs(draws.mean(0) - mean[0]) < 5 * se)
    np.testing.assert_allclose(draws.var(0), np.exp(logvar[0]), rtol=0.02)
    m, lv = np.asarray(mean, np.float64), np.asarray(logvar, np.float64)
    want = 0.5 * np.sum(m**2 + np.exp(lv) - 1 - lv, axis=1)  # KL(N(m, e^lv) || N(0, 1))
    np.testing.assert_allclose(jax.jit(DiagonalGaussian.kl)(g), want, rtol=1e-6)
    np.testing.assert_array_equal(g.mode(), mean)
    assert float(DiagonalGaussian(jnp.zeros((2, 3)), jnp.zeros((2, 3))).kl()[1]) == 0.0
    grads = jax.grad(lambda m: jnp.sum(DiagonalGaussian(m, logvar).sample(jax.random.key(1))))(mean)
    np.testing.assert_array_equal(grads, 1.0)  # reparameterised


@pytest.mark.parametrize("loss_type", ["l1", "l2"])
def test_autoencoder_loss_matches_the_formula_in_float64(loss_type):
    r = np.random.default_rng(0)
    x, x_rec = r.normal(size=(3, 4, 4, 2)), r.normal(size=(3, 4, 4, 2))
    mean, logvar = r.normal(size=(3, 2, 2, 4)), r.normal(size=(3, 2, 2, 4))
    err = np.abs(x - x_rec) if loss_type == "l1" else (x - x_rec) ** 2
    rec = err.reshape(3, -1).sum(1)
    kl = 0.5 * (mean**2 + np.exp(logvar) - 1 - logvar).reshape(3, -1).sum(1)
    f32 = [jnp.asarray(a, jnp.float32) for a in (x, x_rec, mean, logvar)]
    loss, m = jax.jit(autoencoder_loss, static_argnames="loss_type")(
        *f32, kl_weight=0.01, loss_type=loss_type
    )
    np.testing.assert_allclose(loss, np.mean(rec + 0.01 * kl), rtol=1e-5)
    np.testing.assert_allclose(m["reconstruction"], rec, rtol=1e-5)
    np.testing.assert_allclose(m["kl"], kl, rtol=1e-5)
    assert float(m["loss"]) == float(loss)
    # a posterior unpacks into the loss's arguments
    posterior = DiagonalGaussian(f32[2], f32[3])
    assert float(autoencoder_loss(f32[0], f32[1], *posterior, loss_type=loss_type)[0]) == (
        pytest.approx(np.mean(rec + 1e-6 * kl), rel=1e-5)
    )


def test_a_few_adam_steps_on_digits_cut_the_loss():
    """Training works end to end: 40 Adam steps on 16 digit images at least halve the loss."""
    from jax_diffusion.data import load_digits

    images = jnp.asarray(load_digits()[0][:16])
    ae = AutoencoderKL(channels=1, **TINY)
    params = jax.jit(ae.init)(jax.random.key(0), images)["params"]
    opt = optax.adam(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state, rng):
        def loss_fn(p):
            x_rec, posterior = ae.apply({"params": p}, images, rng)
            return autoencoder_loss(images, x_rec, *posterior)[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for i in range(40):
        params, state, loss = step(params, state, jax.random.key(i))
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0], losses[::10]


def test_latent_scale_factor_gives_unit_std():
    z = 3.0 * jax.random.normal(jax.random.key(0), (4, 2, 2, 4)) + 1.0
    scale = latent_scale_factor(z)
    np.testing.assert_allclose(jnp.std(z * scale), 1.0, rtol=1e-5)
    np.testing.assert_allclose(scale, 1 / np.std(np.asarray(z, np.float64)), rtol=1e-5)
    with pytest.raises(ValueError, match="at least 2 entries"):
        latent_scale_factor(jnp.ones((1, 1)))


@pytest.mark.parametrize(
    "kwargs, shape, match",
    [
        (dict(channels=0), (1, 8, 8, 3), "channels must be an int >= 1; got 0"),
        (dict(channels=3, base_channels=6), (1, 8, 8, 3), "num_groups=4 must divide"),
        (dict(channels=3, channel_mults=()), (1, 8, 8, 3), "channel_mults must be a non-empty"),
        (dict(channels=3, num_res_blocks=-1), (1, 8, 8, 3), "num_res_blocks must be an int >= 0"),
        (dict(channels=3, dtype=jnp.int32), (1, 8, 8, 3), "dtype"),
        (dict(channels=3, param_dtype=jnp.int8), (1, 8, 8, 3), "param_dtype"),
        (dict(channels=3, remat=1), (1, 8, 8, 3), "remat must be True or False; got 1"),
        (dict(channels=3), (1, 8, 8, 1), r"x must be \[B, H, W, 3\] \(data\); got shape"),
        (dict(channels=3), (1, 8, 7, 3), "multiples of the downsampling factor 2"),
    ],
)
def test_autoencoder_value_errors(kwargs, shape, match):
    ae = AutoencoderKL(**{**TINY, **kwargs})
    with pytest.raises(ValueError, match=match):
        ae.init(jax.random.key(0), jnp.zeros(shape))


def test_decode_and_loss_value_errors(params):
    with pytest.raises(ValueError, match=r"z must be \[B, H, W, 2\] \(latents\)"):
        AE.apply({"params": params}, jnp.zeros((1, 4, 4, 3)), method="decode")
    x, m = jnp.zeros((2, 4, 4, 1)), jnp.zeros((2, 2, 2, 2))
    for kwargs, match in (
        (dict(loss_type="l3"), r"loss_type must be one of \('l2', 'l1'\); got 'l3'"),
        (dict(kl_weight=-1.0), "kl_weight must be a finite real scalar >= 0; got -1.0"),
        (dict(kl_weight=float("nan")), "kl_weight must be a finite real scalar >= 0"),
    ):
        with pytest.raises(ValueError, match=match):
            autoencoder_loss(x, x, m, m, **kwargs)
    with pytest.raises(ValueError, match="x_rec must have the shape of x"):
        autoencoder_loss(x, x[:1], m, m)
    with pytest.raises(ValueError, match="mean and logvar must share one shape"):
        autoencoder_loss(x, x, m, m[:1])
    with pytest.raises(ValueError, match="mean and logvar must share one shape"):
        autoencoder_loss(x[:1], x[:1], m, m)
    with pytest.raises(ValueError, match="x must be a float array"):
        autoencoder_loss(x.astype(jnp.int32), x, m, m)
