"""Functions of setup.py for the tests, without running setup() (importing setup.py would)."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

SETUP_PY = Path(__file__).resolve().parent.parent / "setup.py"


def function_of_setup_py(name: str):
    """The top-level function `name` of setup.py (it may use os, re and Path)."""
    tree = ast.parse(SETUP_PY.read_text())
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == name]
    assert functions, f"setup.py defines no function {name}"
    namespace = {"os": os, "re": re, "Path": Path}
    exec(compile(ast.Module(body=functions, type_ignores=[]), str(SETUP_PY), "exec"), namespace)
    return namespace[name]
