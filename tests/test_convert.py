"""Tests of jax_diffusion.convert against diffusers' own UNet2DModel outputs.

The references are not our code: tests/fixtures/diffusers_unet_*.npz hold tiny random
diffusers models (config, state dict, inputs) and the outputs diffusers 0.42.1 / torch 2.14
computed for them in float32 and float64 (tests/fixtures/make_diffusers_unet.py, which needs
torch; this file does not). Every weight is random, norms and biases included, so a swapped or
mis-transposed tensor shows in the output.
"""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file  # the test extra installs it

from jax_diffusion import convert
from jax_diffusion.convert import load_diffusers_unet, schedule_from_diffusers, unet_from_diffusers
from jax_diffusion.models import timestep_embedding

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
NAMES = ["cifar10", "church", "adagn"]
SD_SCALE = 1.0 / 64  # make_diffusers_unet.SD_SCALE: weights are stored as int8 multiples


def _fixture(name):
    z = np.load(FIXTURES / f"diffusers_unet_{name}.npz")
    config = json.loads(str(z["config"]))
    state_dict = {k[3:]: z[k].astype(np.float32) * SD_SCALE for k in z.files if k.startswith("sd/")}
    arrays = {k: z[k] for k in z.files if not k.startswith("sd/") and k != "config"}
    return config, state_dict, arrays


def _inputs(arrays):
    """diffusers' NCHW inputs in our layout: x NHWC, int32 t and labels."""
    x = arrays["x"].transpose(0, 2, 3, 1)
    y = arrays["y"].astype(np.int32) if "y" in arrays else None
    return x, arrays["t"].astype(np.int32), y


def _nchw(out):
    return np.asarray(out).transpose(0, 3, 1, 2)


def _rel_err(got, want):
    """max |got - want| relative to the output scale max |want| (outputs reach ~2-3 here)."""
    return np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()


@pytest.fixture(scope="module", params=NAMES)
def converted(request):
    config, state_dict, arrays = _fixture(request.param)
    model, params = unet_from_diffusers(config, state_dict)
    return request.param, model, params, arrays


def test_params_have_exactly_the_init_tree_and_float32(converted):
    _, model, params, arrays = converted
    x, t, y = _inputs(arrays)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, t, y)["params"]
    assert jax.tree.structure(params) == jax.tree.structure(shapes)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(shapes), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype == jnp.float32


def test_output_matches_diffusers_float32(converted):
    """Both sides float32 with the same (exactly representable) weights: they differ by
    summation order and by the time embedding's float32 phases t * freq, whose frequencies
    are rounded differently (entries differ by up to 6e-6 at t = 999). Measured: <= 1.3e-6 of
    the output scale; the bound is the house float32 rtol, 1e-5."""
    _, model, params, arrays = converted
    x, t, y = _inputs(arrays)
    got = _nchw(jax.jit(model.apply)({"params": params}, x, t, y))
    assert _rel_err(got, arrays["out32"]) <= 1e-5


def test_output_matches_diffusers_float64(converted, x64):
    """Both sides in float64 but for the time embedding (float32 phases on both: diffusers
    casts after it, ours takes phases in float32) and our float32 output cast (2^-24
    relative). What is left is the embedding's up to 6e-6 per entry passed through the
    network: measured <= 8.3e-7 of the output scale, bound 2e-6; the float32 test's
    summation-order noise is gone, so a small error in the attention shows here first."""
    _, model, params, arrays = converted
    x, t, y = _inputs(arrays)
    model64 = model.clone(dtype=jnp.float64, param_dtype=jnp.float64)
    params64 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)  # exact: k / 64
    got = _nchw(jax.jit(model64.apply)({"params": params64}, jnp.asarray(x, jnp.float64), t, y))
    assert _rel_err(got, arrays["out64"]) <= 2e-6


def test_time_embedding_times_first_dense_matches_diffusers(converted):
    """Our interleaved embedding through the converted time_dense0 kernel equals diffusers'
    [sin | cos] (or [cos | sin]) projection through linear_1, which checks the frequency shift
    and the row permutation on their own. The float32 phases t * freq err by ~eps32 * t on
    either side, so each output may err by 4 eps32 max(t) sum_i |W_ij|."""
    name, model, params, arrays = converted
    _, state_dict, _ = _fixture(name)
    _, t, _ = _inputs(arrays)
    ours = timestep_embedding(t, model.base_channels, freq_shift=model.time_freq_shift)
    got = np.asarray(ours, np.float64) @ np.asarray(params["time_dense0"]["kernel"], np.float64)
    weight = state_dict["time_embedding.linear_1.weight"].astype(np.float64)
    want = arrays["temb"].astype(np.float64) @ weight.T
    atol = 4 * np.finfo(np.float32).eps * t.max() * np.abs(weight).sum(axis=1)
    assert np.all(np.abs(got - want) <= atol)


def test_config_fields(converted):
    name, model, _, _ = converted
    want = dict(
        cifar10=dict(
            channel_mults=(1, 2, 2),
            num_res_blocks=2,
            attention_resolutions=(4,),
            num_heads=1,
            num_head_channels=None,
            downsample_padding="same",
            time_freq_shift=1.0,
            norm_epsilon=1e-6,
            dropout=0.1,
            use_scale_shift_norm=False,
        ),
        church=dict(attention_resolutions=(16, 4), num_head_channels=4, num_groups=8),
        adagn=dict(use_scale_shift_norm=True, num_classes=3, out_channels=2, time_freq_shift=1.5),
    )[name]
    assert {k: getattr(model, k) for k in want} == want


def test_the_null_label_row_is_zero_and_the_labels_are_diffusers_rows():
    config, state_dict, _ = _fixture("adagn")
    _, params = unet_from_diffusers(config, state_dict)
    table = np.asarray(params["label_embed"]["embedding"])
    np.testing.assert_array_equal(table[:3], state_dict["class_embedding.weight"])
    np.testing.assert_array_equal(table[3], 0.0)


def test_pre_0_14_attention_names_give_the_same_params():
    config, state_dict, _ = _fixture("church")
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in state_dict.items():
        for new, legacy in old.items():
            key = key.replace(f".{new}.", f".{legacy}.")
        renamed[key] = value
    assert renamed.keys() != state_dict.keys()
    _, want = unet_from_diffusers(config, state_dict)
    _, got = unet_from_diffusers(config, renamed)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_float16_state_dict_is_read_as_float32():
    config, state_dict, _ = _fixture("adagn")
    _, want = unet_from_diffusers(config, state_dict)
    _, got = unet_from_diffusers(config, {k: v.astype(np.float16) for k, v in state_dict.items()})
    jax.tree.map(np.testing.assert_array_equal, got, want)  # k / 64 is exact in float16


def test_absent_config_keys_take_the_diffusers_defaults():
    """diffusers builds a missing key's __init__ default: attention_head_dim 8, not None."""
    config, state_dict, _ = _fixture("church")
    model, _ = unet_from_diffusers(_without(config, "attention_head_dim"), state_dict)
    assert model.num_head_channels == 8


def test_the_google_ddpm_cifar10_32_config_is_accepted():
    """That repository's config.json (diffusers 0.0.4 keys); only the weights are missing,
    all 328 of diffusers' UNet2DModel built from it (counted with diffusers 0.42)."""
    config = {
        "_class_name": "UNet2DModel",
        "_diffusers_version": "0.0.4",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 256, 256],
        "center_input_sample": False,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        "downsample_padding": 0,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "in_channels": 3,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-06,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 32,
        "time_embedding_type": "positional",
        "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    }
    with pytest.raises(ValueError, match=r"state_dict is missing 328 key\(s\), e.g. 'conv_in"):
        unet_from_diffusers(config, {})


def test_the_google_ddpm_cat_256_config_maps_to_one_head_attention_at_16x16():
    """google/ddpm-cat-256's config.json (as church / celebahq / bedroom: six levels, attention
    at the 16x16 level only, written with attention_head_dim null: one head per layer)."""
    config = {
        "_class_name": "UNet2DModel",
        "_diffusers_version": "0.0.4",
        "act_fn": "silu",
        "attention_head_dim": None,
        "block_out_channels": [128, 128, 256, 256, 512, 512],
        "center_input_sample": False,
        "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 0,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "in_channels": 3,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-06,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 256,
        "time_embedding_type": "positional",
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
    }
    with pytest.raises(ValueError, match=r"state_dict is missing \d+ key\(s\), e.g. 'conv_in"):
        unet_from_diffusers(config, {})
    kwargs, in_channels, height, flip = convert._unet_kwargs(config)
    assert (in_channels, height, flip) == (3, 256, False)
    want = dict(
        base_channels=128,
        channel_mults=(1, 1, 2, 2, 4, 4),
        num_res_blocks=2,
        attention_resolutions=(16,),  # level 4: 256 / 2**4
        num_heads=1,
        num_head_channels=None,
        num_groups=32,
        norm_epsilon=1e-6,
        downsample_padding="same",
        time_freq_shift=1.0,
        use_scale_shift_norm=False,
        num_classes=None,
    )
    assert {k: kwargs[k] for k in want} == want


def test_bfloat16_state_dict_is_read_as_float32():
    config, state_dict, _ = _fixture("adagn")
    _, want = unet_from_diffusers(config, state_dict)
    bf16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in state_dict.items()}
    _, got = unet_from_diffusers(config, bf16)
    jax.tree.map(np.testing.assert_array_equal, got, want)  # k / 64, |k| < 128: exact in bf16
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(got))


def test_jax_arrays_are_read_like_numpy_arrays():
    config, state_dict, _ = _fixture("adagn")
    _, want = unet_from_diffusers(config, state_dict)
    _, got = unet_from_diffusers(config, {k: jnp.asarray(v) for k, v in state_dict.items()})
    jax.tree.map(np.testing.assert_array_equal, got, want)


# --------------------------------------------------------------------------- model folders


def _write_folder(folder, name="cifar10"):
    config, state_dict, arrays = _fixture(name)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state_dict, str(folder / "diffusion_pytorch_model.safetensors"))
    return arrays


@pytest.mark.parametrize("pipeline", [False, True])
def test_load_diffusers_unet_reads_a_model_or_pipeline_folder(tmp_path, pipeline):
    arrays = _write_folder(tmp_path / "unet" if pipeline else tmp_path)
    model, params = load_diffusers_unet(tmp_path)
    x, t, y = _inputs(arrays)
    got = _nchw(jax.jit(model.apply)({"params": params}, x, t, y))
    assert _rel_err(got, arrays["out32"]) <= 1e-5


def test_load_diffusers_unet_refuses_a_pickled_bin_and_says_how_to_convert(tmp_path):
    config, _, _ = _fixture("cifar10")
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match=r"(?s)needs torch.*save_file"):
        load_diffusers_unet(tmp_path)


def test_load_diffusers_unet_refuses_a_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_diffusers_unet(tmp_path)


def test_load_diffusers_unet_names_the_package_to_install(tmp_path, monkeypatch):
    _write_folder(tmp_path)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)  # import fails
    with pytest.raises(ImportError, match="pip install safetensors"):
        load_diffusers_unet(tmp_path)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "name, change, match",
    [
        ("cifar10", {"time_embedding_type": "fourier"}, r"'time_embedding_type'.*'fourier'"),
        ("cifar10", {"resnet_time_scale_shift": "spatial"}, r"'default' or 'scale_shift'"),
        ("cifar10", {"act_fn": "gelu"}, r"config\['act_fn'\] must be 'silu' or 'swish'.*'gelu'"),
        ("cifar10", {"mid_block_scale_factor": 2}, r"'mid_block_scale_factor'\] must be 1.*2"),
        ("cifar10", {"center_input_sample": True}, r"'center_input_sample'\] must be False"),
        ("cifar10", {"add_attention": False}, r"'add_attention'\] must be True"),
        ("cifar10", {"mid_block_type": None}, r"'mid_block_type'\] must be 'UNetMidBlock2D'"),
        ("cifar10", {"class_embed_type": "timestep"}, r"'class_embed_type'\] must be None"),
        ("cifar10", {"time_embedding_dim": 64}, r"'time_embedding_dim'\] must be None or 32"),
        ("cifar10", {"_class_name": "UNet2DConditionModel"}, r"'UNet2DModel'"),
        ("cifar10", {"cross_attention_dim": 8}, r"\['cross_attention_dim'\].*does not know"),
        (
            "cifar10",
            {"down_block_types": ["DownBlock2D", "AttnDownBlock2D", "SkipDownBlock2D"]},
            r"'down_block_types'\] must be a list of \['AttnDownBlock2D', 'DownBlock2D'\]",
        ),
        (
            "cifar10",
            {"up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]},
            "must put attention at the same levels",
        ),
        ("cifar10", {"up_block_types": ["UpBlock2D"] * 2}, r"a list of 3 block types"),
        ("cifar10", {"block_out_channels": [8, 12, 16]}, r"each a multiple of the first"),
        ("cifar10", {"downsample_padding": 2}, r"'downsample_padding'\] must be 0 .* or 1"),
        ("cifar10", {"norm_num_groups": 3}, r"'norm_num_groups'\] must be a positive int div"),
        ("cifar10", {"attn_norm_num_groups": 2}, r"None or norm_num_groups = 4; got 2"),
        ("cifar10", {"norm_eps": 0}, r"'norm_eps'\] must be a finite number > 0"),
        (
            "cifar10",
            {"freq_shift": 4},
            r"'freq_shift'\] must be a finite number below .* = 4; got 4",
        ),
        ("cifar10", {"flip_sin_to_cos": 1}, r"'flip_sin_to_cos'\] must be True or False"),
        ("cifar10", {"sample_size": 6}, r"'sample_size'\] must be an int .* divisible by .* 4"),
        ("cifar10", {"sample_size": None}, r"'sample_size'\] must be an int"),
        ("cifar10", {"layers_per_block": 0}, r"'layers_per_block'\] must be a positive int"),
        ("cifar10", {"dropout": 1.0}, r"'dropout'\] must be a number in \[0, 1\)"),
        (
            "church",
            {"attention_head_dim": 3},
            r"'attention_head_dim'\] must be None or .*\[8, 16\]",
        ),
        ("church", {"upsample_type": "resnet"}, r"'upsample_type'\] must be 'conv'"),
        ("church", {"downsample_type": "resnet"}, r"'downsample_type'\] must be 'conv'"),
        ("adagn", {"attn_norm_num_groups": None}, r"'attn_norm_num_groups'\].*scale_shift"),
        ("adagn", {"num_class_embeds": 0}, r"'num_class_embeds'\] must be None or a positive"),
    ],
)
def test_refuses_config_values_it_cannot_reproduce(name, change, match):
    config, state_dict, _ = _fixture(name)
    with pytest.raises(ValueError, match=match):
        unet_from_diffusers({**config, **change}, state_dict)


def test_a_resample_type_is_not_refused_where_no_attention_block_resamples():
    """diffusers reads downsample_type / upsample_type only in attention blocks that resample
    (DownBlock2D / UpBlock2D always use a convolution, the last blocks none)."""
    config, state_dict, _ = _fixture("adagn")  # its one AttnUpBlock2D is the last up block
    _, want = unet_from_diffusers(config, state_dict)
    _, got = unet_from_diffusers({**config, "upsample_type": "resnet"}, state_dict)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    with pytest.raises(ValueError, match=r"'downsample_type'\] must be 'conv'; got 'resnet'"):
        unet_from_diffusers({**config, "downsample_type": "resnet"}, state_dict)


def _without(d, key):
    return {k: v for k, v in d.items() if k != key}


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda sd: _without(sd, "down_blocks.1.attentions.0.to_k.weight"),
            r"missing 1 key\(s\), e\.g\. 'down_blocks\.1\.attentions\.0\.to_k\.weight' \(shape "
            r"\(16, 16\), for UNet param 'down_1_attn_0/qkv/kernel'\)",
        ),
        (
            lambda sd: {
                **sd,
                "down_blocks.0.resnets.0.conv_shortcut.weight": np.zeros((8, 8, 1, 1)),
            },
            r"1 key\(s\) that this config's UNet has no place for: \['down_blocks\.0\.resnets",
        ),
        (
            lambda sd: {
                **sd,
                "conv_in.weight": sd["conv_in.weight"].transpose(0, 1, 3, 2)[:, :, :, :2],
            },
            r"state_dict\['conv_in\.weight'\] must have shape \(8, 3, 3, 3\) \(for UNet param "
            r"'conv_in/kernel'\); got shape \(8, 3, 3, 2\)",
        ),
        (
            lambda sd: {**sd, "conv_out.bias": np.zeros(3, np.int32)},
            r"state_dict\['conv_out\.bias'\] must be a float array; got dtype int32",
        ),
        (
            lambda sd: {**sd, "conv_out.bias": "zeros"},
            r"state_dict\['conv_out\.bias'\] must be a float array; got dtype <U5",
        ),
        (
            lambda sd: {**sd, "mid_block.attentions.0.query.weight": np.zeros((16, 16))},
            r"'mid_block\.attentions\.0\.to_q\.weight' twice",
        ),
        (lambda sd: list(sd.items()), "state_dict must be a mapping"),
    ],
)
def test_refuses_a_state_dict_that_does_not_fit(edit, match):
    config, state_dict, _ = _fixture("cifar10")
    with pytest.raises(ValueError, match=match):
        unet_from_diffusers(config, edit(state_dict))


def test_refuses_a_config_that_is_not_a_mapping():
    with pytest.raises(ValueError, match="config must be a mapping"):
        unet_from_diffusers("config.json", {})


# --------------------------------------------------------------------------- AutoencoderKL


def _vae_fixture():
    z = np.load(FIXTURES / "diffusers_autoencoder.npz")
    config = json.loads(str(z["config"]))
    state_dict = {k[3:]: z[k].astype(np.float32) * SD_SCALE for k in z.files if k.startswith("sd/")}
    return config, state_dict, {k: z[k] for k in z.files if k[:3] != "sd/" and k != "config"}


def test_autoencoder_matches_diffusers_encode_and_decode(x64):
    """Encoder (q(z | x)'s mean and logvar) and decoder against diffusers' AutoencoderKL, both
    in float64 with the same exactly representable weights: what is left is rounding (and the
    float32 casts of our outputs, 2^-24 relative); a swapped or mis-transposed tensor, or an
    up block taken from the wrong level, is O(1). Also the float32 model against diffusers'
    float32 outputs, at the house rtol 1e-5."""
    config, state_dict, arrays = _vae_fixture()
    model, params, scale = convert.autoencoder_from_diffusers(config, state_dict)
    assert scale == 0.18215 and model.downsampling_factor == 2
    x, z = (jnp.asarray(arrays[k].transpose(0, 2, 3, 1)) for k in ("x", "z"))

    def run(model, params, x, z):
        posterior = model.apply({"params": params}, x, method="encode")
        return (*posterior, model.apply({"params": params}, z, method="decode"))

    got32 = jax.jit(run, static_argnums=0)(model, params, x, z)
    model64 = model.clone(dtype=jnp.float64)
    params64 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
    got64 = jax.jit(run, static_argnums=0)(
        model64, params64, *(jnp.asarray(a, jnp.float64) for a in (x, z))
    )
    for name, got, got_f32 in zip(("mean", "logvar", "dec"), got64, got32, strict=True):
        assert _rel_err(_nchw(got), arrays[f"{name}64"]) <= 2e-6, name
        assert _rel_err(_nchw(got_f32), arrays[f"{name}32"]) <= 1e-5, name


@pytest.mark.parametrize("pipeline", [False, True])
def test_load_diffusers_autoencoder_reads_a_model_or_pipeline_folder(tmp_path, pipeline):
    config, state_dict, arrays = _vae_fixture()
    folder = tmp_path / "vae" if pipeline else tmp_path
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.5}))
    save_file(state_dict, str(folder / "diffusion_pytorch_model.safetensors"))
    model, params, scale = convert.load_diffusers_autoencoder(tmp_path)
    assert scale == 0.5
    x = jnp.asarray(arrays["x"].transpose(0, 2, 3, 1))
    mean = model.apply({"params": params}, x, method="encode").mean
    assert _rel_err(_nchw(mean), arrays["mean32"]) <= 1e-5


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(_class_name="UNet2DModel"), r"config\['_class_name'\] must be 'AutoencoderKL'"),
        (dict(use_quant_conv=False), r"config\['use_quant_conv'\] must be True"),
        (dict(mid_block_add_attention=False), r"config\['mid_block_add_attention'\] must be"),
        (dict(shift_factor=0.0609), r"config\['shift_factor'\] must be None"),
        (dict(latents_mean=[0.0] * 2), r"config\['latents_mean'\] must be None"),
        (dict(out_channels=1), r"config\['out_channels'\] must be in_channels = 3; got 1"),
        (dict(act_fn="gelu"), r"config\['act_fn'\] must be 'silu' or 'swish'; got 'gelu'"),
        (dict(block_out_channels=[8, 12]), r"config\['block_out_channels'\] must be"),
        (dict(down_block_types=["DownEncoderBlock2D"]), r"2 x 'DownEncoderBlock2D'"),
        (dict(norm_num_groups=3), r"config\['norm_num_groups'\] must be a positive int divid"),
        (dict(scaling_factor=0), r"config\['scaling_factor'\] must be a finite number > 0"),
        (dict(time_embedding_dim=8), r"key\(s\) \['time_embedding_dim'\] that autoencoder_"),
    ],
)
def test_autoencoder_refuses_config_values_it_cannot_reproduce(change, match):
    config, state_dict, _ = _vae_fixture()
    with pytest.raises(ValueError, match=match):
        convert.autoencoder_from_diffusers({**config, **change}, state_dict)


def test_autoencoder_refuses_a_state_dict_that_does_not_fit():
    config, state_dict, _ = _vae_fixture()
    key = "decoder.up_blocks.0.resnets.1.conv1.weight"  # deepest level (ours up_1), 2nd block
    assert key in state_dict
    with pytest.raises(ValueError, match=r"for AutoencoderKL param .decoder/up_1_res_1/conv1/"):
        convert.autoencoder_from_diffusers(config, _without(state_dict, key))
    with pytest.raises(ValueError, match="AutoencoderKL has no place for: \\['extra'\\]"):
        convert.autoencoder_from_diffusers(config, {**state_dict, "extra": np.zeros(1)})


# --------------------------------------------------------------------------- schedulers

SCHEDULERS = {
    "ddpm_linear": dict(prediction="eps", clip_denoised=True, variance="fixed_small"),
    "ddim_scaled_linear": dict(prediction="v", clip_denoised=False),
    "ddpm_cosine_zero_snr": dict(prediction="x0", clip_denoised=True, variance="learned_range"),
}


def _scheduler(name):
    z = np.load(FIXTURES / "diffusers_schedulers.npz")
    return json.loads(str(z[f"{name}/config"])), z[f"{name}/betas"], z[f"{name}/alphas_cumprod"]


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_schedule_from_diffusers_matches_the_diffusers_tables(name, x64):
    """Ours are float64, diffusers' float32. Betas: float32 rounding, but the zero-SNR
    rescale shifts sqrt(alpha_bar) by a value near 1 (an absolute ~eps32 error each) and then
    takes 1 - alpha_bar_t / alpha_bar_{t-1}, several eps32 absolute (measured 4.2e-7, up to 1e-3
    relative on betas of 1e-4), so atol = 2^-20 = 8 eps32. alphas_cumprod: diffusers' float32
    cumprod, measured 9e-7 relative over 1000 steps, bound 2e-6."""
    config, betas, alphas_cumprod = _scheduler(name)
    schedule, settings = schedule_from_diffusers(config, dtype=jnp.float64)
    assert settings == SCHEDULERS[name]
    np.testing.assert_allclose(np.asarray(schedule.betas), betas, rtol=1e-6, atol=2.0**-20)
    np.testing.assert_allclose(np.asarray(schedule.alphas_cumprod), alphas_cumprod, rtol=2e-6)
    assert schedule.num_timesteps == config["num_train_timesteps"]


def test_schedule_from_diffusers_takes_trained_betas():
    config, betas, _ = _scheduler("ddpm_linear")
    schedule, _ = schedule_from_diffusers({**config, "trained_betas": [1e-3, 2e-2, 0.5]})
    np.testing.assert_allclose(np.asarray(schedule.betas), [1e-3, 2e-2, 0.5], rtol=1e-7)


def test_ddim_set_alpha_to_one_must_be_a_bool():
    config, _, _ = _scheduler("ddpm_linear")
    config = {k: v for k, v in config.items() if k != "variance_type"}
    config["_class_name"] = "DDIMScheduler"
    schedule_from_diffusers({**config, "set_alpha_to_one": False})
    with pytest.raises(ValueError, match=r"\['set_alpha_to_one'\] must be True or False"):
        schedule_from_diffusers({**config, "set_alpha_to_one": "False"})


@pytest.mark.parametrize(
    "change, match",
    [
        ({"_class_name": "PNDMScheduler"}, r"\['_class_name'\] must be one of \['DDIMScheduler'"),
        ({"beta_schedule": "sigmoid"}, r"\['beta_schedule'\] must be one of .*; got 'sigmoid'"),
        ({"thresholding": True}, r"\['thresholding'\] must be False"),
        ({"clip_sample_range": 2.0}, r"\['clip_sample_range'\] must be 1.0"),
        ({"variance_type": "fixed_small_log"}, r"\['variance_type'\] must be one of"),
        ({"prediction_type": "flow"}, r"\['prediction_type'\] must be one of"),
        ({"set_alpha_to_one": False}, r"\['set_alpha_to_one'\] that a DDPMScheduler does not"),
        ({"clip_sample": "false"}, r"\['clip_sample'\] must be True or False; got 'false'"),
        ({"thresholding": 0}, r"\['thresholding'\] must be True or False; got 0"),
        ({"rescale_betas_zero_snr": "yes"}, r"\['rescale_betas_zero_snr'\] must be True or F"),
        ({"timestep_spacing": "bogus"}, r"\['timestep_spacing'\] must be 'leading', 'trail"),
        ({"steps_offset": -1}, r"\['steps_offset'\] must be an int >= 0; got -1"),
    ],
)
def test_schedule_from_diffusers_refuses(change, match):
    config, _, _ = _scheduler("ddpm_linear")
    with pytest.raises(ValueError, match=match):
        schedule_from_diffusers({**config, **change})


def test_readme_diffusers_example_runs(tmp_path, monkeypatch):
    """README.md's diffusers example, on a stand-in for google/ddpm-cifar10-32: the cifar10
    fixture's weights with sample_size 32 (attention then sits at 16 x 16, the same level)
    and the DDPMScheduler config."""
    import re

    readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S)
    (block,) = [b for b in blocks if "load_diffusers_unet" in b]
    folder = tmp_path / "ddpm-cifar10-32"
    _write_folder(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "sample_size": 32}))
    (folder / "scheduler_config.json").write_text(json.dumps(_scheduler("ddpm_linear")[0]))
    monkeypatch.chdir(tmp_path)
    namespace = dict(jax=jax, jd=__import__("jax_diffusion"), rng=jax.random.key(0))
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["x0"].shape == (8, 32, 32, 3)
    assert np.all(np.abs(np.asarray(namespace["x0"])) <= 1)  # clip_sample=True
