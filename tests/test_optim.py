"""The optimizer builder (ssl_jax/optim.py) on small parameter trees: parameter groups by path (frozen
until a step as PyTorch's grad = None, fixed and multiplied learning rates, weight-decay multipliers), the
weight-decay schedule, per-parameter vs global-norm clipping, and the config checks of the groups."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import REPO
from ssl_jax import config as config_lib
from ssl_jax import optim


def section(**settings):
  """cfg.optimizer of a base config with `settings`."""
  opt = config_lib.base_config("simclr").optimizer
  opt.update(**settings)
  return opt


def params_tree(seed=0):
  r = np.random.default_rng(seed)
  return {"backbone": {"kernel": jnp.asarray(r.normal(size=(4, 3)), jnp.float32),
                       "bias": jnp.asarray(r.normal(size=(3,)), jnp.float32)},
          "head": {"last_layer": {"kernel": jnp.asarray(r.normal(size=(3, 5)), jnp.float32)}}}


def grads_like(params, seed):
  r = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(r.normal(size=p.shape), jnp.float32), params)


def run(tx, params, grads, jit=False):
  """Applies `grads` (a list of trees) in turn; the updates and states after each step."""
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(params)
  updates, states = [], []
  for g in grads:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    updates.append(u)
    states.append(state)
  return updates, states


SCHEDULE = optim.warmup_cosine(0.1, 0, 10)


def reference_chain(name, schedule, mask, weight_decay, momentum, nesterov):
  """What optim built before parameter groups: optax's own lars, sgd, adamw and adam (after the coupled
  decay) with one decay mask."""
  if name == "lars":
    return optax.lars(schedule, weight_decay=weight_decay, weight_decay_mask=mask, trust_coefficient=1e-3,
                      eps=0.0, trust_ratio_mask=mask, momentum=momentum, nesterov=nesterov)
  if name == "sgd":
    return optax.chain(optax.add_decayed_weights(weight_decay, mask),
                       optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov))
  if name == "adam":
    return optax.chain(optax.add_decayed_weights(weight_decay, mask), optax.adam(schedule, b1=0.9, b2=0.999))
  return optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=weight_decay, mask=mask)


@pytest.mark.parametrize("name, weight_decay, exclude, momentum, nesterov", [
    ("lars", 1e-6, True, 0.9, False), ("lars", 1e-4, False, 0.9, True), ("sgd", 1e-4, False, 0.9, False),
    ("sgd", 1e-6, True, 0.9, True), ("sgd", 0.0, True, 0.0, False), ("adamw", 0.05, True, 0.9, False),
    ("adamw", 0.1, False, 0.9, False), ("adam", 1e-6, False, 0.9, False)])
def test_without_groups_the_updates_equal_optax_bit_for_bit(name, weight_decay, exclude, momentum, nesterov):
  """The existing configs (SimCLR/BYOL LARS, MoCo v2 SGD decaying everything, the Nesterov SGD of the
  evaluation protocols, AdamW) train exactly as with optax's chains."""
  params = params_tree()
  opt = section(name=name, weight_decay=weight_decay, exclude_bias_and_norm=exclude, momentum=momentum,
                nesterov=nesterov)
  mask = jax.tree.map(lambda p: not exclude or p.ndim > 1, params)
  grads = [grads_like(params, 20 + i) for i in range(3)]
  ours, _ = run(optim.build(opt, params, SCHEDULE), params, grads)
  theirs, _ = run(reference_chain(name, SCHEDULE, mask, weight_decay, momentum, nesterov), params, grads)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))


def bolts_lars_reference(params, grads, schedule, eta, weight_decay, momentum, exclude):
  """PyTorch Lightning Bolts' LARS with clip_lars_lr (solo-learn's solo/utils/lars.py), written directly
  in numpy, parameter by parameter: the updates (new - old parameters) of each step."""
  params = {k: np.asarray(v, np.float64) for k, v in params.items()}
  buffers, out = {}, []
  for step, g_step in enumerate(grads):
    lr = float(schedule(step))
    step_updates = {}
    for name, p in params.items():
      g = np.asarray(g_step[name], np.float64)
      d_p = g
      p_norm, g_norm = np.linalg.norm(p), np.linalg.norm(g)
      if p.ndim != 1 or not exclude:
        if p_norm != 0 and g_norm != 0:
          lars_lr = eta * p_norm / (g_norm + p_norm * weight_decay + 1e-8)
          lars_lr = min(lars_lr / lr, 1.0) if lr > 0 else 1.0
          d_p = (g + weight_decay * p) * lars_lr
      buffers[name] = d_p if name not in buffers else momentum * buffers[name] + d_p
      step_updates[name] = -lr * buffers[name]
      params[name] = p + step_updates[name]
    out.append(step_updates)
  return out


@pytest.mark.parametrize("exclude", [True, False])
def test_lars_clip_equals_a_direct_computation_of_bolts_lars(exclude):
  """optimizer.name=lars_clip (solo-learn's CIFAR recipes) against a direct numpy computation of Bolts'
  LARS over a warm-up and cosine: the first step at rate 0, steps where the clip binds (large |w| / |g|)
  and steps where it does not (small), a zero parameter (no decay, no trust ratio), the bias excluded or
  not."""
  r = np.random.default_rng(3)
  params = {"big": jnp.asarray(r.normal(size=(4, 3)) * 50, jnp.float32),
            "small": jnp.asarray(r.normal(size=(3, 5)) * 1e-3, jnp.float32),
            "zero": jnp.zeros((2, 2), jnp.float32), "bias": jnp.asarray(r.normal(size=(3,)), jnp.float32)}
  grads = [jax.tree.map(lambda p: jnp.asarray(r.normal(size=p.shape), jnp.float32), params) for _ in range(5)]
  schedule = optim.warmup_cosine(0.3, 2, 5)
  opt = section(name="lars_clip", weight_decay=1e-4, trust_coefficient=0.02, exclude_bias_and_norm=exclude)
  ours, _ = run(optim.build(opt, params, schedule), params, grads)
  theirs = bolts_lars_reference(params, grads, schedule, 0.02, 1e-4, 0.9, exclude)
  bound = []
  for step, (a, b) in enumerate(zip(ours, theirs)):
    for name in params:
      np.testing.assert_allclose(np.asarray(a[name]), b[name], rtol=2e-5, atol=1e-9, err_msg=f"{step} {name}")
  # The clip binds for "big" (eta |w| / |g| far above the rate) and not for "small", so both branches ran.
  lr = float(schedule(3))
  for name, expect in (("big", True), ("small", False)):
    w, g = np.asarray(params[name]), np.asarray(grads[3][name])
    bound.append((0.02 * np.linalg.norm(w) / np.linalg.norm(g) > lr) == expect)
  assert all(bound)


@pytest.mark.parametrize("name", ["sgd", "lars", "adamw"])
def test_frozen_group_is_skipped_then_trains_as_from_scratch(name):
  """A group frozen until step 3 (weight decay 0.1, so a zeroed gradient would still move it): no update
  and no moment advanced for steps 0-2; from step 3 it trains exactly as a fresh optimizer started there
  (momentum from zero, Adam's bias correction from its first step) at the global step's learning rate,
  and the other parameters are unaffected by the group."""
  params = params_tree()
  grads = [grads_like(params, 10 + i) for i in range(6)]
  settings = dict(name=name, weight_decay=0.1, momentum=0.9)
  grouped = optim.build(section(groups=(("head/last_layer/.*", dict(frozen_until_step=3)),), **settings),
                        params, SCHEDULE)
  updates, states = run(grouped, params, grads, jit=True)
  init_moments = grouped.init(params).moments[1]  # partitions sorted by frozen_until_step: 0, then 3
  for step in range(3):
    np.testing.assert_array_equal(updates[step]["head"]["last_layer"]["kernel"], 0.0)
    for a, b in zip(jax.tree.leaves(states[step].moments[1]), jax.tree.leaves(init_moments)):
      np.testing.assert_array_equal(a, b)
  assert all(np.any(a != b) for a, b in zip(jax.tree.leaves(states[3].moments[1]), jax.tree.leaves(init_moments)))

  # From step 3: a fresh optimizer of the frozen parameter alone, its schedule shifted to the global step.
  last = {"kernel": params["head"]["last_layer"]["kernel"]}
  fresh = optim.build(section(**settings), last, lambda s: SCHEDULE(s + 3))
  fresh_updates, _ = run(fresh, last, [{"kernel": g["head"]["last_layer"]["kernel"]} for g in grads[3:]])
  for step in range(3, 6):
    np.testing.assert_allclose(updates[step]["head"]["last_layer"]["kernel"], fresh_updates[step - 3]["kernel"],
                               rtol=1e-6, atol=1e-9)

  # The rest trains as without any group.
  plain_updates, _ = run(optim.build(section(**settings), params, SCHEDULE), params, grads, jit=True)
  for u, v in zip(updates, plain_updates):
    np.testing.assert_allclose(u["backbone"]["kernel"], v["backbone"]["kernel"], rtol=1e-6)


def test_frozen_for_good_and_out_of_the_global_norm():
  """frozen=True (MoCo v3's patch projection): never updated, and its gradient, which PyTorch would not
  compute, does not count in the global norm that clips the others."""
  params = params_tree()
  g = grads_like(params, 1)
  g["head"]["last_layer"]["kernel"] = g["head"]["last_layer"]["kernel"] * 1e4
  opt = section(name="sgd", momentum=0.0, weight_decay=0.0, clip_global_norm=1e3,
                groups=(("head/.*", dict(frozen=True)),))
  (u,), _ = run(optim.build(opt, params, lambda s: 1.0), params, [g])
  np.testing.assert_array_equal(u["head"]["last_layer"]["kernel"], 0.0)
  np.testing.assert_array_equal(u["backbone"]["kernel"], -g["backbone"]["kernel"])  # norm < 1e3: unclipped


def test_fixed_lr_group_keeps_its_rate_while_the_rest_follows_the_cosine():
  """SimSiam's --fix-pred-lr (main_simsiam.py l.193-197, 359-366): the predictor's rate stays at the base
  rate scaled by the batch (0.05 x 512 / 256) while the encoder's follows the cosine."""
  params = {"encoder": {"kernel": jnp.ones((2, 2))}, "predictor": {"kernel": jnp.ones((2, 2))}}
  opt = section(name="sgd", momentum=0.0, weight_decay=0.0, base_learning_rate=0.05, lr_scaling="linear",
                groups=(("predictor/.*", dict(fixed_lr=0.05)),))
  schedule = optim.warmup_cosine(0.1, 0, 10)
  ones = jax.tree.map(jnp.ones_like, params)
  updates, _ = run(optim.build(opt, params, schedule, batch_size=512), params, [ones] * 10)
  for step, u in enumerate(updates):
    np.testing.assert_allclose(u["predictor"]["kernel"], -0.1, rtol=1e-7)
    np.testing.assert_allclose(u["encoder"]["kernel"], -float(schedule(step)), rtol=1e-7)
  assert float(schedule(9)) < 0.01


def test_lr_mult_and_wd_mult():
  """u = -lr * lr_mult * (g + wd * wd_mult * w) under plain SGD; the 1-D mask still wins over wd_mult."""
  params = params_tree()
  g = grads_like(params, 2)
  opt = section(name="sgd", momentum=0.0, weight_decay=0.01, exclude_bias_and_norm=True,
                groups=(("backbone/.*", dict(lr_mult=0.5, wd_mult=3.0)), ("head/.*", dict(wd_mult=0.0))))
  (u,), _ = run(optim.build(opt, params, lambda s: 0.2), params, [g])
  np.testing.assert_allclose(u["backbone"]["kernel"],
                             -0.2 * 0.5 * (g["backbone"]["kernel"] + 0.03 * params["backbone"]["kernel"]), rtol=1e-6)
  np.testing.assert_allclose(u["backbone"]["bias"], -0.2 * 0.5 * g["backbone"]["bias"], rtol=1e-6)
  np.testing.assert_allclose(u["head"]["last_layer"]["kernel"], -0.2 * g["head"]["last_layer"]["kernel"], rtol=1e-6)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_weight_decay_follows_its_schedule(name):
  """DINO's weight decay, cosine 0.04 -> 0.4 per iteration (utils.py l.187-198): a parameter with zero
  gradient moves by -lr * wd(step) * w, coupled (SGD) or decoupled (AdamW) alike."""
  params = {"w": jnp.asarray([[1.0, -2.0], [3.0, 0.5]])}
  opt = section(name=name, momentum=0.0, weight_decay=0.04, weight_decay_schedule="cosine", weight_decay_end=0.4)
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx = optim.build(opt, params, lambda s: 0.5, total_steps=10)
  state, p = tx.init(params), params
  for step in range(6):
    u, state = tx.update(zeros, state, p)
    if step in (0, 5):
      wd = 0.4 + 0.5 * (0.04 - 0.4) * (1 + np.cos(np.pi * step / 10))
      np.testing.assert_allclose(u["w"], -0.5 * wd * np.asarray(p["w"]), rtol=1e-6)
    p = optax.apply_updates(p, u)
  with pytest.raises(config_lib.ConfigError, match="total_steps"):
    optim.build(opt, params, lambda s: 0.5)


def test_per_parameter_clipping_is_not_global_norm_clipping():
  """DINO clips each parameter's gradient on its own (utils.clip_gradients, utils.py l.132-141): with a
  gradient of norm 10 and one of norm 0.5 under c = 2, only the first shrinks; global-norm clipping
  shrinks both by 2 / |(10, 0.5)|."""
  params = {"a": jnp.ones((4,)), "b": jnp.ones((2, 2))}
  g = {"a": jnp.asarray([6.0, 8.0, 0.0, 0.0]), "b": jnp.asarray([[0.3, 0.4], [0.0, 0.0]])}
  out = {}
  for clip in ("clip_per_param", "clip_global_norm"):
    opt = section(name="sgd", momentum=0.0, weight_decay=0.0, **{clip: 2.0})
    (u,), _ = run(optim.build(opt, params, lambda s: 1.0), params, [g])
    out[clip] = jax.tree.map(lambda x: -np.asarray(x), u)
  ga, gb = np.asarray(g["a"]), np.asarray(g["b"])
  np.testing.assert_allclose(out["clip_per_param"]["a"], ga * 2.0 / (10.0 + 1e-6), rtol=1e-6)
  np.testing.assert_allclose(out["clip_per_param"]["b"], gb, rtol=1e-6)
  total = np.sqrt(np.sum(ga**2) + np.sum(gb**2))
  np.testing.assert_allclose(out["clip_global_norm"]["a"], ga * 2.0 / total, rtol=1e-6)
  np.testing.assert_allclose(out["clip_global_norm"]["b"], gb * 2.0 / total, rtol=1e-6)
  assert not np.allclose(out["clip_per_param"]["b"], out["clip_global_norm"]["b"])


def test_groups_survive_a_config_json_round_trip():
  """config.json holds the pairs as lists; with_defaults gives a config whose groups select the same
  parameters with the same settings, and that still validates."""
  cfg = config_lib.load(f"{REPO}/configs/simclr.py:cifar10,tiny")
  cfg.data_dir = "/nonexistent"
  cfg.optimizer.update(groups=(("head/last_layer/.*", dict(frozen_until_step=313, wd_mult=0.0)),
                               ("backbone/.*", dict(fixed_lr=0.05)), (".*", dict(lr_mult=0.5, required=False))),
                       clip_per_param=3.0, weight_decay_schedule="cosine", weight_decay_end=0.4)
  cfg.eval.finetune.groups = (("encoder/.*", dict(lr_mult=0.1)),)
  back = config_lib.with_defaults(json.loads(json.dumps(cfg.to_dict())))
  config_lib.validate(back, num_devices=1)
  params = params_tree()
  settings = [jax.tree.leaves(optim.param_settings(c.optimizer, params, batch_size=256)) for c in (cfg, back)]
  assert settings[0] == settings[1]
  assert [s.frozen_until_step for s in settings[0]] == [0, 0, 313]  # bias, kernel, last layer
  assert back.optimizer.clip_per_param == 3.0 and back.optimizer.weight_decay_end == 0.4
  assert [tuple(r) for r in back.eval.finetune.groups] == [tuple(r) for r in cfg.eval.finetune.groups]


@pytest.mark.parametrize("groups, message", [
    ((("head/.*", dict(lr_multiplier=2.0)),),
     r"optimizer\.groups\[0\]: unknown group setting\(s\) \['lr_multiplier'\]"),
    ((("head/(.*", dict(lr_mult=2.0)),), r"optimizer\.groups\[0\]: regex 'head/\(\.\*' does not compile"),
    ((("head/.*", dict(lr_mult=2.0, fixed_lr=0.1)),), r"set lr_mult or fixed_lr, not both"),
    ((("head/.*", dict(frozen=True, frozen_until_step=3)),), r"set one of frozen .*, frozen_until_step and"),
    ((("head/.*", dict(frozen_until_step=3, frozen_until_epoch=1.0)),), r"set one of frozen"),
    ((("head/.*", dict(frozen_until_epoch=-1.0)),), r"frozen_until_epoch must be a number >= 0"),
    ((("head/.*", dict(frozen_until_step=1.5)),), r"frozen_until_step must be an integer"),
    ((("head/.*", dict(wd_mult=-1.0)),), r"wd_mult must be a number >= 0"),
    (("head/.*",), r"must be a \(regex, settings dict\) pair"),
])
def test_bad_groups_fail_validation_in_one_line(groups, message):
  cfg = config_lib.load(f"{REPO}/configs/simclr.py:cifar10,tiny")
  cfg.data_dir = "/nonexistent"
  cfg.optimizer.groups = groups
  with pytest.raises(config_lib.ConfigError, match=message) as info:
    config_lib.validate(cfg, num_devices=1)
  assert "\n" not in str(info.value)
  with pytest.raises(config_lib.ConfigError, match=message):  # the builder checks too
    optim.build(cfg.optimizer, params_tree(), SCHEDULE)
  cfg.optimizer.groups = ()
  cfg.eval.semi.groups = groups
  with pytest.raises(config_lib.ConfigError, match=message.replace(r"optimizer\.", r"eval\.semi\.")):
    config_lib.validate_eval(cfg)


def test_frozen_until_epoch_counts_the_data_s_steps():
  """SwAV's CIFAR recipe freezes its prototypes for 2 epochs: the step depends on the data and the batch."""
  cfg = config_lib.load(f"{REPO}/configs/simclr.py:cifar10,tiny")
  cfg.optimizer.groups = (("head/last_layer/.*", dict(frozen_until_epoch=2.0)),)
  settings = jax.tree.leaves(optim.param_settings(cfg.optimizer, params_tree(), steps_per_epoch=50_000 / 256))
  assert [s.frozen_until_step for s in settings] == [0, 0, round(2 * 50_000 / 256)]
  with pytest.raises(config_lib.ConfigError, match="frozen_until_epoch: pass steps_per_epoch"):
    optim.param_settings(cfg.optimizer, params_tree())


def test_group_taking_no_parameter_fails_in_the_builder():
  params = params_tree()
  # A typo, or a rule shadowed by an earlier one: the method asked for a group that would do nothing.
  for groups in [(("head/last_layr/.*", dict(frozen_until_step=3)),),
                 (("head/.*", dict(lr_mult=2.0)), ("head/last_layer/.*", dict(frozen_until_step=3)))]:
    with pytest.raises(config_lib.ConfigError, match=r"takes no parameter .*'backbone/bias'") as info:
      optim.build(section(groups=groups), params, SCHEDULE)
    assert "\n" not in str(info.value)
  optim.build(section(groups=(("predictor/.*", dict(fixed_lr=0.1, required=False)),)), params, SCHEDULE)
  with pytest.raises(config_lib.ConfigError, match="pass batch_size"):
    optim.build(section(groups=(("head/.*", dict(fixed_lr=0.1)),)), params, SCHEDULE)


def test_clip_and_weight_decay_settings_are_checked():
  cfg = config_lib.load(f"{REPO}/configs/simclr.py:cifar10,tiny")
  cfg.data_dir = "/nonexistent"
  for settings, message in [(dict(clip_per_param=3.0, clip_global_norm=1.0), "at most one of them"),
                            (dict(weight_decay_schedule="linear"), "weight_decay_schedule must be"),
                            (dict(name="adagrad"), r"optimizer\.name must be adam, adamw, lars, lars_clip, sgd, got .adagrad.")]:
    c = cfg.copy_and_resolve_references()
    c.optimizer.update(**settings)
    with pytest.raises(config_lib.ConfigError, match=message):
      config_lib.validate(c, num_devices=1)


def test_learning_rate_schedules_of_the_recipes():
  """Warm-up from a start rate (SwAV's 0.3), the per-epoch cosine (SimSiam, MoCo: the rate of the epoch's
  start) and the step schedule (MoCo v1: x0.1 at epochs 120 and 160), each at a few steps."""
  curve = optim.warmup_cosine(1.0, 10, 110, end_value=0.0, start_value=0.3)
  np.testing.assert_allclose([curve(0), curve(5), curve(10), curve(60), curve(110)], [0.3, 0.65, 1.0, 0.5, 0.0],
                             atol=1e-6)
  cfg = config_lib.load(f"{REPO}/configs/simsiam.py:imagenet").optimizer
  per_epoch = optim.learning_rate(cfg, 0.1, total_steps=1000, steps_per_epoch=10.0)
  np.testing.assert_allclose([per_epoch(s) for s in (0, 9, 10, 19, 500, 509)],
                             [0.1, 0.1] + [0.05 * (1 + np.cos(np.pi * 0.01))] * 2 + [0.05] * 2, rtol=1e-6)
  steps = optim.learning_rate(config_lib.load(f"{REPO}/configs/moco_v1.py:imagenet").optimizer, 0.03,
                              total_steps=2000, steps_per_epoch=10.0)
  np.testing.assert_allclose([steps(s) for s in (0, 1199, 1200, 1599, 1600)],
                             [0.03, 0.03, 0.003, 0.003, 0.0003], rtol=1e-5)
