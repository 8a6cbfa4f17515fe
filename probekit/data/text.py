"""English prose that ships with every Python: the Language Reference topics of ``pydoc_data``.

Data card
---------
Source: ``pydoc_data/topics.py`` of the running interpreter's standard library — the text of the Python
Language Reference and Library Reference sections that ``help()`` shows (79 topics, about 465k characters in
CPython 3.11), generated from the CPython documentation. Licence: the Python Software Foundation License
(documentation © Python Software Foundation). It is technical English with embedded grammar snippets and
code examples, which is what a code-and-text model sees; it needs no network and no extra package.

Public API
----------
TextDoc
iter_pydoc_paragraphs
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["TextDoc", "iter_pydoc_paragraphs"]


@dataclass(frozen=True)
class TextDoc:
    """One chunk of prose: ``doc_id`` is ``"<topic>:<chunk index>"``."""

    doc_id: str
    topic: str
    text: str


def iter_pydoc_paragraphs(max_chars: int = 1200, min_chars: int = 200, max_docs: int | None = None,
                          seed: int = 0) -> list[TextDoc]:
    """Chunks of the pydoc topics, cut at paragraph boundaries.

    Parameters
    ----------
    max_chars : int
        Paragraphs are joined until the next one would exceed this; a single longer paragraph is cut at the
        last line break before ``max_chars`` (or hard at ``max_chars``).
    min_chars : int
        Shorter chunks are dropped (headings, one-line stubs).
    max_docs : int or None
        A seeded random sample of this many chunks (all when ``None``), returned in (topic, chunk) order.
    seed : int

    Returns
    -------
    list of TextDoc
    """
    if max_chars < 1 or min_chars < 0 or min_chars > max_chars:
        raise ValueError(f"need 0 <= min_chars <= max_chars and max_chars >= 1; got {min_chars}, {max_chars}")
    from pydoc_data.topics import topics

    out: list[TextDoc] = []
    for topic in sorted(topics):
        chunks: list[str] = []
        cur = ""
        for para in (p.strip("\n") for p in topics[topic].split("\n\n")):
            if not para.strip():
                continue
            while len(para) > max_chars:  # an over-long paragraph: cut at a line break when possible
                cut = para.rfind("\n", 0, max_chars)
                cut = cut if cut > 0 else max_chars
                chunks.append(para[:cut])
                para = para[cut:].lstrip("\n")
            if cur and len(cur) + 2 + len(para) > max_chars:
                chunks.append(cur)
                cur = para
            else:
                cur = f"{cur}\n\n{para}" if cur else para
        if cur:
            chunks.append(cur)
        out.extend(TextDoc(f"{topic}:{i}", topic, c) for i, c in enumerate(chunks) if len(c) >= min_chars)
    if max_docs is not None and max_docs < len(out):
        keep = sorted(random.Random(seed).sample(range(len(out)), max_docs))
        out = [out[i] for i in keep]
    return out
