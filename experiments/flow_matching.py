"""Experiment 7: flow matching (rectified flow) vs v-prediction diffusion at few sampling steps.

Run:  taskset -c 1 python3 -m experiments.flow_matching --workdir /tmp/exp --out experiments/results
Expect: experiments/results/flow_matching.{json,png}: Frechet distance to the train digits,
precision and recall against the number of network evaluations (NFE 2 to 32) for three models
trained alike (the default config, 2000 steps): the v-prediction diffusion model of experiment 1
and two flow-matching models (`diffusion.process='flow'`, training times uniform or
logit-normal). Each is sampled by DDIM (eta 0, trailing; for a flow model this runs through
`models.FlowDenoiser` and is Euler's method at the cosine schedule's times) and DPM-Solver++(2M)
as every run's config does; the flow models also by `flow_sample` with Euler and Heun steps at
uniform times (Heun at half the steps: equal NFE), all clipping x0_hat to [-1, 1] as the
config asks. Plus bits/dim of the test digits through
each model's denoiser (the discrete VLB) and, for the flow models, their own likelihood by the
ODE (`flow_bits_per_dim`, dequantized). The seed's claim under test: straight paths "achieve
high-quality generation in very few steps".
"""

from __future__ import annotations

import sys
import time

import jax

import jax_diffusion as jd
from experiments import common

NAME = "flow_matching"
MODELS = {  # label: config overrides
    "v": {"diffusion.prediction": "v"},
    "flow_uniform": {"diffusion.prediction": "v", "diffusion.process": "flow"},
    "flow_logit_normal": {
        "diffusion.prediction": "v",
        "diffusion.process": "flow",
        "diffusion.flow_time_distribution": "logit_normal",
    },
}
WORKDIRS = {"v": "param_v"}  # experiment 1's v model, reused where it has run
NFES = (2, 4, 8, 16, 32)


def draw_flow(run: common.Run, *, num: int, method: str, nfe: int, seed: int, batch_size=500):
    """`flow_sample` of a flow run's EMA velocity at uniform times; x_1 per batch as
    `common.draw_samples` draws x_T (batch i from fold_in(PRNGKey(seed), i)), so every sampler
    of a row starts from the same noise."""
    steps = nfe // 2 if method == "heun" else nfe

    @jax.jit
    def fn(params, x_1):
        def velocity(x, t):
            return run.model.apply({"params": params}, x, t, None, method="velocity")

        clip = run.config.sample.clip_denoised  # as every other row: x0_hat in [-1, 1]
        return jd.flow_sample(velocity, x_1, num_steps=steps, method=method, clip_denoised=clip)

    return common.draw_batches(
        lambda x_1, _: fn(run.params, x_1), run, num=num, seed=seed, batch_size=batch_size
    )


def main(argv: list[str] | None = None) -> dict:
    parser = common.parse_args(__doc__.splitlines()[0], num_samples=500, bpd_examples=50)
    args = common.parse(parser, argv)
    common.setup_compile_cache()
    t0 = time.perf_counter()
    nfes = (2,) if args.smoke else NFES  # smoke: one program per sampler
    num = 8 if args.smoke else args.num_samples
    bpd_n = 2 if args.smoke else args.bpd_examples
    results: dict = {
        "command": "python3 -m experiments.flow_matching " + " ".join(argv or sys.argv[1:]),
        "num_samples": num,
        "nfes": list(nfes),
        "models": {},
        "rows": [],
    }
    for label, overrides in MODELS.items():
        config = common.make_config(overrides, steps=args.steps, smoke=args.smoke)
        workdir = common.run_dir(args.workdir, WORKDIRS.get(label, label), args.smoke)
        common.log(f"{label}: training in {workdir}")
        info = common.train_run(workdir, config)
        run = common.load(workdir)
        results["models"][label] = {
            "run": {**common.run_info(config, info), "process": config.diffusion.process},
            **common.bits_per_dim(run, num_examples=bpd_n, seed=args.seed),
        }
        if label != "v":
            ode, _ = common.ode_bits_per_dim(run, num_examples=bpd_n, seed=args.seed)
            results["models"][label].update(ode)
        methods = ["ddim", "dpm++"] + (["euler", "heun"] if label != "v" else [])
        for method in methods:
            for nfe in nfes:
                if method in ("ddim", "dpm++"):
                    samples, seconds = common.draw_samples(
                        run, num=num, sampler=method, num_steps=nfe, seed=args.seed
                    )
                else:
                    samples, seconds = draw_flow(
                        run, num=num, method=method, nfe=nfe, seed=args.seed
                    )
                row = {
                    "model": label,
                    "method": method,
                    "nfe": nfe,
                    **common.measure(samples),
                    "sample_seconds": seconds,
                }
                results["rows"].append(row)
                common.log(
                    f"{label} {method} NFE {nfe}: fd_train {row['fd_train']:.2f} "
                    f"P {row['precision']:.3f} R {row['recall']:.3f}"
                )
    results["reference"] = common.reference_metrics(8)
    return common.finish(args.out, NAME, results, t0, plot)


def plot(results: dict, path: str) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    styles = {"ddim": "-", "dpm++": "--", "euler": ":", "heun": "-."}
    colors = {"v": "C0", "flow_uniform": "C1", "flow_logit_normal": "C2"}
    curves: dict = {}
    for row in results["rows"]:
        curves.setdefault((row["model"], row["method"]), []).append(row)
    for (model, method), rows in curves.items():
        nfe = [r["nfe"] for r in rows]
        kw = dict(ls=styles[method], color=colors[model], marker="o", label=f"{model} {method}")
        for ax, key in zip(axes, ("fd_train", "precision", "recall"), strict=True):
            ax.plot(nfe, [r[key] for r in rows], **kw)
    for ax, key in zip(axes, ("fd_train", "precision", "recall"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_title(key)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
