r"""MAE (He et al. 2022, arXiv:2111.06377): the published pre-training command (PRETRAIN.md l.3-24) at each
model size (RECIPES.md section 9).

Variants (combine one with `tiny`):

* `vit_base` (alias `imagenet`) -- ViT-B/16, batch 4096, AdamW betas (0.9, 0.95), lr 1.5e-4 x B/256 after
  40 warm-up epochs, then cosine to 0, weight decay 0.05 (not on biases and norms), mask ratio 0.75,
  norm_pix_loss, random resized crop (scale 0.2-1, bicubic) and flip only, 1600 epochs (the released
  checkpoints, FINETUNE.md l.129; PRETRAIN.md's example runs 800). Reproduces the MAE paper's ViT-B rows:
  83.6 top-1 fine-tuned on ImageNet (Table 3 / FINETUNE.md: 83.664 for the released checkpoint) and 68.0
  linear (FINETUNE.md, the paper's TF number; 67.8 in PyTorch):
      python -m ssl_jax.main --config=configs/mae.py:vit_base \
          --config.data_dir=gs://BUCKET/tensorflow_datasets --workdir=gs://BUCKET/mae_vitb
      python -m ssl_jax.evaluate --workdir=gs://BUCKET/mae_vitb --protocol=finetune
      python -m ssl_jax.evaluate --workdir=gs://BUCKET/mae_vitb --protocol=linear
  Both protocols are MAE's: fine-tuning as `finetune_recipe` below; the linear probe (main_linprobe.py)
  on the class token, BatchNorm without affine (eps 1e-6) before a classifier initialized with std 0.01,
  LARS lr 0.1 x B/256 at batch 16384, no weight decay, 10 warm-up epochs, 90 epochs.
* `vit_large` -- ViT-L/16, the same command: 85.9 fine-tuned (FINETUNE.md), 75.8 linear.
* `vit_huge` -- ViT-H/14: 86.9 fine-tuned (FINETUNE.md), 76.6 linear.
* `cifar10` (default) -- solo-learn's mae.yaml: ViT-S with patch 4 on 32x32 CIFAR-10 (6 heads), decoder
  512 wide, 8 blocks, 16 heads, mask 0.75, norm_pix_loss, AdamW lr 2e-4 x B/256 at batch 256, betas (0.9,
  0.95), weight decay 0.05, 10 warm-up epochs (solo-learn's warmup_cosine default), random resized crop
  0.08-1 and flip only ("reconstruction" augmentations), 1000 epochs. solo-learn publishes no CIFAR-10
  figure for MAE. Fine-tuning: the ViT-B recipe at batch 512.
      python -m ssl_jax.main --config=configs/mae.py:cifar10 --config.data_dir=DIR --workdir=W
* `tiny` -- the ViT's and the decoder's small sizes, for CPU runs and tests.

Deviations: float32 throughout (the official runs use AMP); the dataset's own mean and std normalize the
inputs, which are also the reconstruction targets (as MAE's, which reconstructs its normalized tensors).
Fine-tuning keeps the sin-cos position table fixed (timm's ViT makes it a parameter initialized from the
checkpoint, excluded from weight decay), and mixup / cutmix pair examples across the global batch (timm:
within each GPU's batch).
"""

from ssl_jax import config as config_lib


def finetune_recipe(p, arch: str) -> None:
  """MAE's end-to-end fine-tuning (FINETUNE.md l.63-80 and main_finetune.py; RECIPES.md section 9): AdamW
  (betas 0.9, 0.999) lr blr x B/256 with blr 5e-4 (ViT-B) or 1e-3 (ViT-L/H) at batch 1024, 5 warm-up epochs
  then cosine to min_lr 1e-6, weight decay 0.05 except 1-D parameters, the class token and the position
  embedding (util/lr_decay.py, no_weight_decay()), layer-wise decay 0.65 / 0.75 / 0.75, drop path 0.1 / 0.2
  / 0.3, 100 / 50 / 50 epochs; label smoothing 0.1, mixup 0.8 and cutmix 1.0 (switch 0.5, per batch),
  RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25; the global average of the patch tokens through a
  fresh LayerNorm (global_pool, fc_norm), the classifier initialized with std 2e-5."""
  large = arch != "vit_base"
  p.update(optimizer="adamw", base_learning_rate=1e-3 if large else 5e-4, lr_scaling="linear", batch_size=1024,
           epochs=(50.0 if large else 100.0,), warmup_epochs=5.0, end_learning_rate=1e-6, weight_decay=0.05,
           b1=0.9, b2=0.999, nesterov=False, exclude_bias_and_norm=True, no_decay_names=("cls_token", "pos_embed"),
           layer_decay=0.75 if large else 0.65,
           drop_path_rate={"vit_base": 0.1, "vit_large": 0.2, "vit_huge": 0.3}[arch],
           label_smoothing=0.1, mixup_alpha=0.8, cutmix_alpha=1.0, mixup_switch_prob=0.5, randaugment_layers=2,
           randaugment_magnitude=9.0, randaugment_magnitude_std=0.5, erase_prob=0.25, crop_scale=(0.08, 1.0),
           representation="gap", head_norm="layernorm", head_init_std=2e-5)


def get_config(arg=None):
  known = {"imagenet", "vit_base", "vit_large", "vit_huge", "cifar10", "tiny"}
  variants = config_lib.parse_variants(arg, known=known, default="cifar10")
  if "imagenet" in variants:  # the flagship ImageNet recipe
    variants = (variants - {"imagenet"}) | {"vit_base"}
  arch = next((a for a in ("vit_base", "vit_large", "vit_huge") if a in variants), None)
  cfg = config_lib.base_config("mae", model="vit")

  if arch:
    cfg.dataset = "imagenet2012"
    cfg.cache_dataset = False
    cfg.batch_size = 4096
    cfg.num_epochs = 1600.0
    cfg.model.update(arch=arch, patch_size=14 if arch == "vit_huge" else 16, image_size=224)
    cfg.optimizer.update(base_learning_rate=1.5e-4, warmup_epochs=40.0)
    crop_scale = (0.2, 1.0)
    config_lib.imagenet_eval(cfg)
    # main_linprobe.py / FINETUNE.md l.135-177: LARS lr 0.1 x B/256 at batch 16384, no weight decay, 10
    # warm-up epochs, 90 epochs (ViT-L/H: 50), the class token.
    cfg.eval.paper_linear.update(optimizer="lars", base_learning_rate=0.1, lr_scaling="linear",
                                 batch_size=16384, epochs=(90.0 if arch == "vit_base" else 50.0,),
                                 warmup_epochs=10.0, weight_decay=0.0, nesterov=False)
  else:
    cfg.dataset = "cifar10"
    cfg.batch_size = 256
    cfg.num_epochs = 1000.0
    cfg.model.update(arch="vit_small", patch_size=4, image_size=32)
    cfg.optimizer.update(base_learning_rate=2e-4, warmup_epochs=10.0)
    crop_scale = (0.08, 1.0)
    config_lib.cifar10_eval(cfg)
  # Fixed sin-cos position embeddings and MAE's initialization; no drop path in pre-training (models_mae.py
  # builds its blocks with timm's defaults).
  cfg.model.update(pos_embed="sincos", init="mae", representation="cls", drop_path_rate=0.0)
  # main_linprobe.py: BatchNorm1d(affine=False, eps=1e-6) + Linear with trunc_normal_(std=0.01).
  cfg.eval.paper_linear.update(head_norm="batchnorm", head_init_std=0.01)
  finetune_recipe(cfg.eval.finetune, arch or "vit_base")
  if not arch:
    cfg.eval.finetune.batch_size = 512  # CIFAR-10: the ViT-B recipe at the batch of the other protocols
  # main_pretrain.py l.166-180: timm's add_weight_decay (no decay on 1-D parameters and biases), AdamW
  # betas (0.9, 0.95); util/lr_sched.py: per-iteration linear warm-up from 0, half-cycle cosine to 0.
  cfg.optimizer.update(name="adamw", lr_scaling="linear", weight_decay=0.05, exclude_bias_and_norm=True,
                       b1=0.9, b2=0.95, end_learning_rate=0.0)
  # main_pretrain.py l.123-127: RandomResizedCrop(interpolation=3: bicubic) and flip, nothing else.
  config_lib.add_view(cfg, "view", crop_size=cfg.model.image_size, crop_scale=crop_scale, color_jitter_prob=0.0,
                      grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)

  if "tiny" in variants:
    config_lib.apply_tiny(cfg)
  return cfg
