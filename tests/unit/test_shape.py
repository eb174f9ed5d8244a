"""The layout stays readable: one package per stage, few modules left flat, none too long to read at once."""

from __future__ import annotations

import ast
from pathlib import Path

RELAY = Path(__file__).resolve().parents[2] / "relay"
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 300
MAX_FLAT_MODULES = 6  # __init__, __main__, and the service: server, workers, logs, files


def modules() -> list[Path]:
    return sorted(RELAY.rglob("*.py"))


def test_no_module_is_over_500_lines() -> None:
    long = {
        str(p.relative_to(RELAY)): n for p in modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_no_class_is_over_300_lines() -> None:
    long = {
        f"{path.relative_to(RELAY)}:{node.name}": size
        for path in modules()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef)
        and (size := (node.end_lineno or node.lineno) - node.lineno + 1) > MAX_CLASS_LINES
    }
    assert long == {}


def test_at_most_six_modules_are_left_flat_in_relay() -> None:
    assert len(list(RELAY.glob("*.py"))) <= MAX_FLAT_MODULES


def test_every_package_says_what_stage_it_is() -> None:
    for package in (p for p in RELAY.iterdir() if p.is_dir() and p.name != "__pycache__"):
        docstring = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
        assert docstring, f"relay/{package.name}/__init__.py has no docstring"
