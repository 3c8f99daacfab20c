r"""SwAV (Caron et al. 2020, arXiv:2006.09882).

Variants (combine a dataset variant with `tiny`):

* `imagenet` -- the official scripts/swav_800ep_pretrain.sh: ResNet-50, batch 4096, multi-crop 2 x 224
  (scale 0.14-1) + 6 x 96 (scale 0.05-0.14), LARS at 4.8 (0.3 x B/256) after 10 warm-up epochs from 0.3
  (--start_warmup, main_swav.py l.178-182), cosine to 0.0048, weight decay 1e-6 on every parameter, 3000 prototypes frozen for the first 313 iterations,
  epsilon 0.05, 3 Sinkhorn iterations, temperature 0.1, no queue, 800 epochs (RECIPES.md section 6).
  Reproduces SwAV Table 1, "SwAV" (ResNet-50): 75.3 linear top-1 on ImageNet (official README l.29), with
  the official linear protocol (eval_linear.py l.54-75: SGD lr 0.3, weight decay 1e-6, cosine, 100
  epochs, batch 256, centre-crop 224 of 256):
      python -m ssl_jax.main --config=configs/swav.py:imagenet \
          --config.data_dir=gs://BUCKET/tensorflow_datasets --workdir=gs://BUCKET/swav_r50
      python -m ssl_jax.evaluate --workdir=gs://BUCKET/swav_r50 --protocol=linear
* `imagenet_bs256` -- scripts/swav_400ep_bs256_pretrain.sh: the same at batch 256 with a queue of 3840
  embeddings per assignment crop from epoch 15, LARS at 0.6 without warm-up, cosine to 0.0006, prototypes
  frozen for 5005 iterations, 400 epochs; official README l.34: 74.3 linear top-1 (`--config=
  configs/swav.py:imagenet_bs256`, same commands).
* `cifar10` -- ResNet-18 with the CIFAR stem, solo-learn's swav.yaml: 2 crops of 32 (scale 0.08-1, no
  local crops), batch 256, LARS lr 0.6 (x B/256) after 10 warm-up epochs, cosine to 0, weight decay 1e-6
  (biases and norms excluded, solo-learn's exclude_bias_n_norm), projector 2048 -> 128, 3000 prototypes
  frozen for the first 2 epochs, a queue of 3840 from epoch 50, 1000 epochs; solo-learn reports 89.17
  CIFAR-10 top-1 with its LARS variant (trust 0.02, clipped), which this recipe does not copy, and with
  blur p 0.5 (its symmetric augmentations), which this recipe drops at 32x32 as the other CIFAR configs:
      python -m ssl_jax.main --config=configs/swav.py:cifar10 --config.data_dir=DIR --workdir=W
* `tiny` -- ResNet-18 at width 16, a 256 -> 32 head, 64 prototypes and (where the recipe has one) a queue
  of 2 batches, for CPU runs and tests.
* `hard` -- each code rounded to a one-hot (method.hard_codes), the official README's workaround for a run
  whose loss sits at log(K) from the start ("Common Issues": "switch to hard assignment"); not a paper
  row. `cifar10,tiny,hard` is benchmarks/cifar10_suite.py's SwAV: with soft codes the tiny model
  collapses to uniform codes within its 6-minute budget (docs/cifar10_suite.md).

Deviations from the official code:
* LARS here is SimCLR's (optim.build): the trust ratio eta |w| / |g + wd w| scales the update before the
  learning rate and the momentum trace accumulates the scaled step. SwAV's apex LARC (clip=False,
  main_swav.py l.171-177) uses eta |w| / (|g| + wd |w|) and then plain SGD, whose momentum accumulates the
  step before the learning rate multiplies it; the two differ while the learning rate changes.
* Float32 throughout (the official scripts train with apex fp16, --use_fp16 true); batch norm
  synchronized over all devices (the 800-epoch script: groups of 8 GPUs); the dataset's own mean and std
  normalize the inputs (the official code uses ImageNet's with a 0.228 typo for red).
* Steps per epoch are this library's fractional N / B, so "313 iterations" are 313 steps exactly and
  epoch-counted events (the queue start) happen at round(epoch x N / B).
"""

from ssl_jax import config as config_lib

# The prototypes' parameters (ssl_jax/methods/swav.py: params["prototypes"]["kernel"]).
PROTOTYPES = r"prototypes/.*"


def get_config(arg=None):
  variants = config_lib.parse_variants(arg, known={"imagenet", "imagenet_bs256", "cifar10", "tiny", "hard"},
                                       default="cifar10")
  cfg = config_lib.base_config("swav")
  # src/multicropdataset.py l.37-51, 64-95: torchvision ColorJitter(0.8, 0.8, 0.8, 0.2) (multiplicative
  # brightness: simclrv2) with p 0.8, grayscale 0.2, Gaussian blur (radius 0.1-2) p 0.5, flip, on every crop.
  jitter = dict(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, color_jitter_prob=0.8,
                grayscale_prob=0.2, color_jitter_impl="simclrv2")
  # src/resnet50.py: ResNet(zero_init_residual=False) by default, and main_swav.py does not set it;
  # solo-learn's CIFAR backbone is torchvision's ResNet-18, whose default is the same.
  cfg.model.zero_init_residual = False
  if variants & {"imagenet", "imagenet_bs256"}:
    cfg.dataset = "imagenet2012"
    cfg.cache_dataset = False
    cfg.model.update(depth=50, cifar_stem=False)
    # LARC over every parameter with weight decay 1e-6 on all of them (main_swav.py l.171-177).
    cfg.optimizer.update(name="lars", lr_scaling="linear", weight_decay=1e-6, trust_coefficient=1e-3,
                         momentum=0.9, exclude_bias_and_norm=False)
    if "imagenet_bs256" in variants:
      cfg.batch_size = 256
      cfg.num_epochs = 400.0
      cfg.optimizer.update(base_learning_rate=0.6, end_learning_rate=0.0006, warmup_epochs=0.0,
                           groups=((PROTOTYPES, dict(frozen_until_step=5005)),))
      cfg.method.update(queue_length=3840, queue_start_epoch=15.0)
    else:
      cfg.batch_size = 4096
      cfg.num_epochs = 800.0
      # 4.8 and 0.0048 at batch 4096 (the script's --base_lr / --final_lr are absolute rates).
      cfg.optimizer.update(base_learning_rate=4.8 * 256 / 4096, end_learning_rate=0.0048 * 256 / 4096,
                           warmup_start_learning_rate=0.3 * 256 / 4096, warmup_epochs=10.0,
                           groups=((PROTOTYPES, dict(frozen_until_step=313)),))
      cfg.method.queue_length = 0
    config_lib.add_view(cfg, "global", num=2, crop_size=224, crop_scale=(0.14, 1.0), blur_prob=0.5, **jitter)
    config_lib.add_view(cfg, "local", num=6, crop_size=96, crop_scale=(0.05, 0.14), blur_prob=0.5, **jitter)
    config_lib.imagenet_eval(cfg)
    cfg.eval.paper_linear.update(optimizer="sgd", base_learning_rate=0.3, lr_scaling="none", batch_size=256,
                                 epochs=(100.0,), weight_decay=1e-6, nesterov=False)
  else:
    cfg.dataset = "cifar10"
    cfg.batch_size = 256
    cfg.num_epochs = 1000.0
    cfg.model.update(depth=18, cifar_stem=True)
    cfg.optimizer.update(name="lars", base_learning_rate=0.6, lr_scaling="linear", weight_decay=1e-6,
                         warmup_epochs=10.0, exclude_bias_and_norm=True,
                         groups=((PROTOTYPES, dict(frozen_until_epoch=2.0)),))
    cfg.method.update(queue_length=3840, queue_start_epoch=50.0)
    config_lib.add_view(cfg, "view", num=2, crop_size=32, crop_scale=(0.08, 1.0), blur_prob=0.0, **jitter)
    config_lib.cifar10_eval(cfg)

  if "tiny" in variants:
    config_lib.apply_tiny(cfg)
  if "hard" in variants:
    cfg.method.hard_codes = True
  return cfg
