"""Readable sizes (STYLE: short functions): a function over 60 lines either becomes
named steps or says at its top why it reads best whole, with a ``# long: REASON``
comment as its first line. An ast walk over src/hadctl, no process started."""
from __future__ import annotations

import ast
import pathlib

SRC = pathlib.Path(__file__).resolve().parent.parent / "src" / "hadctl"
LIMIT = 60  # lines, from ``def`` to the function's last line


def _long_functions(source: str, name: str) -> list[str]:
    """``NAME:LINE function (N lines)`` for each function over LIMIT without its reason."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source, name)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        length = (node.end_lineno or node.lineno) - node.lineno + 1
        first = node.body[0].lineno - 1  # the line before the body's first statement ...
        head = lines[node.lineno - 1:first + 1]  # ... so the signature and what follows it
        if length > LIMIT and not any(line.strip().startswith("# long: ") for line in head):
            found.append(f"{name}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_is_over_60_lines_without_saying_why():
    found = [hit for path in sorted(SRC.rglob("*.py"))
             for hit in _long_functions(path.read_text(), str(path.relative_to(SRC)))]
    assert not found, "split into named steps, or start with '# long: REASON':\n" + "\n".join(found)


def test_the_rule_sees_a_long_function_and_accepts_a_reason():
    body = "".join(f"    x{i} = {i}\n" for i in range(LIMIT))
    assert _long_functions(f"def f():\n{body}", "m.py") == ["m.py:1 f (61 lines)"]
    assert _long_functions(f"def f():\n    # long: one table\n{body}", "m.py") == []
    shorter = "".join(f"    x{i} = {i}\n" for i in range(LIMIT - 1))
    assert _long_functions(f"def f():\n{shorter}", "m.py") == []
