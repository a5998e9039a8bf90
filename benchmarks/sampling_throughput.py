"""Sampling throughput: images/s of a jitted `ddim_sample` (one lax.scan) per config and batch.

Run:  python benchmarks/sampling_throughput.py [--configs digits8,digits16,cifar]
                                              [--batches 64,256] [--steps 50]
                                              [--dtype bfloat16] [--quick]

For each (config, batch) it jits `samplers.ddim_sample` over the network of the config (the
train_throughput configs, randomly initialised: the speed does not depend on the values) with
`--steps` DDIM steps, timing trace + lower and compile, then whole sampling runs
(block_until_ready, median of repeats after a warm-up run). FLOP per run is XLA's
`cost_analysis()` of one jitted network call at that batch times the number of steps (the
sampler's own elementwise updates are negligible, and XLA's cost analysis counts a scan body
once, so the scan's own figure would be wrong), shown as FLOP/s and as a fraction of this
machine's matmul peak in the compute dtype (`--dtype`, the network's `model.dtype`): on a GPU
or TPU with bfloat16, the sampler's MFU.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from common import (  # benchmarks/common.py
    add_dtype_argument,
    load,
    machine,
    median_times,
    parse_configs_batches,
    print_peak,
)
from train_throughput import CONFIG, CONFIGS, _flops

from jax_diffusion import samplers
from jax_diffusion.backend import compiler_options
from jax_diffusion.cli import load_config
from jax_diffusion.models import make_model_fn
from jax_diffusion.train import create_model, get_schedule


def run_case(name: str, batch: int, num_steps: int, dtype: str, repeats: int) -> dict:
    """Times one (config, batch): compile seconds, seconds per sampling run, FLOP per run."""
    overrides, channels = CONFIGS[name]
    config = load_config(CONFIG, [*overrides, f"model.dtype={dtype!r}"])
    size = config.data.image_size
    shape = (size, size, channels)
    model = create_model(config, channels=channels)
    schedule = get_schedule(config.diffusion)
    x = jnp.zeros((1, *shape), jnp.float32)
    init = jax.jit(model.init, compiler_options=compiler_options(run_once=True))
    params = init(jax.random.key(0), x, jnp.zeros((1,), jnp.int32))["params"]
    num_params = sum(p.size for p in jax.tree.leaves(params))
    x_T = jax.random.normal(jax.random.key(1), (batch, *shape), jnp.float32)
    options = compiler_options()

    def sample(params, x_T):
        model_fn = make_model_fn(model, params)
        return samplers.ddim_sample(model_fn, schedule, x_T, num_steps=num_steps)

    start = time.perf_counter()
    lowered = jax.jit(sample, compiler_options=options).lower(params, x_T)
    mid = time.perf_counter()
    compiled = lowered.compile()
    lower_s, compile_s = mid - start, time.perf_counter() - mid

    # FLOP of one network call at this batch (the scan's cost analysis counts its body once)
    t = jnp.zeros((batch,), jnp.int32)
    call = jax.jit(lambda p, x, t: make_model_fn(model, p)(x, t), compiler_options=options)
    flop_call = _flops(call.lower(params, x_T, t).compile())

    run_s = median_times({"run": lambda: compiled(params, x_T)}, repeats)["run"]
    return {
        "size": size,
        "channels": channels,
        "params": num_params,
        "lower_s": lower_s,
        "compile_s": compile_s,
        "run_s": run_s,
        "flop": None if flop_call is None else flop_call * num_steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="digits8,digits16,cifar", help=", ".join(CONFIGS))
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps per run")
    add_dtype_argument(parser)
    parser.add_argument("--quick", action="store_true", help="2 timed runs instead of 5")
    args = parser.parse_args()
    names, batches = parse_configs_batches(parser, args, CONFIGS)
    for name in names:
        num_timesteps = load_config(CONFIG, CONFIGS[name][0]).diffusion.num_timesteps
        if not 1 <= args.steps <= num_timesteps:
            parser.error(
                f"--steps must be in [1, {num_timesteps}] (the {name} config's "
                f"diffusion.num_timesteps); got {args.steps}"
            )
    repeats = 2 if args.quick else 5

    print(f"# sampling_throughput: {machine()}")
    peak = print_peak(args.dtype)
    print(
        f"# ddim_sample, {args.steps} steps, one lax.scan; model.dtype={args.dtype}; "
        f"median of {repeats} runs after a warm-up run"
    )
    header = (
        "| config | batch | params | lower s | compile s | GFLOP/run | run s | img/s | GFLOP/s "
        "| % peak | load |"
    )
    print()
    print(header)
    print("|" + "|".join("---" for _ in range(header.count("|") - 1)) + "|")
    for name in names:
        for batch in batches:
            r = run_case(name, batch, args.steps, args.dtype, repeats)
            gflop = r["flop"] / 1e9 if r["flop"] else float("nan")
            print(
                f"| {name} {r['size']}x{r['size']}x{r['channels']} | {batch} | {r['params']:,} "
                f"| {r['lower_s']:.2f} | {r['compile_s']:.2f} | {gflop:.1f} | {r['run_s']:.3f} "
                f"| {batch / r['run_s']:.1f} | {gflop / r['run_s']:.1f} "
                f"| {100 * gflop * 1e9 / r['run_s'] / peak:.0f}% | {load()} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
