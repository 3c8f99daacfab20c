"""The base class of errors caused by the user's input (a config, data, a checkpoint, a diverging run).

Entry points turn a UserError into one line on stderr and exit code 2 (distributed.user_errors_exit). It
lives in a module that imports nothing, so that the entry points can catch it without importing
TensorFlow or JAX first: bad input is rejected in about a second, before the heavy imports.
"""


class UserError(Exception):
  """Bad input; the message is one actionable line."""


class ConfigError(UserError, ValueError):
  """A config that cannot run; the message is one actionable line. (Here, not in config.py, so that
  methods and models can raise it from their own checks without importing the config schema.)"""
