"""Writes the embedded CIFAR-10 subset (ssl_jax/data/embedded) as a folder of image files, the layout that
`--config.dataset=folder` reads, for trying image folders without your own images:

    python scripts/embedded_to_folder.py /tmp/cifar_folder                  # train/ and test/ class folders
    python scripts/embedded_to_folder.py /tmp/cifar_flat --layout flat --format jpg

Layouts: `splits` (OUT/train/<class>/*.png, OUT/test/<class>/*.png), `classes` (OUT/<class>/*.png, both
splits together: the folder dataset holds some out), `flat` (OUT/*.png, no labels).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ssl_jax.data import folder  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("out", help="the folder to write (must not exist or be empty)")
  parser.add_argument("--layout", choices=("splits", "classes", "flat"), default="splits")
  parser.add_argument("--format", choices=("png", "jpg"), default="png")
  parser.add_argument("--per_class", type=int, default=0, help="at most this many images of each class and split")
  args = parser.parse_args()
  if os.path.exists(args.out) and os.listdir(args.out):
    sys.exit(f"error: {args.out} exists and is not empty")
  written = folder.write_embedded(args.out, args.layout, args.format, args.per_class)
  print(f"wrote {written} images to {args.out} ({args.layout}, {args.format})")


if __name__ == "__main__":
  main()
