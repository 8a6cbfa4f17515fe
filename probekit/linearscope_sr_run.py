"""LinearScope on the ×2 super-resolution CNN: train (or load) it, analyse test patches, write JSON + plotly HTML.

Writes ``<cache root>/results/linearscope-sr/sr-cnn.json`` (payload ``kind="linearscope_sr"``: the config, the
per-patch arrays, headline estimates with n and 95% intervals, the verdict) and ``sr-cnn.html`` (the figures).

Example
-------
>>> from probekit.linearscope_sr_run import SRAnalysisConfig, run_sr_analysis
>>> res = run_sr_analysis(SRAnalysisConfig(n_test=64))          # doctest: +SKIP
>>> print(res.verdict["text"])                                   # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .probes.linearscope_sr import SRAnalysisResult, analyze_sr
from .stats import MIN_N, N_BOOT

__all__ = ["SRAnalysisConfig", "run_sr_analysis", "RESULT_KIND"]

RESULT_KIND = "linearscope_sr"


@dataclass
class SRAnalysisConfig:
    """What :func:`run_sr_analysis` computes.

    n_test : test patches (the units of every interval); below 30 the headlines say "too few to conclude".
    lr_size : LR side ``s`` (output ``2s``; ``A`` is ``(4s², s²)``; a power of two for the wavelet bases).
    ks, k_headline : energy sweep and the ``k`` of the headline numbers (``k_headline`` one of ``ks``).
    window : localisation radius in LR pixels. atoms : coefficients kept in the singular vectors' sparsity.
    seed : test patches, random bases and bootstrap. model_seed, steps, width: the network (cached per value).
    cache_model : load/save the trained weights under ``<cache root>/models/sr-cnn/``.
    out : output folder (default ``<cache root>/results/linearscope-sr``); ``write=False`` writes nothing.
    """

    n_test: int = 64
    lr_size: int = 8
    ks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    k_headline: int = 8
    window: int = 1
    atoms: int = 4
    seed: int = 0
    model_seed: int = 0
    steps: int = 3000
    width: int = 32
    n_boot: int = N_BOOT
    cache_model: bool = True
    out: str | None = None
    write: bool = True

    def __post_init__(self) -> None:
        for name in ("n_test", "lr_size", "steps", "width", "n_boot"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SRAnalysisConfig.{name} must be a positive int, got {v!r}")
        if self.lr_size < 2 or self.lr_size & (self.lr_size - 1):
            raise ValueError(f"SRAnalysisConfig.lr_size must be a power of two ≥ 2 (orthonormal wavelet bases of "
                             f"the LR and HR patches), got {self.lr_size}")
        self.ks = tuple(int(k) for k in self.ks)
        n_in = self.lr_size ** 2
        if not self.ks or any(not 1 <= k <= n_in for k in self.ks) or list(self.ks) != sorted(set(self.ks)):
            raise ValueError(f"SRAnalysisConfig.ks must be increasing, distinct and in [1, lr_size² = {n_in}], "
                             f"got {self.ks}")
        if self.k_headline not in self.ks:
            raise ValueError(f"SRAnalysisConfig.k_headline={self.k_headline} must be one of ks={self.ks}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"SRAnalysisConfig.window must be an int ≥ 0, got {self.window!r}")
        if isinstance(self.atoms, bool) or not isinstance(self.atoms, int) or not 1 <= self.atoms <= 4 * n_in:
            raise ValueError(f"SRAnalysisConfig.atoms must be an int in [1, 4 lr_size² = {4 * n_in}], "
                             f"got {self.atoms!r}")


def run_sr_analysis(cfg: SRAnalysisConfig = SRAnalysisConfig()) -> SRAnalysisResult:
    """Load or train the SR CNN, analyse ``cfg.n_test`` test patches, write the JSON and HTML, return the result."""
    from .html_page import write_figures_page
    from .paths import results_dir
    from .sr_cnn import load_sr_cnn, sr_patches

    model = load_sr_cnn(cfg.cache_model, seed=cfg.model_seed, steps=cfg.steps, width=cfg.width)
    lr, hr = sr_patches("test", cfg.n_test, lr_size=cfg.lr_size, seed=cfg.seed)
    info = {"model": "sr-cnn", "model_seed": cfg.model_seed, "steps": cfg.steps, "width": cfg.width,
            "train_info": getattr(model, "train_info", {})}
    res = analyze_sr(model, lr, hr, ks=cfg.ks, k_headline=cfg.k_headline, window=cfg.window, atoms=cfg.atoms,
                     seed=cfg.seed,
                     n_boot=cfg.n_boot, model_info=info)
    if cfg.n_test < MIN_N:
        print(f"[probekit linearscope-sr] n_test={cfg.n_test} < {MIN_N}: too few to conclude")
    print(f"[probekit linearscope-sr] {res.verdict['text']}")
    if cfg.write:
        root = Path(cfg.out) if cfg.out else results_dir() / "linearscope-sr"
        root.mkdir(parents=True, exist_ok=True)
        payload = {"kind": RESULT_KIND, "config": asdict(cfg), **res.to_dict()}
        path = root / "sr-cnn.json"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(payload, indent=1))
        os.replace(tmp, path)
        write_figures_page(root / "sr-cnn.html", res.figures(), title="probekit LinearScope: super-resolution CNN")
        print(f"[probekit linearscope-sr] wrote {path} and {root / 'sr-cnn.html'}")
    return res
