"""The generic pre-training loop: one trainer for every method (see ssl_jax/methods/base.py).

Structure of a step (`make_train_step`), jitted over the mesh with the state replicated and the batch
sharded over the "data" axis:
  loss_fn(params) = shard_map(per-device method loss + online probe, mean over devices)
  grads = grad(loss_fn)            # differentiating through shard_map: gathers transpose correctly
  params, opt_state = optimizer    # replicated math in the global view
  method_state = method.update_state(...)   # EMA targets, queues
  flags = guard.finite_flags(...)           # loss, gradients and new state finite? (fetched with metrics)

The trainer never saves a state whose flags are not all set (ssl_jax/guard.py); with
config.skip_nonfinite_steps = N > 0 a step whose update is not finite keeps the previous state instead
(the step still counts) and the run stops after N such steps in a row.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Callable, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from ssl_jax import checkpoint as ckpt_lib
from ssl_jax import config as config_lib
from ssl_jax import distributed, guard, methods, optim, parallel
from ssl_jax import workdir as workdir_lib
from ssl_jax import metrics as metrics_lib
from ssl_jax.data import datasets, device_augment, pipeline
from ssl_jax.state import TrainState


NonFiniteError = guard.NonFiniteError
NonFiniteLossError = NonFiniteError  # the name of earlier releases


def probe_head(num_classes: int) -> nn.Module:
  """The online linear probe (SimCLR/BYOL code): a linear classifier on stop-gradient representations."""
  return nn.Dense(num_classes, name="online_probe")


def init_batch(config, views) -> Dict[str, Any]:
  """A one-example batch with the shapes of the real one, for initialization."""
  return {"views": tuple(np.zeros((1, v["crop_size"], v["crop_size"], 3), np.float32) for v in views),
          "label": np.zeros((1,), np.int32), "index": np.zeros((1,), np.int64)}


def create_train_state(config, method, schedule: Callable, num_classes: int):
  """Initial TrainState and the optimizer. Deterministic in config.seed."""
  rng = jax.random.key(config.seed)
  rng_init, rng_probe, rng_train = jax.random.split(rng, 3)
  batch = init_batch(config, method.views())
  # jit: one compiled initializer instead of thousands of eager ops (seconds on CPU).
  params, batch_stats, method_state = jax.jit(method.init)(rng_init, batch)
  params = dict(params)
  if config.online_probe:
    # The probe reads the representation of the first view; its size comes from an abstract forward.
    variables = method.encoder_variables(params, batch_stats, method_state)
    feat = jax.eval_shape(method.represent, variables, batch["views"][0]).shape[-1]
    params["online_probe"] = probe_head(num_classes).init(rng_probe, jnp.zeros((1, feat)))["params"]
  tx = optim.create_optimizer(config, schedule, params,
                              method.data.steps_per_epoch if method.data is not None else None)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                     method_state=method_state, opt_state=tx.init(params),
                     rng=jax.random.key_data(rng_train))
  return state, tx


def _probe_terms(logits, labels):
  """The online probe's loss and accuracy over the labelled examples of the global batch (the same value
  on every device: sums over devices). Examples without a label (-1: STL-10's unlabelled split) are
  ignored, since devices hold different numbers of them; a batch with none gives 0."""
  labelled = labels >= 0
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, jnp.maximum(labels, 0)[:, None], axis=1)[:, 0]
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  count = jnp.maximum(parallel.sum(jnp.sum(labelled.astype(jnp.float32))), 1.0)
  return (parallel.sum(jnp.sum(jnp.where(labelled, nll, 0.0))) / count,
          parallel.sum(jnp.sum(jnp.where(labelled, correct, 0.0))) / count)


def make_train_step(config, method, tx, schedule: Callable, mesh, num_classes: int):
  """step(state, batch) -> (new state, metrics). Not jitted: `jit_train_step` adds the shardings."""
  probe = probe_head(num_classes) if config.online_probe else None

  specs = method.state_specs()
  on_device = (method.views(), datasets.of(config)) if config.get("augment_on_device", False) else None

  def per_device(params, batch_stats, method_state, batch, rng, step):
    method_params = {k: v for k, v in params.items() if k != "online_probe"}
    loss, out = method.loss(method_params, batch_stats, method_state, batch, rng, step)
    if set(out.state_updates) != set(method.updated_in_loss):
      raise ValueError(f"{type(method).__name__}.loss returned state_updates {sorted(out.state_updates)}, its "
                       f"updated_in_loss names {sorted(method.updated_in_loss)}")
    metrics = dict(out.metrics, loss=loss)
    total = loss
    if probe is not None:
      logits = probe.apply({"params": params["online_probe"]}, jax.lax.stop_gradient(out.representation))
      probe_loss, probe_accuracy = _probe_terms(logits, batch["label"])
      metrics["probe_loss"] = probe_loss
      metrics["probe_accuracy"] = probe_accuracy
      total = total + probe_loss
    # Mean over devices: every device holds the same number of examples, so this is the global mean.
    # Per-device BN statistics (MoCo) are averaged too; for global BN they are already identical.
    return parallel.mean(total), (parallel.mean(out.batch_stats), parallel.mean(metrics),
                                  parallel.mean(out.state_stats), out.per_example, out.embedding,
                                  out.state_updates)

  def step_fn(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if on_device is not None:  # the views' per-pixel ops, on the global batch (per example: no collective)
      views, info = on_device
      batch = dict(batch, views=device_augment.apply(views, batch["views"], device_augment.step_key(rng),
                                                     info.mean, info.std, config.normalize_inputs))
    # The method's split entries (state_specs) enter and leave the per-device loss in their layout.
    state_spec = {k: specs.get(k, P()) for k in state.method_state} if specs else P()
    updates_spec = {k: specs.get(k, P()) for k in method.updated_in_loss}
    sharded = jax.shard_map(
        per_device, mesh=mesh,
        in_specs=(P(), P(), state_spec, P(parallel.DATA), P(), P()),
        out_specs=(P(), (P(), P(), P(), P(parallel.DATA), P(parallel.DATA), updates_spec)))

    def loss_fn(params):
      return sharded(params, state.batch_stats, state.method_state, batch, rng, state.step)

    (loss, (batch_stats, metrics, state_stats, per_example, embedding, state_updates)), grads = (
        jax.value_and_grad(loss_fn, has_aux=True)(state.params))
    if config.sharding != "replicated":
      # The gradients in the parameters' layout: a reduce-scatter, and the optimizer's math on shards.
      grads = jax.lax.with_sharding_constraint(
          grads, parallel.state_shardings(mesh, grads, config.sharding, config.fsdp_min_size))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params = dict(method.after_update({k: v for k, v in params.items() if k != "online_probe"}, state.step),
                  **({"online_probe": params["online_probe"]} if "online_probe" in params else {}))
    method_params = {k: v for k, v in params.items() if k != "online_probe"}
    method_state = method.update_state(dict(state.method_state, **state_updates) if state_updates
                                       else state.method_state, method_params, state_stats, per_example,
                                       state.step)
    metrics = dict(metrics, total_loss=loss, learning_rate=schedule(state.step),
                   embedding_std=parallel.global_std_of_normalized(embedding),
                   grad_norm=optax.tree.norm(grads))
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              method_state=method_state, opt_state=opt_state)
    finite = guard.finite_flags(loss, grads, new_state)
    if config.skip_nonfinite_steps:
      # Drop the whole update (parameters, optimizer moments, batch statistics, method state), as optax's
      # apply_if_finite does; the step, the data position and the schedules (the optimizer's step count
      # included) still advance.
      ok = jnp.all(finite)
      new_state = new_state.replace(
          **{k: guard.keep_if(ok, getattr(new_state, k), getattr(state, k), advance_counters=k == "opt_state")
             for k in ("params", "batch_stats", "method_state", "opt_state")})
    metrics[FINITE] = finite
    return new_state, metrics

  return step_fn


def jit_train_step(step_fn, mesh, state_sharding=None):
  """state_sharding: the state's layout (parallel.state_shardings; None: replicated)."""
  state_sharding = state_sharding or parallel.replicated(mesh)
  return jax.jit(step_fn, in_shardings=(state_sharding, parallel.batch_sharded(mesh)),
                 out_shardings=(state_sharding, parallel.replicated(mesh)), donate_argnums=0)


def jit_train_loop(step_fn, mesh, state_sharding=None):
  """loop(state, batches) -> (state, metrics): one step per batch of `batches` (stacked on a leading axis of
  config.steps_per_loop) in one compiled call, a lax.scan of the same step; each metric comes back stacked.

  Fewer calls from the host: TPUEstimator's iterations_per_loop, which the official SimCLR code sets to its
  checkpoint interval. On CPU it also saves system time: XLA:CPU allocates its temporary buffer (about 5 GB
  for the ResNet-18 step of benchmarks/simclr_step.py) at every call, and the kernel faults every page of
  it in afresh, 3-4 s of CPU time per step there; a loop of k steps does that once. Measured on that step
  (five alternated rounds): k = 2 and 4 made a step 11% and 16% faster than k = 1. config.validate turns
  down k > 1 with conv_impl=xla on CPU: XLA:CPU leaves the convolution gradients inside the loop on its
  generic emitter (models/conv.py, _xla_conv_input_grad)."""
  state_sharding = state_sharding or parallel.replicated(mesh)
  return jax.jit(lambda state, batches: jax.lax.scan(step_fn, state, batches),
                 in_shardings=(state_sharding, parallel.batch_sharded(mesh, stacked=True)),
                 out_shardings=(state_sharding, parallel.replicated(mesh)), donate_argnums=0)


def state_layout(config, method, mesh, state):
  """One NamedSharding per leaf of the TrainState `state`: config.sharding's layout
  (parallel.state_shardings), with the method_state entries the method splits (state_specs) in theirs."""
  layout = parallel.state_shardings(mesh, state, config.sharding, config.fsdp_min_size)
  specs = method.state_specs()
  if not specs:
    return layout
  method_state = dict(layout.method_state)
  for key, spec in specs.items():
    method_state[key] = jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, spec), method_state[key])
  return layout.replace(method_state=method_state)


def build(config, mesh, num_train_examples: int, num_classes: int):
  """Resolved config, method, initial state (on the mesh in config.sharding's layout), the jitted step, the jitted loop of
  config.steps_per_loop steps (None when that is 1) and the schedule."""
  config = config_lib.resolve(config, num_train_examples)
  method = methods.get(config, methods.DataFacts(num_train_examples, config.batch_size))
  opt = config.optimizer
  end, start = (optim.scaled_learning_rate(rate, opt.lr_scaling, config.batch_size)
                for rate in (opt.end_learning_rate, opt.warmup_start_learning_rate))
  schedule = optim.learning_rate(opt, optim.peak_learning_rate(config), config.total_steps,
                                 num_train_examples / config.batch_size, end, start)
  state, tx = create_train_state(config, method, schedule, num_classes)
  sharding = state_layout(config, method, mesh, state)
  state = parallel.place(state, sharding)
  step = make_train_step(config, method, tx, schedule, mesh, num_classes)
  loop_fn = jit_train_loop(step, mesh, sharding) if config.steps_per_loop > 1 else None
  return config, method, state, jit_train_step(step, mesh, sharding), loop_fn, schedule


def run_initial_pass(config, method, state, mesh):
  """`state` with the method_state entries the method fills from one pass of its initial network over the
  training split (Method.initial_pass / fill_state; InstDisc's bank_init="encoder"), each placed in its
  entry's layout. Called on a fresh run only: a resumed run restores what the pass wrote. The pass reads
  the split in order (row i is the example of index i) and is deterministic, so a run killed before its
  first checkpoint recomputes the same values."""
  fn = method.initial_pass()
  if fn is None:
    return state
  from ssl_jax.evaluate import features as features_lib  # evaluation's whole-split pass, in split order
  start = time.time()
  jitted = jax.jit(fn)
  values, _ = features_lib.extract(config, lambda x: jitted(state.params, state.batch_stats, x),
                                   datasets.of(config).pretrain_split, mesh, config.eval.batch_size, in_order=True)
  filled = method.fill_state(values)
  method_state = dict(state.method_state)
  for key, value in filled.items():
    old = method_state[key]
    if value.shape != old.shape:
      raise ValueError(f"fill_state gave method_state[{key!r}] the shape {value.shape}, not {old.shape}")
    method_state[key] = jax.make_array_from_callback(old.shape, old.sharding,
                                                     lambda index, v=value.astype(old.dtype): v[index])
  logging.info("method_state %s filled by the initial network's pass over the %d training images (%.0f s)",
               ", ".join(sorted(filled)), values.shape[0], time.time() - start)
  return state.replace(method_state=method_state)


FINITE = "finite"  # the metrics entry holding guard.finite_flags (not written as a metric)


class _FiniteWatch:
  """Reads each step's finite flags on the host, where the metrics are fetched (before any save)."""

  def __init__(self, part_names, skip_limit: int, workdir: str):
    self.part_names, self.skip_limit, self.workdir = part_names, skip_limit, workdir
    self.consecutive = 0   # steps skipped in a row
    self.first_of_run = None  # (step, description) of the first step of the current run of skips

  def check(self, fetched, step: int, last_saved: int) -> int:
    """Pops the flags from `fetched` (the metrics of the steps ending at `step`) and returns how many of
    those steps were skipped; raises NonFiniteError when the run must stop."""
    first = step - len(fetched) + 1
    skipped = 0
    for i, m in enumerate(fetched):
      flags = m.pop(FINITE)
      if np.all(flags):
        self.consecutive, self.first_of_run = 0, None
        continue
      what = guard.describe(self.part_names, flags)
      kept = f"the last good checkpoint (step {last_saved}) is kept in {self.workdir}"
      if not self.skip_limit:
        raise NonFiniteError(f"non-finite values at step {first + i} in {what}; nothing from that step on "
                             f"was saved, {kept} (lower the learning rate, or set skip_nonfinite_steps=N "
                             "to drop such updates)")
      skipped += 1
      self.consecutive += 1
      self.first_of_run = self.first_of_run or (first + i, what)
      if self.consecutive >= self.skip_limit:
        raise NonFiniteError(f"{self.consecutive} steps in a row (steps {self.first_of_run[0]}-{first + i}) had "
                             f"non-finite updates and were skipped (skip_nonfinite_steps="
                             f"{self.skip_limit}), the first in {self.first_of_run[1]}; {kept}")
    return skipped


class _Preemption:
  """SIGTERM -> save a checkpoint and stop, at a step every process agrees on.

  One process: a Python handler sets a flag read between steps. Several processes: the signal may reach
  them at different steps, and a checkpoint is a collective save, so JAX's preemption sync service
  (started by jax.distributed.initialize, which handles SIGTERM itself) picks the step."""

  def __init__(self):
    self.requested = False
    self._previous = None
    self._multiprocess = jax.process_count() > 1

  def reached(self, step: int, steps_run: int = 1) -> bool:
    """Call after every call of the step (or loop of `steps_run` steps) on every process."""
    if self._multiprocess:
      # The sync service wants every step id: the step it picks may fall inside a loop, and then every
      # process stops at the end of that loop.
      for step_id in range(step - steps_run + 1, step + 1):
        self.requested = multihost_utils.reached_preemption_sync_point(step_id) or self.requested
    return self.requested

  def __enter__(self):
    def handler(signum, frame):
      logging.warning("SIGTERM received: saving a checkpoint and stopping after this step")
      self.requested = True
    if self._multiprocess:
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. a notebook kernel thread): no handler
      self._previous = None
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def train(config, workdir: str, stop_at_step: Optional[int] = None) -> Dict[str, Any]:
  """Pre-trains `config` in `workdir`, resuming from its latest checkpoint. Returns a summary dict.

  stop_at_step: save and return at this step instead of total_steps (for runs in time-limited slots;
  the schedule still spans total_steps, and re-running continues)."""
  mesh = parallel.make_mesh()
  config_lib.validate(config, mesh.size, jax.process_count(), mesh.devices.flat[0].platform)
  workdir_lib.check_train_workdir(workdir, config)
  info = datasets.of(config)
  # The split's record files against the dataset's metadata, before anything compiles (data/integrity.py).
  builder = pipeline.builder_of(config, splits=(info.pretrain_split,))
  num_train = pipeline.num_examples(builder, info.pretrain_split)
  if num_train // jax.process_count() < parallel.local_batch_size(config.batch_size):
    raise config_lib.ConfigError(
        f"batch_size={config.batch_size} exceeds the {num_train} examples of {config.dataset}")
  distributed.release_library_logs()  # the input is checked: the libraries may log again
  config, method, state, step_fn, loop_fn, schedule = build(config, mesh, num_train, info.num_classes)

  is_main = jax.process_index() == 0
  manager = ckpt_lib.Manager(workdir, config)
  state, start_step = manager.restore_latest(state)
  if not start_step:
    state = run_initial_pass(config, method, state, mesh)
  writer = metrics_lib.Writer(workdir, enabled=is_main, resume_step=start_step)
  if is_main:
    ckpt_lib.write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict())
  if start_step:
    logging.info("resumed from step %d", start_step)

  local_batch = parallel.local_batch_size(config.batch_size)
  batches = pipeline.pretrain_batches(config, method.views(), local_batch, start_step,
                                      jax.process_index(), jax.process_count(),
                                      device_ops=config.get("augment_on_device", False))
  progress = metrics_lib.Progress(config.total_steps, start_step, config.batch_size)
  pending = []  # device metrics since the last log: fetched together, so steps are not serialized
  watch = _FiniteWatch(guard.names(None, state.params, state), config.skip_nonfinite_steps, workdir)
  skipped = 0  # steps skipped since the last logged row (skip_nonfinite_steps)
  last_saved = start_step
  step = start_step
  end = config.total_steps if stop_at_step is None else min(stop_at_step, config.total_steps)
  boundary = lambda s: min(end, *(s // every * every + every
                                  for every in (config.log_every_steps, config.checkpoint_every_steps)))
  try:
    with _Preemption() as preemption:
      while step < end:
        # A loop of steps_per_loop steps where one fits before the next log, checkpoint or end; single
        # steps otherwise (a run resumed or stopped off the loop grid), which bring it back onto the grid.
        if loop_fn is not None and boundary(step) - step >= config.steps_per_loop:
          local = [next(batches) for _ in range(config.steps_per_loop)]
          batch = parallel.to_global(mesh, jax.tree.map(lambda *x: np.stack(x), *local), stacked=True)
          state, metrics = loop_fn(state, batch)
          steps_run = config.steps_per_loop
        else:
          state, metrics = step_fn(state, parallel.to_global(mesh, next(batches)))
          steps_run = 1
        step += steps_run
        distributed.note_step(step)  # for the line naming a vanished process (ssl_jax/peers.py)
        pending.append((steps_run, metrics))
        # One reading of the flag per call: a signal landing later in this iteration is handled at the
        # next one, never between the save decision and the break.
        preempted = preemption.reached(step, steps_run)
        stop = preempted or step == end
        if step % config.log_every_steps == 0 or step % config.checkpoint_every_steps == 0 or stop:
          fetched = [metrics if n == 1 else jax.tree.map(lambda m: m[i], metrics)
                     for n, metrics in jax.device_get(pending) for i in range(n)]
          pending = []
          skipped += watch.check(fetched, step, last_saved)
          if step % config.log_every_steps == 0 or stop:
            row = dict(fetched[-1], skipped_steps=skipped) if config.skip_nonfinite_steps else fetched[-1]
            writer.write(step, row, progress.update(step), config.total_steps)
            if is_main:
              for warning in method.log_warnings(row):
                logging.warning("step %d: %s", step, warning)
            skipped = 0
          if step % config.checkpoint_every_steps == 0 or stop:
            manager.save(step, state)
            last_saved = step
        if preempted:
          logging.warning("stopped at step %d after SIGTERM; re-run the same command to resume", step)
          break
  finally:
    # Saves already started are good states: let them finish even when the loop raised.
    manager.wait()
    writer.close()
  return {"step": step, "config": config, "state": state, "method": method, "preempted": preemption.requested}
