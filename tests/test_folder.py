"""dataset=folder (ssl_jax/data/folder.py) and the embed command: layouts and held-out splits, the cached
index, damaged files, the same pixels as the TFDS copy of the same images, an exactly resumable
pre-training stream, and training + kNN + embed on a folder end to end."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from ssl_jax import config as config_lib
from ssl_jax.data import datasets, folder, pipeline
from ssl_jax.data.integrity import DataError


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """The embedded subset (10 train + 10 test images a class) as PNG split folders, and as JPEG class
  folders (both splits pooled)."""
  root = tmp_path_factory.mktemp("folders")
  folder.write_embedded(str(root / "splits"), "splits", "png", per_class=10)
  folder.write_embedded(str(root / "classes"), "classes", "jpg", per_class=10)
  return root


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  folder._BUILDERS.clear()


def folder_cfg(data_dir, **folder_settings):
  cfg = config_lib.load(f"{REPO}/configs/simclr.py:cifar10,tiny")
  cfg.update(dataset="folder", data_dir=str(data_dir), batch_size=16, shuffle_buffer=64)
  cfg.folder.update(image_size=32, eval_crop_proportion=1.0, **folder_settings)
  return cfg


def test_layouts_labels_and_seeded_held_out_split(folders, tmp_path):
  b = pipeline.builder_of(folder_cfg(folders / "splits"))
  assert b.info.splits["train"].num_examples == 100 and b.info.splits["test"].num_examples == 100
  assert b.class_names == sorted(os.listdir(folders / "splits" / "train")) and "label" in b.info.features
  assert all(f.startswith("test" + os.sep) for f in b.file_names("test"))
  # Class folders without split folders: 0.1 x 20 = 2 images of each class held out.
  pooled = pipeline.builder_of(folder_cfg(folders / "classes"))
  test = pooled.file_names("test")
  assert len(test) == 10 * 2 and not set(test) & set(pooled.file_names("train"))
  assert sorted(pooled.file_names("all")) == pooled.file_names("all") and len(pooled.file_names("all")) == 200
  folder._BUILDERS.clear()
  again = pipeline.builder_of(folder_cfg(folders / "classes"))
  assert again.file_names("test") == test  # the same split settings draw the same split and order
  other = pipeline.builder_of(folder_cfg(folders / "classes", split_seed=1))
  assert set(other.file_names("test")) != set(test)
  from ssl_jax.evaluate import subsets  # the semi-supervised protocol's class-balanced labels
  _, kept, _ = subsets.subset_filter("folder", pooled, "train", 0.1, seed=0)
  assert kept == 10 * round(0.1 * 18)
  info = datasets.of(folder_cfg(folders / "classes"))
  assert (info.num_classes, info.image_size, info.test_split) == (10, 32, "test")
  # A flat folder: unlabelled, a held-out share all the same.
  flat = tmp_path / "flat"
  folder.write_embedded(str(flat), "flat", "png", per_class=2)
  fb = pipeline.builder_of(folder_cfg(flat))
  assert "label" not in fb.info.features and fb.class_names == []
  assert fb.info.splits["train"].num_examples + fb.info.splits["test"].num_examples == 40


def test_index_is_cached_and_redone_when_a_directory_changes(folders, tmp_path, monkeypatch):
  data = tmp_path / "data"
  folder.write_embedded(str(data), "classes", "png", per_class=1)
  calls = []
  real = folder._index
  monkeypatch.setattr(folder, "_index", lambda d: calls.append(d) or real(d))
  assert len(folder._cached_index(str(data))["bad"]) == 0 and len(calls) == 1
  folder._cached_index(str(data))
  assert len(calls) == 1  # from the cache
  (data / "cat" / "new.png").write_bytes((data / "cat" / os.listdir(data / "cat")[0]).read_bytes())
  os.utime(data / "cat", ns=(1, 1))  # a new modification time, whatever the clock's resolution
  index = folder._cached_index(str(data))
  assert len(calls) == 2 and os.path.join("cat", "new.png") in index["parts"][""]["cat"]


def test_damaged_files_are_named_or_skipped_and_counted(tmp_path):
  data = tmp_path / "data"
  folder.write_embedded(str(data), "classes", "jpg", per_class=2)
  good = sorted((data / "dog").iterdir())[0]
  (data / "dog" / "cut.jpg").write_bytes(good.read_bytes()[:200])
  (data / "dog" / "notes.png").write_text("not an image")
  with pytest.raises(DataError, match=r"cut\.jpg: truncated JPEG .*and 1 more.*folder\.skip_bad=True"):
    pipeline.builder_of(folder_cfg(data))
  b = pipeline.builder_of(folder_cfg(data, skip_bad=True))
  assert b.skipped == 2 and b.info.splits["all"].num_examples == 40
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(DataError, match="no images in"):
    pipeline.builder_of(folder_cfg(empty))


def test_folder_reads_the_pixels_of_the_tfds_copy(folders):
  """The PNG files are the TFDS records' bytes: the evaluation batches hold the same images."""
  cfg = folder_cfg(folders / "splits")
  cfg.normalize_inputs = False  # compare the pixels themselves (a folder normalizes with ImageNet's statistics)
  ours = np.concatenate([b["image"][b["mask"]] for b in pipeline.eval_batches(cfg, "test", 64, 32, 1.0)])
  ref_cfg = folder_cfg(folders / "splits")
  ref_cfg.update(dataset="cifar10", data_dir=datasets.EMBEDDED_DATA_DIR, normalize_inputs=False)
  ref = np.concatenate([b["image"] for b in pipeline.eval_batches(ref_cfg, "test", 100, 32, 1.0)])
  # The folder holds the first 10 test images of each class; the TFDS split all 1,000 in record order.
  ours, ref = (np.rint(255 * x).astype(np.uint8) for x in (ours, ref))
  found = {r.tobytes() for r in ref}
  assert len(ours) == 100 and all(o.tobytes() in found for o in ours)


def test_pretraining_stream_resumes_exactly(folders):
  from ssl_jax import methods
  cfg = folder_cfg(folders / "classes")
  views = methods.get(cfg, methods.DataFacts(180, cfg.batch_size)).views()
  whole = pipeline.pretrain_batches(cfg, views, 16)
  batches = [next(whole) for _ in range(3)]
  resumed = next(pipeline.pretrain_batches(cfg, views, 16, start_step=2))
  for a, b in zip(batches[2]["views"], resumed["views"]):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(batches[2]["index"], resumed["index"])
  assert batches[0]["views"][0].shape == (16, 32, 32, 3)


def test_train_evaluate_and_embed_on_a_folder(folders, tmp_path):
  from ssl_jax import embed, train
  from ssl_jax.evaluate import run
  cfg = folder_cfg(folders / "classes")
  cfg.update(total_steps=2, checkpoint_every_steps=2, log_every_steps=1)
  cfg.model.width = 8
  cfg.eval.baselines = False
  workdir = str(tmp_path / "run")
  train.train(cfg, workdir)
  out = run.evaluate(workdir, "knn")
  assert out["num_train"] == 180 and out["num_test"] == 20 and out["dataset"] == "folder"
  # embed: every image of a folder, the features evaluation computes for the same image.
  names, feats = embed.embed(workdir, str(folders / "classes"), str(tmp_path / "emb.npz"))
  saved = np.load(tmp_path / "emb.npz")
  assert list(saved["file_name"]) == names and len(names) == 200 and saved["features"].shape == feats.shape
  assert list(saved["class_names"]) == sorted(os.listdir(folders / "classes"))
  encoder = run.Encoder(cfg, run.parallel.make_mesh())
  state, _ = encoder.restore_latest(workdir)
  test_x, _ = encoder.features(state, "test")
  row = {n: i for i, n in enumerate(names)}
  test_names = pipeline.builder_of(cfg).file_names("test")
  np.testing.assert_allclose(feats[[row[n] for n in test_names]], test_x, rtol=1e-5, atol=1e-5)
  embed.write(str(tmp_path / "emb.csv"), names[:2], feats[:2])
  lines = (tmp_path / "emb.csv").read_text().splitlines()
  assert lines[0].startswith("file_name,f0,f1") and lines[1].split(",")[0] == names[0] and len(lines) == 3
  assert np.allclose([float(v) for v in lines[1].split(",")[1:]], feats[0], rtol=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--images={empty}", "--out={tmp}/e.npz"], "no images in"),
    (["--images={tmp}/missing", "--out={tmp}/e.npz"], "is not a directory"),
    (["--images={empty}", "--out={tmp}/e.txt"], "must end with .npz or .csv"),
])
def test_embed_bad_input_one_line_exit_2(args, message, tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "config.json").write_text(config_lib.load(f"{REPO}/configs/simclr.py:tiny").to_json())
  args = [a.format(empty=tmp_path / "empty", tmp=tmp_path) for a in args]
  result = subprocess.run([sys.executable, "-m", "ssl_jax.embed", f"--workdir={tmp_path / 'run'}", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache")))
  assert result.returncode == 2, result.stderr
  assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
