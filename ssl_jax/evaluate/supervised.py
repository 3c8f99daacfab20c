"""Image-level evaluation protocols: the paper linear probe, fine-tuning, and semi-supervised fine-tuning.

One trainer serves the three, as in SimCLR's code: a linear classifier (zero-initialized, SimCLR's
`zero_init_logits_layer`) on the encoder's pooled representation, trained with labels on augmented train
images (random resized crop + horizontal flip), then scored once on the centre-cropped test split.
* paper_linear: the encoder is frozen in inference mode (running BN statistics) and gradients stop at the
  representation; only the classifier trains.
* finetune: the whole encoder trains with the classifier, batch norm in training mode.
* semi: finetune on a fraction of the labels (ssl_jax/evaluate/subsets.py).

The step is one jit in the global view: the state replicated (or split, config.sharding="fsdp"), the batch
sharded over the mesh's "data" axis.
Batch norm reduces over the batch axis of the global array, so its statistics are global (XLA inserts the
cross-device reduction), and the step computes the same numbers on 1 device, 8 devices or several
processes (tests/test_evaluate.py). Test batches are padded and masked (pipeline.eval_batches), so every
test example counts exactly once.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from ssl_jax import checkpoint as ckpt_lib
from ssl_jax import guard, losses, optim, parallel
from ssl_jax.data import augment, datasets, mixup, pipeline
from ssl_jax.evaluate import features as features_lib
from ssl_jax.evaluate import subsets
from ssl_jax.models import initializers, vit


@flax.struct.dataclass
class ClassifierState:
  """step; params: what trains ({"head"} or {"encoder", "head"}); frozen: the encoder parameters when they
  do not train; batch_stats: the encoder's BN statistics; opt_state; head_stats: the classifier's BN
  statistics (empty without head_batchnorm)."""

  step: jax.Array
  params: Any
  frozen: Any
  batch_stats: Any
  opt_state: Any
  head_stats: Any = flax.struct.field(default_factory=dict)  # the head's BN statistics (head_batchnorm)


def train_view(crop_size: int, crop_scale, p=None) -> Dict[str, Any]:
  """Random resized crop + flip and nothing else: SimCLR's preprocessing for linear evaluation and
  fine-tuning (`color_distort=False`); with protocol settings `p` that set them, RandAugment after the flip
  and random erasing (MAE's fine-tuning: timm's create_transform with auto_augment rand-m9-mstd0.5-inc1,
  re_prob 0.25)."""
  view = dict(augment.VIEW_DEFAULTS)
  view.update(crop_size=crop_size, crop_scale=tuple(crop_scale), flip_prob=0.5, color_jitter_prob=0.0,
              grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)
  if p is not None and p.randaugment_layers:
    view.update(randaugment_layers=int(p.randaugment_layers), randaugment_magnitude=p.randaugment_magnitude,
                randaugment_magnitude_std=p.randaugment_magnitude_std)
  if p is not None and p.erase_prob:
    view.update(erase_prob=p.erase_prob)
  return view


class NormLinear(nn.Module):
  """A normalization of the features, then the linear classifier "linear". norm "batchnorm": MAE's
  linear-probe head (main_linprobe.py: Sequential(BatchNorm1d(affine=False, eps=1e-6), Linear)), whose
  statistics are the global batch's (one jit over the mesh; main_linprobe.py's are per GPU), with running
  averages at PyTorch's momentum 0.1 for test time. norm "layernorm": MAE fine-tuning's fc_norm
  (models_vit.py l.27-29: a fresh LayerNorm, eps 1e-6, with affine, after the global pool)."""

  norm: str
  num_classes: int
  kernel_init: Callable

  @nn.compact
  def __call__(self, h, train: bool):
    if self.norm == "batchnorm":
      h = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-6, use_scale=False,
                       use_bias=False, name="bn")(h)
    else:
      h = nn.LayerNorm(epsilon=1e-6, name="fc_norm")(h)
    return nn.Dense(self.num_classes, kernel_init=self.kernel_init, name="linear")(h)


def classifier_head(p, num_classes: int) -> nn.Module:
  """The protocol's classifier: a linear layer, zero-initialized (SimCLR's zero_init_logits_layer) or
  drawn from timm's trunc_normal_ with std head_init_std (MAE: 0.01 linear probe, 2e-5 fine-tuning),
  after NormLinear's normalization when head_norm is set."""
  std = p.get("head_init_std", 0.0)
  init = initializers.trunc_normal(std) if std else nn.initializers.zeros
  norm = p.get("head_norm", "none")
  if norm != "none":
    return NormLinear(norm, num_classes, init, name="head")
  return nn.Dense(num_classes, kernel_init=init, name="head")


def apply_head(head: nn.Module, params, head_stats, h, train: bool):
  """(logits, new head_stats); a head without batch norm has empty statistics."""
  variables = {"params": params, **({"batch_stats": head_stats} if head_stats else {})}
  if train and head_stats:
    logits, updates = head.apply(variables, h, train=True, mutable=["batch_stats"])
    return logits, updates["batch_stats"]
  kwargs = {"train": train} if isinstance(head, NormLinear) else {}
  return head.apply(variables, h, **kwargs), head_stats


def make_step(method, head: nn.Module, tx, schedule: Callable, p, num_classes: int, represent: Callable,
              seed: int, grad_sharding: Optional[Callable] = None):
  """step(state, batch {"image", "label"}) -> (state, metrics) of protocol settings `p`. represent(frozen,
  batch_stats, x) is the frozen representation (used when not p.train_encoder); a trained encoder runs
  through the method's represent_train with p.representation and p.drop_path_rate, its dropout /
  drop-path key folded from `seed` and the step. Mixup / cutmix (on the global batch) and label smoothing
  make soft targets when p sets them. grad_sharding(grads): the layout the gradients are constrained to
  (FSDP), or None."""
  train_encoder = bool(p.train_encoder)
  representation = p.get("representation") or None
  drop_path = None if p.drop_path_rate < 0 else float(p.drop_path_rate)
  soft = bool(p.mixup_alpha or p.cutmix_alpha or p.label_smoothing)

  def step(state: ClassifierState, batch):
    x, y = batch["image"], batch["label"]
    key = jax.random.fold_in(jax.random.key(seed), state.step)
    if soft:
      x, targets, _ = mixup.mix_batch(jax.random.fold_in(key, 1), x, y, num_classes, p.mixup_alpha,
                                      p.cutmix_alpha, p.mixup_switch_prob, p.label_smoothing)

    def loss_fn(params):
      if train_encoder:
        h, batch_stats = method.represent_train({"params": params["encoder"], "batch_stats": state.batch_stats},
                                                x, key, representation, drop_path)
      else:
        h = jax.lax.stop_gradient(represent(state.frozen, state.batch_stats, x))
        batch_stats = state.batch_stats
      logits, head_stats = apply_head(head, params["head"], state.head_stats, h.astype(jnp.float32), True)
      loss = losses.soft_cross_entropy(logits, targets) if soft else losses.softmax_cross_entropy(logits, y)
      return loss, (batch_stats, head_stats, logits)

    (loss, (batch_stats, head_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if grad_sharding is not None:
      grads = jax.lax.with_sharding_constraint(grads, grad_sharding(grads))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # With mixed images the accuracy is against the unmixed labels: a training curve, not a score.
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == y),
               "learning_rate": schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                         head_stats=head_stats), metrics

  return step


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
  top = np.argsort(-logits, axis=1)[:, :k]
  return float(np.mean(np.any(top == labels[:, None], axis=1)))


def check_batch(cfg, p, name: str, num_devices: int, num_processes: int) -> None:
  """Raises ValueError (one line) when the protocol's batch cannot be split over devices and processes."""
  if p.batch_size % num_devices or p.batch_size % num_processes:
    raise ValueError(f"eval.{name}.batch_size={p.batch_size} is not divisible by the {num_devices} devices "
                     f"and {num_processes} processes; pass --config.eval.{name}.batch_size=N")


def build(p, method, variables: Optional[Dict[str, Any]], mesh, schedule: Callable, info, seed: int,
          represent: Optional[Callable] = None, total_steps: Optional[int] = None, where: str = "eval",
          sharding: str = "replicated", fsdp_min_size: int = 2**14):
  """(initial state replicated on the mesh, jitted step, jitted predict(state, x) -> logits) of one
  protocol's classifier on the representation of `method` (ssl_jax.methods: its `represent`, the same as
  kNN's and the online probe's, with the protocol's `representation` where set). variables: the
  encoder's {"params", "batch_stats"} (method.encoder_variables), or None with a custom
  `represent(params, batch_stats, x)` (the raw-pixel baseline). The optimizer is optim.build's from the
  protocol's section `p` (SGD, Nesterov by default; weight decay on weights only); total_steps: the run's
  (read by a cosine weight decay); where: the section's name in error messages ("eval.finetune");
  sharding, fsdp_min_size: the state's layout (config.sharding: the encoder, the classifier and the
  optimizer state replicated or split over the devices)."""
  train_encoder = bool(p.train_encoder)
  representation = p.get("representation") or None
  if represent is None:
    represent = lambda params, batch_stats, x: method.represent({"params": params, "batch_stats": batch_stats},
                                                                x, representation)
  x0 = jnp.zeros((1, info.image_size, info.image_size, 3))
  feature_dim = jax.eval_shape(represent, variables["params"] if variables else None,
                               variables["batch_stats"] if variables else None, x0).shape[-1]
  head = classifier_head(p, info.num_classes)
  head_variables = head.init(jax.random.key(seed), jnp.zeros((1, feature_dim)),
                             **({"train": False} if isinstance(head, NormLinear) else {}))
  params = {"head": head_variables["params"]}
  frozen = variables["params"] if variables else {}
  if train_encoder:
    params["encoder"], frozen = frozen, {}
  opt = p
  if p.layer_decay:  # generated groups after the config's own, which keep precedence
    opt = ml_collections.ConfigDict(p.to_dict())
    opt.groups = tuple(p.groups) + vit.layer_decay_groups(method.config.model.depth or
                                                          vit.ARCHS[method.config.model.arch][1], p.layer_decay)
  tx = optim.build(opt, params, schedule, batch_size=p.batch_size, total_steps=total_steps, where=where)
  state = ClassifierState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                          batch_stats=variables["batch_stats"] if variables else {}, opt_state=tx.init(params),
                          head_stats=head_variables.get("batch_stats", {}))
  layout = lambda tree: parallel.state_shardings(mesh, tree, sharding, fsdp_min_size)
  state_sharding = layout(state)
  state = parallel.place(state, state_sharding)
  step_fn = jax.jit(make_step(method, head, tx, schedule, p, info.num_classes, represent, seed,
                              None if sharding == "replicated" else layout),
                    in_shardings=(state_sharding, parallel.batch_sharded(mesh)),
                    out_shardings=(state_sharding, parallel.replicated(mesh)), donate_argnums=0)

  def predict(state, x):
    if train_encoder:
      h = method.represent({"params": state.params["encoder"], "batch_stats": state.batch_stats}, x,
                           representation)
    else:
      h = represent(state.frozen, state.batch_stats, x)
    return apply_head(head, state.params["head"], state.head_stats, h.astype(jnp.float32), False)[0]

  return state, step_fn, jax.jit(predict, out_shardings=parallel.batch_sharded(mesh))


def train_and_score(cfg, protocol: str, method, variables: Optional[Dict[str, Any]], mesh,
                    fraction: float, epochs: float, label: str,
                    represent: Optional[Callable] = None, checkpoint_dir: Optional[str] = None) -> Dict[str, Any]:
  """Trains the classifier of `protocol` (paper_linear, finetune or semi) on `fraction` of the labels,
  starting from the encoder `variables` ({"params", "batch_stats"}; None with a custom `represent`, the
  raw-pixel baseline), and scores it on the test split.

  checkpoint_dir: where the run saves its state every eval.<protocol>.checkpoint_every_steps and at the
  end; a run started again with the same directory resumes from its latest checkpoint (the input stream
  skips what was consumed), so an interrupted 90-epoch probe loses at most those steps and its numbers
  equal an uninterrupted run's (tested)."""
  p = cfg.eval[protocol]
  info = datasets.of(cfg)
  builder = pipeline.builder_of(cfg)
  keep, num_labelled, subset_desc = subsets.subset_filter(cfg.dataset, builder, info.train_split, fraction,
                                                          cfg.seed)
  steps_per_epoch = num_labelled / p.batch_size
  total_steps = p.total_steps or max(1, int(math.floor(epochs * steps_per_epoch)))
  peak = optim.scaled_learning_rate(p.base_learning_rate, p.lr_scaling, p.batch_size)
  schedule = optim.learning_rate(p, peak, total_steps, steps_per_epoch, end_value=p.end_learning_rate)

  state, step_fn, predict = build(p, method, variables, mesh, schedule, info, cfg.seed, represent,
                                  total_steps, f"eval.{protocol}", cfg.sharding, cfg.fsdp_min_size)
  manager, start_step = None, 0
  if checkpoint_dir is not None:
    manager = ckpt_lib.Manager(None, cfg, directory=checkpoint_dir)
    state, start_step = manager.restore_latest(state)
    if start_step:
      logging.info("%s %s: resumed from step %d", protocol, label, start_step)
  local_batch = p.batch_size // jax.process_count()
  batches = pipeline.pretrain_batches(cfg, [train_view(info.image_size, p.crop_scale, p)], local_batch,
                                      start_step, jax.process_index(), jax.process_count(),
                                      split=info.train_split, keep=keep)
  start = time.time()
  metrics, last_loss = None, float("nan")
  for step in range(start_step + 1, total_steps + 1):
    batch = next(batches)
    state, metrics = step_fn(state, parallel.to_global(mesh, {"image": batch["views"][0],
                                                              "label": batch["label"]}))
    if step % p.log_every_steps == 0 or step == total_steps:
      m = jax.device_get(metrics)
      last_loss = float(m["loss"])
      if not np.isfinite(last_loss):
        raise guard.NonFiniteError(f"{protocol} ({label}): loss became {last_loss} at step {step}")
      now = time.time()
      eta = (total_steps - step) * (now - start) / (step - start_step)
      if jax.process_index() == 0:
        logging.info("%s %s: step %d/%d loss %.4f train acc %.3f lr %.4g ETA %ds", protocol, label, step,
                     total_steps, last_loss, float(m["accuracy"]), float(m["learning_rate"]), eta)
    if manager is not None and (step % p.checkpoint_every_steps == 0 or step == total_steps):
      if not guard.all_finite(state):  # never save a non-finite state
        raise guard.NonFiniteError(f"{protocol} ({label}): the state became non-finite by step {step}; "
                                   f"the last good checkpoint is kept in {checkpoint_dir}")
      manager.save(step, state)
  train_seconds = time.time() - start

  logits, labels = features_lib.extract(cfg, lambda x: predict(state, x), info.test_split, mesh,
                                        cfg.eval.batch_size)
  out = {"top1": topk_accuracy(logits, labels, 1), "num_labelled": int(num_labelled), "subset": subset_desc,
         "label_fraction": float(fraction), "epochs": total_steps * p.batch_size / num_labelled,
         "steps": int(total_steps),
         "batch_size": int(p.batch_size), "peak_learning_rate": float(peak), "final_train_loss": last_loss,
         "train_seconds": train_seconds}
  if info.num_classes > 5:
    out["top5"] = topk_accuracy(logits, labels, 5)
  return out


def run(cfg, protocol: str, method, variables: Optional[Dict[str, Any]], mesh, name: str,
        represent: Optional[Callable] = None, checkpoint_root: Optional[str] = None) -> Dict[str, Any]:
  """Every label fraction of `protocol` for one encoder; metrics keyed "top1" (one fraction) or
  "top1_<pct>pct" (several), plus the settings of each run. Each run checkpoints under
  checkpoint_root/<name>_<pct>pct when checkpoint_root is given."""
  p = cfg.eval[protocol]
  results: Dict[str, Any] = {}
  fractions = list(zip(p.label_fractions, p.epochs))
  runs = []
  for fraction, epochs in fractions:
    label = f"{name} {fraction:.0%} labels"
    directory = None if checkpoint_root is None else f"{checkpoint_root}/{name}_{fraction * 100:g}pct"
    r = train_and_score(cfg, protocol, method, variables, mesh, fraction, epochs, label, represent,
                        directory)
    suffix = "" if len(fractions) == 1 else f"_{fraction * 100:g}pct"
    for key in ("top1", "top5"):
      if key in r:
        results[key + suffix] = r.pop(key)
    runs.append(r)
  results["runs"] = runs  # the settings and training figures of each fraction's run
  return results
