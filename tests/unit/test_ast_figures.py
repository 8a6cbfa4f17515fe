"""Tests for probekit.probes.ast_figures (plotly figures of AST-Probe results)."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("plotly")
pytest.importorskip("tree_sitter")
pytest.importorskip("tree_sitter_python")

import plotly.io as pio  # noqa: E402

from probekit.probes.ast_figures import (  # noqa: E402
    EMPTY_COLOR,
    MATCH_COLOR,
    MISMATCH_COLOR,
    f1_vs_k_figure,
    per_label_recall_figure,
    tree_comparison_figure,
)
from probekit.probes.ast_tree import (  # noqa: E402
    EMPTY,
    Node,
    code_to_tuple,
    constituents,
    tuple_to_tree,
)

SMALL = "x = f(a, b)\n"
FUNC = (
    "def add(a, b=1):\n"
    "    if a > b:\n"
    "        return a - b\n"
    "    pass\n"
    "    return [x * 2 for x in range(b)]\n"
)


def _trace(fig, name):
    (tr,) = [t for t in fig.data if t.name == name]
    return tr


def _coloured(fig, which, colour):
    """(label, leaf set) of the nodes of tree ``which`` drawn in ``colour``."""
    tr = _trace(fig, f"{which} nodes")
    return {
        (cd[0], frozenset(cd[1]))
        for cd, col in zip(tr.customdata, tr.marker.color)
        if col == colour
    }


def _links(tree: Node) -> int:
    stack, n = [tree], 0
    while stack:
        node = stack.pop()
        n += len(node.children)
        stack.extend(node.children)
    return n


def _perturbed(d, c):
    """Swap d[0] and d[2] and relabel c[2]: a different tree over the same leaves."""
    d2, c2 = list(d), list(c)
    d2[0], d2[2] = d2[2], d2[0]
    c2[2] = "subscript" if c2[2] != "subscript" else "call"
    return d2, c2


def _roundtrip(fig):
    fig.to_json()
    pio.to_html(fig, include_plotlyjs=False)


# --- tree comparison -----------------------------------------------------------

@pytest.mark.parametrize("src", [SMALL, FUNC])
def test_identical_trees_have_no_mismatch(src):
    leaves, d, c, u = code_to_tuple(src)
    fig = tree_comparison_figure(leaves, (d, c, u), (d, c, u))
    for which in ("gold", "pred"):
        tr = _trace(fig, f"{which} nodes")
        assert MISMATCH_COLOR not in tr.marker.color
        assert {cd[2] for cd in tr.customdata} <= {"matched", "empty"}
    titles = [a.text for a in fig.layout.annotations]
    assert len(titles) == 2 and all("F1 = 1.000" in t for t in titles)
    _roundtrip(fig)


@pytest.mark.parametrize("src", [SMALL, FUNC])
def test_mismatch_colouring_is_the_symmetric_difference(src):
    leaves, d, c, u = code_to_tuple(src)
    d2, c2 = _perturbed(d, c)
    gold_set = constituents(tuple_to_tree(d, c, u, leaves))
    pred_set = constituents(tuple_to_tree(d2, c2, u, leaves))
    assert gold_set != pred_set  # the perturbation must change the tree

    fig = tree_comparison_figure(leaves, (d, c, u), (d2, c2, u))
    missed = _coloured(fig, "gold", MISMATCH_COLOR)
    spurious = _coloured(fig, "pred", MISMATCH_COLOR)
    assert missed == gold_set - pred_set
    assert spurious == pred_set - gold_set
    assert missed | spurious == gold_set ^ pred_set
    assert _coloured(fig, "gold", MATCH_COLOR) == gold_set & pred_set
    assert _coloured(fig, "pred", MATCH_COLOR) == gold_set & pred_set
    # status words agree with colours
    for which, word in (("gold", "missed"), ("pred", "spurious")):
        tr = _trace(fig, f"{which} nodes")
        for cd, col in zip(tr.customdata, tr.marker.color):
            assert (col == MISMATCH_COLOR) == (cd[2] == word)
    f1 = fig.layout.annotations[0].text.split("F1 = ")[1]
    assert float(f1) < 1
    _roundtrip(fig)


def test_unary_labels_are_single_leaf_nodes_and_can_mismatch():
    leaves, d, c, u = code_to_tuple(FUNC)
    j = leaves.index("pass")
    assert u[j] == "pass_statement"
    u2 = list(u)
    u2[j] = EMPTY
    fig = tree_comparison_figure(leaves, (d, c, u), (d, c, u2))
    gold = _trace(fig, "gold nodes")
    (k,) = [i for i, cd in enumerate(gold.customdata) if cd[1] == [j]]
    assert gold.customdata[k][0] == "pass_statement"
    assert (gold.x[k], gold.y[k]) == (_trace(fig, "gold leaves").x[j], 1)  # directly above its leaf
    assert _coloured(fig, "gold", MISMATCH_COLOR) == {("pass_statement", frozenset({j}))}
    assert _coloured(fig, "pred", MISMATCH_COLOR) == set()


@pytest.mark.parametrize("src", [SMALL, FUNC])
def test_edge_count_and_node_positions(src):
    leaves, d, c, u = code_to_tuple(src)
    d2, c2 = _perturbed(d, c)
    fig = tree_comparison_figure(leaves, (d, c, u), (d2, c2, u))
    for which, (dd, cc) in (("gold", (d, c)), ("pred", (d2, c2))):
        tree = tuple_to_tree(dd, cc, u, leaves)
        edges = _trace(fig, f"{which} edges")
        assert len(edges.x) == 3 * _links(tree)
        assert all(v is None for v in edges.x[2::3])
        nodes = _trace(fig, f"{which} nodes")
        leaf_x = list(_trace(fig, f"{which} leaves").x)
        assert len(leaf_x) == len(leaves) and all(b - a >= 18 - 1e-6 for a, b in zip(leaf_x, leaf_x[1:]))
        for cd, x in zip(nodes.customdata, nodes.x):
            assert math.isclose(x, sum(leaf_x[i] for i in cd[1]) / len(cd[1]))
        # every node is a constituent, or the ∅ root
        drawn = {(cd[0], frozenset(cd[1])) for cd in nodes.customdata if cd[0] != EMPTY}
        assert drawn == constituents(tree)


def test_empty_root_is_neutral():
    # Top split labelled ∅: the root survives as ∅ and is not a constituent.
    leaves = ["a", "b", "c"]
    dcu = ([2, 1], [EMPTY, "pair"], [EMPTY] * 3)
    fig = tree_comparison_figure(leaves, dcu, dcu)
    tr = _trace(fig, "gold nodes")
    (root,) = [i for i, cd in enumerate(tr.customdata) if cd[0] == EMPTY]
    assert tr.marker.color[root] == EMPTY_COLOR and tr.customdata[root][2] == "empty"


def test_long_snippet_scales_and_rotates():
    body = "".join(f"    v{i} = f(v{i - 1}, {i})\n" for i in range(1, 19))
    leaves, d, c, u = code_to_tuple("def g(v0):\n" + body + "    return v18\n")
    assert len(leaves) >= 140
    s_leaves, *s_dcu = code_to_tuple(SMALL)
    small = tree_comparison_figure(s_leaves, s_dcu, s_dcu)
    fig = tree_comparison_figure(leaves, (d, c, u), (d, c, u))
    assert fig.layout.width > small.layout.width
    assert fig.layout.width >= 10 * len(leaves)
    assert fig.layout.xaxis.tickangle == -90 and fig.layout.xaxis2.tickangle == -90
    assert list(fig.layout.xaxis.tickvals) == list(_trace(fig, "gold leaves").x)
    assert fig.layout.xaxis.showticklabels and fig.layout.xaxis2.showticklabels
    _roundtrip(fig)


def test_tree_comparison_rejects_bad_tuple():
    leaves, d, c, u = code_to_tuple(SMALL)
    with pytest.raises(ValueError, match="pred"):
        tree_comparison_figure(leaves, (d, c, u), (d[:-1], c, u))


def test_leaf_text_is_escaped():
    leaves, d, c, u = code_to_tuple("y = a < b\n")
    fig = tree_comparison_figure(leaves, (d, c, u), (d, c, u))
    assert "&lt;" in fig.layout.xaxis.ticktext


# --- F1 against k ---------------------------------------------------------------

KS = [8, 16, 32, 64, 128, 256, 512, 576]
SEP = [0.30, 0.41, 0.52, 0.63, 0.61, 0.55, 0.50, 0.45]
MAT = [0.33, 0.44, 0.50, 0.58, 0.66, 0.64, 0.60, 0.59]


def test_f1_vs_k_traces_and_best_markers():
    fig = f1_vs_k_figure(KS, SEP, MAT, d_model=576, controls={"layer 0": 0.36, "random init": 0.37})
    assert len(fig.data) == 4
    sep, sep_best, mat, mat_best = fig.data
    assert list(sep.x) == KS and list(mat.x) == KS
    assert mat.line.dash == "dash"
    assert list(sep_best.x) == [KS[SEP.index(max(SEP))]] == [64]
    assert list(mat_best.x) == [KS[MAT.index(max(MAT))]] == [128]
    assert fig.layout.xaxis.type == "log"
    assert list(fig.layout.xaxis.ticktext) == [str(k) for k in KS[:-1]] + ["D=576"]
    assert len(fig.layout.shapes) == 2
    _roundtrip(fig)


def test_f1_vs_k_without_matryoshka_and_unsorted_ks():
    fig = f1_vs_k_figure([32, 8, 16], [0.5, 0.7, 0.6])
    assert len(fig.data) == 2
    assert list(fig.data[0].x) == [8, 16, 32] and list(fig.data[0].y) == [0.7, 0.6, 0.5]
    assert list(fig.data[1].x) == [8]
    assert "D=" not in "".join(fig.layout.xaxis.ticktext)


@pytest.mark.parametrize(
    "args, match",
    [
        (([8, 16], [0.1]), "f1_separate"),
        (([8, 16], [0.1, 0.2], [0.3]), "f1_matryoshka"),
        (([0, 16], [0.1, 0.2]), "positive"),
        (([-8, 16], [0.1, 0.2]), "positive"),
        (([8, 8], [0.1, 0.2]), "distinct"),
        (([], []), "non-empty"),
    ],
)
def test_f1_vs_k_errors(args, match):
    with pytest.raises(ValueError, match=match):
        f1_vs_k_figure(*args)


# --- per-label recall -------------------------------------------------------------

RECALL = {"call": 0.8, "block": 0.5, "if_statement": 0.9, "argument_list": 0.95, "return_statement": 0.7}
SUPPORT = {"call": 40, "block": 90, "if_statement": 5, "argument_list": 40, "return_statement": 12}


def test_recall_sorted_by_support():
    fig = per_label_recall_figure(RECALL, SUPPORT)
    bar = fig.data[0]
    # support desc; the tie at 40 broken by recall desc
    assert list(bar.y) == ["block", "argument_list", "call", "return_statement", "if_statement"]
    assert list(bar.x) == [RECALL[k] for k in bar.y]
    assert list(bar.customdata) == [SUPPORT[k] for k in bar.y]
    assert all(f"support = {SUPPORT[k]}" in h for k, h in zip(bar.y, bar.hovertext))
    assert fig.layout.yaxis.autorange == "reversed"  # first label on top
    _roundtrip(fig)


def test_recall_sorted_by_recall_and_top():
    fig = per_label_recall_figure(RECALL, top=3)
    assert list(fig.data[0].y) == ["argument_list", "if_statement", "call"]
    fig = per_label_recall_figure(RECALL, SUPPORT, top=2)
    assert list(fig.data[0].y) == ["block", "argument_list"]
    _roundtrip(fig)


def test_recall_errors():
    with pytest.raises(ValueError, match="support lacks"):
        per_label_recall_figure(RECALL, {"call": 3})
    with pytest.raises(ValueError, match="top"):
        per_label_recall_figure(RECALL, top=0)
    with pytest.raises(ValueError, match="empty"):
        per_label_recall_figure({})


@pytest.mark.parametrize("src", [SMALL, FUNC])
def test_same_height_node_labels_are_spaced_by_their_widths(src):
    # labels sit right of their node: a node's label must end before the next node of its height (per tree)
    leaves, d, c, u = code_to_tuple(src)
    d2, c2 = _perturbed(d, c)
    fig = tree_comparison_figure(leaves, (d, c, u), (d2, c2, u))
    for which in ("gold", "pred"):
        nodes = _trace(fig, f"{which} nodes")
        by_height: dict = {}
        for x, y, text in zip(nodes.x, nodes.y, nodes.text):
            by_height.setdefault(y, []).append((x, text))
        for row in by_height.values():
            row.sort()
            for (xa, ta), (xb, _) in zip(row, row[1:]):
                assert xb - xa >= 0.6 * 9 * len(ta) + 10, (which, ta, xa, xb)
    rng = fig.layout.xaxis.range
    assert fig.layout.width >= rng[1] - rng[0] + fig.layout.margin.l + fig.layout.margin.r - 1
