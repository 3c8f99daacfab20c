r"""Barlow Twins (Zbontar et al. 2021, arXiv:2103.03230).

Variants (combine a dataset variant with `tiny`):

* `imagenet` -- ResNet-50, batch 2048, LARS (1-D parameters excluded from weight decay and adaptation)
  at lr 0.2 x B/256 for the weights and 0.0048 x B/256 for biases and batch-norm parameters, 10 warm-up
  epochs then cosine to 0.001 x those rates, weight decay 1e-6 (the official code's default), projector
  8192-8192-8192, lambda 0.0051, the BYOL-style asymmetric augmentations, 1000 epochs (official main.py;
  RECIPES.md section 7). Reproduces Barlow Twins Table 1, "Barlow Twins (ours)": 73.2 linear top-1 on
  ImageNet (the official README's checkpoint: 73.5); the gradient is the true one (see
  ssl_jax/methods/barlow_twins.py for `method.official_gradient_gpus`, which reproduces the official
  DDP code's 1/16 scale):
      python -m ssl_jax.main --config=configs/barlow_twins.py:imagenet \
          --config.data_dir=gs://BUCKET/tensorflow_datasets --workdir=gs://BUCKET/barlow_r50
      python -m ssl_jax.evaluate --workdir=gs://BUCKET/barlow_r50 --protocol=linear
* `cifar10` -- ResNet-18 with the CIFAR stem, solo-learn's scripts/pretrain/cifar/barlow.yaml: batch 256,
  its LARS (Lightning Bolts', `lars_clip`: trust coefficient 0.02, ratio clipped at the learning rate,
  biases and norms excluded) at lr 0.3, weight decay 1e-4, loss scale 0.1, projector 2048-2048, lambda
  0.0051, asymmetric augmentations, 1000 epochs -> solo-learn's 92.10 CIFAR-10 top-1. (With the official
  LARS -- trust 0.001, unclipped -- at this rate, the tiny variant did not beat its random init on kNN at
  the quickstart budget: 25.1 against 25.9.)
      python -m ssl_jax.main --config=configs/barlow_twins.py:cifar10 --config.data_dir=DIR --workdir=W
* `tiny` -- ResNet-18 at width 16 and a 256-wide projector, for CPU runs and tests.
"""

from ssl_jax import config as config_lib

# The biases and batch-norm parameters: their own learning rate (main.py l.90-97, 155-168).
ONE_D_PARAMS = r".*/(bias|scale)"


def get_config(arg=None):
  variants = config_lib.parse_variants(arg, known={"imagenet", "cifar10", "tiny"}, default="cifar10")
  cfg = config_lib.base_config("barlow_twins")
  # main.py l.290-321: jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2; view 1 blur 1.0 / solarize 0,
  # view 2 blur 0.1 / solarize 0.2.
  jitter = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, color_jitter_prob=0.8,
                grayscale_prob=0.2, color_jitter_impl="simclrv1")
  if "imagenet" in variants:
    cfg.dataset = "imagenet2012"
    cfg.batch_size = 2048
    cfg.num_epochs = 1000.0
    cfg.cache_dataset = False
    cfg.model.update(depth=50, cifar_stem=False)
    cfg.optimizer.update(name="lars", base_learning_rate=0.2, end_learning_rate=0.2 * 0.001,
                         lr_scaling="linear", weight_decay=1e-6, warmup_epochs=10.0, exclude_bias_and_norm=True,
                         groups=((ONE_D_PARAMS, dict(lr_mult=0.0048 / 0.2)),))
    crop = dict(crop_size=224)
    blur = (1.0, 0.1)
    config_lib.imagenet_eval(cfg)
  else:
    cfg.dataset = "cifar10"
    cfg.batch_size = 256
    cfg.num_epochs = 1000.0
    cfg.model.update(depth=18, cifar_stem=True)
    cfg.optimizer.update(name="lars_clip", base_learning_rate=0.3, lr_scaling="linear", weight_decay=1e-4,
                         trust_coefficient=0.02, warmup_epochs=10.0, exclude_bias_and_norm=True)
    cfg.method.update(proj_hidden_dim=2048, proj_dim=2048, proj_layers=2, loss_scale=0.1)
    crop = dict(crop_size=32)
    blur = (0.0, 0.0)  # no blur at 32x32 (solo-learn's asymmetric file)
    config_lib.cifar10_eval(cfg)
  config_lib.add_view(cfg, "view1", blur_prob=blur[0], solarize_prob=0.0, **crop, **jitter)
  config_lib.add_view(cfg, "view2", blur_prob=blur[1], solarize_prob=0.2, **crop, **jitter)

  if "tiny" in variants:
    config_lib.apply_tiny(cfg)
  return cfg
