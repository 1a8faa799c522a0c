"""Flax's own BatchNorm tests, run with Flax's layers swapped for bnlab's.

  python experiments/flax_conformance.py [--swap=none,bnlab,bnlab_fast] \
      [--files=tests/nnx/nn/normalization_test.py,...] [--cache_dir=DIR] \
      [--timeout=1800] [--out=results/flax_conformance.md]

Downloads the source distribution of the installed Flax (`flax.__version__`,
which ships its tests) into --cache_dir with `pip download`, unpacks it, and
runs with pytest, once per file and --swap mode, every BatchNorm case of the
test files in FILES (or --files): a test function or method whose source
mentions `BatchNorm`, directly or through module-level helpers that do (see
`batchnorm_cases`); an example's test file counts whole, since the example's
model code holds the layer. A plugin written to a temporary directory and
loaded with `-p` replaces, before the tests import anything, every
`BatchNorm` attribute of a loaded `flax` module that is Flax's class
(`flax.linen.BatchNorm`, `flax.linen.normalization.BatchNorm`,
`flax.nnx.BatchNorm`, `flax.nnx.nn.normalization.BatchNorm`):
  - none: Flax's own layers (the baseline);
  - bnlab: `bnlab.BatchNorm` and `bnlab.nnx.BatchNorm` as they are (robust
    variance unless a test passes `use_fast_variance`: True or False give
    Flax's formulas, op for op);
  - bnlab_fast: the same with `use_fast_variance=True` by default, Flax's own
    default, which makes bnlab's train-mode computation Flax's op for op;
  - bnlab_linen, bnlab_nnx, bnlab_fast_linen, bnlab_fast_nnx (not run by
    default): only the linen or only the NNX layer swapped, so tests
    comparing the two APIs compare bnlab's layer with Flax's.
The swapped classes keep the name `BatchNorm`, so linen auto-names and
reprs match. Flax's pytest configuration (warnings are errors) applies. A
file that cannot import is reported as "not run (missing X)", never as
passed. Prints a Markdown table (passed / failed / skipped per mode, the
failing cases) and writes it to --out when given.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Flax's test files that use BatchNorm (grep of the 0.12.8 source distribution).
FILES = (
    "tests/nnx/nn/normalization_test.py",
    "tests/nnx/nn/linear_test.py",
    "tests/nnx/helpers_test.py",
    "tests/nnx/transforms_test.py",
    "tests/nnx/summary_test.py",
    "tests/nnx/graph_utils_test.py",
    "tests/nnx/integration_test.py",
    "tests/nnx/module_test.py",
    "tests/nnx/bridge/wrappers_test.py",
    "tests/checkpoints_test.py",
    "tests/linen/summary_test.py",
    "tests/linen/linen_test.py",
    "tests/linen/linen_transforms_test.py",
    "tests/linen/linen_module_test.py",
    "examples/imagenet/models_test.py",
    "examples/imagenet/train_test.py",
    "examples/gemma/helpers_test.py",
)
# The *_linen / *_nnx modes swap one API only: a test that compares a linen layer with an NNX
# one then compares bnlab with Flax, bit for bit.
MODES = ("none", "bnlab", "bnlab_fast", "bnlab_linen", "bnlab_nnx", "bnlab_fast_linen",
         "bnlab_fast_nnx")
DEFAULT_MODES = ("none", "bnlab", "bnlab_fast")


# The plugin pytest loads with `-p`: it swaps the layers before the test files are
# imported, keeps only the BatchNorm cases and writes each case's outcome as JSON.
PLUGIN = r'''
"""Swaps Flax's BatchNorm for bnlab's and keeps only the BatchNorm cases."""
import inspect
import json
import os
import sys

import flax
import flax.linen
import flax.linen.normalization
import flax.nnx
import flax.nnx.nn.normalization

SWAP = os.environ["BNLAB_CONFORMANCE_SWAP"]
SELECTED = json.loads(os.environ["BNLAB_CONFORMANCE_CASES"])  # names of test functions
RESULTS = os.environ["BNLAB_CONFORMANCE_RESULTS"]
FLAX_LINEN = flax.linen.normalization.BatchNorm
FLAX_NNX = flax.nnx.nn.normalization.BatchNorm
SWAPPED = []

if SWAP != "none":
  import bnlab

  ONLY = next((api for api in ("linen", "nnx") if SWAP.endswith("_" + api)), None)
  BASE = SWAP[:-len(ONLY) - 1] if ONLY else SWAP  # bnlab or bnlab_fast
  if BASE == "bnlab":
    LINEN, NNX = bnlab.BatchNorm, bnlab.nnx.BatchNorm
  elif BASE == "bnlab_fast":
    class BatchNorm(bnlab.BatchNorm):  # keeps the class name: linen auto-names BatchNorm_0
      use_fast_variance: bool = True

    LINEN = BatchNorm

    class BatchNorm(bnlab.nnx.BatchNorm):  # pylint: disable=function-redefined
      def __init__(self, num_features, *, use_fast_variance=True, **kwargs):
        super().__init__(num_features, use_fast_variance=use_fast_variance, **kwargs)

    NNX = BatchNorm
  else:
    raise ValueError(f"unknown swap mode {SWAP!r}")
  for name, module in sorted(sys.modules.items()):
    if name.split(".")[0] != "flax" or module is None:
      continue
    current = getattr(module, "BatchNorm", None)
    if current is FLAX_LINEN and ONLY != "nnx":
      module.BatchNorm = LINEN
      SWAPPED.append(f"{name}.BatchNorm")
    elif current is FLAX_NNX and ONLY != "linen":
      module.BatchNorm = NNX
      SWAPPED.append(f"{name}.BatchNorm")

_outcomes = {}
_not_run = {}


def _case_name(item):
  function = getattr(item, "obj", None)
  function = inspect.unwrap(function) if function is not None else None
  name = getattr(function, "__name__", None) or getattr(item, "originalname", item.name)
  cls = getattr(item, "cls", None)
  return f"{cls.__name__}.{name}" if cls is not None else name


def pytest_collection_modifyitems(session, config, items):
  keep, drop = [], []
  for item in items:
    file = os.path.relpath(str(item.path), str(config.rootpath))
    whole = SELECTED.get(file) == "*"
    (keep if whole or _case_name(item) in SELECTED.get(file, ()) else drop).append(item)
  if drop:
    config.hook.pytest_deselected(items=drop)
  items[:] = keep


def pytest_collectreport(report):
  if report.failed:
    _not_run[report.nodeid] = str(report.longrepr)[-2000:]


def pytest_runtest_logreport(report):
  outcome = report.outcome
  if report.when == "call" or outcome != "passed":
    previous = _outcomes.get(report.nodeid)
    if previous in (None, "passed"):  # a teardown failure after a passing call counts
      _outcomes[report.nodeid] = "skipped" if outcome == "skipped" else outcome


def pytest_sessionfinish(session, exitstatus):
  with open(RESULTS, "w") as f:
    json.dump({"outcomes": _outcomes, "not_run": _not_run, "swapped": SWAPPED}, f)
'''


def _mentions(node: ast.AST, source: str, names: set[str]) -> bool:
  """Whether `node`'s source (decorators too: parametrizations) names BatchNorm or
  one of `names`, the helpers that do."""
  first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", ())])
  segment = "\n".join(source.splitlines()[first - 1:node.end_lineno])  # with decorators
  if "BatchNorm" in segment:
    return True
  return any(isinstance(n, ast.Name) and n.id in names for n in ast.walk(node))


def _defined_names(node: ast.stmt) -> list[str]:
  if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
    return [node.name]
  if isinstance(node, (ast.Assign, ast.AnnAssign)):
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return [t.id for t in targets if isinstance(t, ast.Name)]
  return []


def batchnorm_cases(source: str) -> list[str]:
  """The BatchNorm test cases of one test file's source, sorted.

  A case is a `test*` function at module level (`name`) or a `test*` method of
  a class (`Class.name`, parametrized variants included) whose source mentions
  `BatchNorm`, or names a module-level function, class or variable that does
  (transitively): Flax's tests often build their model in such a helper. The
  test classes themselves are not helpers.
  """
  tree = ast.parse(source)
  helpers: set[str] = set()
  candidates = [n for n in tree.body
                if _defined_names(n) and not (isinstance(n, ast.ClassDef)
                                              and n.name.endswith(("Test", "Tests")))]
  changed = True
  while changed:  # fixed point: helpers of helpers
    changed = False
    for node in candidates:
      names = _defined_names(node)
      if not set(names) <= helpers and _mentions(node, source, helpers):
        helpers |= set(names)
        changed = True
  cases = []
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
      if _mentions(node, source, helpers):
        cases.append(node.name)
    elif isinstance(node, ast.ClassDef):
      for sub in node.body:
        if (isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef))
            and sub.name.startswith("test") and _mentions(sub, source, helpers)):
          cases.append(f"{node.name}.{sub.name}")
  return sorted(set(cases))


def select(src_root: str, files) -> dict:
  """{file: sorted case names, or "*" for an example's whole test file}."""
  selected = {}
  for file in files:
    with open(os.path.join(src_root, file)) as f:
      source = f.read()
    if file.startswith("examples/"):
      selected[file] = "*"
    else:
      selected[file] = batchnorm_cases(source)
  return selected


def missing_module(text: str) -> str | None:
  """The module a collection error says is missing, if that is the error."""
  m = re.search(r"No module named '([\w.]+)'", text)
  return m.group(1).split(".")[0] if m else None


def download(version: str, cache_dir: str) -> str:
  """Flax's source distribution of `version`, unpacked under `cache_dir`; its root."""
  root = os.path.join(cache_dir, f"flax-{version}")
  if not os.path.isdir(os.path.join(root, "tests")):
    os.makedirs(cache_dir, exist_ok=True)
    archive = os.path.join(cache_dir, f"flax-{version}.tar.gz")
    if not os.path.isfile(archive):
      subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                      ":all:", f"flax=={version}", "-d", cache_dir], check=True)
    with tarfile.open(archive) as tar:
      tar.extractall(cache_dir, filter="data")
  for file in ("pyproject.toml", "tests/nnx/nn/normalization_test.py"):
    if not os.path.isfile(os.path.join(root, file)):
      raise RuntimeError(f"{archive} did not unpack a Flax source tree: no {file} in {root}")
  return root


def run_file(src_root: str, file: str, cases, swap: str, plugin_dir: str, timeout: int) -> dict:
  """One pytest run of `file` in mode `swap`: the plugin's JSON (outcomes, not_run, swapped)."""
  results = os.path.join(plugin_dir, "results.json")
  if os.path.exists(results):
    os.remove(results)
  env = dict(os.environ,
             BNLAB_CONFORMANCE_SWAP=swap,
             BNLAB_CONFORMANCE_CASES=json.dumps({file: cases}),
             BNLAB_CONFORMANCE_RESULTS=results,
             PYTHONPATH=os.pathsep.join([plugin_dir, ROOT, os.environ.get("PYTHONPATH", "")]),
             JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "bnlab_flax_swap", "-p", "no:cacheprovider",
         "-c", os.path.join(src_root, "pyproject.toml"), "--rootdir", src_root,
         os.path.join(src_root, file)]
  # cwd outside the source tree: the tests must import the installed flax, not its copy.
  try:
    proc = subprocess.run(cmd, cwd=plugin_dir, env=env, capture_output=True, text=True,
                          timeout=timeout)
    tail = (proc.stdout + proc.stderr)[-3000:]
  except subprocess.TimeoutExpired:
    return {"outcomes": {}, "not_run": {file: f"timed out after {timeout} s"}, "swapped": []}
  if not os.path.exists(results):
    return {"outcomes": {}, "not_run": {file: f"pytest failed to start:\n{tail}"}, "swapped": []}
  with open(results) as f:
    return json.load(f)


def table(version: str, selected: dict, runs: dict) -> str:
  """The Markdown report of `runs` ({mode: {file: plugin JSON}})."""
  lines = [f"Flax {version}: BatchNorm cases of {len(selected)} test files.", "",
           "| mode | cases | passed | failed | skipped | not run |",
           "|---|---|---|---|---|---|"]
  details = []
  for mode, per_file in runs.items():
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failing, not_run = [], []
    for file, result in per_file.items():
      for nodeid, outcome in sorted(result["outcomes"].items()):
        counts[outcome] = counts.get(outcome, 0) + 1
        if outcome == "failed":
          failing.append(nodeid.split("::", 1)[-1] if "::" in nodeid else nodeid)
          failing[-1] = f"{file}::{failing[-1]}"
      for nodeid, text in result["not_run"].items():
        missing = missing_module(text)
        not_run.append(f"{file}: not run ({'missing ' + missing if missing else text[:200]})")
    total = sum(counts.values())
    lines.append(f"| {mode} | {total} | {counts['passed']} | {counts['failed']} | "
                 f"{counts['skipped']} | {len(not_run)} files |")
    details.append(f"{mode}: failing: " + (", ".join(failing) if failing else "none"))
    details.extend(f"{mode}: {line}" for line in not_run)
  return "\n".join(lines + [""] + [f"- {d}" for d in details]) + "\n"


def define_flags():
  """The command's flags, defined when it runs (not on import: tests import it beside other
  experiments whose flags share names)."""
  flags.DEFINE_string("swap", ",".join(DEFAULT_MODES),
                      "comma-separated modes: " + ", ".join(MODES))
  flags.DEFINE_list("files", list(FILES), "Flax test files, relative to its source root")
  flags.DEFINE_string("cache_dir", os.path.expanduser("~/.cache/bnlab/flax-conformance"),
                      "where the source distribution is downloaded and unpacked")
  flags.DEFINE_integer("timeout", 1800, "seconds allowed to one pytest run (one file)")
  flags.DEFINE_string("out", None, "also write the Markdown table here")


def main(argv):
  del argv
  import flax  # pylint: disable=g-import-not-at-top
  version = flax.__version__
  src_root = download(version, flags.FLAGS.cache_dir)
  selected = select(src_root, flags.FLAGS.files)
  modes = [m for m in flags.FLAGS.swap.split(",") if m]
  for mode in modes:
    if mode not in MODES:
      raise app.UsageError(f"--swap: unknown mode {mode!r}; one of {', '.join(MODES)}")
  runs = {}
  with tempfile.TemporaryDirectory(prefix="bnlab-flax-conformance-") as plugin_dir:
    with open(os.path.join(plugin_dir, "bnlab_flax_swap.py"), "w") as f:
      f.write(PLUGIN)
    for mode in modes:
      runs[mode] = {}
      for file, cases in selected.items():
        if not cases:
          continue
        result = run_file(src_root, file, cases, mode, plugin_dir, flags.FLAGS.timeout)
        runs[mode][file] = result
        print(f"{mode} {file}: {len(result['outcomes'])} cases, "
              f"{sum(o == 'failed' for o in result['outcomes'].values())} failed, "
              f"swapped {result['swapped']}"
              + "".join(f"; not run: {missing_module(t) or t[:200]}"
                        for t in result["not_run"].values()), flush=True)
  report = table(version, selected, runs)
  print(report)
  if flags.FLAGS.out:
    with open(flags.FLAGS.out, "w") as f:
      f.write(report)


if __name__ == "__main__":
  define_flags()
  app.run(main)
