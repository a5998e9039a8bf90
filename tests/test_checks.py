"""Tests of jax_diffusion._checks: the shared int and real argument checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_diffusion._checks import check_int, check_real


@pytest.mark.parametrize(
    "value, low, high, want",
    [
        (3, 1, None, 3),
        (np.int64(5), 0, 5, 5),
        (0, 0, 0, 0),
        (jnp.int32(5), 1, None, 5),  # a concrete JAX scalar, e.g. from a config array
        (np.array(7, np.uint8), 1, None, 7),
    ],
)
def test_check_int_returns_a_python_int(value, low, high, want):
    got = check_int("n", value, low, high)
    assert got == want and type(got) is int


@pytest.mark.parametrize(
    "value, low, high, match",
    [
        (True, 0, None, "n must be an int >= 0; got True"),
        (np.bool_(True), 0, None, "n must be an int >= 0; got"),
        (2.0, 0, None, "n must be an int >= 0; got 2.0"),
        ("2", 0, None, "n must be an int >= 0; got '2'"),
        (None, 0, None, "n must be an int >= 0; got None"),
        (0, 1, None, "n must be an int >= 1; got 0"),
        (6, 1, 5, r"n must be an int in \[1, 5\]; got 6"),
        (jnp.bool_(True), 0, None, "n must be an int >= 0; got Array"),
        (jnp.float32(2), 0, None, "n must be an int >= 0; got Array"),
        (jnp.array([2]), 0, None, "n must be an int >= 0; got Array"),
    ],
)
def test_check_int_rejects(value, low, high, match):
    with pytest.raises(ValueError, match=match):
        check_int("n", value, low, high)


def test_check_int_rejects_a_traced_value():
    @jax.jit
    def f(n):
        with pytest.raises(ValueError, match="n must be an int >= 1; got .*Tracer"):
            check_int("n", n, 1)
        return n

    f(3)


def test_check_int_none_ok():
    assert check_int("n", None, 1, none_ok=True) is None
    with pytest.raises(ValueError, match=r"n must be an int >= 1 or None; got 0"):
        check_int("n", 0, 1, none_ok=True)


@pytest.mark.parametrize("value", [2, 0.5, np.float32(0.25), np.int64(3)])
def test_check_real_returns_a_python_float(value):
    got = check_real("c", value, positive=True)
    assert got == float(value) and type(got) is float


@pytest.mark.parametrize(
    "value, positive, match",
    [
        (True, False, "c must be a finite number; got True"),
        ("1", False, "c must be a finite number; got '1'"),
        (float("nan"), False, "c must be a finite number; got nan"),
        (float("inf"), False, "c must be a finite number; got inf"),
        (0.0, True, "c must be a finite number > 0; got 0.0"),
        (-1, True, "c must be a finite number > 0; got -1"),
        (None, False, "c must be a finite number; got None"),
    ],
)
def test_check_real_rejects(value, positive, match):
    with pytest.raises(ValueError, match=match):
        check_real("c", value, positive=positive)
