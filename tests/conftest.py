"""Test-suite set-up: fake CPU devices and JAX's persistent compilation cache.

Both must be configured before JAX initialises its backends, so this runs at import time.
"""

import os

# LLVM optimisation level 0 instead of XLA's default 3 for everything the suite compiles (and the
# subprocesses it starts, through SUBPROCESS_XLA_FLAGS): the suite is compile-bound. Measured on
# a 2-core AMD EPYC: the smoke UNet's train step compiles in 6.1-6.3 s at level 0 vs 7.5-8.5 s at
# level 1 (and ~20% more at the default), and runs in 14.5 vs 6.5-9.4 ms, which few tests repeat
# often enough to matter; the whole suite, cold cache, 7:01 (775 s CPU) vs 7:42 (865 s) at
# level 1. The HLO, and so the math under test, is the same; the last bit of some results can
# differ between levels, so bit-for-bit tests compare programs compiled alike.
# XLA:CPU's older (non-MLIR) emitters for fusions instead of its fusion emitters: they compile
# about twice as fast; the programs run slower only where the elementwise work is large (the
# 1000-step Gaussian sampler tests, ~10%). Measured on the 2-core AMD EPYC (jax 0.10.2), cold
# cache: tests/test_models.py backend compile 53.5-59.1 s -> 27.5-34.3 s, test_samplers.py
# 48.8 -> 22.1 s; the whole suite (-n 2) 770 s -> 581 s. And each program's LLVM module in one
# piece (XLA splits it for parallel codegen, which two busy workers on two cores cannot use):
# test_models.py on one core, compile 29.8-32.4 s -> 25.4-27.8 s, wall 60-65 s -> 54-58 s.
SUBPROCESS_XLA_FLAGS = (
    "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
    "--xla_cpu_parallel_codegen_split_count=1"
)
# XLA's own optimisation for the few programs the suite runs long rather than compiles (the
# Monte Carlo sampler tests: 1000 steps over 65,536 samples). `jax.jit(f,
# compiler_options=OPTIMIZED)` overrides the flags above for that one program: the ddpm test's
# program compiles and runs in 1.4 s instead of 5.0 s (2-core AMD EPYC, jax 0.10.2).
OPTIMIZED = {"xla_backend_optimization_level": 3, "xla_cpu_use_fusion_emitters": True}
# 8 fake CPU devices for the multi-device tests (pmap / sharding); a single-device test
# is unaffected because arrays live on device 0 unless placed elsewhere.
os.environ.setdefault(
    "XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {SUBPROCESS_XLA_FLAGS}"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

_CACHE_DIR = os.environ.get(
    "JAX_DIFFUSION_TEST_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache")
)
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_CACHE_DIR))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import pathlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# the experiment configs the smoke runs load, e.g. f"{CONFIGS / 'default.py'}:smoke"
CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs"


# the smallest UNet that has every kind of block (two levels, attention at 4x4 on 8x8 inputs),
# shared by test_models.py and test_controlnet.py
TINY_UNET = dict(
    base_channels=8,
    channel_mults=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    num_heads=2,
    num_groups=4,
)


def smoke(name="default.py", variant="smoke", **overrides):
    """The config experiments/configs/NAME:VARIANT with overrides field__sub=value."""
    from jax_diffusion import cli

    sets = [f"{k.replace('__', '.')}={v!r}" for k, v in overrides.items()]
    return cli.load_config(f"{CONFIGS / name}:{variant}", sets)


def leaves(tree):
    """The leaves of a (device) pytree as NumPy arrays, in tree order."""
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


# batch-iterator helpers, shared by test_data.py and test_iterators.py
def _take(it, steps):
    return [next(it) for _ in range(steps)]


def _labels(batches):
    return np.concatenate([b["label"] for b in batches])


@pytest.fixture
def x64():
    """Runs the test body with 64-bit JAX types enabled."""
    with jax.enable_x64(True):
        yield


def np_schedule(betas):
    """Float64 NumPy tables written from Ho et al. 2020 eqs. 4, 6, 7, with Python loops.

    Independent of `jax_diffusion.schedules` so the tests compare against the paper, not the
    code under test.
    """
    betas = [float(b) for b in betas]
    abar, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        abar.append(prod)
    abar_prev = [1.0] + abar[:-1]
    tilde = [b * (1 - ap) / (1 - a) for b, a, ap in zip(betas, abar, abar_prev, strict=True)]
    c1 = [b * ap**0.5 / (1 - a) for b, a, ap in zip(betas, abar, abar_prev, strict=True)]
    c2 = [
        (1 - ap) * (1 - b) ** 0.5 / (1 - a) for b, a, ap in zip(betas, abar, abar_prev, strict=True)
    ]
    return {
        "betas": np.array(betas),
        "alphas_cumprod": np.array(abar),
        "alphas_cumprod_prev": np.array(abar_prev),
        "posterior_variance": np.array(tilde),
        "posterior_mean_coef1": np.array(c1),
        "posterior_mean_coef2": np.array(c2),
    }


@pytest.hookimpl(trylast=True)  # after pytest-xdist's own hook has added the group suffixes
def pytest_collection_modifyitems(config, items):
    """Warns when `--dist loadgroup` (pyproject addopts) would not keep an xdist_group together.

    Tests marked `xdist_group` share a module-scoped trained run and must run on one worker;
    pytest-xdist marks them by suffixing the node id with `@<group>`, which pytest 9.2 ignores
    (pytest-dev/pytest-xdist#1386). Those runs are then trained once per worker (minutes
    longer), and a test that expects its group's run to exist already can fail by ordering.
    """
    if not getattr(config.option, "loadgroup", False):
        return
    lost = [i.nodeid for i in items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
    if lost:
        config.issue_config_time_warning(
            pytest.PytestWarning(
                f"--dist loadgroup does not group {len(lost)} tests with pytest "
                f"{pytest.__version__} (pytest-dev/pytest-xdist#1386); install 'pytest<9.2'"
            ),
            stacklevel=2,
        )
