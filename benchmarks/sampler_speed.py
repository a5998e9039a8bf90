"""DDIM sampling speed: one `lax.scan` (`ddim_sample`) vs a Python loop of jitted `ddim_step`s.

Run:  python benchmarks/sampler_speed.py [--quick] [--repeats N]
On a shared CPU pin it to one core (`taskset -c 0 python benchmarks/sampler_speed.py`): the
header prints the cores the process may run on.

Prints three tables:
  1. wall time of a whole deterministic DDIM run (median of repeats after a warm-up run, with
     block_until_ready; the scan, loop and bare-model repeats interleaved so that a change of
     load hits all three alike) for MLPDenoisers on 2-D data (hidden 128 x 3 blocks at batch 64
     and 1024, hidden 32 x 1 block at batch 64; 1000 steps) and the digits UNet (default
     config, 8x8x1, batch 64, 50 steps); ratio = loop / scan (> 1 means the scan is faster).
     "bare model" is the same model_fn called at the same steps in a lax.scan with nothing else
     (x <- (x + out) / 2): the floor for any scan sampler, so scan - bare is what the sampler's
     own per-step work costs and (loop - scan) / steps what a jitted call per step costs;
  2. trace + lower and compile time of the jitted `ddim_sample` for 10 vs 1000 steps;
  3. the compiled executable's memory (XLA `memory_analysis()`: temporaries, output) vs steps,
     with and without `return_trajectory`.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import load, machine, median_times  # benchmarks/common.py

from jax_diffusion import samplers
from jax_diffusion.cli import load_config
from jax_diffusion.models import MLPDenoiser, make_model_fn
from jax_diffusion.train import create_model, get_schedule

# found from the script, so that it runs from any working directory
CONFIG = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "experiments", "configs", "default.py"
)


def _mlp_case(hidden_dim: int = 128, num_layers: int = 3):
    model = MLPDenoiser(out_dim=2, hidden_dim=hidden_dim, num_layers=num_layers)
    x = jnp.zeros((1, 2), jnp.float32)
    params = jax.jit(model.init)(jax.random.key(0), x, jnp.zeros((1,), jnp.int32))["params"]
    return model, params, (2,)


def _unet_case():
    config = load_config(CONFIG, [])
    model = create_model(config, channels=1)
    size = config.data.image_size
    x = jnp.zeros((1, size, size, 1), jnp.float32)
    params = jax.jit(model.init)(jax.random.key(0), x, jnp.zeros((1,), jnp.int32))["params"]
    return model, params, (size, size, 1)


def scan_vs_loop(model, params, schedule, shape, batch: int, num_steps: int, repeats: int):
    """Seconds per full sampling run: (scan, loop, bare model scan)."""
    x_T = jax.random.normal(jax.random.key(1), (batch, *shape), jnp.float32)

    @jax.jit
    def scan_sample(params, x_T):
        return samplers.ddim_sample(
            make_model_fn(model, params), schedule, x_T, num_steps=num_steps
        )

    # The loop: the public one-step function, jitted once, params passed as an argument.
    @jax.jit
    def step(params, x, t, t_prev):
        return samplers.ddim_step(make_model_fn(model, params), schedule, x, t, t_prev).x_prev

    ts = samplers.sampling_timesteps(schedule.num_timesteps, num_steps, "leading")
    ts_prev = np.append(ts[1:], -1)

    @jax.jit
    def bare_model_scan(params, x_T):
        model_fn = make_model_fn(model, params)

        def body(x, t):
            return 0.5 * (x + model_fn(x, jnp.broadcast_to(t, (batch,)))), None

        return jax.lax.scan(body, x_T, jnp.asarray(ts))[0]

    # Device scalars made once, as a careful user would: no per-step host->device transfer.
    pairs = [(jnp.int32(t), jnp.int32(tp)) for t, tp in zip(ts, ts_prev, strict=True)]

    def loop_sample():
        x = x_T
        for t, t_prev in pairs:
            x = step(params, x, t, t_prev)
        return x

    np.testing.assert_allclose(scan_sample(params, x_T), loop_sample(), rtol=1e-4, atol=1e-4)
    fns = {
        "scan": lambda: scan_sample(params, x_T),
        "loop": loop_sample,
        "bare": lambda: bare_model_scan(params, x_T),
    }
    medians = median_times(fns, repeats)
    return medians["scan"], medians["loop"], medians["bare"]


def _lowered(model, params, schedule, x_T, num_steps: int, trajectory: bool):
    def fn(params, x_T):
        return samplers.ddim_sample(
            make_model_fn(model, params),
            schedule,
            x_T,
            num_steps=num_steps,
            return_trajectory=trajectory,
        )

    return jax.jit(fn).lower(params, x_T)


def compile_times(model, params, schedule, x_T, num_steps: int):
    """(trace + lower seconds, compile seconds) of a fresh jit of ddim_sample."""
    jax.clear_caches()
    start = time.perf_counter()
    lowered = _lowered(model, params, schedule, x_T, num_steps, False)
    mid = time.perf_counter()
    lowered.compile()
    return mid - start, time.perf_counter() - mid


def memory(model, params, schedule, x_T, num_steps: int, trajectory: bool):
    """(temp bytes, output bytes) from the compiled executable's memory_analysis(), or None."""
    compiled = _lowered(model, params, schedule, x_T, num_steps, trajectory).compile()
    try:
        mem = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if mem is None:
        return None
    return mem.temp_size_in_bytes, mem.output_size_in_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, fewer cases")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed runs per case (default 5, --quick 2)"
    )
    args = parser.parse_args()
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1; got {args.repeats}")
    repeats = args.repeats or (2 if args.quick else 5)

    cores = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    print(f"# sampler_speed: {machine()}; cores allowed {cores}; load average {load()}")
    schedule = get_schedule(load_config(CONFIG, []).diffusion)
    mlp, mlp_params, mlp_shape = _mlp_case()
    tiny, tiny_params, tiny_shape = _mlp_case(hidden_dim=32, num_layers=1)
    unet, unet_params, unet_shape = _unet_case()

    print("\n## DDIM (eta=0): one lax.scan vs a Python loop of jitted ddim_step")
    print(f"median of {repeats} interleaved runs after a warm-up run; ratio = loop / scan")
    print(
        "| model              | batch | steps |   scan s |   loop s | loop / scan "
        "| bare model scan s | loop - scan, us/step |"
    )
    print(
        "|--------------------|-------|-------|----------|----------|-------"
        "|-------------------|---------------------|"
    )
    cases = [
        ("MLP 2-D (h128 x3)", mlp, mlp_params, mlp_shape, 64, 1000),
        ("MLP 2-D (h128 x3)", mlp, mlp_params, mlp_shape, 1024, 1000),
        ("MLP 2-D (h32 x1)", tiny, tiny_params, tiny_shape, 64, 1000),
        ("UNet digits 8x8x1", unet, unet_params, unet_shape, 64, 50),
    ]
    if args.quick:
        cases = cases[:1] + cases[2:3]
    for name, model, params, shape, batch, steps in cases:
        scan_s, loop_s, bare_s = scan_vs_loop(model, params, schedule, shape, batch, steps, repeats)
        dispatch_us = (loop_s - scan_s) / steps * 1e6
        print(
            f"| {name:<18} | {batch:>5} | {steps:>5} | {scan_s:>8.4f} | {loop_s:>8.4f} "
            f"| {loop_s / scan_s:>11.2f} | {bare_s:>17.4f} | {dispatch_us:>20.1f} |"
        )

    print(f"load average after: {load()}")

    print("\n## Compile time of jit(ddim_sample) (fresh cache)")
    print("| model              | batch | steps | trace+lower s | compile s |")
    print("|--------------------|-------|-------|---------------|-----------|")
    for name, model, params, shape, batch in [
        ("MLP 2-D (h128 x3)", mlp, mlp_params, mlp_shape, 64),
        ("UNet digits 8x8x1", unet, unet_params, unet_shape, 64),
    ]:
        x_T = jnp.zeros((batch, *shape), jnp.float32)
        for steps in (10, 1000):
            lower_s, compile_s = compile_times(model, params, schedule, x_T, steps)
            row = f"| {name:<18} | {batch:>5} | {steps:>5} | {lower_s:>13.3f} | {compile_s:>9.3f} |"
            print(row)

    print(f"load average after: {load()}")

    print("\n## Compiled memory vs steps (XLA memory_analysis, MiB), UNet digits, batch 64")
    x_T = jnp.zeros((64, *unet_shape), jnp.float32)
    mib = 2.0**20
    print(f"x_T alone is {x_T.nbytes / mib:.3f} MiB; a trajectory holds num_steps + 1 of them")
    print("| steps | trajectory | temp (no traj) | temp (traj) | output (traj) |")
    print("|-------|------------|----------------|-------------|---------------|")
    for steps in (10, 100, 1000):
        plain = memory(unet, unet_params, schedule, x_T, steps, False)
        traj = memory(unet, unet_params, schedule, x_T, steps, True)
        if plain is None or traj is None:
            print(f"| {steps:>5} | memory_analysis() unavailable on this backend |")
            continue
        traj_mib = (steps + 1) * x_T.nbytes / mib
        print(
            f"| {steps:>5} | {traj_mib:>10.3f} | {plain[0] / mib:>14.3f} "
            f"| {traj[0] / mib:>11.3f} | {traj[1] / mib:>13.3f} |"
        )


if __name__ == "__main__":
    main()
