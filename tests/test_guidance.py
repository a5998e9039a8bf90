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
    "threshold_quantile_rank": (
        lambda: dynamic_threshold(X, jnp.array([0.9, 0.99])),
        r"quantile must be a scalar",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_the_argument(case):
    fn, pattern = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=pattern):
        fn()
