"""Pretrained diffusers `UNet2DModel` weights as a `UNet` and its params (no torch needed).

diffusers' UNet2DModel (the network of google/ddpm-cifar10-32, google/ddpm-ema-church-256,
google/ddpm-celebahq-256, ...) is the DDPM / ADM UNet of `jax_diffusion.models.UNet` with
PyTorch names and layouts (Ho et al. 2020 app. B; Dhariwal & Nichol 2021). The conversion is
exact, not approximate: every config value is mapped onto a `UNet` field that computes the
same function, or refused with a ValueError before anything is built. What changes is only
the layout:

  Conv2d weight [O, I, kh, kw] (OIHW)    -> nn.Conv kernel [kh, kw, I, O] (HWIO)
  Linear weight [out, in]                -> nn.Dense kernel [in, out]
  to_q / to_k / to_v (or query / key / value), heads in consecutive channel blocks
                                         -> one fused qkv kernel [C, 3C], same head blocks
  time_embedding.linear_1, input [sin | cos] (or [cos | sin] when flip_sin_to_cos)
                                         -> time_dense0, rows permuted to our interleaved
                                            [sin_0, cos_0, sin_1, cos_1, ...] embedding
  class_embedding [n, E]                 -> label_embed [n + 1, E]; the extra row is our
                                            null label, zero (diffusers has none)
  GroupNorm weight / bias                -> scale / bias

Data is NHWC here, NCHW in PyTorch: transpose inputs and outputs, not weights.
`schedule_from_diffusers` reads the matching DDPMScheduler / DDIMScheduler config.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jax_diffusion.models.autoencoder import AutoencoderKL
from jax_diffusion.models.unet import UNet
from jax_diffusion.schedules import (
    Schedule,
    _is_number,
    cosine_betas,
    linear_betas,
    rescale_zero_terminal_snr,
    scaled_linear_betas,
)

__all__ = [
    "autoencoder_from_diffusers",
    "load_diffusers_autoencoder",
    "load_diffusers_unet",
    "schedule_from_diffusers",
    "unet_from_diffusers",
]

# diffusers 0.42's UNet2DModel.__init__ defaults: a config.json omits keys left at default
_DEFAULTS: dict[str, Any] = dict(
    sample_size=None,
    in_channels=3,
    out_channels=3,
    center_input_sample=False,
    time_embedding_type="positional",
    time_embedding_dim=None,
    freq_shift=0,
    flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D",
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896),
    layers_per_block=2,
    mid_block_scale_factor=1,
    downsample_padding=1,
    downsample_type="conv",
    upsample_type="conv",
    dropout=0.0,
    act_fn="silu",
    attention_head_dim=8,
    norm_num_groups=32,
    attn_norm_num_groups=None,
    norm_eps=1e-5,
    resnet_time_scale_shift="default",
    add_attention=True,
    class_embed_type=None,
    num_class_embeds=None,
    num_train_timesteps=None,
)
_DOWN_TYPES = {"DownBlock2D": False, "AttnDownBlock2D": True}  # block type -> has attention
_UP_TYPES = {"UpBlock2D": False, "AttnUpBlock2D": True}
# diffusers < 0.14 attention names, renamed on load as diffusers itself does
_OLD_ATTENTION = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_NEW_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_PARAM_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}
_RES_NAMES = {"emb_proj": "time_emb_proj", "skip": "conv_shortcut"}


def _is_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | np.integer)


def _refuse(key: str, value, allowed: str) -> ValueError:
    return ValueError(
        f"config[{key!r}] must be {allowed}; got {value!r} (UNet has no exact equivalent of "
        "other values)"
    )


def _with_defaults(config, class_name: str, defaults: dict[str, Any], caller: str) -> dict:
    """The config's keys over diffusers' defaults (keys starting with '_' dropped), after
    checking that it is a mapping of `class_name` with no key unknown to `caller`."""
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a mapping (config.json as a dict); got {config!r}")
    name = config.get("_class_name", class_name)
    if name != class_name:
        raise _refuse("_class_name", name, repr(class_name))
    unknown = sorted(k for k in config if not str(k).startswith("_") and k not in defaults)
    if unknown:
        raise ValueError(
            f"config has key(s) {unknown} that {caller} does not know (a key it does not know "
            f"may change the network); allowed: {sorted(defaults)}"
        )
    return {**defaults, **{k: v for k, v in config.items() if not str(k).startswith("_")}}


def _unet_kwargs(config: Mapping) -> tuple[dict[str, Any], int, int | None, bool]:
    """UNet fields of a UNet2DModel config, or ValueError naming the first value they cannot
    express; also returns in_channels, the sample height and flip_sin_to_cos."""
    cfg = _with_defaults(config, "UNet2DModel", _DEFAULTS, "unet_from_diffusers")

    fixed = dict(
        time_embedding_type=("positional", "'positional' (sinusoidal)"),
        center_input_sample=(False, "False"),
        mid_block_type=("UNetMidBlock2D", "'UNetMidBlock2D'"),
        add_attention=(True, "True (the UNet's middle block always has attention)"),
        class_embed_type=(None, "None (an nn.Embedding of num_class_embeds labels, or none)"),
    )
    for key, (value, allowed) in fixed.items():
        if cfg[key] != value or type(cfg[key]) is not type(value):
            raise _refuse(key, cfg[key], allowed)
    if cfg["act_fn"] not in ("silu", "swish"):
        raise _refuse("act_fn", cfg["act_fn"], "'silu' or 'swish'")
    if not (_is_number(cfg["mid_block_scale_factor"]) and cfg["mid_block_scale_factor"] == 1):
        raise _refuse("mid_block_scale_factor", cfg["mid_block_scale_factor"], "1")
    shift = cfg["resnet_time_scale_shift"]
    if shift not in ("default", "scale_shift"):
        raise _refuse("resnet_time_scale_shift", shift, "'default' or 'scale_shift'")

    channels = cfg["block_out_channels"]
    if (
        isinstance(channels, str)
        or not isinstance(channels, list | tuple)
        or not channels
        or not all(_is_int(c) and c > 0 for c in channels)
        or channels[0] % 2
        or any(c % channels[0] for c in channels)
    ):
        raise _refuse(
            "block_out_channels",
            channels,
            "a non-empty list of positive ints, each a multiple of the first (which is even)",
        )
    ch, levels = int(channels[0]), len(channels)
    if cfg["time_embedding_dim"] not in (None, 4 * ch):
        raise _refuse("time_embedding_dim", cfg["time_embedding_dim"], f"None or {4 * ch}")
    attention = []
    for key, types in (("down_block_types", _DOWN_TYPES), ("up_block_types", _UP_TYPES)):
        blocks = cfg[key]
        if not isinstance(blocks, list | tuple) or len(blocks) != levels:
            raise _refuse(key, blocks, f"a list of {levels} block types (one per level)")
        for block in blocks:
            if block not in types:
                raise _refuse(key, blocks, f"a list of {sorted(types)}")
        attention.append([types[b] for b in blocks])
    down_attn, up_attn = attention[0], attention[1][::-1]  # up block u is level levels-1-u
    if down_attn != up_attn:
        raise ValueError(
            "config['down_block_types'] and config['up_block_types'] must put attention at "
            "the same levels (UNet's attention_resolutions applies to both halves); got "
            f"{list(cfg['down_block_types'])} and {list(cfg['up_block_types'])}"
        )
    # a resampling type matters only in the attention blocks that resample
    if any(down_attn[:-1]) and cfg["downsample_type"] != "conv":
        raise _refuse("downsample_type", cfg["downsample_type"], "'conv'")
    if any(attention[1][:-1]) and cfg["upsample_type"] != "conv":
        raise _refuse("upsample_type", cfg["upsample_type"], "'conv'")

    sample = cfg["sample_size"]
    if isinstance(sample, list | tuple) and len(sample) == 2:
        sample = sample[0]
    height = None
    factor = 2 ** (levels - 1)
    if any(down_attn) or sample is not None:
        if not (_is_int(sample) and sample > 0 and sample % factor == 0):
            raise _refuse(
                "sample_size",
                cfg["sample_size"],
                f"an int (or [height, width]) divisible by 2**(levels - 1) = {factor}; it places "
                "the attention levels",
            )
        height = int(sample)
    resolutions = tuple(height // 2**lvl for lvl in range(levels) if down_attn[lvl])

    groups = cfg["norm_num_groups"]
    if not (_is_int(groups) and groups > 0 and all(c % groups == 0 for c in channels)):
        raise _refuse("norm_num_groups", groups, f"a positive int dividing each of {channels}")
    attn_groups = cfg["attn_norm_num_groups"]
    if attn_groups is None and shift != "default":
        raise _refuse(
            "attn_norm_num_groups",
            attn_groups,
            f"norm_num_groups = {groups} with resnet_time_scale_shift='{shift}' (None leaves "
            "the middle attention without a GroupNorm, which UNet always has)",
        )
    if attn_groups is not None and attn_groups != groups:
        raise _refuse("attn_norm_num_groups", attn_groups, f"None or norm_num_groups = {groups}")
    eps = cfg["norm_eps"]
    if not (_is_number(eps) and 0 < eps < math.inf):
        raise _refuse("norm_eps", eps, "a finite number > 0")
    head_dim = cfg["attention_head_dim"]
    attn_channels = {channels[-1]} | {c for c, a in zip(channels, down_attn, strict=True) if a}
    if head_dim is not None and not (
        _is_int(head_dim) and head_dim > 0 and all(c % head_dim == 0 for c in attn_channels)
    ):
        raise _refuse(
            "attention_head_dim",
            head_dim,
            f"None or a positive int dividing each attention layer's width {sorted(attn_channels)}",
        )
    freq_shift = cfg["freq_shift"]
    if not (_is_number(freq_shift) and -math.inf < freq_shift < ch // 2):
        raise _refuse(
            "freq_shift", freq_shift, f"a finite number below block_out_channels[0] / 2 = {ch // 2}"
        )
    if not isinstance(cfg["flip_sin_to_cos"], bool | np.bool_):
        raise _refuse("flip_sin_to_cos", cfg["flip_sin_to_cos"], "True or False")
    padding = cfg["downsample_padding"]
    if not (_is_int(padding) and padding in (0, 1)):
        raise _refuse("downsample_padding", padding, "0 (TF SAME) or 1 (symmetric)")
    dropout = cfg["dropout"]
    if not (_is_number(dropout) and 0 <= dropout < 1):
        raise _refuse("dropout", dropout, "a number in [0, 1)")
    for key in ("in_channels", "out_channels", "layers_per_block"):
        if not (_is_int(cfg[key]) and cfg[key] > 0):
            raise _refuse(key, cfg[key], "a positive int")
    num_classes = cfg["num_class_embeds"]
    if num_classes is not None and not (_is_int(num_classes) and num_classes > 0):
        raise _refuse("num_class_embeds", num_classes, "None or a positive int")

    kwargs = dict(
        base_channels=ch,
        channel_mults=tuple(int(c) // ch for c in channels),
        num_res_blocks=int(cfg["layers_per_block"]),
        attention_resolutions=resolutions,
        # attention_head_dim=None: diffusers gives each attention layer one head
        num_heads=1,
        num_head_channels=None if head_dim is None else int(head_dim),
        dropout=float(dropout),
        out_channels=int(cfg["out_channels"]),
        use_scale_shift_norm=shift == "scale_shift",
        num_classes=None if num_classes is None else int(num_classes),
        num_groups=int(groups),
        norm_epsilon=float(eps),
        downsample_padding="same" if padding == 0 else "symmetric",
        time_freq_shift=float(freq_shift),
    )
    return kwargs, int(cfg["in_channels"]), height, bool(cfg["flip_sin_to_cos"])


def _time_rows(ch: int, flip_sin_to_cos: bool) -> np.ndarray:
    """Row r of our time_dense0 kernel is row rows[r] of diffusers' linear_1 (transposed).

    Our embedding interleaves [sin_0, cos_0, sin_1, ...] (`timestep_embedding`); diffusers'
    concatenates [sin_0..sin_{h-1}, cos_0..cos_{h-1}], or [cos | sin] when flip_sin_to_cos.
    """
    half = ch // 2
    sin, cos = np.arange(half), half + np.arange(half)
    if flip_sin_to_cos:
        sin, cos = cos, sin
    return np.stack([sin, cos], axis=-1).reshape(ch)


def _diffusers_prefix(module: str, levels: int) -> str:
    """diffusers' module path of one of our UNet's top-level modules."""
    fixed = dict(
        conv_in="conv_in",
        time_dense0="time_embedding.linear_1",
        time_dense1="time_embedding.linear_2",
        label_embed="class_embedding",
        mid_attn="mid_block.attentions.0",
        norm_out="conv_norm_out",
        conv_out="conv_out",
        quant_conv="quant_conv",
        post_quant_conv="post_quant_conv",
    )
    if module in fixed:
        return fixed[module]
    if m := re.fullmatch(r"mid_res_(\d+)", module):
        return f"mid_block.resnets.{m[1]}"
    m = re.fullmatch(r"(down|up)_(\d+)_(res|attn|downsample|upsample)(?:_(\d+))?", module)
    if m is None:  # a UNet module this converter does not know: a bug, not a user error
        raise NotImplementedError(f"no diffusers name for UNet module {module!r}")
    half, level, kind, index = m[1], int(m[2]), m[3], m[4]
    block = f"down_blocks.{level}" if half == "down" else f"up_blocks.{levels - 1 - level}"
    if kind in ("downsample", "upsample"):
        return f"{block}.{kind}rs.0"
    return f"{block}.{'resnets' if kind == 'res' else 'attentions'}.{index}"


def _sources(
    path: tuple[str, ...], shape: tuple[int, ...], levels: int, rows: np.ndarray
) -> tuple[list[tuple[str, tuple[int, ...]]], Callable[..., np.ndarray]]:
    """The diffusers keys (with their shapes) our param `path` of `shape` is made of, and
    the function that makes it from those arrays."""
    if path[0] in ("encoder", "decoder"):  # AutoencoderKL's halves: UNet module names inside
        src, convert = _sources(path[1:], shape, levels, rows)
        return [(f"{path[0]}.{key}", sub) for key, sub in src], convert
    prefix = _diffusers_prefix(path[0], levels)
    *inner, leaf = path[1:]
    if len(inner) == 1 and "attn" in path[0]:
        if inner[0] == "qkv":  # fused [C, 3C] from three [C, C] Linear weights (or biases)
            keys = [f"{prefix}.{q}.{_PARAM_NAMES[leaf]}" for q in ("to_q", "to_k", "to_v")]
            if leaf == "kernel":
                sub = (shape[1] // 3, shape[0])
                return [(k, sub) for k in keys], lambda *w: np.concatenate([x.T for x in w], 1)
            return [(k, (shape[0] // 3,)) for k in keys], lambda *b: np.concatenate(b)
        inner = [{"norm": "group_norm", "proj_out": "to_out.0"}[inner[0]]]
    inner = [_RES_NAMES.get(name, name) for name in inner]
    key = ".".join([prefix, *inner, _PARAM_NAMES[leaf]])
    if leaf == "kernel" and len(shape) == 4:  # Conv2d OIHW -> HWIO
        return [(key, (shape[3], shape[2], shape[0], shape[1]))], lambda w: w.transpose(2, 3, 1, 0)
    if leaf == "kernel" and path[0] == "time_dense0":
        return [(key, shape[::-1])], lambda w: w.T[rows]
    if leaf == "kernel":  # Linear [out, in] -> [in, out]
        return [(key, shape[::-1])], lambda w: w.T
    if leaf == "embedding":  # append the null label's row
        return [(key, (shape[0] - 1, shape[1]))], lambda w: np.concatenate(
            [w, np.zeros((1, shape[1]), w.dtype)]
        )
    return [(key, shape)], lambda w: w


def unet_from_diffusers(config: Mapping, state_dict: Mapping[str, Any]) -> tuple[UNet, Any]:
    """A `UNet` and params computing the same function as a diffusers `UNet2DModel`.

    The UNet's attention levels are given as feature-map sizes (attention_resolutions), which
    are set from config['sample_size']: apply the model at that size (as diffusers' pipelines
    do); at other sizes attention would follow the sizes, not the levels.

    Args:
      config: the model's config.json as a dict (diffusers' UNet2DModel keys; absent keys take
        diffusers 0.42's defaults, keys starting with '_' are ignored).
      state_dict: diffusers' state dict, key -> array-like (NumPy arrays, e.g. from
        `safetensors.numpy.load_file`), any float dtype (bfloat16 too). Attention weights may
        use the current names (to_q, to_k, to_v, to_out.0) or the pre-0.14 ones (query, key,
        value, proj_attn).

    Returns:
      (model, params): `model.apply({'params': params}, x, t[, y])` maps [B, H, W, C] NHWC
      x (diffusers' NCHW input transposed), [B] timesteps t and, for class-conditional
      models, [B] labels y in [0, num_class_embeds - 1] to diffusers' output (NHWC). params
      are float32 with exactly `model.init`'s tree. The null label y = num_class_embeds
      embeds as a zero row: diffusers' models were not trained with one, so classifier-free
      guidance needs fine-tuning first.

    Raises:
      ValueError: a config value the UNet cannot reproduce exactly (fourier or learned time
        embeddings, center_input_sample, mid_block_scale_factor != 1, an activation other
        than SiLU, skip or cross-attention blocks, attention at different levels in the two
        halves, ...), or a state dict with a missing, extra, wrongly shaped or non-float
        entry; each message names the key, the value and what is allowed. Raised before any
        parameter is built.
    """
    kwargs, in_channels, height, flip = _unet_kwargs(config)
    model = UNet(**kwargs)
    arrays = _renamed(state_dict)
    size = height or 2 ** (len(kwargs["channel_mults"]) - 1)
    x = jax.ShapeDtypeStruct((1, size, size, in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    y = None if kwargs["num_classes"] is None else jax.ShapeDtypeStruct((1,), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, t, y)["params"]
    rows = _time_rows(kwargs["base_channels"], flip)
    return model, _params(shapes, arrays, len(kwargs["channel_mults"]), rows, "UNet")


def _renamed(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The state dict with pre-0.14 attention names renamed as diffusers renames them."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"state_dict must be a mapping of key -> array; got {type(state_dict)}")
    arrays: dict[str, Any] = {}
    for key, value in state_dict.items():
        m = _OLD_ATTENTION.match(str(key))
        new = f"{m[1]}.{_NEW_NAMES[m[2]]}.{m[3]}" if m else key
        if new in arrays:
            raise ValueError(f"state_dict holds {new!r} twice (under old and new attention names)")
        arrays[new] = value
    return arrays


def _params(shapes, arrays: dict[str, Any], levels: int, rows, what: str):
    """Our float32 params of the tree `shapes` from diffusers' arrays, every key checked
    (missing, extra, not an array, not float, wrongly shaped) before any is converted."""
    plan = {
        path: _sources(path, tuple(leaf.shape), levels, rows)
        for path, leaf in traverse_util.flatten_dict(shapes).items()
    }
    expected = {
        key: (shape, "/".join(path)) for path, (src, _) in plan.items() for key, shape in src
    }
    missing = sorted(set(expected) - set(arrays))
    if missing:
        key = missing[0]
        raise ValueError(
            f"state_dict is missing {len(missing)} key(s), e.g. {key!r} (shape "
            f"{expected[key][0]}, for {what} param {expected[key][1]!r}): {missing[:8]}"
        )
    extra = sorted(set(arrays) - set(expected))
    if extra:
        raise ValueError(
            f"state_dict has {len(extra)} key(s) that this config's {what} has no place for: "
            f"{extra[:8]}; allowed: the {len(expected)} keys of the config's diffusers model"
        )
    for key, (shape, target) in expected.items():
        try:  # NumPy, JAX or CPU torch arrays all become NumPy views here
            value = arrays[key] = np.asarray(arrays[key])
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"state_dict[{key!r}] must be an array; got {err}") from None
        if not jnp.issubdtype(value.dtype, jnp.floating):  # float16/32/64 and bfloat16
            raise ValueError(f"state_dict[{key!r}] must be a float array; got dtype {value.dtype}")
        if tuple(value.shape) != shape:
            raise ValueError(
                f"state_dict[{key!r}] must have shape {shape} (for {what} param {target!r}); "
                f"got shape {tuple(value.shape)}"
            )
    flat = {
        path: jnp.asarray(convert(*(np.asarray(arrays[k], np.float32) for k, _ in src)))
        for path, (src, convert) in plan.items()
    }
    return traverse_util.unflatten_dict(flat)


def load_diffusers_unet(path: str | pathlib.Path) -> tuple[UNet, Any]:
    """A `UNet` and params from a diffusers UNet2DModel folder (as saved by save_pretrained).

    Reads `config.json` and `diffusion_pytorch_model.safetensors` (with the `safetensors`
    package; no torch), from `path` or, for a whole pipeline folder, from `path/unet`.

    Args:
      path: the model folder, e.g. a local copy of google/ddpm-cifar10-32.

    Returns:
      (model, params) of `unet_from_diffusers`.

    Raises:
      FileNotFoundError: no config.json, or no .safetensors weights (a folder with only the
        pickled `diffusion_pytorch_model.bin` needs torch once to convert it; the message
        says how).
      ImportError: the safetensors package is not installed.
      ValueError: see `unet_from_diffusers`.
    """
    return unet_from_diffusers(*_read_folder(path, "unet"))


def _read_folder(path: str | pathlib.Path, sub: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(config, state dict) of a diffusers model folder `path`, or of `path/sub` (a pipeline)."""
    folder = pathlib.Path(path)
    if not (folder / "config.json").is_file() and (folder / sub / "config.json").is_file():
        folder = folder / sub
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"path must be a diffusers model folder with config.json; got {path}"
        )
    weights = folder / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        pickled = folder / "diffusion_pytorch_model.bin"
        if pickled.is_file():
            raise FileNotFoundError(
                f"{folder} holds only {pickled.name}, a pickled PyTorch file that needs torch "
                f'to read; convert it once where torch is installed:\n  python -c "import torch; '
                f"from safetensors.torch import save_file; sd = torch.load('{pickled}', "
                f"map_location='cpu', weights_only=True); save_file({{k: v.contiguous() for k, "
                f"v in sd.items()}}, '{weights}')\""
            )
        raise FileNotFoundError(f"{folder} has no {weights.name}")
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise ImportError(
            "the diffusers loaders read .safetensors weights with the safetensors package: "
            "pip install safetensors"
        ) from None
    return json.loads(config_file.read_text()), load_file(str(weights))


# diffusers 0.42's AutoencoderKL.__init__ defaults: a config.json omits keys left at default
_VAE_DEFAULTS: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",),
    up_block_types=("UpDecoderBlock2D",),
    block_out_channels=(64,),
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=32,
    scaling_factor=0.18215,
    shift_factor=None,
    latents_mean=None,
    latents_std=None,
    force_upcast=True,
    use_quant_conv=True,
    use_post_quant_conv=True,
    mid_block_add_attention=True,
)


def _autoencoder_kwargs(config: Mapping) -> tuple[dict[str, Any], float]:
    """AutoencoderKL fields of a diffusers AutoencoderKL config and its scaling_factor, or
    ValueError naming the first value they cannot express."""
    cfg = _with_defaults(config, "AutoencoderKL", _VAE_DEFAULTS, "autoencoder_from_diffusers")
    for key in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        if cfg[key] is not True:
            raise _refuse(key, cfg[key], "True (AutoencoderKL always has that layer)")
    if cfg["act_fn"] not in ("silu", "swish"):
        raise _refuse("act_fn", cfg["act_fn"], "'silu' or 'swish'")
    channels = cfg["block_out_channels"]
    if (
        not isinstance(channels, list | tuple)
        or not channels
        or not all(_is_int(c) and c > 0 for c in channels)
        or any(c % channels[0] for c in channels)
    ):
        raise _refuse(
            "block_out_channels",
            channels,
            "a non-empty list of positive ints, each a multiple of the first",
        )
    for key, block in (
        ("down_block_types", "DownEncoderBlock2D"),
        ("up_block_types", "UpDecoderBlock2D"),
    ):
        blocks = cfg[key]
        if not isinstance(blocks, list | tuple) or list(blocks) != [block] * len(channels):
            raise _refuse(key, blocks, f"{len(channels)} x '{block}' (one per level)")
    for key in ("in_channels", "out_channels", "latent_channels", "layers_per_block"):
        if not (_is_int(cfg[key]) and cfg[key] > 0):
            raise _refuse(key, cfg[key], "a positive int")
    if cfg["out_channels"] != cfg["in_channels"]:
        raise _refuse("out_channels", cfg["out_channels"], f"in_channels = {cfg['in_channels']}")
    groups = cfg["norm_num_groups"]
    if not (_is_int(groups) and groups > 0 and all(c % groups == 0 for c in channels)):
        raise _refuse("norm_num_groups", groups, f"a positive int dividing each of {channels}")
    scale = cfg["scaling_factor"]
    if not (_is_number(scale) and 0 < scale < math.inf):
        raise _refuse("scaling_factor", scale, "a finite number > 0")
    for key in ("shift_factor", "latents_mean", "latents_std"):
        if cfg[key] is not None:  # latents would need more than a scale (SD3, Flux, ...)
            raise _refuse(key, cfg[key], "None (latents scaled by scaling_factor alone)")
    kwargs = dict(
        channels=int(cfg["in_channels"]),
        latent_channels=int(cfg["latent_channels"]),
        base_channels=int(channels[0]),
        channel_mults=tuple(int(c) // int(channels[0]) for c in channels),
        # diffusers' encoder blocks have layers_per_block ResBlocks, its decoder's one more
        num_res_blocks=int(cfg["layers_per_block"]),
        num_groups=int(groups),
    )
    return kwargs, float(scale)


def autoencoder_from_diffusers(
    config: Mapping, state_dict: Mapping[str, Any]
) -> tuple[AutoencoderKL, Any, float]:
    """An `AutoencoderKL`, its params and the latent scaling factor of a diffusers
    `AutoencoderKL` (Stable Diffusion's VAE, e.g. stabilityai/sd-vae-ft-mse).

    diffusers' encoder and decoder are ours with PyTorch names (encoder.down_blocks.i ->
    encoder/down_i_*, decoder.up_blocks.u -> decoder/up_{L-1-u}_*, mid_block.attentions.0 ->
    mid_attn with to_q / to_k / to_v fused, ...), the layouts changed as in
    `unet_from_diffusers`; the function is the same.

    Args:
      config: the model's config.json as a dict (absent keys take diffusers 0.42's
        AutoencoderKL defaults; keys starting with '_' are ignored).
      state_dict: key -> float array (NumPy, e.g. from `safetensors.numpy.load_file`);
        attention weights under current or pre-0.14 names.

    Returns:
      (model, params, scaling_factor): `model.apply({'params': params}, x, method='encode')`
      is diffusers' `encode(x).latent_dist` (NHWC), `method='decode'` its `decode(z).sample`;
      latent diffusion works on scaling_factor * z (config['scaling_factor'], 0.18215 for
      Stable Diffusion 1.x).

    Raises:
      ValueError: a config the autoencoder cannot reproduce exactly (other block types or
        activation, no quant convs, a shift_factor or latents_mean / latents_std, in_channels
        != out_channels, ...) or a missing, extra, wrongly shaped or non-float state-dict
        entry; each message names the key, the value and what is allowed. Raised before any
        parameter is built.
    """
    kwargs, scale = _autoencoder_kwargs(config)
    model = AutoencoderKL(**kwargs)
    arrays = _renamed(state_dict)
    size = 2 ** (len(kwargs["channel_mults"]) - 1)
    x = jax.ShapeDtypeStruct((1, size, size, kwargs["channels"]), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    levels = len(kwargs["channel_mults"])
    return model, _params(shapes, arrays, levels, None, "AutoencoderKL"), scale


def load_diffusers_autoencoder(path: str | pathlib.Path) -> tuple[AutoencoderKL, Any, float]:
    """`autoencoder_from_diffusers` of a diffusers AutoencoderKL folder (config.json and
    diffusion_pytorch_model.safetensors; no torch), or of `path/vae` for a whole pipeline.

    Args:
      path: the model folder, e.g. a local copy of stabilityai/sd-vae-ft-mse (Stable
        Diffusion's layout, 83.65M parameters, converts to within 5e-6 of diffusers' float32
        encode / decode at 64x64; checked once with random weights).

    Returns:
      (model, params, scaling_factor) of `autoencoder_from_diffusers`.

    Raises:
      FileNotFoundError, ImportError: as `load_diffusers_unet`.
      ValueError: see `autoencoder_from_diffusers`.
    """
    return autoencoder_from_diffusers(*_read_folder(path, "vae"))


# diffusers 0.42's DDPMScheduler / DDIMScheduler.__init__ defaults
_SCHEDULER_COMMON: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    trained_betas=None,
    clip_sample=True,
    prediction_type="epsilon",
    thresholding=False,
    dynamic_thresholding_ratio=0.995,
    clip_sample_range=1.0,
    sample_max_value=1.0,
    timestep_spacing="leading",
    steps_offset=0,
    rescale_betas_zero_snr=False,
)
_SCHEDULERS = {
    "DDPMScheduler": {**_SCHEDULER_COMMON, "variance_type": "fixed_small"},
    "DDIMScheduler": {**_SCHEDULER_COMMON, "set_alpha_to_one": True},
}
_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
_VARIANCES = ("fixed_small", "fixed_large", "learned_range")


def schedule_from_diffusers(
    scheduler_config: Mapping, dtype=jnp.float32
) -> tuple[Schedule, dict[str, Any]]:
    """The `Schedule` of a diffusers DDPMScheduler / DDIMScheduler config, and the sampler
    keyword arguments it implies.

    The betas come from this package's builders: 'linear' -> `linear_betas`, 'scaled_linear'
    -> `scaled_linear_betas`, 'squaredcos_cap_v2' -> `cosine_betas` (Nichol & Dhariwal 2021,
    eq. 17, s = 0.008, max_beta = 0.999), trained_betas as given, then
    `rescale_zero_terminal_snr` where rescale_betas_zero_snr (Lin et al. 2024, Alg. 1). They are
    the same formulas; ours are evaluated in float64, where diffusers' float32 tables (a
    float32 cumprod over T steps) differ by up to ~1e-5 relative.

    Args:
      scheduler_config: scheduler_config.json as a dict (`_class_name` DDPMScheduler or
        DDIMScheduler; absent keys take diffusers 0.42's defaults).
      dtype: the Schedule's table dtype.

    Returns:
      (schedule, settings): settings holds `prediction` ('eps', 'x0', 'v'),
      `clip_denoised` (diffusers' clip_sample) and, for a DDPMScheduler, `variance`, to pass
      to `ddpm_sample` / `ddim_sample`. The inference timesteps (timestep_spacing,
      steps_offset, DDIM's set_alpha_to_one) are the sampler call's choice: see `ddim_sample`'s
      `spacing` and `timesteps`. Our DDIM chains end at the clean end (alphas_cumprod = 1),
      diffusers' set_alpha_to_one=True; with False (Stable Diffusion's configs) diffusers'
      last step lands at alphas_cumprod[0] instead.

    Raises:
      ValueError: another scheduler class, an unknown key, beta_schedule 'sigmoid', dynamic
        thresholding, clip_sample_range != 1, a variance_type without an equivalent here
        ('fixed_small_log', 'fixed_large_log', 'learned'), a flag that is not a bool or an
        unknown timestep_spacing; naming the key, value and allowed.
    """
    if not isinstance(scheduler_config, Mapping):
        raise ValueError(f"scheduler_config must be a mapping; got {scheduler_config!r}")
    name = scheduler_config.get("_class_name", "DDPMScheduler")
    if name not in _SCHEDULERS:
        raise ValueError(
            f"scheduler_config['_class_name'] must be one of {sorted(_SCHEDULERS)}; got {name!r}"
        )
    defaults = _SCHEDULERS[name]
    unknown = sorted(
        k for k in scheduler_config if not str(k).startswith("_") and k not in defaults
    )
    if unknown:
        raise ValueError(
            f"scheduler_config has key(s) {unknown} that a {name} does not take; allowed: "
            f"{sorted(defaults)}"
        )
    cfg = {**defaults, **{k: v for k, v in scheduler_config.items() if not str(k).startswith("_")}}

    def refuse(key, allowed):
        return ValueError(f"scheduler_config[{key!r}] must be {allowed}; got {cfg[key]!r}")

    # read for their truth value below, or (the inference grid) left to the sampler call: a
    # string "false" or a misspelt spacing would otherwise pass silently
    for key in ("clip_sample", "thresholding", "rescale_betas_zero_snr", "set_alpha_to_one"):
        if key in cfg and not isinstance(cfg[key], bool | np.bool_):
            raise refuse(key, "True or False")
    if cfg["timestep_spacing"] not in ("leading", "trailing", "linspace"):
        raise refuse("timestep_spacing", "'leading', 'trailing' or 'linspace'")
    if not (_is_int(cfg["steps_offset"]) and cfg["steps_offset"] >= 0):
        raise refuse("steps_offset", "an int >= 0")

    if cfg["trained_betas"] is not None:
        betas = np.asarray(cfg["trained_betas"], np.float64)
    else:
        count, start, end = cfg["num_train_timesteps"], cfg["beta_start"], cfg["beta_end"]
        builders = {
            "linear": lambda: linear_betas(count, start, end),
            "scaled_linear": lambda: scaled_linear_betas(count, start, end),
            "squaredcos_cap_v2": lambda: cosine_betas(count, s=0.008, max_beta=0.999),
        }
        if cfg["beta_schedule"] not in builders:
            raise refuse("beta_schedule", f"one of {sorted(builders)} (or trained_betas)")
        betas = builders[cfg["beta_schedule"]]()
    if cfg["rescale_betas_zero_snr"]:
        betas = rescale_zero_terminal_snr(betas)
    if cfg["thresholding"]:
        raise refuse("thresholding", "False (use denoised_fn=dynamic_threshold instead)")
    if cfg["clip_sample"] and cfg["clip_sample_range"] != 1.0:
        raise refuse("clip_sample_range", "1.0 (clip_denoised clips x0_hat to [-1, 1])")
    if cfg["prediction_type"] not in _PREDICTIONS:
        raise refuse("prediction_type", f"one of {sorted(_PREDICTIONS)}")
    settings = dict(
        prediction=_PREDICTIONS[cfg["prediction_type"]], clip_denoised=bool(cfg["clip_sample"])
    )
    if name == "DDPMScheduler":
        if cfg["variance_type"] not in _VARIANCES:
            raise refuse("variance_type", f"one of {list(_VARIANCES)}")
        settings["variance"] = cfg["variance_type"]
    return Schedule.from_betas(betas, dtype=dtype), settings
