"""One index of result sets, wherever a run or a report wrote them.

A probe run writes its JSON under ``<cache root>/results/<folder>/<model>/`` and ``probekit report`` writes the same
files under ``reports/<name>/<probe>/``. :func:`scan` finds both by their fixed file names and lists each set with
its model, probe kind, date and config, so the app (and anyone else) can offer every result it can show.

Ids: a cache set keeps the id the app has always used (``smollm2-135m``, ``smollm2-135m/javascript``; a LinearScope
digit its test index, ``3``); a report's set is ``report:<name>`` (``report:<name>/<index>`` for a digit), with
``/<folder>`` added when one report holds two sets of a kind.

>>> from pathlib import Path
>>> import tempfile, json
>>> d = Path(tempfile.mkdtemp())
>>> _ = (d / "demo" / "layer_probes").mkdir(parents=True)
>>> _ = (d / "demo" / "layer_probes" / "layer_probes.json").write_text(json.dumps({"model": "m", "config": {}}))
>>> [(s.id, s.kind, s.model) for s in scan_report(d / "demo")]
[('report:demo', 'demo', 'm')]
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = ["FILES", "ResultSet", "kind_of_file", "scan_cache", "scan_report", "scan"]

#: Result file name -> the kind the app calls it (one page per kind); LinearScope digits are ``digit-<i>.json``.
FILES = {"layer_probes.json": "demo", "ast_probe.json": "ast-probe", "dark_matter.json": "dark-matter",
         "token-contributions.json": "linearscope-lm", "activation.json": "safety-activation",
         "weight.json": "safety-weight"}
_DIGIT = re.compile(r"^digit-(\d+)\.json$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
#: Cache folder under ``results/`` of each kind (the layout the runs write).
CACHE_FOLDERS = {"demo": "demo", "ast-probe": "ast-probe", "dark-matter": "dark-matter",
                 "linearscope-lm": "linearscope", "linearscope-digits": "linearscope",
                 "safety-activation": "safety", "safety-weight": "safety"}
_MAX_DEPTH = 4


@dataclass(frozen=True)
class ResultSet:
    """One result file and what the index knows of it.

    ``id`` names it within its ``kind`` (see the module docstring); ``source`` is ``"cache"`` or
    ``"report <name>"``; ``date`` is the file's modification time (UTC, ISO 8601); ``config`` the run config the
    payload records (``{}`` when it records none).
    """

    id: str
    kind: str
    source: str
    path: Path
    model: str
    date: str
    config: dict = field(default_factory=dict, compare=False, hash=False)


def kind_of_file(name: str) -> str | None:
    """The kind of a result file name (``None`` for any other file)."""
    if _DIGIT.match(name):
        return "linearscope-digits"
    return FILES.get(name)


def _describe(path: Path, load: Callable[[Path], Any]) -> tuple[str, dict]:
    try:
        p = load(path)
    except (OSError, ValueError):
        return "?", {}
    if not isinstance(p, dict):
        return "?", {}
    cfg = p.get("config") if isinstance(p.get("config"), dict) else {}
    return str(p.get("model") or cfg.get("model") or ""), cfg


def _date(path: Path) -> str:
    t = _dt.datetime.fromtimestamp(path.stat().st_mtime, tz=_dt.timezone.utc)
    return t.strftime("%Y-%m-%d %H:%M UTC")


def _files(base: Path):
    """Result files under ``base`` (at most a few folders deep) that resolve inside it, sorted."""
    base = base.resolve()
    if not base.is_dir():
        return
    for p in sorted(base.rglob("*.json")):
        rel = p.relative_to(base)
        if len(rel.parts) > _MAX_DEPTH or not all(_NAME.match(x) for x in rel.parts):
            continue
        kind = kind_of_file(p.name)
        if kind is None or not p.is_file() or not p.resolve().is_relative_to(base):
            continue  # a symlink out of the folder is never followed
        yield kind, rel, p


def scan_cache(results: str | Path, *, load: Callable[[Path], Any] = lambda p: json.loads(p.read_text())
               ) -> list[ResultSet]:
    """Result sets under a cache root's ``results/`` folder, with the ids the app uses."""
    out = []
    for kind, rel, p in _files(Path(results)):
        if rel.parts[0] != CACHE_FOLDERS[kind] or len(rel.parts) < 3:
            continue
        if kind == "linearscope-digits":
            if rel.parts[1:-1] != ("digits-cnn",):
                continue
            rid = _DIGIT.match(p.name).group(1)
        else:
            if kind == "linearscope-lm" and rel.parts[1] == "digits-cnn":
                continue
            rid = "/".join(rel.parts[1:-1])
            if len(rel.parts) > 4:
                continue
        model, cfg = _describe(p, load)
        out.append(ResultSet(rid, kind, "cache", p, model, _date(p), cfg))
    return out


def scan_report(folder: str | Path, *, load: Callable[[Path], Any] = lambda p: json.loads(p.read_text())
                ) -> list[ResultSet]:
    """Result sets of one report folder (``reports/<name>/``): ids ``report:<name>`` (see the module docstring)."""
    folder = Path(folder)
    name = folder.name
    if not _NAME.match(name):
        return []
    found = list(_files(folder))
    per_kind: dict[str, int] = {}
    for kind, _, _ in found:
        if kind != "linearscope-digits":
            per_kind[kind] = per_kind.get(kind, 0) + 1
    out = []
    for kind, rel, p in found:
        rid = f"report:{name}"
        if kind == "linearscope-digits":
            rid += f"/{_DIGIT.match(p.name).group(1)}"
        elif per_kind[kind] > 1:
            rid += "/" + "/".join(rel.parts[:-1])
        model, cfg = _describe(p, load)
        out.append(ResultSet(rid, kind, f"report {name}", p, model, _date(p), cfg))
    return out


def scan(cache_results: str | Path | None, report_dirs=(), *,
         load: Callable[[Path], Any] = lambda p: json.loads(p.read_text())) -> list[ResultSet]:
    """Every result set: those under ``cache_results`` (a cache root's ``results/``), then those of each report
    folder inside each of ``report_dirs`` (folders like ``./reports`` holding ``<name>/`` report folders)."""
    out = scan_cache(cache_results, load=load) if cache_results is not None else []
    for d in report_dirs:
        d = Path(d)
        for sub in sorted(d.iterdir()) if d.is_dir() else []:
            if sub.is_dir() and sub.resolve().is_relative_to(d.resolve()):
                out += scan_report(sub, load=load)
    return out
