r"""MoCo v2 (Chen, Fan, Girshick, He 2020, arXiv:2003.04297, on MoCo, He et al. 2020).

Variants (combine a dataset variant with `tiny`):

* `imagenet` -- ResNet-50, batch 256, SGD lr 0.03 momentum 0.9, weight decay 1e-4, cosine schedule,
  K = 65536, m = 0.999, temperature 0.2, MLP head 2048 -> 128, the "aug+" augmentations (crop scale
  0.2-1, colour jitter (0.4, 0.4, 0.4, 0.1) p=0.8, grayscale 0.2, blur p=0.5), 200 epochs, per-GPU BN
  with shuffle BN. Reproduces MoCo v2 Table 1, row (e) "MLP, aug+, cos, 200 ep", ImageNet linear top-1
  67.5:
      python -m ssl_jax.main --config=configs/moco_v2.py:imagenet \
          --config.data_dir=gs://BUCKET/tensorflow_datasets --workdir=gs://BUCKET/mocov2_r50
  (71.1 with --config.num_epochs=800, MoCo v2 Table 2 and the official README.)
* `cifar10` -- ResNet-18 with the CIFAR stem, batch 256, SGD lr 0.3, weight decay 1e-4, K = 4096,
  m = 0.99, temperature 0.2, 1000 epochs: MoCo v2 with solo-learn's CIFAR-10 optimizer settings. There
  is no published figure for exactly this recipe; solo-learn's MoCo V2+ (a symmetrized loss, K = 32768)
  reports 92.94 CIFAR-10 top-1:
      python -m ssl_jax.main --config=configs/moco_v2.py:cifar10 --config.data_dir=DIR --workdir=W
* `tiny` -- ResNet-18 at width 16, for CPU smoke runs and tests.
"""

from ssl_jax import config as config_lib


def get_config(arg=None):
  variants = config_lib.parse_variants(arg, known={"imagenet", "cifar10", "tiny"}, default="cifar10")
  cfg = config_lib.base_config("moco")
  # MoCo v2 "aug+": torchvision ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale 0.2, blur p=0.5.
  aug = dict(crop_scale=(0.2, 1.0), brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
             color_jitter_prob=0.8, grayscale_prob=0.2)
  # main_moco.py builds torchvision's ResNet with its default zero_init_residual=False (solo-learn's CIFAR
  # backbones are the same torchvision models): no zero-init of the blocks' last BN.
  cfg.model.zero_init_residual = False
  # The official code decays every parameter, BN and biases included, and uses no warm-up.
  cfg.optimizer.update(name="sgd", lr_scaling="linear", momentum=0.9, warmup_epochs=0.0,
                       exclude_bias_and_norm=False)
  if "imagenet" in variants:
    cfg.dataset = "imagenet2012"
    cfg.batch_size = 256
    cfg.num_epochs = 200.0
    cfg.cache_dataset = False
    cfg.model.update(depth=50, cifar_stem=False)
    # --cos: the official adjust_learning_rate sets the cosine rate once per epoch (main_moco.py).
    cfg.optimizer.update(base_learning_rate=0.03, weight_decay=1e-4, schedule="cosine_per_epoch")
    cfg.method.update(temperature=0.2, momentum=0.999, queue_size=65536, proj_hidden_dim=2048, proj_dim=128)
    config_lib.add_view(cfg, "view", num=2, crop_size=224, blur_prob=0.5, **aug)
    config_lib.moco_linear_eval(cfg)
  else:
    cfg.dataset = "cifar10"
    cfg.batch_size = 256
    cfg.num_epochs = 1000.0
    cfg.model.update(depth=18, cifar_stem=True)
    cfg.optimizer.update(base_learning_rate=0.3, weight_decay=1e-4)
    cfg.method.update(temperature=0.2, momentum=0.99, queue_size=4096, proj_hidden_dim=2048, proj_dim=256)
    config_lib.add_view(cfg, "view", num=2, crop_size=32, blur_prob=0.0, **aug)
    config_lib.cifar10_eval(cfg)

  if "tiny" in variants:
    config_lib.apply_tiny(cfg)
  return cfg
