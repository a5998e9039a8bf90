"""Class-conditional digits with classifier-free guidance (label dropout 0.1, guidance 3).

Run:  jax-diffusion train --config experiments/configs/digits_cond.py --workdir /tmp/digits_cond
      jax-diffusion sample --workdir /tmp/digits_cond --guidance 3 --num 100 --out grid.png
Expect: a 10 x 10 grid whose rows each run through the classes 0-9 (sample i has label i % 10).
"""

from experiments.configs import default


def get_config(arg: str | None = None):
    config = default.get_config()
    config.model.num_classes = 10
    config.model.class_dropout = 0.1
    config.sample.guidance = 3.0
    if arg:
        default.apply_variant(config, arg)
    return config
