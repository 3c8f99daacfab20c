"""The method framework: every config of every method loads and validates, each method's impossible
settings stop in one line, views keep their order through config.json, the online probe ignores
unlabelled examples, and the registries name what they know."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import REPO, set_keys
from ssl_jax import config as config_lib
from ssl_jax import methods, models, parallel, train
from ssl_jax.errors import ConfigError
from ssl_jax.methods import base

CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py") if p.stem != "quickstart")
# Variants beyond imagenet / cifar10 whose settings differ enough to be checked on their own.
EXTRA_VARIANTS = {"moco_v3": ("vit_base", "resnet50", "cifar10_resnet,tiny"),
                  "dino": ("vit_small_800ep", "vit_base8", "resnet50", "cifar10_resnet,tiny",
                           "cifar10_resnet_lightly", "cifar10_resnet_lightly,tiny"),
                  "mae": ("vit_large", "vit_huge")}


@pytest.mark.parametrize("name", CONFIGS)
def test_every_variant_validates_and_survives_config_json(name):
  for variant in ("imagenet", "cifar10", "cifar10,tiny") + EXTRA_VARIANTS.get(name, ()):
    cfg = config_lib.load(f"{REPO}/configs/{name}.py:{variant}")
    cfg.data_dir = "/data"
    config_lib.validate(cfg, 8, 1, "cpu")
    saved = config_lib.resolve(cfg, 50_000).to_dict()
    again = config_lib.with_defaults(json.loads(json.dumps(saved, default=str)))
    config_lib.validate(again, 8, 1, "cpu")
    want = methods.get(config_lib.resolve(cfg, 50_000)).views()
    assert methods.get(again).views() == want, (name, variant)


def test_views_keep_their_order_through_config_json():
  """config.json sorts keys: a local crop named before the global ones would come first without `order`."""
  cfg = config_lib.load(f"{REPO}/configs/simclr.py:cifar10,tiny")
  with cfg.views.unlocked():
    del cfg.views["view"]
  config_lib.add_view(cfg, "global", num=2, crop_size=32)
  config_lib.add_view(cfg, "a_local", num=3, crop_size=16)
  cfg.data_dir = "/data"
  again = config_lib.with_defaults(json.loads(json.dumps(config_lib.resolve(cfg, 4000).to_dict())))
  assert list(again.views) == ["a_local", "global"]  # what the file's key order would give
  assert base.view_crop_sizes(again) == [32, 32, 16, 16, 16]
  assert [v["crop_size"] for v in methods.get(again).views()] == [32, 32, 16, 16, 16]


BAD = [
    ("simclr", {"method.temperature": 0.0}, "method.temperature must be > 0"),
    ("moco_v2", {"method.queue_size": 100, "batch_size": 64}, "queue_size=100 must be a multiple of batch_size=64"),
    ("moco_v1", {"method.momentum": 1.5}, "method.momentum must be in [0, 1]"),
    ("byol", {"method.base_ema": -0.1}, "method.base_ema must be in [0, 1]"),
    ("simsiam", {"method.pred_hidden_dim": 0}, "head sizes > 0"),
    ("barlow_twins", {"method.lambd": -1.0}, "method.lambd and method.official_gradient_gpus must be >= 0"),
    ("vicreg", {"method.std_coeff": -25.0}, "sim_coeff, std_coeff and cov_coeff must be >= 0"),
    ("simsiam", {"views.view.num": 3}, "simsiam takes 2 views, the config defines 3"),
    ("simclr", {"model.depth": 19}, "model.depth must be one of"),
    ("simclr", {"model.name": "vgg"}, "unknown model.name 'vgg'; known: resnet"),
    ("simclr", {"optimizer.schedule": "linear"}, "optimizer.schedule must be cosine, cosine_per_epoch, steps"),
    ("simsiam", {"optimizer.groups": (("projector/nothing", {"lr_mult": 2.0}),)}, "projector/nothing"),
    ("moco_v3", {"method.base_momentum": 1.5}, "method.base_momentum must be in [0, 1]"),
    ("moco_v3", {"model.representation": "mean"}, "pre-train with cls (or cls_last4)"),
    ("moco_v3", {"model.num_heads": 5}, "divisible"),
    ("dino", {"method.student_temp": 0.0}, "method.student_temp must be > 0"),
    ("dino", {"method.warmup_teacher_temp_epochs": -1}, "whole number >= 0"),
    ("dino", {"views.global2.crop_size": 24}, "dino takes 2 global crops of one size first"),
    ("instdisc", {"method.bank_momentum": 1.0}, "method.bank_momentum must lie in [0, 1)"),
    ("instdisc", {"method.nce_k": -1}, "method.nce_k and method.proximal_lambda must be >= 0"),
]


@pytest.mark.parametrize("name,overrides,message", BAD, ids=[m for _, _, m in BAD])
def test_impossible_method_settings_stop_in_one_line(name, overrides, message):
  cfg = config_lib.load(f"{REPO}/configs/{name}.py:cifar10,tiny")
  cfg.data_dir = "/data"
  set_keys(cfg, overrides)
  with pytest.raises(ConfigError) as info:
    config_lib.validate(cfg, 8, 1, "cpu")
    # Group rules are checked against the parameters when the optimizer is built, before compiling.
    cfg = config_lib.resolve(cfg, 4000)
    train.create_train_state(cfg, methods.get(cfg), lambda s: 0.1, 10)
  assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_registries_name_what_they_know():
  assert {"simclr", "byol", "moco", "simsiam", "barlow_twins", "vicreg"} <= set(methods.METHODS.names())
  with pytest.raises(ConfigError, match="unknown method.name 'cpc'; known: barlow_twins, byol"):
    methods.METHODS.get("cpc")
  assert models.MODELS.names() == ["resnet", "vit"]
  assert methods.DataFacts(50_000, 512).steps(15) == round(15 * 50_000 / 512)


def test_online_probe_ignores_unlabelled_examples_over_devices():
  """STL-10's unlabelled examples have label -1: the probe's loss and accuracy are over the labelled ones
  of the global batch, whatever device holds them (here unevenly: some devices hold none)."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(16, 5)).astype(np.float32)
  labels = rng.integers(0, 5, size=16).astype(np.int32)
  labels[[0, 1, 2, 3, 9, 15]] = -1
  mesh = parallel.make_mesh()
  loss, acc = jax.jit(jax.shard_map(train._probe_terms, mesh=mesh, in_specs=(P(parallel.DATA), P(parallel.DATA)),
                                    out_specs=(P(), P())))(logits, labels)
  keep = labels >= 0
  log_probs = logits - np.log(np.sum(np.exp(logits), axis=1, keepdims=True))
  want_loss = -np.mean(log_probs[keep, labels[keep]])
  want_acc = np.mean(np.argmax(logits[keep], 1) == labels[keep])
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(acc, want_acc, rtol=1e-6)
  assert jnp.isfinite(loss)


def test_resnet_zero_init_residual_follows_the_recipe():
  """The blocks' last BN scale starts at 0 (SimCLR/BYOL code, torchvision's zero_init_residual=True) or at 1
  (torchvision's default, which DINO's ResNets use)."""
  def last_bn_scales(cfg):
    params = models.build(cfg.model).init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32), train=False)
    return [np.asarray(block["BatchNorm_1"]["scale"]) for name, block in params["params"].items()
            if name.startswith("BasicBlock")]
  simclr = config_lib.load(f"{REPO}/configs/simclr.py:cifar10,tiny")
  dino = config_lib.load(f"{REPO}/configs/dino.py:cifar10_resnet,tiny")
  assert simclr.model.zero_init_residual and not dino.model.zero_init_residual
  zeros, ones = last_bn_scales(simclr), last_bn_scales(dino)
  assert len(zeros) == len(ones) == 8
  assert all(not np.any(s) for s in zeros) and all(np.all(s == 1.0) for s in ones)


def test_dino_lightly_variant_is_lightlys_cifar10_benchmark():
  """configs/dino.py:cifar10_resnet_lightly against lightly's cifar10_benchmark.py DINOModel (RECIPES.md section
  12): SGD 0.06 x B/128 on every parameter, constant teacher momentum 0.99 and temperature 0.04, 2-layer BN
  head, 2048 prototypes with their norm frozen and no last-layer freeze, two 0.4-1 crops, no local crops."""
  cfg = config_lib.load(f"{REPO}/configs/dino.py:cifar10_resnet_lightly")
  opt, m = cfg.optimizer, cfg.method
  assert (cfg.batch_size, cfg.num_epochs, cfg.model.name, cfg.model.depth, cfg.model.cifar_stem) == \
      (128, 200.0, "resnet", 18, True)
  assert (opt.name, opt.momentum, opt.nesterov, opt.weight_decay, opt.exclude_bias_and_norm) == \
      ("sgd", 0.9, False, 5e-4, False)
  assert opt.base_learning_rate * cfg.batch_size / 256 == pytest.approx(0.06)
  assert (opt.lr_scaling, opt.schedule, opt.warmup_epochs, opt.end_learning_rate, opt.clip_per_param) == \
      ("linear", "cosine", 0.0, 0.0, 0.0)
  assert opt.groups == ((r"projector/last_layer/g", {"frozen": True}),)
  assert (m.out_dim, m.hidden_dim, m.bottleneck_dim, m.head_layers, m.use_bn_in_head, m.norm_last_layer) == \
      (2048, 2048, 256, 2, True, True)
  assert (m.student_temp, m.teacher_temp, m.warmup_teacher_temp, m.center_momentum) == (0.1, 0.04, 0.04, 0.9)
  assert [(v.crop_size, tuple(v.crop_scale), v.num, v.blur_prob, v.solarize_prob) for v in cfg.views.values()] == \
      [(32, (0.4, 1.0), 1, 0.0, 0.0), (32, (0.4, 1.0), 1, 0.0, 0.2)]
  cfg.data_dir = "/data"
  method = methods.get(config_lib.resolve(cfg, 50_000), methods.DataFacts(50_000, 128))
  total = config_lib.resolve(cfg, 50_000).total_steps
  assert [float(method.teacher_momentum(s)) for s in (0, total // 2, total)] == pytest.approx([0.99] * 3)
