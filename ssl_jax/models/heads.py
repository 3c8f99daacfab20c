"""MLP heads: projectors and predictors."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLPHead(nn.Module):
  """Dense layers with optional batch norm and ReLU between them.

  Hidden layers are Dense -> [BN] -> ReLU. The output layer is Dense, followed by BN when `output_bn`
  (SimCLR's code puts a BN without the learned offset on the last projection layer, and drops the dense
  biases wherever BN follows; `output_bn_scale=False` drops its scale too: SimSiam's BN(affine=False)).

  Layouts used by the methods:
    SimCLR v1: hidden (2048,), out 128, BN; SimCLR v2: hidden (2048, 2048), out 128, BN.
    BYOL projector and predictor: hidden (4096,), out 256, BN on the hidden layer only, no output bias.
    MoCo v2: hidden (2048,), out 128, no BN.
    SimSiam projector: hidden (2048, 2048), out 2048, BN without affine; predictor: hidden (512,), out 2048.
    Barlow Twins: hidden (8192, 8192), out 8192, no output bias, no output BN (the loss normalizes).
    VICReg: as Barlow Twins, with biases in the hidden layers (`hidden_bias=True`).
  """

  hidden_dims: Sequence[int]
  output_dim: int
  use_bn: bool = True
  output_bn: bool = False
  output_bias: Optional[bool] = None  # default: a bias unless BN follows
  hidden_bias: Optional[bool] = None  # default: a bias unless BN follows
  output_bn_scale: bool = True
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x, train: bool = True):
    """x: [batch, in_dim] -> [batch, output_dim] float32."""

    def norm(**kwargs):
      return nn.BatchNorm(
          use_running_average=not train,
          momentum=self.bn_momentum,
          epsilon=1e-5,
          dtype=self.dtype,
          axis_name=self.bn_axis_name if train else None,
          **kwargs,
      )

    x = x.astype(self.dtype)
    for dim in self.hidden_dims:
      hidden_bias = not self.use_bn if self.hidden_bias is None else self.hidden_bias
      x = nn.Dense(dim, use_bias=hidden_bias, dtype=self.dtype)(x)
      if self.use_bn:
        x = norm()(x)
      x = nn.relu(x)
    output_bias = not self.output_bn if self.output_bias is None else self.output_bias
    x = nn.Dense(self.output_dim, use_bias=output_bias, dtype=self.dtype)(x)
    if self.output_bn:
      x = norm(use_bias=False, use_scale=self.output_bn_scale)(x)
    return x.astype(jnp.float32)
