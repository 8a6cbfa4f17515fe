"""``probekit linearscope``: LinearScope outputs for the digits CNN and for a prompt on a decoder LM.

Writes JSON + plotly HTML under ``<cache root>/results/linearscope/``:

- ``digits-cnn/``: for one test digit, the input, the class rows of A as images ("votes"), the bias share
  b_k / y_k per class, the top singular vectors as images; the bias share over the whole test set.
- ``<model>/``: the exact reconstruction error of the logits (float32 and float64) and, for a prompt, each
  token's contribution to the predicted next-token logit beside gradient × input.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .html_page import write_figures_page
from .models import DEFAULT_MODEL
from .paths import results_dir


@dataclass
class LinearScopeRunConfig:
    """What ``probekit linearscope`` computes."""

    digit_index: int = 0
    model: str = DEFAULT_MODEL
    prompt: str = "def add(a, b):\n    return a +"
    k: int = 4
    out: str | None = None
    skip_lm: bool = False

    def __post_init__(self) -> None:
        if self.digit_index < 0:
            raise ValueError("digit_index must be a test-set index ≥ 0")
        if not self.prompt.strip():
            raise ValueError("prompt is empty")


def _write(out: Path, name: str, payload: dict, figures: list) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    html = out / f"{name}.html"
    write_figures_page(html, figures, title=f"probekit {name}")
    return [str(out / f"{name}.json"), str(html)]


def run_linearscope(cfg: LinearScopeRunConfig = LinearScopeRunConfig()) -> dict:
    """Compute and write the outputs; return ``{"files": [...], "digits": {...}, "lm": {...}}``."""
    from .digits_cnn import digits_split, load_digits_cnn
    from .probes.linearscope import LinearScope

    root = Path(cfg.out) if cfg.out else results_dir() / "linearscope"
    files: list[str] = []
    net = load_digits_cnn()
    _, X_test, _, y_test = digits_split()
    if cfg.digit_index >= len(X_test):
        raise ValueError(f"digit_index {cfg.digit_index} is past the {len(X_test)} test digits")
    scope = LinearScope(net, dtype=torch.float64)
    one = scope.analyze(X_test[cfg.digit_index], k=cfg.k, label=int(y_test[cfg.digit_index]))
    dataset = scope.dataset_bias_share(X_test, y_test)
    digits = dict(kind="linearscope_digits", one=one.to_dict(), test_set=dataset.to_dict(), test_accuracy=getattr(net, "test_accuracy", None))
    files += _write(root / "digits-cnn", f"digit-{cfg.digit_index}", digits, one.figures() + dataset.figures())
    print(f"[probekit linearscope] digit {cfg.digit_index}: mean bias share over the test set "
          f"{dataset.mean_share_predicted:+.3f} (at the predicted class)")

    lm = {}
    if not cfg.skip_lm:
        from .models import load_model
        from .probes.linearscope_transformer import TransformerLinearScope

        bridge, tok = load_model(cfg.model)
        ids = tok(cfg.prompt, return_tensors="pt")["input_ids"][0]
        scopes = {dt: TransformerLinearScope(bridge, dtype=dt) for dt in (torch.float32, torch.float64)}
        rec = {str(dt).removeprefix("torch."): s.reconstruction(ids) for dt, s in scopes.items()}
        s64 = scopes[torch.float64]  # reused: a float64 scope holds its own copy of the weights
        with torch.no_grad():
            target = int(s64.decisions(s64.embed(ids))["logits"][-1].argmax())
        tc = s64.token_contributions(ids, target, tokenizer=tok)
        lm = dict(kind="linearscope_lm", model=cfg.model, prompt=cfg.prompt, reconstruction=rec, contributions=tc.to_dict())
        files += _write(root / cfg.model.replace("/", "--"), "token-contributions", lm, tc.figures())
        print(f"[probekit linearscope] {cfg.model}: logits rebuilt with relative error "
              f"{rec['float32']['relative_error']:.1e} (fp32), {rec['float64']['relative_error']:.1e} (fp64); "
              f"next token {tc.target!r}: logit {tc.logit:.3f} = Σ token contributions + b ({tc.bias:.3f})")
    for f in files:
        print(f"[probekit linearscope] wrote {f}")
    return dict(files=files, digits=digits, lm=lm, config=asdict(cfg))
