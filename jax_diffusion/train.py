"""Training: model and state creation, the pure train step, and the loop with checkpoints.

The same code runs on one CPU, several GPUs or a TPU pod slice: `train_step` is jitted once over
a `jax.sharding.Mesh` of all devices with the batch sharded on its leading axis ('data') and the
state replicated (data parallelism by GSPMD). Across hosts call `jax.distributed.initialize()`
first; each process then feeds its own shard of the global batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_diffusion as jd
from jax_diffusion import data as data_lib
from jax_diffusion import samplers
from jax_diffusion._checks import check_int
from jax_diffusion.backend import compiler_options
from jax_diffusion.checkpoints import CheckpointManager
from jax_diffusion.diffusion import _is_concrete
from jax_diffusion.models import MLPDenoiser, UNet, drop_labels
from jax_diffusion.train_state import TrainState, ema_decay, make_optimizer, update_ema
from jax_diffusion.visualize import save_image_grid, to_uint8

__all__ = [
    "TrainingDiverged",
    "check_config",
    "check_sampling",
    "create_model",
    "create_train_state",
    "get_schedule",
    "load_run",
    "load_run_config",
    "make_mesh",
    "make_train_step",
    "sample",
    "sample_in_batches",
    "save_sample_arrays",
    "train_and_evaluate",
]

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Raised after `train.max_bad_steps` consecutive non-finite steps; checkpoints are intact."""


def get_schedule(diffusion: ml_collections.ConfigDict) -> jd.Schedule:
    """The noise schedule named by config.diffusion (schedule, num_timesteps, zero_terminal_snr)."""
    builders = {
        "linear": jd.linear_betas,
        "cosine": jd.cosine_betas,
        "scaled_linear": jd.scaled_linear_betas,
    }
    if diffusion.schedule not in builders:
        raise ValueError(
            f"diffusion.schedule must be one of {sorted(builders)}; got {diffusion.schedule!r}"
        )
    betas = builders[diffusion.schedule](diffusion.num_timesteps)
    if diffusion.get("zero_terminal_snr", False):
        betas = jd.rescale_zero_terminal_snr(betas)
    return jd.Schedule.from_betas(betas)


def create_model(config: ml_collections.ConfigDict, *, channels: int):
    """The Flax network named by config.model.name ('unet' or 'mlp') for data with `channels`."""
    m = config.model
    out = channels * (2 if config.diffusion.variance == "learned_range" else 1)
    dtype = jnp.dtype(m.get("dtype", "float32"))
    num_classes = m.get("num_classes", None)
    if m.name == "unet":
        return UNet(
            base_channels=m.base_channels,
            channel_mults=tuple(m.channel_mults),
            num_res_blocks=m.num_res_blocks,
            attention_resolutions=tuple(m.attention_resolutions),
            num_heads=m.num_heads,
            dropout=m.dropout,
            out_channels=out,
            use_scale_shift_norm=m.use_scale_shift_norm,
            num_classes=num_classes,
            num_groups=m.num_groups,
            dtype=dtype,
            remat=m.get("remat", False),
        )
    if m.name == "mlp":
        return MLPDenoiser(
            out_dim=out,
            hidden_dim=m.hidden_dim,
            num_layers=m.num_layers,
            num_classes=num_classes,
            dropout=m.dropout,
            dtype=dtype,
        )
    raise ValueError(f"model.name must be one of 'unet', 'mlp'; got {m.name!r}")


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh over all devices (of every process) with axis 'data'."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    return jax.sharding.Mesh(devices.reshape(-1), ("data",))


def _top_level(tree) -> bool:
    """No leaf is a tracer: not called inside a jit / eval_shape trace, where a nested jit may set
    no compiler_options."""
    return all(_is_concrete(a) for a in jax.tree.leaves(tree))


def create_train_state(
    config: ml_collections.ConfigDict, model, rng: jax.Array, example_shape: tuple[int, ...]
) -> TrainState:
    """Initialises params from `example_shape` ([H, W, C] or [D]) and builds optimizer + EMA."""
    init_rng, state_rng = jax.random.split(rng)
    x = jnp.zeros((1, *example_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    y = None if config.model.get("num_classes") is None else jnp.zeros((1,), jnp.int32)
    # jit: ~10x faster than op by op; compiled cheaply on CPU as it runs once (backend.py)
    options = compiler_options(run_once=True) if _top_level(init_rng) else None
    init = jax.jit(model.init, compiler_options=options)
    params = init({"params": init_rng}, x, t, y)["params"]
    tc = config.train
    tx = make_optimizer(
        learning_rate=tc.learning_rate,
        num_steps=tc.num_steps,
        warmup_steps=tc.warmup_steps,
        schedule=tc.lr_schedule,
        weight_decay=tc.weight_decay,
        grad_clip=tc.grad_clip,
    )
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=state_rng)


FLIP_KEY = 0x0F11F  # fold_in tag of the step key for data.random_flip


def make_train_step(config: ml_collections.ConfigDict, schedule: jd.Schedule):
    """The pure step `train_step(state, batch) -> (state, metrics)`.

    batch: {'image': [B, ...] float in [-1, 1], 'label': [B] int}. Step k draws all its
    randomness (t, noise, dropout, label dropout) from fold_in(state.rng, k); with
    config.data.random_flip its images are first mirrored by
    `data.random_flip(fold_in(fold_in(state.rng, k), FLIP_KEY), images)`. A step whose loss
    or gradient is not finite leaves params, EMA and optimizer state untouched and is counted in
    `bad_steps` / `skipped_steps`.
    """
    d, tc = config.diffusion, config.train
    num_classes = config.model.get("num_classes", None)
    class_dropout = config.model.get("class_dropout", 0.0)

    num_chunks = int(tc.get("microbatches", 1))
    flip = config.data.get("random_flip", False)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        step_rng = jax.random.fold_in(state.rng, state.step)
        loss_rng, dropout_rng, label_rng = jax.random.split(step_rng, 3)
        x0 = batch["image"]
        if flip:  # a key of its own: the other draws stay those of a run without flips
            x0 = data_lib.random_flip(jax.random.fold_in(step_rng, FLIP_KEY), x0)
        y = None
        if num_classes is not None:
            y = drop_labels(label_rng, batch["label"], class_dropout, num_classes)
        t, noise = jd.training_draws(schedule, x0, loss_rng)

        def loss_fn(params, x0, t, noise, y, rng):
            def model_fn(x, t):
                return state.apply_fn(
                    {"params": params}, x, t, y, train=True, rngs={"dropout": rng}
                )

            loss, metrics = jd.diffusion_loss(
                schedule,
                model_fn,
                x0,
                None,
                prediction=d.prediction,
                variance=d.variance,
                loss_type=d.loss_type,
                weighting=d.weighting,
                min_snr_gamma=d.min_snr_gamma,
                vlb_weight=d.vlb_weight,
                draws=(t, noise),
            )
            return loss, {k: v for k, v in metrics.items() if k in ("mse", "vlb_bpd")}

        loss, aux, grads = _accumulated_value_and_grad(
            loss_fn, state.params, (x0, t, noise, y), dropout_rng, num_chunks
        )
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = update_ema(state.ema_params, params, ema_decay(state.step, tc.ema_decay))

        def keep_if_finite(new, old):
            return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

        new_state = state.replace(
            step=state.step + 1,
            params=keep_if_finite(params, state.params),
            ema_params=keep_if_finite(ema, state.ema_params),
            opt_state=keep_if_finite(opt_state, state.opt_state),
            bad_steps=jnp.where(finite, 0, state.bad_steps + 1),
            skipped_steps=state.skipped_steps + jnp.where(finite, 0, 1),
        )
        metrics = {
            "loss": loss,
            "mse": aux["mse"],
            "grad_norm": grad_norm,
            "skipped": 1 - finite.astype(jnp.int32),
            "bad_steps": new_state.bad_steps,
        }
        if "vlb_bpd" in aux:
            metrics["vlb_bpd"] = aux["vlb_bpd"]
        return new_state, metrics

    return train_step


def _accumulated_value_and_grad(loss_fn, params, inputs, rng, num_chunks: int):
    """Value and gradient of a per-example-mean loss, summed over `num_chunks` micro-batches.

    loss_fn(params, *inputs, rng) -> (loss, aux) must be a mean over the batch of per-example
    terms (aux: scalar means), so the mean over equal chunks is the full-batch value. Chunk j
    holds examples j, j + n, j + 2n, ... (n = num_chunks): a batch sharded over devices in
    contiguous blocks splits on every device locally, without communication, when the
    per-device batch is a multiple of n (otherwise XLA moves examples between devices). Each
    chunk's gradient is summed over devices on its own (n all-reduces a step, measured on 8
    CPU devices: 72 for n = 4 against 18), the price of the memory saved. Chunk j uses
    rng fold_in(rng, j) (dropout); with n = 1, rng itself. Chunk j + 1's inputs depend on
    chunk j's value and gradient (`_after`), so it starts after them and XLA reuses one chunk's
    activation memory for the next: a step's temporary memory is about that of batch / n (on
    CPU, where every step's temporaries are fresh pages, this is most of the gain).

    Returns:
      (loss, aux, grads), each the mean over chunks.
    """
    batch = jax.tree.leaves(inputs)[0].shape[0]
    if num_chunks <= 1:
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *inputs, rng)
        return loss, aux, grads
    if batch % num_chunks:
        raise ValueError(f"train.microbatches={num_chunks} must divide the batch size {batch}")

    def chunk(a, j):
        return a.reshape(batch // num_chunks, num_chunks, *a.shape[1:])[:, j]

    total = None
    for j in range(num_chunks):
        chunk_inputs = jax.tree.map(lambda a, j=j: chunk(a, j), inputs)
        if total is not None:
            chunk_inputs = _after(chunk_inputs, total)
        value = jax.value_and_grad(loss_fn, has_aux=True)(
            params, *chunk_inputs, jax.random.fold_in(rng, j)
        )
        total = value if total is None else jax.tree.map(jnp.add, total, value)
    (loss, aux), grads = jax.tree.map(lambda a: a / num_chunks, total)
    return loss, aux, grads


def _after(tree, dependency):
    """`tree`, made to depend on every leaf of `dependency`: its first floating leaf plus a zero
    that XLA cannot fold (0 * one element of each leaf; lax.optimization_barrier is expanded
    away on CPU before scheduling, which lost the order). A non-finite dependency makes that
    leaf non-finite, which only happens when the step is already non-finite (and skipped)."""
    zero = sum(jnp.ravel(leaf)[0].astype(jnp.float32) for leaf in jax.tree.leaves(dependency)) * 0
    leaves, treedef = jax.tree.flatten(tree)
    for i, leaf in enumerate(leaves):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            leaves[i] = leaf + zero.astype(leaf.dtype)
            break
    return jax.tree.unflatten(treedef, leaves)


def _jit_train_step(train_step, mesh, state):
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))
    state_sharding = jax.tree.map(lambda _: replicated, state)
    return jax.jit(
        train_step,
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,),
        compiler_options=compiler_options(mesh.devices.flat),
    ), batch_sharding


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
) -> jax.Array:
    """Draws `num` samples [num, *shape] with the given params (use the EMA params).

    sampler: 'ddpm' | 'ddim' | 'dpm++' (default config.sample.sampler); num_steps for ddim and
    dpm++ (default config.sample.num_steps; ddpm uses all T steps and rejects num_steps);
    spacing of ddim's steps, 'leading' | 'trailing' | 'linspace' (default config.sample.spacing,
    'leading' where the config has none; the other samplers reject it). For
    a class-conditional model, labels default to arange(num) % num_classes and guidance
    (default config.sample.guidance) is the classifier-free guidance scale w (1 = plain
    conditional).

    mesh: None runs the whole batch on one device (or on each device params are replicated
    on). A mesh with a 'data' axis (`make_mesh()`, of every process's devices) splits the
    batch over that axis, params replicated: n devices sample num / n examples each (num is
    padded up to a multiple of n, the padding dropped). The samples are those of the run
    without a mesh, up to float rounding: JAX's (default) partitionable threefry draws the
    same noise for the first num rows whatever the padding and the split. They come back
    replicated on the mesh's devices, so every process can read them (on several processes
    every process must call `sample`, as any jit over the mesh).
    """
    s, d = config.sample, config.diffusion
    num_classes = config.model.get("num_classes", None)
    sampler, num_steps, spacing = check_sampling(
        config,
        sampler=sampler,
        num_steps=num_steps,
        spacing=spacing,
        guidance=guidance,
        labels=labels,
    )
    check_int("num", num, 1)
    padded = num
    if _check_mesh(mesh) is not None:
        padded = -(-num // mesh.shape["data"]) * mesh.shape["data"]
    if num_classes is not None:
        labels = jnp.arange(num) % num_classes if labels is None else jnp.asarray(labels)
        _check_labels(labels, num, num_classes)
        labels = jnp.pad(labels, (0, padded - num))  # the padding's samples are dropped
    w = s.guidance if guidance is None else guidance
    x_rng, s_rng = jax.random.split(rng)

    def split(x, spec):
        return x if mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    # params, labels and w are arguments of the compiled program, not constants baked into it
    def run(params, labels, w, x_rng, k):
        x = split(jax.random.normal(x_rng, (padded, *shape)), P("data"))
        if labels is not None:
            labels = split(labels, P("data"))
        return split(draw(params, labels, w, x, k)[:num], P())

    def draw(params, labels, w, x, k):
        if num_classes is None:

            def model_fn(x, t):
                return model.apply({"params": params}, x, t, None)
        else:

            def cond_fn(x, t, y):
                return model.apply({"params": params}, x, t, y)

            model_fn = samplers.classifier_free_guidance(
                cond_fn, w, num_classes, y=labels, variance=d.variance
            )
        common = dict(prediction=d.prediction, variance=d.variance, clip_denoised=s.clip_denoised)
        if sampler == "ddpm":
            return samplers.ddpm_sample(model_fn, schedule, x, k, **common)
        if sampler == "ddim":
            return samplers.ddim_sample(
                model_fn, schedule, x, k, num_steps=num_steps, eta=s.eta, spacing=spacing, **common
            )
        return samplers.dpm_solver_pp_sample(model_fn, schedule, x, num_steps=num_steps, **common)

    args = (params, labels, jnp.asarray(w, jnp.float32), x_rng, s_rng)
    if _top_level(args):
        if mesh is not None:  # params on one device cannot meet the mesh's in one program
            params = jax.device_put(params, NamedSharding(mesh, P()))
            args = (params, *args[1:])
        # at top level: compile with the backend's options (a nested jit may not set any)
        devices = None if mesh is None else mesh.devices.flat
        run = jax.jit(run, compiler_options=compiler_options(devices))
    return run(*args)


def _check_mesh(mesh):
    if mesh is not None and (
        not isinstance(mesh, jax.sharding.Mesh) or "data" not in mesh.axis_names
    ):
        raise ValueError(
            f"mesh must be a jax.sharding.Mesh with a 'data' axis (make_mesh()) or None; "
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

    Batch i is `sample(..., jax.random.fold_in(rng, i), num=b)` with b = min(batch_size, num)
    (the last batch is drawn in full and cut), all by one compiled program.

    Args:
      config, model, params, schedule, shape, mesh: as for `sample`.
      rng: PRNG key.
      num: samples to draw, >= 1.
      batch_size: samples per call, >= 1.
      labels: [num] ints in [0, num_classes] for a class-conditional model; None for
        arange(num) % num_classes (balanced classes).
      progress: show a tqdm progress bar over the batches.
      **options: sampler, num_steps, guidance, spacing, as for `sample` (None: the config's).

    Returns:
      (samples [num, *shape] float32, labels [num] int32 or None for a model without classes).

    Raises:
      ValueError: as `sample`, and for num or batch_size not an int >= 1; before any sampling.
    """
    num = check_int("num", num, 1)
    bs = min(check_int("batch_size", batch_size, 1), num)
    unknown = set(options) - {"sampler", "num_steps", "guidance", "spacing"}
    if unknown:
        raise ValueError(
            f"unknown sampling options {sorted(unknown)}; allowed: sampler, num_steps, "
            "guidance, spacing"
        )
    check_sampling(config, labels=labels, **options)
    num_classes = config.model.get("num_classes", None)
    num_batches = -(-num // bs)
    if num_classes is not None:
        if labels is None:  # balanced, the cut samples too
            labels = np.arange(num_batches * bs, dtype=np.int32) % num_classes
        else:
            labels = np.asarray(labels)
            _check_labels(labels, num, num_classes)
            labels = np.pad(labels.astype(np.int32), (0, num_batches * bs - num))
    devices = None
    if _check_mesh(mesh) is not None:  # replicated once, not in every call
        params = jax.device_put(params, NamedSharding(mesh, P()))
        devices = mesh.devices.flat
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


def check_sampling(
    config: ml_collections.ConfigDict,
    *,
    sampler: str | None = None,
    num_steps: int | None = None,
    spacing: str | None = None,
    guidance: float | None = None,
    labels=None,
    names: dict[str, str] | None = None,
) -> tuple[str, int, str]:
    """Checks the sampling choices of `sample` against a run's config, before any work.

    Arguments as `sample`'s (None: the config's). `names` renames them in the messages (the
    command line passes {'num_steps': '--steps', ...}).

    Returns:
      (sampler, num_steps, spacing) with the config's defaults filled in.

    Raises:
      ValueError: an unknown sampler; num_steps with ddpm (which runs all T steps) or outside
        [1, T] ([1, T - 1] for dpm++); spacing with a sampler other than ddim, or unknown;
        labels or guidance for a model without classes.
    """
    name = (names or {}).get
    s, num_timesteps = config.sample, config.diffusion.num_timesteps
    explicit_steps = num_steps
    sampler = s.sampler if sampler is None else sampler
    num_steps = s.num_steps if num_steps is None else num_steps
    if sampler not in ("ddpm", "ddim", "dpm++"):
        raise ValueError(
            f"{name('sampler', 'sampler')} must be one of 'ddpm', 'ddim', 'dpm++'; got {sampler!r}"
        )
    steps = name("num_steps", "num_steps") if explicit_steps is not None else "sample.num_steps"
    if sampler == "ddpm" and explicit_steps is not None:
        raise ValueError(
            f"{steps} applies to 'ddim' and 'dpm++'; sampler 'ddpm' runs all "
            f"{num_timesteps} steps (got {steps}={explicit_steps!r})"
        )
    if sampler != "ddpm":
        # dpm++ takes n + 1 distinct grid points in [0, T - 1]
        most = num_timesteps - 1 if sampler == "dpm++" else num_timesteps
        why = " (DPM-Solver++ takes n + 1 distinct steps)" if sampler == "dpm++" else ""
        check_int(f"{steps} for sampler {sampler!r}{why}", num_steps, 1, most)
    if spacing is not None and (sampler != "ddim" or spacing not in samplers.SPACINGS):
        raise ValueError(
            f"{name('spacing', 'spacing')} must be one of {samplers.SPACINGS} (or None: the "
            f"config's), with sampler 'ddim' only; got spacing={spacing!r} with sampler "
            f"{sampler!r}"
        )
    spacing = s.get("spacing", "leading") if spacing is None else spacing
    _warn_if_zero_snr_skipped(config, sampler, spacing)
    given = {
        name(k, k): v for k, v in (("labels", labels), ("guidance", guidance)) if v is not None
    }
    if config.model.get("num_classes", None) is None and given:
        what = " and ".join(given)
        raise ValueError(
            f"{what} need{'s' * (len(given) == 1)} a class-conditional model; this one has "
            f"model.num_classes=None (omit {what}); got "
            + ", ".join(
                f"{k}={'given' if k.endswith('labels') else repr(v)}" for k, v in given.items()
            )
        )
    return sampler, int(num_steps), spacing


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


def load_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config of a training workdir (its `config.json`), without restoring anything: for
    checks before the restore (`check_sampling`).

    Raises:
      FileNotFoundError: workdir holds no config.json.
    """
    path = epath.Path(workdir) / "config.json"
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no training run in {workdir}: {err}") from None


def load_run(workdir: str | os.PathLike):
    """The config, example shape, model and latest EMA params of a training workdir.

    Reads `config.json` and `data_info.json` written by `train_and_evaluate` and restores only
    what the checkpoint holds: the restore target comes from `jax.eval_shape`, so no optimizer
    state or params are initialised (seconds saved on CPU).

    Args:
      workdir: the run directory: a local path or a URI `etils.epath` and orbax understand
        (e.g. gs://bucket/run).

    Returns:
      (config, shape, model, ema_params, step).

    Raises:
      FileNotFoundError: workdir holds no run (no config.json / data_info.json) or no
        checkpoint.
    """
    workdir = epath.Path(workdir)
    config = load_run_config(workdir)
    try:
        info_text = (workdir / "data_info.json").read_text()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no training run in {workdir}: {err}") from None
    shape = tuple(json.loads(info_text)["shape"])
    model = create_model(config, channels=shape[-1])
    abstract = jax.eval_shape(
        lambda: create_train_state(config, model, jax.random.PRNGKey(0), shape)
    )
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        abstract.checkpoint_items(),
    )
    ckpt = CheckpointManager(os.fspath(workdir))
    try:
        params = ckpt.restore_params(target, ema=True)
        step = ckpt.restored_step
    finally:
        ckpt.close()
    return config, shape, model, params, int(step)


def _save_samples(images: np.ndarray, path: str | os.PathLike) -> None:
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
    (round((x + 1) * 127.5) of x clipped to [-1, 1], `visualize.to_uint8`), or other data
    (e.g. 2-D points [N, D]) as float32; `arr_1` the labels [N] of class-conditional samples.

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


def _write_text_atomically(path, text: str) -> None:
    """Writes `path` (an epath or pathlib path) through a temporary file renamed over it: a
    run killed while rewriting config.json or metrics.jsonl leaves the old file, not a
    truncated one (an empty config.json blocked every resume; metrics.jsonl lost its lines)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _logged_step(line: str) -> int:
    """The step of a metrics.jsonl line; -1 for a line a kill cut short."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1


# the key of the checkpoint's data item that holds the metrics of the steps not logged yet
_WINDOW_KEY = "log_window"


def _window_to_json(window: list[dict]) -> dict:
    """The per-step metrics of the unlogged steps as JSON: {"dtypes": {name: dtype},
    "steps": [{name: value}]}, each value the exact Python number of its numpy scalar."""
    host = jax.device_get(window)
    dtypes = {k: str(np.asarray(v).dtype) for k, v in host[0].items()} if host else {}
    steps = [{k: np.asarray(v).item() for k, v in m.items()} for m in host]
    return {"dtypes": dtypes, "steps": steps}  # NaN as orbax's json.dumps writes it, read back


def _window_from_json(saved: dict | None) -> list[dict]:
    """`_window_to_json`'s inverse: the same numpy scalars (a checkpoint without it: [])."""
    if not saved:
        return []
    dtypes = saved["dtypes"]
    return [{k: np.asarray(v, dtypes[k]) for k, v in m.items()} for m in saved["steps"]]


def _from_process_0(value: float | None) -> float | None:
    """Process 0's `value` (a float32 number or None) on every process: only process 0 reads
    metrics.jsonl (the others would race its rewrite), yet what `train_and_evaluate` returns
    must not depend on the process that returns it."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    known, number = multihost_utils.broadcast_one_to_all(
        np.array([value is not None, 0.0 if value is None else value], np.float32)
    )
    return float(number) if known else None


class _Writer:
    """metrics.jsonl and TensorBoard events (tensorboardX: no TensorFlow), on process 0 only.

    metrics.jsonl goes through `etils.epath` (so gs:// works); tensorboardX writes gs:// and
    s3:// event files itself. On an object store the appended lines may only become visible
    when the file is closed, at the end of training.
    """

    def __init__(self, workdir: epath.Path, start: int = 0):
        """start: the step training resumes from; what a killed run logged after it is dropped
        (metrics.jsonl rewritten, TensorBoard's events purged), so no step appears twice."""
        self.enabled = jax.process_index() == 0
        self.last: dict | None = None  # the last line kept, if any
        if not self.enabled:
            return
        path = workdir / "metrics.jsonl"
        if path.exists():
            lines = path.read_text().splitlines(keepends=True)
            kept = [ln.rstrip("\n") + "\n" for ln in lines if 0 <= _logged_step(ln) <= start]
            if kept != lines:  # rewritten only where a killed run left lines behind
                _write_text_atomically(path, "".join(kept))
            if kept:
                self.last = json.loads(kept[-1])
        self._jsonl = path.open("a")
        from tensorboardX import SummaryWriter

        self._tb_dir, self._tb_files = os.fspath(workdir / "tensorboard"), 1
        self._tb = SummaryWriter(self._tb_dir, purge_step=start + 1)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        # strict JSON: a non-finite mean (a window of skipped steps) is written as null
        finite = {k: v if math.isfinite(v) else None for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": step, **finite}, allow_nan=False) + "\n")
        self._jsonl.flush()
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def sync(self) -> None:
        """Returns once every event written so far is in its file: called before each
        checkpoint, so that a kill after it loses no logged step (a resumed run purges the
        events after the checkpoint, and never writes the earlier ones again). tensorboardX's
        flush() only flushes what its writer thread has dequeued; closing the writer drains
        the queue, and the next events go to a new file."""
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        self._tb.close()
        self._tb = SummaryWriter(self._tb_dir, filename_suffix=f".{self._tb_files}")
        self._tb_files += 1

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


_NUMERIC_FIELDS = {  # field -> may it be None
    "train.num_steps": False,
    "train.batch_size": False,
    "train.log_every": False,
    "train.checkpoint_every": False,
    "train.max_bad_steps": False,
    "train.learning_rate": False,
    "train.warmup_steps": False,
    "train.ema_decay": False,
    "train.weight_decay": False,
    "train.grad_clip": True,
    "train.sample_every": False,
    "train.stop_after": False,
    "diffusion.min_snr_gamma": False,
    "diffusion.vlb_weight": False,
    "sample.num_steps": False,
    "sample.num_samples": False,
    "sample.eta": False,
    "sample.guidance": False,
}


def _check_numbers(config: ml_collections.ConfigDict) -> None:
    """Each numeric field present is a finite real number (or None where that means off), so
    the range checks that follow compare numbers; a None used to fail after training."""
    for key, none_ok in _NUMERIC_FIELDS.items():
        section, name = key.split(".")
        if name not in config[section]:
            continue
        value = config[section][name]
        if value is None and none_ok:
            continue
        number = not isinstance(value, bool) and isinstance(value, int | float | np.number)
        if not number or not math.isfinite(value):
            allowed = "a finite number" + (" or None" if none_ok else "")
            raise ValueError(f"{key} must be {allowed}; got {value!r}")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Validates the choices of a config before any data is read or any model is built."""
    _check_numbers(config)
    # PRNGKey keeps the low 32 bits (2**32 would be seed 0 again); the data order takes >= 0
    check_int("seed", config.seed, 0, 2**32 - 1)
    d = config.diffusion
    jd.diffusion.check_prediction(d.prediction)
    jd.diffusion.check_variance(d.variance)
    if d.loss_type not in jd.losses.LOSS_TYPES:
        raise ValueError(f"diffusion.loss_type must be one of 'l2', 'l1'; got {d.loss_type!r}")
    if d.weighting not in jd.losses.WEIGHTINGS:
        raise ValueError(
            f"diffusion.weighting must be one of {jd.losses.WEIGHTINGS}; got {d.weighting!r}"
        )
    if config.model.name not in ("unet", "mlp"):
        raise ValueError(f"model.name must be one of 'unet', 'mlp'; got {config.model.name!r}")
    if config.sample.sampler not in ("ddpm", "ddim", "dpm++"):
        raise ValueError(
            f"sample.sampler must be one of 'ddpm', 'ddim', 'dpm++'; got {config.sample.sampler!r}"
        )
    for key in ("num_steps", "batch_size", "log_every", "checkpoint_every", "max_bad_steps"):
        if not config.train[key] >= 1:
            raise ValueError(f"train.{key} must be >= 1; got {config.train[key]!r}")
    chunks = config.train.get("microbatches", 1)
    if not (isinstance(chunks, int) and chunks >= 1 and config.train.batch_size % chunks == 0):
        raise ValueError(
            f"train.microbatches must be a positive integer dividing train.batch_size="
            f"{config.train.batch_size}; got {chunks!r}"
        )
    tc, m, s = config.train, config.model, config.sample
    if tc.lr_schedule not in ("cosine", "constant"):
        raise ValueError(
            f"train.lr_schedule must be one of 'cosine', 'constant'; got {tc.lr_schedule!r}"
        )
    if not tc.learning_rate > 0:
        raise ValueError(f"train.learning_rate must be > 0; got {tc.learning_rate!r}")
    if not 0 <= tc.warmup_steps <= tc.num_steps:
        raise ValueError(
            f"train.warmup_steps must lie in [0, train.num_steps={tc.num_steps}]; "
            f"got {tc.warmup_steps!r}"
        )
    if not 0.0 <= tc.ema_decay <= 1.0:
        raise ValueError(f"train.ema_decay must lie in [0, 1]; got {tc.ema_decay!r}")
    keep = tc.get("keep_checkpoints", None)
    if keep is not None and not keep >= 1:
        raise ValueError(f"train.keep_checkpoints must be >= 1 or None (keep all); got {keep!r}")
    for key in ("sample_every", "stop_after"):
        if not tc.get(key, 0) >= 0:
            raise ValueError(f"train.{key} must be >= 0 (0: off); got {tc[key]!r}")
    if m.get("dtype", "float32") not in ("float32", "bfloat16", "float16"):
        raise ValueError(
            f"model.dtype must be one of 'float32', 'bfloat16', 'float16'; got {m.dtype!r}"
        )
    if not 0.0 <= m.get("dropout", 0.0) < 1.0:
        raise ValueError(f"model.dropout must lie in [0, 1); got {m.dropout!r}")
    if not 0.0 <= m.get("class_dropout", 0.0) <= 1.0:
        raise ValueError(f"model.class_dropout must lie in [0, 1]; got {m.class_dropout!r}")
    check_int("model.num_classes", m.get("num_classes", None), 1, none_ok=True)
    num_timesteps = check_int("diffusion.num_timesteps", config.diffusion.num_timesteps, 1)
    # dpm++ takes n + 1 distinct grid points in [0, T - 1]
    most = num_timesteps - 1 if s.sampler == "dpm++" else num_timesteps
    if s.sampler != "ddpm" and not 1 <= s.num_steps <= most:
        bound = "diffusion.num_timesteps - 1" if s.sampler == "dpm++" else "diffusion.num_timesteps"
        raise ValueError(
            f"sample.num_steps must lie in [1, {bound}={most}] for "
            f"sample.sampler={s.sampler!r}; got {s.num_steps!r}"
        )
    if d.get("zero_terminal_snr", False) and d.prediction == "eps":
        raise ValueError(
            "diffusion.zero_terminal_snr=True needs diffusion.prediction 'v' or 'x0': an eps "
            "model cannot give x0 at the last step, where alphas_cumprod is 0 (Lin et al. 2024)"
        )
    if s.get("spacing", "leading") not in samplers.SPACINGS:
        raise ValueError(f"sample.spacing must be one of {samplers.SPACINGS}; got {s.spacing!r}")
    _warn_if_zero_snr_skipped(config, s.sampler, s.get("spacing", "leading"))
    if not s.num_samples >= 1:
        raise ValueError(f"sample.num_samples must be >= 1; got {s.num_samples!r}")
    if not s.get("eta", 0.0) >= 0:
        raise ValueError(f"sample.eta must be >= 0; got {s.eta!r}")
    if not isinstance(config.data.get("random_flip", False), bool):
        raise ValueError(f"data.random_flip must be True or False; got {config.data.random_flip!r}")
    if not isinstance(s.get("clip_denoised", False), bool):
        raise ValueError(f"sample.clip_denoised must be True or False; got {s.clip_denoised!r}")
    # a negative clip norm flips the gradient (optax scales by clip / norm): gradient ascent
    if tc.get("grad_clip", None) is not None and not tc.grad_clip > 0:
        raise ValueError(f"train.grad_clip must be > 0 or None (off); got {tc.grad_clip!r}")
    if not tc.get("weight_decay", 0.0) >= 0:
        raise ValueError(f"train.weight_decay must be >= 0; got {tc.weight_decay!r}")
    if not d.get("min_snr_gamma", 5.0) > 0:
        raise ValueError(f"diffusion.min_snr_gamma must be > 0; got {d.min_snr_gamma!r}")
    if not d.get("vlb_weight", 0.0) >= 0:
        raise ValueError(f"diffusion.vlb_weight must be >= 0; got {d.vlb_weight!r}")


def _warn_if_zero_snr_skipped(config: ml_collections.ConfigDict, sampler: str, spacing: str):
    """Warns where a zero-terminal-SNR model is sampled by ddim with 'leading' spacing, which
    starts below t = T - 1: x_T ~ N(0, I) is then not what the model saw at the first step, the
    mismatch zero_terminal_snr exists to remove (Lin et al. 2024, section 3.3). One warning per
    process (Python's default filter shows a warning once per location, and this is the one)."""
    zero_snr = config.diffusion.get("zero_terminal_snr", False)
    if zero_snr and sampler == "ddim" and spacing == "leading":
        warnings.warn(
            "diffusion.zero_terminal_snr=True is sampled by ddim with spacing 'leading', which "
            "starts below t = T - 1 and so never uses the zero-SNR step; use spacing 'trailing' "
            "(Lin et al. 2024, section 3.3)",
            UserWarning,
            stacklevel=1,
        )


@contextlib.contextmanager
def _named_after(section: ml_collections.ConfigDict, prefix: str):
    """A ValueError whose message starts with a field of `section` ('num_heads must ...', as
    the network or the data loader name it) gets the config's name for it: 'model.num_heads
    must ...'."""
    try:
        yield
    except ValueError as err:
        if str(err).split(" ", 1)[0] in section:
            raise ValueError(f"{prefix}.{err}") from err
        raise


def check_model_fits_data(config: ml_collections.ConfigDict, shape: tuple[int, ...]) -> None:
    """The UNet takes images [H, W, C], the MLP vectors [D], data.random_flip images; ValueError
    naming model.name (or data.random_flip) and data.name otherwise (the network's own error
    names only the rank of its input)."""
    wants = {"unet": (3, "images [H, W, C]", "mlp"), "mlp": (1, "vectors [D]", "unet")}
    rank, what, other = wants[config.model.name]
    if len(shape) != rank:
        raise ValueError(
            f"model.name={config.model.name!r} takes {what}; data.name={config.data.name!r} "
            f"gives examples of shape {list(shape)}: use model.name={other!r}"
        )
    if config.data.get("random_flip", False) and len(shape) != 3:
        raise ValueError(
            f"data.random_flip=True mirrors images [H, W, C]; data.name={config.data.name!r} "
            f"gives examples of shape {list(shape)}"
        )


def check_num_classes(config: ml_collections.ConfigDict, data_num_classes: int) -> None:
    """model.num_classes must be None (unconditional) or the dataset's class count.

    Labels index the class embedding, whose row num_classes is the null label of guidance: a
    smaller num_classes would train some class as the null label or index past the table.
    data_num_classes: `DatasetInfo.num_classes`, 0 for a dataset without labels.
    """
    num_classes = config.model.get("num_classes", None)
    if num_classes is None or num_classes == data_num_classes:
        return
    if not data_num_classes:
        raise ValueError(
            f"model.num_classes={num_classes} but data.name={config.data.name!r} has no labels; "
            "set model.num_classes=None"
        )
    raise ValueError(
        f"model.num_classes={num_classes} does not match data.name={config.data.name!r}, which "
        f"has {data_num_classes} classes; set model.num_classes={data_num_classes} (or None "
        "for an unconditional model)"
    )


# what the network's output means: a resume that changes one would go on training (and
# sampling) the weights as another kind of model
_MEANING_FIELDS = (
    "model.name",
    "diffusion.prediction",
    "diffusion.variance",
    "diffusion.schedule",
    "diffusion.num_timesteps",
    "diffusion.zero_terminal_snr",
)


def _check_resume_keeps_the_meaning(config: ml_collections.ConfigDict, workdir) -> None:
    """ValueError naming each field of `_MEANING_FIELDS` whose value differs from the one in
    the run's config.json (a run without one is not checked)."""
    if not (epath.Path(workdir) / "config.json").exists():
        return
    saved = load_run_config(workdir)
    diffs = []
    for key in _MEANING_FIELDS:
        section, name = key.split(".")
        if name not in saved.get(section, {}):  # written before the field existed
            continue
        was, now = saved[section][name], config[section].get(name)
        if was != now:
            diffs.append(f"{key}={now!r} (the run has {was!r})")
    if diffs:
        raise ValueError(
            f"cannot resume the run in {workdir} with {', '.join(diffs)}: these fields set what "
            "the network predicts; keep the run's values (its config.json) or use a new workdir"
        )


def _last_good(ckpt: CheckpointManager) -> str:
    """The TrainingDiverged message's last sentence: where the last good checkpoint is."""
    step = ckpt.latest_step()
    if step is None:
        return f"No checkpoint had been written to {ckpt.directory} yet."
    return f"The last good checkpoint in {ckpt.directory} is intact (step {step})."


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike
) -> dict[str, Any]:
    """Trains from config, resuming from the latest checkpoint in `workdir` if there is one.

    Writes `workdir/config.json` (the config as `config.to_json(indent=2)`), `data_info.json`,
    `checkpoints/`, `metrics.jsonl`, `tensorboard/` and `samples/step_*.png`, so `load_run` and
    `jax-diffusion sample` / `evaluate` work on any run, whether started from the CLI or from
    Python. The files written here go through `etils.epath`, checkpoints through orbax and
    events through tensorboardX, which all handle URIs, so `workdir` may be a local path or a
    bucket such as gs://bucket/run.

    config.json and data_info.json describe the checkpoints: they are (re)written on every call,
    by process 0, only once the state is known to match them (after a resume's restore), so
    resuming with more steps records the new config, while a resume with an incompatible model
    (other array shapes, or another model.name, diffusion.prediction, variance, schedule,
    num_timesteps or zero_terminal_snr than config.json's), another batch size that cannot
    continue the data order, or a train.num_steps below the checkpoint's step fails and leaves
    them as they were.

    metrics.jsonl holds one strict-JSON line per log interval (window means; a mean made
    non-finite by skipped steps is null). Each checkpoint's data item holds, besides the data
    iterator's state, the metrics of the steps not logged yet (key 'log_window'), so a run
    resumed inside a log interval writes the lines an uninterrupted one does; every sample
    grid is written before its step's checkpoint. Rerunning a finished run writes its final
    sample grid again (the same images), so a run killed after its last checkpoint still gets
    one.

    Args:
      config: the full config (sections data, model, diffusion, train, sample).
      workdir: the run directory: a local path or a URI `etils.epath` and orbax understand.

    Returns:
      summary dict: "start_step", "final_step", "final_loss" (the mean loss of the last log
      interval, of this call or an earlier one; None if nothing was ever logged),
      "skipped_steps" (of the whole run), "seconds", "steps_per_sec" and "images_per_sec" (of
      this call, compilation included), "samples" (the path of the last sample grid, or None)
      and "state" (the final TrainState).

    Raises:
      ValueError: on a bad config value (`check_config`) or a model.num_classes that does not
        match the data's labels, before the workdir is created.
      TrainingDiverged: after train.max_bad_steps consecutive non-finite steps (no checkpoint is
        written for them: the last good one stays the latest).
    """
    check_config(config)
    if epath.Path(workdir).exists() and not epath.Path(workdir).is_dir():
        raise ValueError(f"workdir must be a directory (or a new path); {workdir!r} is a file")
    tc = config.train
    if tc.batch_size % jax.device_count():
        raise ValueError(
            f"train.batch_size must be divisible by the device count {jax.device_count()}; "
            f"got {tc.batch_size}"
        )
    config_json = config.to_json(indent=2)  # a config JSON cannot represent fails before any I/O
    mesh = make_mesh()
    with _named_after(config.data, "data"):
        data_it, info = data_lib.get_dataset(
            config.data, global_batch_size=tc.batch_size, seed=config.seed
        )
    example_shape = tuple(info.shape)
    check_num_classes(config, info.num_classes)
    check_model_fits_data(config, example_shape)
    schedule = get_schedule(config.diffusion)  # validates the diffusion section
    model = create_model(config, channels=example_shape[-1])
    rng = jax.random.PRNGKey(config.seed)
    with _named_after(config.model, "model"):
        state = create_train_state(config, model, rng, example_shape)  # the model's own checks
    replicated = NamedSharding(mesh, P())
    state = jax.device_put(state, replicated)
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = CheckpointManager(os.fspath(workdir), max_to_keep=tc.keep_checkpoints)
    restored_window: list[dict] = []
    if ckpt.latest_step() is not None:
        _check_resume_keeps_the_meaning(config, workdir)
        state, data_state = ckpt.restore(state)
        data_state = dict(data_state)
        restored_window = _window_from_json(data_state.pop(_WINDOW_KEY, None))
        try:
            data_it.set_state(data_state)
        except ValueError as err:
            raise ValueError(
                f"train.batch_size={tc.batch_size} cannot continue the data order of the "
                f"checkpoint in {ckpt.directory} ({err}); resume with the batch size the run "
                "was trained with (its config.json)"
            ) from err
        step = int(jax.device_get(state.step))
        if step > tc.num_steps:
            raise ValueError(
                f"the run in {workdir} is at step {step}, past train.num_steps={tc.num_steps}; "
                f"pass train.num_steps >= {step} (or a new workdir)"
            )
        log.info("resumed from step %d", step)
    if jax.process_index() == 0:
        _write_text_atomically(workdir / "config.json", config_json)
        data_info = {"shape": list(example_shape), "num_classes": info.num_classes}
        _write_text_atomically(workdir / "data_info.json", json.dumps(data_info))
    step_fn, batch_sharding = _jit_train_step(make_train_step(config, schedule), mesh, state)
    start = int(jax.device_get(state.step))
    writer = _Writer(workdir, start=start)
    sample_rng = jax.random.fold_in(rng, 2**31 - 1)
    summary: dict[str, Any] = {"start_step": start}
    last_sample = None

    def write_samples(step: int) -> str:
        images = sample(
            config,
            model,
            state.ema_params,
            schedule,
            jax.random.fold_in(sample_rng, step),
            shape=example_shape,
            num=config.sample.num_samples,
            mesh=mesh,  # each device draws its part of the grid
        )
        path = os.fspath(workdir / "samples" / f"step_{step:07d}.png")
        if jax.process_index() == 0:
            _save_samples(np.asarray(jax.device_get(images)), path)
        return path

    from tqdm.auto import tqdm

    bar = tqdm(
        total=tc.num_steps,
        initial=start,
        desc="train",
        disable=jax.process_index() != 0,
        dynamic_ncols=True,
    )
    # the steps since the last log line, those before the resumed checkpoint included (it
    # holds them), so a resumed run logs the same window means as an uninterrupted one
    window: list[dict] = restored_window
    new_in_window = 0  # the steps of `window` run in this call, for the rates
    t_window = time.perf_counter()
    t_start, steps_done = time.perf_counter(), 0
    prev_bad = None
    try:
        for step in range(start, tc.num_steps):
            local = next(data_it)
            batch = {
                k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
                for k, v in local.items()
                if k in ("image", "label")
            }
            state, metrics = step_fn(state, batch)
            # the previous step's counter is read now, so the host never waits on this step
            if prev_bad is not None and int(prev_bad) >= tc.max_bad_steps:
                raise TrainingDiverged(
                    f"{int(prev_bad)} consecutive steps had a non-finite loss or gradient "
                    f"(train.max_bad_steps={tc.max_bad_steps}) at step {step}; stopping. "
                    + _last_good(ckpt)
                )
            prev_bad = metrics.pop("bad_steps")  # not donated, unlike the state's own counter
            window.append(metrics)
            new_in_window += 1
            steps_done += 1
            done = step + 1
            if done % tc.log_every == 0 or done == tc.num_steps:
                host = jax.device_get(window)
                dt = time.perf_counter() - t_window
                scalars = {
                    k: float(np.mean([m[k] for m in host])) for k in host[0] if k != "skipped"
                }
                scalars["skipped"] = float(np.sum([m["skipped"] for m in host]))
                scalars["steps_per_sec"] = new_in_window / dt
                scalars["images_per_sec"] = new_in_window * tc.batch_size / dt
                writer.write(done, scalars)
                bar.set_postfix(
                    loss=f"{scalars['loss']:.4f}", img_s=f"{scalars['images_per_sec']:.0f}"
                )
                summary["final_loss"] = scalars["loss"]
                window, new_in_window, t_window = [], 0, time.perf_counter()
            bar.update(1)
            # stops at stop_after, once: a rerun of the same command continues past it
            stop_now = done == tc.get("stop_after", 0) < tc.num_steps
            last = done == tc.num_steps or stop_now
            # the grid before the checkpoint: a run killed between them would otherwise resume
            # after this step and never write its grid
            if done == tc.num_steps or (tc.sample_every and done % tc.sample_every == 0):
                last_sample = write_samples(done)
            if done % tc.checkpoint_every == 0 or last:
                # Periodic checkpoints only after a good step, never inside a non-finite streak.
                # The last one also after a skipped step (skipped steps leave params, EMA and
                # optimizer state as they were), unless the streak ends the run.
                bad = int(state.bad_steps)
                if bad == 0 or (last and bad < tc.max_bad_steps):
                    writer.sync()
                    data_state = {**data_it.get_state(), _WINDOW_KEY: _window_to_json(window)}
                    ckpt.save(state, data_state, force=True)
            if stop_now:
                break
        if start >= tc.num_steps:
            # a rerun of a finished run: the final grid is written again (the same images: the
            # same EMA params and key), as a run killed between its last checkpoint and its
            # grid would otherwise never have one
            last_sample = write_samples(start)
        if "final_loss" not in summary:  # nothing logged in this call
            summary["final_loss"] = _from_process_0(
                None if writer.last is None else writer.last["loss"]
            )
        if prev_bad is not None and int(prev_bad) >= tc.max_bad_steps:
            raise TrainingDiverged(
                f"{int(prev_bad)} consecutive non-finite steps at the end of training. "
                + _last_good(ckpt)
            )
    finally:
        bar.close()
        writer.close()
        ckpt.close()
    elapsed = time.perf_counter() - t_start
    summary.update(
        final_step=int(jax.device_get(state.step)),
        skipped_steps=int(jax.device_get(state.skipped_steps)),
        seconds=elapsed,
        steps_per_sec=steps_done / elapsed if elapsed else 0.0,
        images_per_sec=steps_done * tc.batch_size / elapsed if elapsed else 0.0,
        samples=last_sample,
    )
    summary["state"] = state
    return summary
