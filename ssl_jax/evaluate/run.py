"""Evaluation of a workdir's checkpoint: feature extraction, protocols, baselines, and the result files.

Writes DIR/eval/<protocol>_<step>.json (every setting and metric) and appends rows to DIR/eval/results.md.
Every check on the input (workdir, config.json, checkpoint, protocol, labels) runs before anything is
computed or written.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Dict, Optional

import jax
from etils import epath

from ssl_jax import checkpoint as ckpt_lib
from ssl_jax import config as config_lib
from ssl_jax import distributed, parallel, train
from ssl_jax.data import datasets, pipeline
from ssl_jax.evaluate import features as features_lib
from ssl_jax.evaluate import knn as knn_lib
from ssl_jax.evaluate import linear as linear_lib
from ssl_jax.evaluate import subsets, supervised
from ssl_jax.evaluate.workdir import EvalError, check_protocol, image_section, load_config


class Encoder:
  """A method's encoder restored from a workdir (or freshly initialized, for the random baseline)."""

  def __init__(self, cfg, mesh, cache_features: bool = False):
    """cache_features: keep every split's features by (encoder key, split), for callers that evaluate the
    same encoder several times (the quickstart: the kNN curve, then kNN and the linear probe). Off by
    default: at ImageNet scale one split's features are gigabytes."""
    from ssl_jax import methods, optim
    self.cfg = cfg
    self.mesh = mesh
    self.cache_features = cache_features
    self._cache = {}
    self.info = datasets.of(cfg)
    # The training data's facts: schedules and freezes counted in epochs (SwAV's and DINO's optimizer
    # groups) are part of the state's structure.
    num_train = pipeline.num_examples(pipeline.builder_of(cfg), self.info.pretrain_split)
    self.method = methods.get(cfg, methods.DataFacts(num_train, cfg.batch_size))
    schedule = optim.warmup_cosine(1.0, 0, cfg.total_steps)
    state, _ = train.create_train_state(cfg, self.method, schedule, self.info.num_classes)
    # The pre-training run's layout (config.sharding, and the method's split state such as a sharded
    # memory bank): a checkpoint restores into either layout.
    self.initial_state = parallel.place(state, train.state_layout(cfg, self.method, mesh, state))
    # Every protocol reads the method's representation (method.represent of method.encoder_variables).
    self._represent = jax.jit(self.method.represent, out_shardings=parallel.batch_sharded(mesh))

  def restore(self, workdir: str, step: int):
    """The state saved at `step` (see find_checkpoint), verified against its digest; raises EvalError if it
    cannot be read or is damaged."""
    try:
      return ckpt_lib.Manager(workdir, self.cfg, create=False).restore(step, self.initial_state)
    except ckpt_lib.CheckpointError as e:
      raise EvalError(str(e))

  def restore_latest(self, workdir: str):
    """(state, step) of the newest intact checkpoint: a damaged newer one is named in a warning and left
    where it is (evaluation never moves a training run's files)."""
    try:
      state, step = ckpt_lib.Manager(workdir, self.cfg, create=False).restore_latest(
          self.initial_state, move_damaged=False)
    except ckpt_lib.CheckpointError as e:
      raise EvalError(str(e))
    return state, step

  def features(self, state, split: str, key=None):
    """(features, labels) of `split`; `key` names the encoder (e.g. ("step", 375), ("random",)) for the
    cache."""
    def compute():
      represent = lambda x: self._represent(self.encoder_variables(state), x)
      return features_lib.extract(self.cfg, represent, split, self.mesh, self.cfg.eval.batch_size)
    return self._cached(key, split, compute)

  def _cached(self, key, split: str, compute):
    if not self.cache_features or key is None:
      return compute()
    if (key, split) not in self._cache:
      self._cache[(key, split)] = compute()
    return self._cache[(key, split)]

  def encoder_variables(self, state) -> Dict[str, Any]:
    """The variables of the encoder the method evaluates (DINO: its teacher)."""
    return self.method.encoder_variables(state.params, state.batch_stats, state.method_state)

  def with_encoder(self, state, variables: Dict[str, Any]):
    """`state` with every copy of the encoder (the online one, and a momentum / EMA network of
    method_state: DINO's teacher, BYOL's target, MoCo's key encoder) replaced by `variables` ({"params",
    "batch_stats"}, e.g. imported weights), so that whichever copy the method evaluates holds them."""
    stats = dict(state.batch_stats)
    if variables["batch_stats"] or "encoder" in stats:
      stats["encoder"] = variables["batch_stats"]
    method_state = dict(state.method_state)
    for key, value in method_state.items():
      if isinstance(value, dict) and "encoder" in value:
        method_state[key] = dict(value, encoder=variables["batch_stats" if key.endswith("batch_stats") else "params"])
    state = state.replace(params=dict(state.params, encoder=variables["params"]), batch_stats=stats,
                          method_state=method_state)
    return parallel.place(state, train.state_layout(self.cfg, self.method, self.mesh, state))

  def pixel_features(self, split: str):
    return self._cached(("raw_pixels",), split, lambda: features_lib.extract(
        self.cfg, features_lib.raw_pixels, split, self.mesh, self.cfg.eval.batch_size))


def find_checkpoint(workdir: str, cfg, checkpoint: str = "latest") -> int:
  """The step of checkpoint "latest" or of a step number; raises EvalError if there is none."""
  steps = ckpt_lib.Manager(workdir, cfg, create=False).all_steps() \
      if ckpt_lib.checkpoint_dir(workdir).exists() else []
  if not steps:
    raise EvalError(f"no checkpoints in {ckpt_lib.checkpoint_dir(workdir)}")
  if checkpoint == "latest":
    return max(steps)
  try:
    step = int(checkpoint)
  except ValueError:
    raise EvalError(f"--checkpoint must be 'latest' or a step number, got {checkpoint!r}")
  if step not in steps:
    raise EvalError(f"no checkpoint at step {step} in {ckpt_lib.checkpoint_dir(workdir)}; "
                    f"available: {sorted(steps)}")
  return step


def _knn(cfg, num_classes, train_x, train_y, test_x, test_y):
  return knn_lib.knn_accuracy(train_x, train_y, test_x, test_y, tuple(cfg.eval.knn_k), num_classes,
                              cfg.eval.knn_temperature)


def _fast_linear(cfg, num_classes, train_x, train_y, test_x, test_y):
  return linear_lib.linear_probe(train_x, train_y, test_x, test_y, num_classes, seed=cfg.seed,
                                 steps=cfg.eval.linear_steps, val_fraction=cfg.eval.linear_val_fraction,
                                 max_fit_examples=cfg.eval.linear_select_examples)


# The protocols on cached features, by name (workdir.PROTOCOLS names every protocol).
FEATURE_PROTOCOLS = {"knn": _knn, "linear": _fast_linear}


def run_protocol(protocol: str, cfg, train_data, test_data) -> Dict[str, Any]:
  num_classes = datasets.of(cfg).num_classes
  return FEATURE_PROTOCOLS[protocol](cfg, num_classes, *train_data, *test_data)


def settings_digest(settings, seed: int) -> str:
  """8 hex digits naming a protocol's settings and the seed (log and checkpoint cadence excluded)."""
  d = {k: v for k, v in settings.to_dict().items() if k not in ("log_every_steps", "checkpoint_every_steps")}
  d["seed"] = seed
  return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]


def headline(protocol: str, metrics: Dict[str, Any]) -> float:
  """The one number a results table shows: kNN top-1 at k=20 (DINO's default), else top-1 (of the
  smallest label fraction for semi)."""
  if protocol == "knn":
    return metrics.get("knn_top1_k20", next(iter(metrics.values())))
  if "linear_top1" in metrics:
    return metrics["linear_top1"]
  return metrics["top1"] if "top1" in metrics else next(v for k, v in metrics.items() if k.startswith("top1"))


def check_inputs(workdir: str, protocol: str, cfg) -> None:
  check_protocol(protocol)
  try:
    info = datasets.of(cfg)
    builder = pipeline.builder_of(cfg, splits=(info.train_split, info.test_split))
  except pipeline.DataError as e:
    raise EvalError(str(e))
  if "label" not in builder.info.features:
    raise EvalError(f"dataset {cfg.dataset} has no labels; protocol {protocol} needs a labelled dataset")
  try:
    config_lib.validate_eval(cfg)
    name = image_section(protocol, cfg)
    if name:
      supervised.check_batch(cfg, cfg.eval[name], name, jax.device_count(), jax.process_count())
      for fraction in cfg.eval[name].label_fractions:
        if cfg.dataset == "imagenet2012" and fraction != 1.0:
          subsets.imagenet_file_names(fraction)
  except (config_lib.ConfigError, ValueError) as e:
    raise EvalError(str(e))


def evaluate(workdir: str, protocol: str, checkpoint: str = "latest", cfg=None, write: bool = True,
             encoder: Optional[Encoder] = None, imported: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
  """Runs `protocol` on a checkpoint of `workdir` (and the baselines when cfg.eval.baselines) and
  returns {"step", "protocol", "settings", "results": {encoder name: metrics}}.

  imported: weights from outside (ssl_jax.evaluate.workdir.load_import: {"variables", "label", "file",
  "format"}) evaluated instead of a checkpoint; `workdir` then only receives the results, and "step" is
  the label ("import-" and 8 hex digits of the file's SHA-256)."""
  cfg = load_config(workdir) if cfg is None else cfg
  check_inputs(workdir, protocol, cfg)
  step = imported["label"] if imported else find_checkpoint(workdir, cfg, checkpoint)
  distributed.release_library_logs()  # the input is checked: the libraries may log again
  encoder = encoder or Encoder(cfg, parallel.make_mesh())
  if imported:
    state = encoder.with_encoder(encoder.initial_state, imported["variables"])
  elif checkpoint == "latest":
    state, step = encoder.restore_latest(workdir)
  else:
    state = encoder.restore(workdir, step)
  info = encoder.info
  start = time.time()
  results = {}
  name = image_section(protocol, cfg)
  if name:
    # Image-level protocols: the SSL encoder, the same encoder at random initialization (for finetune and
    # semi, supervised training from scratch), and for the frozen probe a linear classifier on raw pixels.
    candidates = [("ssl", encoder.encoder_variables(state), None)]
    if cfg.eval.baselines:
      candidates.append(("random_init", encoder.encoder_variables(encoder.initial_state), None))
      if not cfg.eval[name].train_encoder:
        candidates.append(("raw_pixels", None, lambda params, batch_stats, x: features_lib.raw_pixels(x)))
    # Each run checkpoints under DIR/eval/checkpoints/<protocol>_<step>_<settings>/: re-running the same
    # command after an interruption resumes it; a changed setting starts afresh instead of resuming.
    root = str(epath.Path(workdir) / "eval" / "checkpoints" /
               f"{name}_{step}_{settings_digest(cfg.eval[name], cfg.seed)}")
    for label, variables, represent in candidates:
      results[label] = supervised.run(cfg, name, encoder.method, variables, encoder.mesh, label,
                                      represent, checkpoint_root=root)
    sizes = {"num_train": pipeline.num_examples(pipeline.builder_of(cfg),
                                                info.train_split)}
  else:
    candidates = [("ssl", lambda split: encoder.features(state, split, key=("step", step)))]
    if cfg.eval.baselines:
      candidates += [("random_init", lambda split: encoder.features(encoder.initial_state, split, key=("random",))),
                     ("raw_pixels", encoder.pixel_features)]
    for label, featurize in candidates:
      train_data, test_data = featurize(info.train_split), featurize(info.test_split)
      results[label] = run_protocol(protocol, cfg, train_data, test_data)
      results[label]["feature_dim"] = int(train_data[0].shape[1])
      if jax.process_index() == 0:
        print(f"{protocol} ({label}): {100 * headline(protocol, results[label]):.2f}% "
              f"({time.time() - start:.0f} s)", flush=True)
    sizes = {"num_train": int(len(train_data[1])), "num_test": int(len(test_data[1]))}
  out = {"workdir": str(workdir), "step": step, "protocol": protocol, "dataset": cfg.dataset,
         "train_split": info.train_split, "test_split": info.test_split, **sizes,
         "settings": cfg.eval.to_dict(), "method": cfg.method.name, "results": results,
         "seconds": time.time() - start}
  if imported:
    out["import"] = {"file": imported["file"], "format": imported["format"]}
  if write and jax.process_index() == 0:
    write_results(workdir, out)
  return out


def write_results(workdir: str, out: Dict[str, Any]) -> None:
  eval_dir = epath.Path(workdir) / "eval"
  eval_dir.mkdir(parents=True, exist_ok=True)
  ckpt_lib.write_json_atomic(str(eval_dir / f"{out['protocol']}_{out['step']}.json"), out)
  table = eval_dir / "results.md"
  lines = table.read_text().splitlines() if table.exists() else [
      "| method | step | protocol | encoder | top-1 (%) | details |", "|---|---|---|---|---|---|"]
  for name, metrics in out["results"].items():
    details = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
                        if not isinstance(v, (dict, list)))
    lines.append(f"| {out['method']} | {out['step']} | {out['protocol']} | {name} | "
                 f"{100 * headline(out['protocol'], metrics):.2f} | {details} |")
  tmp = eval_dir / "results.md.tmp"
  tmp.write_text("\n".join(lines) + "\n")
  tmp.replace(table)
