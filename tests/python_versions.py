"""The other Python versions on this machine, each with a venv that can run the loader's tests.

    python -m tests.python_versions                     # what is found, and which venvs are ready
    python -m tests.python_versions make [3.12 ...]     # make the venvs that are missing

An interpreter counts when pyproject's requires-python admits it and it is not the one running
(that one runs the whole suite): pyenv's versions and ``python3.N`` on PATH. Each gets a venv in
``$DISTALEX_VENVS`` (default ``~/.cache/distalex/venvs``) with the running torch's version from the
package index (``--torch-index URL`` for another one, e.g. a CPU-only wheel index), installed
without its dependencies: its pure-Python requirements and what the loader's tests import are
installed by name. PyPI's Linux torch is a CUDA build (about 0.5 GB a wheel) that needs the CUDA
libraries of the ``nvidia-*`` packages (about 3 GB, the same for every Python): where the running
interpreter has them, the venv is pointed at them (a ``.pth`` file) instead of downloading them
again (pip then lists torch's CUDA requirements as missing: expected). Measured here: 2.5-4
minutes a venv on the busy 2 cores (the 555 MB wheel for 3.12 downloaded in 26 s), 1.4 GB on disk.

``tests/test_python_versions.py`` runs the loader's start-method tests in each ready venv and skips,
saying how to make it, where a venv is missing: a test run never downloads.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
VENVS = Path(os.environ.get("DISTALEX_VENVS", Path.home() / ".cache" / "distalex" / "venvs"))
TEST_NEEDS = ("numpy", "pillow", "webdataset", "braceexpand", "pydantic", "pyyaml", "psutil", "pytest", "pytest-timeout")
"""What the loader and its tests import (bounds from pyproject where it sets them)."""
CUDA_PACKAGES = re.compile(r"^(nvidia-|cuda-|triton)")
READY = "distalex-ready"
"""Written into a venv once torch and the loader import there."""


def installed() -> dict[str, Path]:
    """Supported Python versions found here other than the running one: "3.12" -> interpreter."""
    supported = SpecifierSet(PYPROJECT["requires-python"])
    found: dict[str, Path] = {}
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = [(m.group(1), p / "bin" / "python") for p in sorted(pyenv.glob("*"))
                  if (m := re.fullmatch(r"(3\.\d+)\.\d+", p.name))]
    candidates += [(f"3.{minor}", Path(exe)) for minor in range(10, 20) if (exe := shutil.which(f"python3.{minor}"))]
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    for version, exe in candidates:
        if version != running and f"{version}.0" in supported and exe.exists():
            found.setdefault(version, exe)
    return found


def venv_python(version: str) -> Path | None:
    """The venv's interpreter, if that venv is ready."""
    venv = VENVS / f"py{version}"
    return venv / "bin" / "python" if (venv / READY).is_file() else None


def make_command(version: str) -> str:
    return f"python -m tests.python_versions make {version}"


def pinned(names) -> list[str]:
    """``names`` with pyproject's bounds where it has them (core dependencies, then the dev extra)."""
    declared = {}
    for spec in PYPROJECT["dependencies"] + PYPROJECT["optional-dependencies"]["dev"]:
        req = Requirement(spec)
        declared.setdefault(req.name.lower(), f"{req.name}{req.specifier}")
    return [declared.get(name, name) for name in names]


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    print("  $", " ".join(map(str, cmd)), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def make(version: str, exe: Path, torch_index: str | None) -> None:
    import torch

    venv = VENVS / f"py{version}"
    py = venv / "bin" / "python"
    print(f"== Python {version} ({exe}) -> {venv}", flush=True)
    run([exe, "-m", "venv", "--clear", venv])
    index = ["--index-url", torch_index] if torch_index else []
    run([py, "-m", "pip", "install", "-q", "--no-deps", *index, f"torch=={torch.__version__.split('+')[0]}"])
    requires = subprocess.run([py, "-c", "import importlib.metadata as m; print('\\n'.join(m.requires('torch')))"],
                              check=True, capture_output=True, text=True).stdout.split("\n")
    torch_needs = [str(r) for r in map(Requirement, filter(None, requires))
                   if "extra" not in str(r.marker) and not CUDA_PACKAGES.match(r.name)]
    run([py, "-m", "pip", "install", "-q", *[re.sub(r";.*", "", r) for r in torch_needs], *pinned(TEST_NEEDS)])
    check = [py, "-c", "import torch, distalex.data.loader"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    missing = subprocess.run(check, env=env, capture_output=True, text=True)
    if missing.returncode and "cannot open shared object file" in missing.stderr:
        nvidia = importlib.util.find_spec("nvidia")
        if nvidia is None:
            sys.exit(f"torch in {venv} is a CUDA build and this interpreter has no CUDA libraries to lend it: "
                     "install them there (pip install torch without --no-deps, ~3 GB) or pass --torch-index "
                     "with an index of CPU wheels")
        libs, lent = venv / "cuda-libs", list(nvidia.submodule_search_locations)[0]
        libs.mkdir(exist_ok=True)
        (libs / "nvidia").symlink_to(lent)
        site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], check=True,
                              capture_output=True, text=True).stdout.strip()
        (Path(site) / "distalex_cuda_libs.pth").write_text(f"{libs}\n")
        print(f"  CUDA libraries: {libs / 'nvidia'} -> {lent}", flush=True)
    run(check, env=env)
    (venv / READY).write_text(f"torch {torch.__version__}\n")
    print(f"  ready: {py}", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", nargs="?", choices=["list", "make"], default="list")
    p.add_argument("versions", nargs="*", help="e.g. 3.12 (default: every one found)")
    p.add_argument("--torch-index", help="the index to install torch from (default: pip's)")
    a = p.parse_args(argv)
    found = installed()
    for version in a.versions:
        if version not in found:
            sys.exit(f"Python {version}: not found here, or not admitted by requires-python; found: {sorted(found)}")
    for version, exe in found.items():
        if a.action == "make" and version in (a.versions or found) and venv_python(version) is None:
            make(version, exe, a.torch_index)
        print(f"Python {version}: {exe}; venv {venv_python(version) or 'missing: ' + make_command(version)}")


if __name__ == "__main__":
    main()
