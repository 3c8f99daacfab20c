"""Encoders and heads, chosen by name from the config."""

from ssl_jax.models.heads import MLPHead
from ssl_jax.models.resnet import ResNet, create_resnet

__all__ = ["MLPHead", "ResNet", "create_resnet"]
