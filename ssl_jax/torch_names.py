"""Our encoders' variables <-> PyTorch state dicts: torchvision's ResNet names, timm's ViT names, the
official SSL checkpoints' prefixes, and the files (torch .pt/.pth, .safetensors). The one table that
export (ssl_jax/export.py) and import (python -m ssl_jax.evaluate --import) both read, so that exporting
then importing is the identity.

Layouts: a convolution kernel is HWIO here and OIHW in torch; a Dense kernel is [in, out] here and a
Linear weight [out, in] in torch; everything else (biases, norm scales, BN statistics, class token,
position embedding) is the same array. Names:

  ResNet (ssl_jax/models/resnet.py)          torchvision resnet18/34/50/101/152
  stem_conv/kernel                           conv1.weight
  stem_bn/{scale, bias, mean, var}           bn1.{weight, bias, running_mean, running_var}
  <Block>_k/Conv_i, BatchNorm_i              layer{s+1}.{j}.conv{i+1}, bn{i+1}   (block k = stage s, index j)
  <Block>_k/proj_conv, proj_bn               layer{s+1}.{j}.downsample.0, downsample.1
  (torch's num_batches_tracked: written as the checkpoint's step, ignored on import; fc: none)

  ViT (ssl_jax/models/vit.py)                timm VisionTransformer
  patch_embed/{kernel, bias}                 patch_embed.proj.{weight, bias}
  cls_token, pos_embed                       cls_token, pos_embed
  block_i/{norm1, attn/qkv, attn/proj,       blocks.i.{norm1, attn.qkv, attn.proj,
           norm2, mlp/fc1, mlp/fc2}                    norm2, mlp.fc1, mlp.fc2}.{weight, bias}
  norm/{scale, bias}                         norm.{weight, bias}

Nothing here imports torch at module level: torch is imported only to read or write a .pt/.pth file,
and .safetensors files are read and written by the small implementation below.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import struct
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ssl_jax.errors import UserError


class WeightsError(UserError, ValueError):
  """A weights file that cannot be read or does not fit the encoder; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Entry:
  ours: Tuple[str, ...]   # path in {"params": ..., "batch_stats": ...}
  theirs: str             # the torch state-dict name
  layout: str             # "conv" (HWIO <-> OIHW), "dense" ([in, out] <-> [out, in]) or "same"


def _to_torch(layout: str, x: np.ndarray) -> np.ndarray:
  if layout == "conv":
    return np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1)))
  if layout == "dense":
    return np.ascontiguousarray(x.T)
  return np.asarray(x)


def _from_torch(layout: str, x: np.ndarray) -> np.ndarray:
  if layout == "conv":
    return np.ascontiguousarray(np.transpose(x, (2, 3, 1, 0)))
  if layout == "dense":
    return np.ascontiguousarray(x.T)
  return np.asarray(x)


def _torch_shape(layout: str, shape: Sequence[int]) -> Tuple[int, ...]:
  shape = tuple(shape)
  if layout == "conv":
    return (shape[3], shape[2], shape[0], shape[1])
  if layout == "dense":
    return (shape[1], shape[0])
  return shape


def _flatten(tree: Mapping, prefix: Tuple[str, ...] = ()) -> Dict[Tuple[str, ...], Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def _unflatten(flat: Mapping[Tuple[str, ...], Any]) -> Dict[str, Any]:
  out: Dict[str, Any] = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_LN_NAMES = {"scale": "weight", "bias": "bias"}
_DENSE_NAMES = {"kernel": ("weight", "dense"), "bias": ("bias", "same")}


def resnet_entries(template: Mapping, stage_sizes: Sequence[int]) -> List[Entry]:
  """The entries of a batch-norm ResNet whose variables look like `template` ({"params", "batch_stats"}
  of ssl_jax.models.resnet.ResNet, arrays or shape structs)."""
  starts = np.cumsum([0, *stage_sizes])
  entries = []
  for path in _flatten(template):
    collection, *modules, leaf = path
    if modules[0] in ("stem_conv", "stem_bn"):
      torch_module = "conv1" if modules[0] == "stem_conv" else "bn1"
    else:
      block = int(re.fullmatch(r"\w+Block_(\d+)", modules[0]).group(1))
      stage = int(np.searchsorted(starts, block, side="right")) - 1
      where = f"layer{stage + 1}.{block - starts[stage]}"
      layer = modules[1]
      numbered = re.fullmatch(r"(\w*Conv|BatchNorm)_(\d+)", layer)
      if numbered:
        kind = "conv" if numbered.group(1).endswith("Conv") else "bn"
        torch_module = f"{where}.{kind}{int(numbered.group(2)) + 1}"
      elif layer in ("proj_conv", "proj_bn"):
        torch_module = f"{where}.downsample.{0 if layer == 'proj_conv' else 1}"
      else:
        raise ValueError(f"no torchvision name for ResNet variable {'/'.join(path)}")
    if leaf == "kernel":
      entries.append(Entry(path, f"{torch_module}.weight", "conv"))
    else:
      entries.append(Entry(path, f"{torch_module}.{_BN_NAMES[leaf]}", "same"))
  return entries


def vit_entries(template: Mapping) -> List[Entry]:
  """The entries of a ViT whose variables look like `template` (ssl_jax.models.vit.VisionTransformer with
  a learned position embedding)."""
  entries = []
  for path in _flatten(template):
    _, *modules, leaf = path
    if modules == [] and leaf in ("cls_token", "pos_embed"):
      entries.append(Entry(path, leaf, "same"))
    elif modules == ["patch_embed"]:
      entries.append(Entry(path, f"patch_embed.proj.{'weight' if leaf == 'kernel' else 'bias'}",
                           "conv" if leaf == "kernel" else "same"))
    elif modules == ["norm"]:
      entries.append(Entry(path, f"norm.{_LN_NAMES[leaf]}", "same"))
    elif modules and re.fullmatch(r"block_\d+", modules[0]):
      where = f"blocks.{modules[0].split('_')[1]}.{'.'.join(modules[1:])}"
      if modules[-1] in ("norm1", "norm2"):
        entries.append(Entry(path, f"{where}.{_LN_NAMES[leaf]}", "same"))
      else:
        name, layout = _DENSE_NAMES[leaf]
        entries.append(Entry(path, f"{where}.{name}", layout))
    else:
      raise ValueError(f"no timm name for ViT variable {'/'.join(path)}")
  return entries


def to_torch(variables: Mapping, entries: Sequence[Entry]) -> Dict[str, np.ndarray]:
  """{torch name: array in torch's layout}, in the order of `entries`."""
  flat = _flatten(variables)
  return {e.theirs: _to_torch(e.layout, np.asarray(flat[e.ours])) for e in entries}


def _names(names: Sequence[str], limit: int = 3) -> str:
  shown = ", ".join(names[:limit])
  return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def from_torch(state_dict: Mapping[str, np.ndarray], entries: Sequence[Entry], template: Mapping,
               resize: Optional[Dict[str, Callable[[np.ndarray, Tuple[int, ...]], Optional[np.ndarray]]]] = None,
               what: str = "the encoder") -> Dict[str, Any]:
  """Our variables (float32 numpy arrays, the structure of `template`) from a torch-named state dict.
  Raises WeightsError naming the first few missing, unexpected and misshaped keys. resize: {torch name:
  fn(array in torch layout, wanted torch shape) -> resized array or None}, for arrays whose size may
  legitimately differ (a ViT's position embedding)."""
  flat_template = _flatten(template)
  wanted = {e.theirs: e for e in entries}
  missing = [name for name in wanted if name not in state_dict]
  unexpected = [name for name in state_dict if name not in wanted]
  misshaped, out = [], {}
  for name, entry in wanted.items():
    if name not in state_dict:
      continue
    array = np.asarray(state_dict[name])
    shape = _torch_shape(entry.layout, np.shape(flat_template[entry.ours]))
    if array.shape != shape and resize and name in resize:
      array = resize[name](array, shape)
      if array is None:
        array = np.asarray(state_dict[name])
    if array.shape != shape:
      misshaped.append(f"{name} {tuple(array.shape)} (expected {shape})")
      continue
    out[entry.ours] = _from_torch(entry.layout, array.astype(np.float32))
  if missing or unexpected or misshaped:
    problems = [f"{label} {_names(names)}" for label, names in (
        ("missing keys", missing), ("unexpected keys", unexpected), ("misshaped", misshaped)) if names]
    raise WeightsError(f"the weights do not fit {what}: {'; '.join(problems)}")
  return _unflatten(out)


# --- .safetensors: an 8-byte little-endian header size, a JSON header {name: {dtype, shape, data_offsets}}
# (plus an optional "__metadata__" of strings), then the raw little-endian bytes of every tensor.
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
                       "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_SAFETENSORS_NAMES = {np.dtype(v).str: k for k, v in _SAFETENSORS_DTYPES.items()}


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Optional[Mapping[str, str]] = None):
  header: Dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
  offset, blobs = 0, []
  for name, array in tensors.items():
    array = np.asarray(array)   # tobytes() writes C order (ascontiguousarray would make a scalar 1-D)
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    blob = little.tobytes()
    header[name] = {"dtype": _SAFETENSORS_NAMES[np.dtype(little.dtype).str], "shape": list(array.shape),
                    "data_offsets": [offset, offset + len(blob)]}
    offset += len(blob)
    blobs.append(blob)
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)   # the format aligns the data to 8 bytes with spaces
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for blob in blobs:
      f.write(blob)
  os.replace(tmp, path)


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
  with open(path, "rb") as f:
    data = f.read()
  try:
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    base, out = 8 + size, {}
    for name, spec in header.items():
      if name == "__metadata__":
        continue
      dtype = _SAFETENSORS_DTYPES.get(spec["dtype"])
      if dtype is None:   # BF16 and friends: read as float32
        if spec["dtype"] != "BF16":
          raise ValueError(f"unsupported dtype {spec['dtype']} of {name}")
        start, end = spec["data_offsets"]
        raw = np.frombuffer(data[base + start:base + end], "<u2").astype(np.uint32) << 16
        out[name] = raw.view(np.float32).reshape(tuple(spec["shape"]))
        continue
      start, end = spec["data_offsets"]
      out[name] = np.frombuffer(data[base + start:base + end], np.dtype(dtype).newbyteorder("<")).reshape(tuple(
          spec["shape"])).copy()
    return out
  except (struct.error, ValueError, KeyError, TypeError) as e:
    raise WeightsError(f"{path} is not a readable .safetensors file ({type(e).__name__}: {e})")


def _torch_to_numpy(obj):
  """Nested dicts / lists of torch tensors -> the same with float32 / int numpy arrays."""
  import torch
  if isinstance(obj, torch.Tensor):
    t = obj.detach().cpu()
    return (t.float() if t.is_floating_point() else t).numpy()
  if isinstance(obj, Mapping):
    return {k: _torch_to_numpy(v) for k, v in obj.items()}
  return obj


def import_torch():
  """torch, or WeightsError saying how to get it (torch is needed only for .pt/.pth files)."""
  try:
    import torch
  except ImportError:
    raise WeightsError("torch is not installed: `pip install torch` (the CPU build is enough) to read or "
                       "write .pt/.pth files; .safetensors files need no torch")
  return torch


def read_weights_file(path: str) -> Dict[str, Any]:
  """The content of a weights file: a .safetensors file's tensors, or what torch.load returns of a .pt /
  .pth / .pth.tar file (loaded with weights_only=True: tensors, containers, numbers, strings and the
  argparse.Namespace the DINO and MAE training checkpoints hold), tensors as numpy arrays."""
  if not os.path.isfile(path):
    raise WeightsError(f"weights file {path} not found")
  if os.path.getsize(path) == 0:
    raise WeightsError(f"weights file {path} is empty")
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  torch = import_torch()
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      content = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for files it cannot read
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise WeightsError(f"cannot read {path} with torch.load(weights_only=True): {type(e).__name__}: {first}")
  if not isinstance(content, Mapping):
    raise WeightsError(f"{path} holds a {type(content).__name__}, not a state dict")
  return _torch_to_numpy(content)


def write_weights_file(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
  """.safetensors when `path` ends so (no torch needed), else torch.save of an ordered state dict."""
  if path.endswith(".safetensors"):
    write_safetensors(path, tensors, metadata)
    return
  torch = import_torch()
  import collections
  state_dict = collections.OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in tensors.items())
  tmp = f"{path}.tmp"
  torch.save(state_dict, tmp)
  os.replace(tmp, path)


# --- The official checkpoints: where each keeps the encoder's state dict and under which prefix.

def _entry(content: Mapping, key: str, fmt: str, path: str) -> Mapping:
  if key not in content or not isinstance(content[key], Mapping):
    raise WeightsError(f"{path} has no {key!r} entry (top-level keys: {_names(sorted(map(str, content)))}): "
                       f"not a --import_format={fmt} checkpoint")
  return content[key]


def _tensors(content: Mapping) -> Dict[str, np.ndarray]:
  return {k: v for k, v in content.items() if isinstance(v, np.ndarray)}


def _under(state: Mapping, prefix: str, fmt: str, path: str) -> Dict[str, np.ndarray]:
  """The keys that start with `prefix`, without it; the rest (other networks, queues) is not ours."""
  out = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
  if not out:
    raise WeightsError(f"no key of {path} starts with {prefix!r} (first keys: {_names(sorted(state))}): not a "
                       f"--import_format={fmt} checkpoint")
  return out


def _maybe(content: Mapping, key: str) -> Mapping:
  return content[key] if isinstance(content.get(key), Mapping) else content


def _torchvision(content, path):
  # torchvision's resnet50-*.pth: a plain state dict, with the supervised classifier fc.
  return _tensors(_maybe(content, "state_dict"))


def _timm(content, path):
  # timm's weights (pytorch_model.bin / model.safetensors): a plain state dict; some under "state_dict" or
  # "model".
  return _tensors(_maybe(_maybe(content, "state_dict"), "model"))


def _moco(content, path):
  # facebookresearch/moco main_lincls.py l.178-190: checkpoint["state_dict"], the query encoder under
  # "module.encoder_q." (encoder_k, the queue and the fc / MLP head are not kept).
  return _under(_tensors(_entry(content, "state_dict", "moco", path)), "module.encoder_q.", "moco", path)


def _mocov3(content, path):
  # facebookresearch/moco-v3 main_lincls.py l.169-183 (and convert_to_deit.py): checkpoint["state_dict"],
  # the base encoder under "module.base_encoder." (its projection head is "fc" for a ResNet, "head" for a
  # ViT; momentum_encoder and predictor are not kept).
  return _under(_tensors(_entry(content, "state_dict", "mocov3", path)), "module.base_encoder.", "mocov3", path)


def _dino(content, path):
  # facebookresearch/dino utils.py load_pretrained_weights: the released backbones (dino_vits16_pretrain.pth,
  # dino_resnet50_pretrain.pth) are plain state dicts with timm / torchvision names; a training checkpoint
  # (checkpoint.pth) holds the teacher under "teacher" with the multi-crop wrapper's "backbone." prefix (and
  # "module." when it was wrapped in DistributedDataParallel), beside its DINO head.
  state = _tensors(_maybe(content, "teacher"))
  state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
  if any(k.startswith("backbone.") for k in state):
    state = _under(state, "backbone.", "dino", path)
  return state


def _mae(content, path):
  # facebookresearch/mae main_finetune.py / main_linprobe.py: checkpoint["model"] with timm names; a
  # pre-training checkpoint also holds the decoder (decoder_*, mask_token), which is not the encoder.
  state = _tensors(_entry(content, "model", "mae", path))
  return {k: v for k, v in state.items() if not (k.startswith("decoder_") or k == "mask_token")}


def _simclr(content, path):
  # tonylins/simclr-converter convert.py: torch.save({"state_dict": model.state_dict()}) of its
  # resnet_wider ResNet-50 (1x, 2x, 4x), torchvision's names with every width scaled, plus the supervised fc.
  return _tensors(_maybe(content, "state_dict"))


@dataclasses.dataclass(frozen=True)
class ImportFormat:
  select: Callable[[Mapping, str], Dict[str, np.ndarray]]   # (file content, path) -> torch-named tensors
  models: Tuple[str, ...]                                   # model.name values it can hold
  heads: Tuple[str, ...]                                    # prefixes of classifier / projection heads, dropped
  description: str


IMPORT_FORMATS: Dict[str, ImportFormat] = {
    "torchvision": ImportFormat(_torchvision, ("resnet",), ("fc.",), "torchvision's ResNet state dict"),
    "timm": ImportFormat(_timm, ("resnet", "vit"), ("fc.", "head.", "head_drop.", "fc_norm."),
                         "a timm ResNet or ViT state dict"),
    "moco": ImportFormat(_moco, ("resnet",), ("fc.",), "MoCo v1/v2 checkpoint (module.encoder_q.*)"),
    "mocov3": ImportFormat(_mocov3, ("resnet", "vit"), ("fc.", "head."),
                           "MoCo v3 checkpoint (module.base_encoder.*)"),
    "dino": ImportFormat(_dino, ("resnet", "vit"), ("head.", "fc."),
                         "DINO backbone, or the teacher of a DINO training checkpoint"),
    "mae": ImportFormat(_mae, ("vit",), ("head.", "fc_norm."), "MAE checkpoint (model, encoder only)"),
    "simclr": ImportFormat(_simclr, ("resnet",), ("fc.",), "SimCLR v1 converted by tonylins/simclr-converter"),
}


def check_import_format(name: str) -> ImportFormat:
  if name not in IMPORT_FORMATS:
    raise WeightsError(f"unknown --import_format {name!r}; known: {', '.join(IMPORT_FORMATS)}")
  return IMPORT_FORMATS[name]


# --- Our encoders.

def entries_for(model_cfg, template: Mapping) -> List[Entry]:
  """The entries of the encoder of the `model.*` settings `model_cfg`, whose variables look like
  `template`. Raises WeightsError for an encoder with no torchvision / timm counterpart."""
  if model_cfg.name == "resnet":
    if model_cfg.norm != "batch":
      raise WeightsError(f"model.norm={model_cfg.norm!r} (CPC v2's layer-normalized ResNet) has no torchvision "
                         "counterpart: only batch-norm ResNets map to torchvision's names")
    from ssl_jax.models import resnet
    return resnet_entries(template, resnet.STAGES[model_cfg.depth][0])
  if model_cfg.name == "vit":
    return vit_entries(template)
  raise WeightsError(f"model.name={model_cfg.name!r} has no torchvision / timm counterpart")


def resize_pos_embed(array: np.ndarray, shape: Tuple[int, ...]) -> Optional[np.ndarray]:
  """A position-embedding table [1, 1 + G * G, D] resized to `shape` [1, 1 + g * g, D] by our bicubic
  interpolation (ssl_jax/models/vit.py, interpolate_pos_embed); None when the widths differ or the tables
  are not square grids with a class slot."""
  if array.ndim != 3 or len(shape) != 3 or array.shape[2] != shape[2] or array.shape[0] != 1:
    return None
  grid = math.isqrt(shape[1] - 1)
  if grid * grid != shape[1] - 1 or math.isqrt(array.shape[1] - 1) ** 2 != array.shape[1] - 1:
    return None
  from ssl_jax.models import vit
  return np.asarray(vit.interpolate_pos_embed(array.astype(np.float32), grid, grid))


def import_state_dict(state: Mapping[str, np.ndarray], fmt: str, model_cfg, template: Mapping) -> Dict[str, Any]:
  """Our variables from a torch-named state dict `state` of format `fmt`, for the encoder of `model_cfg`
  (its variables shaped like `template`): the format's heads and torch's num_batches_tracked counters
  dropped, a ViT position embedding of another grid resized."""
  spec = check_import_format(fmt)
  if model_cfg.name not in spec.models:
    raise WeightsError(f"--import_format={fmt} holds a {' or '.join(spec.models)}, the config builds "
                       f"model.name={model_cfg.name!r}: pass the config of that architecture")
  entries = entries_for(model_cfg, template)
  state = {k: v for k, v in state.items()
           if not k.endswith("num_batches_tracked") and not k.startswith(spec.heads)}
  return from_torch(state, entries, template, resize={"pos_embed": resize_pos_embed},
                    what=describe(model_cfg))


def load_import(path: str, fmt: str, model_cfg, template: Mapping) -> Dict[str, Any]:
  """Reads weights file `path` of import format `fmt` into our variables shaped like `template`."""
  spec = check_import_format(fmt)
  state = spec.select(read_weights_file(path), path)
  return import_state_dict(state, fmt, model_cfg, template)


def describe(model_cfg) -> str:
  """'a ResNet-50 (width 64, ImageNet stem)' / 'a ViT (vit_small, patch 16)', for messages."""
  if model_cfg.name == "resnet":
    width = model_cfg.width * model_cfg.width_multiplier
    return (f"the config's ResNet-{model_cfg.depth} (width {width}, "
            f"{'CIFAR' if model_cfg.cifar_stem else 'ImageNet'} stem)")
  return f"the config's ViT ({model_cfg.arch}, patch {model_cfg.patch_size})"
