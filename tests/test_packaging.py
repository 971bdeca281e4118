"""What `pip install .` (not editable) ships, and how an installed flowkern finds its extension."""

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import flowkern

ROOT = Path(__file__).resolve().parent.parent


def pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_is_listed_for_the_wheel():
    listed = set(pyproject()["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "flowkern").rglob("__init__.py")}
    assert listed == found


def test_a_copy_of_the_sources_without_the_extension_finds_the_installed_one(tmp_path):
    """README command 1 runs `python -m flowkern.train` from the clone's root: the clone's
    flowkern/ (never compiled) comes first on sys.path, ahead of the installed package.  `-S`
    leaves out editable-install finders, which look submodules up by name: the extension must
    be found on sys.path, as after a non-editable install."""
    shutil.copytree(ROOT / "flowkern", tmp_path / "flowkern",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    code = "import flowkern; print(flowkern.__file__); flowkern.Trie.build([[5, 6]], eos_token_id=0)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))  # this environment's installed packages
    run = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(tmp_path / "flowkern" / "__init__.py")  # the copy was the one imported


def test_the_version_is_written_once():
    project = pyproject()
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "flowkern.__version__"}
    assert importlib.metadata.version("flowkern") == flowkern.__version__


def test_the_license_file_is_the_declared_license_and_ships():
    project = pyproject()["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text
