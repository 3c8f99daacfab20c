"""What a view recipe may set, and the defaults (no TensorFlow here: configs import it, and so do the
entry points' checks that run before the input pipeline is loaded; the ops are in augment.py)."""

from typing import Any, Dict, Mapping

# Defaults are SimCLR's ImageNet view (Chen et al. 2020, Appendix A) except the blur, which is off so that
# the defaults also suit CIFAR (SimCLR uses blur_prob 0.5 on ImageNet, 0 on CIFAR-10).
VIEW_DEFAULTS: Dict[str, Any] = {
    "crop_size": 224,                   # side of the square output
    "crop_scale": (0.08, 1.0),          # range of the crop's area as a fraction of the image area
    "crop_ratio": (3 / 4, 4 / 3),       # range of the crop's aspect ratio (width / height)
    "flip_prob": 0.5,
    "color_jitter_prob": 0.8,
    "brightness": 0.4,
    "contrast": 0.4,
    "saturation": 0.4,
    "hue": 0.1,
    "color_jitter_strength": None,      # s: if set, (b, c, s, h) = (0.8s, 0.8s, 0.8s, 0.2s), SimCLR App. A
    "color_jitter_impl": "simclrv2",    # "simclrv2": multiplicative brightness, "simclrv1": additive
    "grayscale_prob": 0.2,
    "blur_prob": 0.0,
    "blur_sigma": (0.1, 2.0),
    "solarize_prob": 0.0,
    "solarize_threshold": 0.5,
    # Supervised fine-tuning's train view (MAE: timm rand-m9-mstd0.5-inc1, re_prob 0.25); off by default.
    "randaugment_layers": 0,            # ops per image; 0 turns RandAugment off
    "randaugment_magnitude": 9.0,       # in [0, 10]
    "randaugment_magnitude_std": 0.5,   # per-op magnitude ~ N(magnitude, std), clipped to [0, 10]
    "erase_prob": 0.0,                  # random erasing after normalization, per-pixel N(0, 1) noise
}

JITTER_IMPLS = ("simclrv1", "simclrv2")
RANDAUGMENT_MAX_MAGNITUDE = 10.0  # randaugment.py's scale: magnitudes lie in [0, 10]


def resolve_view(view: Mapping) -> Dict[str, Any]:
  """VIEW_DEFAULTS overridden by `view`, validated; raises ValueError on unknown keys or bad values."""
  cfg = dict(VIEW_DEFAULTS)
  for key in view.keys():
    if key not in VIEW_DEFAULTS:
      raise ValueError(f"unknown view key {key!r}; known keys: {', '.join(sorted(VIEW_DEFAULTS))}")
    cfg[key] = view[key]
  for key in ("crop_scale", "crop_ratio", "blur_sigma"):
    lo, hi = (float(x) for x in cfg[key])
    if not 0 < lo <= hi:
      raise ValueError(f"view key {key!r} must be a range (lo, hi) with 0 < lo <= hi, got {cfg[key]!r}")
    cfg[key] = (lo, hi)
  if cfg["crop_scale"][1] > 1:
    raise ValueError(f"crop_scale must lie in (0, 1], got {cfg['crop_scale']!r}")
  if int(cfg["crop_size"]) != cfg["crop_size"] or cfg["crop_size"] <= 0:
    raise ValueError(f"crop_size must be a positive int, got {cfg['crop_size']!r}")
  cfg["crop_size"] = int(cfg["crop_size"])
  for key in ("flip_prob", "color_jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
    if not 0 <= cfg[key] <= 1:
      raise ValueError(f"view key {key!r} is a probability, got {cfg[key]!r}")
  if cfg["color_jitter_impl"] not in JITTER_IMPLS:
    raise ValueError(f"color_jitter_impl must be one of {JITTER_IMPLS}, got {cfg['color_jitter_impl']!r}")
  if cfg["color_jitter_strength"] is not None:
    s = float(cfg["color_jitter_strength"])
    cfg.update(brightness=0.8 * s, contrast=0.8 * s, saturation=0.8 * s, hue=0.2 * s)
  for key in ("brightness", "contrast", "saturation", "hue"):
    if cfg[key] < 0:
      raise ValueError(f"view key {key!r} is a magnitude >= 0, got {cfg[key]!r}")
  if cfg["hue"] > 0.5:
    raise ValueError(f"hue must be <= 0.5 (a half turn of the hue circle), got {cfg['hue']!r}")
  if int(cfg["randaugment_layers"]) != cfg["randaugment_layers"] or cfg["randaugment_layers"] < 0:
    raise ValueError(f"randaugment_layers must be an int >= 0, got {cfg['randaugment_layers']!r}")
  cfg["randaugment_layers"] = int(cfg["randaugment_layers"])
  if not 0 <= cfg["randaugment_magnitude"] <= RANDAUGMENT_MAX_MAGNITUDE or cfg["randaugment_magnitude_std"] < 0:
    raise ValueError(f"randaugment_magnitude must lie in [0, 10] and randaugment_magnitude_std be >= 0, got "
                     f"{cfg['randaugment_magnitude']!r}, {cfg['randaugment_magnitude_std']!r}")
  if not 0 <= cfg["erase_prob"] <= 1:
    raise ValueError(f"view key 'erase_prob' is a probability, got {cfg['erase_prob']!r}")
  return cfg
