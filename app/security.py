"""The app's only gate to the file system: every path it opens is built by :func:`safe_path`.

Rules (the app reads and deletes files inside one cache root, and nothing else):

* a path part may not be absolute, may not contain a ``..`` component, a NUL byte or a backslash;
* the resolved path (symlinks followed) must lie inside the resolved root, so a symlink in the cache that
  points elsewhere is refused rather than followed;
* ids that name things in the cache (run ids, result-set ids, model folders) are checked against fixed
  patterns before they reach a path at all.

Example
-------
>>> safe_path("/tmp", "runs", "0123456789abcdef01234567").name
'0123456789abcdef01234567'
>>> safe_path("/tmp", "../etc")  # doctest: +IGNORE_EXCEPTION_DETAIL
Traceback (most recent call last):
UnsafePathError: ...
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

#: A run folder is named by the first 24 hex digits of its config hash (``probekit.cache.RunKey.run_id``).
RUN_ID_RE = re.compile(r"^[0-9a-f]{24}$")
#: One path component of a result set (model names like ``smollm2-135m``, ``qwen2.5-coder-0.5b``).
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
#: Hook names: bridge names or dotted module paths.
HOOK_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.]{0,199}$")


class UnsafePathError(ValueError):
    """A path or id would leave the cache root, or does not have the expected form."""


def safe_path(root: str | Path, *parts: str) -> Path:
    """Join ``parts`` under ``root`` and return the resolved path, refusing anything outside ``root``.

    Parameters
    ----------
    root : str or Path
        The cache root. It is resolved once (a root that is itself a symlink is fine).
    *parts : str
        Relative path parts; each may hold ``/`` separators.

    Returns
    -------
    Path
        The resolved path (it need not exist).

    Raises
    ------
    UnsafePathError
        On an absolute part, a ``..`` component, a NUL byte or backslash, or a resolved path (after
        following symlinks) outside the root.
    """
    base = Path(root).resolve()
    rel = PurePosixPath()
    for part in parts:
        part = str(part)
        if not part or "\x00" in part or "\\" in part:
            raise UnsafePathError(f"refused path part {part!r}: empty, or holds a NUL byte or backslash")
        p = PurePosixPath(part)
        if p.is_absolute() or part.startswith("~"):
            raise UnsafePathError(f"refused absolute path {part!r}: paths are relative to the cache root")
        if ".." in p.parts:
            raise UnsafePathError(f"refused path {part!r}: '..' is not allowed")
        rel = rel / p
    full = (base / rel).resolve()
    if full != base and not full.is_relative_to(base):
        raise UnsafePathError(f"refused path {str(rel)!r}: it resolves outside the cache root (symlink?)")
    return full


def check_run_id(run_id: object) -> str:
    """Return ``run_id`` if it is a full run id (24 lowercase hex digits), else raise ``UnsafePathError``."""
    if not isinstance(run_id, str) or not RUN_ID_RE.match(run_id):
        raise UnsafePathError(f"not a run id: {str(run_id)[:60]!r} (expected 24 hex digits)")
    return run_id


def check_name(name: object, what: str = "name") -> str:
    """Return ``name`` if it is one safe path component (letters, digits, ``._+-``), else raise."""
    if not isinstance(name, str) or not NAME_RE.match(name) or name in (".", ".."):
        raise UnsafePathError(f"not a valid {what}: {str(name)[:60]!r}")
    return name


def check_hook(hook: object) -> str:
    """Return ``hook`` if it looks like a hook name (``blocks.3.hook_resid_post``, ``features.3``)."""
    if not isinstance(hook, str) or not HOOK_RE.match(hook) or ".." in hook:
        raise UnsafePathError(f"not a hook name: {str(hook)[:60]!r}")
    return hook
