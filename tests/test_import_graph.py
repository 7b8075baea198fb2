"""No import cycles among guardrl's modules.

An AST walk over guardrl/**/*.py (no import of guardrl itself, so it is quick and cannot be fooled by
what is already in sys.modules) collects every `import` / `from ... import` of a guardrl module, at any
depth: a function-level (lazy) import is an edge like a top-level one, because it runs whenever that
function does and then needs the other module whole. An import of a package resolves to its `__init__`;
`from package import name` resolves to the submodule when `name` is one, else to the package.

Left out are only imports that never run while the module is imported: those under `if TYPE_CHECKING:`
(never at all) and those under `if __name__ == "__main__":` (only when the file runs as a script, where it
is the module `__main__`; the guardrl module of the same file is then imported afresh, whole, by whoever
asks for it, so no half-initialised module is met: `python -m guardrl.cli` -> guardrl.console -> guardrl.cli).

Run it directly (`python tests/test_import_graph.py`) to print the graph's cycles.
"""

from __future__ import annotations

import ast
import sys
import warnings
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "guardrl"

# Cycles known and accepted, each as its path from its smallest module (what find_cycles returns), with why it
# is harmless. The test fails on any cycle not listed here; a listed one that has gone only warns.
KNOWN_CYCLES: dict[tuple[str, ...], str] = {}


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (a package is its `__init__`)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _never_runs_on_import(node: ast.AST) -> bool:
    """`if TYPE_CHECKING:` or `if __name__ == "__main__":` (the body only; an else branch does run)."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
        return True
    if isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING":
        return True
    return (
        isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and len(test.ops) == 1
        and isinstance(test.ops[0], ast.Eq)
        and isinstance(test.comparators[0], ast.Constant)
        and test.comparators[0].value == "__main__"
    )


def _walk_imports(tree: ast.AST):
    """Every Import / ImportFrom node, at any depth (function bodies included), but those that never run on
    import (`_never_runs_on_import`)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if _never_runs_on_import(node):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _resolve(name: str, modules: dict[str, Path]) -> Optional[str]:
    """The longest prefix of `name` that is a guardrl module (`guardrl.x.Y` -> `guardrl.x`)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the guardrl modules it imports (anywhere in its file)."""
    modules = module_files(root, package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _walk_imports(tree):
            targets: list[Optional[str]] = []
            if isinstance(node, ast.Import):
                targets = [_resolve(alias.name, modules) for alias in node.names]
            else:
                if node.level:
                    # Relative: level 1 is this module's package (the module itself for an __init__).
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    targets.append(submodule if submodule in modules else _resolve(source, modules))
            graph[name].update(t for t in targets if t is not None and t != name)
    return graph


def find_cycles(graph: dict[str, set[str]], limit: int = 100) -> list[list[str]]:
    """Every elementary cycle (a -> ... -> a, no module twice), each starting at its smallest module, at most
    `limit` of them. The graph is small and acyclic but for a few listed exceptions, so a depth-first search
    from each module over the larger ones is enough."""
    cycles: list[list[str]] = []
    for start in sorted(graph):
        path = [start]
        # (module, the modules it imports that are still to visit), depth first
        pending = [iter(sorted(w for w in graph[start] if w >= start))]
        while pending and len(cycles) < limit:
            following = next(pending[-1], None)
            if following is None:
                pending.pop()
                path.pop()
            elif following == start:
                cycles.append([*path, start])
            elif following not in path:
                path.append(following)
                pending.append(iter(sorted(w for w in graph.get(following, ()) if w >= start)))
    return cycles


def test_the_scan_sees_lazy_relative_and_package_imports(tmp_path):
    files = {
        "__init__.py": "",
        "a.py": "def f():\n    from pkg.sub import thing\n",  # lazy; a package's name: its __init__
        "sub/__init__.py": "from .b import thing\n",
        "sub/b.py": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from pkg import c\n"  # never runs
            "import pkg.a\n"
            "thing = 1\n"
            "if __name__ == '__main__':\n    from .. import c\nelse:\n    from ..d import x\n"
        ),
        "c.py": "from pkg.sub import b\n",  # a submodule's name: the submodule
        "d.py": "from . import c\nfrom .sub.b import thing as x\n",
    }
    for name, text in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    graph = import_graph(tmp_path, "pkg")
    assert graph == {
        "pkg": set(),
        "pkg.a": {"pkg.sub"},
        "pkg.sub": {"pkg.sub.b"},
        "pkg.sub.b": {"pkg.a", "pkg.d"},
        "pkg.c": {"pkg.sub.b"},
        "pkg.d": {"pkg.c", "pkg.sub.b"},
    }
    assert find_cycles(graph) == [
        ["pkg.a", "pkg.sub", "pkg.sub.b", "pkg.a"],
        ["pkg.c", "pkg.sub.b", "pkg.d", "pkg.c"],
        ["pkg.d", "pkg.sub.b", "pkg.d"],
    ]


def test_no_new_import_cycles_among_guardrl_modules():
    cycles = find_cycles(import_graph())
    new = [" -> ".join(cycle) for cycle in cycles if tuple(cycle) not in KNOWN_CYCLES]
    assert not new, "import cycles among guardrl's modules:\n  " + "\n  ".join(new)
    found = {tuple(cycle) for cycle in cycles}
    for cycle in KNOWN_CYCLES:
        if cycle not in found:
            warnings.warn(f"KNOWN_CYCLES lists {' -> '.join(cycle)}, no longer a cycle: remove it")


if __name__ == "__main__":  # pragma: no cover
    found = find_cycles(import_graph())
    for cycle in found:
        print(" -> ".join(cycle))
    sys.exit(1 if found else 0)
