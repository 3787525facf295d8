"""The docs match the code: every command README.md and docs/*.md show works as shown.

How each fenced block is checked is in tests/docs_commands.py: `parse` commands are parsed by
their own command lines (a stale flag, module or config key fails), `run` blocks run from the
repository root, and `demo` blocks run after a demo-sized run of launch/demo.sh (2 epochs) in a
folder of their own, not the repository, as a new user's clone would hold it. Also: the README
stays a short front door that reaches every docs page, links resolve, the README's config table
gives the code's defaults, and docs/layouts.png is drawn from the current tables.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from distalex.config import Config, flatten
from tests.docs_commands import DOCS, REPO, all_blocks, check_command, commands, demo_script, draw_layouts, problems

README = REPO / "README.md"
README_MAX_LINES = 150
BLOCKS = all_blocks()
PARSED = [(b, argv) for b in BLOCKS if b.language == "sh" and b.check == "parse" for argv in commands(b.text)]
DEMO = [b for b in BLOCKS if b.check == "demo"]
RUN = [b for b in BLOCKS if b.language == "sh" and b.check == "run"]
DEMO_EPOCHS = 2


def docs_env(**extra: str) -> dict[str, str]:
    """This checkout on PYTHONPATH, this interpreter's scripts (python, mlflow, distalex-*) first on
    PATH, the default MLflow store (no MLFLOW_TRACKING_URI)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


# ------------------------------------------------------------------ the rules of the pages


def test_every_fenced_block_says_how_it_is_checked():
    assert BLOCKS and PARSED and DEMO and RUN
    bad = [p for b in BLOCKS if (p := problems(b))]
    assert not bad, "\n".join(bad)


def test_readme_is_short_and_reaches_every_docs_page():
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES, f"README.md: {len(text.splitlines())} lines"
    linked = {(README.parent / target).resolve() for target in re.findall(r"\]\(([^)#\s]+)", text)}
    unreached = [p.name for p in DOCS[1:] if p.resolve() not in linked]
    assert not unreached, f"README.md links no docs/{unreached}"


def heading_anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)  # no headings inside code
    return {heading_anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_links_resolve_to_files_and_headings():
    broken = []
    for page in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                broken.append(f"{page.relative_to(REPO)}: {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(REPO)}: {target}: no such heading in {dest.name}")
    assert not broken, "\n".join(broken)


def test_readme_config_table_gives_the_codes_defaults():
    text = README.read_text().split("\n## The ten keys people change\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([\w.]+)` \| `([^`]*)` \|", text, re.M)
    defaults = flatten(Config())
    assert len(rows) == 10, rows
    for key, default in rows:
        assert key in defaults, f"README.md: {key}: not a config key"
        assert yaml.safe_load(default) == defaults[key], f"README.md: {key}: default {default!r}, code {defaults[key]!r}"


def test_layout_picture_is_drawn_from_the_current_tables(tmp_path):
    picture = REPO / "docs" / "layouts.png"
    recorded = Image.open(picture).text.get("tables-sha256")
    assert recorded == draw_layouts.tables_digest(), "docs/layouts.png is stale: run `make layouts`"
    fresh = draw_layouts.draw(tmp_path / "layouts.png")
    assert Image.open(fresh).size == Image.open(picture).size


# ------------------------------------------------------------------ the commands


@pytest.mark.parametrize("line", [
    "python -m distalex.predict runs/demo/model.pt photo.jpg --topp 3",          # a stale flag
    "python -m distalex.predictor runs/demo/model.pt photo.jpg",                 # a stale module
    "torchrun --nproc_per_node=2 -m distalex.train --set optim.lrr=0.1",         # a stale config key
    "torchrun --nodes=2 -m distalex.train",                                      # torchrun's own flag
    "sbatch launch/slurm/train.sbatch configs/demo.yaml --set train.engine=zero", # a bad value
    "distalex-export runs/demo/checkpoints",                                     # a missing argument
    "make tests",                                                                # a folder, not a target
    "mlflow ui --backend-store-urii sqlite:///runs/mlflow.db",
    "bash launch/slurm/local-cluster.sh begin",
    "pip install 'distalex[remotes]'",
    "python -m pytest -m quik tests/test_config.py",
    "frobnicate --all",
])
def test_the_parse_check_rejects_what_no_longer_works(line, monkeypatch):
    monkeypatch.chdir(REPO)
    (argv,) = commands(line)
    with pytest.raises(AssertionError):
        check_command(argv)


def test_commands_are_split_as_the_shell_splits_them():
    text = 'A=1 python -m x "a b" \\\n    --c d  # a comment\nmkdir -p o && cd o; make t | tail\n'
    assert commands(text) == [["A=1", "python", "-m", "x", "a b", "--c", "d"], ["mkdir", "-p", "o"], ["cd", "o"],
                              ["make", "t"], ["tail"]]


@pytest.mark.parametrize(("block", "argv"), PARSED, ids=[f"{b.where}:{' '.join(a[:3])}" for b, a in PARSED])
def test_parse_command_is_accepted_by_its_command_line(block, argv, monkeypatch):
    monkeypatch.chdir(REPO)
    check_command(argv)


@pytest.mark.parametrize("block", RUN, ids=lambda b: b.where)
def test_run_block_works_from_the_repository_root(block):
    proc = subprocess.run(["bash", "-c", demo_script(block, "")], cwd=REPO, env=docs_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{block.where}:\n{block.text}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory) -> tuple[Path, str]:
    """launch/demo.sh, 2 epochs, in a folder that stands for a new user's clone: the script and its
    config copied there, distalex from this checkout. The folder and the demo run's MLflow id."""
    folder = tmp_path_factory.mktemp("clone")
    for part in ("launch/demo.sh", "configs/demo.yaml"):
        (folder / part).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / part, folder / part)
    proc = subprocess.run(["bash", str(folder / "launch" / "demo.sh"), "--set", f"train.epochs={DEMO_EPOCHS}"],
                          cwd=folder, env=docs_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    run_id = re.search(r"MLflow model: runs:/([0-9a-f]{32})/model", proc.stdout)
    assert run_id, proc.stdout[-3000:]
    return folder, run_id.group(1)


@pytest.mark.e2e
@pytest.mark.parametrize("block", DEMO, ids=lambda b: b.where)
def test_demo_block_works_after_the_demo(block, demo_folder):
    folder, run_id = demo_folder
    name = "block.py" if block.language == "python" else "block.sh"
    (folder / name).write_text(demo_script(block, run_id))
    cmd = [sys.executable, name] if block.language == "python" else ["bash", name]
    proc = subprocess.run(cmd, cwd=folder, env=docs_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{block.where}:\n{block.text}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
