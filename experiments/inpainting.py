"""Experiment 9: inpainting (RePaint) and image-to-image (SDEdit) on held-out digits.

Run:  taskset -c 1 python3 -m experiments.inpainting --workdir /tmp/exp --out experiments/results
Expect: experiments/results/inpainting.{json,png}: the v model of experiment 1 (configs/
default.py with diffusion.prediction = 'v', trained first if it has not run), unconditional,
asked to complete the 297 test digits (never trained on; --num-samples n takes the first n) with
half of each image hidden (the right half; the bottom half), by `repaint_sample` on 100 respaced
steps: plain replacement (jump_n_sample 1) against RePaint's resampling (jump_length 10,
jump_n_sample 4 and 10). Reported per method: class_accuracy (the shipped digits classifier on
the completed image names the digit's true label: does the completion agree with the visible
half?), the mean squared error of the generated half against the hidden truth, and fd_test /
precision / recall of the completed images; the baselines are the intact digits and the hidden
half left as background (-1).

SDEdit (`sdedit`, 100 DDIM steps, eta 0): guides are the test digits pixelated to 4x4 blocks
of their mean (coarse "strokes", out of the data distribution); strength 0.2 to 1.0 traces the
paper's trade-off between faithfulness (distance to the guide, class_accuracy of its label)
and realism (fd_train).
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from jax_diffusion import data as data_lib
from jax_diffusion import editing
from jax_diffusion.samplers import sampling_timesteps

NAME = "inpainting"
MASKS = ("right_half", "bottom_half")
METHODS = {"replacement": 1, "repaint_r4": 4, "repaint_r10": 10}  # jump_n_sample
JUMP_LENGTH = 10
STRENGTHS = (0.2, 0.4, 0.6, 0.8, 1.0)


def main(argv: list[str] | None = None) -> dict:
    parser = common.parse_args(__doc__.splitlines()[0], num_samples=297, bpd_examples=None)
    parser.add_argument(
        "--sample-steps", type=common._positive_int, default=100, help="respaced chain length"
    )
    args = common.parse(parser, argv)
    common.setup_compile_cache()
    t0 = time.perf_counter()
    config = common.make_config({"diffusion.prediction": "v"}, steps=args.steps, smoke=args.smoke)
    workdir = common.run_dir(args.workdir, "param_v", args.smoke)  # experiment 1's v model
    common.log(f"model: training in {workdir}")
    info = common.train_run(workdir, config)
    run = common.load(workdir)
    T = run.schedule.num_timesteps
    n_steps = min(args.sample_steps, T)
    images, labels = data_lib.load_digits(run.shape[0], "test")
    num = 8 if args.smoke else args.num_samples  # the first num test digits (all 297 at most)
    images, labels = images[:num], labels[:num]
    # smoke: fewer programs to compile (each chain is its own scan)
    methods = {"replacement": 1, "repaint_r4": 2} if args.smoke else METHODS
    masks = MASKS[:1] if args.smoke else MASKS
    strengths = (0.5, 1.0) if args.smoke else STRENGTHS
    results: dict = {
        "command": "python3 -m experiments.inpainting " + " ".join(argv or sys.argv[1:]),
        "run": common.run_info(config, info),
        "num_images": len(images),
        "sample_steps": n_steps,
        "jump_length": JUMP_LENGTH,
        "inpainting": [],
        "sdedit": [],
    }
    timesteps = sampling_timesteps(T, n_steps, "trailing")
    d = run.config.diffusion

    def model_fn(x, t):
        return run.apply(run.params, x, t)

    shown = {}
    for mask_name in masks:
        mask = make_mask(mask_name, run.shape)
        hidden = mask == 0
        baselines = {
            "intact": images,
            "hidden_as_background": np.where(hidden, -1.0, images).astype(np.float32),
        }
        for name, filled in baselines.items():
            row = {"mask": mask_name, "method": name, **measure(filled, images, labels, hidden)}
            results["inpainting"].append(row)
        for name, jump_n_sample in methods.items():

            @jax.jit
            def fn(x_T, rng, jump_n_sample=jump_n_sample, mask=mask):
                return editing.repaint_sample(
                    model_fn,
                    run.schedule,
                    jnp.asarray(images),
                    mask,
                    x_T,
                    rng,
                    jump_length=JUMP_LENGTH,
                    jump_n_sample=jump_n_sample,
                    timesteps=timesteps,
                    prediction=d.prediction,
                    variance=d.variance,
                    clip_denoised=run.config.sample.clip_denoised,
                )

            filled, seconds = common.draw_batches(
                fn, run, num=len(images), seed=args.seed, batch_size=len(images)
            )
            walk = editing.repaint_timesteps(n_steps, JUMP_LENGTH, jump_n_sample)
            row = {
                "mask": mask_name,
                "method": name,
                "jump_n_sample": jump_n_sample,
                "model_calls": int(np.sum(np.diff(walk) < 0)),
                **measure(filled, images, labels, hidden),
                "sample_seconds": seconds,
            }
            results["inpainting"].append(row)
            shown[mask_name, name] = filled[:10]
            common.log(
                f"{mask_name} {name}: accuracy {row['class_accuracy']:.3f}, "
                f"mse {row['mse_hidden']:.4f}, fd_test {row['fd_test']:.2f} ({seconds:.0f} s)"
            )
        shown[mask_name, "hidden_as_background"] = baselines["hidden_as_background"][:10]

    guides = pixelate(images, 4)
    for strength in strengths:

        @jax.jit
        def edit(x_T, rng, strength=strength):
            del x_T  # sdedit draws its own noise from rng
            return editing.sdedit(
                model_fn,
                run.schedule,
                jnp.asarray(guides),
                rng,
                strength=strength,
                num_steps=n_steps,
                spacing="trailing",
                prediction=d.prediction,
                variance=d.variance,
                clip_denoised=run.config.sample.clip_denoised,
            )

        edited, seconds = common.draw_batches(
            edit, run, num=len(images), seed=args.seed, batch_size=len(images)
        )
        row = {
            "strength": strength,
            "t0": int(editing.sdedit_timesteps(run.schedule, strength, n_steps, "trailing")[0]),
            "l2_to_guide": float(np.sqrt(np.mean((edited - guides) ** 2))),
            **common.measure(edited, labels),
            "sample_seconds": seconds,
        }
        results["sdedit"].append(row)
        shown["sdedit", strength] = edited[:10]
        common.log(
            f"sdedit {strength}: l2 {row['l2_to_guide']:.3f}, accuracy "
            f"{row['class_accuracy']:.3f}, fd_train {row['fd_train']:.2f}"
        )
    guide_row = {"strength": 0.0, "l2_to_guide": 0.0, **common.measure(guides, labels)}
    results["sdedit_guides"] = guide_row
    shown["sdedit", 0.0] = guides[:10]
    results["reference"] = common.reference_metrics(run.shape[0])
    results["intact_accuracy"] = common.measure(images, labels)["class_accuracy"]
    shown["truth", ""] = images[:10]
    return common.finish(args.out, NAME, results, t0, lambda r, path: plot(r, shown, path))


def make_mask(name: str, shape) -> np.ndarray:
    """[H, W, 1] float32, 1 = kept (known) pixel."""
    h, w = shape[0], shape[1]
    mask = np.ones((h, w, 1), np.float32)
    if name == "right_half":
        mask[:, w // 2 :] = 0.0
    elif name == "bottom_half":
        mask[h // 2 :] = 0.0
    else:
        raise ValueError(f"mask must be one of {MASKS}; got {name!r}")
    return mask


def pixelate(images, block: int):
    """Each block x block tile replaced by its mean (a coarse, off-distribution guide).

    images: [N, H, W, C], a NumPy or a JAX array (also traced: the ControlNet's training step
    builds its conditions with it); the result is of the same kind, float32."""
    n, h, w, c = images.shape
    tiles = images.reshape(n, h // block, block, w // block, block, c).mean(axis=(2, 4))
    return tiles.repeat(block, axis=1).repeat(block, axis=2).astype(np.float32)


def measure(filled, images, labels, hidden) -> dict[str, float]:
    """common.measure (with the true labels) plus the squared error on the hidden pixels."""
    hidden_b = np.broadcast_to(hidden, images.shape)
    mse = float(np.mean((np.clip(filled, -1, 1)[hidden_b] - images[hidden_b]) ** 2))
    return {"mse_hidden": mse, **common.measure(np.asarray(filled), labels)}


def plot(results: dict, shown: dict, path: str) -> None:
    """shown[(row kind, method or strength)]: [10, H, W, 1] images to draw, one strip each."""
    plt = common.pyplot()
    rows = [("truth", shown["truth", ""])]
    for mask in (m for m in MASKS if (m, "hidden_as_background") in shown):
        rows.append((f"{mask}\nhidden as background", shown[mask, "hidden_as_background"]))
        rows += [
            (f"{mask}\n{m}", x)
            for (k, m), x in shown.items()
            if k == mask and m != "hidden_as_background"
        ]
    sd = sorted(((s, x) for (k, s), x in shown.items() if k == "sdedit"), key=lambda p: p[0])
    rows += [(f"sdedit\nstrength {s:g}" if s else "sdedit guide", x) for s, x in sd]
    fig = plt.figure(figsize=(14, 1.3 * len(rows) + 3.5))
    grid = fig.add_gridspec(len(rows) + 3, 1)
    ax = fig.add_subplot(grid[: len(rows), 0])
    title = "test digits: inpainted halves (RePaint) and SDEdit from 4x4-pixelated guides"
    common.image_rows(ax, rows, title, fontsize=7)
    ax2 = fig.add_subplot(grid[len(rows) :, 0])
    s_rows = results["sdedit"]
    ax2.plot([r["l2_to_guide"] for r in s_rows], [r["fd_train"] for r in s_rows], "-o")
    for r in s_rows:
        ax2.annotate(f"{r['strength']:g}", (r["l2_to_guide"], r["fd_train"]), fontsize=8)
    ax2.set_xlabel("RMS distance to the guide (faithfulness, lower = more faithful)")
    ax2.set_ylabel("fd_train (realism)")
    ax2.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
