"""The papers' rows the configs reproduce: one table, the source of truth for `python -m ssl_jax.reproduce`,
docs/reproduce.md (generated from it; a test keeps the two equal) and the tests that check every row's
config against the values the row cites.

    python -m ssl_jax.reproduce                       # every row: paper, table, figures, config, cost
    python -m ssl_jax.reproduce --method dino         # the rows of one method
    python -m ssl_jax.reproduce --row moco_v2-r50-800ep    # one row's pre-training and evaluation commands
    python -m ssl_jax.reproduce --markdown > docs/reproduce.md

Cost: device-hours of pre-training on ImageNet (1,281,167 images an epoch) at the row's epochs, from the
training FLOPs of one image (all its views, forward and backward, and the target network's forward where
there is one) that `benchmarks/scale_plan.py` read from XLA's cost analysis of the compiled step
(GFLOP_COMMAND), at 50% of the bf16 peak of a TPU v3 core (61.5 TFLOP/s) or a v4 chip (275 TFLOP/s).
Input, collectives and evaluation are not counted, so it is a lower bound (SimCLR's reported 100 epochs on
128 v3 cores took 3.5 times the projection). Nothing here was run on a TPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Optional, Sequence, Tuple

IMAGENET_TRAIN_IMAGES = 1_281_167
PEAK_FLOPS = {"v3 core": 61.5e12, "v4 chip": 275e12}
UTILIZATION = 0.5
# GFLOP/step/device of this command (2026-12-04) divided by its 8 images per device.
GFLOP_COMMAND = "python benchmarks/scale_plan.py --methods <config> --devices 8 --batches 64 --crop 0"
WORKDIR = "gs://BUCKET/workdirs"
DATA_DIR = "gs://BUCKET/tensorflow_datasets"


@dataclasses.dataclass(frozen=True)
class Row:
  """One published figure and how to reproduce it.

  cited: (config key, value) pairs of the recipe as `source` gives them; a test checks the config against
  each. overrides: settings beyond the config variant (passed as --config.KEY=VALUE). params_m: the
  encoder's parameters in millions, without any classification head (a test builds the state abstractly
  and counts them). gflop: training FLOPs of one image (see the module docstring)."""

  key: str
  method: str
  paper: str
  table: str
  backbone: str
  epochs: float
  batch: int
  linear: Optional[float]
  config: str = ""
  finetune: Optional[float] = None
  knn: Optional[float] = None
  overrides: Tuple[Tuple[str, Any], ...] = ()
  protocols: Tuple[str, ...] = ("linear",)
  params_m: float = 0.0
  gflop: float = 0.0
  cited: Tuple[Tuple[str, Any], ...] = ()
  source: str = ""
  note: str = ""

  def device_hours(self, chip: str) -> float:
    flops = self.gflop * 1e9 * IMAGENET_TRAIN_IMAGES * self.epochs
    return flops / (PEAK_FLOPS[chip] * UTILIZATION) / 3600


R50 = 23.51    # ResNet-50 without its fc (torchvision's 25.56M has a 2.05M 1000-class fc)
R50_LN = 23.51  # the same with layer norm (one scale and bias per channel, as batch norm)
VIT_S16 = 21.67  # ViT-S/16 with a learned position embedding, no head (22.0M in DeiT counts a head)
VIT_B16_SINCOS = 85.65  # ViT-B/16 (86.57M with timm's head) without head, sin-cos table fixed (MoCo v3, MAE)
VIT_B8 = 85.81  # ViT-B/8, learned position embedding (785 tokens): B/16's 85.80 - 0.44 patch kernel + 0.45 table

ROWS: Tuple[Row, ...] = (
    Row("instdisc-r50", "InstDisc", "Wu et al. 2018", "ImageNet linear, ResNet-50", "ResNet-50", 200, 256, 54.0,
        "configs/instdisc.py:imagenet", knn=46.8, protocols=("linear", "knn"), params_m=R50, gflop=24.0,
        cited=(("batch_size", 256), ("num_epochs", 200.0), ("optimizer.base_learning_rate", 0.03),
               ("optimizer.weight_decay", 1e-4), ("optimizer.lr_drop_epochs", (120.0, 160.0)),
               ("method.nce_k", 4096), ("method.temperature", 0.07), ("method.bank_momentum", 0.5),
               ("method.feature_dim", 128)),
        source="lemniscate main.py l.34-76, README l.17 (kNN 46.8); RECIPES.md section 1"),
    Row("cpc_v1-r101", "CPC v1", "van den Oord et al. 2018", "ImageNet linear, ResNet-v2-101 (3 stacks)",
        "ResNet-v2-101", 0, 0, 48.7, protocols=(),
        note="historical row: no config (ResNet-v2-101's first three stacks with batch norm are not built here); "
             "the figure is UNVERIFIED here"),
    Row("cpc_v2-r50", "CPC v2", "Henaff et al. 2020", "SimCLR Table 6 row, ResNet-50", "ResNet-50 (LN)", 200, 512,
        63.8, "configs/cpc_v2.py:imagenet", params_m=R50_LN, gflop=90.4,
        cited=(("model.norm", "layer"), ("method.grid_size", 7), ("method.patch_size", 64),
               ("method.patch_stride", 32), ("method.context_blocks", 5), ("method.context_dim", 256),
               ("method.target_dim", 64), ("method.emb_scale", 0.1), ("method.offsets", (3,))),
        source="arXiv:1905.09272 section 3-4.1 and appendix A.2; RECIPES.md section 2",
        note="63.8 and the optimizer, epochs and batch are UNVERIFIED here; the paper's 71.5 (ResNet-161) has no "
             "config"),
    Row("moco-r50", "MoCo", "He et al. 2020", "Table 1, ResNet-50", "ResNet-50", 200, 256, 60.6,
        "configs/moco_v1.py:imagenet", params_m=R50, gflop=32.0,
        cited=(("batch_size", 256), ("num_epochs", 200.0), ("optimizer.base_learning_rate", 0.03),
               ("optimizer.weight_decay", 1e-4), ("optimizer.lr_drop_epochs", (120.0, 160.0)),
               ("method.queue_size", 65536), ("method.momentum", 0.999), ("method.temperature", 0.07),
               ("model.zero_init_residual", False)),
        source="moco main_moco.py l.61-179, README (60.6 of 5 runs); RECIPES.md section 3"),
    Row("moco_v2-r50-200ep", "MoCo v2", "Chen et al. 2020", "Table 1 (e), 200 epochs", "ResNet-50", 200, 256, 67.5,
        "configs/moco_v2.py:imagenet", params_m=R50, gflop=32.1,
        cited=(("batch_size", 256), ("num_epochs", 200.0), ("optimizer.base_learning_rate", 0.03),
               ("optimizer.schedule", "cosine_per_epoch"), ("method.temperature", 0.2),
               ("method.proj_hidden_dim", 2048), ("method.queue_size", 65536)),
        source="moco README (--mlp --moco-t 0.2 --aug-plus --cos); RECIPES.md section 3"),
    Row("moco_v2-r50-800ep", "MoCo v2", "Chen et al. 2020", "Table 2, 800 epochs", "ResNet-50", 800, 256, 71.1,
        "configs/moco_v2.py:imagenet", overrides=(("num_epochs", 800.0),), params_m=R50, gflop=32.1,
        cited=(("num_epochs", 800.0), ("method.temperature", 0.2)),
        source="MoCo v2 Table 2 (71.1 top-1 at 800 epochs); the 200-epoch recipe otherwise"),
    Row("simclr-r50", "SimCLR", "Chen et al. 2020", "Table 6, ResNet-50 (1x)", "ResNet-50", 1000, 4096, 69.3,
        "configs/simclr.py:imagenet", params_m=R50, gflop=48.0,
        cited=(("batch_size", 4096), ("num_epochs", 1000.0), ("optimizer.base_learning_rate", 0.3),
               ("optimizer.weight_decay", 1e-6), ("optimizer.warmup_epochs", 10.0), ("method.temperature", 0.1)),
        source="SimCLR appendix B.1 and Table 6"),
    Row("byol-r50", "BYOL", "Grill et al. 2020", "Table 1a, ResNet-50", "ResNet-50", 1000, 4096, 74.3,
        "configs/byol.py:imagenet", params_m=R50, gflop=64.3,
        cited=(("batch_size", 4096), ("num_epochs", 1000.0), ("optimizer.base_learning_rate", 0.2),
               ("optimizer.weight_decay", 1.5e-6), ("method.base_ema", 0.996), ("method.proj_hidden_dim", 4096),
               ("method.proj_dim", 256)),
        source="BYOL appendix C"),
    Row("simsiam-r50", "SimSiam", "Chen & He 2021", "Table 4, 100 epochs", "ResNet-50", 100, 512, 68.1,
        "configs/simsiam.py:imagenet", params_m=R50, gflop=48.1,
        cited=(("batch_size", 512), ("num_epochs", 100.0), ("optimizer.base_learning_rate", 0.05),
               ("optimizer.weight_decay", 1e-4), ("method.pred_hidden_dim", 512)),
        source="simsiam main_simsiam.py l.47-92; RECIPES.md section 5"),
    Row("swav-r50", "SwAV", "Caron et al. 2020", "Table 1, 800 epochs, multi-crop", "ResNet-50", 800, 4096, 75.3,
        "configs/swav.py:imagenet", params_m=R50, gflop=73.3,
        cited=(("batch_size", 4096), ("num_epochs", 800.0), ("optimizer.base_learning_rate", 4.8 * 256 / 4096),
               ("optimizer.weight_decay", 1e-6), ("method.num_prototypes", 3000), ("method.temperature", 0.1),
               ("method.epsilon", 0.05), ("method.queue_length", 0)),
        source="swav_800ep_pretrain.sh, main_swav.py l.171-177; RECIPES.md section 6"),
    Row("barlow_twins-r50", "Barlow Twins", "Zbontar et al. 2021", "Table 1", "ResNet-50", 1000, 2048, 73.2,
        "configs/barlow_twins.py:imagenet", params_m=R50, gflop=50.9,
        cited=(("batch_size", 2048), ("num_epochs", 1000.0), ("optimizer.base_learning_rate", 0.2),
               ("method.lambd", 0.0051), ("method.proj_hidden_dim", 8192), ("method.proj_dim", 8192)),
        source="barlowtwins main.py l.29-42; RECIPES.md section 7",
        note="the official README reports 73.5 for its released run"),
    Row("vicreg-r50", "VICReg", "Bardes et al. 2022", "Table 1", "ResNet-50", 1000, 2048, 73.2,
        "configs/vicreg.py:imagenet", params_m=R50, gflop=57.0,
        cited=(("batch_size", 2048), ("num_epochs", 1000.0), ("optimizer.base_learning_rate", 0.2),
               ("optimizer.weight_decay", 1e-6), ("method.sim_coeff", 25.0), ("method.std_coeff", 25.0),
               ("method.cov_coeff", 1.0)),
        source="vicreg README l.77-81, main_vicreg.py l.44-63; RECIPES.md section 10"),
    Row("dino-r50", "DINO", "Caron et al. 2021", "Table 2, ResNet-50", "ResNet-50", 100, 512, 75.3,
        "configs/dino.py:resnet50", knn=67.5, protocols=("linear", "knn"), params_m=R50, gflop=99.3,
        cited=(("optimizer.base_learning_rate", 0.03), ("optimizer.weight_decay", 1e-4),
               ("method.teacher_temp", 0.04), ("model.zero_init_residual", False)),
        source="dino README l.204-208 (the ResNet-50 command); RECIPES.md section 8",
        note="the released 75.3 / 67.5 model was trained with other arguments (batch 4080, dino#133): expect less "
             "from this command"),
    Row("dino-vits16-800ep", "DINO", "Caron et al. 2021", "Table 2, ViT-S/16 (released, 800 epochs)", "ViT-S/16",
        800, 1024, 77.0, "configs/dino.py:vit_small_800ep", knn=74.5, protocols=("linear", "knn"),
        params_m=VIT_S16, gflop=127.0,
        cited=(("num_epochs", 800.0), ("method.out_dim", 65536), ("method.teacher_temp", 0.07),
               ("method.warmup_teacher_temp_epochs", 30), ("optimizer.base_learning_rate", 0.0005)),
        source="dino README and the released args; RECIPES.md section 8"),
    Row("dino-vitb8", "DINO", "Caron et al. 2021", "Table 2, ViT-B/8", "ViT-B/8", 400, 512, 80.1,
        "configs/dino.py:vit_base8", knn=77.4, protocols=("linear", "knn"), params_m=VIT_B8, gflop=2045.8,
        cited=(("batch_size", 512), ("optimizer.base_learning_rate", 0.00075),
               ("method.warmup_teacher_temp_epochs", 50)),
        source="dino README l.36-69; RECIPES.md section 8 (the ViT-B args are a third-party transcription, "
               "UNVERIFIED)"),
    Row("moco_v3-vitb16", "MoCo v3", "Chen, Xie, He 2021", "ViT-B/16, 300 epochs (README)", "ViT-B/16", 300, 4096,
        76.7, "configs/moco_v3.py:vit_base", params_m=VIT_B16_SINCOS, gflop=285.8,
        cited=(("batch_size", 4096), ("num_epochs", 300.0), ("optimizer.base_learning_rate", 1.5e-4),
               ("optimizer.weight_decay", 0.1), ("optimizer.warmup_epochs", 40.0), ("method.temperature", 0.2),
               ("method.base_momentum", 0.99)),
        source="moco-v3 CONFIG.md / main_moco.py; RECIPES.md section 4"),
    Row("mae-vitb16", "MAE", "He et al. 2022", "ViT-B/16, 1600 epochs (FINETUNE.md)", "ViT-B/16", 1600,
        4096, 68.0, "configs/mae.py:vit_base", finetune=83.6, protocols=("linear", "finetune"),
        params_m=VIT_B16_SINCOS, gflop=95.5,
        cited=(("batch_size", 4096), ("num_epochs", 1600.0), ("optimizer.base_learning_rate", 1.5e-4),
               ("optimizer.weight_decay", 0.05), ("optimizer.warmup_epochs", 40.0), ("method.mask_ratio", 0.75),
               ("method.norm_pix_loss", True)),
        source="mae PRETRAIN.md l.3-24, FINETUNE.md l.63-80, 129; RECIPES.md section 9"),
)


def get(key: str) -> Row:
  for row in ROWS:
    if row.key == key:
      return row
  raise KeyError(f"no reproduction row {key!r}; rows: {', '.join(r.key for r in ROWS)}")


def select(method: Optional[str] = None) -> Sequence[Row]:
  """The rows whose method or key matches `method` (case-insensitive; None: all)."""
  if not method:
    return ROWS
  m = method.lower().replace("-", "_").replace(" ", "_")
  return [r for r in ROWS if r.method.lower().replace(" ", "_") == m or r.key.split("-")[0] == m]


def _flag(key: str, value: Any) -> str:
  text = repr(tuple(value)) if isinstance(value, (tuple, list)) else str(value)
  return f"--config.{key}={text!r}" if isinstance(value, (tuple, list)) else f"--config.{key}={text}"


def pretrain_command(row: Row) -> str:
  if not row.config:
    return ""
  extra = "".join(f" {_flag(k, v)}" for k, v in row.overrides)
  return (f"python -m ssl_jax.main --config={row.config} --config.data_dir={DATA_DIR} "
          f"--workdir={WORKDIR}/{row.key}{extra}")


def eval_commands(row: Row) -> Sequence[str]:
  return [f"python -m ssl_jax.evaluate --workdir={WORKDIR}/{row.key} --protocol={p}" for p in row.protocols]


def _figure(value: Optional[float]) -> str:
  return "" if value is None else f"{value:.1f}"


def _number(value) -> str:
  return f"{value:g}" if value else ""


def _hours(row: Row, chip: str) -> str:
  return f"{row.device_hours(chip):,.0f}" if row.gflop and row.epochs else ""


HEADER = ("| row | method | paper, table | backbone | epochs | batch | linear | fine-tune | kNN | config | "
          "GFLOP/image | v3 core-hours | v4 chip-hours |")


def table_lines(rows: Sequence[Row]) -> Sequence[str]:
  lines = [HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"]
  for r in rows:
    config = r.config.replace("configs/", "") + "".join(f" {k}={v}" for k, v in r.overrides)
    lines.append(f"| {r.key} | {r.method} | {r.paper}, {r.table} | {r.backbone} | {_number(r.epochs)} | "
                 f"{_number(r.batch)} | {_figure(r.linear)} | {_figure(r.finetune)} | {_figure(r.knn)} | "
                 f"{config or '(none)'} | {_number(r.gflop)} | {_hours(r, 'v3 core')} | {_hours(r, 'v4 chip')} |")
  return lines


def markdown() -> str:
  """docs/reproduce.md."""
  out = ["# Reproducing the papers' rows", "",
         "Generated by `python -m ssl_jax.reproduce --markdown` from `ssl_jax/reproduce.py` (a test keeps this file",
         "equal to it). Figures are ImageNet top-1 (%) as published; nothing here was run on ImageNet. Cost: "
         "pre-training",
         f"device-hours at {UTILIZATION:.0%} of bf16 peak (v3 core 61.5, v4 chip 275 TFLOP/s), from the FLOPs of one",
         "training image (all its views, forward and backward) that XLA's cost analysis gives for the compiled step:",
         f"`{GFLOP_COMMAND}`, per device / 8 images (2026-12-04). Input, collectives and evaluation are not counted.",
         "Read it as a lower bound: SimCLR's paper (section 2.2) trained its ResNet-50 at batch 4096 for 100 epochs",
         "in about 1.5 hours on 128 v3 cores, 192 core-hours, 3.5 times the 56 this projection gives for 100 epochs.",
         ""]
  out += table_lines(ROWS)
  out += ["", "## Commands", ""]
  for r in ROWS:
    out.append(f"**{r.key}** ({r.method}, {r.table}; source: {r.source or 'the paper'})"
               + (f". Note: {r.note}." if r.note else "."))
    if r.config:
      out += ["", "```bash", pretrain_command(r), *eval_commands(r), "```"]
    out.append("")
  return "\n".join(out)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--method", help="only this method's rows (e.g. dino, moco_v2)")
  p.add_argument("--row", help="print this row's pre-training and evaluation commands")
  p.add_argument("--markdown", action="store_true", help="print docs/reproduce.md")
  args = p.parse_args(argv)
  if args.markdown:
    print(markdown())
    return 0
  if args.row:
    try:
      row = get(args.row)
    except KeyError as e:
      print(f"error: {e.args[0]}", file=sys.stderr)
      return 2
    if not row.config:
      print(f"{row.key}: no config reproduces this row ({row.note})")
      return 0
    print("\n".join([pretrain_command(row), *eval_commands(row)]))
    return 0
  rows = select(args.method)
  if not rows:
    print(f"error: no rows for method {args.method!r}; methods: "
          f"{', '.join(sorted({r.key.split('-')[0] for r in ROWS}))}", file=sys.stderr)
    return 2
  print("\n".join(table_lines(rows)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
