"""A run's config (run_config.py): every bad field named before any work, the schedule and the
model it builds, the sampling settings it fills in."""

import copy
import json
import re
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import CONFIGS, smoke

from jax_diffusion import cli, run_config


def test_check_sampling_names_the_config_s_values_and_fills_in_its_defaults():
    config = smoke("toy_2d.py", sample__sampler="ddim")
    T = config.diffusion.num_timesteps
    config.sample.num_steps = T  # valid for ddim, one too many for dpm++
    # the config's num_steps is at fault, not an argument: the message names the field
    with pytest.raises(
        ValueError, match=rf"^sample\.num_steps for sampler 'dpm\+\+' .*\[1, {T - 1}\]; got {T}$"
    ):
        run_config.check_sampling(config, sampler="dpm++")
    # both given to a model without classes: one message naming both, in the plural
    with pytest.raises(
        ValueError,
        match=r"^labels and guidance need a class-conditional model;.*labels=given, guidance=2.0$",
    ):
        run_config.check_sampling(config, labels=jnp.zeros(2, jnp.int32), guidance=2.0)
    # the config's 'leading' spacing for a zero-terminal-SNR model: warned of as if passed
    config.diffusion.zero_terminal_snr = True
    with pytest.warns(UserWarning, match=r"zero_terminal_snr=True is sampled by ddim with spac"):
        run_config.check_sampling(config)
    # a config.json written before sample.spacing and diffusion.zero_terminal_snr existed:
    # the documented 'leading', and no zero-SNR step to miss, so no warning
    del config.sample["spacing"]
    del config.diffusion["zero_terminal_snr"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run_config.check_sampling(config) == ("ddim", T, "leading", None)


def test_create_model_passes_every_unet_field_of_the_config_and_doubles_out_for_learned_range():
    config = smoke(
        "digits_cond.py",
        model__base_channels=12,
        model__channel_mults=(1, 3),
        model__num_res_blocks=3,
        model__attention_resolutions=(4,),
        model__num_heads=3,
        model__num_groups=3,
        model__dropout=0.25,
        model__use_scale_shift_norm=False,
        model__dtype="bfloat16",
        model__remat=True,
        model__num_classes=7,
        diffusion__variance="learned_range",
    )
    m = config.model
    model = run_config.create_model(config, channels=3)
    assert type(model).__name__ == "UNet"
    assert model.base_channels == 12 and tuple(model.channel_mults) == (1, 3)
    assert model.num_res_blocks == 3 and tuple(model.attention_resolutions) == (4,)
    assert model.num_heads == 3 and model.num_groups == 3 and model.dropout == m.dropout
    assert model.use_scale_shift_norm is False and model.remat is True
    assert jnp.dtype(model.dtype) == jnp.bfloat16 and model.num_classes == 7
    assert model.out_channels == 2 * 3  # learned_range: mean and variance channels
    # an unconditional fixed-variance model: out_channels is the data's channel count
    plain = run_config.create_model(smoke(diffusion__variance="fixed_large"), channels=3)
    assert plain.num_classes is None and plain.out_channels in (None, 3)
    assert jnp.dtype(plain.dtype) == jnp.float32 and plain.remat is False


def test_create_model_passes_every_mlp_field_of_the_config():
    config = smoke(
        "toy_2d.py",
        model__hidden_dim=24,
        model__num_layers=5,
        model__dropout=0.125,
        model__dtype="float16",
        model__num_classes=4,
        diffusion__variance="learned_range",
    )
    model = run_config.create_model(config, channels=2)
    assert type(model).__name__ == "MLPDenoiser"
    assert model.hidden_dim == 24 and model.num_layers == 5 and model.dropout == 0.125
    assert jnp.dtype(model.dtype) == jnp.float16 and model.num_classes == 4
    assert model.out_dim == 4  # learned_range doubles the 2 data dimensions
    plain = run_config.create_model(smoke("toy_2d.py"), channels=2)
    assert plain.out_dim in (None, 2) and plain.num_classes is None


@pytest.mark.parametrize("name", ["linear", "cosine", "scaled_linear"])
@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_get_schedule_builds_the_named_betas_over_num_timesteps(name, zero_terminal_snr):
    import jax_diffusion as jd

    config = smoke(
        diffusion__schedule=name,
        diffusion__num_timesteps=37,
        diffusion__zero_terminal_snr=zero_terminal_snr,
    )
    schedule = run_config.get_schedule(config.diffusion)
    betas = {"linear": jd.linear_betas, "cosine": jd.cosine_betas}.get(
        name, jd.scaled_linear_betas
    )(37)
    if zero_terminal_snr:
        betas = jd.rescale_zero_terminal_snr(betas)
    assert schedule.betas.shape == (37,)
    np.testing.assert_allclose(schedule.betas, betas, rtol=1e-6)
    abar = np.cumprod(1.0 - np.asarray(betas, np.float64))
    np.testing.assert_allclose(schedule.alphas_cumprod, abar, rtol=1e-5, atol=1e-7)
    assert (float(schedule.alphas_cumprod[-1]) == 0.0) == zero_terminal_snr


def test_check_config_rejects_each_bad_value_naming_its_field():
    cases = [
        ("train__batch_size", 0, "train.batch_size must be >= 1; got 0"),
        ("train__log_every", 0, "train.log_every must be >= 1; got 0"),
        ("train__checkpoint_every", 0, "train.checkpoint_every must be >= 1; got 0"),
        ("train__max_bad_steps", 0, "train.max_bad_steps must be >= 1; got 0"),
        ("train__warmup_steps", -1, r"train.warmup_steps must lie in \[0, .*got -1"),
        ("train__ema_decay", -0.5, r"train.ema_decay must lie in \[0, 1\]; got -0.5"),
        ("train__sample_every", -1, "train.sample_every must be >= 0"),
        ("train__learning_rate", 0.0, "train.learning_rate must be > 0; got 0.0"),
        ("train__grad_clip", 0.0, r"train.grad_clip must be > 0 or None \(off\); got 0.0"),
        ("model__dropout", -0.1, r"model.dropout must lie in \[0, 1\); got -0.1"),
        ("model__dropout", 1.0, r"model.dropout must lie in \[0, 1\); got 1.0"),
        ("model__class_dropout", -0.1, r"model.class_dropout must lie in \[0, 1\]"),
        ("model__num_classes", 0, "model.num_classes must be an int >= 1 or None; got 0"),
        ("model__num_classes", True, "model.num_classes must be an int >= 1 or None; got True"),
        ("diffusion__num_timesteps", 0, "diffusion.num_timesteps must be an int >= 1; got 0"),
        ("diffusion__num_timesteps", 8.0, "diffusion.num_timesteps must be an int >= 1; got 8.0"),
        ("diffusion__loss_type", "huber", "diffusion.loss_type must be one of"),
        ("diffusion__variance", "wide", "variance"),
        ("diffusion__vlb_weight", -1.0, "diffusion.vlb_weight must be >= 0; got -1.0"),
        ("sample__eta", -0.5, "sample.eta must be >= 0; got -0.5"),
        ("sample__s_churn", -1.0, "sample.s_churn must be >= 0; got -1.0"),
        ("sample__s_tmin", -0.1, "sample.s_tmin must be >= 0; got -0.1"),
        ("sample__s_noise", -1.0, "sample.s_noise must be >= 0; got -1.0"),
        ("sample__s_noise", None, "sample.s_noise must be a finite number; got None"),
        ("sample__s_tmax", -1.0, r"sample.s_tmax must be >= sample.s_tmin=0.0 or None .*got -1.0"),
        ("sample__s_tmax", float("inf"), "sample.s_tmax must be a finite number or None"),
        ("sample__spacing", "uniform", "sample.spacing must be one of .*; got 'uniform'"),
        ("sample__clip_denoised", 1, "sample.clip_denoised must be True or False; got 1"),
        ("sample__num_steps", 0, r"sample.num_steps must lie in \[1, "),
        ("train__learning_rate", float("nan"), "train.learning_rate must be a finite number"),
        ("train__grad_clip", float("inf"), "train.grad_clip must be a finite number or None"),
        ("train__warmup_steps", True, "train.warmup_steps must be a finite number; got True"),
        ("data__random_flip", 1, "data.random_flip must be True or False; got 1"),
        ("train__ema_warmup", "no", "train.ema_warmup must be True or False; got 'no'"),
        ("train__ema_warmup", 1, "train.ema_warmup must be True or False; got 1"),
        ("diffusion__process", "score", "diffusion.process must be one of 'ddpm', 'flow'; got"),
        ("diffusion__flow_logit_normal_loc", float("nan"), "flow_logit_normal_loc must be a fin"),
    ]
    for key, value, match in cases:
        config = smoke().to_dict()  # a plain copy: takes values of any type
        section, name = key.split("__")
        config[section][name] = value
        with pytest.raises(ValueError, match=match):
            run_config.check_config(ml_collections.ConfigDict(config, type_safe=False))
    # the edges that are allowed
    for overrides in [
        dict(train__grad_clip=None, train__weight_decay=0.0, train__warmup_steps=0),
        dict(train__warmup_steps=2, train__ema_decay=1.0, train__keep_checkpoints=None),
        dict(train__ema_decay=0.0, model__class_dropout=1.0, sample__num_steps=50),
        dict(sample__sampler="ddpm", sample__num_steps=0, diffusion__vlb_weight=0.0),
        dict(
            diffusion__zero_terminal_snr=True, diffusion__prediction="v", sample__spacing="linspace"
        ),
        dict(model__num_classes=1),
        dict(
            sample__sampler="heun", sample__s_churn=40.0, sample__s_tmin=0.05, sample__s_tmax=50.0
        ),
    ]:
        run_config.check_config(smoke(**overrides))
    for name in ("default.py", "digits_cond.py", "toy_2d.py", "cifar10.py", "flow.py"):
        run_config.check_config(cli.load_config(str(CONFIGS / name)))
    # what flow matching cannot use; the ddpm-only fields are free under ddpm
    for overrides, match in [
        (
            dict(diffusion__variance="learned_range"),
            "diffusion.variance='learned_range' needs diffusion.process 'ddpm'",
        ),
        (dict(diffusion__weighting="min_snr"), "diffusion.weighting='min_snr' applies to"),
        (dict(diffusion__flow_time_distribution="beta"), "flow_time_distribution must be one of"),
        (dict(diffusion__flow_logit_normal_scale=0.0), "flow_logit_normal_scale must be > 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            run_config.check_config(smoke("flow.py", **overrides))
    run_config.check_config(
        smoke(diffusion__weighting="min_snr", diffusion__variance="learned_range")
    )
    # the flow samplers: flow runs only, any number of steps, a positive shift
    for overrides, match in [
        (dict(sample__sampler="euler"), "sample.sampler='euler' integrates a flow model's ODE: i"),
        (dict(sample__sampler="heun", sample__num_steps=51), "sample.num_steps must lie in"),
        (
            dict(
                sample__sampler="heun", diffusion__zero_terminal_snr=True, diffusion__prediction="v"
            ),
            "sample.sampler='heun' steps in sigma / alpha",
        ),
        (
            dict(sample__sampler="rk4"),
            "sample.sampler must be one of 'ddpm', 'ddim', 'dpm\\+\\+', ",
        ),
        (
            dict(sample__guidance_rescale=1.5),
            r"sample.guidance_rescale must be in \[0, 1\]; got 1.5",
        ),
        (dict(sample__guidance_rescale=None), "sample.guidance_rescale must be a finite number"),
    ]:
        with pytest.raises(ValueError, match=match):
            run_config.check_config(smoke(**overrides))
    with pytest.raises(ValueError, match="sample.shift must be > 0; got 0.0"):
        run_config.check_config(smoke("flow.py", sample__sampler="euler", sample__shift=0.0))
    flow = smoke("flow.py", sample__sampler="heun", sample__num_steps=500)  # T = 50
    run_config.check_config(flow)
    assert run_config.check_sampling(flow)[:2] == ("heun", 500)
    assert run_config.check_sampling(flow, sampler="euler", num_steps=7)[:2] == ("euler", 7)
    with pytest.raises(ValueError, match="sampler='euler' integrates a flow model's ODE"):
        run_config.check_sampling(smoke(), sampler="euler")
    # heun samples a diffusion run too (EDM's sampler), at most T steps
    assert run_config.check_sampling(smoke(), sampler="heun", num_steps=50)[:2] == ("heun", 50)
    # with its churn: the given one, else the config's (0 where the config has none); a flow
    # run's heun (its own ODE steps) and the other samplers have none
    assert run_config.check_sampling(smoke(), sampler="heun")[3] == 0.0
    assert run_config.check_sampling(smoke(), sampler="heun", s_churn=7)[3] == 7.0
    assert run_config.check_sampling(smoke(sample__s_churn=3.0), sampler="heun")[3] == 3.0
    assert run_config.check_sampling(flow)[3] is None
    with pytest.raises(
        ValueError, match=r"num_steps for sampler 'heun' must be an int in \[1, 50\]"
    ):
        run_config.check_sampling(smoke(), sampler="heun", num_steps=51)
    # a config (a run's config.json) from before train.ema_warmup existed: the warm-up, valid
    before = smoke()
    del before.train["ema_warmup"]
    run_config.check_config(before)


def test_check_num_classes_accepts_none_or_the_data_count_and_names_the_field_otherwise():
    run_config.check_num_classes(smoke("digits_cond.py"), 10)
    run_config.check_num_classes(smoke(), 10)  # unconditional on labelled data
    run_config.check_num_classes(smoke("toy_2d.py"), 0)
    for value, count, match in [
        (10, 0, "model.num_classes=10 but data.name='digits' has no labels"),
        (9, 10, "model.num_classes=9 does not match data.name='digits', which has 10 classes"),
        (10, 12, "model.num_classes=10 does not match .*set model.num_classes=12"),
    ]:
        with pytest.raises(ValueError, match=match):
            run_config.check_num_classes(smoke("digits_cond.py", model__num_classes=value), count)


def _num_params(config) -> int:
    model = run_config.create_model(config, channels=3)
    x, t = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes["params"]))


def test_the_cifar10_config_is_ho_et_al_s_setup_but_for_the_deviations_its_docstring_names():
    # the config inherited default.py's cosine betas and cosine learning-rate decay, and
    # sampled with 50 DDIM steps, none of it said: a DDPM reproduction trained and was
    # scored on another setup than the paper's
    config = cli.load_config(str(CONFIGS / "cifar10.py"))
    d, tc = config.diffusion, config.train
    schedule = run_config.get_schedule(d)
    np.testing.assert_allclose(
        schedule.betas, np.linspace(1e-4, 0.02, 1000), rtol=1e-6
    )  # section 4: T = 1000, linear betas 1e-4 .. 0.02
    assert (d.prediction, d.loss_type, d.weighting) == ("eps", "l2", "none")  # L_simple
    assert d.variance == "fixed_large"  # sigma^2 = beta_t, the released CIFAR10 run's choice
    assert (tc.lr_schedule, tc.learning_rate, tc.warmup_steps) == ("constant", 2e-4, 5000)
    assert (tc.batch_size, tc.grad_clip, tc.ema_decay, tc.weight_decay) == (128, 1.0, 0.9999, 0)
    assert tc.ema_warmup is False  # the released code's EMA: 0.9999 from the first step
    assert (config.model.dropout, config.data.random_flip) == (0.1, True)
    assert (config.sample.sampler, config.sample.clip_denoised) == ("ddpm", True)  # 1000 steps
    # the docstring's figures: its own network, and the paper's 35.7M one from its overrides
    doc = __import__("experiments.configs.cifar10", fromlist=["x"]).__doc__
    assert "6,949,187" in doc and "35,746,307" in doc
    assert _num_params(config) == 6_949_187
    overrides = [
        "model.base_channels=128",
        "model.channel_mults=(1,2,2,2)",
        "model.num_heads=1",
        "model.use_scale_shift_norm=False",
    ]
    assert all(override in doc for override in overrides)
    assert _num_params(cli.load_config(str(CONFIGS / "cifar10.py"), overrides)) == 35_746_307
    # the variant 'paper': that network, float32 and 800k steps, the rest as above
    paper = cli.load_config(str(CONFIGS / "cifar10.py") + ":paper")
    assert _num_params(paper) == 35_746_307
    assert (paper.model.dtype, paper.train.num_steps) == ("float32", 800_000)
    assert paper.diffusion == config.diffusion and paper.sample == config.sample
    with pytest.raises(ValueError, match=r"unknown config variant 'papr'; allowed: 'paper', 'sm"):
        cli.load_config(str(CONFIGS / "cifar10.py") + ":papr")


def _resume(tmp_path, saved: dict, config) -> None:
    (tmp_path / "config.json").write_text(json.dumps(saved))
    run_config._check_resume_keeps_the_meaning(config, str(tmp_path))


def test_the_resume_check_names_each_changed_meaning_field_and_skips_only_missing_ones(tmp_path):
    saved = json.loads(smoke().to_json())  # as train_and_evaluate writes config.json
    _resume(tmp_path, saved, smoke())  # the same config resumes
    changes = [
        ("model.name", "mlp"),
        ("diffusion.prediction", "v"),
        ("diffusion.variance", "learned_range"),
        ("diffusion.schedule", "linear"),
        ("diffusion.num_timesteps", 20),
        ("diffusion.process", "flow"),
        ("diffusion.zero_terminal_snr", True),
    ]
    for key, value in changes:  # each alone is refused, naming it with the run's value
        section, name = key.split(".")
        config = smoke()
        config[section][name] = value
        named = f"with {key}={value!r} (the run has {saved[section][name]!r})"
        with pytest.raises(ValueError, match=re.escape(named)):
            _resume(tmp_path, saved, config)
    # a config.json without a required field (written before it existed): that field is not
    # compared, every other one still is
    for key, _ in changes[:-1]:
        section, name = key.split(".")
        old = copy.deepcopy(saved)
        del old[section][name]
        _resume(tmp_path, old, smoke())
        with pytest.raises(ValueError, match=r"diffusion.zero_terminal_snr=True \(the run has F"):
            _resume(tmp_path, old, smoke(diffusion__zero_terminal_snr=True))


def test_the_cifar10_config_s_variants_compose_in_any_order():
    from experiments.configs import cifar10

    base, paper = cifar10.get_config(), cifar10.get_config("paper")
    assert base.model.attention_resolutions == (16,)  # self-attention at 16x16 (section 4)
    assert paper.model.attention_resolutions == (16,)
    assert paper.model.num_heads == 1  # the paper's single-head attention
    # an empty name is no variant, as in default.py's apply_variant
    assert cifar10.get_config("paper,").to_dict() == paper.to_dict()
    assert cifar10.get_config("smoke,").to_dict() == cifar10.get_config("smoke").to_dict()
    # 'smoke' shrinks shapes and steps whatever the order; 'paper's other choices stay
    both = cifar10.get_config("paper,smoke")
    assert cifar10.get_config("smoke,paper").to_dict() == both.to_dict()
    small = cifar10.get_config("smoke")
    assert both.model.base_channels == small.model.base_channels == 8
    assert both.model.channel_mults == small.model.channel_mults == (1,)
    assert both.train.num_steps == small.train.num_steps == 2
    assert (both.model.dtype, both.model.use_scale_shift_norm) == ("float32", False)
    assert (small.model.dtype, small.model.use_scale_shift_norm) == ("bfloat16", True)
