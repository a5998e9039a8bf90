"""Flax (linen) denoising networks, NHWC: the UNet, a toy MLP and their building blocks."""

from jax_diffusion.models.layers import (
    AttentionBlock,
    Downsample,
    ResBlock,
    Upsample,
    drop_labels,
    timestep_embedding,
)
from jax_diffusion.models.mlp import MLPDenoiser
from jax_diffusion.models.unet import UNet, make_conditional_model_fn, make_model_fn

__all__ = [
    "AttentionBlock",
    "Downsample",
    "MLPDenoiser",
    "ResBlock",
    "UNet",
    "Upsample",
    "drop_labels",
    "make_conditional_model_fn",
    "make_model_fn",
    "timestep_embedding",
]
