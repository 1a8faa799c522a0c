"""README.md and docs/*.md: their code runs as shown, their commands and links point at what exists.

The conventions the pages follow (docs/README.md repeats them for writers):

- A ```python block is executed: the blocks of one page in order, in one namespace, with a
  temporary directory as the working directory. A block that raises fails the test. A block
  fenced ```python no-run is only compiled (`compile()`), to catch syntax rot: for code that
  needs what a test cannot have (a GPU, several hosts, the real MNIST, minutes of training).
- A ```bash block is checked, not run: every `python -m bnlab.X` names a module that exists,
  every `python PATH.py` a file that exists, every `--config=PATH` (before any `:`) a file that
  exists, and every `--config.KEY=...` a key of `bnlab.config.base_config()` (a free-form
  section such as `model.options` takes any key below it; on a study's command line, a key of
  `bnlab.study.base_config()` is accepted too). A plain ``` block's lines `$ python -m ...` (a
  command shown with its output) and inline code that starts with `python` are checked the same
  way, and so is inline code that starts with `--config.`.
- Every relative link `[text](path#anchor)` names a file that exists and, for a Markdown file,
  a heading of it; every code-quoted repository path (`bnlab/...`, `configs/...`, `tests/...`,
  `experiments/...`, `results/...`, `docs/...`, `.ci/...`; `*` as a glob) exists; every
  code-quoted dotted name `bnlab.x.y` resolves to a module or an attribute.

The whole file runs in a few seconds on a CPU: the examples use tiny shapes and train nothing.
"""

import glob
import importlib
import importlib.util
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
REPO_PATH = re.compile(r"^(?:bnlab|configs|experiments|results|tests|docs|\.ci)/[\w./*-]*$")
DOTTED = re.compile(r"\bbnlab(?:\.[A-Za-z_]\w*)+")
# Words that stand for what the reader fills in: `--config.KEY=VALUE`, `bnlab.X`, `DIR/...`.
PLACEHOLDERS = {"KEY", "VALUE", "X", "N", "G", "NAME", "DIR", "PATH", "ARG", "PATTERN", "MODULE"}


def placeholder(word):
  return "..." in word or bool(PLACEHOLDERS & set(re.split(r"[^\w]+", word)))


def read(page):
  with open(os.path.join(ROOT, page), encoding="utf-8") as f:
    return f.read()


def blocks(text):
  """(info string, code, line of the code's first line) of each fenced block."""
  for m in FENCE.finditer(text):
    yield m.group(1).strip(), m.group(2), text.count("\n", 0, m.start(2)) + 1


def prose(text):
  """The page without its fenced blocks (their lines kept empty, so line numbers hold)."""
  return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def line_of(text, pos):
  return text.count("\n", 0, pos) + 1


# -- python blocks ------------------------------------------------------------------------

@pytest.mark.parametrize("page", PAGES)
def test_python_examples_run(page, tmp_path, monkeypatch):
  programs = []  # every block compiled first: a no-run block's syntax is checked too
  for info, code, line in blocks(read(page)):
    words = info.split()
    if words[:1] == ["python"]:
      # Padded with blank lines, so a traceback names the line of the page.
      program = compile("\n" * (line - 1) + code, os.path.join(ROOT, page), "exec")
      if "no-run" not in words[1:]:
        programs.append((program, line))
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": "docs_example"}
  for program, line in programs:
    try:
      exec(program, namespace)  # pylint: disable=exec-used
    except Exception as e:  # the example failed: say where, keep the cause
      raise AssertionError(f"{page}: the python block at line {line} raised "
                           f"{type(e).__name__}: {e}") from e
  if page == "README.md":
    assert len(programs) >= 2, "README.md: the linen and NNX examples were not found"


def test_readme_layer_examples_compute_what_they_say():
  section = read("README.md").split("## Using the layers in your own model", 1)[1]
  section = section.split("\n## ", 1)[0]
  codes = [code for info, code, _ in blocks(section) if info == "python"]
  assert len(codes) == 2, "expected the linen (with the functional core) and the NNX example"
  namespace = {"__name__": "docs_example"}
  for code in codes:
    exec(code, namespace)  # pylint: disable=exec-used
  assert namespace["logits"].shape == (32, 10)
  assert namespace["new_mean"].shape == namespace["new_var"].shape == (784,)
  assert int(namespace["model"].bn.steps[...]) == 1  # one train-mode call, then eval


def test_studies_page_shows_the_study_config_as_it_is():
  with open(os.path.join(ROOT, "configs", "studies", "bn_batch_size.py")) as f:
    example = f.read()
  assert len(example.splitlines()) < 60
  page = read(os.path.join("docs", "studies.md")).split("## Writing a study", 1)[1]
  shown = next(code for info, code, _ in blocks(page) if info.split()[:1] == ["python"])
  assert example.endswith(shown)  # the file as it is, less its docstring


# -- commands -----------------------------------------------------------------------------

def _base_config():
  from bnlab import config as config_lib
  return config_lib.base_config()


def _study_config():
  from bnlab import study
  return study.base_config()


FREE_FORM = {"model.options", "optimizer.kwargs", "run.overrides", "metrics", "tables", "figures", "claims",
             "labels", "measurements"}


def _has_key(cfg, key):
  node, walked = cfg, []
  for part in key.split("."):
    if ".".join(walked) in FREE_FORM:
      return True
    if not hasattr(node, "keys") or part not in node.keys():
      return False
    node = node[part]
    walked.append(part)
  return True


def commands(text):
  """(command, line) of every shell command on a page: bash blocks, `$ ` lines, inline code."""
  for info, code, line in blocks(text):
    words = info.split()
    if words[:1] in (["bash"], ["sh"], ["shell"]):
      shown = code
    elif not words:
      # A command shown with its output: its `$ ` line and the lines it continues onto.
      kept, going_on = [], False
      for l in code.split("\n"):
        if l.startswith("$ ") or going_on:
          kept.append(l[2:] if l.startswith("$ ") else l)
          going_on = l.rstrip().endswith("\\")
        else:
          kept.append("")
      shown = "\n".join(kept)
    else:
      continue
    command, start = "", None
    for i, l in enumerate(shown.split("\n")):
      if not l.strip() and not command:
        continue
      start = line + i if start is None else start
      command += l.rstrip().removesuffix("\\") + " "
      if not l.rstrip().endswith("\\"):
        yield command.strip(), start
        command, start = "", None
    if command:
      yield command.strip(), start
  plain = prose(text)
  for m in CODE_SPAN.finditer(plain):
    if re.match(r"python3? |--config\.", m.group(1)):
      yield m.group(1), line_of(plain, m.start())


def check_command(command):
  """The problems of one command line (empty: none)."""
  problems = []
  for module in re.findall(r"python3? -m (bnlab[\w.]*)", command):
    if not placeholder(module) and importlib.util.find_spec(module) is None:
      problems.append(f"no module {module}")
  for script in re.findall(r"python3? ((?:experiments|bnlab|tests|configs)/\S+\.py)", command):
    if not os.path.isfile(os.path.join(ROOT, script)):
      problems.append(f"no file {script}")
  try:
    words = shlex.split(command, comments=True)
  except ValueError:
    words = command.split()
  config_paths = [w.split("=", 1)[1].split(":", 1)[0] for w in words
                  if w.startswith("--config=")]
  for path in config_paths:
    if not os.path.isfile(os.path.join(ROOT, path)) and not path.startswith("/"):
      problems.append(f"--config={path}: no such file")
  is_study = (any(p.startswith("configs/studies/") for p in config_paths)
              or not config_paths and "bnlab.study" in command)
  for w in words:
    m = re.match(r"--config\.([\w.]+)(?:=|$)", w)
    if not m:
      continue
    key = m.group(1)
    if placeholder(key):
      continue
    if _has_key(_base_config(), key) or (is_study and _has_key(_study_config(), key)):
      continue
    problems.append(f"--config.{key}: not a config key")
  return problems


@pytest.mark.parametrize("page", PAGES)
def test_commands_name_what_exists(page):
  problems = [f"{page}:{line}: {p}" for command, line in commands(read(page))
              for p in check_command(command)]
  assert not problems, "\n".join(problems)


def test_the_command_check_finds_rot():
  assert check_command("python -m bnlab.main --config=configs/paper_mlp.py "
                       "--config.train.num_steps=1 --config.model.options.width=3") == []
  assert check_command("python -m bnlab.study --config=configs/studies/why_bn.py:runlocal "
                       "--config.title=x") == []
  assert len(check_command("python -m bnlab.norm --config=configs/nothing.py:bn "
                           "--config.train.no_such_key=1 --config.title=x")) == 4


# -- links, paths and names ---------------------------------------------------------------

def slug(heading):
  """GitHub's anchor of a Markdown heading."""
  heading = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
  return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def anchors(page):
  text = prose(read(page))
  return {slug(m.group(1)) for m in re.finditer(r"^#+ +(.+?) *#*$", text, re.M)}


@pytest.mark.parametrize("page", PAGES)
def test_links_resolve(page):
  text = prose(read(page))
  here = os.path.dirname(page)
  problems = []
  for m in LINK.finditer(text):
    target = m.group(1)
    if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked here
      continue
    path, _, anchor = target.partition("#")
    path = os.path.normpath(os.path.join(here, path)) if path else page
    where = f"{page}:{line_of(text, m.start())}: {target}"
    if not os.path.exists(os.path.join(ROOT, path)):
      problems.append(f"{where}: no such file")
    elif anchor and path.endswith(".md") and anchor not in anchors(path):
      problems.append(f"{where}: no heading #{anchor} in {path}")
  assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES)
def test_code_quoted_paths_and_names_exist(page):
  text = prose(read(page))
  problems = []
  for m in CODE_SPAN.finditer(text):
    span, where = m.group(1), f"{page}:{line_of(text, m.start())}"
    for word in span.split():
      word = word.strip("'\",;()")
      if REPO_PATH.match(word) and not placeholder(word) and "<" not in word:
        if not glob.glob(os.path.join(ROOT, word)):
          problems.append(f"{where}: no {word}")
    for name in DOTTED.findall(span):
      if not placeholder(name) and not resolves(name):
        problems.append(f"{where}: {name} does not resolve")
  assert not problems, "\n".join(problems)


def resolves(dotted):
  """Whether `bnlab.a.b.c` is a module, or an attribute of the longest module prefix."""
  parts = dotted.split(".")
  for n in range(len(parts), 0, -1):
    name = ".".join(parts[:n])
    try:
      if importlib.util.find_spec(name) is None:
        continue
    except ModuleNotFoundError:
      continue
    obj = importlib.import_module(name)
    for attr in parts[n:]:
      if not hasattr(obj, attr):
        return False
      obj = getattr(obj, attr)
    return True
  return False


def test_readme_is_a_front_page_linking_every_docs_page():
  readme = read("README.md")
  # A front page: the manual holds the rest. 280 since it shows one verdict recomputed.
  assert len(readme.splitlines()) <= 280
  linked = {os.path.normpath(m.group(1).partition("#")[0]) for m in LINK.finditer(readme)}
  missing = [p for p in PAGES[1:] if p not in linked]
  assert not missing, f"README.md links no {missing}"
  assert "results/README.md" in linked


def test_readme_layout_names_every_module():
  """The README's layout table matches the folders: each row's folder lists every module in
  it, every module at the top of the package has a row, and every file a row names exists."""
  rows = [line for line in read("README.md").splitlines() if line.startswith("| `bnlab/")]
  missing, stale = [], []
  for folder, _, files in os.walk(os.path.join(ROOT, "bnlab")):
    rel = os.path.relpath(folder, ROOT).replace(os.sep, "/")
    if "__pycache__" in rel:
      continue
    for name in sorted(f for f in files if f.endswith(".py")):
      if name in ("__init__.py", "__main__.py"):
        continue
      top = rel == "bnlab"
      named = any((f"`bnlab/{name}`" in row or f"`{name}`" in row) if top else
                  (row.startswith(f"| `{rel}/`") and f"`{name}`" in row) for row in rows)
      if not named:
        missing.append(f"{rel}/{name}")
  for row in rows:
    first = re.match(r"\| `(bnlab/[\w./]*)`", row).group(1).rstrip("/")
    base = first if os.path.isdir(os.path.join(ROOT, first)) else os.path.dirname(first)
    for name in re.findall(r"`(\w+\.py)`", row):
      if not os.path.exists(os.path.join(ROOT, base, name)):
        stale.append(f"{base}/{name}")
  assert not missing and not stale, f"not in the layout table: {missing}; gone: {stale}"
