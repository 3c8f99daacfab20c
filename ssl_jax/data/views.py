"""What a view recipe may set, and the defaults (no TensorFlow here: configs import it, and so do the
entry points' checks that run before the input pipeline is loaded; the ops are in augment.py)."""

from typing import Any, Dict

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
