"""Experiment 10: a ControlNet (Zhang & Agrawala 2023) that follows pixelated digits, vs SDEdit.

Run:  taskset -c 1 python3 -m experiments.controlnet --workdir /tmp/exp --out experiments/results
Expect: experiments/results/controlnet.{json,png}: the v model of experiment 1 (configs/
default.py with diffusion.prediction = 'v', trained first if it has not run) stays frozen; a
`ControlNet` (its encoder copy initialised from it, `controlnet_params_from_unet`) learns, on
the train digits, to follow the condition c = the digit pixelated to 2x2 blocks of its mean (a
4x4 layout of the 8x8 digit; experiment 9's SDEdit guides are coarser, 4x4 blocks): L_simple in
v of `controlled_model_fn`, Adam at --lr, batch 64, --train-steps steps. Then, for the 297 test
digits' guides, from the same x_T: the controlled model (DDIM, 50 trailing steps, control scale
0.5 and 1) against SDEdit from the guide itself (strength 0.6 and 0.8, the same sampler) and the
unconditional model. Measured: faithfulness (`l2_layout`, the RMS difference between the sample
pixelated the same way and the guide; the class_accuracy of the guide's digit label) and realism
(fd_test, the distance to the test digits the guides come from; fd_train; precision, recall).
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common
from experiments.inpainting import pixelate
from jax_diffusion import data as data_lib
from jax_diffusion import editing, losses, samplers
from jax_diffusion.models import ControlNet, controlled_model_fn, controlnet_params_from_unet
from jax_diffusion.train_state import make_optimizer

NAME = "controlnet"
BLOCK = 2  # pixelation block: an 8x8 digit (the default config) becomes a 4x4 layout
SCALES = (0.5, 1.0)
STRENGTHS = (0.6, 0.8)
LOG_EVERY = 25


def main(argv: list[str] | None = None) -> dict:
    parser = common.parse_args(__doc__.splitlines()[0], num_samples=297, bpd_examples=None)
    parser.add_argument(
        "--train-steps", type=common._positive_int, default=1500, help="ControlNet steps"
    )
    parser.add_argument("--lr", type=float, default=2e-4, help="constant Adam learning rate")
    parser.add_argument("--sample-steps", type=common._positive_int, default=50, help="DDIM steps")
    args = common.parse(parser, argv)
    if not args.lr > 0:
        parser.error("need --lr > 0")
    common.setup_compile_cache()
    t0 = time.perf_counter()
    config = common.make_config({"diffusion.prediction": "v"}, steps=args.steps, smoke=args.smoke)
    workdir = common.run_dir(args.workdir, "param_v", args.smoke)  # experiment 1's v model
    common.log(f"model: training in {workdir}")
    info = common.train_run(workdir, config)
    run = common.load(workdir)
    train_steps = 2 if args.smoke else args.train_steps
    n_steps = min(args.sample_steps, run.schedule.num_timesteps)
    images, labels = data_lib.load_digits(run.shape[0], "test")
    num = 8 if args.smoke else args.num_samples
    images, labels = images[:num], labels[:num]
    guides = pixelate(images, BLOCK)
    control = ControlNet.from_unet(run.model, hint_channels=(16, 32))
    results: dict = {
        "command": "python3 -m experiments.controlnet " + " ".join(argv or sys.argv[1:]),
        "run": common.run_info(config, info),
        "num_images": len(images),
        "sample_steps": n_steps,
        "pixelation_block": BLOCK,
        "rows": [],
    }
    data_it, _ = data_lib.get_dataset(
        config.data, global_batch_size=config.train.batch_size, seed=config.seed
    )
    params, record = train_controlnet(
        run, control, data_it, steps=train_steps, lr=args.lr, seed=config.seed
    )
    results["training"] = record
    common.log(f"trained: {record['train_seconds']:.0f} s, loss {record['final_loss']:.4g}")
    d = run.config.diffusion
    kw = dict(prediction=d.prediction, clip_denoised=run.config.sample.clip_denoised)
    shown = {"guide": guides[:10], "truth": images[:10]}

    def evaluate(method: str, fn, **extra) -> None:
        out, seconds = common.draw_batches(
            jax.jit(fn), run, num=len(images), seed=args.seed, batch_size=len(images)
        )
        row = {
            "method": method,
            **extra,
            "l2_layout": float(
                np.sqrt(np.mean((pixelate(np.clip(out, -1, 1), BLOCK) - guides) ** 2))
            ),
            **common.measure(out, labels),
            "sample_seconds": seconds,
        }
        results["rows"].append(row)
        shown[method if not extra else f"{method} {list(extra.values())[0]:g}"] = out[:10]
        common.log(
            f"{method} {extra}: l2_layout {row['l2_layout']:.3f}, accuracy "
            f"{row['class_accuracy']:.3f}, fd_test {row['fd_test']:.2f}"
        )

    def ddim(model_fn, x_T):
        return samplers.ddim_sample(
            model_fn, run.schedule, x_T, num_steps=n_steps, spacing="trailing", **kw
        )

    evaluate("unconditional", lambda x_T, rng: ddim(lambda x, t: run.apply(run.params, x, t), x_T))
    for strength in STRENGTHS[1:] if args.smoke else STRENGTHS:  # smoke: fewer compiles
        evaluate(
            "sdedit",
            lambda x_T, rng, s=strength: editing.sdedit(
                lambda x, t: run.apply(run.params, x, t),
                run.schedule,
                jnp.asarray(guides),
                rng,
                strength=s,
                num_steps=n_steps,
                spacing="trailing",
                **kw,
            ),
            strength=strength,
        )
    for scale in SCALES[1:] if args.smoke else SCALES:
        model_fn = controlled_model_fn(
            run.model, run.params, control, params, jnp.asarray(guides), scale=scale
        )
        evaluate("controlnet", lambda x_T, rng, f=model_fn: ddim(f, x_T), scale=scale)
    guide_row = {"method": "guides", "l2_layout": 0.0, **common.measure(guides, labels)}
    results["guides"] = guide_row
    results["intact"] = common.measure(images, labels)
    results["reference"] = common.reference_metrics(run.shape[0])
    return common.finish(args.out, NAME, results, t0, lambda r, path: plot(r, shown, path))


def train_controlnet(run, control, data_it, *, steps: int, lr: float, seed: int):
    """L_simple (the run's prediction) of the controlled model, trained in the ControlNet's
    params only; returns (params, record: seconds, loss curve)."""
    d = run.config.diffusion
    x = jnp.zeros((1, *run.shape))
    t = jnp.zeros((1,), jnp.int32)
    init = control.init(jax.random.PRNGKey(seed), x, t, x)["params"]
    params = controlnet_params_from_unet(init, run.params)
    tx = make_optimizer(
        learning_rate=lr, num_steps=steps, warmup_steps=0, schedule="constant", grad_clip=1.0
    )
    opt_state = tx.init(params)

    def loss_fn(params, x0, rng):
        cond = pixelate(x0, BLOCK)
        model_fn = controlled_model_fn(run.model, run.params, control, params, cond)
        loss, _ = losses.diffusion_loss(
            run.schedule, model_fn, x0, rng, prediction=d.prediction, variance=d.variance
        )
        return loss

    @jax.jit
    def step(params, opt_state, x0, rng):
        loss, grads = jax.value_and_grad(loss_fn)(params, x0, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = jax.random.fold_in(jax.random.PRNGKey(seed), 0xC7)
    curve, pending, t0 = [], [], time.perf_counter()
    for k in range(steps):  # a Python loop: conv gradients inside lax.scan are slow on CPU
        x0 = jnp.asarray(next(data_it)["image"])
        params, opt_state, loss = step(params, opt_state, x0, jax.random.fold_in(rng, k))
        pending.append(loss)
        if len(pending) == LOG_EVERY or k == steps - 1:
            curve.append([k + 1, float(np.mean(jax.device_get(pending)))])
            pending = []
    jax.block_until_ready(params)
    if not np.isfinite(curve[-1][1]):
        raise FloatingPointError(f"ControlNet loss is not finite: {curve[-1]}")
    record = {
        "train_seconds": time.perf_counter() - t0,
        "train_steps": steps,
        "learning_rate": lr,
        "final_loss": curve[-1][1],
        "loss_curve": curve,
    }
    return params, record


def plot(results: dict, shown: dict, path: str) -> None:
    plt = common.pyplot()
    fig = plt.figure(figsize=(14, 1.2 * len(shown) + 4))
    grid = fig.add_gridspec(len(shown) + 3, 2)
    ax = fig.add_subplot(grid[: len(shown), :])
    title = "pixelated guides: ControlNet (trained) vs SDEdit (training-free)"
    common.image_rows(ax, list(shown.items()), title)
    ax2 = fig.add_subplot(grid[len(shown) :, 0])
    for method, marker in (("sdedit", "s"), ("controlnet", "o"), ("unconditional", "x")):
        rows = [r for r in results["rows"] if r["method"] == method]
        ax2.plot([r["l2_layout"] for r in rows], [r["fd_test"] for r in rows], marker, label=method)
    ax2.set_xlabel("RMS to the guide after pixelation (lower = more faithful)")
    ax2.set_ylabel("fd_test (to the digits the guides come from)")
    ax2.set_yscale("log")
    ax2.legend(fontsize=8)
    ax3 = fig.add_subplot(grid[len(shown) :, 1])
    steps, loss = zip(*results["training"]["loss_curve"], strict=True)
    ax3.plot(steps, loss)
    ax3.set_xlabel("ControlNet training step")
    ax3.set_title("L_simple of the controlled model")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
