r"""Scale plan by simulation: compile (never run) the ImageNet train steps on simulated device meshes.

For each config (by default SimCLR, BYOL, MoCo v2 with their `imagenet` configs: ResNet-50, 224x224
views; `name:variant` picks another variant, e.g. mae:vit_large), each mesh size, each global batch and each
state layout (config.sharding: replicated, or fsdp, fully sharded), the step that `ssl_jax.train` runs is
lowered and compiled for a mesh of that many simulated CPU devices. From the compiled program it prints
  * per-device memory from XLA's memory analysis (arguments + outputs + temporaries - aliased donations),
  * FLOPs per step per device from XLA's cost analysis, and the whole step's FLOPs,
  * a projected step time, FLOPs / (peak FLOP/s of one device x --utilization), for TPU v3 and v4.

    python benchmarks/scale_plan.py                                     # the README table (a few minutes)
    python benchmarks/scale_plan.py --methods simclr --devices 128 --batches 4096,32768 --dtype bfloat16
    # The ViT rows: MAE ViT-B/L/H and DINO ViT-S/16, ViT-B/8 at batch 4096, replicated and fully sharded
    python benchmarks/scale_plan.py --methods mae:vit_base,mae:vit_large,mae:vit_huge,dino:vit_small,\
        dino:vit_base8 --devices 64,256 --batches 4096 --sharding replicated,fsdp --crop 0
    # InstDisc's ResNet-50 with the full ImageNet memory bank, replicated and split over the devices
    python benchmarks/scale_plan.py --methods instdisc --devices 128 --batches 256
    python benchmarks/scale_plan.py --methods instdisc --devices 128 --batches 256 \
        --set method.bank_sharding=sharded

Caveats, printed with the table: the memory is XLA:CPU's analysis of the same sharded program, not the
TPU compiler's (layouts, fusion and rematerialization differ; treat it as an order of magnitude and for
its trend with batch); the projected time assumes the FLOPs are spent at the stated utilization of the
chip's peak and ignores input, collectives and host overhead. One JAX device is one TPU v3 core (a v3-128
slice has 128) and one TPU v4 chip (a v4-64 slice has 32).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Peak dense bf16 FLOP/s of one JAX device (Google Cloud TPU system architecture pages).
PEAK_FLOPS = {"TPU v3 core": 61.5e12, "TPU v4 chip": 275e12}
IMAGENET_TRAIN_EXAMPLES = 1_281_167


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--methods", default="simclr,byol,moco_v2", help="configs, each `name` (its imagenet "
                 "variant) or `name:variant`")
  p.add_argument("--devices", default="8,32,128", help="simulated mesh sizes")
  p.add_argument("--batches", default="256,1024,4096,32768", help="global batch sizes")
  p.add_argument("--dtype", default="bfloat16", help="model.dtype (compute); parameters stay float32")
  p.add_argument("--crop", type=int, default=224, help="every view's size (0: the config's own sizes)")
  p.add_argument("--sharding", default="replicated", help="state layouts (config.sharding), comma-separated")
  p.add_argument("--utilization", type=float, default=0.5, help="assumed fraction of peak FLOP/s")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a config setting for every row, e.g. method.bank_sharding=sharded (repeatable)")
  return p.parse_args(argv)


def compile_step(method_name: str, num_devices: int, batch_size: int, dtype: str, crop: int,
                 sharding: str = "replicated", settings=()):
  """(memory analysis, cost analysis, compile seconds, parameter count) of one train step; nothing is
  executed. method_name: `name` (configs/name.py:imagenet) or `name:variant`."""
  import jax
  import numpy as np
  from ssl_jax import config as config_lib
  from ssl_jax import methods, optim, parallel, train

  name, _, variant = method_name.partition(":")
  cfg = config_lib.load(f"{REPO}/configs/{name}.py:{variant or 'imagenet'}")
  cfg.batch_size = batch_size
  cfg.model.dtype = dtype
  cfg.sharding = sharding
  config_lib.apply_settings(cfg, settings)
  if crop:
    for view in cfg.views.values():
      view.crop_size = crop
  if "queue_size" in cfg.method and cfg.method.queue_size % batch_size:
    cfg.method.queue_size = batch_size * max(1, cfg.method.queue_size // batch_size)
  cfg = config_lib.resolve(cfg, IMAGENET_TRAIN_EXAMPLES)
  mesh = parallel.make_mesh(jax.devices()[:num_devices])
  # The training data's facts: InstDisc's memory bank has a row per ImageNet image.
  method = methods.get(cfg, methods.DataFacts(IMAGENET_TRAIN_EXAMPLES, batch_size))
  schedule = optim.warmup_cosine(optim.peak_learning_rate(cfg), 1000, cfg.total_steps)

  holder = {}

  def abstract_state():
    state, holder["tx"] = train.create_train_state(cfg, method, schedule, num_classes=1000)
    return state

  state = jax.eval_shape(abstract_state)
  batch = train.init_batch(cfg, method.views())  # shapes for one example per view
  batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct((batch_size, *a.shape[1:]), a.dtype), batch)
  layout = train.state_layout(cfg, method, mesh, state)
  step = train.jit_train_step(train.make_train_step(cfg, method, holder["tx"], schedule, mesh, 1000), mesh,
                              layout)
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = step.lower(state, batch).compile()
  seconds = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  encoder = state.params["encoder"]
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(encoder))
  return compiled.memory_analysis(), cost, seconds, num_params


def main(argv=None):
  args = parse_args(argv)
  devices = [int(d) for d in args.devices.split(",")]
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={max(devices)}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import jax
  jax.config.update("jax_platforms", "cpu")

  header = ("| config | encoder params (M) | state layout | devices | global batch | per-device batch | "
            "per-device memory (GiB) | of which temporaries | GFLOP/step/device | " +
            " | ".join(f"projected step (s), {name}" for name in PEAK_FLOPS) + " | compile (s) |")
  rows = []
  views = f"{args.crop}x{args.crop} views" if args.crop else "the configs' view sizes"
  print(f"{views}, model.dtype={args.dtype}; projections at {100 * args.utilization:.0f}% of peak", flush=True)
  for method_name in args.methods.split(","):
    for n in devices:
      for b in (int(b) for b in args.batches.split(",")):
        for sharding in args.sharding.split(","):
          if b % n:
            print(f"skip {method_name} batch {b} on {n} devices (not divisible)", flush=True)
            continue
          try:
            memory, cost, seconds, num_params = compile_step(method_name, n, b, args.dtype, args.crop, sharding,
                                                            args.set)
          except Exception as e:  # a failed compile (e.g. out of host memory) is a row, not the end
            print(f"{method_name} devices={n} batch={b} {sharding}: failed: {type(e).__name__}: {str(e)[:200]}",
                  flush=True)
            continue
          total = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                   - memory.alias_size_in_bytes)
          flops = float(cost.get("flops", 0.0))
          projected = [flops / (peak * args.utilization) for peak in PEAK_FLOPS.values()]
          label = " ".join([method_name, *args.set])
          row = (f"| {label} | {num_params / 1e6:.1f} | {sharding} | {n} | {b} | {b // n} | "
                 f"{total / 2**30:.2f} | {memory.temp_size_in_bytes / 2**30:.2f} | {flops / 1e9:.0f} | " +
                 " | ".join(f"{t:.3f}" for t in projected) + f" | {seconds:.0f} |")
          rows.append(row)
          print(row, flush=True)
  print("\n" + header + "\n|" + "---|" * (header.count("|") - 1))
  print("\n".join(rows))
  print("\nMemory: XLA:CPU's analysis of the sharded program (TPU layouts and fusion differ). Projected "
        "step: FLOPs per device / (peak x utilization); input, collectives and host time ignored.")


if __name__ == "__main__":
  main()
