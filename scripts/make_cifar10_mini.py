"""Builds the embedded CIFAR-10 subset shipped in ssl_jax/data/embedded (run once; the output is committed).

The first N examples of each class, in file order, of a prepared TFDS cifar10 (3.0.2) are copied as raw
serialized records into a TFDS directory of the same format, so `tfds.builder("cifar10",
data_dir=ssl_jax/data/embedded)` reads it like any prepared copy:

    python scripts/make_cifar10_mini.py --source ../shared/data/tfds --train_per_class 400 --test_per_class 100
"""

import argparse
import collections
import json
import pathlib
import shutil

import tensorflow as tf
import tensorflow_datasets as tfds

OUT = pathlib.Path(__file__).resolve().parent.parent / "ssl_jax" / "data" / "embedded" / "cifar10" / "3.0.2"


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--source", required=True, help="data_dir holding a prepared cifar10/3.0.2")
  parser.add_argument("--train_per_class", type=int, default=400)
  parser.add_argument("--test_per_class", type=int, default=100)
  args = parser.parse_args()
  src = pathlib.Path(args.source) / "cifar10" / "3.0.2"
  features = tfds.builder("cifar10", data_dir=args.source).info.features
  OUT.mkdir(parents=True, exist_ok=True)
  info = json.loads((src / "dataset_info.json").read_text())
  for split in info["splits"]:
    per_class = args.train_per_class if split["name"] == "train" else args.test_per_class
    counts = collections.Counter()
    name = f"cifar10-{split['name']}.tfrecord-00000-of-00001"
    kept, size = 0, 0
    with tf.io.TFRecordWriter(str(OUT / name)) as writer:
      for record in tf.data.TFRecordDataset(str(src / name)):
        label = int(features.deserialize_example(record)["label"])
        if counts[label] < per_class:
          counts[label] += 1
          writer.write(record.numpy())
          kept += 1
          size += len(record.numpy())
    split["shardLengths"] = [str(kept)]
    split["numBytes"] = str(size)
    print(split["name"], kept, dict(sorted(counts.items())))
  info["description"] = (f"A class-balanced subset of CIFAR-10 ({args.train_per_class} train and "
                         f"{args.test_per_class} test images per class, the first of each class in the "
                         "prepared copy's order), embedded in ssl_jax. " + info["description"])
  (OUT / "dataset_info.json").write_text(json.dumps(info, indent=2))
  for extra in ("features.json", "label.labels.txt"):
    shutil.copy(src / extra, OUT / extra)


if __name__ == "__main__":
  main()
