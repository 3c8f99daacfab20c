"""ResNet v1 (He et al. 2016) in Flax linen, as used by SimCLR, BYOL and MoCo.

`norm="layer"` replaces every batch norm by layer normalization over each example's (height, width,
channels) with a per-channel scale and bias (GroupNorm with one group): CPC v2's encoder (Henaff et al.
2020, section 4.1), whose patches must not share batch statistics. Such a ResNet has no batch_stats.

Batch-norm statistics are computed over `bn_axis_name` when it is set: inside the sharded step the mesh
axis is "data", so the statistics are global over every device and process (SimCLR section 2.3: "global
BN"). With `bn_axis_name=None` each device normalizes with its own batch only (MoCo's per-GPU BN).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ssl_jax.errors import ConfigError
from ssl_jax.models import conv
from ssl_jax.models.conv import conv_class

# He et al. 2015 ("Delving deep into rectifiers"), fan-out normal: the initialization of torchvision's and
# the official SimCLR/BYOL ResNets.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _symmetric_conv(conv_cls, features: int, kernel_size, strides=(1, 1), **kwargs):
  """A convolution padded by kernel // 2 on both sides, as torchvision's ResNet (and the SimCLR TF code's
  fixed_padding) pad: "SAME" pads an even input of a stride-2 layer by (0, 1) instead, which moves every
  window by one pixel, so the exported weights would not compute the same features in PyTorch."""
  return conv_cls(features, kernel_size, strides, padding=[(k // 2, k // 2) for k in kernel_size], **kwargs)


def _last_bn_scale_init(zero: bool):
  """The scale init of each block's last BN: zeros (Goyal et al. 2017), as the SimCLR and BYOL code and
  torchvision's zero_init_residual=True (Barlow Twins, SimSiam, VICReg, MoCo v3) do, so that every block
  starts as its shortcut; ones for torchvision's default (MoCo v1/v2, SwAV, DINO)."""
  return nn.initializers.zeros if zero else nn.initializers.ones


class BasicBlock(nn.Module):
  """Two 3x3 convolutions (ResNet-18/34)."""

  filters: int
  strides: int
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]
  zero_init_residual: bool = True
  expansion = 1

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides))(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=_last_bn_scale_init(self.zero_init_residual))(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), (self.strides, self.strides), name="proj_conv")(residual)
      residual = self.norm(name="proj_bn")(residual)
    return nn.relu(residual + y)


class BottleneckBlock(nn.Module):
  """1x1 -> 3x3 -> 1x1 bottleneck (ResNet-50/101/152), stride on the 3x3 convolution (ResNet v1.5 / torchvision)."""

  filters: int
  strides: int
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]
  zero_init_residual: bool = True
  expansion = 4

  @nn.compact
  def __call__(self, x):
    residual = x
    y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides))(y)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters * 4, (1, 1))(y)
    y = self.norm(scale_init=_last_bn_scale_init(self.zero_init_residual))(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters * 4, (1, 1), (self.strides, self.strides), name="proj_conv")(residual)
      residual = self.norm(name="proj_bn")(residual)
    return nn.relu(residual + y)


NORMS = ("batch", "layer")

STAGES = {
    18: ((2, 2, 2, 2), BasicBlock),
    34: ((3, 4, 6, 3), BasicBlock),
    50: ((3, 4, 6, 3), BottleneckBlock),
    101: ((3, 4, 23, 3), BottleneckBlock),
    152: ((3, 8, 36, 3), BottleneckBlock),
}


class ResNet(nn.Module):
  """ResNet v1 trunk returning globally average-pooled features.

  Attributes:
    stage_sizes: blocks per stage.
    block_cls: BasicBlock or BottleneckBlock.
    width: channels of the first stage (64 in the paper); `width_multiplier` scales every layer (SimCLR's
      ResNet-50 (2x), (4x)).
    cifar_stem: 3x3 stride-1 first convolution and no max-pool, for 32x32 inputs (SimCLR appendix B.9).
    dtype: compute dtype (bfloat16 on TPU); parameters stay float32 and the output is cast to float32.
    bn_axis_name: mesh axis for cross-device batch statistics, None for per-device statistics.
    bn_momentum: running-average decay of the BN statistics (0.9 in the SimCLR and BYOL code).
    zero_init_residual: the last BN scale of each residual block starts at 0 (True) or 1 (_last_bn_scale_init).
    conv_impl: "xla" (flax.linen.Conv), "patches" (faster kernel gradients on CPU) or "winograd" (3x3
      convolutions by Winograd F(4x4, 3x3), fastest on CPU at width 64); see models/conv.py.
    norm: "batch" (BatchNorm) or "layer" (per-example normalization over h, w, c: no batch statistics).
  """

  stage_sizes: Sequence[int]
  block_cls: Any
  width: int = 64
  width_multiplier: int = 1
  cifar_stem: bool = False
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  zero_init_residual: bool = True
  conv_impl: str = "xla"
  norm: str = "batch"

  @nn.compact
  def __call__(self, x, train: bool = True):
    """x: [batch, height, width, 3] -> [batch, features] float32."""
    conv = functools.partial(_symmetric_conv, conv_class(self.conv_impl), use_bias=False, dtype=self.dtype,
                             kernel_init=conv_init)
    if self.norm == "layer":
      norm = functools.partial(nn.GroupNorm, num_groups=1, epsilon=self.bn_epsilon, dtype=self.dtype)
    else:
      norm = functools.partial(
          nn.BatchNorm,
          use_running_average=not train,
          momentum=self.bn_momentum,
          epsilon=self.bn_epsilon,
          dtype=self.dtype,
          axis_name=self.bn_axis_name if train else None,
      )
    width = self.width * self.width_multiplier
    x = x.astype(self.dtype)
    if self.cifar_stem:
      x = conv(width, (3, 3), name="stem_conv")(x)
      x = nn.relu(norm(name="stem_bn")(x))
    else:
      x = conv(width, (7, 7), (2, 2), name="stem_conv")(x)
      x = nn.relu(norm(name="stem_bn")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # torchvision's
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = self.block_cls(width * 2**stage, strides, conv=conv, norm=norm,
                           zero_init_residual=self.zero_init_residual)(x)
    return jnp.mean(x, axis=(1, 2)).astype(jnp.float32)


def create_resnet(depth: int, **kwargs) -> ResNet:
  """ResNet-`depth` (18, 34, 50, 101, 152); kwargs are ResNet attributes."""
  if depth not in STAGES:
    raise ValueError(f"ResNet depth must be one of {sorted(STAGES)}, got {depth}")
  stage_sizes, block_cls = STAGES[depth]
  return ResNet(stage_sizes=stage_sizes, block_cls=block_cls, **kwargs)


def default_config() -> dict:
  """The `model.*` settings of model.name="resnet" (ResNet-50, ImageNet stem)."""
  return dict(name="resnet", depth=50, width=64, width_multiplier=1, cifar_stem=False, dtype="float32",
              bn_momentum=0.9, zero_init_residual=True,
              norm="batch",       # "layer": CPC v2's ResNet, no batch statistics
              conv_impl="xla")  # CPU only: "patches", "winograd" (models/conv.py; benchmarks/simclr_step.py)


def build(m, dtype, bn_axis_name: Optional[str]) -> ResNet:
  """The ResNet of the `model.*` settings `m`."""
  return create_resnet(m.depth, width=m.width, width_multiplier=m.width_multiplier, cifar_stem=m.cifar_stem,
                       dtype=dtype, bn_axis_name=bn_axis_name, bn_momentum=m.bn_momentum,
                       zero_init_residual=m.zero_init_residual, conv_impl=m.conv_impl, norm=m.norm)


def apply_tiny(m) -> None:
  """ResNet-18 at width 16 (0.7M parameters): CPU runs and tests."""
  m.depth = 18
  m.width = 16


def check(m, platform: str = "", steps_per_loop: int = 1) -> None:
  if m.depth not in STAGES:
    raise ConfigError(f"model.depth must be one of {sorted(STAGES)} for a ResNet, got {m.depth}")
  if m.width <= 0 or m.width_multiplier <= 0:
    raise ConfigError(f"model.width and model.width_multiplier must be > 0, got {m.width}, {m.width_multiplier}")
  if m.norm not in NORMS:
    raise ConfigError(f"model.norm must be one of {NORMS}, got {m.norm!r}")
  conv.check(m.conv_impl, platform, steps_per_loop)
