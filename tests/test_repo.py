"""The repository contract: the README and docs/*.md pages, their commands and links, and CI
running the README's test command verbatim.

Every `python ...` command on a page (in a ```bash block, or an inline code span that starts
with `python -m` or `python benchmarks/`) is checked with the module's own parser: the module
exists, every --flag is one it defines, every --config.a.b=v override names a key of its config
and the value parses, selector values (--dataset, --backbone, --variant) are valid choices.
Nothing trains: one subprocess imports what the commands need once and forks per command, so
that two entry points never define their absl flags in one process.
"""

import functools
import importlib.util
import json
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from experiments.configs import deeplab as deeplab_config
from experiments.configs import superpixel_gnn as gnn_config
from experiments.configs import unet as unet_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TRAINING = (ROOT / "docs" / "training.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 260

# Lines in ```bash blocks that are not python commands, by their first word (a path's last
# part: .venv/bin/pip is pip). Everything else must be a python command the checks can read.
NOT_PYTHON = {
    ".", "source", "cd", "mkdir", "export", "git", "pip", "gcloud", "gcsfuse", "tensorboard",
    "rm", "ssh_all", "}",
}
# Modules of other projects that a page runs (`python3 -m venv`, `python -m pytest`): they must
# exist; their flags are theirs.
OTHER_MODULES = {"venv", "pytest", "pip"}

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
_INLINE_COMMAND = re.compile(r"`((?:python3?|\.venv/bin/python) (?:-m |benchmarks/)[^`]+)`")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _commands():
  return re.findall(r"```bash\n(.+?)\n```", README.split("## The main job")[0], re.S)


def test_readme_has_exactly_two_setup_commands():
  commands = _commands()
  assert len(commands) == 2
  assert commands[0].endswith("python -m experiments.deeplab --backbone=resnet101")
  assert "pip install -e \".[test]\"" in commands[1] and "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim():
  ci = (ROOT / ".ci" / "run").read_text()
  test_command = _commands()[1]
  install_and_test = test_command.split("&& ", 2)[2]  # after venv creation and activation
  assert install_and_test in ci.splitlines()


def test_readme_is_short():
  lines = README.count("\n")
  assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/*.md"


def _table_rows(text, heading):
  """(section, key, default) of the first table after `heading`."""
  table = next(block for block in text.split(heading, 1)[1].split("\n\n")
               if block.startswith("| key"))
  return re.findall(r"^\| `(\w+)\.(\w+)` \| `?([^|`]+?)`? \|", table, re.M)


def test_shared_config_keys_in_docs_exist_with_their_defaults():
  rows = _table_rows(TRAINING, "Keys shared by every experiment")
  assert len(rows) >= 7
  for config in (deeplab_config.get_config(), unet_config.get_config()):
    for section, key, default in rows:
      assert str(config[section][key]) == default.strip(), f"{section}.{key}"


def test_ema_best_and_accumulation_keys_exist_with_their_defaults():
  rows = _table_rows(TRAINING, "EMA weights, the best checkpoint, gradient accumulation")
  assert {f"{s}.{k}" for s, k, _ in rows} == {
      "train.ema_decay", "train.keep_best", "train.accumulate_steps"}
  for config in (deeplab_config.get_config(), unet_config.get_config(),
                 gnn_config.get_config()):
    for section, key, default in rows:
      assert key in config[section], f"{section}.{key} is not a config key yet"
      value = config[section][key]
      assert (repr(value) if isinstance(value, str) else str(value)) == default.strip(), (
          f"{section}.{key}")


def test_readme_library_example_runs():
  code = re.search(r"## Using the library.*?```python\n(.+?)```", README, re.S).group(1)
  scope = {}
  exec(compile(code, "README.md", "exec"), scope)  # pylint: disable=exec-used
  assert scope["logits"].shape == (2, 128, 128, 19)
  assert scope["loss"].dtype == "float32" and 0 <= scope["summary"]["miou"] <= 1


def test_readme_lists_every_entry_point_and_links_every_page():
  table = README.split("## Entry points")[1].split("\n## ")[0]
  modules = [f"experiments.{p.stem}" for p in sorted((ROOT / "experiments").glob("*.py"))
             if p.stem != "__init__"] + ["jaxseg.data.prepare", "jaxseg.weights.convert"]
  for module in modules:
    assert f"| `{module}` |" in table, f"{module} is missing from README's entry-point table"
  for page in PAGES[1:]:
    assert f"](docs/{page.name})" in README, f"README does not link docs/{page.name}"


# --- the commands on every page -------------------------------------------------------------


def _script_lines(script):
  """A shell script's commands, one string each: continuations joined, comments dropped, a
  newline inside quotes kept inside its command."""
  script = script.replace("\\\n", " ")
  lines, current, quote = [], "", None
  i = 0
  while i < len(script):
    c = script[i]
    if quote:
      quote = None if c == quote else quote
    elif c in "'\"":
      quote = c
    elif c == "#" and (not current or current[-1].isspace()):
      while i < len(script) and script[i] != "\n":
        i += 1
      continue
    elif c == "\n":
      lines.append(current)
      current, i = "", i + 1
      continue
    current += c
    i += 1
  return [line.strip() for line in [*lines, current] if line.strip()]


def _simple_commands(script):
  """The simple commands of a script (split at ;, &&, ||, |), as token lists; a quoted
  argument that is itself a script (ssh_all '... && python -m ...') is read too."""
  for line in _script_lines(script):
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    command = []
    for token in [*lexer, ";"]:
      if token in (";", "&&", "||", "|", "&"):
        if command:
          yield command
        command = []
        continue
      if " " in token and "python" in token:
        yield from _simple_commands(token)
      command.append(token)


def _page_commands(page):
  """(where, tokens) of every command on a page: ```bash blocks and inline python commands."""
  text = page.read_text()
  for match in _FENCE.finditer(text):
    if match.group(1) == "bash":
      line = text[:match.start()].count("\n") + 1
      for tokens in _simple_commands(match.group(2)):
        yield f"{page.name}:{line}", tokens
  prose = _FENCE.sub("", text)
  for match in _INLINE_COMMAND.finditer(prose):
    yield f"{page.name} (inline)", shlex.split(match.group(1))


def _python_command(tokens):
  """(target, args) of a python command (target: a module or a .py path), or None."""
  while tokens and re.fullmatch(r"\w+=\S*", tokens[0]):  # FOO=1 python ...
    tokens = tokens[1:]
  if not tokens or not re.fullmatch(r"(.*/)?python3?", tokens[0]):
    return None
  if tokens[1:2] == ["-m"] and len(tokens) > 2:
    return tokens[2], tokens[3:]
  if len(tokens) > 1 and tokens[1].endswith(".py"):
    return tokens[1], tokens[2:]
  return "", tokens


# Runs in one subprocess: imports what the checked modules import, then forks once per command;
# the child imports the command's module with the command's argv (as `python -m` would: absl
# and ml_collections read sys.argv while flags are defined) and parses the command line with the
# module's own parser, without running its main.
_CHECKER = r'''
import argparse, ast, contextlib, importlib, importlib.util, io, json, os, runpy, sys

jobs = json.load(sys.stdin)


def source(target):
  path = target if target.endswith(".py") else importlib.util.find_spec(target).origin
  with open(path, encoding="utf-8") as f:
    return path, f.read()


def preimport(target):
  for node in ast.walk(ast.parse(source(target)[1])):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    for name in names:
      if name.startswith("experiments.") and not name.startswith("experiments.configs"):
        if name != "experiments.launch":
          continue  # another entry point: its flags would clash with the target's
      with contextlib.suppress(Exception):
        importlib.import_module(name)


class Parsed(Exception):
  pass


class ArgError(Exception):
  pass


def check_argparse(target, path):
  parse_args = argparse.ArgumentParser.parse_args

  def parse_and_stop(self, args=None, namespace=None):
    parse_args(self, args, namespace)
    raise Parsed

  def error(self, message):
    raise ArgError(message)

  argparse.ArgumentParser.parse_args = parse_and_stop
  argparse.ArgumentParser.error = error
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      if target.endswith(".py"):
        runpy.run_path(path, run_name="doc_check")["main"]()
      else:
        importlib.import_module(target).main()
  except Parsed:
    return None
  except ArgError as e:
    return str(e)
  except SystemExit as e:  # --help
    return None if e.code in (0, None) else f"exits {e.code}"
  return "its main() returned without parsing the command line"


def check_absl(target, src, args):
  from absl import flags
  try:
    with contextlib.redirect_stderr(io.StringIO()):
      importlib.import_module(target)
  except SystemExit as e:  # launch.define_config: an unknown --config key
    return str(e.code)
  args = [a for a in args if a not in ("--help", "--helpfull", "--helpshort")]  # app.run's
  try:
    rest = flags.FLAGS([target, *args])
  except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as e:
    return str(e).splitlines()[0] if str(e) else type(e).__name__
  if len(rest) > 1 and "positional=True" not in src:
    return f"unexpected arguments {rest[1:]}"
  from experiments.configs import unet
  from jaxseg.backbones import segmentation_backbones
  from jaxseg.data import DATASETS
  choices = {"dataset": DATASETS, "backbone": segmentation_backbones(), "variant": unet.VARIANTS}
  for name, valid in choices.items():
    if name in flags.FLAGS and flags.FLAGS[name].value not in (None, *valid):
      return f"--{name}={flags.FLAGS[name].value} is not one of {', '.join(sorted(valid))}"
  return None


def check(target, args):
  path, src = source(target)
  if "__main__" not in src:
    return "has no __main__ block: the command does nothing"
  sys.argv = [target, *args]
  if "argparse" in src:
    return check_argparse(target, path)
  return check_absl(target, src, args)


for target in sorted({job[0] for job in jobs}):
  preimport(target)
results = []
for target, args in jobs:
  read, write = os.pipe()
  pid = os.fork()
  if not pid:
    os.close(read)
    try:
      result = check(target, args)
    except BaseException as e:  # pylint: disable=broad-except
      result = f"{type(e).__name__}: {e}"
    os.write(write, json.dumps(result).encode())
    os._exit(0)
  os.close(write)
  with os.fdopen(read, "rb") as f:
    reply = f.read()
  os.waitpid(pid, 0)
  results.append(json.loads(reply) if reply else "the check crashed")
print(json.dumps(results))
'''


@functools.cache
def _checked_commands():
  """[(where, command text, problem or None)] for every command on every page."""
  found, jobs = [], []
  for page in PAGES:
    for where, tokens in _page_commands(page):
      text = " ".join(tokens)
      command = _python_command(tokens)
      if command is None:
        problem = (None if tokens[0].rpartition("/")[2] in NOT_PYTHON else
                   f"not a python command, and {tokens[0]!r} is not in NOT_PYTHON")
        found.append((where, text, problem))
        continue
      target, args = command
      if not target:
        found.append((where, text, "a python command that is neither -m MODULE nor a .py file"))
      elif target.endswith(".py"):
        if (ROOT / target).is_file():
          found.append((where, text, len(jobs)))
          jobs.append((target, args))
        else:
          found.append((where, text, f"{target} does not exist"))
      elif importlib.util.find_spec(target.split(".")[0]) is None or (
          importlib.util.find_spec(target) is None):
        found.append((where, text, f"no module {target}"))
      elif target.split(".")[0] in OTHER_MODULES:
        found.append((where, text, None))
      else:
        found.append((where, text, len(jobs)))
        jobs.append((target, args))
  reply = subprocess.run([sys.executable, "-c", _CHECKER], input=json.dumps(jobs), cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=False)
  assert reply.returncode == 0, reply.stderr[-3000:]
  results = json.loads(reply.stdout.strip().splitlines()[-1])
  return [(where, text, results[p] if isinstance(p, int) else p) for where, text, p in found]


def test_pages_have_commands():
  pages = {where.split(":")[0].split(" ")[0] for where, _, _ in _checked_commands()}
  assert {"README.md", "training.md", "datasets.md", "evaluation.md"} <= pages
  assert sum(1 for _ in _checked_commands()) >= 40


@pytest.mark.parametrize("page", [p.name for p in PAGES])
def test_every_command_on_the_page_parses(page):
  problems = [f"{where}: {text}\n    -> {problem}" for where, text, problem in _checked_commands()
              if where.split(":")[0].split(" ")[0] == page and problem is not None]
  assert not problems, "\n".join(problems)


def test_the_command_check_catches_mistakes():
  jobs = [("experiments.deeplab", ["--backbone=resnet50", "--config.train.steps=10"]),
          ("experiments.deeplab", ["--config.train.stepz=10"]),
          ("experiments.deeplab", ["--config.train.steps=ten"]),
          ("experiments.unet", ["--backbone=resnet50"]),
          ("experiments.deeplab", ["--dataset=camvd"]),
          ("experiments.launch", []),
          ("jaxseg.weights.convert", ["--source=keras", "--arch=resnet50", "in.h5", "out"]),
          ("jaxseg.weights.convert", ["--source=keras", "--arch=resnet50", "--nope", "a", "b"])]
  reply = subprocess.run([sys.executable, "-c", _CHECKER], input=json.dumps(jobs), cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=True)
  ok, key, value, flag, dataset, no_main, convert, bad_convert = json.loads(
      reply.stdout.strip().splitlines()[-1])
  assert ok is None and convert is None
  assert "config.train.stepz" in key
  assert "ten" in value
  assert "backbone" in flag
  assert "camvd" in dataset
  assert "no __main__" in no_main
  assert "--nope" in bad_convert


# --- links ----------------------------------------------------------------------------------


def _anchors(text):
  """GitHub's heading anchors of a page."""
  anchors, seen = set(), {}
  for heading in re.findall(r"^#+ (.+)$", _FENCE.sub("", text), re.M):
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
    anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
    seen[slug] = seen.get(slug, 0) + 1
  return anchors


@pytest.mark.parametrize("page", [p.name for p in PAGES])
def test_relative_links_point_at_files(page):
  path = next(p for p in PAGES if p.name == page)
  text = path.read_text()
  broken = []
  for target in _LINK.findall(re.sub(r"`[^`\n]*`", "", _FENCE.sub("", text))):
    if re.match(r"[a-z]+:", target):
      continue  # https://..., mailto:
    file, _, anchor = target.partition("#")
    linked = (path.parent / file).resolve() if file else path
    if not linked.exists():
      broken.append(f"{target}: no such file")
    elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked.read_text()):
      broken.append(f"{target}: no heading with that anchor")
  assert not broken, "\n".join(broken)


# --- the own-data guide, run ------------------------------------------------------------------

# What the guide's worked example is shrunk by when the test runs it: one step on small crops
# of a tiny U-Net, and a few val images.
_SHRINK = {
    "experiments.unet": ["--config.train.steps=2", "--config.data.crop_size=32,32",
                         "--config.model.features=4", "--config.model.depth=2",
                         "--config.model.dtype=float32", "--config.train.num_eval_examples=8",
                         "--config.train.num_prediction_images=2"],
    "experiments.evaluate": ["--num_examples=8"],
}


def test_own_data_guide_worked_example_runs(tmp_path):
  """docs/own_data.md's worked example, run command by command from the repository root, its
  folders moved under tmp_path: export CamVid as a folder, train on it, evaluate, predict."""
  text = (ROOT / "docs" / "own_data.md").read_text()
  block = re.search(r"## A worked example.*?```bash\n(.*?)```", text, re.S).group(1)
  moved = {"/tmp/camvid_folder": str(tmp_path / "camvid_folder"),
           "/tmp/camvid_masks": str(tmp_path / "masks"),
           "runs/unet_camvid_folder": str(tmp_path / "run")}
  for line in _script_lines(block):
    for old, new in moved.items():
      line = line.replace(old, new)
    tokens = shlex.split(line)
    shrink = _SHRINK.get(tokens[2], [])
    replaced = {flag.split("=")[0] for flag in shrink}  # (a repeated tuple flag would append)
    tokens = [t for t in tokens if t.split("=")[0] not in replaced]
    result = subprocess.run([sys.executable, *tokens[1:], *shrink], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{line}\n{result.stderr[-3000:]}"
  with open(tmp_path / "run" / "eval.json") as f:
    assert json.load(f)["examples"] == 8
  assert (tmp_path / "masks" / "0016E5_07959_overlay.png").exists()
