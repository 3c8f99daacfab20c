"""The config schema shared by every method, variant parsing, validation and resolution.

Config files (configs/<method>.py) start from `base_config(method)`, which is locked: assigning a key that
does not exist raises at once, so a typo in a config file or a `--config.key=value` override cannot be
silently ignored.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
from typing import Iterable, Set

import ml_collections

from ssl_jax import methods
from ssl_jax.data import datasets, views
from ssl_jax.errors import UserError


class ConfigError(UserError, ValueError):
  """A config that cannot run; the message is one actionable line."""


# models/conv.py's CONV_IMPLS, named here so that validation needs no flax import (tests keep them equal).
CONV_IMPLS = ("xla", "patches", "winograd")


def base_config(method: str) -> ml_collections.ConfigDict:
  """Every key any config may set. Values here are CIFAR-10-sized placeholders that files override."""
  cfg = ml_collections.ConfigDict()
  cfg.dataset = "cifar10"
  cfg.data_dir = ""               # a prepared TFDS directory (required; never downloaded implicitly)
  cfg.batch_size = 256            # global, over all devices and processes
  cfg.num_epochs = 100.0
  cfg.total_steps = 0             # 0: num_epochs * train examples // batch_size
  cfg.seed = 0
  cfg.log_every_steps = 50
  cfg.checkpoint_every_steps = 1000
  cfg.keep_checkpoints = 3
  cfg.steps_per_loop = 1          # steps per compiled call (lax.scan over stacked batches); divides the two above
  cfg.shuffle_buffer = 50_000
  cfg.data_shards = 0             # input streams making up each global batch; 0: one per process
  cfg.cache_dataset = True        # keep the decoded split in memory (small datasets)
  cfg.normalize_inputs = True     # subtract the dataset mean, divide by its std (SimCLR's code does not)
  cfg.online_probe = True         # linear classifier on stop-gradient features, trained alongside
  cfg.skip_nonfinite_steps = 0    # 0: stop at the first step with a NaN/Inf; N: skip such updates, stop after N in a row

  cfg.model = ml_collections.ConfigDict(dict(
      name="resnet", depth=50, width=64, width_multiplier=1, cifar_stem=False, dtype="float32",
      bn_momentum=0.9,
      conv_impl="xla"))  # CPU only: "patches" (kernel-gradient rewrite), "winograd" (faster still; benchmarks/)

  cfg.optimizer = ml_collections.ConfigDict(dict(
      name="lars", base_learning_rate=0.3, lr_scaling="linear", weight_decay=1e-6, momentum=0.9,
      trust_coefficient=1e-3, nesterov=False, b1=0.9, b2=0.999, warmup_epochs=10.0, end_learning_rate=0.0,
      exclude_bias_and_norm=True, no_decay_names=()))

  # Evaluation protocols (ssl_jax.evaluate); kNN as in InstDisc / DINO. `linear_mode`: "fast" fits the
  # linear probe on cached features (a vmapped lr x wd sweep, linear_steps full-batch steps, chosen on a
  # held-out linear_val_fraction of the train split; the sweep fits on at most linear_select_examples
  # held-in examples, 0 = all, and the chosen setting is refitted on the whole train split); "paper"
  # trains it on augmented images with the method's own recipe (eval.paper_linear).
  cfg.eval = ml_collections.ConfigDict(dict(
      batch_size=256, knn_k=(10, 20, 100, 200), knn_temperature=0.07, linear_mode="fast", linear_steps=300,
      linear_val_fraction=0.1, linear_select_examples=10_000, baselines=True,
      # Protocols that train on images (random resized crop + flip; centre crop at test), one run per
      # label fraction. Defaults: SimCLR's (Chen et al. 2020): linear head, appendix B.6 and the official
      # README (Nesterov SGD, batch 4096, lr 0.1 x B/256, weight decay 1e-6, 90 epochs, no warm-up,
      # zero-initialized classifier); fine-tuning with 1% / 10% of the labels, appendix B.5 (Nesterov SGD,
      # batch 4096, lr 0.05 x B/256, no weight decay, 60 / 30 epochs, no warm-up). `finetune` on all the
      # labels uses the B.5 recipe for 90 epochs (our choice). total_steps > 0 overrides the epochs.
      paper_linear=supervised_protocol(train_encoder=False, label_fractions=(1.0,), epochs=(90.0,),
                                       base_learning_rate=0.1, weight_decay=1e-6),
      finetune=supervised_protocol(train_encoder=True, label_fractions=(1.0,), epochs=(90.0,),
                                   base_learning_rate=0.05, weight_decay=0.0),
      semi=supervised_protocol(train_encoder=True, label_fractions=(0.01, 0.1), epochs=(60.0, 30.0),
                               base_learning_rate=0.05, weight_decay=0.0),
  ))

  cfg.method = methods.default_config(method)
  cfg.views = ml_collections.ConfigDict()
  return cfg


def supervised_protocol(**settings) -> ml_collections.ConfigDict:
  """Settings of one image-level evaluation protocol (ssl_jax/evaluate/supervised.py)."""
  out = dict(train_encoder=False, label_fractions=(1.0,), epochs=(90.0,), total_steps=0, batch_size=4096,
             optimizer="sgd", base_learning_rate=0.1, lr_scaling="linear", weight_decay=0.0, momentum=0.9,
             nesterov=True, warmup_epochs=0.0, schedule="cosine", lr_drop_epochs=(), crop_scale=(0.08, 1.0),
             log_every_steps=50, checkpoint_every_steps=1000)
  unknown = set(settings) - set(out)
  if unknown:
    raise ConfigError(f"unknown evaluation protocol setting(s) {sorted(unknown)}")
  out.update(settings)
  return ml_collections.ConfigDict(out)


def imagenet_eval(cfg) -> None:
  """ImageNet: the linear probe trains on images (the fast probe's cached features and vmapped logits of
  1.28M x 1000 classes x a grid do not fit a host)."""
  cfg.eval.linear_mode = "paper"


def cifar10_eval(cfg) -> None:
  """CIFAR-10 image-level protocols: the linear head of the official SimCLR README's CIFAR-10 example
  (Nesterov SGD, batch 512, lr 0.1 x B/256, no weight decay, 100 epochs), the same batch for fine-tuning."""
  cfg.eval.paper_linear.update(epochs=(100.0,), batch_size=512, base_learning_rate=0.1, weight_decay=0.0)
  cfg.eval.finetune.batch_size = 512
  cfg.eval.semi.batch_size = 512


def with_defaults(saved: dict) -> ml_collections.ConfigDict:
  """A config saved by an earlier run (config.json), with keys added to the schema since then filled in
  from base_config of its method, so evaluation settings introduced later apply to older workdirs."""
  def merge(base, override):
    out = dict(base)
    for k, v in override.items():
      # JSON turned the config's tuples into lists; tuples again, so `--config.key='(a, b)'` overrides
      # (ml_collections' flags cannot override a list).
      v = tuple(v) if isinstance(v, list) else v
      if isinstance(v, dict):
        v = merge(base[k] if isinstance(base.get(k), dict) else {}, v)
      out[k] = v
    return out
  return ml_collections.ConfigDict(merge(base_config(saved["method"]["name"]).to_dict(), saved))


def load(spec: str) -> ml_collections.ConfigDict:
  """Loads "path/to/config.py[:variant]" the way --config does (for tests, notebooks, scripts)."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def add_view(cfg, name: str, num: int = 1, **settings) -> None:
  """Adds a view recipe `cfg.views.<name>` used `num` times per image; settings are augment view keys."""
  unknown = set(settings) - set(views.VIEW_DEFAULTS)
  if unknown:
    raise ConfigError(f"unknown view setting(s) {sorted(unknown)} for view {name!r}")
  view = dict(views.VIEW_DEFAULTS)
  view.update(settings)
  view["num"] = num
  with cfg.views.unlocked():
    cfg.views[name] = ml_collections.ConfigDict(view)


def parse_variants(arg, known: Iterable[str], default: str) -> Set[str]:
  """`"cifar10,tiny"` -> {"cifar10", "tiny"}; raises ConfigError on names not in `known`."""
  names = {a.strip() for a in (arg or default).split(",") if a.strip()}
  unknown = names - set(known)
  if unknown:
    raise ConfigError(f"unknown config variant(s) {sorted(unknown)}; known: {', '.join(sorted(known))}")
  return names


def apply_tiny(cfg) -> None:
  """A <1M-parameter encoder (ResNet-18 at width 16, 0.7M parameters) and small heads, for CPU runs and
  tests; everything else keeps the recipe it is combined with."""
  cfg.model.depth = 18
  cfg.model.width = 16
  for key in ("proj_hidden_dim", "pred_hidden_dim"):
    if key in cfg.method:
      cfg.method[key] = 256
  if "proj_dim" in cfg.method:
    cfg.method.proj_dim = min(cfg.method.proj_dim, 64)
  if "queue_size" in cfg.method:
    cfg.method.queue_size = 4096


def validate(cfg, num_devices: int, num_processes: int = 1, platform: str = "") -> None:
  """Raises ConfigError (one line) for a config that cannot run; cheap, runs before anything compiles.
  platform: the devices' jax platform ("cpu", "tpu", ...), where known."""
  def fail(msg):
    raise ConfigError(msg)

  if cfg.dataset not in datasets.DATASETS:
    fail(f"unknown dataset {cfg.dataset!r}; known: {', '.join(sorted(datasets.DATASETS))}")
  if not cfg.data_dir:
    fail("data_dir is not set: pass --config.data_dir=DIR (a prepared TFDS directory)")
  if cfg.batch_size <= 0:
    fail(f"batch_size must be positive, got {cfg.batch_size}")
  if cfg.batch_size % num_devices:
    fail(f"batch_size={cfg.batch_size} is not divisible by the {num_devices} devices; "
         f"use a multiple of {num_devices}")
  if cfg.batch_size % num_processes:
    fail(f"batch_size={cfg.batch_size} is not divisible by the {num_processes} processes")
  shards = cfg.data_shards or num_processes
  if cfg.data_shards < 0 or shards % num_processes or cfg.batch_size % shards:
    fail(f"data_shards={cfg.data_shards} must be a multiple of the {num_processes} processes and divide "
         f"batch_size={cfg.batch_size}")
  if cfg.optimizer.base_learning_rate <= 0:
    fail(f"optimizer.base_learning_rate must be > 0, got {cfg.optimizer.base_learning_rate}")
  if cfg.optimizer.name not in ("lars", "sgd", "adamw"):
    fail(f"optimizer.name must be lars, sgd or adamw, got {cfg.optimizer.name!r}")
  if cfg.optimizer.lr_scaling not in ("linear", "sqrt", "none"):
    fail(f"optimizer.lr_scaling must be linear, sqrt or none, got {cfg.optimizer.lr_scaling!r}")
  if "temperature" in cfg.method and cfg.method.temperature <= 0:
    fail(f"method.temperature must be > 0, got {cfg.method.temperature}")
  if "queue_size" in cfg.method and cfg.method.queue_size % cfg.batch_size:
    fail(f"method.queue_size={cfg.method.queue_size} must be a multiple of batch_size={cfg.batch_size}")
  if cfg.total_steps < 0 or (cfg.total_steps == 0 and cfg.num_epochs <= 0):
    fail("set total_steps > 0 or num_epochs > 0")
  if cfg.skip_nonfinite_steps < 0:
    fail(f"skip_nonfinite_steps must be >= 0 (0 stops at the first non-finite step), got {cfg.skip_nonfinite_steps}")
  if cfg.log_every_steps <= 0 or cfg.checkpoint_every_steps <= 0:
    fail("log_every_steps and checkpoint_every_steps must be > 0")
  if cfg.steps_per_loop <= 0 or cfg.log_every_steps % cfg.steps_per_loop or (
      cfg.checkpoint_every_steps % cfg.steps_per_loop):
    fail(f"steps_per_loop={cfg.steps_per_loop} must be > 0 and divide log_every_steps={cfg.log_every_steps} "
         f"and checkpoint_every_steps={cfg.checkpoint_every_steps}")
  if cfg.steps_per_loop > 1 and platform == "cpu" and cfg.model.conv_impl == "xla":
    # XLA:CPU rewrites a kernel-gradient convolution into its library's layout only outside loops
    # (models/conv.py, _xla_conv_input_grad): inside the scan a step measured 37x and 54x slower.
    fail(f"steps_per_loop={cfg.steps_per_loop} with model.conv_impl=xla is ~40x slower on CPU; "
         "use model.conv_impl=patches or winograd, or steps_per_loop=1")
  if cfg.model.dtype not in ("float32", "bfloat16"):
    fail(f"model.dtype must be float32 or bfloat16, got {cfg.model.dtype!r}")
  if cfg.model.conv_impl not in CONV_IMPLS:
    fail(f"model.conv_impl must be xla, patches or winograd, got {cfg.model.conv_impl!r}")
  validate_eval(cfg)
  if not cfg.views:
    fail("the config defines no views")
  for name, view in cfg.views.items():
    unknown = set(view) - set(views.VIEW_DEFAULTS) - {"num"}
    if unknown:
      fail(f"unknown view setting(s) {sorted(unknown)} in views.{name}")


def validate_eval(cfg) -> None:
  """Raises ConfigError (one line) for evaluation settings that cannot run."""
  if cfg.eval.linear_mode not in ("fast", "paper"):
    raise ConfigError(f"eval.linear_mode must be fast or paper, got {cfg.eval.linear_mode!r}")
  if not 0 < cfg.eval.linear_val_fraction < 1 or cfg.eval.linear_select_examples < 0:
    raise ConfigError(f"eval.linear_val_fraction must be in (0, 1) and eval.linear_select_examples >= 0, got "
                      f"{cfg.eval.linear_val_fraction} and {cfg.eval.linear_select_examples}")
  for name in ("paper_linear", "finetune", "semi"):
    p = cfg.eval[name]
    if len(p.label_fractions) != len(p.epochs) or not all(0 < f <= 1 for f in p.label_fractions):
      raise ConfigError(f"eval.{name}: label_fractions must be in (0, 1] with one epochs entry each, got "
                        f"{tuple(p.label_fractions)} and {tuple(p.epochs)}")
    if p.base_learning_rate <= 0 or p.batch_size <= 0:
      raise ConfigError(f"eval.{name}: base_learning_rate and batch_size must be > 0")
    if p.optimizer not in ("sgd", "lars") or p.schedule not in ("cosine", "steps"):
      raise ConfigError(f"eval.{name}: optimizer must be sgd or lars and schedule cosine or steps")


def resolve(cfg, num_train_examples: int) -> ml_collections.ConfigDict:
  """A copy with total_steps filled in from num_epochs when it is 0."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  if cfg.total_steps == 0:
    cfg.total_steps = max(1, int(math.floor(cfg.num_epochs * num_train_examples / cfg.batch_size)))
  return cfg


def steps_per_epoch(cfg, num_train_examples: int) -> float:
  return num_train_examples / cfg.batch_size
