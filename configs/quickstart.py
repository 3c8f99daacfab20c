r"""The quickstart run (README command 1): SimCLR with a small ResNet-18 on the CIFAR-10 subset embedded in
the repository (4,000 train / 1,000 test images), sized to finish with its evaluation within 15 minutes on
2 CPU cores:
    make quickstart        # = python -m ssl_jax.quickstart --workdir=workdirs/quickstart
On the full CIFAR-10, one epoch (README: kNN 45.1 vs 30.0 for random init, linear 46.2 vs 35.1; 21.5
minutes here):
    python -m ssl_jax.quickstart --workdir=workdirs/quickstart_full --config.dataset=cifar10 \
        --config.data_dir=../shared/data/tfds --config.num_epochs=1 --config.optimizer.warmup_epochs=0.1 \
        --config.checkpoint_every_steps=195 --config.shuffle_buffer=50000
Not a paper row: a CPU-budget demonstration that pre-training beats a random encoder and raw pixels.
"""

from ssl_jax import config as config_lib
from ssl_jax.data.datasets import EMBEDDED_DATA_DIR


def get_config(arg=None):
  config_lib.parse_variants(arg, known={"default"}, default="default")
  cfg = config_lib.base_config("simclr")
  cfg.dataset = "cifar10"
  cfg.data_dir = EMBEDDED_DATA_DIR
  cfg.normalize_inputs = False
  cfg.batch_size = 128
  cfg.num_epochs = 12.0
  cfg.log_every_steps = 10
  cfg.checkpoint_every_steps = 100
  cfg.keep_checkpoints = 100  # every checkpoint is a point of the kNN curve
  cfg.shuffle_buffer = 4000
  # conv_impl="patches": the CPU kernel-gradient rewrite (same numbers, about 2x faster on XLA:CPU). Not
  # "winograd": at width 16 its narrow matmuls only level with "patches" (SimCLR step, batch 128, two
  # alternated runs: 136 and 146 images/s against 133 and 119) and it compiles three times slower (22 s
  # against 7.5; `python benchmarks/simclr_step.py --width 16 --batch_size 128 --steps 5 --no_torch
  # --rounds 2`).
  cfg.model.update(depth=18, width=16, cifar_stem=True, conv_impl="patches")
  cfg.optimizer.update(name="lars", base_learning_rate=1.0, lr_scaling="linear", weight_decay=1e-6,
                       warmup_epochs=1.0)
  # Temperature 0.2 (solo-learn's SimCLR CIFAR setting) rather than the SimCLR README's CIFAR 0.5: with
  # this short schedule it gave kNN 38.3 against 35.8 at step 375 (same run otherwise; README).
  cfg.method.update(temperature=0.2, proj_hidden_dim=512, proj_dim=128, proj_layers=2)
  config_lib.add_view(cfg, "view", num=2, crop_size=32, color_jitter_strength=0.5, blur_prob=0.0)
  return cfg
