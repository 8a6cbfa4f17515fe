"""AST-Probe's docstring rule against CPython's own: a statement is removed as a docstring exactly when the
interpreter makes it the ``__doc__`` (parenthesised, nested, implicitly concatenated forms included)."""

from __future__ import annotations

import pytest

pytest.importorskip("tree_sitter_python")

from probekit.probes.ast_tree import leaves, parse_code  # noqa: E402

# (body statement, as it appears in `def f():` / `class A:` / a module)
STATEMENTS = [
    '("doc")',
    '(("doc"))',
    '("a"\n     "b")',
    '( # why\n     "doc" )',
    '"doc"',
    '("doc",)',
    '("doc") + "x"',
    '(f"doc")',
    '(b"doc")',
]


def _wrap(kind: str, stmt: str) -> tuple[str, str]:
    """Source with ``stmt`` first in a body, and the same source without it."""
    if kind == "module":
        return f"{stmt}\nx = 1", "x = 1"
    head = "def f():" if kind == "function" else "class A:"
    return f"{head}\n    {stmt}\n    x = 1", f"{head}\n    x = 1"


def _cpython_doc(kind: str, src: str):
    scope: dict = {}
    exec(compile(src, "<snippet>", "exec"), scope)
    return {"module": scope.get("__doc__"), "function": scope.get("f") and scope["f"].__doc__,
            "class": scope.get("A") and scope["A"].__doc__}[kind]


@pytest.mark.parametrize("kind", ["function", "class", "module"])
@pytest.mark.parametrize("stmt", STATEMENTS)
def test_docstring_removal_follows_cpython(kind, stmt):
    src, without = _wrap(kind, stmt)
    got = [(leaf.label, leaf.text) for leaf in leaves(parse_code(src))]
    if _cpython_doc(kind, src) is not None:  # a docstring: the tree is that of the source without it
        assert got == [(leaf.label, leaf.text) for leaf in leaves(parse_code(without))]
    else:  # not a docstring: every string of the statement is still a leaf
        assert any("doc" in text for label, text in got if label == "string")


def test_the_issue_example():
    src = 'def f():\n    ("doc")\n    return 1'
    assert [leaf.text for leaf in leaves(parse_code(src))] == ["def", "f", "(", ")", ":", "return", "1"]
