"""The repository contract: README commands, CI running the README's test command verbatim."""

import pathlib
import re

from experiments.configs import deeplab as deeplab_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


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


def test_shared_config_keys_in_readme_exist_with_their_defaults():
  config = deeplab_config.get_config()
  table = README.split("Keys shared by every experiment")[1].split("\n\n")[1]
  rows = re.findall(r"^\| `(\w+)\.(\w+)` \| `?([^|`]+?)`? \|", table, re.M)
  assert len(rows) >= 7
  for section, key, default in rows:
    assert str(config[section][key]) == default.strip(), f"{section}.{key}"


def test_readme_library_example_runs():
  code = re.search(r"## Using the library.*?```python\n(.+?)```", README, re.S).group(1)
  scope = {}
  exec(compile(code, "README.md", "exec"), scope)  # pylint: disable=exec-used
  assert scope["logits"].shape == (2, 128, 128, 19)
  assert scope["loss"].dtype == "float32" and 0 <= scope["summary"]["miou"] <= 1
