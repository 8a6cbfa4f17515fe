"""tree-sitter plumbing shared by the code corpora (``data/``) and the syntax trees (``probes/ast_tree``).

Public API
----------
LANGUAGES
ATOMIC_TYPES
check_language
parser
byte_to_char
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

__all__ = ["LANGUAGES", "ATOMIC_TYPES", "check_language", "parser", "byte_to_char"]

#: Languages the tree-sitter code supports; ``language=`` arguments take one of these.
LANGUAGES = ("python", "javascript")

# Node types that stand for one literal token although tree-sitter gives them
# children (string quotes and fragments, interpolations, regex parts).
ATOMIC_TYPES = {
    "python": frozenset({"string"}),
    "javascript": frozenset({"string", "template_string", "regex"}),
}

_GRAMMARS = {"python": "tree_sitter_python", "javascript": "tree_sitter_javascript"}


def check_language(language: str) -> str:
    """Return ``language`` if it is one of :data:`LANGUAGES`, else raise ValueError."""
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}.")
    return language


@lru_cache(maxsize=None)
def parser(language: str = "python") -> Any:
    """A tree-sitter parser for ``language`` (one per language, cached)."""
    check_language(language)
    module = _GRAMMARS[language]
    # Imported lazily so the label helpers of probekit.data.code work without tree-sitter.
    try:
        import importlib

        grammar = importlib.import_module(module)
        from tree_sitter import Language, Parser
    except ImportError as exc:  # pragma: no cover - depends on the environment
        pkg = module.replace("_", "-")
        raise ImportError(
            f"probekit.data.treesitter needs tree-sitter and {pkg} for language={language!r}; "
            f"install them with `pip install 'tree-sitter>=0.23' '{pkg}>=0.23'`."
        ) from exc
    return Parser(Language(grammar.language()))


def byte_to_char(source: str, data: bytes) -> list[int] | None:
    """Map UTF-8 byte offset -> char offset (length ``len(data) + 1``); None if ASCII.

    ``data`` is ``source.encode("utf-8", errors="surrogatepass")``; tree-sitter reports byte offsets.
    """
    if len(data) == len(source):
        return None
    table = [0] * (len(data) + 1)
    pos = 0
    for i, ch in enumerate(source):
        n = len(ch.encode("utf-8", errors="surrogatepass"))
        for k in range(n):
            table[pos + k] = i
        pos += n
    table[pos] = len(source)
    return table
