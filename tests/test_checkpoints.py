"""Checkpoints: a data-parallel (replicated) train state round-trips onto any target sharding."""

import gc
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS, leaves
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from jax_diffusion import checkpoints, cli, train
from jax_diffusion.checkpoints import (
    CheckpointManager,
    _quiet_closed_loop_callbacks,
    _single_copy,
)


def _random_state(config_file="toy_2d.py", **model_fields):
    """A smoke TrainState (toy_2d's MLP, or default.py's UNet on 8x8 digits) with random values
    in every array (no init compile); model_fields override the config's model section."""
    config = cli.load_config(f"{CONFIGS / config_file}:smoke")
    config.model.update(model_fields)
    shape = (2,) if config_file == "toy_2d.py" else (8, 8, 1)
    model = train.create_model(config, channels=shape[-1])
    abstract = jax.eval_shape(
        lambda: train.create_train_state(config, model, jax.random.PRNGKey(0), shape)
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


def _run_with_steps(tmp_path, steps, **kwargs):
    """Saves a toy state at each step (params scaled by the step, data state {'epoch': step});
    kwargs go to the CheckpointManager."""
    base = _random_state()
    states = {}
    ckpt = CheckpointManager(str(tmp_path), **kwargs)
    for s in steps:
        states[s] = base.replace(
            step=jnp.asarray(s, jnp.int32), params=jax.tree.map(lambda p, s=s: p * s, base.params)
        )
        assert ckpt.save(states[s], {"epoch": s})
    ckpt.close()
    return states


def test_saving_a_step_twice_is_a_value_error_and_keeps_the_first(tmp_path):
    # orbax's StepAlreadyExistsError, even with force=True; save's docstring promised a bool
    states = _run_with_steps(tmp_path, [3])
    ckpt = CheckpointManager(str(tmp_path))
    other = states[3].replace(params=jax.tree.map(lambda p: p + 1, states[3].params))
    for force in (False, True):
        with pytest.raises(ValueError, match=r"a checkpoint of step 3 exists already in .*never"):
            ckpt.save(other, {"epoch": 9}, force=force)
    restored, data_state = ckpt.restore(states[3])
    assert data_state == {"epoch": 3}
    for a, b in zip(leaves(states[3].params), leaves(restored.params), strict=True):
        np.testing.assert_array_equal(a, b)
    ckpt.close()
    # step 0 (a fresh state) is a step like any other
    ckpt = CheckpointManager(str(tmp_path / "zero"))
    fresh = states[3].replace(step=jnp.zeros((), jnp.int32))
    assert ckpt.save(fresh, {}, force=True)
    with pytest.raises(ValueError, match=r"a checkpoint of step 0 exists already"):
        ckpt.save(fresh, {}, force=True)
    ckpt.close()


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


def test_a_fallback_leaves_no_reports_of_the_reads_it_abandoned(tmp_path, monkeypatch):
    # each abandoned read reported its error when the garbage collector finalized it, after
    # the restore: 17,000 lines of stderr for one truncated checkpoint of the smoke UNet
    ckpt = CheckpointManager(str(tmp_path))
    unet = _random_state("default.py")  # the MLP's few arrays leave no read behind
    for step in (1, 2):
        assert ckpt.save(unet.replace(step=jnp.asarray(step, jnp.int32)), {"epoch": step})
    ckpt.close()
    # the array data only (what a lost page cache truncates): the reads start, then fail
    assert _corrupt(tmp_path / "checkpoints" / "2" / "state" / "ocdbt.process_0") > 0
    reports = []
    monkeypatch.setattr(sys, "unraisablehook", reports.append)
    ckpt = CheckpointManager(str(tmp_path))
    ckpt.restore_params()
    gc.collect()
    assert ckpt.restored_step == 1
    assert [str(r.exc_value)[:60] for r in reports] == []
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


def _failing_reads(ckpt, failures):
    """Makes step s's next failures[s] reads fail (-1: every read); returns the list of the steps
    read, in order."""
    real_restore, calls, left = ckpt._manager.restore, [], dict(failures)

    def restore(step, *args, **kwargs):
        calls.append(step)
        if left.get(step, 0) != 0:
            left[step] -= 1
            raise OSError(f"injected read error at step {step}")
        return real_restore(step, *args, **kwargs)

    ckpt._manager.restore = restore
    return calls


def test_a_transient_read_error_costs_no_checkpoint(tmp_path, caplog):
    """A step whose first read fails and second read works is restored and stays in place."""
    states = _run_with_steps(tmp_path, [1, 2, 3])
    ckpt = CheckpointManager(str(tmp_path))
    calls = _failing_reads(ckpt, {3: 1})  # e.g. too many open files, once
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


def test_the_newest_step_that_restores_on_a_second_read_wins_and_only_twice_failed_ones_move(
    tmp_path,
):
    states = _run_with_steps(tmp_path, [1, 2, 3, 4], max_to_keep=None)
    ckpt = CheckpointManager(str(tmp_path), max_to_keep=None)
    # 4 never reads, 3 and 2 fail once: 1 restores, then 4 fails again and 3 reads
    calls = _failing_reads(ckpt, {4: -1, 3: 1, 2: 1})
    restored, data = ckpt.restore(jax.tree.map(jnp.zeros_like, states[1]))
    assert calls == [4, 3, 2, 1, 4, 3]  # second reads newest first, stopping at the first good
    assert (ckpt.restored_step, int(restored.step), data) == (3, 3, {"epoch": 3})
    for a, b in zip(leaves(states[3]), leaves(restored), strict=True):
        np.testing.assert_array_equal(a, b)
    # only 4 failed twice; 2 failed once and is older than the step restored: both kept
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2", "3"]
    assert sorted(p.name for p in (tmp_path / "checkpoints_unreadable").iterdir()) == ["4"]
    assert ckpt.latest_step() == 3
    ckpt.close()


def test_a_step_set_aside_a_third_time_takes_the_next_free_suffix(tmp_path):
    states = _run_with_steps(tmp_path, [1, 2])
    aside = tmp_path / "checkpoints_unreadable"
    for name in ("2", "2.1"):  # set aside by two earlier resumes
        (aside / name).mkdir(parents=True)
        (aside / name / "earlier").write_text(name)
    _corrupt(tmp_path / "checkpoints" / "2")
    ckpt = CheckpointManager(str(tmp_path))
    assert ckpt.restore(jax.tree.map(jnp.zeros_like, states[1]))[1] == {"epoch": 1}
    assert sorted(p.name for p in aside.iterdir()) == ["2", "2.1", "2.2"]
    assert (aside / "2.2" / "state").is_dir()
    for name in ("2", "2.1"):  # the earlier ones as they were
        assert [p.name for p in (aside / name).iterdir()] == ["earlier"]
        assert (aside / name / "earlier").read_text() == name
    ckpt.close()


def test_a_directory_that_cannot_be_moved_aside_is_an_error_naming_the_step(tmp_path, monkeypatch):
    states = _run_with_steps(tmp_path, [1, 2])
    _corrupt(tmp_path / "checkpoints" / "2")
    ckpt = CheckpointManager(str(tmp_path))

    def no_rename(self, target):
        raise OSError("directory renames not supported")

    monkeypatch.setattr(type(epath.Path(str(tmp_path))), "rename", no_rename)
    with pytest.raises(ValueError, match="checkpoint step 2 in .* could not be moved aside") as e:
        ckpt.restore(jax.tree.map(jnp.zeros_like, states[1]))
    assert "renames not supported" in str(e.value) and "move it out" in str(e.value)
    assert (tmp_path / "checkpoints" / "2" / "state").is_dir()
    ckpt.close()


def test_an_explicit_step_restores_that_step_or_raises_without_falling_back(tmp_path):
    states = _run_with_steps(tmp_path, [0, 1, 2])
    target = jax.tree.map(jnp.zeros_like, states[0])
    ckpt = CheckpointManager(str(tmp_path))
    for s in (1, 0):  # older than the latest, and step 0 (falsy) too
        restored, data = ckpt.restore(target, step=s)
        assert (ckpt.restored_step, int(restored.step), data) == (s, s, {"epoch": s})
        for a, b in zip(leaves(states[s]), leaves(restored), strict=True):
            np.testing.assert_array_equal(a, b)
    _failing_reads(ckpt, {2: -1})
    with pytest.raises(OSError, match="injected read error at step 2"):
        ckpt.restore(target, step=2)
    assert ckpt.restored_step == 0  # still the last step read
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["0", "1", "2"]
    assert not (tmp_path / "checkpoints_unreadable").exists()
    ckpt.close()


def test_a_checkpoint_of_another_model_is_one_clear_error_and_moves_nothing(tmp_path):
    _run_with_steps(tmp_path, [1, 2])
    hidden = _random_state().params["dense_in"]["kernel"].shape[1]
    ckpt = CheckpointManager(str(tmp_path))
    wider = _random_state(hidden_dim=2 * hidden)
    # the first differing array in sorted order, a bias of the first block
    shape = rf"ema_params/block_0_dense0/bias has shape \({hidden},\) there, \({2 * hidden},\) here"
    with pytest.raises(ValueError, match=r"^checkpoint step 2 in .* another model .*" + shape):
        ckpt.restore(wider)
    with pytest.raises(ValueError, match=shape):
        ckpt.restore_params(wider.checkpoint_items())
    deeper = _random_state(num_layers=4)  # the smoke config has 3
    with pytest.raises(ValueError, match=r"is not in the checkpoint \(\d+ arrays differ\)"):
        ckpt.restore(deeper, step=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]
    assert not (tmp_path / "checkpoints_unreadable").exists()
    ckpt.close()


def test_restore_params_gives_the_ema_params_by_default(tmp_path):
    states = _run_with_steps(tmp_path, [1, 2])
    ckpt = CheckpointManager(str(tmp_path))
    params = ckpt.restore_params()
    assert ckpt.restored_step == 2
    for a, b in zip(leaves(states[2].ema_params), leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    ckpt.close()


def test_restore_params_takes_a_train_state_as_its_target(tmp_path):
    # a TrainState target was read as "no checkpoint could be restored: step 2: TypeError:
    # 'TrainState' object is not subscriptable", as if every checkpoint were broken
    states = _run_with_steps(tmp_path, [1, 2])
    ckpt = CheckpointManager(str(tmp_path))
    for ema, field in ((True, "ema_params"), (False, "params")):
        params = ckpt.restore_params(states[1], ema=ema)  # the target's values do not matter
        assert ckpt.restored_step == 2
        for a, b in zip(leaves(getattr(states[2], field)), leaves(params), strict=True):
            np.testing.assert_array_equal(a, b)
    for bad, got in (({"params": 1}, r"dict with keys \['params'\]"), ([states[1].params], "list")):
        with pytest.raises(
            ValueError, match=rf"state_like must be None, a TrainState or its.*; got {got}$"
        ):
            ckpt.restore_params(bad)


def test_a_train_state_subclass_saves_and_restores_its_own_fields(tmp_path):
    # the Flax pattern of adding a field (batch_stats) to the train state: the field was left
    # out of checkpoint_items, so a restore silently kept the fresh state's value
    import flax.struct
    import optax

    from jax_diffusion.train_state import TrainState

    @flax.struct.dataclass
    class StateWithStats(TrainState):
        batch_stats: dict = None

    def make(value, step):
        state = StateWithStats.create(
            apply_fn=None,
            params={"w": jnp.ones(2)},
            tx=optax.sgd(0.1),
            rng=jnp.zeros(2, jnp.uint32),
        )
        return state.replace(step=jnp.int32(step), batch_stats={"mean": jnp.full(3, value)})

    items = make(7.0, 1).checkpoint_items()
    assert set(items) == {
        "step", "params", "ema_params", "opt_state", "rng", "bad_steps", "skipped_steps",
        "batch_stats",
    }  # fmt: skip
    ckpt = CheckpointManager(str(tmp_path))
    ckpt.save(make(7.0, 1), {"epoch": 1})
    restored, _ = ckpt.restore(make(0.0, 0))
    np.testing.assert_array_equal(restored.batch_stats["mean"], np.full(3, 7.0))
    assert int(restored.step) == 1
    ckpt.close()


def test_only_the_last_max_to_keep_and_interval_multiples_or_forced_steps_are_saved(tmp_path):
    state = _random_state()
    ckpt = CheckpointManager(str(tmp_path), max_to_keep=2, save_interval_steps=2)
    saved = {}
    for s in range(2, 7):  # from a multiple: orbax saves the first step of a run in any case
        saved[s] = ckpt.save(state.replace(step=jnp.asarray(s, jnp.int32)), {"epoch": s})
    assert saved == {2: True, 3: False, 4: True, 5: False, 6: True}
    assert ckpt.save(state.replace(step=jnp.asarray(7, jnp.int32)), {}, force=True)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["6", "7"]
    ckpt.close()


def test_a_relative_workdir_is_resolved_when_the_manager_is_made(tmp_path, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    ckpt = CheckpointManager("run")
    assert ckpt.directory == str(tmp_path / "run" / "checkpoints")
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert ckpt.save(_random_state().replace(step=jnp.asarray(0, jnp.int32)), {"epoch": 0})
    assert (tmp_path / "run" / "checkpoints" / "0").is_dir()
    assert not (tmp_path / "elsewhere" / "run").exists()
    ckpt.close()


class _Unraisable:
    def __init__(self, err):
        self.exc_type, self.exc_value, self.exc_traceback = type(err), err, None
        self.err_msg, self.object = None, None


def test_the_restore_hook_drops_only_closed_loop_errors_and_is_put_back(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
    installed = sys.unraisablehook
    closed = RuntimeError("Event loop is closed")
    others = [RuntimeError("Event loop is closed!"), RuntimeError("boom"), ValueError("x")]
    with _quiet_closed_loop_callbacks():
        for err in [closed, *others]:
            sys.unraisablehook(_Unraisable(err))
    assert seen == others and sys.unraisablehook is installed
    with pytest.raises(OSError, match="read failed"):
        with _quiet_closed_loop_callbacks(grace_seconds=0.0):
            raise OSError("read failed")
    assert sys.unraisablehook is installed  # after a failure too
    sys.unraisablehook(_Unraisable(closed))  # outside the scope: passed on
    assert seen == [*others, closed]


def test_closed_loop_errors_of_a_failed_restore_are_dropped_during_the_grace_period(
    monkeypatch,
):
    seen, slept = [], []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))

    def sleep(seconds):  # the failed restore's in-flight reads complete while it waits
        slept.append(seconds)
        sys.unraisablehook(_Unraisable(RuntimeError("Event loop is closed")))

    monkeypatch.setattr(checkpoints, "time", types.SimpleNamespace(sleep=sleep))
    with pytest.raises(OSError, match="read failed"):
        with _quiet_closed_loop_callbacks(grace_seconds=0.75):
            raise OSError("read failed")
    assert slept == [0.75] and seen == []
    with _quiet_closed_loop_callbacks(grace_seconds=0.75):
        pass
    assert slept == [0.75]  # no wait after a restore that succeeded


def test_an_explicit_step_is_checked_against_its_own_shapes_not_the_newest_step_s(tmp_path):
    # step 1 of one model, step 2 of a wider one: each restores onto its own model's target
    narrow = _random_state().replace(step=jnp.asarray(1, jnp.int32))
    hidden = narrow.params["dense_in"]["kernel"].shape[1]
    wide = _random_state(hidden_dim=2 * hidden).replace(step=jnp.asarray(2, jnp.int32))
    ckpt = CheckpointManager(str(tmp_path))
    assert ckpt.save(narrow, {"epoch": 1}) and ckpt.save(wide, {"epoch": 2})
    restored, data = ckpt.restore(jax.tree.map(jnp.zeros_like, narrow), step=1)
    assert (int(restored.step), data) == (1, {"epoch": 1})
    for a, b in zip(leaves(narrow), leaves(restored), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"^checkpoint step 2 in .* another model"):
        ckpt.restore(jax.tree.map(jnp.zeros_like, narrow))  # the newest step: the wide one
    ckpt.close()


def test_no_readable_checkpoint_names_only_the_first_line_of_each_step_s_error(tmp_path):
    # tensorstore's read errors go on with a many-line spec; the summary keeps each first line
    states = _run_with_steps(tmp_path, [1, 2])
    ckpt = CheckpointManager(str(tmp_path))

    def restore(step, *args, **kwargs):
        raise OSError(f"read error at step {step}\nspec: {{'driver': 'ocdbt'}}\nmore")

    ckpt._manager.restore = restore
    with pytest.raises(ValueError) as info:
        ckpt.restore(jax.tree.map(jnp.zeros_like, states[1]))
    message = str(info.value)
    assert "step 2: OSError: read error at step 2; step 1: OSError: read error at step 1" in message
    assert "spec" not in message and "more" not in message
    ckpt.close()


class _Abandoned:
    """A read left behind by a failed restore: in a reference cycle (so only the cyclic
    garbage collector frees it), reporting "Event loop is closed" when finalized."""

    def __init__(self):
        self.cycle = self

    def __del__(self):
        raise RuntimeError("Event loop is closed")


def test_a_failed_attempt_collects_its_abandoned_reads_while_their_reports_are_dropped(
    monkeypatch,
):
    reports = []
    monkeypatch.setattr(sys, "unraisablehook", reports.append)

    def restore_step(step):
        _Abandoned()  # unreachable at once, but freed only by a collection
        try:
            raise KeyError("the error being handled")
        except KeyError:
            raise OSError(f"read error at step {step}") from None

    gc.disable()  # no automatic collection during the attempt: only its own
    try:
        ok, err = checkpoints._attempt(restore_step, 3, grace_seconds=0.0)
        assert not ok and isinstance(err, OSError) and str(err) == "read error at step 3"
        # the traceback of the error and of the one it was raised while handling are
        # dropped (their frames would keep the abandoned reads alive)
        assert isinstance(err.__context__, KeyError)
        assert err.__traceback__ is None and err.__context__.__traceback__ is None
        gc.collect()  # after the attempt, with the hook gone: nothing left to report
    finally:
        gc.enable()
    assert [str(r.exc_value) for r in reports] == []
