"""Shared helpers of the experiment scripts: train (or reuse) a run, sample, measure, plot.

Every experiment trains with `jax_diffusion.train.train_and_evaluate` from
`experiments/configs/default.py` (or `digits_cond.py`) plus a few overrides, so compared models
differ only in the overridden fields: same network, batch, number of steps and seed (equal
training compute). A workdir whose `done.json` records the same config is reused, so a rerun
only re-evaluates.

Sample quality is measured in the shipped digits classifier's feature space
(`jax_diffusion.evaluation`): a CPU-scale stand-in for FID, not FID. `fd_train` (Frechet
distance to the 1500 train digits) is the discriminating number; `fd_test` sits near the
train/test floor `fd_train_vs_test`. Numbers are comparable only at equal sample counts.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import jax_diffusion as jd
from jax_diffusion import data as data_lib
from jax_diffusion import diffusion as diffusion_lib
from jax_diffusion import evaluation, samplers, train
from jax_diffusion.cli import _int_in, _positive_int, _seed, set_config_value

# measure() needs at least 4 samples: recall uses the samples' 3-NN radii
SAMPLE_COUNT = _int_in(4, what=" (recall's 3-NN radii need 4 samples)")


def parse_args(description: str, *, bpd_examples: int | None = 100, **defaults):
    """The common command line of the experiment scripts (an ArgumentParser); --bpd-examples
    only where the script measures bits/dim (`bpd_examples` its default, None: no flag)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--workdir", default="/tmp/exp", help="parent folder of the training runs")
    p.add_argument("--out", default="experiments/results", help="folder for <name>.json/.png")
    p.add_argument("--steps", type=_positive_int, default=None, help="train steps (2000; smoke: 2)")
    p.add_argument("--num-samples", type=SAMPLE_COUNT, default=defaults.get("num_samples", 1000))
    if bpd_examples is not None:
        p.add_argument(
            "--bpd-examples",
            type=_int_in(2, what=" (the bound's standard error needs 2)"),
            default=bpd_examples,
            help="test digits for bits/dim",
        )
    p.add_argument("--seed", type=_seed, default=0, help="sampling / evaluation seed")
    p.add_argument("--smoke", action="store_true", help="tiny model and counts (tests)")
    return p


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parses argv; --steps defaults to 2000, or 2 with --smoke."""
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 2 if args.smoke else 2000
    return args


def setup_compile_cache() -> None:
    """Uses JAX's persistent compilation cache (the tests' one unless one is configured)."""
    if jax.config.jax_compilation_cache_dir:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    default = os.path.join(os.path.dirname(here), ".jax_cache")
    jax.config.update("jax_compilation_cache_dir", os.environ.get("JAX_EXP_CACHE", default))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# ------------------------------------------------------------------------------- training


def make_config(
    overrides: dict[str, Any], *, steps: int, smoke: bool, conditional: bool = False
) -> ml_collections.ConfigDict:
    """default.py (or digits_cond.py) with `train.num_steps = steps` and dotted overrides."""
    from experiments.configs import default, digits_cond

    module = digits_cond if conditional else default
    # smoke: the config's own smoke variant (T = 50), so the smoke runs' programs are the ones
    # the training tests compile (the test suite's persistent compilation cache holds them)
    config = module.get_config("smoke" if smoke else None)
    config.train.num_steps = steps
    config.train.checkpoint_every = steps  # one checkpoint at the end: less I/O
    config.train.log_every = max(1, min(100, steps))
    config.train.warmup_steps = min(config.train.warmup_steps, max(1, steps // 2))
    for key, value in overrides.items():
        set_config_value(config, key, value)
    return config


def train_run(workdir: str, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Trains `config` in `workdir`, or reuses the run if `done.json` records the same config.

    A workdir holding a run of another config (finished, or killed before `done.json`) is an
    error: training there would resume that run's checkpoint under this config.

    Returns:
      {"workdir", "train_seconds", "final_loss", "steps", "reused"}. A workdir whose run had
      already reached its steps without `done.json` (killed after the last checkpoint) is
      restored, not trained: "reused" is True and "train_seconds" None (not measured), rather
      than the seconds of the restore.
    """
    done_path = os.path.join(workdir, "done.json")
    cfg = json.loads(config.to_json())
    if os.path.exists(done_path):
        with open(done_path) as f:
            done = json.load(f)
        if done.get("config") == cfg:
            return {**{k: v for k, v in done.items() if k != "config"}, "reused": True}
    config_path = os.path.join(workdir, "config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            if json.load(f) != cfg:
                raise ValueError(
                    f"{workdir} holds a run of a different config (other --steps or settings); "
                    "pass another --workdir or delete it"
                )
    summary = train_and_evaluate_quiet(config, workdir)  # it writes config.json itself
    # the seconds of this call time the training only if it trained every step
    trained_all = summary["start_step"] == 0
    done = {
        "workdir": os.path.abspath(workdir),
        "train_seconds": summary["seconds"] if trained_all else None,
        "final_loss": summary.get("final_loss"),
        "steps": summary["final_step"],
        "config": cfg,
    }
    with open(done_path, "w") as f:
        json.dump(done, f, indent=2)
    reused = summary["start_step"] == summary["final_step"]
    return {**{k: v for k, v in done.items() if k != "config"}, "reused": reused}


def train_and_evaluate_quiet(config, workdir):
    summary = train.train_and_evaluate(config, workdir)
    summary.pop("state", None)
    return summary


@dataclass
class Run:
    """A trained run: config, example shape, network, EMA params and schedule."""

    config: ml_collections.ConfigDict
    shape: tuple[int, ...]
    model: Any
    params: Any
    schedule: jd.Schedule
    step: int

    @property
    def num_classes(self) -> int | None:
        return self.config.model.get("num_classes", None)

    def apply(self, params, x, t, y=None, method=None):
        """The network output (or that of its `method`, e.g. a flow model's 'velocity'); a
        conditional model without labels gets the null label."""
        if self.num_classes is not None and y is None:
            y = jnp.full((x.shape[0],), self.num_classes, jnp.int32)
        return self.model.apply({"params": params}, x, t, y, method=method)


def run_dir(workdir: str, name: str, smoke: bool) -> str:
    """The training workdir of model `name` under the experiments' parent folder."""
    return os.path.join(workdir, f"{name}_smoke" if smoke else name)


def load(workdir: str) -> Run:
    config, shape, model, params, step = train.load_run(workdir)
    return Run(config, shape, model, params, train.get_schedule(config.diffusion), step)


# ------------------------------------------------------------------------------- sampling


_SAMPLERS: dict = {}
_DRAWN: dict = {}
_BPD: dict = {}


def _sampler_fn(run: Run, key: tuple):
    if (id(run), key) in _SAMPLERS:
        return _SAMPLERS[id(run), key]
    sampler, num_steps, eta, variance, guided, rescale = key
    d, s = run.config.diffusion, run.config.sample
    T = run.schedule.num_timesteps
    common = dict(prediction=d.prediction, variance=variance, clip_denoised=s.clip_denoised)

    def fn(params, x_T, rng, labels, w):
        if guided:
            model_fn = samplers.classifier_free_guidance(
                lambda x, t, y: run.apply(params, x, t, y),
                w,
                run.num_classes,
                y=labels,
                variance=d.variance,
                **({"guidance_rescale": rescale} if rescale else {}),
            )
        else:

            def model_fn(x, t):
                return run.apply(params, x, t, labels)

        if sampler == "ddpm":
            ts = None if num_steps >= T else samplers.sampling_timesteps(T, num_steps, "trailing")
            return samplers.ddpm_sample(model_fn, run.schedule, x_T, rng, timesteps=ts, **common)
        if sampler == "ddim":
            return samplers.ddim_sample(
                model_fn,
                run.schedule,
                x_T,
                rng,
                num_steps=num_steps,
                eta=eta,
                spacing="trailing",
                **common,
            )
        steps = min(num_steps, T - 1)  # DPM-Solver++ grids need n + 1 distinct points
        return samplers.dpm_solver_pp_sample(model_fn, run.schedule, x_T, num_steps=steps, **common)

    _SAMPLERS[id(run), key] = jax.jit(fn)
    return _SAMPLERS[id(run), key]


def draw_samples(
    run: Run,
    *,
    num: int,
    sampler: str = "ddim",
    num_steps: int = 50,
    eta: float = 0.0,
    variance: str | None = None,
    guidance: float | None = None,
    guidance_rescale: float = 0.0,
    labels: np.ndarray | None = None,
    seed: int = 0,
    batch_size: int = 500,
) -> tuple[np.ndarray, float]:
    """Draws `num` samples [num, *shape] from the EMA params; returns (samples, seconds).

    sampler: 'ddpm' (ancestral; num_steps < T respaces to `sampling_timesteps(T, n,
    'trailing')`, Nichol & Dhariwal 2021 section 4), 'ddim' (trailing spacing, `eta`) or 'dpm++'
    (DPM-Solver++(2M), at most T - 1 steps). variance overrides the config's sigma_t^2 choice
    ('fixed_small' = beta_tilde, 'fixed_large' = beta). Conditional models use `labels`
    (default arange % classes) and classifier-free guidance w (`guidance`, default 1), its
    output rescaled by `guidance_rescale` phi (Lin et al. 2024; 0: plain guidance).
    Batch i draws x_T and its noise from fold_in(PRNGKey(seed), i).
    """
    variance = variance or run.config.diffusion.variance
    guided = run.num_classes is not None
    num_steps = min(num_steps, run.schedule.num_timesteps)  # smoke schedules are short
    memo_key = (id(run), sampler, num_steps, eta, variance, guidance, guidance_rescale)
    memo_key += (num, seed, batch_size)
    if labels is None and memo_key in _DRAWN:  # the same draw again: same samples
        return _DRAWN[memo_key]
    if guided and labels is None:
        labels = np.arange(num) % run.num_classes
    rescale = float(guidance_rescale) if guided else 0.0
    fn = _sampler_fn(run, (sampler, int(num_steps), float(eta), variance, guided, rescale))
    bs = min(batch_size, num)
    w = jnp.asarray(1.0 if guidance is None else guidance, jnp.float32)
    rng = jax.random.PRNGKey(seed)
    chunks, t0 = [], time.perf_counter()
    for i in range(-(-num // bs)):
        x_rng, s_rng = jax.random.split(jax.random.fold_in(rng, i))
        x_T = jax.random.normal(x_rng, (bs, *run.shape))
        y = None
        if guided:
            y = np.resize(labels[i * bs : (i + 1) * bs], bs)  # the last batch is padded
            y = jnp.asarray(y, jnp.int32)
        chunks.append(np.asarray(jax.device_get(fn(run.params, x_T, s_rng, y, w))))
    samples = np.concatenate(chunks)[:num]
    seconds = time.perf_counter() - t0
    if not np.isfinite(samples).all():
        raise FloatingPointError(f"{sampler} x {num_steps}: some samples are not finite")
    if labels is None or not guided:
        _DRAWN[memo_key] = (samples, seconds)
    return samples, seconds


def draw_batches(fn, run: Run, *, num: int, seed: int, batch_size: int = 500):
    """`num` samples of `fn(x_T, rng)` drawn `batch_size` at a time, x_T and rng per batch as
    `draw_samples` draws them (batch i from fold_in(PRNGKey(seed), i)), so samplers outside
    `draw_samples` start from the same noise; returns (samples, seconds)."""
    bs = min(batch_size, num)
    chunks, t0 = [], time.perf_counter()
    for i in range(-(-num // bs)):
        x_rng, s_rng = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), i))
        x_T = jax.random.normal(x_rng, (bs, *run.shape))
        chunks.append(np.asarray(jax.device_get(fn(x_T, s_rng))))
    return np.concatenate(chunks)[:num], time.perf_counter() - t0


# ------------------------------------------------------------------------------- metrics


@functools.cache
def _reference(image_size: int):
    train_x, train_y = data_lib.load_digits(image_size, "train")
    test_x, test_y = data_lib.load_digits(image_size, "test")
    tr = evaluation.digits_features(train_x)
    te = evaluation.digits_features(test_x)
    return {
        "train": evaluation.FeatureStats.from_features(tr),
        "test": evaluation.FeatureStats.from_features(te),
        "train_feats": tr,
        "train_labels": train_y,
        "test_feats": te,
        "test_images": test_x,
    }


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def within_class_variance(features: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes of the trace of the features' within-class covariance (diversity)."""
    traces = [
        float(np.trace(np.cov(features[labels == c], rowvar=False)))
        for c in np.unique(labels)
        if (labels == c).sum() > 1
    ]
    return float(np.mean(traces))


def measure(samples: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
    """Quality metrics of digit samples in the shipped classifier's feature space.

    Returns fd_train, fd_test (Frechet distances to the train / test digits' features),
    precision and recall (k = 3, against the test digits, as `evaluate_workdir`), the inception
    score and, with the labels the samples were drawn for, class_accuracy (the classifier's
    argmax equals the label) and within_class_var (mean trace of the per-intended-class feature
    covariance; real digits: see `reference_within_class_var`).
    """
    ref = _reference(samples.shape[1])
    x = np.clip(samples, -1.0, 1.0)
    feats = evaluation.digits_features(x)
    logits = evaluation.digits_logits(x)
    stats = evaluation.FeatureStats.from_features(feats)
    pr = evaluation.precision_recall(ref["test_feats"], feats, k=3)
    out = {
        "fd_train": evaluation.frechet_distance(
            stats.mean, stats.cov, ref["train"].mean, ref["train"].cov
        ),
        "fd_test": evaluation.frechet_distance(
            stats.mean, stats.cov, ref["test"].mean, ref["test"].cov
        ),
        "precision": pr.precision,
        "recall": pr.recall,
        "inception_score": evaluation.inception_score(_softmax(logits)),
    }
    if labels is not None:
        labels = np.asarray(labels)[: len(samples)]
        out["class_accuracy"] = float(np.mean(logits.argmax(axis=1) == labels))
        out["within_class_var"] = within_class_variance(feats, labels)
    return out


def reference_metrics(image_size: int) -> dict[str, float]:
    """The floors of the metrics: train vs test digits."""
    ref = _reference(image_size)
    tr, te = ref["train"], ref["test"]
    return {
        "fd_train_vs_test": evaluation.frechet_distance(tr.mean, tr.cov, te.mean, te.cov),
        "within_class_var_train": within_class_variance(ref["train_feats"], ref["train_labels"]),
    }


def bits_per_dim(
    run: Run, *, num_examples: int, seed: int = 0, variance: str | None = None
) -> dict[str, Any]:
    """evaluation.bits_per_dim of the first `num_examples` test digits (null label if cond.)."""
    d = run.config.diffusion
    variance = variance or d.variance
    key = (id(run), num_examples, seed, variance)
    if key in _BPD:  # the same evaluation again (same noise): same numbers
        return dict(_BPD[key])
    images = _reference(run.shape[0])["test_images"][:num_examples]
    out = evaluation.bits_per_dim(
        run.schedule,
        lambda x, t: run.apply(run.params, x, t),
        images,
        jax.random.fold_in(jax.random.PRNGKey(seed), 2**31 - 1),
        batch_size=len(images),
        prediction=d.prediction,
        variance=variance,
        progress=False,
    )
    _BPD[key] = {
        "bpd": out["total_bpd"],
        "bpd_stderr": out["total_bpd_stderr"],
        "bpd_prior": out["prior_bpd"],
        "bpd_kl": out["kl_bpd"],
        "bpd_decoder": out["decoder_bpd"],
        "bpd_examples": out["num_examples"],
    }
    return dict(_BPD[key])


def ode_bits_per_dim(
    run: Run, *, num_examples: int, seed: int = 0, num_steps: int | None = None
) -> tuple[dict[str, Any], np.ndarray]:
    """The exact bits/dim by the probability-flow ODE of the first `num_examples` test digits
    (uniformly dequantized, one Rademacher probe per digit, null label if cond.), with the key
    fold_in(PRNGKey(seed), 2**31 - 1): every model sees the same noise and probes, so the
    per-digit values of two models pair up. A flow run: `flow_bits_per_dim` of its velocity
    (num_steps Heun steps, None: 32); any other: `ode_bits_per_dim` of its denoiser (num_steps
    rho-spaced steps, None: 128). Returns (mean, standard error and count; per-digit [N])."""
    images = _reference(run.shape[0])["test_images"][:num_examples]
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), 2**31 - 1)
    d = run.config.diffusion
    if d.get("process", "ddpm") == "flow":

        def velocity(x, t):
            return run.apply(run.params, x, t, method="velocity")

        steps = 32 if num_steps is None else num_steps
        fn = lambda x, k: jd.flow_bits_per_dim(velocity, x, k, num_steps=steps)  # noqa: E731
    else:
        kw = dict(prediction=d.prediction, variance=d.variance, num_steps=num_steps)
        model_fn = lambda x, t: run.apply(run.params, x, t)  # noqa: E731
        fn = lambda x, k: jd.ode_bits_per_dim(model_fn, run.schedule, x, k, **kw)  # noqa: E731
    bpd = np.asarray(jax.jit(fn)(images, rng), np.float64)
    summary = {
        "ode_bpd": float(bpd.mean()),
        "ode_bpd_stderr": float(bpd.std(ddof=1) / np.sqrt(len(bpd))),
        "ode_bpd_examples": len(bpd),
    }
    return summary, bpd


def loss_by_t_bucket(
    run: Run, *, num_buckets: int = 10, draws: int = 4, seed: int = 0
) -> dict[str, list[float]]:
    """Per-t-bucket denoising errors of the EMA model on the test digits.

    Bucket b holds t in [b T / n, (b + 1) T / n); each test digit gets `draws` t uniform in the
    bucket and fresh noise. Reports per bucket the mean squared error in the model's own
    parameterization ('own', what L_simple minimises) and converted to eps-MSE and x0-MSE (via
    `predict_x0_eps`, unclipped) so that eps, x0 and v models compare on one scale.
    """
    images = jnp.asarray(_reference(run.shape[0])["test_images"])
    d = run.config.diffusion
    T = run.schedule.num_timesteps
    edges = np.linspace(0, T, num_buckets + 1).round().astype(int)

    lows = jnp.asarray(np.repeat(edges[:-1], draws), jnp.int32)
    highs = jnp.asarray(np.repeat(edges[1:], draws), jnp.int32)

    @jax.jit
    def all_errors(params, rng):
        def errors(args):
            i, lo, hi = args  # draw i of bucket i // draws
            t_rng, n_rng = jax.random.split(jax.random.fold_in(rng, i))
            t = jax.random.randint(t_rng, (len(images),), lo, hi, jnp.int32)
            noise = jax.random.normal(n_rng, images.shape)
            xt = diffusion_lib.q_sample(run.schedule, x0=images, t=t, noise=noise)
            out = run.apply(params, xt, t)
            pred, _ = diffusion_lib.split_learned_range(out, xt, d.variance)
            target = diffusion_lib.training_target(
                run.schedule, x0=images, eps=noise, t=t, prediction=d.prediction
            )
            x0_hat, eps_hat = diffusion_lib.predict_x0_eps(
                run.schedule, model_output=pred, xt=xt, t=t, prediction=d.prediction
            )
            mse = lambda a, b: jnp.mean(jnp.square(a - b))  # noqa: E731
            return jnp.stack([mse(pred, target), mse(eps_hat, noise), mse(x0_hat, images)])

        index = jnp.arange(num_buckets * draws, dtype=jnp.int32)
        return jax.lax.map(errors, (index, lows, highs))  # one compiled program, one call

    per_draw = np.asarray(jax.device_get(all_errors(run.params, jax.random.PRNGKey(seed))))
    per_bucket = per_draw.astype(np.float64).reshape(num_buckets, draws, 3).mean(axis=1)
    own, eps, x0 = (per_bucket[:, j].tolist() for j in range(3))
    return {
        "bucket_edges": [int(e) for e in edges],
        "own_mse": own,
        "eps_mse": eps,
        "x0_mse": x0,
    }


# ------------------------------------------------------------------------------- output


def _finite(obj) -> bool:
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return all(_finite(v) for v in obj)
    if isinstance(obj, float | np.floating):  # numpy scalars too (json.dump's default=float)
        return math.isfinite(obj)
    return True


def write_json(out_dir: str, name: str, results: dict[str, Any]) -> str:
    """Writes `out_dir/<name>.json` (indent 2) and returns its path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2, default=float)
    if not _finite(results):
        print(f"warning: {path} holds non-finite numbers")
    return path


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sample_strips(ax, grids: dict, scales, label: str, what: str) -> None:
    """Draws one row of samples per scale on `ax`: grids[scale] [N, H, W, 1] in [-1, 1], each
    image framed in black, rows labelled `label`=scale (the guidance experiments' plots)."""
    strips = []
    for scale in scales:
        x = np.clip(grids[scale], -1, 1)[..., 0]
        strips.append(np.concatenate([np.pad(im, 1, constant_values=-1) for im in x], axis=1))
    ax.imshow(np.concatenate(strips, axis=0), cmap="gray", vmin=-1, vmax=1)
    height = strips[0].shape[0]
    ticks = [height * (i + 0.5) for i in range(len(scales))]
    ax.set_yticks(ticks, [f"{label}={v:g}" for v in scales])
    ax.set_xticks([])
    ax.set_title(f"samples (labels 0-9, 0-9) per {what}")


def image_rows(ax, rows: list[tuple[str, np.ndarray]], title: str, fontsize: int = 8) -> None:
    """Draws one labelled row per (label, images [n, H, W, 1] in [-1, 1]) on `ax`, each image
    framed in black (the editing experiments' plots)."""
    strip = np.concatenate(
        [
            np.concatenate(
                [np.pad(im, 1, constant_values=-1) for im in np.clip(x, -1, 1)[..., 0]], 1
            )
            for _, x in rows
        ],
        axis=0,
    )
    height = rows[0][1].shape[1] + 2
    ax.imshow(strip, cmap="gray", vmin=-1, vmax=1)
    ax.set_yticks([height * (i + 0.5) for i in range(len(rows))], [n for n, _ in rows])
    ax.tick_params(axis="y", labelsize=fontsize)
    ax.set_xticks([])
    ax.set_title(title)


def run_info(config: ml_collections.ConfigDict, train_info: dict[str, Any]) -> dict[str, Any]:
    """What a results JSON records about a training run."""
    return {
        **train_info,
        "prediction": config.diffusion.prediction,
        "variance": config.diffusion.variance,
        "weighting": config.diffusion.weighting,
        "num_steps": config.train.num_steps,
        "batch_size": config.train.batch_size,
        "base_channels": config.model.base_channels,
        "num_timesteps": config.diffusion.num_timesteps,
    }


def finish(out_dir: str, name: str, results: dict[str, Any], t0: float, plot) -> dict[str, Any]:
    """Records the wall time, writes `<name>.json`, draws `<name>.png` with plot(results, path)."""
    results["wall_seconds"] = time.perf_counter() - t0
    write_json(out_dir, name, results)
    plot(results, f"{out_dir}/{name}.png")
    log(f"done in {results['wall_seconds']:.0f} s")
    return results


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
