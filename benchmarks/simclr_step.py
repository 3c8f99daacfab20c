r"""SimCLR train-step speed on this machine: the ssl_jax step beside the same step in plain PyTorch.

ResNet-18 (CIFAR stem) + 2-layer projection head with BN, NT-Xent over both views, LARS, the online
linear probe; global batch --batch_size of two 32x32 views. Printed per column: train-step images/s
(median over the timed steps after --warmup), compile seconds, peak host RSS (each column runs in its own
subprocess, so the peak is that column's alone), XLA's memory analysis of the compiled step, and the
tf.data input pipeline's images/s on the real CIFAR-10 (skipped with a message when --data_dir is absent).
Ends with a markdown table for the README.

Every column is built and compiled once, in a process of its own that stays alive; with --rounds N the
columns then take turns, each turn --warmup untimed steps and --steps timed ones, and each round's speed
ratio to PyTorch is printed: this machine's speed drifts by 10-30% between minutes, so steps taken
minutes apart do not compare. The untimed steps matter: a process that sat idle while another column ran
has had its freed memory taken back by the host (this VM reports free pages to the hypervisor), and its
next step faults all of it in again (system time 10-12 s instead of 3-4 s for ssl_jax's step here), which
never happens between the back-to-back steps of a training run.

    python benchmarks/simclr_step.py                                  # width 64, batch 256
    python benchmarks/simclr_step.py --width 16                       # quick (about a minute)
    python benchmarks/simclr_step.py --conv_impl xla --breakdown      # + where the step's time goes
    python benchmarks/simclr_step.py --conv_impl winograd --rounds 3  # alternated, ratios per round
    python benchmarks/simclr_step.py --conv_impl winograd,winograd:4  # + 4 steps per call (steps_per_loop)

Figures, not tests: nothing here is asserted. The torch column needs `pip install torch` (not a
requirement of the library); without it the column prints a skip line.
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
# The repo for ssl_jax and configs; this script's folder for columns, whatever the working directory (it is
# sys.path[0] only when this file is run as a script, not with python -m benchmarks.simclr_step).
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
import columns  # noqa: E402
from columns import peak_rss_mib, progress  # noqa: E402

DEFAULT_DATA_DIR = REPO.parent / "shared" / "data" / "tfds"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch_size", type=int, default=256, help="global batch (images; two views each)")
  p.add_argument("--width", type=int, default=64, help="ResNet-18 first-stage channels (64 = the paper)")
  p.add_argument("--steps", type=int, default=3, help="timed steps per column and round")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones, every round")
  p.add_argument("--rounds", type=int, default=1,
                 help="turns each step column takes, alternating (A B A B ...): the machine's speed drifts "
                      "between minutes, and a ratio within one round is the comparison that holds")
  p.add_argument("--conv_impl", default="patches,winograd,winograd:4",
                 help="comma-separated ssl_jax columns to run: a model.conv_impl (xla, patches, winograd), "
                      "optionally :K for the trainer's steps_per_loop=K (K steps per compiled call; the "
                      "time shown is per step)")
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU cores every column may use")
  p.add_argument("--data_dir", default=str(DEFAULT_DATA_DIR), help="prepared TFDS dir with cifar10")
  p.add_argument("--pipeline_batches", type=int, default=20, help="timed input-pipeline batches")
  columns.add_torch_args(p)
  p.add_argument("--breakdown", action="store_true",
                 help="also time each ResNet-18 convolution's forward, input and kernel gradient")
  p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one column in this process
  return p.parse_args(argv)


def simclr_config(args, conv_impl: str = "xla"):
  from configs import simclr
  config = simclr.get_config("cifar10")
  config.batch_size = args.batch_size
  config.model.width = args.width
  config.data_dir = args.data_dir
  config.model.conv_impl = conv_impl
  return config


# ----------------------------------------------------------------------------------------------- ssl_jax


def random_batch(batch_size: int, crop: int = 32, seed: int = 0):
  import numpy as np
  rng = np.random.default_rng(seed)
  views = tuple(rng.random((batch_size, crop, crop, 3), dtype=np.float32) for _ in range(2))
  return {"views": views, "label": rng.integers(0, 10, batch_size).astype(np.int32),
          "index": np.arange(batch_size, dtype=np.int64)}


def jax_column(args, column: str):
  """column: "IMPL" or "IMPL:K" (model.conv_impl, steps_per_loop)."""
  import jax

  from ssl_jax import parallel, train
  conv_impl, _, loop = column.partition(":")
  steps_per_loop = int(loop or 1)
  config = simclr_config(args, conv_impl)
  config.update(steps_per_loop=steps_per_loop, log_every_steps=steps_per_loop, checkpoint_every_steps=steps_per_loop)
  mesh = parallel.make_mesh()
  config, method, state, step_fn, loop_fn, _ = train.build(config, mesh, num_train_examples=50_000,
                                                           num_classes=10)
  assert method.encoder.conv_impl == conv_impl, (method.encoder.conv_impl, conv_impl)
  step_fn, batch = columns.step_and_batch(mesh, step_fn, loop_fn, random_batch(args.batch_size), steps_per_loop)
  compiled_setup, _, run_step = columns.compile_jax_step(step_fn, state, batch)
  name = f"ssl_jax conv_impl={conv_impl}" + (f", steps_per_loop={steps_per_loop}" if steps_per_loop > 1 else "")
  return {"column": name, **compiled_setup, "steps_per_call": steps_per_loop, "devices": jax.device_count()}, run_step


def pipeline_column(args):
  from ssl_jax import methods
  from ssl_jax.data import pipeline
  config = simclr_config(args)
  views = methods.get(config).views()
  start = time.perf_counter()
  batches = pipeline.pretrain_batches(config, views, args.batch_size)
  next(batches)  # fills the cache and the 50k shuffle buffer: startup, not throughput
  startup_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(args.pipeline_batches):
    next(batches)
  elapsed = time.perf_counter() - start
  return {"column": "input pipeline", "images_per_s": args.pipeline_batches * args.batch_size / elapsed,
          "startup_s": startup_s, "peak_rss_mib": peak_rss_mib()}


# ------------------------------------------------------------------------------------------------ PyTorch


def torch_column(args):
  """The same step in plain PyTorch (no torchvision): same model shapes, loss, optimizer and probe."""
  import torch
  import torch.nn.functional as F
  from torch import nn
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)

  class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
      self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
      self.proj = None
      if stride != 1 or cin != cout:
        self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
      y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
      return F.relu(y + (x if self.proj is None else self.proj(x)))

  width = args.width
  layers = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
  channels = width
  for stage in range(4):
    for block in range(2):
      layers.append(BasicBlock(channels, width * 2**stage, 2 if stage > 0 and block == 0 else 1))
      channels = width * 2**stage
  encoder = nn.Sequential(*layers)
  projector = nn.Sequential(nn.Linear(channels, 2048, bias=False), nn.BatchNorm1d(2048), nn.ReLU(),
                            nn.Linear(2048, 256, bias=False), nn.BatchNorm1d(256))
  probe = nn.Linear(channels, 10)
  # channels_last (NHWC, as in JAX) measured faster than NCHW for oneDNN's CPU convolutions here.
  encoder = encoder.to(memory_format=torch.channels_last)
  params = [p for m in (encoder, projector, probe) for p in m.parameters()]
  momenta = [torch.zeros_like(p) for p in params]

  @torch.no_grad()
  def lars_update(lr=0.4 * args.batch_size / 256, weight_decay=1e-5, momentum=0.9, eta=1e-3):
    # optax.lars as configured in ssl_jax/optim.py: decay and trust ratio on >1-D parameters only.
    for p, m in zip(params, momenta):
      g = p.grad
      if p.ndim > 1:
        g = g + weight_decay * p
        w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
        g = g * torch.where((w_norm > 0) & (g_norm > 0), eta * w_norm / g_norm, torch.ones_like(w_norm))
      m.mul_(momentum).add_(g, alpha=lr)
      p.sub_(m)

  def nt_xent(z1, z2, temperature=0.2):
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    logits = z @ z.T / temperature
    logits.fill_diagonal_(-1e9)
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return 2 * F.cross_entropy(logits, targets)  # ssl_jax reports the sum of the two directions' means

  data = random_batch(args.batch_size)
  views = torch.from_numpy(data["views"][0].copy()), torch.from_numpy(data["views"][1].copy())
  x = torch.cat(views).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
  labels = torch.from_numpy(data["label"]).long()
  n = args.batch_size

  def run_step():
    for p in params:
      p.grad = None
    h = encoder(x).mean(dim=(2, 3))
    z = projector(h)
    loss = nt_xent(z[:n], z[n:]) + F.cross_entropy(probe(h[:n].detach()), labels)
    loss.backward()
    lars_update()

  return {"column": f"PyTorch {torch.__version__} (eager)", "threads": torch.get_num_threads()}, run_step


# -------------------------------------------------------------------------------------------- breakdown


def resnet18_convs(width: int, cifar_stem: bool = True):
  """(input HW, in channels, out channels, kernel, stride, count) of every convolution in ResNet-18."""
  convs = [(32, 3, width, 3, 1, 1)] if cifar_stem else [(224, 3, width, 7, 2, 1)]
  hw, cin = 32, width
  for stage in range(4):
    cout = width * 2**stage
    stride = 2 if stage > 0 else 1
    convs.append((hw, cin, cout, 3, stride, 1))           # first block, first conv
    if stride != 1 or cin != cout:
      convs.append((hw, cin, cout, 1, stride, 1))         # projection shortcut
    hw //= stride
    convs.append((hw, cout, cout, 3, 1, 3))               # first block's second conv + second block
    cin = cout
  return convs


def conv_gflop_per_step(width: int, batch_size: int) -> float:
  """Multiply-adds x 2 of every convolution's forward, input gradient and kernel gradient (3 x forward)
  over both views: the bulk of a ResNet step's arithmetic, the same for every implementation."""
  total = 0
  for hw, cin, cout, k, stride, count in resnet18_convs(width):
    total += 2 * (2 * batch_size) * (hw // stride) ** 2 * k * k * cin * cout * count
  return 3 * total / 1e9


def breakdown_column(args):
  """Times each ResNet-18 convolution shape's forward, input gradient and kernel gradient (XLA's and the
  patch-matmul one) on the step's activations (2 x batch images), scaled by how often it occurs."""
  import jax
  import numpy as np
  from jax import lax

  from ssl_jax.models import conv as conv_lib
  n = 2 * args.batch_size
  dn = ("NHWC", "HWIO", "NHWC")
  totals, rows = {}, []
  for hw, cin, cout, k, stride, count in resnet18_convs(args.width):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, hw, hw, cin), dtype=np.float32)
    w = rng.standard_normal((k, k, cin, cout), dtype=np.float32)
    pads = lax.padtype_to_pads((hw, hw), (k, k), (stride, stride), "SAME")
    conv = functools.partial(lax.conv_general_dilated, window_strides=(stride, stride), padding=pads,
                             dimension_numbers=dn)
    patches = functools.partial(conv_lib.patches_conv_general_dilated, window_strides=(stride, stride),
                                padding=pads, dimension_numbers=dn)
    g = rng.standard_normal(jax.eval_shape(conv, x, w).shape, dtype=np.float32)
    parts = {  # arguments, not closed-over constants: XLA would constant-fold the whole computation
        "forward": lambda x, w, g, conv=conv: conv(x, w),
        "input grad": lambda x, w, g, conv=conv: jax.vjp(lambda x_: conv(x_, w), x)[1](g)[0],
        "kernel grad (xla)": lambda x, w, g, conv=conv: jax.vjp(lambda w_: conv(x, w_), w)[1](g)[0],
        "kernel grad (patches)": lambda x, w, g, conv=patches: jax.vjp(lambda w_: conv(x, w_), w)[1](g)[0],
    }
    x, w, g = jax.device_put((x, w, g))
    row = {}
    for name, fn in parts.items():
      fn = jax.jit(fn)
      fn(x, w, g).block_until_ready()
      best = float("inf")
      for _ in range(2):
        start = time.perf_counter()
        fn(x, w, g).block_until_ready()
        best = min(best, time.perf_counter() - start)
      row[name] = best * count
      totals[name] = totals.get(name, 0.0) + best * count
    label = f"{k}x{k}/{stride} {hw}x{hw}x{cin}->{cout}" + (f" (x{count})" if count > 1 else "")
    rows.append((label, row))
    progress(f"{label}: " + ", ".join(f"{k_} {v:.2f} s" for k_, v in row.items()))
  return {"column": "breakdown", "rows": rows, "totals": totals}


# ---------------------------------------------------------------------------------------------- driver


def run_worker(args):
  kind, _, arg = args.worker.partition(":")
  if kind in ("jax", "torch"):
    return columns.serve(*(jax_column(args, arg) if kind == "jax" else torch_column(args)),
                         timing_line="call {i}/{n}: {seconds:.2f} s per step")
  columns.report({"pipeline": lambda: pipeline_column(args), "breakdown": lambda: breakdown_column(args)}[kind]())


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  columns.pin_threads(args.threads)
  if args.worker:
    return run_worker(args)

  print(f"SimCLR ResNet-18 (CIFAR stem, width {args.width}), global batch {args.batch_size} x 2 views of "
        f"32x32, {args.steps} timed steps after {args.warmup} warm-up, {args.threads} threads, "
        f"{os.cpu_count()} CPUs on this machine", flush=True)
  conv_gflop = conv_gflop_per_step(args.width, args.batch_size)
  print(f"convolutions, forward and backward: {conv_gflop:.0f} GFLOP per step", flush=True)
  impls = [impl.strip() for impl in args.conv_impl.split(",") if impl.strip()]
  if unknown := sorted(i for i in impls if i.partition(":")[0] not in ("xla", "patches", "winograd")
                       or not (i.partition(":")[2] or "1").isdigit() or int(i.partition(":")[2] or 1) < 1):
    sys.exit(f"error: --conv_impl takes xla, patches and winograd, each optionally :K with K >= 1 steps per "
             f"call, got {', '.join(unknown)}")
  columns.check_turns(args)
  names = [f"jax:{impl}" for impl in impls] + (["torch"] if columns.torch_wanted(args) else [])
  label = lambda worker: f"ssl_jax, conv_impl={worker[4:]}" if worker.startswith("jax:") else "PyTorch"
  workers = []
  for name in names:  # built one after another, so that no compilation overlaps a timed step
    print(f"{label(name)}: building and compiling", flush=True)
    torch = name == "torch"
    workers.append(columns.StepWorker(__file__, argv, name, python=args.torch_python if torch else "",
                                      huge_pages=args.huge_pages == "both" if torch else args.huge_pages != "none"))
  per_round = []  # per round: {worker: {step_s, best_step_s, peak_rss_mib, and the worker's setup}}
  try:
    for _, r in columns.take_turns(workers, args, label, per_round):
      detail = (f"compile {r['compile_s']:.1f} s; peak RSS {r['peak_rss_mib']:.0f} MiB; XLA memory analysis "
                f"{r['xla_peak_mib']:.0f} MiB (temp {r['xla_temp_mib']:.0f} MiB)" if "compile_s" in r
                else f"peak RSS {r['peak_rss_mib']:.0f} MiB")
      print(f"  {columns.speed(r)}; {detail}; convolutions at {conv_gflop / r['step_s']:.1f} GFLOP/s", flush=True)
  finally:
    for w in workers:
      w.close()
  results = columns.median_rounds(names, per_round)
  if args.rounds > 1 and "torch" in names:
    for name in names[:-1]:
      ratios = [rnd["torch"]["step_s"] / rnd[name]["step_s"] for rnd in per_round if name in rnd and "torch" in rnd]
      if ratios:
        print(f"{name[4:]} speed / PyTorch's, per round: " + ", ".join(f"{100 * q:.0f}%" for q in ratios)
              + f"; median {100 * statistics.median(ratios):.0f}%")

  print("input pipeline (pretrain_batches on CIFAR-10 alone):", flush=True)
  pipeline_result = None
  if not (pathlib.Path(args.data_dir) / "cifar10").exists():
    print(f"  skipped: no prepared cifar10 under {args.data_dir} (pass --data_dir)")
  else:
    pipeline_result = columns.spawn(__file__, argv, "pipeline")
    if pipeline_result:
      print(f"  {pipeline_result['images_per_s']:.0f} images/s (2 views each) after "
            f"{pipeline_result['startup_s']:.1f} s start-up; peak RSS {pipeline_result['peak_rss_mib']:.0f} MiB")

  if args.breakdown:
    print(f"where the convolutions' time goes (each ResNet-18 conv, batch {2 * args.batch_size}):", flush=True)
    b = columns.spawn(__file__, argv, "breakdown")
    if b:
      t = b["totals"]
      for name, seconds in t.items():
        print(f"  total {name}: {seconds:.2f} s")
      xla = t["forward"] + t["input grad"] + t["kernel grad (xla)"]
      patched = t["forward"] + t["input grad"] + t["kernel grad (patches)"]
      print(f"  all convolutions, fwd + bwd: {xla:.1f} s with XLA's kernel gradient "
            f"({100 * t['kernel grad (xla)'] / xla:.0f}% of it the kernel gradient), "
            f"{patched:.1f} s with patches")

  columns.print_table(results, args.batch_size)
  if pipeline_result:
    print(f"| input pipeline (tf.data, 2 views) | {pipeline_result['images_per_s']:.0f} | - | - | "
          f"{pipeline_result['peak_rss_mib']:.0f} | - |")
  print(f"\nResNet-18 width {args.width}, global batch {args.batch_size}, 32x32, {args.threads} CPU threads; "
        f"median and best of {args.steps} steps after {args.warmup} warm-up; a busy machine shows as a gap "
        f"between the two.")


if __name__ == "__main__":
  main()
