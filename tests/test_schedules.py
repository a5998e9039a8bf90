"""Schedules against float64 references written from the papers' formulas."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import np_schedule

import jax_diffusion as jd
from jax_diffusion.schedules import Schedule


def test_linear_betas_endpoints_and_spacing():
    betas = jd.linear_betas(1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == 1e-4 and betas[-1] == 0.02
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-9)


def test_scaled_linear_betas_is_linear_in_sqrt_beta():
    betas = jd.scaled_linear_betas(50)
    np.testing.assert_allclose(betas[[0, -1]], [0.00085, 0.012], rtol=1e-12)
    np.testing.assert_allclose(np.diff(np.sqrt(betas)), (0.012**0.5 - 0.00085**0.5) / 49, rtol=1e-9)


def test_cosine_betas_match_nichol_dhariwal_eq17():
    T, s = 100, 0.008
    f = [math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
    want = [min(1 - f[t + 1] / f[t], 0.999) for t in range(T)]
    np.testing.assert_allclose(jd.cosine_betas(T), want, rtol=1e-12)
    # alphas_cumprod follows f(t) / f(0) up to the clipping of the last beta
    abar = np.cumprod(1 - jd.cosine_betas(T))
    np.testing.assert_allclose(abar[:-1], np.array(f[1:-1]) / f[0], rtol=1e-10)
    assert jd.cosine_betas(T)[-1] == 0.999


@pytest.mark.parametrize("make", [lambda: jd.linear_betas(1000), lambda: jd.cosine_betas(1000)])
def test_rescale_zero_terminal_snr(make):
    betas = make()
    new = jd.rescale_zero_terminal_snr(betas)
    abar_old, abar_new = np.cumprod(1 - betas), np.cumprod(1 - new)
    assert new[-1] == 1.0 and abar_new[-1] == 0.0
    assert np.all((new > 0) & (new <= 1))
    np.testing.assert_allclose(abar_new[0], abar_old[0], rtol=1e-12)
    # Lin et al. Alg. 1: sqrt(abar_new) is an affine function of sqrt(abar_old)
    x, y = np.sqrt(abar_old), np.sqrt(abar_new)
    slope, intercept = np.polyfit(x, y, 1)
    np.testing.assert_allclose(y, slope * x + intercept, atol=1e-12)
    np.testing.assert_allclose(-intercept / slope, x[-1], rtol=1e-10)


def test_schedule_tables_float64(x64):
    betas = jd.cosine_betas(200)
    sched = Schedule.from_betas(betas, dtype=jnp.float64)
    ref = np_schedule(betas)
    for name, want in ref.items():
        got = np.asarray(getattr(sched, name))
        assert got.dtype == np.float64, name
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14, err_msg=name)
    np.testing.assert_allclose(sched.sqrt_alphas_cumprod, np.sqrt(ref["alphas_cumprod"]), 1e-10)
    np.testing.assert_allclose(
        sched.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - ref["alphas_cumprod"]), 1e-10
    )
    tilde = ref["posterior_variance"]
    np.testing.assert_allclose(
        sched.posterior_log_variance_clipped, np.log(np.r_[tilde[1], tilde[1:]]), rtol=1e-10
    )
    assert tilde[0] == 0.0
    t = jnp.arange(200)
    snr = ref["alphas_cumprod"] / (1 - ref["alphas_cumprod"])
    np.testing.assert_allclose(sched.snr(t), snr, rtol=1e-10)
    np.testing.assert_allclose(sched.logsnr(t), np.log(snr), rtol=1e-10)


def test_schedule_float32_close_to_float64_reference():
    betas = jd.linear_betas(1000)
    sched = Schedule.from_betas(betas)
    ref = np_schedule(betas)
    for name, want in ref.items():
        got = getattr(sched, name)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12, err_msg=name)


def test_zero_terminal_snr_schedule_is_finite_where_defined():
    sched = Schedule.from_betas(jd.rescale_zero_terminal_snr(jd.linear_betas(1000)))
    assert float(sched.alphas_cumprod[-1]) == 0.0
    assert float(sched.snr(jnp.array(999))) == 0.0
    assert float(sched.logsnr(jnp.array(999))) == -np.inf
    for name in ("posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1"):
        assert np.all(np.isfinite(getattr(sched, name))), name


def test_schedule_is_a_pytree_with_static_num_timesteps():
    sched = Schedule.from_betas(jd.linear_betas(10))
    leaves, treedef = jax.tree_util.tree_flatten(sched)
    assert len(leaves) == 10 and all(leaf.shape == (10,) for leaf in leaves)
    assert jax.tree_util.tree_unflatten(treedef, leaves).num_timesteps == 10

    @jax.jit
    @chex.assert_max_traces(n=1)
    def last_abar(s):
        return s.alphas_cumprod[s.num_timesteps - 1]

    a = last_abar(sched)
    b = last_abar(Schedule.from_betas(jd.linear_betas(10, 2e-4, 0.03)))  # same shapes: no retrace
    np.testing.assert_allclose(a, np.prod(1 - jd.linear_betas(10)), rtol=1e-6)
    assert float(b) < float(a)


def test_respace_keeps_alphas_cumprod_at_kept_steps(x64):
    base = Schedule.from_betas(jd.linear_betas(1000), dtype=jnp.float64)
    keep = np.arange(0, 1000, 20)[::-1]  # any order
    sub = base.respace(keep)
    assert sub.num_timesteps == 50
    np.testing.assert_allclose(sub.alphas_cumprod, base.alphas_cumprod[np.sort(keep)], rtol=1e-12)
    full = base.respace(np.arange(1000))
    np.testing.assert_allclose(full.betas, base.betas, rtol=1e-9)


@pytest.mark.parametrize(
    "betas, match",
    [
        (np.array([0.1, 0.0]), r"betas must lie in \(0, 1\]; got betas\[1\] = 0.0"),
        (np.array([0.1, 1.5]), r"betas\[1\] = 1.5"),
        (np.array([0.1, np.nan]), r"betas\[1\] = nan"),
        (np.ones((2, 2)) * 0.1, r"1-D.*shape \(2, 2\)"),
    ],
)
def test_bad_betas_raise(betas, match):
    with pytest.raises(ValueError, match=match):
        Schedule.from_betas(betas)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: jd.linear_betas(0), "num_timesteps must be a positive int; got 0"),
        (lambda: jd.linear_betas(10.0), "num_timesteps must be a positive int; got 10.0"),
        (lambda: jd.linear_betas(10, beta_start=0.0), r"beta_start must lie in \(0, 1\); got 0.0"),
        (lambda: jd.linear_betas(10, None), r"beta_start must lie in \(0, 1\); got None"),
        (lambda: jd.scaled_linear_betas(10, beta_end="0.1"), r"beta_end must .*; got '0.1'"),
        (lambda: jd.cosine_betas(10, s="a"), "s must be >= 0; got 'a'"),
        (lambda: jd.cosine_betas(10, max_beta=None), r"max_beta must lie in \(0, 1\]; got None"),
        # a bool is no number: True passed the comparisons as s = 1.0 and max_beta = 1.0
        (lambda: jd.cosine_betas(10, s=True), "s must be >= 0; got True"),
        (lambda: jd.cosine_betas(10, max_beta=True), r"max_beta must lie in \(0, 1\]; got True"),
        # JAX indexing would clamp or wrap these without a word
        (lambda: Schedule.from_betas(jd.linear_betas(10)).snr(10), r"t must lie in \[0, 9\]"),
        (lambda: Schedule.from_betas(jd.linear_betas(10)).logsnr(-1), r"got values in \[-1, -1\]"),
        (
            lambda: Schedule.from_betas(jd.linear_betas(10)).snr(jnp.array([1.5])),
            "t must be an integer array; got dtype float32",
        ),
        (lambda: jd.scaled_linear_betas(10, beta_end=2.0), r"beta_end must lie in \(0, 1\)"),
        (lambda: jd.cosine_betas(10, max_beta=1.5), r"max_beta must lie in \(0, 1\]; got 1.5"),
        (lambda: jd.rescale_zero_terminal_snr([0.1]), "at least 2 entries"),
        (lambda: Schedule.from_betas([0.1], dtype=jnp.int32), "floating dtype"),
        (
            lambda: Schedule.from_betas(jd.linear_betas(10)).respace([3, 3]),
            r"distinct ints in \[0, 9\]",
        ),
        (lambda: Schedule.from_betas(jd.linear_betas(10)).respace([10]), r"in \[0, 9\]"),
    ],
)
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_respace_of_a_float32_schedule_keeps_float32_precision():
    betas = jd.linear_betas(1000)
    full = Schedule.from_betas(betas).respace(np.arange(1000))
    np.testing.assert_allclose(full.betas, betas, rtol=1e-6)
    np.testing.assert_allclose(
        full.posterior_variance[1:], np_schedule(betas)["posterior_variance"][1:], rtol=2e-6
    )


@pytest.mark.parametrize(
    "betas",
    [
        jd.cosine_betas(1000),  # beta 0.999 at the end: 1 - beta has 4 digits in float32
        jd.rescale_zero_terminal_snr(jd.linear_betas(1000)),  # alpha_bar 0 at the end
        jd.linear_betas(1000),
    ],
)
def test_respacing_a_float32_schedule_twice_keeps_alphas_cumprod_at_the_kept_steps(betas):
    # a respaced schedule's last betas near 1 (0.99999 and more): read back as 1 - beta in
    # float32, its alphas_cumprod came out up to 100% off
    abar = np.cumprod(1.0 - betas)
    once = np.array([0, 1, 2, 100, 250, 500, 998, 999])
    twice = np.array([0, 2, 5, 6, 7])
    for keep, sched in [
        (once, Schedule.from_betas(betas).respace(once)),
        (once[twice], Schedule.from_betas(betas).respace(once).respace(twice)),
        (np.array([0, 500, 999]), Schedule.from_betas(betas).respace([0, 500, 999])),
    ]:
        got = np.asarray(sched.alphas_cumprod, np.float64)
        np.testing.assert_allclose(got, abar[keep], rtol=5e-7, atol=0, err_msg=str(keep))
        assert (got[-1] == 0.0) == (abar[-1] == 0.0)


@pytest.mark.parametrize("make", [jd.linear_betas, jd.scaled_linear_betas, jd.cosine_betas])
def test_num_timesteps_edges(make):
    """T = 1 and NumPy ints are valid step counts; a bool is not an int here (True == 1)."""
    one = make(1)
    assert one.shape == (1,) and 0 < one[0] <= 1
    np.testing.assert_array_equal(make(np.int64(7)), make(7))
    with pytest.raises(ValueError, match="num_timesteps must be a positive int; got True"):
        make(True)


def test_single_step_schedule_is_finite():
    """T = 1: beta_tilde_0 = 0 has no t = 1 entry to borrow, so the clipped log is log beta_0."""
    sched = Schedule.from_betas([0.02])
    assert sched.num_timesteps == 1
    np.testing.assert_allclose(sched.posterior_log_variance_clipped, [math.log(0.02)], rtol=1e-6)
    np.testing.assert_allclose(sched.alphas_cumprod, [0.98], rtol=1e-7)


@pytest.mark.parametrize("make", [jd.linear_betas, jd.scaled_linear_betas])
def test_beta_endpoints_must_lie_strictly_below_one(make):
    np.testing.assert_allclose(make(3, beta_start=0.5, beta_end=0.999)[-1], 0.999, rtol=1e-12)
    with pytest.raises(ValueError, match=r"beta_end must lie in \(0, 1\); got 1.0"):
        make(3, beta_end=1.0)


def test_cosine_betas_offset_and_clip_arguments():
    """Nichol & Dhariwal eq. 17 with s = 0 (allowed) and a user max_beta, including 1."""
    T = 20

    def want(s, max_beta):
        f = [math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
        return [min(1 - f[t + 1] / f[t], max_beta) for t in range(T)]

    for s, max_beta in [(0.0, 0.999), (0.1, 0.3), (0.0, 1.0)]:
        got = jd.cosine_betas(T, s=s, max_beta=max_beta)
        np.testing.assert_allclose(got, want(s, max_beta), rtol=1e-12)
    assert jd.cosine_betas(T, max_beta=0.3)[-1] == 0.3
    with pytest.raises(ValueError, match="s must be >= 0; got -0.1"):
        jd.cosine_betas(T, s=-0.1)


def test_from_betas_casts_every_table_to_dtype():
    dtype = jnp.bfloat16
    betas = jd.linear_betas(100)
    ref = np_schedule(betas)
    sched = Schedule.from_betas(betas, dtype=dtype)
    assert all(leaf.dtype == dtype for leaf in jax.tree_util.tree_leaves(sched))
    rtol = float(jnp.finfo(dtype).eps)  # one rounding of the float64 value
    for name, want in ref.items():
        np.testing.assert_allclose(
            np.asarray(getattr(sched, name), np.float64), want, rtol=rtol, err_msg=name
        )
    assert sched.respace([0, 50, 99]).betas.dtype == dtype


def test_a_float64_schedule_without_x64_is_refused_not_silently_float32():
    # it used to come back float32 (with ten truncation warnings from jnp.asarray)
    with pytest.raises(ValueError, match=r"dtype float64 needs 64-bit JAX .*x64 disabled"):
        Schedule.from_betas(jd.linear_betas(10), dtype=jnp.float64)
    with jax.enable_x64(True):
        sched = Schedule.from_betas(jd.linear_betas(10), dtype=np.float64)
        assert all(leaf.dtype == jnp.float64 for leaf in jax.tree_util.tree_leaves(sched))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: Schedule.from_betas([]), r"non-empty 1-D array; got shape \(0,\)"),
        (lambda: Schedule.from_betas([0.1], dtype=jnp.complex64), "floating dtype"),
        (
            lambda: Schedule.from_betas(jd.linear_betas(10)).respace([-1, 3]),
            r"distinct ints in \[0, 9\]; got \[-1, 3\]",
        ),
        (
            lambda: Schedule.from_betas(jd.linear_betas(10)).respace([0.0, 3.0]),
            "non-empty 1-D int array",
        ),
        (  # a [1, 1] array is no sequence of steps, however its one entry lies in [0, 9]
            lambda: Schedule.from_betas(jd.linear_betas(10)).respace([[5]]),
            r"non-empty 1-D int array; got \[\[5\]\]",
        ),
        (
            lambda: Schedule.from_betas(jd.linear_betas(10)).respace([[3, 5]]),
            r"non-empty 1-D int array; got \[\[3, 5\]\]",
        ),
    ],
)
def test_bad_schedule_edges_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_respace_of_a_traced_schedule_raises_value_error():
    """Under jit with the schedule as an argument its tables are tracers, which NumPy cannot
    read: a ValueError that says so, not JAX's TracerArrayConversionError from inside."""
    sched = Schedule.from_betas(jd.linear_betas(20, 1e-3, 0.2))
    with pytest.raises(ValueError, match="respace needs a concrete schedule"):
        jax.jit(lambda s: s.respace([0, 5, 10]).betas)(sched)
    closed_over = jax.jit(lambda: sched.respace([0, 5, 10]).alphas_cumprod)()
    np.testing.assert_allclose(closed_over, np.asarray(sched.alphas_cumprod)[[0, 5, 10]], rtol=1e-6)
