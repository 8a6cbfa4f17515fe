"""``probekit report CONFIG.yaml``: capture → probes → one self-contained HTML report plus ``metrics.json``.

A config names the model and the probes with their settings::

    name: smollm2-syntax            # report folder: reports/<name>/
    model: smollm2-135m             # registry name, local folder or Hub id (each probe may override it)
    probes:
      layer_probes: {n_functions: 100}
      ast_probe: {n_functions: 300, layers: [8, 17], k: 32, k_sweep: [8, 32]}
      linearscope: {digit_index: 0}
      dark_matter: {expansions: [2, 4, 8], n_code: 200, n_text: 100, epochs: 2}
      safety_weight: {fractions: [0.25, 0.75]}
      safety_activation: {model: qwen2.5-coder-0.5b}

Each probe's settings are the fields of its typed run config (:class:`~probekit.demo.DemoConfig`,
:class:`~probekit.ast_probe_run.ASTProbeRunConfig`, :class:`~probekit.linearscope_run.LinearScopeRunConfig`,
:class:`~probekit.dark_matter_run.DarkMatterRunConfig`, :class:`~probekit.safety_run.WeightRunConfig`,
:class:`~probekit.safety_run.ActivationRunConfig`); an unknown key is refused with the allowed ones listed.

Stages run in the config's order under one progress bar. A stage whose ``stage.json`` records the same settings
is reused; an interrupted stage restarts, and its capture resumes from the activation cache (and SAE training from
its checkpoints). ``reports/<name>/index.html`` holds a summary table (one finding per section), then one
section per probe, titled in words (:data:`STAGE_TITLES`), that opens with a sentence stating its finding with n
and a 95% CI and, for the seed papers, a table of their headline claims beside ours with a verdict
(:mod:`probekit.claims`); then the probe's figures (plotly.js inlined once: it opens offline), the config,
versions, the model's source and sha256, and the stage timings in a footer. ``reports/<name>/metrics.json`` holds
the same numbers (claims included) for machines.

A config may name setting overrides per scale (``scales: {paper: {ast_probe: {n_functions: 20000}}}``);
``probekit report CONFIG --scale paper`` applies them and writes ``reports/<name>-paper/``
(``configs/seeds.yaml``). A scale may also name a probe that ``probes`` leaves out: that stage runs at that
scale only (after the others).
"""

from __future__ import annotations

import dataclasses
import html
import json
import platform
import re
import time
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .models import DEFAULT_MODEL

__all__ = ["ReportConfig", "ReportConfigError", "STAGES", "load_config", "run_report", "headline_table",
           "headline_finding"]


class ReportConfigError(ValueError):
    """A report config that cannot run; the message names the bad key and the allowed values."""


def _stage_table() -> dict[str, tuple[type, Any]]:
    from .ast_probe_run import ASTProbeRunConfig, run_ast_probe
    from .dark_matter_run import DarkMatterRunConfig, run_dark_matter
    from .demo import DemoConfig, run_demo
    from .linearscope_i2i_run import I2IAnalysisConfig, run_i2i_analysis
    from .linearscope_run import LinearScopeRunConfig, run_linearscope
    from .linearscope_sr_run import SRAnalysisConfig, run_sr_analysis
    from .safety_run import ActivationRunConfig, WeightRunConfig, run_activation_space, run_weight_space

    return {"layer_probes": (DemoConfig, run_demo), "ast_probe": (ASTProbeRunConfig, run_ast_probe),
            "linearscope": (LinearScopeRunConfig, run_linearscope),
            "linearscope_sr": (SRAnalysisConfig, run_sr_analysis),
            "linearscope_i2i": (I2IAnalysisConfig, run_i2i_analysis),
            "dark_matter": (DarkMatterRunConfig, run_dark_matter),
            "safety_weight": (WeightRunConfig, run_weight_space),
            "safety_activation": (ActivationRunConfig, run_activation_space)}


#: Section titles in words (the stage identifiers stay the anchors: ``#ast_probe``).
STAGE_TITLES = {"layer_probes": "Linear probes per layer (syntax labels)",
                "ast_probe": "AST-Probe: is the syntax tree readable from a subspace?",
                "linearscope": "LinearScope: the linear system a network applies to one input",
                "linearscope_sr": "LinearScope on a super-resolution CNN: are its bases wavelet-like?",
                "linearscope_i2i": "LinearScope on an image-to-image CNN: copy, move and template",
                "dark_matter": "SAE dark matter: how much of the SAE error is predictable?",
                "safety_weight": "Safety subspaces in weight space",
                "safety_activation": "Safety subspaces in activation space and the refusal direction"}
STAGES = ("layer_probes", "ast_probe", "linearscope", "linearscope_sr", "linearscope_i2i", "dark_matter",
          "safety_weight", "safety_activation")
_MANAGED = ("out", "progress")  # set by the report itself
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# integer settings that count something and are meaningless below 1 (checked before any model loads)
_POSITIVE = frozenset({"batch_size", "eval_batch_size", "max_length", "epochs", "align_epochs", "useful_epochs",
                       "max_iter", "max_new_tokens", "k"})
_KIND = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}


def _expected(hint: Any) -> str | None:
    """What a YAML value of type ``hint`` looks like, or None for a type this check does not cover."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        parts = [_expected(a) for a in typing.get_args(hint)]
        return None if None in parts else " or ".join(parts)
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis and args[0] in _KIND:
            return f"a list of {_KIND[args[0]].removeprefix('an ').removeprefix('a ')}s"
        return None
    return _KIND.get(hint)


def _fits(value: Any, hint: Any) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return isinstance(value, (list, tuple)) and all(_fits(v, typing.get_args(hint)[0]) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _check_setting(where: str, value: Any, hint: Any) -> None:
    """A ReportConfigError naming ``where`` (``probes.<probe>.<key>``) when ``value`` has the wrong type, or is
    a count below 1."""
    expected = _expected(hint)
    if expected is not None and not _fits(value, hint):
        raise ReportConfigError(f"{where}: expected {expected}, got {type(value).__name__} {value!r}")
    if where.rpartition(".")[2] in _POSITIVE and isinstance(value, int) and value < 1:
        raise ReportConfigError(f"{where}: must be a positive integer (1 or more), got {value}")


@dataclass
class ReportConfig:
    """A validated report config (see the module docstring for the YAML form)."""

    name: str
    model: str = DEFAULT_MODEL
    probes: dict[str, dict[str, Any]] = field(default_factory=dict)
    out: str = "reports"
    #: named setting overrides per probe (``scales: {paper: {ast_probe: {n_functions: 20000}}}``), applied by
    #: :meth:`with_scale` (``probekit report CONFIG --scale paper``)
    scales: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("model", "out"):
            if not isinstance(getattr(self, key), str):
                raise ReportConfigError(f"{key}: expected a string, got {type(getattr(self, key)).__name__} "
                                        f"{getattr(self, key)!r}")
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ReportConfigError(f"name {self.name!r} must be 1–64 letters, digits, '_', '.', '-' (it names "
                                    "the report folder)")
        if not isinstance(self.probes, dict) or not self.probes:
            raise ReportConfigError(f"probes must be a non-empty mapping; allowed probes: {list(STAGES)}")
        for probe, settings in self.probes.items():
            if probe not in STAGES:
                raise ReportConfigError(f"unknown probe {probe!r}; allowed probes: {list(STAGES)}")
            if settings is not None and not isinstance(settings, dict):
                raise ReportConfigError(f"probes.{probe} must be a mapping of settings, got {type(settings).__name__}")
        if not isinstance(self.scales, dict):
            raise ReportConfigError(f"scales must be a mapping of scale name -> probe overrides, got "
                                    f"{type(self.scales).__name__}")
        for scale, over in self.scales.items():
            if not isinstance(over, dict):
                raise ReportConfigError(f"scales.{scale} must be a mapping of probe -> settings")
            for probe, settings in over.items():
                # a scale may add a stage the default size leaves out (the paper scale's weight-space stage)
                if probe not in STAGES:
                    raise ReportConfigError(f"scales.{scale}: unknown probe {probe!r}; allowed probes: "
                                            f"{list(STAGES)}")
                if settings is not None and not isinstance(settings, dict):
                    raise ReportConfigError(f"scales.{scale}.{probe} must be a mapping of settings, got "
                                            f"{type(settings).__name__}")
        self.stage_configs()  # every probe's settings checked up front, before anything runs
        for scale in self.scales:
            try:
                self.with_scale(scale)
            except ReportConfigError as exc:
                raise ReportConfigError(f"scales.{scale}: {exc}") from None

    def with_scale(self, scale: str | None) -> ReportConfig:
        """This config with the ``scales[scale]`` overrides merged into each probe's settings (None: unchanged).

        The scaled report gets its own folder, ``<name>-<scale>``, so its stages never reuse the small ones.
        """
        if scale is None:
            return self
        if scale not in self.scales:
            raise ReportConfigError(f"--scale {scale!r}: this config defines the scales {sorted(self.scales)}")
        over = self.scales[scale]
        probes = {p: {**(v or {}), **(over.get(p) or {})} for p, v in self.probes.items()}
        probes.update({p: dict(v or {}) for p, v in over.items() if p not in self.probes})  # stages it adds
        return ReportConfig(name=f"{self.name}-{scale}", model=self.model, probes=probes, out=self.out)

    @property
    def folder(self) -> Path:
        return Path(self.out) / self.name

    def stage_configs(self) -> dict[str, Any]:
        """The typed run config of every probe, in config order (``out`` points into the report folder)."""
        table = _stage_table()
        out = {}
        for probe, settings in self.probes.items():
            cls = table[probe][0]
            allowed = [f.name for f in dataclasses.fields(cls) if f.name not in _MANAGED]
            kw = dict(settings or {})
            for key in kw:
                if key not in allowed:
                    raise ReportConfigError(f"probes.{probe}: unknown setting {key!r}; allowed: {allowed}")
            if "model" in allowed:
                kw.setdefault("model", self.model)
            hints = typing.get_type_hints(cls)
            for key, value in kw.items():
                _check_setting(f"probes.{probe}.{key}", value, hints[key])
            for key, value in list(kw.items()):
                if isinstance(value, list) and "tuple" in str(hints.get(key, "")):
                    kw[key] = tuple(value)  # YAML lists → the tuple-typed fields
            names = {f.name for f in dataclasses.fields(cls)}
            managed = {k: v for k, v in (("out", str(self.folder / probe)), ("progress", True)) if k in names}
            try:
                out[probe] = cls(**kw, **managed)
            except (TypeError, ValueError) as exc:
                raise ReportConfigError(f"probes.{probe}: {exc}") from None
        return out


def load_config(path: str | Path) -> ReportConfig:
    """Read and validate a YAML report config."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ReportConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ReportConfigError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start}); a report "
                                "config is YAML text") from None
    except yaml.YAMLError as exc:
        raise ReportConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ReportConfigError(f"{path}: the config must be a mapping with keys name, model, probes")
    allowed = [f.name for f in dataclasses.fields(ReportConfig)]
    for key in data:
        if key not in allowed:
            raise ReportConfigError(f"{path}: unknown key {key!r}; allowed: {allowed}")
    if "name" not in data:
        raise ReportConfigError(f"{path}: missing key 'name' (the report folder name)")
    return ReportConfig(**data)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("probekit", "torch", "transformers", "transformer-lens", "numpy", "scikit-learn", "plotly"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _model_source(name: str) -> dict[str, Any]:
    """Where the weights came from and their sha256 (registry pin, or hashes of a local folder's files)."""
    from .models import REGISTRY, sha256_file

    if name in REGISTRY:
        s = REGISTRY[name]
        return dict(name=name, registry=True, description=s.description, license=s.license, hub_id=s.hub_id,
                    sources=[src.requirement for src in s.sources], sha256=s.sha256)
    folder = Path(name)
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".gguf"))
        return dict(name=name, registry=False, folder=str(folder.resolve()),
                    sha256={p.name: sha256_file(p) for p in files})
    return dict(name=name, registry=False, hub_id=name, sha256=None)


def _stage_payloads(folder: Path) -> list[dict]:
    from . import results

    return [results.load(p) for p in results.find(folder)]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def headline_table(head: dict[str, Any]) -> str:
    """HTML table of one payload's headline numbers: each number, its 95% CI with n (or why none), and the
    too-few caveat (:func:`probekit.results.headline_rows`)."""
    from .results import headline_rows

    out = ["<table class='headline'><tr><th>figure</th><th>value</th><th>95% CI (n)</th></tr>"]
    out += [f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td><td>{html.escape(ci)}</td></tr>"
            for k, v, ci in headline_rows(head)]
    out.append("</table>")
    return "".join(out)


def headline_finding(payloads: list[dict]) -> str:
    """The finding of a section no seed-paper claim covers: its first headline number that has a CI, with n."""
    from .results import headline, headline_rows

    for p in payloads:
        for k, _, ci in headline_rows(headline(p)):
            if "(n=" in ci:
                return f"{k}: {ci}."
    return "No seed-paper claim applies to this result, and it has no number with a CI."


def _claims_table(rows: list) -> str:
    """HTML table of claim rows: published (metric, model, value) beside ours (model, value, CI, n) and a verdict."""
    out = ["<table class='claims'><tr><th>claim</th><th>published model</th><th>published</th><th>our model</th>"
           "<th>ours (95% CI)</th><th>n</th><th>verdict</th></tr>"]
    for r in rows:
        e = r.estimate
        ours = "—" if e is None else f"{e.value:.3f} [{e.low:.3f}, {e.high:.3f}]"
        if e is None and "point" in r.extra:
            ours = f"{r.extra['point']:.3f} (no CI)"
        n = "—" if e is None else f"{e.n} {e.unit}"
        out.append(f"<tr><td>{html.escape(r.claim.metric)}</td><td>{html.escape(r.claim.model)}</td>"
                   f"<td>{html.escape(r.claim.published)}</td><td>{html.escape(r.model)}</td><td>{ours}</td>"
                   f"<td>{html.escape(n)}</td><td class='verdict'><b>{html.escape(r.verdict)}</b>: "
                   f"{html.escape(r.reason)}</td></tr>")
    out.append("</table>")
    return "".join(out)


def _write_index(cfg: ReportConfig, stages: dict[str, dict], meta: dict[str, Any]) -> Path:
    from . import results
    from .claims import finding

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(cfg.name)} — probekit report"
             "</title><style>body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
             "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:left}pre{background:#f6f6f6;padding:1em;overflow:auto}p.finding{font-size:1.1em}"
             "footer{color:#666;font-size:0.85em;border-top:1px solid #ccc;margin-top:2em}</style></head><body>",
             f"<h1>probekit report: {html.escape(cfg.name)}</h1>",
             f"<p>model <code>{html.escape(cfg.model)}</code>; generated {html.escape(meta['generated'])}. "
             "Intervals are 95% bootstrap CIs over the independent unit named beside each n; below "
             f"{_min_n()} units a number is shown as too few to conclude.</p>",
             "<h2 id='summary'>Summary</h2><table><tr><th>section</th><th>finding</th></tr>"]
    def said(st: dict) -> str:  # a section without a seed-paper claim states its own first number with a CI
        return finding(st["claims"]) if st["claims"] else headline_finding(st["payloads"])

    for probe, st in stages.items():
        parts.append(f"<tr><td><a href='#{probe}'>{html.escape(STAGE_TITLES[probe])}</a></td>"
                     f"<td>{html.escape(said(st))}</td></tr>")
    parts.append("</table>")
    first = True
    for probe, st in stages.items():
        parts.append(f"<h2 id='{probe}'>{html.escape(STAGE_TITLES[probe])}</h2>"
                     f"<p class='finding'>{html.escape(said(st))}</p>")
        if st["claims"]:
            parts.append(_claims_table(st["claims"]))
        for payload in st["payloads"]:
            parts.append("<details><summary>all headline numbers</summary>"
                         + headline_table(results.headline(payload)) + "</details>")
            for fig in results.figures(payload):
                if fig.layout.height is None:
                    fig.update_layout(height=500)
                parts.append(fig.to_html(full_html=False, include_plotlyjs=first))
                first = False
    parts.append("<h2 id='config'>Config</h2><pre>" + html.escape(json.dumps(asdict(cfg), indent=2)) + "</pre>")
    parts.append("<h2 id='model'>Model source</h2><pre>" + html.escape(json.dumps(meta["model_source"], indent=2))
                 + "</pre>")
    parts.append("<h2 id='versions'>Versions</h2><pre>" + html.escape(json.dumps(meta["versions"], indent=2))
                 + "</pre>")
    timing = "; ".join(f"{STAGE_TITLES[p].split(':')[0]} {st['seconds']:.0f} s{' (reused)' if st['reused'] else ''}"
                       for p, st in stages.items())
    parts.append(f"<footer id='timings'>Timings: {html.escape(timing)}.</footer></body></html>")
    path = cfg.folder / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _min_n() -> int:
    from .stats import MIN_N

    return MIN_N


def _claims(payloads: list[dict]) -> list:
    from .claims import claim_rows

    return [row for pl in payloads for row in claim_rows(pl)]


def _absent_weight_claims() -> list:
    """The safety paper's weight-space claim rows, "not assessed" because this config has no weight stage (so the
    safety section still lists every headline claim of the paper, and says where it is measured)."""
    from .claims import CLAIMS, ClaimRow

    why = ("the weight-space stage is not in this config (about 48 min alone on 2 CPU cores at a reduced size): "
           "`probekit report configs/seeds.yaml --scale paper` adds it, `probekit report configs/safety.yaml` runs it")
    return [ClaimRow(c, "—", None, "not assessed", why) for c in CLAIMS["safety_weight"]]


def run_report(cfg: ReportConfig) -> dict[str, Any]:
    """Run every stage (reusing finished ones) and write ``index.html`` and ``metrics.json``."""
    from tqdm.auto import tqdm

    from . import results

    table = _stage_table()
    stage_cfgs = cfg.stage_configs()
    cfg.folder.mkdir(parents=True, exist_ok=True)
    stages: dict[str, dict] = {}
    bar = tqdm(list(stage_cfgs.items()), desc=f"report {cfg.name}", unit="stage")
    for probe, scfg in bar:
        bar.set_postfix(stage=probe)
        folder = Path(scfg.out)
        marker = folder / "stage.json"
        settings = json.loads(json.dumps(asdict(scfg), default=str))
        done = json.loads(marker.read_text()) if marker.is_file() else None
        if done is not None and done.get("settings") == settings and _stage_payloads(folder):
            stages[probe] = dict(payloads=_stage_payloads(folder), seconds=done["seconds"], reused=True)
            stages[probe]["claims"] = _claims(stages[probe]["payloads"])
            continue
        t0 = time.perf_counter()
        table[probe][1](scfg)
        seconds = time.perf_counter() - t0
        marker.write_text(json.dumps(dict(settings=settings, seconds=seconds), indent=2))
        stages[probe] = dict(payloads=_stage_payloads(folder), seconds=seconds, reused=False)
        stages[probe]["claims"] = _claims(stages[probe]["payloads"])
    if "safety_activation" in stages and "safety_weight" not in stages:
        stages["safety_activation"]["claims"].extend(_absent_weight_claims())
    meta = dict(generated=time.strftime("%Y-%m-%d %H:%M:%S %Z"), versions=_versions(),
                model_source=_model_source(cfg.model),
                timings={p: round(s["seconds"], 1) for p, s in stages.items()})
    index = _write_index(cfg, stages, meta)
    metrics = dict(name=cfg.name, model=cfg.model, config=asdict(cfg), **meta,
                   stages={p: dict(seconds=round(s["seconds"], 1), reused=s["reused"],
                                   title=STAGE_TITLES[p], claims=[r.to_dict() for r in s["claims"]],
                                   results=[dict(kind=pl["kind"], headline=results.headline(pl))
                                            for pl in s["payloads"]]) for p, s in stages.items()})
    (cfg.folder / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    print(f"[probekit report] wrote {index} and {cfg.folder / 'metrics.json'}")
    return metrics
