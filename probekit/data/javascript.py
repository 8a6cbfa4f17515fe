"""JavaScript source-code data: functions from real npm package sources.

The AST-Probe needs real, human-written code. For JavaScript we take the
published sources of a few well-known npm packages, pinned by version and by
the registry's SHA-512 ``integrity`` string, and cut them into standalone
function snippets (:class:`probekit.data.code.CodeSnippet`, so
:func:`probekit.data.code.split_by_file` and
:func:`probekit.probes.ast_align.build_corpus` work unchanged; pass
``language="javascript"`` to the latter).

Data source (all MIT-licensed; each package's ``LICENSE`` file is kept next
to its extracted sources):

============  =========  =====================================================
package       version    files used (never ``*.min.js``, never bundles)
============  =========  =====================================================
lodash        4.17.21    the per-method modules at the package root
                         (``_baseEach.js``, ``map.js``, ...; not ``lodash.js``,
                         ``core.js``, ``fp/``)
underscore    1.13.7     ``modules/*.js`` (the ES-module sources)
express       4.21.2     ``index.js``, ``lib/**.js``
moment        2.30.1     ``src/lib/**.js`` (the ES2015 sources, no locales)
commander     12.1.0     ``index.js``, ``lib/*.js`` (ES2015 classes)
============  =========  =====================================================

Tarballs come from ``https://registry.npmjs.org/<name>/-/<name>-<version>.tgz``
and are checked against the pinned integrity before anything is extracted.
Only ``.js`` files are kept, and of those none that look minified (name
``*.min.js`` or an average line length over 200 characters). The extracted
files are cached under ``<cache root>/data/npm/<name>-<version>/`` (written to
a temporary directory, then renamed, so a half-written cache never exists);
a package whose directory exists is never downloaded again.

Offline use: put the tarball at
``<cache root>/data/npm/tarballs/<name>-<version>.tgz`` (see
:func:`tarball_path`); it is verified and used instead of the network.

Snippets
--------
A snippet is the whole text of one function, dedented, that parses on its
own as a one-statement JavaScript program:

- ``function f() {...}`` / ``function* f() {...}`` declarations: as they are;
- a function / generator / block-bodied arrow function that is the value of a
  one-variable ``var``/``let``/``const`` declaration or the right-hand side of
  an assignment statement (``a.b = c = function () {...};``): that whole
  statement;
- a *named* function expression elsewhere: its text (it parses alone as a
  declaration);
- a method of a named class: wrapped as ``class Name {\\n  <method>\\n}``
  (only the class header is synthesised; the method keeps its own lines).

Everything else (anonymous callbacks, object-literal methods, methods of
anonymous classes) is rejected with a count, as are functions outside the
size limits, functions that do not parse alone, and duplicates (same tokens
after comment removal). Rejected functions are searched for nested functions
that qualify, so helpers inside module wrappers are found.

Public API
----------
NpmPackage
PACKAGES
NpmDownloadError
NpmIntegrityError
npm_root
tarball_path
package_dir
fetch_package
extract_functions
iter_npm_functions
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import io
import json
import os
import random
import shutil
import tarfile
import tempfile
import textwrap
import urllib.error
import urllib.request
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from probekit.data.code import CodeSnippet
from probekit.data.treesitter import parser
from probekit.paths import cache_root
from probekit.probes.ast_tree import SyntaxTreeError, leaves, parse_code

__all__ = [
    "NpmPackage",
    "PACKAGES",
    "NpmDownloadError",
    "NpmIntegrityError",
    "npm_root",
    "tarball_path",
    "package_dir",
    "fetch_package",
    "extract_functions",
    "iter_npm_functions",
]

REGISTRY = "https://registry.npmjs.org"
#: Files with a longer average line are treated as minified / generated.
MAX_AVG_LINE = 200
MANIFEST = "probekit-npm.json"


@dataclass(frozen=True)
class NpmPackage:
    """One pinned npm package and the files of it that are used.

    Attributes
    ----------
    name, version : str
        Registry name and exact version.
    integrity : str
        Subresource-integrity string of the tarball, ``"<algo>-<base64 digest>"``
        (the registry's ``dist.integrity``, e.g. ``"sha512-..."``).
    license : str
        SPDX identifier, for the record.
    include : tuple of str
        ``fnmatch`` patterns on paths relative to the package root (``*``
        matches ``/`` too); a ``.js`` file is kept if it matches one ...
    exclude : tuple of str
        ... and none of these.
    url : str or None
        Tarball URL; ``None`` means the registry's standard one.
    """

    name: str
    version: str
    integrity: str
    license: str
    include: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    url: str | None = None

    @property
    def key(self) -> str:
        return f"{self.name}-{self.version}"

    @property
    def tarball_url(self) -> str:
        if self.url is not None:
            return self.url
        base = self.name.rsplit("/", 1)[-1]  # scoped names keep only the last part
        return f"{REGISTRY}/{self.name}/-/{base}-{self.version}.tgz"

    def wants(self, rel: str) -> bool:
        """Is the file at package-relative POSIX path ``rel`` one to extract functions from?"""
        if not rel.endswith(".js") or rel.endswith(".min.js"):
            return False
        hit = any(fnmatch.fnmatchcase(rel, p) for p in self.include)
        return hit and not any(fnmatch.fnmatchcase(rel, p) for p in self.exclude)


PACKAGES: tuple[NpmPackage, ...] = (
    NpmPackage(
        "lodash", "4.17.21",
        "sha512-v2kDEe57lecTulaDIuNTPy3Ry4gLGJ6Z1O3vE1krgXZNrsQ+LFTGHVxVjcXPs17LhbZVGedAJv8XZ1tvj5FvSg==",
        "MIT", include=("*.js",), exclude=("*/*", "lodash.js", "core.js", "fp.js")),
    NpmPackage(
        "underscore", "1.13.7",
        "sha512-GMXzWtsc57XAtguZgaQViUOzs0KTkk8ojr3/xAxXLITqf/3EMwxC0inyETfDFjH/Krbhuep0HNbbjI9i/q3F3g==",
        "MIT", include=("modules/*.js",)),
    NpmPackage(
        "express", "4.21.2",
        "sha512-28HqgMZAmih1Czt9ny7qr6ek2qddF4FclbMzwhCREB6OFfH+rXAnuNCwo1/wFvrtbgsQDb4kSbX9de9lFbrXnA==",
        "MIT", include=("index.js", "lib/*.js")),
    NpmPackage(
        "moment", "2.30.1",
        "sha512-uEmtNhbDOrWPFS+hdjFCBfy9f2YoyzRpwcl+DqpC6taX21FzsTLQVbMV/W7PzNSX6x/bhC1zA3c2UQ5NzH6how==",
        "MIT", include=("src/lib/*.js",)),
    NpmPackage(
        "commander", "12.1.0",
        "sha512-Vw8qHK3bZM9y/P10u3Vib8o/DdkvA2OtPtZvD871QKjy74Wj1WSKFILMPRPSdUSx5RFK1arlJzEtA4PkFgnbuA==",
        "MIT", include=("index.js", "lib/*.js")),
)


class NpmDownloadError(RuntimeError):
    """A tarball could not be fetched (the message names the URL and the manual-placement path)."""


class NpmIntegrityError(ValueError):
    """A tarball's digest differs from the pinned integrity string."""


# ----------------------------------------------------------------- download / cache


def npm_root() -> Path:
    """``<cache root>/data/npm``: extracted packages and hand-placed tarballs."""
    return cache_root() / "data" / "npm"


def tarball_path(pkg: NpmPackage) -> Path:
    """Where a pre-downloaded tarball is picked up: ``<npm_root>/tarballs/<name>-<version>.tgz``."""
    return npm_root() / "tarballs" / f"{pkg.key.replace('/', '__')}.tgz"


def package_dir(pkg: NpmPackage) -> Path:
    """Directory of the extracted sources: ``<npm_root>/<name>-<version>``."""
    return npm_root() / pkg.key.replace("/", "__")


def _digest(data: bytes, algo: str) -> str:
    return f"{algo}-" + base64.b64encode(hashlib.new(algo, data).digest()).decode("ascii")


def _verify(pkg: NpmPackage, data: bytes, origin: str) -> None:
    algo = pkg.integrity.split("-", 1)[0]
    if algo not in hashlib.algorithms_guaranteed:
        raise ValueError(f"{pkg.key}: integrity {pkg.integrity!r} does not start with a hashlib algorithm.")
    got = _digest(data, algo)
    if got != pkg.integrity:
        raise NpmIntegrityError(
            f"{pkg.key}: tarball from {origin} has {got}, expected the pinned {pkg.integrity}; "
            "the file is corrupt or not this release (nothing was extracted).")


def _tarball_bytes(pkg: NpmPackage, timeout: float) -> tuple[bytes, str]:
    """Tarball contents and where they came from (the hand-placed file wins over the network)."""
    local = tarball_path(pkg)
    if local.is_file():
        return local.read_bytes(), str(local)
    url = pkg.tarball_url
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.read(), url
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise NpmDownloadError(
            f"could not download {url} ({exc}). If this machine is offline, fetch that file elsewhere "
            f"and place it at {local} (it is checked against the pinned {pkg.integrity.split('-')[0]} "
            "integrity and used instead of the network).") from exc


def _safe_rel(member: tarfile.TarInfo) -> str | None:
    """Package-relative path of a regular file, or None (links, dirs, absolute or ``..`` paths)."""
    if not member.isfile():
        return None
    parts = PurePosixPath(member.name).parts
    # npm tarballs hold one top directory (usually "package/"); drop it.
    if len(parts) < 2 or member.name.startswith("/") or ".." in parts:
        return None
    return "/".join(parts[1:])


def _is_license(rel: str) -> bool:
    return "/" not in rel and rel.lower().startswith(("license", "licence"))


def _extract(pkg: NpmPackage, data: bytes, out: Path) -> dict[str, Any]:
    """Write the wanted ``.js`` files and the licence under ``out``; return the manifest."""
    files: list[str] = []
    licenses: list[str] = []
    skipped: Counter[str] = Counter()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar:
            rel = _safe_rel(member)
            if rel is None:
                continue
            is_lic = _is_license(rel)
            if not is_lic and not pkg.wants(rel):
                if rel.endswith(".min.js"):
                    skipped["minified_name"] += 1
                continue
            fobj = tar.extractfile(member)
            raw = fobj.read() if fobj is not None else b""
            if not is_lic:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    skipped["not_utf8"] += 1
                    continue
                n_lines = text.count("\n") + 1
                if len(text) / n_lines > MAX_AVG_LINE:
                    skipped["minified_lines"] += 1
                    continue
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(raw)
            (licenses if is_lic else files).append(rel)
    if not licenses:
        raise ValueError(f"{pkg.key}: the tarball has no LICENSE file at its root; refusing to use it.")
    return {"name": pkg.name, "version": pkg.version, "integrity": pkg.integrity,
            "license": pkg.license, "url": pkg.tarball_url, "license_files": sorted(licenses),
            "files": sorted(files), "skipped": dict(skipped)}


def fetch_package(pkg: NpmPackage, *, timeout: float = 60.0) -> Path:
    """Download, verify and extract one package, unless it is already cached.

    Parameters
    ----------
    pkg : NpmPackage
    timeout : float
        Seconds for the HTTP request.

    Returns
    -------
    Path
        :func:`package_dir`, holding the wanted ``.js`` files (package-relative
        paths), the licence file(s) and ``probekit-npm.json`` (the manifest:
        pin, URL, kept files, skip counts).

    Raises
    ------
    NpmDownloadError
        The download failed and no tarball was placed at :func:`tarball_path`.
    NpmIntegrityError
        The tarball does not match ``pkg.integrity``.
    """
    final = package_dir(pkg)
    if (final / MANIFEST).is_file():
        return final
    data, origin = _tarball_bytes(pkg, timeout)
    _verify(pkg, data, origin)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target, then one rename: readers never see a partial tree.
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        manifest = _extract(pkg, data, tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MANIFEST).is_file():  # not a concurrent winner: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ----------------------------------------------------------------- function extraction

_FUNCTION_TYPES = frozenset({
    "function_declaration", "generator_function_declaration", "function_expression",
    "generator_function", "arrow_function", "method_definition",
})
_DECLARATIONS = frozenset({"function_declaration", "generator_function_declaration"})
# A named expression parses alone as the matching declaration.
_AS_DECLARATION = {"function_expression": "function_declaration",
                   "generator_function": "generator_function_declaration"}


def _text(node: Any) -> str:
    return node.text.decode("utf-8", errors="replace")


def _field_text(node: Any, field: str, default: str) -> str:
    child = node.child_by_field_name(field)
    return _text(child) if child is not None else default


@dataclass(frozen=True)
class _Form:
    """How one function becomes a snippet: the node whose text is taken, an optional class wrap."""

    node: Any
    name: str
    top_type: str  # the only statement the standalone snippet must parse to
    class_node: Any = None


def _standalone_form(fn: Any) -> _Form | str:
    """The standalone form of function node ``fn``, or a rejection reason."""
    kind, parent = fn.type, fn.parent
    if kind in _DECLARATIONS:
        return _Form(fn, _field_text(fn, "name", "<anonymous>"), kind)
    if kind == "method_definition":
        cls = parent.parent if parent is not None and parent.type == "class_body" else None
        if cls is None:
            return "object_method"
        if cls.type != "class_declaration" or cls.child_by_field_name("name") is None:
            return "anonymous_class"
        cname = _field_text(cls, "name", "")
        return _Form(fn, f"{cname}.{_field_text(fn, 'name', '<method>')}", "class_declaration", cls)
    if parent is not None and parent.type == "variable_declarator":
        decl = parent.parent
        n_vars = sum(c.type == "variable_declarator" for c in decl.children)
        if n_vars == 1 and parent.child_by_field_name("value") == fn:
            return _Form(decl, _field_text(parent, "name", "<anonymous>"), decl.type)
    if parent is not None and parent.type == "assignment_expression":
        top = fn
        while top.parent is not None and top.parent.type == "assignment_expression" \
                and top.parent.child_by_field_name("right") == top:
            top = top.parent
        stmt = top.parent
        if stmt is not None and stmt.type == "expression_statement":
            return _Form(stmt, _field_text(parent, "left", "<anonymous>"), "expression_statement")
    if kind in _AS_DECLARATION and fn.child_by_field_name("name") is not None:
        return _Form(fn, _field_text(fn, "name", ""), _AS_DECLARATION[kind])
    return "anonymous_expression"


def _line_indent(data: bytes, pos: int) -> bytes:
    """Leading whitespace of the line that contains byte ``pos``."""
    start = data.rfind(b"\n", 0, pos) + 1
    line = data[start:pos]
    return line[: len(line) - len(line.lstrip(b" \t"))]


def _snippet_text(data: bytes, form: _Form) -> str:
    """Dedented source of ``form``; a method gets a synthetic ``class Name {`` header."""
    node = form.node
    # Re-attach the line's indentation so dedent treats the first line like the rest.
    body = _line_indent(data, node.start_byte) + data[node.start_byte:node.end_byte]
    if form.class_node is not None:
        cls_indent = _line_indent(data, form.class_node.start_byte)
        name = _field_text(form.class_node, "name", "")
        body = cls_indent + f"class {name} {{\n".encode() + body + b"\n" + cls_indent + b"}"
    return textwrap.dedent(body.decode("utf-8"))


def _standalone_key(text: str, top_type: str) -> str | None:
    """Tokens of ``text`` joined by spaces if it parses alone as one ``top_type`` statement, else None."""
    try:
        tree = parse_code(text, language="javascript")
    except SyntaxTreeError:
        return None
    if len(tree.children) != 1 or tree.children[0].label != top_type:
        return None
    return " ".join(leaf.text or "" for leaf in leaves(tree))


def extract_functions(
    source: str,
    path: str,
    *,
    min_lines: int = 3,
    max_lines: int = 60,
    max_chars: int = 3000,
    rejected: Counter[str] | None = None,
    seen_keys: set[str] | None = None,
) -> list[CodeSnippet]:
    """Standalone function snippets of one JavaScript file (see the module docstring).

    Parameters
    ----------
    source : str
        The file's text.
    path : str
        Recorded as ``CodeSnippet.path`` and in ``doc_id`` (``"<path>::<name>"``,
        ``"#k"`` appended for the k-th function of the same name, k >= 2,
        counting every named candidate, kept or not).
    min_lines, max_lines : int
        Inclusive bounds on the snippet's lines (class wrap excluded).
    max_chars : int
        Upper bound on the snippet's characters (class wrap excluded).
    rejected : Counter or None
        Updated with reason -> count: ``"too_short"``, ``"too_long"``,
        ``"anonymous_expression"``, ``"object_method"``, ``"anonymous_class"``,
        ``"indentation"`` (cannot be dedented to column 0), ``"not_standalone"``
        (does not parse alone as one statement of the expected kind),
        ``"duplicate"``.
    seen_keys : set of str or None
        Normalised sources already taken (tokens without comments, joined by
        spaces); updated, and matches are rejected as ``"duplicate"``.

    Returns
    -------
    list of CodeSnippet
        Shape ``(n_functions,)``, in source order.
    """
    rejected = Counter() if rejected is None else rejected
    seen_keys = set() if seen_keys is None else seen_keys
    data = source.encode("utf-8", errors="surrogatepass")
    root = parser("javascript").parse(data).root_node
    names: Counter[str] = Counter()
    out: list[CodeSnippet] = []

    def consider(fn: Any) -> bool:
        """Try ``fn``; True when taken (its nested functions are then part of it)."""
        form = _standalone_form(fn)
        if isinstance(form, str):
            rejected[form] += 1
            return False
        names[form.name] += 1
        k = names[form.name]
        node = form.node
        n_lines = node.end_point[0] - node.start_point[0] + 1
        if n_lines < min_lines:
            rejected["too_short"] += 1
            return True  # nothing of min_lines can nest in it
        if n_lines > max_lines or node.end_byte - node.start_byte > max_chars:
            rejected["too_long"] += 1
            return False
        text = _snippet_text(data, form)
        if not text or text[0].isspace():
            rejected["indentation"] += 1
            return False
        key = _standalone_key(text, form.top_type)
        if key is None:
            rejected["not_standalone"] += 1
            return False
        if key in seen_keys:
            rejected["duplicate"] += 1
            return True
        seen_keys.add(key)
        doc_id = f"{path}::{form.name}" + (f"#{k}" if k > 1 else "")
        out.append(CodeSnippet(doc_id=doc_id, path=path, name=form.name, source=text))
        return True

    stack = [root]
    while stack:
        node = stack.pop()
        if node.type in _FUNCTION_TYPES and not (
            node.type == "arrow_function"
            and getattr(node.child_by_field_name("body"), "type", None) != "statement_block"
        ) and consider(node):
            continue
        stack.extend(reversed(node.children))
    return out


def _resolve(packages: Sequence[str | NpmPackage] | None) -> list[NpmPackage]:
    if packages is None:
        return list(PACKAGES)
    known = {p.name: p for p in PACKAGES}
    out = []
    for p in packages:
        if isinstance(p, NpmPackage):
            out.append(p)
        elif p in known:
            out.append(known[p])
        else:
            raise ValueError(f"unknown npm package {p!r}; known: {sorted(known)} (or pass an NpmPackage).")
    return out


def iter_npm_functions(
    max_functions: int | None = None,
    seed: int = 0,
    packages: Sequence[str | NpmPackage] | None = None,
    *,
    min_lines: int = 3,
    max_lines: int = 60,
    max_chars: int = 3000,
    rejected: Counter[str] | None = None,
    timeout: float = 60.0,
) -> list[CodeSnippet]:
    """JavaScript functions from pinned npm packages, downloaded and cached on first use.

    Parameters
    ----------
    max_functions : int or None
        How many snippets to return; ``None`` returns all. Otherwise a seeded
        random sample (a smaller sample with the same seed is a subset of a
        larger one).
    seed : int
        Seed of the sample.
    packages : sequence of str or NpmPackage, or None
        Names from :data:`PACKAGES` or package objects; ``None`` = all of
        :data:`PACKAGES`, in that order.
    min_lines, max_lines, max_chars
        Size limits, as :func:`extract_functions`.
    rejected : Counter or None
        Updated with the rejection counts of :func:`extract_functions`
        (duplicates are detected across all packages; the first occurrence in
        package, file, source order is kept).
    timeout : float
        Seconds per download.

    Returns
    -------
    list of CodeSnippet
        ``path`` is ``"<package>/<file>"`` (e.g. ``"lodash/_baseEach.js"``), so
        :func:`probekit.data.code.split_by_file` keeps each file in one split.
        Sorted by package, path, then source position.

    Raises
    ------
    NpmDownloadError, NpmIntegrityError
        See :func:`fetch_package`.
    """
    if max_functions is not None and max_functions < 0:
        raise ValueError(f"max_functions must be >= 0 or None, got {max_functions}.")
    if min_lines < 1 or max_lines < min_lines or max_chars < 1:
        raise ValueError(
            f"need 1 <= min_lines <= max_lines and max_chars >= 1, got min_lines={min_lines}, "
            f"max_lines={max_lines}, max_chars={max_chars}.")
    rejected = Counter() if rejected is None else rejected
    seen: set[str] = set()
    snippets: list[CodeSnippet] = []
    for pkg in _resolve(packages):
        root = fetch_package(pkg, timeout=timeout)
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        for rel in manifest["files"]:
            text = (root / rel).read_text(encoding="utf-8")
            text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
            snippets.extend(extract_functions(
                text, f"{pkg.name}/{rel}", min_lines=min_lines, max_lines=max_lines,
                max_chars=max_chars, rejected=rejected, seen_keys=seen))
    if max_functions is None:
        return snippets
    order = list(range(len(snippets)))
    random.Random(seed).shuffle(order)
    if len(order) < max_functions:
        warnings.warn(f"only {len(order)} JavaScript functions qualify; returning all of them "
                      f"instead of {max_functions}.", stacklevel=2)
    return [snippets[i] for i in sorted(order[:max_functions])]
