"""Experiment 4: classifier-free guidance on class-conditional digits: accuracy vs diversity.

Run:  taskset -c 1 python3 -m experiments.guidance --workdir /tmp/exp --out experiments/results
Expect: experiments/results/guidance.{json,png}: the digits_cond model (label dropout 0.1)
sampled with DDIM-50 at guidance scales w = 0, 1, 2, 3, 5, 8 (the library's convention:
out = out_null + w (out_cond - out_null); 0 is the unconditional model, 1 the plain
conditional one), balanced labels. Per scale: the digits classifier's accuracy on the intended
labels, Frechet distance to the train digits, precision / recall, the inception score and the
mean within-class feature variance (diversity; the real train digits' value is the reference).
Then the guided output rescaled towards the conditional branch's std (guidance_rescale phi, Lin
et al. 2024, section 3.4: against the over-exposure of large w) at w = 3, 5, 8.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from experiments import common

NAME = "guidance"
SCALES = (0.0, 1.0, 2.0, 3.0, 5.0, 8.0)
RESCALED = ((3.0, 0.7), (5.0, 0.7), (8.0, 0.7), (8.0, 1.0))  # (w, phi); the paper: 7.5, 0.7


def main(argv: list[str] | None = None) -> dict:
    parser = common.parse_args(__doc__.splitlines()[0], num_samples=500, bpd_examples=None)
    args = common.parse(parser, argv)
    common.setup_compile_cache()
    t0 = time.perf_counter()
    num = 20 if args.smoke else args.num_samples
    scales = (0.0, 3.0) if args.smoke else SCALES
    config = common.make_config({}, steps=args.steps, smoke=args.smoke, conditional=True)
    workdir = common.run_dir(args.workdir, "digits_cond", args.smoke)
    common.log(f"training in {workdir}")
    info = common.train_run(workdir, config)
    run = common.load(workdir)
    labels = np.arange(num) % run.num_classes
    results: dict = {
        "command": "python3 -m experiments.guidance " + " ".join(argv or sys.argv[1:]),
        "run": {**common.run_info(config, info), "class_dropout": config.model.class_dropout},
        "sampler": "ddim, 50 steps, eta 0, trailing spacing, clip_denoised",
        "num_samples": num,
        "rows": [],
        "rescaled_rows": [],
    }
    grids = {}
    for w in scales:
        samples, seconds = common.draw_samples(
            run, num=num, sampler="ddim", num_steps=50, guidance=w, labels=labels, seed=args.seed
        )
        row = {"guidance": w, **common.measure(samples, labels), "seconds": seconds}
        results["rows"].append(row)
        grids[w] = samples[:20]
        common.log(f"w={w}: {row}")
    for w, phi in RESCALED[:1] if args.smoke else RESCALED:
        samples, seconds = common.draw_samples(
            run, num=num, sampler="ddim", num_steps=50, guidance=w, guidance_rescale=phi,
            labels=labels, seed=args.seed,
        )  # fmt: skip
        row = {"guidance": w, "guidance_rescale": phi, **common.measure(samples, labels)}
        results["rescaled_rows"].append({**row, "seconds": seconds})
        common.log(f"w={w} phi={phi}: {row}")
    results["reference"] = common.reference_metrics(run.shape[0])
    return common.finish(args.out, NAME, results, t0, lambda r, path: plot(r, grids, path))


def plot(results: dict, grids: dict, path: str) -> None:
    plt = common.pyplot()
    fig = plt.figure(figsize=(16, 7))
    rows = results["rows"]
    w = [r["guidance"] for r in rows]
    ref = results["reference"]["within_class_var_train"]
    panels = (
        ("class_accuracy", "accuracy of the intended label", None),
        ("fd_train", "Frechet distance to train", None),
        ("recall", "precision / recall", "precision"),
        ("within_class_var", "within-class feature variance", None),
    )
    for i, (key, title, extra) in enumerate(panels):
        ax = fig.add_subplot(2, 4, i + 1)
        ax.plot(w, [r[key] for r in rows], "o-", label=key)
        if extra:
            ax.plot(w, [r[extra] for r in rows], "s--", label=extra)
            ax.legend(fontsize=8)
        if key == "within_class_var":
            ax.axhline(ref, color="gray", ls=":", label="train digits")
            ax.legend(fontsize=8)
        ax.set_xlabel("guidance scale w")
        ax.set_title(title)
    ax = fig.add_subplot(2, 1, 2)
    common.sample_strips(ax, grids, w, "w", "guidance scale")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
