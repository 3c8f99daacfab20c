"""python -m ssl_jax.evaluate --workdir=DIR --protocol=knn|linear|finetune|semi [--checkpoint=latest|STEP]
[--config.key=value ...]

The config is the one the run saved (DIR/config.json); --config.key=value overrides it, e.g.
--config.data_dir=... when the data moved, or --config.eval.knn_k='(20,)'.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from ssl_jax import distributed
from ssl_jax.evaluate import workdir as workdir_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "training workdir holding config.json and checkpoints")
_PROTOCOL = flags.DEFINE_string("protocol", "knn", f"one of {', '.join(workdir_lib.PROTOCOLS.names())}")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", "'latest' or a step number")
distributed.define_flags()


def _workdir_from_argv(argv):
  for i, arg in enumerate(argv):
    if arg.startswith("--workdir="):
      return arg.split("=", 1)[1]
    if arg == "--workdir" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def main(argv):
  if len(argv) > 1:
    distributed.exit_with_error(f"unexpected arguments: {' '.join(argv[1:])}")
  distributed.hold_library_logs()
  with distributed.user_errors_exit(workdir=_WORKDIR.value):
    workdir_lib.check_protocol(_PROTOCOL.value)
    distributed.initialize_from_flags()
    from ssl_jax.evaluate import run  # TensorFlow, orbax: after the cheap checks
    out = run.evaluate(_WORKDIR.value, _PROTOCOL.value, _CHECKPOINT.value, cfg=flags.FLAGS.config)
  for name, metrics in out["results"].items():
    print(f"{name:12s} {out['protocol']} top-1 {100 * run.headline(out['protocol'], metrics):6.2f}%  "
          + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))


if __name__ == "__main__":
  workdir = _workdir_from_argv(sys.argv)
  if not workdir:
    print("error: --workdir is required: a training workdir (holding config.json and checkpoints/)",
          file=sys.stderr)
    sys.exit(2)
  # The config comes from the workdir, so it must be read before flags are parsed to allow overrides.
  with distributed.user_errors_exit():
    config_flags.DEFINE_config_dict("config", workdir_lib.load_config(workdir))
  app.run(main, flags_parser=distributed.parse_flags_or_exit)
