"""Methods by name. Adding a method is one module here plus one config file."""

from ssl_jax.methods import byol, moco, simclr
from ssl_jax.methods.base import Method

REGISTRY = {
    "simclr": (simclr.SimCLR, simclr.default_config),
    "byol": (byol.BYOL, byol.default_config),
    "moco_v2": (moco.MoCo, moco.default_config),
}


def get(config) -> Method:
  """The method named by config.method.name, built from the config."""
  name = config.method.name
  if name not in REGISTRY:
    raise ValueError(f"unknown method.name {name!r}; known: {', '.join(sorted(REGISTRY))}")
  return REGISTRY[name][0](config)


def default_config(name: str):
  if name not in REGISTRY:
    raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(REGISTRY))}")
  return REGISTRY[name][1]()
