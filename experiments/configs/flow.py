"""Flow matching (rectified flow) on the digits: the default run with diffusion.process 'flow'.

Run:  jax-diffusion train --config experiments/configs/flow.py --workdir /tmp/digits_flow
Expect: digits in samples/step_*.png like the default run's. The network learns the velocity
eps - x0 on the straight path at logit-normal times (Esser et al. 2024); sampling, guidance and
bits/dim see it as the v-prediction denoiser of the cosine schedule (models.FlowDenoiser), so
DDIM with eta = 0 is Euler's method on the flow.
"""

from experiments.configs import default


def get_config(arg: str | None = None):
    config = default.get_config()
    config.diffusion.process = "flow"
    config.diffusion.prediction = "v"  # how the samplers see the flow (safe at any SNR)
    config.diffusion.flow_time_distribution = "logit_normal"
    config.sample.spacing = "trailing"  # start at t = T - 1, the flow's t closest to 1
    if arg:
        default.apply_variant(config, arg)
    return config
