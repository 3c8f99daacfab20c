r"""DINO (Caron et al. 2021, arXiv:2104.14294); the published runs' command lines (RECIPES.md section 8),
not main_dino.py's defaults (8 local crops, teacher temperature 0.04 without warm-up).

Variants (combine one with `tiny`):

* `vit_small` (alias `imagenet`) -- the official README's "boosted" ViT-S/16 run (l.185-202): 300 epochs, batch 1024,
  AdamW lr 0.0005 x B/256 after 10 warm-up epochs, cosine to 1e-6, weight decay cosine 0.04 -> 0.4 on
  weights only, per-parameter gradient clipping at 3.0, the last layer frozen for the first epoch,
  65536 prototypes with norm_last_layer false, teacher temperature 0.04 -> 0.07 over 30 epochs, student
  0.1, teacher momentum 0.996 -> 1, drop path 0.1 (student only), 2 global crops 224 (scale 0.4-1) and 8
  local crops 96 (scale 0.05-0.4). Reproduces README "ViT-S/16, 300 epochs, boosted": 73.3 k-NN / 76.0
  linear top-1 on ImageNet (k-NN: k=20, T 0.07 on the teacher; linear on the concatenated class tokens of
  the last 4 blocks, SGD lr 0.001 x B/256, batch 1024, 100 epochs):
      python -m ssl_jax.main --config=configs/dino.py:vit_small \
          --config.data_dir=gs://BUCKET/tensorflow_datasets --workdir=gs://BUCKET/dino_vits
      python -m ssl_jax.evaluate --workdir=gs://BUCKET/dino_vits --protocol=knn
      python -m ssl_jax.evaluate --workdir=gs://BUCKET/dino_vits --protocol=linear
* `vit_small_800ep` -- the released ViT-S/16 checkpoint's arguments as transcribed by a third party
  (UNVERIFIED against the original args.txt): 800 epochs, 10 local crops, global scale 0.25-1, local
  0.05-0.25, no gradient clipping, min lr 1e-5; DINO Table 2, row "ViT-S/16, DINO": 77.0 linear /
  74.5 k-NN (the README's released checkpoint).
* `vit_base8` -- ViT-B/8 with the transcribed ViT-B arguments (UNVERIFIED): batch 512, lr 0.00075, min lr
  2e-6, teacher temperature warm-up over 50 epochs, last layer frozen for 3 epochs, norm_last_layer true,
  10 local crops, 400 epochs; DINO Table 2, row "ViT-B/8, DINO": 80.1 linear / 77.4 k-NN (the linear
  figure uses the last block's class token with the average of its patch tokens; here the class token).
* `resnet50` -- the README's ResNet-50 command (l.204-208): SGD lr 0.03 x B/256, weight decay 1e-4
  constant, global crops 0.14-1, local 0.05-0.14, 100 epochs at batch 512, the code's defaults otherwise
  (teacher temperature 0.04, 8 local crops, clipping at 3.0). The released ResNet-50 (75.3
  linear / 67.5 k-NN) was trained with other arguments (batch 4080 over 80 GPUs, dino#133), so expect
  less from this command.
* `cifar10` (default) -- ViT-Ti/4 on 32x32 CIFAR-10 with the ViT recipe at batch 256, 4096 prototypes
  (solo-learn's CIFAR size), 2 global crops of 32 (0.4-1) and 6 local crops of 16 (0.05-0.4), no blur at
  this size, 1000 epochs, and the code's default teacher temperature 0.04 without warm-up (main_dino.py's
  help: "anything above 0.07 is unstable ... start with the default value of 0.04"; with the boosted
  0.04 -> 0.07 the small ViT of `cifar10,tiny` collapsed to the uniform output within 12 epochs on the
  embedded data). No published figure:
      python -m ssl_jax.main --config=configs/dino.py:cifar10 --config.data_dir=DIR --workdir=W
* `cifar10_resnet` -- solo-learn's dino.yaml on ResNet-18 (CIFAR stem): 2 crops only, 4096 prototypes,
  head 2048/256, teacher momentum 0.9995 -> 1, teacher temperature 0.07 without warm-up, LARS lr 0.3,
  weight decay 1e-6, no clipping, solo-learn's LARS (`lars_clip`: trust 0.02, clipped), 1000 epochs ->
  solo-learn's 89.52 CIFAR-10 top-1. The ResNets are torchvision's (no zero-init of the blocks' last BN).
  (The tiny variant does not learn in 12 epochs on the embedded data: it collapses to the uniform output
  within 120 steps at teacher temperature 0.07 or 0.04, with either LARS, at lr 0.03, with the full-size
  head or teacher momentum 0.996; with batch norm in the head it does not collapse (teacher entropy 5.07
  of 5.55) but ends below random init, kNN 23.6 against 24.7.)
* `cifar10_resnet_lightly` -- lightly's CIFAR-10 benchmark (docs/source/getting_started/benchmarks/
  cifar10_benchmark.py, DINOModel and dino_collate_fn) on ResNet-18 (CIFAR stem): head 512 -> 2048 (BN,
  GELU) -> 256 with 2048 weight-normed prototypes (norm frozen at 1, never frozen as a whole), teacher
  momentum 0.99 constant, teacher temperature 0.04 constant, student 0.1, center momentum 0.9, SGD lr 0.06
  x B/128 momentum 0.9 with weight decay 5e-4 on every parameter, cosine to 0 without warm-up or
  clipping, 2 global crops of 32 (scale 0.4-1, DINO's jitter, solarize 0.2 on the second), no local crops,
  no blur, 200 epochs at batch 128 -> lightly's 84.0 kNN top-1 (k=200, T 0.1, benchmarks.rst; RECIPES.md
  section 12). The recipe of the CIFAR-10 suite's DINO row (benchmarks/cifar10_suite.py):
      python -m ssl_jax.main --config=configs/dino.py:cifar10_resnet_lightly --config.data_dir=DIR --workdir=W
      python -m ssl_jax.evaluate --workdir=W --protocol=knn
* `tiny` -- the model's and the head's small sizes, for CPU runs and tests.

Deviations: float32 throughout (--use_fp16 is the code default; dino#58 traces NaNs to it); DINO's
learning-rate warm-up is np.linspace(0, peak, W) (utils.cosine_scheduler), ours peak * step / W: they
differ by a factor W / (W - 1) during the first W steps; the bicubic position-embedding interpolation of
96-px crops samples at the exact ratio (DINO adds 0.1 to the output size, l.174-194).
"""

from ssl_jax import config as config_lib

G = r"projector/last_layer/g"        # the prototypes' norms (weight_norm's g)
LAST_LAYER = r"projector/last_layer/.*"


def get_config(arg=None):
  known = {"imagenet", "vit_small", "vit_small_800ep", "vit_base8", "resnet50", "cifar10", "cifar10_resnet",
           "cifar10_resnet_lightly", "tiny"}
  variants = config_lib.parse_variants(arg, known=known, default="cifar10")
  if "imagenet" in variants:  # the flagship ImageNet recipe
    variants = (variants - {"imagenet"}) | {"vit_small"}
  resnet = bool(variants & {"resnet50", "cifar10_resnet", "cifar10_resnet_lightly"})
  imagenet = bool(variants & {"vit_small", "vit_small_800ep", "vit_base8", "resnet50"})
  cfg = config_lib.base_config("dino", model="resnet" if resnet else "vit")
  m = cfg.method

  # Recipe defaults of the published ViT runs (main_dino.py args + the README commands).
  batch, base_lr, min_lr, epochs, warmup = 1024, 0.0005, 1e-6, 300.0, 10.0
  m.update(out_dim=65536, norm_last_layer=False, warmup_teacher_temp=0.04, teacher_temp=0.07,
           warmup_teacher_temp_epochs=30, momentum_teacher=0.996, student_temp=0.1)
  global_scale, local_scale, num_local, clip, freeze_epochs = (0.4, 1.0), (0.05, 0.4), 8, 3.0, 1
  if "vit_small_800ep" in variants:
    epochs, min_lr, clip = 800.0, 1e-5, 0.0
    global_scale, local_scale, num_local = (0.25, 1.0), (0.05, 0.25), 10
  if "vit_base8" in variants:
    batch, base_lr, min_lr, epochs, freeze_epochs = 512, 0.00075, 2e-6, 400.0, 3
    m.update(warmup_teacher_temp_epochs=50, norm_last_layer=True)
    global_scale, local_scale, num_local, clip = (0.25, 1.0), (0.05, 0.25), 10, 0.0
  if "resnet50" in variants:
    # The rest at the code's defaults: teacher temperature 0.04 without warm-up, norm_last_layer true.
    batch, base_lr, epochs = 512, 0.03, 100.0
    global_scale, local_scale = (0.14, 1.0), (0.05, 0.14)
    m.update(teacher_temp=0.04, warmup_teacher_temp_epochs=0, norm_last_layer=True)
  if "cifar10" in variants:
    batch, epochs, num_local = 256, 1000.0, 6
    m.update(out_dim=4096, teacher_temp=0.04, warmup_teacher_temp_epochs=0)
  if "cifar10_resnet" in variants:
    batch, base_lr, min_lr, epochs, num_local, clip = 256, 0.3, 0.0, 1000.0, 0, 0.0
    m.update(out_dim=4096, hidden_dim=2048, bottleneck_dim=256, momentum_teacher=0.9995, teacher_temp=0.07,
             warmup_teacher_temp_epochs=0, norm_last_layer=True)
    global_scale = (0.08, 1.0)
  if "cifar10_resnet_lightly" in variants:
    batch, base_lr, min_lr, epochs, warmup, num_local, clip, freeze_epochs = 128, 0.12, 0.0, 200.0, 0.0, 0, 0.0, 0
    m.update(out_dim=2048, hidden_dim=2048, bottleneck_dim=256, head_layers=2, use_bn_in_head=True,
             momentum_teacher=0.99, momentum_teacher_end=0.99, teacher_temp=0.04, warmup_teacher_temp_epochs=0,
             norm_last_layer=True)

  if resnet:
    # torchvision's defaults (main_dino.py: torchvision_models.__dict__[args.arch](); solo-learn): no
    # zero-init of the blocks' last BN scales.
    cfg.model.update(depth=50 if imagenet else 18, cifar_stem=not imagenet, zero_init_residual=False)
  else:
    cfg.model.update(arch="vit_base" if "vit_base8" in variants else "vit_small" if imagenet else "vit_tiny",
                     patch_size=8 if "vit_base8" in variants else 16 if imagenet else 4,
                     image_size=224 if imagenet else 32, pos_embed="learned", init="dino", representation="cls",
                     drop_path_rate=0.1)

  groups = ((G, dict(frozen=True)),) if m.norm_last_layer else ()
  # The last layer is frozen (no update at all) during the first epochs (utils.cancel_gradients_last_layer).
  if freeze_epochs:
    groups += ((LAST_LAYER, dict(frozen_until_epoch=float(freeze_epochs))),)
  cfg.batch_size = batch
  cfg.num_epochs = epochs
  if "resnet50" in variants:
    cfg.optimizer.update(name="sgd", base_learning_rate=base_lr, weight_decay=1e-4, nesterov=False,
                         momentum=0.9)
  elif "cifar10_resnet_lightly" in variants:
    # lr 6e-2 x B/128 = 0.12 x B/256; torch SGD decays every parameter (the frozen g gets no update at all).
    cfg.optimizer.update(name="sgd", base_learning_rate=base_lr, weight_decay=5e-4, nesterov=False, momentum=0.9,
                         exclude_bias_and_norm=False)
  elif "cifar10_resnet" in variants:
    cfg.optimizer.update(name="lars_clip", base_learning_rate=base_lr, weight_decay=1e-6, trust_coefficient=0.02)
  else:
    cfg.optimizer.update(name="adamw", base_learning_rate=base_lr, weight_decay=0.04,
                         weight_decay_schedule="cosine", weight_decay_end=0.4, b1=0.9, b2=0.999)
  # min_lr is an absolute rate; end_learning_rate is scaled with the batch like the peak.
  cfg.optimizer.update(lr_scaling="linear", warmup_epochs=warmup,
                       end_learning_rate=min_lr * 256 / batch, clip_per_param=clip, groups=groups)

  # main_dino.py DataAugmentationDINO l.419-464: jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2, flip;
  # global 1 blur 1.0, global 2 blur 0.1 + solarize 0.2, locals blur 0.5 (no blur at 32x32).
  jitter = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, color_jitter_prob=0.8,
                grayscale_prob=0.2, color_jitter_impl="simclrv2")
  size, local_size = (224, 96) if imagenet else (32, 16)
  blur = (1.0, 0.1, 0.5) if imagenet else (0.0, 0.0, 0.0)
  config_lib.add_view(cfg, "global1", crop_size=size, crop_scale=global_scale, blur_prob=blur[0], **jitter)
  config_lib.add_view(cfg, "global2", crop_size=size, crop_scale=global_scale, blur_prob=blur[1],
                      solarize_prob=0.2, **jitter)
  if num_local:
    config_lib.add_view(cfg, "local", num=num_local, crop_size=local_size, crop_scale=local_scale,
                        blur_prob=blur[2], **jitter)

  if imagenet:
    cfg.dataset = "imagenet2012"
    cfg.cache_dataset = False
    config_lib.imagenet_eval(cfg)
    # eval_linear.py l.103-109, 256-270: SGD momentum 0.9, no weight decay, lr 0.001 x B/256, cosine,
    # 100 epochs, batch 1024; ViT-S: the class tokens of the last 4 blocks.
    cfg.eval.paper_linear.update(epochs=(100.0,), batch_size=1024, base_learning_rate=0.001,
                                 lr_scaling="linear", weight_decay=0.0, nesterov=False)
    if not resnet and "vit_base8" not in variants:
      cfg.eval.paper_linear.representation = "cls_last4"
  else:
    cfg.dataset = "cifar10"
    config_lib.cifar10_eval(cfg)

  if "tiny" in variants:
    config_lib.apply_tiny(cfg)
  return cfg
