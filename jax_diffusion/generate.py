"""Samples from trained params: in one batch or many, split over a device mesh, written as an
image grid or as arrays for FID tools.

`sample` draws with any of the samplers (ddpm, ddim, dpm++; euler, heun for flow models) as
one compiled program, with
classifier-free guidance for class-conditional models; `sample_in_batches` draws more than
fit at once. Both default the sampling settings to the run's config and check them with
`run_config.check_sampling` before any work. `check_finite_samples` guards what is written;
`save_sample_arrays` writes the .npz that FID tools read, `save_sample_image` a grid.
`edit` inpaints (RePaint) or edits (SDEdit) given images with a run's network, the same way.
`train` re-exports the sampling functions.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_diffusion as jd
from jax_diffusion import samplers
from jax_diffusion._checks import check_int
from jax_diffusion.backend import _top_level, compiler_options
from jax_diffusion.diffusion import _is_concrete
from jax_diffusion.run_config import FLOW_SAMPLERS, check_sampling
from jax_diffusion.visualize import save_image_grid, to_uint8

__all__ = [
    "EDIT_METHODS",
    "check_finite_samples",
    "edit",
    "sample",
    "sample_in_batches",
    "save_sample_arrays",
    "save_sample_image",
]


def sample(
    config: ml_collections.ConfigDict,
    model,
    params,
    schedule: jd.Schedule,
    rng: jax.Array,
    *,
    shape: tuple[int, ...],
    num: int,
    sampler: str | None = None,
    num_steps: int | None = None,
    guidance: float | None = None,
    labels: jax.Array | None = None,
    spacing: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    s_churn: float | None = None,
) -> jax.Array:
    """Draws `num` samples [num, *shape] with the given params (use the EMA params).

    Runs the chosen sampler (ddpm, ddim, dpm++ or heun) as one compiled program, with
    classifier-free guidance (Ho & Salimans 2022) for a class-conditional model.

    With a mesh, n devices sample num / n examples each (num is padded up to a multiple of n,
    the padding dropped). The samples are those of the run without a mesh, up to float
    rounding: JAX's (default) partitionable threefry draws the same noise for the first num
    rows whatever the padding and the split. They come back replicated on the mesh's devices,
    so every process can read them (on several processes every process must call `sample`, as
    any jit over the mesh).

    Args:
      config: the run's config; its sections model, diffusion and sample are read.
      model: the Flax network (`run_config.create_model`).
      params: its params (`load_run`'s EMA params).
      schedule: the noise schedule it was trained with (`run_config.get_schedule`).
      rng: PRNG key.
      shape: one example's shape, [H, W, C] or [D].
      num: samples to draw, >= 1.
      sampler: 'ddpm' | 'ddim' | 'dpm++' | 'heun' (EDM's `heun_sample` on
        `karras_timesteps`, with config.sample's s_churn, s_tmin, s_tmax, s_noise), or for a
        diffusion.process 'flow' run 'euler' | 'heun': `flow_sample` of the network's
        velocity at `flow_timesteps(num_steps, shift=config.sample.shift)` (None:
        config.sample.sampler). Every sampler clips x0_hat to [-1, 1] where
        config.sample.clip_denoised is True.
      num_steps: model calls of ddim and dpm++, steps of heun (2n - 1 calls; for a flow run
        ODE steps of euler and heun, 2n calls) (None: config.sample.num_steps); ddpm runs all
        T steps and rejects it.
      guidance: classifier-free guidance scale w of a class-conditional model, 1 plain
        conditional, 0 unconditional (None: config.sample.guidance).
      labels: [num] int in [0, num_classes] (num_classes: the null label, unconditional
        samples) for a class-conditional model (None: arange(num) % num_classes).
      spacing: ddim's steps, 'leading' | 'trailing' | 'linspace' (None: config.sample.spacing,
        'leading' where the config has none); the other samplers reject it.
      mesh: None runs the batch where the params are (each device holding a replica draws
        all of it); a mesh with a 'data' axis (`train.make_mesh()`, of every process's
        devices) splits the batch over that axis, params replicated.
      s_churn: heun on a ddpm run: EDM's churn, >= 0 (None: config.sample.s_churn, 0 where
        the config has none); the other samplers reject it.

    Returns:
      [num, *shape] float samples.

    Raises:
      ValueError: as `check_sampling`; num not an int >= 1; labels not [num] ints, or
        (concrete) outside [0, num_classes]; mesh neither None nor a Mesh with a 'data' axis.
    """
    s, d = config.sample, config.diffusion
    num_classes = config.model.get("num_classes", None)
    sampler, num_steps, spacing, s_churn = check_sampling(
        config,
        sampler=sampler,
        num_steps=num_steps,
        spacing=spacing,
        guidance=guidance,
        labels=labels,
        s_churn=s_churn,
    )
    check_int("num", num, 1)
    padded = _padded_size(num, mesh)
    if num_classes is not None:
        labels = jnp.arange(num) % num_classes if labels is None else jnp.asarray(labels)
        _check_labels(labels, num, num_classes)
        labels = jnp.pad(labels, (0, padded - num))  # the padding's samples are dropped
    w = s.guidance if guidance is None else guidance
    x_rng, s_rng = jax.random.split(rng)

    split = functools.partial(_constrain, mesh)

    # params, labels and w are arguments of the compiled program, not constants baked into it
    def run(params, labels, w, x_rng, k):
        x = split(jax.random.normal(x_rng, (padded, *shape)), P("data"))
        if labels is not None:
            labels = split(labels, P("data"))
        return split(draw(params, labels, w, x, k)[:num], P())

    def draw(params, labels, w, x, k):
        if sampler in FLOW_SAMPLERS and d.get("process", "ddpm") == "flow":
            return draw_flow(params, labels, w, x)
        model_fn = _denoiser(config, model, params, labels, w)
        common = dict(prediction=d.prediction, variance=d.variance, clip_denoised=s.clip_denoised)
        if sampler == "ddpm":
            return samplers.ddpm_sample(model_fn, schedule, x, k, **common)
        if sampler == "ddim":
            return samplers.ddim_sample(
                model_fn, schedule, x, k, num_steps=num_steps, eta=s.eta, spacing=spacing, **common
            )
        if sampler == "heun":
            s_tmax = s.get("s_tmax", None)
            return samplers.heun_sample(
                model_fn, schedule, x, num_steps=num_steps, rng=k, s_churn=s_churn,
                s_tmin=s.get("s_tmin", 0.0), s_tmax=math.inf if s_tmax is None else s_tmax,
                s_noise=s.get("s_noise", 1.0), **common,
            )  # fmt: skip
        return samplers.dpm_solver_pp_sample(model_fn, schedule, x, num_steps=num_steps, **common)

    def draw_flow(params, labels, w, x):
        # the network's velocity at t in [0, 1], guided like a denoiser (guidance is linear)
        def velocity(x, t, y):
            return model.apply({"params": params}, x, t, y, method="velocity")

        if num_classes is None:
            flow_fn = lambda x, t: velocity(x, t, None)  # noqa: E731
        else:
            flow_fn = samplers.classifier_free_guidance(
                velocity, w, num_classes, y=labels, guidance_rescale=_rescale(config)
            )
        shift = s.get("shift", 1.0)
        return jd.flow_sample(
            flow_fn, x, num_steps=num_steps, method=sampler, shift=shift,
            clip_denoised=s.clip_denoised,
        )  # fmt: skip

    args = (params, labels, jnp.asarray(w, jnp.float32), x_rng, s_rng)
    if _top_level(args):
        params, devices = _onto(mesh, params)
        # at top level: compile with the backend's options (a nested jit may not set any)
        run = jax.jit(run, compiler_options=compiler_options(devices))
        args = (params, *args[1:])
    return run(*args)


def _denoiser(config, model, params, labels, w):
    """The run's network as a denoiser `model_fn(x, t)` (a flow run's FlowDenoiser at integer
    t included), guided with scale w towards `labels` for a class-conditional model (and
    config.sample.guidance_rescale, Lin et al. 2024's rescale)."""
    num_classes = config.model.get("num_classes", None)
    if num_classes is None:
        return lambda x, t: model.apply({"params": params}, x, t, None)

    def cond_fn(x, t, y):
        return model.apply({"params": params}, x, t, y)

    return samplers.classifier_free_guidance(
        cond_fn, w, num_classes, y=labels, variance=config.diffusion.variance,
        guidance_rescale=_rescale(config),
    )  # fmt: skip


def _rescale(config) -> float:
    """config.sample.guidance_rescale (0 for a config.json from before it existed)."""
    return float(config.sample.get("guidance_rescale", 0.0))


EDIT_METHODS = ("inpaint", "sdedit")


def edit(
    config: ml_collections.ConfigDict,
    model,
    params,
    schedule: jd.Schedule,
    rng: jax.Array,
    images,
    *,
    method: str,
    mask=None,
    num_steps: int | None = None,
    jump_length: int = 10,
    jump_n_sample: int = 10,
    strength: float = 0.5,
    guidance: float | None = None,
    labels=None,
    mesh: jax.sharding.Mesh | None = None,
) -> jax.Array:
    """Edits images with a run's network, as one compiled program (`jax_diffusion.editing`).

    'inpaint': `repaint_sample` (Lugmayr et al. 2022) fills the pixels where mask = 0 and keeps
    the others, over `sampling_timesteps(T, num_steps, 'trailing')` with RePaint's resampling
    (jump_n_sample = 1: plain replacement). 'sdedit': `sdedit` (Meng et al. 2022) noises each
    image to the step `strength` picks and runs the last int(strength * num_steps) of
    num_steps DDIM steps ('trailing', config.sample.eta). Both clip x0_hat where
    config.sample.clip_denoised. Measured on the digits (experiments/README.md, section 9):
    RePaint with 10 passes beat replacement, and SDEdit's strength trades faithfulness to the
    image for realism.

    Args:
      config, model, params, schedule: as for `sample` (a flow run's network serves as its
        denoiser at integer t).
      rng: PRNG key: `jax.random.split(rng)` gives the keys of x_T (inpaint only) and of the
        method.
      images: [N, *shape] float in [-1, 1] (`visualize.load_images`); repeat an image to draw
        several edits of it.
      method: 'inpaint' | 'sdedit'.
      mask: inpaint: 1 = keep, 0 = fill, broadcastable to images (e.g. [H, W, 1] from
        `visualize.load_mask`); sdedit rejects it.
      num_steps: steps of the respaced chain, in [1, T] (None: 100, or T if smaller).
      jump_length, jump_n_sample: inpaint's resampling (`repaint_timesteps`).
      strength: sdedit's, in (0, 1].
      guidance: classifier-free guidance scale of a class-conditional model (None: the
        config's sample.guidance).
      labels: [N] ints in [0, num_classes] for a class-conditional model (None: the null
        label, an unconditional edit); a model without classes rejects them.
      mesh: as for `sample`: None edits where the params are; a mesh with a 'data' axis splits
        the images over it (N padded to a multiple of its size, the padding dropped; the
        edits are those without a mesh up to float rounding).

    Returns:
      [N, *shape] float edits (replicated on the mesh's devices, with a mesh).

    Raises:
      ValueError: a bad method, mask, steps, jump or strength value, labels for a model
        without classes or outside [0, num_classes]; before any work.
    """
    if method not in EDIT_METHODS:
        raise ValueError(f"method must be one of 'inpaint', 'sdedit'; got {method!r}")
    images = jnp.asarray(images)
    if images.ndim < 2 or not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"images must be floats [N, ...]; got {images.dtype} {images.shape}")
    d, s = config.diffusion, config.sample
    T = schedule.num_timesteps
    num_steps = min(100, T) if num_steps is None else check_int("num_steps", num_steps, 1, T)
    timesteps = samplers.sampling_timesteps(T, num_steps, "trailing")
    if method == "inpaint":
        if mask is None:
            raise ValueError("method 'inpaint' needs a mask (1 = keep, 0 = fill); got None")
        mask = jnp.asarray(mask, images.dtype)
        jd.repaint_timesteps(num_steps, jump_length, jump_n_sample)  # checks the jump values
    elif mask is not None:
        raise ValueError("mask applies to method 'inpaint'; method 'sdedit' edits every pixel")
    else:
        jd.sdedit_timesteps(schedule, strength, timesteps=timesteps)  # checks the strength
    num_classes = config.model.get("num_classes", None)
    num = images.shape[0]
    if num_classes is None:
        if labels is not None:
            raise ValueError("labels need a class-conditional model; this run has no classes")
    else:
        labels = jnp.full((num,), num_classes, jnp.int32) if labels is None else labels
        labels = jnp.asarray(labels)
        _check_labels(labels, num, num_classes)
    w = s.guidance if guidance is None else guidance
    common = dict(prediction=d.prediction, variance=d.variance, clip_denoised=s.clip_denoised)
    padded = _padded_size(num, mesh)
    images = jnp.pad(images, [(0, padded - num)] + [(0, 0)] * (images.ndim - 1))
    if labels is not None:
        labels = jnp.pad(labels, (0, padded - num))  # the padding's edits are dropped

    split = functools.partial(_constrain, mesh)

    def run(params, labels, w, images, mask, rng):
        images = split(images, P("data"))
        labels = None if labels is None else split(labels, P("data"))
        return split(edit_all(params, labels, w, images, mask, rng)[:num], P())

    def edit_all(params, labels, w, images, mask, rng):
        model_fn = _denoiser(config, model, params, labels, w)
        x_rng, k = jax.random.split(rng)
        if method == "sdedit":
            return jd.sdedit(
                model_fn, schedule, images, k, strength=strength, timesteps=timesteps,
                eta=s.eta, **common,
            )  # fmt: skip
        x_T = jax.random.normal(x_rng, images.shape, images.dtype)
        return jd.repaint_sample(
            model_fn, schedule, images, mask, x_T, k, jump_length=jump_length,
            jump_n_sample=jump_n_sample, timesteps=timesteps, **common,
        )  # fmt: skip

    args = (params, labels, jnp.asarray(w, jnp.float32), images, mask, rng)
    if _top_level(args):
        params, devices = _onto(mesh, params)
        run = jax.jit(run, compiler_options=compiler_options(devices))
        args = (params, *args[1:])
    return run(*args)


def _padded_size(num: int, mesh) -> int:
    """num rounded up to a multiple of the mesh's 'data' axis (num itself without a mesh)."""
    if _check_mesh(mesh) is None:
        return num
    return -(-num // mesh.shape["data"]) * mesh.shape["data"]


def _constrain(mesh, x, spec):
    """x laid out as `spec` over the mesh inside a jit (x itself without a mesh)."""
    return x if mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _onto(mesh, params):
    """(params replicated on the mesh's devices, those devices), or (params, None) for no
    mesh: params on one device cannot meet the mesh's in one program."""
    if mesh is None:
        return params, None
    return jax.device_put(params, NamedSharding(mesh, P())), mesh.devices.flat


def _check_mesh(mesh):
    """`mesh` itself where it is None or a Mesh with a 'data' axis; else ValueError."""
    if mesh is not None and (
        not isinstance(mesh, jax.sharding.Mesh) or "data" not in mesh.axis_names
    ):
        raise ValueError(
            f"mesh must be a jax.sharding.Mesh with a 'data' axis (train.make_mesh()) or None; "
            f"got {mesh!r}"
        )
    return mesh


def sample_in_batches(
    config: ml_collections.ConfigDict,
    model,
    params,
    schedule: jd.Schedule,
    rng: jax.Array,
    *,
    shape: tuple[int, ...],
    num: int,
    batch_size: int,
    labels=None,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = False,
    **options,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Draws `num` samples to host memory, `batch_size` at a time: as many as memory allows.

    Batch i is `sample(..., jax.random.fold_in(rng, i), num=b, labels=labels[i b : (i + 1) b])`
    with b = min(batch_size, num) (the last batch is drawn in full and cut), all by one
    compiled program.

    Args:
      config, model, params, schedule, shape, mesh: as for `sample`.
      rng: PRNG key.
      num: samples to draw, >= 1.
      batch_size: samples per call, >= 1.
      labels: [num] ints in [0, num_classes] for a class-conditional model; None for
        arange(num) % num_classes (balanced classes).
      progress: show a tqdm progress bar over the batches.
      **options: sampler, num_steps, guidance, spacing, s_churn, as for `sample` (None: the
        config's).

    Returns:
      (samples [num, *shape] float32, labels [num] int32 or None for a model without classes).

    Raises:
      ValueError: as `sample`, for num or batch_size not an int >= 1, and for an option
        other than those five; before any sampling.
    """
    num = check_int("num", num, 1)
    bs = min(check_int("batch_size", batch_size, 1), num)
    unknown = set(options) - {"sampler", "num_steps", "guidance", "spacing", "s_churn"}
    if unknown:
        raise ValueError(
            f"unknown sampling options {sorted(unknown)}; allowed: sampler, num_steps, "
            "guidance, spacing, s_churn"
        )
    num_classes = config.model.get("num_classes", None)
    num_batches = -(-num // bs)
    if num_classes is not None:
        if labels is None:  # balanced, the cut samples too
            labels = np.arange(num_batches * bs, dtype=np.int32) % num_classes
        else:
            labels = np.asarray(labels)
            _check_labels(labels, num, num_classes)
            labels = np.pad(labels.astype(np.int32), (0, num_batches * bs - num))
    params, devices = _onto(_check_mesh(mesh), params)  # replicated once, not in every call
    draw = jax.jit(
        lambda p, key, y: sample(
            config, model, p, schedule, key, shape=shape, num=bs, labels=y, mesh=mesh, **options
        ),
        compiler_options=compiler_options(devices),
    )
    from tqdm.auto import tqdm

    chunks = []
    for i in tqdm(range(num_batches), desc="sample", disable=not progress, leave=False):
        y = None if labels is None else jnp.asarray(labels[i * bs : (i + 1) * bs])
        chunks.append(np.asarray(jax.device_get(draw(params, jax.random.fold_in(rng, i), y))))
    samples = np.concatenate(chunks)[:num]
    return samples, None if labels is None else labels[:num]


def _check_labels(labels: jax.Array, num: int, num_classes: int) -> None:
    """Labels [num] of ints in [0, num_classes] (num_classes: the null label, unconditional
    samples) where concrete: the label table would clamp or wrap others (a label of 30 of 10
    classes gave NaN samples, -1 the null label's)."""
    if not jnp.issubdtype(labels.dtype, jnp.integer) or labels.shape != (num,):
        raise ValueError(
            f"labels must be ints of shape [num] = ({num},); got {labels.dtype} {labels.shape}"
        )
    if _is_concrete(labels):
        values = np.asarray(labels)
        if values.min() < 0 or values.max() > num_classes:
            raise ValueError(
                f"labels must lie in [0, {num_classes}] ({num_classes}: the null label, "
                f"unconditional samples); got values in [{values.min()}, {values.max()}]"
            )


def check_finite_samples(samples: np.ndarray) -> None:
    """Raises FloatingPointError when some of samples [N, ...] hold NaN or inf: a black or
    saturated grid, or metrics of NaN, would otherwise pass for a result."""
    bad = int((~np.isfinite(samples).reshape(len(samples), -1).all(axis=1)).sum())
    if bad:
        raise FloatingPointError(f"{bad} of {len(samples)} samples are not finite")


def save_sample_image(images: np.ndarray, path: str | os.PathLike) -> None:
    """Writes a sample grid (images) or a 2-D density plot (toy points) as an image at `path`.

    Args:
      images: [N, H, W, C] in [-1, 1], or [N, 2] points of the 2-D toy data.
      path: a local path or a URI `etils.epath` understands (e.g. gs://bucket/run/grid.png).
    """
    if images.ndim == 4:
        scale = max(1, 64 // images.shape[1])
        save_image_grid(images, path, scale=scale, padding=max(1, scale // 2))
        return
    # 2-D toy data: a density image of the sample cloud
    hist, _, _ = np.histogram2d(images[:, 1], images[:, 0], bins=128, range=[[-2, 2], [-2, 2]])
    img = 1.0 - 2.0 * np.clip(hist[::-1] / max(hist.max(), 1.0) * 4.0, 0.0, 1.0)
    save_image_grid(img[None, :, :, None], path, padding=0, scale=2)


def save_sample_arrays(samples: np.ndarray, labels, path: str | os.PathLike) -> None:
    """Writes samples (and labels) as a NumPy .npz for FID and other external evaluators.

    The layout of guided-diffusion's sample files (Dhariwal & Nichol 2021), which their
    evaluator and most FID tools read: `arr_0` holds images as uint8 [N, H, W, C]
    (round((x + 1) * 127.5) of x clipped to [-1, 1], `visualize.to_uint8`: the nearest of the
    data's 256 levels; guided-diffusion's and Ho et al.'s code truncate instead, on average
    half a level darker), or other data (e.g. 2-D points [N, D]) as float32; `arr_1` the
    labels [N] of class-conditional samples.

    Args:
      samples: [N, H, W, C] images in [-1, 1], or [N, ...] other data.
      labels: [N] ints, or None.
      path: a local path or a URI `etils.epath` understands; parent directories are made.
    """
    samples = np.asarray(samples)
    data = to_uint8(samples) if samples.ndim == 4 else samples.astype(np.float32)
    arrays = [data] if labels is None else [data, np.asarray(labels)]
    out = epath.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as f:
        np.savez(f, *arrays)
