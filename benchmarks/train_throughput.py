"""Train-step throughput: images/s of the jitted, state-donating train step, vs diffusers.

Run:  python benchmarks/train_throughput.py [--quick] [--configs digits8,digits16,cifar]
                                           [--batches 32,128] [--no-torch] [--chunk-size 8]
                                           [--dtype bfloat16]

For each (config, batch) it compiles `make_train_step` (jit, donate_argnums=0) once, timing
trace + lower and compile, then times whole steps on a fixed random batch (block_until_ready,
median over repeats, after a warm-up step). Achieved FLOP/s is the compiled step's own XLA
`cost_analysis()` flops divided by the step time, also shown as a fraction of this machine's
matmul peak in the compute dtype (a large jitted jnp.dot, measured at start: 2048^3 on CPU,
8192^3 on an accelerator). With `--dtype bfloat16` (the network's compute dtype,
`model.dtype`; parameters and optimizer stay float32) on a GPU or TPU, that fraction is the
step's MFU against the measured bf16 peak.

With torch and diffusers installed (the `bench` extra), the same step is run with diffusers'
`UNet2DModel` at matched widths (block_out_channels, layers_per_block, attention levels,
GroupNorm groups, scale-shift time conditioning): MSE on eps, AdamW, global-norm clipping at
the config's grad_clip and an EMA update, as our step does. Its repeats are interleaved with
ours so both see the same machine load; `ours/theirs` is the ratio of images/s (> 1: we are
faster). The comparison runs on the CPU backend only (float32, CPU torch).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import (  # benchmarks/common.py
    add_dtype_argument,
    load,
    machine,
    parse_configs_batches,
    print_peak,
)

from jax_diffusion.backend import compiler_options
from jax_diffusion.cli import load_config
from jax_diffusion.train import create_model, create_train_state, get_schedule, make_train_step

# found from the script, so that it runs from any working directory
CONFIG = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "experiments", "configs", "default.py"
)

# name -> (overrides of the default config, channels)
CONFIGS = {
    "digits8": ([], 1),
    # attention only in the middle block: the default's (4,) is no level of a 16x16 UNet
    "digits16": (["data.image_size=16", "model.attention_resolutions=()"], 1),
    "cifar": (
        [
            "data.image_size=32",
            "model.base_channels=64",
            "model.channel_mults=(1, 2, 2)",
            "model.num_res_blocks=2",
            "model.attention_resolutions=(16,)",
            "model.num_groups=32",
        ],
        3,
    ),
}


def _block(x):
    return jax.block_until_ready(x)


def _flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def table_header(with_torch: bool) -> str:
    """The results table's header line (`mb`: train.microbatches, as in BENCHMARKS.md)."""
    header = (
        "| config | batch | mb | params | lower s | compile s | GFLOP/step | step s | img/s "
        "| GFLOP/s | % peak |"
    )
    if with_torch:
        header += " diffusers params | diffusers img/s | ours/theirs |"
    return header + " load |"


class OursStep:
    """Our compiled, state-donating train step on one fixed batch."""

    def __init__(
        self,
        name: str,
        batch_size: int,
        *,
        xla_defaults: bool,
        microbatches: int,
        dtype: str = "float32",
    ):
        overrides, channels = CONFIGS[name]
        sets = [
            *overrides,
            f"train.batch_size={batch_size}",
            f"train.microbatches={microbatches}",
            f"model.dtype={dtype!r}",
        ]
        config = load_config(CONFIG, sets)
        size = config.data.image_size
        self.config, self.channels, self.size = config, channels, size
        model = create_model(config, channels=channels)
        shape = (size, size, channels)
        self.state = create_train_state(config, model, jax.random.key(0), shape)
        self.num_params = sum(x.size for x in jax.tree.leaves(self.state.params))
        images = jax.random.uniform(jax.random.key(1), (batch_size, *shape), minval=-1, maxval=1)
        self.batch = {"image": images, "label": jnp.zeros((batch_size,), jnp.int32)}
        step = make_train_step(config, get_schedule(config.diffusion))
        start = time.perf_counter()
        # the library's per-backend options (jax_diffusion.backend), as train.py compiles it
        options = None if xla_defaults else compiler_options()
        jitted = jax.jit(step, donate_argnums=(0,), compiler_options=options)
        lowered = jitted.lower(self.state, self.batch)
        mid = time.perf_counter()
        self.compiled = lowered.compile()
        self.lower_s, self.compile_s = mid - start, time.perf_counter() - mid
        self.flops = _flops(self.compiled)

    def run(self, num_steps: int) -> float:
        """Seconds per step over num_steps consecutive steps."""
        start = time.perf_counter()
        for _ in range(num_steps):
            self.state, metrics = self.compiled(self.state, self.batch)
        _block((self.state, metrics))
        return (time.perf_counter() - start) / num_steps


class TheirsStep:
    """The same training step with diffusers' UNet2DModel in PyTorch (NCHW, float32)."""

    def __init__(self, config, channels: int, batch_size: int):
        import torch
        from diffusers import UNet2DModel

        self.torch = torch
        m, size = config.model, config.data.image_size
        widths = tuple(m.base_channels * k for k in m.channel_mults)
        attn = [size // 2**level in m.attention_resolutions for level in range(len(widths))]
        down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn)
        up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
        torch.manual_seed(0)
        self.model = UNet2DModel(
            sample_size=size,
            in_channels=channels,
            out_channels=channels,
            block_out_channels=widths,
            layers_per_block=m.num_res_blocks,
            down_block_types=down,
            up_block_types=up,
            norm_num_groups=m.num_groups,
            attention_head_dim=widths[-1] // m.num_heads,
            resnet_time_scale_shift="scale_shift" if m.use_scale_shift_norm else "default",
            dropout=m.dropout,
        )
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.num_params = sum(p.numel() for p in self.params)
        self.ema = [p.detach().clone() for p in self.params]
        tc = config.train
        self.opt = torch.optim.AdamW(self.params, lr=tc.learning_rate, weight_decay=tc.weight_decay)
        self.grad_clip, self.ema_decay = tc.grad_clip, tc.ema_decay
        sched = get_schedule(config.diffusion)
        acp = np.asarray(sched.alphas_cumprod, np.float32)
        self.sqrt_acp = torch.from_numpy(np.sqrt(acp))
        self.sqrt_1m_acp = torch.from_numpy(np.sqrt(1.0 - acp))
        self.num_timesteps = len(acp)
        gen = torch.Generator().manual_seed(1)
        self.x0 = torch.rand((batch_size, channels, size, size), generator=gen) * 2 - 1

    def step(self) -> None:
        torch = self.torch
        x0 = self.x0
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],))
        eps = torch.randn_like(x0)
        xt = self.sqrt_acp[t].view(-1, 1, 1, 1) * x0 + self.sqrt_1m_acp[t].view(-1, 1, 1, 1) * eps
        loss = torch.nn.functional.mse_loss(self.model(xt, t).sample, eps)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, self.params, 1.0 - self.ema_decay)

    def run(self, num_steps: int) -> float:
        start = time.perf_counter()
        for _ in range(num_steps):
            self.step()
        return (time.perf_counter() - start) / num_steps


def microbatch_counts(
    parser: argparse.ArgumentParser, args: argparse.Namespace, batches: list[int]
) -> dict[int, int]:
    """train.microbatches for each batch size; parser.error on a value the step cannot use.

    With --chunk-size c, a batch b >= c is split into b / c chunks (c must divide b) and a batch
    b < c is one chunk; without it, every batch uses --microbatches, which must divide it.
    """
    if args.chunk_size < 0:
        parser.error(f"--chunk-size must be >= 0 (0: use --microbatches); got {args.chunk_size}")
    if args.microbatches < 1:
        parser.error(f"--microbatches must be >= 1; got {args.microbatches}")
    counts = {}
    for batch in batches:
        if args.chunk_size and batch > args.chunk_size:
            if batch % args.chunk_size:
                parser.error(
                    f"--chunk-size {args.chunk_size} must divide every batch size; "
                    f"got batch {batch}"
                )
            counts[batch] = batch // args.chunk_size
        elif args.chunk_size:
            counts[batch] = 1
        else:
            if batch % args.microbatches:
                parser.error(
                    f"--microbatches {args.microbatches} must divide every batch size; "
                    f"got batch {batch}"
                )
            counts[batch] = args.microbatches
    return counts


def _torch_available() -> bool:
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats of >= 1 s each")
    parser.add_argument("--configs", default="digits8,digits16,cifar", help=", ".join(CONFIGS))
    parser.add_argument("--batches", default="32,128")
    parser.add_argument("--no-torch", action="store_true", help="skip the diffusers comparison")
    parser.add_argument(
        "--xla-defaults",
        action="store_true",
        help="compile without jax_diffusion.backend.compiler_options (the state before them)",
    )
    parser.add_argument("--microbatches", type=int, default=1, help="train.microbatches")
    add_dtype_argument(parser)
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=0,
        help="examples per micro-batch: train.microbatches = batch / this, one chunk for a "
        "smaller batch (overrides --microbatches)",
    )
    args = parser.parse_args()
    names, batches = parse_configs_batches(parser, args, CONFIGS)
    microbatch_count = microbatch_counts(parser, args, batches)
    repeats, target_s = (2, 1.0) if args.quick else (3, 3.0)
    on_cpu = jax.default_backend() == "cpu"
    with_torch = not args.no_torch and on_cpu and args.dtype == "float32" and _torch_available()

    print(f"# train_throughput: {machine()}")
    if with_torch:
        import diffusers
        import torch

        print(
            f"# torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"diffusers {diffusers.__version__}"
        )
    elif not args.no_torch and not (on_cpu and args.dtype == "float32"):
        print("# diffusers comparison: CPU backend and float32 only; skipped")
    elif not args.no_torch:
        print("# torch / diffusers not installed: no comparison (pip install -e '.[bench]')")
    peak = print_peak(args.dtype)
    options = "XLA defaults" if args.xla_defaults else compiler_options()
    chunks = f"batch / {args.chunk_size}" if args.chunk_size else args.microbatches
    print(
        f"# our step: compiler_options={options}, train.microbatches={chunks}, "
        f"model.dtype={args.dtype}"
    )
    print(f"# median of {repeats} repeats (each >= {target_s:g} s or 1 step) after a warm-up step")

    header = table_header(with_torch)
    print()
    print(header)
    print("|" + "|".join("---" for _ in range(header.count("|") - 1)) + "|")
    for name in names:
        for batch in batches:
            microbatches = microbatch_count[batch]
            ours = OursStep(
                name,
                batch,
                xla_defaults=args.xla_defaults,
                microbatches=microbatches,
                dtype=args.dtype,
            )
            theirs = TheirsStep(ours.config, ours.channels, batch) if with_torch else None
            warm = ours.run(1)
            n_ours = max(1, math.ceil(target_s / warm))
            if theirs is not None:
                warm_theirs = theirs.run(1)
                n_theirs = max(1, math.ceil(target_s / warm_theirs))
            ours_s, theirs_s = [], []
            for _ in range(repeats):  # interleaved: both see the same load
                ours_s.append(ours.run(n_ours))
                if theirs is not None:
                    time.sleep(0.1)  # let XLA's / OpenMP's spinning worker threads park
                    theirs_s.append(theirs.run(n_theirs))
                    time.sleep(0.1)
            step_s = statistics.median(ours_s)
            ips = batch / step_s
            gflop = ours.flops / 1e9 if ours.flops else float("nan")
            row = (
                f"| {name} {ours.size}x{ours.size}x{ours.channels} | {batch} | {microbatches} "
                f"| {ours.num_params:,} "
                f"| {ours.lower_s:.2f} | {ours.compile_s:.2f} | {gflop:.2f} | {step_s:.3f} "
                f"| {ips:.1f} | {gflop / step_s:.1f} | {100 * gflop * 1e9 / step_s / peak:.0f}% |"
            )
            if theirs is not None:
                theirs_ips = batch / statistics.median(theirs_s)
                row += f" {theirs.num_params:,} | {theirs_ips:.1f} | {ips / theirs_ips:.2f} |"
            print(row + f" {load()} |", flush=True)
            del ours, theirs


if __name__ == "__main__":
    main()
