"""What every benchmark table records: the machine and its load."""

from __future__ import annotations

import os

import jax


def load() -> str:
    """The 1, 5 and 15-minute load averages."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def machine() -> str:
    """jax version and backend, core count and CPU model (from /proc/cpuinfo where present)."""
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return (
        f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}); "
        f"nproc {os.cpu_count()}; {model}"
    )
