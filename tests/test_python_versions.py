"""The loader's start-method tests once under every other supported Python installed here.

Each runs in its venv from ``tests/python_versions.py`` (torch of the running version, the loader's
requirements); where a venv is missing the test is skipped with the command that makes it (the
venvs download torch, about 0.5 GB each, so no test run makes them).
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.python_versions import REPO, installed, make_command, venv_python

pytestmark = [pytest.mark.slow, pytest.mark.pythons]

CHECKS = ["tests/test_data_workers.py", "tests/test_data_faults.py::test_a_killed_loading_process_leaves_no_process_behind"]
"""Every start method's worker tests, the SIGKILLed loading process included."""

FOUND = installed()


@pytest.mark.parametrize("version", sorted(FOUND) or [pytest.param(None, marks=pytest.mark.skip(
    reason="no other Python that requires-python admits is installed here (pyenv's, or python3.N on PATH)"))])
def test_the_loaders_start_methods_under_another_python(version):
    python = venv_python(version)
    if python is None:
        pytest.skip(f"Python {version} ({FOUND[version]}) has no venv with torch: make it with "
                    f"`{make_command(version)}` (downloads torch, ~0.5 GB)")
    proc = subprocess.run([python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", "-m", "not e2e", *CHECKS],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                          timeout=900)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    print(f"Python {version}: {summary}")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    # The one skip allowed: a venv without numba (optional) has no compiled crop loops to check.
    skips = re.findall(r"^SKIPPED \[\d+\] (.*)$", proc.stdout, re.M)
    assert re.search(r"\d+ passed", summary) and all("numba is not installed" in s for s in skips), (summary, skips)
