"""Experiment 3: reverse variance (beta vs beta_tilde), learned variance + hybrid loss, min-SNR.

Run:  taskset -c 1 python3 -m experiments.variance_loss --workdir /tmp/exp \
          --out experiments/results
Expect: experiments/results/variance_loss.{json,png}.
  Part A (sampling only, the eps model of experiment 1): sigma_t^2 = beta_t ('fixed_large') vs
  beta_tilde_t ('fixed_small') in bits/dim on test digits and in the quality of DDPM ancestral
  samples at 100 respaced steps and at the full 1000 steps (fewer samples).
  Part B (training, equal compute): L_simple with fixed beta_tilde (the experiment-1 eps model)
  vs learned_range variance with the hybrid loss L_simple + 0.001 L_vlb (Nichol & Dhariwal
  2021) vs min-SNR-5 weighting (Hang et al. 2023), all eps prediction: bits/dim, DDIM-50 and
  DDPM-100 sample quality, and the test denoising error per t bucket.
"""

from __future__ import annotations

import sys
import time

from experiments import common

NAME = "variance_loss"
MODELS = {  # name: overrides of the default config (eps prediction)
    "simple": {},
    "hybrid_learned": {"diffusion.variance": "learned_range"},
    "min_snr5": {"diffusion.weighting": "min_snr", "diffusion.min_snr_gamma": 5.0},
}
WORKDIRS = {"simple": "param_eps", "hybrid_learned": "hybrid_learned", "min_snr5": "min_snr5"}


def main(argv: list[str] | None = None) -> dict:
    parser = common.parse_args(__doc__.splitlines()[0], num_samples=500)
    parser.add_argument(
        "--long-samples", type=common.SAMPLE_COUNT, default=100, help="samples at 1000 steps"
    )
    args = common.parse(parser, argv)
    common.setup_compile_cache()
    t0 = time.perf_counter()
    num = 8 if args.smoke else args.num_samples
    num_long = 8 if args.smoke else args.long_samples
    bpd_n = 4 if args.smoke else args.bpd_examples
    short = 5 if args.smoke else 100
    results: dict = {
        "command": "python3 -m experiments.variance_loss " + " ".join(argv or sys.argv[1:]),
        "num_samples": num,
        "num_samples_long": num_long,
        "bpd_examples": bpd_n,
        "variance": {},
        "models": {},
    }
    runs = {}
    for name, overrides in MODELS.items():
        config = common.make_config(overrides, steps=args.steps, smoke=args.smoke)
        workdir = common.run_dir(args.workdir, WORKDIRS[name], args.smoke)
        common.log(f"{name}: training in {workdir}")
        info = common.train_run(workdir, config)
        runs[name] = (common.load(workdir), common.run_info(config, info))

    # Part A: beta vs beta_tilde on the L_simple eps model.
    run = runs["simple"][0]
    long = run.schedule.num_timesteps
    for variance in ("fixed_small", "fixed_large"):
        entry = common.bits_per_dim(run, num_examples=bpd_n, seed=args.seed, variance=variance)
        # smoke: the respaced chain only (the full chain is one more program per variance)
        for n, count in ((short, num),) if args.smoke else ((short, num), (long, num_long)):
            samples, seconds = common.draw_samples(
                run, num=count, sampler="ddpm", num_steps=n, variance=variance, seed=args.seed
            )
            entry[f"ddpm{n}"] = {"num_samples": count, **common.measure(samples)}
            entry[f"ddpm{n}"]["seconds"] = seconds
        results["variance"][variance] = entry
        common.log(f"variance {variance}: {entry}")

    # Part B: the three training objectives.
    for name, (run, info) in runs.items():
        entry = {"run": info}
        entry.update(common.bits_per_dim(run, num_examples=bpd_n, seed=args.seed))
        for sampler, n in (("ddim", 50), ("ddpm", short)):
            samples, seconds = common.draw_samples(
                run, num=num, sampler=sampler, num_steps=n, seed=args.seed
            )
            entry[f"{sampler}{n}"] = {**common.measure(samples), "seconds": seconds}
        entry["loss_by_t"] = common.loss_by_t_bucket(
            run, draws=1 if args.smoke else 4, seed=args.seed
        )
        results["models"][name] = entry
        common.log(f"{name}: bpd {entry['bpd']:.3f} ddim50 {entry['ddim50']}")
    results["reference"] = common.reference_metrics(run.shape[0])
    return common.finish(args.out, NAME, results, t0, plot)


def plot(results: dict, path: str) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    ax = axes[0]
    variances = list(results["variance"])
    labels = [k for k in results["variance"][variances[0]] if k.startswith("ddpm")]
    for i, variance in enumerate(variances):
        entry = results["variance"][variance]
        ax.bar(
            [j + 0.4 * i for j in range(len(labels))],
            [entry[k]["fd_train"] for k in labels],
            0.4,
            label=f"{variance} ({entry['bpd']:.2f} bits/dim)",
        )
    ax.set_xticks([j + 0.2 for j in range(len(labels))], labels)
    ax.set_ylabel("Frechet distance to train")
    ax.set_title("eps model: sigma^2 = beta_tilde (small) vs beta (large)")
    ax.legend(fontsize=8)

    ax = axes[1]
    names = list(results["models"])
    for i, key in enumerate(k for k in results["models"][names[0]] if k[:4] in ("ddim", "ddpm")):
        ax.bar(
            [j + 0.3 * i for j in range(len(names))],
            [results["models"][n][key]["fd_train"] for n in names],
            0.3,
            label=key,
        )
    ax.set_xticks(
        [j + 0.15 for j in range(len(names))],
        [f"{n}\n{results['models'][n]['bpd']:.2f} bits/dim" for n in names],
    )
    ax.set_ylabel("Frechet distance to train")
    ax.set_title("training objective (equal compute)")
    ax.legend(fontsize=8)

    ax = axes[2]
    for name in names:
        b = results["models"][name]["loss_by_t"]
        edges = b["bucket_edges"]
        centres = [(lo + hi) / 2 for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
        ax.plot(centres, b["eps_mse"], marker="o", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("t (bucket centre)")
    ax.set_title("test eps-MSE per t bucket")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
