r"""BYOL (Grill et al. 2020, arXiv:2006.07733).

Variants (combine a dataset variant with `tiny`):

* `imagenet` -- ResNet-50, batch 4096, LARS lr 0.2 x B/256 = 3.2, weight decay 1.5e-6, 10 warm-up
  epochs then cosine, tau_base 0.996 rising to 1, projector and predictor MLP 4096 -> 256 with BN, the
  asymmetric augmentations of Table 6 (blur 1.0 / 0.1, solarize 0 / 0.2), 1000 epochs. Reproduces BYOL
  Table 1a, "BYOL ResNet-50", linear evaluation top-1 74.3 (top-5 91.6) on ImageNet (the official
  README: 74.0-74.5):
      python -m ssl_jax.main --config=configs/byol.py:imagenet \
          --config.data_dir=gs://BUCKET/tensorflow_datasets --workdir=gs://BUCKET/byol_r50
* `cifar10` -- ResNet-18 with the CIFAR stem, solo-learn's CIFAR-10 hyperparameters (batch 256, lr 1.0,
  weight decay 1e-5, tau_base 0.99, projector 4096 -> 256, no blur, solarize 0 / 0.2, 1000 epochs).
  solo-learn reports 92.58 CIFAR-10 top-1 (online linear classifier) with its LARS variant (trust
  coefficient 0.02, ratio clipped at 1); ours is the BYOL-code LARS (0.001, unclipped), so expect a
  different figure until measured:
      python -m ssl_jax.main --config=configs/byol.py:cifar10 --config.data_dir=DIR --workdir=W
* `tiny` -- ResNet-18 at width 16, for CPU smoke runs and tests.
"""

from ssl_jax import config as config_lib


def get_config(arg=None):
  variants = config_lib.parse_variants(arg, known={"imagenet", "cifar10", "tiny"}, default="cifar10")
  cfg = config_lib.base_config("byol")
  # BYOL Table 6 (appendix B): colour jitter (0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale 0.2, and the
  # asymmetric blur / solarize probabilities.
  # Brightness is an additive delta in the BYOL code ("simclrv1" here).
  jitter = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, color_jitter_prob=0.8,
                grayscale_prob=0.2, color_jitter_impl="simclrv1")
  if "imagenet" in variants:
    cfg.dataset = "imagenet2012"
    cfg.batch_size = 4096
    cfg.num_epochs = 1000.0
    cfg.cache_dataset = False
    cfg.model.update(depth=50, cifar_stem=False)
    cfg.optimizer.update(name="lars", base_learning_rate=0.2, lr_scaling="linear", weight_decay=1.5e-6,
                         warmup_epochs=10.0)
    cfg.method.update(base_ema=0.996, proj_hidden_dim=4096, proj_dim=256, pred_hidden_dim=4096)
    config_lib.add_view(cfg, "view1", crop_size=224, blur_prob=1.0, solarize_prob=0.0, **jitter)
    config_lib.add_view(cfg, "view2", crop_size=224, blur_prob=0.1, solarize_prob=0.2, **jitter)
    # BYOL appendix C.1: Nesterov SGD, batch 1024, 80 epochs, no weight decay, lr picked from
    # {0.4, 0.3, 0.2, 0.1, 0.05} on a validation split held out from train; 0.2 is the default here.
    config_lib.imagenet_eval(cfg)
    cfg.eval.paper_linear.update(epochs=(80.0,), batch_size=1024, base_learning_rate=0.2, lr_scaling="none",
                                 weight_decay=0.0)
  else:
    cfg.dataset = "cifar10"
    cfg.batch_size = 256
    cfg.num_epochs = 1000.0
    cfg.model.update(depth=18, cifar_stem=True)
    cfg.optimizer.update(name="lars", base_learning_rate=1.0, lr_scaling="linear", weight_decay=1e-5,
                         warmup_epochs=10.0)
    cfg.method.update(base_ema=0.99, proj_hidden_dim=4096, proj_dim=256, pred_hidden_dim=4096)
    # No blur at 32x32 (SimCLR appendix B.9); solarization kept asymmetric.
    config_lib.add_view(cfg, "view1", crop_size=32, blur_prob=0.0, solarize_prob=0.0, **jitter)
    config_lib.add_view(cfg, "view2", crop_size=32, blur_prob=0.0, solarize_prob=0.2, **jitter)
    config_lib.cifar10_eval(cfg)

  if "tiny" in variants:
    config_lib.apply_tiny(cfg)
  return cfg
