"""Per-backend compile options: chosen only for CPU, and the same math with or without them."""

import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_diffusion import backend, cli, train


def test_options_only_for_cpu_devices():
    assert backend.compiler_options(jax.devices()) == backend.CPU_COMPILER_OPTIONS
    assert backend.compiler_options() == backend.CPU_COMPILER_OPTIONS  # default backend: CPU
    gpu = types.SimpleNamespace(platform="gpu")
    assert backend.compiler_options([gpu]) is None
    assert backend.compiler_options([jax.devices()[0], gpu]) is None
    assert backend.compiler_options([]) is None
    assert backend.compiler_options(run_once=True) == backend.CPU_RUN_ONCE_OPTIONS
    assert backend.compiler_options([gpu], run_once=True) is None
    # any platform but CPU (TPU, or one this module has never heard of) keeps XLA's defaults
    for platform in ("tpu", "METAL", "neuron"):
        other = types.SimpleNamespace(platform=platform)
        assert backend.compiler_options([other]) is None
        assert backend.compiler_options([jax.devices()[0], other], run_once=True) is None


def test_options_take_any_iterable_of_devices():
    """`devices` is an iterable (e.g. `mesh.devices.flat`), read once; an empty one is no CPU."""
    cpus = jax.devices()[:2]
    assert backend.compiler_options(iter([])) is None
    assert backend.compiler_options(d for d in cpus) == backend.CPU_COMPILER_OPTIONS
    mesh = jax.sharding.Mesh(np.array(cpus), ("data",))
    assert backend.compiler_options(mesh.devices.flat) == backend.CPU_COMPILER_OPTIONS


def test_options_are_a_fresh_dict_per_call():
    before = dict(backend.CPU_COMPILER_OPTIONS)
    options = backend.compiler_options()
    options["xla_backend_optimization_level"] = 0  # a caller's edit stays with that caller
    assert backend.compiler_options() == backend.CPU_COMPILER_OPTIONS == before


@pytest.mark.parametrize("name", ["CPU_COMPILER_OPTIONS", "CPU_RUN_ONCE_OPTIONS"])
def test_options_xla_cpu_rejects_fall_back_to_xla_defaults_with_a_warning(monkeypatch, name):
    """A jaxlib whose CPU compiler does not know one of the options (either set) gets None,
    XLA's defaults, for both kinds of program, and one RuntimeWarning saying so."""
    try:
        with monkeypatch.context() as m:
            m.setattr(backend, name, {"xla_cpu_no_such_option_anywhere": 1})
            backend._cpu_options_supported.cache_clear()
            with pytest.warns(RuntimeWarning, match="XLA:CPU rejected"):
                assert backend.compiler_options() is None
            assert backend.compiler_options(run_once=True) is None
    finally:
        backend._cpu_options_supported.cache_clear()
    assert backend.compiler_options() == backend.CPU_COMPILER_OPTIONS


def test_parameters_initialised_under_the_run_once_options_are_bit_identical():
    """create_train_state compiles model.init cheaply; the parameters are those of XLA's default
    optimisation level (3), bit for bit (level 0 would fail this: it changes the last bit of a
    few). The default is named: the suite's own XLA_FLAGS set another level (conftest)."""
    config = cli.load_config(
        f"{pathlib.Path(__file__).parents[1] / 'experiments/configs/toy_2d.py'}:smoke"
    )
    model = train.create_model(config, channels=2)
    state = train.create_train_state(config, model, jax.random.PRNGKey(3), (2,))
    init_rng, _ = jax.random.split(jax.random.PRNGKey(3))
    default = {"xla_backend_optimization_level": 3}  # XLA's DebugOptions default
    plain = jax.jit(model.init, compiler_options=default)(
        {"params": init_rng}, jnp.zeros((1, 2)), jnp.zeros((1,), jnp.int32)
    )
    leaves = jax.tree.leaves(plain["params"])
    assert len(leaves) == len(jax.tree.leaves(state.params)) > 2
    for a, b in zip(leaves, jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_conv_value_and_gradients_unchanged_by_the_options():
    """The options change which library runs a convolution, not what it computes."""

    def loss(x, w):
        y = jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.sum(jnp.sin(y))

    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 16))
    w = jax.random.normal(jax.random.key(1), (3, 3, 16, 24)) / 12.0
    fn = jax.value_and_grad(loss, argnums=(0, 1))
    plain = jax.jit(fn)
    tuned = jax.jit(fn, compiler_options=backend.compiler_options())
    # the options do reach the compiler: a different program comes out
    assert plain.lower(x, w).compile().as_text() != tuned.lower(x, w).compile().as_text()
    (v0, (dx0, dw0)), (v1, (dx1, dw1)) = plain(x, w), tuned(x, w)
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    np.testing.assert_allclose(dx1, dx0, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dw1, dw0, rtol=1e-4, atol=1e-4)
    # and both agree with a float64 NumPy reference of the weight gradient
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    w64 = np.asarray(w, np.float64)
    y = sum(
        np.einsum("bhwc,cd->bhwd", xp[:, i : i + 8, j : j + 8], w64[i, j])
        for i in range(3)
        for j in range(3)
    )
    g = np.cos(y)
    dw_ref = np.stack(
        [
            np.stack([np.einsum("bhwc,bhwd->cd", xp[:, i : i + 8, j : j + 8], g) for j in range(3)])
            for i in range(3)
        ]
    )
    np.testing.assert_allclose(dw1, dw_ref, rtol=1e-4, atol=1e-4)
