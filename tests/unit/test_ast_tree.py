"""Tests for probekit.probes.ast_tree (AST-Probe tree <-> (d, c, u) tuple)."""

from __future__ import annotations

import pytest

pytest.importorskip("tree_sitter")
pytest.importorskip("tree_sitter_python")

from probekit.data.code import iter_stdlib_functions  # noqa: E402
from probekit.probes.ast_tree import (  # noqa: E402
    EMPTY,
    Node,
    SyntaxTreeError,
    binarize,
    code_to_tuple,
    constituents,
    leaves,
    parse_code,
    tree_f1,
    tree_to_tuple,
    tuple_to_tree,
)

E = EMPTY


# --- hand-worked tuples --------------------------------------------------------

def test_assignment_call_by_hand():
    # tree-sitter: module > expression_statement > assignment(x, =, call(f,
    # argument_list("(", a, ",", b, ")"))). The module/expression_statement/
    # assignment chain merges; n-ary nodes right-nest under ∅:
    #   M(x, ∅6(=, call5(f, argument_list4("(", ∅3(a, ∅2(",", ∅1(b, ")")))))))
    leaves_, d, c, u = code_to_tuple("x = f(a, b)")
    assert leaves_ == ["x", "=", "f", "(", "a", ",", "b", ")"]
    assert d == [7, 6, 5, 4, 3, 2, 1]
    assert c == ["module|expression_statement|assignment", E, "call", "argument_list", E, E, E]
    assert u == [E] * 8


def test_def_return_by_hand():
    # module > function_definition(def, g, parameters("(", x, ")"), :, block >
    # return_statement(return, binary_operator(x, +, 1))). block's only child
    # is a non-terminal -> "block|return_statement".
    #   R7(def, ∅6(g, ∅5(parameters2("(", ∅1(x, ")")),
    #                    ∅4(:, BR3(return, binop2(x, ∅1(+, 1)))))))
    leaves_, d, c, u = code_to_tuple("def g(x):\n    return x + 1")
    assert leaves_ == ["def", "g", "(", "x", ")", ":", "return", "x", "+", "1"]
    assert d == [7, 6, 2, 1, 5, 4, 3, 2, 1]
    assert c == [
        "module|function_definition", E, "parameters", E, E, E,
        "block|return_statement", "binary_operator", E,
    ]
    assert u == [E] * 10


def test_unary_chain_docstring_and_comment_removed():
    # The docstring and comment go; block > return_statement > "return" is a
    # chain above one leaf, so it becomes that leaf's unary label:
    #   R4(def, ∅3(h, ∅2(parameters1("(", ")"), ∅1(:, return))))
    src = 'def h():\n    """doc"""\n    # c\n    return'
    leaves_, d, c, u = code_to_tuple(src)
    assert leaves_ == ["def", "h", "(", ")", ":", "return"]
    assert d == [4, 3, 1, 2, 1]
    assert c == ["module|function_definition", E, "parameters", E, E]
    assert u == [E] * 5 + ["block|return_statement"]


def test_single_token_snippet():
    leaves_, d, c, u = code_to_tuple("x")
    assert (leaves_, d, c, u) == (["x"], [], [], ["module|expression_statement"])
    tree = parse_code("x")
    assert tuple_to_tree(d, c, u, leaves(tree)) == tree


# --- parse_code ----------------------------------------------------------------

def test_comments_and_docstrings_removed():
    src = (
        '"""module doc"""\n'
        "class A:  # trailing\n"
        "    'class doc'\n"
        "    def f(self):\n"
        '        """f doc""" \n'
        "        # alone\n"
        "        return 1\n"
    )
    texts = [leaf.text for leaf in leaves(parse_code(src))]
    assert texts == ["class", "A", ":", "def", "f", "(", "self", ")", ":", "return", "1"]


def test_not_docstrings_are_kept():
    # A string that is not the first statement, an f-string and a bytes
    # literal are not docstrings (Python's own rule).
    src = 'def f():\n    x = 1\n    "late"\ndef g():\n    f"{x}"\ndef h():\n    b"raw"'
    strings = [leaf.text for leaf in leaves(parse_code(src)) if leaf.label == "string"]
    assert strings == ['"late"', 'f"{x}"', 'b"raw"']


def test_string_literal_is_one_leaf_with_offsets():
    src = 'y = "é" "b" + f"c{d!r:>3}"'
    tree = parse_code(src)
    lv = leaves(tree)
    assert [leaf.text for leaf in lv] == ["y", "=", '"é"', '"b"', "+", 'f"c{d!r:>3}"']
    assert [leaf.label for leaf in lv] == ["identifier", "=", "string", "string", "+", "string"]
    for leaf in lv:  # char (not byte) offsets, despite the non-ASCII "é"
        assert src[leaf.span[0]:leaf.span[1]] == leaf.text
    # The implicit concatenation is a node over its string parts.
    assert ("concatenated_string", frozenset({2, 3})) in constituents(tree)


def test_line_continuation_removed():
    texts = [leaf.text for leaf in leaves(parse_code("x = 1 + \\\n    2"))]
    assert texts == ["x", "=", "1", "+", "2"]


@pytest.mark.parametrize("src", ["x = (", "x = f(a", "print(1 2)", "def f(:\n  pass"])
def test_error_input_raises(src):
    with pytest.raises(SyntaxTreeError):
        parse_code(src)
    with pytest.raises(SyntaxTreeError):
        code_to_tuple(src)


def test_empty_after_removal_raises():
    with pytest.raises(SyntaxTreeError):
        parse_code("# only a comment\n")


# --- binarize / tuple_to_tree --------------------------------------------------

def test_binarize_shape():
    tree = Node("a", (Node("b", (Node("x", text="1"), Node("y", text="2"), Node("z", text="3"))),))
    bt = binarize(tree)
    assert bt.label == "a|b"
    assert [ch.label for ch in bt.children] == ["x", EMPTY]
    assert [ch.label for ch in bt.children[1].children] == ["y", "z"]
    assert tree_to_tuple(bt) == ([2, 1], ["a|b", EMPTY], [E, E, E])


def test_tuple_to_tree_ties_go_leftmost():
    # Equal distances -> split at the leftmost maximum -> right-nested, which
    # after dropping ∅ is one flat node.
    t = tuple_to_tree([1, 1, 1], ["p", E, E], [E] * 4, ["a", "b", "c", "d"])
    assert t.label == "p" and [ch.text for ch in t.children] == ["a", "b", "c", "d"]
    t = tuple_to_tree([1, 1], ["p", "q"], [E] * 3, ["a", "b", "c"])
    assert constituents(t) == {("p", frozenset({0, 1, 2})), ("q", frozenset({1, 2}))}


def test_tuple_to_tree_validates_lengths():
    with pytest.raises(ValueError, match="len"):
        tuple_to_tree([1], ["a"], [E], ["x", "y"])


def test_stdlib_round_trip():
    snippets = iter_stdlib_functions(max_functions=200, seed=0)
    assert len(snippets) == 200
    passed = rejected = 0
    for snip in snippets:
        try:
            tree = parse_code(snip.source)
        except SyntaxTreeError:
            rejected += 1
            continue
        lv = leaves(tree)
        assert all(snip.source[a:b] == leaf.text for leaf in lv for a, b in [leaf.span])
        d, c, u = tree_to_tuple(binarize(tree))
        assert len(d) == len(c) == len(lv) - 1 and len(u) == len(lv)
        rebuilt = tuple_to_tree(d, c, u, lv)
        assert rebuilt == tree, snip.doc_id
        assert tree_to_tuple(binarize(rebuilt)) == (d, c, u), snip.doc_id
        # Texts only (no leaf types / spans) give the same tuple back too.
        by_text = tuple_to_tree(d, c, u, [leaf.text for leaf in lv])
        assert tree_to_tuple(binarize(by_text)) == (d, c, u), snip.doc_id
        assert tree_f1(rebuilt, tree) == (1.0, 1.0, 1.0)
        passed += 1
    # iter_stdlib_functions already drops snippets tree-sitter flags.
    assert passed + rejected == 200 and rejected <= 10


# --- metric ----------------------------------------------------------------------

def test_constituents_by_hand():
    tree = parse_code("x = f(a, b)")
    full = frozenset(range(8))
    assert constituents(tree) == {
        ("module", full),
        ("expression_statement", full),
        ("assignment", full),
        ("call", frozenset(range(2, 8))),
        ("argument_list", frozenset(range(3, 8))),
    }


def test_f1_swapped_d():
    leaves_, d, c, u = code_to_tuple("x = f(a, b)")
    gold = tuple_to_tree(d, c, u, leaves_)
    # Swap d[2] (f|'(') and d[3] ('('|a): the split under ∅ now falls between
    # '(' and a, labelled argument_list {2..7}; its left half is call {2, 3}.
    d2 = d[:2] + [d[3], d[2]] + d[4:]
    pred = tuple_to_tree(d2, c, u, leaves_)
    assert constituents(pred) - constituents(gold) == {
        ("argument_list", frozenset(range(2, 8))),
        ("call", frozenset({2, 3})),
    }
    p, r, f = tree_f1(pred, gold)
    assert (p, r) == (3 / 5, 3 / 5) and f == pytest.approx(0.6)


def test_f1_changed_label_and_unary():
    leaves_, d, c, u = code_to_tuple("x = f(a, b)")
    gold = tuple_to_tree(d, c, u, leaves_)
    c2 = list(c)
    c2[2] = "subscript"  # call -> subscript: 4 of 5 right
    p, r, f = tree_f1(tuple_to_tree(d, c2, u, leaves_), gold)
    assert (p, r) == (4 / 5, 4 / 5) and f == pytest.approx(0.8)
    u2 = list(u)
    u2[0] = "keyword_argument"  # one extra unary constituent: P 5/6, R 1
    p, r, f = tree_f1(tuple_to_tree(d, c, u2, leaves_), gold)
    assert (p, r) == (5 / 6, 1.0) and f == pytest.approx(2 * (5 / 6) / (5 / 6 + 1))


def test_f1_empty_conventions():
    one = Node("x", text="x")
    assert tree_f1(one, one) == (1.0, 1.0, 1.0)
    chain = tuple_to_tree([], [], ["a"], ["x"])
    assert tree_f1(one, chain) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="leaves"):
        tree_f1(one, parse_code("x = 1"))
