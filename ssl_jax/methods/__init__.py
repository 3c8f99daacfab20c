"""Methods by name (`method.name`). Adding a method is one module here, one line below and one config file."""

from __future__ import annotations

from typing import Optional

from ssl_jax.methods import (barlow_twins, byol, cpc, dino, instdisc, mae, moco, moco_v3, simclr, simsiam,
                             swav, vicreg)
from ssl_jax.methods.base import DataFacts, Method
from ssl_jax.errors import ConfigError
from ssl_jax.registry import Registry

METHODS: Registry[type] = Registry("method.name")
METHODS.register("simclr")(simclr.SimCLR)
METHODS.register("byol")(byol.BYOL)
METHODS.register("moco")(moco.MoCo)
METHODS.register("moco_v2")(moco.MoCo)  # the name of workdirs written before v1 and v2 shared it
METHODS.register("simsiam")(simsiam.SimSiam)
METHODS.register("barlow_twins")(barlow_twins.BarlowTwins)
METHODS.register("vicreg")(vicreg.VICReg)
METHODS.register("swav")(swav.SwAV)
METHODS.register("moco_v3")(moco_v3.MoCoV3)
METHODS.register("dino")(dino.DINO)
METHODS.register("mae")(mae.MAE)
METHODS.register("instdisc")(instdisc.InstDisc)
METHODS.register("cpc_v2")(cpc.CPCv2)


def get(config, data: Optional[DataFacts] = None) -> Method:
  """The method named by config.method.name, built from the config (and the training data's facts,
  where the method's schedules need them)."""
  return METHODS.get(config.method.name)(config, data)


def default_config(name: str):
  return METHODS.get(name).default_config()


def check_config(cfg, num_devices: Optional[int] = None) -> None:
  """The method's own checks of `cfg` (one-line ConfigErrors), and of its mesh where `num_devices` is
  known."""
  method = METHODS.get(cfg.method.name)
  unknown = set(cfg.method) - set(method.default_config())
  if unknown:
    raise ConfigError(f"unknown method setting(s) {sorted(unknown)} for method.name={cfg.method.name!r}")
  rep = cfg.model.get("representation")
  if method.has_heads and rep in ("mean", "gap"):
    raise ConfigError(f"{cfg.method.name}'s heads read the class token, which model.representation={rep} leaves "
                      f"out: pre-train with cls (or cls_last4) and evaluate with --config.model.representation={rep}")
  method.check_config(cfg)
  if num_devices is not None:
    method.check_mesh(cfg, num_devices)


def apply_tiny(cfg) -> None:
  METHODS.get(cfg.method.name).apply_tiny(cfg)


__all__ = ["DataFacts", "METHODS", "Method", "apply_tiny", "check_config", "default_config", "get"]
