r"""Every method on CIFAR-10 at one shared budget: pre-training, then kNN and the fast linear probe of the
SSL encoder beside the same encoder at random initialization (and raw pixels, once).

What it measures, per method (configs/<name>.py:cifar10,tiny, every configs/*.py but quickstart.py; DINO's
row: configs/dino.py:cifar10_resnet_lightly,tiny, lightly's ResNet-18 recipe, see METHOD_VARIANTS):
  * pre-training: steps, images/s (median of the logged intervals of metrics.jsonl, without each run's
    first interval, which holds the compilation), wall time (train and evaluation seconds apart);
  * kNN top-1 (lightly's protocol, RECIPES.md section 12: k=200, T=0.1, cosine similarity) and the fast
    linear probe (logistic regression on frozen features, lr x wd chosen on held-out train data) for the
    pre-trained encoder and for the same encoder at its random initialization (same seed, same config);
  * the raw-pixel baseline once (with the first method evaluated; its input normalization is recorded).
The random-init figures are computed once per distinct random encoder: methods whose recipes build and
initialize the same encoder (the ResNet methods at one seed) share them (WORKDIR/random_init.json, keyed by
the initial variables' bytes, the input preparation and the protocols' settings).

Only the budget is shared; everything else is each method's own recipe. Shared: the data (cifar10 at
--data_dir), the global batch, the number of epochs (or --total_steps, or --minutes), the model width and
convolution, seed 0, logging every 10 steps and a checkpoint every 100, a shuffle buffer of the whole train
split (at most 50,000) and queues rounded to a multiple of the batch (MoCo's tiny 4096 and SwAV's 512 are kept at
batch 128). Fitted to the run's length: start-up transients last min(recipe, 1 epoch, a tenth of the
run) (the 10 warm-up epochs, where the recipe has a warm-up, SwAV's 2 epochs of frozen prototypes and
DINO's 30 epochs of teacher-temperature warm-up would take most of 12 epochs), and later events come at
the same fractions of the run as in the recipe (MoCo v1's decays at 60% and 80%, SwAV's queue start at
5%); each method's record in --out lists these values. The ViT configs (MoCo v3, MAE) keep their
variants' model (`tiny`: a 4-block ViT of width 64, patch 4) and ignore --width. Kept from the recipe:
optimizer, learning rate and its scaling, weight decay, heads (the `tiny` sizes), losses, temperatures, EMA
rates, augmentations, input normalization.

Commands (single process; the machine's devices form the data-parallel mesh):
  # The embedded 4,000-image subset at the quickstart's budget (batch 128, 12 epochs = 375 steps,
  # ResNet-18 CIFAR stem at width 16, conv_impl=patches on CPU). On 2 CPU cores SimCLR's pre-training
  # takes about 10 minutes (the quickstart's ~85 images/s); the other methods are slower or faster per
  # step (BYOL's and MoCo's target networks, SwAV's Sinkhorn), see the table's images/s.
  python benchmarks/cifar10_suite.py
  python benchmarks/cifar10_suite.py --methods simclr,byol      # some of them (same workdir, same table)
  # The full CIFAR-10 (50,000 train images) at the same budget (12 epochs = 4,687 steps per method, about
  # 2 hours each on 2 CPU cores at SimCLR's speed):
  python benchmarks/cifar10_suite.py --data_dir ../shared/data/tfds --workdir workdirs/cifar10_suite_full
  # ... and with the full-width ResNet-18 on an accelerator (conv_impl defaults to xla there):
  python benchmarks/cifar10_suite.py --data_dir ../shared/data/tfds --width 64 \
      --workdir workdirs/cifar10_suite_full_w64
  # A budget in minutes instead of epochs (each method's steps come from its own images/s over
  # CALIBRATION_STEPS steps on this host, measured before it trains and kept for a resume):
  python benchmarks/cifar10_suite.py --data_dir ../shared/data/tfds --minutes 6 --workdir workdirs/cifar10_min6
  # Smoke run (a few steps per method):
  python benchmarks/cifar10_suite.py --methods simclr,vicreg --total_steps 3 --workdir /tmp/suite_smoke

The raw-pixel figures depend on the input normalization of the method that computed them (the dataset's
mean and std for most recipes, [0, 1] pixels for SimCLR's): kNN on raw pixels differs by several points.

Resumable: re-running the same command continues each method's pre-training from its latest checkpoint,
adds the new wall time to the time already spent (kept in WORKDIR/<method>/suite.json, rewritten every 30
seconds), and skips methods whose results are already in --out. A changed budget is refused (exit 2):
use another --workdir. Changed kNN settings re-evaluate the finished encoders without training them again.

Not comparable with the published CIFAR-10 figures (RECIPES.md section 12): solo-learn's linear top-1
(90-93%) comes from 1000-epoch runs of full-width ResNet-18s, lightly's kNN (0.76-0.90) from 200- and
800-epoch runs; at 12 epochs the point is whether each method learns at all, and how fast, side by side.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import signal
import statistics
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CONFIGS = REPO / "configs"
NOT_METHODS = ("quickstart",)   # configs/ files that are not a method's recipe
CALIBRATION_STEPS = 30          # a --minutes budget's speed measurement per method (the first 5 excluded)
SUITE_FILE = "suite.json"       # per method workdir: the budget and the wall time spent so far
RANDOM_INIT_FILE = "random_init.json"  # in --workdir: random-init figures by random_init_key
PROTOCOLS = ("knn", "linear")
# Rows that run another of their config's variants than --variants (override with --method_variants): DINO
# runs lightly's ResNet-18 recipe, the run its reference columns measure; its ViT recipe (`cifar10,tiny`) does
# not move in 6 minutes (docs/cifar10_suite.md). SwAV rounds its codes (the official README's workaround
# for a collapse at the start): with soft codes the tiny model collapses to uniform codes in 6 minutes.
METHOD_VARIANTS = {"dino": "cifar10_resnet_lightly,tiny", "swav": "cifar10,tiny,hard"}


def available_methods():
  return sorted(p.stem for p in CONFIGS.glob("*.py") if p.stem not in NOT_METHODS and not p.stem.startswith("_"))


def parse_args(argv=None):
  from ssl_jax.data.datasets import EMBEDDED_DATA_DIR  # no TensorFlow or JAX behind this import
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--methods", default=",".join(available_methods()),
                 help="comma-separated config names (configs/<name>.py); default: all but quickstart")
  p.add_argument("--data_dir", default=EMBEDDED_DATA_DIR,
                 help="a prepared TFDS directory holding cifar10; default: the embedded 4,000-image subset")
  p.add_argument("--epochs", type=float, default=12.0, help="pre-training epochs (the quickstart's 12)")
  p.add_argument("--total_steps", type=int, default=0, help="pre-training steps instead of --epochs (smoke runs)")
  p.add_argument("--minutes", type=float, default=0.0,
                 help="pre-training minutes per method instead of --epochs: each method's steps are fixed from "
                      f"its images/s over {CALIBRATION_STEPS} calibration steps on this host, before it trains")
  p.add_argument("--batch_size", type=int, default=128, help="global batch")
  p.add_argument("--width", type=int, default=16, help="ResNet-18 first-stage channels (64 = full width)")
  p.add_argument("--conv_impl", default=None, help="model.conv_impl; default: patches on CPU, xla elsewhere")
  p.add_argument("--variants", default="cifar10,tiny",
                 help="the config variants every method is built from, but those of --method_variants")
  p.add_argument("--method_variants", action="append", default=[], metavar="METHOD=VARIANTS",
                 help="one method's variants instead of --variants (repeatable); default: " +
                      " ".join(f"{k}={v}" for k, v in METHOD_VARIANTS.items()))
  p.add_argument("--workdir", default="workdirs/cifar10_suite", help="one subdirectory per method")
  p.add_argument("--out", default=None, help="results JSON; default: WORKDIR/results.json")
  p.add_argument("--knn_k", type=int, default=200, help="kNN neighbours (lightly: 200)")
  p.add_argument("--knn_temperature", type=float, default=0.1, help="kNN temperature (lightly: 0.1)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a config setting for every method after the budget's, e.g. model.zero_init_residual=True "
                      "(repeatable; part of the budget a workdir holds)")
  args = p.parse_args(argv)
  args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  overrides = dict(item.partition("=")[::2] for item in args.method_variants)
  args.method_variants = {**METHOD_VARIANTS, **{k.strip(): v.strip() for k, v in overrides.items()}}
  args.out = args.out or os.path.join(args.workdir, "results.json")
  return args


def data_name(data_dir: str) -> str:
  """The data's name in a budget: "embedded" for the shipped subset (wherever the checkout lies), else the
  resolved path."""
  from ssl_jax.data.datasets import EMBEDDED_DATA_DIR
  path = os.path.realpath(data_dir)
  return "embedded" if path == os.path.realpath(EMBEDDED_DATA_DIR) else path


def variants_of(args, name: str) -> str:
  """The config variants method `name` is built from."""
  return args.method_variants.get(name, args.variants)


def budget(args, name: str | None = None) -> dict:
  """The settings a method's pre-training run is defined by: a workdir holds a run of exactly these. Without
  a name: the suite's (--out's), with every method's variants that differ from --variants."""
  if name:
    variants = {"variants": variants_of(args, name)}
  else:
    differ = {m: v for m, v in sorted(args.method_variants.items()) if v != args.variants}
    variants = {"variants": args.variants, **({"method_variants": differ} if differ else {})}
  return {"dataset": "cifar10", "data": data_name(args.data_dir), "epochs": args.epochs,
          "total_steps": args.total_steps, "batch_size": args.batch_size, "width": args.width,
          **({"minutes": args.minutes} if args.minutes else {}),
          **variants, **({"settings": list(args.set)} if args.set else {})}


def eval_settings(args) -> dict:
  return {"knn_k": args.knn_k, "knn_temperature": args.knn_temperature, "linear_mode": "fast"}


def read_json(path) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return {}


def write_json(path, data) -> None:
  """Atomic (a temporary file, then rename): a kill never leaves half a file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def input_error(args):
  """One line saying what is wrong with the arguments, or None. Cheap: nothing heavy is imported yet."""
  known = available_methods()
  unknown = [m for m in args.methods if m not in known]
  if unknown or not args.methods:
    return f"unknown method(s) {unknown or '(none given)'}; known: {', '.join(known)}"
  bad = [m for m, v in args.method_variants.items() if m not in known or not v]
  if bad:
    return f"--method_variants takes METHOD=VARIANTS with a known method, e.g. dino=cifar10,tiny; got {bad}"
  if not os.path.isdir(args.data_dir):
    return f"--data_dir {args.data_dir} does not exist (a prepared TFDS directory holding cifar10)"
  if not os.path.isdir(os.path.join(args.data_dir, "cifar10")):
    return f"--data_dir {args.data_dir} holds no cifar10/ (prepare it with tfds, or pass its parent)"
  if args.epochs <= 0 or args.total_steps < 0 or args.minutes < 0 or args.batch_size <= 0 or args.width <= 0:
    return "--epochs, --batch_size and --width must be > 0, --total_steps and --minutes >= 0"
  if args.total_steps and args.minutes:
    return "pass --total_steps or --minutes, not both"
  if args.knn_k <= 0 or args.knn_temperature <= 0:
    return "--knn_k and --knn_temperature must be > 0"
  for path, what, want in [(args.out, "--out", budget(args))] + [
      (os.path.join(args.workdir, m, SUITE_FILE), f"{m}'s workdir", budget(args, m)) for m in args.methods]:
    try:
      saved = read_json(path).get("budget")
    except (OSError, ValueError) as e:
      return f"{path} cannot be read ({e}); remove it or pass another --workdir"
    if saved is not None and saved != want:
      diff = ", ".join(f"{k}: {saved.get(k)!r} -> {want.get(k)!r}" for k in sorted(set(saved) | set(want))
                       if saved.get(k) != want.get(k))
      return f"{what} ({path}) holds a run of another budget ({diff}); pass another --workdir / --out"
  return None


class Stopwatch:
  """Adds the wall time spent inside `with` to the counter `key` of a JSON file, rewriting it every
  `every` seconds, so that a run killed without warning loses at most that much and a resumed run adds to
  the time already spent."""

  # The flushing thread, the main thread and the SIGTERM handler (in the main thread: re-entrant) write
  # the same file.
  _lock = threading.RLock()
  running = []  # the Stopwatch inside its `with`, for the SIGTERM handler

  def __init__(self, path: str, key: str, every: float = 30.0):
    self.path, self.key, self.every = path, key, every
    self._done = threading.Event()

  def _flush(self):
    with self._lock:
      data = read_json(self.path)
      data[self.key] = self.base + time.time() - self.start
      write_json(self.path, data)

  def _loop(self):
    while not self._done.wait(self.every):
      self._flush()

  def __enter__(self):
    self.base = read_json(self.path).get(self.key, 0.0)
    self.start = time.time()
    self._thread = threading.Thread(target=self._loop, daemon=True)
    self._thread.start()
    Stopwatch.running.append(self)
    return self

  def __exit__(self, *exc):
    Stopwatch.running.remove(self)
    self._done.set()
    self._thread.join()
    self._flush()


def update_json(path: str, **items) -> dict:
  with Stopwatch._lock:
    data = read_json(path)
    data.update(items)
    write_json(path, data)
  return data


def host_info() -> dict:
  import jax
  device = jax.devices()[0]
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    cores = os.cpu_count()
  return {"platform": device.platform, "device_kind": device.device_kind, "num_devices": jax.device_count(),
          "cpu_cores": cores, "machine": platform.machine(), "processor": platform.processor(),
          "python": platform.python_version(), "jax": jax.__version__}


def method_config(name: str, args, num_train: int, conv_impl: str, total_steps: int = 0):
  """configs/<name>.py:<variants> with the shared budget (see the module docstring); total_steps (a
  --minutes budget's calibrated steps) replaces --total_steps."""
  from ssl_jax import config as config_lib
  cfg = config_lib.load(f"{CONFIGS / name}.py:{variants_of(args, name)}")
  recipe_epochs = cfg.num_epochs
  total_steps = total_steps or args.total_steps
  run_epochs = total_steps * args.batch_size / num_train if total_steps else args.epochs
  cfg.update(dataset="cifar10", data_dir=args.data_dir, batch_size=args.batch_size, num_epochs=float(args.epochs),
             total_steps=total_steps, seed=0, data_shards=0, steps_per_loop=1, log_every_steps=10,
             checkpoint_every_steps=100, shuffle_buffer=min(50_000, num_train))
  if cfg.model.name == "resnet":  # the ViT configs keep their variants' model (tiny: width 64, 4 blocks)
    cfg.model.update(width=args.width, conv_impl=conv_impl)
  opt = cfg.optimizer
  # Start-up transients (warm-up, SwAV's frozen prototypes) last min(recipe, 1 epoch, a tenth of the run):
  # the recipes' 10 warm-up epochs or 2 frozen epochs would take most of a 12-epoch run.
  start_epochs = min(1.0, run_epochs / 10)
  if opt.warmup_epochs > 0:  # MoCo's recipes have none, and keep none
    opt.warmup_epochs = min(opt.warmup_epochs, start_epochs)
  start_steps = max(1, round(start_epochs * num_train / args.batch_size))
  if cfg.method.get("warmup_teacher_temp_epochs", 0) > 0:  # DINO's, counted in whole epochs
    cfg.method.warmup_teacher_temp_epochs = max(1, int(start_epochs))
  opt.groups = tuple((regex, fit_frozen_until(settings, start_steps, start_epochs)) for regex, settings in opt.groups)
  # Events placed later in the run, at the same fractions of this one (at the recipe's epochs they would
  # never come): MoCo v1's x0.1 decays at 60% and 80%, SwAV's queue start (5% of solo-learn's run), which
  # every recipe places after the prototypes unfreeze (official: frozen 1 epoch, queue from epoch 15;
  # solo-learn: 2 and 50) and which is kept there: a queue that starts while the transients still run
  # disturbs training (the official README's "Common Issues"; 300 steps on CIFAR-10: kNN 25.5 with the
  # queue from step 15, 30.2 from step 30).
  scale = run_epochs / recipe_epochs
  opt.lr_drop_epochs = tuple(e * scale for e in opt.lr_drop_epochs)
  if cfg.method.get("queue_start_epoch", 0) > 0:
    cfg.method.queue_start_epoch = max(cfg.method.queue_start_epoch * scale, start_epochs)
  for key in ("queue_size", "queue_length"):
    # Queues are replaced a whole batch at a time (MoCo asserts K % batch == 0): the nearest multiple.
    if cfg.method.get(key, 0) > 0 and cfg.method[key] % args.batch_size:
      cfg.method[key] = args.batch_size * max(1, round(cfg.method[key] / args.batch_size))
  cfg.eval.update(knn_k=(args.knn_k,), knn_temperature=args.knn_temperature, linear_mode="fast")
  config_lib.apply_settings(cfg, args.set)
  return cfg


def fit_frozen_until(settings: dict, start_steps: int, start_epochs: float) -> dict:
  """A group's temporary freeze (SwAV's prototypes, DINO's last layer), in steps or in epochs, capped at the
  run's start-up length; a permanent freeze (frozen=True, MoCo v3's patch embedding) stays."""
  from ssl_jax import config as config_lib
  settings = dict(settings)
  if 0 < settings.get("frozen_until_step", 0) < config_lib.FROZEN_FOREVER:
    settings["frozen_until_step"] = min(settings["frozen_until_step"], start_steps)
  if settings.get("frozen_until_epoch"):
    settings["frozen_until_epoch"] = min(settings["frozen_until_epoch"], start_epochs)
  return settings


def images_per_sec(workdir: str):
  """Median images/s of the logged intervals, without the first interval of each run (it holds the
  compilation; a resumed run starts a new one: its elapsed_seconds restarts). None without rows."""
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f if line.strip()]
  except FileNotFoundError:
    return None
  steady = [r["images_per_sec"] for prev, r in zip([None] + rows, rows)
            if prev is not None and r["elapsed_seconds"] > prev["elapsed_seconds"]]
  values = steady or [r["images_per_sec"] for r in rows]  # a run of one interval: compilation included
  return statistics.median(values) if values else None


def latest_step(workdir: str, cfg) -> int:
  from ssl_jax import checkpoint as ckpt_lib
  if not ckpt_lib.checkpoint_dir(workdir).exists():
    return 0
  return max(ckpt_lib.Manager(workdir, cfg, create=False).all_steps(), default=0)


def random_init_key(encoder, cfg) -> str:
  """What the random-init figures are a function of: the encoder's initial variables (bytes), the input
  preparation and the protocols' settings. Methods whose recipes initialize the same encoder the same way
  (the ResNet methods here) share them, so they are computed once per suite."""
  import hashlib
  import jax
  import numpy as np
  digest = hashlib.sha256()
  variables = jax.device_get(encoder.encoder_variables(encoder.initial_state))
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  digest.update(json.dumps([cfg.model.to_dict(), cfg.eval.to_dict(), bool(cfg.normalize_inputs), cfg.dataset,
                            os.path.realpath(cfg.data_dir), cfg.seed], sort_keys=True, default=str).encode())
  return digest.hexdigest()[:16]


def evaluate(workdir: str, settings: dict, with_raw_pixels: bool, cache_path: str):
  """({protocol: ssl metrics}, {protocol: random-init metrics}, {protocol: raw-pixel metrics} or None, step,
  the resolved config). Random-init figures are read from `cache_path` when an earlier method had the same
  random encoder (random_init_key), else computed and added to it."""
  from ssl_jax import parallel
  from ssl_jax.evaluate import run
  cfg = run.load_config(workdir)
  cfg.eval.update(knn_k=(settings["knn_k"],), knn_temperature=settings["knn_temperature"], linear_mode="fast",
                  baselines=False)  # the baselines below: random init per method, raw pixels once
  encoder = run.Encoder(cfg, parallel.make_mesh(), cache_features=True)  # features shared by both protocols
  info = encoder.info
  key = random_init_key(encoder, cfg)
  cached = read_json(cache_path).get(key, {})
  ssl, random_init, raw = {}, {}, {} if with_raw_pixels else None
  for protocol in PROTOCOLS:
    out = run.evaluate(workdir, protocol, cfg=cfg, encoder=encoder)  # also writes WORKDIR/eval/
    ssl[protocol] = out["results"]["ssl"]
    if protocol in cached:
      random_init[protocol] = cached[protocol]
      print(f"{protocol} (random_init): {100 * run.headline(protocol, random_init[protocol]):.2f}% (same random "
            f"encoder as {cached['computed_with']})", flush=True)
    else:
      featurize = lambda split: encoder.features(encoder.initial_state, split, key=("random",))
      random_init[protocol] = run.run_protocol(protocol, cfg, featurize(info.train_split),
                                               featurize(info.test_split))
      print(f"{protocol} (random_init): {100 * run.headline(protocol, random_init[protocol]):.2f}%", flush=True)
    if raw is not None:
      start = time.time()
      raw[protocol] = run.run_protocol(protocol, cfg, encoder.pixel_features(info.train_split),
                                       encoder.pixel_features(info.test_split))
      raw["seconds"] = raw.get("seconds", 0.0) + time.time() - start
      print(f"{protocol} (raw_pixels): {100 * run.headline(protocol, raw[protocol]):.2f}%", flush=True)
  if not cached:
    update_json(cache_path, **{key: {**random_init, "computed_with": os.path.basename(workdir)}})
  return ssl, random_init, raw, out["step"], cfg


def calibrated_steps(name: str, args, num_train: int, conv_impl: str, workdir: str) -> int:
  """A --minutes budget in steps: the method's images/s over CALIBRATION_STEPS steps of its own recipe on
  this host (in WORKDIR/calibration, removed afterwards) times the minutes. Measured once: the result is
  kept in WORKDIR/suite.json, so a resumed run keeps its schedule."""
  import shutil
  from ssl_jax import train
  suite_path = os.path.join(workdir, SUITE_FILE)
  saved = read_json(suite_path).get("calibration")
  if saved:
    return saved["total_steps"]
  caldir = os.path.join(workdir, "calibration")
  shutil.rmtree(caldir, ignore_errors=True)  # a calibration killed half-way starts again
  cfg = method_config(name, args, num_train, conv_impl, total_steps=10 * CALIBRATION_STEPS)
  cfg.update(log_every_steps=CALIBRATION_STEPS // 6, checkpoint_every_steps=10 * CALIBRATION_STEPS)
  print(f"\n== {name}: calibrating ({CALIBRATION_STEPS} steps) for a budget of {args.minutes:g} minutes",
        flush=True)
  start = time.time()
  train.train(cfg, caldir, stop_at_step=CALIBRATION_STEPS)
  speed = images_per_sec(caldir)  # without the first interval, which holds the compilation
  steps = max(1, round(args.minutes * 60 * speed / args.batch_size))
  update_json(suite_path, calibration={"images_per_sec": speed, "steps": CALIBRATION_STEPS,
                                       "seconds": time.time() - start, "total_steps": steps})
  shutil.rmtree(caldir, ignore_errors=True)
  print(f"{name}: {speed:.0f} images/s -> {steps} steps", flush=True)
  return steps


def run_method(name: str, args, results: dict, num_train: int, conv_impl: str, host: dict) -> bool:
  """Pre-trains and evaluates one method, recording it in `results` (and --out). False when pre-training
  stopped early (SIGTERM): re-running continues it."""
  from ssl_jax import config as config_lib
  from ssl_jax import train
  workdir = os.path.join(args.workdir, name)
  suite_path = os.path.join(workdir, SUITE_FILE)
  os.makedirs(workdir, exist_ok=True)
  update_json(suite_path, budget=budget(args, name))
  steps = calibrated_steps(name, args, num_train, conv_impl, workdir) if args.minutes else 0
  cfg = method_config(name, args, num_train, conv_impl, total_steps=steps)
  total = config_lib.resolve(cfg, num_train).total_steps
  step = latest_step(workdir, cfg)
  if step < total:
    print(f"\n== {name}: pre-training {'from step %d' % step if step else 'from scratch'} to step {total} "
          f"({workdir})", flush=True)
    with Stopwatch(suite_path, "train_seconds"):
      summary = train.train(cfg, workdir)
    if summary["preempted"]:
      print(f"{name}: stopped at step {summary['step']}; re-run the same command to continue", flush=True)
      return False
  # The evaluation time counts from the first attempt at these settings (an interrupted one included).
  suite = read_json(suite_path)
  if suite.get("eval") != eval_settings(args):
    update_json(suite_path, eval=eval_settings(args), eval_seconds=0.0)
  print(f"\n== {name}: evaluating", flush=True)
  with_raw = "raw_pixels" not in results
  with Stopwatch(suite_path, "eval_seconds"):
    ssl, random_init, raw, step, resolved = evaluate(workdir, eval_settings(args), with_raw,
                                                     os.path.join(args.workdir, RANDOM_INIT_FILE))
  if raw is not None:
    # Its seconds are also part of this method's eval_seconds.
    results["raw_pixels"] = {**raw, "computed_with": name,
                             "normalize_inputs": bool(resolved.normalize_inputs)}
  suite = read_json(suite_path)
  results["methods"][name] = {
      "config": f"configs/{name}.py:{variants_of(args, name)}", "workdir": workdir, "steps": step,
      "total_steps": total,
      "epochs": step * args.batch_size / num_train, "images_per_sec": images_per_sec(workdir),
      "train_seconds": suite.get("train_seconds", 0.0), "eval_seconds": suite["eval_seconds"],
      "knn": ssl["knn"], "linear": ssl["linear"], "random_init": random_init,
      "budget_overrides": {"warmup_epochs": resolved.optimizer.warmup_epochs,
                           "lr_drop_epochs": list(resolved.optimizer.lr_drop_epochs),
                           "groups": [list(g) for g in resolved.optimizer.groups],
                           "shuffle_buffer": resolved.shuffle_buffer,
                           "conv_impl": resolved.model.get("conv_impl"),
                           **{k: resolved.method[k] for k in ("queue_size", "queue_length", "queue_start_epoch",
                                                             "warmup_teacher_temp_epochs")
                              if k in resolved.method}},
      **({"calibration": suite["calibration"]} if "calibration" in suite else {}),
      "host": host, "date": now()}
  return True


def now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def duration(seconds) -> str:
  if seconds is None:
    return "-"
  seconds = int(round(seconds))
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# Published CIFAR-10 figures of far longer runs, as reference columns (RECIPES.md section 12): solo-learn's
# linear top-1 (ResNet-18 at full width, 1000 epochs, batch 256; vturrisi/solo-learn README, CIFAR-10
# table: MoCo V2+ 92.94, MoCo v3 93.10 and SimSiam 90.51 from the README RECIPES.md cites, SimCLR 90.74 and
# BYOL 92.58 from commit 0126879) and lightly's kNN top-1 (k=200, T=0.1, max over epochs; ResNet-18, 200
# epochs at batch 128; lightly-ai/lightly docs/source/getting_started/benchmarks.rst, whose "Moco" is
# MoCo v2's recipe). None where the library has no row.
REFERENCES = {  # method: (solo-learn linear top-1 %, lightly kNN top-1 %)
    "simclr": (90.74, 84.7), "byol": (92.58, 86.9), "moco_v2": (92.94, 83.8), "moco_v3": (93.10, None),
    "simsiam": (90.51, 81.9), "swav": (89.17, 81.2), "barlow_twins": (92.10, 84.2), "dino": (89.52, 84.0),
    "vicreg": (92.07, None),
}


def table(results: dict, order) -> str:
  k = results["eval"]["knn_k"]
  key = f"knn_top1_k{k}"
  pct = lambda v: "-" if v is None else f"{100 * v:.2f}"
  ref = lambda v: "-" if v is None else f"{v:.1f}"
  lines = [f"| method | steps | images/s | pre-training | kNN top-1 (k={k}) | linear top-1 | random-init kNN | "
           "random-init linear | solo-learn linear (1000 ep) | lightly kNN (200 ep) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  names = [n for n in order if n in results["methods"]] + sorted(set(results["methods"]) - set(order))
  for name in names:
    r = results["methods"][name]
    ips = "-" if r["images_per_sec"] is None else f"{r['images_per_sec']:.0f}"
    lines.append(f"| {name} | {r['steps']} | {ips} | {duration(r['train_seconds'])} | {pct(r['knn'][key])} | "
                 f"{pct(r['linear']['linear_top1'])} | {pct(r['random_init']['knn'][key])} | "
                 f"{pct(r['random_init']['linear']['linear_top1'])} | "
                 + " | ".join(ref(v) for v in REFERENCES.get(name, (None, None))) + " |")
  raw = results.get("raw_pixels")
  if raw:
    lines.append(f"\nraw pixels: kNN {pct(raw['knn'][key])}, linear {pct(raw['linear']['linear_top1'])}")
  return "\n".join(lines)


def main(argv=None) -> int:
  args = parse_args(argv)
  error = input_error(args)
  if error:
    print(f"error: {error}", file=sys.stderr, flush=True)
    return 2
  # SIGTERM outside pre-training (which saves a checkpoint and stops on its own, train.py): write the time
  # spent so far and exit at once. Not by raising from the handler: an exception at an arbitrary point of
  # the evaluation went through library code that turned it into a wrong error, then a crash at exit.
  def stop(signum, frame):
    for watch in Stopwatch.running:
      watch._flush()
    print("stopped by SIGTERM; re-run the same command to continue", file=sys.stderr, flush=True)
    os._exit(128 + signum)
  signal.signal(signal.SIGTERM, stop)
  from ssl_jax import distributed
  distributed.hold_library_logs()  # quiet until the input is checked (train and evaluate release them)
  with distributed.user_errors_exit():
    import jax
    from ssl_jax.data import pipeline
    builder = pipeline.get_builder("cifar10", args.data_dir, splits=("train",))
    num_train = pipeline.num_examples(builder, "train")
    conv_impl = args.conv_impl or ("patches" if jax.default_backend() == "cpu" else "xla")
    host = host_info()
    results = read_json(args.out) or {"methods": {}}
    if results.get("eval") != eval_settings(args):
      # Other kNN settings: every finished encoder is evaluated again (its pre-training is kept).
      results = {"methods": {}}
    results.update(suite="benchmarks/cifar10_suite.py", budget=budget(args), eval=eval_settings(args),
                   num_train=num_train, host=host)
    for name in args.methods:
      if name in results["methods"]:
        print(f"== {name}: done ({results['methods'][name]['steps']} steps; results in {args.out}), skipped",
              flush=True)
        continue
      finished = run_method(name, args, results, num_train, conv_impl, host)
      results["date"] = now()
      write_json(args.out, results)  # after every method: a kill loses no finished method
      if not finished:
        return 0
    results["date"] = now()
    write_json(args.out, results)
    budget_line = (f"{args.total_steps} steps" if args.total_steps else f"{args.minutes:g} minutes"
                   if args.minutes else f"{args.epochs:g} epochs") + \
        f" of {num_train} images, batch {args.batch_size}, ResNet-18 width {args.width} ({conv_impl})"
    print(f"\nCIFAR-10 suite: {budget_line}; {host['device_kind']} x{host['num_devices']}, "
          f"{host['cpu_cores']} cores\n")
    print(table(results, args.methods))
    print(f"\nresults: {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
