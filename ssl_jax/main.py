"""Pre-training entry point.

  python -m ssl_jax.main --config=configs/simclr.py:cifar10 --workdir=DIR [--config.key=value ...]

Re-running with the same workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from ssl_jax import config as config_lib
from ssl_jax import distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<method>.py:<variant>", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and config.json")
_STOP_AT = flags.DEFINE_integer("stop_at_step", None, "save and exit at this step (re-run to continue)")
distributed.define_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None or not _WORKDIR.value:
    sys.exit("error: --config and --workdir are required")
  with distributed.user_errors_exit():
    distributed.initialize_from_flags()
    import jax
    config_lib.validate(_CONFIG.value, jax.device_count(), jax.process_count(), jax.default_backend())
    # TensorFlow and the input pipeline load only now: a bad config is rejected in a second or two.
    from ssl_jax import train
    train.train(_CONFIG.value, _WORKDIR.value, stop_at_step=_STOP_AT.value)


if __name__ == "__main__":
  app.run(main, flags_parser=distributed.parse_flags_or_exit)
