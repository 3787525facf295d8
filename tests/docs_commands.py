"""The commands of README.md and docs/*.md, taken from their fenced blocks, and how each is checked.

A fenced block says what it holds in its info string (the words after the backticks; GitHub shows
only the first, the language):

    ```sh demo      run as shown with bash, in the folder of a demo-sized run (its runs/ and data/,
                    not the repository), after that run; <run_id> stands for that run's MLflow id
    ```sh run       run as shown with bash, from the repository root (cheap commands only)
    ```sh parse     not run: each command's arguments are parsed by its own command line (below)
    ```python demo  run with python in the demo-sized run's folder
    ```text, ```yaml, ```json   output or data, not commands

A `sh` or `python` block without one of these words, or a block without a language, is an error.

How a `parse` command is checked, by its program:
- ``python -m MODULE ARGS``, ``python FILE.py ARGS``, a console script of pyproject.toml: the
  module's ``main`` runs until its ``argparse`` parser has parsed ARGS (then stops); a CLI that
  takes ``--config``/``--set`` also resolves the config, so a stale key fails.
- ``torchrun ARGS`` (or ``python -m torch.distributed.run``): torchrun's own parser, then the
  training module's arguments as above.
- ``sbatch FLAGS SCRIPT ARGS``: the script exists and parses (``bash -n``); for
  launch/slurm/train.sbatch its ARGS (CONFIG, --set ...) resolve as the script's preflight does.
- ``make TARGET``: the Makefile has the target and ``make -n TARGET`` succeeds. ``bash SCRIPT ARGS``: the script exists, parses,
  and its first argument is one of its ``case`` labels where it has any.
- ``mlflow ...``: MLflow's click command parses the arguments (``make_context``).
- ``python -m pytest ARGS``: ``pytest --collect-only ARGS`` collects at least one test.
- ``pip install 'distalex[EXTRA]'``: the extra exists in pyproject.toml.
- a few plain tools (mkdir, tar, curl, cd, export, test): they exist on PATH or are builtins.
Any other program has no checker and fails the test, so a new kind of command gets one.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import itertools
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CHECKS = {"sh": ("demo", "run", "parse"), "python": ("demo",)}
DATA_LANGUAGES = ("text", "yaml", "json")
PLAIN_TOOLS = ("mkdir", "tar", "curl", "cd", "export", "test")
BUILTINS = ("cd", "export", "test")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


draw_layouts = _load(REPO / "docs" / "draw_layouts.py", "draw_layouts")
layer_table = draw_layouts.layer_table


# ------------------------------------------------------------------ blocks


@dataclass
class Block:
    path: Path
    line: int
    language: str
    check: str | None
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file (fences at the start of a line)."""
    out, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("```"):
            words = lines[i][3:].split()
            start, body = i + 1, []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise ValueError(f"{path.relative_to(REPO)}:{start}: the fenced block is never closed")
            language = words[0] if words else ""
            check = next((w for w in words[1:] if w in CHECKS.get(language, ())), None)
            out.append(Block(path, start, language, check, "\n".join(body) + "\n"))
        i += 1
    return out


def all_blocks() -> list[Block]:
    return [b for path in DOCS for b in blocks(path)]


def problems(block: Block) -> str | None:
    """Why a block breaks the rules of this module's docstring, or None."""
    if block.language in CHECKS:
        if block.check is None:
            return f"{block.where}: a {block.language} block says how it is checked: ```{block.language} " + \
                   "|".join(CHECKS[block.language]) + " (tests/docs_commands.py)"
        return None
    if block.language in DATA_LANGUAGES:
        return None
    return (f"{block.where}: a fenced block names what it holds: ```sh demo|run|parse or ```python demo "
            f"for commands and code, ```{'|'.join(DATA_LANGUAGES)} for output (got {block.language!r})")


def commands(text: str) -> list[list[str]]:
    """The shell commands of a block as argument lists: continuation lines joined, comments dropped,
    one list per command of `a && b`, `a; b` or `a | b`."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars="&|;")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        command: list[str] = []
        for token in lexer:
            if token in ("&&", "||", ";", "|", "&"):
                out += [command] if command else []
                command = []
            else:
                command.append(token)
        out += [command] if command else []
    return out


def split_env(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Leading NAME=value words (the command's environment) and the command itself."""
    env = {}
    while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
        key, value = argv[0].split("=", 1)
        env[key], argv = value, argv[1:]
    return env, argv


# ------------------------------------------------------------------ parsing a command line


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace):
        super().__init__("parsed")
        self.namespace = namespace


@contextlib.contextmanager
def _stop_after_parsing() -> Iterator[None]:
    """While active, ``ArgumentParser.parse_args`` parses and then raises ``_Parsed`` with the result."""
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse_args
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original


def parse_cli(main: Callable[[list[str]], object], args: list[str], what: str) -> argparse.Namespace | None:
    """Run ``main(args)`` until its parser has parsed ``args``; the namespace (None for --help).
    A rejected argument is an AssertionError with argparse's message; a CLI taking --config/--set
    also resolves the config."""
    from distalex.config import ConfigError, load_config

    err = io.StringIO()
    with _stop_after_parsing(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(args)
        except _Parsed as parsed:
            namespace = parsed.namespace
        except SystemExit as e:
            if e.code == 0 and ("-h" in args or "--help" in args):
                return None
            raise AssertionError(f"{what} {shlex.join(args)}: rejected (exit {e.code}): {err.getvalue().strip()}") from None
        else:
            raise AssertionError(f"{what}: main() returned without parsing its arguments")
    if hasattr(namespace, "config") and hasattr(namespace, "overrides"):
        try:
            load_config(namespace.config, namespace.overrides)
        except ConfigError as e:
            raise AssertionError(f"{what} {shlex.join(args)}: config error: {e}") from None
    return namespace


def module_main(module: str) -> Callable[[list[str]], object]:
    try:
        main = getattr(importlib.import_module(module), "main", None)
        if main is None:  # a package run with -m: its __main__ module
            main = importlib.import_module(module + ".__main__").main
    except ModuleNotFoundError as e:
        raise AssertionError(f"python -m {module}: {e}") from None
    return main


def script_main(path: str) -> Callable[[list[str]], object]:
    file = REPO / path
    assert file.is_file(), f"{path}: no such file in the repository"
    return _load(file, "docs_script_" + re.sub(r"\W", "_", path)).main


# ------------------------------------------------------------------ checkers per program


def check_python(args: list[str]) -> None:
    if args[:2] == ["-m", "torch.distributed.run"]:
        return check_torchrun(args[2:])
    if args[:2] == ["-m", "pytest"]:
        return check_pytest(args[2:])
    if args and args[0] == "-m":
        parse_cli(module_main(args[1]), args[2:], f"python -m {args[1]}")
        return None
    assert args and args[0].endswith(".py"), f"python {shlex.join(args)}: expected -m MODULE or FILE.py"
    parse_cli(script_main(args[0]), args[1:], f"python {args[0]}")
    return None


def check_torchrun(args: list[str]) -> None:
    from torch.distributed.run import get_args_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = get_args_parser().parse_args(args)
    except SystemExit as e:
        raise AssertionError(f"torchrun {shlex.join(args)}: rejected (exit {e.code}): {err.getvalue().strip()}") from None
    if ns.module:
        parse_cli(module_main(ns.training_script), ns.training_script_args, f"torchrun -m {ns.training_script}")
    else:
        parse_cli(script_main(ns.training_script), ns.training_script_args, f"torchrun {ns.training_script}")


def check_pytest(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"pytest {shlex.join(args)}: collects no test (exit {proc.returncode}): {proc.stdout[-1500:]}"


def check_console_script(name: str, args: list[str]) -> None:
    module, function = PYPROJECT["project"]["scripts"][name].split(":")
    parse_cli(getattr(importlib.import_module(module), function), args, name)


def check_bash_script(path: str, args: list[str]) -> None:
    file = REPO / path
    assert file.is_file(), f"{path}: no such file in the repository"
    proc = subprocess.run(["bash", "-n", str(file)], capture_output=True, text=True)
    assert proc.returncode == 0, f"{path}: bash -n: {proc.stderr.strip()}"
    labels = {w.strip() for group in re.findall(r"^\s*([\w|\s-]+)\)", file.read_text(), re.M) for w in group.split("|")}
    if args and not args[0].startswith("-") and labels:
        assert args[0] in labels, f"bash {path} {args[0]}: not one of the script's commands {sorted(labels)}"


def check_sbatch(args: list[str], env: dict[str, str]) -> None:
    flags = list(itertools.takewhile(lambda a: a.startswith("-"), args))
    rest = args[len(flags):]
    assert rest and all("=" in f or re.fullmatch(r"-\w|--[\w-]+", f) for f in flags), \
        f"sbatch {shlex.join(args)}: expected sbatch --flag=value ... SCRIPT ARGS"
    check_bash_script(rest[0], [])
    if rest[0] == "launch/slurm/train.sbatch":  # as its preflight reads them
        config, overrides = (rest[1], rest[2:]) if len(rest) > 1 else (env.get("CONFIG"), [])
        assert config, "train.sbatch needs a config: an argument or CONFIG=FILE"
        extra = [w for kv in env.get("OVERRIDES", "").split() for w in ("--set", kv)]
        parse_cli(_preflight_parser, ["--config", config, "--set", "checkpoint.resume=auto", *extra, *overrides], "train.sbatch")


def _preflight_parser(args: list[str]) -> None:
    from distalex.config import add_config_args

    parser = argparse.ArgumentParser(prog="python -m distalex.preflight")
    add_config_args(parser)
    parser.parse_args(args)


def check_make(args: list[str]) -> None:
    rules = set(re.findall(r"^([\w.-]+):", (REPO / "Makefile").read_text(), re.M))
    unknown = [a for a in args if not a.startswith("-") and "=" not in a and a not in rules]
    assert not unknown, f"make {shlex.join(args)}: the Makefile has no target {unknown}"
    proc = subprocess.run(["make", "-n", "-C", str(REPO), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"make {shlex.join(args)}: make -n failed: {proc.stderr.strip()}"


def check_mlflow(args: list[str]) -> None:
    import click
    from mlflow.cli import cli

    command, rest, name = cli, list(args), "mlflow"
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        sub = command.get_command(click.Context(command), rest[0])
        assert sub is not None, f"{name} {rest[0]}: no such mlflow command"
        command, name, rest = sub, f"{name} {rest[0]}", rest[1:]
    try:
        command.make_context(name, rest)
    except click.ClickException as e:
        raise AssertionError(f"{name} {shlex.join(rest)}: {e.format_message()}") from None


def check_pip(args: list[str]) -> None:
    assert args[:1] == ["install"], f"pip {shlex.join(args)}: only pip install is checked"
    for spec in args[1:]:
        match = re.fullmatch(r"distalex\[([\w,-]+)\]", spec)
        if match:
            extras = PYPROJECT["project"]["optional-dependencies"]
            missing = [e for e in match.group(1).split(",") if e not in extras]
            assert not missing, f"pip install {spec}: pyproject.toml has no extra {missing}"


def check_command(argv: list[str]) -> None:
    """Check one command of a `parse` block, run from the repository root (see the docstring)."""
    env, argv = split_env(argv)
    if not argv:
        return  # only assignments
    program, args = argv[0], argv[1:]
    scripts = PYPROJECT["project"]["scripts"]
    if program in ("python", "python3"):
        check_python(args)
    elif program == "torchrun":
        check_torchrun(args)
    elif program in scripts:
        check_console_script(program, args)
    elif program == "sbatch":
        check_sbatch(args, env)
    elif program == "make":
        check_make(args)
    elif program == "bash":
        check_bash_script(args[0], args[1:])
    elif program == "mlflow":
        check_mlflow(args)
    elif program == "pip":
        check_pip(args)
    elif program in PLAIN_TOOLS:
        assert program in BUILTINS or shutil.which(program), f"{program}: not on PATH"
    else:
        raise AssertionError(f"{program}: no checker for this program (tests/docs_commands.py)")


def demo_script(block: Block, run_id: str) -> str:
    """A `demo` block as the script that runs it."""
    text = block.text.replace("<run_id>", run_id)
    return text if block.language == "python" else "set -euo pipefail\n" + text

