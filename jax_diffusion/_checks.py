"""Argument checks shared by the modules (NumPy only: the math modules import it too)."""

from __future__ import annotations

import numpy as np


def check_int(
    name: str, value, low: int, high: int | None = None, *, none_ok: bool = False
) -> int | None:
    """`value` as an int after checking it is one (not a bool or a float such as 8.0) in
    [low, high] (high None: no upper bound), or None where `none_ok`; else ValueError naming
    `name` and the value."""
    if value is None and none_ok:
        return None
    ok = not isinstance(value, bool) and isinstance(value, int | np.integer)
    if ok:
        ok = value >= low and (high is None or value <= high)
    if not ok:
        allowed = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
        raise ValueError(f"{name} must be {allowed}{' or None' if none_ok else ''}; got {value!r}")
    return int(value)
