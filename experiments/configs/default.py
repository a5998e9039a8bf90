"""Default config: unconditional DDPM on the embedded digits, the README's main job.

Run:  jax-diffusion train --config experiments/configs/default.py --workdir /tmp/digits
Expect: on a 2-core CPU, recognisable digits in samples/step_*.png after a few minutes.

`get_config(arg)` takes an optional variant name: 'smoke' shrinks everything for tests.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.name = "digits"  # 'digits', 'toy_2d:<swiss_roll|two_moons|eight_gaussians>',
    #                               or 'tfds:<name>' (e.g. 'tfds:mnist'; needs the data extra)
    config.data.image_size = 8  # digits: 8 (native) or 16; tfds: resize/crop to this
    #                             (the UNet checks model.attention_resolutions against it)
    config.data.split = "train"
    config.data.data_dir = ml_collections.config_dict.placeholder(str)  # tfds data_dir
    config.data.num_samples = 10000  # toy_2d only
    config.data.image_key = "image"  # tfds only: the image feature
    config.data.label_key = "label"  # tfds only: the label feature; None: unlabeled data
    config.data.num_workers = 0  # tfds only: grain worker processes (0: threads)
    config.data.random_flip = False  # mirror each image left-right with p = 1/2 (Ho et al. CIFAR10)

    config.model = ml_collections.ConfigDict()
    config.model.name = "unet"
    config.model.base_channels = 32
    config.model.channel_mults = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attention_resolutions = (4,)
    config.model.num_heads = 4
    config.model.dropout = 0.0
    config.model.use_scale_shift_norm = True
    config.model.num_groups = 8
    config.model.num_classes = ml_collections.config_dict.placeholder(int)
    config.model.class_dropout = 0.1  # label dropout for classifier-free guidance
    config.model.dtype = "float32"  # 'bfloat16' on accelerators
    config.model.remat = False
    config.model.hidden_dim = 128  # mlp only
    config.model.num_layers = 3  # mlp only

    config.diffusion = ml_collections.ConfigDict()
    config.diffusion.schedule = "cosine"
    config.diffusion.num_timesteps = 1000
    config.diffusion.zero_terminal_snr = False
    config.diffusion.prediction = "eps"
    config.diffusion.variance = "fixed_small"
    config.diffusion.loss_type = "l2"
    config.diffusion.weighting = "none"
    config.diffusion.min_snr_gamma = 5.0
    config.diffusion.vlb_weight = 0.001
    # 'flow': straight-path flow matching (rectified flow): the network learns the velocity
    # eps - x0 at t in [0, 1] (fed as num_timesteps * t); the samplers see it as a
    # diffusion.prediction denoiser of the schedule above (models.FlowDenoiser)
    config.diffusion.process = "ddpm"
    config.diffusion.flow_time_distribution = "uniform"  # flow only; or 'logit_normal' (SD3)
    config.diffusion.flow_logit_normal_loc = 0.0
    config.diffusion.flow_logit_normal_scale = 1.0

    config.train = ml_collections.ConfigDict()
    config.train.num_steps = 4000
    config.train.batch_size = 64
    # > 1: gradients accumulated over n chunks of batch/n run one after another (the same
    # step, ~1/n of the activation memory; on CPU 32x32 models run fastest with chunks of ~8)
    config.train.microbatches = 1
    config.train.learning_rate = 2e-3
    config.train.warmup_steps = 100
    config.train.lr_schedule = "cosine"
    config.train.weight_decay = 0.0
    config.train.grad_clip = 1.0
    config.train.ema_decay = 0.999
    # min(ema_decay, (1 + step) / (10 + step)); False: ema_decay from the first step
    config.train.ema_warmup = True
    config.train.log_every = 50
    config.train.checkpoint_every = 500
    config.train.keep_checkpoints = 2
    config.train.sample_every = 0  # 0: only at the end
    config.train.max_bad_steps = 10
    # a step whose loss is above this is skipped like a non-finite one (and counts toward
    # max_bad_steps): a finite divergence never reaches the params; None: no bound
    config.train.max_loss = None
    config.train.stop_after = 0  # > 0: stop (checkpointed) on reaching this step, as a preemption
    #                               would; running the same command again continues past it

    config.sample = ml_collections.ConfigDict()
    config.sample.sampler = "ddim"  # 'ddpm' | 'ddim' | 'dpm++'; flow runs also 'euler' | 'heun'
    config.sample.num_steps = 50
    config.sample.eta = 0.0
    config.sample.spacing = "leading"  # ddim's steps: 'leading' (DDIM paper), 'trailing' (from
    #                                    t = T - 1: use it with zero_terminal_snr), 'linspace'
    config.sample.num_samples = 64
    config.sample.guidance = 1.0
    config.sample.guidance_rescale = 0.0  # phi in [0, 1]: rescale the guided output's std
    #                                       towards the conditional one's (Lin et al. 2024: 0.7)
    config.sample.clip_denoised = True
    config.sample.shift = 1.0  # euler / heun (flow runs): flow_timesteps' shift, SD3's s
    config.sample.s_churn = 0.0  # heun (ddpm runs): EDM's churn, Algorithm 2 (0: Algorithm 1),
    config.sample.s_tmin = 0.0  # where s_tmin <= sigma / alpha <= s_tmax (None: no upper bound),
    config.sample.s_tmax = None  # with noise scaled by s_noise (EDM ImageNet-64: 40-80, 0.05, 50,
    config.sample.s_noise = 1.0  # 1.003-1.007)

    if arg:
        apply_variant(config, arg)
    return config


def apply_variant(config: ml_collections.ConfigDict, arg: str) -> None:
    """Applies comma-separated variants; the only one is 'smoke' (tiny shapes for tests)."""
    for name in arg.split(","):
        if name == "smoke":  # tiny shapes for tests: compiles and runs in seconds
            config.model.base_channels = 8
            # one level (no resampling; attention only in the middle block): 70 parameter
            # arrays instead of 128, the train step compiles in ~7 s instead of ~14 s
            config.model.channel_mults = (1,)
            config.model.num_res_blocks = 1
            config.model.attention_resolutions = ()
            config.model.num_heads = 2
            config.model.num_groups = 4
            config.diffusion.num_timesteps = 50
            config.train.num_steps = 2
            config.train.batch_size = 8
            config.train.warmup_steps = 1
            config.train.log_every = 1
            config.train.checkpoint_every = 2  # at the end only: an orbax save is 1.5-5 s here
            config.sample.num_steps = 3
            config.sample.num_samples = 8
        elif name != "":
            raise ValueError(f"unknown config variant {name!r}; allowed: 'smoke'")
