"""Token alignment for the AST-Probe: one model input per snippet, one vector per syntax-tree leaf.

A leaf (see :mod:`probekit.probes.ast_tree`) is one code token; the probe needs one vector per leaf, the
mean of the vectors of the leaf's subwords. A model's own tokenisation of the raw text often merges
neighbouring leaves into one subword (``()``, ``):``, ``self.``), which would give two leaves one vector.
Three schemes build the model input (``AlignedSnippet.scheme`` records which one was used):

``"leaf-whitespace"`` (default)
    Each leaf is tokenised (``add_special_tokens=False``) together with the whitespace that precedes it
    in the source, and the ids are concatenated, so no subword spans two leaves and the layout (newlines,
    indentation) is kept. The *gap* before leaf ``i`` is ``source[end_{i-1}:start_i]`` (``end_{-1} = 0``);
    :func:`clean_gap` keeps only its whitespace characters (removed comments, docstrings and line
    continuations leave their whitespace behind) and drops spaces/tabs at the end of each line of the gap
    (so a removed comment line becomes an empty line, not a line of trailing blanks). Text after the last
    leaf is dropped. :func:`stripped_source` is the concatenation of ``clean_gap(gap_i) + leaf_i``.
``"paper"``
    Each leaf tokenised on its own, prefixed by a single space (AST-Probe, Hernández López et al. 2022).
``"offsets"``
    The raw source (comments and docstrings included) tokenised once with ``return_offsets_mapping``; a
    token belongs to the leaf that contains its first non-whitespace character (-1 when it has none:
    whitespace, comments, docstrings). A token that covers characters of two leaves is counted
    (``n_spanning``) and given to the first; a snippet in which some leaf gets no token of its own is
    rejected (:class:`AlignmentError`, reason ``"leaf_without_token"``), since that leaf has no vector.

Special tokens are found by comparing ``tokenizer("x")`` with ``tokenizer("x", add_special_tokens=False)``:
whatever the tokenizer adds before (BOS, CLS) and after (SEP, EOS) is added around the concatenated ids and
marked -1. ``leaf_of_token`` gives, per input token, the leaf whose chunk the token belongs to (whitespace
tokens of a leaf's chunk included); ``pool_index`` is the same with -1 also for tokens that contain no
character of the leaf itself (pure whitespace), and is what :func:`leaf_vectors` should pool over.

Residual streams of pre-norm decoders carry a few dimensions with huge values; :class:`Standardizer`
standardises each dimension with statistics of the *training* leaf vectors only.

Public API
----------
AlignmentError
AlignedSnippet
SCHEMES
clean_gap
stripped_source
special_tokens
assign_by_offsets
align
build_corpus
leaf_vectors
split_capture_rows
capture_leaf_vectors
Standardizer
"""

from __future__ import annotations

import bisect
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from probekit.data.code import check_language
from probekit.probes.ast_tree import SyntaxTreeError, binarize, leaves, parse_code, tree_to_tuple

__all__ = [
    "AlignmentError",
    "AlignedSnippet",
    "SCHEMES",
    "clean_gap",
    "stripped_source",
    "special_tokens",
    "assign_by_offsets",
    "align",
    "build_corpus",
    "leaf_vectors",
    "split_capture_rows",
    "capture_leaf_vectors",
    "Standardizer",
]

SCHEMES = ("leaf-whitespace", "paper", "offsets")

_TRAILING_BLANKS = re.compile(r"[^\S\n]+\n")


class AlignmentError(ValueError):
    """A snippet cannot be aligned; ``reason`` is a short key used for rejection counts."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class AlignedSnippet:
    """One snippet ready for the probe.

    Attributes
    ----------
    doc_id : str
        Identifier (``CodeSnippet.doc_id``).
    source : str
        The original source.
    leaves : list of str
        Leaf texts in source order, shape ``(n,)``.
    d, c, u : lists
        The gold tuple (:func:`probekit.probes.ast_tree.tree_to_tuple`), shapes ``(n-1,)``, ``(n-1,)``, ``(n,)``.
    spans : list of (int, int)
        Character offsets of the leaves in ``source``.
    input_ids : list of int
        The model input, special tokens included.
    leaf_of_token : list of int
        Per input token, the leaf index whose chunk it belongs to, or -1 (special tokens; in the
        ``"offsets"`` scheme also tokens with no leaf character: whitespace, comments, docstrings).
    pool_index : list of int
        As ``leaf_of_token`` but -1 for every token containing no character of its leaf's own text
        (pure-whitespace tokens); pool over this one.
    scheme : str
        One of :data:`SCHEMES`.
    input_text : str
        The text the non-special ids encode (``stripped_source`` for ``"leaf-whitespace"``).
    n_spanning : int
        ``"offsets"`` only: tokens that cover characters of more than one leaf (0 otherwise).
    language : str
        The grammar the tree came from (``"python"`` or ``"javascript"``).
    """

    doc_id: str
    source: str
    leaves: list[str]
    d: list[int]
    c: list[str]
    u: list[str]
    spans: list[tuple[int, int]]
    input_ids: list[int]
    leaf_of_token: list[int]
    pool_index: list[int]
    scheme: str
    input_text: str = ""
    n_spanning: int = 0
    language: str = "python"

    @property
    def n_leaves(self) -> int:
        return len(self.leaves)

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


def clean_gap(gap: str) -> str:
    """Whitespace kept from the text between two leaves.

    Non-whitespace characters (removed comments, docstrings, ``\\`` continuations) are dropped, then
    spaces/tabs right before a newline are dropped. ``"  # c\\n    "`` -> ``"\\n    "``.
    """
    ws = "".join(ch for ch in gap if ch.isspace())
    return _TRAILING_BLANKS.sub("\n", ws)


def _leaf_chunks(source: str, spans: Sequence[tuple[int, int]]) -> list[tuple[str, str]]:
    """``(clean_gap(gap_i), leaf_i text)`` per leaf."""
    out = []
    prev = 0
    for s, e in spans:
        out.append((clean_gap(source[prev:s]), source[s:e]))
        prev = e
    return out


def stripped_source(source: str, *, language: str = "python") -> str:
    """The text the ``"leaf-whitespace"`` scheme encodes: every leaf with its cleaned preceding gap.

    Equals ``"".join(clean_gap(source[end_{i-1}:start_i]) + source[start_i:end_i] for each leaf i)``:
    the source without comments, docstrings, line continuations, trailing blanks and trailing text.

    ``language`` is passed to :func:`~probekit.probes.ast_tree.parse_code`.

    Raises
    ------
    SyntaxTreeError
        If the source does not parse.
    """
    spans = [lf.span for lf in leaves(parse_code(source, language=language))]
    return "".join(g + t for g, t in _leaf_chunks(source, spans))


def special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Ids the tokenizer adds by default before and after a text (e.g. ``([bos], [])``, ``([cls], [sep])``)."""
    probe = "x"
    full = list(tokenizer(probe)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    n = len(plain)
    for i in range(len(full) - n + 1):
        if full[i : i + n] == plain:
            return full[:i], full[i + n :]
    raise ValueError(
        f"cannot locate the plain encoding {plain} of {probe!r} inside the default encoding {full}; "
        "this tokenizer's special-token template is not a prefix/suffix wrap."
    )


def _encode(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
    """Ids without special tokens, and char offsets when the tokenizer provides them."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [(int(a), int(b)) for a, b in enc["offset_mapping"]]
    except (NotImplementedError, TypeError, ValueError):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]), None


def _touches_leaf(tokenizer: Any, ids: list[int], offsets, lo: int, hi: int) -> list[bool]:
    """Per token of a chunk: does it cover any char of ``[lo, hi)`` (the leaf's own text)?"""
    if offsets is not None:
        return [s < hi and e > lo and e > s for s, e in offsets]
    # Slow tokenizers have no offsets: a token is "whitespace" if it decodes to whitespace only.
    return [tokenizer.decode([i]).strip() != "" for i in ids]


def assign_by_offsets(
    offsets: Sequence[Sequence[int]], text: str, spans: Sequence[tuple[int, int]]
) -> tuple[list[int], int, list[int]]:
    """Assign tokens to leaves from char offsets (the ``"offsets"`` scheme's rule).

    Parameters
    ----------
    offsets : sequence of (start, end)
        Token char offsets into ``text``, shape ``(n_tokens, 2)`` (no special tokens).
    text : str
        The tokenised text.
    spans : sequence of (start, end)
        Leaf char spans in ``text``, sorted and disjoint.

    Returns
    -------
    leaf_of_token : list of int
        Leaf containing the token's first non-whitespace character, or -1 (none; empty span).
    n_spanning : int
        Number of tokens covering characters of two or more leaves (each given to its first leaf).
    orphans : list of int
        Leaves that got no token (they cannot be represented).
    """
    starts = [s for s, _ in spans]
    out: list[int] = []
    n_spanning = 0
    for s, e in offsets:
        s, e = int(s), int(e)
        piece = text[s:e]
        skip = len(piece) - len(piece.lstrip())
        if s >= e or skip == len(piece):
            out.append(-1)
            continue
        pos = s + skip
        j = bisect.bisect_right(starts, pos) - 1
        if j >= 0 and spans[j][0] <= pos < spans[j][1]:
            out.append(j)
            # Does the token reach into a later leaf?
            k = bisect.bisect_left(starts, e) - 1  # last leaf starting before e
            if k > j:
                n_spanning += 1
        else:
            out.append(-1)
    got = set(out)
    orphans = [i for i in range(len(spans)) if i not in got]
    return out, n_spanning, orphans


def align(
    source: str,
    tokenizer: Any,
    *,
    scheme: str = "leaf-whitespace",
    max_tokens: int | None = None,
    doc_id: str = "",
    language: str = "python",
) -> AlignedSnippet:
    """Gold tree tuple and leaf-aligned model input of one snippet.

    Parameters
    ----------
    source : str
        Source code in ``language``.
    tokenizer : Hugging Face tokenizer
        Fast tokenizers are needed for ``"offsets"``.
    scheme : str
        One of :data:`SCHEMES` (see the module docstring).
    max_tokens : int or None
        Reject snippets whose input (special tokens included) is longer.
    doc_id : str
        Stored in the result.
    language : str
        ``"python"`` (default) or ``"javascript"``; stored in the result.

    Raises
    ------
    SyntaxTreeError
        If the source does not parse.
    AlignmentError
        ``reason`` ``"leaf_without_token"`` (a leaf got no token), ``"too_long"`` (over ``max_tokens``),
        ``"no_offsets"`` (``"offsets"`` with a tokenizer without offset mapping).
    ValueError
        Unknown scheme or language.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    tree = parse_code(source, language=language)
    lvs = leaves(tree)
    spans = [lf.span for lf in lvs]
    texts = [lf.text or "" for lf in lvs]
    d, c, u = tree_to_tuple(binarize(tree))
    pre, post = special_tokens(tokenizer)

    ids: list[int] = []
    owner: list[int] = []
    pool: list[int] = []
    n_spanning = 0
    if scheme == "offsets":
        input_text = source
        ids, offsets = _encode(tokenizer, source)
        if offsets is None:
            raise AlignmentError(
                "the 'offsets' scheme needs a fast tokenizer (return_offsets_mapping); "
                "use scheme='leaf-whitespace'.", "no_offsets")
        owner, n_spanning, orphans = assign_by_offsets(offsets, source, spans)
        if orphans:
            raise AlignmentError(
                f"{len(orphans)} leaves get no token of their own in the raw tokenisation "
                f"({n_spanning} tokens span two leaves), e.g. leaf {orphans[0]} {texts[orphans[0]]!r}; "
                "use scheme='leaf-whitespace'.", "leaf_without_token")
        pool = list(owner)
    else:
        if scheme == "paper":
            chunks = [(" ", t) for t in texts]
        else:
            chunks = _leaf_chunks(source, spans)
        parts = []
        for i, (gap, leaf) in enumerate(chunks):
            chunk = gap + leaf
            parts.append(chunk)
            cids, offs = _encode(tokenizer, chunk)
            touch = _touches_leaf(tokenizer, cids, offs, len(gap), len(chunk))
            if not cids or not any(touch):
                raise AlignmentError(
                    f"leaf {i} {leaf!r} gets no token of its own under scheme {scheme!r}.",
                    "leaf_without_token")
            ids.extend(cids)
            owner.extend([i] * len(cids))
            pool.extend(i if t else -1 for t in touch)
        input_text = "".join(parts)

    input_ids = list(pre) + ids + list(post)
    neg_pre, neg_post = [-1] * len(pre), [-1] * len(post)
    if max_tokens is not None and len(input_ids) > max_tokens:
        raise AlignmentError(
            f"{len(input_ids)} tokens > max_tokens={max_tokens}.", "too_long")
    return AlignedSnippet(
        doc_id=doc_id, source=source, leaves=texts, d=d, c=c, u=u, spans=spans,
        input_ids=input_ids, leaf_of_token=neg_pre + owner + neg_post,
        pool_index=neg_pre + pool + neg_post, scheme=scheme, input_text=input_text,
        n_spanning=n_spanning, language=language)


def build_corpus(
    snippets: Iterable[Any],
    tokenizer: Any,
    *,
    scheme: str = "leaf-whitespace",
    max_tokens: int | None = None,
    max_leaves: int | None = None,
    language: str = "python",
) -> tuple[list[AlignedSnippet], Counter[str]]:
    """Align many snippets, counting the rejected ones by reason.

    Parameters
    ----------
    snippets : iterable of CodeSnippet (anything with ``.source`` and ``.doc_id``)
    tokenizer, scheme, max_tokens, language
        As :func:`align` (one language for the whole corpus).
    max_leaves : int or None
        Reject snippets with more leaves (reason ``"too_many_leaves"``).

    Returns
    -------
    aligned : list of AlignedSnippet
        In input order.
    rejected : Counter
        Reason -> count: ``"syntax"`` (SyntaxTreeError), ``"too_many_leaves"``, and the
        :class:`AlignmentError` reasons (``"too_long"``, ``"leaf_without_token"``, ``"no_offsets"``).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    check_language(language)  # fail once, not as a rejection per snippet
    out: list[AlignedSnippet] = []
    rejected: Counter[str] = Counter()
    for sn in snippets:
        try:
            a = align(sn.source, tokenizer, scheme=scheme, max_tokens=max_tokens,
                      doc_id=getattr(sn, "doc_id", ""), language=language)
        except SyntaxTreeError:
            rejected["syntax"] += 1
            continue
        except AlignmentError as exc:
            rejected[exc.reason] += 1
            continue
        if max_leaves is not None and a.n_leaves > max_leaves:
            rejected["too_many_leaves"] += 1
            continue
        out.append(a)
    return out, rejected


def leaf_vectors(acts: torch.Tensor, leaf_of_token: Sequence[int] | torch.Tensor, n_leaves: int) -> torch.Tensor:
    """Mean of each leaf's token vectors.

    Parameters
    ----------
    acts : Tensor
        Token vectors of one snippet, shape ``(n_tokens, D)``.
    leaf_of_token : sequence of int or LongTensor
        Shape ``(n_tokens,)``; -1 (any negative) excludes a token. Pass ``AlignedSnippet.pool_index``.
    n_leaves : int

    Returns
    -------
    Tensor
        Shape ``(n_leaves, D)``, float32 (float64 if ``acts`` is float64).

    Raises
    ------
    ValueError
        On a length mismatch, an index ``>= n_leaves``, or a leaf with no token.
    """
    idx = torch.as_tensor(leaf_of_token, dtype=torch.long, device=acts.device)
    if acts.ndim != 2 or idx.ndim != 1 or idx.shape[0] != acts.shape[0]:
        raise ValueError(
            f"need acts (n_tokens, D) and leaf_of_token (n_tokens,), got {tuple(acts.shape)} and "
            f"{tuple(idx.shape)}.")
    keep = idx >= 0
    idx_k = idx[keep]
    if idx_k.numel() and int(idx_k.max()) >= n_leaves:
        raise ValueError(f"leaf index {int(idx_k.max())} >= n_leaves={n_leaves}.")
    dtype = torch.float64 if acts.dtype == torch.float64 else torch.float32
    sums = torch.zeros(n_leaves, acts.shape[1], dtype=dtype, device=acts.device)
    sums.index_add_(0, idx_k, acts[keep].to(dtype))
    counts = torch.bincount(idx_k, minlength=n_leaves)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten()[:5].tolist()
        raise ValueError(f"leaves {missing} have no token to pool; check the alignment.")
    return sums / counts.unsqueeze(1).to(dtype)


def split_capture_rows(acts: torch.Tensor, meta: dict[str, torch.Tensor], n_docs: int) -> list[torch.Tensor]:
    """Per-document ``(n_tokens, D)`` matrices in position order from a ``capture(..., positions="all")`` result."""
    doc = meta["doc_index"].long()
    pos = meta["position"].long()
    order = torch.argsort(doc * (int(pos.max()) + 1 if pos.numel() else 1) + pos)
    doc_sorted = doc[order]
    counts = torch.bincount(doc_sorted, minlength=n_docs).tolist()
    return list(torch.split(acts[order], counts))


def capture_leaf_vectors(
    model: Any,
    aligned: Sequence[AlignedSnippet],
    hooks: Sequence[str],
    *,
    batch_size: int = 8,
    dtype: str = "float32",
    progress: bool = False,
) -> dict[str, list[torch.Tensor]]:
    """Run the aligned inputs through ``model`` and pool leaf vectors at each hook.

    Returns
    -------
    dict
        Hook -> list (one per snippet, in order) of ``(n_leaves, D)`` float32 tensors.
    """
    from probekit.capture import CaptureConfig, capture

    if not aligned:
        return {h: [] for h in hooks}
    max_len = max(a.n_tokens for a in aligned)
    cfg = CaptureConfig(hooks=list(hooks), positions="all", batch_size=batch_size, max_length=max_len,
                        dtype=dtype, progress=progress)
    res = capture(model, [a.input_ids for a in aligned], cfg)
    out: dict[str, list[torch.Tensor]] = {}
    for h in hooks:
        per_doc = split_capture_rows(res.acts[h], res.meta, len(aligned))
        out[h] = [leaf_vectors(x, a.pool_index, a.n_leaves) for x, a in zip(per_doc, aligned)]
    return out


@dataclass
class Standardizer:
    """Per-dimension standardisation fitted on training leaf vectors only.

    ``transform(x) = (x - mean_) / scale_`` with ``scale_`` the (population) std, dimensions with
    std <= ``eps`` get scale 1. Statistics are accumulated in float64.
    """

    eps: float = 1e-8
    mean_: torch.Tensor | None = field(default=None, repr=False)
    scale_: torch.Tensor | None = field(default=None, repr=False)
    n_fit: int = 0

    def fit(self, x: torch.Tensor | Sequence[torch.Tensor]) -> Standardizer:
        """Fit on ``(n, D)`` or a list of ``(n_i, D)`` (e.g. per-snippet leaf vectors of the train split)."""
        if not isinstance(x, torch.Tensor):
            x = torch.cat([torch.as_tensor(t) for t in x], 0)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"fit needs a non-empty (n, D) tensor, got {tuple(x.shape)}.")
        x64 = x.detach().to(torch.float64)
        mean = x64.mean(0)
        std = x64.std(0, unbiased=False)
        self.mean_ = mean.to(torch.float32)
        self.scale_ = torch.where(std > self.eps, std, torch.ones_like(std)).to(torch.float32)
        self.n_fit = int(x.shape[0])
        return self

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean_ is None or self.scale_ is None:
            raise RuntimeError("Standardizer is not fitted; call fit() on the training vectors first.")
        if x.shape[-1] != self.mean_.shape[0]:
            raise ValueError(f"expected last dim {self.mean_.shape[0]}, got {x.shape[-1]}.")
        mean = self.mean_.to(x.device)
        scale = self.scale_.to(x.device)
        return (x.to(torch.float32) - mean) / scale

    def fit_transform(self, x: torch.Tensor) -> torch.Tensor:
        return self.fit(x).transform(x)

    def state_dict(self) -> dict[str, Any]:
        return {"eps": self.eps, "n_fit": self.n_fit, "mean": self.mean_, "scale": self.scale_}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Standardizer:
        return cls(eps=state["eps"], mean_=state["mean"], scale_=state["scale"], n_fit=state["n_fit"])
