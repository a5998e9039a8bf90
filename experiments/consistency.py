"""Experiment 8: consistency distillation (Song et al. 2023) of the v model into 1-4 step sampling.

Run:  taskset -c 1 python3 -m experiments.consistency --workdir /tmp/exp --out experiments/results
Expect: experiments/results/consistency.{json,png}: the v model of experiment 1 (configs/
default.py with diffusion.prediction = 'v', trained first if it has not run) distilled into a
consistency model (`jax_diffusion.consistency`), sampled with 1, 2 and 4 steps of Algorithm 1
(`consistency_sample` on the trailing grid: 999; 999, 499; 999, 749, 499, 249): Frechet
distance to the train digits, precision and recall, against the teacher with DDIM on the same
number of calls and the untrained student (the teacher's weights in the consistency
parameterization), all from the same x_T.

Training (Algorithm 2): the student f_theta = `consistency_function(net, prediction='v')` starts
from the teacher's params; the target f_theta^- is an EMA of the student (decay --target-ema,
0.95 as the paper's CD on CIFAR-10); the teacher's DDIM step (eta 0, unclipped) between
adjacent points of a grid of --grid-size steps from 0 to 999; squared error (the paper's l2
variant); Adam at a constant --lr, global-norm clip 1.0, batch 64 of the embedded digits.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common
from jax_diffusion import consistency
from jax_diffusion import data as data_lib
from jax_diffusion.samplers import sampling_timesteps
from jax_diffusion.train_state import make_optimizer, update_ema

NAME = "consistency"
STEPS = (1, 2, 4)
LOG_EVERY = 25


def main(argv: list[str] | None = None) -> dict:
    parser = common.parse_args(__doc__.splitlines()[0], num_samples=500, bpd_examples=None)
    parser.add_argument(
        "--train-steps", type=common._positive_int, default=2000, help="distillation steps"
    )
    parser.add_argument("--lr", type=float, default=1e-4, help="constant Adam learning rate")
    parser.add_argument("--target-ema", type=float, default=0.95, help="EMA of the target net")
    parser.add_argument(
        "--grid-size", type=common._positive_int, default=18, help="N, the grid's points"
    )
    args = common.parse(parser, argv)
    if not (args.lr > 0 and 0 <= args.target_ema < 1 and args.grid_size >= 2):
        parser.error("need --lr > 0, --target-ema in [0, 1) and --grid-size >= 2")
    common.setup_compile_cache()
    t0 = time.perf_counter()
    num = 16 if args.smoke else args.num_samples
    train_steps = 2 if args.smoke else args.train_steps
    config = common.make_config({"diffusion.prediction": "v"}, steps=args.steps, smoke=args.smoke)
    workdir = common.run_dir(args.workdir, "param_v", args.smoke)  # experiment 1's v model
    common.log(f"teacher: training in {workdir}")
    info = common.train_run(workdir, config)
    teacher = common.load(workdir)
    T = teacher.schedule.num_timesteps
    grid = np.unique(np.linspace(0, T - 1, min(args.grid_size, T)).round().astype(int))
    results: dict = {
        "command": "python3 -m experiments.consistency " + " ".join(argv or sys.argv[1:]),
        "run": common.run_info(config, info),
        "num_samples": num,
        "distillation": {
            "grid": [int(t) for t in grid],
            "train_steps": train_steps,
            "batch_size": config.train.batch_size,
            "learning_rate": args.lr,
            "target_ema": args.target_ema,
            "distance": "l2",
            "sigma_data": 0.5,
        },
        "rows": [],
    }
    data_it, _ = data_lib.get_dataset(
        config.data, global_batch_size=config.train.batch_size, seed=config.seed
    )

    def f_of(params):
        return consistency.consistency_function(
            lambda x, t: teacher.apply(params, x, t), teacher.schedule, prediction="v"
        )

    def evaluate(model: str, n: int, params=None) -> None:
        if model == "ddim":
            samples, seconds = common.draw_samples(
                teacher, num=num, sampler="ddim", num_steps=n, seed=args.seed
            )
        else:
            samples, seconds = draw_consistency(f_of, params, teacher, num, n, args.seed)
        row = {"model": model, "steps": n, **common.measure(samples), "sample_seconds": seconds}
        results["rows"].append(row)
        common.log(f"{model} x {n}: fd_train {row['fd_train']:.2f}")

    steps_list = (1, 2) if args.smoke else STEPS
    for n in steps_list:
        evaluate("ddim", min(n, T))
        evaluate("untrained", n, teacher.params)
    params, record = distil(
        teacher, f_of, grid, data_it, steps=train_steps, lr=args.lr, ema=args.target_ema
    )
    results["distillation"].update(record)
    common.log(f"distilled: {record['train_seconds']:.0f} s, loss {record['final_loss']:.4g}")
    for n in steps_list:
        evaluate("consistency", n, params)
    results["reference"] = common.reference_metrics(teacher.shape[0])
    return common.finish(args.out, NAME, results, t0, plot)


def draw_consistency(f_of, params, run, num: int, n: int, seed: int, batch_size: int = 500):
    """`consistency_sample` on the trailing grid of n steps; x_T per batch as
    `common.draw_samples` draws it (batch i from fold_in(PRNGKey(seed), i))."""
    T = run.schedule.num_timesteps
    ts = [int(t) for t in sampling_timesteps(T, min(n, T), "trailing")]

    @jax.jit
    def fn(params, x_T, rng):
        return consistency.consistency_sample(f_of(params), run.schedule, x_T, rng, timesteps=ts)

    return common.draw_batches(
        lambda x_T, rng: fn(params, x_T, rng), run, num=num, seed=seed, batch_size=batch_size
    )


def distil(teacher, f_of, grid, data_it, *, steps: int, lr: float, ema: float):
    """Algorithm 2 for `steps` steps from the teacher's params; returns (the student's params,
    a record: seconds, loss curve)."""
    tx = make_optimizer(
        learning_rate=lr, num_steps=steps, warmup_steps=0, schedule="constant", grad_clip=1.0
    )
    timesteps = [int(t) for t in grid]

    def loss_fn(params, target_params, x0, rng):
        return consistency.consistency_distillation_loss(
            f_of(params),
            f_of(target_params),
            lambda x, t: teacher.apply(teacher.params, x, t),
            teacher.schedule,
            x0,
            rng,
            timesteps=timesteps,
            teacher_prediction=teacher.config.diffusion.prediction,
        )

    @jax.jit
    def step(params, opt_state, target, x0, rng):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, target, x0, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, update_ema(target, params, ema), loss

    params = jax.tree.map(jnp.array, teacher.params)  # copies: the teacher stays fixed
    target = jax.tree.map(jnp.array, teacher.params)
    opt_state = tx.init(params)
    rng = jax.random.fold_in(jax.random.PRNGKey(0), 0xC0)
    losses, curve, t0 = [], [], time.perf_counter()
    for k in range(steps):  # a Python loop: conv gradients inside lax.scan are slow on CPU
        x0 = jnp.asarray(next(data_it)["image"])
        params, opt_state, target, loss = step(
            params, opt_state, target, x0, jax.random.fold_in(rng, k)
        )
        losses.append(loss)
        if len(losses) == LOG_EVERY or k == steps - 1:
            curve.append([k + 1, float(np.mean(jax.device_get(losses)))])
            losses = []
    jax.block_until_ready(params)
    if not np.isfinite(curve[-1][1]):
        raise FloatingPointError(f"consistency distillation loss is not finite: {curve[-1]}")
    record = {
        "train_seconds": time.perf_counter() - t0,
        "final_loss": curve[-1][1],
        "loss_curve": curve,
    }
    return params, record


def plot(results: dict, path: str) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    labels = {
        "consistency": "consistency model",
        "untrained": "untrained student (teacher weights)",
        "ddim": "teacher, DDIM",
    }
    for ax, key in zip(axes[:3], ("fd_train", "precision", "recall"), strict=True):
        for model, label in labels.items():
            rows = sorted(
                (r for r in results["rows"] if r["model"] == model), key=lambda r: r["steps"]
            )
            ax.plot([r["steps"] for r in rows], [r[key] for r in rows], "-o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps (model calls)")
        ax.set_title(f"{key} (N={results['num_samples']})")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    steps, loss = zip(*results["distillation"]["loss_curve"], strict=True)
    axes[3].plot(steps, loss)
    axes[3].set_yscale("log")
    axes[3].set_xlabel("distillation step")
    axes[3].set_title("consistency distillation loss (l2)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
