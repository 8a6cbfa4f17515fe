"""Python source-code data: stdlib functions and per-token syntax labels.

The probing target is "which syntactic construct does this token belong to".
We take functions from the interpreter's own CPython standard library (always
present, no download), parse them with tree-sitter, and label every tokenizer
token with the grammar type of the node directly above the leaf it falls in
(e.g. ``identifier`` under ``parameters`` -> ``"parameters"``).

The tree-sitter helpers (:func:`leaf_spans`, :mod:`probekit.data.treesitter`) also take
``language="javascript"`` (:data:`LANGUAGES`); JavaScript snippets come from
:mod:`probekit.data.javascript`.

Public API
----------
LANGUAGES
ATOMIC_TYPES
check_language
CodeSnippet
stdlib_root
iter_stdlib_functions
split_by_file
leaf_spans
token_syntax_labels
label_vocabulary
encode_labels
"""

from __future__ import annotations

import ast
import bisect
import os
import random
import sysconfig
import textwrap
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .treesitter import ATOMIC_TYPES, LANGUAGES, byte_to_char, check_language, parser

__all__ = [
    "LANGUAGES",
    "ATOMIC_TYPES",
    "check_language",
    "CodeSnippet",
    "stdlib_root",
    "iter_stdlib_functions",
    "split_by_file",
    "leaf_spans",
    "token_syntax_labels",
    "label_vocabulary",
    "encode_labels",
]

# Directories that are never the interpreter's own library code.
_ALWAYS_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
# Test suites and tools with unusual code (lib2to3 ships Python 2 fixtures,
# test/ ships deliberately broken files); excluded by default.
_TEST_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3"})

# Statement containers that can hold a top-level function or a method. We do
# not descend into expressions or function bodies: that keeps the walk cheap
# and excludes nested functions (their text is already inside the parent).
_CONTAINER_TYPES = frozenset(
    {
        "module",
        "block",
        "class_definition",
        "decorated_definition",
        "if_statement",
        "elif_clause",
        "else_clause",
        "try_statement",
        "except_clause",
        "except_group_clause",
        "finally_clause",
        "with_statement",
        "for_statement",
        "while_statement",
    }
)


@dataclass(frozen=True)
class CodeSnippet:
    """One function's source, extracted from a file of the standard library.

    Attributes
    ----------
    doc_id : str
        Stable identifier ``"<path>::<qualname>"``, e.g.
        ``"json/encoder.py::JSONEncoder.encode"``. A qualname that occurs more
        than once in a file (``if``/``else`` variants, property setters) gets
        ``"#k"`` appended for its k-th occurrence (k >= 2) in source order.
    path : str
        POSIX path of the file relative to the stdlib root.
    name : str
        The function's own name (``"encode"``).
    source : str
        The function's full lines (from the start of its ``def`` line, without
        decorators, to the end of its last line), dedented so it parses as a
        module on its own. No trailing newline.
    """

    doc_id: str
    path: str
    name: str
    source: str


def stdlib_root() -> Path:
    """Directory of the running interpreter's pure-Python standard library.

    Returns
    -------
    Path
        ``sysconfig.get_paths()["stdlib"]``, e.g. ``/usr/lib/python3.11``.
    """
    return Path(sysconfig.get_paths()["stdlib"])


def _list_py_files(root: Path, exclude_tests: bool) -> list[str]:
    """Sorted POSIX paths (relative to ``root``) of the ``.py`` files to use."""
    skip = _ALWAYS_SKIP_DIRS | (_TEST_DIRS if exclude_tests else frozenset())
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so os.walk never enters site-packages (can be huge).
        dirnames[:] = [d for d in dirnames if d not in skip]
        rel_dir = Path(dirpath).relative_to(root)
        for fn in filenames:
            if fn.endswith(".py"):
                out.append((rel_dir / fn).as_posix())
    out.sort()
    return out


def _read_source(path: Path) -> str | None:
    """File text with normalised newlines, or None if unreadable / not UTF-8."""
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def _node_text(node: Any) -> str:
    return node.text.decode("utf-8", errors="replace")


def _file_functions(
    rel_path: str, source: str, min_lines: int, max_lines: int
) -> list[CodeSnippet]:
    """All top-level functions and methods of one file within the line bounds.

    Returns them in source order. Functions that tree-sitter flags as
    erroneous, that cannot be dedented to column 0 (a multi-line string whose
    content is less indented than the ``def``), or that ``ast.parse`` rejects
    are skipped so every snippet is valid Python on its own.
    """
    data = source.encode("utf-8")
    tree = parser().parse(data)
    out: list[CodeSnippet] = []
    seen: Counter[str] = Counter()

    def visit(node: Any, scope: tuple[str, ...]) -> None:
        for child in node.children:
            ctype = child.type
            if ctype == "function_definition":
                handle_function(child, scope)
            elif ctype == "class_definition":
                name_node = child.child_by_field_name("name")
                cname = _node_text(name_node) if name_node is not None else "<class>"
                visit(child, scope + (cname,))
            elif ctype in _CONTAINER_TYPES:
                visit(child, scope)

    def handle_function(node: Any, scope: tuple[str, ...]) -> None:
        name_node = node.child_by_field_name("name")
        name = _node_text(name_node) if name_node is not None else "<lambda>"
        qual = ".".join(scope + (name,))
        # Count every occurrence (even filtered ones) so doc_ids do not change
        # with min_lines / max_lines.
        seen[qual] += 1
        k = seen[qual]
        n_lines = node.end_point[0] - node.start_point[0] + 1
        if not (min_lines <= n_lines <= max_lines) or node.has_error:
            return
        # Take full lines so the method's indentation is there to dedent.
        start = data.rfind(b"\n", 0, node.start_byte) + 1
        end = data.find(b"\n", node.end_byte)
        end = len(data) if end == -1 else end
        text = textwrap.dedent(data[start:end].decode("utf-8"))
        if not text or text[0].isspace():
            return
        try:
            ast.parse(text)
        except (SyntaxError, ValueError):
            return
        doc_id = f"{rel_path}::{qual}" + (f"#{k}" if k > 1 else "")
        out.append(CodeSnippet(doc_id=doc_id, path=rel_path, name=name, source=text))

    visit(tree.root_node, ())
    return out


def iter_stdlib_functions(
    *,
    max_functions: int | None = None,
    min_lines: int = 3,
    max_lines: int = 60,
    seed: int = 0,
    exclude_tests: bool = True,
    root: str | os.PathLike[str] | None = None,
    max_per_file: int = 3,
) -> list[CodeSnippet]:
    """Functions and methods from the CPython standard library, parsed with tree-sitter.

    Parameters
    ----------
    max_functions : int or None
        How many snippets to return. ``None`` parses every file and returns
        every qualifying function (no per-file cap). Otherwise files are
        visited in a seeded random order, each contributing at most
        ``max_per_file`` randomly chosen functions, and parsing stops as soon
        as enough are collected (so small samples are cheap). If the cap
        leaves too few, further rounds take more per file. A smaller sample
        with the same seed is a subset of a larger one.
    min_lines, max_lines : int
        Inclusive bounds on the function's length in lines (``def`` line to
        last line, decorators excluded).
    seed : int
        Seed of the sampling RNG; the result is deterministic for a given
        seed and standard library.
    exclude_tests : bool
        Skip ``test``/``tests``/``idlelib``/``lib2to3`` directories.
        ``site-packages`` is always skipped.
    root : path-like or None
        Library directory to scan; defaults to :func:`stdlib_root`.
    max_per_file : int
        Per-file cap of the first sampling round (diversity across files).

    Returns
    -------
    list of CodeSnippet
        Length ``max_functions`` (fewer, with a warning, if the library does
        not have that many), sorted by path then source position.

    Raises
    ------
    ValueError
        On invalid bounds, or when ``root`` holds no ``.py`` files.
    FileNotFoundError
        When ``root`` is not a directory.
    """
    if min_lines < 1 or max_lines < min_lines:
        raise ValueError(
            f"need 1 <= min_lines <= max_lines, got min_lines={min_lines}, "
            f"max_lines={max_lines}; widen the line bounds."
        )
    if max_functions is not None and max_functions < 0:
        raise ValueError(f"max_functions must be >= 0 or None, got {max_functions}.")
    if max_per_file < 1:
        raise ValueError(f"max_per_file must be >= 1, got {max_per_file}.")
    base = Path(root) if root is not None else stdlib_root()
    if not base.is_dir():
        raise FileNotFoundError(
            f"stdlib root {str(base)!r} is not a directory; pass root= pointing to a "
            "Python library directory (e.g. the output of stdlib_root())."
        )
    files = _list_py_files(base, exclude_tests)
    if not files:
        raise ValueError(
            f"no .py files found under {str(base)!r} (exclude_tests={exclude_tests}); "
            "pass root= pointing to a directory of Python sources."
        )

    def functions_of(rel: str) -> list[CodeSnippet]:
        text = _read_source(base / rel)
        return [] if text is None else _file_functions(rel, text, min_lines, max_lines)

    if max_functions is None:
        return [s for rel in files for s in functions_of(rel)]
    if max_functions == 0:
        return []

    rng = random.Random(seed)
    order = list(files)
    rng.shuffle(order)
    # (file rank, index in file) keeps the final sort in source order.
    chosen: list[tuple[str, int, CodeSnippet]] = []
    leftovers: list[list[tuple[str, int, CodeSnippet]]] = []
    for rel in order:
        cands = [(rel, i, s) for i, s in enumerate(functions_of(rel))]
        if not cands:
            continue
        rng.shuffle(cands)
        chosen.extend(cands[:max_per_file])
        leftovers.append(cands[max_per_file:])
        if len(chosen) >= max_functions:
            break
    # Only reached when the per-file cap is too tight for the request.
    while len(chosen) < max_functions and any(leftovers):
        for rest in leftovers:
            chosen.extend(rest[:max_per_file])
            del rest[:max_per_file]
    if len(chosen) < max_functions:
        warnings.warn(
            f"only {len(chosen)} functions satisfy min_lines={min_lines}, "
            f"max_lines={max_lines} under {str(base)!r}; returning all of them "
            f"instead of {max_functions}.",
            stacklevel=2,
        )
    chosen = chosen[:max_functions]
    chosen.sort(key=lambda t: (t[0], t[1]))
    return [s for _, _, s in chosen]


def split_by_file(
    snippets: Sequence[CodeSnippet],
    *,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> tuple[list[CodeSnippet], list[CodeSnippet], list[CodeSnippet]]:
    """Split snippets into train / val / test so that no file spans two splits.

    Files are shuffled with ``seed`` and assigned in turn to the split whose
    share of *snippets* the file's midpoint falls in, so split sizes track
    ``fractions`` up to the granularity of one file.

    Parameters
    ----------
    snippets : sequence of CodeSnippet
        Shape ``(n_snippets,)``.
    fractions : tuple of 3 floats
        Non-negative train / val / test shares summing to 1.
    seed : int
        Seed of the file shuffle.

    Returns
    -------
    train, val, test : list of CodeSnippet
        Each keeps the input order of its snippets.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(
            f"fractions must be 3 non-negative numbers summing to 1, got {fractions!r}."
        )
    counts = Counter(s.path for s in snippets)
    paths = sorted(counts)
    random.Random(seed).shuffle(paths)
    total = len(snippets)
    bounds = (fractions[0], fractions[0] + fractions[1])
    split_of: dict[str, int] = {}
    done = 0
    for p in paths:
        mid = (done + counts[p] / 2) / total
        split_of[p] = 0 if mid < bounds[0] else (1 if mid < bounds[1] else 2)
        done += counts[p]
    out: tuple[list[CodeSnippet], list[CodeSnippet], list[CodeSnippet]] = ([], [], [])
    for s in snippets:
        out[split_of[s.path]].append(s)
    return out


def leaf_spans(source: str, *, language: str = "python") -> list[tuple[int, int, str, str]]:
    """Leaves of the tree-sitter parse of ``source``, with character offsets.

    A leaf is a node without children, except that a ``string`` node (whose
    children are ``string_start``/``string_content``/``interpolation``/...)
    counts as one leaf, so ``f"a{b}\\n"`` is a single ``string`` leaf; in
    JavaScript ``string``, ``template_string`` and ``regex`` nodes are leaves
    (:data:`ATOMIC_TYPES`). Zero-width nodes (tree-sitter's MISSING nodes)
    are dropped.

    Parameters
    ----------
    source : str
        Source text.
    language : str
        One of :data:`LANGUAGES`.

    Returns
    -------
    list of (start_char, end_char, leaf_type, parent_type)
        In source order, shape ``(n_leaves,)``. ``source[start:end]`` is the
        leaf's text; ``leaf_type`` is the node type (``"identifier"``,
        ``"def"``, ``"+"``, ``"string"``, ``"comment"``, ...), ``parent_type``
        the type of its parent node (``"function_definition"``, ...).
    """
    atomic = ATOMIC_TYPES[check_language(language)]
    data = source.encode("utf-8", errors="surrogatepass")
    root = parser(language).parse(data).root_node
    # tree-sitter reports byte offsets; sources may contain non-ASCII.
    b2c = byte_to_char(source, data)
    out: list[tuple[int, int, str, str]] = []
    stack: list[tuple[Any, str]] = [(c, root.type) for c in reversed(root.children)]
    while stack:
        node, parent_type = stack.pop()
        if node.child_count == 0 or node.type in atomic:
            sb, eb = node.start_byte, node.end_byte
            if eb > sb:
                if b2c is not None:
                    sb, eb = b2c[sb], b2c[eb]
                out.append((sb, eb, node.type, parent_type))
        else:
            ntype = node.type
            stack.extend((c, ntype) for c in reversed(node.children))
    return out


def token_syntax_labels(
    source: str,
    offsets: Iterable[Sequence[int]],
    *,
    spans: Sequence[tuple[int, int, str, str]] | None = None,
) -> list[str | None]:
    """Label each token with the parent type of the leaf it starts in.

    Parameters
    ----------
    source : str
        The exact text that was tokenized.
    offsets : iterable of (start_char, end_char)
        The tokenizer's ``offset_mapping`` for ``source``, shape
        ``(n_tokens, 2)`` (list, tuple, NumPy or torch rows all work).
    spans : sequence of leaf spans, optional
        Precomputed :func:`leaf_spans` of ``source`` (saves a parse).

    Returns
    -------
    list of str or None
        Shape ``(n_tokens,)``. The ``parent_type`` of the leaf containing the
        token's first non-whitespace character. ``None`` (drop these tokens)
        for special tokens and other empty spans such as ``(0, 0)``, for
        tokens made only of whitespace/newlines (indentation carries no
        construct of its own), and for a character covered by no leaf.
        A token that spans several leaves (``"):"``) takes its first leaf.

    Raises
    ------
    ValueError
        If an offset lies outside ``source``.
    """
    if spans is None:
        spans = leaf_spans(source)
    starts = [s[0] for s in spans]
    n = len(source)
    labels: list[str | None] = []
    for i, pair in enumerate(offsets):
        s, e = int(pair[0]), int(pair[1])
        if s < 0 or e > n or s > e:
            raise ValueError(
                f"token {i} has offsets ({s}, {e}) outside the source of length {n}; "
                "offsets must come from tokenizing exactly this source "
                "(return_offsets_mapping=True)."
            )
        if s == e:
            labels.append(None)
            continue
        text = source[s:e]
        skip = len(text) - len(text.lstrip())
        if skip == len(text):
            labels.append(None)
            continue
        pos = s + skip
        j = bisect.bisect_right(starts, pos) - 1
        if j >= 0 and spans[j][0] <= pos < spans[j][1]:
            labels.append(spans[j][3])
        else:
            labels.append(None)
    return labels


def label_vocabulary(
    label_lists: Iterable[Iterable[str | None]],
    *,
    top_k: int = 20,
    other: str = "other",
) -> list[str]:
    """The ``top_k`` most frequent labels plus a catch-all class.

    Parameters
    ----------
    label_lists : iterable of iterables of str or None
        Per-snippet outputs of :func:`token_syntax_labels`; ``None`` is ignored.
    top_k : int
        Number of labels kept as their own class.
    other : str
        Name of the class for every rarer label.

    Returns
    -------
    list of str
        Length ``<= top_k + 1``: by descending frequency (ties by name), with
        ``other`` last.
    """
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}.")
    counts = Counter(
        lab for labels in label_lists for lab in labels if lab is not None and lab != other
    )
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
    return [lab for lab, _ in ranked] + [other]


def encode_labels(
    labels: Iterable[str | None],
    vocab: Sequence[str],
    *,
    other: str = "other",
    ignore_index: int = -1,
) -> np.ndarray:
    """Map labels to class ids of ``vocab``; labels outside it become ``other``.

    Parameters
    ----------
    labels : iterable of str or None
        Shape ``(n_tokens,)``, e.g. from :func:`token_syntax_labels`.
    vocab : sequence of str
        From :func:`label_vocabulary`; must contain ``other``.
    other : str
        Catch-all class name.
    ignore_index : int
        Id given to ``None`` labels (tokens to drop).

    Returns
    -------
    np.ndarray
        int64 ids, shape ``(n_tokens,)``.
    """
    index = {lab: i for i, lab in enumerate(vocab)}
    if other not in index:
        raise ValueError(
            f"vocab has no catch-all class {other!r}; build it with label_vocabulary() "
            "or pass other= naming one of its entries."
        )
    other_id = index[other]
    ids = [ignore_index if lab is None else index.get(lab, other_id) for lab in labels]
    return np.asarray(ids, dtype=np.int64)
