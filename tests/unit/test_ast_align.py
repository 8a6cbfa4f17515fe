"""Token alignment for the AST-Probe (probekit.probes.ast_align)."""

from __future__ import annotations

import pytest
import torch

from probekit.data.code import CodeSnippet, iter_stdlib_functions
from probekit.probes.ast_align import (
    SCHEMES,
    AlignmentError,
    Standardizer,
    align,
    assign_by_offsets,
    build_corpus,
    capture_leaf_vectors,
    clean_gap,
    leaf_vectors,
    special_tokens,
    stripped_source,
)
from probekit.probes.ast_tree import code_to_tuple

HAND = 'def f(x):\n    """doc"""\n    # c\n    return x  # hi\n'
HAND_LEAVES = ["def", "f", "(", "x", ")", ":", "return", "x"]
# Docstring and comment lines leave only their newlines; trailing "  # hi\n" is dropped.
HAND_STRIPPED = "def f(x):\n\n\n    return x"


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return tiny_llama[1]


@pytest.fixture(scope="module")
def stdlib_sources():
    snips = iter_stdlib_functions(max_functions=6, max_lines=25, seed=1)
    assert len(snips) == 6
    return [s.source for s in snips]


def _merging_tokenizer():
    """A fast tokenizer with one token per whitespace-separated word: ``f(x):`` is ONE token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "def": 1, "return": 2}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")


def _cls_sep_byte_tokenizer():
    """Byte-level tokenizer that wraps every text as ``<cls> ... <sep>`` (BERT-like template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    for s in ("<cls>", "<sep>", "<pad>"):
        vocab[s] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [ByteLevel(add_prefix_space=False, use_regex=False), pre_tokenizers.Split("", "isolated")])
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.TemplateProcessing(
        single="<cls> $A <sep>", special_tokens=[("<cls>", vocab["<cls>"]), ("<sep>", vocab["<sep>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, cls_token="<cls>", sep_token="<sep>", pad_token="<pad>")


def _check_common(a, tok, pre, post):
    n = a.n_leaves
    assert len(a.input_ids) == len(a.leaf_of_token) == len(a.pool_index)
    # Special tokens are exactly the wrap, marked -1 in both indices.
    assert a.input_ids[: len(pre)] == pre and a.input_ids[len(a.input_ids) - len(post):] == post
    for k in list(range(len(pre))) + list(range(len(a.input_ids) - len(post), len(a.input_ids))):
        assert a.leaf_of_token[k] == -1 and a.pool_index[k] == -1
    special = set(tok.all_special_ids)
    inner = a.input_ids[len(pre): len(a.input_ids) - len(post)]
    assert not special & set(inner)
    # Every leaf has >= 1 pooled token; pooled tokens belong to their chunk's leaf.
    assert set(a.pool_index) - {-1} == set(range(n))
    assert all(p == -1 or p == o for p, o in zip(a.pool_index, a.leaf_of_token))
    assert len(a.d) == len(a.c) == n - 1 and len(a.u) == n


def _check_leaf_whitespace(a, tok, src):
    # Decoding leaf i's tokens gives exactly clean_gap(gap before leaf i) + leaf i, straight from the source.
    prev = 0
    for i, (s, e) in enumerate(a.spans):
        ids = [t for t, o in zip(a.input_ids, a.leaf_of_token) if o == i]
        assert tok.decode(ids) == clean_gap(src[prev:s]) + src[s:e]
        assert src[s:e] == a.leaves[i]
        prev = e
    # Leaf chunks are contiguous and in order.
    inner = [o for o in a.leaf_of_token if o != -1]
    assert inner == sorted(inner)
    body = [t for t, o in zip(a.input_ids, a.leaf_of_token) if o != -1]
    assert tok.decode(body) == a.input_text == stripped_source(src)


def test_clean_gap():
    assert clean_gap("") == ""
    assert clean_gap(" ") == " "
    assert clean_gap("  # c\n    ") == "\n    "
    assert clean_gap('\n    """doc"""\n    # c\n    ') == "\n\n\n    "
    assert clean_gap(" \\\n\t") == "\n\t"


def test_hand_example_all_schemes(tok):
    pre, post = special_tokens(tok)
    assert pre == [tok.bos_token_id] and post == []
    leaves_, *_ = code_to_tuple(HAND)
    assert leaves_ == HAND_LEAVES
    assert stripped_source(HAND) == HAND_STRIPPED
    for scheme in SCHEMES:
        a = align(HAND, tok, scheme=scheme, doc_id="hand")
        assert a.scheme == scheme and a.doc_id == "hand" and a.leaves == HAND_LEAVES
        _check_common(a, tok, pre, post)
    a = align(HAND, tok)
    _check_leaf_whitespace(a, tok, HAND)
    assert tok.decode(a.input_ids[1:]) == HAND_STRIPPED
    # "\n\n\n    return": 3 newlines + 4 indentation bytes in the chunk, not pooled; 6 letters pooled.
    ret = [p for o, p in zip(a.leaf_of_token, a.pool_index) if o == 6]
    assert ret == [-1] * 7 + [6] * 6
    # paper: " " + leaf per leaf.
    p = align(HAND, tok, scheme="paper")
    assert p.input_text == " " + " ".join(HAND_LEAVES)
    for i, leaf in enumerate(HAND_LEAVES):
        assert tok.decode([t for t, o in zip(p.input_ids, p.leaf_of_token) if o == i]) == " " + leaf
    # offsets: the raw source is the input; comment/docstring/whitespace tokens are -1.
    o = align(HAND, tok, scheme="offsets")
    assert tok.decode(o.input_ids[1:]) == HAND and o.n_spanning == 0
    for i, (s, e) in enumerate(o.spans):
        assert tok.decode([t for t, k in zip(o.input_ids, o.leaf_of_token) if k == i]) == HAND[s:e]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_stdlib_snippets(tok, stdlib_sources, scheme):
    pre, post = special_tokens(tok)
    for src in stdlib_sources:
        a = align(src, tok, scheme=scheme)
        _check_common(a, tok, pre, post)
        assert a.leaves == code_to_tuple(src)[0]
        if scheme == "leaf-whitespace":
            _check_leaf_whitespace(a, tok, src)
            # Removing comments/docstrings keeps the layout: line count never grows, indentation kept.
            assert a.input_text.count("\n") <= src.count("\n")


def test_stripped_source_reparses_to_same_leaves(stdlib_sources):
    for src in stdlib_sources + [HAND]:
        s = stripped_source(src)
        assert "#" not in s or any("#" in leaf for leaf in code_to_tuple(src)[0])
        assert code_to_tuple(s) == code_to_tuple(src)


def test_encoder_wrap_cls_sep():
    tok = _cls_sep_byte_tokenizer()
    pre, post = special_tokens(tok)
    assert pre == [tok.cls_token_id] and post == [tok.sep_token_id]
    for scheme in SCHEMES:
        a = align(HAND, tok, scheme=scheme)
        _check_common(a, tok, pre, post)
        assert a.leaf_of_token[0] == -1 and a.leaf_of_token[-1] == -1
    a = align(HAND, tok)
    assert a.input_ids[1:-1] == tok(HAND_STRIPPED, add_special_tokens=False)["input_ids"]
    assert tok(HAND_STRIPPED)["input_ids"] == a.input_ids


def test_no_special_tokens():
    from probekit.testing import byte_tokenizer

    tok = byte_tokenizer(bos=False)
    assert special_tokens(tok) == ([], [])
    a = align(HAND, tok)
    assert -1 not in a.leaf_of_token and tok.decode(a.input_ids) == HAND_STRIPPED


def test_offsets_rejects_merged_leaves():
    tok = _merging_tokenizer()
    src = "def f(x):\n    return x"
    with pytest.raises(AlignmentError) as ei:
        align(src, tok, scheme="offsets")
    assert ei.value.reason == "leaf_without_token"
    # The per-leaf schemes never merge leaves, even with this tokenizer.
    a = align(src, tok, scheme="leaf-whitespace")
    assert set(a.pool_index) == set(range(a.n_leaves))
    # A tokenisation without merges passes.
    ok = align("def f ( x ) :\n    return x", tok, scheme="offsets")
    assert ok.n_spanning == 0 and ok.leaf_of_token == list(range(8))


def test_assign_by_offsets_hand_made():
    text = "f(x): # c\n  y"
    spans = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (12, 13)]
    # Tokens: "f", "(x", "):", " #", " c", "\n ", " y"
    offsets = [(0, 1), (1, 3), (3, 5), (5, 7), (7, 9), (9, 11), (11, 13)]
    owner, n_span, orphans = assign_by_offsets(offsets, text, spans)
    assert owner == [0, 1, 3, -1, -1, -1, 5]
    assert n_span == 2 and orphans == [2, 4]
    # One token per leaf: no spanning, no orphans; empty spans (specials) are -1.
    owner, n_span, orphans = assign_by_offsets([(0, 0)] + spans, text, spans)
    assert owner == [-1, 0, 1, 2, 3, 4, 5] and n_span == 0 and orphans == []


def test_max_tokens_and_unknown_scheme(tok):
    a = align(HAND, tok)
    assert align(HAND, tok, max_tokens=a.n_tokens).n_tokens == a.n_tokens
    with pytest.raises(AlignmentError) as ei:
        align(HAND, tok, max_tokens=a.n_tokens - 1)
    assert ei.value.reason == "too_long"
    with pytest.raises(ValueError, match="scheme"):
        align(HAND, tok, scheme="raw")


def test_build_corpus_counts_rejections(tok):
    good = CodeSnippet("a.py::f", "a.py", "f", HAND)
    bad = CodeSnippet("a.py::g", "a.py", "g", "def g(:\n    pass")
    long_ = CodeSnippet("a.py::h", "a.py", "h", "def h(x):\n    return " + " + ".join(["x"] * 40))
    merged = CodeSnippet("b.py::k", "b.py", "k", "def k(y):\n    return y")
    al, rej = build_corpus([good, bad, long_, good, merged], tok, max_tokens=60)
    assert [a.doc_id for a in al] == ["a.py::f", "a.py::f", "b.py::k"]
    assert rej == {"syntax": 1, "too_long": 1}
    al, rej = build_corpus([good, long_, merged], tok, max_leaves=8)
    assert [a.doc_id for a in al] == ["a.py::f", "b.py::k"] and rej == {"too_many_leaves": 1}
    al, rej = build_corpus([good, merged, bad], _merging_tokenizer(), scheme="offsets")
    assert al == [] and rej == {"leaf_without_token": 2, "syntax": 1}


def test_leaf_vectors_matches_loop():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(12, 5, generator=g)
    idx = [-1, 0, 0, 2, 1, -1, 1, 1, 3, 3, 3, -1]
    out = leaf_vectors(acts, idx, 4)
    ref = torch.stack([acts[[k for k, j in enumerate(idx) if j == i]].mean(0) for i in range(4)])
    torch.testing.assert_close(out, ref)
    # -1 rows really are excluded: changing them changes nothing.
    acts2 = acts.clone()
    acts2[[0, 5, 11]] = 1e6
    torch.testing.assert_close(leaf_vectors(acts2, torch.tensor(idx), 4), ref)
    assert leaf_vectors(acts.double(), idx, 4).dtype == torch.float64
    with pytest.raises(ValueError, match="no token"):
        leaf_vectors(acts, idx, 5)
    with pytest.raises(ValueError):
        leaf_vectors(acts, idx[:-1], 4)
    with pytest.raises(ValueError):
        leaf_vectors(acts, idx, 3)


def test_capture_leaf_vectors_matches_single_doc_capture(tiny_llama, stdlib_sources):
    from probekit.capture import CaptureConfig, capture

    bridge, tok = tiny_llama
    al = [align(s, tok) for s in [HAND] + stdlib_sources[:3]]
    hook = "blocks.1.hook_resid_post"
    got = capture_leaf_vectors(bridge, al, [hook], batch_size=3)[hook]
    assert len(got) == len(al)
    for a, v in zip(al, got):
        res = capture(bridge, [a.input_ids], CaptureConfig(hooks=[hook], positions="all", batch_size=1,
                                                          max_length=a.n_tokens, progress=False))
        assert res.acts[hook].shape[0] == a.n_tokens
        assert torch.equal(res.meta["position"], torch.arange(a.n_tokens))
        ref = leaf_vectors(res.acts[hook], a.pool_index, a.n_leaves)
        assert v.shape == (a.n_leaves, res.acts[hook].shape[1])
        torch.testing.assert_close(v, ref, atol=1e-4, rtol=1e-4)


def test_standardizer_uses_train_stats_only():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(200, 6, generator=g) * torch.tensor([1.0, 2.0, 500.0, 0.1, 3.0, 1.0]) + 7.0
    train[:, 5] = 4.0  # constant dimension: scale 1, no division by zero
    test = torch.randn(50, 6, generator=g) * 10.0 - 3.0
    st = Standardizer().fit(train)
    z = st.transform(train)
    torch.testing.assert_close(z[:, :5].mean(0), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(z[:, :5].std(0, unbiased=False), torch.ones(5), atol=1e-4, rtol=0)
    assert st.scale_[5] == 1.0 and torch.all(z[:, 5] == 0)
    # Test data is transformed with the TRAIN mean/scale, not its own.
    ref = (test - train.double().mean(0).float()) / st.scale_
    torch.testing.assert_close(st.transform(test), ref)
    assert st.transform(test).mean(0).abs().max() > 0.5
    # Fitting on a list of per-snippet matrices equals fitting on their concatenation.
    st2 = Standardizer().fit([train[:80], train[80:]])
    torch.testing.assert_close(st2.mean_, st.mean_)
    torch.testing.assert_close(st2.scale_, st.scale_)
    st3 = Standardizer.from_state_dict(st.state_dict())
    torch.testing.assert_close(st3.transform(test), st.transform(test))
    with pytest.raises(RuntimeError):
        Standardizer().transform(test)
