"""CIFAR-10 on accelerators: the ADM-style UNet of DDPM's CIFAR model at reduced depth.

Run (GPU/TPU, after preparing the tfds dataset 'cifar10' as array_record in data_dir):
  jax-diffusion train --config experiments/configs/cifar10.py --workdir gs://bucket/cifar
Expect: ~1.0e5 steps for good samples; bfloat16 compute, remat off.
"""

from experiments.configs import default


def get_config(arg: str | None = None):
    config = default.get_config()
    config.data.name = "tfds:cifar10"
    config.data.image_size = 32
    config.data.random_flip = True  # Ho et al. 2020, section 4
    config.model.base_channels = 64
    config.model.channel_mults = (1, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attention_resolutions = (16,)
    config.model.dropout = 0.1
    config.model.num_groups = 32
    config.model.dtype = "bfloat16"
    config.train.batch_size = 128
    config.train.num_steps = 100_000
    config.train.learning_rate = 2e-4
    config.train.warmup_steps = 1000
    config.train.ema_decay = 0.9999
    config.train.checkpoint_every = 5000
    config.train.sample_every = 10_000
    config.sample.num_samples = 64
    if arg:
        default.apply_variant(config, arg)
    return config
