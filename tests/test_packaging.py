"""bnlab as an installed package: its configs found without the repository, py.typed.

The wheel itself is built, installed into a fresh environment and run from outside the
repository by `test_an_installed_wheel_runs_a_config_and_a_study` (about a minute, and
pip needs setuptools>=77 for the build: set BNLAB_WHEEL_TEST=1 to run it); the fast
tests check what it relies on.
"""

import os
import runpy
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from bnlab import config as config_lib
from bnlab import study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


RUN_CONFIG = ("from bnlab import config\n\ndef get_config(arg=None):\n"
              "  c = config.base_config()\n  c.model.name = {name!r}\n  return c\n")
STUDY = """from bnlab import study


def get_config(arg=None):
  s = study.base_config()
  s.run.config = "configs/run.py"
  return s


def get_sweep(arg=None):
  return [study.config_variant("configs/run.py", {"seed": 1})]
"""


def test_a_studys_run_config_is_found_beside_the_study_from_any_directory(tmp_path,
                                                                         monkeypatch):
  project = tmp_path / "project"
  write(str(project / "configs" / "run.py"), RUN_CONFIG.format(name="seed1_mlp"))
  write(str(project / "configs" / "studies" / "mine.py"), STUDY)
  # The working directory has a configs/run.py of its own: the study's neighbour wins.
  elsewhere = tmp_path / "elsewhere"
  write(str(elsewhere / "configs" / "run.py"), RUN_CONFIG.format(name="paper_mlp"))
  monkeypatch.chdir(elsewhere)
  path = str(project / "configs" / "studies" / "mine.py")
  module = runpy.run_path(path)
  s = study.Study.from_file(path, "", module["get_config"]())
  assert s.base_run_config().model.name == "seed1_mlp"
  assert s.sweep == [{"model.name": "seed1_mlp", "seed": 1}]  # config_variant: the same
  # Without a neighbour, the working directory's.
  assert study.load_run_config("configs/run.py").model.name == "paper_mlp"


def test_find_config_order_and_bnlabs_own_configs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no configs/ here: bnlab's own
  assert config_lib.configs_dir() == os.path.join(ROOT, "configs")  # a checkout's
  own = config_lib.find_config("configs/paper_mlp.py")
  assert own == os.path.join(ROOT, "configs", "paper_mlp.py")
  assert config_lib.find_config("studies/why_bn.py") == os.path.join(
      ROOT, "configs", "studies", "why_bn.py")
  write(str(tmp_path / "configs" / "paper_mlp.py"), "")
  assert config_lib.find_config("configs/paper_mlp.py") == str(tmp_path / "configs" /
                                                               "paper_mlp.py")
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.find_config("configs/no_such.py", near=str(tmp_path / "s.py"))
  message = str(e.value)
  assert message.startswith("config file 'configs/no_such.py' does not exist (looked beside")
  assert config_lib.configs_dir() in message and "\n" not in message
  # Installed: the package's own copy (pyproject.toml maps configs/ to bnlab/configs/).
  package = tmp_path / "site" / "bnlab"
  os.makedirs(package / "configs")
  monkeypatch.setattr(config_lib, "__file__", str(package / "config.py"))
  assert config_lib.configs_dir() == str(package / "configs")


def test_pyproject_maps_every_config_and_py_typed_into_the_package():
  """What pyproject.toml hands setuptools: every bnlab package, configs/ and each folder of it
  as bnlab.configs packages, and py.typed (a package added but not listed fails here)."""
  import tomllib  # pylint: disable=g-import-not-at-top
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    tool = tomllib.load(f)["tool"]["setuptools"]
  assert tool["package-dir"] == {"bnlab.configs": "configs"}
  packages, wanted = set(tool["packages"]), set()
  for root, name in ((ROOT, "bnlab"), (os.path.join(ROOT, "configs"), "configs")):
    top = os.path.join(root, "") if name == "configs" else os.path.join(root, "bnlab")
    for folder, _, files in os.walk(top):
      if "__pycache__" in folder or not any(f.endswith(".py") for f in files):
        continue
      rel = os.path.relpath(folder, top)
      base = "bnlab" if name == "bnlab" else "bnlab.configs"
      wanted.add(base + ("" if rel == "." else "." + rel.replace(os.sep, ".")))
  assert packages == wanted
  assert tool["package-data"]["bnlab"] == ["py.typed"]
  assert os.path.isfile(os.path.join(ROOT, "bnlab", "py.typed"))


def _run(args, cwd, env=None):
  return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600,
                        env=env)


def test_commands_outside_the_repository(tmp_path):
  """From another directory, `--config=configs/...` finds bnlab's configs (a study's run
  config beside the study); a config found nowhere is one error line."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
  p = _run([sys.executable, "-m", "bnlab.study",
            "--config=configs/studies/bn_batch_size.py:runlocal",
            f"--workdir={tmp_path / 'study'}", "--stage=register"], tmp_path, env)
  assert p.returncode == 0 and "registered:" in p.stdout, p.stderr[-2000:]
  p = _run([sys.executable, "-m", "bnlab.main", "--config=configs/no_such.py:arg",
            f"--workdir={tmp_path / 'run'}"], tmp_path, env)
  assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
  assert p.stderr.startswith("error: config file 'configs/no_such.py' does not exist")


@pytest.mark.skipif(not os.environ.get("BNLAB_WHEEL_TEST"),
                    reason="builds and installs a wheel (about a minute): BNLAB_WHEEL_TEST=1")
def test_an_installed_wheel_runs_a_config_and_a_study(tmp_path, idx_dir):
  source = tmp_path / "source"  # a copy: the build leaves build/ and *.egg-info behind
  os.makedirs(source)
  for name in ("bnlab", "configs", "pyproject.toml", "README.md", "LICENSE"):
    copy = shutil.copytree if os.path.isdir(os.path.join(ROOT, name)) else shutil.copy
    copy(os.path.join(ROOT, name), source / name)
  wheels = tmp_path / "wheels"
  p = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels),
            str(source)], tmp_path)
  assert p.returncode == 0, p.stderr[-2000:]
  wheel = str(next(wheels.iterdir()))
  names = zipfile.ZipFile(wheel).namelist()
  assert "bnlab/py.typed" in names and "bnlab/configs/paper_mlp.py" in names
  assert "bnlab/configs/studies/bn_batch_size.py" in names
  venv = tmp_path / "venv"
  assert _run([sys.executable, "-m", "venv", str(venv)], tmp_path).returncode == 0
  python = str(venv / "bin" / "python")
  assert _run([python, "-m", "pip", "install", "-q", "--no-deps", wheel],
              tmp_path).returncode == 0
  # The dependencies: this interpreter's (a path in a .pth; its own .pth files, such as an
  # editable bnlab's, are not processed, so `bnlab` is the wheel's).
  site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
              tmp_path).stdout.strip()
  write(os.path.join(site, "zz_deps.pth"), sysconfig.get_paths()["purelib"] + "\n")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  p = _run([python, "-c", "import bnlab.config as c; print(c.configs_dir())"], tmp_path, env)
  configs = p.stdout.strip()
  assert configs == os.path.join(site, "bnlab", "configs"), p.stderr[-2000:]
  p = _run([python, "-m", "bnlab.main", f"--config={configs}/paper_mlp.py",
            f"--workdir={tmp_path / 'run'}", "--config.train.num_steps=5",
            "--config.data.source=idx", f"--config.data.dir={idx_dir}",
            "--config.train.final_train_eval=false"], tmp_path, env)
  assert p.returncode == 0 and '"final_step": 5' in p.stdout, p.stderr[-2000:]
  p = _run([python, "-m", "bnlab.study", f"--config={configs}/studies/why_bn.py:runlocal",
            f"--workdir={tmp_path / 'study'}", "--stage=register"], tmp_path, env)
  assert p.returncode == 0 and "registered:" in p.stdout, p.stderr[-2000:]
