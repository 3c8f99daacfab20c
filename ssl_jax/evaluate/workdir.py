"""The cheap checks of an evaluation's input (workdir, its config.json, the protocol name), kept free of
TensorFlow and orbax so that `python -m ssl_jax.evaluate` rejects bad input in about two seconds."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Dict, List, Optional

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


def parse_protocols(value: str) -> List[str]:
  """The protocols of --protocol: one name, or several separated by commas (run in that order)."""
  names = [name.strip() for name in value.split(",")]
  for name in names:
    check_protocol(name)
  if len(set(names)) < len(names):
    raise EvalError(f"--protocol={value} names a protocol twice")
  return names


def image_section(protocol: str, cfg) -> Optional[str]:
  """The eval.<section> an image-level protocol trains with, or None for the feature protocols."""
  return PROTOCOLS.get(protocol)(cfg)


def flag_from_argv(argv, name: str) -> Optional[str]:
  """The value of --name=VALUE or --name VALUE in argv, read before absl parses the flags (the config flag
  is defined from what it names)."""
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def run_with_workdir_config(main) -> None:
  """Runs the absl `main` of a command that reads a training workdir (--workdir=W, required): the flag
  --config is W's saved config, so --config.key=value overrides it. A missing or unreadable workdir is one
  line and exit 2."""
  import sys
  from absl import app
  from ml_collections import config_flags
  from ssl_jax import distributed
  workdir = flag_from_argv(sys.argv, "workdir")
  if not workdir:
    print("error: --workdir is required: a training workdir (holding config.json and checkpoints/)",
          file=sys.stderr)
    sys.exit(2)
  with distributed.user_errors_exit():
    config_flags.DEFINE_config_dict("config", load_config(workdir))
  app.run(main, flags_parser=distributed.parse_flags_or_exit)


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


def import_config(cfg) -> ml_collections.ConfigDict:
  """The config an imported encoder is evaluated with: --config's, except that a ViT's position embedding
  is a parameter (model.pos_embed="learned") holding the file's table, whatever the method's recipe
  computes (MoCo v3's and MAE's fixed sin-cos tables are in their checkpoints too)."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  if cfg.model.name == "vit":
    cfg.model.pos_embed = "learned"
  return cfg


def load_import(cfg, path: str, fmt: str) -> Dict[str, Any]:
  """Reads the weights file `path` of --import_format `fmt` into the variables of cfg's encoder:
  {"variables", "label", "file", "format"}, label "import-" and 8 hex digits of the file's SHA-256 (the
  results' and resumable runs' name). Raises a one-line UserError for an unknown format, a missing, empty
  or unreadable file, or weights of another architecture; nothing is computed but shapes."""
  import jax
  import jax.numpy as jnp

  from ssl_jax import models, torch_names
  torch_names.check_import_format(fmt)
  models.check(cfg.model)
  module = models.build(cfg.model)
  size = cfg.model.image_size if cfg.model.name == "vit" else 32
  shapes = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), jnp.zeros((1, size, size, 3)))
  template = {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}
  variables = torch_names.load_import(path, fmt, cfg.model, template)
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 24), b""):
      digest.update(chunk)
  return {"variables": variables, "label": f"import-{digest.hexdigest()[:8]}", "file": os.path.abspath(path),
          "format": fmt}
