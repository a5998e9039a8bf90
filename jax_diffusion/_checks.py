"""Argument checks shared by the modules (standard library only: the math modules import it too)."""

from __future__ import annotations

import math
import numbers
import operator


def check_int(
    name: str, value, low: int, high: int | None = None, *, none_ok: bool = False
) -> int | None:
    """`value` as an int after checking it is one (a Python or NumPy int, or a concrete
    integer scalar array such as jnp.int32(5); not a bool or a float such as 8.0) in
    [low, high] (high None: no upper bound), or None where `none_ok`; else ValueError naming
    `name` and the value."""
    if value is None and none_ok:
        return None
    dtype = getattr(value, "dtype", None)
    ok = not isinstance(value, bool) and (dtype is None or getattr(dtype, "kind", "") in ("i", "u"))
    if ok:
        try:  # ints and integer scalar arrays; not floats, bigger arrays or traced values
            number = operator.index(value)
        except TypeError:
            ok = False
    if ok:
        ok = number >= low and (high is None or number <= high)
    if not ok:
        allowed = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
        raise ValueError(f"{name} must be {allowed}{' or None' if none_ok else ''}; got {value!r}")
    return number


def check_real(name: str, value, *, positive: bool = False) -> float:
    """`value` as a float after checking it is a finite real number (a Python or NumPy int or
    float, not a bool), > 0 where `positive`; else ValueError naming `name` and the value."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and math.isfinite(float(value)) and (not positive or float(value) > 0)
    if not ok:
        what = "a finite number > 0" if positive else "a finite number"
        raise ValueError(f"{name} must be {what}; got {value!r}")
    return float(value)
