"""ssl_jax: self-supervised visual representation learning in JAX/Flax, TPU first."""

__version__ = "0.1.0"

import os as _os
import sys as _sys

# TensorFlow (the input pipeline) logs C++ warnings of no use to a user (e.g. a partly read cache at
# exit) unless TF_CPP_MIN_LOG_LEVEL is 2 when it loads; jax's import sets it to 1 when it is unset, so it
# is set here, before anything imports jax. A value the user set is kept.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# On CPUs where TensorFlow turns its oneDNN kernels on (e.g. AMD EPYC, recent Xeons) it says so in two
# C++ log lines that TF_CPP_MIN_LOG_LEVEL does not hold back, and its numerics then depend on the CPU.
# Off by default: the input pipeline gives the same images on every host whatever its CPU, and bad input
# still prints one error line. A value the user set is kept.
if "tensorflow" in _sys.modules and "TF_ENABLE_ONEDNN_OPTS" not in _os.environ:
  # Too late to turn them off: say so once, since a run resumed this way sees other images than before.
  import warnings as _warnings
  _warnings.warn("tensorflow was imported before ssl_jax, so its oneDNN kernels may be on and the input "
                 "pipeline's images depend on the CPU: import ssl_jax first, or set TF_ENABLE_ONEDNN_OPTS",
                 stacklevel=2)
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
del _os, _sys
