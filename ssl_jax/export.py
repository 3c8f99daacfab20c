"""python -m ssl_jax.export --workdir=DIR --format=torchvision|timm --out=FILE [--checkpoint=latest|STEP]
[--encoder=online|target] [--config.key=value ...]

Writes the encoder of a training run's checkpoint as a PyTorch state dict under the target library's names
and layouts (the mapping: ssl_jax/torch_names.py), as .safetensors when FILE ends so (no torch needed) and
with torch.save otherwise (.pt / .pth), then prints the model to instantiate:

- ResNets as torchvision's resnet18/34/50/101/152 state dict without `fc` (build the model, set
  `model.fc = torch.nn.Identity()`, load with strict=True: `model(x)` is our representation, the pooled
  features). The CIFAR stem (3x3 stride-1 conv1, no max-pool) is a variant: also set
  `model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False); model.maxpool = nn.Identity()`. `--format=timm`
  gives the same names (timm's resnet*). Widths other than 64 keep torchvision's names with every width
  scaled. CPC v2's layer-normalized ResNet (model.norm=layer) has no torchvision counterpart.
- ViTs as timm's VisionTransformer (`--format=timm`; class token, qkv bias, LayerNorm eps 1e-6, exact
  GELU, num_classes=0): `model(x)` is the class token after the final norm (our representation "cls").
  A fixed sin-cos position embedding is written as the `pos_embed` table it computes.

Which encoder: by default the one evaluation reads (ssl_jax/evaluate: DINO's teacher, the online encoder
of every other method); `--encoder=online|target` picks one for methods with a momentum / EMA network
(BYOL's and MoCo v3's target, MoCo v1/v2's key encoder, DINO's teacher). The config is the run's
config.json (its data directory must exist: the checkpoint's optimizer state is shaped by the data's
size); --config.key=value overrides it as in ssl_jax.evaluate. Bad input is one line on stderr and exit
code 2, before the checkpoint is read.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from ssl_jax import torch_names
from ssl_jax.torch_names import WeightsError

FORMATS = ("torchvision", "timm")
ENCODERS = ("online", "target")
# method_state entries holding a momentum / EMA copy of the network (DINO, BYOL / MoCo v3, MoCo v1/v2).
TARGET_ENTRIES = (("teacher_params", "teacher_batch_stats"), ("target_params", "target_batch_stats"),
                  ("key_params", "key_batch_stats"))
TIMM_VIT_NAMES = {"vit_tiny": "vit_tiny", "vit_small": "vit_small", "vit_base": "vit_base",
                  "vit_large": "vit_large", "vit_huge": "vit_huge"}


def check_request(model_cfg, fmt: str, out: str, encoder: str) -> None:
  """Raises WeightsError (one line) for an export that cannot be done; cheap (no JAX, no checkpoint)."""
  if fmt not in FORMATS:
    raise WeightsError(f"unknown --format {fmt!r}; known: {', '.join(FORMATS)}")
  if encoder and encoder not in ENCODERS:
    raise WeightsError(f"--encoder must be {' or '.join(ENCODERS)} (or empty: the one evaluation reads), got "
                       f"{encoder!r}")
  if not out:
    raise WeightsError("--out is required: FILE.safetensors, or FILE.pt / FILE.pth (torch.save)")
  parent = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(parent):
    raise WeightsError(f"the directory of --out={out} does not exist")
  if not os.access(parent, os.W_OK):
    raise WeightsError(f"cannot write in {parent} (--out={out})")
  if model_cfg.name == "vit" and fmt != "timm":
    raise WeightsError("a ViT exports as timm's VisionTransformer: pass --format=timm")
  torch_names.entries_for(model_cfg, {})   # CPC's layer-norm ResNet and unknown models: one line
  if not out.endswith(".safetensors"):
    torch_names.import_torch()


def with_position_table(model_cfg, variables: Mapping) -> Dict[str, Any]:
  """A ViT with a fixed sin-cos position embedding has no pos_embed parameter: the table it computes (class
  slot zero, ssl_jax/models/vit.py) is added, as timm's VisionTransformer has one."""
  if model_cfg.name != "vit" or model_cfg.pos_embed != "sincos":
    return dict(variables)
  from ssl_jax.models import vit
  embed_dim = vit._dims(model_cfg)[0]
  grid = model_cfg.image_size // model_cfg.patch_size
  table = np.concatenate([np.zeros((1, embed_dim), np.float32),
                          vit.sincos_2d(embed_dim, grid, grid, vit.SINCOS_ORDER[model_cfg.init])])[None]
  return {**variables, "params": {**variables["params"], "pos_embed": table}}


def state_dict(model_cfg, variables: Mapping, step: int = 0) -> Dict[str, np.ndarray]:
  """The torch state dict (numpy arrays, torch layouts) of the encoder `variables` ({"params",
  "batch_stats"}) of the `model.*` settings `model_cfg`. A ResNet's batch norms get torch's
  num_batches_tracked counter (the checkpoint's step)."""
  variables = with_position_table(model_cfg, jax_to_numpy(variables))
  tensors = torch_names.to_torch(variables, torch_names.entries_for(model_cfg, variables))
  if model_cfg.name == "resnet":
    for name in [n for n in tensors if n.endswith(".running_var")]:
      tensors[name[:-len("running_var")] + "num_batches_tracked"] = np.asarray(step, np.int64)
  return tensors


def jax_to_numpy(tree):
  import jax
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), dict(tree))


def select_encoder(method, state, encoder: str) -> Tuple[Dict[str, Any], str]:
  """(variables, "online" or "target"): `encoder` of the state, or the one evaluation reads when empty."""
  online = {"params": state.params["encoder"], "batch_stats": state.batch_stats.get("encoder", {})}
  target = None
  for params_key, stats_key in TARGET_ENTRIES:
    if params_key in state.method_state and "encoder" in state.method_state[params_key]:
      target = {"params": state.method_state[params_key]["encoder"],
                "batch_stats": state.method_state.get(stats_key, {}).get("encoder", {})}
      break
  if not encoder:
    evaluated = method.encoder_variables(state.params, state.batch_stats, state.method_state)
    encoder = "online" if evaluated["params"] is state.params["encoder"] else "target"
  if encoder == "target":
    if target is None:
      raise WeightsError(f"method {method.config.method.name!r} has no momentum / EMA target encoder: "
                         "pass --encoder=online")
    return target, "target"
  return online, "online"


def instructions(model_cfg, fmt: str, path: str) -> str:
  """How to load the file in PyTorch, for the message printed after an export."""
  load = (f"safetensors.torch.load_file({path!r})" if path.endswith(".safetensors")
          else f"torch.load({path!r})")
  if model_cfg.name == "resnet":
    width = model_cfg.width * model_cfg.width_multiplier
    name = f"resnet{model_cfg.depth}"
    build = (f"torchvision.models.{name}()" if fmt == "torchvision"
             else f"timm.create_model({name!r}, num_classes=0)")
    lines = [f"model = {build}"]
    if fmt == "torchvision":
      lines.append("model.fc = torch.nn.Identity()")
    if model_cfg.cifar_stem:
      lines.append(f"model.conv1 = torch.nn.Conv2d(3, {width}, 3, 1, 1, bias=False); "
                   "model.maxpool = torch.nn.Identity()   # the CIFAR stem")
    note = ("" if width == 64 else
            f"  (width {width}: torchvision's names with every width scaled, not a torchvision size: build "
            "the same ResNet with these widths)")
    lines.append(f"model.load_state_dict({load}); model.eval()   # model(x): our representation{note}")
    return "\n".join(lines)
  embed_dim, depth, num_heads = _vit_dims(model_cfg)
  grid = model_cfg.image_size
  build = (f"timm.models.vision_transformer.VisionTransformer(img_size={grid}, patch_size={model_cfg.patch_size}, "
           f"embed_dim={embed_dim}, depth={depth}, num_heads={num_heads}, mlp_ratio={model_cfg.mlp_ratio}, "
           "qkv_bias=True, num_classes=0, global_pool='token')")
  from ssl_jax.models import vit
  if (embed_dim, depth, num_heads) == vit.ARCHS.get(model_cfg.arch) and model_cfg.mlp_ratio == 4.0 and \
      model_cfg.arch in TIMM_VIT_NAMES:
    build = (f"timm.create_model('{TIMM_VIT_NAMES[model_cfg.arch]}_patch{model_cfg.patch_size}_224', "
             f"num_classes=0, img_size={grid})")
  reading = {"cls": "model(x)", "mean": "model.forward_features(x)[:, 1:].mean(1)",
             "gap": "the mean of the last block's patch tokens, before model.norm",
             "cls_last4": "the class tokens of the last 4 blocks, each through model.norm, concatenated"}
  return (f"model = {build}\nmodel.load_state_dict({load}); model.eval()   # our representation "
          f"({model_cfg.representation!r}): {reading[model_cfg.representation]}")


def _vit_dims(model_cfg):
  from ssl_jax.models import vit
  return vit._dims(model_cfg)


def export(workdir: str, fmt: str, out: str, checkpoint: str = "latest", encoder: str = "",
           cfg=None) -> Dict[str, Any]:
  """Writes the encoder of `workdir`'s checkpoint to `out`; returns {"step", "encoder", "tensors",
  "instructions"}."""
  from ssl_jax import parallel
  from ssl_jax.evaluate import run
  from ssl_jax.evaluate.workdir import load_config
  cfg = load_config(workdir) if cfg is None else cfg
  check_request(cfg.model, fmt, out, encoder)
  step = run.find_checkpoint(workdir, cfg, checkpoint)
  model = run.Encoder(cfg, parallel.make_mesh())
  state, step = model.restore_latest(workdir) if checkpoint == "latest" else (model.restore(workdir, step), step)
  variables, chosen = select_encoder(model.method, state, encoder)
  tensors = state_dict(cfg.model, variables, step)
  metadata = {"format": "pt", "ssl_jax_method": cfg.method.name, "ssl_jax_step": str(step),
              "ssl_jax_encoder": chosen, "ssl_jax_model": torch_names.describe(cfg.model)}
  torch_names.write_weights_file(out, tensors, metadata)
  return {"step": step, "encoder": chosen, "tensors": len(tensors), "method": cfg.method.name,
          "instructions": instructions(cfg.model, fmt, out)}


def main() -> None:
  from absl import flags

  from ssl_jax import distributed
  from ssl_jax.evaluate import workdir as workdir_lib

  workdir_flag = flags.DEFINE_string("workdir", None, "training workdir holding config.json and checkpoints")
  format_flag = flags.DEFINE_string("format", "torchvision", f"one of {', '.join(FORMATS)}")
  out_flag = flags.DEFINE_string("out", None, "FILE.safetensors, or FILE.pt / .pth (torch.save)")
  checkpoint_flag = flags.DEFINE_string("checkpoint", "latest", "'latest' or a step number")
  encoder_flag = flags.DEFINE_string("encoder", "", "online or target (momentum / EMA network); empty: the "
                                     "encoder evaluation reads (DINO: its teacher)")

  def run_export(argv):
    if len(argv) > 1:
      distributed.exit_with_error(f"unexpected arguments: {' '.join(argv[1:])}")
    distributed.hold_library_logs()
    with distributed.user_errors_exit(workdir=workdir_flag.value):
      cfg = flags.FLAGS.config
      check_request(cfg.model, format_flag.value, out_flag.value, encoder_flag.value)
      out = export(workdir_flag.value, format_flag.value, out_flag.value, checkpoint_flag.value,
                   encoder_flag.value, cfg=cfg)
    print(f"wrote {out_flag.value}: {out['tensors']} tensors, the {out['encoder']} encoder of {out['method']} "
          f"at step {out['step']} ({torch_names.describe(cfg.model)}). In PyTorch:\n{out['instructions']}")

  workdir_lib.run_with_workdir_config(run_export)


if __name__ == "__main__":
  main()
