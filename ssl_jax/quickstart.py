"""The main job (README command 1): pre-train on the embedded CIFAR-10 subset, then evaluate.

  python -m ssl_jax.quickstart --workdir=workdirs/quickstart [--config=configs/quickstart.py]
      [--config.key=value ...]

1. pre-trains (resuming if the workdir already has checkpoints),
2. computes kNN top-1 at every checkpoint (the learning curve),
3. runs kNN and the fast linear probe for the final encoder, a randomly initialized one and raw pixels,
4. prints the comparison table and writes DIR/quickstart.png (training loss and kNN accuracy).
"""

from __future__ import annotations

import json
import os

from absl import app, flags
from ml_collections import config_flags

from ssl_jax import distributed
from ssl_jax import host_memory

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                           "quickstart.py"), "pre-training config", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/quickstart", "output directory")
distributed.define_flags()


def knn_curve(workdir, cfg, encoder):
  """[(step, kNN top-1 at k=20)] over the saved checkpoints, step 0 being the random initialization."""
  from ssl_jax.evaluate import knn
  info = encoder.info
  k = 20
  curve = []
  states = [(0, encoder.initial_state, ("random",))]
  for step in sorted(encoder_steps(workdir, cfg)):
    states.append((step, encoder.restore(workdir, step), ("step", step)))
  for step, state, key in states:
    train_x, train_y = encoder.features(state, info.train_split, key)
    test_x, test_y = encoder.features(state, info.test_split, key)
    acc = knn.knn_accuracy(train_x, train_y, test_x, test_y, (k,), info.num_classes, cfg.eval.knn_temperature)
    curve.append((step, acc[f"knn_top1_k{k}"]))
    print(f"kNN (k={k}) at step {step}: {100 * curve[-1][1]:.2f}%", flush=True)
  return curve


def encoder_steps(workdir, cfg):
  from ssl_jax import checkpoint as ckpt_lib
  return ckpt_lib.Manager(workdir, cfg, create=False).all_steps()


def plot(workdir, curve, final):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl")) if line.strip()]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  ax1.plot([r["step"] for r in rows], [r["loss"] for r in rows])
  ax1.set(xlabel="step", ylabel="pre-training loss", title="training loss")
  ax2.plot([s for s, _ in curve], [100 * a for _, a in curve], marker="o", label="SSL encoder")
  for name, style in (("random_init", "--"), ("raw_pixels", ":")):
    ax2.axhline(100 * final["knn"]["results"][name]["knn_top1_k20"], linestyle=style, color="gray",
                label=name.replace("_", " "))
  ax2.set(xlabel="step", ylabel="kNN top-1 (%), k=20", title="kNN accuracy over checkpoints")
  ax2.legend()
  fig.tight_layout()
  path = os.path.join(workdir, "quickstart.png")
  fig.savefig(path, dpi=100)
  return path


def table(final) -> str:
  lines = ["| encoder | kNN top-1 (k=20) | linear probe top-1 |", "|---|---|---|"]
  for name in final["knn"]["results"]:
    lines.append(f"| {name} | {100 * final['knn']['results'][name]['knn_top1_k20']:.2f}% | "
                 f"{100 * final['linear']['results'][name]['linear_top1']:.2f}% |")
  return "\n".join(lines)


def main(argv):
  del argv
  with distributed.user_errors_exit():
    distributed.initialize_from_flags()
    import jax
    from ssl_jax import parallel, train
    from ssl_jax.evaluate import run
    cfg, workdir = _CONFIG.value, _WORKDIR.value
    summary = train.train(cfg, workdir)
    if summary["preempted"]:
      return
    resolved = run.load_config(workdir)
    encoder = run.Encoder(resolved, parallel.make_mesh(), cache_features=True)
    curve = knn_curve(workdir, resolved, encoder)
    final = {p: run.evaluate(workdir, p, cfg=resolved, encoder=encoder) for p in ("knn", "linear")}
    if jax.process_index() == 0:
      path = plot(workdir, curve, final)
      print(f"\n{resolved.method.name}, {summary['step']} steps on {resolved.dataset} "
            f"({final['knn']['num_train']} train / {final['knn']['num_test']} test images)\n")
      print(table(final))
      print(f"\nplot: {path}\nresults: {os.path.join(workdir, 'eval', 'results.md')}")


if __name__ == "__main__":
  host_memory.reexec_with_huge_pages()  # XLA:CPU's step buffers on huge pages (CPU speed only)
  app.run(main, flags_parser=distributed.parse_flags_or_exit)
