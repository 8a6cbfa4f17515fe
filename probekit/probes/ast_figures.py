"""Plotly figures for AST-Probe results.

* :func:`tree_comparison_figure` -- a snippet's gold and predicted trees, one
  above the other over the same leaves, with mismatched constituents in red.
* :func:`f1_vs_k_figure` -- constituent F1 against the subspace size ``k``
  (separate fits and Matryoshka prefixes), with control levels.
* :func:`per_label_recall_figure` -- recall of each non-terminal label.

Mismatches in :func:`tree_comparison_figure` follow
:func:`probekit.probes.ast_tree.constituents` exactly: a node is a constituent
``(label, leaf set)`` unless its label is :data:`~probekit.probes.ast_tree.EMPTY`,
the chain nodes that a unary label ``u_j`` becomes (single-leaf constituents)
included. Each tree's node trace carries, per node, ``marker.color`` (one of
:data:`MATCH_COLOR`, :data:`MISMATCH_COLOR`, :data:`EMPTY_COLOR`) and
``customdata = [label, sorted leaf indices, status]`` with status one of
``"matched"``, ``"missed"`` (gold tree), ``"spurious"`` (predicted tree) or
``"empty"``, so the colouring can be read back from the figure.

Public API
----------
MATCH_COLOR
MISMATCH_COLOR
EMPTY_COLOR
tree_comparison_figure
f1_vs_k_figure
per_label_recall_figure
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from probekit.figure_layout import fit_figure
from probekit.probes.ast_tree import EMPTY, Node, constituents, tree_f1, tuple_to_tree

__all__ = [
    "AST_METRICS",
    "MATCH_COLOR",
    "MISMATCH_COLOR",
    "EMPTY_COLOR",
    "tree_comparison_figure",
    "f1_vs_k_figure",
    "per_label_recall_figure",
]

#: Score name -> axis label of the per-layer scores of an ``ASTProbeResult`` (``figures(metric=...)``).
AST_METRICS = (("f1", "constituent F1"), ("precision", "precision"), ("recall", "recall"),
               ("c_accuracy", "c accuracy"), ("u_accuracy", "u accuracy"), ("d_order_accuracy", "d order accuracy"))

#: Node colour of a constituent present in both trees.
MATCH_COLOR = "#2ca02c"
#: Node colour of a gold constituent missing from the prediction ("missed",
#: gold tree) or a predicted one absent from gold ("spurious", predicted tree).
MISMATCH_COLOR = "#d62728"
#: Node colour of an :data:`EMPTY` root (not a constituent, so never a mismatch).
EMPTY_COLOR = "#9e9e9e"
_EDGE_COLOR = "#b0b0b0"
_LEAF_COLOR = "#555555"
_TEMPLATE = "plotly_white"

# Pixel budget of a tree diagram. The x axis is in pixels: leaves at least _PX_PER_LEAF apart (vertical tick
# labels, 10 px font), widened wherever two nodes of one height would overlap their labels (see _spread).
_PX_PER_LEAF = 18
_PX_PER_LEVEL = 26
_TICK_PX = 110  # room for the vertical leaf labels under each diagram
_LEAF_CHARS = 14  # longer leaf texts (string literals) are cut in tick labels
_NODE_FONT = 9
_CHAR_PX = 0.62 * _NODE_FONT  # upper estimate of a glyph's width in the node-label font
_LABEL_GAP = 16  # marker radius + text offset + a clear gap between one label and the next node
_MARGIN_L, _MARGIN_R = 60, 30


# ---------------------------------------------------------------------------
# tree layout
# ---------------------------------------------------------------------------

@dataclass
class _Layout:
    """Drawing coordinates of one tree.

    ``nodes`` rows are ``(label, leaf indices, x, y)`` for internal nodes;
    ``edges`` rows are ``((x0, y0), (x1, y1))`` parent to child; ``leaves``
    rows are ``(index, text)`` with the leaf at ``(index, 0)``.
    """

    nodes: list[tuple[str, tuple[int, ...], float, int]] = field(default_factory=list)
    edges: list[tuple[tuple[float, int], tuple[float, int]]] = field(default_factory=list)
    leaves: list[tuple[int, str]] = field(default_factory=list)

    @property
    def height(self) -> int:
        return max((y for *_, y in self.nodes), default=0)


def _layout(tree: Node) -> _Layout:
    """Place leaf ``i`` at ``(i, 0)`` and a node at (mean leaf index, its height); :func:`_place` then maps
    leaf indices to pixel positions.

    Iterative post-order (predicted trees can be deep chains); leaves are
    numbered left to right as :func:`constituents` numbers them.
    """
    out = _Layout()
    # per finished node: (leaf indices, x, height)
    placed: dict[int, tuple[tuple[int, ...], float, int]] = {}
    stack: list[tuple[Node, bool]] = [(tree, False)]
    while stack:
        node, expanded = stack.pop()
        if node.is_leaf:
            i = len(out.leaves)
            out.leaves.append((i, node.text if node.text is not None else node.label))
            placed[id(node)] = ((i,), float(i), 0)
        elif not expanded:
            stack.append((node, True))
            stack.extend((child, False) for child in reversed(node.children))
        else:
            kids = [placed.pop(id(child)) for child in node.children]
            ids = tuple(sorted(i for k in kids for i in k[0]))
            x, y = float(np.mean(ids)), 1 + max(k[2] for k in kids)
            out.nodes.append((node.label, ids, x, y))
            out.edges.extend(((x, y), (kx, ky)) for _, kx, ky in kids)
            placed[id(node)] = (ids, x, y)
    return out


def _label_px(label: str) -> float:
    return _CHAR_PX * len(_shown_label(label).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))


def _spread(n: int, lays: Sequence[_Layout]) -> np.ndarray:
    """Pixel x of each of ``n`` leaves such that no two node labels of one height in any of ``lays`` overlap.

    A node's label is drawn right of it (``middle right``), so two nodes ``A`` left of ``B`` at one height need
    ``x_B - x_A >= width(label_A) + _LABEL_GAP``. Nodes of one height cover disjoint leaf ranges, so widening
    the gap just before ``B``'s first leaf moves ``B`` (and everything right of it) without moving ``A``, and
    never brings two other nodes closer: one pass from the lowest height up, repeated until nothing moves,
    ends with every pair apart. Returns shape ``(n,)``, increasing, first leaf at 0.
    """
    gaps = np.full(max(n - 1, 0), float(_PX_PER_LEAF))
    rows: dict[tuple[int, int], list[tuple[tuple[int, ...], str]]] = {}
    for t, lay in enumerate(lays):
        for label, ids, _, y in lay.nodes:
            rows.setdefault((y, t), []).append((ids, label))
    for _ in range(100):
        moved = False
        for key in sorted(rows):
            pos = np.concatenate([[0.0], np.cumsum(gaps)])
            row = sorted(rows[key], key=lambda r: r[0][0])
            for (a_ids, a_lab), (b_ids, _) in zip(row, row[1:]):
                xa, xb = pos[list(a_ids)].mean(), pos[list(b_ids)].mean()
                need = _label_px(a_lab) + _LABEL_GAP - (xb - xa)
                if need > 1e-9:
                    gaps[b_ids[0] - 1] += need
                    pos[b_ids[0]:] += need
                    moved = True
        if not moved:
            break
    return np.concatenate([[0.0], np.cumsum(gaps)])


def _place(lay: _Layout, pos: np.ndarray) -> _Layout:
    """``lay`` with leaf indices mapped to the pixel positions ``pos`` (a node at the mean of its leaves)."""
    out = _Layout(leaves=list(lay.leaves))
    xs = {}
    for label, ids, x, y in lay.nodes:
        px = float(pos[list(ids)].mean())
        xs[(x, y)] = px
        out.nodes.append((label, ids, px, y))
    for (x0, y0), (x1, y1) in lay.edges:
        x1p = float(pos[int(x1)]) if y1 == 0 else xs[(x1, y1)]
        out.edges.append(((xs[(x0, y0)], y0), (x1p, y1)))
    return out


# ---------------------------------------------------------------------------
# tree comparison
# ---------------------------------------------------------------------------

def _esc(text: str) -> str:
    """Plotly renders a subset of HTML: escape code tokens such as ``<``."""
    return html.escape(text.replace("\n", "⏎").replace("\t", "⇥"), quote=False)


def _shown_label(label: str) -> str:
    return "∅" if label == EMPTY else _esc(label)


def _rebuild(name: str, leaves: Sequence[str], dcu: Sequence[Any]) -> Node:
    if len(dcu) != 3:
        raise ValueError(f"{name} must be a (d, c, u) tuple; got {len(dcu)} items.")
    d, c, u = dcu
    try:
        return tuple_to_tree(list(d), list(c), list(u), list(leaves))
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from err


def _status(label: str, ids: tuple[int, ...], other: set, miss_word: str) -> str:
    if label == EMPTY:
        return "empty"
    return "matched" if (label, frozenset(ids)) in other else miss_word


_STATUS_COLOR = {"matched": MATCH_COLOR, "missed": MISMATCH_COLOR,
                 "spurious": MISMATCH_COLOR, "empty": EMPTY_COLOR}


def _tree_traces(which: str, lay: _Layout, leaves: Sequence[str],
                 other: set, miss_word: str, pos: np.ndarray) -> list[Any]:
    """Edges, leaves and nodes of one tree as three Scatter traces."""
    import plotly.graph_objects as go

    ex: list[float | None] = []
    ey: list[float | None] = []
    for (x0, y0), (x1, y1) in lay.edges:
        ex += [x0, x1, None]
        ey += [y0, y1, None]
    edges = go.Scatter(x=ex, y=ey, mode="lines", name=f"{which} edges", hoverinfo="skip",
                       line={"color": _EDGE_COLOR, "width": 1}, showlegend=False)

    leaf_pts = go.Scatter(
        x=[float(pos[i]) for i, _ in lay.leaves], y=[0] * len(lay.leaves), mode="markers",
        name=f"{which} leaves", showlegend=False,
        marker={"size": 5, "color": _LEAF_COLOR},
        text=[f"leaf {i}: {_esc(t)}" for i, t in lay.leaves], hoverinfo="text",
    )

    status = [_status(lab, ids, other, miss_word) for lab, ids, _, _ in lay.nodes]
    hover = []
    for (lab, ids, _, _), st in zip(lay.nodes, status):
        covered = " ".join(leaves[i] for i in ids)
        covered = covered if len(covered) <= 60 else covered[:57] + "..."
        hover.append(f"<b>{_shown_label(lab)}</b><br>leaves {ids[0]}–{ids[-1]} "
                     f"({len(ids)})<br>{_esc(covered)}<br>{st}")
    nodes = go.Scatter(
        x=[x for *_, x, _ in lay.nodes], y=[y for *_, y in lay.nodes],
        mode="markers+text", name=f"{which} nodes", showlegend=False,
        marker={"size": 9, "color": [_STATUS_COLOR[s] for s in status],
                "line": {"width": 0.5, "color": "white"}},
        text=[_shown_label(lab) for lab, *_ in lay.nodes],
        textposition="middle right", textfont={"size": _NODE_FONT},
        customdata=[[lab, list(ids), st] for (lab, ids, _, _), st in zip(lay.nodes, status)],
        hovertext=hover, hoverinfo="text",
    )
    return [edges, leaf_pts, nodes]


def tree_comparison_figure(
    leaves: Sequence[str],
    gold: Sequence[Any],
    pred: Sequence[Any],
    *,
    title: str | None = None,
) -> Any:
    """Gold and predicted trees of one snippet, mismatches in red.

    Both trees are rebuilt with :func:`~probekit.probes.ast_tree.tuple_to_tree`
    and drawn in two rows sharing the x axis, in pixels: leaf ``i`` at
    increasing ``x_i`` (its text as a vertical tick label; neighbours at least
    18 px apart, further wherever two node labels of one height would
    otherwise overlap), an internal node at the mean x of its leaves and
    ``y`` = its height in the rebuilt tree (leaves 0, a node 1 + its tallest
    child; for the prediction this is *not* ``d̂``). Node colours: a gold
    constituent missing from the prediction is :data:`MISMATCH_COLOR` on the
    gold tree ("missed"), a predicted constituent absent from gold is
    :data:`MISMATCH_COLOR` on the predicted tree ("spurious"), a shared one
    :data:`MATCH_COLOR`, an :data:`EMPTY` root :data:`EMPTY_COLOR`.

    Parameters
    ----------
    leaves : sequence of str
        Shape ``(n,)``: token texts.
    gold, pred : (d, c, u)
        ``d`` shape ``(n - 1,)`` (numbers; only their order matters), ``c``
        shape ``(n - 1,)`` labels, ``u`` shape ``(n,)`` unary labels.
    title : str, optional
        Figure title.

    Returns
    -------
    plotly.graph_objects.Figure
        Six Scatter traces, ``"<tree> edges"``, ``"<tree> leaves"`` and
        ``"<tree> nodes"`` for tree ``gold`` (row 1) then ``pred`` (row 2).
        An edges trace holds one ``[x0, x1, None]`` triple per parent-child
        link. A nodes trace holds one point per internal node with
        ``customdata[j] = [label, sorted leaf indices, status]``. Subplot
        titles give the constituent precision, recall and F1 of pred vs gold.

    Raises
    ------
    ValueError
        If a tuple's lengths do not fit ``n`` leaves (message names the tree).
    """
    from plotly.subplots import make_subplots

    leaves = [str(t) for t in leaves]
    gold_tree, pred_tree = _rebuild("gold", leaves, gold), _rebuild("pred", leaves, pred)
    g_set, p_set = constituents(gold_tree), constituents(pred_tree)
    precision, recall, f1 = tree_f1(pred_tree, gold_tree)
    scores = f"P = {precision:.3f}, R = {recall:.3f}, F1 = {f1:.3f}"
    titles = (
        f"gold: {len(g_set)} constituents, {len(g_set - p_set)} missed (red) | {scores}",
        f"predicted: {len(p_set)} constituents, {len(p_set - g_set)} spurious (red) | {scores}",
    )

    n = len(leaves)
    lays = (_layout(gold_tree), _layout(pred_tree))
    pos = _spread(n, lays)
    lays = tuple(_place(lay, pos) for lay in lays)
    plot_px = [_PX_PER_LEVEL * (lay.height + 1) + 40 for lay in lays]
    total_px = sum(plot_px) + 2 * _TICK_PX + 150  # + title and subplot titles
    fig = make_subplots(
        rows=2, cols=1, shared_xaxes=True, subplot_titles=titles,
        row_heights=plot_px, vertical_spacing=(_TICK_PX + 40) / total_px,
    )
    for row, (which, lay, other, word) in enumerate(
        (("gold", lays[0], p_set, "missed"), ("pred", lays[1], g_set, "spurious")), start=1
    ):
        for trace in _tree_traces(which, lay, leaves, other, word, pos):
            fig.add_trace(trace, row=row, col=1)
        fig.update_yaxes(range=[-0.5, lay.height + 0.8], title_text="height",
                         dtick=1 if lay.height <= 12 else None, zeroline=False,
                         row=row, col=1)

    ticks = [t if len(t) <= _LEAF_CHARS else t[: _LEAF_CHARS - 1] + "…" for t in leaves]
    # one x pixel per axis unit: the plot is exactly as wide as the spread-out leaves and the last labels
    right = max([float(pos[-1]) if n else 0.0]
                + [x + _label_px(lab) + _LABEL_GAP for lay in lays for lab, _, x, _ in lay.nodes])
    x_range = [-_PX_PER_LEAF, right + _PX_PER_LEAF]
    # Both rows show the leaf texts (make_subplots hides the upper row's).
    fig.update_xaxes(
        tickmode="array", tickvals=[float(v) for v in pos], ticktext=[_esc(t) for t in ticks],
        tickangle=-90, tickfont={"size": 10}, showticklabels=True,
        range=x_range, showgrid=False, zeroline=False, title_text="leaf (code token)",
    )
    # subplot titles at the left edge: a long tree scrolls, and a centred title would start off screen
    fig.update_annotations(x=0, xanchor="left")
    fig.update_layout(
        title=title or f"AST-Probe tree, gold vs predicted ({n} leaves)",
        template=_TEMPLATE,
        width=max(700, int(math.ceil(x_range[1] - x_range[0])) + _MARGIN_L + _MARGIN_R),
        height=total_px,
        margin={"l": _MARGIN_L, "r": _MARGIN_R, "t": 90, "b": _TICK_PX},
        showlegend=False,
    )
    return fig


# ---------------------------------------------------------------------------
# F1 against k
# ---------------------------------------------------------------------------

def _check_curve(name: str, ys: Sequence[float], n: int) -> np.ndarray:
    arr = np.asarray(ys, dtype=float)
    if arr.shape != (n,):
        raise ValueError(f"{name} has shape {arr.shape}; need one value per k, shape ({n},).")
    return arr


def f1_vs_k_figure(
    ks: Sequence[int],
    f1_separate: Sequence[float],
    f1_matryoshka: Sequence[float] | None = None,
    *,
    d_model: int | None = None,
    controls: Mapping[str, float] | None = None,
    title: str | None = None,
) -> Any:
    """Constituent F1 against subspace size ``k`` on a log2 axis.

    Parameters
    ----------
    ks : sequence of int
        Shape ``(m,)``, distinct positive sizes (any order; drawn sorted).
    f1_separate : sequence of float
        Shape ``(m,)``: F1 of a probe fitted for each ``k`` on its own.
    f1_matryoshka : sequence of float, optional
        Shape ``(m,)``: F1 of the first ``k`` columns of one Matryoshka fit
        (dashed line).
    d_model : int, optional
        Hidden size ``D``; the tick at ``k == D`` reads ``"D=<k>"``.
    controls : dict of str -> float, optional
        Reference levels (layer 0, random-init model), drawn as horizontal lines.
    title : str, optional

    Returns
    -------
    plotly.graph_objects.Figure
        Per curve two traces: the line (``"separate fits"`` /
        ``"Matryoshka prefixes"``) and a one-point ``"best k (...)"`` marker at
        its (NaN-ignoring) argmax; an all-NaN curve gets an empty marker
        trace. Control levels are layout shapes, not traces.

    Raises
    ------
    ValueError
        If ``ks`` is empty, holds a non-positive or repeated ``k``, or a
        curve's length differs from ``len(ks)``.
    """
    import plotly.graph_objects as go

    k_arr = np.asarray(ks, dtype=float)
    if k_arr.ndim != 1 or k_arr.size == 0:
        raise ValueError(f"ks must be a non-empty 1-D sequence; got shape {k_arr.shape}.")
    if not np.all(np.isfinite(k_arr)) or np.any(k_arr <= 0):
        raise ValueError(f"every k must be positive (log2 axis); got {list(ks)!r}.")
    if len(np.unique(k_arr)) != k_arr.size:
        raise ValueError(f"ks must be distinct; got {list(ks)!r}.")
    curves = {"separate fits": _check_curve("f1_separate", f1_separate, k_arr.size)}
    if f1_matryoshka is not None:
        curves["Matryoshka prefixes"] = _check_curve("f1_matryoshka", f1_matryoshka, k_arr.size)

    order = np.argsort(k_arr)
    x = [_as_number(v) for v in k_arr[order]]
    fig = go.Figure()
    for name, ys in curves.items():
        y = ys[order]
        dash = "dash" if name.startswith("Matryoshka") else "solid"
        fig.add_trace(go.Scatter(x=x, y=y.tolist(), mode="lines+markers", name=name,
                                 line={"dash": dash}))
        best = [] if np.all(np.isnan(y)) else [int(np.nanargmax(y))]
        fig.add_trace(go.Scatter(
            x=[x[i] for i in best], y=[float(y[i]) for i in best], mode="markers",
            name=f"best k ({name})", marker={"symbol": "star", "size": 15},
            hovertemplate="best k = %{x}<br>F1 = %{y:.3f}<extra></extra>",
        ))
    for name, level in (controls or {}).items():
        fig.add_hline(y=float(level), line={"dash": "dot", "color": "grey"},
                      annotation_text=_esc(str(name)), annotation_position="top left")

    def tick(k: float) -> str:
        return f"D={_as_number(k)}" if d_model is not None and k == d_model else str(_as_number(k))

    fig.update_xaxes(type="log", tickmode="array", tickvals=x, ticktext=[tick(k) for k in x],
                     title_text="subspace size k (log2 scale)")
    fig.update_yaxes(title_text="constituent F1", range=[0, 1.02])
    fig.update_layout(title=title or "AST-Probe F1 against subspace size k",
                      template=_TEMPLATE)
    return fit_figure(fig)


def _as_number(v: float) -> int | float:
    """Integral sizes as int (clean tick text and JSON)."""
    return int(v) if float(v).is_integer() else float(v)


# ---------------------------------------------------------------------------
# per-label recall
# ---------------------------------------------------------------------------

def _sort_labels(recall: Mapping[str, float], support: Mapping[str, int] | None) -> list[str]:
    """Largest support first (then recall), or highest recall first; NaN recall last."""

    def rec(label: str) -> float:
        r = float(recall[label])
        return -math.inf if math.isnan(r) else r

    if support is None:
        return sorted(recall, key=lambda lab: (-rec(lab), lab))
    return sorted(recall, key=lambda lab: (-support[lab], -rec(lab), lab))


def per_label_recall_figure(
    recall: Mapping[str, float],
    support: Mapping[str, int] | None = None,
    *,
    top: int = 30,
    title: str | None = None,
) -> Any:
    """Horizontal bars of recall per non-terminal label.

    Parameters
    ----------
    recall : dict of str -> float
        Recall in ``[0, 1]`` of each label's gold constituents.
    support : dict of str -> int, optional
        Number of gold constituents per label; must cover every label of
        ``recall``. Shown in the hover text.
    top : int, default=30
        Keep only the first ``top`` labels of the sorted order.
    title : str, optional

    Returns
    -------
    plotly.graph_objects.Figure
        One Bar trace; its ``y`` lists the labels in sorted order (drawn top
        to bottom): by support descending, ties by recall descending, then by
        label, when ``support`` is given; else by recall descending, then
        label. NaN recall sorts after every number.

    Raises
    ------
    ValueError
        If ``recall`` is empty, ``top < 1`` or ``support`` lacks a label.
    """
    import plotly.graph_objects as go

    if not recall:
        raise ValueError("recall is empty; nothing to plot.")
    if top < 1:
        raise ValueError(f"top must be >= 1; got {top}.")
    if support is not None:
        missing = sorted(set(recall) - set(support))
        if missing:
            raise ValueError(f"support lacks labels present in recall: {missing}.")

    labels = _sort_labels(recall, support)[:top]
    values = [float(recall[lab]) for lab in labels]
    counts = [int(support[lab]) for lab in labels] if support is not None else None
    hover = [
        f"{_esc(lab)}<br>recall = {v:.3f}" + (f"<br>support = {counts[i]}" if counts else "")
        for i, (lab, v) in enumerate(zip(labels, values))
    ]
    fig = go.Figure(go.Bar(
        x=values, y=labels, orientation="h", name="recall",
        text=[f"{v:.2f}" for v in values], textposition="auto",
        customdata=counts, hovertext=hover, hoverinfo="text",
    ))
    order = "support" if support is not None else "recall"
    fig.update_yaxes(autorange="reversed", type="category",
                     ticktext=[_esc(lab) for lab in labels], tickvals=labels, title_text="non-terminal")
    fig.update_xaxes(range=[0, 1.02], title_text="recall")
    fig.update_layout(
        title=title or f"Recall per label (top {len(labels)} by {order})",
        template=_TEMPLATE,
        margin={"l": 220},
    )
    return fit_figure(fig)
