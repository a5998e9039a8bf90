"""Tests for jax_diffusion.iterators: the batch order, process shards and exact resume.

References: the batch order written out from the module docstring (`np.random.default_rng((seed,
e)).permutation(n)` per epoch) and arrays whose rows identify their index.
"""

import json

import numpy as np
import pytest
from conftest import _labels, _take

from jax_diffusion import iterators


def _indexed(n):
    """Arrays whose rows identify their index: image[i] = (i, -i), label[i] = i."""
    idx = np.arange(n)
    return {"image": np.stack([idx, -idx], 1).astype(np.float32), "label": idx.astype(np.int32)}


@pytest.mark.parametrize("n, batch", [(20, 4), (22, 4), (7, 7)])
def test_array_iterator_epochs_follow_the_documented_permutations(n, batch):
    it = iterators.ArrayIterator(_indexed(n), global_batch_size=batch, seed=5)
    steps = n // batch
    for epoch in range(3):
        seen = _labels(_take(it, steps))
        perm = np.random.default_rng((5, epoch)).permutation(n)
        np.testing.assert_array_equal(seen, perm[: steps * batch])
        assert len(set(seen.tolist())) == steps * batch  # each index at most once per epoch
        if n % batch == 0:
            assert sorted(seen.tolist()) == list(range(n))


def test_array_iterator_rows_stay_aligned():
    batch = next(iterators.ArrayIterator(_indexed(30), global_batch_size=6, seed=0))
    np.testing.assert_array_equal(batch["image"][:, 0], batch["label"])
    np.testing.assert_array_equal(batch["image"][:, 1], -batch["label"])


def test_array_iterator_without_drop_remainder_concatenates_epochs():
    it = iterators.ArrayIterator(_indexed(22), global_batch_size=4, seed=1, drop_remainder=False)
    seen = _labels(_take(it, 11))  # 44 = two epochs, batch 6 straddles them
    perms = [np.random.default_rng((1, e)).permutation(22) for e in (0, 1)]
    np.testing.assert_array_equal(seen, np.concatenate(perms))
    np.testing.assert_array_equal(np.bincount(seen), 2)


def test_array_iterator_deterministic_per_seed():
    a = _labels(_take(iterators.ArrayIterator(_indexed(50), global_batch_size=10, seed=7), 8))
    b = _labels(_take(iterators.ArrayIterator(_indexed(50), global_batch_size=10, seed=7), 8))
    c = _labels(_take(iterators.ArrayIterator(_indexed(50), global_batch_size=10, seed=8), 8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("drop_remainder", [True, False])
@pytest.mark.parametrize("k", [0, 4, 5, 7])
def test_array_iterator_state_round_trip_through_json(drop_remainder, k):
    def make():
        return iterators.ArrayIterator(
            _indexed(22), global_batch_size=4, seed=3, drop_remainder=drop_remainder
        )

    it = make()
    _take(it, k)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 9)
    restored = make()
    _take(restored, 2)  # its own position must not matter
    restored.set_state(state)
    for want, got in zip(expected, _take(restored, 9), strict=True):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
            assert got[key].dtype == want[key].dtype


@pytest.mark.parametrize("process_count", [2, 4])
@pytest.mark.parametrize("drop_remainder", [True, False])
def test_array_iterator_process_slices_concatenate_to_global_batch(process_count, drop_remainder):
    kwargs = dict(global_batch_size=8, seed=2, drop_remainder=drop_remainder)
    single = _take(iterators.ArrayIterator(_indexed(30), **kwargs), 10)
    shards = [
        _take(
            iterators.ArrayIterator(
                _indexed(30), process_index=p, process_count=process_count, **kwargs
            ),
            10,
        )
        for p in range(process_count)
    ]
    for step, want in enumerate(single):
        parts = [shard[step] for shard in shards]
        assert all(len(part["label"]) == 8 // process_count for part in parts)
        for key in want:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), want[key])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(global_batch_size=6, process_count=4), r"divisible by process_count=4; got 6$"),
        (dict(global_batch_size=12), r"<= the number of examples \(10\); got 12$"),
        (dict(global_batch_size=2, drop_remainder="false"), "drop_remainder must be True or"),
        (dict(global_batch_size=2, drop_remainder=None), "drop_remainder must be True or"),
        (
            dict(global_batch_size=2, drop_remainder=1),
            "drop_remainder must be True or False; got 1",
        ),
        (dict(global_batch_size=0), "global_batch_size must be an int >= 1; got 0"),
        (dict(global_batch_size=2, process_index=2, process_count=2), "process_index must"),
        (dict(global_batch_size=2, seed=-1), "seed must be an int >= 0; got -1"),
    ],
)
def test_array_iterator_argument_errors(kwargs, match):
    kwargs = {"seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        iterators.ArrayIterator(_indexed(10), **kwargs)


def test_array_iterator_ragged_arrays_and_bad_states():
    with pytest.raises(ValueError, match="leading size"):
        iterators.ArrayIterator(
            {"image": np.zeros((5, 2)), "label": np.zeros(4)}, global_batch_size=2, seed=0
        )
    it = iterators.ArrayIterator(_indexed(10), global_batch_size=4, seed=0)
    with pytest.raises(ValueError, match="not a batch boundary"):
        it.set_state({"epoch": 0, "position": 3})
    with pytest.raises(ValueError, match="not a batch boundary"):
        it.set_state({"epoch": 0, "position": 8})  # drop_remainder: only 2 steps per epoch
    with pytest.raises(ValueError, match="keys 'epoch', 'position'"):
        it.set_state({"step": 3})
    with pytest.raises(ValueError, match=r"state\['position'\] must be an int >= 0; got -4"):
        it.set_state({"epoch": 0, "position": -4})


def test_array_iterator_needs_at_least_one_array_with_a_leading_axis():
    for arrays in ({}, {"image": np.zeros(())}, {"image": np.zeros((4, 2)), "label": 3}):
        with pytest.raises(ValueError, match="arrays must share a leading size"):
            iterators.ArrayIterator(arrays, global_batch_size=2, seed=0)


def _documented_batch(n, batch, seed, epoch, position):
    """Labels of the global batch starting at (epoch, position) of the concatenated orders."""
    flat = epoch * n + position + np.arange(batch)
    perms = {e: np.random.default_rng((seed, e)).permutation(n) for e in set(flat // n)}
    return np.array([perms[f // n][f % n] for f in flat])


@pytest.mark.parametrize("drop_remainder", [True, False])
@pytest.mark.parametrize("n", [20, 22])
def test_set_state_accepts_exactly_the_batch_boundaries(drop_remainder, n):
    g, seed = 4, 9
    it = iterators.ArrayIterator(
        _indexed(n), global_batch_size=g, seed=seed, drop_remainder=drop_remainder
    )
    for epoch in range(3):
        for position in range(n + g + 1):
            if drop_remainder:  # the first n // g batches of each epoch
                boundary = position % g == 0 and position + g <= n
            else:  # every g-th entry of the concatenated epochs, as a position < n
                boundary = position < n and (epoch * n + position) % g == 0
            state = {"epoch": epoch, "position": position}
            if not boundary:
                with pytest.raises(ValueError, match="not a batch boundary"):
                    it.set_state(state)
                continue
            it.set_state(state)
            assert it.get_state() == state
            want = _documented_batch(n, g, seed, epoch, position)
            np.testing.assert_array_equal(next(it)["label"], want)


def test_set_state_rejects_other_keys_and_epochs():
    it = iterators.ArrayIterator(_indexed(10), global_batch_size=2, seed=0)
    with pytest.raises(ValueError, match="keys 'epoch', 'position'"):
        it.set_state({"epoch": 0, "position": 0, "step": 0})
    with pytest.raises(ValueError, match="keys 'epoch', 'position'"):
        it.set_state({"epoch": 0})
    with pytest.raises(ValueError, match=r"keys 'epoch', 'position'; got \['epoch', 0\]"):
        it.set_state({0: 1, "epoch": 0})  # keys that do not sort together
    for epoch in (-1, 1.0, True, "1"):
        with pytest.raises(
            ValueError, match=rf"state\['epoch'\] must be an int >= 0; got {epoch!r}"
        ):
            it.set_state({"epoch": epoch, "position": 0})
