"""Tests of jax_diffusion.guidance: classifier-free guidance and dynamic thresholding.

References: the guidance formula evaluated branch by branch (Ho & Salimans 2022, eq. 6) and
float64 NumPy quantiles (Saharia et al. 2022, section 2.3).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_diffusion
from jax_diffusion import guidance, samplers
from jax_diffusion.guidance import classifier_free_guidance, dynamic_threshold
from jax_diffusion.samplers import ddim_sample
from jax_diffusion.schedules import Schedule, linear_betas

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
    "cfg_scale_nan": (  # a grid of NaN samples
        lambda: classifier_free_guidance(lambda x, t, y: x, [1.0, np.nan], 9, y=jnp.zeros(2)),
        r"guidance_scale must be finite",
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
