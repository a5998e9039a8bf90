"""orbax-checkpoint wrapper: the train state and the data-iterator state saved together.

Each checkpoint holds two items: 'state' (the TrainState pytree, arrays) and 'data' (the data
iterator's JSON state), so a resumed run continues bit-identically. orbax writes each step to a
temporary directory and renames it when complete, so a process killed mid-save leaves the last
complete checkpoint as the latest one.

A checkpoint that is complete but unreadable (files truncated or lost after the rename, e.g. by
a host that crashed before its page cache reached the disk) does not block the run: `restore`
falls back to the newest checkpoint that restores, logs a warning, and moves the unreadable
ones aside to `<workdir>/checkpoints_unreadable/<step>` (kept, not deleted), so the resumed run
saves those steps afresh. A step counts as unreadable only if it fails a second read too (made
after an older step has restored), so a transient storage error costs no checkpoint. Where the
store cannot rename a directory (an object store without TensorFlow's gfile may not), the error
names the step to move by hand. Only when no checkpoint restores is an error raised (with each
step's reason), and nothing is moved. With several processes, each restores and falls back on
its own and process 0 moves the directories (the others wait for it): they must all see the
same checkpoint directory, as orbax requires anyway. A step readable by some processes and not
by others is not handled: they would restore different steps (or wait on each other).

In a single-process run, an array replicated over several devices (the data-parallel train
state) is saved as its device-0 copy. orbax would otherwise split each replicated array into one
slice per device ("replica-parallel" saving, meant for several hosts writing together): one
jitted slice per array and device, compiled on first use, for one process that writes them all
anyway. Saving the smoke train state replicated over 8 CPU devices: 6.2 s -> 0.8 s for the first
save, 1.75 -> 0.8 s for later ones. The checkpoint holds the same values; `restore` places them
with the target's shardings.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from jax_diffusion._checks import check_int
from jax_diffusion.train_state import TrainState

__all__ = ["CheckpointManager"]

log = logging.getLogger(__name__)


class CheckpointManager:
    """Saves and restores (TrainState, data state) under `<workdir>/checkpoints`.

    Args:
      workdir: run directory (local path or a bucket path orbax understands, e.g. gs://...),
        as a str or a path-like such as `etils.epath.Path`.
      max_to_keep: number of most recent checkpoints kept, an int >= 1, or None for all.
      save_interval_steps: orbax saves a step when it is a multiple of this int >= 1, when
        the directory holds no checkpoint yet, or when forced (`save(..., force=True)`, as
        train.py always does).

    Attributes:
      directory: `<workdir>/checkpoints`.
      restored_step: the step the last `restore` / `restore_params` read (None before any).

    Raises:
      ValueError: max_to_keep or save_interval_steps not as above.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
    ):
        check_int("max_to_keep", max_to_keep, 1, none_ok=True)
        check_int("save_interval_steps", save_interval_steps, 1)
        workdir = os.fspath(workdir)
        if "://" not in workdir:
            workdir = os.path.abspath(workdir)
        self.directory = os.path.join(workdir, "checkpoints")
        self.restored_step: int | None = None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            create=True,
            enable_async_checkpointing=False,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={  # the handlers also read a step's metadata (`_check_shapes`)
                "state": ocp.StandardCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, state: TrainState, data_state: dict, *, force: bool = False) -> bool:
        """Saves at `state.step`; returns whether a checkpoint was written (False: not a step
        of the manager's save interval, unless `force`).

        Raises:
          ValueError: a checkpoint of this step exists already (checkpoints are never
            overwritten), before anything is written.
        """
        step = int(jax.device_get(state.step))
        if step in self._manager.all_steps():
            raise ValueError(
                f"a checkpoint of step {step} exists already in {self.directory}; checkpoints "
                "are never overwritten (restore it, or save at another step)"
            )
        items = jax.tree.map(_single_copy, state.checkpoint_items())
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(items),
                data=ocp.args.JsonSave(data_state),
            ),
            force=force,
        )
        self._manager.wait_until_finished()
        return saved

    def restore(self, state: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """Restores into the structure, shapes and shardings of `state`.

        Args:
          state: a freshly created TrainState (its arrays give the target shardings).
          step: the step to restore; None: the newest checkpoint that restores (unreadable newer
            ones are moved aside, see the module docstring).

        Returns:
          (restored TrainState, data-iterator state dict).

        Raises:
          FileNotFoundError: no checkpoint at all.
          ValueError: the newest checkpoint holds other arrays or shapes than `state` (another
            model or optimizer config), or no checkpoint restores (each step's error is in the
            message).
        """
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state.checkpoint_items())
        self._check_shapes(target, step)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
        )

        def restore_step(s: int) -> tuple[TrainState, dict]:
            restored = self._manager.restore(s, args=args)
            return state.replace(**restored["state"]), restored["data"]

        if step is not None:
            with _quiet_closed_loop_callbacks():
                result = restore_step(step)
            self.restored_step = step
            return result
        return self._restore_newest(restore_step, set_aside=True)

    def restore_params(self, state_like: TrainState | Mapping | None = None, *, ema: bool = True):
        """The (EMA) params of the newest checkpoint that restores, without an optimizer.

        Unreadable newer checkpoints are skipped with a warning and left where they are.

        Args:
          state_like: optional target: a TrainState (e.g. a fresh one, or `jax.eval_shape` of
            one) or the tree its `checkpoint_items()` returns; the restored params get its
            dtypes and shardings. Without it the arrays are restored as saved.
          ema: the EMA params (for sampling) or the raw params.

        Raises:
          ValueError: state_like is neither of those (checked before any read).
        """
        if isinstance(state_like, TrainState):
            state_like = state_like.checkpoint_items()
        if state_like is not None and not (
            isinstance(state_like, Mapping) and {"params", "ema_params"} <= set(state_like)
        ):
            raise ValueError(
                "state_like must be None, a TrainState or its checkpoint_items() dict (with "
                f"'params' and 'ema_params'); got {type(state_like).__name__}"
                + (f" with keys {sorted(state_like)}" if isinstance(state_like, Mapping) else "")
            )
        if state_like is not None:
            target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
            self._check_shapes(target)
            args = ocp.args.StandardRestore(target)
        else:
            args = ocp.args.StandardRestore()

        def restore_step(s: int):
            restored = self._manager.restore(s, args=ocp.args.Composite(state=args))
            return restored["state"]["ema_params" if ema else "params"]

        return self._restore_newest(restore_step, set_aside=False)

    def _check_shapes(self, target: Any, step: int | None = None) -> None:
        """ValueError when checkpoint `step` (None: the newest) holds other arrays or shapes
        than `target`: a resume with another model config would otherwise fail in orbax for
        every step, with a long error per array. A step whose metadata cannot be read is left
        to the restore (and its fallback to older steps)."""
        step = self._manager.latest_step() if step is None else step
        if step is None:
            return
        try:
            saved = self._manager.item_metadata(step)["state"]
            saved = {_path_name(p): tuple(m.shape) for p, m in _with_paths(saved)}
        except Exception:  # noqa: BLE001 - unreadable: the restore reports or skips it
            return
        wanted = {_path_name(p): tuple(a.shape) for p, a in _with_paths(target)}

        def describe(k: str) -> str:
            if k not in saved:
                return f"{k} {wanted[k]} is not in the checkpoint"
            if k not in wanted:
                return f"{k} {saved[k]} is only in the checkpoint"
            return f"{k} has shape {saved[k]} there, {wanted[k]} here"

        keys = sorted(saved.keys() | wanted.keys())
        diffs = [describe(k) for k in keys if saved.get(k) != wanted.get(k)]
        if diffs:
            raise ValueError(
                f"checkpoint step {step} in {self.directory} holds another model or optimizer "
                f"than this config builds: {diffs[0]} ({len(diffs)} arrays differ). Resume with "
                "the config the run was trained with (its config.json), or use a new workdir."
            )

    def _restore_newest(self, restore_step: Callable[[int], Any], *, set_aside: bool) -> Any:
        """restore_step(s) for the newest step s that restores; see the module docstring.

        A step that fails is read once more after an older one has restored, newest first, and
        only a step that fails both times counts as unreadable: a transient error (a storage
        hiccup, too many open files) must not cost a good checkpoint.
        """
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        failed: list[tuple[int, Exception]] = []
        for s in steps:
            ok, result = _attempt(restore_step, s)
            if not ok:
                failed.append((s, result))
                continue
            for i, (f, _) in enumerate(failed):  # the second read, newest first
                again, retried = _attempt(restore_step, f)
                if again:
                    log.warning("checkpoint step %d restored on a second read", f)
                    s, result, failed = f, retried, failed[:i]
                    break
            if failed:
                bad = [f for f, _ in failed]
                log.warning(
                    "checkpoints %s in %s could not be restored, twice (%s); restored step %d%s",
                    bad,
                    self.directory,
                    _reasons(failed),
                    s,
                    "; moving them aside" if set_aside else "",
                )
                if set_aside:
                    self._set_aside(bad)
            self.restored_step = s
            return result
        raise ValueError(
            f"no checkpoint in {self.directory} could be restored: {_reasons(failed)}"
        ) from failed[0][1]

    def _set_aside(self, steps: list[int]) -> None:
        """Moves unreadable step directories to <workdir>/checkpoints_unreadable/<step>."""
        root = epath.Path(self.directory)
        aside = root.parent / "checkpoints_unreadable"
        if jax.process_index() == 0:
            aside.mkdir(parents=True, exist_ok=True)
            for s in steps:
                dest, n = aside / str(s), 0
                while dest.exists():  # set aside before: keep both
                    n += 1
                    dest = aside / f"{s}.{n}"
                try:
                    (root / str(s)).rename(dest)
                except Exception as err:  # noqa: BLE001 - a store without directory renames
                    raise ValueError(
                        f"checkpoint step {s} in {self.directory} is unreadable and could not "
                        f"be moved aside to {dest} ({type(err).__name__}: {err}); move it "
                        "out of the checkpoints directory and resume again"
                    ) from err
        multihost_utils.sync_global_devices("jax_diffusion_checkpoints_set_aside")
        self._manager.reload()

    def close(self) -> None:
        self._manager.close()


def _attempt(
    restore_step: Callable[[int], Any], step: int, grace_seconds: float = 0.5
) -> tuple[bool, Any]:
    """(True, restore_step(step)), or (False, the exception, without its traceback) if it
    raised.

    The reads a failed restore abandons stay reachable from the error's traceback (its frames)
    and reference cycles; each would report its error (hundreds of tracebacks for one truncated
    checkpoint) whenever the cyclic garbage collector next ran, long after the hook of
    `_quiet_closed_loop_callbacks` is gone. So the traceback is dropped (the message is what
    the fallback reports) and they are collected while the hook is still in place.
    """
    with _quiet_closed_loop_callbacks():
        try:
            return True, restore_step(step)
        except Exception as err:  # noqa: BLE001 - orbax and tensorstore raise many types
            failure = err
        _drop_tracebacks(failure)  # outside the except block, which holds the traceback too
        time.sleep(grace_seconds)  # the in-flight reads complete
        gc.collect()
    return False, failure


_HOOK_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet_closed_loop_callbacks(grace_seconds: float = 0.5):
    """Drops the reports of the reads a failed orbax restore abandons.

    When one array read fails, orbax's restore raises and closes its event loop while the other
    reads are still in flight; each of those then reports a RuntimeError from its completion
    callback (tensorstore's thread calling `loop.call_soon_threadsafe`) through
    `sys.unraisablehook`, and each read coroutine that failed too reports its own error when
    the garbage collector finalizes it: hundreds of tracebacks (17,000 lines for one truncated
    checkpoint of the smoke UNet), harmless, after a restore that has already failed cleanly.
    While restoring, and for `grace_seconds` after a failure (ended by a garbage collection),
    this hook drops exactly those and passes everything else on to the previous hook. Restores
    in several threads take turns (a lock), so each puts back the hook it found.
    """
    with _HOOK_LOCK:
        previous = sys.unraisablehook

        def hook(unraisable):
            if not _of_a_failed_read(unraisable):
                previous(unraisable)

        sys.unraisablehook = hook
        try:
            yield
        except BaseException:
            time.sleep(grace_seconds)  # the in-flight reads of the failed restore complete
            raise
        finally:
            sys.unraisablehook = previous


def _with_paths(tree: Any) -> list:
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _path_name(path: tuple) -> str:
    """'opt_state/1/count' for a key path: the checkpoint's metadata holds the optimizer's
    named tuples as dicts, so attribute and dict keys must read the same."""
    names = (getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
    return "/".join(str(n) for n in names)


def _drop_tracebacks(err: BaseException) -> None:
    """Detaches the traceback (and so the frames) of `err` and of the errors it chains."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        err.__traceback__ = None
        err = err.__cause__ or err.__context__


def _of_a_failed_read(unraisable) -> bool:
    """An orbax read abandoned by a failed restore: the completion callback's "Event loop is
    closed", or the read coroutine's own error, never awaited once the restore had raised."""
    err = unraisable.exc_value
    if isinstance(err, RuntimeError) and str(err) == "Event loop is closed":
        return True
    code = getattr(unraisable.object, "cr_code", None)  # a coroutine object
    return getattr(code, "co_name", None) == "_read_array_index_and_device_put" and str(
        err
    ).startswith("Encountered error while reading array index")


def _reasons(failed: list[tuple[int, Exception]]) -> str:
    """'step 4: ValueError: ...; step 2: ...', each message's first line cut to 300
    characters (tensorstore's go on with a many-line spec)."""
    return "; ".join(
        f"step {s}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}" for s, e in failed
    )


def _single_copy(x):
    """A fully replicated multi-device array of a single-process run as its device-0 copy.

    The copy is the array's own first shard (no transfer); other arrays are returned as they
    are. See the module docstring.
    """
    if (
        isinstance(x, jax.Array)
        and jax.process_count() == 1
        and len(x.sharding.device_set) > 1
        and x.is_fully_replicated
    ):
        return x.addressable_shards[0].data
    return x
