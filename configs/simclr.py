r"""SimCLR (Chen et al. 2020, arXiv:2002.05709).

Variants (combine a dataset variant with `tiny`):

* `imagenet` -- ResNet-50 (1x), batch 4096, LARS lr 0.3 x B/256 = 4.8, weight decay 1e-6, 10 warm-up
  epochs then cosine, temperature 0.1, 2-layer projection head 2048 -> 128, colour strength 1.0, blur
  p=0.5, 1000 epochs. Reproduces SimCLR Table 6, "SimCLR (ours) ResNet-50", linear evaluation top-1
  69.3 (top-5 89.0) on ImageNet (the released checkpoint scores 69.1). Evaluation defaults are SimCLR's:
  linear head (Nesterov SGD, batch 4096, lr 1.6, 90 epochs), 1% / 10% fine-tuning (Table 7: top-5 75.5 /
  87.8 for ResNet-50), `python -m ssl_jax.evaluate --workdir=W --protocol=linear|semi|finetune`. With --config.num_epochs=100 it
  is the README's default run (about 64.5 top-1 after the README's linear evaluation):
      python -m ssl_jax.main --config=configs/simclr.py:imagenet \
          --config.data_dir=gs://BUCKET/tensorflow_datasets --workdir=gs://BUCKET/simclr_r50
* `cifar10` -- ResNet-18 with the CIFAR stem, the CIFAR-10 recipe of the official SimCLR README (batch
  512, LARS lr 1.0 x B/256, weight decay 1e-6, temperature 0.5, colour strength 0.5 and no blur as in
  SimCLR appendix B.9, 1000 epochs). The README's linear head on it gives about 91% CIFAR-10 top-1:
      python -m ssl_jax.main --config=configs/simclr.py:cifar10 --config.data_dir=DIR --workdir=W
* `tiny` -- ResNet-18 at width 16 (0.7M parameters), for CPU smoke runs and tests.
"""

from ssl_jax import config as config_lib


def get_config(arg=None):
  variants = config_lib.parse_variants(arg, known={"imagenet", "cifar10", "tiny"}, default="cifar10")
  cfg = config_lib.base_config("simclr")
  cfg.normalize_inputs = False  # the SimCLR code feeds [0, 1] pixels

  if "imagenet" in variants:
    cfg.dataset = "imagenet2012"
    cfg.batch_size = 4096
    cfg.num_epochs = 1000.0
    cfg.cache_dataset = False
    cfg.shuffle_buffer = 50_000
    cfg.model.update(depth=50, cifar_stem=False)
    cfg.optimizer.update(name="lars", base_learning_rate=0.3, lr_scaling="linear", weight_decay=1e-6,
                         warmup_epochs=10.0)
    cfg.method.update(temperature=0.1, proj_hidden_dim=2048, proj_dim=128, proj_layers=2)
    view = dict(crop_size=224, color_jitter_strength=1.0, blur_prob=0.5)
    config_lib.imagenet_eval(cfg)  # eval.* defaults are SimCLR's own ImageNet protocols
  else:
    cfg.dataset = "cifar10"
    cfg.batch_size = 512
    cfg.num_epochs = 1000.0
    cfg.model.update(depth=18, cifar_stem=True)
    cfg.optimizer.update(name="lars", base_learning_rate=1.0, lr_scaling="linear", weight_decay=1e-6,
                         warmup_epochs=10.0)
    cfg.method.update(temperature=0.5, proj_hidden_dim=2048, proj_dim=128, proj_layers=2)
    view = dict(crop_size=32, color_jitter_strength=0.5, blur_prob=0.0)
    config_lib.cifar10_eval(cfg)
  config_lib.add_view(cfg, "view", num=2, **view)

  if "tiny" in variants:
    config_lib.apply_tiny(cfg)
  return cfg
