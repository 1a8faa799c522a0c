"""What pyproject.toml cannot say: the built-in configs inside the package.

The run, sweep and study configs live at the repository's top level, `configs/`,
where a checkout's commands name them (`--config=configs/paper_mlp.py`). The wheel
carries them as `bnlab/configs/` (the package directory mapped to `configs/`), where
`bnlab.config.configs_dir()` finds them once installed, so they run without the
repository. Everything else is in pyproject.toml.
"""

import os

from setuptools import find_namespace_packages, setup

CONFIG_PACKAGES = ["bnlab.configs"] + [
    f"bnlab.configs.{name}" for name in sorted(os.listdir("configs"))
    if os.path.isdir(os.path.join("configs", name)) and name.isidentifier()
    and not name.startswith("_")]

setup(
    packages=find_namespace_packages(include=["bnlab", "bnlab.*"],
                                     exclude=["*.__pycache__"]) + CONFIG_PACKAGES,
    package_dir={"bnlab.configs": "configs"},
    package_data={"bnlab": ["py.typed"], **{p: ["*.py"] for p in CONFIG_PACKAGES}},
)
