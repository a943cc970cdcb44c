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


def test_the_second_corpus_builder_keeps_long_docstrings_per_package(tmp_path):
    """benchmarks/_pydocs_corpus.py: long docstrings of each named package, labelled by package, tests skipped."""
    import json
    import subprocess
    import sys

    site = tmp_path / "site"
    long_doc = " ".join(f"word{i}" for i in range(40))
    for package in ("alpha", "beta"):
        (site / package / "tests").mkdir(parents=True)
        (site / package / "core.py").write_text(f'"""{long_doc}"""\n\ndef f():\n    """too short"""\n\n'
                                                f'class C:\n    """{package} {long_doc}"""\n')
        (site / package / "tests" / "test_core.py").write_text(f'"""{long_doc}"""\n')
    out = tmp_path / "corpus.jsonl"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "_pydocs_corpus.py"), str(out), "--site-packages",
                           str(site), "--packages", "alpha,beta", "--max-words", "10"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["label"], r["source"]) for r in rows) == [("alpha", "alpha/core.py")] * 2 + [("beta", "beta/core.py")] * 2
    assert all(len(r["text"].split()) == 10 for r in rows)
