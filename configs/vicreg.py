r"""VICReg (Bardes, Ponce, LeCun 2022, arXiv:2105.04906).

Variants (combine a dataset variant with `tiny`):

* `imagenet` -- ResNet-50, batch 2048, LARS (1-D parameters excluded from weight decay and adaptation)
  lr 0.2 x B/256 = 1.6, 10 warm-up epochs then cosine to 0.001 x that, weight decay 1e-6, expander
  8192-8192-8192, coefficients 25 / 25 / 1, the BYOL-style asymmetric augmentations, 1000 epochs
  (official main_vicreg.py and README; RECIPES.md section 10). Reproduces VICReg Table 1, "VICReg
  (ours)": 73.2 linear top-1 on ImageNet:
      python -m ssl_jax.main --config=configs/vicreg.py:imagenet \
          --config.data_dir=gs://BUCKET/tensorflow_datasets --workdir=gs://BUCKET/vicreg_r50
      python -m ssl_jax.evaluate --workdir=gs://BUCKET/vicreg_r50 --protocol=linear
* `cifar10` -- ResNet-18 with the CIFAR stem, solo-learn's vicreg.yaml (batch 256, LARS lr 0.3, weight
  decay 1e-4, expander 2048-2048, 25 / 25 / 1, crop scale 0.2-1, jitter (0.4, 0.4, 0.2, 0.1), solarize
  0.1, no blur, 1000 epochs); solo-learn reports 92.07 CIFAR-10 top-1 with its LARS variant:
      python -m ssl_jax.main --config=configs/vicreg.py:cifar10 --config.data_dir=DIR --workdir=W
* `tiny` -- ResNet-18 at width 16 and a 256-wide expander, for CPU runs and tests.
"""

from ssl_jax import config as config_lib


def get_config(arg=None):
  variants = config_lib.parse_variants(arg, known={"imagenet", "cifar10", "tiny"}, default="cifar10")
  cfg = config_lib.base_config("vicreg")
  jitter = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, color_jitter_prob=0.8,
                grayscale_prob=0.2, color_jitter_impl="simclrv1")
  if "imagenet" in variants:
    cfg.dataset = "imagenet2012"
    cfg.batch_size = 2048
    cfg.num_epochs = 1000.0
    cfg.cache_dataset = False
    cfg.model.update(depth=50, cifar_stem=False)
    cfg.optimizer.update(name="lars", base_learning_rate=0.2, end_learning_rate=0.2 * 0.001,
                         lr_scaling="linear", weight_decay=1e-6, warmup_epochs=10.0, exclude_bias_and_norm=True)
    # augmentations.py l.41-78: as Barlow Twins (view 1 blur 1.0 / solarize 0, view 2 blur 0.1 / 0.2).
    config_lib.add_view(cfg, "view1", crop_size=224, blur_prob=1.0, solarize_prob=0.0, **jitter)
    config_lib.add_view(cfg, "view2", crop_size=224, blur_prob=0.1, solarize_prob=0.2, **jitter)
    config_lib.imagenet_eval(cfg)
  else:
    cfg.dataset = "cifar10"
    cfg.batch_size = 256
    cfg.num_epochs = 1000.0
    cfg.model.update(depth=18, cifar_stem=True)
    cfg.optimizer.update(name="lars", base_learning_rate=0.3, lr_scaling="linear", weight_decay=1e-4,
                         warmup_epochs=10.0, exclude_bias_and_norm=True)
    cfg.method.update(proj_hidden_dim=2048, proj_dim=2048, proj_layers=2)
    config_lib.add_view(cfg, "view", num=2, crop_size=32, crop_scale=(0.2, 1.0), blur_prob=0.0,
                        solarize_prob=0.1, **jitter)
    config_lib.cifar10_eval(cfg)

  if "tiny" in variants:
    config_lib.apply_tiny(cfg)
  return cfg
