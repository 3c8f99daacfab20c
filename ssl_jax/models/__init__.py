"""Encoders and heads. Encoders are chosen by `model.name` through MODELS: each entry builds the module from
the config's `model.*` settings and owns those settings' defaults, its `tiny` variant and its checks, so
nothing outside this package knows a model's settings (e.g. the CPU-only convolutions of conv.py)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax.numpy as jnp
import ml_collections

from ssl_jax.errors import ConfigError
from ssl_jax.models import resnet, vit
from ssl_jax.models.heads import MLPHead
from ssl_jax.models.resnet import ResNet, create_resnet
from ssl_jax.registry import Registry


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  default_config: Callable[[], dict]                 # every `model.*` key of this model, with defaults
  build: Callable[..., Any]                          # (settings, dtype, bn_axis_name) -> flax module
  apply_tiny: Callable[[Any], None]                  # the `tiny` variant, in place on `model.*`
  check: Callable[..., None]                         # (settings, platform, steps_per_loop); ConfigError


MODELS: Registry[ModelSpec] = Registry("model.name")
MODELS.register("resnet")(ModelSpec(resnet.default_config, resnet.build, resnet.apply_tiny, resnet.check))
MODELS.register("vit")(ModelSpec(vit.default_config, vit.build, vit.apply_tiny, vit.check))

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def default_config(name: str = "resnet") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(MODELS.get(name).default_config())


def build(m, bn_axis_name: Optional[str] = None):
  """The encoder of the `model.*` settings `m`."""
  return MODELS.get(m.name).build(m, DTYPES[m.dtype], bn_axis_name)


def apply_tiny(m) -> None:
  MODELS.get(m.name).apply_tiny(m)


def check(m, platform: str = "", steps_per_loop: int = 1) -> None:
  """Raises ConfigError (one line) for `model.*` settings that cannot run."""
  spec = MODELS.get(m.name)
  if m.dtype not in DTYPES:
    raise ConfigError(f"model.dtype must be {' or '.join(DTYPES)}, got {m.dtype!r}")
  unknown = set(m) - set(spec.default_config())
  if unknown:
    raise ConfigError(f"unknown model setting(s) {sorted(unknown)} for model.name={m.name!r}")
  spec.check(m, platform, steps_per_loop)


__all__ = ["MLPHead", "MODELS", "ResNet", "build", "check", "create_resnet", "default_config"]
