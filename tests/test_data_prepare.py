"""Prepared datasets: TFDS format written and read without TensorFlow, bit-exact round trips,
resumable after SIGKILL, idempotent, refusing changed arguments, skipping bad examples."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from jaxseg import data
from jaxseg.data import files, prepare, prepared
from jaxseg.data.prepared import PreparedSource, is_prepared
from jaxseg.errors import JaxsegError

ROOT = pathlib.Path(__file__).resolve().parents[1]
SYNTHETIC = {"image_size": 16, "num_examples": 6}
SYNTHETIC_FLAGS = ["--dataset=synthetic", "--dataset_options=image_size=16,num_examples=6",
                   "--num_shards=3", "--no_progress"]


def _synthetic(out, **kwargs):
  kwargs.setdefault("num_shards", 3)
  return prepare.prepare("synthetic", str(out), dataset_options=SYNTHETIC, progress=False,
                         log=lambda _: None, **kwargs)


def _assert_same(prepared_source, source, names=True):
  """Every example bit for bit (and names, where the source has them)."""
  assert len(prepared_source) == len(source)
  for i in range(len(source)):
    got, want = prepared_source[i], source[i]
    assert got["image"].dtype == np.uint8 and got["label"].dtype == np.uint8
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])
    if names and "name" in want:
      assert got["name"] == want["name"]


def _version_dir(out, name="jaxseg_synthetic"):
  return out / name / prepared.VERSION


def _snapshot(version_dir):
  """Name -> (bytes, mtime) of every file, to show a re-run changed nothing."""
  return {p.name: (p.read_bytes(), p.stat().st_mtime_ns)
          for p in sorted(version_dir.iterdir()) if p.is_file()}


def _shards(version_dir):
  return {p.name: p.read_bytes() for p in sorted(version_dir.glob("*.array_record-*"))}


# --- A tiny on-disk dataset: images of different sizes (as in COCO), JPEG and PNG.


class FakeDisk(files.FileSource):
  class_names = ("background", "thing", "stuff")
  palette = np.array([[0, 0, 0], [200, 30, 30], [30, 200, 30]], np.uint8)
  ignore_index = 255

  def __init__(self, split="train", *, data_dir, skip_bad_examples=False):
    pairs, skipped = files.list_pairs(
        os.path.join(data_dir, split), os.path.join(data_dir, split + "_labels"),
        lambda rel: os.path.splitext(rel)[0] + ".png", image_suffixes=(".jpg", ".png"),
        what="fake", skip_bad_examples=skip_bad_examples)
    super().__init__(pairs, skip_bad_examples=skip_bad_examples, skipped=skipped,
                     description=f"FakeDisk(split={split!r}, data_dir={data_dir!r}, "
                                 f"skip_bad_examples={skip_bad_examples})")

  def load(self, record):
    example = files.read_pair(*record)
    example["label_file"] = record[1]
    return example

  def image_file(self, index):
    """Offers the image file for storing as is; val's ex5 offers a wrong one (not kept)."""
    path = self._records[index][0]
    return path.replace("ex5.jpg", "ex1.jpg") if path.endswith("val/ex5.jpg") else path


def _fake_tree(root, *, corrupt=(3,), missing=()):
  rng = np.random.default_rng(1)
  for split in ("train", "val"):
    (root / split).mkdir(parents=True)
    (root / f"{split}_labels").mkdir()
    for i in range(6):
      h, w = 9 + 3 * i, 14 - i
      image = Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8))
      image.save(root / split / f"ex{i}.{'jpg' if i % 2 else 'png'}")
      label = rng.choice(np.array([0, 1, 2, 255], np.uint8), (h, w))
      path = root / f"{split}_labels" / f"ex{i}.png"
      if split == "train" and i in missing:
        continue
      Image.fromarray(label).save(path)
      if split == "train" and i in corrupt:
        path.write_bytes(path.read_bytes()[:60])  # truncated
  return root


@pytest.fixture
def fake_disk(monkeypatch):
  entry = data.DatasetSpec(FakeDisk) if hasattr(data, "DatasetSpec") else FakeDisk
  monkeypatch.setitem(data.DATASETS, "fakedisk", entry)
  return "fakedisk"


# --- Round trips.


@pytest.mark.parametrize("encoding", ["png", "zlib"])
def test_synthetic_round_trip_bit_for_bit_with_metadata(tmp_path, encoding):
  result = _synthetic(tmp_path, encoding=encoding)
  assert result["path"] == str(_version_dir(tmp_path))
  assert is_prepared(str(tmp_path)) and is_prepared(str(tmp_path), "val")
  assert not is_prepared(str(tmp_path), "test")
  for split in ("train", "val"):
    source = data.get_dataset("synthetic", split, **SYNTHETIC)
    got = PreparedSource(str(tmp_path), split)
    _assert_same(got, source)
    assert got[4]["name"] == f"{split}_000004"
    assert got.class_names == source.class_names and got.num_classes == source.num_classes
    np.testing.assert_array_equal(got.palette, source.palette)
    assert got.ignore_index == source.ignore_index and got.skipped == []
    assert repr(source) in repr(got) and "0x" not in repr(got)
  # The dataset dir and the version dir are accepted too, and the source pickles small.
  for path in (tmp_path / "jaxseg_synthetic", _version_dir(tmp_path)):
    assert len(PreparedSource(str(path), "val", dataset="synthetic")) == 6
  import pickle  # pylint: disable=g-import-not-at-top
  blob = pickle.dumps(got)
  assert len(blob) < 4000
  np.testing.assert_array_equal(pickle.loads(blob)[2]["label"], got[2]["label"])
  with pytest.raises(JaxsegError, match="has no split 'test'; prepared splits: train, val"):
    PreparedSource(str(tmp_path), "test")


def test_tfds_reads_it_with_tensorflow_unloadable(tmp_path):
  """tfds.data_source and builder_from_directory, in a process where TF cannot be imported."""
  _synthetic(tmp_path)
  script = f"""
import importlib.abc, sys
class NoTensorFlow(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name == "tensorflow" or name.startswith("tensorflow."):
      return None  # as if not installed, even where it is
sys.meta_path.insert(0, NoTensorFlow())
for module in [m for m in sys.modules if m.split(".")[0] == "tensorflow"]:
  del sys.modules[module]
import numpy as np
import tensorflow_datasets as tfds
out = {str(tmp_path)!r}
by_name = tfds.data_source("jaxseg_synthetic", data_dir=out)
by_dir = tfds.builder_from_directory(out + "/jaxseg_synthetic/1.0.0").as_data_source()
assert sorted(by_name) == sorted(by_dir) == ["train", "val"]
arrays = {{}}
for split in ("train", "val"):
  for i in range(len(by_name[split])):
    a, b = by_name[split][i], by_dir[split][i]
    assert a["name"] == b["name"] and (a["image"] == b["image"]).all()
    arrays[f"{{split}}{{i}}image"], arrays[f"{{split}}{{i}}label"] = a["image"], a["label"]
np.savez(out + "/read.npz", **arrays)
assert "tensorflow" not in sys.modules
print("no tensorflow")
"""
  run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "no tensorflow" in run.stdout
  arrays = np.load(tmp_path / "read.npz")
  for split in ("train", "val"):
    source = data.get_dataset("synthetic", split, **SYNTHETIC)
    for i in range(len(source)):
      assert arrays[f"{split}{i}image"].shape == (16, 16, 3)
      assert arrays[f"{split}{i}label"].shape == (16, 16, 1)  # TFDS's image features
      np.testing.assert_array_equal(arrays[f"{split}{i}image"], source[i]["image"])
      np.testing.assert_array_equal(arrays[f"{split}{i}label"][..., 0], source[i]["label"])


# --- Resuming, idempotence, changed arguments.

_KILLABLE = """
import os, sys, time
from jaxseg import data
from jaxseg.data import prepare
marker, hang_at = sys.argv[1], int(sys.argv[2])
get_dataset = data.get_dataset

class Hangs:  # the real source, but val example `hang_at` never finishes loading
  def __init__(self, source, split):
    self.source, self.split = source, split
  def __getattr__(self, name):
    return getattr(self.source, name)
  def __len__(self):
    return len(self.source)
  def __repr__(self):
    return repr(self.source)
  def __getitem__(self, index):
    if self.split == "val" and index == hang_at:
      open(marker, "w").close()
      time.sleep(600)
    return self.source[index]

data.get_dataset = lambda name, split, **kw: Hangs(get_dataset(name, split, **kw), split)
sys.exit(prepare.main(sys.argv[3:]))
"""


def test_sigkill_mid_split_leaves_it_unreadable_and_a_rerun_finishes_identically(tmp_path):
  out, reference = tmp_path / "out", tmp_path / "reference"
  marker = tmp_path / "hanging"
  flags = [*SYNTHETIC_FLAGS, f"--output_dir={out}"]
  process = subprocess.Popen([sys.executable, "-c", _KILLABLE, str(marker), "3", *flags],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.time() + 120
  while not marker.exists():
    assert process.poll() is None, process.communicate()[1].decode()[-3000:]
    assert time.time() < deadline, "the prepare process never reached val example 3"
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)  # in the middle of val's second shard
  process.communicate()
  version_dir = _version_dir(out)
  assert list(version_dir.glob("*val*.tmp")), "the kill should hit a shard being written"

  # train was finished and is readable; val is not, and says how to finish it.
  assert not is_prepared(str(out)) and not is_prepared(str(out), "val")
  assert len(PreparedSource(str(out), "train")) == 6
  with pytest.raises(JaxsegError) as error:
    PreparedSource(str(out), "val")
  message = str(error.value)
  assert "\n" not in message and "split 'val' is incomplete (1 of 3 shards written" in message
  assert "python -m jaxseg.data.prepare --dataset=synthetic" in message
  info = json.loads((version_dir / "dataset_info.json").read_text())
  assert [s["name"] for s in info["splits"]] == ["train"]  # TFDS does not see val at all

  # Re-running the same command finishes val: the same bytes as a run never killed.
  assert prepare.main(flags) == 0
  assert prepare.main([*SYNTHETIC_FLAGS, f"--output_dir={reference}"]) == 0
  assert _shards(version_dir) == {n: b for n, b in _shards(_version_dir(reference)).items()}
  assert not list(version_dir.glob("*.tmp"))
  assert is_prepared(str(out))
  _assert_same(PreparedSource(str(out), "val"), data.get_dataset("synthetic", "val", **SYNTHETIC))


def test_rerun_of_a_complete_dataset_changes_nothing(tmp_path):
  _synthetic(tmp_path)
  before = _snapshot(_version_dir(tmp_path))
  result = _synthetic(tmp_path)
  assert _snapshot(_version_dir(tmp_path)) == before
  assert all(s["written_now"] == 0 and s["num_examples"] == 6 for s in result["splits"].values())
  # Preparing one more split later extends the dataset without touching the others.
  _synthetic(tmp_path, splits=["test"])
  after = _snapshot(_version_dir(tmp_path))
  assert all(after[n] == before[n] for n in before if ".array_record-" in n)
  assert PreparedSource(str(tmp_path), "test")[0]["name"] == "test_000000"


def test_a_run_that_died_before_publishing_is_published_by_the_rerun(tmp_path):
  _synthetic(tmp_path)
  version_dir = _version_dir(tmp_path)
  manifest = json.loads((version_dir / prepared.MANIFEST).read_text())
  manifest["published"] = ["train"]  # as if killed after finishing val, before publishing it
  (version_dir / prepared.MANIFEST).write_text(json.dumps(manifest))
  info = json.loads((version_dir / "dataset_info.json").read_text())
  info["splits"] = info["splits"][:1]
  (version_dir / "dataset_info.json").write_text(json.dumps(info))
  assert not is_prepared(str(tmp_path))
  with pytest.raises(JaxsegError, match="split 'val' is written but not yet published: re-run"):
    PreparedSource(str(tmp_path), "val")
  result = _synthetic(tmp_path)
  assert result["splits"]["val"]["written_now"] == 0 and is_prepared(str(tmp_path))
  assert len(PreparedSource(str(tmp_path), "val")) == 6


def test_a_second_writer_at_the_same_time_is_refused(tmp_path):
  import fcntl  # pylint: disable=g-import-not-at-top
  version_dir = _version_dir(tmp_path)
  version_dir.mkdir(parents=True)
  with open(version_dir / "jaxseg_prepare.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # as another prepare process holds it
    with pytest.raises(JaxsegError, match="being written by another"):
      _synthetic(tmp_path)
  _synthetic(tmp_path)  # once released, it goes ahead
  assert is_prepared(str(tmp_path))


@pytest.mark.parametrize("flag, value", [
    ("--dataset_options", "image_size=16,num_examples=7"),
    ("--num_shards", "2"),
    ("--examples_per_shard", "4"),
    ("--encoding", "zlib"),
])
def test_changed_arguments_are_refused_naming_the_flag(tmp_path, capsys, flag, value):
  base = [f"--output_dir={tmp_path}", "--dataset=synthetic", "--no_progress"]
  assert prepare.main([*base, "--dataset_options=image_size=16,num_examples=6",
                       "--num_shards=3"]) == 0
  before = _snapshot(_version_dir(tmp_path))
  capsys.readouterr()
  args = {"--dataset_options": "image_size=16,num_examples=6", "--num_shards": "3"}
  if flag == "--examples_per_shard":
    del args["--num_shards"]
  args[flag] = value
  assert prepare.main([*base, *(f"{k}={v}" for k, v in args.items())]) == 2
  err = capsys.readouterr().err
  shown = "--num_shards=(not set)" if flag == "--examples_per_shard" else f"{flag}={value}"
  assert err.startswith(f"error: {shown} differs from") and err.count("\n") == 1, err
  assert "nothing was changed" in err
  assert _snapshot(_version_dir(tmp_path)) == before


def test_option_mistakes_are_one_line_errors_naming_the_flag(tmp_path, capsys):
  cases = [(["--dataset=synthetic"], "--dataset_options: synthetic needs image_size=..."),
           (["--dataset=synthetic", "--dataset_options=image_size=16,colour=red"],
            "--dataset_options: synthetic has no option 'colour'"),
           (["--dataset=nope"], "--dataset: unknown dataset 'nope'")]
  for args, message in cases:
    assert prepare.main([*args, f"--output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
  # A run that fails before writing anything leaves no directory behind.
  assert prepare.main(["--dataset=synthetic", "--dataset_options=image_size=16",
                       "--splits=tset", f"--output_dir={tmp_path / 'out'}"]) == 2
  assert "unknown split 'tset'" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()
  assert prepare.parse_options("image_size=(8,12),preset=hard,seed=3,flip=true") == {
      "image_size": (8, 12), "preset": "hard", "seed": 3, "flip": True}


# --- Bad examples.


def test_bad_example_stops_with_its_file_and_skip_resumes(tmp_path, capsys, fake_disk):
  root = _fake_tree(tmp_path / "raw")
  out = tmp_path / "out"
  flags = [f"--dataset={fake_disk}", f"--data_dir={root}", f"--output_dir={out}",
           "--splits=train", "--num_shards=3", "--no_progress"]
  assert prepare.main(flags) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "train_labels/ex3.png: corrupt or truncated label" in err, err
  assert "--skip_bad_examples" in err and "1 of 3 shards of train are written and kept" in err
  version_dir = _version_dir(out, "jaxseg_fakedisk")
  assert not (version_dir / "dataset_info.json").exists()  # nothing readable yet
  assert not is_prepared(str(out))
  with pytest.raises(JaxsegError, match=r"split 'train' is incomplete \(1 of 3 shards"):
    PreparedSource(str(out), "train")
  tfds = prepared.import_tfds()
  with pytest.raises(Exception):
    tfds.builder_from_directory(str(version_dir))
  first_shard = _shards(version_dir)

  assert prepare.main([*flags, "--skip_bad_examples"]) == 0  # goes on past it
  summary = capsys.readouterr().out
  assert "train: 5 examples in 3 shards" in summary and "1 skipped" in summary
  assert "ex3.png: corrupt or truncated label" in summary
  assert all(_shards(version_dir)[n] == b for n, b in first_shard.items())  # not rewritten
  got = PreparedSource(str(out), "train")
  assert len(got.skipped) == 1 and "ex3.png" in got.skipped[0]
  source = FakeDisk("train", data_dir=str(root))
  want = [source[i] for i in range(len(source)) if i != 3]
  for i, example in enumerate(want):
    assert got[i]["name"] == example["name"]
    np.testing.assert_array_equal(got[i]["image"], example["image"])
    np.testing.assert_array_equal(got[i]["label"], example["label"])
  # ...and dropping --skip_bad_examples again is a changed argument.
  assert prepare.main(flags) == 2
  assert "--skip_bad_examples=False differs from True" in capsys.readouterr().err


@pytest.mark.parametrize("encoding", ["png", "zlib"])
def test_skipped_examples_are_counted_listed_and_the_rest_is_exact(tmp_path, fake_disk,
                                                                   encoding):
  root = _fake_tree(tmp_path / "raw", corrupt=(3,), missing=(1,))
  result = prepare.prepare(fake_disk, str(tmp_path / "out"), data_dir=str(root),
                           skip_bad_examples=True, examples_per_shard=2, encoding=encoding,
                           progress=False, log=lambda _: None)
  train, val = result["splits"]["train"], result["splits"]["val"]
  assert (train["num_examples"], len(train["skipped"]), train["num_shards"]) == (4, 2, 3)
  assert "ex1.png: label file is missing" in train["skipped"][0]  # found while listing
  assert "ex3.png: corrupt or truncated label" in train["skipped"][1]  # found while reading
  assert (val["num_examples"], val["skipped"]) == (6, [])
  # The .jpg images (odd examples) are stored as their files, but for the wrong one offered.
  assert (train["source_jpegs"], val["source_jpegs"]) == ((1, 2) if encoding == "png" else (0, 0))
  metadata = json.loads((_version_dir(tmp_path / "out", "jaxseg_fakedisk") /
                         "metadata.json").read_text())
  assert metadata["splits"]["train"]["num_skipped"] == 2
  assert metadata["splits"]["train"]["skipped"] == train["skipped"]
  assert metadata["class_names"] == list(FakeDisk.class_names)
  assert "\n" in prepare.format_summary(result, str(tmp_path / "out"))
  tfds_val = prepared.import_tfds().builder_from_directory(
      str(_version_dir(tmp_path / "out", "jaxseg_fakedisk"))).as_data_source("val")
  for split in ("train", "val"):
    source = FakeDisk(split, data_dir=str(root), skip_bad_examples=True)
    want = [e for e in (source[i] for i in range(len(source))) if files.BAD_KEY not in e]
    got = PreparedSource(str(tmp_path / "out"), split)
    assert len(got) == len(want)
    for i, example in enumerate(want):  # sizes differ from example to example
      assert got[i]["name"] == example["name"] and got[i]["image"].shape == example["image"].shape
      np.testing.assert_array_equal(got[i]["image"], example["image"])
      np.testing.assert_array_equal(got[i]["label"], example["label"])
      if split == "val":  # TFDS decodes the kept JPEGs (and PNGs) to the same pixels
        np.testing.assert_array_equal(tfds_val[i]["image"], example["image"])


def test_worker_processes_write_the_same_bytes(tmp_path):
  _synthetic(tmp_path / "serial", splits=["val"])
  _synthetic(tmp_path / "parallel", splits=["val"], num_workers=2)
  assert _shards(_version_dir(tmp_path / "serial")) == _shards(_version_dir(tmp_path / "parallel"))


def test_not_a_prepared_dataset_is_a_clear_error(tmp_path, fake_disk):
  assert not is_prepared(str(tmp_path / "missing")) and not is_prepared(str(tmp_path))
  with pytest.raises(JaxsegError, match="not a prepared dataset"):
    PreparedSource(str(tmp_path), "train")
  # Two datasets in one output dir: each has its own directory; name the one to read.
  _synthetic(tmp_path)
  prepare.prepare(fake_disk, str(tmp_path), data_dir=str(_fake_tree(tmp_path / "raw")),
                  splits=["val"], progress=False, log=lambda _: None)
  with pytest.raises(JaxsegError, match="several prepared datasets"):
    PreparedSource(str(tmp_path), "val")
  assert len(PreparedSource(str(tmp_path), "val", dataset=fake_disk)) == 6
  assert len(PreparedSource(str(tmp_path / "jaxseg_synthetic"), "val")) == 6
  assert prepared.tfds_name("COCO") == "jaxseg_coco"


def test_registry_reads_a_prepared_camvid_like_the_raw_files(tmp_path):
  """--dataset=camvid --data_dir=PREPARED trains from the prepared copy: same examples (the
  JPEGs kept as they are), and reader options it was not prepared with are refused."""
  from tests import helpers  # pylint: disable=g-import-not-at-top
  prepare.prepare("camvid", str(tmp_path), splits=("val",), data_dir=str(helpers.CAMVID),
                  progress=False, log=lambda _: None)
  source = data.get_dataset("camvid", "val", data_dir=str(tmp_path), skip_bad_examples=True)
  raw = data.CamVid("val", data_dir=str(helpers.CAMVID))
  assert isinstance(source, PreparedSource) and len(source) == len(raw) == 101
  assert source.class_names == raw.class_names and source.ignore_index == 255
  np.testing.assert_array_equal(source.palette, raw.palette)
  _assert_same(source, raw)
  with pytest.raises(JaxsegError, match=r"was prepared with no classes \(the reader's default\), "
                                        r"but this run asks for classes='voc'"):
    source.check_options({"classes": "voc"})
