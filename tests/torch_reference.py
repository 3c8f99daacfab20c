"""Reference PyTorch encoders for the export / import parity tests, written here in plain torch.

torchvision and timm cannot be installed beside the pinned CPU torch (PyPI's torchvision fails to import
next to it, and timm needs torchvision), so these modules stand in for them: the same module names,
structure and computation as torchvision's ResNet (conv1, bn1, relu, maxpool, layer1..4 of
BasicBlock / Bottleneck blocks with conv1/bn1/conv2/bn2[/conv3/bn3] and downsample.0/.1, avgpool; stride on
the 3x3 convolution, ResNet v1.5) and timm's VisionTransformer (patch_embed.proj, cls_token, pos_embed,
blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm; LayerNorm eps 1e-6, exact GELU,
qkv bias). A state dict that loads into these with strict=True loads into torchvision's resnet18/50
(with fc = Identity) and timm's vit_* (num_classes=0).
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes: int, planes: int, stride: int = 1):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU()
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = _downsample(inplanes, planes, stride)

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes: int, planes: int, stride: int = 1):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU()
    self.downsample = _downsample(inplanes, planes * 4, stride)

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def _downsample(inplanes: int, outplanes: int, stride: int):
  if stride == 1 and inplanes == outplanes:
    return None
  return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride, bias=False), nn.BatchNorm2d(outplanes))


RESNET_STAGES = {18: ((2, 2, 2, 2), BasicBlock), 50: ((3, 4, 6, 3), Bottleneck)}


class ResNet(nn.Module):
  """torchvision's ResNet trunk (fc omitted: it returns the pooled features). width: channels of the first
  stage (64 in torchvision; every stage scales with it, as tonylins/simclr-converter's resnet_wider).
  cifar_stem: the documented variant of ssl_jax.export: conv1 = Conv2d(3, width, 3, 1, 1), maxpool =
  Identity."""

  def __init__(self, depth: int, width: int = 64, cifar_stem: bool = False):
    super().__init__()
    stages, block = RESNET_STAGES[depth]
    if cifar_stem:
      self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    else:
      self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU()
    self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(3, 2, 1)
    inplanes = width
    for i, num_blocks in enumerate(stages):
      planes = width * 2**i
      layers = []
      for j in range(num_blocks):
        layers.append(block(inplanes, planes, 2 if i > 0 and j == 0 else 1))
        inplanes = planes * block.expansion
      setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
    self.avgpool = nn.AdaptiveAvgPool2d(1)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return torch.flatten(self.avgpool(x), 1)


class PatchEmbed(nn.Module):
  def __init__(self, patch_size: int, dim: int):
    super().__init__()
    self.proj = nn.Conv2d(3, dim, patch_size, patch_size)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)   # [n, tokens, dim], tokens row-major


class Attention(nn.Module):
  def __init__(self, dim: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    self.qkv = nn.Linear(dim, 3 * dim, bias=True)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    n, tokens, dim = x.shape
    head_dim = dim // self.num_heads
    q, k, v = self.qkv(x).reshape(n, tokens, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * head_dim**-0.5).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(n, tokens, dim))


class Mlp(nn.Module):
  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU()
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
  def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, num_heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
  """timm's VisionTransformer with class token, learned position embedding table for `grid` x `grid`
  patches, no head (num_classes=0): forward returns the class token after the final norm. Inputs of
  another size get the table resized bicubically (align_corners=False), as timm's dynamic_img_size and
  DINO's interpolate_pos_encoding do."""

  def __init__(self, patch_size: int, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0,
               grid: int = 14):
    super().__init__()
    self.patch_size = patch_size
    self.patch_embed = PatchEmbed(patch_size, dim)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
    self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-6)

  def _pos_embed(self, h: int, w: int):
    grid = int(round((self.pos_embed.shape[1] - 1) ** 0.5))
    if (h, w) == (grid, grid):
      return self.pos_embed
    patches = self.pos_embed[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    patches = nn.functional.interpolate(patches, size=(h, w), mode="bicubic", align_corners=False)
    return torch.cat([self.pos_embed[:, :1], patches.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)

  def forward_features(self, x):
    """[n, 1 + tokens, dim]: every token after the final norm."""
    n, _, h, w = x.shape
    pos = self._pos_embed(h // self.patch_size, w // self.patch_size)
    x = self.patch_embed(x)
    x = torch.cat([self.cls_token.expand(n, -1, -1), x], dim=1) + pos
    return self.norm(self.blocks(x))

  def forward(self, x):
    return self.forward_features(x)[:, 0]
