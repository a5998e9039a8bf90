"""Sampling from trained params (generate.py): the config's settings, labels and guidance, a
device mesh, batches, the .npz for FID tools."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import smoke

import jax_diffusion as jd
from jax_diffusion import generate, run_config, samplers, train


def test_sample_rejects_bad_arguments_instead_of_using_the_config_values():
    config = smoke("toy_2d.py")
    model = run_config.create_model(config, channels=2)
    schedule = run_config.get_schedule(config.diffusion)
    key = jax.random.PRNGKey(0)
    for kwargs, match in [
        (dict(num_steps=0), r"num_steps for sampler 'ddim' must be an int in \[1, 50\]; got 0"),
        (dict(sampler="dpm++", num_steps=50), r"num_steps for .*'dpm\+\+'.* in \[1, 49\]; got 50"),
        (
            dict(sampler=""),
            "sampler must be one of 'ddpm', 'ddim', 'dpm\\+\\+', 'euler', 'heun'; got ''",
        ),
        (dict(num=-1), "num must be an int >= 1; got -1"),
        (dict(guidance=3.0), r"guidance needs a class-conditional model.*got guidance=3.0"),
        (dict(labels=jnp.zeros(4, jnp.int32)), "labels needs a class-conditional.*labels=given"),
        # ddpm ignored num_steps: `jax-diffusion sample --sampler ddpm --steps 2` ran all T
        (dict(sampler="ddpm", num_steps=5), "num_steps applies to 'ddim', 'dpm\\+\\+' and 'heun'"),
        # ddpm and dpm++ have no spacing to set: it was silently ignored
        (
            dict(sampler="dpm++", spacing="trailing"),
            r"spacing must be one of .* with sampler 'ddim' only; got spacing='trailing' with "
            r"sampler 'dpm\+\+'",
        ),
    ]:
        kwargs = {"num": 4, **kwargs}
        with pytest.raises(ValueError, match=match):  # before the network is ever called
            generate.sample(config, model, None, schedule, key, shape=(2,), **kwargs)
    # a class-conditional model: labels index its table, which would clamp or wrap them
    config = smoke("toy_2d.py", model__num_classes=3)
    model = run_config.create_model(config, channels=2)
    for labels, match in [
        ([0, 1, 2, 4], r"labels must lie in \[0, 3\] \(3: the null label.*got values in \[0, 4\]"),
        ([0, 1, 2, -1], r"got values in \[-1, 2\]"),
        ([0.0, 1.0, 2.0, 3.0], r"labels must be ints of shape \[num\] = \(4,\); got float32"),
        ([0, 1], r"labels must be ints of shape \[num\] = \(4,\); got int32 \(2,\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            generate.sample(config, model, None, schedule, key, shape=(2,), num=4, labels=labels)


def test_sample_takes_the_null_label_num_classes_for_unconditional_samples():
    config = smoke("toy_2d.py", model__num_classes=3)
    model = run_config.create_model(config, channels=2)
    schedule = run_config.get_schedule(config.diffusion)
    state = train.create_train_state(config, model, jax.random.PRNGKey(0), (2,))
    labels = jnp.asarray([0, 1, 2, 3], jnp.int32)  # 3: the null label, the table's last row
    x = generate.sample(
        config,
        model,
        state.ema_params,
        schedule,
        jax.random.PRNGKey(1),
        shape=(2,),
        num=4,
        labels=labels,
        sampler="ddim",
        num_steps=2,
    )
    assert x.shape == (4, 2) and np.isfinite(np.asarray(x)).all()


def test_sample_over_a_mesh_splits_the_batch_and_draws_the_samples_of_one_device():
    mesh = train.make_mesh()
    assert mesh.size == 8
    # class-conditional with guidance: the labels are padded with the batch (13 -> 16)
    config = smoke("toy_2d.py", model__num_classes=3)
    model = run_config.create_model(config, channels=2)
    schedule = run_config.get_schedule(config.diffusion)
    params = train.create_train_state(config, model, jax.random.PRNGKey(0), (2,)).ema_params
    for sampler in ("ddpm", "dpm++"):  # ddpm: noise drawn in every step
        kwargs = dict(shape=(2,), num=13, sampler=sampler, guidance=2.0)
        one = generate.sample(config, model, params, schedule, jax.random.PRNGKey(1), **kwargs)
        split = generate.sample(
            config, model, params, schedule, jax.random.PRNGKey(1), mesh=mesh, **kwargs
        )
        assert split.shape == (13, 2)
        assert split.sharding.is_fully_replicated and len(split.sharding.device_set) == 8
        # the untrained guided chain grows to ~1e5, where float32 rounding between the two
        # programs reaches 1.2e-6 (other noise draws would differ at O(1))
        np.testing.assert_allclose(split, one, rtol=1e-5, atol=1e-6, err_msg=sampler)

    seen, shapes = [], []

    class Probe:  # the network: records the shape and sharding of its input
        def apply(self, variables, x, t, y):
            shapes.append(x.shape)
            jax.debug.inspect_array_sharding(x, callback=seen.append)
            return x * variables["params"]["w"]

    config = smoke("toy_2d.py")
    w = {"w": jnp.float32(0.5)}
    generate.sample(
        config, Probe(), w, schedule, jax.random.PRNGKey(1), shape=(2,), num=13, mesh=mesh
    )
    assert shapes == [(16, 2)]  # 13 padded to a multiple of 8
    assert [s.shard_shape((16, 2)) for s in seen] == [(2, 2)]  # 2 of the 16 on each device
    # without padding too, the samples come back whole on every device (for every process)
    out = generate.sample(config, Probe(), w, schedule, jax.random.PRNGKey(1), shape=(2,), num=16,
                       mesh=mesh)  # fmt: skip
    assert out.sharding.is_fully_replicated and len(out.sharding.device_set) == 8
    other = jax.sharding.Mesh(np.asarray(jax.devices()), ("batch",))
    for bad in (other, "data"):
        with pytest.raises(ValueError, match=r"mesh must be a jax.sharding.Mesh with a 'data' ax"):
            generate.sample(config, Probe(), w, schedule, jax.random.PRNGKey(1), shape=(2,), num=3,
                         mesh=bad)  # fmt: skip


def test_sample_in_batches_is_sample_per_batch_on_folded_keys_and_cut_to_num(tmp_path):
    config = smoke("toy_2d.py", model__num_classes=3)
    model = run_config.create_model(config, channels=2)
    schedule = run_config.get_schedule(config.diffusion)
    params = train.create_train_state(config, model, jax.random.PRNGKey(0), (2,)).ema_params
    rng, options = jax.random.PRNGKey(4), dict(sampler="dpm++", num_steps=4, guidance=2.0)
    labels = np.arange(15) % 3  # the default: balanced classes, then padding
    want = np.concatenate([
        generate.sample(config, model, params, schedule, jax.random.fold_in(rng, i), shape=(2,),
                     num=5, labels=jnp.asarray(labels[5 * i : 5 * i + 5]), **options)
        for i in range(3)
    ])[:13]  # fmt: skip
    for mesh in (None, train.make_mesh()):
        got, got_labels = generate.sample_in_batches(
            config, model, params, schedule, rng, shape=(2,), num=13, batch_size=5, mesh=mesh,
            **options,
        )  # fmt: skip
        assert got.shape == (13, 2) and isinstance(got, np.ndarray)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(got_labels, labels[:13])
    # given labels, and a batch larger than num: one batch of num
    given = np.array([2, 2, 0], np.int32)
    got, got_labels = generate.sample_in_batches(
        config, model, params, schedule, rng, shape=(2,), num=3, batch_size=64,
        labels=given, **options,
    )  # fmt: skip
    one = generate.sample(config, model, params, schedule, jax.random.fold_in(rng, 0), shape=(2,),
                       num=3, labels=jnp.asarray(given), **options)  # fmt: skip
    np.testing.assert_allclose(got, one, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got_labels, given)

    def never(*args, **kwargs):
        raise AssertionError("sampled before the arguments were checked")

    call = dict(shape=(2,), num=3, batch_size=2)
    for kwargs, match in [
        (dict(batch_size=0), r"batch_size must be an int >= 1; got 0"),
        (dict(num=0), r"num must be an int >= 1; got 0"),
        (dict(steps=3), r"unknown sampling options \['steps'\]; allowed: sampler, num_steps"),
        (dict(labels=[0, 1, 5]), r"labels must lie in \[0, 3\].*got values in \[0, 5\]"),
        (dict(sampler="ddpm", num_steps=3), r"num_steps applies to 'ddim', 'dpm\+\+' and 'heun'"),
        (dict(mesh="data"), r"mesh must be a jax.sharding.Mesh with a 'data' axis"),
    ]:
        with pytest.raises(ValueError, match=match):
            generate.sample_in_batches(config, never, params, schedule, rng, **{**call, **kwargs})
    unconditional = smoke("toy_2d.py")
    with pytest.raises(ValueError, match=r"labels needs a class-conditional model"):
        generate.sample_in_batches(unconditional, never, params, schedule, rng, labels=[0, 0, 0],
                                **call)  # fmt: skip


def test_save_sample_arrays_writes_uint8_images_and_labels_as_guided_diffusion_reads_them(
    tmp_path,
):
    rng = np.random.default_rng(0)
    images = rng.uniform(-1.2, 1.2, (5, 4, 4, 3)).astype(np.float32)
    labels = np.array([3, 1, 4, 1, 5])
    path = tmp_path / "new" / "samples.npz"
    generate.save_sample_arrays(images, labels, str(path))
    with np.load(path) as arrays:
        assert arrays.files == ["arr_0", "arr_1"]
        # the 8-bit level nearest to (x + 1) / 2 * 255, x clipped to [-1, 1]
        want = np.floor((np.clip(images, -1, 1) + 1) / 2 * 255 + 0.5).astype(np.uint8)
        np.testing.assert_array_equal(arrays["arr_0"], want)
        np.testing.assert_array_equal(arrays["arr_1"], labels)
    # other data (2-D points) is kept as float32, and no labels means no arr_1
    points = rng.standard_normal((6, 2))
    generate.save_sample_arrays(points, None, str(path))
    with np.load(path) as arrays:
        assert arrays.files == ["arr_0"] and arrays["arr_0"].dtype == np.float32
        np.testing.assert_allclose(arrays["arr_0"], points, rtol=1e-7)


def test_sample_passes_the_config_or_the_given_sampler_settings_labels_and_guidance(monkeypatch):

    config = smoke(
        "toy_2d.py",
        model__num_classes=3,
        sample__guidance=1.5,
        sample__eta=0.25,
        sample__num_steps=7,
        sample__spacing="trailing",
    )
    traced, seen = [], []

    def guidance(cond_fn, w, num_classes, *, y, variance="fixed_small", guidance_rescale=0.0):
        assert guidance_rescale == 0.0  # the config's
        traced.append((num_classes, variance))

        def model_fn(x, t):
            jax.debug.callback(lambda y, w: seen.append((np.asarray(y), float(w))), y, w)
            return x

        return model_fn

    def sampler(name):
        def run(model_fn, schedule, x, *args, **kwargs):
            traced.append((name, x.shape, kwargs))
            return model_fn(x, jnp.zeros(x.shape[:1], jnp.int32))

        return run

    monkeypatch.setattr(samplers, "classifier_free_guidance", guidance)
    for name, attr in [
        ("ddpm", "ddpm_sample"),
        ("ddim", "ddim_sample"),
        ("dpm++", "dpm_solver_pp_sample"),
        ("heun", "heun_sample"),
    ]:
        monkeypatch.setattr(samplers, attr, sampler(name))
    schedule = run_config.get_schedule(config.diffusion)
    key = jax.random.PRNGKey(0)
    common = dict(prediction="eps", variance="fixed_small", clip_denoised=False)
    # the config's sampler, steps, eta and guidance; labels 0, 1, 2, 0, 1 (arange % classes)
    out = generate.sample(config, None, {}, schedule, key, shape=(2,), num=5)
    jax.effects_barrier()
    assert out.shape == (5, 2)
    assert traced[-2:] == [
        (3, "fixed_small"),
        ("ddim", (5, 2), dict(num_steps=7, eta=0.25, spacing="trailing", **common)),
    ]
    np.testing.assert_array_equal(seen[-1][0], [0, 1, 2, 0, 1])
    assert seen[-1][1] == 1.5
    # the arguments over the config's values
    labels = jnp.full((5,), 2, jnp.int32)
    generate.sample(
        config,
        None,
        {},
        schedule,
        key,
        shape=(2,),
        num=5,
        sampler="dpm++",
        num_steps=4,
        guidance=3.0,
        labels=labels,
    )
    jax.effects_barrier()
    assert traced[-1] == ("dpm++", (5, 2), dict(num_steps=4, **common))
    np.testing.assert_array_equal(seen[-1][0], labels)
    assert seen[-1][1] == 3.0
    generate.sample(config, None, {}, schedule, key, shape=(2,), num=5, sampler="ddpm")
    assert traced[-1] == ("ddpm", (5, 2), common)
    # heun on a diffusion run: EDM's sampler, not the flow ODE's, with the config's churn
    # (default: none, Algorithm 1) and the sampling key
    generate.sample(config, None, {}, schedule, key, shape=(2,), num=5, sampler="heun")
    assert isinstance(traced[-1][2].pop("rng"), jax.Array)
    no_churn = dict(s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0)
    assert traced[-1] == ("heun", (5, 2), dict(num_steps=7, **no_churn, **common))
    churned = config.copy_and_resolve_references()
    churned.sample.update(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
    generate.sample(churned, None, {}, schedule, key, shape=(2,), num=5, sampler="heun")
    traced[-1][2].pop("rng")
    churn = dict(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
    assert traced[-1] == ("heun", (5, 2), dict(num_steps=7, **churn, **common))
    generate.sample(churned, None, {}, schedule, key, shape=(2,), num=5, sampler="heun", s_churn=0)
    traced[-1][2].pop("rng")
    assert traced[-1] == ("heun", (5, 2), dict(num_steps=7, **{**churn, "s_churn": 0}, **common))
    for bad, match in [
        (dict(s_churn=1.0), "s_churn is EDM's churn, for sampler 'heun' on a diffusion.process"),
        (dict(sampler="heun", s_churn=-1.0), "s_churn must be a finite number >= 0; got -1.0"),
        (dict(sampler="heun", s_churn=True), "s_churn must be a finite number >= 0; got True"),
    ]:
        with pytest.raises(ValueError, match=match):
            generate.sample(config, None, {}, schedule, key, shape=(2,), num=5, **bad)
    generate.sample(config, None, {}, schedule, key, shape=(2,), num=5, spacing="linspace")
    assert traced[-1] == ("ddim", (5, 2), dict(num_steps=7, eta=0.25, spacing="linspace", **common))
    ddim_only = r"with sampler 'ddim' only; got spacing='x' with sampler 'dpm\+\+'"
    with pytest.raises(ValueError, match=ddim_only):
        generate.sample(
            config, None, {}, schedule, key, shape=(2,), num=5, sampler="dpm++", spacing="x"
        )
    with pytest.raises(ValueError, match="spacing must be one of .*got spacing='uniform'"):
        generate.sample(config, None, {}, schedule, key, shape=(2,), num=5, spacing="uniform")
    # a flow run: flow_sample with the config's steps, shift and x0_hat clipping
    flow_runs = []

    def flow_sample(flow_fn, x, **kwargs):
        flow_runs.append((x.shape, kwargs))
        return x

    monkeypatch.setattr(jd, "flow_sample", flow_sample)
    flow = config.copy_and_resolve_references()
    flow.diffusion.process = "flow"
    flow.sample.shift = 3.0
    for clip in (False, True):
        flow.sample.clip_denoised = clip
        generate.sample(flow, None, {}, schedule, key, shape=(2,), num=5, sampler="heun")
        want = dict(num_steps=7, method="heun", shift=3.0, clip_denoised=clip)
        assert flow_runs[-1] == ((5, 2), want)


def test_a_mesh_splits_the_labels_too_takes_params_on_one_device_and_compiles_for_its_devices(
    monkeypatch,
):
    # a mesh of 4 of the 8 devices: the programs must be compiled for those, not the default's
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ("data",))
    compiled_for = []

    def options(devices=None, **kwargs):
        compiled_for.append(None if devices is None else list(devices))
        return None

    monkeypatch.setattr(generate, "compiler_options", options)
    config = smoke("toy_2d.py", model__num_classes=3)
    schedule = run_config.get_schedule(config.diffusion)
    seen = []

    class Probe:  # the network: the rows and the rows per device of its inputs x and y
        def apply(self, variables, x, t, y):
            for a in (x, y):
                jax.debug.inspect_array_sharding(
                    a, callback=lambda s, n=a.shape[0]: seen.append((n, s.shard_shape((n,))[0]))
                )
            return x * variables["params"]["w"]

    # params restored onto one device (committed there), as a checkpoint restore leaves them
    w = jax.device_put({"w": jnp.float32(0.5)}, jax.devices()[0])
    kwargs = dict(shape=(2,), sampler="dpm++", num_steps=2, guidance=2.0)
    out = generate.sample(config, Probe(), w, schedule, jax.random.PRNGKey(1), num=7, mesh=mesh,
                          **kwargs)  # fmt: skip
    assert out.shape == (7, 2) and np.isfinite(np.asarray(out)).all()
    assert compiled_for == [list(mesh.devices.flat)]
    # x and the labels both split over the 4 devices (7 padded to 8)
    assert len(seen) == 2 and all(n % 8 == 0 and per == n // 4 for n, per in seen), seen
    seen.clear()
    out, labels = generate.sample_in_batches(
        config, Probe(), w, schedule, jax.random.PRNGKey(1), num=7, batch_size=3, mesh=mesh,
        **kwargs,
    )  # fmt: skip
    assert out.shape == (7, 2) and compiled_for[-1] == list(mesh.devices.flat)
    assert seen and all(n % 4 == 0 and per == n // 4 for n, per in seen), seen  # 3 -> 4
    # the labels come back as the documented int32, given ones too
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, np.arange(7) % 3)
    _, labels = generate.sample_in_batches(
        config, Probe(), w, schedule, jax.random.PRNGKey(1), num=3, batch_size=2,
        labels=np.array([2, 0, 1], np.int64), **kwargs,
    )  # fmt: skip
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, [2, 0, 1])


def test_sample_in_batches_draws_no_more_than_num_in_a_batch_larger_than_num():
    config = smoke("toy_2d.py")
    schedule = run_config.get_schedule(config.diffusion)
    shapes = []

    class Probe:
        def apply(self, variables, x, t, y):
            shapes.append(x.shape)
            return x * variables["params"]["w"]

    out, labels = generate.sample_in_batches(
        config, Probe(), {"w": jnp.float32(0.5)}, schedule, jax.random.PRNGKey(1), shape=(2,),
        num=3, batch_size=64, sampler="dpm++", num_steps=2,
    )  # fmt: skip
    assert out.shape == (3, 2) and labels is None
    assert shapes == [(3, 2)]  # one batch of num, not of batch_size


def test_save_sample_arrays_keeps_data_that_is_not_an_image_batch_as_float32(tmp_path):
    # e.g. sequences [N, L, C] in any range: only [N, H, W, C] images become uint8 pixels
    data = np.random.default_rng(1).normal(0.0, 3.0, (4, 5, 2))
    path = tmp_path / "seq.npz"
    generate.save_sample_arrays(data, np.array([0, 1, 0, 1]), str(path))
    with np.load(path) as arrays:
        assert arrays.files == ["arr_0", "arr_1"] and arrays["arr_0"].dtype == np.float32
        np.testing.assert_array_equal(arrays["arr_0"], data.astype(np.float32))


def _random_toy_run(num_classes=None):
    """The toy MLP config (T = 50) with random params: every output depends on x, t and y."""
    overrides = {} if num_classes is None else dict(model__num_classes=num_classes)
    config = smoke("toy_2d.py", **overrides)
    model = run_config.create_model(config, channels=2)
    schedule = run_config.get_schedule(config.diffusion)
    params = train.create_train_state(config, model, jax.random.PRNGKey(0), (2,)).params
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    noisy = [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    return config, model, schedule, jax.tree.unflatten(tree, noisy)


@pytest.mark.parametrize("method", generate.EDIT_METHODS)
def test_edit_runs_the_editing_function_on_the_run_s_guided_denoiser(method):
    # The reference: jax_diffusion.editing called directly on the network, guided by hand
    # (uncond + w (cond - uncond)), on the documented steps ('trailing') and keys (split(rng):
    # x_T's, the method's)
    config, model, schedule, params = _random_toy_run(num_classes=3)
    config.sample.clip_denoised = True  # the toy config's False; x0_hat clipped to [-1, 1]
    images = jax.random.uniform(jax.random.PRNGKey(2), (4, 2), minval=-1.0, maxval=1.0)
    rng = jax.random.PRNGKey(7)
    mask = jnp.array([1.0, 0.0])  # keep x, fill y
    options = dict(mask=mask, jump_length=2, jump_n_sample=3)
    if method == "sdedit":
        options = dict(strength=0.6)
    ts = samplers.sampling_timesteps(50, 10, "trailing")
    d = config.diffusion
    common = dict(prediction=d.prediction, variance=d.variance)
    common["clip_denoised"] = config.sample.clip_denoised
    x_rng, k = jax.random.split(rng)

    def reference(labels, w):
        def model_fn(x, t):
            cond = model.apply({"params": params}, x, t, labels)
            uncond = model.apply({"params": params}, x, t, jnp.full(4, 3))
            return uncond + w * (cond - uncond)

        if method == "sdedit":
            return jd.sdedit(
                model_fn, schedule, images, k, strength=0.6, timesteps=ts, eta=config.sample.eta,
                **common,
            )  # fmt: skip
        x_T = jax.random.normal(x_rng, images.shape)
        return jd.repaint_sample(
            model_fn, schedule, images, mask, x_T, k, jump_length=2, jump_n_sample=3,
            timesteps=ts, **common,
        )  # fmt: skip

    labels = jnp.array([0, 1, 2, 3], jnp.int32)
    got = generate.edit(
        config, model, params, schedule, rng, images, method=method, num_steps=10,
        guidance=2.0, labels=labels, **options,
    )  # fmt: skip
    np.testing.assert_allclose(got, reference(labels, 2.0), rtol=1e-5, atol=1e-5)
    # no labels: the null label 3, an unconditional edit
    unconditional = generate.edit(
        config, model, params, schedule, rng, images, method=method, num_steps=10, **options
    )
    np.testing.assert_allclose(unconditional, reference(jnp.full(4, 3), 1.0), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(unconditional - got).max()) > 1e-3  # the labels reach the network
    if method == "inpaint":
        np.testing.assert_array_equal(got[:, 0], images[:, 0])  # the kept coordinate, as given


def test_edit_rejects_bad_arguments_before_any_work():
    config, model, schedule, params = _random_toy_run()
    images, key, mask = jnp.zeros((2, 2)), jax.random.PRNGKey(0), jnp.array([1.0, 0.0])
    for kwargs, match in [
        (dict(method="paint"), "method must be one of 'inpaint', 'sdedit'; got 'paint'"),
        (dict(method="inpaint"), r"method 'inpaint' needs a mask \(1 = keep, 0 = fill\)"),
        (dict(method="sdedit", mask=mask), "mask applies to method 'inpaint'"),
        (dict(method="sdedit", num_steps=0), r"num_steps must be an int in \[1, 50\]; got 0"),
        (dict(method="sdedit", num_steps=51), r"num_steps must be an int in \[1, 50\]; got 51"),
        (dict(method="sdedit", strength=1.5), "strength"),
        (dict(method="sdedit", strength=0.01), "keeps no step"),
        (dict(method="inpaint", mask=mask, jump_length=0), "jump_length"),
        (dict(method="inpaint", mask=mask, jump_n_sample=0), "jump_n_sample"),
        (dict(method="sdedit", labels=jnp.zeros(2, jnp.int32)), "labels need a class-cond"),
        (dict(method="sdedit", images=jnp.zeros((2, 2), jnp.int32)), "images must be floats"),
    ]:
        kwargs = {"images": images, **kwargs}
        with pytest.raises(ValueError, match=match):  # params None: the network is never called
            generate.edit(config, model, None, schedule, key, **kwargs)
    config, model, schedule, _ = _random_toy_run(num_classes=3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\]"):
        generate.edit(
            config, model, None, schedule, key, images, method="sdedit", labels=jnp.array([0, 4])
        )


def test_sample_and_edit_guide_with_the_config_s_guidance_rescale():
    # config.sample.guidance_rescale reaches classifier_free_guidance (the reference: ddim on
    # the hand-guided, rescaled network, Lin et al. 2024's Algorithm 2 written out here)
    config, model, schedule, params = _random_toy_run(num_classes=3)
    config.sample.guidance_rescale = 0.7
    key, labels = jax.random.PRNGKey(5), jnp.array([0, 1, 2, 0])

    def guided(x, t):
        t = jnp.broadcast_to(t, (x.shape[0],))
        cond = model.apply({"params": params}, x, t, labels)
        uncond = model.apply({"params": params}, x, t, jnp.full(4, 3))
        cfg = uncond + 4.0 * (cond - uncond)
        factor = jnp.std(cond, axis=1, keepdims=True) / jnp.std(cfg, axis=1, keepdims=True)
        return cfg * (0.7 * factor + 0.3)

    x_T = jax.random.normal(jax.random.split(key)[0], (4, 2))
    got = generate.sample(
        config, model, params, schedule, key, shape=(2,), num=4, sampler="ddim", num_steps=5,
        guidance=4.0, labels=labels,
    )  # fmt: skip
    d, s = config.diffusion, config.sample
    want = samplers.ddim_sample(
        guided, schedule, x_T, jax.random.split(key)[1], num_steps=5, eta=s.eta,
        spacing=s.spacing, prediction=d.prediction, variance=d.variance,
        clip_denoised=s.clip_denoised,
    )  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    config.sample.guidance_rescale = 0.0
    plain = generate.sample(
        config, model, params, schedule, key, shape=(2,), num=4, sampler="ddim", num_steps=5,
        guidance=4.0, labels=labels,
    )  # fmt: skip
    assert float(jnp.abs(plain - got).max()) > 1e-4


@pytest.mark.parametrize("method", generate.EDIT_METHODS)
def test_edit_over_a_mesh_splits_the_images_and_gives_the_edits_of_one_device(method):
    mesh = train.make_mesh()
    config, model, schedule, params = _random_toy_run(num_classes=3)
    config.sample.clip_denoised = True
    images = jax.random.uniform(jax.random.PRNGKey(2), (13, 2), minval=-1.0, maxval=1.0)
    labels = jnp.arange(13) % 4  # the null label 3 included; padded with the images (13 -> 16)
    options = dict(mask=jnp.array([1.0, 0.0])) if method == "inpaint" else {}
    kw = dict(method=method, num_steps=6, guidance=2.0, labels=labels, **options)
    key = jax.random.PRNGKey(4)
    one = generate.edit(config, model, params, schedule, key, images, **kw)
    split = generate.edit(config, model, params, schedule, key, images, mesh=mesh, **kw)
    assert split.shape == (13, 2)
    assert split.sharding.is_fully_replicated and len(split.sharding.device_set) == 8
    np.testing.assert_allclose(split, one, rtol=1e-5, atol=1e-6)
    seen, shapes = [], []

    class Probe:  # the network: records the shape and sharding of its input
        def apply(self, variables, x, t, y):
            shapes.append(x.shape)
            jax.debug.inspect_array_sharding(x, callback=seen.append)
            return 0.5 * x

    generate.edit(config, Probe(), {}, schedule, key, images, mesh=mesh, **kw)
    assert shapes == [(32, 2)]  # 13 padded to 16, both guidance branches in one call
    assert [s.shard_shape((32, 2)) for s in seen] == [(4, 2)]  # spread over the 8 devices
    with pytest.raises(ValueError, match=r"mesh must be a jax.sharding.Mesh with a 'data' ax"):
        generate.edit(config, model, params, schedule, key, images, mesh="data", **kw)
