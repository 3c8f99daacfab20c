r"""Input pipeline throughput at ImageNet resolution: images/s per host core of the pre-training pipeline
(pipeline.pretrain_batches) for the SimCLR, BYOL, SwAV and DINO ImageNet recipes, with JPEGs decoded only
inside each view's crop box (fused) and decoded whole then cropped, on 1 and 2 cores; beside them,
optionally, torchvision + PIL in a torch DataLoader on the same cores with the same recipe.

    python benchmarks/input_pipeline.py                        # table + JSON (defaults: about 25 minutes)
    python benchmarks/input_pipeline.py --torch_python /tmp/tvenv/bin/python --repeats 2 --seconds 4 --warmup 2
    python benchmarks/input_pipeline.py --smoke                # a few seconds: 64 small images, one row

Data: nothing is downloaded. The images are made once, cached under --data_dir (default
/tmp/ssl_jax_input_bench), from matplotlib's bundled sample photographs (sample_data/grace_hopper.jpg and
Minduka_Present_Blue_Pack.png) and the embedded CIFAR-10 subset (ssl_jax/data/embedded): each image is a
random crop of a photograph, scaled to about 400 x 350 px (ImageNet's typical size), blended with an
upscaled CIFAR-10 image, colour-jittered, with pixel noise for a realistic file size, JPEG quality 90.
They are written as a TFDS dataset under the name imagenet2012 in its own data_dir, so the pipeline reads
them through exactly the ImageNet code path (dataset=imagenet2012: its splits, normalization, crops), and
as .jpg files for the torchvision loader.

Each measurement is a fresh process pinned with `taskset` to the cores (tf.data's threadpool sized to
them; torch's DataLoader with num_workers = cores), timed over --seconds after a warm-up, repeated
--repeats times; the table gives the best and the median. The load (`uptime`) before and after is printed
and written to the JSON.

The torchvision column needs torch and torchvision, which are not in requirements.txt: pass the Python of
a venv that has them (`python3 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install torch==2.14.1
torchvision==0.29.1 pillow numpy`); without it the column is skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# (name, config file, variant)
RECIPES = {"simclr": ("configs/simclr.py", "imagenet"), "byol": ("configs/byol.py", "imagenet"),
           "swav": ("configs/swav.py", "imagenet"), "dino": ("configs/dino.py", "imagenet")}
SOURCES = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")


def make_images(num: int, seed: int = 0, height: int = 350, width: int = 400):
  """`num` distinct uint8 [~height, ~width, 3] images (side jittered by +-10%), from matplotlib's sample
  photographs and the embedded CIFAR-10 subset; deterministic in `seed`."""
  import matplotlib
  import numpy as np
  from PIL import Image
  from ssl_jax.data import datasets
  sample_dir = pathlib.Path(matplotlib.get_data_path()) / "sample_data"
  photos = [np.asarray(Image.open(sample_dir / name).convert("RGB"), np.float32) for name in SOURCES]
  import tensorflow_datasets as tfds
  from ssl_jax.data import pipeline
  builder = pipeline.get_builder("cifar10", datasets.EMBEDDED_DATA_DIR)
  cifar = np.stack([ex["image"] for ex in tfds.as_numpy(builder.as_dataset(split="train[:1000]"))])
  rng = np.random.default_rng(seed)
  for i in range(num):
    photo = photos[i % len(photos)]
    h = int(height * rng.uniform(0.9, 1.1))
    w = int(width * rng.uniform(0.9, 1.1))
    scale = rng.uniform(0.4, 1.0)
    ch, cw = int(photo.shape[0] * scale), int(photo.shape[1] * scale)
    y, x = rng.integers(0, photo.shape[0] - ch + 1), rng.integers(0, photo.shape[1] - cw + 1)
    base = np.asarray(Image.fromarray(photo[y:y + ch, x:x + cw].astype(np.uint8)).resize((w, h), Image.BICUBIC),
                      np.float32)
    if rng.uniform() < 0.5:
      base = base[:, ::-1]
    tile = np.asarray(Image.fromarray(cifar[rng.integers(len(cifar))]).resize((w, h), Image.BICUBIC), np.float32)
    alpha = rng.uniform(0.2, 0.6)
    image = (1 - alpha) * base + alpha * tile
    image = image * rng.uniform(0.7, 1.3, size=3) + rng.uniform(-20, 20)
    image += rng.normal(0, 6, size=image.shape)
    yield np.clip(image, 0, 255).astype(np.uint8)


def build_dataset(data_dir: str, num_train: int, num_val: int = 0, seed: int = 0, size=(350, 400)) -> None:
  """Writes the images as a TFDS dataset imagenet2012 under data_dir (and as data_dir/jpeg/*.jpg), once:
  an existing complete copy is kept."""
  import io
  import numpy as np
  from PIL import Image
  root = pathlib.Path(data_dir)
  done = root / "COMPLETE"
  if done.exists() and done.read_text() == f"{num_train} {num_val} {seed} {size}":
    return
  import tensorflow_datasets as tfds
  jpeg_dir = root / "jpeg"
  jpeg_dir.mkdir(parents=True, exist_ok=True)
  splits = {}
  images = make_images(num_train + num_val, seed, *size)
  rng = np.random.default_rng(seed + 1)
  for split, count in (("train", num_train), ("validation", num_val)):
    rows = []
    for i in range(count):
      buf = io.BytesIO()
      Image.fromarray(next(images)).save(buf, format="JPEG", quality=90)
      path = jpeg_dir / f"{split}_{i:06d}.jpg"
      path.write_bytes(buf.getvalue())
      rows.append((i, {"image": str(path), "label": int(rng.integers(1000)), "file_name": path.name}))
    if rows:
      splits[split] = rows
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
      "label": tfds.features.ClassLabel(num_classes=1000), "file_name": tfds.features.Text()})
  tfds.dataset_builders.store_as_tfds_dataset(name="imagenet2012", version="5.0.0", features=features,
                                              split_datasets=splits, data_dir=str(root))
  done.write_text(f"{num_train} {num_val} {seed} {size}")


def recipe_views(recipe: str):
  """The recipe's ImageNet config and its views, expanded as the method expands them."""
  from ssl_jax.methods import base
  module = _load_config(RECIPES[recipe][0])
  cfg = module.get_config(RECIPES[recipe][1])
  views = []
  for view in base.ordered_views(cfg):
    settings = {k: v for k, v in view.items() if k not in ("num", "order")}
    views.extend(dict(settings) for _ in range(view.num))
  return cfg, views


def _load_config(path: str):
  import importlib.util
  spec = importlib.util.spec_from_file_location("bench_config", REPO / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def tf_worker(args) -> dict:
  """Images/s of pipeline.pretrain_batches for one recipe and decode path in this (pinned) process."""
  from ssl_jax.data import augment, pipeline
  cfg, views = recipe_views(args.recipe)
  if args.path != "device":  # "device" keeps the pipeline's choice (one whole decode beyond 2 views)
    augment.FUSED_DECODE_MAX_VIEWS = len(views) if args.path == "fused" else 0
  cfg.data_dir = args.data_dir
  cfg.shuffle_buffer = 256
  cfg.cache_dataset = False
  os.cpu_count = lambda: args.cores  # sizes tf.data's private threadpool (pipeline._options)
  # "device": the host's share under augment_on_device=True (decode, crop, resize, flip).
  batches = pipeline.pretrain_batches(cfg, views, args.batch, device_ops=args.path == "device")
  return _time(batches, args)


def jax_worker(args) -> dict:
  """Images/s of the per-pixel ops augment_on_device moves off the host (device_augment.apply, jitted) run
  by JAX on these pinned CPU cores: what the "device" column leaves to the chip, costed on a CPU."""
  import jax
  import numpy as np
  from ssl_jax.data import datasets, device_augment
  cfg, views = recipe_views(args.recipe)
  info = datasets.get(cfg.dataset)
  rng = np.random.default_rng(0)
  images = tuple(rng.uniform(0, 1, (args.batch, v["crop_size"], v["crop_size"], 3)).astype(np.float32)
                 for v in views)
  fn = jax.jit(lambda x, key: device_augment.apply(views, x, key, info.mean, info.std, cfg.normalize_inputs))
  images = jax.device_put(images)

  def batches():
    step = 0
    while True:
      step += 1
      yield jax.block_until_ready(fn(images, jax.random.fold_in(jax.random.key(0), step)))

  return _time(batches(), args)


def torch_worker(args) -> dict:
  """Images/s of a torch DataLoader with torchvision transforms of the recipe's views (PIL decoding)."""
  import torch
  from PIL import Image
  from torchvision import transforms as T
  views = json.loads(args.views)
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

  def transform(v):
    ops = [T.RandomResizedCrop(v["crop_size"], scale=tuple(v["crop_scale"]), ratio=tuple(v["crop_ratio"]),
                               interpolation=T.InterpolationMode.BICUBIC),
           T.RandomHorizontalFlip(v["flip_prob"])]
    jitter = T.ColorJitter(v["brightness"], v["contrast"], v["saturation"], v["hue"])
    ops += [T.RandomApply([jitter], p=v["color_jitter_prob"]), T.RandomGrayscale(v["grayscale_prob"])]
    if v["blur_prob"] > 0:
      ops.append(T.RandomApply([T.GaussianBlur(2 * (v["crop_size"] // 20) + 1, tuple(v["blur_sigma"]))],
                               p=v["blur_prob"]))
    if v["solarize_prob"] > 0:
      ops.append(T.RandomSolarize(int(round(255 * v["solarize_threshold"])), p=v["solarize_prob"]))
    return T.Compose(ops + [T.ToTensor(), T.Normalize(mean, std)])

  transforms = [transform(v) for v in views]
  files = sorted(str(p) for p in (pathlib.Path(args.data_dir) / "jpeg").glob("train_*.jpg"))

  class Views(torch.utils.data.Dataset):
    def __len__(self):
      return 1 << 30

    def __getitem__(self, i):
      image = Image.open(files[i % len(files)]).convert("RGB")
      return tuple(t(image) for t in transforms)

  def init(_):
    torch.set_num_threads(1)

  torch.set_num_threads(1)
  loader = torch.utils.data.DataLoader(Views(), batch_size=args.batch, num_workers=args.cores,
                                       worker_init_fn=init, prefetch_factor=2, persistent_workers=True)
  return _time(iter(loader), args)


def _time(batches, args) -> dict:
  for _ in range(args.warmup):
    next(batches)
  start, n = time.perf_counter(), 0
  while time.perf_counter() - start < args.seconds:
    next(batches)
    n += 1
  elapsed = time.perf_counter() - start
  return {"images_per_s": n * args.batch / elapsed, "batches": n, "seconds": elapsed}


def _uptime() -> str:
  return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _run(python: str, cores: int, worker: str, args, **extra) -> float:
  cmd = ["taskset", "-c", ",".join(str(c) for c in range(cores)), python, __file__, "--worker", worker,
         "--cores", str(cores), "--data_dir", args.data_dir, "--batch", str(args.batch), "--seconds",
         str(args.seconds), "--warmup", str(args.warmup)]
  for key, value in extra.items():
    cmd += [f"--{key}", value]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO))
  out = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if out.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"]


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data_dir", default="/tmp/ssl_jax_input_bench")
  parser.add_argument("--num_images", type=int, default=3000)
  parser.add_argument("--recipes", default="simclr,byol,swav,dino")
  parser.add_argument("--cores", default="1,2")
  parser.add_argument("--paths", default="fused,decoded,device",
                      help="fused, decoded, device (augment_on_device's host share; adds the jax_device_ops "
                           "column: those ops in JAX on the same CPU cores)")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--seconds", type=float, default=10.0)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--torch_python", default="", help="a Python with torch + torchvision: adds the column")
  parser.add_argument("--json", default="", help="default: DATA_DIR/input_pipeline.json")
  parser.add_argument("--smoke", action="store_true", help="64 small images, SimCLR, fused and device, 1 core, 1 s")
  parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
  parser.add_argument("--recipe", default="", help=argparse.SUPPRESS)
  parser.add_argument("--path", default="", help=argparse.SUPPRESS)
  parser.add_argument("--views", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    args.cores = int(args.cores)
    print(json.dumps({"tf": tf_worker, "torch": torch_worker, "jax": jax_worker}[args.worker](args)))
    return
  size = (350, 400)
  if args.smoke:
    args.data_dir += "_smoke"
    args.num_images, args.recipes, args.cores, args.paths = 64, "simclr", "1", "fused,device"
    args.seconds, args.warmup, args.repeats, args.batch, size = 1.0, 1, 1, 8, (120, 140)
  t0 = time.perf_counter()
  build_dataset(args.data_dir, args.num_images, 0, 0, size)
  jpegs = list((pathlib.Path(args.data_dir) / "jpeg").glob("train_*.jpg"))
  mean_kb = sum(p.stat().st_size for p in jpegs) / len(jpegs) / 1024
  print(f"data: {len(jpegs)} JPEGs in {args.data_dir}, mean {mean_kb:.0f} KiB "
        f"(ready in {time.perf_counter() - t0:.0f} s)")
  torch_python = args.torch_python
  if torch_python and subprocess.run([torch_python, "-c", "import torch, torchvision"],
                                     capture_output=True).returncode != 0:
    print(f"note: {torch_python} cannot import torch and torchvision; torchvision column skipped")
    torch_python = ""
  elif not torch_python:
    print("note: no --torch_python given; torchvision column skipped")
  from ssl_jax.data import augment
  load_before = _uptime()
  print(f"host: {os.cpu_count()} cores; load before: {load_before}")
  results = []
  columns = args.paths.split(",") + (["jax_device_ops"] if "device" in args.paths.split(",") else []) + (
      ["torchvision"] if torch_python else [])
  for recipe in args.recipes.split(","):
    _, views = recipe_views(recipe)
    resolved = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in augment._resolve_view(view).items()}
                for view in views]
    desc = " + ".join(f"{sum(1 for v in views if v['crop_size'] == s)}x{s}"
                      for s in sorted({v["crop_size"] for v in views}, reverse=True))
    for cores in (int(c) for c in args.cores.split(",")):
      row = {"recipe": recipe, "views": desc, "cores": cores}
      for column in columns:
        runs = []
        for _ in range(args.repeats):
          if column == "torchvision":
            runs.append(_run(torch_python, cores, "torch", args, views=json.dumps(resolved)))
          elif column == "jax_device_ops":
            runs.append(_run(sys.executable, cores, "jax", args, recipe=recipe))
          else:
            runs.append(_run(sys.executable, cores, "tf", args, recipe=recipe, path=column))
        row[column] = {"runs": runs, "best_per_core": max(runs) / cores,
                       "median_per_core": statistics.median(runs) / cores}
      results.append(row)
      print(_format_row(row, columns), flush=True)
  load_after = _uptime()
  print(f"load after: {load_after}")
  print()
  print(_table(results, columns))
  args.json = args.json or os.path.join(args.data_dir, "input_pipeline.json")
  with open(args.json, "w") as f:
    json.dump({"host_cores": os.cpu_count(), "load_before": load_before, "load_after": load_after,
               "mean_jpeg_kib": mean_kb, "num_images": len(jpegs), "batch": args.batch,
               "seconds": args.seconds, "repeats": args.repeats, "results": results}, f, indent=1)
  print(f"wrote {args.json}")


def _format_row(row, columns) -> str:
  cells = [f"{row[c]['best_per_core']:.0f} / {row[c]['median_per_core']:.0f}" for c in columns]
  return f"| {row['recipe']} | {row['views']} | {row['cores']} | " + " | ".join(cells) + " |"


def _table(results, columns) -> str:
  head = "| recipe | views | cores | " + " | ".join(columns) + " |"
  lines = ["images/s per core, best / median of the repeats", head, "|" + "---|" * (3 + len(columns))]
  return "\n".join(lines + [_format_row(r, columns) for r in results])


if __name__ == "__main__":
  main()
