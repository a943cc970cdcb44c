"""The package keeps the layout README's "Layout" section draws: stages as subpackages, imports only downward.

Reads the source with :mod:`ast` (nothing is imported), so it also sees imports inside functions, relative
imports and the lazy ``importlib.import_module`` names of ``moin_hub/__init__.py``:

- the direction between stages: ``cli`` -> ``pipeline`` / ``serving`` -> ``hub`` -> the top-level
  ``errors`` / ``_validators`` / ``_version``; ``local_hub`` depends on none of the stages; only
  ``__main__`` imports ``cli``;
- no import cycle between modules (imports run when a module loads: module level, outside
  ``TYPE_CHECKING``; an import inside a function runs later and cannot make a load-order cycle);
- no module over 600 lines unless its docstring says why (a line starting "Long because");
- each stage's ``__init__.py`` says what it owns and what it may import;
- the Space's ``app.py`` and README's ``serve run`` use public entry points.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "moin_hub"
MAX_LINES = 600

#: The top-level low-level modules every stage may use.
CORE = {"moin_hub.errors", "moin_hub._validators", "moin_hub._version"}
#: What each part may import (besides itself). "api" is the public ``moin_hub/__init__.py``.
ALLOWED = {
    "core": {"core"},
    "local_hub": {"core"},
    "hub": {"core"},
    "pipeline": {"hub", "core"},
    "serving": {"hub", "core"},
    "cli": {"pipeline", "serving", "hub", "local_hub", "core", "api"},
    "api": {"hub", "serving", "local_hub", "core"},
    "main": {"cli"},
}
#: Documented exceptions (module -> extra parts): the demo starts a local Hub (see pipeline/__init__.py).
EXTRA_ALLOWED = {"moin_hub.pipeline.demo": {"local_hub"}}
STAGES = ("hub", "pipeline", "serving", "local_hub", "cli")
#: Modules the Space's app.py may import: the public API and documented public modules.
PUBLIC_MODULES = {"moin_hub", "moin_hub.errors", "moin_hub.serving.space_app"}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (a submodule when ``from pkg import submodule``)
    line: int
    at_load: bool  # runs when the importing module loads (module level, not under TYPE_CHECKING)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def part_of(module: str) -> str:
    if module == "moin_hub":
        return "api"
    if module == "moin_hub.__main__":
        return "main"
    if module in CORE:
        return "core"
    stage = module.split(".")[1]
    if stage in STAGES:
        return stage
    raise AssertionError(f"{module} is in no part of the layout: put it in a stage or add it to CORE")


def _resolve(level: int, module: str | None, package: str) -> str:
    if not level:
        return module or ""
    base = package.split(".")[: len(package.split(".")) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str, path: Path) -> list[Import]:
    """Every moin_hub import in a module, wherever it is (function-local, relative, importlib strings)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def add(target: str, line: int, at_load: bool) -> None:
        if target == "moin_hub" or target.startswith("moin_hub."):
            found.append(Import(name, target, line, at_load))

    def visit(node: ast.AST, at_load: bool) -> None:
        for child in ast.iter_child_nodes(node):
            child_at_load = at_load and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.If) and _is_type_checking(child):
                child_at_load = False
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, child.lineno, at_load)
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(child.level, child.module, package)
                for alias in child.names:
                    submodule = f"{base}.{alias.name}"
                    add(submodule if submodule in MODULES else base, child.lineno, at_load)
            visit(child, child_at_load)

    visit(tree, True)
    if any(isinstance(n, ast.Attribute) and n.attr == "import_module" for n in ast.walk(tree)):
        # importlib.import_module: module names written as strings ("._engine", "moin_hub.x") load lazily
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if re.fullmatch(r"\.+[A-Za-z_][\w.]*", node.value):
                    dots = len(node.value) - len(node.value.lstrip("."))
                    add(_resolve(dots, node.value.lstrip("."), package), node.lineno, False)
                elif re.fullmatch(r"moin_hub(\.[A-Za-z_]\w*)+", node.value):
                    add(node.value, node.lineno, False)
    return found


ALL_IMPORTS = [imp for name, path in MODULES.items() for imp in imports_of(name, path)]


def where(imp: Import) -> str:
    return f"{MODULES[imp.source].relative_to(ROOT)}:{imp.line}"


def test_every_module_belongs_to_one_part_of_the_layout():
    parts = {name: part_of(name) for name in MODULES}
    assert set(parts.values()) == set(ALLOWED), parts


def test_imports_only_go_down_the_layout():
    problems = []
    for imp in ALL_IMPORTS:
        if imp.target not in MODULES:
            problems.append(f"{where(imp)}: {imp.source} imports {imp.target}, which does not exist")
            continue
        source, target = part_of(imp.source), part_of(imp.target)
        allowed = ALLOWED[source] | EXTRA_ALLOWED.get(imp.source, set()) | {source}
        if target not in allowed:
            problems.append(f"{where(imp)}: {imp.source} imports {imp.target} ({source} -> {target} is not "
                            f"allowed; {source} may import: {', '.join(sorted(allowed))})")
    assert not problems, "imports against the layout (see README, Layout):\n" + "\n".join(problems)


def test_nothing_but_main_imports_the_cli():
    offenders = [f"{where(imp)}: {imp.source} imports {imp.target}" for imp in ALL_IMPORTS
                 if part_of(imp.target) == "cli" and part_of(imp.source) not in ("cli", "main")]
    assert not offenders, "only moin_hub.__main__ may import moin_hub.cli:\n" + "\n".join(offenders)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_between_modules():
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    lines: dict[tuple[str, str], Import] = {}
    for imp in ALL_IMPORTS:
        if imp.at_load and imp.target in MODULES and imp.target != imp.source:
            graph[imp.source].add(imp.target)
            lines.setdefault((imp.source, imp.target), imp)
    cycle = find_cycle(graph)
    if cycle:
        steps = [f"  {where(lines[(a, b)])}: {a} imports {b}" for a, b in zip(cycle, cycle[1:], strict=False)]
        pytest.fail("import cycle: " + " -> ".join(cycle) + "\n" + "\n".join(steps))


def test_find_cycle_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_is_long_without_saying_why():
    long = []
    for path in MODULES.values():
        source = path.read_text(encoding="utf-8")
        n_lines = len(source.splitlines())
        docstring = ast.get_docstring(ast.parse(source)) or ""
        says_why = any(line.strip().startswith("Long because") for line in docstring.splitlines())
        if n_lines > MAX_LINES and not says_why:
            long.append(f"{path.relative_to(ROOT)}: {n_lines} lines")
    assert not long, (f"modules over {MAX_LINES} lines: split them along a real seam, or say why in the module "
                      "docstring (a line starting 'Long because'):\n" + "\n".join(long))


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_says_what_it_owns_and_may_import(stage):
    docstring = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text(encoding="utf-8")))
    assert docstring, f"moin_hub/{stage}/__init__.py needs a docstring: what it owns and what it may import"
    assert "may import" in docstring.lower(), f"moin_hub/{stage}/__init__.py does not say what it may import"


def test_the_space_imports_only_public_names():
    app = ROOT / "spaces" / "moin-router" / "app.py"
    used = {imp.target for imp in imports_of("app", app)}
    assert used and used <= PUBLIC_MODULES, f"spaces/moin-router/app.py imports {sorted(used - PUBLIC_MODULES)}"


def test_readme_entry_points_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    entry_points = set(re.findall(r"\b(moin_hub(?:\.\w+)+):(\w+)", readme))
    assert ("moin_hub.serving.ray_serve", "app_builder") in entry_points
    for module, name in entry_points:
        tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        assert name in defined, f"README names {module}:{name}, which {module} does not define"
