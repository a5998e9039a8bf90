"""Training: state creation, the pure train step, and the loop with checkpoints and logs.

The config checks, schedule and model builders live in `run_config`, sampling from params in
`generate`; this module re-exports their public functions (`train.check_config`,
`train.sample`, ...). `load_run` restores a workdir's config, model and EMA params.

The same code runs on one CPU, several GPUs or a TPU pod slice: `train_step` is jitted once over
a `jax.sharding.Mesh` of all devices with the batch sharded on its leading axis ('data') and the
state replicated (data parallelism by GSPMD). Across hosts call `jax.distributed.initialize()`
first; each process then feeds its own shard of the global batch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
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
from jax_diffusion.backend import _top_level, compiler_options
from jax_diffusion.checkpoints import CheckpointManager
from jax_diffusion.generate import (  # re-exported: train.sample etc. as before
    check_finite_samples,
    sample,
    sample_in_batches,
    save_sample_arrays,
    save_sample_image,
)
from jax_diffusion.models import drop_labels
from jax_diffusion.run_config import (  # re-exported: train.check_config etc. as before
    _check_resume_keeps_the_meaning,
    _named_after,
    check_config,
    check_model_fits_data,
    check_num_classes,
    check_sampling,
    create_model,
    get_schedule,
    load_run_config,
)
from jax_diffusion.train_state import TrainState, ema_decay, make_optimizer, update_ema

__all__ = [
    "TrainingDiverged",
    "check_config",
    "check_finite_samples",
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
    "save_sample_image",
    "train_and_evaluate",
]

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Raised after `train.max_bad_steps` consecutive skipped steps (a non-finite loss or
    gradient, or a loss above `train.max_loss`); checkpoints are intact."""


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh over all devices (of every process) with axis 'data'."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    return jax.sharding.Mesh(devices.reshape(-1), ("data",))


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
    or gradient is not finite, or whose loss is above config.train.max_loss (when set), leaves
    params, EMA and optimizer state untouched and is counted in `bad_steps` / `skipped_steps`.
    With diffusion.process 'flow' the loss is `flow_matching_loss` of the model's `velocity`
    method at t from `flow_time_draws`.
    """
    d, tc = config.diffusion, config.train
    num_classes = config.model.get("num_classes", None)
    class_dropout = config.model.get("class_dropout", 0.0)

    num_chunks = int(tc.get("microbatches", 1))
    max_loss = tc.get("max_loss", None)
    flip = config.data.get("random_flip", False)
    # diffusion.process 'flow': regress the velocity of a FlowDenoiser at t ~ U(0, 1) (or
    # logit-normal) on the straight path instead of a prediction at integer steps
    flow = d.get("process", "ddpm") == "flow"
    method = {"method": "velocity"} if flow else {}
    flow_times = dict(
        time_distribution=d.get("flow_time_distribution", "uniform"),
        logit_normal_loc=d.get("flow_logit_normal_loc", 0.0),
        logit_normal_scale=d.get("flow_logit_normal_scale", 1.0),
    )

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        step_rng = jax.random.fold_in(state.rng, state.step)
        loss_rng, dropout_rng, label_rng = jax.random.split(step_rng, 3)
        x0 = batch["image"]
        if flip:  # a key of its own: the other draws stay those of a run without flips
            x0 = data_lib.random_flip(jax.random.fold_in(step_rng, FLIP_KEY), x0)
        y = None
        if num_classes is not None:
            y = drop_labels(label_rng, batch["label"], class_dropout, num_classes)
        if flow:
            t_rng, noise_rng = jax.random.split(loss_rng)
            t = jd.flow_time_draws(t_rng, x0.shape[0], **flow_times)
            noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
        else:
            t, noise = jd.training_draws(schedule, x0, loss_rng)

        def loss_fn(params, x0, t, noise, y, rng):
            def model_fn(x, t):
                return state.apply_fn(
                    {"params": params}, x, t, y, train=True, rngs={"dropout": rng}, **method
                )

            if flow:
                loss, metrics = jd.flow_matching_loss(
                    model_fn, x0, None, loss_type=d.loss_type, draws=(t, noise)
                )
                return loss, {"mse": metrics["mse"]}
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
        good = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if max_loss is not None:  # a finite divergence is skipped too
            good = good & (loss <= max_loss)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay(state.step, tc.ema_decay, tc.get("ema_warmup", True))
        ema = update_ema(state.ema_params, params, decay)

        def keep_if_good(new, old):
            return jax.tree.map(lambda a, b: jnp.where(good, a, b), new, old)

        new_state = state.replace(
            step=state.step + 1,
            params=keep_if_good(params, state.params),
            ema_params=keep_if_good(ema, state.ema_params),
            opt_state=keep_if_good(opt_state, state.opt_state),
            bad_steps=jnp.where(good, 0, state.bad_steps + 1),
            skipped_steps=state.skipped_steps + jnp.where(good, 0, 1),
        )
        metrics = {
            "loss": loss,
            "mse": aux["mse"],
            "grad_norm": grad_norm,
            "skipped": 1 - good.astype(jnp.int32),
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
    """(`train_step` jitted over `mesh`, batch sharding): batch split on 'data', state
    replicated and donated, metrics replicated."""
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
            save_sample_image(np.asarray(jax.device_get(images)), path)
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
                    f"{int(prev_bad)} consecutive steps had a non-finite loss or gradient (or a "
                    f"loss above train.max_loss={tc.get('max_loss', None)}) "
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
