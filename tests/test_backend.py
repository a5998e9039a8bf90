"""Per-backend compile options: chosen only for CPU, and the same math with or without them."""

import types

import jax
import jax.numpy as jnp
import numpy as np

from jax_diffusion import backend


def test_options_only_for_cpu_devices():
    assert backend.compiler_options(jax.devices()) == backend.CPU_COMPILER_OPTIONS
    assert backend.compiler_options() == backend.CPU_COMPILER_OPTIONS  # default backend: CPU
    gpu = types.SimpleNamespace(platform="gpu")
    assert backend.compiler_options([gpu]) is None
    assert backend.compiler_options([jax.devices()[0], gpu]) is None
    assert backend.compiler_options([]) is None


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
