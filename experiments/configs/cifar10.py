"""CIFAR-10 on accelerators: Ho et al. 2020's CIFAR10 setup with a smaller, ADM-style UNet.

Run (GPU/TPU, after preparing the tfds dataset 'cifar10' as array_record in DIR, e.g.
`tfds build cifar10 --file_format=array_record --data_dir=DIR`):
  jax-diffusion train --config experiments/configs/cifar10.py --workdir gs://bucket/cifar \
    --set data.data_dir=DIR
Expect: ~1.0e5 steps for good samples; bfloat16 compute, remat off.
Samples for FID (guided-diffusion's evaluator or any tool reading arr_0, uint8 NHWC):
  jax-diffusion sample --workdir gs://bucket/cifar --num 50000 --out samples.npz
(the config's sampler: ancestral DDPM over all T = 1000 steps, as the paper's FID 3.17).

As the paper (section 4, appendix B): T = 1000, linear betas 1e-4 .. 0.02, eps prediction,
L_simple, fixed variance sigma_t^2 = beta_t (`fixed_large`, the released CIFAR10 run's choice;
the paper reports beta_tilde_t alike), dropout 0.1, GroupNorm(32), self-attention at 16x16,
2 res blocks per resolution, Adam (weight decay 0) at 2e-4 after a 5000-step linear warmup
then constant, batch 128, gradient clipping at 1, EMA 0.9999 from the first step (the
released code's; `train.ema_warmup=False`), random horizontal flips, x0 clipped to [-1, 1]
while sampling. (At 0.9999 the EMA still holds e^-1 = 37% of the initial params at step 10k
and 14% at 20k: the first sample grids look like noise in a healthy run.)

Deliberate deviations, each to train faster on one accelerator; the variant `paper`
(`--config experiments/configs/cifar10.py:paper`) removes all three:
- The network: 6,949,187 parameters (base 64 channels, channel_mults (1, 2, 2): three
  resolutions 32, 16, 8, ADM's scale-shift norm, 4 attention heads) instead of the paper's
  35.7M (base 128, (1, 2, 2, 2), additive timestep embedding, one head). The paper's network,
  35,746,307 parameters: --set model.base_channels=128 --set 'model.channel_mults=(1,2,2,2)'
  --set model.num_heads=1 --set model.use_scale_shift_norm=False
- 100k steps instead of 800k (--set train.num_steps=800000).
- bfloat16 compute, not float32 (--set model.dtype=float32).
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
    config.diffusion.schedule = "linear"  # 1e-4 .. 0.02, section 4 (default.py: cosine)
    config.diffusion.num_timesteps = 1000
    config.diffusion.prediction = "eps"
    config.diffusion.variance = "fixed_large"  # sigma_t^2 = beta_t, as the released run
    config.train.batch_size = 128
    config.train.num_steps = 100_000
    config.train.learning_rate = 2e-4
    config.train.lr_schedule = "constant"  # after the warmup, as the paper (default.py: cosine)
    config.train.warmup_steps = 5000
    config.train.ema_decay = 0.9999
    config.train.ema_warmup = False  # 0.9999 from step 1, as the released code
    config.train.checkpoint_every = 5000
    config.train.sample_every = 10_000
    config.sample.sampler = "ddpm"  # ancestral, all T steps: the paper's FID sampler
    config.sample.num_samples = 64
    if arg:
        names = arg.split(",")
        unknown = set(names) - {"paper", "smoke", ""}
        if unknown:
            raise ValueError(
                f"unknown config variant {sorted(unknown)[0]!r}; allowed: 'paper', 'smoke'"
            )
        if "paper" in names:  # Ho et al.'s 35.7M network, float32, 800k steps
            config.model.base_channels = 128
            config.model.channel_mults = (1, 2, 2, 2)
            config.model.num_heads = 1
            config.model.use_scale_shift_norm = False
            config.model.dtype = "float32"
            config.train.num_steps = 800_000
        default.apply_variant(config, ",".join(name for name in names if name != "paper"))
    return config
