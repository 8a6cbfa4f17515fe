"""The app's gates: every path it opens is built by :func:`safe_path`, every request passes
:func:`request_refusal`, every callback value is checked before use.

Rules for files (the app reads and deletes files inside one cache root, and nothing else):

* a path part may not be absolute, may not contain a ``..`` component, a NUL byte or a backslash;
* the resolved path (symlinks followed) must lie inside the resolved root, so a symlink in the cache that
  points elsewhere is refused rather than followed;
* ids that name things in the cache (run ids, result-set ids, model folders) are checked against fixed
  patterns before they reach a path at all.

Rules for requests (a web page in the user's browser must not drive the app; see :func:`install_guards`):

* **Host** must name the address the app serves, on its port: ``127.0.0.1``, ``localhost``, ``[::1]``, the
  bound address, or a name given with ``extra_hosts``; a server bound to every interface (``0.0.0.0``, ``::``)
  also answers an IP-literal Host. This holds for reads too: a DNS-rebinding page (``attacker.example``
  resolved to 127.0.0.1) is same-origin with itself and could otherwise read the cache through the app.
* **Origin** (or, without one, **Referer**) of a state-changing request (every method but GET, HEAD and
  OPTIONS; Dash runs every callback, deletes and jobs included, as a POST) must be the app's own scheme, host
  and port. A request with neither header is not from a web page (browsers send Origin on every cross-origin
  POST) and passes.
* Every response carries ``X-Frame-Options: DENY``, ``X-Content-Type-Options: nosniff``,
  ``Referrer-Policy: same-origin`` and a Content-Security-Policy (:func:`app_csp`); standalone result pages get
  a sandboxing one (:data:`RESULT_PAGE_CSP`).

Example
-------
>>> safe_path("/tmp", "runs", "0123456789abcdef01234567").name
'0123456789abcdef01234567'
>>> safe_path("/tmp", "../etc")  # doctest: +IGNORE_EXCEPTION_DETAIL
Traceback (most recent call last):
UnsafePathError: ...
"""

from __future__ import annotations

import ipaddress
import math
import re
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable
from urllib.parse import urlsplit

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


#: Digits of the largest index :func:`check_index` accepts: file names built from it stay short.
MAX_INDEX_DIGITS = 9


def check_index(value: object, what: str, *, upper: int | None = None) -> int:
    """Return ``value`` as an index in ``[0, upper)`` (no bound when ``upper`` is None), else raise ``ValueError``.

    Accepted: an int (not a bool), a float holding a whole number, or a string of decimal digits, as a Dash
    control or a URL may send them. Anything else (a list, a dict, ``inf``, ``1.5``, ``-1``, 40-digit numbers)
    raises ``ValueError("not a <what> index: …")``.
    """
    i = None
    if isinstance(value, int) and not isinstance(value, bool):
        i = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        i = int(value)
    elif isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= MAX_INDEX_DIGITS:
        i = int(value)
    limit = 10**MAX_INDEX_DIGITS if upper is None else upper
    if i is None or not 0 <= i < limit:
        bound = f"0 … {limit - 1}" if upper is not None else "a whole number ≥ 0"
        raise ValueError(f"not a {what} index: {str(value)[:40]!r} (expected {bound})")
    return i


def choice_or(value: object, choices, default):
    """``value`` when it is one of ``choices`` (a string key), else ``default``: a hostile control value (a list,
    a dict) falls back like an unknown one instead of failing on an unhashable lookup."""
    return value if isinstance(value, str) and value in choices else default


def text_or_none(value: object, what: str) -> str | None:
    """``value`` if it is a string or None, else ``ValueError`` naming ``what`` (a form field sent a list…)."""
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"{what} must be text, not {type(value).__name__}.")


# --------------------------------------------------------------------------------------------- requests

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::", "")
_HOST_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?$")

#: Dash renders from its own files (``'self'``) plus one inline start-up script, allowed by its hash
#: (:func:`app_csp`). plotly.js injects ``<style>`` elements (``'unsafe-inline'`` styles; CSS cannot run code),
#: images may be ``data:``/``blob:`` URIs (heatmap images, the modebar's PNG download). No ``'unsafe-eval'``:
#: the app's trace types (bar, scatter, heatmap, image, table) do not need it (checked in a browser test).
_APP_CSP = ("default-src 'self'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; object-src 'none'; "
            "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
#: A standalone result page (``/files/results/….html``) runs its own inline plotly scripts, so it is sandboxed
#: instead: an opaque origin that may load plotly.min.js but connect nowhere (``default-src 'none'``); a request
#: it could still make (a form post) carries ``Origin: null`` and is refused.
RESULT_PAGE_CSP = ("sandbox allow-scripts allow-downloads; default-src 'none'; script-src 'self' 'unsafe-inline'; "
                   "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self' data:; "
                   "frame-ancestors 'none'")


def app_csp(inline_hashes: Iterable[str]) -> str:
    """The app's Content-Security-Policy, allowing exactly the inline scripts whose CSP hashes are given
    (``"'sha256-…'"``, as :meth:`dash.Dash.csp_hashes` returns them)."""
    return _APP_CSP.format(hashes=" ".join(inline_hashes)).replace("  ", " ")


def _host_port(netloc: str | None, default_port: int) -> tuple[str, int] | None:
    """``"LocalHost:8050"`` → ``("localhost", 8050)``, ``"[::1]"`` → ``("::1", default_port)``; None when
    malformed (user info, a path, spaces, a bad port)."""
    if not netloc or not _HOST_RE.match(netloc):
        return None
    try:
        parts = urlsplit("//" + netloc)
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    return (host, default_port if port is None else port) if host else None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def request_refusal(*, method: str, host: str | None, origin: str | None, referer: str | None, scheme: str,
                    bind_host: str, port: int, extra_hosts: Iterable[str] = ()) -> str | None:
    """Why a request must be refused, or None when it may pass (see the module docstring for the rules).

    Parameters
    ----------
    method, host, origin, referer : str or None
        The request's method and its ``Host``, ``Origin`` and ``Referer`` headers.
    scheme : str
        ``"http"`` or ``"https"``: the scheme the request arrived on.
    bind_host, port : str, int
        The address the server is bound to (``127.0.0.1``, ``0.0.0.0`` …) and its port.
    extra_hosts : iterable of str
        Further host names that reach this server (``myhost.lan``), allowed at ``port``.

    Returns
    -------
    str or None
        A short reason naming the header (``Host``, ``Origin`` or ``Referer``) and what to do, or None.
    """
    default = 443 if scheme == "https" else 80
    bind = (bind_host or "").strip("[]").lower()
    names = {*LOOPBACK_NAMES, bind, *(h.strip("[]").lower() for h in extra_hosts)} - {""}
    asked = _host_port(host, default)
    ok = asked is not None and asked[1] == port and (
        asked[0] in names or (bind in WILDCARD_BINDS and _is_ip(asked[0])))
    if not ok:
        return (f"refused: Host {str(host)[:100]!r} is not an address this app serves (port {port}); open it as "
                f"http://127.0.0.1:{port}/ (a name of its own needs `probekit app --allow-host NAME`)")
    if method.upper() in SAFE_METHODS:
        return None
    for header, value in (("Origin", origin), ("Referer", referer)):
        if value is None:
            continue
        try:
            parts = urlsplit(value)
            sender = (parts.scheme, _host_port(parts.netloc, 443 if parts.scheme == "https" else 80))
        except ValueError:
            sender = None
        if sender != (scheme, asked):
            return (f"refused: a state-changing request from another origin ({header} {value[:100]!r}); "
                    f"only the app's own pages at {scheme}://{host} may send one")
        return None  # Origin decides when present; Referer only stands in for it
    return None


def _is_slot(x: object) -> bool:
    return isinstance(x, dict) and "id" in x and isinstance(x.get("property"), str)


def callback_body_problem(body: object, callbacks: dict) -> str | None:
    """What makes ``body`` not a request the Dash renderer sends to ``/_dash-update-component``, or None.

    Checked: a JSON object naming a registered callback (``output``), whose ``inputs`` and ``state`` are lists
    as long as the callback's, each item an ``{"id", "property", "value"}`` slot or (a pattern ``ALL`` input) a
    list of them, and ``changedPropIds`` a list of strings. The values themselves are each callback's business.
    ``callbacks`` is ``dash.Dash.callback_map``.
    """
    if not isinstance(body, dict):
        return "the body is not a JSON object"
    output = body.get("output")
    if not isinstance(output, str) or output not in callbacks:
        return f"no callback for output {str(output)[:80]!r}"
    cb = callbacks[output]
    for part in ("inputs", "state"):
        items = body.get(part, [])
        if not isinstance(items, list) or len(items) != len(cb.get(part, [])):
            return f"{part} must be a list of {len(cb.get(part, []))} item(s)"
        if not all(_is_slot(x) or (isinstance(x, list) and all(map(_is_slot, x))) for x in items):
            return f"every item of {part} must be an object with an id and a property"
    changed = body.get("changedPropIds", [])
    if not isinstance(changed, list) or not all(isinstance(c, str) for c in changed):
        return "changedPropIds must be a list of strings"
    outputs = body.get("outputs")
    if outputs is not None and not (_is_slot(outputs) or (isinstance(outputs, list) and all(
            _is_slot(o) or (isinstance(o, list) and all(map(_is_slot, o))) for o in outputs))):
        return "outputs must be an {id, property} object or a list of them"
    return None


def install_guards(server, *, inline_hashes: Callable[[], Iterable[str]] = tuple,
                   extra_hosts: Iterable[str] = (), callbacks: dict | None = None) -> None:
    """Check Host/Origin on every request of the Flask ``server`` and add the security headers to every response.

    ``inline_hashes`` returns the CSP hashes of the page's inline scripts (``dash.Dash.csp_hashes``); it is
    called once, at the first response, when every callback is registered. With ``callbacks``
    (``dash.Dash.callback_map``), a callback request of the wrong shape gets a 400 naming the problem
    (:func:`callback_body_problem`) instead of failing inside Dash.

    The served address is the one the server socket is bound to (``SERVER_NAME``/``SERVER_PORT`` as Werkzeug's
    server fills them in, which ``probekit app`` runs); behind another WSGI server that fills them from the
    request's Host, name the host with ``extra_hosts`` and put the app behind a proxy that checks Host.
    """
    import flask

    extra = tuple(extra_hosts)
    csp_cache: dict = {}

    @server.before_request
    def _guard():
        req = flask.request
        try:
            port = int(req.environ.get("SERVER_PORT") or 0)
        except ValueError:
            port = -1
        why = request_refusal(method=req.method, host=req.headers.get("Host"), origin=req.headers.get("Origin"),
                              referer=req.headers.get("Referer"), scheme=req.scheme,
                              bind_host=str(req.environ.get("SERVER_NAME", "")), port=port, extra_hosts=extra)
        if why is not None:
            return flask.Response(why + "\n", status=403, mimetype="text/plain")
        if callbacks is not None and req.method == "POST" and req.path.endswith("/_dash-update-component"):
            problem = callback_body_problem(req.get_json(silent=True), callbacks)
            if problem is not None:
                return flask.Response(f"bad callback request: {problem}\n", status=400, mimetype="text/plain")
        return None

    @server.after_request
    def _headers(resp):
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "same-origin"
        if "Content-Security-Policy" not in resp.headers:  # a result page sets its own sandboxing policy
            if "csp" not in csp_cache:  # every callback (and its inline script) is registered by the first request
                csp_cache["csp"] = app_csp(inline_hashes())
            resp.headers["Content-Security-Policy"] = csp_cache["csp"]
        return resp
