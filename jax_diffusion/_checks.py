"""Argument checks shared by the modules (NumPy only: the math modules import it too)."""

from __future__ import annotations

import numpy as np


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    """`value` as an int after checking it is one (not a bool or a float such as 8.0) in
    [low, high] (high None: no upper bound); else ValueError naming `name` and the value."""
    ok = not isinstance(value, bool) and isinstance(value, int | np.integer)
    if ok:
        ok = value >= low and (high is None or value <= high)
    if not ok:
        allowed = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
        raise ValueError(f"{name} must be {allowed}; got {value!r}")
    return int(value)
