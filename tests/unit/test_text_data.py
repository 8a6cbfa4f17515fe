"""probekit.data.text: prose chunks from the interpreter's pydoc topics."""

from __future__ import annotations

import pytest
from pydoc_data.topics import topics

from probekit.data.text import iter_pydoc_paragraphs


def test_chunks_respect_limits_and_come_from_the_topics():
    docs = iter_pydoc_paragraphs(max_chars=800, min_chars=150)
    assert len(docs) > 100
    assert all(150 <= len(d.text) <= 800 for d in docs)
    # verbatim paragraphs, cut only at boundaries
    assert all(part in topics[d.topic] for d in docs for part in d.text.split("\n\n"))
    assert len({d.doc_id for d in docs}) == len(docs)
    # nearly all prose is kept (only short stubs are dropped)
    assert sum(len(d.text) for d in docs) > 0.8 * sum(len(t) for t in topics.values())


def test_sample_is_seeded_and_ordered():
    a = iter_pydoc_paragraphs(max_docs=30, seed=1)
    b = iter_pydoc_paragraphs(max_docs=30, seed=1)
    c = iter_pydoc_paragraphs(max_docs=30, seed=2)
    assert [d.doc_id for d in a] == [d.doc_id for d in b] != [d.doc_id for d in c]
    full = [d.doc_id for d in iter_pydoc_paragraphs()]
    assert [full.index(d.doc_id) for d in a] == sorted(full.index(d.doc_id) for d in a)


def test_bad_limits():
    with pytest.raises(ValueError, match="min_chars"):
        iter_pydoc_paragraphs(max_chars=100, min_chars=200)
