"""Syntax trees of Python and JavaScript code as AST-Probe tuples ``(d, c, u)`` and back.

AST-Probe (Hernández López et al., ASE 2022) reads a snippet's whole syntax
tree back from hidden states. The tree is encoded, one value per leaf or per
pair of neighbouring leaves, as the tuple of Shen et al. (2018):

1. :func:`parse_code` -- tree-sitter parse, comments / line continuations and
   docstrings removed, every other node kept (named and anonymous: keywords
   and punctuation are leaves), a ``string`` node is one leaf. With
   ``language="javascript"``: comments removed (no docstring rule), and
   ``string``, ``template_string`` and ``regex`` nodes are each one leaf.
2. :func:`binarize` -- merge unary chains of non-terminals (labels joined
   ``a|b``), move the chain above a single leaf into that leaf's *unary label*,
   right-nest nodes with more than two children under :data:`EMPTY` nodes.
3. :func:`tree_to_tuple` -- ``d_i`` = height of the lowest common ancestor of
   leaves ``i`` and ``i+1`` (leaves have height 0), ``c_i`` its label,
   ``u_j`` the unary label of leaf ``j`` or :data:`EMPTY`.
4. :func:`tuple_to_tree` -- the inverse: split at the largest ``d``, drop
   :data:`EMPTY` nodes, expand joined labels into chains. For a gold tuple it
   returns exactly the tree :func:`parse_code` gave.
5. :func:`constituents` / :func:`tree_f1` -- the labelled-bracket metric.

Trees are immutable :class:`Node` objects; all traversals are iterative, so
deep right-nested trees do not hit Python's recursion limit (``==`` on two
:class:`Node` objects is the dataclass comparison and *is* recursive).

Public API
----------
EMPTY
SyntaxTreeError
Node
parse_code
binarize
tree_to_tuple
tuple_to_tree
leaves
constituents
tree_f1
code_to_tuple
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from probekit.data.treesitter import ATOMIC_TYPES, byte_to_char, check_language, parser

__all__ = [
    "EMPTY",
    "SyntaxTreeError",
    "Node",
    "parse_code",
    "binarize",
    "tree_to_tuple",
    "tuple_to_tree",
    "leaves",
    "constituents",
    "tree_f1",
    "code_to_tuple",
]

#: The empty label ∅: label of the binarisation's helper nodes and the unary
#: label of a leaf with no chain above it. Angle brackets keep it apart from
#: every tree-sitter node type.
EMPTY = "<empty>"
#: Separator of merged unary-chain labels, outermost first (``"block|return_statement"``).
#: Only non-terminal types are ever joined, and no tree-sitter non-terminal
#: type contains ``|`` (the ``|`` operator is an anonymous *leaf*).
JOIN = "|"

# Body containers whose first statement may be a docstring.
_DOC_OWNERS = frozenset({"function_definition", "class_definition"})
_STRING_TYPES = frozenset({"string", "concatenated_string"})

T = TypeVar("T")
R = TypeVar("R")


class SyntaxTreeError(ValueError):
    """The source does not parse cleanly (tree-sitter ERROR or MISSING nodes)."""


@dataclass(frozen=True)
class Node:
    """One node of an immutable syntax tree.

    Attributes
    ----------
    label : str
        Internal node: the tree-sitter type (``"call"``), a joined chain
        (``"module|expression_statement"``, binarised trees only) or
        :data:`EMPTY`. Leaf: the tree-sitter type of the token
        (``"identifier"``, ``"def"``, ``"("``, ``"string"``). Leaf labels are
        not part of the tuple.
    children : tuple of Node
        Empty for a leaf; exactly two in a binarised tree's internal nodes.
    text : str or None
        Leaf: the token's source text. Internal nodes: ``None``.
    span : (int, int) or None
        Character offsets ``(start, end)`` in the source (``source[start:end]
        == text`` for a leaf). An internal node spans its first leaf's start
        to its last leaf's end (not tree-sitter's extent, which may include
        removed comments). ``None`` when the leaves have no offsets.
    unary : str
        Binarised trees only: the (joined) label of the chain of
        non-terminals that stood above this leaf alone, or :data:`EMPTY`.
    """

    label: str
    children: tuple[Node, ...] = ()
    text: str | None = None
    span: tuple[int, int] | None = None
    unary: str = EMPTY

    @property
    def is_leaf(self) -> bool:
        return not self.children


def _fold(
    root: T,
    kids: Callable[[T], Iterable[T]],
    make: Callable[[T, list[R]], R | None],
) -> R | None:
    """Iterative post-order: ``make(node, results of its kept children)``.

    A ``None`` result drops that node from its parent's list.
    """
    done: list[R] = []
    stack: list[tuple[T, Any, list[R]]] = [(root, iter(kids(root)), [])]
    while stack:
        node, it, built = stack[-1]
        child = next(it, stack)  # the stack itself is a sentinel never yielded
        if child is stack:
            stack.pop()
            res = make(node, built)
            if res is not None:
                (stack[-1][2] if stack else done).append(res)
        else:
            stack.append((child, iter(kids(child)), []))
    return done[0] if done else None


def _internal(label: str, children: Sequence[Node]) -> Node:
    """Internal node whose span covers its children's."""
    first, last = children[0].span, children[-1].span
    span = (first[0], last[1]) if first is not None and last is not None else None
    return Node(label, tuple(children), None, span)


def _is_docstring(ts_node: Any) -> bool:
    # Python's rule: a plain (not f / bytes) string literal, possibly
    # implicitly concatenated and possibly in parentheses (``("doc")`` is the
    # docstring for CPython too), as the whole first statement of a body.
    if ts_node.type != "expression_statement" or ts_node.named_child_count != 1:
        return False
    expr = ts_node.named_children[0]
    while expr.type == "parenthesized_expression":
        inner = [c for c in expr.named_children if not c.is_extra]
        if len(inner) != 1:
            return False
        expr = inner[0]
    if expr.type not in _STRING_TYPES or ts_node.child_count != 1:
        return False
    parts = [expr] if expr.type == "string" else [p for p in expr.children if p.type == "string"]
    for part in parts:
        start = part.children[0] if part.child_count else None
        if start is None or start.type != "string_start":
            return False
        prefix = start.text.decode("utf-8", errors="replace").lower()
        if "f" in prefix or "b" in prefix:
            return False
    return True


def _kept_children(ts_node: Any, language: str) -> list[Any]:
    """Children minus extras (comments, ``\\`` line continuations) and a Python docstring."""
    kids = [c for c in ts_node.children if not c.is_extra]
    if language != "python":
        return kids
    is_body = ts_node.type == "module" or (
        ts_node.type == "block"
        and ts_node.parent is not None
        and ts_node.parent.type in _DOC_OWNERS
    )
    if is_body and kids and _is_docstring(kids[0]):
        kids = kids[1:]
    return kids


def parse_code(source: str, *, language: str = "python") -> Node:
    """Parse source code into the tree the tuple encodes.

    Parameters
    ----------
    source : str
        Source text (a snippet that parses as a module / program on its own).
    language : str
        ``"python"`` (default) or ``"javascript"``.

    Returns
    -------
    Node
        The root (``"module"``). Leaves, in source order, are the tree-sitter
        nodes without children, except that a ``string`` node (including an
        f-string with its interpolations, and a byte string) is one leaf; in a
        ``concatenated_string`` each part is its own ``string`` leaf under a
        ``concatenated_string`` node. Removed: comments and
        ``line_continuation`` (tree-sitter "extras", not syntax), docstrings
        (a plain string literal forming the whole first statement of the
        module or of a function/class body), zero-width leaves, and
        non-terminals left without children (a body that held only a
        docstring).

        JavaScript (root ``"program"``): comments (tree-sitter extras) are
        removed; there is no docstring rule; ``string``, ``template_string``
        (with its ``${...}`` substitutions) and ``regex`` nodes are each one
        leaf; every other node is kept as for Python.

    Raises
    ------
    SyntaxTreeError
        If tree-sitter reports an ERROR or MISSING node anywhere, or the
        snippet has no tokens left.
    ValueError
        If ``language`` is not one of ``probekit.data.code.LANGUAGES``.
    """
    atomic = ATOMIC_TYPES[check_language(language)]
    data = source.encode("utf-8", errors="surrogatepass")
    root = parser(language).parse(data).root_node
    if root.has_error:
        raise SyntaxTreeError(
            f"tree-sitter found ERROR/MISSING nodes; the snippet is not valid {language} "
            "for this grammar (reject it and count the rejection)."
        )
    # tree-sitter reports byte offsets; sources may contain non-ASCII.
    b2c = byte_to_char(source, data)

    def kids(n: Any) -> list[Any]:
        return [] if n.type in atomic else _kept_children(n, language)

    def make(n: Any, built: list[Node]) -> Node | None:
        if n.child_count == 0 or n.type in atomic:
            sb, eb = n.start_byte, n.end_byte
            if eb <= sb:
                return None
            sc, ec = (sb, eb) if b2c is None else (b2c[sb], b2c[eb])
            return Node(n.type, (), source[sc:ec], (sc, ec))
        return _internal(n.type, built) if built else None

    tree = _fold(root, kids, make)
    if tree is None:
        raise SyntaxTreeError(
            "the snippet has no tokens left after removing comments and docstrings."
        )
    return tree


def leaves(tree: Node) -> list[Node]:
    """Leaves of ``tree`` in left-to-right order."""
    out: list[Node] = []
    stack = [tree]
    while stack:
        n = stack.pop()
        if n.is_leaf:
            out.append(n)
        else:
            stack.extend(reversed(n.children))
    return out


def binarize(tree: Node) -> Node:
    """Binarise a tree as Shen et al. (2018) / AST-Probe.

    Bottom-up: a non-terminal with one child that is a non-terminal is merged
    with it (label ``parent|child``); a non-terminal with one child that is a
    leaf is removed and its label (joined in front of any unary label the leaf
    already got from below) becomes the leaf's ``unary``; a node with ``k > 2``
    children ``x1..xk`` becomes ``label(x1, ∅(x2, ∅(... ∅(x_{k-1}, xk))))``
    with ∅ = :data:`EMPTY`.

    Parameters
    ----------
    tree : Node
        E.g. from :func:`parse_code`; leaves must have ``unary == EMPTY``.

    Returns
    -------
    Node
        Every internal node has exactly two children. If the whole tree is a
        chain above one leaf, that leaf (carrying the chain as ``unary``).
    """

    def make(n: Node, built: list[Node]) -> Node:
        if n.is_leaf:
            return n
        if len(built) == 1:
            (child,) = built
            if child.is_leaf:
                unary = n.label if child.unary == EMPTY else n.label + JOIN + child.unary
                return Node(child.label, (), child.text, child.span, unary)
            return Node(n.label + JOIN + child.label, child.children, None, child.span)
        right = built[-1]
        for left in reversed(built[1:-1]):
            right = _internal(EMPTY, (left, right))
        return _internal(n.label, (built[0], right))

    out = _fold(tree, lambda n: n.children, make)
    assert out is not None  # make never drops a node
    return out


def tree_to_tuple(bintree: Node) -> tuple[list[int], list[str], list[str]]:
    """The ``(d, c, u)`` tuple of a binarised tree.

    Parameters
    ----------
    bintree : Node
        From :func:`binarize`.

    Returns
    -------
    d : list of int
        Shape ``(n - 1,)``: height of the lowest common ancestor of leaves
        ``i`` and ``i + 1`` (leaves 0, a node 1 + its taller child).
    c : list of str
        Shape ``(n - 1,)``: label of that ancestor (may be :data:`EMPTY` or joined).
    u : list of str
        Shape ``(n,)``: unary label of each leaf, or :data:`EMPTY`.

    Raises
    ------
    ValueError
        If an internal node does not have exactly two children.
    """
    d: list[int] = []
    c: list[str] = []
    u: list[str] = []

    # Post-order meets leaves left to right, so each result is
    # (height, index of the subtree's last leaf).
    def make(n: Node, built: list[tuple[int, int]]) -> tuple[int, int]:
        if n.is_leaf:
            u.append(n.unary)
            d.append(-1)
            c.append(EMPTY)
            return 0, len(u) - 1
        if len(built) != 2:
            raise ValueError(
                f"node {n.label!r} has {len(built)} children; tree_to_tuple needs a "
                "binarised tree (call binarize() first)."
            )
        (hl, last_left), (hr, last_right) = built
        h = 1 + max(hl, hr)
        d[last_left], c[last_left] = h, n.label
        return h, last_right

    _fold(bintree, lambda n: n.children, make)
    # The slot after the last leaf is not a boundary.
    return d[:-1], c[:-1], u


def _chain(label: str, children: Sequence[Node]) -> list[Node]:
    """Children as they hang under the parent of a node labelled ``label``.

    ∅ disappears (children move up); a joined label becomes a chain.
    """
    if label == EMPTY:
        return list(children)
    node = None
    for part in reversed(label.split(JOIN)):
        node = _internal(part, children if node is None else (node,))
    return [node]


def tuple_to_tree(
    d: Sequence[float],
    c: Sequence[str],
    u: Sequence[str],
    leaves: Sequence[str | Node],
) -> Node:
    """Rebuild a (de-binarised) tree from a tuple, true or predicted.

    The span of leaves is split recursively at its largest ``d``; the split
    node takes label ``c`` of that boundary. Ties go to the *leftmost*
    maximum, so a run of equal distances becomes right-nested, the same
    shape :func:`binarize` gives an n-ary node (a gold tuple never has a tie
    within a span: a node is strictly taller than its descendants). Then the
    chain ``u_j`` is put above leaf ``j``, :data:`EMPTY` nodes are dropped
    (their children move up) and joined labels become chains.

    Parameters
    ----------
    d : sequence of float
        Shape ``(n - 1,)``; only the order matters (predicted distances work).
    c : sequence of str
        Shape ``(n - 1,)``.
    u : sequence of str
        Shape ``(n,)``.
    leaves : sequence of str or Node
        Shape ``(n,)``: token texts (become leaves labelled by their text,
        without span) or leaf nodes (kept as they are, ``unary`` cleared).

    Returns
    -------
    Node
        For a gold tuple with the leaves of :func:`parse_code`, a tree equal
        to the parsed one. If the top split's label is :data:`EMPTY`, the root
        keeps label :data:`EMPTY` (the only place it survives; it is not a
        constituent). With one leaf and ``u == [EMPTY]``, that leaf.
    """
    n = len(leaves)
    if n == 0:
        raise ValueError("need at least one leaf.")
    if len(d) != n - 1 or len(c) != n - 1 or len(u) != n:
        raise ValueError(
            f"for {n} leaves need len(d) == len(c) == {n - 1} and len(u) == {n}; "
            f"got {len(d)}, {len(c)}, {len(u)}."
        )
    base: list[Node] = []
    for j, leaf in enumerate(leaves):
        if isinstance(leaf, Node):
            if not leaf.is_leaf:
                raise ValueError(f"leaves[{j}] is an internal node ({leaf.label!r}).")
            leaf = Node(leaf.label, (), leaf.text, leaf.span)
        else:
            leaf = Node(str(leaf), (), str(leaf))
        (top,) = _chain(u[j], (leaf,)) if u[j] != EMPTY else (leaf,)
        base.append(top)
    if n == 1:
        return base[0]

    # Cartesian tree over d: the leftmost maximum is the root. With a strict
    # `<` an equal value arriving later becomes a right descendant (leftmost
    # maximum wins ties), exactly the recursive split rule, in O(n).
    left: list[int | None] = [None] * (n - 1)
    right: list[int | None] = [None] * (n - 1)
    stack: list[int] = []
    for i in range(n - 1):
        last = None
        while stack and d[stack[-1]] < d[i]:
            last = stack.pop()
        left[i] = last
        if stack:
            right[stack[-1]] = i
        stack.append(i)
    root = stack[0]

    def kids(i: int) -> list[int]:
        return [k for k in (left[i], right[i]) if k is not None]

    def make(i: int, built: list[list[Node]]) -> list[Node]:
        it = iter(built)
        lhs = next(it) if left[i] is not None else [base[i]]
        rhs = next(it) if right[i] is not None else [base[i + 1]]
        return _chain(c[i], lhs + rhs)

    top = _fold(root, kids, make)
    assert top is not None
    return top[0] if len(top) == 1 else _internal(EMPTY, top)


def constituents(tree: Node) -> set[tuple[str, frozenset[int]]]:
    """Labelled constituents of a de-binarised tree.

    Parameters
    ----------
    tree : Node
        A tree from :func:`parse_code` or :func:`tuple_to_tree` (not a
        binarised one: there a chain is one joined label and ∅ nodes exist).

    Returns
    -------
    set of (label, frozenset of int)
        One entry per internal node whose label is not :data:`EMPTY`: its
        label and the indices (0-based, left to right) of the leaves below
        it. This includes the root and the unary-chain nodes above single
        leaves (so ``u`` counts as well as ``d`` and ``c``). Chains of one
        label repeated over the same leaves count once.
    """
    out: set[tuple[str, frozenset[int]]] = set()
    counter = [0]

    def make(n: Node, built: list[frozenset[int]]) -> frozenset[int]:
        if n.is_leaf:
            counter[0] += 1
            return frozenset((counter[0] - 1,))
        span = frozenset().union(*built)
        if n.label != EMPTY:
            out.add((n.label, span))
        return span

    _fold(tree, lambda n: n.children, make)
    return out


def tree_f1(pred: Node, gold: Node) -> tuple[float, float, float]:
    """Precision, recall and F1 of ``pred``'s constituents against ``gold``'s.

    Parameters
    ----------
    pred, gold : Node
        De-binarised trees over the same leaves (see :func:`constituents`).

    Returns
    -------
    precision, recall, f1 : float
        ``|P ∩ G| / |P|``, ``|P ∩ G| / |G|`` and their harmonic mean. An empty
        set scores 1 against an empty set and 0 against a non-empty one.
    """
    p_set, g_set = constituents(pred), constituents(gold)
    n_pred, n_gold = len(leaves(pred)), len(leaves(gold))
    if n_pred != n_gold:
        raise ValueError(
            f"pred has {n_pred} leaves but gold has {n_gold}; compare trees of one snippet."
        )
    hit = len(p_set & g_set)
    precision = hit / len(p_set) if p_set else float(not g_set)
    recall = hit / len(g_set) if g_set else float(not p_set)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f1


def code_to_tuple(
    source: str, *, language: str = "python"
) -> tuple[list[str], list[int], list[str], list[str]]:
    """Leaf texts and the gold ``(d, c, u)`` of a snippet.

    Parameters
    ----------
    source : str
        Source text.
    language : str
        ``"python"`` (default) or ``"javascript"`` (see :func:`parse_code`).

    Returns
    -------
    leaves : list of str
        Shape ``(n,)``, token texts in source order.
    d, c, u
        As in :func:`tree_to_tuple`.

    Raises
    ------
    SyntaxTreeError, ValueError
        As :func:`parse_code`.
    """
    tree = parse_code(source, language=language)
    d, c, u = tree_to_tuple(binarize(tree))
    return [leaf.text or "" for leaf in leaves(tree)], d, c, u
