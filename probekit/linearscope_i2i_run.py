"""LinearScope on the denoising CNN (image-to-image): copy, move and template measures, written as JSON + HTML.

Writes ``<cache root>/results/linearscope-sr/denoise-cnn.json`` (``kind="linearscope_i2i"``) and ``.html``.

Example
-------
>>> from probekit.linearscope_i2i_run import I2IAnalysisConfig, run_i2i_analysis
>>> res = run_i2i_analysis(I2IAnalysisConfig(n_test=64))       # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .probes.linearscope_i2i import I2IAnalysisResult, analyze_i2i
from .stats import N_BOOT

__all__ = ["I2IAnalysisConfig", "run_i2i_analysis", "RESULT_KIND"]

RESULT_KIND = "linearscope_i2i"


@dataclass
class I2IAnalysisConfig:
    """What :func:`run_i2i_analysis` computes: ``n_test`` noisy 16×16 test patches (the units of every interval),
    window radius and largest searched shift, seeds (test patches and bootstrap; the network), the network's
    training steps and width, the bootstrap size, and where to write (``write=False``: nothing)."""

    n_test: int = 64
    window: int = 1
    max_shift: int = 4
    seed: int = 0
    model_seed: int = 0
    steps: int = 1500
    width: int = 16
    n_boot: int = N_BOOT
    cache_model: bool = True
    out: str | None = None
    write: bool = True

    def __post_init__(self) -> None:
        for name in ("n_test", "steps", "width", "n_boot"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"I2IAnalysisConfig.{name} must be a positive int, got {v!r}")
        if not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"I2IAnalysisConfig.window must be an int ≥ 0, got {self.window!r}")
        if not isinstance(self.max_shift, int) or self.max_shift < 2 * self.window + 1:
            raise ValueError(f"I2IAnalysisConfig.max_shift must be ≥ 2·window + 1 = {2 * self.window + 1}, "
                             f"got {self.max_shift!r}")


def run_i2i_analysis(cfg: I2IAnalysisConfig = I2IAnalysisConfig()) -> I2IAnalysisResult:
    """Load or train the denoiser, analyse ``cfg.n_test`` test patches, write JSON + HTML, return the result."""
    from .denoise_cnn import denoise_patches, load_denoise_cnn
    from .html_page import write_figures_page
    from .paths import results_dir

    model = load_denoise_cnn(cfg.cache_model, seed=cfg.model_seed, steps=cfg.steps, width=cfg.width)
    x, clean = denoise_patches("test", cfg.n_test, seed=cfg.seed)
    info = {"model": "denoise-cnn", "model_seed": cfg.model_seed, "steps": cfg.steps, "width": cfg.width,
            "train_info": getattr(model, "train_info", {})}
    res = analyze_i2i(model, x, clean, window=cfg.window, max_shift=cfg.max_shift, seed=cfg.seed,
                      n_boot=cfg.n_boot, model_info=info)
    est = res.estimates()
    print(f"[probekit linearscope-i2i] copy share {est['copy_share']}; move fraction {est['move_fraction']}; "
          f"template share {est['template_share']}")
    if cfg.write:
        root = Path(cfg.out) if cfg.out else results_dir() / "linearscope-sr"
        root.mkdir(parents=True, exist_ok=True)
        path = root / "denoise-cnn.json"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"kind": RESULT_KIND, "config": asdict(cfg), **res.to_dict()}, indent=1))
        os.replace(tmp, path)
        write_figures_page(root / "denoise-cnn.html", res.figures(), title="probekit LinearScope: denoising CNN")
        print(f"[probekit linearscope-i2i] wrote {path} and {root / 'denoise-cnn.html'}")
    return res
