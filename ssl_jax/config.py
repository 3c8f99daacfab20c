"""The config schema shared by every method, variant parsing, validation and resolution.

Config files (configs/<method>.py) start from `base_config(method)`, which is locked: assigning a key that
does not exist raises at once, so a typo in a config file or a `--config.key=value` override cannot be
silently ignored.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import pathlib
import re
from typing import Any, Dict, Iterable, List, Set, Tuple

import ml_collections

from ssl_jax import methods, models, parallel
from ssl_jax.data import datasets, views
from ssl_jax.errors import ConfigError

SCHEDULES = ("cosine", "cosine_per_epoch", "steps")


def base_config(method: str, model: str = "resnet") -> ml_collections.ConfigDict:
  """Every key any config may set. Values here are CIFAR-10-sized placeholders that files override. The
  `method.*` keys are the method's (ssl_jax/methods), the `model.*` keys the model's (ssl_jax/models)."""
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
  cfg.cache_dataset = True        # keep the split (encoded images) in memory (small datasets)
  # dataset=folder (ssl_jax/data/folder.py): data_dir is a directory of images. Without train/ and val/
  # (or test/) subfolders, test_fraction of each class is held out, drawn with split_seed; image_size and
  # eval_crop_proportion give the evaluation's centre crop, mean and std the normalization (ImageNet's);
  # skip_bad leaves damaged files out, counted.
  cfg.folder = ml_collections.ConfigDict(dict(
      test_fraction=0.1, split_seed=0, image_size=224, eval_crop_proportion=0.875,
      mean=datasets.IMAGENET_MEAN, std=datasets.IMAGENET_STD, skip_bad=False))
  cfg.normalize_inputs = True     # subtract the dataset mean, divide by its std (SimCLR's code does not)
  # Colour jitter, grayscale, blur and solarize of the pre-training views in the jitted step on the
  # accelerator instead of the host's tf.data (data/device_augment.py): the host only decodes, crops and
  # flips. Same recipe, other draws; for hosts that cannot feed their chips (docs/input_pipeline.md).
  cfg.augment_on_device = False
  cfg.online_probe = True         # linear classifier on stop-gradient features, trained alongside
  cfg.skip_nonfinite_steps = 0    # 0: stop at the first step with a NaN/Inf; N: skip such updates, stop after N in a row
  # The train state's layout over the mesh: "replicated" (every device holds all of it) or "fsdp" (fully
  # sharded data parallel: parameters, optimizer state and targets split over the data axis, gathered in
  # the step; arrays of fewer than fsdp_min_size elements stay replicated). parallel.state_shardings.
  cfg.sharding = "replicated"
  cfg.fsdp_min_size = 2**14

  cfg.model = models.default_config(model)

  # The pre-training optimizer: optim.build reads the optimizer_settings keys (see there), train.py the
  # learning-rate schedule's: base_learning_rate, end_learning_rate and warmup_start_learning_rate (each
  # scaled by lr_scaling with the batch), linear warm-up over warmup_epochs, then `schedule`: "cosine" (per step), "cosine_per_epoch"
  # (the rate of each epoch's start, SimSiam's), or "steps" (x0.1 at each of lr_drop_epochs, MoCo v1's).
  cfg.optimizer = ml_collections.ConfigDict(dict(
      name="lars", base_learning_rate=0.3, lr_scaling="linear", warmup_epochs=10.0, end_learning_rate=0.0,
      warmup_start_learning_rate=0.0, schedule="cosine", lr_drop_epochs=(),
      **optimizer_settings(weight_decay=1e-6, momentum=0.9, nesterov=False)))

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



# The settings one parameter group may set (optimizer.groups; optim.build applies them).
GROUP_SETTINGS = ("lr_mult", "fixed_lr", "wd_mult", "frozen", "frozen_until_step", "frozen_until_epoch",
                  "required")

# A group's frozen=True, as frozen_until_step: a step the int32 step counter never reaches.
FROZEN_FOREVER = 2**31 - 1


def optimizer_settings(**settings) -> Dict[str, Any]:
  """The optimizer keys optim.build reads, shared by pre-training (cfg.optimizer) and the image-level
  evaluation protocols (cfg.eval.<protocol>), with their defaults; `settings` override them.

  weight_decay: coupled (added to the gradient) for sgd, lars and adam, decoupled for adamw (AdamW, Loshchilov &
    Hutter 2019); weight_decay_schedule "constant", or "cosine" from weight_decay at step 0 to
    weight_decay_end (DINO: 0.04 -> 0.4, main_dino.py l.309-312 with utils.cosine_scheduler l.187-198).
  exclude_bias_and_norm: no weight decay or LARS trust ratio on parameters with at most one dimension
    (biases, norm scales), as SimCLR, BYOL, Barlow Twins and DINO ("ndim > 1 and not a bias",
    utils.get_params_groups l.632-643); False decays everything, as MoCo v1/v2, SimSiam, SwAV and MoCo v3's
    AdamW (main_moco.py l.228-230) do. no_decay_names: parameter names excluded the same way.
  clip_global_norm: rescale the whole gradient to global norm <= c; clip_per_param: rescale each
    parameter's gradient to norm <= c on its own (DINO's utils.clip_gradients, utils.py l.132-141; not
    the same thing). 0 = off.
  groups: parameter groups, ((regex, settings), ...): the first regex that fully matches a parameter's
    "/"-joined path ("encoder/Conv_0/kernel") gives its settings; parameters no regex matches use the
    defaults. Settings (GROUP_SETTINGS): lr_mult (x the learning-rate schedule) or fixed_lr (a constant
    base rate, scaled by the batch like base_learning_rate: SimSiam's --fix-pred-lr), wd_mult (x weight
    decay; 0 excludes), frozen (never updated) or frozen_until_step=N (not updated while step < N: SwAV's
    prototypes, DINO's last layer) or frozen_until_epoch=E (the same, counted in epochs of the data), required (default True: a group that takes no parameter is an
    error). A frozen parameter is skipped as PyTorch skips a parameter whose grad is None: no update, no
    weight decay, no momentum or Adam moment advanced.
  """
  out = dict(weight_decay=0.0, weight_decay_schedule="constant", weight_decay_end=0.0, momentum=0.9,
             nesterov=False, trust_coefficient=1e-3, b1=0.9, b2=0.999, exclude_bias_and_norm=True,
             no_decay_names=(), clip_global_norm=0.0, clip_per_param=0.0, groups=())
  unknown = set(settings) - set(out)
  if unknown:
    raise ConfigError(f"unknown optimizer setting(s) {sorted(unknown)}")
  out.update(settings)
  return out


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def optimizer_groups(groups, where: str = "optimizer") -> List[Tuple[str, "re.Pattern", Dict[str, Any]]]:
  """`groups` (see optimizer_settings) checked and completed: [(regex, compiled regex, settings)], the
  settings holding lr_mult, fixed_lr (None when unset), wd_mult, frozen_until_step (FROZEN_FOREVER for
  frozen) and required. Accepts the lists config.json turns the pairs into. Raises ConfigError (one line)."""
  def fail(i, msg):
    raise ConfigError(f"{where}.groups[{i}]: {msg}")

  if not isinstance(groups, (tuple, list)):
    raise ConfigError(f"{where}.groups must be a tuple of (regex, settings) pairs, got {groups!r}")
  out = []
  for i, rule in enumerate(groups):
    if (not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str)
        or not isinstance(rule[1], (dict, ml_collections.ConfigDict))):
      fail(i, f"must be a (regex, settings dict) pair, got {rule!r}")
    pattern, given = rule[0], dict(rule[1])
    unknown = set(given) - set(GROUP_SETTINGS)
    if unknown:
      fail(i, f"unknown group setting(s) {sorted(unknown)}; known: {', '.join(GROUP_SETTINGS)}")
    try:
      compiled = re.compile(pattern)
    except re.error as e:
      fail(i, f"regex {pattern!r} does not compile ({e})")
    if "lr_mult" in given and "fixed_lr" in given:
      fail(i, "set lr_mult or fixed_lr, not both (fixed_lr replaces the schedule)")
    if len({"frozen", "frozen_until_step", "frozen_until_epoch"} & set(given)) > 1:
      fail(i, "set one of frozen (for the whole run), frozen_until_step and frozen_until_epoch")
    epochs = given.get("frozen_until_epoch")
    if epochs is not None and not (_is_number(epochs) and epochs >= 0):
      fail(i, f"frozen_until_epoch must be a number >= 0, got {epochs!r}")
    for key in ("lr_mult", "fixed_lr"):
      if key in given and not (_is_number(given[key]) and given[key] > 0):
        fail(i, f"{key} must be a number > 0 (freeze a group with frozen), got {given[key]!r}")
    if "wd_mult" in given and not (_is_number(given["wd_mult"]) and given["wd_mult"] >= 0):
      fail(i, f"wd_mult must be a number >= 0, got {given['wd_mult']!r}")
    for key in ("frozen", "required"):
      if key in given and not isinstance(given[key], bool):
        fail(i, f"{key} must be True or False, got {given[key]!r}")
    until = given.get("frozen_until_step", 0)
    if not (isinstance(until, int) and not isinstance(until, bool) and until >= 0):
      fail(i, f"frozen_until_step must be an integer >= 0 (a step; methods convert epochs), got {until!r}")
    fixed = given.get("fixed_lr")
    settings = dict(lr_mult=float(given.get("lr_mult", 1.0)), fixed_lr=None if fixed is None else float(fixed),
                    wd_mult=float(given.get("wd_mult", 1.0)),
                    frozen_until_step=FROZEN_FOREVER if given.get("frozen") else until,
                    frozen_until_epoch=None if epochs is None else float(epochs),
                    required=given.get("required", True))
    out.append((pattern, compiled, settings))
  return out


def optimizer_name_key(opt) -> str:
  """The key naming the optimizer: `name` in cfg.optimizer, `optimizer` in an evaluation protocol's
  section (which also holds the protocol's own settings)."""
  return "name" if "name" in opt else "optimizer"


def check_optimizer(opt, where: str) -> None:
  """Raises ConfigError (one line) for an optimizer section (optimizer_settings' keys and its name) that
  cannot run; `where` names the section in the message ("optimizer", "eval.finetune")."""
  def fail(msg):
    raise ConfigError(f"{where}{msg}")

  key = optimizer_name_key(opt)
  from ssl_jax import optim  # the registry of optimizers (optim imports this module: here, not at the top)
  if opt[key] not in optim.OPTIMIZERS:
    fail(f".{key} must be {', '.join(optim.OPTIMIZERS.names())}, got {opt[key]!r}")
  if opt.weight_decay < 0 or opt.weight_decay_end < 0:
    fail(f": weight_decay and weight_decay_end must be >= 0, got {opt.weight_decay} and {opt.weight_decay_end}")
  if opt.weight_decay_schedule not in ("constant", "cosine"):
    fail(f".weight_decay_schedule must be constant or cosine, got {opt.weight_decay_schedule!r}")
  if not 0 <= opt.momentum < 1:
    fail(f".momentum must be in [0, 1), got {opt.momentum}")
  if opt.clip_global_norm < 0 or opt.clip_per_param < 0 or (opt.clip_global_norm and opt.clip_per_param):
    fail(f": clip_global_norm and clip_per_param must be >= 0 (0 = off) and at most one of them set; got "
         f"{opt.clip_global_norm} and {opt.clip_per_param}")
  optimizer_groups(opt.groups, where)


HEAD_NORMS = ("none", "batchnorm", "layernorm")


def supervised_protocol(**settings) -> ml_collections.ConfigDict:
  """Settings of one image-level evaluation protocol (ssl_jax/evaluate/supervised.py). `optimizer` names
  its optimizer, built by optim.build from this section's optimizer_settings keys."""
  out = dict(train_encoder=False, label_fractions=(1.0,), epochs=(90.0,), total_steps=0, batch_size=4096,
             optimizer="sgd", base_learning_rate=0.1, lr_scaling="linear", warmup_epochs=0.0,
             schedule="cosine", lr_drop_epochs=(), crop_scale=(0.08, 1.0), log_every_steps=50,
             end_learning_rate=0.0,  # where the cosine ends (absolute: MAE fine-tuning's min_lr 1e-6)
             representation="",  # a ViT's representation for this protocol ("": model.representation)
             # What normalizes the features before the classifier: "none"; "batchnorm", BatchNorm without
             # affine (MAE's linear probe); "layernorm", a LayerNorm with affine (MAE fine-tuning's fc_norm).
             head_norm="none",
             head_init_std=0.0,     # 0: zero-initialized classifier (SimCLR); > 0: truncated normal (MAE: 0.01)
             # MAE's fine-tuning recipe (main_finetune.py); the defaults turn each off. drop_path_rate: the
             # ViT's stochastic depth while the encoder trains (-1: model.drop_path_rate); layer_decay: a
             # ViT's layer-wise learning-rate decay (0: off); label_smoothing; mixup_alpha / cutmix_alpha:
             # Beta parameters of mixup and cutmix over the batch (0: off; both set: one of the two per
             # step, cutmix with mixup_switch_prob); randaugment_layers (0: off), randaugment_magnitude,
             # randaugment_magnitude_std and erase_prob: the train view's RandAugment and random erasing.
             drop_path_rate=-1.0, layer_decay=0.0, label_smoothing=0.0, mixup_alpha=0.0, cutmix_alpha=0.0,
             mixup_switch_prob=0.5, randaugment_layers=0, randaugment_magnitude=9.0,
             randaugment_magnitude_std=0.5, erase_prob=0.0,
             checkpoint_every_steps=1000, **optimizer_settings(weight_decay=0.0, momentum=0.9, nesterov=True))
  unknown = set(settings) - set(out)
  if unknown:
    raise ConfigError(f"unknown evaluation protocol setting(s) {sorted(unknown)}")
  out.update(settings)
  return ml_collections.ConfigDict(out)


def imagenet_eval(cfg) -> None:
  """ImageNet: the linear probe trains on images (the fast probe's cached features and vmapped logits of
  1.28M x 1000 classes x a grid do not fit a host)."""
  cfg.eval.linear_mode = "paper"


def moco_linear_eval(cfg) -> None:
  """MoCo's linear classification (main_lincls.py, MoCo v1 and v2): SGD momentum 0.9 (not Nesterov),
  batch 256, lr 30, no weight decay, 100 epochs with the lr divided by 10 at epochs 60 and 80."""
  imagenet_eval(cfg)
  cfg.eval.paper_linear.update(epochs=(100.0,), batch_size=256, base_learning_rate=30.0, lr_scaling="none",
                               weight_decay=0.0, nesterov=False, schedule="steps", lr_drop_epochs=(60.0, 80.0))


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
  base = base_config(saved["method"]["name"], saved.get("model", {}).get("name", "resnet"))
  return ml_collections.ConfigDict(merge(base.to_dict(), saved))


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
  # The views' order (global crops first for multi-crop methods) as a number: a config.json sorts its
  # keys, so the order of cfg.views' keys does not survive a round trip (methods/base.py ordered_views).
  view["order"] = len(cfg.views)
  with cfg.views.unlocked():
    cfg.views[name] = ml_collections.ConfigDict(view)


def set_value(cfg, key: str, value: Any) -> None:
  """cfg's dotted `key` ("method.temperature") set to `value`; raises as the locked config does for a key
  that does not exist."""
  node = cfg
  *path, last = key.split(".")
  for part in path:
    node = node[part]
  node[last] = value


def apply_settings(cfg, settings: Iterable[str]) -> None:
  """KEY=VALUE strings (the benchmarks' --set) applied to cfg, each value a Python literal or a bare
  string."""
  for setting in settings:
    key, _, text = setting.partition("=")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    set_value(cfg, key, value)


def parse_variants(arg, known: Iterable[str], default: str) -> Set[str]:
  """`"cifar10,tiny"` -> {"cifar10", "tiny"}; raises ConfigError on names not in `known`."""
  names = {a.strip() for a in (arg or default).split(",") if a.strip()}
  unknown = names - set(known)
  if unknown:
    raise ConfigError(f"unknown config variant(s) {sorted(unknown)}; known: {', '.join(sorted(known))}")
  return names


def apply_tiny(cfg) -> None:
  """The `tiny` variant, for CPU runs and tests: the model's small size (ResNet-18 at width 16, 0.7M
  parameters) and the method's small heads and queues, each defined by its owner; everything else keeps
  the recipe it is combined with."""
  models.apply_tiny(cfg.model)
  methods.apply_tiny(cfg)


def validate(cfg, num_devices: int, num_processes: int = 1, platform: str = "") -> None:
  """Raises ConfigError (one line) for a config that cannot run; cheap, runs before anything compiles.
  platform: the devices' jax platform ("cpu", "tpu", ...), where known."""
  def fail(msg):
    raise ConfigError(msg)

  if cfg.dataset not in datasets.DATASETS and cfg.dataset != "folder":
    fail(f"unknown dataset {cfg.dataset!r}; known: {', '.join(sorted(datasets.DATASETS))}, folder")
  if not cfg.data_dir:
    fail("data_dir is not set: pass --config.data_dir=DIR (a prepared TFDS directory, or a folder of "
         "images with --config.dataset=folder)")
  if cfg.dataset == "folder" and not (0 < cfg.folder.test_fraction < 1 and cfg.folder.image_size > 0
                                      and 0 < cfg.folder.eval_crop_proportion <= 1):
    fail(f"folder.test_fraction must lie in (0, 1), folder.image_size be > 0 and folder.eval_crop_proportion "
         f"in (0, 1], got {cfg.folder.test_fraction}, {cfg.folder.image_size}, {cfg.folder.eval_crop_proportion}")
  if cfg.batch_size <= 0:
    fail(f"batch_size must be positive, got {cfg.batch_size}")
  if cfg.sharding not in parallel.SHARDINGS or cfg.fsdp_min_size < 1:
    fail(f"sharding must be one of {', '.join(parallel.SHARDINGS)} and fsdp_min_size >= 1, got "
         f"{cfg.sharding!r} and {cfg.fsdp_min_size}")
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
  check_optimizer(cfg.optimizer, "optimizer")
  if cfg.optimizer.lr_scaling not in ("linear", "sqrt", "none"):
    fail(f"optimizer.lr_scaling must be linear, sqrt or none, got {cfg.optimizer.lr_scaling!r}")
  if cfg.optimizer.schedule not in SCHEDULES:
    fail(f"optimizer.schedule must be {', '.join(SCHEDULES)}, got {cfg.optimizer.schedule!r}")
  if min(cfg.optimizer.end_learning_rate, cfg.optimizer.warmup_start_learning_rate,
         cfg.optimizer.warmup_epochs) < 0:
    fail("optimizer.end_learning_rate, warmup_start_learning_rate and warmup_epochs must be >= 0")
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
  models.check(cfg.model, platform, cfg.steps_per_loop)
  validate_eval(cfg)
  if not cfg.views:
    fail("the config defines no views")
  for name, view in cfg.views.items():
    unknown = set(view) - set(views.VIEW_DEFAULTS) - {"num", "order"}
    if unknown:
      fail(f"unknown view setting(s) {sorted(unknown)} in views.{name}")
  if cfg.get("augment_on_device", False):
    from ssl_jax.data import device_augment  # jax only, no TensorFlow
    device_augment.check([{k: x for k, x in v.items() if k not in ("num", "order")} for v in cfg.views.values()])
  methods.check_config(cfg, num_devices)  # last: a method's checks may rely on the settings checked above


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
    if p.schedule not in ("cosine", "steps"):
      raise ConfigError(f"eval.{name}: schedule must be cosine or steps, got {p.schedule!r}")
    check_optimizer(p, f"eval.{name}")
    check_finetune_recipe(cfg, p, f"eval.{name}")
    if p.representation:
      if "representation" not in cfg.model:
        raise ConfigError(f"eval.{name}.representation is a ViT setting; model.name={cfg.model.name!r} has "
                          "one representation: leave it empty")
      models.check(ml_collections.ConfigDict(dict(cfg.model.to_dict(), representation=p.representation)))


def check_finetune_recipe(cfg, p, where: str) -> None:
  """Raises ConfigError (one line) for a protocol's head and fine-tuning settings that cannot run."""
  if p.head_norm not in HEAD_NORMS:
    raise ConfigError(f"{where}.head_norm must be one of {', '.join(HEAD_NORMS)}, got {p.head_norm!r}")
  if p.end_learning_rate < 0 or p.label_smoothing < 0 or p.label_smoothing >= 1:
    raise ConfigError(f"{where}: end_learning_rate must be >= 0 and label_smoothing in [0, 1), got "
                      f"{p.end_learning_rate} and {p.label_smoothing}")
  if p.mixup_alpha < 0 or p.cutmix_alpha < 0 or not 0 <= p.mixup_switch_prob <= 1:
    raise ConfigError(f"{where}: mixup_alpha and cutmix_alpha must be >= 0 and mixup_switch_prob in [0, 1], "
                      f"got {p.mixup_alpha}, {p.cutmix_alpha} and {p.mixup_switch_prob}")
  vit_only = [k for k, off in (("layer_decay", 0.0), ("drop_path_rate", -1.0)) if p[k] != off]
  if vit_only and cfg.model.name != "vit":
    raise ConfigError(f"{where}.{vit_only[0]} is a ViT setting; model.name={cfg.model.name!r} has no blocks: "
                      "leave it at its default")
  if not 0 <= p.layer_decay <= 1 or not (p.drop_path_rate == -1.0 or 0 <= p.drop_path_rate < 1):
    raise ConfigError(f"{where}: layer_decay must be in [0, 1] (0: off) and drop_path_rate in [0, 1) or -1 "
                      f"(the model's), got {p.layer_decay} and {p.drop_path_rate}")
  if (p.layer_decay or p.drop_path_rate != -1.0) and not p.train_encoder:
    raise ConfigError(f"{where}: layer_decay and drop_path_rate act on a trained encoder; this protocol's "
                      "encoder is frozen (train_encoder=False)")


def resolve(cfg, num_train_examples: int) -> ml_collections.ConfigDict:
  """A copy with total_steps filled in from num_epochs when it is 0."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  if cfg.total_steps == 0:
    cfg.total_steps = max(1, int(math.floor(cfg.num_epochs * num_train_examples / cfg.batch_size)))
  return cfg
