"""orbax-checkpoint wrapper: the train state and the data-iterator state saved together.

Each checkpoint holds two items: 'state' (the TrainState pytree, arrays) and 'data' (the data
iterator's JSON state), so a resumed run continues bit-identically. orbax writes each step to a
temporary directory and renames it when complete, so a process killed mid-save leaves the last
complete checkpoint as the latest one.

In a single-process run, an array replicated over several devices (the data-parallel train
state) is saved as its device-0 copy. orbax would otherwise split each replicated array into one
slice per device ("replica-parallel" saving, meant for several hosts writing together): one
jitted slice per array and device, compiled on first use, for one process that writes them all
anyway. Saving the smoke train state replicated over 8 CPU devices: 6.2 s -> 0.8 s for the first
save, 1.75 -> 0.8 s for later ones. The checkpoint holds the same values; `restore` places them
with the target's shardings.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from jax_diffusion._checks import check_int
from jax_diffusion.train_state import TrainState

__all__ = ["CheckpointManager"]


class CheckpointManager:
    """Saves and restores (TrainState, data state) under `<workdir>/checkpoints`.

    Args:
      workdir: run directory (local path or a bucket path orbax understands, e.g. gs://...),
        as a str or a path-like such as `etils.epath.Path`.
      max_to_keep: number of most recent checkpoints kept, an int >= 1, or None for all.
      save_interval_steps: orbax only saves steps that are multiples of this int >= 1 (and
        forced ones).

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
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            create=True,
            enable_async_checkpointing=False,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, state: TrainState, data_state: dict, *, force: bool = False) -> bool:
        """Saves at `state.step`; returns whether a checkpoint was written."""
        step = int(jax.device_get(state.step))
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
          step: the step to restore; the latest when None.

        Returns:
          (restored TrainState, data-iterator state dict).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state.checkpoint_items())
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
            ),
        )
        return state.replace(**restored["state"]), restored["data"]

    def restore_params(self, state_like: dict | None = None, *, ema: bool = True):
        """The (EMA) params of the latest checkpoint, without building an optimizer.

        Args:
          state_like: optional target tree as returned by `TrainState.checkpoint_items()`;
            without it the arrays are restored as saved.
          ema: the EMA params (for sampling) or the raw params.
        """
        step = self.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        args = (
            ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like))
            if state_like is not None
            else ocp.args.StandardRestore()
        )
        restored = self._manager.restore(step, args=ocp.args.Composite(state=args))
        return restored["state"]["ema_params" if ema else "params"]

    def close(self) -> None:
        self._manager.close()


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
