"""Where the CPU train step's time goes: network fwd + bwd vs batch, and conv weight gradients.

Run:  python benchmarks/cpu_breakdown.py [--configs cifar] [--batches 8,16,32] [--no-torch]
                                        [--quick] [--skip-conv] [--upsample] [--attention]

Table 1, the network alone: seconds of one gradient of mean(output^2) with respect to the
parameters (our UNet under `jax.jit(jax.grad)` with the library's compile options; diffusers'
`UNet2DModel` of train_throughput.py with `.backward()`), per batch size, as seconds per image.
No optimizer, no micro-batches: how each framework's per-image cost moves with the batch, which
is what decides `train.microbatches` on a CPU (ours is cheapest per image at small batches,
PyTorch's at large ones).

Table 2, the lever the speed issue named: a 3x3 convolution's weight gradient dW (HWIO) as XLA
computes it for `jax.vjp` of `lax.conv_general_dilated` (what the library uses; on CPU a
convolution over transposed operands) against two matmul formulations, im2col patches of the
padded input and one dot over (B, H, W), and nine dots of shifted input views; GFLOP/s of each
and its largest error relative to XLA's result. Layer shapes are the cifar config's at batch 8.

Table 3 (`--upsample`): the decoder's Upsample (nearest x2, then a 3x3 convolution) in its
direct form against the library's, four 2x2 convolutions of the input, one per output phase
(`models.layers.upsample_conv`: the same function and parameters, 4/9 of the multiply-adds);
fwd + bwd of the block alone at the cifar shapes, then one gradient of the whole network (table
1's) traced with each form.

Table 4 (`--attention`): the attention core, softmax(q k^T / sqrt(d)) v at the cifar config's
attention layers ([B, 4 heads, 16 x 16 positions, 32]), fwd + bwd of the library's
`dot_product_attention` against PyTorch's fused `scaled_dot_product_attention` and the same
formula in plain PyTorch ops (matmul, softmax, matmul), per batch size (`--batches`).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from common import load, machine, median_times, parse_configs_batches  # benchmarks/common.py
from jax import lax
from train_throughput import CONFIG, CONFIGS, TheirsStep, _torch_available

from jax_diffusion.backend import compiler_options
from jax_diffusion.cli import load_config
from jax_diffusion.models.layers import dot_product_attention, upsample_conv
from jax_diffusion.train import create_model

# (batch, height = width, in channels, out channels): cifar's 3x3 convolutions at batch 8.
CONV_SHAPES = [
    (8, 32, 64, 64),
    (8, 32, 128, 64),
    (8, 32, 128, 128),
    (8, 16, 128, 128),
    (8, 16, 256, 128),
    (8, 8, 128, 128),
]


def _conv(x, w):
    return lax.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def dw_xla(x, w, dy):
    """XLA's own weight gradient (the library's path)."""
    return jax.vjp(lambda w: _conv(x, w), w)[1](dy)[0]


def _shifted(x):
    """The 9 views x_pad[:, i:i+H, j:j+W, :] of the zero-padded input, row-major in (i, j)."""
    h, w = x.shape[1:3]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return [xp[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)]


def dw_patches(x, w, dy):
    """im2col: patches [B, H, W, 9 Cin], one dot contracting (B, H, W)."""
    patches = jnp.concatenate(_shifted(x), axis=-1)
    return jnp.einsum("bhwk,bhwo->ko", patches, dy).reshape(w.shape)


def dw_nine_dots(x, w, dy):
    """One [Cin, Cout] dot per kernel offset."""
    dws = [jnp.einsum("bhwi,bhwo->io", xs, dy) for xs in _shifted(x)]
    return jnp.stack(dws).reshape(w.shape)


def network_table(names, batches, with_torch, repeats) -> None:
    header = "| config | batch | ours s | ours s/image |"
    if with_torch:
        header += " diffusers s | diffusers s/image | ours/theirs (images/s) |"
    print("\n" + header + " load |")
    print("|" + "|".join("---" for _ in range(header.count("|"))) + "|")
    options = compiler_options()
    for name in names:
        overrides, channels = CONFIGS[name]
        config = load_config(CONFIG, overrides)
        size = config.data.image_size
        model = create_model(config, channels=channels)
        init = jax.jit(model.init, compiler_options=compiler_options(run_once=True))
        one = jnp.zeros((1, size, size, channels))
        params = init(jax.random.key(0), one, jnp.zeros((1,), jnp.int32))["params"]

        def loss(params, x, t, model=model):
            return jnp.mean(model.apply({"params": params}, x, t) ** 2)

        grad = jax.jit(jax.grad(loss), compiler_options=options)
        for batch in batches:
            x = jax.random.normal(jax.random.key(1), (batch, size, size, channels))
            t = jnp.arange(batch) * 7 % config.diffusion.num_timesteps
            fns = {"ours": functools.partial(grad, params, x, t)}
            if with_torch:
                import torch

                theirs = TheirsStep(config, channels, batch)
                xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
                tt = torch.from_numpy(np.array(t))

                def torch_grad(theirs=theirs, xt=xt, tt=tt):
                    theirs.model.zero_grad(set_to_none=True)
                    (theirs.model(xt, tt).sample ** 2).mean().backward()

                fns["theirs"] = torch_grad
            secs = median_times(fns, repeats)
            row = f"| {name} | {batch} | {secs['ours']:.3f} | {secs['ours'] / batch:.4f} |"
            if with_torch:
                row += (
                    f" {secs['theirs']:.3f} | {secs['theirs'] / batch:.4f} "
                    f"| {secs['theirs'] / secs['ours']:.2f} |"
                )
            print(row + f" {load()} |", flush=True)


def conv_table(repeats) -> None:
    variants = {"xla": dw_xla, "patches": dw_patches, "nine dots": dw_nine_dots}
    header = "| B, HxW, Cin -> Cout | GFLOP |" + "".join(
        f" {v} ms | {v} GFLOP/s |" for v in variants
    )
    print("\n" + header + " max rel. err vs xla | load |")
    print("|" + "|".join("---" for _ in range(header.count("|") + 1)) + "|")
    options = compiler_options()
    for b, hw, cin, cout in CONV_SHAPES:
        keys = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(keys[0], (b, hw, hw, cin))
        w = jax.random.normal(keys[1], (3, 3, cin, cout))
        dy = jax.random.normal(keys[2], (b, hw, hw, cout))
        jitted = {n: jax.jit(f, compiler_options=options) for n, f in variants.items()}
        ref = np.asarray(jitted["xla"](x, w, dy), np.float64)
        err = max(
            float(np.abs(np.asarray(f(x, w, dy)) - ref).max() / np.abs(ref).max())
            for f in jitted.values()
        )
        secs = median_times({n: functools.partial(f, x, w, dy) for n, f in jitted.items()}, repeats)
        gflop = 2 * b * hw * hw * 9 * cin * cout / 1e9
        cells = "".join(f" {1e3 * s:.2f} | {gflop / s:.1f} |" for s in secs.values())
        print(f"| {b}, {hw}x{hw}, {cin} -> {cout} | {gflop:.2f} |{cells} {err:.0e} | {load()} |")


UPSAMPLE_SHAPES = [(8, 8, 128), (8, 16, 128), (32, 8, 128), (32, 16, 128)]  # B, H = W, C


def upsample_direct(x, w, b):
    """The textbook Upsample: nearest x2, then a 3x3 convolution (padding 1). The library's
    (`upsample_conv`) computes the same as four 2x2 convolutions of x, one per output phase."""
    return _conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2), w) + b


def upsample_table(names, batches, repeats) -> None:
    import flax.linen as nn

    import jax_diffusion.models.unet as unet_module

    print(
        "\n| what | B, HxW, C | direct s | four 2x2 phases s | direct / phases | max rel. err "
        "| load |"
    )
    print("|---|---|---|---|---|---|---|")
    options = compiler_options()
    forms = {"direct": upsample_direct, "phases": upsample_conv}
    for b, hw, c in UPSAMPLE_SHAPES:
        keys = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(keys[0], (b, hw, hw, c))
        w = jax.random.normal(keys[1], (3, 3, c, c)) / 30
        bias = jax.random.normal(keys[2], (c,))
        grads = {
            n: jax.jit(
                jax.grad(lambda x, w, b, f=f: jnp.sum(f(x, w, b) ** 2), (0, 1, 2)),
                compiler_options=options,
            )
            for n, f in forms.items()
        }
        ref = [np.asarray(g, np.float64) for g in grads["direct"](x, w, bias)]
        err = max(
            float(np.abs(np.asarray(g) - r).max() / np.abs(r).max())
            for g, r in zip(grads["phases"](x, w, bias), ref, strict=True)
        )
        calls = {n: functools.partial(g, x, w, bias) for n, g in grads.items()}
        secs = median_times(calls, repeats)
        print(
            f"| Upsample fwd + bwd | {b}, {hw}x{hw}, {c} | {secs['direct']:.4f} | "
            f"{secs['phases']:.4f} | {secs['direct'] / secs['phases']:.2f} | {err:.0e} | {load()} |"
        )

    class DirectUpsample(nn.Module):  # the library's Upsample before 2026-12-01
        channels: int
        dtype: object = jnp.float32
        param_dtype: object = jnp.float32

        @nn.compact
        def __call__(self, x):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            return nn.Conv(self.channels, (3, 3), padding=1, name="conv")(x)

    library_upsample = unet_module.Upsample
    for name in names:
        overrides, channels = CONFIGS[name]
        config = load_config(CONFIG, overrides)
        size = config.data.image_size
        model = create_model(config, channels=channels)
        one = jnp.zeros((1, size, size, channels))
        params = jax.jit(model.init)(jax.random.key(0), one, jnp.zeros((1,), jnp.int32))["params"]
        for batch in batches:
            x = jax.random.normal(jax.random.key(1), (batch, size, size, channels))
            t = jnp.arange(batch) * 7 % config.diffusion.num_timesteps
            fns = {}
            for form, cls in (("direct", DirectUpsample), ("phases", library_upsample)):
                unet_module.Upsample = cls  # the UNet looks the class up when traced
                try:

                    def loss(params, x, t, model=model, form=form):
                        return jnp.mean(model.apply({"params": params}, x, t) ** 2)

                    grad = jax.jit(jax.grad(loss), compiler_options=options)
                    jax.block_until_ready(grad(params, x, t))  # traced with this form
                finally:
                    unet_module.Upsample = library_upsample
                fns[form] = functools.partial(grad, params, x, t)
            secs = median_times(fns, repeats)
            print(
                f"| {name} network gradient | {batch}, {size}x{size}, {channels} | "
                f"{secs['direct']:.3f} | {secs['phases']:.3f} | "
                f"{secs['direct'] / secs['phases']:.2f} | - | {load()} |",
                flush=True,
            )


def attention_table(batches, with_torch, repeats, heads=4, positions=256, head_dim=32) -> None:
    header = "| B, heads, N, d | ours ms |"
    if with_torch:
        header += " torch SDPA ms | torch matmul + softmax ms | ours/SDPA (speed) | max rel. err |"
    print("\n" + header + " load |")
    print("|" + "|".join("---" for _ in range(header.count("|"))) + "|")

    def loss(q, k, v, g):
        return jnp.sum(dot_product_attention(q, k, v) * g)

    grad = jax.jit(jax.grad(loss, (0, 1, 2)), compiler_options=compiler_options())
    for batch in batches:
        shape = (batch, heads, positions, head_dim)
        keys = jax.random.split(jax.random.key(0), 4)
        q, k, v, g = (jax.random.normal(key, shape) for key in keys)
        fns = {"ours": functools.partial(grad, q, k, v, g)}
        row = f"| {batch}, {heads}, {positions}, {head_dim} |"
        if with_torch:
            import torch

            tq, tk, tv = (torch.tensor(np.asarray(a), requires_grad=True) for a in (q, k, v))
            tg = torch.tensor(np.asarray(g))

            def torch_grad(attend, tq=tq, tk=tk, tv=tv, tg=tg):
                for a in (tq, tk, tv):
                    a.grad = None
                (attend(tq, tk, tv) * tg).sum().backward()
                return tq.grad, tk.grad, tv.grad

            def plain(q, k, v):
                return torch.softmax(q @ k.transpose(-1, -2) / np.sqrt(head_dim), -1) @ v

            sdpa = torch.nn.functional.scaled_dot_product_attention
            fns["sdpa"] = functools.partial(torch_grad, sdpa)
            fns["plain"] = functools.partial(torch_grad, plain)
            err = max(
                float(np.abs(np.asarray(a) - b.numpy()).max() / np.abs(b.numpy()).max())
                for a, b in zip(fns["ours"](), fns["sdpa"](), strict=True)
            )
        secs = median_times(fns, repeats)
        row += f" {1e3 * secs['ours']:.2f} |"
        if with_torch:
            row += (
                f" {1e3 * secs['sdpa']:.2f} | {1e3 * secs['plain']:.2f} "
                f"| {secs['sdpa'] / secs['ours']:.2f} | {err:.0e} |"
            )
        print(row + f" {load()} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="cifar", help=", ".join(CONFIGS))
    parser.add_argument("--batches", default="8,16,32")
    parser.add_argument(
        "--no-torch",
        action="store_true",
        help="skip PyTorch (diffusers in table 1, SDPA in table 4)",
    )
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 7")
    tables = parser.add_mutually_exclusive_group()  # one table choice per run
    tables.add_argument("--skip-conv", action="store_true", help="table 1 only")
    tables.add_argument("--upsample", action="store_true", help="table 3 only (Upsample forms)")
    tables.add_argument("--attention", action="store_true", help="table 4 only (attention core)")
    args = parser.parse_args()
    names, batches = parse_configs_batches(parser, args, CONFIGS)
    repeats = 3 if args.quick else 7
    with_torch = not args.no_torch and jax.default_backend() == "cpu" and _torch_available()
    print(f"# cpu_breakdown: {machine()}")
    if with_torch:
        import torch

        print(f"# torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"# compiler_options={compiler_options()}; median of {repeats} interleaved rounds")
    if args.upsample:
        upsample_table(names, batches, repeats)
        return
    if args.attention:
        attention_table(batches, with_torch, repeats)
        return
    network_table(names, batches, with_torch, repeats)
    if not args.skip_conv:
        conv_table(repeats)


if __name__ == "__main__":
    main()
