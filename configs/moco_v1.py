r"""MoCo v1 (He, Fan, Wu, Xie, Girshick 2020, arXiv:1911.05722): the method of configs/moco_v2.py with its
first recipe (ssl_jax/methods/moco.py; RECIPES.md section 3).

Variants (combine a dataset variant with `tiny`):

* `imagenet` -- ResNet-50, batch 256, SGD lr 0.03 momentum 0.9, weight decay 1e-4 on every parameter,
  200 epochs with the rate divided by 10 at epochs 120 and 160, K = 65536, m = 0.999, temperature 0.07,
  the linear 128-d head (the ResNet's fc), the v1 augmentations (crop scale 0.2-1, grayscale 0.2,
  colour jitter (0.4, 0.4, 0.4, 0.4) on every image, flip; main_moco.py l.348-350), per-GPU BN with
  shuffle BN. Reproduces MoCo Table 1, "MoCo, R50": 60.6 ImageNet linear top-1 (the official README:
  60.8 +- 0.2 over 5 runs) with MoCo's linear protocol (lr 30, 100 epochs, /10 at 60 and 80):
      python -m ssl_jax.main --config=configs/moco_v1.py:imagenet \
          --config.data_dir=gs://BUCKET/tensorflow_datasets --workdir=gs://BUCKET/mocov1_r50
      python -m ssl_jax.evaluate --workdir=gs://BUCKET/mocov1_r50 --protocol=linear
* `cifar10` -- ResNet-18 with the CIFAR stem: the v1 recipe (linear head, T 0.07, v1 augmentations, steps
  at 60% and 80% of training) with the CIFAR-10 queue and batch of configs/moco_v2.py:cifar10 (K = 4096,
  batch 256, lr 0.06 x B/256, 1000 epochs). No published CIFAR-10 figure exists for MoCo v1:
      python -m ssl_jax.main --config=configs/moco_v1.py:cifar10 --config.data_dir=DIR --workdir=W
* `tiny` -- ResNet-18 at width 16, for CPU runs and tests.
"""

from ssl_jax import config as config_lib


def get_config(arg=None):
  variants = config_lib.parse_variants(arg, known={"imagenet", "cifar10", "tiny"}, default="cifar10")
  cfg = config_lib.base_config("moco")
  # v1: ColorJitter(0.4, 0.4, 0.4, 0.4) applied to every image (not RandomApply), grayscale 0.2, no blur.
  aug = dict(crop_scale=(0.2, 1.0), brightness=0.4, contrast=0.4, saturation=0.4, hue=0.4,
             color_jitter_prob=1.0, grayscale_prob=0.2, blur_prob=0.0)
  cfg.optimizer.update(name="sgd", lr_scaling="linear", momentum=0.9, warmup_epochs=0.0,
                       exclude_bias_and_norm=False, schedule="steps")
  # main_moco.py: torchvision's ResNet with its default zero_init_residual=False.
  cfg.model.zero_init_residual = False
  if "imagenet" in variants:
    cfg.dataset = "imagenet2012"
    cfg.batch_size = 256
    cfg.num_epochs = 200.0
    cfg.cache_dataset = False
    cfg.model.update(depth=50, cifar_stem=False)
    cfg.optimizer.update(base_learning_rate=0.03, weight_decay=1e-4, lr_drop_epochs=(120.0, 160.0))
    cfg.method.update(temperature=0.07, momentum=0.999, queue_size=65536, proj_hidden_dim=0, proj_dim=128)
    config_lib.add_view(cfg, "view", num=2, crop_size=224, **aug)
    config_lib.moco_linear_eval(cfg)
  else:
    cfg.dataset = "cifar10"
    cfg.batch_size = 256
    cfg.num_epochs = 1000.0
    cfg.model.update(depth=18, cifar_stem=True)
    cfg.optimizer.update(base_learning_rate=0.06, weight_decay=1e-4, lr_drop_epochs=(600.0, 800.0))
    cfg.method.update(temperature=0.07, momentum=0.99, queue_size=4096, proj_hidden_dim=0, proj_dim=128)
    config_lib.add_view(cfg, "view", num=2, crop_size=32, **aug)
    config_lib.cifar10_eval(cfg)

  if "tiny" in variants:
    config_lib.apply_tiny(cfg)
  return cfg
