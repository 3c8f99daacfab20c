r"""MoCo v3 (Chen, Xie, He 2021, arXiv:2104.02057); the recipes of the official CONFIG.md (RECIPES.md
section 4), not main_moco.py's argparse defaults (which are the ResNet LARS recipe with T=1).

Variants (combine one with `tiny`):

* `vit_small` (alias `imagenet`) -- ViT-S/16 with MoCo v3's 12 heads, fixed 2-D sin-cos position
  embedding, the frozen random patch projection (--stop-grad-conv1: the optimizer group
  "encoder/patch_embed/.*" frozen), batch 4096, AdamW lr 1.5e-4 x B/256 with weight decay 0.1 on every
  parameter (main_moco.py l.228-230), 40 warm-up epochs then cosine, T 0.2, momentum 0.99 -> 1
  (cosine), 300 epochs, the asymmetric BYOL augmentations with crops of scale 0.08-1.
  Reproduces MoCo v3 Table 4 / CONFIG.md "ViT-Small, 300 epochs": 73.2 linear top-1 on ImageNet, with
  the official linear protocol (main_lincls.py: SGD momentum 0.9, no weight decay, lr 3 x B/256, batch
  1024, 90 epochs, cosine):
      python -m ssl_jax.main --config=configs/moco_v3.py:vit_small \
          --config.data_dir=gs://BUCKET/tensorflow_datasets --workdir=gs://BUCKET/mocov3_vits
      python -m ssl_jax.evaluate --workdir=gs://BUCKET/mocov3_vits --protocol=linear
* `vit_base` -- the same with ViT-B/16: 76.7 linear top-1 (CONFIG.md ViT-Base, 300 epochs).
* `resnet50` -- the ResNet-50 recipe (CONFIG.md l.14-18): LARS lr 0.6 x B/256 with weight decay 1e-6
  (biases and norms excluded from decay and trust ratio), T 1.0, momentum 0.99 -> 1, 10 warm-up epochs,
  crops of scale 0.2-1, projector 2048-4096-256, predictor 256-4096-256 without final BN, 100 epochs:
  68.9 linear top-1 (CONFIG.md: 300 epochs at lr 0.3 -> 72.8; 1000 epochs at lr 0.3, wd 1.5e-6,
  momentum 0.996 -> 74.6: `--config.num_epochs=300 --config.optimizer.base_learning_rate=0.3`). Linear
  protocol: SGD lr 0.1 x B/256, batch 1024, 90 epochs, cosine.
* `cifar10` (default) -- ViT-Ti/4 on 32x32 CIFAR-10 (64 patches), the ViT recipe at batch 256: AdamW lr
  1.5e-4 x B/256, weight decay 0.1, 40 warm-up epochs, T 0.2, momentum 0.99 -> 1, frozen patch
  projection, no blur at 32x32 (solarization kept asymmetric), 1000 epochs. No published figure:
      python -m ssl_jax.main --config=configs/moco_v3.py:cifar10 --config.data_dir=DIR --workdir=W
* `cifar10_resnet` -- solo-learn's mocov3.yaml on ResNet-18 (CIFAR stem): LARS lr 0.3 x B/256, weight
  decay 1e-6, T 0.2, momentum 0.99 -> 1, projector 4096-256, predictor 4096, batch 256, 1000 epochs;
  solo-learn reports 93.10 (its LARS: trust 0.02, clipped, which this recipe does not copy).
* `tiny` -- the model's and the heads' small sizes, for CPU runs and tests.

Deviations: float32 throughout (the official runs use AMP); the dataset's own mean and std normalize the
inputs.
"""

from ssl_jax import config as config_lib

PATCH_PROJECTION = r"encoder/patch_embed/.*"


def get_config(arg=None):
  variants = config_lib.parse_variants(
      arg, known={"imagenet", "vit_small", "vit_base", "resnet50", "cifar10", "cifar10_resnet", "tiny"},
      default="cifar10")
  if "imagenet" in variants:  # the flagship ImageNet recipe
    variants = (variants - {"imagenet"}) | {"vit_small"}
  resnet = bool(variants & {"resnet50", "cifar10_resnet"})
  cfg = config_lib.base_config("moco_v3", model="resnet" if resnet else "vit")
  # main_moco.py l.262-285: ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8 (torchvision: multiplicative
  # brightness), grayscale 0.2, blur 1.0 / 0.1, solarize 0 / 0.2, flip.
  jitter = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, color_jitter_prob=0.8,
                grayscale_prob=0.2, color_jitter_impl="simclrv2")
  imagenet = bool(variants & {"vit_small", "vit_base", "resnet50"})
  crop = 224 if imagenet else 32
  crop_min = 0.2 if "resnet50" in variants else 0.08
  blur = (1.0, 0.1) if imagenet else (0.0, 0.0)  # no blur at 32x32 (SimCLR appendix B.9)
  config_lib.add_view(cfg, "view1", crop_size=crop, crop_scale=(crop_min, 1.0), blur_prob=blur[0],
                      solarize_prob=0.0, **jitter)
  config_lib.add_view(cfg, "view2", crop_size=crop, crop_scale=(crop_min, 1.0), blur_prob=blur[1],
                      solarize_prob=0.2, **jitter)

  if resnet:
    cfg.model.update(depth=50 if "resnet50" in variants else 18, cifar_stem="cifar10_resnet" in variants)
    cfg.method.update(proj_layers=2, proj_hidden_dim=4096, proj_dim=256, pred_hidden_dim=4096,
                      pred_output_bn=False, base_momentum=0.99)
    cfg.optimizer.update(name="lars", lr_scaling="linear", warmup_epochs=10.0, exclude_bias_and_norm=True)
  else:
    cfg.model.update(arch="vit_small_12h" if "vit_small" in variants else "vit_base" if "vit_base" in variants
                     else "vit_tiny", patch_size=16 if imagenet else 4, image_size=crop, pos_embed="sincos",
                     init="moco_v3", representation="cls")
    cfg.method.update(proj_layers=3, proj_hidden_dim=4096, proj_dim=256, pred_hidden_dim=4096,
                      pred_output_bn=True, temperature=0.2, base_momentum=0.99)
    # AdamW on every parameter (main_moco.py l.228-230); the random patch projection frozen
    # (--stop-grad-conv1, vits.py l.49-51): no update, no decay, no Adam moments.
    cfg.optimizer.update(name="adamw", base_learning_rate=1.5e-4, lr_scaling="linear", weight_decay=0.1,
                         exclude_bias_and_norm=False, warmup_epochs=40.0, b1=0.9, b2=0.999,
                         groups=((PATCH_PROJECTION, dict(frozen=True)),))

  if imagenet:
    cfg.dataset = "imagenet2012"
    cfg.batch_size = 4096
    cfg.cache_dataset = False
    config_lib.imagenet_eval(cfg)
    # main_lincls.py: SGD momentum 0.9 (not Nesterov), no weight decay, batch 1024, 90 epochs, cosine,
    # lr x B/256 (0.1 for ResNet; --lr=3 for ViT, CONFIG.md l.144).
    cfg.eval.paper_linear.update(epochs=(90.0,), batch_size=1024, weight_decay=0.0, nesterov=False,
                                 base_learning_rate=0.1 if resnet else 3.0, lr_scaling="linear")
    if "resnet50" in variants:
      cfg.num_epochs = 100.0
      cfg.method.temperature = 1.0
      cfg.optimizer.update(base_learning_rate=0.6, weight_decay=1e-6)
    else:
      cfg.num_epochs = 300.0
  else:
    cfg.dataset = "cifar10"
    cfg.batch_size = 256
    cfg.num_epochs = 1000.0
    if resnet:
      cfg.method.temperature = 0.2
      cfg.optimizer.update(base_learning_rate=0.3, weight_decay=1e-6)
    config_lib.cifar10_eval(cfg)

  if "tiny" in variants:
    config_lib.apply_tiny(cfg)
  return cfg
