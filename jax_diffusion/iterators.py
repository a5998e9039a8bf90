"""Infinite, exactly resumable batch iterators: `ArrayIterator` and `GrainIterator`.

`ArrayIterator` reads in-memory arrays (yielded as given); `GrainIterator` is what
`jax_diffusion.data.tfds_iterator` returns, batches read through grain. Every iterator has
`get_state() -> dict` (JSON-serialisable) and `set_state(state)`, so a checkpoint stores the data
position and a resumed run sees bit-identical batches. The state is the (epoch, position) of the
next batch's first example, so it does not depend on how batches are read (in memory, grain
threads or grain worker processes).

Batch order (`ArrayIterator` and `tfds_iterator` alike): epoch e visits the examples in the order
`np.random.default_rng((seed, e)).permutation(num_examples)`; step s takes the next
`global_batch_size` entries of that GLOBAL order, and process p keeps the contiguous slice
`[p * local_B, (p + 1) * local_B)`, `local_B = global_batch_size // process_count`. So the
processes' slices concatenate to the single-process batch. `drop_remainder=True` skips the last
`num_examples % global_batch_size` entries of each epoch; `False` concatenates the epochs, so a
batch may straddle two.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from jax_diffusion._checks import check_int

__all__ = ["ArrayIterator", "GrainIterator"]


@functools.lru_cache(maxsize=4)
def _permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    # Cached: a step reads one (occasionally two) epochs' order; lru_cache is thread-safe, and
    # grain's reader threads at worst compute the same permutation twice.
    perm = np.random.default_rng((seed, epoch)).permutation(num_examples)
    perm.setflags(write=False)
    return perm


@dataclasses.dataclass(frozen=True)
class _BatchPlan:
    """Which example indices each process reads at each step (see the module docstring)."""

    num_examples: int
    global_batch_size: int
    seed: int
    process_index: int
    process_count: int
    drop_remainder: bool

    @staticmethod
    def check_args(global_batch_size, seed, process_index, process_count, drop) -> tuple:
        """The arguments that do not depend on the data, checked (before any data is opened)."""
        process_count = check_int("process_count", process_count, 1)
        process_index = check_int("process_index", process_index, 0)
        global_batch_size = check_int("global_batch_size", global_batch_size, 1)
        if process_index >= process_count:
            raise ValueError(f"process_index must lie in [0, {process_count}); got {process_index}")
        if global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size must be divisible by process_count={process_count}; "
                f"got {global_batch_size}"
            )
        seed = check_int("seed", seed, 0)
        if not isinstance(drop, bool | np.bool_):
            raise ValueError(f"drop_remainder must be True or False; got {drop!r}")
        return global_batch_size, seed, process_index, process_count, bool(drop)

    @classmethod
    def create(cls, num_examples, global_batch_size, seed, process_index, process_count, drop):
        num_examples = check_int("num_examples", num_examples, 1)
        args = cls.check_args(global_batch_size, seed, process_index, process_count, drop)
        if args[0] > num_examples:
            raise ValueError(
                f"global_batch_size must be <= the number of examples ({num_examples}); "
                f"got {args[0]}"
            )
        return cls(num_examples, *args)

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.process_count

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch_size

    def start(self, step: int) -> tuple[int, int]:
        """(epoch, position in that epoch's order) of the first entry of global batch `step`."""
        if self.drop_remainder:
            epoch, k = divmod(step, self.steps_per_epoch)
            return epoch, k * self.global_batch_size
        return divmod(step * self.global_batch_size, self.num_examples)

    def step(self, epoch: int, position: int) -> int:
        """Inverse of `start`; ValueError if (epoch, position) is not a batch boundary."""
        epoch = check_int("state['epoch']", epoch, 0)
        position = check_int("state['position']", position, 0)
        g = self.global_batch_size
        if self.drop_remainder:
            ok = position % g == 0 and position // g < self.steps_per_epoch
            step = epoch * self.steps_per_epoch + position // g
        else:
            flat = epoch * self.num_examples + position
            ok, step = position < self.num_examples and flat % g == 0, flat // g
        if not ok:
            raise ValueError(
                f"state (epoch={epoch}, position={position}) is not a batch boundary for {self}"
            )
        return step

    def indices(self, step: int) -> np.ndarray:
        """[local_B] int64 example indices this process reads at global step `step`."""
        epoch, position = self.start(step)
        offsets = position + self.process_index * self.local_batch_size
        offsets = offsets + np.arange(self.local_batch_size)
        epochs, offsets = epoch + offsets // self.num_examples, offsets % self.num_examples
        out = np.empty(self.local_batch_size, np.int64)
        for e in np.unique(epochs):
            mask = epochs == e
            out[mask] = _permutation(self.num_examples, self.seed, int(e))[offsets[mask]]
        return out


class _PlannedIterator:
    """The state shared by the iterators: the next global step of a `_BatchPlan`, saved as the
    (epoch, position) of its first example, so a state does not depend on how batches are read
    (in memory, grain threads or grain worker processes)."""

    _plan: _BatchPlan
    _step: int

    def get_state(self) -> dict[str, int]:
        """Returns {"epoch", "position"} (plain ints) of the next batch; JSON-serialisable."""
        epoch, position = self._plan.start(self._step)
        return {"epoch": int(epoch), "position": int(position)}

    def set_state(self, state: Mapping[str, int]) -> None:
        """Continues from a `get_state()` result; the following batches are bit-identical."""
        if not isinstance(state, Mapping) or set(state) != {"epoch", "position"}:
            keys = sorted(state, key=repr) if isinstance(state, Mapping) else state
            raise ValueError(f"state must have keys 'epoch', 'position'; got {keys!r}")
        self._seek(self._plan.step(state["epoch"], state["position"]))

    def _seek(self, step: int) -> None:
        self._step = step


class ArrayIterator(_PlannedIterator):
    """Infinite, exactly resumable batch iterator over in-memory arrays.

    `next(it)` returns `{key: array[indices]}` for this process's slice of the global batch, in
    the batch order of the module docstring. The arrays are yielded as given (no scaling or
    casting: uint8 images stay uint8) and are not copied, so changing them during a run changes
    later batches (and a resume's).

    Args:
      arrays: dict of arrays with a common leading size N, e.g. {"image": [N, H, W, C],
        "label": [N]}.
      global_batch_size: examples per step summed over processes; in [1, N] and divisible by
        process_count.
      seed: int >= 0; epoch e is shuffled by `np.random.default_rng((seed, e))`.
      process_index: this process, in [0, process_count).
      process_count: number of processes sharing the global batch.
      drop_remainder: skip the incomplete tail of each epoch (True) or let batches straddle
        epochs (False).

    Raises:
      ValueError: empty or ragged arrays, or a batch size / process arguments as above.
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        *,
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        drop_remainder: bool = True,
    ):
        self._arrays = {k: np.asarray(v) for k, v in arrays.items()}
        sizes = {k: (v.shape[0] if v.ndim else None) for k, v in self._arrays.items()}
        if not sizes or len(set(sizes.values())) != 1 or None in sizes.values():
            raise ValueError(f"arrays must share a leading size; got leading sizes {sizes}")
        num_examples = next(iter(sizes.values()))
        self._plan = _BatchPlan.create(
            num_examples, global_batch_size, seed, process_index, process_count, drop_remainder
        )
        self._step = 0

    @property
    def num_examples(self) -> int:
        return self._plan.num_examples

    @property
    def local_batch_size(self) -> int:
        return self._plan.local_batch_size

    def __iter__(self) -> ArrayIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        idx = self._plan.indices(self._step)
        self._step += 1
        return {k: v[idx] for k, v in self._arrays.items()}


class GrainIterator(_PlannedIterator):
    """Batches read by grain: `next(it)` returns {"image": [local_B, H, W, C] float32 in
    [-1, 1], "label": [local_B] int32}.

    `get_state()` is {"epoch", "position"} of the next batch, as for `ArrayIterator` (the same
    state whatever the number of grain workers), and `set_state` continues bit-identically.

    Args:
      iterator_from: step -> a grain iterator whose first element is that global step's batch
        for this process; called on the first `next` after construction or `set_state`.
      plan: the batch plan the iterator reads.
      info: the `DatasetInfo`, as `.info`.
    """

    def __init__(self, iterator_from: Callable[[int], Iterator], plan: _BatchPlan, info):
        self._iterator_from, self._plan, self.info = iterator_from, plan, info
        self._step, self._iterator = 0, None

    def __iter__(self) -> GrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._iterator = self._iterator_from(self._step)
        batch = next(self._iterator)
        self._step += 1
        # np.array copies: with num_workers > 0 grain returns views of shared memory.
        return {k: np.array(v) for k, v in batch.items()}

    def _seek(self, step: int) -> None:
        self._step, self._iterator = step, None
