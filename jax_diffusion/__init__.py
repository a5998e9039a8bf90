"""jax_diffusion: denoising diffusion models in JAX, written as pure functions.

The math (schedules, process, losses, samplers) imports only jax and numpy; the networks
(`jax_diffusion.models`) and the training loop use Flax, optax and orbax.
"""

from jax_diffusion.consistency import (
    consistency_distillation_loss,
    consistency_function,
    consistency_sample,
    consistency_training_loss,
)
from jax_diffusion.diffusion import (
    PMeanVariance,
    eps_from_score,
    eps_from_v,
    eps_from_x0,
    p_mean_variance,
    predict_x0_eps,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
    score_from_eps,
    training_target,
    v_from_x0_eps,
    x0_from_eps,
    x0_from_v,
)
from jax_diffusion.distillation import distillation_loss, distillation_target, student_timesteps
from jax_diffusion.dpm_solver import (
    dpm_solver_pp_sample,
    dpm_solver_pp_step,
    dpm_solver_pp_timesteps,
)
from jax_diffusion.editing import repaint_sample, repaint_timesteps, sdedit, sdedit_timesteps
from jax_diffusion.edm import (
    churn_step,
    churn_timesteps,
    heun_sample,
    heun_step,
    karras_timesteps,
)
from jax_diffusion.flow_matching import (
    denoiser_from_flow,
    eps_from_flow_velocity,
    flow_bits_per_dim,
    flow_interpolate,
    flow_log_likelihood,
    flow_matching_loss,
    flow_sample,
    flow_step,
    flow_time_draws,
    flow_timesteps,
    flow_velocity_target,
    x0_from_flow_velocity,
)
from jax_diffusion.guidance import (
    classifier_free_guidance,
    classifier_grad,
    classifier_guidance,
    dynamic_threshold,
)
from jax_diffusion.inversion import ddim_invert, ddim_invert_step
from jax_diffusion.likelihood import ode_bits_per_dim, ode_log_likelihood
from jax_diffusion.losses import (
    NLLBpd,
    autoencoder_loss,
    diffusion_loss,
    discretized_gaussian_log_likelihood,
    loss_weight,
    mean_flat,
    nll_bpd,
    normal_kl,
    prior_bpd,
    training_draws,
    vlb_terms_bpd,
)
from jax_diffusion.samplers import (
    StepOutput,
    ddim_sample,
    ddim_step,
    ddpm_sample,
    ddpm_step,
    sampling_timesteps,
)
from jax_diffusion.schedules import (
    Schedule,
    cosine_betas,
    linear_betas,
    rescale_zero_terminal_snr,
    scaled_linear_betas,
)

__version__ = "0.1.0"
