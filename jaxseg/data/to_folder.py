"""Writes any registered dataset in the folder layout (`--dataset=folder`), with its classes.json.

    python -m jaxseg.data.to_folder --dataset=camvid --data_dir=../shared/data/camvid \\
        --output_dir=/tmp/camvid_folder --masks=colour

A starting point for your own data (the layout, a classes.json and masks a tool can edit), a
way to hand a benchmark to a program that reads plain files, and the check that
`--dataset=folder` reads a dataset exactly as its own reader does (tests/test_data_folder.py).
Image files are copied as they are where the reader offers them (JPEG bytes stay JPEG bytes);
other images become PNG (8-bit RGB or grey) or .npy. Masks are class-id PNGs (`--masks=ids`)
or colour-coded with the dataset's palette (`--masks=colour`), ignored pixels in a colour no
class has. Every file is written under a temporary name and renamed; classes.json comes last,
so an interrupted export is not a dataset (run it again: finished files are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Sequence

import numpy as np
import tqdm
from PIL import Image

from jaxseg import data as data_lib
from jaxseg.data.files import BAD_KEY, probe_array
from jaxseg.data.folder import CLASS_FILE
from jaxseg.errors import JaxsegError

MASKS = ("ids", "colour")
# Candidates for the colour of ignored pixels, the first one no class uses.
_IGNORE_COLOURS = ((255, 255, 255), (0, 0, 0), (255, 0, 255), (1, 2, 3))


def _atomic(path: str, write) -> None:
  tmp = path + ".tmp"
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _save_png(array: np.ndarray, path: str) -> None:
  _atomic(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def ignore_colour(palette: np.ndarray) -> tuple[int, int, int]:
  used = {tuple(c) for c in np.asarray(palette).tolist()}
  return next(c for c in _IGNORE_COLOURS if c not in used)


def _write_image(source, index: int, image: np.ndarray, base: str) -> str:
  """The image file of example `index` under `base` (no suffix); returns its path."""
  image_file = getattr(source, "image_file", None)
  original = image_file(index) if callable(image_file) else None
  # The file as it is when the folder reader would decode it to these very pixels' format (a
  # grey JPEG that the dataset's reader turns into RGB is written as the RGB it gave).
  if (original and os.path.splitext(original)[1].lower() in (".jpg", ".jpeg", ".png")
      and probe_array(original)[:2] == (image.shape[-1], image.dtype)):
    target = base + os.path.splitext(original)[1].lower()
    _atomic(target, lambda tmp: shutil.copyfile(original, tmp))
    return target
  if image.dtype == np.uint8 and image.shape[-1] in (1, 3):
    target = base + ".png"
    _save_png(image[..., 0] if image.shape[-1] == 1 else image, target)
    return target
  target = base + ".npy"

  def write(tmp):
    with open(tmp, "wb") as f:
      np.save(f, image)

  _atomic(target, write)
  return target


def export(dataset: str, output_dir: str, *, data_dir: str | None = None,
           splits: Sequence[str] = ("train", "val"), masks: str = "ids",
           options: dict | None = None) -> dict:
  """Writes OUTPUT_DIR/images/<split>/, masks/<split>/ and classes.json; returns classes.json.

  Examples the reader skips as bad are left out (and counted in the progress bar)."""
  if masks not in MASKS:
    raise JaxsegError(f"--masks={masks} is not one of: {', '.join(MASKS)}")
  sources = {split: data_lib.get_dataset(dataset, split, data_dir=data_dir, **(options or {}))
             for split in splits}
  first = sources[splits[0]]
  palette = np.asarray(first.palette, np.uint8)
  classes = {"names": list(first.class_names), "ignore_index": int(first.ignore_index)}
  if masks == "colour":
    colours = [tuple(c) for c in palette.tolist()]
    if len(set(colours)) != len(colours):
      raise JaxsegError(f"--masks=colour: {dataset}'s palette gives two classes one colour "
                        f"{next(c for c in colours if colours.count(c) > 1)}, so colour masks "
                        "could not be read back; use --masks=ids")
    classes["palette"] = palette.tolist()
    classes["ignore_color"] = list(ignore_colour(palette))
  for split, source in sources.items():
    image_dir = os.path.join(output_dir, "images", split)
    mask_dir = os.path.join(output_dir, "masks", split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(mask_dir, exist_ok=True)
    lut = np.zeros((256, 3), np.uint8)
    lut[:len(palette)] = palette
    if masks == "colour":
      lut[first.ignore_index] = classes["ignore_color"]
    used = set()
    for index in tqdm.tqdm(range(len(source)), desc=f"{dataset} {split}", unit="image",
                           dynamic_ncols=True, mininterval=1.0):
      example = source[index]
      if BAD_KEY in example:
        continue
      name = os.path.splitext(os.path.basename(str(example.get("name") or index)))[0]
      if name in used:  # two files of one name in different folders of the source
        name = f"{name}_{index}"
      used.add(name)
      _write_image(source, index, np.asarray(example["image"]), os.path.join(image_dir, name))
      label = np.asarray(example["label"], np.uint8)
      _save_png(lut[label] if masks == "colour" else label,
                os.path.join(mask_dir, name + ".png"))
  def write_classes(tmp):
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(classes, f, indent=1)

  _atomic(os.path.join(output_dir, CLASS_FILE), write_classes)
  return classes


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jaxseg.data.to_folder",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--dataset", required=True, help="a registered dataset, e.g. camvid")
  parser.add_argument("--data_dir", help="where that dataset lies")
  parser.add_argument("--output_dir", required=True, help="the folder dataset to write")
  parser.add_argument("--splits", default="train,val", help="comma-separated (default train,val)")
  parser.add_argument("--masks", choices=MASKS, default="ids",
                      help="ids: class-id PNGs (default); colour: the palette's colours")
  args = parser.parse_args(argv)
  try:
    classes = export(args.dataset, args.output_dir, data_dir=args.data_dir,
                     splits=[s for s in args.splits.split(",") if s], masks=args.masks)
  except JaxsegError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.output_dir} ({len(classes['names'])} classes, {args.masks} masks); train "
        f"with --dataset=folder --data_dir={args.output_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
