"""Training: smoke runs of every config, data parallelism, exact resume, the NaN guard, CLI."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import CONFIGS, SUBPROCESS_XLA_FLAGS, leaves, smoke

from jax_diffusion import cli, samplers, train, train_state
from jax_diffusion import data as data_lib
from jax_diffusion.checkpoints import CheckpointManager

ROOT = pathlib.Path(__file__).resolve().parents[1]


def assert_trees_equal(a, b):
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name", ["default.py", "digits_cond.py", "toy_2d.py", "flow.py"])
def test_smoke_training_for_each_config(tmp_path, name, monkeypatch):
    config = smoke(name)
    meshes, sample = [], train.sample

    def recording_sample(*args, mesh=None, **kwargs):
        meshes.append(mesh)
        return sample(*args, mesh=mesh, **kwargs)

    monkeypatch.setattr(train, "sample", recording_sample)
    summary = train.train_and_evaluate(config, str(tmp_path))
    assert [m.size for m in meshes] == [8]  # the final grid, split over the devices
    assert summary["final_step"] == config.train.num_steps
    assert np.isfinite(summary["final_loss"])
    assert os.path.isfile(summary["samples"])
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == config.train.num_steps
    assert {"loss", "grad_norm", "images_per_sec"} <= set(json.loads(lines[-1]))
    assert any(p.name.startswith("events") for p in (tmp_path / "tensorboard").iterdir())
    assert CheckpointManager(str(tmp_path)).latest_step() == config.train.num_steps


@pytest.mark.parametrize("process", ["ddpm", "flow"])
def test_data_parallel_equals_single_device(process):
    # The train step's sharding does not depend on the network: the toy config's MLP compiles
    # its three steps in a fraction of the UNet's time. The UNet's data-parallel runs are
    # run in the TPU notebook's test.
    assert jax.device_count() == 8
    config = smoke("toy_2d.py", diffusion__process=process)
    assert config.train.batch_size == 16
    schedule = train.get_schedule(config.diffusion)
    model = train.create_model(config, channels=2)
    it, _ = data_lib.get_dataset(config.data, global_batch_size=16, seed=0)
    batches = [next(it) for _ in range(3)]
    results = []
    # one device; 8 devices; 8 devices with the network run on 2 strided micro-batches
    for devices, chunks in ((jax.devices()[:1], 1), (jax.devices(), 1), (jax.devices(), 2)):
        config.train.microbatches = chunks
        mesh = train.make_mesh(devices)
        state = train.create_train_state(config, model, jax.random.PRNGKey(0), (2,))
        state = jax.device_put(
            state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        )
        step, batch_sharding = train._jit_train_step(
            train.make_train_step(config, schedule), mesh, state
        )
        if chunks > 1:  # strided chunks split every device's block locally: no resharding
            hlo = step.lower(state, batches[0]).compile().as_text()
            assert "all-to-all" not in hlo and "collective-permute" not in hlo
        for b in batches:
            batch = {k: jax.device_put(b[k], batch_sharding) for k in ("image", "label")}
            state, metrics = step(state, batch)
        net_params = state.params["net"] if process == "flow" else state.params  # FlowDenoiser
        assert len(net_params["dense_in"]["kernel"].sharding.device_set) == len(devices)
        results.append((state, metrics))
    (s1, m1), *others = results
    for s8, m8 in others:
        np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
        # Adam divides by sqrt(v): where a gradient is ~0, float32 reduction-order noise moves
        # a param by a fraction of one lr-sized step (lr 2e-3 here), hence atol 1e-5 = 0.5% of it.
        for a, b in zip(leaves(s1.params), leaves(s8.params), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_micro_batches_run_one_after_another():
    """Chunk j + 1 starts after chunk j's gradient, so XLA reuses the activation memory: the
    compiled step's temporaries shrink with the number of chunks, and the value is the same."""
    widths = (64, 256, 256, 256, 1)
    keys = jax.random.split(jax.random.key(0), len(widths))
    params = [
        jax.random.normal(keys[i], (a, b)) / a**0.5
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True))
    ]
    x = jax.random.normal(keys[-1], (2048, widths[0]))

    def loss_fn(params, x, rng):
        for w in params:
            x = jnp.tanh(x @ w)
        return jnp.mean(jnp.square(x)), {"mean": jnp.mean(x)}

    results, temps = [], []
    for chunks in (1, 4):
        step = jax.jit(
            lambda p, x, n=chunks: train._accumulated_value_and_grad(
                loss_fn, p, (x,), jax.random.key(1), n
            )
        )
        temps.append(step.lower(params, x).compile().memory_analysis().temp_size_in_bytes)
        results.append(step(params, x))
    activations = 2048 * sum(widths[1:]) * 4  # bytes of the saved tanh outputs, whole batch
    assert temps[0] > activations and temps[1] < temps[0] - activations / 2, temps
    # about the temporaries of batch / 4 (1.2x measured): chunk j + 1 waits for chunk j's
    # gradient, not only its loss (waiting for the loss alone let the chunks' backward passes
    # overlap: 1.8x)
    assert temps[1] < 1.5 * temps[0] / 4, temps
    for a, b in zip(leaves(results[0]), leaves(results[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("num_chunks", [1, 2, 4])
def test_micro_batch_j_draws_from_its_own_key_fold_in_rng_j(num_chunks):
    """Chunk j's loss gets fold_in(rng, j) (rng itself for one chunk): chunks sharing one key
    would drop the same units (dropout) in every micro-batch of a step."""
    rng = jax.random.PRNGKey(3)
    x = jnp.linspace(0.5, 2.0, 8)
    index = jnp.arange(8)  # chunk j holds examples j, j + n, j + 2n, ...: index[0] = j

    def loss_fn(params, x, index, key):
        u = jax.random.uniform(key)  # the chunk's one random draw
        # aux: u in the chunk's own slot, so the mean over chunks keeps every chunk's draw
        return jnp.mean(params["w"] * x) * u, {"u": jax.nn.one_hot(index[0], num_chunks) * u}

    run = jax.jit(
        lambda params, x, index, rng: train._accumulated_value_and_grad(
            loss_fn, params, (x, index), rng, num_chunks
        )
    )
    loss, aux, grads = run({"w": jnp.float32(1.5)}, x, index, rng)
    keys = [rng] if num_chunks == 1 else [jax.random.fold_in(rng, j) for j in range(num_chunks)]
    u = np.array([float(jax.random.uniform(k)) for k in keys], np.float64)
    assert len(set(u)) == num_chunks
    np.testing.assert_allclose(np.asarray(aux["u"]) * num_chunks, u, rtol=1e-6)
    # mean over chunks of u_j * mean(x of chunk j), and its derivative in w
    chunk_means = np.asarray(x, np.float64).reshape(-1, num_chunks).mean(axis=0)
    np.testing.assert_allclose(grads["w"], np.mean(u * chunk_means), rtol=1e-6)
    np.testing.assert_allclose(loss, 1.5 * np.mean(u * chunk_means), rtol=1e-6)


def test_consecutive_train_steps_draw_fresh_t_noise_and_dropout_keys():
    """Step k's randomness comes from fold_in(state.rng, k): the next step draws new t, noise
    and dropout key, and the same step from the same state draws the same ones again."""
    seen = []

    def apply_fn(variables, x, t, y=None, train=False, rngs=None):
        # the step runs eagerly here: x_t, t and the key are concrete
        seen.append((np.asarray(x), np.asarray(t), np.asarray(rngs["dropout"])))
        return variables["params"]["w"] * x

    config = smoke()
    step = train.make_train_step(config, train.get_schedule(config.diffusion))
    state = _stub_state(apply_fn, 1.0)
    batch = {"image": jnp.full((8, 8, 8, 1), 0.5)}
    new, _ = step(state, batch)
    assert int(new.step) == 1
    step(new, batch)
    step(state, batch)
    (x0, t0, k0), (x1, t1, k1), (x2, t2, k2) = seen
    assert not np.array_equal(t0, t1), (t0, t1)  # 8 draws from 50 timesteps
    assert not np.array_equal(k0, k1)
    assert np.all(x0 != x1)  # x_t: fresh noise in every entry
    for a, b in ((x0, x2), (t0, t2), (k0, k2)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("name", "overrides"), [("default.py", {}), ("toy_2d.py", {"diffusion__process": "flow"})]
)
def test_interrupted_run_resumes_bit_identically(tmp_path, name, overrides):
    # the default smoke config as it is (2 steps): its train step is the one other tests
    # compile too; a flow run on the toy MLP (a cheap compile)
    config = smoke(name, **overrides)
    full = train.train_and_evaluate(config, str(tmp_path / "full"))
    interrupted = smoke(name, train__stop_after=1, **overrides)
    first = train.train_and_evaluate(interrupted, str(tmp_path / "resumed"))
    assert first["final_step"] == 1
    second = train.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert second["start_step"] == 1 and second["final_step"] == 2
    assert_trees_equal(full["state"].checkpoint_items(), second["state"].checkpoint_items())


class PoisonedBatches:
    """Real batches, with images of `value` (NaN) in the batches (numbered from 1) that `bad(n)`
    selects."""

    def __init__(self, it, bad, value=np.nan):
        self.it, self.bad, self.value, self.n = it, bad, value, 0

    def __next__(self):
        batch = dict(next(self.it))
        self.n += 1
        if self.bad(self.n):
            batch["image"] = np.full_like(batch["image"], self.value)
        return batch

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


def poison_batches(monkeypatch, bad, value=np.nan):
    real = data_lib.get_dataset

    def get_dataset(*args, **kwargs):
        it, info = real(*args, **kwargs)
        return PoisonedBatches(it, bad, value), info

    monkeypatch.setattr(data_lib, "get_dataset", get_dataset)


def test_non_finite_steps_are_skipped_then_training_stops(tmp_path, monkeypatch):
    config = smoke(train__num_steps=20, train__checkpoint_every=2, train__max_bad_steps=3)
    poison_batches(monkeypatch, lambda n: n > 4)  # a data pipeline that diverges
    with pytest.raises(train.TrainingDiverged, match="3 consecutive steps had a non-finite"):
        train.train_and_evaluate(config, str(tmp_path))
    ckpt = CheckpointManager(str(tmp_path))
    assert ckpt.latest_step() == 4  # the last good one; no checkpoint of the bad streak
    model = train.create_model(config, channels=1)
    fresh = train.create_train_state(config, model, jax.random.PRNGKey(0), (8, 8, 1))
    restored, _ = ckpt.restore(fresh)
    assert int(restored.bad_steps) == 0 and int(restored.skipped_steps) == 0
    assert all(np.all(np.isfinite(x)) for x in leaves(restored.params))


def test_a_finite_loss_above_train_max_loss_is_skipped_then_training_stops(tmp_path, monkeypatch):
    """A divergence that stays finite (data of 1e4 from step 3 on: the eps loss of the toy MLP
    is ~1e7) passes the non-finite guard but not train.max_loss; without max_loss the same run
    trains through it, its checkpoints taking the blown-up params."""
    poison_batches(monkeypatch, lambda n: n > 2, value=1e4)
    config = smoke("toy_2d.py", train__num_steps=8, train__checkpoint_every=1)
    config.train.max_bad_steps, config.train.keep_checkpoints = 2, None
    summary = train.train_and_evaluate(config, str(tmp_path / "unguarded"))
    assert summary["final_step"] == 8 and summary["skipped_steps"] == 0
    assert summary["final_loss"] > 1e4  # the divergence, logged and trained on
    config.train.max_loss = 1e3
    with pytest.raises(
        train.TrainingDiverged, match=r"2 consecutive steps had a .* above train.max_loss=1000.0"
    ):
        train.train_and_evaluate(config, str(tmp_path / "guarded"))
    ckpt = CheckpointManager(str(tmp_path / "guarded"))
    assert ckpt.latest_step() == 2  # the last good step's checkpoint; none of the streak
    model = train.create_model(config, channels=2)
    fresh = train.create_train_state(config, model, jax.random.PRNGKey(0), (2,))
    restored, _ = ckpt.restore(fresh)
    unguarded, _ = CheckpointManager(str(tmp_path / "unguarded")).restore(fresh, step=2)
    assert_trees_equal(restored.params, unguarded.params)  # the same run up to the streak


def test_stop_after_and_a_skipped_last_step_leave_a_resumable_run(tmp_path, monkeypatch):
    # the toy MLP (its train step compiles in ~1 s): this is about the loop around the step
    config = smoke("toy_2d.py", train__num_steps=3, train__checkpoint_every=100)
    config.train.stop_after = 1
    assert train.train_and_evaluate(config, str(tmp_path / "a"))["final_step"] == 1
    metrics = tmp_path / "a" / "metrics.jsonl"
    with metrics.open("a") as f:  # what a run killed in step 3 logged past its checkpoint
        f.write('{"step": 2, "loss": 1.0}\n{"step": 3, "lo')
    again = train.train_and_evaluate(config, str(tmp_path / "a"))  # the same command again
    assert again["start_step"] == 1 and again["final_step"] == 3
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3]

    # A non-finite last step is skipped, and the run's last checkpoint is still written: the
    # same command again finds the run complete instead of retraining the steps after the
    # last periodic checkpoint (here: all of them).
    # (the smoke run's own 2 steps: test_smoke_training_for_each_config compiles them too)
    poison_batches(monkeypatch, lambda n: n == 2)
    config = smoke("toy_2d.py", train__checkpoint_every=100)
    summary = train.train_and_evaluate(config, str(tmp_path / "b"))
    assert summary["final_step"] == 2 and summary["skipped_steps"] == 1
    assert CheckpointManager(str(tmp_path / "b")).latest_step() == 2
    rerun = train.train_and_evaluate(config, str(tmp_path / "b"))
    assert rerun["start_step"] == 2 and rerun["final_step"] == 2


def test_train_step_skips_a_nan_batch_and_counts_it():
    config = smoke()
    schedule = train.get_schedule(config.diffusion)
    model = train.create_model(config, channels=1)
    state = train.create_train_state(config, model, jax.random.PRNGKey(0), (8, 8, 1))
    # the program train_and_evaluate compiles for the smoke config (the smoke runs' persistent
    # cache entry): state replicated over the mesh, batch split over it, state donated
    mesh = train.make_mesh()
    state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    step, batch_sharding = train._jit_train_step(
        train.make_train_step(config, schedule), mesh, state
    )
    before = jax.device_get(state)  # the step donates its input state

    def batch(value):
        image = np.full((8, 8, 8, 1), value, np.float32)
        return jax.device_put({"image": image, "label": np.zeros(8, np.int32)}, batch_sharding)

    new, metrics = step(state, batch(np.nan))
    assert int(metrics["skipped"]) == 1 and int(new.bad_steps) == 1 and int(new.step) == 1
    assert int(metrics["bad_steps"]) == 1  # the streak with this step: the loop reads it
    assert_trees_equal(new.params, before.params)
    assert_trees_equal(new.opt_state, before.opt_state)
    assert_trees_equal(new.ema_params, before.ema_params)
    new_params, new_ema = jax.device_get((new.params, new.ema_params))
    newer, metrics = step(new, batch(0.0))
    assert int(metrics["skipped"]) == 0 and int(newer.bad_steps) == 0
    assert int(newer.skipped_steps) == 1
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(leaves(newer.params), leaves(new_params), strict=True)
    )
    # EMA of step 1, toward the new params: ema + (1 - d)(params - ema), with the warm-up decay
    # d = min(decay, (1 + step) / (10 + step)) of TensorFlow's ExponentialMovingAverage
    d = min(config.train.ema_decay, 2 / 11)
    for e, p, got in zip(
        leaves(new_ema), leaves(newer.params), leaves(newer.ema_params), strict=True
    ):
        want = e.astype(np.float64) + (1 - d) * (p.astype(np.float64) - e)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # skipped_steps counts every skipped step, not the current streak
    again, _ = step(newer, batch(np.nan))
    last, _ = step(again, batch(0.0))
    assert int(last.skipped_steps) == 2 and int(last.bad_steps) == 0 and int(last.step) == 4


def _stub_state(apply_fn, w):
    """A TrainState around a one-parameter stub network, for eager train-step tests."""
    import optax

    params = {"w": jnp.asarray(w, jnp.float32)}
    return train_state.TrainState.create(
        apply_fn=apply_fn, params=params, tx=optax.sgd(0.1), rng=jax.random.PRNGKey(0)
    )


def test_random_flip_feeds_the_step_the_flipped_batch_and_leaves_its_other_draws():
    """data.random_flip=True on batch X is the step without flips on
    random_flip(fold_in(fold_in(rng, k), FLIP_KEY), X): the same x_t, t and keys."""
    seen = []

    def apply_fn(variables, x, t, y=None, train=False, rngs=None):
        seen.append((np.asarray(x), np.asarray(t), np.asarray(rngs["dropout"])))
        return variables["params"]["w"] * x

    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (8, 8, 8, 1)), jnp.float32)
    state = _stub_state(apply_fn, 1.0)
    for flip in (True, False):
        config = smoke(data__random_flip=flip)
        train.make_train_step(config, train.get_schedule(config.diffusion))(
            state, {"image": images}
        )
    key = jax.random.fold_in(jax.random.fold_in(state.rng, 0), train.FLIP_KEY)
    flipped = data_lib.random_flip(key, images)
    assert 0 < int((flipped != images).any(axis=(1, 2, 3)).sum()) < 8  # some flipped, some not
    config = smoke()
    train.make_train_step(config, train.get_schedule(config.diffusion))(state, {"image": flipped})
    (x_on, t_on, k_on), (x_off, t_off, k_off), (x_want, t_want, k_want) = seen
    np.testing.assert_array_equal(x_on, x_want)
    assert not np.array_equal(x_on, x_off)
    for a, b in ((t_on, t_off), (t_on, t_want), (k_on, k_off), (k_on, k_want)):
        np.testing.assert_array_equal(a, b)


def test_a_finite_loss_with_a_non_finite_gradient_is_skipped_too():
    # output x sqrt(|w|) at w = 0: the loss is finite (output 0), its gradient is not
    def apply_fn(variables, x, t, y=None, train=False, rngs=None):
        return x * jnp.sqrt(jnp.abs(variables["params"]["w"]))

    config = smoke()
    step = train.make_train_step(config, train.get_schedule(config.diffusion))
    state = _stub_state(apply_fn, 0.0)
    new, metrics = step(state, {"image": jnp.full((8, 8, 8, 1), 0.5)})
    assert np.isfinite(float(metrics["loss"])) and not np.isfinite(float(metrics["grad_norm"]))
    assert int(metrics["skipped"]) == 1 and int(new.skipped_steps) == 1
    assert float(new.params["w"]) == 0.0 and float(new.ema_params["w"]) == 0.0


@pytest.mark.parametrize("class_dropout", [0.0, 1.0])
def test_label_dropout_in_the_train_step_uses_the_null_label_num_classes(class_dropout):
    seen = []

    def apply_fn(variables, x, t, y=None, train=False, rngs=None):
        seen.append(np.asarray(y))  # the step runs eagerly here: y is concrete
        return variables["params"]["w"] * x

    config = smoke("digits_cond.py", model__class_dropout=class_dropout)
    num_classes = config.model.num_classes
    step = train.make_train_step(config, train.get_schedule(config.diffusion))
    labels = np.arange(8) % num_classes
    step(_stub_state(apply_fn, 1.0), {"image": jnp.zeros((8, 8, 8, 1)), "label": labels})
    want = labels if class_dropout == 0 else np.full(8, num_classes)
    np.testing.assert_array_equal(seen[-1], want)


def test_ema_decay_warm_up_and_update_closed_forms():
    for s in (0, 1, 10, 1000, 10**6):
        want = min(0.9999, (1 + s) / (10 + s))
        assert float(train_state.ema_decay(s, 0.9999)) == pytest.approx(want, rel=1e-6)
    assert float(train_state.ema_decay(5, 0.9, warmup=False)) == pytest.approx(0.9)
    ema = train_state.update_ema({"w": jnp.zeros(3)}, {"w": jnp.ones(3)}, jnp.float32(0.9))
    np.testing.assert_allclose(ema["w"], 0.1, rtol=1e-6)  # 0.9 * 0 + 0.1 * 1


def test_the_train_step_s_ema_warms_up_unless_train_ema_warmup_is_false():
    # step 0's decay: min(0.9, (1 + 0) / (10 + 0)) = 0.1 with the warm-up, 0.9 without
    config = smoke("toy_2d.py", train__ema_decay=0.9)
    schedule = train.get_schedule(config.diffusion)
    model = train.create_model(config, channels=2)
    rng = np.random.default_rng(0)
    batch = {"image": rng.standard_normal((16, 2)).astype(np.float32), "label": np.zeros(16)}
    # None: a config (a run's config.json) from before train.ema_warmup existed warms up
    for warmup, d in ((True, 0.1), (False, 0.9), (None, 0.1)):
        if warmup is None:
            del config.train["ema_warmup"]
        else:
            config.train.ema_warmup = warmup
        state = train.create_train_state(config, model, jax.random.PRNGKey(0), (2,))
        new, _ = jax.jit(train.make_train_step(config, schedule))(state, batch)
        for e, p, got in zip(
            leaves(state.ema_params), leaves(new.params), leaves(new.ema_params), strict=True
        ):
            want = e.astype(np.float64) + (1 - d) * (p.astype(np.float64) - e)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=str(warmup))


def test_ema_of_bfloat16_params_follows_the_float64_recurrence():
    # bfloat16 params (a model with param_dtype=bfloat16): each update 0.001 * (p - ema) is
    # below half a bfloat16 spacing of ema = 1, so a bfloat16 average would never move
    params = {"w": jnp.ones(3, jnp.bfloat16)}
    state = train_state.TrainState.create(
        apply_fn=None, params=params, tx=optax.sgd(0.1), rng=jnp.zeros(2, jnp.uint32)
    )
    assert state.ema_params["w"].dtype == jnp.float32
    assert state.params["w"].dtype == jnp.bfloat16  # the params themselves are untouched
    ema, want = state.ema_params, 1.0
    target = {"w": jnp.asarray([0.5, 0.75, 0.875], jnp.bfloat16)}  # exact in bfloat16
    for _ in range(200):
        ema = train_state.update_ema(ema, target, 0.999)  # a Python float decay
        want = 0.999 * want + 0.001 * np.array([0.5, 0.75, 0.875])
    assert ema["w"].dtype == jnp.float32
    np.testing.assert_allclose(ema["w"], want, rtol=1e-5)


def test_ema_keeps_float64_and_integer_leaves_and_update_ema_keeps_the_ema_dtypes(x64):
    # only floats below float32 are promoted: a float64 average stays float64, and an integer
    # leaf is copied as it is, not turned into a float
    params = {
        "f64": jnp.asarray([0.1, 0.2], jnp.float64),
        "i32": jnp.arange(3, dtype=jnp.int32),
        "f16": jnp.ones(2, jnp.float16),
    }
    state = train_state.TrainState.create(
        apply_fn=None, params=params, tx=optax.sgd(0.1), rng=jnp.zeros(2, jnp.uint32)
    )
    dtypes = {k: v.dtype for k, v in state.ema_params.items()}
    assert dtypes == {"f64": jnp.float64, "i32": jnp.int32, "f16": jnp.float32}
    np.testing.assert_array_equal(state.ema_params["f64"], [0.1, 0.2])
    np.testing.assert_array_equal(state.ema_params["i32"], [0, 1, 2])
    # params of a wider dtype than the average do not widen it (the docstring's "in the EMA's
    # dtype"): 0.5 * 1 + 0.5 * 0.25 = 0.625, exact in both
    ema = {"w": jnp.ones(2, jnp.float32), "b": jnp.ones(2, jnp.bfloat16)}
    new = {"w": jnp.full(2, 0.25, jnp.float64), "b": jnp.full(2, 0.25, jnp.float32)}
    out = train_state.update_ema(ema, new, 0.5)
    assert (out["w"].dtype, out["b"].dtype) == (jnp.float32, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(out["w"], np.float64), [0.625, 0.625])
    np.testing.assert_array_equal(np.asarray(out["b"], np.float64), [0.625, 0.625])
    # a float64 average is updated in float64, the decay included (float32(0.999) is 0.999 +
    # 1e-8, which would move it off the float64 recurrence)
    out = train_state.update_ema({"w": jnp.ones(2)}, {"w": jnp.zeros(2)}, 0.999)
    np.testing.assert_allclose(out["w"], 0.999, rtol=1e-12)


def test_ema_decay_accepts_both_ends_of_0_1():
    # decay 1 freezes the average and 0 copies the params: both are documented as valid
    assert float(train_state.ema_decay(7, 1.0, warmup=False)) == 1.0
    assert float(train_state.ema_decay(7, 0.0, warmup=False)) == 0.0
    assert float(train_state.ema_decay(0, 1.0)) == pytest.approx(0.1)  # (1 + 0) / (10 + 0)


@pytest.mark.parametrize("decay", [-0.1, 1.5])
def test_ema_decay_outside_0_1_is_a_value_error_naming_it(decay):
    with pytest.raises(
        ValueError, match=rf"decay must be a finite number in \[0, 1\]; got {decay}"
    ):
        train_state.ema_decay(0, decay)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_optimizer_clips_before_adam_and_warms_up_from_lr_over_warmup(schedule):
    lr, warmup, num_steps = 1.0, 10, 20  # updates of norm up to 10: clipping them would show
    tx = train_state.make_optimizer(
        learning_rate=lr,
        num_steps=num_steps,
        warmup_steps=warmup,
        schedule=schedule,
        grad_clip=1.0,
    )
    # a constant gradient: Adam's bias-corrected moments are g and g^2 at every step, so each
    # update is -lr_k g / (|g| + eps), computed on the gradient clipped to norm 1 first
    g = np.linspace(-5.0, 5.0, 100)
    clipped = g / np.linalg.norm(g)
    params = jnp.zeros(100)
    state = tx.init(params)
    for k in range(14):
        updates, state = tx.update(jnp.asarray(g, jnp.float32), state, params)
        if k < warmup:  # linear from lr / warmup to lr (the docstring's warmup)
            lr_k = lr / warmup + (lr - lr / warmup) * k / warmup
        elif schedule == "constant":
            lr_k = lr
        else:  # cosine decay to 0 over the remaining steps
            lr_k = lr * 0.5 * (1 + np.cos(np.pi * (k - warmup) / (num_steps - warmup)))
        want = -lr_k * clipped / (np.abs(clipped) + 1e-8)
        np.testing.assert_allclose(updates, want, rtol=1e-4, atol=1e-9, err_msg=f"step {k}")


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_optimizer_of_a_run_of_0_or_1_steps_without_warmup_is_made(schedule):
    # num_steps is documented as an int >= 0, but with warmup_steps=0 the cosine schedule got
    # 0 decay steps for num_steps 0 and 1, and optax raised its own ValueError
    g, params = jnp.asarray([3.0, 4.0]), jnp.zeros(2)
    for num_steps in (0, 1):
        tx = train_state.make_optimizer(learning_rate=0.5, num_steps=num_steps, schedule=schedule)
        updates, _ = tx.update(g, tx.init(params), params)
        # no warmup: step 0 is at the peak rate, and Adam's first update is -lr g / (|g| + eps)
        np.testing.assert_allclose(updates, [-0.5, -0.5], rtol=1e-6)


def test_optimizer_with_a_negative_clip_would_ascend_so_it_is_refused():
    # what a negative grad_clip did: optax scales the gradient by clip / norm < 0, so Adam's
    # update points along +g (ascent); 0 scales it to 0 (no training)
    g, params = jnp.asarray([3.0, 4.0]), jnp.zeros(2)
    ok = train_state.make_optimizer(learning_rate=0.1, num_steps=10, grad_clip=1.0)
    updates, _ = ok.update(g, ok.init(params), params)
    assert (np.sign(updates) == -np.sign(g)).all()  # descent with a valid clip
    # NumPy and JAX scalars are numbers too
    train_state.make_optimizer(
        learning_rate=jnp.float32(0.1), num_steps=np.int64(10), grad_clip=np.float32(1.0)
    )
    for clip in (-1.0, 0.0, float("nan"), True, "1.0"):
        with pytest.raises(ValueError, match=r"grad_clip must be a finite number > 0 or None"):
            train_state.make_optimizer(learning_rate=0.1, num_steps=10, grad_clip=clip)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(learning_rate=float("inf")), r"learning_rate must be a finite number > 0; got inf"),
        (dict(learning_rate=0.0), r"learning_rate must be a finite number > 0; got 0.0"),
        # a one-element array is no scalar (float() of it passes, with a DeprecationWarning)
        (
            dict(learning_rate=np.array([1e-3])),
            r"learning_rate must be a finite number > 0; got array\(\[0.001\]\)",
        ),
        (dict(num_steps=10.5), r"num_steps must be an int >= 0; got 10.5"),
        (dict(num_steps=-5), r"num_steps must be an int >= 0; got -5"),
        (dict(warmup_steps=11), r"warmup_steps must be an int in \[0, 10\]; got 11"),
        (dict(weight_decay=-1e-4), r"weight_decay must be a finite number >= 0; got -0.0001"),
        (dict(b1=1.5), r"b1 must be a finite number in \[0, 1\); got 1.5"),
        (dict(b2=-0.1), r"b2 must be a finite number in \[0, 1\); got -0.1"),
    ],
)
def test_optimizer_rejects_each_bad_argument_naming_it(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train_state.make_optimizer(**{"learning_rate": 1e-3, "num_steps": 10, **kwargs})


def test_optimizer_accepts_the_closed_ends_of_its_ranges_and_refuses_b1_b2_of_1():
    # [0, 1) for Adam's decays: 0 is a valid (memoryless) decay, 1 never updates the moments
    kw = dict(learning_rate=1e-3, num_steps=10)
    train_state.make_optimizer(**kw, b1=0.0, b2=0.0, weight_decay=0.0, warmup_steps=10)
    for name in ("b1", "b2"):
        with pytest.raises(
            ValueError, match=rf"{name} must be a finite number in \[0, 1\); got 1.0"
        ):
            train_state.make_optimizer(**kw, **{name: 1.0})


def _cli(*args, env_extra=None):
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path, **(env_extra or {}))
    # the runs of one test compile the same programs: share them through the persistent cache
    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["XLA_FLAGS"] = SUBPROCESS_XLA_FLAGS  # one device, like a user's CPU run
    return [sys.executable, "-m", "jax_diffusion.cli", *args], env


def test_killed_run_resumes_to_the_same_result(tmp_path):
    # the toy MLP: what is under test is the loop, the checkpoints and the data state around the
    # step, not the network (the digits UNet made this test ~70 s of compiling, cold)
    common = [
        "--config",
        f"{CONFIGS / 'toy_2d.py'}:smoke",
        "--set",
        "train.num_steps=12",
        "--set",
        "train.checkpoint_every=3",  # each orbax save takes ~1.5 s here
        "--set",
        "train.sample_every=0",
    ]
    cmd, env = _cli("train", "--workdir", str(tmp_path / "killed"), *common)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckdir = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 180
    while time.time() < deadline:
        steps = [int(p.name) for p in ckdir.glob("[0-9]*") if p.name.isdigit()]
        if steps and max(steps) >= 3:
            break
        if proc.poll() is not None:
            pytest.fail(f"training exited early: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = CheckpointManager(str(tmp_path / "killed")).latest_step()
    assert killed_at is not None and killed_at < 12
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    cmd_full, _ = _cli("train", "--workdir", str(tmp_path / "full"), *common)
    subprocess.run(cmd_full, env=env, check=True, capture_output=True)
    config = smoke("toy_2d.py")
    model = train.create_model(config, channels=2)
    fresh = train.create_train_state(config, model, jax.random.PRNGKey(0), (2,))
    a, _ = CheckpointManager(str(tmp_path / "killed")).restore(fresh)
    b, _ = CheckpointManager(str(tmp_path / "full")).restore(fresh)
    assert int(a.step) == int(b.step) == 12
    assert_trees_equal(a.checkpoint_items(), b.checkpoint_items())


def test_cli_train_then_sample(tmp_path, capsys):
    work = str(tmp_path / "w")
    assert (
        cli.main(["train", "--config", f"{CONFIGS / 'digits_cond.py'}:smoke", "--workdir", work])
        == 0
    )
    out = str(tmp_path / "grid.png")
    assert (
        cli.main(
            [
                "sample",
                "--workdir",
                work,
                "--sampler",
                "dpm++",
                "--steps",
                "3",
                "--num",
                "10",
                "--guidance",
                "2.0",
                "--out",
                out,
            ]
        )
        == 0
    )
    from PIL import Image

    img = np.asarray(Image.open(out))
    assert img.ndim == 2 and img.shape[0] > 8
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["step"] == 2 and report["num"] == 10


def test_config_loading_and_errors():
    config = smoke(train__learning_rate=0.5, diffusion__prediction="v")
    assert config.train.learning_rate == 0.5 and config.diffusion.prediction == "v"
    assert config.model.base_channels == 8
    with pytest.raises(ValueError, match="unknown config key 'train.nope'"):
        smoke(train__nope=1)
    with pytest.raises(ValueError, match="unknown config variant 'huge'"):
        cli.load_config(f"{CONFIGS / 'default.py'}:huge")
    with pytest.raises(ValueError, match="--config must name an existing .py file"):
        cli.load_config("nowhere.py")
    bad = smoke(train__batch_size=12)
    with pytest.raises(ValueError, match="batch_size must be divisible by the device count 8"):
        train.train_and_evaluate(bad, "/tmp/never-written")
    with pytest.raises(ValueError, match="model.name must be one of 'unet', 'mlp'; got 'vit'"):
        train.create_model(smoke(model__name="vit"), channels=1)
    for key, value, match in [
        ("diffusion__prediction", "score", "prediction must be one of"),
        ("diffusion__weighting", "p2", "diffusion.weighting must be one of"),
        ("sample__sampler", "rk4", "sample.sampler must be one of"),
        ("train__num_steps", 0, "train.num_steps must be >= 1; got 0"),
        ("train__microbatches", 3, "train.microbatches must be a positive integer dividing"),
        ("train__lr_schedule", "linear", "train.lr_schedule must be one of"),
        ("train__learning_rate", -1.0, "train.learning_rate must be > 0; got -1.0"),
        ("train__warmup_steps", 3, r"train.warmup_steps must lie in \[0, train.num_steps=2\]"),
        ("train__ema_decay", 1.5, r"train.ema_decay must lie in \[0, 1\]; got 1.5"),
        ("train__keep_checkpoints", 0, "train.keep_checkpoints must be >= 1 or None"),
        ("train__stop_after", -1, "train.stop_after must be >= 0"),
        ("model__dropout", 1.5, r"model.dropout must lie in \[0, 1\)"),
        ("model__class_dropout", 1.5, r"model.class_dropout must lie in \[0, 1\]"),
        ("sample__num_steps", 51, r"sample.num_steps must lie in \[1, diffusion.num_timesteps=50"),
        ("sample__num_samples", 0, "sample.num_samples must be >= 1"),
        ("diffusion__schedule", "sigmoid", "diffusion.schedule must be one of"),
        ("model__dtype", "int32", "model.dtype must be one of 'float32', 'bfloat16', 'float16'"),
        # a negative clip norm trained by gradient ascent (loss 0.42 -> 2e7 on the toy data)
        ("train__grad_clip", -1.0, r"train.grad_clip must be > 0 or None \(off\); got -1.0"),
        ("train__weight_decay", -0.1, "train.weight_decay must be >= 0; got -0.1"),
        ("diffusion__min_snr_gamma", 0.0, "diffusion.min_snr_gamma must be > 0; got 0.0"),
        # None used to pass, then fail after training (guidance, eta) or with a TypeError
        ("sample__guidance", None, "sample.guidance must be a finite number; got None"),
        ("sample__eta", None, "sample.eta must be a finite number; got None"),
        ("train__ema_decay", None, "train.ema_decay must be a finite number; got None"),
    ]:
        with pytest.raises(ValueError, match=match):  # before any directory is created
            train.train_and_evaluate(smoke(**{key: value}), "/tmp/never-written-either")
    for overrides, match in [
        # dpm++ needs n + 1 distinct grid points: this used to fail after training
        (
            dict(sample__sampler="dpm++", sample__num_steps=50),
            r"sample.num_steps must lie in \[1, diffusion.num_timesteps - 1=49\]",
        ),
        (dict(diffusion__zero_terminal_snr=True), "zero_terminal_snr=True needs diffusion.pred"),
    ]:
        with pytest.raises(ValueError, match=match):
            train.train_and_evaluate(smoke(**overrides), "/tmp/never-written-either")
    # model.num_classes against the data's labels, also before the workdir is made
    for name, value, match in [
        ("digits_cond.py", 3, "model.num_classes=3 does not match data.name='digits'.*10 classes"),
        ("digits_cond.py", 11, "model.num_classes=11 .*set model.num_classes=10 .or None"),
        ("toy_2d.py", 2, "model.num_classes=2 but data.name='toy_2d:swiss_roll' has no labels"),
    ]:
        config = smoke(name, model__num_classes=value)
        with pytest.raises(ValueError, match=match):
            train.train_and_evaluate(config, "/tmp/never-written-either")
    # flips of 2-D points: refused once the data's shape is known, still before the workdir
    with pytest.raises(ValueError, match=r"data.random_flip=True mirrors images \[H, W, C\]; "):
        train.train_and_evaluate(
            smoke("toy_2d.py", data__random_flip=True), "/tmp/never-written-either"
        )
    assert not os.path.exists("/tmp/never-written-either")
    for key in ("foo__bar", "train__num_steps__x"):
        with pytest.raises(ValueError, match="--set .*=1: unknown config key"):
            smoke(**{key: 1})
    with pytest.raises(ValueError, match="--set train.num_steps=2.0: .*num_steps"):
        smoke(train__num_steps=2.0)  # ml_collections' TypeError, named after the flag
    for argv in (
        ["sample", "--num", "0"],
        ["sample", "--guidance", "nan"],  # wrote a black grid
        ["sample", "--seed", "-1"],
        ["sample", "--out", "grid"],  # failed after sampling
        ["evaluate", "--num", "3"],
        ["evaluate", "--bpd-examples", "300"],
    ):
        with pytest.raises(SystemExit):  # argparse, before the workdir is read
            cli.main([*argv, "--workdir", "/tmp/never-written-either"])


def test_config_files_are_loaded_afresh(tmp_path):
    # two files of the same name, and one edited between two loads (a notebook session)
    text = (
        "import ml_collections\n\n"
        "def get_config(arg=None):\n"
        "    return ml_collections.ConfigDict({{'lr': {}}})\n"
    )
    for sub, lr in (("a", 0.1), ("b", 0.2)):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "myconf.py").write_text(text.format(lr))
    assert cli.load_config(str(tmp_path / "a" / "myconf.py")).lr == 0.1
    assert cli.load_config(str(tmp_path / "b" / "myconf.py")).lr == 0.2
    (tmp_path / "a" / "myconf.py").write_text(text.format(0.3))
    assert cli.load_config(str(tmp_path / "a" / "myconf.py")).lr == 0.3


def test_smoke_training_cifar10_config_on_a_local_tfds_dataset(tmp_path):
    """The accelerator config end to end (tfds -> grain -> bf16 UNet) on a dataset built here."""
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("grain")
    import PIL.Image

    images = np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)

    class JdTrainTestRgb(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(32, 32, 3), encoding_format="png"),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            )
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, image in enumerate(images):  # PIL images: tfds encodes arrays with TF
                yield i, {"image": PIL.Image.fromarray(image), "label": i % 10}

    data_dir = str(tmp_path / "tfds")
    JdTrainTestRgb(data_dir=data_dir, file_format="array_record").download_and_prepare(
        file_format="array_record"
    )
    config = smoke("cifar10.py", data__name="tfds:jd_train_test_rgb", data__data_dir=data_dir)
    assert config.model.dtype == "bfloat16" and config.data.image_size == 32
    summary = train.train_and_evaluate(config, str(tmp_path / "work"))
    assert summary["final_step"] == 2 and np.isfinite(summary["final_loss"])
    from PIL import Image

    grid = np.asarray(Image.open(summary["samples"]))
    assert grid.ndim == 3 and grid.shape[-1] == 3  # RGB samples


def test_the_config_s_tfds_fields_reach_the_loader_and_label_key_none_means_unlabeled(
    monkeypatch,
):
    # label_key, image_key and num_workers were not in the configs: an unlabeled tfds dataset
    # could not be trained from the command line
    got = {}

    def fake_tfds_iterator(name, **kwargs):
        got.update(name=name, **kwargs)
        return types.SimpleNamespace(info="info")

    monkeypatch.setattr(data_lib, "tfds_iterator", fake_tfds_iterator)
    sets = ["data.name='tfds:x'", "data.label_key=None", "data.image_key='img'"]
    config = cli.load_config(f"{CONFIGS / 'default.py'}", [*sets, "data.num_workers=3"])
    data_lib.get_dataset(config.data, global_batch_size=8, seed=0)
    assert (got["name"], got["label_key"], got["image_key"], got["num_workers"]) == (
        "x",
        None,
        "img",
        3,
    )
    cifar10 = cli.load_config(f"{CONFIGS / 'cifar10.py'}")
    data_lib.get_dataset(cifar10.data, global_batch_size=8, seed=0)
    assert (got["name"], got["label_key"], got["image_key"]) == ("cifar10", "label", "image")


def test_only_a_loader_error_that_names_a_data_field_gets_the_data_prefix(tmp_path, monkeypatch):
    config = smoke("toy_2d.py")
    for message, want in [
        ("name must be one of 'toy_2d', ...", r"^data\.name must be one of 'toy_2d', \.\.\.$"),
        ("the split holds no examples", r"^the split holds no examples$"),
    ]:

        def get_dataset(*args, message=message, **kwargs):
            raise ValueError(message)

        monkeypatch.setattr(train.data_lib, "get_dataset", get_dataset)
        with pytest.raises(ValueError, match=want):
            train.train_and_evaluate(config, str(tmp_path))


def test_the_conditional_train_state_has_a_label_table_with_a_null_row_and_learned_range_output():
    # shapes only (jax.eval_shape): no compile
    config = smoke("digits_cond.py", diffusion__variance="learned_range")
    num_classes = config.model.num_classes
    model = train.create_model(config, channels=1)
    state = jax.eval_shape(
        lambda: train.create_train_state(config, model, jax.random.PRNGKey(0), (8, 8, 1))
    )
    rows = {x.shape[0] for x in jax.tree.leaves(state.params) if x.ndim == 2}
    assert num_classes + 1 in rows  # the class embedding, row num_classes the null label
    x, t, y = jnp.zeros((2, 8, 8, 1)), jnp.zeros((2,), jnp.int32), jnp.zeros((2,), jnp.int32)
    out = jax.eval_shape(lambda p: model.apply({"params": p}, x, t, y), state.params)
    assert out.shape == (2, 8, 8, 2)
    assert jax.tree.map(lambda a: a.shape, state.ema_params) == jax.tree.map(
        lambda a: a.shape, state.params
    )


def _adamw_reference(grads, p, *, lr_at, weight_decay, clip, b1=0.9, b2=0.999, eps=1e-8):
    """Updates of AdamW (decoupled decay, Loshchilov & Hutter) after global-norm clipping."""
    m = v = np.zeros_like(p)
    out = []
    for k, g in enumerate(grads):
        norm = np.linalg.norm(g)
        if clip is not None and norm > clip:
            g = g * clip / norm
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** (k + 1)), v / (1 - b2 ** (k + 1))
        u = -lr_at(k) * (m_hat / (np.sqrt(v_hat) + eps) + weight_decay * p)
        out.append(u)
        p = p + u
    return out


@pytest.mark.parametrize("lr_schedule", ["cosine", "constant"])
@pytest.mark.parametrize("grad_clip", [0.5, None])
def test_create_train_state_builds_adamw_from_config_lr_warmup_schedule_decay_and_clip(
    lr_schedule, grad_clip
):
    lr, warmup, num_steps, wd = 0.3, 4, 10, 0.05
    config = smoke(
        "toy_2d.py",
        train__learning_rate=lr,
        train__warmup_steps=warmup,
        train__num_steps=num_steps,
        train__lr_schedule=lr_schedule,
        train__weight_decay=wd,
        train__grad_clip=grad_clip,
    )
    model = train.create_model(config, channels=2)
    state = jax.eval_shape(
        lambda: train.create_train_state(config, model, jax.random.PRNGKey(0), (2,))
    )

    def lr_at(k):
        if k < warmup:  # linear from lr / warmup to lr
            return lr / warmup + (lr - lr / warmup) * k / warmup
        if lr_schedule == "constant":
            return lr
        return lr * 0.5 * (1 + np.cos(np.pi * (k - warmup) / (num_steps - warmup)))

    rng = np.random.default_rng(0)
    # large gradients (norm ~ 30, clipped to 0.5) alternating with small ones (norm < 0.5):
    # clipping changes Adam's moment ratios, so it shows in the updates
    grads = [rng.standard_normal(16) * (3.0 if k % 2 == 0 else 0.05) for k in range(num_steps)]
    p0 = np.linspace(-2.0, 2.0, 16)
    want = _adamw_reference(grads, p0, lr_at=lr_at, weight_decay=wd, clip=grad_clip)
    tx, params = state.tx, jnp.asarray(p0, jnp.float32)
    opt_state = tx.init(params)
    for k, g in enumerate(grads):
        updates, opt_state = tx.update(jnp.asarray(g, jnp.float32), opt_state, params)
        np.testing.assert_allclose(updates, want[k], rtol=2e-4, atol=1e-7, err_msg=f"step {k}")
        params = params + updates


def test_load_run_rebuilds_the_model_from_config_json_and_restores_the_ema_params(tmp_path):
    config = smoke("toy_2d.py", model__hidden_dim=24, model__num_layers=2)
    model = train.create_model(config, channels=2)
    abstract = jax.eval_shape(
        lambda: train.create_train_state(config, model, jax.random.PRNGKey(0), (2,))
    )
    rng = np.random.default_rng(1)

    def fill(x):
        if jnp.issubdtype(x.dtype, jnp.integer):
            return jnp.asarray(rng.integers(0, 100, x.shape), x.dtype)
        return jnp.asarray(rng.standard_normal(x.shape), x.dtype)

    state = jax.tree.map(fill, abstract).replace(step=jnp.asarray(7, jnp.int32))
    (tmp_path / "config.json").write_text(config.to_json(indent=2))
    (tmp_path / "data_info.json").write_text(json.dumps({"shape": [2], "num_classes": 0}))
    ckpt = CheckpointManager(str(tmp_path))
    ckpt.save(state, {}, force=True)
    ckpt.close()
    loaded, shape, got_model, params, step = train.load_run(str(tmp_path))
    assert loaded.to_json() == config.to_json() and shape == (2,) and step == 7
    assert got_model.hidden_dim == 24 and got_model.num_layers == 2
    assert_trees_equal(params, state.ema_params)


class _MemoryCheckpoints:
    """CheckpointManager's interface, in memory: each workdir's saves as (step, items, data)."""

    runs: dict = {}

    def __init__(self, workdir, max_to_keep=None):
        self.directory = f"{workdir}/checkpoints"
        self.saves = self.runs.setdefault(str(workdir), [])

    def latest_step(self):
        return self.saves[-1][0] if self.saves else None

    def save(self, state, data_state, *, force=False):
        items = jax.device_get(state.checkpoint_items())
        # through JSON, as orbax's JsonSave writes the data item (json.dumps, json.loads)
        self.saves.append((int(items["step"]), items, json.loads(json.dumps(data_state))))
        return True

    def restore(self, state):
        _, items, data_state = self.saves[-1]
        return state.replace(**items), data_state

    def close(self):
        pass


def _scripted_loop(monkeypatch, bad_steps=()):
    """train_and_evaluate around a scripted train step, in-memory checkpoints and a fake
    sampler: step k (from 1) logs loss k and mse = the mean of its batch, is non-finite when
    k is in `bad_steps`, and moves the EMA params by +1 (params stay): the loop, not the math.

    Returns (runs, samples), filled as the loop runs: {workdir: [(step, items, data state) of
    each save]} and [(grid path, first EMA param given to the sampler, the sampler's key)].
    """
    bad = frozenset(bad_steps)
    made = {}  # one function per length: its compiled program is reused by the next run

    def make_train_step(config, schedule):
        if config.train.num_steps in made:
            return made[config.train.num_steps]
        mask = jnp.asarray([k + 1 in bad for k in range(config.train.num_steps)])

        def step(state, batch):
            finite = ~mask[state.step]
            bad_count = jnp.where(finite, 0, state.bad_steps + 1)
            new = state.replace(
                step=state.step + 1,
                ema_params=jax.tree.map(lambda e: e + 1.0, state.ema_params),
                bad_steps=bad_count,
                skipped_steps=state.skipped_steps + jnp.where(finite, 0, 1),
            )
            metrics = {
                "loss": jnp.where(finite, state.step + 1.0, jnp.nan),  # as a real bad step
                "mse": jnp.mean(batch["image"]),
                "grad_norm": jnp.float32(1.0),
                "skipped": 1 - finite.astype(jnp.int32),
                "bad_steps": bad_count,
            }
            return new, metrics

        made[config.train.num_steps] = step
        return step

    samples = []

    def sample(config, model, params, schedule, rng, *, shape, num, **kwargs):
        samples.append([None, float(jax.tree.leaves(params)[0].ravel()[0]), np.asarray(rng)])
        return np.zeros((num, *shape), np.float32)

    def save_samples(images, path):
        samples[-1][0] = str(path)

    _MemoryCheckpoints.runs = {}
    monkeypatch.setattr(train, "make_train_step", make_train_step)
    monkeypatch.setattr(train, "CheckpointManager", _MemoryCheckpoints)
    monkeypatch.setattr(train, "sample", sample)
    monkeypatch.setattr(train, "save_sample_image", save_samples)
    return _MemoryCheckpoints.runs, samples


def _logged(workdir):
    def reject(constant):  # strict JSON, as jq or a browser read it: no NaN or Infinity
        raise ValueError(f"metrics.jsonl holds {constant}")

    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=reject) for line in lines]


def test_loop_logs_window_means_checkpoints_and_samples_at_their_intervals(tmp_path, monkeypatch):
    runs, samples = _scripted_loop(monkeypatch, bad_steps={4})
    config = smoke(
        "toy_2d.py",
        train__num_steps=5,
        train__log_every=2,
        train__checkpoint_every=2,
        train__sample_every=2,
        train__max_bad_steps=5,
    )
    summary = train.train_and_evaluate(config, str(tmp_path))
    logged = _logged(tmp_path)
    # every log_every steps and at the last: the mean over the steps since the last line
    # (losses 1, 2, 3, NaN, 5), skipped steps summed; a NaN mean is written as null
    assert [m["step"] for m in logged] == [2, 4, 5]
    assert [m["loss"] for m in logged] == [1.5, None, 5.0]
    assert [m["skipped"] for m in logged] == [0.0, 1.0, 0.0]
    assert summary["final_loss"] == 5.0 and summary["final_step"] == 5
    assert summary["skipped_steps"] == 1 and summary["start_step"] == 0
    # every checkpoint_every steps, but not inside a non-finite streak (step 4); the last
    assert [s for s, _, _ in runs[str(tmp_path)]] == [2, 5]
    # every sample_every steps and the last, from the EMA params after that step's update
    paths = [str(tmp_path / "samples" / f"step_{k:07d}.png") for k in (2, 4, 5)]
    assert [p for p, _, _ in samples] == paths and summary["samples"] == paths[-1]
    last_ema = float(jax.tree.leaves(summary["state"].ema_params)[0].ravel()[0])  # after 5
    np.testing.assert_allclose([e for _, e, _ in samples], [last_ema - 5 + k for k in (2, 4, 5)])
    keys = {bytes(k) for _, _, k in samples}
    assert len(keys) == 3  # a fresh key for every grid


def test_loop_stops_after_max_bad_steps_without_checkpointing_the_streak(tmp_path, monkeypatch):
    runs, _ = _scripted_loop(monkeypatch, bad_steps={3, 4, 5, 6, 7, 8})
    config = smoke("toy_2d.py", train__num_steps=8, train__checkpoint_every=1)
    config.train.max_bad_steps, config.train.keep_checkpoints = 2, None
    with pytest.raises(train.TrainingDiverged, match=r"^2 consecutive steps .* at step 4;"):
        train.train_and_evaluate(config, str(tmp_path))
    assert [s for s, _, _ in runs[str(tmp_path)]] == [1, 2]
    assert [m["step"] for m in _logged(tmp_path)] == [1, 2, 3, 4]
    # a streak that reaches max_bad_steps in the last steps ends the run the same way, and
    # the last step, non-finite, is not saved
    runs, _ = _scripted_loop(monkeypatch, bad_steps={3, 4})
    config = smoke("toy_2d.py", train__num_steps=4, train__checkpoint_every=1)
    config.train.max_bad_steps = 2
    with pytest.raises(train.TrainingDiverged, match="2 consecutive non-finite steps at the end"):
        train.train_and_evaluate(config, str(tmp_path / "end"))
    assert [s for s, _, _ in runs[str(tmp_path / "end")]] == [1, 2]


def test_a_divergence_before_any_checkpoint_says_there_is_none(tmp_path, monkeypatch):
    runs, _ = _scripted_loop(monkeypatch, bad_steps={1, 2, 3})
    config = smoke("toy_2d.py", train__num_steps=3, train__checkpoint_every=100)
    config.train.max_bad_steps = 2
    with pytest.raises(train.TrainingDiverged, match="No checkpoint had been written to .* yet"):
        train.train_and_evaluate(config, str(tmp_path))
    assert runs[str(tmp_path)] == []


def test_rerunning_a_finished_run_writes_its_final_grid_again(tmp_path, monkeypatch):
    # a run killed after its last checkpoint, before its last grid, gets the grid on a rerun
    _, samples = _scripted_loop(monkeypatch)
    config = smoke("toy_2d.py", train__num_steps=3, train__log_every=2)
    first = train.train_and_evaluate(config, str(tmp_path))
    grid, ema, key = samples[-1]
    num_grids = len(samples)
    again = train.train_and_evaluate(config, str(tmp_path))
    assert len(samples) == num_grids + 1 and samples[-1][0] == grid == again["samples"]
    assert samples[-1][1] == ema  # the same EMA params and key: the same images
    np.testing.assert_array_equal(samples[-1][2], key)
    assert again["start_step"] == again["final_step"] == 3
    assert again["final_loss"] == first["final_loss"] == 3.0  # the last logged line, step 3
    # a call that logs nothing: final_loss is None (never logged) or the last line's
    config = smoke("toy_2d.py", train__num_steps=3, train__log_every=2, train__stop_after=1)
    stopped = train.train_and_evaluate(config, str(tmp_path / "b"))
    assert stopped["final_step"] == 1 and stopped["final_loss"] is None
    assert stopped["images_per_sec"] == pytest.approx(16 * stopped["steps_per_sec"])
    assert [m["step"] for m in _logged(tmp_path)] == [2, 3]  # nothing logged twice


def test_a_resume_that_changes_what_the_network_predicts_or_goes_back_is_refused(
    tmp_path, monkeypatch
):
    runs, _ = _scripted_loop(monkeypatch)
    train.train_and_evaluate(smoke("toy_2d.py", train__num_steps=3), str(tmp_path))
    saved, saves = (tmp_path / "config.json").read_text(), [s for s, _, _ in runs[str(tmp_path)]]
    for overrides, match in [
        # eps-trained weights went on as a v model (loss 0.21 -> 0.87), config.json rewritten
        (
            dict(
                diffusion__prediction="v",
                diffusion__zero_terminal_snr=True,
                sample__spacing="trailing",  # what a zero-SNR model is sampled with
            ),
            r"with diffusion.prediction='v' \(the run has 'eps'\), diffusion.zero_terminal_snr"
            r"=True \(the run has False\): these fields set what the network predicts",
        ),
        (dict(diffusion__num_timesteps=20), r"diffusion.num_timesteps=20 \(the run has 50\)"),
        (dict(diffusion__schedule="linear"), r"diffusion.schedule='linear' \(the run has 'cos"),
        (dict(diffusion__variance="fixed_large"), r"diffusion.variance='fixed_large' \(the"),
        (dict(diffusion__process="flow"), r"diffusion.process='flow' \(the run has 'ddpm'\)"),
        (dict(train__num_steps=2), r"is at step 3, past train.num_steps=2; pass train.num_st"),
        # 3 steps of 16 examples: position 48 is no boundary of batches of 32
        (dict(train__batch_size=32), r"train.batch_size=32 cannot continue the data order"),
    ]:
        with pytest.raises(ValueError, match=match):
            config = smoke("toy_2d.py", **{"train__num_steps": 4, **overrides})
            train.train_and_evaluate(config, str(tmp_path))
        assert (tmp_path / "config.json").read_text() == saved  # the run's record is kept
    assert [s for s, _, _ in runs[str(tmp_path)]] == saves  # and no checkpoint is written
    # a loss setting is the user's to change on a resume
    resumed = smoke("toy_2d.py", train__num_steps=4, diffusion__weighting="min_snr")
    assert train.train_and_evaluate(resumed, str(tmp_path))["final_step"] == 4


def test_a_run_whose_config_json_predates_a_checked_field_resumes(tmp_path, monkeypatch):
    # a config.json written before diffusion.zero_terminal_snr existed: nothing to compare
    _scripted_loop(monkeypatch)
    train.train_and_evaluate(smoke("toy_2d.py", train__num_steps=3), str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["diffusion"]["zero_terminal_snr"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    resumed = smoke("toy_2d.py", train__num_steps=4)
    assert train.train_and_evaluate(resumed, str(tmp_path))["final_step"] == 4
    # ... and it was trained without zero terminal SNR: a resume that turns it on is refused
    (tmp_path / "config.json").write_text(json.dumps(saved))
    zero_snr = smoke("toy_2d.py", train__num_steps=5, diffusion__zero_terminal_snr=True)
    zero_snr.diffusion.prediction, zero_snr.sample.spacing = "v", "trailing"
    with pytest.raises(ValueError, match=r"diffusion.prediction='v' \(the run has 'eps'\), "
                       r"diffusion.zero_terminal_snr=True \(the run has False\)"):  # fmt: skip
        train.train_and_evaluate(zero_snr, str(tmp_path))
    # a config that leaves the optional field out (None) means False, as the run has
    left_out = smoke("toy_2d.py", train__num_steps=5)
    left_out.diffusion.zero_terminal_snr = None
    assert train.train_and_evaluate(left_out, str(tmp_path))["final_step"] == 5


def test_each_checkpoint_comes_after_the_tensorboard_events_logged_before_it(tmp_path, monkeypatch):
    # a kill after a checkpoint must lose no logged step: the resumed run purges only the
    # events after it, and never logs the earlier ones again
    from test_workdir import _tensorboard_events

    _scripted_loop(monkeypatch)
    real_save, on_disk = _MemoryCheckpoints.save, []

    def save(self, state, data_state, *, force=False):
        events = _tensorboard_events(tmp_path / "tensorboard")
        logged = [e.step for e in events for v in e.summary.value if v.tag == "loss"]
        on_disk.append((int(jax.device_get(state.step)), logged))
        return real_save(self, state, data_state, force=force)

    monkeypatch.setattr(_MemoryCheckpoints, "save", save)
    config = smoke("toy_2d.py", train__num_steps=4, train__log_every=1, train__checkpoint_every=2)
    train.train_and_evaluate(config, str(tmp_path))
    assert on_disk == [(2, [1, 2]), (4, [1, 2, 3, 4])]


def test_a_resumed_loop_logs_and_samples_what_an_uninterrupted_one_does(tmp_path, monkeypatch):
    runs, samples = _scripted_loop(monkeypatch)
    config = smoke("toy_2d.py", train__num_steps=4, train__checkpoint_every=100)
    config.train.sample_every = 1
    train.train_and_evaluate(config, str(tmp_path / "full"))
    full_samples = list(samples)
    samples.clear()
    config.train.stop_after = 2
    assert train.train_and_evaluate(config, str(tmp_path / "resumed"))["final_step"] == 2
    summary = train.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert summary["start_step"] == 2 and summary["final_step"] == 4
    assert [s for s, _, _ in runs[str(tmp_path / "resumed")]] == [2, 4]
    # the same lines (the batches' means included: the data resumes where it stopped)
    full, resumed = _logged(tmp_path / "full"), _logged(tmp_path / "resumed")
    for m in full + resumed:
        m.pop("steps_per_sec"), m.pop("images_per_sec")
    assert resumed == full and [m["step"] for m in full] == [1, 2, 3, 4]
    # and the same sample keys and EMA params
    for (_, ema_a, key_a), (_, ema_b, key_b) in zip(full_samples, samples, strict=True):
        assert ema_a == ema_b
        np.testing.assert_array_equal(key_a, key_b)


def test_a_kill_while_config_json_is_rewritten_on_a_resume_leaves_the_run_resumable(
    tmp_path, monkeypatch
):
    from etils import epath
    from test_workdir import Killed, kill_mid_write

    _scripted_loop(monkeypatch)
    config = smoke("toy_2d.py", train__num_steps=4, train__checkpoint_every=2)
    config.train.stop_after = 2
    assert train.train_and_evaluate(config, str(tmp_path))["final_step"] == 2
    saved = (tmp_path / "config.json").read_text()
    with monkeypatch.context() as m:
        kill_mid_write(m, type(epath.Path(tmp_path)), "config.json")
        with pytest.raises(Killed):
            train.train_and_evaluate(config, str(tmp_path))
    assert (tmp_path / "config.json").read_text() == saved
    assert train.train_and_evaluate(config, str(tmp_path))["final_step"] == 4


def test_a_run_resumed_inside_a_log_window_logs_the_means_of_the_whole_window(
    tmp_path, monkeypatch
):
    # checkpoints every 2 steps, lines every 3: a run resumed from step 2 (or killed after it)
    # logged nothing of steps 1 and 2 yet; step 3's line is still the mean over steps 1-3
    runs, _ = _scripted_loop(monkeypatch, bad_steps={2})
    config = smoke("toy_2d.py", train__num_steps=4, train__log_every=3, train__checkpoint_every=2)
    config.train.max_bad_steps = 5
    train.train_and_evaluate(config, str(tmp_path / "full"))
    config.train.stop_after = 2
    assert train.train_and_evaluate(config, str(tmp_path / "resumed"))["final_step"] == 2
    assert not (tmp_path / "resumed" / "metrics.jsonl").read_text()
    summary = train.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert summary["start_step"] == 2 and summary["final_step"] == 4
    full, resumed = _logged(tmp_path / "full"), _logged(tmp_path / "resumed")
    for m in full + resumed:
        m.pop("steps_per_sec"), m.pop("images_per_sec")
    assert [m["step"] for m in full] == [3, 4] and full[0]["skipped"] == 1.0
    assert resumed == full


def test_the_log_window_goes_through_the_checkpoint_s_json_with_its_dtypes_and_bits():
    # the checkpoint stores it as JSON (orbax's json.dumps writes NaN, json.loads reads it)
    window = [
        {"loss": jnp.float32(0.1), "grad_norm": np.float32(np.nan), "skipped": jnp.int32(1)},
        {"loss": np.float32(1e-30), "grad_norm": np.float32(3.3), "skipped": np.int32(0)},
        {"loss": np.float32(-7.25), "grad_norm": np.float32(np.inf), "skipped": np.int32(2)},
    ]
    back = train._window_from_json(json.loads(json.dumps(train._window_to_json(window))))
    assert len(back) == len(window)
    for got, want in zip(back, window, strict=True):
        assert set(got) == set(want)
        for k, v in want.items():
            assert got[k].dtype == np.asarray(v).dtype, k
            np.testing.assert_array_equal(got[k], np.asarray(v), err_msg=k)
    assert train._window_from_json(None) == []  # a checkpoint from before the window was kept
    assert train._window_from_json(json.loads(json.dumps(train._window_to_json([])))) == []


def test_the_rates_of_a_resumed_window_count_only_the_steps_run_in_this_call(tmp_path, monkeypatch):
    # a clock that advances 1 s per train step run (however often it is read): every window's
    # rate is 1 step/s when it counts the steps run in this call, 3 for the resumed line at
    # step 3 if it counted the restored steps 1 and 2 too (they ran before the kill)
    _scripted_loop(monkeypatch)
    steps_run, jit_train_step = [], train._jit_train_step

    def counting_jit_train_step(*args, **kwargs):
        step_fn, batch_sharding = jit_train_step(*args, **kwargs)

        def counted(state, batch):
            steps_run.append(1)
            return step_fn(state, batch)

        return counted, batch_sharding

    monkeypatch.setattr(train, "_jit_train_step", counting_jit_train_step)
    monkeypatch.setattr(
        train, "time", types.SimpleNamespace(perf_counter=lambda: float(len(steps_run)))
    )
    config = smoke("toy_2d.py", train__num_steps=4, train__log_every=3, train__checkpoint_every=2)
    train.train_and_evaluate(config, str(tmp_path / "full"))
    config.train.stop_after = 2
    train.train_and_evaluate(config, str(tmp_path / "resumed"))
    train.train_and_evaluate(config, str(tmp_path / "resumed"))
    full, resumed = _logged(tmp_path / "full"), _logged(tmp_path / "resumed")
    assert [m["step"] for m in full] == [m["step"] for m in resumed] == [3, 4]
    for m in full + resumed:
        assert m["steps_per_sec"] == 1.0
        assert m["images_per_sec"] == config.train.batch_size


def test_the_sample_grids_are_drawn_over_the_training_mesh(tmp_path, monkeypatch):
    _scripted_loop(monkeypatch)
    scripted, meshes = train.sample, []

    def sample(*args, mesh=None, **kwargs):
        meshes.append(mesh)
        return scripted(*args, **kwargs)

    monkeypatch.setattr(train, "sample", sample)
    config = smoke("toy_2d.py", train__num_steps=2)
    config.train.sample_every = 1
    train.train_and_evaluate(config, str(tmp_path))
    assert len(meshes) == 2  # steps 1 and 2
    for mesh in meshes:  # each device draws its part of the grid
        assert isinstance(mesh, jax.sharding.Mesh) and mesh.axis_names == ("data",)
        assert set(mesh.devices.flat) == set(jax.devices())


def test_a_run_killed_while_sampling_writes_that_grid_when_resumed(tmp_path, monkeypatch):
    # a kill between a step's checkpoint and its grid would resume after the step, which
    # never wrote its grid: the grid comes first
    runs, samples = _scripted_loop(monkeypatch)
    real_sample = train.sample
    config = smoke("toy_2d.py", train__num_steps=4, train__checkpoint_every=2)
    config.train.sample_every = 2

    class Killed(BaseException):
        pass

    killed = []

    def killed_in_step_2_s_grid(*args, **kwargs):
        if not killed:  # the first grid, step 2's
            killed.append(True)
            raise Killed
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(train, "sample", killed_in_step_2_s_grid)
    with pytest.raises(Killed):
        train.train_and_evaluate(config, str(tmp_path))
    train.train_and_evaluate(config, str(tmp_path))
    grids = [str(tmp_path / "samples" / f"step_{k:07d}.png") for k in (2, 4)]
    assert [p for p, _, _ in samples] == grids


def test_the_toy_density_image_has_y_up_and_x_right(tmp_path):
    from PIL import Image

    # a cloud in the top-right corner of the [-2, 2]^2 plot and a fainter one bottom-right
    rng = np.random.default_rng(0)
    points = np.concatenate(
        [rng.normal([1.5, 1.5], 0.1, (300, 2)), rng.normal([1.5, -1.5], 0.1, (30, 2))]
    )
    train.save_sample_image(points, tmp_path / "grid.png")
    img = np.asarray(Image.open(tmp_path / "grid.png"), np.float64)
    h, w = img.shape
    quadrant = {
        (r, c): img[r * h // 2 : (r + 1) * h // 2, c * w // 2 : (c + 1) * w // 2].mean()
        for r in (0, 1)
        for c in (0, 1)
    }
    # dark where the points are: the denser top-right, the empty left half white
    assert quadrant[0, 1] < quadrant[1, 1] < quadrant[0, 0] == quadrant[1, 0] == 255


def test_jit_train_step_splits_the_batch_over_the_devices_and_donates_the_state():
    mesh = train.make_mesh()
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = jax.device_put({"w": jnp.arange(4.0), "step": jnp.zeros((), jnp.int32)}, replicated)

    def step(state, batch):
        new = {"w": state["w"] + jnp.sum(batch), "step": state["step"] + 1}
        return new, {"loss": jnp.mean(batch)}

    run, batch_sharding = train._jit_train_step(step, mesh, state)
    batch = jax.device_put(jnp.arange(32.0).reshape(16, 2), batch_sharding)
    # data parallel: each of the 8 devices holds 2 of the 16 examples
    assert sorted(s.index[0].start for s in batch.addressable_shards) == list(range(0, 16, 2))
    assert {s.data.shape for s in batch.addressable_shards} == {(2, 2)}
    new, metrics = run(state, batch)
    assert all(x.is_deleted() for x in jax.tree.leaves(state))  # donated: no second copy
    np.testing.assert_allclose(new["w"], np.arange(4.0) + np.arange(32.0).sum())
    assert float(metrics["loss"]) == np.arange(32.0).mean()
    assert new["w"].sharding.is_fully_replicated and len(new["w"].sharding.device_set) == 8


def test_the_train_step_draws_t_noise_dropout_and_label_dropout_from_separate_keys():
    """No key feeds two of the step's random draws (a reused key correlates them): the dropout
    key is not the one t and noise were drawn with, nor the one the labels were dropped with."""
    import jax_diffusion as jd
    from jax_diffusion.models import drop_labels

    seen = []

    def apply_fn(variables, x, t, y=None, train=False, rngs=None):
        seen.append((np.asarray(x), np.asarray(t), np.asarray(y), rngs["dropout"]))
        return variables["params"]["w"] * x

    config = smoke("digits_cond.py", model__class_dropout=0.5)
    schedule = train.get_schedule(config.diffusion)
    step = train.make_train_step(config, schedule)
    x0 = jnp.full((8, 8, 8, 1), 0.5)
    labels = np.arange(8) % config.model.num_classes
    step(_stub_state(apply_fn, 1.0), {"image": x0, "label": labels})
    ((x_t, t, y, key),) = seen
    null = config.model.num_classes
    assert 0 < np.sum(y == null) < 8  # p = 0.5: some labels dropped, some kept
    t_if_reused, noise_if_reused = jd.training_draws(schedule, x0, key)
    assert not np.array_equal(t_if_reused, t)
    assert not np.allclose(jd.q_sample(schedule, x0=x0, t=t, noise=noise_if_reused), x_t)
    assert not np.array_equal(drop_labels(key, jnp.asarray(labels), 0.5, null), y)


def test_zero_terminal_snr_sampled_by_leading_ddim_warns_at_the_config_and_at_sample(monkeypatch):
    # 'leading' ddim starts below T - 1, so a zero-terminal-SNR model never sees its SNR-0 step
    zero = dict(diffusion__zero_terminal_snr=True, diffusion__prediction="v")
    leading = dict(sample__sampler="ddim", sample__spacing="leading", sample__num_steps=5)
    warned = r"zero_terminal_snr=True is sampled by ddim with spacing 'leading'.*'trailing'"
    with pytest.warns(UserWarning, match=warned):
        train.check_config(smoke("toy_2d.py", **zero, **leading))
    quiet = [
        dict(zero, sample__spacing="trailing"),
        dict(zero, sample__spacing="linspace"),
        dict(zero, sample__sampler="ddpm"),
        dict(zero, sample__sampler="dpm++"),
        {},  # no zero-SNR step to miss
    ]
    for overrides in quiet:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            train.check_config(smoke("toy_2d.py", **{**leading, **overrides}))
    # sample(): the spacing or sampler chosen for the call, not the config's
    for attr in ("ddim_sample", "ddpm_sample"):
        monkeypatch.setattr(samplers, attr, lambda fn, sch, x, *a, **k: x)
    config = smoke("toy_2d.py", **{**zero, **leading, "sample__spacing": "trailing"})
    schedule = train.get_schedule(config.diffusion)
    call = dict(shape=(2,), num=2)
    with pytest.warns(UserWarning, match=warned):
        train.sample(config, None, {}, schedule, jax.random.PRNGKey(0), spacing="leading", **call)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train.sample(config, None, {}, schedule, jax.random.PRNGKey(0), **call)
        train.sample(config, None, {}, schedule, jax.random.PRNGKey(0), sampler="ddpm", **call)


@pytest.mark.parametrize("times", ["uniform", "logit_normal"])
def test_a_flow_train_step_regresses_the_velocity_on_the_straight_path(times):
    """diffusion.process 'flow': the network's `velocity` sees x_t = (1 - t) x0 + t eps at float
    t in (0, 1) from the configured distribution, and the loss is mean (u_hat - (eps - x0))^2."""
    seen = []

    def apply_fn(variables, x, t, y=None, train=False, rngs=None, method=None):
        seen.append((np.asarray(x, np.float64), np.asarray(t, np.float64), method))
        return variables["params"]["w"] * x

    # logit-normal at loc 3, scale 0.01: every t within 1e-3 of sigmoid(3) = 0.9526
    config = smoke(
        "flow.py",
        diffusion__flow_time_distribution=times,
        diffusion__flow_logit_normal_loc=3.0,
        diffusion__flow_logit_normal_scale=0.01,
    )
    x0 = np.random.default_rng(1).uniform(-1, 1, (8, 8, 8, 1))
    _, metrics = train.make_train_step(config, train.get_schedule(config.diffusion))(
        _stub_state(apply_fn, 0.7), {"image": jnp.asarray(x0, jnp.float32)}
    )
    ((x_t, t, method),) = seen
    assert method == "velocity" and t.shape == (8,)
    assert np.all((t > 0) & (t < 1)) and len(set(t.tolist())) == 8
    if times == "logit_normal":
        np.testing.assert_allclose(t, 1 / (1 + np.exp(-3.0)), atol=1e-3)
    else:
        assert t.min() < 0.8  # not the logit-normal draw at loc 3
    tb = t[:, None, None, None]
    eps = (x_t - (1 - tb) * x0) / tb  # x_t is on the straight path between x0 and this eps
    assert abs(eps.std() - 1) < 0.15 and abs(eps.mean()) < 0.1  # N(0, 1) noise, 512 draws
    np.testing.assert_allclose(metrics["loss"], np.mean((0.7 * x_t - (eps - x0)) ** 2), 1e-4)


def test_a_flow_run_samples_through_its_denoiser_and_reports_bits_per_dim(tmp_path):
    """A flow run's checkpoint serves `load_run`, every sampler and `evaluate_workdir`: the
    FlowDenoiser called at integer t is the config's prediction denoiser."""
    import jax_diffusion as jd
    from jax_diffusion import evaluation

    config = smoke("flow.py", train__num_steps=3)
    train.train_and_evaluate(config, str(tmp_path))
    config, shape, model, params, _ = train.load_run(str(tmp_path))
    assert type(model).__name__ == "FlowDenoiser"
    schedule = train.get_schedule(config.diffusion)
    for sampler in ("ddim", "dpm++", "ddpm"):
        x = train.sample(
            config, model, params, schedule, jax.random.key(0), shape=shape, num=4, sampler=sampler
        )
        assert x.shape == (4, *shape) and np.all(np.isfinite(np.asarray(x)))
    report = evaluation.evaluate_workdir(
        str(tmp_path), num_samples=8, batch_size=8, bpd_examples=2, progress=False, sampler="heun"
    )
    assert np.isfinite(report["bpd"]) and report["bpd"] > 0
    assert np.isfinite(report["fd_test"]) and report["sampler"] == "heun"
    # the native samplers: flow_sample of the network's velocity from sample's x_T
    key = jax.random.key(3)
    x_T = jax.random.normal(jax.random.split(key)[0], (4, *shape))

    def velocity(x, t):
        return model.apply({"params": params}, x, t, None, method="velocity")

    for method, shift in (("euler", 1.0), ("heun", 3.0)):
        config.sample.shift = shift
        got = train.sample(
            config, model, params, schedule, key, shape=shape, num=4, sampler=method, num_steps=60
        )  # more steps than T = 50: continuous time
        clip = config.sample.clip_denoised  # the default config's True: x0_hat is clipped
        want = jd.flow_sample(
            velocity, x_T, num_steps=60, method=method, shift=shift, clip_denoised=clip
        )
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_conditional_flow_run_guides_the_velocity():
    import jax_diffusion as jd

    """euler / heun on a class-conditional flow model: the labels reach the velocity, guided as
    uncond + w (cond - uncond): w = 1 is the labels' velocity, w = 0 the null label's."""
    config = smoke("digits_cond.py", diffusion__process="flow", diffusion__prediction="v")
    model = train.create_model(config, channels=1)
    x = jnp.zeros((2, 8, 8, 1))
    params = model.init(jax.random.key(0), x, jnp.zeros(2, jnp.int32), jnp.zeros(2, jnp.int32))
    params = jax.tree.map(  # a random network: the label embedding matters
        lambda p: p + 0.3 * jax.random.normal(jax.random.key(1), p.shape), params["params"]
    )
    schedule = train.get_schedule(config.diffusion)
    key, labels = jax.random.key(4), jnp.array([1, 7])
    x_T = jax.random.normal(jax.random.split(key)[0], (2, 8, 8, 1))
    for w in (1.0, 0.0):
        got = train.sample(
            config,
            model,
            params,
            schedule,
            key,
            shape=(8, 8, 1),
            num=2,
            sampler="heun",
            num_steps=4,
            guidance=w,
            labels=labels,
        )
        y = labels if w == 1.0 else jnp.full(2, config.model.num_classes)

        def velocity(x, t, y=y):
            return model.apply({"params": params}, x, t, y, method="velocity")

        clip = config.sample.clip_denoised
        want = jd.flow_sample(velocity, x_T, num_steps=4, method="heun", clip_denoised=clip)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
