"""The `jax-diffusion` command line."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys


def _demo(args: argparse.Namespace) -> int:
    """Runs the math end to end on Gaussian data with its exact denoiser, and prints JSON."""
    import jax
    import jax.numpy as jnp

    import jax_diffusion as jd
    from jax_diffusion.testing import gaussian_denoiser, gaussian_residual_variance

    schedule = jd.Schedule.from_betas(jd.cosine_betas(args.num_timesteps))
    mean, std = 0.2, 0.3  # little mass outside [-1, 1], so clipping barely moves the loss
    rng = jax.random.key(args.seed)
    data_rng, loss_rng, nll_rng = jax.random.split(rng, 3)
    x0 = mean + std * jax.random.normal(data_rng, (args.batch, 8, 8, 1))
    x0 = jnp.round((jnp.clip(x0, -1, 1) + 1) * 127.5) / 127.5 - 1  # the 8-bit grid
    report = {"num_timesteps": args.num_timesteps, "data": f"N({mean}, {std}^2), 8x8x1"}
    for prediction in ("eps", "x0", "v"):
        model_fn = gaussian_denoiser(schedule, mean, std, prediction)
        loss, metrics = jax.jit(
            lambda x, k, p=prediction, f=model_fn: jd.diffusion_loss(
                schedule, f, x, k, prediction=p
            )
        )(x0, loss_rng)
        expected = gaussian_residual_variance(schedule, metrics["t"], std, prediction).mean()
        report[f"loss_{prediction}"] = round(float(loss), 5)
        report[f"loss_{prediction}_analytic_at_sampled_t"] = round(float(expected), 5)
    nll = jax.jit(lambda x, k: jd.nll_bpd(schedule, gaussian_denoiser(schedule, mean, std), x, k))(
        x0, nll_rng
    )
    report["bits_per_dim"] = round(float(nll.total_bpd.mean()), 4)
    report["bits_per_dim_parts"] = {
        "prior": round(float(nll.prior_bpd.mean()), 6),
        "kl": round(float(nll.kl_bpd.mean()), 4),
        "decoder": round(float(nll.decoder_bpd.mean()), 4),
    }
    print(json.dumps(report, indent=2))
    return 0


def load_config(spec: str, overrides: list[str] | None = None):
    """Loads `path/to/config.py[:variant]` (its `get_config(variant)`) and applies overrides.

    The config file is executed afresh on every call, as a module of its package (the nearest
    ancestor directory without an `__init__.py` goes on sys.path), so configs can import their
    siblings, e.g. `from experiments.configs import default`, and two files of the same name,
    or a file edited in a notebook session, are never confused with a cached import. Overrides
    are `key.sub=value` strings whose values are Python literals (strings may be bare).
    """
    import ast
    import importlib
    import importlib.util

    path, _, variant = spec.partition(":")
    path = os.path.abspath(path)
    if not os.path.isfile(path) or not path.endswith(".py"):
        raise ValueError(f"--config must name an existing .py file; got {spec!r}")
    parts = [os.path.splitext(os.path.basename(path))[0]]
    root = os.path.dirname(path)
    while os.path.isfile(os.path.join(root, "__init__.py")):
        parts.insert(0, os.path.basename(root))
        root = os.path.dirname(root)
    if root not in sys.path:
        sys.path.insert(0, root)
    if len(parts) > 1:  # the package, for the config's own relative or sibling imports
        importlib.import_module(".".join(parts[:-1]))
    spec = importlib.util.spec_from_file_location(".".join(parts), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(variant or None)
    for item in overrides or []:
        key, eq, raw = item.partition("=")
        if not eq:
            raise ValueError(f"--set takes key=value; got {item!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        try:
            set_config_value(config, key, value)
        except (ValueError, TypeError) as err:  # TypeError: ml_collections' type safety
            raise ValueError(f"--set {item}: {err}") from None
    return config


def set_config_value(config, key: str, value) -> None:
    """Sets the dotted `key` (e.g. 'train.batch_size') of a ConfigDict; unknown keys raise."""
    import ml_collections

    node = config
    *parents, leaf = key.split(".")
    for name in parents:
        if name not in node or not isinstance(node[name], ml_collections.ConfigDict):
            raise ValueError(f"unknown config key {key!r}")
        node = node[name]
    if leaf not in node:
        raise ValueError(f"unknown config key {key!r}")
    node[leaf] = value


def _train(args: argparse.Namespace) -> int:
    cluster = {
        "coordinator_address": args.coordinator_address,
        "num_processes": args.num_processes,
        "process_id": args.process_id,
    }
    if None not in (args.num_processes, args.process_id) and args.process_id >= args.num_processes:
        raise ValueError(
            f"--process-id must lie in [0, --num-processes={args.num_processes}); "
            f"got {args.process_id}"
        )
    if args.distributed or any(v is not None for v in cluster.values()):
        # before any other JAX call: every host runs this same command, and the processes then
        # share one mesh, one global batch and one workdir (without it each host would train a
        # run of its own on the full batch, all writing into the same workdir)
        import jax

        jax.distributed.initialize(**cluster)
    from jax_diffusion.train import TrainingDiverged, train_and_evaluate

    config = load_config(args.config, args.set)
    try:
        summary = train_and_evaluate(config, args.workdir)  # writes workdir/config.json too
    except TrainingDiverged as err:
        print(f"jax-diffusion train: {err}", file=sys.stderr)
        return 1
    summary.pop("state", None)
    print(json.dumps(summary, indent=2))
    return 0


def _sample(args: argparse.Namespace) -> int:
    import jax

    from jax_diffusion import train

    _check_sampling_flags(args)  # before the run is restored
    config, shape, model, ema_params, step = train.load_run(args.workdir)
    _set_guidance_rescale(config, args)
    num = config.sample.num_samples if args.num is None else args.num
    images, labels = train.sample_in_batches(
        config,
        model,
        ema_params,
        train.get_schedule(config.diffusion),
        jax.random.PRNGKey(args.seed),
        shape=shape,
        num=num,
        batch_size=args.batch_size,
        mesh=train.make_mesh(),  # each batch split over this machine's devices
        progress=True,
        sampler=args.sampler,
        num_steps=args.steps,
        guidance=args.guidance,
        spacing=args.spacing,
        s_churn=args.churn,
    )
    train.check_finite_samples(images)  # before anything is written
    if args.out.lower().endswith(".npz"):
        train.save_sample_arrays(images, labels, args.out)
    else:
        train.save_sample_image(images, args.out)
    print(json.dumps({"out": args.out, "num": num, "step": step}))
    return 0


_FLAGS = {
    "sampler": "--sampler",
    "num_steps": "--steps",
    "spacing": "--spacing",
    "guidance": "--guidance",
    "s_churn": "--churn",
}


def _check_sampling_flags(args: argparse.Namespace) -> None:
    """The sampling flags against the run's config.json, named as flags, before any work."""
    from jax_diffusion import train

    run_config = train.load_run_config(args.workdir)
    _check_guidance_rescale(run_config, args)
    train.check_sampling(
        run_config,
        sampler=args.sampler,
        num_steps=args.steps,
        spacing=args.spacing,
        guidance=args.guidance,
        s_churn=args.churn,
        names=_FLAGS,
    )


def _check_guidance_rescale(run_config, args: argparse.Namespace) -> None:
    if args.guidance_rescale is not None and run_config.model.get("num_classes", None) is None:
        raise ValueError(
            f"--guidance-rescale needs a class-conditional model (this run has no classes); "
            f"got {args.guidance_rescale}"
        )


def _set_guidance_rescale(config, args: argparse.Namespace) -> None:
    """--guidance-rescale into the restored run's config (which sample and edit read)."""
    if args.guidance_rescale is not None:
        config.sample.guidance_rescale = args.guidance_rescale


def _evaluate(args: argparse.Namespace) -> int:
    from jax_diffusion import train
    from jax_diffusion.evaluation import evaluate_workdir

    _check_sampling_flags(args)
    metrics = evaluate_workdir(
        args.workdir,
        num_samples=args.num,
        sampler=args.sampler,
        num_steps=args.steps,
        guidance=args.guidance,
        guidance_rescale=args.guidance_rescale,
        spacing=args.spacing,
        s_churn=args.churn,
        seed=args.seed,
        bpd_examples=args.bpd_examples,
        ode_bpd_examples=args.ode_bpd_examples,
        ode_steps=args.ode_steps,
        mesh=train.make_mesh(),  # each batch split over this machine's devices
    )
    text = json.dumps(metrics, indent=2)
    print(text, flush=True)  # first: the metrics survive a failed write
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


def _edit(args: argparse.Namespace) -> int:
    """inpaint / sdedit: edits image files with a run's latest EMA params."""
    import jax
    import numpy as np
    from etils import epath

    from jax_diffusion import generate, train, visualize

    # before the run is restored: the files, and the flags against the run's config.json
    for path in [*args.image, *([args.mask] if args.command == "inpaint" else [])]:
        if not epath.Path(path).exists():
            raise FileNotFoundError(f"no image file {path!r}")
    run_config = train.load_run_config(args.workdir)
    if run_config.model.name == "mlp":
        raise ValueError(f"{args.command} edits images; this run's model.name='mlp' takes vectors")
    num_classes = run_config.model.get("num_classes", None)
    train.check_sampling(run_config, guidance=args.guidance, names=_FLAGS)
    _check_guidance_rescale(run_config, args)
    if args.label is not None and (num_classes is None or args.label > num_classes):
        allowed = "no classes" if num_classes is None else f"labels in [0, {num_classes}]"
        raise ValueError(f"--label must be a label of the run ({allowed}); got {args.label}")
    T = run_config.diffusion.num_timesteps
    if args.steps is not None and args.steps > T:
        raise ValueError(f"--steps must be an int in [1, {T}] (the run's steps); got {args.steps}")
    config, shape, model, ema_params, step = train.load_run(args.workdir)
    _set_guidance_rescale(config, args)
    images = np.repeat(visualize.load_images(args.image, shape), args.num, axis=0)
    options = dict(num_steps=args.steps, guidance=args.guidance)
    if args.label is not None:
        options["labels"] = np.full(len(images), args.label, np.int32)
    if args.command == "inpaint":
        mask = visualize.load_mask(args.mask, shape)
        options.update(mask=mask, jump_length=args.jump_length, jump_n_sample=args.jump_n_sample)
    else:
        options["strength"] = args.strength
    edits = generate.edit(
        config,
        model,
        ema_params,
        train.get_schedule(config.diffusion),
        jax.random.PRNGKey(args.seed),
        images,
        method=args.command,
        mesh=train.make_mesh(),  # the images split over this machine's devices
        **options,
    )
    edits = np.asarray(jax.device_get(edits))
    train.check_finite_samples(edits)  # before anything is written
    if args.out.lower().endswith(".npz"):
        labels = None if num_classes is None else options.get("labels")
        train.save_sample_arrays(edits, labels, args.out)
    else:  # one row per image: the input (inpaint: its kept pixels, the rest gray), its edits
        shown = images[:: args.num] * (mask if args.command == "inpaint" else 1.0)
        rows = np.concatenate([shown[:, None], edits.reshape(-1, args.num, *shape)], axis=1)
        scale = max(1, 64 // shape[0])
        visualize.save_image_grid(
            rows.reshape(-1, *shape), args.out, ncol=args.num + 1, scale=scale,
            padding=max(1, scale // 2),
        )  # fmt: skip
    print(json.dumps({"out": args.out, "num": len(edits), "step": step}))
    return 0


def _int_in(low: int, high: int | None = None, what: str = ""):
    """An argparse type: an int in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be an int {allowed}{what}; got {text!r}")
        return value

    parse.__name__ = "int"  # argparse names the type in its own messages
    return parse


_positive_int = _int_in(1)
_SPACINGS = ("leading", "trailing", "linspace")  # samplers.SPACINGS, without importing jax
_seed = _int_in(0, 2**32 - 1, " (a PRNGKey keeps 32 bits)")


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number; got {text!r}")
    return value


def _output_file(text: str) -> str:
    """An argparse type: a file path that can be written, checked before any work (a local
    path; a URI is left to the writer): not a directory, below a directory, not a file."""
    if "://" in text:
        return text
    path = os.path.abspath(text)
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"must be a file path; {text!r} is a directory")
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(
            f"cannot be written: {parent!r}, on the way to {text!r}, is a file"
        )
    if not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot be written: no write permission in {parent!r}")
    return text


def _fraction(*, zero_ok: bool):
    """An argparse type: a number in [0, 1] (zero_ok) or (0, 1]."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (0.0 <= value if zero_ok else 0.0 < value) or not value <= 1.0:
            allowed = "[0, 1]" if zero_ok else "(0, 1]"
            raise argparse.ArgumentTypeError(f"must be a number in {allowed}; got {text!r}")
        return value

    parse.__name__ = "float"  # argparse names the type in its own messages
    return parse


_strength = _fraction(zero_ok=False)
_GUIDANCE_RESCALE = dict(  # the --guidance-rescale flag of sample, evaluate, inpaint, sdedit
    type=_fraction(zero_ok=True),
    default=None,
    help="phi in [0, 1]: rescale the guided output's std towards the conditional one's (Lin et "
    "al. 2024; 0.7 in the paper), class-conditional runs only (default: the config's "
    "sample.guidance_rescale, 0 where it has none)",
)


def _samples_path(text: str) -> str:
    from PIL import Image

    extension = os.path.splitext(text)[1].lower()
    if extension != ".npz" and Image.registered_extensions().get(extension) is None:
        raise argparse.ArgumentTypeError(
            f"must end in an image extension such as .png (a grid) or in .npz (the arrays); "
            f"got {text!r}"
        )
    return _output_file(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jax-diffusion", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the diffusion math end to end on CPU (no training)")
    demo.add_argument("--num-timesteps", type=_positive_int, default=1000)
    demo.add_argument("--batch", type=_positive_int, default=256)
    demo.add_argument("--seed", type=_seed, default=0)
    demo.set_defaults(func=_demo)

    tr = sub.add_parser("train", help="train (or resume) a model from an ml_collections config")
    tr.add_argument("--config", required=True, help="path/to/config.py[:variant]")
    tr.add_argument("--workdir", required=True)
    tr.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.num_steps=100",
    )
    tr.add_argument(
        "--distributed",
        action="store_true",
        help="several hosts: run the same command on each; calls jax.distributed.initialize() "
        "first, which finds the cluster on Cloud TPU, SLURM, Open MPI and Kubernetes (elsewhere "
        "give the three flags below)",
    )
    tr.add_argument(
        "--coordinator-address",
        default=None,
        metavar="HOST:PORT",
        help="jax.distributed's coordinator (process 0's host); implies --distributed",
    )
    tr.add_argument(
        "--num-processes", type=_positive_int, default=None, help="implies --distributed"
    )
    tr.add_argument(
        "--process-id", type=_int_in(0), default=None, help="in [0, N); implies --distributed"
    )
    tr.set_defaults(func=_train)

    sa = sub.add_parser(
        "sample", help="sample a grid, or arrays for FID, from a workdir's latest EMA params"
    )
    ev = sub.add_parser(
        "evaluate", help="sample from a digits workdir and print Frechet distance etc. as JSON"
    )
    for p in (sa, ev):  # the sampling flags; None: the run's config.json decides
        p.add_argument("--workdir", required=True, help="the training run's directory")
        p.add_argument(
            "--sampler",
            choices=("ddpm", "ddim", "dpm++", "euler", "heun"),
            default=None,
            help="default: the config's sample.sampler; euler: flow runs only; heun: EDM's "
            "sampler (a flow run: its own ODE steps)",
        )
        p.add_argument(
            "--steps",
            type=_positive_int,
            default=None,
            help="ddim, dpm++, heun (<= T, dpm++ <= T - 1), euler (ODE steps) only (default: "
            "the config's)",
        )
        p.add_argument(
            "--spacing",
            choices=_SPACINGS,
            default=None,
            help="ddim's steps (default: the config's)",
        )
        p.add_argument(
            "--guidance",
            type=_finite_float,
            default=None,
            help="classifier-free guidance scale w, class-conditional runs only (default: the "
            "config's sample.guidance)",
        )
        p.add_argument("--guidance-rescale", **_GUIDANCE_RESCALE)
        p.add_argument(
            "--churn",
            type=_finite_float,
            default=None,
            help="heun on a diffusion run: EDM's stochastic churn S_churn >= 0, e.g. 40 "
            "(default: the config's sample.s_churn; 0: deterministic)",
        )
        p.add_argument("--seed", type=_seed, default=0, help="sampling seed (default: 0)")
    sa.add_argument(
        "--num",
        type=_positive_int,
        default=None,
        help="samples to draw (default: the config's sample.num_samples)",
    )
    sa.add_argument(
        "--batch-size",
        type=_positive_int,
        default=256,
        help="samples per call; batch i uses the key fold_in(PRNGKey(seed), i) (default: 256)",
    )
    sa.add_argument(
        "--out",
        type=_samples_path,
        default="grid.png",
        help="an image (a grid) or a .npz: arr_0 uint8 images [N, H, W, C] (float32 for "
        "non-image data), arr_1 the labels of a class-conditional run, as guided-diffusion's "
        "evaluator reads them (default: grid.png)",
    )
    sa.set_defaults(func=_sample)

    ev.add_argument(
        "--num",
        type=_int_in(4, what=" (recall's 3-NN radii need 4)"),
        default=1000,
        help="samples to measure (default: 1000)",
    )
    ev.add_argument(
        "--bpd-examples",
        type=_int_in(0, 297),
        default=0,
        help="test digits for bits/dim, the variational bound (default: 0, none)",
    )
    ev.add_argument(
        "--ode-bpd-examples",
        type=_int_in(0, 297),
        default=0,
        help="test digits for the exact bits/dim by the probability-flow ODE (default: 0, none)",
    )
    ev.add_argument(
        "--ode-steps",
        type=_int_in(2),
        default=None,
        help="the ODE's steps for --ode-bpd-examples (default: 128 for a ddpm run, or T if "
        "smaller; 32 Heun steps for a flow run); the error is second order in the step",
    )
    ev.add_argument("--out", type=_output_file, default=None, help="also write the JSON here")
    ev.set_defaults(func=_evaluate)

    inpaint = sub.add_parser(
        "inpaint", help="fill in the masked pixels of image files (RePaint) with a workdir's model"
    )
    sdedit = sub.add_parser(
        "sdedit", help="image-to-image: noise image files and denoise them (SDEdit)"
    )
    for p in (inpaint, sdedit):
        p.add_argument("--workdir", required=True, help="the training run's directory")
        p.add_argument(
            "--image",
            nargs="+",
            required=True,
            metavar="FILE",
            help="image files to edit (resized to the run's images if need be)",
        )
        p.add_argument(
            "--num", type=_positive_int, default=1, help="edits of each image (default: 1)"
        )
        p.add_argument(
            "--steps",
            type=_positive_int,
            default=None,
            help="steps of the respaced chain ('trailing'), <= T (default: 100, or T)",
        )
        p.add_argument(
            "--label",
            type=_int_in(0),
            default=None,
            help="class-conditional runs: the class to edit towards (default: the null label, "
            "unconditional)",
        )
        p.add_argument(
            "--guidance",
            type=_finite_float,
            default=None,
            help="classifier-free guidance scale w with --label (default: the config's)",
        )
        p.add_argument("--guidance-rescale", **_GUIDANCE_RESCALE)
        p.add_argument("--seed", type=_seed, default=0, help="seed (default: 0)")
        p.add_argument(
            "--out",
            type=_samples_path,
            default="edits.png",
            help="a grid, one row per image: the input, then its edits; or .npz, the edits as "
            "uint8 arrays (default: edits.png)",
        )
        p.set_defaults(func=_edit)
    inpaint.add_argument(
        "--mask",
        required=True,
        metavar="FILE",
        help="white (gray level >= 128) marks the pixels to fill, black the ones kept "
        "(diffusers' convention)",
    )
    inpaint.add_argument(
        "--jump-length",
        type=_positive_int,
        default=10,
        help="RePaint: steps between resampling jumps (default: 10)",
    )
    inpaint.add_argument(
        "--jump-n-sample",
        type=_positive_int,
        default=10,
        help="RePaint: passes per jump, 1 = plain replacement (default: 10)",
    )
    sdedit.add_argument(
        "--strength",
        type=_strength,
        default=0.5,
        help="in (0, 1]: the fraction of the steps run; more is more realistic, less faithful "
        "to the image (default: 0.5; diffusers' img2img uses 0.8)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status.

    A bad argument or config value (the library's ValueError, raised before any work), a
    missing file and a missing optional dependency (e.g. the data extra for a tfds dataset)
    end the program as argparse's own errors do: `jax-diffusion <command>:
    error: <message>` on stderr and exit status 2, without a traceback unless the environment
    sets JAX_DIFFUSION_TRACEBACK=1. A diverged training run, and samples that are not finite
    (`sample`, `evaluate`: a diverged model; nothing is written), exit with status 1 and a
    one-line message.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    traceback = os.environ.get("JAX_DIFFUSION_TRACEBACK", "") not in ("", "0")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        if traceback:
            raise
        parser.exit(2, f"{parser.prog} {args.command}: error: {err}\n")
    except FloatingPointError as err:  # train.check_finite_samples
        if traceback:
            raise
        print(f"{parser.prog} {args.command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
