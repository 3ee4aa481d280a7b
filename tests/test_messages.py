"""Every option a message or help text suggests exists: each ``--flag`` in a string of the package is a flag of
some ``reid_ssl`` command (or of the named outside tool), and each ``section.key`` is a config key."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
from pathlib import Path

from reid_ssl.app.browser import CHROMIUM_FLAGS
from reid_ssl.cli.main import build_parser
from reid_ssl.config import Config

PACKAGE = Path(__file__).resolve().parents[1] / "reid_ssl"
# Flags of other programs that messages quote when they tell the user what to run; Chromium's (app/browser.py).
OUTSIDE_FLAGS = {
    "--fsys-tarfile",  # dpkg-deb
    "--nnodes", "--nproc-per-node", "--node-rank", "--master-addr", "--master-port", "--rdzv-backend",
    "--rdzv-endpoint", "--rdzv-id", "--nproc_per_node", "--master_addr", "--master_port", "--node_rank",  # torchrun
    "--help", "--version",
} | {flag.split("=")[0] for flag in CHROMIUM_FLAGS}  # fmt: skip
SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
FILE_EXTENSIONS = {"txt", "onnx", "pt", "json", "jsonl", "csv", "yaml", "jpg", "png", "tar"}  # model.onnx is a file


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    found: set[str] = set()
    for action in parser._actions:
        found.update(s for s in action.option_strings if s.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _flags(sub)
    return found


def _strings() -> list[tuple[Path, int, str]]:
    """Every string constant in the package, except the flag names given to ``add_argument`` itself."""
    out = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        defining = {
            id(arg)
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"
            for arg in node.args
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in defining:
                out.append((path.relative_to(PACKAGE.parent), node.lineno, node.value))
    return out


def test_every_suggested_flag_exists() -> None:
    known = _flags(build_parser()) | OUTSIDE_FLAGS
    unknown = [
        f"{path}:{line}: {flag}"
        for path, line, text in _strings()
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]", text)
        if flag not in known
    ]
    assert not unknown, "messages suggest flags no command has:\n" + "\n".join(unknown)


def test_every_suggested_config_key_exists() -> None:
    keys = {f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(getattr(Config(), s))}
    pattern = r"(?<![\w./])(" + "|".join(SECTIONS) + r")\.([a-z_][a-z0-9_]*)(?![\w(])"
    unknown = [
        f"{path}:{line}: {section}.{key}"
        for path, line, text in _strings()
        for section, key in re.findall(pattern, text)
        if f"{section}.{key}" not in keys and key not in FILE_EXTENSIONS
    ]
    assert not unknown, "messages name config keys that do not exist:\n" + "\n".join(unknown)


def _undocumented(parser: argparse.ArgumentParser, name: str) -> list[str]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                found += _undocumented(sub, f"{name} {sub_name}")
        elif action.help is None and not isinstance(action, argparse._HelpAction):
            found.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    return found


def test_every_option_of_every_command_has_a_help_text() -> None:
    """``--help`` explains every option (hidden internal ones use ``argparse.SUPPRESS``, which is a text)."""
    assert _undocumented(build_parser(), "reid_ssl") == []


def _parsers(
    parser: argparse.ArgumentParser, name: str = "reid_ssl", parent: argparse.ArgumentParser | None = None
) -> list[tuple[str, argparse.ArgumentParser, argparse.ArgumentParser | None]]:
    """Every parser of the command line: (its command, the parser, its parent parser)."""
    found = [(name, parser, parent)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                found += _parsers(sub, f"{name} {sub_name}", parser)
    return found


def test_every_command_has_its_own_description_and_examples() -> None:
    """No command without a description, and no sub-command repeating its parent's description or examples
    (``prepare video --help`` once printed ``prepare``'s text and all seven examples)."""
    problems = []
    for name, parser, parent in _parsers(build_parser()):
        if not (parser.description or "").strip():
            problems.append(f"{name}: no description")
        if parent is not None and parser.description == parent.description:
            problems.append(f"{name}: repeats the description of its parent")
        if parent is not None and parser.epilog and parser.epilog == parent.epilog:
            problems.append(f"{name}: repeats the examples of its parent")
    assert not problems, "\n".join(problems)


def test_help_texts_show_no_raw_markup_and_one_default_per_option() -> None:
    """``--help`` is read in a terminal: no reST markup (````x````, ``::``, ``:func:``), and an option's help
    names its default once (``eval --protocol`` once said "(default)" twice)."""
    problems = []
    for name, parser, _ in _parsers(build_parser()):
        text = parser.format_help()
        for markup in re.findall(r"``[^`]*``|::\s*$|:(?:func|class|mod|meth|data):`", text, re.M):
            problems.append(f"{name} --help: raw markup {markup.strip()!r}")
        for action in parser._actions:
            if isinstance(action.help, str) and len(re.findall(r"\bdefault\b", action.help)) > 1:
                problems.append(f"{name} {'/'.join(action.option_strings)}: more than one default in its help")
    assert not problems, "\n".join(problems)
