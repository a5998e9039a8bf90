"""A run's config: its fields checked before any work, and the schedule and model it builds.

`train.train_and_evaluate`, `generate.sample` and the command line read one ml_collections
ConfigDict (experiments/configs/, with its sections data, model, diffusion, train, sample).
The checks here turn a bad value into one ValueError naming the field before a workdir is
made or anything compiles, and say which changes a resumed run may make.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings

import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

import jax_diffusion as jd
from jax_diffusion import samplers
from jax_diffusion._checks import check_int
from jax_diffusion.models import FlowDenoiser, MLPDenoiser, UNet

__all__ = [
    "check_config",
    "check_model_fits_data",
    "check_num_classes",
    "check_sampling",
    "create_model",
    "get_schedule",
    "load_run_config",
]

PROCESSES = ("ddpm", "flow")  # diffusion.process: what the network is trained to predict
SAMPLERS = ("ddpm", "ddim", "dpm++", "euler", "heun")
# flow_sample's ODE steps for a diffusion.process 'flow' run; 'heun' samples a 'ddpm' run too
# (EDM's Heun on karras_timesteps), 'euler' is flow-only
FLOW_SAMPLERS = ("euler", "heun")
SAMPLER_NAMES = ", ".join(repr(name) for name in SAMPLERS)  # for the messages


def get_schedule(diffusion: ml_collections.ConfigDict) -> jd.Schedule:
    """The noise schedule named by config.diffusion (schedule, num_timesteps, zero_terminal_snr).

    Raises:
      ValueError: an unknown diffusion.schedule (or, from the builder, a bad num_timesteps).
    """
    return jd.Schedule.from_betas(_betas(diffusion))


def _betas(diffusion: ml_collections.ConfigDict) -> np.ndarray:
    """`get_schedule`'s betas, float64 NumPy [T]."""
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
    return betas


def create_model(config: ml_collections.ConfigDict, *, channels: int):
    """The Flax network named by config.model.name ('unet' or 'mlp') for data with `channels`.

    Its output has 2 * channels for diffusion.variance 'learned_range' (prediction and
    variance halves), else channels. With diffusion.process 'flow' the network predicts the
    flow-matching velocity and comes wrapped in a `FlowDenoiser`: called with an integer t it
    is the diffusion.prediction denoiser of the config's schedule, its `velocity` method is
    what the training loop regresses.

    Raises:
      ValueError: an unknown model.name.
    """
    m = config.model
    out = channels * (2 if config.diffusion.variance == "learned_range" else 1)
    dtype = jnp.dtype(m.get("dtype", "float32"))
    num_classes = m.get("num_classes", None)
    net = _network(m, out, dtype, num_classes)
    if config.diffusion.get("process", "ddpm") == "flow":
        d = config.diffusion
        betas = tuple(float(b) for b in _betas(d))
        return FlowDenoiser(net, betas, d.prediction, float(d.num_timesteps))
    return net


def _network(m: ml_collections.ConfigDict, out: int, dtype, num_classes):
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


def check_sampling(
    config: ml_collections.ConfigDict,
    *,
    sampler: str | None = None,
    num_steps: int | None = None,
    spacing: str | None = None,
    guidance: float | None = None,
    labels=None,
    s_churn: float | None = None,
    names: dict[str, str] | None = None,
) -> tuple[str, int, str, float | None]:
    """Checks the sampling choices of `sample` against a run's config, before any work.

    Arguments as `sample`'s (None: the config's). `names` renames them in the messages (the
    command line passes {'num_steps': '--steps', ...}).

    Returns:
      (sampler, num_steps, spacing, s_churn) with the config's defaults filled in; s_churn
      is the churn heun applies on a ddpm run (0 where the config has none), else None.

    Raises:
      ValueError: an unknown sampler; num_steps with ddpm (which runs all T steps) or outside
        [1, T] ([1, T - 1] for dpm++); spacing with a sampler other than ddim, or unknown;
        labels or guidance for a model without classes. A zero-terminal-SNR run sampled by
        ddim with 'leading' spacing only warns (UserWarning). s_churn (EDM's churn) other than a
        finite number >= 0, or with a sampler other than heun on a diffusion.process 'ddpm'
        run.
    """
    name = (names or {}).get
    s, num_timesteps = config.sample, config.diffusion.num_timesteps
    explicit_steps = num_steps
    sampler = s.sampler if sampler is None else sampler
    num_steps = s.num_steps if num_steps is None else num_steps
    if sampler not in SAMPLERS:
        raise ValueError(
            f"{name('sampler', 'sampler')} must be one of {SAMPLER_NAMES}; got {sampler!r}"
        )
    _check_flow_sampler(config, sampler, name("sampler", "sampler"))
    steps = name("num_steps", "num_steps") if explicit_steps is not None else "sample.num_steps"
    if sampler == "ddpm" and explicit_steps is not None:
        raise ValueError(
            f"{steps} applies to 'ddim', 'dpm++' and 'heun'; sampler 'ddpm' runs all "
            f"{num_timesteps} steps (got {steps}={explicit_steps!r})"
        )
    if sampler in FLOW_SAMPLERS and _process(config) == "flow":  # continuous: any steps
        check_int(f"{steps} for sampler {sampler!r}", num_steps, 1)
    elif sampler != "ddpm":
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
    if s_churn is not None:
        churn = name("s_churn", "s_churn")
        number = isinstance(s_churn, int | float | np.number) and not isinstance(s_churn, bool)
        if not (number and math.isfinite(s_churn) and s_churn >= 0):
            raise ValueError(f"{churn} must be a finite number >= 0; got {s_churn!r}")
        if sampler != "heun" or _process(config) == "flow":
            raise ValueError(
                f"{churn} is EDM's churn, for sampler 'heun' on a diffusion.process 'ddpm' run "
                f"only; got {churn}={s_churn!r} with sampler {sampler!r} on a "
                f"{_process(config)!r} run"
            )
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
    if sampler == "heun" and _process(config) != "flow":
        s_churn = float(s.get("s_churn", 0.0) if s_churn is None else s_churn)
    return sampler, int(num_steps), spacing, s_churn


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


_NUMERIC_FIELDS = {  # field -> may it be None
    "train.num_steps": False,
    "train.batch_size": False,
    "train.log_every": False,
    "train.checkpoint_every": False,
    "train.max_bad_steps": False,
    "train.max_loss": True,
    "train.learning_rate": False,
    "train.warmup_steps": False,
    "train.ema_decay": False,
    "train.weight_decay": False,
    "train.grad_clip": True,
    "train.sample_every": False,
    "train.stop_after": False,
    "diffusion.min_snr_gamma": False,
    "diffusion.vlb_weight": False,
    "diffusion.flow_logit_normal_loc": False,
    "diffusion.flow_logit_normal_scale": False,
    "sample.num_steps": False,
    "sample.num_samples": False,
    "sample.eta": False,
    "sample.guidance": False,
    "sample.guidance_rescale": False,
    "sample.shift": False,
    "sample.s_churn": False,
    "sample.s_tmin": False,
    "sample.s_tmax": True,
    "sample.s_noise": False,
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
    """Validates the choices of a config before any data is read or any model is built.

    Raises:
      ValueError: naming the first field whose value is of the wrong type or out of range.
        A zero-terminal-SNR run sampled by ddim with 'leading' spacing only warns.
    """
    _check_numbers(config)
    # PRNGKey keeps the low 32 bits (2**32 would be seed 0 again); the data order takes >= 0
    check_int("seed", config.seed, 0, 2**32 - 1)
    d = config.diffusion
    jd.diffusion.check_prediction(d.prediction)
    jd.diffusion.check_variance(d.variance)
    _check_process(d)
    if d.loss_type not in jd.losses.LOSS_TYPES:
        raise ValueError(f"diffusion.loss_type must be one of 'l2', 'l1'; got {d.loss_type!r}")
    if d.weighting not in jd.losses.WEIGHTINGS:
        raise ValueError(
            f"diffusion.weighting must be one of {jd.losses.WEIGHTINGS}; got {d.weighting!r}"
        )
    if config.model.name not in ("unet", "mlp"):
        raise ValueError(f"model.name must be one of 'unet', 'mlp'; got {config.model.name!r}")
    if config.sample.sampler not in SAMPLERS:
        raise ValueError(
            f"sample.sampler must be one of {SAMPLER_NAMES}; got {config.sample.sampler!r}"
        )
    _check_flow_sampler(config, config.sample.sampler, "sample.sampler")
    jd.guidance.check_guidance_rescale(
        config.sample.get("guidance_rescale", 0.0), "sample.guidance_rescale"
    )
    if not config.sample.get("shift", 1.0) > 0:
        raise ValueError(f"sample.shift must be > 0; got {config.sample.shift!r}")
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
    if tc.get("max_loss", None) is not None and not tc.max_loss > 0:
        raise ValueError(f"train.max_loss must be > 0 or None; got {tc.max_loss!r}")
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
    if s.sampler in FLOW_SAMPLERS and _process(config) == "flow":
        most = math.inf
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
    for key in ("s_churn", "s_tmin", "s_noise"):
        if not s.get(key, 0.0) >= 0:
            raise ValueError(f"sample.{key} must be >= 0; got {s[key]!r}")
    if s.get("s_tmax", None) is not None and not s.s_tmax >= s.get("s_tmin", 0.0):
        raise ValueError(
            f"sample.s_tmax must be >= sample.s_tmin={s.get('s_tmin', 0.0)!r} or None (no bound); "
            f"got {s.s_tmax!r}"
        )
    if not isinstance(tc.get("ema_warmup", True), bool):
        raise ValueError(f"train.ema_warmup must be True or False; got {tc.ema_warmup!r}")
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


def _process(config: ml_collections.ConfigDict) -> str:
    return config.diffusion.get("process", "ddpm")


def _check_flow_sampler(config: ml_collections.ConfigDict, sampler: str, what: str) -> None:
    process = _process(config)
    if sampler == "euler" and process != "flow":
        raise ValueError(
            f"{what}={sampler!r} integrates a flow model's ODE: it needs diffusion.process "
            f"'flow' (this run has {process!r}); use 'ddpm', 'ddim', 'dpm++' or 'heun'"
        )
    if sampler == "heun" and process != "flow" and config.diffusion.get("zero_terminal_snr"):
        raise ValueError(
            f"{what}='heun' steps in sigma / alpha, infinite at the last step of a "
            "diffusion.zero_terminal_snr schedule; use 'ddim' with spacing 'trailing' or 'dpm++'"
        )


def _check_process(d: ml_collections.ConfigDict) -> None:
    """diffusion.process and, for 'flow', the fields flow matching cannot use."""
    process = d.get("process", "ddpm")
    if process not in PROCESSES:
        raise ValueError(f"diffusion.process must be one of 'ddpm', 'flow'; got {process!r}")
    if process != "flow":
        return
    if d.variance == "learned_range":
        raise ValueError(
            "diffusion.variance='learned_range' needs diffusion.process 'ddpm': a flow model "
            "predicts a velocity only (use 'fixed_small' or 'fixed_large')"
        )
    if d.weighting != "none":
        raise ValueError(
            f"diffusion.weighting={d.weighting!r} applies to diffusion.process 'ddpm' only; "
            "flow matching weighs times by diffusion.flow_time_distribution (use 'none')"
        )
    dist = d.get("flow_time_distribution", "uniform")
    if dist not in jd.flow_matching.TIME_DISTRIBUTIONS:
        raise ValueError(
            "diffusion.flow_time_distribution must be one of 'uniform', 'logit_normal'; "
            f"got {dist!r}"
        )
    if not d.get("flow_logit_normal_scale", 1.0) > 0:
        raise ValueError(
            f"diffusion.flow_logit_normal_scale must be > 0; got {d.flow_logit_normal_scale!r}"
        )


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
_MEANING_FIELDS = {  # field -> its value where a config leaves it out (None: required)
    "model.name": None,
    "diffusion.prediction": None,
    "diffusion.variance": None,
    "diffusion.schedule": None,
    "diffusion.num_timesteps": None,
    "diffusion.zero_terminal_snr": False,
    "diffusion.process": "ddpm",
}


def _check_resume_keeps_the_meaning(config: ml_collections.ConfigDict, workdir) -> None:
    """ValueError naming each field of `_MEANING_FIELDS` whose value differs from the one in
    the run's config.json (a run without one is not checked). An optional field left out of
    either config has its default value: a run from before diffusion.zero_terminal_snr
    existed was trained without it."""
    if not (epath.Path(workdir) / "config.json").exists():
        return
    saved = load_run_config(workdir)
    diffs = []
    for key, default in _MEANING_FIELDS.items():
        section, name = key.split(".")
        was = saved.get(section, {}).get(name)
        was, now = default if was is None else was, config[section].get(name)
        if was is None:  # a required field, in a config.json written before it existed
            continue
        if (default if now is None else now) != was:
            diffs.append(f"{key}={now!r} (the run has {was!r})")
    if diffs:
        raise ValueError(
            f"cannot resume the run in {workdir} with {', '.join(diffs)}: these fields set what "
            "the network predicts; keep the run's values (its config.json) or use a new workdir"
        )
