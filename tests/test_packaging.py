"""pyproject.toml declares what distalex imports, with bounds that admit only the APIs it calls.

Every third-party module imported anywhere in distalex/ must come from a declared distribution:
a core dependency when it is imported at a module's top level (``pip install distalex`` must be
able to import every module), an extra only when the import waits for the code that needs it
(inside a function, or behind ``except ImportError``), and an extra's distribution only where
that extra says it is used.
"""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

EXTRA_USERS = {
    "scikit-learn": {"distalex/data/demo.py"},
    "deepspeed": {"distalex/engine/deepspeed.py"},
    "fsspec": {"distalex/data/read.py"},
}
"""Where each extra's distribution may be imported: the demo's digits, the DeepSpeed engine, fsspec shards."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(group: list[str]) -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in group]
    return {canonical(r.name): r for r in reqs if canonical(r.name) != "distalex"}


CORE = requirements(PYPROJECT["dependencies"])
EXTRAS = {name: requirements(group) for name, group in PYPROJECT["optional-dependencies"].items()}


def guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside a function, or in a try whose handlers catch ImportError."""
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return True
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in node.handlers
        ):
            return True
    return False


def third_party_imports() -> list[tuple[str, str, bool]]:
    """(file, top-level module, guarded) for every import of a module outside distalex and the stdlib."""
    found = []
    for path in sorted((REPO / "distalex").rglob("*.py")):
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "distalex" and top not in sys.stdlib_module_names and top != "__future__":
                    found.append((str(path.relative_to(REPO)), top, guarded(node, parents)))
    return found


def test_every_import_is_declared_core_at_top_level_and_extra_only_where_used():
    provides = importlib.metadata.packages_distributions()
    extra_dists = {d for group in EXTRAS.values() for d in group}
    seen = set()
    for file, module, is_guarded in third_party_imports():
        dists = {canonical(d) for d in provides.get(module, [])}
        assert dists, f"{file}: imports {module}, which no installed distribution provides"
        core = dists & set(CORE)
        seen |= dists
        if core:
            continue
        extra = dists & extra_dists
        assert extra, f"{file}: imports {module} ({', '.join(sorted(dists))}), declared nowhere in pyproject.toml"
        assert is_guarded, f"{file}: imports {module} (an extra) at its top level: the core install cannot import it"
        for dist in extra:
            assert file in EXTRA_USERS.get(dist, set()), f"{file}: imports {dist}, an extra used only by {EXTRA_USERS.get(dist)}"
    assert {"braceexpand", "scipy", "scikit-learn", "mlflow-skinny", "webdataset"} <= seen  # the walk sees them
    assert "scikit-learn" not in CORE and "scikit-learn" in EXTRAS["demo"]


def test_mlflow_bound_admits_only_the_api_the_code_calls():
    """serving.py calls mlflow.pytorch.log_model(name=..., serialization_format="pt2"): MLflow 3.11
    is the first release with serialization_format (3.0 renamed artifact_path to name)."""
    import mlflow.pytorch

    declared = CORE["mlflow"]
    lowest = min(Version(s.version) for s in declared.specifier if s.operator in (">=", "=="))
    assert lowest >= Version("3.11") and not declared.specifier.contains("4.0")
    used = (REPO / "distalex" / "serving.py").read_text()
    assert 'serialization_format="pt2"' in used and "name=MLFLOW_MODEL_NAME" in used
    parameters = inspect.signature(mlflow.pytorch.log_model).parameters
    assert {"name", "serialization_format"} <= set(parameters)  # the installed one has them
    assert declared.specifier.contains(importlib.metadata.version("mlflow"))


def test_the_installed_versions_satisfy_the_declared_bounds():
    for name, req in {**CORE, **EXTRAS["dev"]}.items():
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an extra this environment lacks (e.g. nvidia-ml-py without a GPU)
        assert req.specifier.contains(version, prereleases=True), f"{name} {version} does not satisfy {req}"


def test_make_demo_installs_the_demo_extra_and_make_test_every_extra():
    makefile = (REPO / "Makefile").read_text()
    demo = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    test = makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "$(PIP_INSTALL) '.[demo]'" in demo and "launch/demo.sh" in demo
    assert "install" in test.splitlines()[0] and "$(PIP_INSTALL) '.[dev]'" in makefile.split("\ninstall:", 1)[1]
    assert {"distalex[demo,deepspeed,remote]"} <= set(PYPROJECT["optional-dependencies"]["dev"])


def test_classifiers_name_python_versions_that_requires_python_admits_this_one_among_them():
    """The classifiers name the tested versions (the comment above them says how each was tested):
    every one admitted by requires-python, its floor among them, and this interpreter's."""
    classifiers = PYPROJECT["classifiers"]
    named = [c.rsplit(" :: ", 1)[1] for c in classifiers if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]
    admitted = SpecifierSet(PYPROJECT["requires-python"])
    assert "Programming Language :: Python :: 3 :: Only" in classifiers
    assert named and all(f"{v}.0" in admitted for v in named), (named, str(admitted))
    floor = min(Version(s.version) for s in admitted if s.operator == ">=")
    assert Version(min(named, key=Version)) == floor
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in named

