"""Export to PyTorch: the exported state dicts load with strict=True into torchvision-/timm-named torch
modules (tests/torch_reference.py, plain torch: torchvision and timm cannot be installed beside the pinned
torch) and compute our features (relative 1e-4, inference mode); the CLI on a workdir; bad input."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import REPO
from ssl_jax import export, models, torch_names

torch = pytest.importorskip("torch")
import torch_reference  # noqa: E402


def model_cfg(**settings):
  m = models.default_config(settings.get("name", "resnet"))
  m.update(settings)
  return m


def random_variables(m, size, seed=0):
  """Our encoder's variables with every array moved off its init (BN statistics included)."""
  module = models.build(m)
  variables = jax.jit(lambda x: module.init(jax.random.key(seed), x, train=False))(jnp.zeros((1, size, size, 3)))
  rng = np.random.default_rng(seed)
  # Kernels keep their (variance-preserving) init; norm scales, biases and statistics move off 1 / 0.
  moved = lambda a: a if a.ndim > 1 else np.abs(a * rng.uniform(0.8, 1.2, a.shape) + rng.uniform(0.01, 0.1, a.shape))
  return module, jax.tree.map(lambda a: moved(np.asarray(a)).astype(np.float32), dict(variables))


def relative_error(ours, theirs):
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def load_strict(module, tensors):
  module.load_state_dict({k: torch.as_tensor(np.asarray(v)) if isinstance(v, np.ndarray) else v
                         for k, v in tensors.items()}, strict=True)
  return module.eval()


@pytest.mark.parametrize("depth,cifar_stem,size", [(18, True, 32), (18, False, 64), (50, False, 64)])
def test_resnet_export_matches_torchvision_structure(depth, cifar_stem, size, tmp_path):
  m = model_cfg(depth=depth, cifar_stem=cifar_stem)
  module, variables = random_variables(m, size)
  tensors = export.state_dict(m, variables, step=7)
  if depth == 18:   # through the file (ResNet-50's 100 MB only in memory: the suite's time)
    path = str(tmp_path / "resnet.safetensors")
    torch_names.write_safetensors(path, tensors)
    tensors = torch_names.read_safetensors(path)
  assert not any(k.startswith("fc.") for k in tensors) and int(tensors["bn1.num_batches_tracked"]) == 7
  reference = load_strict(torch_reference.ResNet(depth, cifar_stem=cifar_stem), tensors)
  x = np.random.default_rng(1).normal(size=(2, size, size, 3)).astype(np.float32)
  ours = np.asarray(jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x))
  with torch.no_grad():
    theirs = reference(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  assert relative_error(ours, theirs) < 1e-4


@pytest.mark.parametrize("arch,pos_embed", [("vit_small", "learned"), ("vit_base", "sincos")])
def test_vit_export_matches_timm_structure(arch, pos_embed, tmp_path):
  # image_size 32 with patch 16: a 2x2 table; inputs of 48 px get it resized bicubically on both sides.
  m = model_cfg(name="vit", arch=arch, image_size=32, pos_embed=pos_embed, init="moco_v3")
  module, variables = random_variables(m, 32)
  tensors = export.state_dict(m, variables)
  if arch == "vit_small":   # through a torch file (ViT-B's 340 MB only in memory: the suite's time)
    path = str(tmp_path / "vit.pt")
    torch_names.write_weights_file(path, tensors, {})
    tensors = torch.load(path)
  dim, depth, heads = models.vit.ARCHS[arch]
  reference = load_strict(torch_reference.VisionTransformer(16, dim, depth, heads, grid=2), tensors)
  x = np.random.default_rng(1).normal(size=(2, 48, 48, 3)).astype(np.float32)
  ours = np.asarray(jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x))
  with torch.no_grad():
    theirs = reference(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  assert relative_error(ours, theirs) < 1e-4


def test_vit_base_at_224_has_timm_names():
  """The names and shapes of a full ViT-B/16 at 224 px (shapes only: jax.eval_shape)."""
  m = model_cfg(name="vit", arch="vit_base")
  module = models.build(m)
  shapes = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), jnp.zeros((1, 224, 224, 3)))
  entries = torch_names.entries_for(m, dict(shapes))
  names = {e.theirs: torch_names._torch_shape(e.layout, torch_names._flatten(shapes)[e.ours].shape) for e in entries}
  assert names["pos_embed"] == (1, 197, 768) and names["patch_embed.proj.weight"] == (768, 3, 16, 16)
  assert names["blocks.11.attn.qkv.weight"] == (2304, 768) and names["blocks.11.mlp.fc2.weight"] == (768, 3072)
  assert len(names) == 4 + 12 * 12 + 2


def test_round_trip_is_the_identity():
  """(A ResNet's round trip through a .safetensors file: test_import.py.)"""
  for m, size in ((model_cfg(depth=18, width=8), 32), (model_cfg(name="vit", arch="vit_tiny", depth=2, image_size=32), 32)):
    module, variables = random_variables(m, size)
    tensors = export.state_dict(m, variables)
    back = torch_names.import_state_dict(tensors, "timm", m, variables)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(back)):
      np.testing.assert_array_equal(a, b)


def test_bad_export_requests_are_one_line():
  cpc = model_cfg(norm="layer")
  with pytest.raises(torch_names.WeightsError, match="CPC"):
    export.check_request(cpc, "torchvision", "/tmp/x.safetensors", "")
  with pytest.raises(torch_names.WeightsError, match="--format=timm"):
    export.check_request(model_cfg(name="vit"), "torchvision", "/tmp/x.safetensors", "")
  with pytest.raises(torch_names.WeightsError, match="unknown --format"):
    export.check_request(model_cfg(), "onnx", "/tmp/x.safetensors", "")


def test_export_cli_on_a_dino_workdir(tmp_path):
  """A DINO tiny state saved as a checkpoint: export writes the teacher by default (not the online
  encoder); the CLI refuses a ViT as torchvision in one line (exit 2)."""
  from ssl_jax import checkpoint as ckpt_lib
  from ssl_jax import config as config_lib
  from ssl_jax import parallel
  from ssl_jax.data.datasets import EMBEDDED_DATA_DIR
  from ssl_jax.evaluate import run
  cfg = config_lib.load(f"{REPO}/configs/dino.py:cifar10,tiny")
  cfg.update(data_dir=EMBEDDED_DATA_DIR, total_steps=2)
  cfg = config_lib.resolve(cfg, 4000)
  encoder = run.Encoder(cfg, parallel.make_mesh())
  state = encoder.initial_state
  teacher = jax.tree.map(lambda a: a + 1.0, state.method_state["teacher_params"])
  state = state.replace(method_state=dict(state.method_state, teacher_params=teacher))
  ckpt_lib.Manager(str(tmp_path), cfg).save(2, state)
  ckpt_lib.write_json_atomic(str(tmp_path / "config.json"), cfg.to_dict())
  out = tmp_path / "dino.safetensors"
  info = export.export(str(tmp_path), "timm", str(out), cfg=config_lib.with_defaults(cfg.to_dict()))
  assert (info["encoder"], info["step"]) == ("target", 2) and "VisionTransformer(" in info["instructions"]
  tensors = torch_names.read_safetensors(str(out))
  np.testing.assert_array_equal(tensors["cls_token"], np.asarray(teacher["encoder"]["cls_token"]))
  m = ml_collections.ConfigDict(cfg.model.to_dict())
  online = export.state_dict(m, {"params": state.params["encoder"], "batch_stats": {}})
  assert not np.array_equal(online["cls_token"], tensors["cls_token"])
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run([sys.executable, "-m", "ssl_jax.export", f"--workdir={tmp_path}", "--format=torchvision",
                         f"--out={out}"], cwd=REPO, env=env, text=True, capture_output=True, timeout=300)
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert proc.returncode == 2 and len(errors) == 1 and "--format=timm" in errors[0], proc.stderr[-2000:]


def test_exported_checkpoint_evaluates_the_same_after_import(tmp_path):
  """End to end: a checkpoint (SimCLR tiny, every array moved off its init) exported as torchvision
  .safetensors, then `python -m ssl_jax.evaluate --import` on that file, gives the checkpoint's own kNN
  figures on the embedded data, and writes them where the docs say."""
  import glob
  import json
  from ssl_jax import checkpoint as ckpt_lib
  from ssl_jax import config as config_lib
  from ssl_jax import parallel
  from ssl_jax.data.datasets import EMBEDDED_DATA_DIR
  from ssl_jax.evaluate import run
  cfg = config_lib.load(f"{REPO}/configs/simclr.py:cifar10,tiny")
  cfg.update(data_dir=EMBEDDED_DATA_DIR, total_steps=2)
  cfg.eval.update(baselines=False, knn_k=(20,))
  cfg = config_lib.resolve(cfg, 4000)
  encoder = run.Encoder(cfg, parallel.make_mesh())
  _, moved = random_variables(cfg.model, 32, seed=1)
  state = encoder.with_encoder(encoder.initial_state, moved)
  ckpt_lib.Manager(str(tmp_path / "run"), cfg).save(2, state)
  ckpt_lib.write_json_atomic(str(tmp_path / "run" / "config.json"), cfg.to_dict())
  own = run.evaluate(str(tmp_path / "run"), "knn", cfg=cfg, encoder=encoder, write=False)["results"]["ssl"]
  out = tmp_path / "r18.safetensors"
  export.export(str(tmp_path / "run"), "torchvision", str(out), cfg=config_lib.with_defaults(cfg.to_dict()))
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run(
      [sys.executable, "-m", "ssl_jax.evaluate", f"--import={out}", "--import_format=torchvision",
       f"--config={REPO}/configs/simclr.py:cifar10,tiny", f"--config.data_dir={EMBEDDED_DATA_DIR}",
       "--config.eval.baselines=False", "--config.eval.knn_k=(20,)", f"--workdir={tmp_path / 'imported'}",
       "--protocol=knn"], cwd=REPO, env=env, text=True, capture_output=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  [path] = glob.glob(str(tmp_path / "imported" / "eval" / "knn_import-*.json"))
  with open(path) as f:
    imported = json.load(f)["results"]["ssl"]
  assert imported["knn_top1_k20"] > 0.15  # the moved weights still see something (10 classes: chance 0.1)
  for key, value in own.items():
    if isinstance(value, float):
      assert abs(imported[key] - value) <= 1e-3, (key, imported[key], value)
  assert "import-" in (tmp_path / "imported" / "eval" / "results.md").read_text()
