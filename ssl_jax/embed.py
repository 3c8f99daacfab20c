"""python -m ssl_jax.embed --workdir=W --images=DIR --out=FILE.npz|FILE.csv [--checkpoint=latest|STEP]
[--skip_bad] [--config.key=value ...]

Writes the representation of every image below DIR (JPEG, PNG, BMP, GIF; flat or in class folders) as the
run in W computes it for evaluation (the method's own representation; DINO's teacher): the evaluation's
centre crop at the training data's evaluation size, normalized with the training data's mean and std.
  .npz: file_name [n] (paths relative to DIR, sorted), features float32 [n, d], and label [n] with
        class_names when DIR has class folders;
  .csv: a header `file_name,f0,...,f{d-1}` and one row per image.
Runs on every device of the host (or of every host with --coordinator_address etc., as training);
progress every 30 s. Restoring the run reads its config: when its training data moved, pass
--config.data_dir=... (the data's size fixes parts of some methods' state, e.g. InstDisc's memory bank).
"""

from __future__ import annotations

import os

from absl import flags

from ssl_jax import distributed
from ssl_jax.errors import UserError
from ssl_jax.evaluate import workdir as workdir_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "training workdir holding config.json and checkpoints")
_IMAGES = flags.DEFINE_string("images", None, "a directory of images (flat or in class folders)")
_OUT = flags.DEFINE_string("out", None, "the file to write: .npz or .csv")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", "'latest' or a step number")
_SKIP_BAD = flags.DEFINE_bool("skip_bad", False, "leave out (and count) files that are not decodable images")
distributed.define_flags()

FORMATS = (".npz", ".csv")


class EmbedError(UserError, ValueError):
  """Bad input to the embed command; the message is one line."""


def check_out(out: str) -> None:
  if not out:
    raise EmbedError("--out is required: the .npz or .csv file to write")
  if not out.endswith(FORMATS):
    raise EmbedError(f"--out must end with {' or '.join(FORMATS)}, got {out}")
  parent = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
    raise EmbedError(f"cannot write {out}: {parent} is not a writable directory")


def folder_config(cfg, images: str, skip_bad: bool):
  """The config that reads `images` as a folder dataset with the evaluation transform of the training
  data of `cfg` (its crop size, centre crop, mean and std)."""
  from ssl_jax.data import datasets
  trained = cfg.folder if cfg.dataset == "folder" else datasets.get(cfg.dataset)
  out = cfg.copy_and_resolve_references()
  out.dataset, out.data_dir = "folder", images
  out.folder.image_size = int(trained.image_size)
  out.folder.eval_crop_proportion = float(trained.eval_crop_proportion)
  out.folder.mean, out.folder.std = tuple(trained.mean), tuple(trained.std)
  out.folder.skip_bad = skip_bad
  return out


def write(out: str, file_names, features, labels=None, class_names=()) -> None:
  """Writes the embeddings whole to a temporary file, then renames it: an existing FILE is replaced only
  by a complete one."""
  import numpy as np
  tmp = f"{out}.tmp{os.getpid()}{os.path.splitext(out)[1]}"
  try:
    if out.endswith(".npz"):
      arrays = {"file_name": np.asarray(file_names), "features": features.astype(np.float32)}
      if labels is not None:
        arrays.update(label=labels, class_names=np.asarray(class_names))
      np.savez(tmp, **arrays)
    else:
      with open(tmp, "w") as f:
        f.write(",".join(["file_name"] + [f"f{i}" for i in range(features.shape[1])]) + "\n")
        for name, row in zip(file_names, features):
          quoted = '"' + name.replace('"', '""') + '"' if any(c in name for c in ',"\n') else name
          f.write(quoted + "," + ",".join(f"{v:.7g}" for v in row) + "\n")
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def embed(workdir: str, images: str, out: str, checkpoint: str = "latest", cfg=None, skip_bad: bool = False):
  """Writes `out` and returns (file names, features [n, d]). Every input check runs first."""
  import jax
  from ssl_jax import parallel
  from ssl_jax.data import pipeline
  from ssl_jax.evaluate import features as features_lib
  from ssl_jax.evaluate import run
  check_out(out)
  if not images or not os.path.isdir(images):
    raise EmbedError(f"--images={images} is not a directory (a folder of images)")
  cfg = workdir_lib.load_config(workdir) if cfg is None else cfg
  image_cfg = folder_config(cfg, images, skip_bad)
  builder = pipeline.builder_of(image_cfg)  # indexes the folder: an empty or damaged one fails here
  step = run.find_checkpoint(workdir, cfg, checkpoint)
  distributed.release_library_logs()
  encoder = run.Encoder(cfg, parallel.make_mesh())
  state, step = encoder.restore_latest(workdir) if checkpoint == "latest" else (encoder.restore(workdir, step), step)
  variables = encoder.encoder_variables(state)
  features, labels = features_lib.extract(image_cfg, lambda x: encoder._represent(variables, x), "all",
                                          encoder.mesh, cfg.eval.batch_size)
  names = builder.file_names("all")
  if jax.process_index() == 0:
    write(out, names, features, labels if builder.class_names else None, builder.class_names)
    print(f"wrote {len(names)} embeddings of dimension {features.shape[1]} (step {step} of {workdir}) to {out}"
          + (f"; left out {builder.skipped} damaged files" if builder.skipped else ""), flush=True)
  return names, features


def main(argv):
  if len(argv) > 1:
    distributed.exit_with_error(f"unexpected arguments: {' '.join(argv[1:])}")
  distributed.hold_library_logs()
  with distributed.user_errors_exit(workdir=_WORKDIR.value):
    check_out(_OUT.value)
    if not _IMAGES.value or not os.path.isdir(_IMAGES.value):
      raise EmbedError(f"--images={_IMAGES.value} is not a directory (a folder of images)")
    distributed.initialize_from_flags()
    embed(_WORKDIR.value, _IMAGES.value, _OUT.value, _CHECKPOINT.value, cfg=flags.FLAGS.config,
          skip_bad=_SKIP_BAD.value)


if __name__ == "__main__":
  workdir_lib.run_with_workdir_config(main)
