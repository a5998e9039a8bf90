"""Flax (linen) networks, NHWC: the UNet, a toy MLP, their building blocks, the flow-matching
wrapper, the ControlNet and latent diffusion's autoencoder."""

from jax_diffusion.models.autoencoder import AutoencoderKL, DiagonalGaussian, latent_scale_factor
from jax_diffusion.models.controlnet import (
    ControlNet,
    controlled_model_fn,
    controlnet_params_from_unet,
)
from jax_diffusion.models.flow import FlowDenoiser
from jax_diffusion.models.layers import (
    AttentionBlock,
    Downsample,
    GroupNorm,
    ResBlock,
    Upsample,
    dot_product_attention,
    drop_labels,
    group_norm,
    timestep_embedding,
)
from jax_diffusion.models.mlp import MLPDenoiser
from jax_diffusion.models.unet import UNet, make_conditional_model_fn, make_model_fn

__all__ = [
    "AttentionBlock",
    "AutoencoderKL",
    "ControlNet",
    "DiagonalGaussian",
    "Downsample",
    "FlowDenoiser",
    "GroupNorm",
    "MLPDenoiser",
    "ResBlock",
    "UNet",
    "Upsample",
    "controlled_model_fn",
    "controlnet_params_from_unet",
    "dot_product_attention",
    "drop_labels",
    "group_norm",
    "latent_scale_factor",
    "make_conditional_model_fn",
    "make_model_fn",
    "timestep_embedding",
]
