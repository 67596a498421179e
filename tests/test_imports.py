"""The import layers of jaxseg (../shared/STYLE.md, "Dependencies point one way"): no cycles,
no import of a higher layer, nothing imports the studies. Read from the source with `ast`, so
function-level imports count as much as module-level ones."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Lowest first. A module may import its own layer or a lower one; a module belongs to the layer
# of the longest prefix it matches. weights converts into backbones and takes its ImageNet
# mean/std from jaxseg.data.preprocess, so it sits above data; image_quality (FID features)
# loads converted weights.
LAYERS = (
    ("base", ("jaxseg.errors", "jaxseg.version", "jaxseg.runtime", "jaxseg.ops", "jaxseg.layers", "jaxseg.norm")),
    ("models", ("jaxseg.backbones", "jaxseg.models", "jaxseg.losses", "jaxseg.metrics",
                "jaxseg.visualize")),
    ("data", ("jaxseg.data",)),
    ("weights", ("jaxseg.weights", "jaxseg.image_quality")),
    ("inference", ("jaxseg.inference",)),
    ("train", ("jaxseg.train",)),
    ("runs", ("jaxseg.runs", "jaxseg.evaluate", "jaxseg.export", "jaxseg.portable",
              "jaxseg.predict", "jaxseg.tiling")),
    ("studies", ("jaxseg.studies",)),
)
# Re-exporting package modules: they may import any layer (nothing in the library imports them).
EXEMPT_IMPORTERS = ("jaxseg",)


def modules(root: pathlib.Path, package: str) -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for every module of `package` under `root`."""
  found = {}
  for path in sorted((root / package).rglob("*.py")):
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    found[".".join(parts)] = path
  return found


def import_graph(root: pathlib.Path, package: str, declared=()) -> dict[str, dict[str, int]]:
  """importer -> {imported module of `package`: first line}, module- and function-level.

  `from a.b import c` imports a.b.c when that is a module (on disk, or one of `declared`,
  e.g. a layer's module that is not written yet), else a.b. Relative imports are resolved.
  """
  mods = modules(root, package)
  known = set(mods) | set(declared)
  graph = {}
  for name, path in mods.items():
    base = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = graph.setdefault(name, {})
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        source = node.module
        if node.level:  # `from . import x` is `from <base> import x`; each further dot, one up
          parts = base.split(".")
          parts = parts[:len(parts) - node.level + 1] + ([node.module] if node.module else [])
          source = ".".join(parts)
        targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source
                   for a in node.names]
      else:
        continue
      for target in targets:
        if target == package or target.startswith(package + "."):
          edges.setdefault(target, node.lineno)
  return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[tuple[list[str], list[str]]]:
  """(one cycle, its component) per strongly connected component of more than one module, or
  a module importing itself: the cycle's modules in import order, the first repeated at the
  end (the shortest from the component's first module); the component's modules sorted."""
  index, low, on_stack, stack, components = {}, {}, set(), [], []

  def connect(v):  # Tarjan; the graphs here are small enough for recursion.
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        connect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      components.append(component)

  for v in sorted(graph):
    if v not in index:
      connect(v)

  cycles = []
  for component in components:
    start = min(component)
    if len(component) == 1 and start not in graph.get(start, ()):
      continue
    # The shortest way back to `start` within the component (breadth first).
    members, parent, frontier = set(component), {}, [start]
    while start not in parent:
      following = []
      for v in frontier:
        for w in sorted(graph.get(v, ())):
          if w in members and w not in parent:
            parent[w] = v
            following.append(w)
      frontier = following
    backwards, v = [], parent[start]
    while v != start:
      backwards.append(v)
      v = parent[v]
    cycles.append(([start] + backwards[::-1] + [start], sorted(component)))
  return sorted(cycles)


def layer_of(module: str, layers=LAYERS) -> str | None:
  """The layer of the longest prefix that `module` matches, or None."""
  best, best_prefix = None, ""
  for layer, prefixes in layers:
    for prefix in prefixes:
      matches = module == prefix or module.startswith(prefix + ".")
      if matches and len(prefix) > len(best_prefix):
        best, best_prefix = layer, prefix
  return best


def layer_violations(graph, root: pathlib.Path, layers=LAYERS,
                     exempt=EXEMPT_IMPORTERS) -> list[str]:
  """Every import of a higher layer (or of a module in no layer), as a sentence."""
  rank = {layer: i for i, (layer, _) in enumerate(layers)}
  found = []
  for importer, edges in sorted(graph.items()):
    if importer in exempt:
      continue
    own = layer_of(importer, layers)
    for target, line in sorted(edges.items()):
      theirs = layer_of(target, layers)
      where = f"{_path(importer, root)} imports {target}"
      if own is None or theirs is None:
        lost = importer if own is None else target
        found.append(f"{where}, but {lost} is in no layer (line {line}): add it to LAYERS")
      elif rank[theirs] > rank[own]:
        found.append(f"{where} (layer {theirs}) from layer {own} (line {line})")
  return found


def importers(graph, root: pathlib.Path, package: str) -> list[str]:
  """Every import of `package` (or a module in it) by a module outside it, as a sentence."""

  def inside(module):
    return module == package or module.startswith(package + ".")

  return [f"{_path(importer, root)} imports {target} (line {line})"
          for importer, edges in sorted(graph.items()) if not inside(importer)
          for target, line in sorted(edges.items()) if inside(target)]


def _path(module: str, root: pathlib.Path) -> str:
  """jaxseg.train.graph -> jaxseg/train/graph.py (or .../__init__.py for a package)."""
  path = pathlib.Path(*module.split("."))
  return str(path / "__init__.py" if (root / path).is_dir() else path.with_suffix(".py"))


def _declared(layers=LAYERS) -> set[str]:
  return {prefix for _, prefixes in layers for prefix in prefixes}


@pytest.fixture(scope="module")
def graph():
  return import_graph(ROOT, "jaxseg", declared=_declared())


def _describe(cycles) -> str:
  return "\n".join(" -> ".join(cycle) + (f" (and more among {', '.join(component)})"
                                          if len(component) + 1 > len(cycle) else "")
                   for cycle, component in cycles)


def test_no_import_cycles(graph):
  cycles = find_cycles(graph)
  assert not cycles, "import cycles:\n" + _describe(cycles)


def test_imports_follow_the_layer_order(graph):
  violations = layer_violations(graph, ROOT)
  assert not violations, "imports against the layer order:\n" + "\n".join(violations)


def test_every_module_is_in_a_layer(graph):
  lost = [m for m in graph if m not in EXEMPT_IMPORTERS and layer_of(m) is None]
  assert not lost, f"modules in no layer (add them to LAYERS): {lost}"


def test_nothing_imports_the_studies(graph):
  found = importers(graph, ROOT, "jaxseg.studies")
  assert not found, "the studies are imported:\n" + "\n".join(found)


def test_the_graph_sees_known_edges(graph):
  """Guards against a checker that reads nothing: edges that the library is built on."""
  assert "jaxseg.norm" in graph["jaxseg.layers"]  # module-level, `from jaxseg import norm`
  assert "jaxseg.weights" in graph["jaxseg.image_quality"]  # function-level
  assert "jaxseg.data.files" in graph["jaxseg.data.camvid"]  # `from a.b import name`
  assert "jaxseg.errors" in graph["jaxseg.train.optim"]


# A tiny package: low <- mid <- high, with one file per case replaced.
_TINY_LAYERS = (("low", ("pkg.low",)), ("mid", ("pkg.mid",)), ("high", ("pkg.high",)))
_TINY_FILES = {
    "pkg/__init__.py": "from pkg import high\n",
    "pkg/low.py": "import os\n",
    "pkg/mid/__init__.py": "",
    "pkg/mid/a.py": "from pkg import low\nfrom . import b\n",
    "pkg/mid/b.py": "from ..low import *\n",
    "pkg/high.py": "from pkg.mid.a import x\n\ndef f():\n  import pkg.mid.b\n",
}


def _tiny_graph(tmp_path, changes):
  for name, text in {**_TINY_FILES, **changes}.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text)
  return import_graph(tmp_path, "pkg", declared=_declared(_TINY_LAYERS))


@pytest.mark.parametrize("changes, cycles, violations", [
    pytest.param({}, [], [], id="clean"),
    pytest.param({"pkg/mid/b.py": "def f():\n  from pkg.mid import a\n"},
                 [(["pkg.mid.a", "pkg.mid.b", "pkg.mid.a"], ["pkg.mid.a", "pkg.mid.b"])], [],
                 id="function-level cycle"),
    pytest.param({"pkg/mid/b.py": "from .. import high\n"},
                 [(["pkg.high", "pkg.mid.b", "pkg.high"], ["pkg.high", "pkg.mid.a", "pkg.mid.b"])],
                 ["pkg/mid/b.py imports pkg.high (layer high) from layer mid (line 1)"],
                 id="relative upward import"),
    pytest.param({"pkg/low.py": "def f():\n  import pkg.mid\n"}, [],
                 ["pkg/low.py imports pkg.mid (layer mid) from layer low (line 2)"],
                 id="function-level upward import"),
    pytest.param({"pkg/stray.py": "", "pkg/low.py": "import pkg.stray\n"}, [],
                 ["pkg/low.py imports pkg.stray, but pkg.stray is in no layer (line 1): add it "
                  "to LAYERS"], id="module in no layer"),
])
def test_checker_on_a_tiny_package(tmp_path, changes, cycles, violations):
  tiny = _tiny_graph(tmp_path, changes)
  assert tiny["pkg.high"] == {"pkg.mid.a": 1, "pkg.mid.b": 4}
  assert find_cycles(tiny) == cycles
  assert layer_violations(tiny, tmp_path, _TINY_LAYERS, exempt=("pkg",)) == violations


def test_importers_on_a_tiny_package(tmp_path):
  tiny = _tiny_graph(tmp_path, {})
  assert importers(tiny, tmp_path, "pkg.mid") == [
      "pkg/high.py imports pkg.mid.a (line 1)", "pkg/high.py imports pkg.mid.b (line 4)"]
  assert importers(tiny, tmp_path, "pkg.high") == ["pkg/__init__.py imports pkg.high (line 1)"]
  assert importers(tiny, tmp_path, "pkg") == []
