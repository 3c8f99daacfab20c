"""Pre-training entry point.

  python -m ssl_jax.main --config=configs/simclr.py:cifar10 --workdir=DIR [--config.key=value ...]

Re-running with the same workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from ssl_jax import config as config_lib
from ssl_jax import distributed
from ssl_jax import host_memory
from ssl_jax import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<method>.py:<variant>", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and config.json")
_STOP_AT = flags.DEFINE_integer("stop_at_step", None, "save and exit at this step (re-run to continue)")
distributed.define_flags()


def main(argv):
  if len(argv) > 1:
    distributed.exit_with_error(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None:
    distributed.exit_with_error("--config is required: --config=configs/<method>.py[:variant]")
  if not _WORKDIR.value:
    distributed.exit_with_error("--workdir is required: the directory for checkpoints, metrics and config.json")
  distributed.hold_library_logs()
  with distributed.user_errors_exit(workdir=_WORKDIR.value):
    distributed.initialize_from_flags()
    import jax
    config_lib.validate(_CONFIG.value, jax.device_count(), jax.process_count(), jax.default_backend())
    workdir_lib.check_train_workdir(_WORKDIR.value, _CONFIG.value)
    # TensorFlow and the input pipeline load only now: a bad config is rejected in a second or two.
    from ssl_jax import train
    train.train(_CONFIG.value, _WORKDIR.value, stop_at_step=_STOP_AT.value)


if __name__ == "__main__":
  host_memory.reexec_with_huge_pages()  # XLA:CPU's step buffers on huge pages (CPU speed only)
  app.run(main, flags_parser=distributed.parse_flags_or_exit)
