"""The cheap checks of a training workdir, run before the model state is built (no TensorFlow or orbax
here, so `python -m ssl_jax.main` rejects a bad workdir in a second or two):

- a workdir that is a regular file, or lies under one;
- a workdir that cannot be written (a read-only directory or file system);
- a workdir holding a run of another method, model or dataset (its config.json says so): resuming it would
  fail minutes later inside orbax, or, worse, mix two runs' metrics.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any, Dict, List

from etils import epath

from ssl_jax.errors import UserError


class WorkdirError(UserError, ValueError):
  """A workdir that cannot hold this run; the message is one actionable line."""


# The settings that make a run what it is: a workdir holds one run, so these must match its config.json.
# Other settings (steps, learning rate, logging) may change between resumptions, as --config overrides.
IDENTITY = ("method.name", "dataset", "model.name", "model.depth", "model.width", "model.width_multiplier",
            "model.cifar_stem", "model.arch", "model.patch_size", "model.embed_dim", "model.num_heads",
            "model.pos_embed")


def _get(tree: Dict[str, Any], dotted: str):
  for key in dotted.split("."):
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def _describe(cfg: Dict[str, Any]) -> str:
  model = cfg.get("model", {})
  return (f"{_get(cfg, 'method.name')} run on {cfg.get('dataset')} with a {model.get('name')}-"
          f"{model.get('depth')} of width {model.get('width')}")


def identity_mismatch(saved: Dict[str, Any], cfg: Dict[str, Any]) -> List[str]:
  """The IDENTITY settings on which two configs (as dicts) differ, as "key: saved -> new"."""
  return [f"{key}: {_get(saved, key)!r} -> {_get(cfg, key)!r}" for key in IDENTITY
          if _get(saved, key) != _get(cfg, key)]


def _check_writable(path: epath.Path, workdir: str) -> None:
  """Writes and removes a probe file: permission bits do not say it (root writes anywhere they allow,
  and a read-only mount refuses everyone)."""
  probe = path / f".write_probe_{uuid.uuid4().hex}"
  try:
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise WorkdirError(f"workdir {workdir} is not writable ({e.strerror or type(e).__name__}); "
                       "pass a --workdir you can write to")


def check_train_workdir(workdir: str, cfg) -> None:
  """Raises WorkdirError (one line) when `workdir` cannot hold a pre-training run of `cfg`. Writes nothing
  that stays: a workdir that does not exist yet is not created here."""
  path = epath.Path(workdir)
  remote = "://" in str(workdir)
  if path.exists() and not path.is_dir():
    raise WorkdirError(f"workdir {workdir} is a file, not a directory; pass a directory (it is created "
                       "when missing)")
  if not path.exists():
    if remote:  # object stores have no directories to check
      return
    # The nearest existing ancestor must be a directory we can write into.
    parent = os.path.abspath(workdir)
    while not os.path.exists(parent):
      parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
      raise WorkdirError(f"workdir {workdir} lies under {parent}, which is a file, not a directory")
    _check_writable(epath.Path(parent), workdir)
    return
  if not remote:
    _check_writable(path, workdir)
  config_path = path / "config.json"
  if not config_path.exists():
    return
  try:
    saved = json.loads(config_path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise WorkdirError(f"{config_path} cannot be read ({type(e).__name__}); the workdir holds a damaged "
                       "run: pass another --workdir, or remove it to start over")
  new = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  diff = identity_mismatch(saved, new)
  if diff:
    raise WorkdirError(f"workdir {workdir} holds a {_describe(saved)} ({'; '.join(diff)}); resuming it "
                       "with this config cannot work: pass another --workdir, or remove it to start over")
