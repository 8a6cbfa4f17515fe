"""Tests for probekit.data.code (tree-sitter leaves, token labels, stdlib sampling)."""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tree_sitter")
pytest.importorskip("tree_sitter_python")

from probekit.data.code import (  # noqa: E402
    CodeSnippet,
    encode_labels,
    iter_stdlib_functions,
    label_vocabulary,
    leaf_spans,
    split_by_file,
    token_syntax_labels,
)

SIMPLE = "def f(x):\n    return x + 1\n"


def _regex_offsets(source: str) -> list[tuple[int, int]]:
    """A toy tokenizer: whitespace runs, words, single punctuation chars."""
    return [m.span() for m in re.finditer(r"\s+|\w+|[^\w\s]", source)]


# ---------------------------------------------------------------- leaf_spans


def test_leaf_spans_simple_function() -> None:
    # Grammar: function_definition = 'def' name:identifier parameters ':' block;
    # parameters = '(' identifier ')'; block > return_statement = 'return'
    # binary_operator; binary_operator = identifier '+' integer.
    expected = [
        (0, 3, "def", "function_definition"),
        (4, 5, "identifier", "function_definition"),
        (5, 6, "(", "parameters"),
        (6, 7, "identifier", "parameters"),
        (7, 8, ")", "parameters"),
        (8, 9, ":", "function_definition"),
        (14, 20, "return", "return_statement"),
        (21, 22, "identifier", "binary_operator"),
        (23, 24, "+", "binary_operator"),
        (25, 26, "integer", "binary_operator"),
    ]
    assert leaf_spans(SIMPLE) == expected
    texts = [SIMPLE[s:e] for s, e, _, _ in expected]
    assert texts == ["def", "f", "(", "x", ")", ":", "return", "x", "+", "1"]


def test_string_with_fstring_and_escape_is_one_leaf() -> None:
    src = 's = f"a{b!r:>3}\\n" + \'x\\ty\'\n'
    spans = leaf_spans(src)
    strings = [(src[s:e], parent) for s, e, t, parent in spans if t == "string"]
    assert strings == [('f"a{b!r:>3}\\n"', "binary_operator"), ("'x\\ty'", "binary_operator")]
    types = [t for _, _, t, _ in spans]
    # Only `s`, `=`, two strings and `+`: nothing from inside the strings.
    assert types == ["identifier", "=", "string", "+", "string"]
    for inner in ("string_start", "interpolation", "escape_sequence", "string_content"):
        assert inner not in types


def test_leaf_spans_non_ascii_char_offsets() -> None:
    # é (2 bytes), π (2 bytes), 😀 (4 bytes): byte and char offsets diverge.
    src = 'é = "ß😀"  # ünï\nπ = é\n'
    got = [(src[s:e], t, parent) for s, e, t, parent in leaf_spans(src)]
    assert got == [
        ("é", "identifier", "assignment"),
        ("=", "=", "assignment"),
        ('"ß😀"', "string", "assignment"),
        ("# ünï", "comment", "module"),
        ("π", "identifier", "assignment"),
        ("=", "=", "assignment"),
        ("é", "identifier", "assignment"),
    ]


def test_leaf_spans_empty_source() -> None:
    assert leaf_spans("") == []
    assert leaf_spans("\n\n") == []


# ------------------------------------------------------- token_syntax_labels


def test_token_syntax_labels_hand_offsets() -> None:
    offsets = [
        (0, 0),  # BOS special token
        (0, 3),  # "def"
        (3, 5),  # " f": leading space skipped
        (5, 6),  # "("
        (6, 7),  # "x"
        (7, 9),  # "):" spans two leaves -> first one, ")"
        (9, 14),  # "\n    " whitespace only
        (14, 20),  # "return"
        (20, 22),  # " x"
        (22, 24),  # " +"
        (24, 26),  # " 1"
        (26, 27),  # "\n"
        (0, 0),  # EOS special token
    ]
    assert token_syntax_labels(SIMPLE, offsets) == [
        None,
        "function_definition",
        "function_definition",
        "parameters",
        "parameters",
        "parameters",
        None,
        "return_statement",
        "binary_operator",
        "binary_operator",
        "binary_operator",
        None,
        None,
    ]


def test_token_syntax_labels_accepts_arrays_and_precomputed_spans() -> None:
    offsets = np.array([[0, 3], [4, 5], [25, 26]])
    spans = leaf_spans(SIMPLE)
    want = ["function_definition", "function_definition", "binary_operator"]
    assert token_syntax_labels(SIMPLE, offsets) == want
    assert token_syntax_labels(SIMPLE, offsets, spans=spans) == want


def test_token_syntax_labels_non_ascii() -> None:
    src = "π = f(é)\n"
    # Regex tokens: π, ' ', =, ' ', f, (, é, ), \n
    labels = token_syntax_labels(src, _regex_offsets(src))
    assert labels == [
        "assignment", None, "assignment", None, "call", "argument_list",
        "argument_list", "argument_list", None,
    ]  # fmt: skip


def test_token_syntax_labels_inside_string_uses_string_parent() -> None:
    src = 'print("a b")\n'
    # Tokens inside the string literal all map to the string leaf, whose
    # parent is the call's argument_list.
    offsets = [(0, 5), (5, 6), (6, 8), (8, 9), (9, 11), (11, 12)]
    assert token_syntax_labels(src, offsets) == [
        "call", "argument_list", "argument_list", None, "argument_list", "argument_list",
    ]  # fmt: skip


def test_token_syntax_labels_rejects_out_of_range_offsets() -> None:
    with pytest.raises(ValueError, match="outside the source"):
        token_syntax_labels(SIMPLE, [(0, 3), (20, 999)])


# ------------------------------------------------------ vocabulary / encoding


def test_label_vocabulary_and_encode() -> None:
    lists = [["a", "b", None, "a"], ["c", "a", "b", "d"]]
    # counts: a=3, b=2, c=1, d=1 -> top 2 = a, b; then "other".
    vocab = label_vocabulary(lists, top_k=2)
    assert vocab == ["a", "b", "other"]
    # Ties broken by name: c before d.
    assert label_vocabulary(lists, top_k=3) == ["a", "b", "c", "other"]
    ids = encode_labels(["a", "c", None, "b", "zzz"], vocab)
    assert ids.dtype == np.int64
    assert ids.tolist() == [0, 2, -1, 1, 2]
    assert encode_labels([None], vocab, ignore_index=-100).tolist() == [-100]
    with pytest.raises(ValueError, match="catch-all"):
        encode_labels(["a"], ["a", "b"])


# ---------------------------------------------------- fake library on disk

MOD = '''import os


def top(a, b):
    c = a + b
    return c


class K:
    def method(self):
        x = 1
        return x

    @staticmethod
    def short(): return 1

    def outer(self):
        def inner():
            return 2
        return inner()


if os.name == "nt":
    def plat():
        x = 1
        return x
else:
    def plat():
        x = 2
        return x
'''


@pytest.fixture()
def fake_lib(tmp_path: Path) -> Path:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(MOD, encoding="utf-8")
    for d in ("test", "site-packages"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "x.py").write_text("def t():\n    a = 1\n    return a\n")
    # Not UTF-8: skipped rather than crashing.
    (tmp_path / "latin.py").write_bytes(b"def g():\n    s = '\xe9'\n    return s\n")
    # Syntax error: tree-sitter marks it, the function is dropped.
    (tmp_path / "bad.py").write_text("def h(:\n    pass\n    pass\n")
    # Python 2: tree-sitter accepts `print 'hi'`, ast.parse does not.
    (tmp_path / "py2.py").write_text("def old():\n    print 'hi'\n    return 0\n")
    return tmp_path


def test_fake_lib_extraction(fake_lib: Path) -> None:
    snips = iter_stdlib_functions(root=fake_lib)
    assert [s.doc_id for s in snips] == [
        "pkg/mod.py::top",
        "pkg/mod.py::K.method",
        # K.short is 1 line (< min_lines); K.outer.inner is nested, not separate.
        "pkg/mod.py::K.outer",
        "pkg/mod.py::plat",
        "pkg/mod.py::plat#2",
    ]
    by_id = {s.doc_id: s for s in snips}
    assert by_id["pkg/mod.py::K.method"] == CodeSnippet(
        doc_id="pkg/mod.py::K.method",
        path="pkg/mod.py",
        name="method",
        source="def method(self):\n    x = 1\n    return x",
    )
    assert "def inner" in by_id["pkg/mod.py::K.outer"].source
    assert by_id["pkg/mod.py::plat#2"].source.endswith("x = 2\n    return x")

    with_tests = iter_stdlib_functions(root=fake_lib, exclude_tests=False)
    ids = {s.doc_id for s in with_tests}
    assert "test/x.py::t" in ids
    assert not any(i.startswith("site-packages/") for i in ids)

    # Line bounds: only K.outer has 4 lines.
    assert [s.doc_id for s in iter_stdlib_functions(root=fake_lib, min_lines=4)] == [
        "pkg/mod.py::K.outer"
    ]


def test_fake_lib_sampling_rounds_and_shortfall(fake_lib: Path) -> None:
    # One usable file, one per file per round: later rounds must fill up.
    four = iter_stdlib_functions(root=fake_lib, max_functions=4, max_per_file=1)
    assert len(four) == 4 and len({s.doc_id for s in four}) == 4
    with pytest.warns(UserWarning, match="only 5 functions"):
        many = iter_stdlib_functions(root=fake_lib, max_functions=10)
    assert len(many) == 5


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="min_lines"):
        iter_stdlib_functions(min_lines=10, max_lines=5)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        iter_stdlib_functions(root=tmp_path / "nope")
    with pytest.raises(ValueError, match="no .py files"):
        iter_stdlib_functions(root=tmp_path)


# --------------------------------------------------------- the real stdlib


@pytest.fixture(scope="module")
def stdlib50() -> list[CodeSnippet]:
    return iter_stdlib_functions(max_functions=50)


def test_stdlib_sample_basic(stdlib50: list[CodeSnippet]) -> None:
    assert len(stdlib50) == 50
    assert len({s.doc_id for s in stdlib50}) == 50
    for s in stdlib50:
        ast.parse(s.source)
        n_lines = s.source.count("\n") + 1
        assert 3 <= n_lines <= 60, s.doc_id
        assert s.doc_id.startswith(s.path + "::")
        assert s.doc_id.split("::")[1].split("#")[0].split(".")[-1] == s.name
        assert s.source.startswith(("def ", "async def "))
        parts = s.path.split("/")
        assert not {"test", "tests", "idlelib", "lib2to3", "site-packages"} & set(parts)


def test_stdlib_sample_spread_and_deterministic(stdlib50: list[CodeSnippet]) -> None:
    per_file = Counter(s.path for s in stdlib50)
    assert max(per_file.values()) <= 3
    assert len(per_file) >= 17  # 50 snippets, at most 3 per file
    assert iter_stdlib_functions(max_functions=50) == stdlib50
    other_seed = iter_stdlib_functions(max_functions=50, seed=1)
    assert {s.doc_id for s in other_seed} != {s.doc_id for s in stdlib50}
    # Nested samples: a smaller draw with the same seed is a subset.
    assert set(iter_stdlib_functions(max_functions=20)) <= set(stdlib50)


def test_stdlib_labels_cover_all_code_tokens(stdlib50: list[CodeSnippet]) -> None:
    for s in stdlib50[:10]:
        offsets = _regex_offsets(s.source)
        labels = token_syntax_labels(s.source, offsets)
        assert len(labels) == len(offsets)
        for (a, b), lab in zip(offsets, labels):
            # Whitespace tokens -> None; every other token lies in some leaf.
            assert (lab is None) == s.source[a:b].isspace(), (s.doc_id, s.source[a:b])


def test_split_by_file(stdlib50: list[CodeSnippet]) -> None:
    train, val, test = split_by_file(stdlib50, fractions=(0.6, 0.2, 0.2), seed=0)
    assert sorted(train + val + test, key=lambda s: s.doc_id) == sorted(
        stdlib50, key=lambda s: s.doc_id
    )
    files = [{s.path for s in part} for part in (train, val, test)]
    assert not (files[0] & files[1]) and not (files[0] & files[2]) and not (files[1] & files[2])
    assert len(train) > len(val) > 0 and len(test) > 0
    # Deterministic, and the seed matters.
    assert split_by_file(stdlib50, fractions=(0.6, 0.2, 0.2), seed=0) == (train, val, test)
    assert split_by_file(stdlib50, fractions=(0.6, 0.2, 0.2), seed=1) != (train, val, test)
    with pytest.raises(ValueError, match="summing to 1"):
        split_by_file(stdlib50, fractions=(0.5, 0.2, 0.2))
