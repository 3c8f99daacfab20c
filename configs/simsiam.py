r"""SimSiam (Chen & He 2021, arXiv:2011.10566).

Variants (combine a dataset variant with `tiny`):

* `imagenet` -- ResNet-50, batch 512, SGD (momentum 0.9) lr 0.05 x B/256 = 0.1 with cosine decay per
  epoch and no warm-up, the predictor's learning rate fixed at 0.1 (--fix-pred-lr), weight decay 1e-4
  on every parameter, projector 2048-2048-2048 (last BN without affine), predictor 2048 -> 512 -> 2048,
  the MoCo v2 augmentations, 100 epochs (official main_simsiam.py and README; RECIPES.md section 5).
  Reproduces SimSiam Table 4, "SimSiam, 100 ep": 68.1 linear top-1 on ImageNet, with its linear
  protocol (LARS lr 0.1 x 4096/256, batch 4096, no weight decay, 90 epochs):
      python -m ssl_jax.main --config=configs/simsiam.py:imagenet \
          --config.data_dir=gs://BUCKET/tensorflow_datasets --workdir=gs://BUCKET/simsiam_r50
      python -m ssl_jax.evaluate --workdir=gs://BUCKET/simsiam_r50 --protocol=linear
* `cifar10` -- ResNet-18 with the CIFAR stem, solo-learn's simsiam.yaml (batch 256, SGD lr 0.5, weight
  decay 1e-5, 10 warm-up epochs then cosine, predictor at a fixed lr, projector 2048, predictor hidden
  512, symmetric_weak augmentations without blur at 32x32, 1000 epochs); solo-learn reports 90.51
  CIFAR-10 top-1:
      python -m ssl_jax.main --config=configs/simsiam.py:cifar10 --config.data_dir=DIR --workdir=W
* `tiny` -- ResNet-18 at width 16 and small heads, for CPU runs and tests.
"""

from ssl_jax import config as config_lib


def get_config(arg=None):
  variants = config_lib.parse_variants(arg, known={"imagenet", "cifar10", "tiny"}, default="cifar10")
  cfg = config_lib.base_config("simsiam")
  # MoCo v2's augmentations (main_simsiam.py l.230-236): crop scale 0.2-1, jitter (0.4, 0.4, 0.4, 0.1)
  # p 0.8, grayscale 0.2, blur p 0.5 (sigma 0.1-2), flip; both views alike.
  jitter = dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, color_jitter_prob=0.8,
                grayscale_prob=0.2, color_jitter_impl="simclrv1")
  if "imagenet" in variants:
    cfg.dataset = "imagenet2012"
    cfg.batch_size = 512
    cfg.num_epochs = 100.0
    cfg.cache_dataset = False
    cfg.model.update(depth=50, cifar_stem=False)
    # Weight decay on every parameter (exclude_bias_and_norm=False); the predictor at the initial rate.
    cfg.optimizer.update(name="sgd", base_learning_rate=0.05, lr_scaling="linear", weight_decay=1e-4,
                         momentum=0.9, warmup_epochs=0.0, schedule="cosine_per_epoch",
                         exclude_bias_and_norm=False, groups=(("predictor/.*", dict(fixed_lr=0.05)),))
    view = dict(crop_size=224, crop_scale=(0.2, 1.0), blur_prob=0.5, **jitter)
    config_lib.imagenet_eval(cfg)
    # main_lincls.py / README l.41-51: LARS, lr 0.1 x B/256 at batch 4096, no weight decay, 90 epochs.
    cfg.eval.paper_linear.update(optimizer="lars", base_learning_rate=0.1, batch_size=4096, epochs=(90.0,),
                                 weight_decay=0.0, nesterov=False)
  else:
    cfg.dataset = "cifar10"
    cfg.batch_size = 256
    cfg.num_epochs = 1000.0
    cfg.model.update(depth=18, cifar_stem=True)
    cfg.optimizer.update(name="sgd", base_learning_rate=0.5, lr_scaling="linear", weight_decay=1e-5,
                         momentum=0.9, warmup_epochs=10.0, exclude_bias_and_norm=False,
                         groups=(("predictor/.*", dict(fixed_lr=0.5)),))
    cfg.method.update(proj_hidden_dim=2048, proj_dim=2048, pred_hidden_dim=512)
    view = dict(crop_size=32, crop_scale=(0.08, 1.0), blur_prob=0.0, **jitter)
    config_lib.cifar10_eval(cfg)
  config_lib.add_view(cfg, "view", num=2, **view)

  if "tiny" in variants:
    config_lib.apply_tiny(cfg)
  return cfg
