"""Process math against float64 NumPy written from Ho et al. 2020, Nichol & Dhariwal 2021,
Salimans & Ho 2022; round trips as hypothesis properties."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import np_schedule
from hypothesis import given, settings
from hypothesis import strategies as st

import jax_diffusion as jd
from jax_diffusion.testing import gaussian_posterior_moments

T = 1000
SCHEDULES = {
    "linear": lambda: jd.linear_betas(T),
    "cosine": lambda: jd.cosine_betas(T),
    "zero_snr": lambda: jd.rescale_zero_terminal_snr(jd.linear_betas(T)),
}


def data(seed, shape=(4, 3, 5, 2), dtype=np.float64):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(shape).astype(dtype) for _ in range(3))


def bcast(c, x):
    return c.reshape((-1,) + (1,) * (x.ndim - 1))


# float64 references written from the papers (not from the code under test)
def ref_all(betas, x0, eps, t):
    r = np_schedule(betas)
    ab = bcast(r["alphas_cumprod"][t], x0)
    ab_prev = bcast(r["alphas_cumprod_prev"][t], x0)
    beta = bcast(r["betas"][t], x0)
    xt = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps  # Ho eq. 4
    v = np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0  # Salimans & Ho sec. 4
    post_mean = (
        np.sqrt(ab_prev) * beta / (1 - ab) * x0 + np.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab) * xt
    )  # Ho eq. 7
    post_var = (1 - ab_prev) / (1 - ab) * beta
    eps_form_mean = (xt - beta / np.sqrt(1 - ab) * eps) / np.sqrt(1 - beta)  # Ho eq. 11
    return dict(xt=xt, v=v, post_mean=post_mean, post_var=post_var, eps_mean=eps_form_mean, r=r)


T_VALUES = np.array([0, 1, 500, T - 1])


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_forward_posterior_conversions_float64(x64, name):
    betas = SCHEDULES[name]()
    sched = jd.Schedule.from_betas(betas, dtype=jnp.float64)
    x0, eps, _ = data(0)
    t = jnp.asarray(T_VALUES)
    ref = ref_all(betas, x0, eps, T_VALUES)
    tol = dict(rtol=1e-10, atol=1e-10)
    xt = jd.q_sample(sched, x0=x0, t=t, noise=eps)
    assert xt.dtype == jnp.float64
    np.testing.assert_allclose(xt, ref["xt"], **tol)
    mean, var, logvar = jd.q_mean_variance(sched, x0=x0, t=t)
    ab = bcast(ref["r"]["alphas_cumprod"][T_VALUES], x0)
    np.testing.assert_allclose(mean, np.sqrt(ab) * x0, **tol)
    np.testing.assert_allclose(var * np.ones_like(x0), (1 - ab) * np.ones_like(x0), **tol)
    np.testing.assert_allclose(logvar * np.ones_like(x0), np.log(1 - ab) * np.ones_like(x0), **tol)
    pm, pv, plv = jd.q_posterior_mean_variance(sched, x0=x0, xt=ref["xt"], t=t)
    np.testing.assert_allclose(pm, ref["post_mean"], **tol)
    np.testing.assert_allclose(pv * np.ones_like(x0), ref["post_var"] * np.ones_like(x0), **tol)
    assert np.all(np.isfinite(plv))
    np.testing.assert_allclose(jd.x0_from_eps(sched, xt=ref["xt"], t=t, eps=eps), x0, **tol)
    np.testing.assert_allclose(jd.eps_from_x0(sched, xt=ref["xt"], t=t, x0=x0), eps, **tol)
    np.testing.assert_allclose(jd.v_from_x0_eps(sched, x0=x0, eps=eps, t=t), ref["v"], **tol)
    np.testing.assert_allclose(jd.x0_from_v(sched, xt=ref["xt"], t=t, v=ref["v"]), x0, **tol)
    np.testing.assert_allclose(jd.eps_from_v(sched, xt=ref["xt"], t=t, v=ref["v"]), eps, **tol)
    for pred, target in (("eps", eps), ("x0", x0), ("v", ref["v"])):
        got = jd.training_target(sched, x0=x0, eps=eps, t=t, prediction=pred)
        np.testing.assert_allclose(got, target, **tol)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_p_mean_variance_matches_eps_form_of_the_mean(x64, prediction, variance):
    """Ho et al. eq. 11: mu = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t), for any
    parameterization that describes the same (x0, eps)."""
    betas = SCHEDULES["cosine"]()
    sched = jd.Schedule.from_betas(betas, dtype=jnp.float64)
    x0, eps, _ = data(1)
    t = jnp.asarray(T_VALUES)
    ref = ref_all(betas, x0, eps, T_VALUES)
    out = {"eps": eps, "x0": x0, "v": ref["v"]}[prediction]
    p = jd.p_mean_variance(
        sched, model_output=out, xt=ref["xt"], t=t, prediction=prediction, variance=variance
    )
    np.testing.assert_allclose(p.mean, ref["eps_mean"], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(p.x0_hat, x0, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(p.eps_hat, eps, rtol=1e-9, atol=1e-9)
    r = ref["r"]
    if variance == "fixed_small":
        want = r["posterior_variance"][T_VALUES]
        want_log = np.log(np.r_[r["posterior_variance"][1], r["posterior_variance"][1:]])
    else:
        want = np.r_[r["posterior_variance"][1], r["betas"][1:]][T_VALUES]
        want_log = np.log(np.r_[r["posterior_variance"][1], r["betas"][1:]])
    if variance == "fixed_large":
        np.testing.assert_allclose(p.variance.reshape(-1), want, rtol=1e-10)
    else:
        np.testing.assert_allclose(p.variance.reshape(-1), want, rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(p.log_variance.reshape(-1), want_log[T_VALUES], rtol=1e-10)
    assert p.variance.shape == (4, 1, 1, 1)


def test_p_mean_variance_learned_range(x64):
    """Nichol & Dhariwal eq. 15: log var = frac log beta + (1 - frac) log beta_tilde_clipped."""
    betas = SCHEDULES["linear"]()
    sched = jd.Schedule.from_betas(betas, dtype=jnp.float64)
    x0, eps, vv = data(2)
    vv = np.tanh(vv)
    t = jnp.asarray(T_VALUES)
    ref = ref_all(betas, x0, eps, T_VALUES)
    out = np.concatenate([eps, vv], axis=-1)
    p = jd.p_mean_variance(
        sched, model_output=out, xt=ref["xt"], t=t, prediction="eps", variance="learned_range"
    )
    r = ref["r"]
    min_log = bcast(np.log(np.r_[r["posterior_variance"][1], r["posterior_variance"][1:]]), x0)
    max_log = bcast(np.log(r["betas"]), x0)
    frac = (vv + 1) / 2
    want = frac * max_log[T_VALUES] + (1 - frac) * min_log[T_VALUES]
    np.testing.assert_allclose(p.log_variance, want, rtol=1e-10)
    np.testing.assert_allclose(p.variance, np.exp(want), rtol=1e-10)
    np.testing.assert_allclose(p.mean, ref["eps_mean"], rtol=1e-9, atol=1e-9)
    # v = 1 gives beta, v = -1 gives the clipped beta_tilde
    hi = jd.p_mean_variance(
        sched,
        model_output=np.concatenate([eps, np.ones_like(vv)], -1),
        xt=ref["xt"],
        t=t,
        variance="learned_range",
    )
    np.testing.assert_allclose(hi.variance[:, 0, 0, 0], r["betas"][T_VALUES], rtol=1e-10)


def test_clip_denoised_and_denoised_fn_keep_eps_consistent():
    sched = jd.Schedule.from_betas(jd.linear_betas(T))
    x0 = jnp.full((2, 4), 3.0)
    eps = jnp.ones((2, 4))
    t = jnp.array([10, 900])
    xt = jd.q_sample(sched, x0=x0, t=t, noise=eps)
    p = jd.p_mean_variance(sched, model_output=x0, xt=xt, t=t, prediction="x0", clip_denoised=True)
    np.testing.assert_allclose(p.x0_hat, 1.0)
    np.testing.assert_allclose(
        p.eps_hat, jd.eps_from_x0(sched, xt=xt, t=t, x0=jnp.ones_like(x0)), rtol=1e-5
    )
    q = jd.p_mean_variance(
        sched, model_output=x0, xt=xt, t=t, prediction="x0", denoised_fn=lambda x: 0.5 * x
    )
    np.testing.assert_allclose(q.x0_hat, 1.5)
    abar = np_schedule(jd.linear_betas(T))["alphas_cumprod"][np.asarray(t), None]
    xt64 = np.asarray(xt, np.float64)
    np.testing.assert_allclose(
        q.eps_hat, (xt64 - np.sqrt(abar) * 1.5) / np.sqrt(1 - abar), rtol=1e-5
    )
    mean, _, _ = jd.q_posterior_mean_variance(sched, x0=q.x0_hat, xt=xt, t=t)
    np.testing.assert_allclose(q.mean, mean, rtol=1e-6)
    # the lower bound too, values inside [-1, 1] untouched
    inside = jnp.array([[-3.0, -0.5, 0.25, 7.0]] * 2)
    c = jd.p_mean_variance(
        sched, model_output=inside, xt=xt, t=t, prediction="x0", clip_denoised=True
    )
    np.testing.assert_allclose(c.x0_hat, [[-1.0, -0.5, 0.25, 1.0]] * 2)
    # clip first, then denoised_fn (the documented order): 3 -> 1 -> 0.5, not 3 -> 1.5 -> 1
    both = jd.p_mean_variance(
        sched,
        model_output=x0,
        xt=xt,
        t=t,
        prediction="x0",
        clip_denoised=True,
        denoised_fn=lambda x: 0.5 * x,
    )
    np.testing.assert_allclose(both.x0_hat, 0.5)


small = st.floats(-3, 3, allow_nan=False, width=32)


@settings(max_examples=50, deadline=None)
@given(
    name=st.sampled_from(["linear", "cosine", "zero_snr"]),
    t=st.integers(0, T - 1),
    x0=st.lists(small, min_size=3, max_size=3),
    eps=st.lists(small, min_size=3, max_size=3),
)
def test_round_trips(name, t, x0, eps):
    sched = _sched32(name)
    x0 = jnp.asarray([x0], jnp.float32)
    eps = jnp.asarray([eps], jnp.float32)
    tt = jnp.asarray([t])
    xt = jd.q_sample(sched, x0=x0, t=tt, noise=eps)
    v = jd.v_from_x0_eps(sched, x0=x0, eps=eps, t=tt)
    tol = dict(rtol=1e-5, atol=2e-5)
    # x0 / eps -> v -> x0 and eps: defined for every t, zero-terminal SNR included
    np.testing.assert_allclose(jd.x0_from_v(sched, xt=xt, t=tt, v=v), x0, **tol)
    np.testing.assert_allclose(jd.eps_from_v(sched, xt=xt, t=tt, v=v), eps, **tol)
    # eps -> x0 -> eps needs alpha_t well away from 0 for float32 accuracy
    if float(sched.alphas_cumprod[t]) > 1e-3:
        x0_back = jd.x0_from_eps(sched, xt=xt, t=tt, eps=eps)
        np.testing.assert_allclose(
            jd.eps_from_x0(sched, xt=xt, t=tt, x0=x0_back), eps, rtol=1e-4, atol=1e-4
        )
        eps_back = jd.eps_from_x0(sched, xt=xt, t=tt, x0=x0)
        tol_x0 = 1e-5 / float(sched.sqrt_alphas_cumprod[t]) + 1e-4
        np.testing.assert_allclose(x0_back, x0, atol=tol_x0)
        np.testing.assert_allclose(eps_back, eps, atol=1e-3)
    # (x0_hat, eps_hat) of every parameterization agree
    for pred, out in (("eps", eps), ("x0", x0), ("v", v)):
        x0_hat, eps_hat = jd.predict_x0_eps(sched, model_output=out, xt=xt, t=tt, prediction=pred)
        if pred != "eps" or float(sched.alphas_cumprod[t]) > 1e-3:
            np.testing.assert_allclose(x0_hat, x0, rtol=1e-4, atol=2e-3)
        np.testing.assert_allclose(eps_hat, eps, rtol=1e-4, atol=2e-3 if pred == "x0" else 1e-4)


_CACHE = {}


def _sched32(name):
    if name not in _CACHE:
        _CACHE[name] = jd.Schedule.from_betas(SCHEDULES[name]())
    return _CACHE[name]


@pytest.mark.parametrize("name", ["linear", "cosine", "zero_snr"])
def test_finite_values_and_gradients_at_the_ends(name):
    sched = _sched32(name)
    x = jnp.ones((2, 3))
    t = jnp.array([0, T - 1])

    def total(x):
        s = 0.0
        s += jnp.sum(jd.x0_from_v(sched, xt=x, t=t, v=x))
        s += jnp.sum(jd.eps_from_v(sched, xt=x, t=t, v=x))
        s += jnp.sum(jd.v_from_x0_eps(sched, x0=x, eps=x, t=t))
        s += jnp.sum(jd.eps_from_x0(sched, xt=x, t=t, x0=x))
        s += jnp.sum(jd.q_sample(sched, x0=x, t=t, noise=x))
        for pred in ("x0", "v"):
            for var in ("fixed_small", "fixed_large"):
                p = jd.p_mean_variance(
                    sched, model_output=x, xt=x, t=t, prediction=pred, variance=var
                )
                s += jnp.sum(p.mean) + jnp.sum(p.log_variance) + jnp.sum(p.eps_hat)
        return s

    value, grad = jax.value_and_grad(total)(x)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    eps_to_x0 = jd.x0_from_eps(sched, xt=x, t=t, eps=x)
    if name == "zero_snr":  # documented: eps -> x0 is undefined where alphas_cumprod = 0
        assert not np.all(np.isfinite(eps_to_x0[1]))
    else:
        assert np.all(np.isfinite(eps_to_x0))


def test_conversions_divide_last_and_keep_float32_accuracy_at_tiny_alpha_or_sigma():
    """x0 = (x_t - sigma eps) / alpha and eps = (x_t - alpha x0) / sigma, the division last.

    At a cosine schedule's last step alpha = 4.9e-5 and the float32 sigma table is exactly 1,
    so x_t - sigma eps is exact (x_t and eps agree within a factor 2) and only the division
    rounds. Forming x_t / alpha - (sigma / alpha) eps instead rounded each term to ulp(2e4)
    first: x0 was 2.7e-3 off, and float32 DDIM from t = T - 1 with eps prediction 30x less
    accurate than diffusers' FlaxDDIMScheduler, which divides last. Likewise eps from x0
    where sigma is tiny and the float32 alpha table is exactly 1.
    """
    x0, eps, _ = data(3, shape=(4, 64))
    x0_32, eps_32 = x0.astype(np.float32), eps.astype(np.float32)
    tol = dict(rtol=1e-5, atol=1e-6)

    sched = _sched32("cosine")
    alpha = np.asarray(sched.sqrt_alphas_cumprod, np.float64)[T - 1]
    sigma = np.asarray(sched.sqrt_one_minus_alphas_cumprod, np.float64)[T - 1]
    assert alpha < 1e-4 and sigma == 1.0
    t = np.full((4,), T - 1)
    xt = (alpha * x0 + sigma * eps).astype(np.float32)
    # float64 references from the float32 inputs and the float32 tables' values
    x0_ref = (xt - sigma * eps_32.astype(np.float64)) / alpha
    x0_got = jax.jit(lambda xt, eps: jd.x0_from_eps(sched, xt=xt, t=t, eps=eps))(xt, eps_32)
    np.testing.assert_allclose(x0_got, x0_ref, **tol)
    x0_hat, _ = jd.predict_x0_eps(sched, model_output=eps_32, xt=xt, t=t, prediction="eps")
    np.testing.assert_allclose(x0_hat, x0_ref, **tol)

    sched = jd.Schedule.from_betas(jd.linear_betas(T, beta_start=1e-9))
    alpha = np.asarray(sched.sqrt_alphas_cumprod, np.float64)[0]
    sigma = np.asarray(sched.sqrt_one_minus_alphas_cumprod, np.float64)[0]
    assert alpha == 1.0 and sigma < 1e-4
    t = np.zeros((4,), np.int32)
    xt = (alpha * x0 + sigma * eps).astype(np.float32)
    eps_ref = (xt - alpha * x0_32.astype(np.float64)) / sigma
    eps_got = jax.jit(lambda xt, x0: jd.eps_from_x0(sched, xt=xt, t=t, x0=x0))(xt, x0_32)
    np.testing.assert_allclose(eps_got, eps_ref, **tol)


def test_bfloat16_stays_bfloat16_and_float64_stays_float64():
    sched = _sched32("linear")
    x = jnp.ones((2, 3), jnp.bfloat16)
    t = jnp.array([3, 700])
    assert jd.q_sample(sched, x0=x, t=t, noise=x).dtype == jnp.bfloat16
    assert jd.x0_from_v(sched, xt=x, t=t, v=x).dtype == jnp.bfloat16
    p = jd.p_mean_variance(sched, model_output=x, xt=x, t=t, prediction="v")
    assert all(a.dtype == jnp.bfloat16 for a in p)
    assert all(a.dtype == jnp.bfloat16 for a in jd.q_mean_variance(sched, x0=x, t=t))
    doubled = jnp.concatenate([x, x], -1)
    p = jd.p_mean_variance(sched, model_output=doubled, xt=x, t=t, variance="learned_range")
    assert all(a.dtype == jnp.bfloat16 for a in p)
    with jax.enable_x64(True):
        s64 = jd.Schedule.from_betas(jd.linear_betas(T), dtype=jnp.float64)
        x64 = jnp.ones((2, 3), jnp.float64)
        assert jd.q_sample(s64, x0=x64, t=t, noise=x64).dtype == jnp.float64


def test_jit_vmap_grad_and_trace_count():
    sched = _sched32("cosine")
    x0, eps, _ = (jnp.asarray(a, jnp.float32) for a in data(3))
    t = jnp.asarray(T_VALUES)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(sched, x0, eps, t):
        return jd.q_sample(sched, x0=x0, t=t, noise=eps)

    eager = jd.q_sample(sched, x0=x0, t=t, noise=eps)
    np.testing.assert_allclose(f(sched, x0, eps, t), eager, rtol=1e-6)
    np.testing.assert_allclose(f(sched, x0 + 1, eps, t + 1), f(sched, x0 + 1, eps, t + 1))
    per_example = jax.vmap(lambda a, b, c: jd.q_sample(sched, x0=a, t=c, noise=b))(x0, eps, t)
    np.testing.assert_allclose(per_example, eager, rtol=1e-6)
    g = jax.grad(lambda a: jnp.sum(jd.q_sample(sched, x0=a, t=t, noise=eps)))(x0)
    np.testing.assert_allclose(
        g, jnp.broadcast_to(sched.sqrt_alphas_cumprod[t][:, None, None, None], x0.shape), rtol=1e-6
    )


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda s, x: jd.predict_x0_eps(
                s, model_output=x, xt=x, t=jnp.zeros(2, int), prediction="noise"
            ),
            "prediction must be one of 'eps', 'x0', 'v'; got 'noise'",
        ),
        (
            lambda s, x: jd.p_mean_variance(
                s, model_output=x, xt=x, t=jnp.zeros(2, int), variance="big"
            ),
            "variance must be one of .*got 'big'",
        ),
        (
            lambda s, x: jd.q_sample(s, x0=x, t=jnp.zeros(2), noise=x),
            "t must be an integer array; got dtype float32",
        ),
        (
            lambda s, x: jd.q_sample(s, x0=x, t=jnp.zeros(3, int), noise=x),
            r"t has batch size 3 but x0 has shape \(2, 3\)",
        ),
        (
            lambda s, x: jd.q_sample(s, x0=x, t=jnp.array([0, 10]), noise=x),
            r"t must lie in \[0, 9\]; got values in \[0, 10\]",
        ),
        (
            lambda s, x: jd.q_sample(s, x0=x, t=jnp.array([-1, 0]), noise=x),
            r"t must lie in \[0, 9\]",
        ),
        (
            lambda s, x: jd.q_sample(s, x0=x, t=jnp.zeros(2, int), noise=x[:, :2]),
            r"same shape; got x0 \(2, 3\), noise \(2, 2\)",
        ),
        (
            lambda s, x: jd.p_mean_variance(
                s, model_output=x, xt=x, t=jnp.zeros(2, int), variance="learned_range"
            ),
            r"twice the channels.*\(2, 6\); got \(2, 3\)",
        ),
        # 1-D data [B]: the doubled "channels" were the batch axis, split in two
        (
            lambda s, x: jd.p_mean_variance(
                s,
                model_output=x[:, 0].repeat(2),
                xt=x[:, 0],
                t=jnp.zeros(2, int),
                variance="learned_range",
            ),
            r"needs xt with a channel axis, \[B, ..., C\].*got xt of shape \(2,\)",
        ),
        (
            lambda s, x: jd.p_mean_variance(s, model_output=x[:, :1], xt=x, t=jnp.zeros(2, int)),
            r"model_output must have the shape of xt \(2, 3\)",
        ),
        (
            lambda s, x: jd.q_sample(s, x0=x, t=jnp.zeros((2, 1), int), noise=x),
            r"t must have shape \[B\] or \[\]; got shape \(2, 1\)",
        ),
        (
            lambda s, x: jd.q_sample(s, x0=x[0, 0], t=jnp.zeros(2, int), noise=x[0, 0]),
            r"t has batch size 2 but x0 has shape \(\)",
        ),
        (
            lambda s, x: jd.x0_from_eps(s, xt=x, t=jnp.zeros(2, int), eps=x[:, :1]),
            r"same shape; got xt \(2, 3\), eps \(2, 1\)",
        ),
        (
            lambda s, x: jd.q_posterior_mean_variance(s, x0=x[:, :1], xt=x, t=jnp.zeros(2, int)),
            r"same shape; got x0 \(2, 1\), xt \(2, 3\)",
        ),
        (
            lambda s, x: jd.p_mean_variance(
                s, model_output=x, xt=x, t=jnp.zeros(2, int), clip_denoised=1
            ),
            "clip_denoised must be True or False; got 1",
        ),
        (
            lambda s, x: jd.p_mean_variance(
                s, model_output=x, xt=x, t=jnp.zeros(2, int), denoised_fn="clip"
            ),
            "denoised_fn must be a callable x0_hat -> x0_hat or None; got 'clip'",
        ),
        (  # the betas instead of the Schedule built from them: was an AttributeError
            lambda s, x: jd.q_sample(s.betas, x0=x, t=jnp.zeros(2, int), noise=x),
            r"schedule must be a jax_diffusion Schedule \(e.g. Schedule.from_betas\(betas\)\); "
            "got ArrayImpl",
        ),
        (
            lambda s, x: jd.p_mean_variance(None, model_output=x, xt=x, t=jnp.zeros(2, int)),
            "schedule must be a jax_diffusion Schedule .*got NoneType",
        ),
        # integer data gave silently truncated integer results (a variance of 0, a mean of 0)
        (
            lambda s, x: jd.q_mean_variance(s, x0=x.astype(int), t=jnp.ones(2, int)),
            r"x0 must be a floating array \(float32, bfloat16, ...\); got dtype int32",
        ),
        (
            lambda s, x: jd.q_posterior_mean_variance(s, x0=x, xt=x.astype(int), t=np.ones(2, int)),
            "xt must be a floating array .*got dtype int32",
        ),
        (
            lambda s, x: jd.x0_from_eps(s, xt=x, t=jnp.ones(2, int), eps=x.astype(jnp.uint8)),
            "eps must be a floating array .*got dtype uint8",
        ),
        (
            lambda s, x: jd.q_sample(s, x0=x.tolist(), t=jnp.ones(2, int), noise=x),
            "x0 must be a floating array .*got list",
        ),
        (
            lambda s, x: jd.q_sample(s, x0=x, t=jnp.ones(2, int), noise=x.astype(int)),
            r"noise must be a floating array \(float32, bfloat16, ...\); got dtype int32",
        ),
    ],
)
def test_bad_input_raises_before_work(call, match):
    sched = jd.Schedule.from_betas(jd.linear_betas(10))
    with pytest.raises(ValueError, match=match):
        call(sched, jnp.ones((2, 3)))


def test_range_check_is_skipped_only_when_traced():
    sched = jd.Schedule.from_betas(jd.linear_betas(10))
    x = jnp.ones((2, 3))
    # traced t cannot be range-checked eagerly; the call still compiles and runs
    out = jax.jit(lambda t: jd.q_sample(sched, x0=x, t=t, noise=x))(jnp.array([0, 9]))
    assert out.shape == (2, 3)


def test_bfloat16_inputs_are_computed_in_float32():
    """bf16 in, bf16 out, but one rounding of the exact value: Ho eq. 4 and Salimans & Ho's
    x0 = alpha x_t - sigma v in float64 from the bf16 inputs, rounded once to bf16."""
    sched = _sched32("linear")
    rng = np.random.default_rng(7)
    a, b = (jnp.asarray(rng.standard_normal((4, 16)), jnp.bfloat16) for _ in range(2))
    t = jnp.asarray(T_VALUES)
    abar = np_schedule(jd.linear_betas(T))["alphas_cumprod"][T_VALUES][:, None]
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    alpha, sigma = np.sqrt(abar), np.sqrt(1 - abar)
    xt = jd.q_sample(sched, x0=a, t=t, noise=b)
    np.testing.assert_array_equal(xt, jnp.asarray(alpha * a64 + sigma * b64, jnp.bfloat16))
    x0 = jd.x0_from_v(sched, xt=a, t=t, v=b)
    np.testing.assert_array_equal(x0, jnp.asarray(alpha * a64 - sigma * b64, jnp.bfloat16))


def test_single_step_schedule_reverse_variances():
    """T = 1: sigma^2 = beta_1 for fixed_large (Ho et al. sec. 3.2), finite for both choices."""
    sched = jd.Schedule.from_betas([0.02])
    x = jnp.ones((2, 3))
    t = jnp.zeros(2, int)
    large = jd.p_mean_variance(sched, model_output=x, xt=x, t=t, variance="fixed_large")
    np.testing.assert_allclose(large.variance.reshape(-1), 0.02, rtol=1e-6)
    np.testing.assert_allclose(large.log_variance.reshape(-1), np.log(0.02), rtol=1e-6)
    small = jd.p_mean_variance(sched, model_output=x, xt=x, t=t, variance="fixed_small")
    assert np.all(np.isfinite(small.log_variance))


def test_empty_batch_is_valid():
    sched = jd.Schedule.from_betas(jd.linear_betas(10))
    x = jnp.ones((0, 3))
    assert jd.q_sample(sched, x0=x, t=jnp.zeros(0, int), noise=x).shape == (0, 3)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_training_target_checks_its_arguments_for_every_prediction(prediction):
    """The 'v' target validated t and eps while 'eps' and 'x0' returned an argument unchecked:
    a t outside [0, T - 1] or an eps of another shape passed silently for those two."""
    sched = jd.Schedule.from_betas(jd.linear_betas(10))
    x0 = jnp.ones((2, 3))
    kw = dict(prediction=prediction)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 9\]"):
        jd.training_target(sched, x0=x0, eps=x0, t=jnp.array([0, 10]), **kw)
    with pytest.raises(ValueError, match="t must be an integer array"):
        jd.training_target(sched, x0=x0, eps=x0, t=jnp.array([0.0, 1.0]), **kw)
    with pytest.raises(ValueError, match="t has batch size 3"):
        jd.training_target(sched, x0=x0, eps=x0, t=jnp.array([0, 1, 2]), **kw)
    with pytest.raises(ValueError, match="arrays must have the same shape"):
        jd.training_target(sched, x0=x0, eps=jnp.ones((2, 4)), t=jnp.array([0, 1]), **kw)
    with pytest.raises(ValueError, match="eps must be a floating array"):
        jd.training_target(sched, x0=x0, eps=x0.astype(int), t=jnp.array([0, 1]), **kw)
    got = jax.jit(lambda t: jd.training_target(sched, x0=x0, eps=2 * x0, t=t, **kw))(
        jnp.array([0, 9])
    )
    assert got.shape == x0.shape


@pytest.mark.parametrize("name", ["linear", "cosine", "zero_snr"])
def test_score_conversions_float64(x64, name):
    betas = SCHEDULES[name]()
    sched = jd.Schedule.from_betas(betas, dtype=jnp.float64)
    _, eps, _ = data(5)
    ab = bcast(np_schedule(betas)["alphas_cumprod"][T_VALUES], eps)
    t = jnp.asarray(T_VALUES)
    score = jd.score_from_eps(sched, t=t, eps=eps)
    assert score.dtype == jnp.float64
    np.testing.assert_allclose(score, -eps / np.sqrt(1 - ab), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(jd.eps_from_score(sched, t=t, score=score), eps, rtol=1e-10)
    np.testing.assert_allclose(
        jd.eps_from_score(sched, t=t, score=eps), -np.sqrt(1 - ab) * eps, rtol=1e-10, atol=1e-10
    )


def test_score_of_the_exact_denoiser_is_the_gradient_of_the_marginal_log_density(x64):
    # Gaussian data N(m, s^2): q(x_t) = N(alpha m, alpha^2 s^2 + sigma^2), whose log density has
    # the gradient -(x_t - alpha m) / (alpha^2 s^2 + sigma^2); Tweedie: x0_hat = (x_t + sigma^2
    # score) / alpha, the posterior mean of x0
    betas = SCHEDULES["cosine"]()
    sched = jd.Schedule.from_betas(betas, dtype=jnp.float64)
    ab = np_schedule(betas)["alphas_cumprod"]
    m, s = 0.3, 0.7
    t = np.array([0, 10, 400, 900, T - 2])
    xt = np.random.default_rng(7).standard_normal((5, 6)) * 1.5
    alpha, sigma2 = bcast(np.sqrt(ab[t]), xt), bcast(1 - ab[t], xt)
    want = -(xt - alpha * m) / (alpha**2 * s**2 + sigma2)
    x0_hat, eps_hat = gaussian_posterior_moments(sched, jnp.asarray(xt), t, m, s)
    score = jd.score_from_eps(sched, t=jnp.asarray(t), eps=eps_hat)
    np.testing.assert_allclose(score, want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose((xt + sigma2 * want) / alpha, x0_hat, rtol=1e-9, atol=1e-12)


def test_score_conversions_keep_the_dtype_check_their_arguments_and_transform():
    sched = _sched32("linear")
    x = jnp.ones((2, 3), jnp.bfloat16)
    t = jnp.array([3, 700])
    assert jd.score_from_eps(sched, t=t, eps=x).dtype == jnp.bfloat16
    assert jd.eps_from_score(sched, t=t, score=x).dtype == jnp.bfloat16
    x = jnp.arange(6.0).reshape(2, 3)
    with pytest.raises(ValueError, match="eps must be a floating array .*got dtype int32"):
        jd.score_from_eps(sched, t=t, eps=x.astype(int))
    with pytest.raises(ValueError, match=r"score must be a floating array .*got list"):
        jd.eps_from_score(sched, t=t, score=x.tolist())
    with pytest.raises(ValueError, match=r"t must lie in \[0, 999\]; got values in \[3, 1000\]"):
        jd.score_from_eps(sched, t=jnp.array([3, 1000]), eps=x)
    with pytest.raises(ValueError, match=r"t has batch size 3 but score has shape \(2, 3\)"):
        jd.eps_from_score(sched, t=jnp.zeros(3, int), score=x)
    eager = jd.score_from_eps(sched, t=t, eps=x)
    per_example = jax.vmap(lambda e, s: jd.score_from_eps(sched, t=s, eps=e))(x, t)
    np.testing.assert_allclose(jax.jit(jd.score_from_eps)(sched, t=t, eps=x), eager, rtol=1e-6)
    np.testing.assert_allclose(per_example, eager, rtol=1e-6)
    g = jax.grad(lambda e: jnp.sum(jd.eps_from_score(sched, t=t, score=e)))(x)
    np.testing.assert_allclose(
        g, -sched.sqrt_one_minus_alphas_cumprod[t][:, None] * jnp.ones_like(x)
    )
