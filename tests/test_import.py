"""Import of official checkpoints: state dicts laid out as each release lays them out (prefixes, top-level
keys, heads and other networks beside the encoder), built from the torch modules of tests/torch_reference.py
and saved with torch.save (nothing is downloaded), load into our encoders, which then compute the torch
module's features; bad input is one line (exit code 2)."""

import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from conftest import REPO
from ssl_jax import models, torch_names
from ssl_jax.evaluate import workdir as workdir_lib

torch = pytest.importorskip("torch")
import torch_reference  # noqa: E402


def config(**model):
  m = models.default_config(model.get("name", "resnet"))
  m.update(model)
  return workdir_lib.import_config(ml_collections.ConfigDict({"model": m.to_dict()}))


def filled(module, seed=0):
  """The torch module with every parameter and BN statistic drawn at random (statistics positive)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in module.state_dict().items():
      if t.is_floating_point():
        scale = 0.1 if t.ndim > 1 else 0.3
        t.copy_(torch.randn(t.shape, generator=gen) * scale + (1.0 if name.endswith("running_var") else 0.0)).abs_() \
            if name.endswith(("running_var", "bn1.weight")) else t.copy_(torch.randn(t.shape, generator=gen) * scale)
  return module.eval()


def assert_same_features(cfg, variables, reference, size):
  x = np.random.default_rng(3).normal(size=(2, size, size, 3)).astype(np.float32)
  ours = np.asarray(models.build(cfg.model).apply(variables, x, train=False))
  with torch.no_grad():
    theirs = reference(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  assert float(np.abs(ours - theirs).max() / np.abs(theirs).max()) < 1e-4


def resnet_checkpoint(fmt, sd):
  """The file layout of each release around the ResNet's torchvision-named state dict `sd`."""
  head = {"fc.weight": torch.zeros(10, 4), "fc.bias": torch.zeros(10)}
  if fmt == "torchvision":
    return {**sd, **head}
  if fmt == "moco":      # moco main_moco.py save_checkpoint: state_dict of the DDP-wrapped MoCo model
    mlp = {"module.encoder_q.fc.0.weight": torch.zeros(4, 4), "module.encoder_q.fc.2.weight": torch.zeros(4, 4)}
    return {"epoch": 200, "arch": "resnet50", "state_dict": {
        **{f"module.encoder_q.{k}": v for k, v in sd.items()}, **mlp,
        **{f"module.encoder_k.{k}": v for k, v in sd.items()}, "module.queue": torch.zeros(4, 8)}}
  if fmt == "mocov3":
    return {"state_dict": {**{f"module.base_encoder.{k}": v for k, v in sd.items()},
                           "module.base_encoder.fc.0.weight": torch.zeros(4, 4),
                           **{f"module.momentum_encoder.{k}": v for k, v in sd.items()},
                           "module.predictor.0.weight": torch.zeros(4, 4)}}
  if fmt == "dino":      # a training checkpoint's DDP-wrapped teacher (ResNets have BN: DDP), beside its head
    return {"student": {}, "teacher": {**{f"module.backbone.{k}": v for k, v in sd.items()},
                                       "module.head.mlp.0.weight": torch.zeros(4, 4)}, "epoch": 3}
  if fmt == "simclr":    # simclr-converter convert.py
    return {"state_dict": {**sd, **head}}
  raise ValueError(fmt)


@pytest.mark.parametrize("fmt", ["torchvision", "moco", "mocov3", "dino", "simclr"])
def test_resnet_checkpoints_import_with_parity(fmt, tmp_path):
  reference = filled(torch_reference.ResNet(18, width=8))
  path = tmp_path / "ckpt.pth.tar"
  torch.save(resnet_checkpoint(fmt, reference.state_dict()), path)
  cfg = config(depth=18, width=8)
  imported = workdir_lib.load_import(cfg, str(path), fmt)
  assert imported["label"].startswith("import-") and len(imported["label"]) == 15
  assert_same_features(cfg, imported["variables"], reference, 64)


def vit_checkpoint(fmt, sd):
  if fmt == "mocov3":
    return {"state_dict": {**{f"module.base_encoder.{k}": v for k, v in sd.items()},
                           "module.base_encoder.head.0.weight": torch.zeros(4, 4)}}
  if fmt == "mae":       # a pre-training checkpoint: encoder and decoder under "model", plus the args
    return {"model": {**sd, "mask_token": torch.zeros(1, 1, 8), "decoder_embed.weight": torch.zeros(8, 64)},
            "args": __import__("argparse").Namespace(model="mae_vit_base_patch16"), "epoch": 799}
  if fmt == "dino":      # a released backbone: a plain state dict
    return dict(sd)
  raise ValueError(fmt)


@pytest.mark.parametrize("fmt", ["mocov3", "mae", "dino"])
def test_vit_checkpoints_import_with_parity_and_resized_position_table(fmt, tmp_path):
  """The file's table is for a 4x4 grid (64 px), the config's for 2x2 (32 px): resized bicubically on
  import, as the torch module resizes it at run time."""
  reference = filled(torch_reference.VisionTransformer(16, 64, 2, 4, mlp_ratio=2.0, grid=4))
  path = tmp_path / "ckpt.pth"
  torch.save(vit_checkpoint(fmt, reference.state_dict()), path)
  cfg = config(name="vit", arch="vit_tiny", embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0, image_size=32,
               pos_embed="sincos", init="mae")
  imported = workdir_lib.load_import(cfg, str(path), fmt)
  assert imported["variables"]["params"]["pos_embed"].shape == (1, 5, 64)
  assert_same_features(cfg, imported["variables"], reference, 32)


def test_timm_safetensors_round_trip_through_export(tmp_path):
  """export's state dict, written as .safetensors, imports back to the same variables (no torch read)."""
  from ssl_jax import export
  cfg = config(depth=18, width=8, cifar_stem=True)
  module = models.build(cfg.model)
  variables = jax.tree.map(np.asarray, dict(module.init(jax.random.key(1), np.zeros((1, 32, 32, 3)), train=False)))
  path = str(tmp_path / "r18.safetensors")
  torch_names.write_safetensors(path, export.state_dict(cfg.model, variables))
  back = workdir_lib.load_import(cfg, path, "timm")["variables"]
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b)


def test_bad_imports_are_one_line(tmp_path):
  cfg = config(depth=18, width=8)
  with pytest.raises(torch_names.WeightsError, match="unknown --import_format 'swav'"):
    workdir_lib.load_import(cfg, "x.pth", "swav")
  empty = tmp_path / "empty.pth"
  empty.write_bytes(b"")
  with pytest.raises(torch_names.WeightsError, match="is empty"):
    workdir_lib.load_import(cfg, str(empty), "torchvision")
  junk = tmp_path / "junk.pth"
  junk.write_bytes(b"not a checkpoint")
  with pytest.raises(torch_names.WeightsError, match="cannot read"):
    workdir_lib.load_import(cfg, str(junk), "torchvision")
  with pytest.raises(torch_names.WeightsError, match="has no 'state_dict' entry"):
    torch.save({"model": {}}, tmp_path / "m.pth")
    workdir_lib.load_import(cfg, str(tmp_path / "m.pth"), "moco")
  with pytest.raises(torch_names.WeightsError, match="holds a vit"):
    workdir_lib.load_import(cfg, str(tmp_path / "m.pth"), "mae")


def test_wrong_architecture_cli_exits_2_naming_the_keys(tmp_path):
  """A ResNet-50 file with a ResNet-18 config: one line naming missing / unexpected keys, exit code 2."""
  torch.save(torch_reference.ResNet(18, width=8).state_dict(), tmp_path / "r18.pth")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run(
      [sys.executable, "-m", "ssl_jax.evaluate", f"--import={tmp_path / 'r18.pth'}", "--import_format=torchvision",
       f"--config={REPO}/configs/simclr.py:imagenet", f"--workdir={tmp_path / 'out'}", "--protocol=knn"],
      cwd=REPO, env=env, text=True, capture_output=True, timeout=300)
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
  assert "do not fit the config's ResNet-50" in errors[0] and "missing keys layer1.0." in errors[0]
  assert "misshaped conv1.weight (8, 3, 7, 7) (expected (64, 3, 7, 7))" in errors[0] or "misshaped" in errors[0]
  assert not (tmp_path / "out").exists()
