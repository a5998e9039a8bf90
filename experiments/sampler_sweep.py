"""Experiment 2: sample quality vs number of steps for DDPM, DDIM (eta 0 and 1), DPM-Solver++.

Run:  taskset -c 1 python3 -m experiments.sampler_sweep --workdir /tmp/exp --out experiments/results
Expect: experiments/results/sampler_sweep.{json,png}: Frechet distance to the train digits,
precision and recall of each sampler at 10, 20, 50, 100 and 1000 steps, all from the eps
model of experiment 1 (trained first if `experiments.parameterization` has not run) and the
same x_T per row. DDPM is ancestral sampling on the respaced schedule (sigma^2 = beta_tilde of
the respaced chain), DDIM and DDPM use trailing spacing (start at t = T - 1), DPM-Solver++(2M)
its own grid (999 steps for the 1000 row). The 1000-step rows use fewer samples (see
--long-samples); they are compared with 100-step rows drawn at the same count.
"""

from __future__ import annotations

import sys
import time

from experiments import common

NAME = "sampler_sweep"
SAMPLERS = {  # label: (sampler, eta)
    "ddpm": ("ddpm", 0.0),
    "ddim_eta0": ("ddim", 0.0),
    "ddim_eta1": ("ddim", 1.0),
    "dpm++": ("dpm++", 0.0),
}
STEPS = (10, 20, 50, 100, 1000)


def main(argv: list[str] | None = None) -> dict:
    parser = common.parse_args(__doc__.splitlines()[0], num_samples=500, bpd_examples=None)
    parser.add_argument(
        "--long-samples", type=common.SAMPLE_COUNT, default=100, help="samples at >= 1000 steps"
    )
    args = common.parse(parser, argv)
    common.setup_compile_cache()
    t0 = time.perf_counter()
    steps = (2, 3) if args.smoke else STEPS
    long_steps = steps[-1]
    num = 8 if args.smoke else args.num_samples
    num_long = 8 if args.smoke else args.long_samples
    config = common.make_config({}, steps=args.steps, smoke=args.smoke)
    workdir = common.run_dir(args.workdir, "param_eps", args.smoke)
    info = common.train_run(workdir, config)
    run = common.load(workdir)
    results: dict = {
        "command": "python3 -m experiments.sampler_sweep " + " ".join(argv or sys.argv[1:]),
        "run": common.run_info(config, info),
        "num_samples": num,
        "num_samples_long": num_long,
        "rows": [],
    }
    jobs = [(label, n, num) for label in SAMPLERS for n in steps if n != long_steps]
    if not args.smoke:  # the long rows, and the second-longest at the same sample count
        jobs += [(label, n, num_long) for label in SAMPLERS for n in (steps[-2], long_steps)]
    for label, n, count in jobs:
        sampler, eta = SAMPLERS[label]
        samples, seconds = common.draw_samples(
            run, num=count, sampler=sampler, num_steps=n, eta=eta, seed=args.seed
        )
        row = {"sampler": label, "steps": n, "num_samples": count, **common.measure(samples)}
        row["seconds"] = seconds
        results["rows"].append(row)
        common.log(f"{label} x {n} (N={count}): fd_train {row['fd_train']:.2f} ({seconds:.0f} s)")
    results["reference"] = common.reference_metrics(run.shape[0])
    return common.finish(args.out, NAME, results, t0, plot)


def plot(results: dict, path: str) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key, ax in zip(("fd_train", "precision", "recall"), axes, strict=True):
        for label in SAMPLERS:
            for count, style in (
                (results["num_samples"], "-o"),
                (results["num_samples_long"], ":x"),
            ):
                rows = [
                    r
                    for r in results["rows"]
                    if r["sampler"] == label and r["num_samples"] == count
                ]
                if not rows:
                    continue
                color = {"ddpm": "C0", "ddim_eta0": "C1", "ddim_eta1": "C2", "dpm++": "C3"}[label]
                ax.plot(
                    [r["steps"] for r in rows],
                    [r[key] for r in rows],
                    style,
                    color=color,
                    label=f"{label} (N={count})",
                )
        ax.set_xscale("log")
        ax.set_xlabel("sampling steps (model calls)")
        ax.set_title(key + (" (lower is better)" if key == "fd_train" else ""))
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
