"""Experiment 5: progressive distillation (Salimans & Ho 2022) of a v model into few-step samplers.

Run:  taskset -c 1 python3 -m experiments.distillation --workdir /tmp/exp \
          --out experiments/results
Expect: experiments/results/distillation.{json,png}: the v model of experiment 1 (configs/
default.py with diffusion.prediction = 'v', trained first if `experiments.parameterization` has
not run) sampled with DDIM (eta 0, trailing spacing) on 2N = 64 steps is distilled round by
round into students sampled on 32, 16, ..., 1 steps (`jax_diffusion.distillation`). At each
student step count n: Frechet distance to the train digits, precision and recall of the
distilled student (DDIM on its grid) and of the base model with plain DDIM on the same n
steps, all from the same x_T; the base model at 64 steps is the reference row.

Each round (Salimans & Ho 2022, Algorithm 2): the student starts from the teacher's params, is
trained with `distillation_loss` (v student and teacher, truncated-SNR weighting, the teacher's
x0_hat clipped as its own sampler clips it) for --round-steps steps of Adam at a
constant --lr on batches of the embedded digits, then becomes the teacher of the next round on
half the steps (`student_timesteps`). --ema-decay > 0 keeps an EMA of the student (from the
teacher's params) and hands that on instead. Students are sampled without clip_denoised: before
their last step the x0 they learned is not a clean image and need not lie in [-1, 1]
(`jax_diffusion.distillation`); the base model keeps the experiments' clipping. Each student is
also sampled with clip_denoised (model 'distilled_clipped', an ablation: does it hurt?).
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common
from jax_diffusion import data as data_lib
from jax_diffusion import distillation
from jax_diffusion.samplers import sampling_timesteps
from jax_diffusion.train_state import make_optimizer, update_ema

NAME = "distillation"
TEACHER_STEPS = 64  # 2N: the base model's DDIM grid the first student distils
LOG_EVERY = 25  # training-loss curve: the mean loss of every LOG_EVERY steps


def main(argv: list[str] | None = None) -> dict:
    parser = common.parse_args(__doc__.splitlines()[0], num_samples=500, bpd_examples=None)
    parser.add_argument(
        "--round-steps", type=common._positive_int, default=600, help="steps per round"
    )
    parser.add_argument("--lr", type=float, default=1e-4, help="constant Adam learning rate")
    parser.add_argument("--ema-decay", type=float, default=0.0, help="EMA of the student (0: none)")
    parser.add_argument(
        "--min-steps", type=common._positive_int, default=1, help="last student's steps"
    )
    args = common.parse(parser, argv)
    if not (args.lr > 0 and 0 <= args.ema_decay < 1):  # refused before training
        parser.error(f"need --lr > 0 and --ema-decay in [0, 1); got {args.lr}, {args.ema_decay}")
    common.setup_compile_cache()
    t0 = time.perf_counter()
    num = 16 if args.smoke else args.num_samples
    round_steps = 2 if args.smoke else args.round_steps
    config = common.make_config({"diffusion.prediction": "v"}, steps=args.steps, smoke=args.smoke)
    workdir = common.run_dir(args.workdir, "param_v", args.smoke)  # experiment 1's v model
    common.log(f"teacher: training in {workdir}")
    info = common.train_run(workdir, config)
    base = common.load(workdir)
    T = base.schedule.num_timesteps
    top = min(4 if args.smoke else TEACHER_STEPS, T)  # smoke: two rounds, 4 -> 2 -> 1
    grid = sampling_timesteps(T, top, "trailing")
    results: dict = {
        "command": "python3 -m experiments.distillation " + " ".join(argv or sys.argv[1:]),
        "run": common.run_info(config, info),
        "sampler": "ddim, eta 0, trailing spacing; clip_denoised for the base model only",
        "num_samples": num,
        "distillation": {
            "teacher_grid": [int(t) for t in grid],
            "round_steps": round_steps,
            "batch_size": config.train.batch_size,
            "learning_rate": args.lr,
            "lr_schedule": "constant (Adam, global-norm clip 1.0)",
            "ema_decay": args.ema_decay,
            "prediction": "v",
            "weighting": "truncated_snr",
            # the teacher's DDIM steps in the loss clip as its sampler does: the base model's
            # (first round) clip, the students' (later rounds) do not
            "base_clip_denoised": bool(config.sample.clip_denoised),
            "student_clip_denoised": False,
        },
        "rows": [],
        "rounds": [],
    }
    keep = []  # every Run sampled from stays alive: draw_samples memoises on id(run)

    def evaluate(run, model: str, n: int, extra: dict | None = None) -> None:
        samples, seconds = common.draw_samples(
            run, num=num, sampler="ddim", num_steps=n, seed=args.seed
        )
        row = {"model": model, "steps": n, **common.measure(samples), "sample_seconds": seconds}
        row.update(extra or {})
        results["rows"].append(row)
        common.log(f"{model} x {n}: fd_train {row['fd_train']:.2f}")

    evaluate(base, "ddim", top)
    data_it, _ = data_lib.get_dataset(
        config.data, global_batch_size=config.train.batch_size, seed=config.seed
    )
    unclipped = base.config.copy_and_resolve_references()
    unclipped.sample.clip_denoised = False  # the students' sampler, and so their DDIM steps
    teacher = base
    while grid.shape[0] // 2 >= args.min_steps:
        student_grid = distillation.student_timesteps(grid)
        n = student_grid.shape[0]
        # the student's grid is the trailing grid of n steps (T / 2N halves exactly), so
        # draw_samples' DDIM on n trailing steps samples it on its own grid from the same x_T
        if not np.array_equal(student_grid, sampling_timesteps(T, n, "trailing")):
            raise AssertionError(f"student grid {student_grid} is not trailing({T}, {n})")
        params, record = distil_round(
            teacher,
            grid,
            data_it,
            steps=round_steps,
            lr=args.lr,
            ema_decay=args.ema_decay,
            seed=args.seed + len(results["rounds"]),
        )
        common.log(
            f"round {2 * n} -> {n}: {record['train_seconds']:.0f} s, "
            f"loss {record['final_loss']:.4g}"
        )
        results["rounds"].append(record)
        teacher = dataclasses.replace(base, params=params, config=unclipped)
        keep.append(teacher)
        evaluate(teacher, "distilled", n, {"train_seconds": record["train_seconds"]})
        clipped = dataclasses.replace(teacher, config=base.config)  # the ablation: clipped x0
        keep.append(clipped)
        evaluate(clipped, "distilled_clipped", n)
        evaluate(base, "ddim", n)
        grid = student_grid
    results["reference"] = common.reference_metrics(base.shape[0])
    return common.finish(args.out, NAME, results, t0, plot)


def distil_round(teacher, grid, data_it, *, steps, lr, ema_decay, seed):
    """Trains a student (from the teacher's params) to do two of the teacher's DDIM steps in one.

    Returns (params handed on: the EMA if ema_decay > 0, else the last params; a record of the
    round: grids, steps, training seconds, loss curve).
    """
    d, s = teacher.config.diffusion, teacher.config.sample
    tx = make_optimizer(
        learning_rate=lr, num_steps=steps, warmup_steps=0, schedule="constant", grad_clip=1.0
    )
    timesteps = [int(t) for t in grid]  # concrete: closed over, one compile per round

    def loss_fn(params, teacher_params, x0, rng):
        return distillation.distillation_loss(
            teacher.schedule,
            lambda x, t: teacher.apply(params, x, t),
            lambda x, t: teacher.apply(teacher_params, x, t),
            x0,
            rng,
            timesteps=timesteps,
            prediction="v",
            teacher_prediction=d.prediction,
            weighting="truncated_snr",
            clip_denoised=bool(s.clip_denoised),
        )

    @jax.jit
    def step(params, opt_state, ema, teacher_params, x0, rng):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, teacher_params, x0, rng
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = update_ema(ema, params, ema_decay) if ema_decay > 0 else params
        return params, opt_state, ema, loss

    teacher_params = teacher.params
    params = jax.tree.map(jnp.array, teacher_params)  # a copy: the teacher stays fixed
    ema = params
    opt_state = tx.init(params)
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), 0xD157)
    losses, curve, t0 = [], [], time.perf_counter()
    for k in range(steps):  # a Python loop: conv gradients inside lax.scan are slow on CPU
        x0 = jnp.asarray(next(data_it)["image"])
        params, opt_state, ema, loss = step(
            params, opt_state, ema, teacher_params, x0, jax.random.fold_in(rng, k)
        )
        if k == 0:  # the first step compiles (the grid is closed over: once per round)
            jax.block_until_ready(loss)
            first_step_seconds = time.perf_counter() - t0
        losses.append(loss)
        if len(losses) == LOG_EVERY or k == steps - 1:
            curve.append([k + 1, float(np.mean(jax.device_get(losses)))])
            losses = []
    jax.block_until_ready(ema)
    seconds = time.perf_counter() - t0
    if not np.isfinite(curve[-1][1]):
        raise FloatingPointError(f"distillation loss is not finite: {curve[-1]}")
    record = {
        "teacher_steps": len(grid),
        "student_steps": len(grid) // 2,
        "steps": steps,
        "train_seconds": seconds,
        "first_step_seconds": first_step_seconds,
        "final_loss": curve[-1][1],
        "loss_curve": curve,
    }
    return ema, record


def plot(results: dict, path: str) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    rows = results["rows"]
    top = max(r["steps"] for r in rows)
    ref = next(r for r in rows if r["model"] == "ddim" and r["steps"] == top)
    for ax, key in zip(axes[:3], ("fd_train", "precision", "recall"), strict=True):
        for model, style in (("distilled", "-o"), ("ddim", "--s")):
            rs = sorted(
                (r for r in rows if r["model"] == model and r["steps"] < top),
                key=lambda r: r["steps"],
            )
            label = "distilled student" if model == "distilled" else "base model, plain DDIM"
            ax.plot([r["steps"] for r in rs], [r[key] for r in rs], style, label=label)
        ax.axhline(ref[key], color="gray", ls=":", label=f"base model, DDIM-{top}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps (model calls)")
        ax.set_title(f"{key} (N={results['num_samples']})")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    ax = axes[3]
    for rec in results["rounds"]:
        steps, loss = zip(*rec["loss_curve"], strict=True)
        ax.plot(steps, loss, label=f"{rec['teacher_steps']} -> {rec['student_steps']}")
    ax.set_yscale("log")
    ax.set_xlabel("training step of the round")
    ax.set_title("distillation loss (truncated-SNR weighted)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
