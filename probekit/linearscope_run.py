"""``probekit linearscope``: LinearScope outputs for the digits CNN and for a prompt on a decoder LM.

Writes JSON + plotly HTML under ``<cache root>/results/linearscope/``:

- ``digits-cnn/digit-<i>.json``: for each chosen test digit ``i``, the input, the class rows of A as images
  ("votes"), the bias share b_k / y_k per class, the top singular vectors as images; and the bias share over the
  whole test set (computed once per run, the same in every file). Which digits: ``digits`` (test indices, or
  ``"per-class"``: the first test digit of each class) plus ``digit_index``; with neither given, ``"per-class"``.
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
from .results import figures  # the pages show what the report and the app show for the same payload

PER_CLASS = "per-class"


@dataclass
class LinearScopeRunConfig:
    """What ``probekit linearscope`` computes."""

    digit_index: int | None = None
    digits: tuple[int, ...] | str | None = None
    model: str = DEFAULT_MODEL
    prompt: str = "def add(a, b):\n    return a +"
    k: int = 4
    out: str | None = None
    skip_lm: bool = False

    def __post_init__(self) -> None:
        if self.digit_index is not None and (isinstance(self.digit_index, bool) or not isinstance(self.digit_index, int)
                                             or self.digit_index < 0):
            raise ValueError("digit_index must be a test-set index ≥ 0")
        self.digits = _parse_digits(self.digits)
        if not self.prompt.strip():
            raise ValueError("prompt is empty")


def _parse_digits(digits) -> tuple[int, ...] | str | None:
    """``None``, ``"per-class"``, or a tuple of test indices ≥ 0 (from ``"0,5,12"`` or a list)."""
    if digits is None or digits == PER_CLASS:
        return digits
    if isinstance(digits, str):
        parts = [t.strip() for t in digits.split(",") if t.strip()]
        try:
            digits = [int(t) for t in parts]
        except ValueError:
            raise ValueError(f"digits must be {PER_CLASS!r} or comma-separated test indices, got {digits!r}") from None
    if isinstance(digits, int) and not isinstance(digits, bool):
        digits = [digits]
    if not isinstance(digits, (list, tuple)) or not digits or \
            any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in digits):
        raise ValueError(f"digits must be {PER_CLASS!r} or a non-empty list of test indices ≥ 0, got {digits!r}")
    return tuple(digits)


def digit_indices(cfg: LinearScopeRunConfig, y_test) -> list[int]:
    """The test indices one run writes, ascending, without repeats (see the module docstring)."""
    chosen = cfg.digits if cfg.digits is not None else (PER_CLASS if cfg.digit_index is None else ())
    if chosen == PER_CLASS:
        y = [int(v) for v in y_test]
        chosen = [y.index(c) for c in sorted(set(y))]
    out = set(chosen) | ({cfg.digit_index} if cfg.digit_index is not None else set())
    for i in out:
        if i >= len(y_test):
            raise ValueError(f"digit index {i} is past the {len(y_test)} test digits")
    return sorted(out)


def _write(out: Path, name: str, payload: dict, figures: list, plotlyjs: str = "inline") -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    html = out / f"{name}.html"
    write_figures_page(html, figures, title=f"probekit {name}", plotlyjs=plotlyjs)
    return [str(out / f"{name}.json"), str(html)]


def run_linearscope(cfg: LinearScopeRunConfig = LinearScopeRunConfig()) -> dict:
    """Compute and write the outputs; return ``{"files": [...], "digits": {...}, "digit_indices": [...], "lm": {...}}``.

    ``digits`` is the payload of ``digit_index`` (or of the first digit written when it is not set).
    """
    from .digits_cnn import digits_split, load_digits_cnn
    from .probes.linearscope import LinearScope

    root = Path(cfg.out) if cfg.out else results_dir() / "linearscope"
    files: list[str] = []
    net = load_digits_cnn()
    _, X_test, _, y_test = digits_split()
    indices = digit_indices(cfg, y_test)
    scope = LinearScope(net, dtype=torch.float64)
    dataset = scope.dataset_bias_share(X_test, y_test)  # the same for every digit: computed once
    # each test image's own share (the unit of the CI, METHODS.md §5): a one-image data set is that image
    per_image = [scope.dataset_bias_share(X_test[j:j + 1]).mean_share_predicted for j in range(len(X_test))]
    written: dict[int, dict] = {}
    for i in indices:
        one = scope.analyze(X_test[i], k=cfg.k, label=int(y_test[i]))
        written[i] = dict(kind="linearscope_digits", one=one.to_dict(), test_set=dataset.to_dict(),
                          per_image_share_predicted=per_image,
                          test_accuracy=getattr(net, "test_accuracy", None))
        # one page per digit: they share one plotly.min.js instead of inlining 3.5 MB each
        files += _write(root / "digits-cnn", f"digit-{i}", written[i], figures(written[i]), plotlyjs="directory")
    files.append(str(root / "digits-cnn" / "plotly.min.js"))  # written beside the first page, shared by all
    digits = written[indices[0]] if cfg.digit_index is None else written[cfg.digit_index]
    print(f"[probekit linearscope] digit{'s' if len(indices) > 1 else ''} {', '.join(map(str, indices))}: mean bias "
          f"share over the test set {dataset.mean_share_predicted:+.3f} (at the predicted class)")

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
        files += _write(root / cfg.model.replace("/", "--"), "token-contributions", lm, figures(lm))
        print(f"[probekit linearscope] {cfg.model}: logits rebuilt with relative error "
              f"{rec['float32']['relative_error']:.1e} (fp32), {rec['float64']['relative_error']:.1e} (fp64); "
              f"next token {tc.target!r}: logit {tc.logit:.3f} = Σ token contributions + b ({tc.bias:.3f})")
    for f in files:
        print(f"[probekit linearscope] wrote {f}")
    return dict(files=files, digits=digits, digit_indices=indices, lm=lm, config=asdict(cfg))
