"""The cheap checks of an evaluation's input (workdir, its config.json, the protocol name), kept free of
TensorFlow and orbax so that `python -m ssl_jax.evaluate` rejects bad input in about two seconds."""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

import ml_collections
from etils import epath

from ssl_jax import config as config_lib
from ssl_jax.errors import UserError
from ssl_jax.registry import Registry

# The evaluation protocols by name (--protocol): each names the eval.<section> its image-level run trains
# with for a config, or None for the protocols on cached features (kNN, the fast linear probe), which
# ssl_jax/evaluate/run.py's FEATURE_PROTOCOLS compute.
PROTOCOLS: Registry[Callable[[Any], Optional[str]]] = Registry("protocol")
PROTOCOLS.register("knn")(lambda cfg: None)
PROTOCOLS.register("linear")(lambda cfg: "paper_linear" if cfg.eval.linear_mode == "paper" else None)
PROTOCOLS.register("finetune")(lambda cfg: "finetune")
PROTOCOLS.register("semi")(lambda cfg: "semi")


class EvalError(UserError, ValueError):
  """Bad evaluation input; the message is one actionable line."""


def check_protocol(protocol: str) -> None:
  if protocol not in PROTOCOLS:
    raise EvalError(f"unknown protocol {protocol!r}; available: {', '.join(PROTOCOLS.names())}")


def image_section(protocol: str, cfg) -> Optional[str]:
  """The eval.<section> an image-level protocol trains with, or None for the feature protocols."""
  return PROTOCOLS.get(protocol)(cfg)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a training run saved in DIR/config.json."""
  path = epath.Path(workdir)
  if not path.exists():
    raise EvalError(f"workdir {workdir} does not exist")
  config_path = path / "config.json"
  if not config_path.exists():
    raise EvalError(f"{config_path} not found: {workdir} is not a training workdir (run ssl_jax.main first)")
  try:
    saved = json.loads(config_path.read_text())
  except json.JSONDecodeError as e:
    raise EvalError(f"{config_path} is not valid JSON: {e}")
  return config_lib.with_defaults(saved)
