"""Heads: the MLP projectors and predictors, and DINO's weight-normalized prototype head."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ssl_jax.models import initializers, layers


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


class DINOHead(nn.Module):
  """DINO's projection head (Caron et al. 2021; vision_transformer.py DINOHead l.257-291): an MLP
  in -> hidden -> ... -> bottleneck with GELU (batch norm optional, off in the recipes), Dense kernels
  trunc_normal(0.02) and zero biases; then L2 normalization, then a weight-normalized linear layer without
  bias onto `output_dim` prototypes: w_k = g_k v_k / |v_k| (torch weight_norm over each output row).

  Parameters: "mlp_0".."mlp_{n-1}" (Dense), "last_layer" {"v": [bottleneck, K], "g": [K]} with g = 1 at
  init; norm_last_layer freezes g (the configs freeze "head/last_layer/g" through the optimizer groups;
  the module itself does not know about training). Returns float32 logits [n, K]."""

  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  output_dim: int = 65536
  num_layers: int = 3
  use_bn: bool = False
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = x.astype(self.dtype)
    dense = lambda dim, i: nn.Dense(dim, dtype=self.dtype, name=f"mlp_{i}",
                                    kernel_init=initializers.trunc_normal(0.02),
                                    bias_init=nn.initializers.zeros)
    for i in range(self.num_layers - 1):
      x = dense(self.hidden_dim, i)(x)
      if self.use_bn:
        x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, epsilon=1e-5,
                         dtype=self.dtype, axis_name=self.bn_axis_name if train else None)(x)
      x = layers.gelu(x)
    x = dense(self.bottleneck_dim, self.num_layers - 1)(x)
    # F.normalize(x, dim=-1, p=2): x / max(|x|, 1e-12).
    x = x.astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return WeightNormDense(self.output_dim, name="last_layer")(x)


class WeightNormDense(nn.Module):
  """Linear without bias, weight-normalized per output unit (torch.nn.utils.weight_norm, dim=0 of the
  [out, in] weight): kernel = v * g / |v|, the norm over the input axis of v [in, out]."""

  features: int

  @nn.compact
  def __call__(self, x):
    v = self.param("v", initializers.torch_linear_default(0), (x.shape[-1], self.features))
    g = self.param("g", nn.initializers.ones, (self.features,))
    kernel = v * (g / jnp.linalg.norm(v, axis=0))
    return jnp.dot(x, kernel).astype(jnp.float32)
