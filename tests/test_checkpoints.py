"""Checkpoints: a data-parallel (replicated) train state round-trips onto any target sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS, leaves
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from jax_diffusion import cli, train
from jax_diffusion.checkpoints import CheckpointManager, _single_copy


def _random_state():
    """A toy_2d smoke TrainState with random values in every array (no init compile)."""
    config = cli.load_config(f"{CONFIGS / 'toy_2d.py'}:smoke")
    model = train.create_model(config, channels=2)
    abstract = jax.eval_shape(
        lambda: train.create_train_state(config, model, jax.random.PRNGKey(0), (2,))
    )
    flat, treedef = jax.tree.flatten(abstract)
    rng = np.random.default_rng(0)
    values = [
        jnp.asarray(
            rng.integers(0, 100, x.shape)
            if jnp.issubdtype(x.dtype, jnp.integer)
            else rng.standard_normal(x.shape),
            x.dtype,
        )
        for x in flat
    ]
    return jax.tree.unflatten(treedef, values)


def test_single_copy_only_unreplicates_multi_device_replicated_arrays():
    mesh = train.make_mesh(jax.devices())
    x = jnp.arange(16.0).reshape(8, 2)
    replicated = jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
    copy = _single_copy(replicated)
    assert copy.sharding.device_set == {jax.devices()[0]}
    np.testing.assert_array_equal(copy, x)
    sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    assert _single_copy(sharded) is sharded
    single = jax.device_put(x, jax.devices()[3])
    assert _single_copy(single) is single
    assert _single_copy(np.ones(3)).shape == (3,)


def test_replicated_state_restores_onto_replicated_and_single_device_targets(tmp_path):
    assert jax.device_count() == 8
    state = _random_state().replace(step=jnp.asarray(7, jnp.int32))
    mesh = train.make_mesh(jax.devices())
    replicated = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    ckpt = CheckpointManager(str(tmp_path))
    assert ckpt.save(replicated, {"epoch": 3})
    assert ckpt.latest_step() == 7

    zeros = jax.tree.map(jnp.zeros_like, state)
    for sharding in (NamedSharding(mesh, PartitionSpec()), SingleDeviceSharding(jax.devices()[5])):
        target = jax.device_put(zeros, sharding)
        restored, data = ckpt.restore(target)
        assert data == {"epoch": 3}
        for a, b in zip(
            leaves(state.checkpoint_items()), leaves(restored.checkpoint_items()), strict=True
        ):
            np.testing.assert_array_equal(a, b)
        for x in jax.tree.leaves(restored.checkpoint_items()):
            assert x.sharding.is_equivalent_to(sharding, x.ndim)
    ema = ckpt.restore_params(ema=True)
    for a, b in zip(leaves(state.ema_params), leaves(ema), strict=True):
        np.testing.assert_array_equal(a, b)
    ckpt.close()


def test_bad_keep_and_interval_arguments_are_rejected_before_anything_is_written(tmp_path):
    for kwargs, match in [
        (dict(max_to_keep=0), "max_to_keep must be an int >= 1 or None; got 0"),
        (dict(max_to_keep=2.5), "max_to_keep must be an int >= 1 or None; got 2.5"),
        (dict(save_interval_steps=0), "save_interval_steps must be an int >= 1; got 0"),
        (dict(save_interval_steps=True), "save_interval_steps must be an int >= 1; got True"),
    ]:
        with pytest.raises(ValueError, match=match):
            CheckpointManager(str(tmp_path / "run"), **kwargs)
    assert not (tmp_path / "run").exists()


def _corrupt(step_dir):
    """Truncates every array data file of a saved step, as a crash that lost the page cache
    after the rename would leave it; returns how many files were truncated."""
    files = [f for f in step_dir.rglob("*") if f.is_file() and f.parent.name == "d"]
    for f in files:
        f.write_bytes(b"")
    return len(files)


def _run_with_steps(tmp_path, steps):
    """Saves a toy state at each step (params scaled by the step, data state {'epoch': step})."""
    base = _random_state()
    states = {}
    ckpt = CheckpointManager(str(tmp_path))
    for s in steps:
        states[s] = base.replace(
            step=jnp.asarray(s, jnp.int32), params=jax.tree.map(lambda p, s=s: p * s, base.params)
        )
        assert ckpt.save(states[s], {"epoch": s})
    ckpt.close()
    return states


def test_an_unreadable_latest_checkpoint_falls_back_and_is_moved_aside(tmp_path, caplog):
    states = _run_with_steps(tmp_path, [1, 2, 3])
    assert _corrupt(tmp_path / "checkpoints" / "3") > 0
    target = jax.tree.map(jnp.zeros_like, states[1])

    ckpt = CheckpointManager(str(tmp_path))
    with caplog.at_level("WARNING", logger="jax_diffusion.checkpoints"):
        restored, data = ckpt.restore(target)
    assert (ckpt.restored_step, int(restored.step), data) == (2, 2, {"epoch": 2})
    for a, b in zip(leaves(states[2]), leaves(restored), strict=True):
        np.testing.assert_array_equal(a, b)
    assert "checkpoints [3]" in caplog.text and "restored step 2" in caplog.text
    # kept, not deleted, and out of the way: the resumed run saves step 3 again
    aside = tmp_path / "checkpoints_unreadable" / "3"
    assert aside.is_dir() and (aside / "state").is_dir()
    assert not (tmp_path / "checkpoints" / "3").exists()
    assert ckpt.latest_step() == 2
    assert ckpt.save(states[3], {"epoch": 3})
    assert ckpt.latest_step() == 3
    restored, data = ckpt.restore(target)
    assert (ckpt.restored_step, data) == (3, {"epoch": 3})
    # unreadable again: set aside next to the first one, which is kept
    _corrupt(tmp_path / "checkpoints" / "3")
    assert ckpt.restore(target)[1] == {"epoch": 2}
    assert sorted(p.name for p in aside.parent.iterdir()) == ["3", "3.1"]
    ckpt.close()


def test_restore_params_skips_an_unreadable_checkpoint_without_moving_it(tmp_path, caplog):
    states = _run_with_steps(tmp_path, [1, 2])
    _corrupt(tmp_path / "checkpoints" / "2")
    ckpt = CheckpointManager(str(tmp_path))
    with caplog.at_level("WARNING", logger="jax_diffusion.checkpoints"):
        ema = ckpt.restore_params(ema=False)
    assert ckpt.restored_step == 1 and "restored step 1" in caplog.text
    for a, b in zip(leaves(states[1].params), leaves(ema), strict=True):
        np.testing.assert_array_equal(a, b)
    assert (tmp_path / "checkpoints" / "2").is_dir()  # sampling only reads
    assert not (tmp_path / "checkpoints_unreadable").exists()
    ckpt.close()


def test_no_readable_checkpoint_is_an_error_naming_each_step_and_moves_nothing(tmp_path):
    states = _run_with_steps(tmp_path, [1, 2])
    for s in (1, 2):
        _corrupt(tmp_path / "checkpoints" / str(s))
    ckpt = CheckpointManager(str(tmp_path))
    with pytest.raises(ValueError, match=r"could be restored: step 2: .*; step 1: "):
        ckpt.restore(jax.tree.map(jnp.zeros_like, states[1]))
    with pytest.raises(Exception, match="reading"):  # an explicit step: no fallback
        ckpt.restore(jax.tree.map(jnp.zeros_like, states[1]), step=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]
    assert not (tmp_path / "checkpoints_unreadable").exists()
    ckpt.close()
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        CheckpointManager(str(tmp_path / "empty")).restore(states[1])


def test_a_transient_read_error_costs_no_checkpoint(tmp_path, caplog):
    """A step whose first read fails and second read works is restored and stays in place."""
    states = _run_with_steps(tmp_path, [1, 2, 3])
    ckpt = CheckpointManager(str(tmp_path))
    real_restore, calls = ckpt._manager.restore, []

    def flaky_restore(step, *args, **kwargs):
        calls.append(step)
        if calls.count(3) == 1 and step == 3:
            raise OSError("Too many open files")  # once
        return real_restore(step, *args, **kwargs)

    ckpt._manager.restore = flaky_restore
    with caplog.at_level("WARNING", logger="jax_diffusion.checkpoints"):
        restored, data = ckpt.restore(jax.tree.map(jnp.zeros_like, states[1]))
    assert calls == [3, 2, 3]  # step 2 shows the store works, then step 3 again
    assert (ckpt.restored_step, data) == (3, {"epoch": 3})
    for a, b in zip(leaves(states[3]), leaves(restored), strict=True):
        np.testing.assert_array_equal(a, b)
    assert "step 3 restored on a second read" in caplog.text
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2", "3"]
    assert not (tmp_path / "checkpoints_unreadable").exists()
    ckpt.close()
