"""Flax (linen) denoising networks, NHWC: the UNet, a toy MLP, their building blocks, the
flow-matching wrapper and the ControlNet."""

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
    "ControlNet",
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
    "make_conditional_model_fn",
    "make_model_fn",
    "timestep_embedding",
]
