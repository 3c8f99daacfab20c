"""benchmarks/cifar10_suite.py's budget fitting: every method's start-up transients end inside the run.

A freeze or warm-up longer than the run silently turns a method off (the 300-step suite of 2026-12-05 kept
SwAV's prototypes and DINO's last layer frozen for the whole run), so each is checked on the resolved
config, in steps, the way the optimizer will read it. Configs only: no data, no training.
"""

import importlib.util
import pathlib

import pytest

from ssl_jax import config as config_lib

REPO = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("cifar10_suite", REPO / "benchmarks" / "cifar10_suite.py")
suite = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(suite)

NUM_TRAIN = 50_000
BATCH = 128


def _freeze_steps(settings: dict, steps_per_epoch: float) -> int:
  """The step a group's parameters start training at (0: never frozen), as optim.param_settings reads it."""
  if settings.get("frozen"):
    return config_lib.FROZEN_FOREVER
  if settings.get("frozen_until_epoch") is not None:
    return int(round(settings["frozen_until_epoch"] * steps_per_epoch))
  return settings.get("frozen_until_step", 0)


# Every method's suite row, and the DINO ViT recipe the suite ran before its row took lightly's ResNet one.
ROWS = [(m, ()) for m in suite.available_methods()] + [("dino", ("--method_variants", "dino=cifar10,tiny"))]


@pytest.mark.parametrize("total_steps", [300, 4_687])
@pytest.mark.parametrize("method,extra", ROWS)
def test_start_up_transients_end_within_a_tenth_of_the_run(method, extra, total_steps):
  args = suite.parse_args(["--total_steps", str(total_steps), "--batch_size", str(BATCH), "--conv_impl", "xla",
                           *extra])
  cfg = suite.method_config(method, args, NUM_TRAIN, "xla")
  recipe = config_lib.load(f"{REPO / 'configs' / method}.py:{suite.variants_of(args, method)}")
  assert [g[0] for g in cfg.optimizer.groups] == [g[0] for g in recipe.optimizer.groups]
  steps_per_epoch = NUM_TRAIN / BATCH
  tenth = max(1, round(min(1.0, total_steps / steps_per_epoch / 10) * steps_per_epoch))
  opt = cfg.optimizer
  assert opt.warmup_epochs * steps_per_epoch <= tenth + 1
  for (regex, settings), (_, recipe_settings) in zip(opt.groups, recipe.optimizer.groups):
    until = _freeze_steps(settings, steps_per_epoch)
    if _freeze_steps(recipe_settings, steps_per_epoch) == config_lib.FROZEN_FOREVER:
      assert until == config_lib.FROZEN_FOREVER, (regex, settings)   # MoCo v3's patch embedding stays frozen
    else:
      assert until <= tenth, (method, regex, settings, tenth)
  run_epochs = total_steps / steps_per_epoch
  assert all(e < run_epochs for e in opt.lr_drop_epochs)
  assert cfg.method.get("queue_start_epoch", 0) < run_epochs
  if recipe.method.get("queue_start_epoch", 0) > 0:   # SwAV's queue: after the transients, as in its recipes
    start = round(cfg.method.queue_start_epoch * steps_per_epoch)   # DataFacts.steps rounds
    assert start >= max([opt.warmup_epochs * steps_per_epoch - 1] +
                        [_freeze_steps(s, steps_per_epoch) for _, s in opt.groups]), (method, start)
  for key in ("queue_size", "queue_length"):
    assert cfg.method.get(key, 0) % BATCH == 0


def test_temporary_freezes_exist_to_be_fitted():
  """The check above is only as good as the configs it sees: SwAV and DINO do freeze a group for a while."""
  args = suite.parse_args(["--total_steps", "300", "--method_variants", "dino=cifar10,tiny"])
  temporary = {m for m in ("swav", "dino")
               for _, s in config_lib.load(f"{REPO / 'configs' / m}.py:{suite.variants_of(args, m)}").optimizer.groups
               if 0 < _freeze_steps(s, NUM_TRAIN / BATCH) < config_lib.FROZEN_FOREVER}
  assert temporary == {"swav", "dino"}


def test_minutes_budget_fixes_each_methods_steps_once(tmp_path, monkeypatch):
  """--minutes: steps = minutes x the calibration's images/s (its first interval, the compilation, left
  out) / batch, measured once and kept in suite.json, so a resumed run keeps the same schedule."""
  from ssl_jax import train as train_lib
  calls = []

  def fake_train(cfg, workdir, stop_at_step=None):
    calls.append((cfg.total_steps, stop_at_step))
    pathlib.Path(workdir).mkdir(parents=True)
    rows = [(5, 10.0, 1.0), (10, 200.0, 2.0), (15, 256.0, 3.0), (20, 300.0, 4.0)]  # step, images/s, elapsed
    with open(pathlib.Path(workdir) / "metrics.jsonl", "w") as f:
      for step, ips, elapsed in rows:
        f.write(f'{{"step": {step}, "images_per_sec": {ips}, "elapsed_seconds": {elapsed}}}\n')
    return {"preempted": False}

  monkeypatch.setattr(train_lib, "train", fake_train)
  args = suite.parse_args(["--minutes", "2", "--batch_size", str(BATCH), "--workdir", str(tmp_path)])
  workdir = tmp_path / "simclr"
  steps = suite.calibrated_steps("simclr", args, NUM_TRAIN, "xla", str(workdir))
  assert steps == round(2 * 60 * 256.0 / BATCH)             # the median of 200, 256, 300
  assert calls == [(10 * suite.CALIBRATION_STEPS, suite.CALIBRATION_STEPS)]
  assert not (workdir / "calibration").exists()
  assert suite.calibrated_steps("simclr", args, NUM_TRAIN, "xla", str(workdir)) == steps
  assert len(calls) == 1                                   # kept, not measured again
  cfg = suite.method_config("simclr", args, NUM_TRAIN, "xla", total_steps=steps)
  assert config_lib.resolve(cfg, NUM_TRAIN).total_steps == steps


def test_minutes_and_total_steps_are_exclusive(tmp_path):
  args = suite.parse_args(["--minutes", "2", "--total_steps", "10", "--workdir", str(tmp_path)])
  assert "not both" in suite.input_error(args)


def test_method_variants_pick_one_rows_recipe_and_belong_to_its_budget(tmp_path):
  """DINO's row runs lightly's ResNet-18 recipe and SwAV's its hard codes by default; --method_variants picks
  another, and a workdir of the other recipe is refused rather than resumed."""
  args = suite.parse_args(["--total_steps", "300", "--workdir", str(tmp_path)])
  assert suite.variants_of(args, "dino") == "cifar10_resnet_lightly,tiny"
  assert suite.variants_of(args, "simclr") == args.variants == "cifar10,tiny"
  assert suite.method_config("dino", args, NUM_TRAIN, "xla").model.name == "resnet"
  assert suite.budget(args, "simclr")["variants"] == "cifar10,tiny"
  assert suite.variants_of(args, "swav") == "cifar10,tiny,hard"
  assert suite.method_config("swav", args, NUM_TRAIN, "xla").method.hard_codes
  assert suite.budget(args)["method_variants"] == {"dino": "cifar10_resnet_lightly,tiny", "swav": "cifar10,tiny,hard"}
  vit = suite.parse_args(["--total_steps", "300", "--workdir", str(tmp_path), "--method_variants", "dino=cifar10,tiny"])
  assert suite.method_config("dino", vit, NUM_TRAIN, "xla").model.name == "vit"
  assert suite.budget(vit)["method_variants"] == {"swav": "cifar10,tiny,hard"}
  (tmp_path / "dino").mkdir()
  suite.write_json(str(tmp_path / "dino" / suite.SUITE_FILE), {"budget": suite.budget(args, "dino")})
  vit.methods, vit.data_dir = ["dino"], suite.parse_args([]).data_dir
  assert "holds a run of another budget (variants: 'cifar10_resnet_lightly,tiny' -> 'cifar10,tiny')" in \
      suite.input_error(vit)
  bad = suite.parse_args(["--method_variants", "dinoo=cifar10,tiny"])
  assert "--method_variants takes METHOD=VARIANTS" in suite.input_error(bad)
