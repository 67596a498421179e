"""Pascal VOC 2012 segmentation (Everingham et al., 2010): background and 20 object classes.

    {data_dir}/JPEGImages/NAME.jpg
    {data_dir}/SegmentationClass/NAME.png          palette PNGs of class ids, 255 = void
    {data_dir}/ImageSets/Segmentation/{train,val,trainval}.txt

`data_dir` is the VOC2012 folder or the VOCdevkit folder holding it. The PNGs' palette
indices are the class ids, and their 255 (object borders and hard regions) is `ignore_index`.

Split "train_aug" is the augmented training set of nearly every VOC result since DeepLab:
SBD's extra annotations (Hariharan et al., 2011) joined to VOC train, without VOC val, 10,582
images. SBD comes as

    {sbd_dir}/cls/NAME.mat     struct GTcls, whose field Segmentation is the uint8 class map
    {sbd_dir}/train.txt  {sbd_dir}/val.txt

(`sbd_dir` is SBD's dataset/ folder or benchmark_RELEASE, which holds it); its images are VOC's
JPEGImages. A name with a VOC PNG takes that annotation, the others SBD's. This is the set
mmsegmentation trains on: its tools/dataset_converters/voc_aug.py converts SBD's .mat files,
and configs/_base_/datasets/pascal_voc12_aug.py concatenates VOC train (SegmentationClass) with
aug.txt = SBD train+val minus VOC train and val (SegmentationClassAug), so VOC train images
train on VOC's labels. Those keep their 255 borders, which SBD's maps do not have.
"""

from __future__ import annotations

import os

import numpy as np
import scipy.io

from jaxseg.data.coco import VOC_CLASS_NAMES, colormap
from jaxseg.data.files import BadExample, FileSource, read_image, read_pair
from jaxseg.errors import JaxsegError, first_line

SPLITS = ("train", "val", "trainval", "train_aug")
_YEAR = "VOC2012"


def find_root(data_dir: str) -> str:
  """The VOC2012 folder, whether `data_dir` is that folder or the VOCdevkit holding it."""
  for root in (data_dir, os.path.join(data_dir, _YEAR)):
    if os.path.isdir(os.path.join(root, "JPEGImages")):
      return root
  raise JaxsegError(f"{data_dir}: not a Pascal VOC 2012 folder (looked for JPEGImages/ in it "
                    f"and in {os.path.join(data_dir, _YEAR)})")


def find_sbd_root(sbd_dir: str) -> str:
  """SBD's dataset/ folder, whether `sbd_dir` is that folder or benchmark_RELEASE."""
  for root in (sbd_dir, os.path.join(sbd_dir, "dataset")):
    if os.path.isdir(os.path.join(root, "cls")):
      return root
  raise JaxsegError(f"{sbd_dir}: not an SBD folder (looked for cls/ in it and in "
                    f"{os.path.join(sbd_dir, 'dataset')}); data.options.sbd_dir names the "
                    "folder holding cls/, train.txt and val.txt")


def read_names(path: str, what: str) -> list[str]:
  """The image names of a list file, one a line (blank lines ignored)."""
  if not os.path.isfile(path):
    raise JaxsegError(f"{path}: no such file ({what})")
  try:
    with open(path, encoding="utf-8") as f:
      return [line.strip() for line in f if line.strip()]
  except (OSError, UnicodeDecodeError) as e:
    raise JaxsegError(f"{path}: not a readable list of image names ({first_line(e)})") from None


def read_sbd_label(path: str) -> np.ndarray:
  """uint8 (H, W) class ids of an SBD cls/NAME.mat (GTcls.Segmentation)."""
  if not os.path.isfile(path):
    raise BadExample(f"{path}: label file is missing")
  try:
    segmentation = scipy.io.loadmat(path)["GTcls"][0, 0]["Segmentation"]
  # A damaged .mat surfaces as whatever scipy's parser trips on (OSError, IndexError,
  # ValueError, zlib.error, MatReadError, NotImplementedError for v7.3 files...), and a .mat of
  # another kind as KeyError or IndexError; each is this one file's problem.
  except Exception as e:  # pylint: disable=broad-except
    raise BadExample(f"{path}: not a readable SBD annotation (GTcls.Segmentation): "
                     f"{type(e).__name__}: {first_line(e)}") from None
  segmentation = np.asarray(segmentation)
  if segmentation.ndim != 2 or segmentation.dtype.kind not in "ui":
    raise BadExample(f"{path}: GTcls.Segmentation is {segmentation.dtype} with shape "
                     f"{segmentation.shape}; expected a 2-D integer map of class ids")
  if segmentation.size and (int(segmentation.min()) < 0 or int(segmentation.max()) > 255):
    raise BadExample(f"{path}: GTcls.Segmentation values {int(segmentation.min())}.."
                     f"{int(segmentation.max())} do not fit the uint8 class ids jaxseg uses")
  return segmentation.astype(np.uint8)


class PascalVOC(FileSource):
  """Pascal VOC 2012 segmentation (21 classes), optionally with SBD's train_aug; a grain
  RandomAccessDataSource.

  Examples are in name order. Every listed name's image and annotation must exist when the
  source is built: a missing one is an error naming both files, or, with `skip_bad_examples`,
  that example is left out and the message kept in `skipped`.
  """

  class_names = VOC_CLASS_NAMES
  palette = colormap(len(VOC_CLASS_NAMES))  # VOC's own colours: its PNGs carry this palette
  ignore_index = 255

  def __init__(self, split: str = "train", *, data_dir: str, sbd_dir: str | None = None,
               skip_bad_examples: bool = False):
    if split not in SPLITS:
      raise JaxsegError(f"unknown Pascal VOC split {split!r}; valid splits: "
                        f"{', '.join(SPLITS)}")
    if not data_dir:
      raise JaxsegError(f"Pascal VOC needs --data_dir (the {_YEAR} folder, or the VOCdevkit "
                        "folder holding it)")
    if split == "train_aug" and not sbd_dir:
      raise JaxsegError("Pascal VOC split 'train_aug' needs SBD's annotations: set "
                        "data.options.sbd_dir to the SBD folder holding cls/, train.txt and "
                        "val.txt")
    self.split, self.data_dir = split, os.path.abspath(data_dir)
    root = find_root(self.data_dir)
    lists = os.path.join(root, "ImageSets", "Segmentation")
    self._image_dir = os.path.join(root, "JPEGImages")
    self._png_dir = os.path.join(root, "SegmentationClass")
    self._mat_dir = None
    if split == "train_aug":
      self.sbd_dir = os.path.abspath(sbd_dir)
      sbd = find_sbd_root(self.sbd_dir)
      self._mat_dir = os.path.join(sbd, "cls")
      # mmseg's voc_aug.py: (VOC train + SBD train + SBD val) - VOC val, as a set.
      list_files = [(os.path.join(lists, "train.txt"), "Pascal VOC train list"),
                    (os.path.join(sbd, "train.txt"), "SBD train list"),
                    (os.path.join(sbd, "val.txt"), "SBD val list")]
      excluded = set(read_names(os.path.join(lists, "val.txt"), "Pascal VOC val list"))
    else:
      self.sbd_dir = None  # read by train_aug only; other splits are VOC's alone
      list_files = [(os.path.join(lists, f"{split}.txt"), f"Pascal VOC {split} list")]
      excluded = set()
    listed_in = {}  # name -> the first list file naming it, for messages
    for list_file, what in list_files:
      for name in read_names(list_file, what):
        listed_in.setdefault(name, list_file)
    names = sorted(set(listed_in) - excluded)
    records, skipped = self._pair(names, listed_in, skip_bad_examples)
    if not records:
      raise JaxsegError(f"{', '.join(f for f, _ in list_files)}: no Pascal VOC {split} images "
                        "listed")
    super().__init__(records, skip_bad_examples=skip_bad_examples, skipped=skipped,
                     description=f"PascalVOC(split={split!r}, data_dir={self.data_dir!r}, "
                                 f"sbd_dir={self.sbd_dir!r}, examples={len(records)})")

  def _pair(self, names, listed_in, skip_bad_examples):
    """(image, label) paths of `names` and the skip messages; the VOC PNG wins over SBD's."""
    records, problems = [], []
    for name in names:
      image_path = os.path.join(self._image_dir, f"{name}.jpg")
      label_path = os.path.join(self._png_dir, f"{name}.png")
      also = ""
      if self._mat_dir and not os.path.isfile(label_path):
        also = f"; {label_path} is missing too"
        label_path = os.path.join(self._mat_dir, f"{name}.mat")
      if not os.path.isfile(image_path):
        problems.append(f"{image_path}: image file is missing (label {label_path}; "
                        f"listed in {listed_in[name]})")
      elif not os.path.isfile(label_path):
        problems.append(f"{label_path}: label file is missing (image {image_path}{also}; "
                        f"listed in {listed_in[name]})")
      else:
        records.append((image_path, label_path))
    if problems and not skip_bad_examples:
      more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
      raise BadExample(f"{problems[0]}{more}; pass skip_bad_examples to train without these "
                       "examples")
    return records, problems

  def load(self, record):
    image_path, label_path = record
    name = os.path.splitext(os.path.basename(image_path))[0]
    if label_path.endswith(".mat"):
      image, label = read_image(image_path), read_sbd_label(label_path)
      if label.shape != image.shape[:2]:
        raise BadExample(f"{label_path}: label is {label.shape[1]}x{label.shape[0]} but its "
                         f"image {image_path} is {image.shape[1]}x{image.shape[0]} (WxH)")
      return {"image": image, "label": label, "name": name, "label_file": label_path}
    return read_pair(image_path, label_path, name=name)
