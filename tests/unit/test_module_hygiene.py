"""Module hygiene, checked by reading the source with ``ast`` (nothing is imported):

* no module under ``probekit/`` or ``app/`` imports a private (``_name``) name from another probekit/app module
  (a helper two modules need lives in a neutral module under a public name);
* no import cycle among probekit modules, counting imports inside functions too (a lazy import only hides a
  cycle until someone moves it to the top).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("probekit", "app")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[_module_name(path)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path) -> list[tuple[int, str, list[str]]]:
    """``(line, imported module, imported names)`` for every import statement, resolved to absolute names."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    # imports under `if TYPE_CHECKING:` never run, so they are no edge of the runtime import graph
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name, []) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod, [a.name for a in node.names]))
    return out


def _ours(mod: str) -> bool:
    return mod.split(".")[0] in PACKAGES


def private_imports(modules: dict[str, Path]) -> list[str]:
    bad = []
    for name, path in modules.items():
        for line, mod, names in _imports(name, path):
            if not _ours(mod) or mod == name:
                continue
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    bad.append(f"{path.relative_to(ROOT)}:{line}: imports private {n!r} from {mod}")
    return bad


def private_aliases(modules: dict[str, Path]) -> list[str]:
    """Another module's public name imported under a private alias (``import json_safe as _json_safe``): the
    shared helper should be used under its own public name."""
    bad = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or _ours(node.module or "")):
                for a in node.names:
                    if a.asname and a.asname.startswith("_") and not a.name.startswith("_"):
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports {a.name!r} as {a.asname!r}")
    return bad


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """probekit module → the probekit modules it imports (``from pkg import submodule`` counts as the
    submodule; a package's ``__init__`` is not an edge of its submodules' imports)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        if not name.startswith("probekit"):
            continue
        edges = set()
        for _, mod, names in _imports(name, path):
            if not mod.startswith("probekit"):
                continue
            subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in modules]
            edges.update(subs or ([mod] if mod in modules else []))
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, …, a]``, or None (iterative three-colour DFS)."""
    colour = dict.fromkeys(graph, 0)  # 0 new, 1 on the stack, 2 done
    for start in sorted(graph):
        if colour[start]:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        colour[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(nxt, 2) == 1:
                return path[path.index(nxt):] + [nxt]
            elif colour.get(nxt) == 0:
                colour[nxt] = 1
                stack.append((nxt, iter(sorted(graph[nxt]))))
                path.append(nxt)
    return None


def test_no_module_imports_another_modules_private_names():
    bad = private_imports(_modules())
    assert not bad, "private names imported across modules (give them a public name in a neutral module):\n" + \
        "\n".join(bad)


def test_no_public_helper_is_imported_under_a_private_alias():
    bad = private_aliases(_modules())
    assert not bad, "shared helpers imported under private aliases (use their public names):\n" + "\n".join(bad)


def test_no_import_cycle_among_probekit_modules():
    cycle = find_cycle(import_graph(_modules()))
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


# ------------------------------------------------------------------ the checkers themselves can fail


def test_checkers_catch_a_private_import_and_a_cycle(tmp_path, monkeypatch):
    pkg = tmp_path / "probekit"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import _helper\n")
    (pkg / "b.py").write_text("def _helper():\n    from . import a\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["x"]), "ROOT", tmp_path)
    mods = {_module_name(p): p for p in sorted(pkg.rglob("*.py"))}
    assert any("'_helper'" in b for b in private_imports(mods))
    (pkg / "c.py").write_text("from .b import helper as _helper\n")
    mods = {_module_name(p): p for p in sorted(pkg.rglob("*.py"))}
    assert any("as '_helper'" in b for b in private_aliases(mods))
    assert find_cycle(import_graph(mods)) in (["probekit.a", "probekit.b", "probekit.a"],
                                              ["probekit.b", "probekit.a", "probekit.b"])


@pytest.mark.parametrize("src", ["from .b import helper\n", "from .b import __all__\n", "import os\n"])
def test_checkers_accept_public_imports(tmp_path, monkeypatch, src):
    pkg = tmp_path / "probekit"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(src)
    (pkg / "b.py").write_text("helper = 1\n__all__ = ['helper']\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["x"]), "ROOT", tmp_path)
    mods = {_module_name(p): p for p in sorted(pkg.rglob("*.py"))}
    assert private_imports(mods) == [] and private_aliases(mods) == [] and find_cycle(import_graph(mods)) is None
