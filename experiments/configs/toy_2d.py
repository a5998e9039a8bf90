"""2-D toy data (swiss roll) with a small MLP denoiser: the smallest, fastest run.

Run:  jax-diffusion train --config experiments/configs/toy_2d.py --workdir /tmp/toy
Expect: samples/step_*.png shows the swiss-roll spiral as a density image within a minute.
"""

from experiments.configs import default


def get_config(arg: str | None = None):
    config = default.get_config()
    config.data.name = "toy_2d:swiss_roll"
    config.model.name = "mlp"
    config.model.hidden_dim = 128
    config.model.num_layers = 3
    config.train.batch_size = 256
    config.train.num_steps = 2000
    config.train.learning_rate = 1e-3
    config.sample.num_samples = 2000
    config.sample.clip_denoised = False
    if arg:
        default.apply_variant(config, arg)
        if "smoke" in arg.split(","):
            config.train.batch_size = 16
            config.sample.num_samples = 16
    return config
