r"""CPC v2 (Henaff et al. 2020, arXiv:1905.09272; ssl_jax/methods/cpc.py; RECIPES.md section 2). CPC has no
official code: the architecture below is the paper's section 3-4.1 and appendix A.2 pseudo-code; what
the paper's text could not be checked for here is marked UNVERIFIED.

Variants (combine a dataset variant with `tiny`):

* `imagenet` -- a 7 x 7 grid of 64 x 64 patches at stride 32 from a 256 x 256 random resized crop (scale
  0.08-1: our choice, the paper's crop recipe is UNVERIFIED), each patch flipped (p 0.5) and colour-dropped
  (one of three channels kept) on its own; ResNet-50 with layer norm in place of batch norm, mean-pooled
  per patch (2048-d); A.2's context network (5 residual blocks, 256 hidden channels), targets of 64
  dimensions, predictions scaled by 0.1 for the patch 3 rows below (A.2: steps_to_ignore 2,
  steps_to_predict 3), top-to-bottom. Optimizer: Adam lr 4e-4, batch 512, 200 epochs, cosine (UNVERIFIED:
  from memory of the paper's appendix, not in RECIPES.md). The row: CPC v2 with ResNet-50 in the
  linear-classification comparison of SimCLR's Table 6 (63.8 top-1; UNVERIFIED here). The paper's
  headline, 71.5 top-1 with ResNet-161 (ResNet-101's third stack widened to 46 blocks of 4096 channels),
  is not reproduced by this config (no ResNet-161 here). CPC v1 (van den Oord et al. 2018, ResNet-v2-101's
  first three stacks, batch norm) is the historical row, 48.7 top-1 (UNVERIFIED here):
      python -m ssl_jax.main --config=configs/cpc_v2.py:imagenet \
          --config.data_dir=gs://BUCKET/tensorflow_datasets --workdir=gs://BUCKET/cpc_v2_r50
      python -m ssl_jax.evaluate --workdir=gs://BUCKET/cpc_v2_r50 --protocol=linear
  Every protocol reads the patch vectors of the 7 x 7 grid over the whole image, averaged (the 224-pixel
  evaluation crop resized to 256 first); `linear` trains SimCLR's linear head on them (the paper's own
  linear protocol is UNVERIFIED here).
* `cifar10` (default) -- the ImageNet geometry scaled by 1/8: a 7 x 7 grid of 8 x 8 patches at stride 4
  from a 32 x 32 random resized crop (scale 0.2-1); ResNet-18 with layer norm and the CIFAR stem (512-d);
  the same context network, targets, offset and optimizer at batch 256, 200 epochs. No published CIFAR-10
  figure exists (RECIPES.md section 2):
      python -m ssl_jax.main --config=configs/cpc_v2.py:cifar10 --config.data_dir=DIR --workdir=W
* `tiny` -- ResNet-18 at width 16, context network of 2 blocks of 32 channels, 32-d targets: CPU runs
  and tests.

Deviations: colour dropping zeroes channels in the normalized input space (the dataset mean), where the
paper's value for a dropped channel is UNVERIFIED; the ResNets keep the library's zero-init of each
block's last normalization scale.
"""

from ssl_jax import config as config_lib


def get_config(arg=None):
  variants = config_lib.parse_variants(arg, known={"imagenet", "cifar10", "tiny"}, default="cifar10")
  cfg = config_lib.base_config("cpc_v2")
  cfg.optimizer.update(name="adamw", base_learning_rate=4e-4, lr_scaling="none", b1=0.9, b2=0.999,
                       weight_decay=0.0, warmup_epochs=0.0, schedule="cosine", exclude_bias_and_norm=True)
  # The image-level view is only the crop: flips and colour dropping are per patch (method.patch_*).
  view = dict(flip_prob=0.0, color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
  cfg.model.norm = "layer"
  if "imagenet" in variants:
    cfg.dataset = "imagenet2012"
    cfg.cache_dataset = False
    cfg.batch_size = 512
    cfg.num_epochs = 200.0
    cfg.model.update(depth=50, cifar_stem=False)
    cfg.method.update(grid_size=7, patch_size=64, patch_stride=32)
    config_lib.add_view(cfg, "image", crop_size=256, crop_scale=(0.08, 1.0), **view)
    config_lib.imagenet_eval(cfg)
  else:
    cfg.dataset = "cifar10"
    cfg.batch_size = 256
    cfg.num_epochs = 200.0
    cfg.model.update(depth=18, cifar_stem=True)
    cfg.method.update(grid_size=7, patch_size=8, patch_stride=4)
    config_lib.add_view(cfg, "image", crop_size=32, crop_scale=(0.2, 1.0), **view)
    config_lib.cifar10_eval(cfg)

  if "tiny" in variants:
    config_lib.apply_tiny(cfg)
  return cfg
