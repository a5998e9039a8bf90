"""Fast tests of the helpers behind the published experiment numbers (experiments/common.py,
experiments/tables.py): metrics against float64 NumPy / SciPy written from the definitions,
sampling and evaluation plumbing with fakes (no training, no real network), and the tables
against the layout printed in experiments/README.md.
"""

import json
import math
import os
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.linalg

import jax_diffusion as jd
from experiments import common, tables
from jax_diffusion import evaluation

# ------------------------------------------------------------------------------ references


def _wcv_reference(features, labels):
    """Mean over classes (with >= 2 members) of sum_d var_d, unbiased (n - 1)."""
    features = np.asarray(features, np.float64)
    traces = []
    for c in sorted(set(labels.tolist())):
        rows = features[labels == c]
        if len(rows) < 2:
            continue
        centred = rows - rows.mean(axis=0)
        traces.append(float((centred**2).sum() / (len(rows) - 1)))
    return sum(traces) / len(traces)


def _fd_reference(a, b):
    """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^{1/2}), unbiased covariances."""
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(ca @ cb).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * covmean))


def _coverage_reference(points, centres, k):
    """Fraction of `points` within the k-NN ball (same set) of some centre, by loops."""
    inside = 0
    for p in points:
        for c in centres:
            d_self = sorted(float(((c - o) ** 2).sum()) for o in centres)
            if ((p - c) ** 2).sum() <= d_self[k]:  # d_self[0] = 0 is the centre itself
                inside += 1
                break
    return inside / len(points)


def _softmax_reference(logits):
    out = []
    for row in np.asarray(logits, np.float64):
        m = max(row)
        e = [math.exp(v - m) for v in row]
        out.append([v / sum(e) for v in e])
    return np.array(out)


def _is_reference(p):
    p_y = p.mean(axis=0)
    kl = [
        sum(pi * math.log(pi / qi) for pi, qi in zip(row, p_y, strict=True) if pi > 0) for row in p
    ]
    return math.exp(sum(kl) / len(kl))


# ------------------------------------------------------------------------------ fakes


def _config(*, num_classes=None, variance="fixed_small", prediction="eps"):
    c = ml_collections.ConfigDict()
    c.diffusion = dict(prediction=prediction, variance=variance, weighting="none")
    c.sample = dict(clip_denoised=False)  # not the default: the flag must reach the sampler
    c.model = dict(num_classes=num_classes, base_channels=8)
    c.train = dict(num_steps=7, batch_size=5)
    return c


class _Model:
    """apply(x, t, y) = scale * x + y (or t-dependent output for the bucket test)."""

    def __init__(self, fn=None):
        self.fn = fn
        self.calls = []

    def apply(self, variables, x, t, y, method=None):  # flax's signature; no methods here
        assert method is None
        self.calls.append(y)
        if self.fn is not None:
            return self.fn(x, t)
        out = variables["params"]["scale"] * x
        if y is not None:
            out = out + jnp.asarray(y, x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        return out


def _run(*, num_classes=None, T=10, shape=(2, 2, 1), schedule=None, model=None, **cfg):
    schedule = schedule or types.SimpleNamespace(num_timesteps=T)
    params = {"scale": jnp.float32(2.0)}
    return common.Run(
        _config(num_classes=num_classes, **cfg), shape, model or _Model(), params, schedule, 3
    )


@pytest.fixture(autouse=True)
def _fresh_memos(monkeypatch):
    # the memos are keyed by id(run): a fresh fake run may reuse a dead one's id
    monkeypatch.setattr(common, "_SAMPLERS", {})
    monkeypatch.setattr(common, "_DRAWN", {})
    monkeypatch.setattr(common, "_BPD", {})


# ------------------------------------------------------------------------------ metrics


def test_softmax_matches_reference_and_is_stable():
    # rows are independent distributions; a huge logit must not overflow
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 4)) * 3
    logits[0] = [1000.0, 0.0, -1000.0, 999.0]
    logits[1] += 500.0  # a row far from the others: per-row shift invariance
    p = common._softmax(logits.astype(np.float32))
    assert p.dtype == np.float64
    np.testing.assert_allclose(p, _softmax_reference(logits.astype(np.float32)), rtol=1e-12)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-12)


def test_within_class_variance_is_the_mean_of_per_class_traces():
    # unequal class sizes (a count-weighted mean differs), a singleton class (skipped: its
    # variance is undefined), non-contiguous labels, D = 3
    rng = np.random.default_rng(1)
    labels = np.array([0] * 2 + [3] * 7 + [5] * 1 + [7] * 4)
    feats = rng.normal(size=(len(labels), 3)) * (1 + labels[:, None])
    got = common.within_class_variance(feats, labels)
    assert got == pytest.approx(_wcv_reference(feats, labels), rel=1e-12)


def _fake_reference(rng):
    train = rng.normal(size=(30, 3))
    test = rng.normal(size=(25, 3)) * 1.5 + 0.7
    train_y = np.arange(30) % 4
    return {
        "train": evaluation.FeatureStats.from_features(train),
        "test": evaluation.FeatureStats.from_features(test),
        "train_feats": train,
        "train_labels": train_y,
        "test_feats": test,
        "test_images": rng.uniform(-1, 1, size=(9, 4, 4, 1)).astype(np.float32),
    }


def test_reference_metrics_compare_train_with_test(monkeypatch):
    ref = _fake_reference(np.random.default_rng(2))
    monkeypatch.setattr(common, "_reference", lambda size: ref)
    got = common.reference_metrics(8)
    assert set(got) == {"fd_train_vs_test", "within_class_var_train"}
    fd = _fd_reference(ref["train_feats"], ref["test_feats"])
    assert got["fd_train_vs_test"] == pytest.approx(fd, rel=1e-8)
    wcv = _wcv_reference(ref["train_feats"], ref["train_labels"])
    assert got["within_class_var_train"] == pytest.approx(wcv, rel=1e-12)


def test_measure_against_definitions(monkeypatch):
    # fake classifier: features = the flattened clipped images, logits = fixed per-sample rows
    rng = np.random.default_rng(3)
    ref = _fake_reference(rng)
    n = 20
    samples = rng.normal(size=(n, 3, 1, 1)).astype(np.float32) * 1.5  # partly outside [-1, 1]
    logits = rng.normal(size=(n, 4)) * 2
    labels = np.concatenate([np.arange(n) % 4, [1, 2, 3]])  # longer than samples: truncated
    seen = []
    monkeypatch.setattr(common, "_reference", lambda size: ref)

    def features(x):
        seen.append(np.asarray(x))
        return np.asarray(x, np.float64).reshape(len(x), -1)

    monkeypatch.setattr(evaluation, "digits_features", features)
    monkeypatch.setattr(evaluation, "digits_logits", lambda x: seen.append(np.asarray(x)) or logits)
    out = common.measure(samples, labels)
    clipped = np.clip(samples.astype(np.float64), -1, 1).reshape(n, -1)
    for x in seen:  # the classifier (features and logits) sees the clipped samples
        np.testing.assert_array_equal(x, np.clip(samples, -1, 1))
    assert out["fd_train"] == pytest.approx(_fd_reference(clipped, ref["train_feats"]), rel=1e-8)
    assert out["fd_test"] == pytest.approx(_fd_reference(clipped, ref["test_feats"]), rel=1e-8)
    # precision: samples inside the test digits' manifold; recall: test digits inside samples'
    assert out["precision"] == _coverage_reference(clipped, ref["test_feats"], 3)
    assert out["recall"] == _coverage_reference(ref["test_feats"], clipped, 3)
    assert out["inception_score"] == pytest.approx(
        _is_reference(_softmax_reference(logits)), rel=1e-10
    )
    lab = labels[:n]
    acc = sum(int(np.argmax(logits[i]) == lab[i]) for i in range(n)) / n
    assert out["class_accuracy"] == acc
    assert out["within_class_var"] == pytest.approx(_wcv_reference(clipped, lab), rel=1e-10)
    # without labels: no class metrics
    assert set(common.measure(samples)) == {
        "fd_train",
        "fd_test",
        "precision",
        "recall",
        "inception_score",
    }


def test_bits_per_dim_maps_the_evaluation_fields(monkeypatch):
    ref = _fake_reference(np.random.default_rng(4))
    monkeypatch.setattr(common, "_reference", lambda size: ref)
    calls = []

    def fake_bpd(schedule, model_fn, images, rng, **kw):
        calls.append((schedule, model_fn, np.asarray(images), np.asarray(rng), kw))
        return {
            "total_bpd": 5.0,
            "total_bpd_stderr": 0.1,
            "prior_bpd": 0.01,
            "kl_bpd": 3.9,
            "decoder_bpd": 1.09,
            "num_examples": len(images),
        }

    monkeypatch.setattr(evaluation, "bits_per_dim", fake_bpd)
    run = _run(num_classes=3, prediction="v", variance="fixed_large")
    out = common.bits_per_dim(run, num_examples=4, seed=1)
    assert out == {
        "bpd": 5.0,
        "bpd_stderr": 0.1,
        "bpd_prior": 0.01,
        "bpd_kl": 3.9,
        "bpd_decoder": 1.09,
        "bpd_examples": 4,
    }
    schedule, model_fn, images, rng1, kw = calls[0]
    assert schedule is run.schedule
    np.testing.assert_array_equal(images, ref["test_images"][:4])  # the first test digits
    assert kw["batch_size"] == 4 and kw["prediction"] == "v" and kw["variance"] == "fixed_large"
    # the model: EMA params, null label (= num_classes) for a conditional model
    x = jnp.ones((2, 4, 4, 1))
    np.testing.assert_allclose(model_fn(x, jnp.zeros(2, jnp.int32)), 2.0 * x + 3.0)
    # memo: the same evaluation is not recomputed and the caller's dict is a copy
    out["bpd"] = -1.0
    again = common.bits_per_dim(run, num_examples=4, seed=1)
    again["bpd_kl"] = -1.0
    assert common.bits_per_dim(run, num_examples=4, seed=1) == {**again, "bpd_kl": 3.9}
    assert again["bpd"] == 5.0 and len(calls) == 1
    # another variance or seed is another evaluation, with other noise for another seed
    assert common.bits_per_dim(run, num_examples=4, seed=1, variance="fixed_small")
    assert calls[1][4]["variance"] == "fixed_small"
    common.bits_per_dim(run, num_examples=4, seed=2)
    assert len(calls) == 3
    np.testing.assert_array_equal(calls[1][3], rng1)
    assert not np.array_equal(calls[2][3], rng1)


def test_loss_by_t_bucket_edges_means_and_membership(monkeypatch):
    # x0 = 0 and an x0-model whose output is b + 1 for t in bucket b: own / x0 errors are exactly
    # (b + 1)^2 if every t lands in its bucket; eps_hat - eps = -alpha_t (b + 1) / sigma_t
    T, n, draws = 20, 5, 3
    images = np.zeros((48, 2, 2, 1), np.float32)
    ref = {"test_images": images}
    monkeypatch.setattr(common, "_reference", lambda size: ref)
    schedule = jd.Schedule.from_betas(jd.linear_betas(T, 1e-3, 0.2))

    def out(x, t):  # learned_range: [mean output, variance output] along channels
        c = (t * n // T + 1).astype(x.dtype)
        return jnp.concatenate([jnp.broadcast_to(c[:, None, None, None], x.shape), x + 7], -1)

    run = _run(schedule=schedule, model=_Model(out), prediction="x0", variance="learned_range")
    got = common.loss_by_t_bucket(run, num_buckets=n, draws=draws, seed=0)
    assert got["bucket_edges"] == [0, 4, 8, 12, 16, 20]
    expected = [float((b + 1) ** 2) for b in range(n)]
    np.testing.assert_allclose(got["own_mse"], expected, rtol=1e-6)
    np.testing.assert_allclose(got["x0_mse"], expected, rtol=1e-6)
    abar = np.cumprod(1 - jd.linear_betas(T, 1e-3, 0.2))
    ratio2 = abar / (1 - abar)  # alpha_t^2 / sigma_t^2
    for b in range(n):
        per_t = ratio2[4 * b : 4 * b + 4] * (b + 1) ** 2
        assert per_t.min() * (1 - 1e-5) <= got["eps_mse"][b] <= per_t.max() * (1 + 1e-5)


_T_PLUS_ONE: dict = {}


def _t_plus_one_losses(monkeypatch, draws, seed):
    """own_mse of an x0-model with output t + 1 on 16 zero digits (x0 = 0): a draw's error is
    mean_i (t_i + 1)^2; T = 8 in 2 buckets of 4 steps. Memoised across the tests (one compile
    per (draws, seed))."""
    if (draws, seed) not in _T_PLUS_ONE:
        images = {"test_images": np.zeros((16, 1, 1, 1))}
        monkeypatch.setattr(common, "_reference", lambda size: images)
        schedule = jd.Schedule.from_betas(jd.linear_betas(8, 1e-3, 0.2))
        model = _Model(lambda x, t: jnp.broadcast_to((t + 1.0)[:, None, None, None], x.shape))
        run = _run(schedule=schedule, model=model, prediction="x0")
        out = common.loss_by_t_bucket(run, num_buckets=2, draws=draws, seed=seed)
        _T_PLUS_ONE[draws, seed] = out["own_mse"]
    return _T_PLUS_ONE[draws, seed]


def test_loss_by_t_bucket_draws_t_per_digit_and_uses_the_seed(monkeypatch):
    # each digit gets its own t, so a bucket's error is not that of one t; another seed, other t
    one = _t_plus_one_losses(monkeypatch, 1, 0)
    for b in range(2):
        single_t = [(t + 1.0) ** 2 for t in range(4 * b, 4 * b + 4)]
        assert min(single_t) < one[b] < max(single_t)
        assert not np.isclose(one[b], single_t, rtol=1e-6).any()
    assert not np.isclose(_t_plus_one_losses(monkeypatch, 1, 1), one, rtol=1e-6).any()


def test_loss_by_t_bucket_draws_are_fresh(monkeypatch):
    # independent draws: averaging two does not reproduce the one-draw number
    one, two = _t_plus_one_losses(monkeypatch, 1, 0), _t_plus_one_losses(monkeypatch, 2, 0)
    assert not np.isclose(two, one, rtol=1e-6).any()


# ------------------------------------------------------------------------------ sampling


def _fake_samplers(monkeypatch):
    calls = {}

    def record(name):
        def fake(model_fn, schedule, x_T, *args, **kw):
            calls[name] = (schedule, args, kw)
            return model_fn(x_T, jnp.zeros(x_T.shape[0], jnp.int32))

        return fake

    for name in ("ddpm_sample", "ddim_sample", "dpm_solver_pp_sample"):
        monkeypatch.setattr(common.samplers, name, record(name))

    def cfg(model_fn, w, null_label, *, y, variance, guidance_rescale=0.0):
        calls["cfg"] = (w, null_label, y, variance)
        calls["rescale"] = guidance_rescale
        return lambda x, t: model_fn(x, t, y) * w

    monkeypatch.setattr(common.samplers, "classifier_free_guidance", cfg)
    return calls


def test_sampler_fn_dispatch(monkeypatch):
    calls = _fake_samplers(monkeypatch)
    run = _run(T=10, prediction="v", variance="fixed_large")
    x = jnp.ones((2, 2, 2, 1))
    rng = jax.random.PRNGKey(0)
    common_kw = dict(prediction="v", variance="fixed_small", clip_denoised=False)
    fn = common._sampler_fn(run, ("ddpm", 4, 0.0, "fixed_small", False, 0.0))
    np.testing.assert_allclose(fn(run.params, x, rng, None, 1.0), 2.0 * x)  # EMA params
    _, args, kw = calls["ddpm_sample"]
    # fewer steps than T: the trailing respacing
    np.testing.assert_array_equal(kw.pop("timesteps"), jd.sampling_timesteps(10, 4, "trailing"))
    assert kw == common_kw and len(args) == 1
    assert common._sampler_fn(run, ("ddpm", 4, 0.0, "fixed_small", False, 0.0)) is fn  # cached
    common._sampler_fn(run, ("ddpm", 10, 0.0, "fixed_small", False, 0.0))(
        run.params, x, rng, None, 1
    )
    assert calls["ddpm_sample"][2]["timesteps"] is None  # all T steps
    common._sampler_fn(run, ("ddim", 5, 0.5, "fixed_small", False, 0.0))(
        run.params, x, rng, None, 1
    )
    kw = calls["ddim_sample"][2]
    assert kw == {**common_kw, "num_steps": 5, "eta": 0.5, "spacing": "trailing"}
    common._sampler_fn(run, ("dpm++", 10, 0.0, "fixed_small", False, 0.0))(
        run.params, x, rng, None, 1
    )
    assert calls["dpm_solver_pp_sample"][2] == {**common_kw, "num_steps": 9}  # at most T - 1


def test_sampler_fn_guided(monkeypatch):
    calls = _fake_samplers(monkeypatch)
    run = _run(T=10, num_classes=3)
    x = jnp.ones((2, 2, 2, 1))
    y = jnp.asarray([1, 2], jnp.int32)
    fn = common._sampler_fn(run, ("ddim", 5, 0.0, "fixed_large", True, 0.0))
    got = fn(run.params, x, jax.random.PRNGKey(0), y, jnp.float32(3.0))
    w, null, labels, variance = calls["cfg"]
    # null label = num_classes; the guidance splits the output by the trained variance
    assert null == 3 and variance == "fixed_small"
    assert calls["ddim_sample"][2]["variance"] == "fixed_large"  # sampling uses the override
    # the guided model: the network with the requested labels, scaled by the fake's w
    np.testing.assert_allclose(got, 3.0 * (2.0 * x + y[:, None, None, None]))
    assert calls["rescale"] == 0.0
    common._sampler_fn(run, ("ddim", 5, 0.0, "fixed_large", True, 0.7))(
        run.params, x, jax.random.PRNGKey(0), y, jnp.float32(3.0)
    )
    assert calls["rescale"] == 0.7


def _fake_sampler_fn(monkeypatch, transform=lambda x: x):
    calls = []

    def factory(run, key):
        def fn(params, x_T, rng, labels, w):
            calls.append((key, np.asarray(x_T), np.asarray(rng), labels, np.asarray(w)))
            return transform(x_T)

        return fn

    monkeypatch.setattr(common, "_sampler_fn", factory)
    return calls


def test_draw_samples_keys_and_batches(monkeypatch):
    calls = _fake_sampler_fn(monkeypatch)
    run = _run(T=8, variance="fixed_large")
    samples, seconds = common.draw_samples(run, num=7, num_steps=50, seed=3, batch_size=3)
    assert samples.shape == (7, 2, 2, 1) and seconds >= 0
    assert len(calls) == 3  # ceil(7 / 3) batches
    key = jax.random.PRNGKey(3)
    for i, (sampler_key, x_T, rng, labels, w) in enumerate(calls):
        # the config's variance; steps clipped to T; unguided
        assert sampler_key == ("ddim", 8, 0.0, "fixed_large", False, 0.0)
        assert labels is None and w == 1.0
        x_rng, s_rng = jax.random.split(jax.random.fold_in(key, i))  # batch i: fold_in(key, i)
        np.testing.assert_array_equal(x_T, jax.random.normal(x_rng, (3, 2, 2, 1)))
        np.testing.assert_array_equal(rng, s_rng)
    np.testing.assert_array_equal(samples, np.concatenate([c[1] for c in calls])[:7])
    # memo: the same draw again is not resampled
    again, _ = common.draw_samples(run, num=7, num_steps=50, seed=3, batch_size=3)
    assert len(calls) == 3 and again is samples
    common.draw_samples(run, num=7, num_steps=50, seed=4, batch_size=3)
    assert len(calls) == 6 and not np.array_equal(calls[3][1], calls[0][1])


def test_draw_samples_labels_and_guidance(monkeypatch):
    calls = _fake_sampler_fn(monkeypatch)
    run = _run(T=50, num_classes=3)
    common.draw_samples(run, num=5, batch_size=2, guidance=2.5, sampler="ddpm", num_steps=20)
    assert [c[0] for c in calls] == [("ddpm", 20, 0.0, "fixed_small", True, 0.0)] * 3
    got = [np.asarray(c[3]) for c in calls]
    assert all(y.dtype == np.int32 and y.shape == (2,) for y in got)
    # default labels arange % classes, batch by batch
    np.testing.assert_array_equal(np.concatenate(got)[:5], np.arange(5) % 3)
    assert all(c[4] == np.float32(2.5) for c in calls)
    calls.clear()
    common.draw_samples(run, num=2, guidance=2.5, guidance_rescale=0.7)  # phi: in the key
    assert calls[0][0] == ("ddim", 50, 0.0, "fixed_small", True, 0.7)
    calls.clear()
    labels = np.array([2, 0, 1, 1, 0])
    common.draw_samples(run, num=5, batch_size=2, labels=labels)
    np.testing.assert_array_equal(np.concatenate([c[3] for c in calls])[:5], labels)
    assert all(c[4] == 1.0 for c in calls)  # guidance None: w = 1, the conditional model
    # the same settings with the default labels: drawn again for those (a labelled draw is
    # not memoised under a key that lacks its labels)
    calls.clear()
    common.draw_samples(run, num=5, batch_size=2)
    np.testing.assert_array_equal(np.concatenate([c[3] for c in calls])[:5], np.arange(5) % 3)


def test_draw_samples_rejects_non_finite(monkeypatch):
    _fake_sampler_fn(monkeypatch, lambda x: x.at[0, 0, 0, 0].set(jnp.nan))
    with pytest.raises(FloatingPointError, match="not finite"):
        common.draw_samples(_run(), num=3)


# ------------------------------------------------------------------------------ run set-up


def test_parse_defaults_and_smoke_steps():
    p = common.parse_args("x", num_samples=500)
    a = common.parse(p, [])
    assert (a.workdir, a.out, a.steps, a.num_samples, a.bpd_examples, a.seed, a.smoke) == (
        "/tmp/exp",
        "experiments/results",
        2000,
        500,
        100,
        0,
        False,
    )
    assert common.parse(p, ["--smoke"]).steps == 2
    a = common.parse(p, ["--smoke", "--steps", "5", "--num-samples", "4", "--seed", "7"])
    assert (a.steps, a.num_samples, a.seed) == (5, 4, 7)
    assert common.parse(common.parse_args("x"), []).num_samples == 1000
    assert common.parse(common.parse_args("x", bpd_examples=50), []).bpd_examples == 50
    with pytest.raises(SystemExit):
        common.parse(p, ["--steps", "0"])
    # one example has no standard error (experiments.tables crashed on its None)
    with pytest.raises(SystemExit):
        common.parse(p, ["--bpd-examples", "1"])
    assert common.parse(p, ["--bpd-examples", "2"]).bpd_examples == 2
    # the scripts that measure no bits/dim take no --bpd-examples (they ignored it)
    no_bpd = common.parse_args("x", bpd_examples=None)
    assert "bpd_examples" not in vars(common.parse(no_bpd, []))
    with pytest.raises(SystemExit):
        common.parse(no_bpd, ["--bpd-examples", "5"])


def test_train_run_records_no_training_time_for_a_run_it_only_restored(tmp_path, monkeypatch):
    # a finished run without done.json (killed after its last checkpoint) is restored and not
    # trained; its done.json used to record the restore's seconds as "train_seconds" and
    # "reused": False (experiments/results/sampler_sweep.json: 0.0014 s for 2000 steps)
    config = common.make_config({}, steps=2, smoke=True)
    summaries = iter(
        [
            {"start_step": 0, "final_step": 2, "seconds": 7.5, "final_loss": 0.9},
            {"start_step": 2, "final_step": 2, "seconds": 0.8, "final_loss": 0.9},
        ]
    )
    monkeypatch.setattr(common, "train_and_evaluate_quiet", lambda cfg, wd: next(summaries))
    first = common.train_run(str(tmp_path), config)
    assert (first["train_seconds"], first["reused"]) == (7.5, False)
    os.remove(tmp_path / "done.json")
    second = common.train_run(str(tmp_path), config)
    assert (second["train_seconds"], second["reused"], second["steps"]) == (None, True, 2)
    with open(tmp_path / "done.json") as f:
        assert json.load(f)["train_seconds"] is None


def test_train_run_of_a_resumed_run_is_not_reused_and_has_no_training_time(tmp_path, monkeypatch):
    # resumed at step 1 of 2 (killed mid-run): it trained, so it is not "reused", but its
    # seconds time only the last step, so no training time is recorded either
    config = common.make_config({}, steps=2, smoke=True)
    summary = {"start_step": 1, "final_step": 2, "seconds": 3.0, "final_loss": 0.9}
    monkeypatch.setattr(common, "train_and_evaluate_quiet", lambda cfg, wd: summary)
    info = common.train_run(str(tmp_path), config)
    assert (info["train_seconds"], info["reused"], info["steps"]) == (None, False, 2)


def test_make_config():
    from experiments.configs import default, digits_cond

    c = common.make_config({"diffusion.prediction": "v"}, steps=2000, smoke=False)
    base = default.get_config(None)
    assert c.train.num_steps == 2000 and c.train.checkpoint_every == 2000
    assert c.train.log_every == 100
    assert c.train.warmup_steps == min(base.train.warmup_steps, 1000)
    assert c.diffusion.prediction == "v"
    assert c.model.base_channels == base.model.base_channels  # not the smoke model
    c = common.make_config({}, steps=3, smoke=True, conditional=True)
    smoke = digits_cond.get_config("smoke")
    assert c.model.num_classes == smoke.model.num_classes is not None
    assert c.diffusion.num_timesteps == smoke.diffusion.num_timesteps
    assert (c.train.log_every, c.train.checkpoint_every, c.train.warmup_steps) == (3, 3, 1)
    c = common.make_config({}, steps=10, smoke=False)  # a short run: warmup half the steps
    assert (c.train.log_every, c.train.checkpoint_every, c.train.warmup_steps) == (10, 10, 5)


def test_run_dir_and_run_info():
    assert common.run_dir("/w", "param_eps", False) == os.path.join("/w", "param_eps")
    assert common.run_dir("/w", "param_eps", True) == os.path.join("/w", "param_eps_smoke")
    c = common.make_config(
        {"diffusion.prediction": "x0", "diffusion.variance": "fixed_large"}, steps=9, smoke=True
    )
    info = common.run_info(c, {"workdir": "/w", "final_loss": 0.5})
    assert info == {
        "workdir": "/w",
        "final_loss": 0.5,
        "prediction": "x0",
        "variance": "fixed_large",
        "weighting": c.diffusion.weighting,
        "num_steps": 9,
        "batch_size": c.train.batch_size,
        "base_channels": c.model.base_channels,
        "num_timesteps": c.diffusion.num_timesteps,
    }


# ------------------------------------------------------------------------------ output


def test_finite():
    assert common._finite({"a": [1.0, (2, "x", None)], "b": {"c": True}})
    for bad in (math.nan, math.inf, -math.inf, np.float32("nan"), np.float64("inf")):
        assert not common._finite({"a": [1.0, {"b": (0.0, bad)}]})


def test_write_json(tmp_path, capsys):
    out = str(tmp_path / "new")
    path = common.write_json(out, "r", {"a": np.float32(0.5), "b": [1, 2.25]})
    assert path == os.path.join(out, "r.json")
    with open(path) as f:
        text = f.read()
    assert json.loads(text) == {"a": 0.5, "b": [1, 2.25]} and '\n  "a": 0.5' in text
    assert "warning" not in capsys.readouterr().out
    common.write_json(out, "bad", {"a": [1.0, np.float32("nan")]})
    assert "non-finite" in capsys.readouterr().out
    common.write_json(out, "bad", {"a": {"b": math.inf}})
    assert "non-finite" in capsys.readouterr().out


# ------------------------------------------------------------------------------ tables
# expected lines are the README's published tables for the README's numbers


def _sep(n):
    return "|" + "---|" * n


def test_table_format():
    got = tables._table(["a", "b", "c", "d", "e"], [["x", 0.0712345, 4011.4, -1234.6, 7]])
    assert got.splitlines() == [
        "| a | b | c | d | e |",
        _sep(5),
        "| x | 0.0712 | 4011 | -1235 | 7 |",
    ]
    assert tables._table(["a"], [[999.4], [1000.0], [12.34], [-0.5]]).splitlines()[2:] == [
        "| 999 |",
        "| 1000 |",
        "| 12.3 |",
        "| -0.5 |",
    ]


def _param_model(v, losses):
    keys = ("fd_train", "fd_test", "precision", "recall", "inception_score", "bpd", "bpd_stderr")
    m = dict(zip(keys + ("bpd_kl", "bpd_decoder"), v[:9], strict=True))
    m["run"] = {"final_loss": v[9]}
    m["loss_by_t"] = {"bucket_edges": [0, 100, 1000], **losses}
    return m


def test_parameterization_table():
    r = {
        "models": {
            "eps": _param_model(
                [4.891, 32.44, 0.7091, 0.8149, 8.912, 5.0412, 0.04912, 3.931, 1.109, 0.1291],
                {
                    "own_mse": [0.446, 0.00271],
                    "eps_mse": [0.4461, 0.0027],
                    "x0_mse": [0.0042, 4011.3],
                },
            ),
            "x0": _param_model(
                [5.26, 31.4, 0.686, 0.838, 8.77, 141.2, 22.3, 26.6, 115.1, 0.132],
                {"own_mse": [0.00511, 0.293], "eps_mse": [1.56, 0.00229], "x0_mse": [0.0051, 0.29]},
            ),
        },
        "ode_bpd_paired": {
            "eps - v": {"mean": -0.08199, "stderr": 0.015717, "fraction_below_0": 0.72}
        },
    }
    # the ODE columns of a model that has them; blank for one that has not (older results)
    r["models"]["eps"].update(ode_bpd=4.4254, ode_bpd_stderr=0.04051, ode_bpd_256=4.4304)
    head = "| prediction | fd_train | fd_test | precision | recall | IS | bits/dim | (KL terms) "
    bt = ["| t | 0-99 | 100-999 |", _sep(3)]
    assert tables.parameterization(r).splitlines() == [
        head + "| (decoder L_0) | bits/dim, ODE | (ODE, 256 steps) | final train loss |",
        _sep(12),
        "| eps | 4.89 | 32.4 | 0.709 | 0.815 | 8.91 | 5.04 ± 0.049 | 3.93 | 1.11 | 4.43 ± 0.041 "
        "| 4.43 | 0.129 |",
        "| x0 | 5.26 | 31.4 | 0.686 | 0.838 | 8.77 | 141 ± 22 | 26.6 | 115 |  |  | 0.132 |",
        "",
        "| ODE bits/dim, per digit | mean | stderr | fraction < 0 |",
        _sep(4),
        "| eps - v | -0.082 | 0.0157 | 0.72 |",
        "",
        "own_mse per t bucket (test digits):",
        "",
        *bt,
        "| eps | 0.446 | 0.00271 |",
        "| x0 | 0.00511 | 0.293 |",
        "",
        "eps_mse per t bucket (test digits):",
        "",
        *bt,
        "| eps | 0.446 | 0.0027 |",
        "| x0 | 1.56 | 0.00229 |",
        "",
        "x0_mse per t bucket (test digits):",
        "",
        *bt,
        "| eps | 0.0042 | 4011 |",
        "| x0 | 0.0051 | 0.29 |",
    ]


def test_sampler_sweep_table():
    def row(sampler, n, steps, fd, p, r):
        return dict(sampler=sampler, num_samples=n, steps=steps, fd_train=fd, precision=p, recall=r)

    r = {
        "rows": [
            row("ddpm", 500, 20, 6.59, 0.772, 0.717),
            row("ddpm", 500, 10, 12.2, 0.808, 0.721),
            row("dpm++", 500, 10, 6.78, 0.722, 0.838),
            row("ddpm", 200, 1000, 13.1, 0.69, 0.798),
            row("dpm++", 200, 999, 14.3, 0.675, 0.886),
        ]
    }
    assert tables.sampler_sweep(r).splitlines() == [
        "| fd_train, N=500 | 10 steps | 20 steps |",
        _sep(3),
        "| ddpm | 12.2 | 6.59 |",
        "| dpm++ | 6.78 |  |",
        "",
        "| precision, N=500 | 10 steps | 20 steps |",
        _sep(3),
        "| ddpm | 0.808 | 0.772 |",
        "| dpm++ | 0.722 |  |",
        "",
        "| recall, N=500 | 10 steps | 20 steps |",
        _sep(3),
        "| ddpm | 0.721 | 0.717 |",
        "| dpm++ | 0.838 |  |",
        "",
        "| fd_train, N=200 | 999 steps | 1000 steps |",
        _sep(3),
        "| ddpm |  | 13.1 |",
        "| dpm++ | 14.3 |  |",
        "",
        "| precision, N=200 | 999 steps | 1000 steps |",
        _sep(3),
        "| ddpm |  | 0.69 |",
        "| dpm++ | 0.675 |  |",
        "",
        "| recall, N=200 | 999 steps | 1000 steps |",
        _sep(3),
        "| ddpm |  | 0.798 |",
        "| dpm++ | 0.886 |  |",
    ]


def _q(fd, p, r, n=500):
    return {"fd_train": fd, "precision": p, "recall": r, "num_samples": n}


def test_variance_loss_table():
    bt = {"bucket_edges": [0, 500, 1000]}
    r = {
        "variance": {
            "fixed_small": {
                "bpd": 4.951,
                "bpd_stderr": 0.0631,
                "bpd_decoder": 1.111,
                "ddpm100": _q(5.79, 0.741, 0.781),
                "ddpm1000": _q(67.2, 0.7, 0.91, 50),
            },
            "fixed_large": {
                "bpd": 4.79,
                "bpd_stderr": 0.057,
                "bpd_decoder": 1.108,
                "ddpm100": _q(5.74, 0.73, 0.77),
                "ddpm1000": _q(67.21, 0.7, 0.91, 50),
            },
        },
        "models": {
            "simple": {
                "bpd": 4.95,
                "bpd_stderr": 0.063,
                "ddim50": _q(6.72, 0.70, 0.86),
                "ddpm100": _q(5.79, 0.74, 0.78),
                "run": {"final_loss": 0.129},
                "loss_by_t": {**bt, "eps_mse": [0.446, 0.00271], "x0_mse": [9.0, 9.0]},
            },
            "min_snr5": {
                "bpd": 6.44,
                "bpd_stderr": 0.065,
                "ddim50": _q(7.2, 0.76, 0.82),
                "ddpm100": _q(7.3, 0.78, 0.73),
                "run": {"final_loss": 0.0695},
                "loss_by_t": {**bt, "eps_mse": [0.55, 0.00262], "x0_mse": [9.0, 9.0]},
            },
        },
    }
    assert tables.variance_loss(r).splitlines() == [
        "| sigma^2 | bits/dim | (decoder L_0) | ddpm100 (N=500): fd_train / P / R "
        "| ddpm1000 (N=50): fd_train / P / R |",
        _sep(5),
        "| fixed_small | 4.95 ± 0.063 | 1.11 | 5.79 / 0.74 / 0.78 | 67.2 / 0.70 / 0.91 |",
        "| fixed_large | 4.79 ± 0.057 | 1.11 | 5.74 / 0.73 / 0.77 | 67.2 / 0.70 / 0.91 |",
        "",
        "| objective | bits/dim | ddim50: fd_train / P / R | ddpm100: fd_train / P / R "
        "| final train loss |",
        _sep(5),
        "| simple | 4.95 ± 0.063 | 6.72 / 0.70 / 0.86 | 5.79 / 0.74 / 0.78 | 0.129 |",
        "| min_snr5 | 6.44 ± 0.065 | 7.2 / 0.76 / 0.82 | 7.3 / 0.78 / 0.73 | 0.0695 |",
        "",
        "eps_mse per t bucket (test digits):",
        "",
        "| t | 0-499 | 500-999 |",
        _sep(3),
        "| simple | 0.446 | 0.00271 |",
        "| min_snr5 | 0.55 | 0.00262 |",
    ]


def _guidance_results():
    keys = ("guidance", "class_accuracy", "fd_train", "precision", "recall", "inception_score")
    rows = [
        (0.0, 0.126, 14.8, 0.612, 0.875, 7.97, 463.2),
        (1.0, 0.968, 4.08, 0.782, 0.768, 9.59, 177.0),
    ]
    return {
        "command": "python3 -m experiments.guidance --num-samples 500",
        "wall_seconds": 432.0,
        "rows": [{**dict(zip(keys, r[:6], strict=True)), "within_class_var": r[6]} for r in rows],
        "reference": {"within_class_var_train": 188.2, "fd_train_vs_test": 29.64},
    }


def test_guidance_table():
    assert tables.guidance(_guidance_results()).splitlines() == [
        "| w | class_accuracy | fd_train | precision | recall | inception_score "
        "| within-class var (train digits: 188) |",
        _sep(7),
        "| 0 | 0.126 | 14.8 | 0.612 | 0.875 | 7.97 | 463 |",
        "| 1 | 0.968 | 4.08 | 0.782 | 0.768 | 9.59 | 177 |",
    ]


def test_tables_main(tmp_path, capsys):
    with open(tmp_path / "guidance.json", "w") as f:
        json.dump(_guidance_results(), f)
    tables.main(["--out", str(tmp_path)])  # the other three JSONs are missing: skipped
    out = capsys.readouterr().out
    assert out.startswith(
        "## guidance\n\n`python3 -m experiments.guidance --num-samples 500` (7.2 min)\n\n| w |"
    )
    assert "\nfd_train_vs_test (real train vs real test digits): 29.6\n" in out
    assert "## parameterization" not in out


def test_classifier_guidance_table():
    def row(s, acc, fd, p, r, is_, wcv):
        return dict(
            scale=s,
            class_accuracy=acc,
            fd_train=fd,
            precision=p,
            recall=r,
            inception_score=is_,
            within_class_var=wcv,
        )

    r = {
        "num_samples": 500,
        "rows": [
            row(0.0, 0.134, 7.805, 0.73, 0.8653, 8.8926, 476.88),
            row(2.0, 0.954, 5.0775, 0.776, 0.70707, 9.5902, 171.03),
        ],
        "reference": {"within_class_var_train": 188.2},
        "classifier": {
            "steps": 4000,
            "train_seconds": 20.53,
            "final_loss": 0.86532,
            "accuracy_by_t": {
                "bucket_edges": [0, 500, 1000],
                "accuracy": [0.8, 0.3521],
                "log_prob": [-0.2113, -1.8441],
            },
        },
    }
    head = "| s | class_accuracy | fd_train | precision | recall | inception_score | "
    assert tables.classifier_guidance(r).splitlines() == [
        "N = 500:",
        "",
        head + "within-class var (train digits: 188) |",
        _sep(7),
        "| 0 | 0.134 | 7.8 | 0.73 | 0.865 | 8.89 | 477 |",
        "| 2 | 0.954 | 5.08 | 0.776 | 0.707 | 9.59 | 171 |",
        "",
        "noise-aware classifier (4000 steps, 21 s, final loss 0.865) on noised test digits per t "
        "bucket:",
        "",
        "| t | 0-499 | 500-999 |",
        _sep(3),
        "| accuracy | 0.8 | 0.352 |",
        "| log p(y) | -0.211 | -1.84 |",
    ]


def test_inpainting_table():
    quality = dict(fd_train=15.79, precision=0.7811, recall=0.8722)
    r = {
        "inpainting": [
            dict(
                mask="right_half", method="intact", class_accuracy=0.96, mse_hidden=0.0, **quality
            ),
            dict(
                mask="right_half",
                method="repaint_r4",
                model_calls=370,
                class_accuracy=0.6303,
                mse_hidden=0.37961,
                **quality,
            ),
        ],
        "sdedit_guides": dict(l2_to_guide=0.0, class_accuracy=0.35, **quality),
        "sdedit": [dict(strength=0.2, t0=199, l2_to_guide=0.3712, class_accuracy=0.293, **quality)],
    }
    head = "| hidden | method | model calls | accuracy | MSE (hidden half) | fd_train | precision "
    assert tables.inpainting(r).splitlines() == [
        head + "| recall |",
        _sep(8),
        "| right_half | intact |  | 0.96 | 0 | 15.8 | 0.781 | 0.872 |",
        "| right_half | repaint_r4 | 370 | 0.63 | 0.38 | 15.8 | 0.781 | 0.872 |",
        "",
        "| SDEdit strength | t0 | RMS to guide | accuracy | fd_train | precision | recall |",
        _sep(7),
        "| guide itself |  | 0 | 0.35 | 15.8 | 0.781 | 0.872 |",
        "| 0.2 | 199 | 0.371 | 0.293 | 15.8 | 0.781 | 0.872 |",
    ]


def test_controlnet_table():
    quality = dict(class_accuracy=0.5, fd_test=13.75, fd_train=9.234, precision=0.7, recall=0.81)
    r = {
        "guides": dict(l2_layout=0.0, **quality),
        "rows": [
            dict(method="unconditional", l2_layout=0.5021, **quality),
            dict(method="sdedit", strength=0.8, l2_layout=0.3561, **quality),
            dict(method="controlnet", scale=1.0, l2_layout=0.1234, **quality),
        ],
        "training": dict(train_steps=1500, train_seconds=412.4, final_loss=0.21234),
    }
    assert tables.controlnet(r).splitlines() == [
        "| method | RMS to guide (pixelated) | accuracy | fd_test | fd_train | precision "
        + "| recall |",
        _sep(7),
        "| guides themselves | 0 | 0.5 | 13.8 | 9.23 | 0.7 | 0.81 |",
        "| unconditional | 0.502 | 0.5 | 13.8 | 9.23 | 0.7 | 0.81 |",
        "| sdedit, strength 0.8 | 0.356 | 0.5 | 13.8 | 9.23 | 0.7 | 0.81 |",
        "| controlnet, scale 1 | 0.123 | 0.5 | 13.8 | 9.23 | 0.7 | 0.81 |",
        "",
        "ControlNet: 1500 steps, 412 s, final loss 0.212",
    ]
