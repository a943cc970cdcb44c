"""The benchmarks' verdicts: each target is printed met / NOT met from the figures, and a miss exits 1."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _own_nodes(function: ast.FunctionDef):
    """The nodes of ``function``, without those of the functions defined inside it."""
    stack = list(function.body)
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))


@pytest.fixture
def common(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import it as `_common`, from their own folder
    monkeypatch.delitem(sys.modules, "_common", raising=False)
    import _common

    return _common


def test_met_and_exit_code(common):
    assert common.met(True) == "met" and common.met(False) == "NOT met"
    assert common.exit_code([True, True]) == 0 and common.exit_code([]) == 0
    assert common.exit_code([True, False, True]) == 1
    assert common.exit_code(ok for ok in (False,)) == 1  # any iterable, generators included


@pytest.mark.parametrize("script", ["reliability.py", "routing.py", "serving.py", "space_switch.py", "quality.py",
                                    "ablation.py", "registry_scale.py", "serving_vllm.py"])
def test_each_benchmark_reports_and_exits_through_the_helpers(script):
    """main() ends in ``return exit_code(...)`` and prints with ``met(...)``: no hand-made verdict, no exit 0."""
    tree = ast.parse((BENCHMARKS / script).read_text(encoding="utf-8"))
    main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
    returns = [node for node in _own_nodes(main) if isinstance(node, ast.Return)]
    assert returns and all(isinstance(r.value, ast.Call) and getattr(r.value.func, "id", "") == "exit_code"
                           for r in returns), f"{script}: every return of main() must be exit_code(...)"
    calls = {node.func.id for node in ast.walk(main) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert "met" in calls, f"{script}: targets must be printed with met(...)"
    text = (BENCHMARKS / script).read_text(encoding="utf-8")
    assert "'yes' if" not in text and "def met" not in text
