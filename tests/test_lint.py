"""The repository passes its own lint and type checks: `ruff check` over everything (package, tests,
benchmarks) and `mypy` over the package, both with the configuration in pyproject.toml.

mypy needs one trick: converters/ and kernels/ install as medgemma_cli.converters and medgemma_cli.kernels
(setuptools' package-dir), and a source checkout imports them through `medgemma_cli.__path__`, neither of
which mypy follows. So it checks a tree of links laid out as the installed package is."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
# where each part of the installed package lives in the checkout (pyproject.toml's package-dir)
PACKAGE_DIRS = {"medgemma_cli": "medgemma_cli", "medgemma_cli/converters": "converters",
                "medgemma_cli/kernels": "kernels"}

pytestmark = pytest.mark.slow


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install '.[test]')")


def _link(src: Path, dst: Path) -> None:
    try:
        dst.symlink_to(src, target_is_directory=src.is_dir())
    except OSError:  # no symlinks here (Windows without the privilege): a copy checks the same code
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)


def installed_layout(into: Path) -> Path:
    """medgemma_cli/ as installed, its files and folders linked from the checkout."""
    pkg = into / "medgemma_cli"
    pkg.mkdir(parents=True)
    for entry in (ROOT / "medgemma_cli").iterdir():
        if entry.name != "__pycache__":
            _link(entry, pkg / entry.name)
    for sub, where in PACKAGE_DIRS.items():
        if sub != "medgemma_cli":
            _link(ROOT / where, into / sub)
    return into


def _shown(output: str, tree: Path) -> str:
    """mypy's paths in the link tree, written as the checkout's own paths."""
    for sub, where in sorted(PACKAGE_DIRS.items(), key=lambda kv: -len(kv[0])):
        output = output.replace(f"{sub}{os.sep}", f"{where}{os.sep}").replace(f"{sub}/", f"{where}/")
    return output.replace(str(tree), "<tree>")


def test_ruff_check_is_clean() -> None:
    _need("ruff")
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--config", str(PYPROJECT), str(ROOT)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, f"ruff check found problems:\n{r.stdout}{r.stderr}"


def test_mypy_is_clean(tmp_path: Path) -> None:
    _need("mypy")
    tree = installed_layout(tmp_path / "tree")
    # the checkout's own cache (mypy's default place) keeps numpy, pydicom and gguf from being analysed each run
    cache = ROOT / ".mypy_cache" if os.access(ROOT, os.W_OK) else tmp_path / "mypy-cache"
    r = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(PYPROJECT), "--cache-dir", str(cache),
                        "-p", "medgemma_cli"],
                       capture_output=True, text=True, cwd=tree, timeout=900)
    assert r.returncode == 0, f"mypy found problems:\n{_shown(r.stdout + r.stderr, tree)}"
