"""The `jax-diffusion` command line."""

from __future__ import annotations

import argparse
import json
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jax-diffusion", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the diffusion math end to end on CPU (no training)")
    demo.add_argument("--num-timesteps", type=int, default=1000)
    demo.add_argument("--batch", type=int, default=256)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
