"""Tests of jax_diffusion.guidance: classifier-free and classifier guidance, dynamic thresholding.

References: the guidance formula evaluated branch by branch (Ho & Salimans 2022, eq. 6),
float64 NumPy quantiles (Saharia et al. 2022, section 2.3), and for classifier guidance
(Dhariwal & Nichol 2021, Algorithm 2) Gaussian data with Gaussian likelihoods, whose tilted
marginals and posteriors are closed forms, and a float64 NumPy transcription of Algorithm 2.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_diffusion
from jax_diffusion import guidance, samplers
from jax_diffusion.guidance import (
    classifier_free_guidance,
    classifier_grad,
    classifier_guidance,
    dynamic_threshold,
)
from jax_diffusion.samplers import ddim_sample, ddpm_step, sampling_timesteps
from jax_diffusion.schedules import Schedule, linear_betas, rescale_zero_terminal_snr
from jax_diffusion.testing import gaussian_denoiser

T = 1000
SCHEDULE = Schedule.from_betas(linear_betas(T), jnp.float32)
RTOL, ATOL = 1e-5, 1e-6


def _normal(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def test_reexported_from_samplers_and_the_package():
    for name in guidance.__all__:
        assert getattr(samplers, name) is getattr(guidance, name)
        assert getattr(jax_diffusion, name) is getattr(guidance, name)
        assert name in samplers.__all__


# --------------------------------------------------------------------------------------------
# Dynamic thresholding.


@pytest.mark.parametrize("quantile", [0.5, 0.9, 0.995, 1.0])
def test_dynamic_threshold_is_a_per_sample_quantile(quantile):
    x = np.stack(
        [
            np.linspace(-3.0, 3.0, 48).reshape(4, 3, 4),  # s > 1 for p > ~1/3
            np.linspace(-0.9, 0.7, 48).reshape(4, 3, 4),  # s = max(q, 1) = 1: unchanged
            np.asarray(_normal(12, (4, 3, 4)), np.float64) * 4.0,
        ]
    )
    s = np.maximum(np.quantile(np.abs(x).reshape(3, -1), quantile, axis=1), 1.0)
    expected = np.clip(x, -s[:, None, None, None], s[:, None, None, None]) / s[:, None, None, None]
    out = jax.jit(dynamic_threshold)(jnp.asarray(x, jnp.float32), quantile)
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(out[1], x[1], rtol=RTOL, atol=ATOL)
    # Per sample: scaling another sample changes nothing here.
    other = dynamic_threshold(jnp.asarray(x, jnp.float32).at[2].multiply(100.0), quantile)
    np.testing.assert_allclose(other[:2], out[:2], rtol=RTOL, atol=ATOL)


def test_dynamic_threshold_caps_s_at_max_value():
    # s = min(max(quantile(|x|), 1), max_value) per sample (diffusers' sample_max_value)
    x = np.stack(
        [
            np.linspace(-3.0, 3.0, 48).reshape(4, 3, 4),  # s = 3 uncapped: capped at 1.5
            np.linspace(-1.2, 1.2, 48).reshape(4, 3, 4),  # s ~ 1.2 < 1.5: as without a cap
            np.linspace(-0.5, 0.5, 48).reshape(4, 3, 4),  # s = 1: unchanged
        ]
    )
    for max_value, traced in ((1.5, False), (1.5, True), (1.0, False)):
        s = np.maximum(np.quantile(np.abs(x).reshape(3, -1), 1.0, axis=1), 1.0)
        s = np.minimum(s, max_value)[:, None, None, None]
        expected = np.clip(x, -s, s) / s
        fn = jax.jit(dynamic_threshold) if traced else dynamic_threshold
        out = fn(jnp.asarray(x, jnp.float32), 1.0, max_value)
        np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)
    # 1: static clipping to [-1, 1]
    static = dynamic_threshold(jnp.asarray(x, jnp.float32), 0.9, max_value=1.0)
    np.testing.assert_allclose(static, np.clip(x, -1, 1), rtol=RTOL, atol=ATOL)
    for bad in (0.5, "2", jnp.ones(2)):
        with pytest.raises(ValueError, match=r"max_value must be None or a scalar >= 1; got"):
            dynamic_threshold(jnp.ones((2, 3)), 0.9, max_value=bad)


@pytest.mark.parametrize("quantile", [99.5, 0.0, -0.1, 1.5])
def test_dynamic_threshold_rejects_a_percent(quantile):
    with pytest.raises(ValueError, match=r"quantile must lie in \(0, 1\].*not a percent"):
        dynamic_threshold(jnp.ones((2, 3)), quantile)


# --------------------------------------------------------------------------------------------
# Classifier-free guidance.


NUM_CLASSES, DIM = 5, 3
EMBED = np.asarray(_normal(15, (NUM_CLASSES + 1, DIM)))  # row NUM_CLASSES is the null label


def _conditional_model(calls):
    def model(x, t, y):
        calls.append(x.shape)
        scale = 1.0 + t.astype(x.dtype)[:, None] / T
        return 0.1 * scale * x + jnp.asarray(EMBED)[y]

    return model


@pytest.mark.parametrize("w", [0.0, 1.0, 3.0])
def test_cfg_combines_conditional_and_null_in_one_batched_call(w):
    calls = []
    model = _conditional_model(calls)
    x, t, y = _normal(16, (4, DIM)), jnp.array([0, 10, 500, 999]), jnp.array([0, 1, 4, 2])
    guided = classifier_free_guidance(model, w, NUM_CLASSES, y=y)
    out = jax.jit(guided)(x, t)
    assert calls == [(8, DIM)]  # one call, conditional + null branches stacked on the batch
    cond = model(x, t, y)
    uncond = model(x, t, jnp.full_like(y, NUM_CLASSES))
    np.testing.assert_allclose(out, uncond + w * (cond - uncond), rtol=RTOL, atol=ATOL)
    if w == 0.0:
        np.testing.assert_allclose(out, uncond, rtol=RTOL, atol=ATOL)
    if w == 1.0:
        np.testing.assert_allclose(out, cond, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("large", ["null", "conditional"])
@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
def test_cfg_scales_0_and_1_give_the_null_and_conditional_outputs_exactly(variance, large):
    # one branch 1e4 times larger than the other: uncond + 1 * (cond - uncond) rounds cond to
    # the float32 spacing of 1e4 (~1e-3) when the null branch is the large one, and
    # cond + (0 - 1) * (cond - uncond) rounds uncond so when the conditional one is; the
    # docstring promises the branches
    big = np.array(_normal(19, (NUM_CLASSES + 1, 2 * DIM)))
    if large == "null":
        big[NUM_CLASSES] *= 1e4
    else:
        big[:NUM_CLASSES] *= 1e4

    def model(x, t, y):
        out = jnp.tile(x, 2) + jnp.asarray(big)[y]
        return out if variance == "learned_range" else out[:, :DIM]

    x, t, y = _normal(20, (4, DIM)), jnp.array([0, 10, 500, 999]), jnp.array([0, 1, 4, 2])
    cond, uncond = model(x, t, y), model(x, t, jnp.full_like(y, NUM_CLASSES))
    pred = slice(0, DIM)  # with learned_range the variance half is always the conditional one
    for w, want in ((0.0, uncond), (1.0, cond)):
        out = jax.jit(classifier_free_guidance(model, w, NUM_CLASSES, y=y, variance=variance))
        np.testing.assert_array_equal(out(x, t)[:, pred], want[:, pred])
    per_example = jnp.array([1.0, 0.0, 1.0, 2.0])
    out = classifier_free_guidance(model, per_example, NUM_CLASSES, y=y, variance=variance)(x, t)
    np.testing.assert_array_equal(out[0, pred], cond[0, pred])
    np.testing.assert_array_equal(out[1, pred], uncond[1, pred])
    np.testing.assert_allclose(
        out[3, pred], 2.0 * cond[3, pred] - uncond[3, pred], rtol=RTOL, atol=2e-3
    )

    def total(w):  # d/dw of the guided output is cond - uncond at every w, 0 and 1 included
        return classifier_free_guidance(model, w, NUM_CLASSES, y=y, variance=variance)(x, t)[
            :, pred
        ].sum()

    for w in (0.0, 1.0, 3.0):
        np.testing.assert_allclose(jax.grad(total)(w), (cond - uncond)[:, pred].sum(), rtol=RTOL)


def test_cfg_learned_range_guides_only_the_prediction_and_per_example_scale():
    def model(x, t, y):
        pred = 0.1 * x + jnp.asarray(EMBED)[y]
        return jnp.concatenate([pred, jnp.tanh(pred)], axis=-1)

    x, t, y = _normal(17, (3, DIM)), jnp.int32(7), jnp.array([0, 3, 1])
    w = jnp.array([0.0, 1.0, 2.5])
    out = classifier_free_guidance(model, w, NUM_CLASSES, y=y, variance="learned_range")(x, t)
    tb = jnp.full((3,), 7)
    cond, uncond = model(x, tb, y), model(x, tb, jnp.full_like(y, NUM_CLASSES))
    guided = uncond[:, :DIM] + w[:, None] * (cond[:, :DIM] - uncond[:, :DIM])
    np.testing.assert_allclose(out[:, :DIM], guided, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(out[:, DIM:], cond[:, DIM:], rtol=RTOL, atol=ATOL)


def test_cfg_scale_one_sampler_equals_conditional_sampler():
    calls = []
    model = _conditional_model(calls)
    x_T, y = _normal(18, (4, DIM)), jnp.array([3, 0, 1, 4])
    guided = ddim_sample(classifier_free_guidance(model, 1.0, NUM_CLASSES, y=y), SCHEDULE, x_T)
    assert calls == [(8, DIM)]  # traced once inside the scan, one batched call per step
    plain = ddim_sample(lambda x, t: model(x, t, y), SCHEDULE, x_T)
    np.testing.assert_allclose(guided, plain, rtol=RTOL, atol=ATOL)


def test_cfg_pytree_labels_with_one_scalar_null_label():
    # y may be a pytree: a scalar null_label stands for every leaf (here a class index and a
    # float embedding); reference: the two branches called separately, eq. 6.
    def model(x, t, y):
        return 0.1 * x + jnp.asarray(EMBED)[y["cls"]] + y["emb"]

    x, t = _normal(19, (3, DIM)), jnp.array([1, 2, 3])
    y = {"cls": jnp.array([0, 2, 4]), "emb": _normal(20, (3, DIM))}
    null = {"cls": jnp.full((3,), NUM_CLASSES), "emb": jnp.full((3, DIM), float(NUM_CLASSES))}
    out = classifier_free_guidance(model, 2.0, NUM_CLASSES, y=y)(x, t)
    cond, uncond = model(x, t, y), model(x, t, null)
    np.testing.assert_allclose(out, uncond + 2.0 * (cond - uncond), rtol=RTOL, atol=ATOL)


def test_cfg_pytree_null_label_per_leaf():
    # A null_label with y's tree structure gives each leaf its own null (a class index for the
    # labels, a zero vector for the embeddings); reference: the branches called separately.
    def model(x, t, y):
        return 0.1 * x + jnp.asarray(EMBED)[y["cls"]] + y["emb"]

    x, t = _normal(21, (3, DIM)), jnp.array([1, 2, 3])
    y = {"cls": jnp.array([0, 2, 4]), "emb": _normal(22, (3, DIM))}
    null_label = {"cls": NUM_CLASSES, "emb": jnp.zeros(DIM)}
    out = classifier_free_guidance(model, 3.0, null_label, y=y)(x, t)
    null = {"cls": jnp.full((3,), NUM_CLASSES), "emb": jnp.zeros((3, DIM))}
    cond, uncond = model(x, t, y), model(x, t, null)
    np.testing.assert_allclose(out, uncond + 3.0 * (cond - uncond), rtol=RTOL, atol=ATOL)


def test_cfg_bfloat16_output_is_combined_in_float32():
    # The combination uncond + w (cond - uncond) is formed in float32 and rounded once to the
    # model's dtype: with uncond = -100, cond = 100, w = 0.5013 it is 0.26 (float64), while a
    # bfloat16 w (0.5) or bfloat16 arithmetic gives 0.
    def model(x, t, y):
        return jnp.where(y[:, None] == NUM_CLASSES, -100.0, 100.0).astype(x.dtype) * jnp.ones_like(
            x
        )

    x = jnp.zeros((2, DIM), jnp.bfloat16)
    out = classifier_free_guidance(model, 0.5013, NUM_CLASSES, y=jnp.array([0, 1]))(x, 3)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), -100.0 + 200.0 * 0.5013, atol=2e-3)


def test_dynamic_threshold_keeps_bfloat16():
    # bfloat16 in, bfloat16 out; values against the float64 NumPy reference at bfloat16 precision.
    x = np.linspace(-3.0, 3.0, 24).reshape(2, 12)
    out = dynamic_threshold(jnp.asarray(x, jnp.bfloat16), 0.9)
    assert out.dtype == jnp.bfloat16
    xb = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
    s = np.maximum(np.quantile(np.abs(xb), 0.9, axis=1), 1.0)[:, None]
    np.testing.assert_allclose(np.asarray(out, np.float64), np.clip(xb, -s, s) / s, rtol=1e-2)


def test_cfg_null_label_takes_the_dtype_of_y():
    # [y; null] is one array in y's dtype: a float32 null embedding joins bfloat16 embeddings
    # as bfloat16, so the model sees the labels' dtype.
    seen = []

    def model(x, t, y):
        seen.append(y.dtype)
        return x

    y = jnp.ones((2, DIM), jnp.bfloat16)
    guided = classifier_free_guidance(model, 2.0, jnp.zeros(DIM, jnp.float32), y=y)
    guided(jnp.zeros((2, DIM)), 0)
    assert seen == [jnp.bfloat16]


# --------------------------------------------------------------------------------------------
# Bad input.

X = jnp.zeros((2, 3))


def _id(x, t):
    return x


def _cfg_id(x, t, y):
    return x


def _rescaled_cfg_np(cond, uncond, w, phi):
    """Lin et al. 2024, Algorithm 2, in float64 NumPy: cfg = neg + w (pos - neg), scaled by
    phi std(pos) / std(cfg) + (1 - phi), stds per example over the other axes."""
    cond, uncond = np.asarray(cond, np.float64), np.asarray(uncond, np.float64)
    cfg = uncond + w * (cond - uncond)
    axes = tuple(range(1, cfg.ndim))
    factor = cond.std(axis=axes, keepdims=True) / cfg.std(axis=axes, keepdims=True)
    return cfg * (phi * factor + 1 - phi)


@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
def test_cfg_rescale_matches_algorithm_2_and_restores_the_conditional_std(variance):
    calls = []
    base = _conditional_model(calls)

    def model(x, t, y):  # learned_range: a variance half after the prediction
        out = base(x, t, y)
        return jnp.concatenate([out, 0.5 * out], -1) if variance == "learned_range" else out

    x, t, y = _normal(17, (4, DIM)), jnp.array([0, 10, 500, 999]), jnp.array([0, 1, 4, 2])
    cond = base(x, t, y)
    uncond = base(x, t, jnp.full_like(y, NUM_CLASSES))
    for w, phi in [(3.0, 0.7), (7.5, 1.0), (0.0, 0.5)]:
        guided = classifier_free_guidance(
            model, w, NUM_CLASSES, y=y, variance=variance, guidance_rescale=phi
        )
        out = jax.jit(guided)(x, t)
        pred = out[..., :DIM]
        np.testing.assert_allclose(pred, _rescaled_cfg_np(cond, uncond, w, phi), rtol=1e-5)
        if variance == "learned_range":  # the conditional branch's variance half, untouched
            np.testing.assert_array_equal(out[..., DIM:], 0.5 * cond)
        if phi == 1.0:  # the guided output has the conditional branch's spread, per example
            np.testing.assert_allclose(pred.std(axis=1), cond.std(axis=1), rtol=1e-5)
    # phi = 0 is plain guidance, bit for bit; w = 1 is the conditional branch for any phi
    plain = classifier_free_guidance(model, 3.0, NUM_CLASSES, y=y, variance=variance)(x, t)
    zero = classifier_free_guidance(
        model, 3.0, NUM_CLASSES, y=y, variance=variance, guidance_rescale=0.0
    )(x, t)
    np.testing.assert_array_equal(zero, plain)
    one = classifier_free_guidance(
        model, 1.0, NUM_CLASSES, y=y, variance=variance, guidance_rescale=0.7
    )(x, t)
    np.testing.assert_allclose(one[..., :DIM], cond, rtol=1e-6)


def test_cfg_rescale_leaves_a_constant_output_and_has_finite_gradients():
    def model(x, t, y):  # the same constant for every label: std 0 in both branches
        return jnp.zeros_like(x) + 0.25

    x, y = _normal(18, (2, DIM)), jnp.array([0, 1])
    guided = classifier_free_guidance(model, 4.0, NUM_CLASSES, y=y, guidance_rescale=0.7)
    np.testing.assert_array_equal(guided(x, 3), jnp.full((2, DIM), 0.25))
    grad = jax.grad(lambda x: jnp.sum(guided(x, 3)))(x)
    assert np.all(np.isfinite(np.asarray(grad)))
    # and a gradient through the rescale of a model that depends on x: against a difference
    model = _conditional_model([])
    w_grad = jax.grad(
        lambda w: jnp.sum(
            classifier_free_guidance(model, w, NUM_CLASSES, y=y, guidance_rescale=0.7)(x, 3) ** 2
        )
    )
    f = lambda w: float(  # noqa: E731
        jnp.sum(
            classifier_free_guidance(model, w, NUM_CLASSES, y=y, guidance_rescale=0.7)(x, 3) ** 2
        )
    )
    h = 1e-2
    np.testing.assert_allclose(w_grad(2.0), (f(2.0 + h) - f(2.0 - h)) / (2 * h), rtol=1e-3)


BAD_INPUTS = {
    "cfg_label_batch": (
        lambda: classifier_free_guidance(lambda x, t, y: x, 2.0, 9, y=jnp.zeros(3, int))(X, 0),
        r"y must have batch size 2",
    ),
    "cfg_model_batch": (
        lambda: classifier_free_guidance(lambda x, t, y: x[:2], 2.0, 9, y=jnp.zeros(2, int))(X, 0),
        r"model_fn must return a batch of 4",
    ),
    "cfg_scale_rank": (
        lambda: classifier_free_guidance(lambda x, t, y: x, jnp.ones((2, 2)), 9, y=jnp.zeros(2)),
        r"guidance_scale must be a scalar or \[B\]; got shape \(2, 2\)",
    ),
    "cfg_variance": (
        lambda: classifier_free_guidance(lambda x, t, y: x, 2.0, 9, y=jnp.zeros(2), variance="x"),
        r"variance.*'x'",
    ),
    "cfg_scale_batch": (
        lambda: classifier_free_guidance(lambda x, t, y: x, jnp.ones(3), 9, y=jnp.zeros(2))(X, 0),
        r"guidance_scale must be a scalar or \[B\] = \[2\]; got shape \(3,\)",
    ),
    "cfg_labels_as_a_list": (
        lambda: classifier_free_guidance(lambda x, t, y: x, 2.0, 9, y=[1, 2]),
        r"a Python list is a pytree of scalars: pass jnp.asarray\(labels\)",
    ),
    "cfg_null_label_shape": (
        lambda: classifier_free_guidance(lambda x, t, y: x, 2.0, jnp.zeros(3), y=jnp.zeros((2, 4))),
        r"null_label must broadcast to each leaf of y; got shape \(3,\) for a leaf of shape",
    ),
    "threshold_rank": (lambda: dynamic_threshold(jnp.float32(2.0)), r"x0 must be a floating"),
    "cfg_labels_none": (
        lambda: classifier_free_guidance(lambda x, t, y: x, 2.0, 9, y=None),
        r"y must be an array \[B, \.\.\.\] or a pytree of them; got None",
    ),
    "cfg_null_label_tree": (  # a pytree null_label must have y's structure
        lambda: classifier_free_guidance(lambda x, t, y: x, 2.0, {"a": 9}, y=jnp.zeros(2)),
        r"null_label must be one label \(broadcast to each leaf of y\) or a pytree with y's "
        r"structure PyTreeDef\(\*\); got PyTreeDef\(\{'a': \*\}\)",
    ),
    "threshold_int": (
        lambda: dynamic_threshold(jnp.ones((2, 3), jnp.int32)),
        r"x0 must be a floating array \[B, \.\.\.\] with a leading batch axis; got shape "
        r"\(2, 3\) and dtype int32",
    ),
    "threshold_quantile_rank": (
        lambda: dynamic_threshold(X, jnp.array([0.9, 0.99])),
        r"quantile must be a scalar",
    ),
    "threshold_quantile_str": (
        lambda: dynamic_threshold(X, "0.99"),
        r"quantile must be a scalar in \(0, 1\]; got '0.99'",
    ),
    # these failed only when the guided model was called, with errors not naming the scale
    "cfg_scale_none": (
        lambda: classifier_free_guidance(lambda x, t, y: x, None, 9, y=jnp.zeros(2)),
        r"guidance_scale must be a scalar or \[B\]; got None",
    ),
    "cfg_scale_str": (
        lambda: classifier_free_guidance(lambda x, t, y: x, "3", 9, y=jnp.zeros(2)),
        r"guidance_scale must be a scalar or \[B\]; got '3'",
    ),
    "cfg_learned_range_odd_channels": (  # was jnp.split's "does not result in an equal division"
        lambda: classifier_free_guidance(
            lambda x, t, y: x, 2.0, 0, y=jnp.ones(2), variance="learned_range"
        )(X, 0),
        r"model_fn must return \[prediction, variance values\] .*got shape \(4, 3\)",
    ),
    "cfg_rescale_above_1": (
        lambda: classifier_free_guidance(_cfg_id, 2.0, 9, y=jnp.zeros(2), guidance_rescale=1.5),
        r"guidance_rescale must be in \[0, 1\]; got 1.5",
    ),
    "cfg_rescale_nan": (
        lambda: classifier_free_guidance(_cfg_id, 2.0, 9, y=jnp.zeros(2), guidance_rescale=np.nan),
        r"guidance_rescale must be a finite number; got nan",
    ),
    "cfg_rescale_array": (
        lambda: classifier_free_guidance(
            _cfg_id, 2.0, 9, y=jnp.zeros(2), guidance_rescale=jnp.array(0.7)
        ),
        r"guidance_rescale must be a finite number; got Array",
    ),
    "cfg_scale_nan": (  # a grid of NaN samples
        lambda: classifier_free_guidance(lambda x, t, y: x, [1.0, np.nan], 9, y=jnp.zeros(2)),
        r"guidance_scale must be finite",
    ),
    "cg_prediction": (
        lambda: classifier_guidance(_id, _id, SCHEDULE, 1.0, prediction="noise"),
        r"prediction must be one of 'eps', 'x0', 'v'; got 'noise'",
    ),
    "cg_variance": (
        lambda: classifier_guidance(_id, _id, SCHEDULE, 1.0, variance="learned"),
        r"variance must be one of .*got 'learned'",
    ),
    "cg_schedule_as_betas": (
        lambda: classifier_guidance(_id, _id, linear_betas(T), 1.0),
        r"schedule must be a jax_diffusion Schedule .*got ndarray",
    ),
    "cg_scale_negative": (
        lambda: classifier_guidance(_id, _id, SCHEDULE, -1.0),
        r"guidance_scale must be finite and >= 0; got array\(-1\.",
    ),
    "cg_scale_negative_per_example": (
        lambda: classifier_guidance(_id, _id, SCHEDULE, [1.0, -0.5]),
        r"guidance_scale must be finite and >= 0; got array\(\[ 1\. , -0\.5\]",
    ),
    "cg_scale_nan": (
        lambda: classifier_guidance(_id, _id, SCHEDULE, np.nan),
        r"guidance_scale must be finite and >= 0; got array\(nan\)",
    ),
    "cg_scale_inf": (
        lambda: classifier_guidance(_id, _id, SCHEDULE, jnp.inf),
        r"guidance_scale must be finite and >= 0; got .*inf",
    ),
    "cg_scale_str": (
        lambda: classifier_guidance(_id, _id, SCHEDULE, "1"),
        r"guidance_scale must be a scalar or \[B\], >= 0; got '1'",
    ),
    "cg_scale_rank": (
        lambda: classifier_guidance(_id, _id, SCHEDULE, jnp.ones((2, 2))),
        r"guidance_scale must be a scalar or \[B\], >= 0; got shape \(2, 2\)",
    ),
    "cg_scale_batch": (
        lambda: classifier_guidance(_id, _id, SCHEDULE, jnp.ones(3))(X, 0),
        r"guidance_scale must be a scalar or \[B\] = \[2\]; got shape \(3,\)",
    ),
    "cg_model_fn": (
        lambda: classifier_guidance(None, _id, SCHEDULE, 1.0),
        r"model_fn must be a callable model_fn\(x, t\); got None",
    ),
    "cg_grad_fn": (
        lambda: classifier_guidance(_id, "clf", SCHEDULE, 1.0),
        r"grad_log_prob_fn must be a callable .*got 'clf'",
    ),
    "cg_grad_shape": (  # a log-probability [B] passed where its gradient is expected
        lambda: classifier_guidance(_id, lambda x, t: x.sum(-1), SCHEDULE, 1.0)(X, 0),
        r"grad_log_prob_fn\(x, t\) must return x's shape \(2, 3\), .*got \(2,\)",
    ),
    "cg_model_shape": (
        lambda: classifier_guidance(_id, _id, SCHEDULE, 1.0, variance="learned_range")(X, 0),
        r"model_fn\(x, t\) must return shape \(2, 6\) .*got \(2, 3\)",
    ),
    "cg_t_range": (
        lambda: classifier_guidance(_id, _id, SCHEDULE, 1.0)(X, jnp.array([0, T])),
        r"t must lie in \[0, 999\]; got values in \[0, 1000\]",
    ),
    "cg_t_float": (
        lambda: classifier_guidance(_id, _id, SCHEDULE, 1.0)(X, 0.5),
        r"t must be an integer array; got dtype float",
    ),
    "cg_learned_range_without_channels": (
        lambda: classifier_guidance(_id, _id, SCHEDULE, 1.0, variance="learned_range")(
            jnp.zeros(2), 0
        ),
        r"variance='learned_range' needs x with a channel axis, \[B, \.\.\., C\]",
    ),
    "classifier_grad_fn": (
        lambda: classifier_grad(3),
        r"log_prob_fn must be a callable log_prob_fn\(x, t\) -> \[B\]; got 3",
    ),
    "classifier_grad_logits": (  # logits [B, K] where log p(y | x) [B] is expected
        lambda: classifier_grad(lambda x, t: x)(X, 0),
        r"log_prob_fn\(x, t\) must return \[B\] = \[2\], .*got shape \[2, 3\]",
    ),
}


def test_guidance_scale_as_a_list_and_thresholding_an_empty_batch():
    def model(x, t, y):
        return x * (1.0 + y[:, None])

    x = jnp.arange(1.0, 7.0).reshape(2, 3)
    per_example = classifier_free_guidance(model, [0.5, 2.0], 0, y=jnp.array([1.0, 3.0]))(x, 0)
    # uncond + w (cond - uncond) with uncond = x, cond = x (1 + y): x (1 + w y)
    np.testing.assert_allclose(per_example, x * np.array([[1.5], [7.0]]), rtol=1e-6)
    empty = jnp.zeros((0, 4, 4, 1))
    assert dynamic_threshold(empty).shape == (0, 4, 4, 1)  # was a ZeroDivisionError


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_the_argument(case):
    fn, pattern = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=pattern):
        fn()


# --------------------------------------------------------------------------------------------
# Classifier guidance (Dhariwal & Nichol 2021, section 4.2, Algorithm 2).
#
# Data x0 ~ N(MU, diag(S0^2)) in 2-D has the exact denoiser `gaussian_denoiser`. The "classifiers"
# are linear-Gaussian likelihoods log p(y | x_t) = log N(y; a_t x_t + b_t, c_t), per dimension:
#   'xt': y observes x_t itself, a = 1, b = 0, c = TAU^2 (time-independent);
#   'x0': y = x0 + N(0, R^2) observed, so p(y | x_t) = N(y; E[x0 | x_t], Var(x0 | x_t) + R^2),
#         the exact noisy classifier: with s = 1 the tilted marginal is p_t(x_t | y), the
#         diffusion of the posterior p(x0 | y) = N(M_POST, V_POST).
# The tilted density p_t(x) p(y | x)^s is a product of Gaussians in x: precision
# P = 1 / V_t + s a^2 / c, mean (alpha MU / V_t + s a (y - b) / c) / P, V_t = alpha^2 S0^2 +
# sigma^2. The references below are these formulas in float64 NumPy.

MU, S0 = np.array([0.5, -0.3]), np.array([0.6, 0.3])
Y_OBS, R, TAU = np.array([1.2, 0.4]), np.array([0.4, 0.5]), 0.7
V_POST = 1.0 / (1.0 / S0**2 + 1.0 / R**2)
M_POST = V_POST * (MU / S0**2 + Y_OBS / R**2)
ABAR64 = np.cumprod(1.0 - linear_betas(T))  # float64, independent of SCHEDULE's float32 tables
CG_T = np.array([0, 10, 100, 500, 900, 999])


def _likelihood_np(kind, t):
    """(a, b, c) of log p(y | x_t) = log N(y; a x_t + b, c), float64 [len(t), 2] each."""
    alpha, sigma2 = np.sqrt(ABAR64[t])[:, None], 1.0 - ABAR64[t][:, None]
    if kind == "xt":
        ones = np.ones((len(t), 2))
        return ones, 0.0 * ones, TAU**2 * ones
    var_t = alpha**2 * S0**2 + sigma2
    a = alpha * S0**2 / var_t
    return a, MU - a * alpha * MU, S0**2 * sigma2 / var_t + R**2


def _log_prob_jax(kind):
    """The same likelihood in JAX: `log_prob_fn(x [B, 2], t [B]) -> [B]`, from SCHEDULE."""

    def log_prob(x, t):
        alpha = SCHEDULE.sqrt_alphas_cumprod[t][:, None]
        sigma2 = 1.0 - SCHEDULE.alphas_cumprod[t][:, None]
        if kind == "xt":
            a, b, c = 1.0, 0.0, TAU**2
        else:
            var_t = alpha**2 * S0**2 + sigma2
            a = alpha * S0**2 / var_t
            b, c = MU - a * alpha * MU, S0**2 * sigma2 / var_t + R**2
        resid = jnp.asarray(Y_OBS, x.dtype) - a * x - b
        return jnp.sum(-0.5 * resid**2 / c - 0.5 * jnp.log(2 * np.pi * c), axis=-1)

    return log_prob


def _tilted_np(kind, x, t, s):
    """float64 (eps, x0, v) of the tilted marginal p_t(x) p(y | x)^s: eps = -sigma score,
    x0 = (x + sigma^2 score) / alpha (Tweedie), v = alpha eps - sigma x0; and its precision P."""
    x = np.asarray(x, np.float64)
    alpha, sigma = np.sqrt(ABAR64[t])[:, None], np.sqrt(1.0 - ABAR64[t])[:, None]
    var_t = alpha**2 * S0**2 + sigma**2
    a, b, c = _likelihood_np(kind, t)
    precision = 1.0 / var_t + s * a**2 / c
    mean = (alpha * MU / var_t + s * a * (Y_OBS - b) / c) / precision
    score = -precision * (x - mean)
    eps = -sigma * score
    x0 = (x + sigma**2 * score) / alpha
    return {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}, precision


def _guided_gaussian(kind, s, prediction):
    model = gaussian_denoiser(SCHEDULE, MU, S0, prediction)
    grad_fn = classifier_grad(_log_prob_jax(kind))
    return classifier_guidance(model, grad_fn, SCHEDULE, s, prediction=prediction)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("s", [1.0, 2.0])
@pytest.mark.parametrize("kind", ["xt", "x0"])
def test_cg_gaussian_gives_the_tilted_marginal_in_closed_form(kind, s, prediction):
    # the guided exact denoiser is the exact denoiser of p_t(x) p(y | x)^s, at every t
    x = np.asarray(_normal(30, (len(CG_T), 2)), np.float64) * 1.5
    out = jax.jit(_guided_gaussian(kind, s, prediction))(jnp.asarray(x, jnp.float32), CG_T)
    want = _tilted_np(kind, x, CG_T, s)[0][prediction]
    # float32 rounding of the output; x0 = ... / alpha amplifies it by up to 1 / alpha_999 ~ 160
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_cg_exact_classifier_at_scale_one_is_the_posterior_denoiser():
    # Bayes: with the exact noisy classifier p(y | x_t) and s = 1 the guided denoiser is that of
    # the posterior p(x0 | y) = N(M_POST, V_POST), for each parameterization (closed form, not the
    # product of Gaussians above: the posterior data's own marginal N(alpha M, alpha^2 V + sigma^2))
    x = np.asarray(_normal(31, (len(CG_T), 2)), np.float64)
    alpha, sigma = np.sqrt(ABAR64[CG_T])[:, None], np.sqrt(1.0 - ABAR64[CG_T])[:, None]
    score = -(x - alpha * M_POST) / (alpha**2 * V_POST + sigma**2)
    eps = -sigma * score
    x0 = (x + sigma**2 * score) / alpha
    want = {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}
    for prediction in ("eps", "x0", "v"):
        out = _guided_gaussian("x0", 1.0, prediction)(jnp.asarray(x, jnp.float32), CG_T)
        np.testing.assert_allclose(
            out, want[prediction], rtol=1e-5, atol=1e-5 * np.abs(want[prediction]).max()
        )


NONLINEAR_W = np.asarray(_normal(32, (4, 4)))


def _nonlinear_model(prediction):
    def model(x, t):  # any differentiable function of x and t
        h = jnp.tanh(x @ jnp.asarray(NONLINEAR_W, x.dtype))
        return h * (1.0 + jnp.asarray(t, x.dtype)[..., None, None, None] / T) + 0.1

    return model


def _nonlinear_grad(x, t):
    return jnp.sin(3.0 * x) * (2.0 - jnp.asarray(t, x.dtype)[..., None, None, None] / T)


def _algorithm_2_np(out, x, g, t, s, prediction):
    """Dhariwal & Nichol 2021, Algorithm 2 in float64: model output -> eps_hat,
    eps_hat - s sqrt(1 - abar) grad, -> the model's parameterization."""
    out, x, g = (np.asarray(a, np.float64) for a in (out, x, g))
    shape = (-1,) + (1,) * (x.ndim - 1)
    abar = np.broadcast_to(ABAR64[np.asarray(t)], x.shape[:1]).reshape(shape)
    alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
    s = np.broadcast_to(np.asarray(s, np.float64), x.shape[:1]).reshape(shape)
    if prediction == "eps":
        eps = out
    elif prediction == "x0":
        eps = (x - alpha * out) / sigma
    else:
        eps = sigma * x + alpha * out
    eps = eps - s * sigma * g
    x0 = (x - sigma * eps) / alpha
    return {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[prediction]


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_cg_matches_a_numpy_transcription_of_algorithm_2(prediction):
    model = _nonlinear_model(prediction)
    x = _normal(33, (4, 3, 3, 4))
    t = jnp.array([0, 7, 500, 999], jnp.int32)
    for scale in (0.5, 3.0, jnp.array([0.0, 1.0, 2.0, 10.0])):
        guided = jax.jit(
            classifier_guidance(model, _nonlinear_grad, SCHEDULE, scale, prediction=prediction)
        )
        for tt in (t, jnp.int32(250)):  # [B] as the samplers pass it, and one scalar step
            want = _algorithm_2_np(model(x, tt), x, _nonlinear_grad(x, tt), tt, scale, prediction)
            np.testing.assert_allclose(
                guided(x, tt), want, rtol=1e-5, atol=1e-5 * np.abs(want).max()
            )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_cg_scale_zero_returns_the_model_output_exactly(prediction, variance, dtype):
    def model(x, t):
        # exact in floating point (x * 0.5 is exact; one rounding of the sum, fused or not), so
        # that the jitted and the eager model agree bit for bit
        out = x * 0.5 + 0.25
        return jnp.concatenate([out, -0.25 * x], -1) if variance == "learned_range" else out

    x, t = _normal(34, (3, 2, 2, 4), dtype), jnp.array([0, 400, 999])
    guided = classifier_guidance(
        model, _nonlinear_grad, SCHEDULE, 0.0, prediction=prediction, variance=variance
    )
    for fn in (guided, jax.jit(guided)):
        out = fn(x, t)
        assert out.dtype == dtype
        np.testing.assert_array_equal(out, model(x, t))


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_cg_learned_range_guides_the_prediction_half_only(prediction):
    def model(x, t):
        pred = _nonlinear_model(prediction)(x, t)
        # variance values exact in floating point: jitted or not, the same bits
        return jnp.concatenate([pred, -0.25 * x], -1)

    x, t = _normal(35, (4, 3, 3, 4)), jnp.array([3, 30, 300, 900])
    guided = classifier_guidance(
        model, _nonlinear_grad, SCHEDULE, 2.5, prediction=prediction, variance="learned_range"
    )
    out = jax.jit(guided)(x, t)
    assert out.shape == (4, 3, 3, 8)
    np.testing.assert_array_equal(out[..., 4:], model(x, t)[..., 4:])
    want = _algorithm_2_np(model(x, t)[..., :4], x, _nonlinear_grad(x, t), t, 2.5, prediction)
    np.testing.assert_allclose(out[..., :4], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_cg_under_vmap_and_grad():
    # vmap over a leading axis (e.g. seeds) equals a loop; d/dx of the guided eps is sigma P per
    # element for the Gaussian case (second derivatives through classifier_grad); d/ds is
    # -sigma grad log p (Algorithm 2 is linear in s).
    guided = _guided_gaussian("x0", 2.0, "eps")
    x = _normal(36, (3, len(CG_T), 2))
    t = jnp.tile(jnp.asarray(CG_T), (3, 1))
    batched = jax.jit(jax.vmap(guided))(x, t)
    for i in range(3):
        np.testing.assert_allclose(batched[i], guided(x[i], t[i]), rtol=RTOL, atol=ATOL)

    x1 = x[0]
    _, precision = _tilted_np("x0", x1, CG_T, 2.0)
    sigma = np.sqrt(1.0 - ABAR64[CG_T])[:, None]
    dx = jax.jit(jax.grad(lambda x: guided(x, CG_T).sum()))(x1)
    np.testing.assert_allclose(dx, sigma * precision, rtol=1e-5)

    def total(s):
        model = gaussian_denoiser(SCHEDULE, MU, S0, "eps")
        grad_fn = classifier_grad(_log_prob_jax("x0"))
        return classifier_guidance(model, grad_fn, SCHEDULE, s)(x1, CG_T).sum()

    a, b, c = _likelihood_np("x0", CG_T)
    grad_log_p = a * (Y_OBS - a * np.asarray(x1, np.float64) - b) / c
    np.testing.assert_allclose(
        jax.jit(jax.grad(total))(1.5), np.sum(-sigma * grad_log_p), rtol=1e-5
    )


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_cg_bfloat16_stays_bfloat16(prediction):
    # a bfloat16 model output with a float32 gradient: combined in float32, rounded once to
    # bfloat16; values against the float64 reference at bfloat16 precision
    model = gaussian_denoiser(SCHEDULE, MU, S0, prediction)
    grad_fn = classifier_grad(lambda x, t: _log_prob_jax("xt")(x.astype(jnp.float32), t))
    guided = classifier_guidance(model, grad_fn, SCHEDULE, 1.0, prediction=prediction)
    t = np.array([10, 100, 500])
    x = jnp.asarray(_normal(37, (3, 2)), jnp.bfloat16)
    out = jax.jit(guided)(x, t)
    assert out.dtype == jnp.bfloat16
    want = _tilted_np("xt", np.asarray(x, np.float64), t, 1.0)[0][prediction]
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=2e-2, atol=2e-2)
    assert guided(x.astype(jnp.float32), t).dtype == jnp.float32


def test_cg_zero_terminal_snr_leaves_x0_and_v_unguided_where_alpha_is_0():
    # at alphas_cumprod = 0, x_t says nothing about x0 (the true gradient is 0) and no x0 or v
    # expresses a shifted eps: the output is returned as is, finite, with a finite gradient
    sched = Schedule.from_betas(rescale_zero_terminal_snr(linear_betas(T)), jnp.float32)
    x, t = _normal(38, (2, 4)), jnp.array([T - 1, 500])
    for prediction in ("x0", "v"):
        model = _nonlinear_model(prediction)

        def model2(x, t, model=model):
            return model(x[:, None, None, :], t)[:, 0, 0, :]

        def grad2(x, t):
            return _nonlinear_grad(x[:, None, None, :], t)[:, 0, 0, :]

        guided = classifier_guidance(model2, grad2, sched, 3.0, prediction=prediction)
        out = guided(x, t)
        np.testing.assert_array_equal(out[0], model2(x, t)[0])
        assert not np.allclose(out[1], model2(x, t)[1])
        dx = jax.grad(lambda x, guided=guided: guided(x, t).sum())(x)
        assert np.isfinite(np.asarray(dx)).all()


def test_cg_ddpm_step_shift_is_algorithm_1_to_first_order():
    # Algorithm 2 moves the DDPM mean by s beta_t / sqrt(1 - beta_t) grad (Ho et al. 2020,
    # eq. 11); Algorithm 1 moves it by s Sigma grad, Sigma = beta_t for 'fixed_large': the two
    # differ by the factor 1 / sqrt(1 - beta_t) = 1 + O(beta_t).
    model = gaussian_denoiser(SCHEDULE, MU, S0, "eps")
    grad_fn = classifier_grad(_log_prob_jax("xt"))
    guided = classifier_guidance(model, grad_fn, SCHEDULE, 2.0)
    x, t, rng = _normal(39, (len(CG_T), 2)), jnp.asarray(CG_T), jax.random.key(0)
    kw = dict(variance="fixed_large")
    shift = ddpm_step(guided, SCHEDULE, x, t, rng, **kw).x_prev
    shift = np.asarray(shift, np.float64) - np.asarray(
        ddpm_step(model, SCHEDULE, x, t, rng, **kw).x_prev
    )
    betas = linear_betas(T)[CG_T][:, None]
    g = (Y_OBS - np.asarray(x, np.float64)) / TAU**2
    np.testing.assert_allclose(shift, 2.0 * betas / np.sqrt(1.0 - betas) * g, rtol=1e-3, atol=1e-6)
    algorithm_1 = 2.0 * betas * g
    np.testing.assert_allclose(shift, algorithm_1, rtol=0.011)  # beta_T / 2 = 0.01


def _posterior_denoiser(prediction):
    return gaussian_denoiser(SCHEDULE, M_POST, np.sqrt(V_POST), prediction)


@pytest.mark.parametrize(
    "sampler, prediction",
    [("ddpm", "eps"), ("ddim", "x0"), ("dpm++", "v"), ("ddim", "v")],
)
def test_cg_every_sampler_with_the_exact_classifier_samples_the_posterior_chain(
    sampler, prediction
):
    # s = 1 with the exact p(y | x_t): the guided model is the posterior's exact denoiser, so
    # any sampler (respaced DDPM included: the transform sees the original steps) takes the
    # same path as with that denoiser, sample by sample
    guided = _guided_gaussian("x0", 1.0, prediction)
    x_T, rng = _normal(40, (64, 2)), jax.random.key(1)
    run = {
        "ddpm": lambda f: samplers.ddpm_sample(
            f, SCHEDULE, x_T, rng, prediction=prediction, timesteps=sampling_timesteps(T, 25)
        ),
        "ddim": lambda f: ddim_sample(f, SCHEDULE, x_T, num_steps=25, prediction=prediction),
        "dpm++": lambda f: samplers.dpm_solver_pp_sample(
            f, SCHEDULE, x_T, num_steps=15, prediction=prediction
        ),
    }[sampler]
    np.testing.assert_allclose(
        run(guided), run(_posterior_denoiser(prediction)), rtol=1e-4, atol=1e-4
    )


def test_cg_ddim_samples_the_tilted_gaussian_posterior():
    # DDIM (eta = 0, all 1000 steps) with the exact prior denoiser and the exact noisy
    # classifier at s = 1, from x_T drawn from the tilted marginal at t = T - 1, lands on
    # p(x0 | y) = N(M_POST, V_POST) in closed form, up to DDIM's discretisation: on Gaussian
    # data with the exact denoiser a step maps the standardized z = (x_t - alpha_t M) /
    # sqrt(alpha_t^2 V + sigma_t^2) to cos(theta) z, theta the angle between (alpha_t sqrt(V),
    # sigma_t) and (alpha_prev sqrt(V), sigma_prev), so x0 = M + shrink sqrt(V) z_T with
    # shrink = prod cos(theta) (here 1 - 4e-3 and 1 - 6e-3: the variance is ~1% low).
    n = 20_000
    alpha_T, sigma_T = np.sqrt(ABAR64[-1]), np.sqrt(1.0 - ABAR64[-1])
    z_T = np.asarray(_normal(41, (n, 2)), np.float64)
    x_T = alpha_T * M_POST + np.sqrt(alpha_T**2 * V_POST + sigma_T**2) * z_T
    guided = _guided_gaussian("x0", 1.0, "eps")
    x0 = ddim_sample(guided, SCHEDULE, jnp.asarray(x_T, jnp.float32), num_steps=T)
    x0 = np.asarray(x0, np.float64)

    abar = np.append(ABAR64[::-1], 1.0)[:, None]  # the steps visited, then the clean end
    a, s = np.sqrt(abar * V_POST), np.sqrt(1.0 - abar)
    cos = (a[1:] * a[:-1] + s[1:] * s[:-1]) / np.hypot(a[1:], s[1:]) / np.hypot(a[:-1], s[:-1])
    shrink = np.prod(cos, axis=0)
    assert np.all(np.abs(1.0 - shrink) < 1e-2)
    # sample by sample against that exact map (float32 over 1000 steps)
    np.testing.assert_allclose(x0, M_POST + shrink * np.sqrt(V_POST) * z_T, rtol=0, atol=5e-5)
    # moments against the closed-form posterior: 4 sigma of the Monte-Carlo error of n samples
    # (z_T's own sample moments), plus the discretisation bias of the variance
    mean_tol = 4.0 * np.sqrt(V_POST / n)
    np.testing.assert_array_less(np.abs(x0.mean(0) - M_POST), mean_tol)
    var_tol = 4.0 * V_POST * np.sqrt(2.0 / (n - 1)) + np.abs(1.0 - shrink**2) * V_POST
    np.testing.assert_array_less(np.abs(x0.var(0, ddof=1) - V_POST), var_tol)
    # the unguided prior is far from it: the test has power
    prior = ddim_sample(
        gaussian_denoiser(SCHEDULE, MU, S0), SCHEDULE, jnp.asarray(x_T, jnp.float32)
    )
    assert np.all(np.abs(np.asarray(prior, np.float64).mean(0) - M_POST) > 10 * mean_tol)


def test_classifier_grad_is_the_per_example_gradient():
    # the gradient of log softmax(logits)[y] with linear logits W x: W^T (onehot(y) - softmax)
    w = np.asarray(_normal(42, (5, 3)), np.float64)
    y = np.array([0, 4, 2, 1])
    x = np.asarray(_normal(43, (4, 3)), np.float64)

    def log_prob(x, t):
        logits = x @ jnp.asarray(w, x.dtype).T
        return jax.nn.log_softmax(logits)[jnp.arange(x.shape[0]), y]

    got = jax.jit(classifier_grad(log_prob))(jnp.asarray(x, jnp.float32), jnp.zeros(4, int))
    logits = x @ w.T
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    softmax /= softmax.sum(1, keepdims=True)
    want = (np.eye(5)[y] - softmax) @ w
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
