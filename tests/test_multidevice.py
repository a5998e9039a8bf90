"""The math under pmap and under jit with a device mesh: equal to the per-device result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_diffusion as jd
from jax_diffusion.testing import gaussian_denoiser

N_DEV = 8


@pytest.fixture(scope="module")
def sched():
    if jax.device_count() < N_DEV:
        pytest.fail(f"needs {N_DEV} devices (XLA_FLAGS set in conftest); got {jax.device_count()}")
    return jd.Schedule.from_betas(jd.cosine_betas(1000))


def test_pmap_q_sample_equals_per_device(sched):
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.standard_normal((N_DEV, 3, 4, 4, 1)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, (N_DEV, 3)))
    f = jax.pmap(lambda s, a, b, c: jd.q_sample(s, x0=a, t=c, noise=b), in_axes=(None, 0, 0, 0))
    out = f(sched, x0, noise, t)
    for d in range(N_DEV):
        want = jd.q_sample(sched, x0=x0[d], t=t[d], noise=noise[d])
        np.testing.assert_allclose(out[d], want, rtol=1e-6, atol=1e-6)


def test_pmap_diffusion_loss_equals_per_device(sched):
    model_fn = gaussian_denoiser(sched, 0.1, 0.4, "v")
    x0 = 0.1 + 0.4 * jax.random.normal(jax.random.key(0), (N_DEV, 4, 6))
    rngs = jax.random.split(jax.random.key(1), N_DEV)

    def loss(x, k):
        return jd.diffusion_loss(sched, model_fn, x, k, prediction="v", weighting="min_snr")[0]

    out = jax.pmap(loss)(x0, rngs)
    mean = jax.pmap(lambda x, k: jax.lax.pmean(loss(x, k), "d"), axis_name="d")(x0, rngs)
    per_device = np.array([loss(x0[d], rngs[d]) for d in range(N_DEV)])
    np.testing.assert_allclose(out, per_device, rtol=1e-5)
    np.testing.assert_allclose(mean, np.full(N_DEV, per_device.mean()), rtol=1e-5)


def test_sharded_jit_equals_single_device(sched):
    mesh = jax.make_mesh((N_DEV,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    x0 = jax.random.normal(jax.random.key(2), (16, 4, 4, 1))
    t = jax.random.randint(jax.random.key(3), (16,), 0, 1000)
    noise = jax.random.normal(jax.random.key(4), x0.shape)
    spec = NamedSharding(mesh, P("data"))
    args = [jax.device_put(a, spec) for a in (x0, t, noise)]
    f = jax.jit(lambda a, c, b: jd.q_sample(sched, x0=a, t=c, noise=b))
    out = f(*args)
    assert len(out.sharding.device_set) == N_DEV
    np.testing.assert_allclose(out, f(x0, t, noise), rtol=1e-6, atol=1e-6)
