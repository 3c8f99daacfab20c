"""python -m ssl_jax.evaluate --workdir=DIR --protocol=knn|linear|finetune|semi [--checkpoint=latest|STEP]
[--config.key=value ...]

Several protocols run in one launch with --protocol=knn,linear,...: the checkpoint is restored and the
devices set up once, and kNN and the fast linear probe share one feature extraction per encoder.

The config is the one the run saved (DIR/config.json); --config.key=value overrides it, e.g.
--config.data_dir=... when the data moved, or --config.eval.knn_k='(20,)'.

Published checkpoints (PyTorch) are evaluated with the same protocols:

python -m ssl_jax.evaluate --import=FILE --import_format=NAME --config=configs/<method>.py:<variant>
    --workdir=DIR --protocol=... [--config.key=value ...]

--config is required with --import: it names the encoder's architecture (which must match the file's:
e.g. configs/moco_v2.py:imagenet for MoCo v2's ResNet-50, configs/dino.py:vit_small for DINO's ViT-S/16,
--config.model.width_multiplier=2 for SimCLR's ResNet-50 (2x)), the dataset, the input normalization and
the protocols' settings, exactly as for a checkpoint of our own; a ViT's position embedding is the file's
table (model.pos_embed=learned), resized bicubically when the file's patch grid differs from the config's
model.image_size. DIR only receives the results (DIR/eval/<protocol>_import-XXXXXXXX.json, rows of
DIR/eval/results.md, resumable runs under DIR/eval/checkpoints/), named by the first 8 hex digits of the
file's SHA-256. NAME (ssl_jax/torch_names.py, IMPORT_FORMATS):
  torchvision  torchvision's ResNet state dict (e.g. the supervised resnet50-*.pth); fc dropped
  timm         a timm ResNet or ViT state dict (.pth / .bin / .safetensors); the classifier dropped
  moco         MoCo v1/v2 training checkpoint: state_dict, module.encoder_q.* (fc / MLP head dropped)
  mocov3       MoCo v3 checkpoint: state_dict, module.base_encoder.* (ResNet-50 or ViT; head dropped)
  dino         DINO backbone (timm / torchvision names), or the `teacher` of a training checkpoint
               (backbone.*; DINO's head dropped)
  mae          MAE checkpoint: `model`, timm names; the encoder only (decoder and mask token dropped)
  simclr       SimCLR v1 converted by tonylins/simclr-converter: state_dict, torchvision names
Inputs are prepared as the config says (configs/simclr.py feeds [0, 1] pixels, as SimCLR's weights
expect; the others normalize by the ImageNet mean and std, as torchvision, MoCo, DINO and MAE do). An
unknown format, a missing, empty or unreadable file, or weights of another architecture (the first
missing, unexpected or misshaped keys named) is one line on stderr and exit code 2, before any data is
read. Reading .pt / .pth files needs torch (CPU build); .safetensors files do not.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from ssl_jax import distributed
from ssl_jax import host_memory
from ssl_jax.evaluate import workdir as workdir_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "training workdir holding config.json and checkpoints "
                               "(with --import: where the results are written)")
_PROTOCOL = flags.DEFINE_string("protocol", "knn", f"one of {', '.join(workdir_lib.PROTOCOLS.names())}, or several "
                                "separated by commas")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", "'latest' or a step number")
_IMPORT = flags.DEFINE_string("import", None, "a PyTorch weights file to evaluate instead of a checkpoint "
                              "(needs --import_format and --config)")
_IMPORT_FORMAT = flags.DEFINE_string("import_format", None, "the --import file's format: torchvision, timm, moco, "
                                     "mocov3, dino, mae or simclr")
distributed.define_flags()


def main(argv):
  if len(argv) > 1:
    distributed.exit_with_error(f"unexpected arguments: {' '.join(argv[1:])}")
  distributed.hold_library_logs()
  imported, cfg = None, flags.FLAGS.config
  with distributed.user_errors_exit(workdir=_WORKDIR.value):
    protocols = workdir_lib.parse_protocols(_PROTOCOL.value)
    if _IMPORT.value:
      if not _IMPORT_FORMAT.value:
        distributed.exit_with_error("--import needs --import_format (torchvision, timm, moco, mocov3, dino, mae "
                                    "or simclr)")
      if cfg is None:
        distributed.exit_with_error("--import needs --config=configs/<method>.py[:variant]: the encoder's "
                                    "architecture, the data and the protocols' settings")
      cfg = workdir_lib.import_config(cfg)
      imported = workdir_lib.load_import(cfg, _IMPORT.value, _IMPORT_FORMAT.value)
    elif _IMPORT_FORMAT.value:
      distributed.exit_with_error("--import_format is for --import=FILE")
    distributed.initialize_from_flags()
    from ssl_jax import parallel
    from ssl_jax.evaluate import run  # TensorFlow, orbax: after the cheap checks
    for protocol in protocols:  # every protocol's input, before the first one's work
      run.check_inputs(_WORKDIR.value, protocol, cfg)
    if not imported:
      run.find_checkpoint(_WORKDIR.value, cfg, _CHECKPOINT.value)
    distributed.release_library_logs()  # the input is checked: the libraries may log again
    # Cached features only serve a second protocol (at ImageNet scale a split's features are gigabytes).
    encoder = run.Encoder(cfg, parallel.make_mesh(), cache_features=len(protocols) > 1)
    outs = [run.evaluate(_WORKDIR.value, protocol, _CHECKPOINT.value, cfg=cfg, imported=imported, encoder=encoder)
            for protocol in protocols]
  for out in outs:
    for name, metrics in out["results"].items():
      print(f"{name:12s} {out['protocol']} top-1 {100 * run.headline(out['protocol'], metrics):6.2f}%  "
            + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))


if __name__ == "__main__":
  host_memory.reexec_with_huge_pages()  # XLA:CPU's step buffers on huge pages (CPU speed only)
  workdir = workdir_lib.flag_from_argv(sys.argv, "workdir")
  if not workdir:
    print("error: --workdir is required: a training workdir (holding config.json and checkpoints/), or with "
          "--import the directory for the results", file=sys.stderr)
    sys.exit(2)
  with distributed.user_errors_exit():
    if workdir_lib.flag_from_argv(sys.argv, "import"):
      # The encoder comes from outside: its architecture, data and protocols from --config.
      config_flags.DEFINE_config_file("config", None, "configs/<method>.py[:variant]")
    else:
      # The config comes from the workdir, so it must be read before flags are parsed to allow overrides.
      config_flags.DEFINE_config_dict("config", workdir_lib.load_config(workdir))
  app.run(main, flags_parser=distributed.parse_flags_or_exit)
