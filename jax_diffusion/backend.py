"""Per-backend XLA compile options for the networks' jitted programs (train step, sampler).

On the CPU backend, XLA (jax 0.10) hands every convolution to the YNNPACK library by default.
Its weight-gradient convolution is slow: on a 2-core Xeon, the dW of a 3x3 conv at 32x32x128,
batch 32, took 490-570 ms with YNNPACK and 97-141 ms with XLA's own (Eigen) convolution, while
the forward and input-gradient passes were on par (`benchmarks/train_throughput.py`,
BENCHMARKS.md). `compiler_options` therefore asks XLA:CPU to keep YNNPACK for dots and
reduce fusions but not for convolutions, nor for elementwise fusions: those were split into
more, smaller YNNPACK kernels than XLA's own loop fusions (GroupNorm + SiLU fwd+bwd at
[8, 32, 32, 64]: 8.8 -> 4.4 ms on a 2-core AMD EPYC). The math is unchanged (the same HLO is
compiled); accelerators get no options and keep their own convolutions. Whole train step, first
without YNNPACK convolutions (2-core Xeon): CIFAR-sized UNet 7.7 -> 13.5 img/s at batch 32,
digits 16x16 at batch 128 160 -> 264; then also without YNNPACK elementwise fusions (2-core AMD
EPYC): CIFAR-sized batch 32 (4 micro-batches) 5.9 -> 7.1 img/s, 8x8 digits batch 32 366 -> 507.

Programs that run once (parameter initialisation) are compiled with LLVM at optimisation level 1
instead of XLA's default: `jax.jit(model.init)` of the test suite's smoke UNet is ~400 small
threefry fusions and compiled in 18.7 s at the default level, 4.9 s at level 1, with bit-identical
parameters (level 0 differs in the last bit of a few; 2-core AMD EPYC, jax 0.10.2).

The options are passed per `jax.jit` (`compiler_options=`), never through the process-wide
XLA_FLAGS, so code around this library is unaffected.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable

import jax
import jax.numpy as jnp

__all__ = ["compiler_options", "CPU_COMPILER_OPTIONS", "CPU_RUN_ONCE_OPTIONS"]

_FUSION = "LIBRARY_FUSION_TYPE_"

# YNNPACK for dots and reductions; XLA's own code for convolutions and elementwise fusions.
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": ",".join(
        _FUSION + kind for kind in ("DOT", "REDUCE", "INDIVIDUAL_DOT")
    )
}
# for programs run once, where compile time is all that counts (see the module docstring)
CPU_RUN_ONCE_OPTIONS = {"xla_backend_optimization_level": 1}


@functools.cache
def _cpu_options_supported() -> bool:
    """Whether this jaxlib's CPU compiler accepts both option sets (compiled once)."""
    try:
        cpu = jax.local_devices(backend="cpu")[0]
        x = jax.ShapeDtypeStruct((1,), jnp.float32, sharding=_single(cpu))
        for options in (CPU_COMPILER_OPTIONS, CPU_RUN_ONCE_OPTIONS):
            jax.jit(lambda x: x + 1, compiler_options=options).lower(x).compile()
    except Exception as err:  # noqa: BLE001 - an unknown option is a compile error
        warnings.warn(
            f"XLA:CPU rejected {CPU_COMPILER_OPTIONS} or {CPU_RUN_ONCE_OPTIONS} "
            f"({type(err).__name__}); compiling with "
            "XLA's default options (slower convolution weight gradients on CPU)",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


def _single(device):
    return jax.sharding.SingleDeviceSharding(device)


def compiler_options(
    devices: Iterable[jax.Device] | None = None, *, run_once: bool = False
) -> dict[str, str | int] | None:
    """The `compiler_options` for a jit whose computation runs on `devices`.

    Args:
      devices: the devices the program runs on (e.g. `mesh.devices.flat`); default the
        default backend's devices.
      run_once: the program runs once (e.g. `model.init`): on CPU, compile it cheaply
        (CPU_RUN_ONCE_OPTIONS) instead.

    Returns:
      CPU_COMPILER_OPTIONS (or CPU_RUN_ONCE_OPTIONS) when every device is a CPU and this jaxlib
      accepts them, else None (GPU, TPU, or a jaxlib without the option: XLA's defaults).
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices or any(d.platform != "cpu" for d in devices):
        return None
    if not _cpu_options_supported():
        return None
    return dict(CPU_RUN_ONCE_OPTIONS if run_once else CPU_COMPILER_OPTIONS)


def _top_level(tree) -> bool:
    """No leaf is a tracer: not called inside a jit / eval_shape trace, where a nested jit may set
    no compiler_options."""
    return all(not isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(tree))
