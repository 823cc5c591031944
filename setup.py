"""The package list, which pyproject.toml cannot express: `tools/` is installed under the
import name `memlayers_tools`, because a top-level `tools` package exists on PyPI and two
distributions owning one top-level folder overwrite each other's files. In a checkout the
folder is still imported as `tools` (tests, `python tools/<name>.py`)."""

from setuptools import find_namespace_packages, setup

setup(
    packages=find_namespace_packages(include=["pretrain", "pretrain.*", "kernels", "kernels.*"]) + ["memlayers_tools"],
    package_dir={"memlayers_tools": "tools"},
    package_data={"kernels.csrc": ["*.cpp"]},  # the compiled CPU ops' sources, built on first use
)
