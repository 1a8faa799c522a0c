"""The package's arrows point one way: experiments -> engine -> layers, with no import cycle.

Read from the source (every `import` of a bnlab module, at the top of a file or
inside a function), so an import added anywhere that closes a circle, or that
makes the layers depend on the engine, fails here before it confuses a reader.
"""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "bnlab")

# What each part of the package may import, besides itself (by top-level name under bnlab).
ALLOWED = {
    "errors": set(),
    "layers": set(),
    "models": {"layers", "errors"},
    "data": {"errors"},
    "analysis": set(),
    "config": {"errors", "layers", "models", "data", "engine"},  # engine: its distributed section
    "engine": {"errors", "layers", "models", "data", "config", "rundir"},
    "rundir": {"errors", "data", "config", "engine"},  # engine: distributed (who writes)
    "sweep": {"errors", "config", "data", "engine", "rundir", "models", "main"},  # main: flags
    "study": {"errors", "config", "data", "engine", "rundir", "models", "sweep", "analysis",
              "main"},
    "main": {"errors", "config", "data", "engine", "rundir"},
    "nnx": {"layers"},  # bnlab.nnx: the NNX layers of bnlab.layers.nnx as a module
}


def _modules() -> dict[str, str]:
  """Dotted name -> file, for every module of the package."""
  found = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].split(os.sep)
        if rel[-1] == "__init__":
          rel = rel[:-1]
        found[".".join(rel)] = os.path.join(folder, name)
  return found


def _imports(path: str, modules) -> set[str]:
  """The bnlab modules `path` imports (a name imported from a package counts as its module)."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name in modules)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if not node.module.startswith("bnlab"):
        continue
      for alias in node.names:
        sub = f"{node.module}.{alias.name}"
        out.add(sub if sub in modules else node.module)
  return out


def _graph():
  modules = _modules()
  return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _part(module: str) -> str:
  return module.split(".")[1] if "." in module else ""


def test_no_import_cycles():
  # A package's __init__ re-exporting its own modules is not an arrow a reader follows.
  graph = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in _graph().items()}
  state, cycles = {}, []

  def visit(node, stack):
    state[node] = "open"
    for dep in sorted(graph.get(node, ())):
      if state.get(dep) == "open":
        cycles.append(stack[stack.index(dep):] + [dep])
      elif dep not in state:
        visit(dep, stack + [dep])
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_each_part_imports_only_the_parts_below_it():
  wrong = []
  for module, deps in sorted(_graph().items()):
    part = _part(module)
    if not part:
      continue  # bnlab/__init__.py: the public names
    for dep in sorted(deps):
      other = _part(dep)
      if other and other != part and other not in ALLOWED[part]:
        wrong.append(f"{module} imports {dep}")
  assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_every_part_is_listed(part):
  assert os.path.exists(os.path.join(PACKAGE, part)) or os.path.exists(
      os.path.join(PACKAGE, part + ".py"))


def test_parts_are_all_listed():
  parts = {_part(m) for m in _modules()} - {""}
  assert parts <= set(ALLOWED), parts - set(ALLOWED)


def test_the_layers_load_without_the_engine():
  """`import bnlab` (the layers) loads no engine, run directory, sweep or study module;
  `bnlab.train_and_evaluate` loads the engine when first used."""
  code = ("import sys, bnlab\n"
          "heavy = sorted(m for m in sys.modules if m.split('.')[:2] in "
          "(['bnlab', 'engine'], ['bnlab', 'rundir'], ['bnlab', 'sweep'], ['bnlab', 'study']))\n"
          "print(heavy)\n"
          "from bnlab.engine import train\n"
          "print(bnlab.train_and_evaluate is train.train_and_evaluate)\n")
  p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                     timeout=120)
  assert p.stdout.split() == ["[]", "True"], p.stdout + p.stderr
