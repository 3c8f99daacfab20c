r"""MoCo v3 ViT train-step speed on this machine: the ssl_jax step beside the same step in plain PyTorch.

ViT-Ti/4 on 32x32 inputs (64 patches + a class token, fixed 2-D sin-cos position embedding, frozen random
patch projection), MoCo v3's projector (3 layers, BN) and predictor (2 layers, BN), a momentum network
(EMA of the online encoder and projector) giving the keys, the symmetric contrastive loss with T 0.2, the
online linear probe and AdamW with weight decay 0.1: the step of `configs/moco_v3.py:cifar10`, global batch
--batch_size of two 32x32 views. Printed per column: train-step images/s (median over the timed steps
after --warmup), compile and first-step seconds, peak host RSS (each column runs in its own subprocess,
so the peak is that column's alone), and for ssl_jax XLA's memory and cost analysis of the compiled step.
Both columns count their parameters (they must be equal: the same work) and print the loss of their first
step on the same random views (not equal, the initializations differ; both near 2 x 2T log(batch) at
initialization). Ends with a markdown table.

The ssl_jax columns are the library's own train step (train.build: resolve -> methods.get -> create_train_state
-> make_train_step -> jit_train_step on parallel.make_mesh()) fed one fixed batch of synthetic views: no
input pipeline in the timed loop. --steps_per_loop picks them: 1, one step per call; K > 1, the trainer's
steps_per_loop=K (jit_train_loop: K steps per compiled call, as TPUEstimator's iterations_per_loop), timed
per step. On CPU, K > 1 pays XLA's per-call temporary buffer (8.4 GB here, faulted in and zeroed afresh at
every call) once per K steps. The PyTorch column is the same computation written in PyTorch eager
(nn.Module ViT, F.scaled_dot_product_attention unless --torch_attention explicit, fused AdamW on the
parameters that take gradients, the momentum EMA as one torch._foreach_lerp_ under no_grad).

As in simclr_step.py, every column is built once in a process of its own that stays alive; with --rounds N
the columns take turns, each turn --warmup untimed steps and --steps timed ones, and every round prints the
speed of ssl_jax against PyTorch's: this machine's speed drifts between minutes, so steps taken minutes
apart do not compare (and a process that sat idle faults its freed memory in again on its next step, which
the untimed steps absorb).

    python benchmarks/vit_step.py               # ViT-Ti/4, heads 4096, batch 256, 2 rounds of 1 + 2 steps;
                                                # ssl_jax with steps_per_loop 1 and 4
    python benchmarks/vit_step.py --rounds 4    # more alternations, a ratio per round
    python benchmarks/vit_step.py --batch_size 64 --heads_hidden 1024 --rounds 1   # quick (a few minutes)

Figures, not tests: nothing here is asserted. The torch column needs `pip install torch` (not a
requirement of the library); without it the column prints a skip line.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
# The repo for ssl_jax and configs; this script's folder for columns, whatever the working directory (it is
# sys.path[0] only when this file is run as a script, not with python -m benchmarks.vit_step).
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
import columns  # noqa: E402
from columns import progress  # noqa: E402

NUM_TRAIN, NUM_CLASSES = 50_000, 10  # CIFAR-10's training split: the schedules' length, the probe's classes


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch_size", type=int, default=256, help="global batch (images; two views each)")
  p.add_argument("--arch", default="vit_tiny", help="model.arch (ssl_jax.models.vit.ARCHS)")
  p.add_argument("--patch_size", type=int, default=4, help="model.patch_size (the images are 32x32)")
  p.add_argument("--drop_path", type=float, default=0.0, help="model.drop_path_rate (the recipe's is 0)")
  p.add_argument("--heads_hidden", type=int, default=4096,
                 help="hidden width of the projector and the predictor (the recipe's 4096; 1024 is quicker)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="model.dtype (compute dtype; parameters stay float32); bfloat16: torch.autocast in "
                      "the PyTorch column (on a CPU without AVX-512 BF16 PyTorch's bfloat16 matmuls are far "
                      "slower than its float32 ones: about 10x in one run here)")
  p.add_argument("--steps", type=int, default=2, help="timed steps per column and round")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones, every round")
  p.add_argument("--rounds", type=int, default=2,
                 help="turns each column takes, alternating (A B A B ...): the machine's speed drifts "
                      "between minutes, and a ratio within one round is the comparison that holds")
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU cores every column may use")
  p.add_argument("--steps_per_loop", default="1,4",
                 help="comma-separated ssl_jax columns: the trainer's steps_per_loop K of each (K steps per "
                      "compiled call, a lax.scan of the step; the time shown is per step)")
  p.add_argument("--torch_attention", default="sdpa", choices=("sdpa", "explicit"),
                 help="the PyTorch column's attention: F.scaled_dot_product_attention (timm's default) or "
                      "softmax(q k^T) v written out as ssl_jax's is")
  columns.add_torch_args(p, "torch==2.13.0")
  p.add_argument("--no_jax", action="store_true", help="skip the ssl_jax column")
  p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one column in this process
  p.add_argument("--spec", help=argparse.SUPPRESS)    # internal: the step's sizes, for the PyTorch column
  return p.parse_args(argv)


def moco_v3_config(args):
  """configs/moco_v3.py:cifar10 with this run's sizes."""
  from ssl_jax import config as config_lib
  config = config_lib.load(f"{REPO}/configs/moco_v3.py:cifar10")
  config.batch_size = args.batch_size
  config.model.update(arch=args.arch, patch_size=args.patch_size, drop_path_rate=args.drop_path, dtype=args.dtype)
  config.method.update(proj_hidden_dim=args.heads_hidden, pred_hidden_dim=args.heads_hidden)
  return config


def step_spec(args) -> dict:
  """Everything the PyTorch column needs to know of the ssl_jax step, read from the same config (computed
  in the driver, so that the PyTorch process never imports JAX)."""
  from ssl_jax import config as config_lib
  from ssl_jax import methods, models, optim
  from ssl_jax.models import vit
  config = config_lib.resolve(moco_v3_config(args), NUM_TRAIN)
  m, method, opt = config.model, config.method, config.optimizer
  models.check(m)  # one-line ConfigErrors (unknown arch, a patch size that does not divide 32, ...)
  methods.check_config(config)
  arch = vit.ARCHS[m.arch]
  assert m.pos_embed == "sincos" and m.init == "moco_v3" and m.representation == "cls", m
  assert opt.name == "adamw" and not opt.exclude_bias_and_norm and not opt.clip_global_norm, opt
  assert not opt.clip_per_param, opt
  assert [v.crop_size for v in config.views.values()] == [m.image_size] * 2, config.views
  return dict(image_size=m.image_size, patch_size=m.patch_size, embed_dim=m.embed_dim or arch[0],
              depth=m.depth or arch[1], num_heads=m.num_heads or arch[2], mlp_ratio=m.mlp_ratio,
              drop_path=m.drop_path_rate, proj_layers=method.proj_layers, proj_hidden=method.proj_hidden_dim,
              proj_dim=method.proj_dim, pred_hidden=method.pred_hidden_dim, pred_output_bn=method.pred_output_bn,
              temperature=method.temperature, base_momentum=method.base_momentum,
              cosine_momentum=method.cosine_momentum, total_steps=config.total_steps,
              learning_rate=optim.peak_learning_rate(config), weight_decay=opt.weight_decay, b1=opt.b1, b2=opt.b2,
              online_probe=config.online_probe)


def random_batch(batch_size: int, crop: int = 32, seed: int = 0):
  """Two views of standard-normal pixels (what normalized inputs look like), labels and indices."""
  import numpy as np
  rng = np.random.default_rng(seed)
  views = tuple(rng.standard_normal((batch_size, crop, crop, 3), dtype=np.float32) for _ in range(2))
  return {"views": views, "label": rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32),
          "index": np.arange(batch_size, dtype=np.int64)}


# ----------------------------------------------------------------------------------------------- ssl_jax


def jax_column(args, steps_per_loop: int):
  import jax
  import numpy as np

  from ssl_jax import parallel, train
  mesh = parallel.make_mesh()
  config = moco_v3_config(args)
  config.update(steps_per_loop=steps_per_loop, log_every_steps=steps_per_loop, checkpoint_every_steps=steps_per_loop)
  start = time.perf_counter()
  config, _, state, step_fn, loop_fn, _ = train.build(config, mesh, num_train_examples=NUM_TRAIN,
                                                      num_classes=NUM_CLASSES)
  build_s = time.perf_counter() - start
  size = lambda tree: int(sum(np.size(leaf) for leaf in jax.tree.leaves(tree)))
  counts = {"online": size(state.params), "frozen": size(state.params["encoder"]["patch_embed"]),
            "momentum": size(state.method_state["target_params"]),
            "bn_statistics": size(state.batch_stats) + size(state.method_state["target_batch_stats"])}
  step_fn, batch = columns.step_and_batch(mesh, step_fn, loop_fn, random_batch(args.batch_size), steps_per_loop)
  progress(f"built in {build_s:.1f} s; compiling")
  compiled_setup, compiled, run_step = columns.compile_jax_step(step_fn, state, batch)
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) and cost else cost) or {}
  gflop = cost.get("flops", 0.0) / 1e9

  progress(f"compiled in {compiled_setup['compile_s']:.1f} s; first step")
  start = time.perf_counter()
  metrics = run_step()
  first_step_s = time.perf_counter() - start  # the first call: steps_per_loop steps
  name = f"ssl_jax (jax {jax.__version__}, XLA:CPU" + (f", steps_per_loop={steps_per_loop})" if loop_fn else ")")
  setup = {"column": name, "build_s": build_s, **compiled_setup, "first_step_s": first_step_s,
           # XLA's cost analysis counts a loop's body once (checked: the same figure for K = 1 and 2): one step
           "first_loss": float(np.ravel(metrics["loss"])[0]), "params": counts, "xla_gflop": gflop,
           "devices": jax.device_count(), "total_steps": config.total_steps, "steps_per_call": steps_per_loop}
  return setup, run_step


# ------------------------------------------------------------------------------------------------ PyTorch


def sincos_table(dim: int, grid: int):
  """[1 + grid * grid, dim] float32: the class-token slot (zeros), then MoCo v3's fixed 2-D sin-cos
  embedding of a grid x grid patch grid in row-major order, the row's sines and cosines first (MoCo v3's
  ordering, model.init="moco_v3")."""
  import numpy as np
  quarter = dim // 4
  omega = 1.0 / 10000.0 ** (np.arange(quarter) / quarter)
  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
  a, b = rows.reshape(-1, 1) * omega, cols.reshape(-1, 1) * omega
  table = np.concatenate([np.sin(a), np.cos(a), np.sin(b), np.cos(b)], axis=1)
  return np.concatenate([np.zeros((1, dim)), table]).astype(np.float32)


def torch_column(args, spec: dict):
  """The same step in plain PyTorch eager: same shapes, loss, momentum update, probe and optimizer."""
  import torch
  import torch.nn.functional as F
  from torch import nn
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  dim, heads, p = spec["embed_dim"], spec["num_heads"], spec["patch_size"]
  temperature = spec["temperature"]

  def uniform_(tensor, bound):
    return nn.init.uniform_(tensor, -bound, bound)

  def lecun_normal_(weight):  # flax's Dense default (the heads and the probe)
    std = weight.shape[1] ** -0.5 / 0.87962566103423978
    return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)

  class Attention(nn.Module):
    def __init__(self):
      super().__init__()
      self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
      n, tokens, _ = x.shape
      q, k, v = self.qkv(x).reshape(n, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
      if args.torch_attention == "sdpa":
        y = F.scaled_dot_product_attention(q, k, v)
      else:
        y = torch.softmax(q @ k.transpose(-2, -1) * (dim // heads) ** -0.5, dim=-1) @ v
      return self.proj(y.transpose(1, 2).reshape(n, tokens, dim))

  class Block(nn.Module):
    def __init__(self, drop_path: float):
      super().__init__()
      hidden = int(dim * spec["mlp_ratio"])
      self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention()
      self.norm2 = nn.LayerNorm(dim, eps=1e-6)
      self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
      self.drop_path = drop_path

    def branch(self, y):
      if not self.training or self.drop_path == 0.0:
        return y
      keep = 1.0 - self.drop_path
      return y * torch.empty(y.shape[0], 1, 1).bernoulli_(keep) / keep

    def forward(self, x):
      x = x + self.branch(self.attn(self.norm1(x)))
      return x + self.branch(self.mlp(self.norm2(x)))

  class ViT(nn.Module):
    def __init__(self):
      super().__init__()
      grid = spec["image_size"] // p
      self.patch_embed = nn.Conv2d(3, dim, p, p)
      self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
      self.register_buffer("pos_embed", torch.from_numpy(sincos_table(dim, grid))[None])
      rates = [spec["drop_path"] * i / max(spec["depth"] - 1, 1) for i in range(spec["depth"])]
      self.blocks = nn.Sequential(*(Block(rate) for rate in rates))
      self.norm = nn.LayerNorm(dim, eps=1e-6)
      # MoCo v3's initialization (vits.py): xavier-uniform Linears with zero biases, qkv's bound as if Q, K
      # and V were three D x D matrices, cls token normal(1e-6), patch projection xavier-uniform, frozen.
      for name, module in self.named_modules():
        if isinstance(module, nn.Linear):
          bound = math.sqrt(6.0 / (2 * dim)) if name.endswith("qkv") else \
              math.sqrt(6.0 / sum(module.weight.shape))
          uniform_(module.weight, bound)
          nn.init.zeros_(module.bias)
      nn.init.normal_(self.cls_token, std=1e-6)
      uniform_(self.patch_embed.weight, math.sqrt(6.0 / (3 * p * p + dim)))
      nn.init.zeros_(self.patch_embed.bias)
      self.patch_embed.requires_grad_(False)  # --stop-grad-conv1

    def forward(self, x):
      x = self.patch_embed(x).flatten(2).transpose(1, 2)
      x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
      return self.norm(self.blocks(x))[:, 0]

  def mlp(layers, in_dim, hidden, out_dim, output_bn=True):
    """MoCo v3's heads (builder.py _build_mlp): Linear without bias, BN + ReLU after the hidden layers, BN
    without affine at the end."""
    modules = []
    for i in range(layers):
      last = i == layers - 1
      modules.append(nn.Linear(in_dim if i == 0 else hidden, out_dim if last else hidden, bias=False))
      lecun_normal_(modules[-1].weight)
      if not last:
        modules += [nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
      elif output_bn:
        modules.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*modules)

  encoder = ViT()
  projector = mlp(spec["proj_layers"], dim, spec["proj_hidden"], spec["proj_dim"])
  predictor = mlp(2, spec["proj_dim"], spec["pred_hidden"], spec["proj_dim"], spec["pred_output_bn"])
  probe = nn.Linear(dim, NUM_CLASSES) if spec["online_probe"] else None
  if probe is not None:
    lecun_normal_(probe.weight)
    nn.init.zeros_(probe.bias)
  base = nn.Sequential(encoder, projector)
  momentum_net = copy.deepcopy(base).requires_grad_(False)
  online = [base, predictor] + ([probe] if probe is not None else [])
  base_params, momentum_params = list(base.parameters()), list(momentum_net.parameters())
  trainable = [q for module in online for q in module.parameters() if q.requires_grad]
  try:
    optimizer = torch.optim.AdamW(trainable, lr=spec["learning_rate"], betas=(spec["b1"], spec["b2"]),
                                  weight_decay=spec["weight_decay"], fused=True)
    optimizer_kind = "fused"
  except (RuntimeError, ValueError):  # a build without the fused CPU kernel
    optimizer = torch.optim.AdamW(trainable, lr=spec["learning_rate"], betas=(spec["b1"], spec["b2"]),
                                  weight_decay=spec["weight_decay"], foreach=True)
    optimizer_kind = "foreach"

  def numel(modules, frozen=None):
    return sum(q.numel() for module in modules for q in module.parameters()
               if frozen is None or q.requires_grad != frozen)

  counts = {"online": numel(online), "frozen": numel(online, frozen=True), "momentum": numel([momentum_net]),
            "bn_statistics": sum(b.numel() for module in online + [momentum_net]
                                 for name, b in module.named_buffers()
                                 if name.endswith(("running_mean", "running_var")))}

  def momentum(step):  # optim.cosine_increase: base -> 1 over the run
    if not spec["cosine_momentum"]:
      return spec["base_momentum"]
    progress_ = min(step / max(spec["total_steps"], 1), 1.0)
    return 1.0 - (1.0 - spec["base_momentum"]) * (math.cos(math.pi * progress_) + 1.0) / 2.0

  def contrastive(q, k):  # moco/builder.py ctr_loss on one device
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / temperature
    return F.cross_entropy(logits, torch.arange(q.shape[0])) * (2 * temperature)

  data = random_batch(args.batch_size, spec["image_size"])
  x1, x2 = (torch.from_numpy(v).permute(0, 3, 1, 2).contiguous() for v in data["views"])
  labels = torch.from_numpy(data["label"]).long()
  autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
  step_count = [0]

  def run_step():
    optimizer.zero_grad(set_to_none=True)
    with autocast:
      h1 = encoder(x1)
      q1 = predictor(projector(h1))
      q2 = predictor(projector(encoder(x2)))
      with torch.no_grad():  # the momentum update, then the keys (builder.py l.89-94)
        torch._foreach_lerp_(momentum_params, base_params, 1.0 - momentum(step_count[0]))
        k1, k2 = momentum_net(x1), momentum_net(x2)
      loss = contrastive(q1.float(), k2.float()) + contrastive(q2.float(), k1.float())
      total = loss
      if probe is not None:
        total = total + F.cross_entropy(probe(h1.detach()).float(), labels)
    total.backward()
    optimizer.step()
    step_count[0] += 1
    return loss.detach()

  start = time.perf_counter()
  first_loss = float(run_step())
  first_step_s = time.perf_counter() - start
  name = f"PyTorch {torch.__version__} (eager, {args.torch_attention} attention, {optimizer_kind} AdamW)"
  return {"column": name, "first_step_s": first_step_s, "first_loss": first_loss, "params": counts,
          "threads": torch.get_num_threads()}, run_step


# ---------------------------------------------------------------------------------------------- driver


def run_worker(args):
  if args.worker.startswith("jax"):
    return columns.serve(*jax_column(args, int(args.worker.partition(":")[2] or 1)))
  return columns.serve(*torch_column(args, json.loads(args.spec)))


def describe_params(counts: dict) -> str:
  return (f"{counts['online']:,} online parameters ({counts['frozen']:,} of them frozen), "
          f"{counts['momentum']:,} momentum-network parameters, {counts['bn_statistics']:,} BN running statistics")


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  columns.pin_threads(args.threads)
  if args.worker:
    return run_worker(args)
  columns.check_turns(args)
  try:
    loops = [int(k) for k in args.steps_per_loop.split(",")]
  except ValueError:
    loops = [0]
  if not loops or min(loops) < 1 or len(set(loops)) < len(loops):
    sys.exit(f"error: --steps_per_loop must be distinct integers >= 1 separated by commas, got {args.steps_per_loop!r}")

  from ssl_jax.errors import ConfigError
  try:
    spec = step_spec(args)
  except ConfigError as e:
    sys.exit(f"error: {e}")
  print(f"MoCo v3 {args.arch}/{spec['patch_size']} ({spec['embed_dim']} dim, {spec['depth']} blocks, "
        f"{spec['num_heads']} heads, {(spec['image_size'] // spec['patch_size']) ** 2 + 1} tokens), heads "
        f"{spec['proj_hidden']}-{spec['proj_hidden']}-{spec['proj_dim']} / {spec['pred_hidden']}-{spec['proj_dim']}, "
        f"{args.dtype}, global batch {args.batch_size} x 2 views of {spec['image_size']}x{spec['image_size']}, "
        f"{args.steps} timed steps after {args.warmup} warm-up, {args.threads} threads, {os.cpu_count()} CPUs on "
        f"this machine", flush=True)
  load = os.getloadavg()[0]
  if load > 0.5:
    # Measured on this 2-core VM with one core busy elsewhere: PyTorch's 2 OpenMP threads took 4x as long
    # per step as 1 thread did (every op waits at a barrier for the descheduled thread); XLA suffers less.
    print(f"warning: load average {load:.1f} before the run: other processes share these cores, which slows "
          f"both columns and PyTorch's (OpenMP) by far the most; the figures are not comparable", flush=True)
  jax_names = [] if args.no_jax else ["jax" if k == 1 else f"jax:{k}" for k in loops]
  names = jax_names + (["torch"] if columns.torch_wanted(args, "torch==2.13.0") else [])
  label = {"jax": "ssl_jax", "torch": "PyTorch",
           **{n: f"ssl_jax, steps_per_loop={n[4:]}" for n in jax_names if ":" in n}}
  workers = []
  for name in names:  # built one after another, so that no compilation overlaps another column's step
    print(f"{label[name]}: building, compiling, first step", flush=True)
    w = (columns.StepWorker(__file__, argv, name, ["--spec", json.dumps(spec)], python=args.torch_python,
                            huge_pages=args.huge_pages == "both") if name == "torch"
         else columns.StepWorker(__file__, argv, name, huge_pages=args.huge_pages != "none"))
    workers.append(w)
    if w.setup:
      s = w.setup
      print(f"  {s['column']}: " + (f"compile {s['compile_s']:.1f} s, " if "compile_s" in s else "")
            + f"first step {s['first_step_s']:.1f} s, first-step loss {s['first_loss']:.4f}", flush=True)
      print(f"  {describe_params(s['params'])}", flush=True)
  setups = {w.worker: w.setup for w in workers if w.setup}
  expected = 2 * 2 * spec["temperature"] * math.log(args.batch_size)
  if setups:
    print(f"first-step loss on the same views (two terms of 2T log(batch) each when the logits are uniform: "
          f"{expected:.4f}): " + ", ".join(f"{label[n]} {s['first_loss']:.4f}" for n, s in setups.items()))
  if len(setups) > 1:
    same = len({json.dumps(s["params"], sort_keys=True) for s in setups.values()}) == 1
    print("parameter counts: " + ("equal" if same else "DIFFER: the columns do not do the same work: "
                                  + json.dumps({n: s["params"] for n, s in setups.items()})), flush=True)
  gflop = next((s["xla_gflop"] for n, s in setups.items() if n.startswith("jax")), 0.0)
  if gflop:
    print(f"XLA's cost analysis of the step: {gflop:.0f} GFLOP", flush=True)

  per_round = []  # per round: {worker: {step_s, best_step_s, peak_rss_mib, images_per_s, and the setup}}
  try:
    for w, r in columns.take_turns(workers, args, label.get, per_round):
      detail = f"peak RSS {r['peak_rss_mib']:.0f} MiB"
      if "xla_peak_mib" in r:
        detail += f"; XLA memory analysis {r['xla_peak_mib']:.0f} MiB (temp {r['xla_temp_mib']:.0f} MiB)"
      if gflop:
        detail += f"; {gflop / r['step_s']:.1f} GFLOP/s"
      print(f"  {columns.speed(r)}; {detail}", flush=True)
      rnd = per_round[-1]
      if w.worker == "torch":  # the round's last turn: each ssl_jax column of the round against it
        for n in jax_names:
          if n in rnd:
            print(f"  round {len(per_round)}: {label[n]} at {100 * rnd['torch']['step_s'] / rnd[n]['step_s']:.0f}% "
                  f"of PyTorch's speed", flush=True)
  finally:
    for w in workers:
      w.close()

  results = columns.median_rounds(names, per_round)
  ratios = {n: [rnd["torch"]["step_s"] / rnd[n]["step_s"] for rnd in per_round if {n, "torch"} <= set(rnd)]
            for n in jax_names}
  ratios = {n: q for n, q in ratios.items() if q}
  for n, q in ratios.items():
    print(f"{label[n]} speed / PyTorch's, per round: " + ", ".join(f"{100 * x:.0f}%" for x in q)
          + f"; median {100 * statistics.median(q):.0f}%")

  headings = (*columns.STEP_TABLE[:4], "first step (s)", *columns.STEP_TABLE[4:], "first-step loss")
  columns.print_table(results, args.batch_size, headings, lambda r: {"first step (s)": f"{r['first_step_s']:.1f}",
                                                                   "first-step loss": f"{r['first_loss']:.3f}"})
  for n, q in ratios.items():
    print(f"| {label[n]} / PyTorch, per round | " + ", ".join(f"{100 * x:.0f}%" for x in q) + " | | | | | | |")
  print(f"\nMoCo v3 {args.arch}/{spec['patch_size']}, heads {spec['proj_hidden']}, {args.dtype}, global batch "
        f"{args.batch_size}, 32x32, {args.threads} CPU threads; median and best of {args.steps} steps after "
        f"{args.warmup} warm-up, {args.rounds} round(s); a busy machine shows as a gap between the two.")


if __name__ == "__main__":
  main()
