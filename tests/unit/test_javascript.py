"""JavaScript for the AST-Probe tree code: hand-worked tuples, leaf rules, npm corpus, alignment."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import tarfile
import time
from collections import Counter

import pytest

pytest.importorskip("tree_sitter")
pytest.importorskip("tree_sitter_javascript")

from probekit.data import javascript as jsdata  # noqa: E402
from probekit.data.code import CodeSnippet, leaf_spans, split_by_file  # noqa: E402
from probekit.data.treesitter import parser as _parser  # noqa: E402
from probekit.probes.ast_align import align, build_corpus, stripped_source  # noqa: E402
from probekit.probes.ast_tree import (  # noqa: E402
    EMPTY,
    SyntaxTreeError,
    binarize,
    code_to_tuple,
    leaves,
    parse_code,
    tree_f1,
    tree_to_tuple,
    tuple_to_tree,
)
from probekit.testing import byte_tokenizer  # noqa: E402

E = EMPTY
JS = "javascript"

# Short functions in common JS styles (written for this test, not copied from anywhere).
FIXTURE = [
    "function debounce(fn, wait) {\n"
    "  let timer = null;\n"
    "  return function (...args) {\n"
    "    clearTimeout(timer);\n"
    "    timer = setTimeout(() => fn.apply(this, args), wait);\n"
    "  };\n"
    "}",
    "function slugify(text) {\n"
    "  // lower-case, dashes for runs of non-word characters\n"
    "  return String(text).toLowerCase().replace(/[^a-z0-9]+/g, '-').replace(/^-|-$/g, '');\n"
    "}",
    "const greet = (user = {}) => {\n"
    "  const { name = 'anon', roles = [] } = user;\n"
    "  return `Hello ${name}, you have ${roles.length} role${roles.length === 1 ? '' : 's'}`;\n"
    "};",
    "class Stack {\n"
    "  push(item) {\n"
    "    this.items = [...(this.items || []), item];\n"
    "    return this;\n"
    "  }\n"
    "}",
    "async function loadJson(url, opts) {\n"
    "  try {\n"
    "    const res = await fetch(url, { ...opts, headers: { Accept: 'application/json' } });\n"
    "    if (!res.ok) throw new Error(`HTTP ${res.status}`);\n"
    "    return await res.json();\n"
    "  } catch (err) {\n"
    "    return null;\n"
    "  } finally {\n"
    "    /* nothing to release */\n"
    "  }\n"
    "}",
    "function* range(start, end, step = 1) {\n"
    "  for (let i = start; i < end; i += step) {\n"
    "    yield i;\n"
    "  }\n"
    "}",
    "module.exports.classify = function classify(n) {\n"
    "  switch (typeof n) {\n"
    "    case 'number':\n"
    "      return n % 2 === 0 ? 'even' : 'odd';\n"
    "    default:\n"
    "      return void 0;\n"
    "  }\n"
    "};",
    "function countWords(lines) {\n"
    "  var counts = {};\n"
    "  for (const line of lines) {\n"
    "    line.split(/\\s+/).forEach(function (w) { counts[w] = (counts[w] || 0) + 1; });\n"
    "  }\n"
    "  return Object.keys(counts).sort((a, b) => counts[b] - counts[a])[0]?.length ?? 0;\n"
    "}",
    "var héllo = function () {\n  return \"čau\" + '\\u00e9';\n};",
]


# --- hand-worked tuples --------------------------------------------------------

def test_assignment_call_by_hand():
    # tree-sitter: program > expression_statement(assignment_expression(x, =,
    # call_expression(f, arguments("(", a, ",", b, ")"))), ;). program has one
    # non-terminal child -> "program|expression_statement"; n-ary nodes
    # right-nest under ∅:
    #   PE8(AE7(x, ∅6(=, call5(f, args4("(", ∅3(a, ∅2(",", ∅1(b, ")"))))))), ;)
    leaves_, d, c, u = code_to_tuple("x = f(a, b);", language=JS)
    assert leaves_ == ["x", "=", "f", "(", "a", ",", "b", ")", ";"]
    assert d == [7, 6, 5, 4, 3, 2, 1, 8]
    assert c == ["assignment_expression", E, "call_expression", "arguments", E, E, E,
                 "program|expression_statement"]
    assert u == [E] * 9


def test_function_declaration_by_hand():
    # program > function_declaration(function, g, formal_parameters("(", a, ")"),
    # statement_block("{", return_statement(return, binary_expression(a, +, 1), ;), "}")):
    #   binary_expression2(a, ∅1(+, 1)); return_statement4(return, ∅3(bin2, ;));
    #   statement_block6("{", ∅5(ret4, "}")); formal_parameters2("(", ∅1(a, ")"));
    #   PF9(function, ∅8(g, ∅7(params2, block6)))
    leaves_, d, c, u = code_to_tuple("function g(a) { return a + 1; }", language=JS)
    assert leaves_ == ["function", "g", "(", "a", ")", "{", "return", "a", "+", "1", ";", "}"]
    assert d == [9, 8, 2, 1, 7, 6, 4, 2, 1, 3, 5]
    assert c == ["program|function_declaration", E, "formal_parameters", E, E, "statement_block",
                 "return_statement", "binary_expression", E, E, E]
    assert u == [E] * 12


def test_unary_chain_by_hand():
    # program > statement_block("{", expression_statement > identifier x, "}"): no ";"
    # (automatic semicolon, zero width), so expression_statement stands above the
    # single leaf x and becomes its unary label:  PS2("{", ∅1(x, "}"))
    assert code_to_tuple("{ x }", language=JS) == (
        ["{", "x", "}"], [2, 1], ["program|statement_block", E], [E, "expression_statement", E])


def test_python_default_unchanged():
    # Same text, default language: Python's grammar (no ";", "def") would reject JS.
    assert code_to_tuple("x = f(a, b)")[0] == ["x", "=", "f", "(", "a", ",", "b", ")"]
    with pytest.raises(SyntaxTreeError):
        code_to_tuple("function g(a) { return a + 1; }")


# --- leaf rules ------------------------------------------------------------------

def test_comments_removed():
    src = "/** doc */\nfunction f(a) { // one\n  /* two */ return a; // three\n}\n// tail"
    assert [lf.text for lf in leaves(parse_code(src, language=JS))] == [
        "function", "f", "(", "a", ")", "{", "return", "a", ";", "}"]
    # A "//" inside a string is not a comment.
    lv = leaves(parse_code("s = '// x';", language=JS))
    assert [(lf.label, lf.text) for lf in lv][2] == ("string", "'// x'")


def test_template_string_and_regex_are_single_leaves_with_offsets():
    src = "const é = `a${`b${c}`} ${d + 1}` + /[/]\\d+/gi + \"q\";"
    lv = leaves(parse_code(src, language=JS))
    assert [lf.text for lf in lv] == [
        "const", "é", "=", "`a${`b${c}`} ${d + 1}`", "+", "/[/]\\d+/gi", "+", '"q"', ";"]
    assert [lf.label for lf in lv][3:8] == ["template_string", "+", "regex", "+", "string"]
    for lf in lv:  # char offsets despite the non-ASCII identifier
        assert src[lf.span[0]:lf.span[1]] == lf.text
    # leaf_spans follows the same rule for JavaScript.
    got = [(src[s:e], t) for s, e, t, _ in leaf_spans(src, language=JS)]
    assert got == [(lf.text, lf.label) for lf in lv]


@pytest.mark.parametrize("src", ["x = (", "function (", "var = 1;", "if (a {}", "let x = [1, 2"])
def test_error_input_raises(src):
    assert _parser(JS).parse(src.encode()).root_node.has_error
    with pytest.raises(SyntaxTreeError, match="javascript"):
        parse_code(src, language=JS)
    with pytest.raises(SyntaxTreeError):
        code_to_tuple(src, language=JS)


def test_only_comment_raises():
    with pytest.raises(SyntaxTreeError):
        parse_code("// nothing\n/* here */", language=JS)


def test_unknown_language_rejected():
    tok = byte_tokenizer()
    calls = [
        lambda: parse_code("x", language="rust"),
        lambda: code_to_tuple("x", language="rust"),
        lambda: leaf_spans("x", language="rust"),
        lambda: _parser("rust"),
        lambda: align("x", tok, language="rust"),
        lambda: build_corpus([], tok, language="rust"),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="'python', 'javascript'"):
            call()


# --- round trip ------------------------------------------------------------------

def _check_round_trip(src: str) -> None:
    tree = parse_code(src, language=JS)
    lv = leaves(tree)
    assert all(src[a:b] == lf.text for lf in lv for a, b in [lf.span])
    d, c, u = tree_to_tuple(binarize(tree))
    assert len(d) == len(c) == len(lv) - 1 and len(u) == len(lv)
    rebuilt = tuple_to_tree(d, c, u, lv)
    assert rebuilt == tree
    assert tree_to_tuple(binarize(rebuilt)) == (d, c, u)
    by_text = tuple_to_tree(d, c, u, [lf.text for lf in lv])
    assert tree_to_tuple(binarize(by_text)) == (d, c, u)
    assert tree_f1(rebuilt, tree) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("src", FIXTURE, ids=[f"fixture{i}" for i in range(len(FIXTURE))])
def test_fixture_round_trip(src):
    _check_round_trip(src)


def test_fixture_leaf_rules_hold():
    lv = [lf for src in FIXTURE for lf in leaves(parse_code(src, language=JS))]
    labels = Counter(lf.label for lf in lv)
    # greet's template (its nested `${... ? '' : 's'}` inside) and loadJson's; slugify's two regexes
    # and countWords' one.
    assert labels["template_string"] == 2 and labels["regex"] == 3
    assert labels["comment"] == 0 and not any(lf.text.startswith(("//", "/*")) for lf in lv)


# --- alignment ---------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["leaf-whitespace", "paper", "offsets"])
def test_alignment_with_byte_tokenizer(scheme):
    tok = byte_tokenizer()
    snips = [CodeSnippet(f"fx.js::{i}", "fx.js", str(i), s) for i, s in enumerate(FIXTURE)]
    aligned, rejected = build_corpus(snips, tok, scheme=scheme, language=JS)
    assert not rejected and len(aligned) == len(FIXTURE)
    for a, src in zip(aligned, FIXTURE):
        assert a.language == JS and a.scheme == scheme
        assert a.leaves == code_to_tuple(src, language=JS)[0]
        assert [src[s:e] for s, e in a.spans] == a.leaves
        n_pool = Counter(i for i in a.pool_index if i >= 0)
        assert all(n_pool[i] >= 1 for i in range(a.n_leaves))
        # One token per byte: the pooled tokens of a leaf spell exactly that leaf ("offsets" pools
        # no whitespace-only token, so the spaces inside a template string are not pooled there).
        for i, leaf in enumerate(a.leaves):
            ids = [t for t, k in zip(a.input_ids, a.pool_index) if k == i]
            want = "".join(ch for ch in leaf if not ch.isspace()) if scheme == "offsets" else leaf
            assert tok.decode(ids) == want
        if scheme == "leaf-whitespace":
            assert a.input_text == stripped_source(src, language=JS)
            assert "//" not in a.input_text and "/*" not in a.input_text


def test_build_corpus_counts_syntax_errors():
    tok = byte_tokenizer()
    good = CodeSnippet("a", "a.js", "f", FIXTURE[1])
    bad = CodeSnippet("b", "b.js", "g", "function g( {")
    aligned, rejected = build_corpus([good, bad, good], tok, language=JS)
    assert [a.doc_id for a in aligned] == ["a", "a"] and rejected == Counter({"syntax": 1})
    # The same valid JS through the default (Python) grammar is a syntax rejection too.
    aligned, rejected = build_corpus([good], tok)
    assert aligned == [] and rejected == Counter({"syntax": 1})


# --- function extraction -------------------------------------------------------------

MODULE = """\
'use strict';
var helpers = require('./helpers');

/** Adds. */
function add(a, b) {
  return a + b;
}

function tiny() { return 1; }

var twice = function (x) {
  var y = x * 2;
  return y;
};

exports.mul = exports.times = function mul(a, b) {
  var r = a * b;
  return r;
};

class Box {
  constructor(v) {
    this.v = v;
    this.n = 1;
  }

  map(fn) {
    return new Box(fn(this.v));
  }
}

var api = {
  get(key) {
    var v = this.store[key];
    return v;
  }
};

(function () {
  function inner(q) {
    var w = q + 1;
    return w;
  }
  list.forEach(function (item) {
    console.log(item);
    return item;
  });
})();

function add(a, b) {
  // same tokens as the first add
  return a + b;
}
"""


def test_extract_functions_forms_and_rejections():
    rejected: Counter[str] = Counter()
    snips = jsdata.extract_functions(MODULE, "pkg/m.js", max_lines=20, rejected=rejected)
    assert [s.doc_id for s in snips] == [
        "pkg/m.js::add", "pkg/m.js::twice", "pkg/m.js::exports.times",
        "pkg/m.js::Box.constructor", "pkg/m.js::Box.map", "pkg/m.js::inner"]
    by_name = {s.name: s for s in snips}
    assert by_name["add"].source == "function add(a, b) {\n  return a + b;\n}"
    # A function expression is taken with the statement that names it.
    assert by_name["twice"].source == "var twice = function (x) {\n  var y = x * 2;\n  return y;\n};"
    assert by_name["exports.times"].source.startswith("exports.mul = exports.times = function mul(a, b) {")
    # A method is wrapped in its class header; the body keeps its own lines.
    assert by_name["Box.map"].source == "class Box {\n  map(fn) {\n    return new Box(fn(this.v));\n  }\n}"
    # Nested in a rejected IIFE, dedented to column 0.
    assert by_name["inner"].source == "function inner(q) {\n  var w = q + 1;\n  return w;\n}"
    assert rejected == Counter({
        "too_short": 1,             # tiny (one line)
        "object_method": 1,         # api.get: `get(key) {...}` alone is not a method
        "anonymous_expression": 2,  # the IIFE and the forEach callback
        "duplicate": 1,             # the second add: same tokens once the comment is gone
    })
    for s in snips:
        assert s.path == "pkg/m.js"
        _check_round_trip(s.source)


def test_extract_functions_size_limits():
    rejected: Counter[str] = Counter()
    snips = jsdata.extract_functions(MODULE, "m.js", min_lines=4, max_lines=4, rejected=rejected)
    # The 3-line add, tiny and Box.map are too short; the second add (4 lines
    # with its comment) is no longer a duplicate and keeps its "#2" id.
    assert [s.doc_id for s in snips] == [
        "m.js::twice", "m.js::exports.times", "m.js::Box.constructor", "m.js::inner", "m.js::add#2"]
    assert rejected["too_short"] == 3
    rejected.clear()
    snips = jsdata.extract_functions(MODULE, "m.js", max_chars=60, rejected=rejected)
    assert "exports.times" not in {s.name for s in snips} and rejected["too_long"] == 2


# --- npm download / cache -------------------------------------------------------------

LIB_A = "function one(a) {\n  return a + 1;\n}\n\nfunction two(b) {\n  return b * 2;\n}\n"
LIB_B = "var three = function (c) {\n  var d = c - 3;\n  return d;\n};\n"
WIDE = "var x = [" + ", ".join(["1"] * 150) + "];\n"  # one long line: looks minified


def _tarball(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in files.items():
            raw = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return buf.getvalue()


def _sri(data: bytes, algo: str = "sha256") -> str:
    return f"{algo}-" + base64.b64encode(hashlib.new(algo, data).digest()).decode()


@pytest.fixture()
def demo(tmp_path, monkeypatch):
    """A local npm-style tarball, its pinned package (URL on disk) and a private cache root."""
    monkeypatch.setenv("PROBEKIT_CACHE", str(tmp_path / "cache"))
    data = _tarball({
        "package/LICENSE": "MIT License\n",
        "package/package.json": "{}",
        "package/lib/a.js": LIB_A,
        "package/lib/sub/b.js": LIB_B,
        "package/lib/a.min.js": "function m(){return 1}",
        "package/lib/wide.js": WIDE,
        "package/test/t.js": LIB_A,          # not in include
        "package/../evil.js": LIB_A,         # path traversal: never written
    })
    src = tmp_path / "demo-1.0.0.tgz"
    src.write_bytes(data)
    pkg = jsdata.NpmPackage("demo", "1.0.0", _sri(data), "MIT", include=("lib/*.js",), url=src.as_uri())
    return pkg, data


def test_fetch_extracts_only_wanted_js_and_license(demo, tmp_path):
    pkg, _ = demo
    root = jsdata.fetch_package(pkg)
    assert root == tmp_path / "cache" / "data" / "npm" / "demo-1.0.0"
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == ["LICENSE", "lib/a.js", "lib/sub/b.js", jsdata.MANIFEST]
    assert not (tmp_path / "cache" / "data" / "evil.js").exists()
    assert (root / "lib/a.js").read_text() == LIB_A
    # No temporary directories left beside the result.
    assert [p.name for p in root.parent.iterdir()] == ["demo-1.0.0"]


def test_fetch_never_downloads_twice(demo):
    pkg, _ = demo
    root = jsdata.fetch_package(pkg)
    offline = dataclasses.replace(pkg, url="file:///nonexistent/demo.tgz")
    assert jsdata.fetch_package(offline) == root


def test_default_registry_url(demo, tmp_path, monkeypatch):
    pkg, data = demo
    reg = tmp_path / "registry"
    (reg / "demo" / "-").mkdir(parents=True)
    (reg / "demo" / "-" / "demo-1.0.0.tgz").write_bytes(data)
    monkeypatch.setattr(jsdata, "REGISTRY", reg.as_uri())
    plain = dataclasses.replace(pkg, url=None)
    assert plain.tarball_url == f"{reg.as_uri()}/demo/-/demo-1.0.0.tgz"
    assert (jsdata.fetch_package(plain) / "lib/a.js").is_file()


def test_integrity_mismatch(demo):
    pkg, data = demo
    bad = dataclasses.replace(pkg, integrity=_sri(data + b"x", "sha512"))
    with pytest.raises(jsdata.NpmIntegrityError, match="sha512-.*expected the pinned"):
        jsdata.fetch_package(bad)
    # Verified before anything is written: no package directory, no temporary leftovers.
    root = jsdata.package_dir(bad)
    assert not root.exists()
    assert not root.parent.exists() or not any(root.parent.iterdir())


def test_download_failure_names_url_and_manual_path(demo):
    pkg, data = demo
    offline = dataclasses.replace(pkg, url="file:///nonexistent/demo-1.0.0.tgz")
    with pytest.raises(jsdata.NpmDownloadError) as err:
        jsdata.fetch_package(offline)
    manual = jsdata.tarball_path(offline)
    assert "file:///nonexistent/demo-1.0.0.tgz" in str(err.value) and str(manual) in str(err.value)
    # A tarball placed there is verified and used instead of the network.
    manual.parent.mkdir(parents=True)
    manual.write_bytes(data)
    assert (jsdata.fetch_package(offline) / "lib/sub/b.js").read_text() == LIB_B


def test_iter_npm_functions_local(demo):
    pkg, _ = demo
    rejected: Counter[str] = Counter()
    snips = jsdata.iter_npm_functions(packages=[pkg], rejected=rejected)
    assert [(s.path, s.doc_id) for s in snips] == [
        ("demo/lib/a.js", "demo/lib/a.js::one"),
        ("demo/lib/a.js", "demo/lib/a.js::two"),
        ("demo/lib/sub/b.js", "demo/lib/sub/b.js::three"),
    ]
    assert not rejected
    # Samples are seeded subsets in corpus order; split_by_file keeps a file in one split.
    one = jsdata.iter_npm_functions(2, seed=3, packages=[pkg])
    assert len(one) == 2 and all(s in snips for s in one)
    assert one == jsdata.iter_npm_functions(2, seed=3, packages=[pkg])
    parts = split_by_file(snips, fractions=(0.5, 0.5, 0.0), seed=0)
    assert sorted(len(p) for p in parts) == [0, 1, 2]
    with pytest.raises(ValueError, match="unknown npm package"):
        jsdata.iter_npm_functions(packages=["left-pad"])


def test_pinned_packages_are_well_formed():
    assert 3 <= len(jsdata.PACKAGES) <= 5
    for pkg in jsdata.PACKAGES:
        assert pkg.integrity.startswith("sha512-") and pkg.license in {"MIT", "BSD-3-Clause", "ISC"}
        assert pkg.tarball_url == f"https://registry.npmjs.org/{pkg.name}/-/{pkg.name}-{pkg.version}.tgz"
        assert not pkg.wants("x.min.js")


# --- the real packages (network) ----------------------------------------------------------

@pytest.mark.integration
def test_real_npm_corpus_round_trips(tmp_path, monkeypatch):
    monkeypatch.setenv("PROBEKIT_CACHE", str(tmp_path))
    t0 = time.monotonic()
    rejected: Counter[str] = Counter()
    snips = jsdata.iter_npm_functions(rejected=rejected)
    assert len(snips) >= 300
    assert {s.path.split("/")[0] for s in snips} == {p.name for p in jsdata.PACKAGES}
    for pkg in jsdata.PACKAGES:
        assert (jsdata.package_dir(pkg) / "LICENSE").is_file()
    for s in snips:
        _check_round_trip(s.source)
    assert time.monotonic() - t0 < 60
