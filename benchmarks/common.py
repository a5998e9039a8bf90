"""What every benchmark table records: the machine and its load."""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp


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


def median_times(fns: dict, repeats: int) -> dict:
    """Median wall time of each fn() over `repeats` rounds that run every fn once, in turn.

    Each fn runs once first as a warm-up. Interleaving the rounds spreads a change of machine
    load over all the variants instead of charging it to whichever ran last.
    """
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def parse_configs_batches(
    parser: argparse.ArgumentParser, args: argparse.Namespace, allowed
) -> tuple[list[str], list[int]]:
    """args.configs and args.batches (comma-separated) as lists; parser.error on a bad entry."""
    names = [n for n in args.configs.split(",") if n]
    if not names:
        parser.error(f"--configs: one or more of {', '.join(allowed)}; got {args.configs!r}")
    for n in names:
        if n not in allowed:
            parser.error(f"--configs: unknown config {n!r}; allowed: {', '.join(allowed)}")
    try:
        batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        batches = [0]
    if not batches or any(b < 1 for b in batches):
        parser.error(f"--batches: comma-separated positive ints; got {args.batches!r}")
    return names, batches


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    """--dtype: the network's compute dtype (model.dtype), also the dtype of the peak."""
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="the network's compute dtype (model.dtype); %% peak is against this dtype's matmul",
    )


def matmul_peak_flops(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
    """Measured FLOP/s of a jitted [n, n] @ [n, n] jnp.dot in `dtype` (median of repeats)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, b))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(dot(a, b))
        times.append(time.perf_counter() - start)
    return 2.0 * n**3 / statistics.median(times)


def print_peak(dtype: str) -> float:
    """Measures and prints the matmul peak in `dtype` (2048^3 on CPU, 8192^3 on an accelerator)."""
    n = 2048 if jax.default_backend() == "cpu" else 8192
    peak = matmul_peak_flops(n, dtype=jnp.dtype(dtype))
    print(f"# {dtype} matmul peak (jitted {n}^3 jnp.dot): {peak / 1e9:.1f} GFLOP/s")
    return peak
