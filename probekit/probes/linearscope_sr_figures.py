"""Plotly figures of :class:`~probekit.probes.linearscope_sr.SRAnalysisResult` (one drawing, everywhere)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..stats import bootstrap_ci

if TYPE_CHECKING:
    from .linearscope_sr import SRAnalysisResult

__all__ = ["heatmap_grid", "psnr_figure", "energy_figure", "example_figure", "rows_figure", "columns_figure",
           "singular_vectors_figure", "likeness_figure"]

_COLOURS = {"svd": "#000000", "haar": "#1f77b4", "db2": "#2ca02c", "dct": "#ff7f0e", "random": "#7f7f7f"}
_LABELS = {"svd": "SVD of A(x)", "haar": "Haar", "db2": "Daubechies db2", "dct": "DCT", "random": "random orthonormal"}
_MEASURE_Y = {"operator_out": "fraction of ‖A(x)‖²_F kept (output side)",
              "operator_in": "fraction of ‖A(x)‖²_F kept (input side)",
              "image": "fraction of the centred output's energy"}


def _fill(hex_colour: str, alpha: float = 0.18) -> str:
    h = hex_colour.lstrip("#")
    return f"rgba({int(h[:2], 16)}, {int(h[2:4], 16)}, {int(h[4:], 16)}, {alpha})"


def _band(fig, x, est, name, colour, *, row=None, col=None, dash=None, showlegend=True):
    """Mean line with its 95% bootstrap band."""
    import plotly.graph_objects as go

    lo = [e.low for e in est]
    hi = [e.high for e in est]
    kw = {} if row is None else {"row": row, "col": col}
    fig.add_trace(go.Scatter(x=list(x) + list(x)[::-1], y=hi + lo[::-1], fill="toself", fillcolor=_fill(colour),
                             mode="lines", line={"width": 0}, hoverinfo="skip", showlegend=False,
                             legendgroup=name), **kw)
    fig.add_trace(go.Scatter(x=list(x), y=[e.value for e in est], mode="lines+markers", name=name,
                             legendgroup=name, showlegend=showlegend, line={"color": colour, "dash": dash}), **kw)


def psnr_figure(res: SRAnalysisResult):
    """Mean PSNR per upsampler with 95% intervals over test patches."""
    import plotly.graph_objects as go

    est = res.psnr_estimates()
    names = list(res.psnr)
    vals = [est[u].value for u in names]
    fig = go.Figure(go.Bar(x=names, y=vals, error_y={"type": "data", "symmetric": False,
                                                   "array": [est[u].high - est[u].value for u in names],
                                                   "arrayminus": [est[u].value - est[u].low for u in names]},
                           marker_color=["#d62728"] + ["#7f7f7f"] * (len(names) - 1)))
    g = est["network-bicubic"]
    fig.update_layout(title=f"×2 super-resolution on n={res.n} test patches: network − bicubic "
                            f"{g.value:+.2f} dB [{g.low:+.2f}, {g.high:+.2f}]",
                      xaxis_title="upsampler", yaxis_title="mean PSNR (dB), 95% CI", template="plotly_white")
    lo = min(est[u].low for u in names)
    fig.update_yaxes(range=[lo - 1.0, max(est[u].high for u in names) + 0.5])
    return fig


def energy_figure(res: SRAnalysisResult, measure: str = "operator_out"):
    """Energy fraction kept against ``k`` per basis, mean and 95% band over test patches."""
    import plotly.graph_objects as go

    fig = go.Figure()
    ests = {k: res.energy_estimates(measure, k) for k in res.ks}
    for b in res.energy[measure]:
        _band(fig, res.ks, [ests[k][b] for k in res.ks], _LABELS.get(b, b), _COLOURS.get(b, "#9467bd"))
    what = {"operator_out": "columns of A(x) on the best k atoms of each basis (SVD: Σ_{i≤k} σ_i² / Σ σ_i²)",
            "operator_in": "rows of A(x) on the best k atoms of each LR basis",
            "image": "centred output on the first k singular vectors / the k largest basis coefficients"}[measure]
    fig.update_layout(title=f"Energy captured: {what} (n={res.n} test patches)", template="plotly_white",
                      xaxis_title="k (atoms or singular vectors kept)", yaxis_title=_MEASURE_Y[measure])
    fig.update_xaxes(type="log", tickvals=list(res.ks))
    fig.update_yaxes(range=[0, 1.02])
    return fig


def heatmap_grid(images: list[np.ndarray], titles: list[str], cols: int, title: str, cbar: str, *,
                 diverging: bool = True, size: int = 190):
    """Heatmaps in a grid sharing one colour axis (symmetric about 0 when ``diverging``)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = (len(images) + cols - 1) // cols
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.03,
                        vertical_spacing=min(0.16, 0.45 / rows))
    for i, img in enumerate(images):
        fig.add_trace(go.Heatmap(z=img, coloraxis="coloraxis"), row=i // cols + 1, col=i % cols + 1)
    lim = float(max(np.abs(im).max() for im in images)) or 1.0
    ca = {"colorscale": "RdBu", "cmid": 0.0, "cmin": -lim, "cmax": lim} if diverging else {"colorscale": "Greys_r"}
    fig.update_layout(coloraxis={**ca, "colorbar": {"title": {"text": cbar}}}, title=title, template="plotly_white",
                      width=size * cols + 160, height=size * rows + 120)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    for i in range(len(images)):
        fig.layout[f"yaxis{i + 1 if i else ''}"].scaleanchor = f"x{i + 1 if i else ''}"
    return fig


def example_figure(res: SRAnalysisResult):
    """The example patch: LR input, HR truth, network output and the template b(x)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    ex = res.example
    fig = make_subplots(rows=1, cols=4, subplot_titles=["LR input x", "HR truth", "network f(x) = A(x)x + b(x)",
                                                        "template b(x)"], horizontal_spacing=0.08)
    for j, key in enumerate(("lr", "hr", "output")):
        fig.add_trace(go.Heatmap(z=np.asarray(ex[key]), coloraxis="coloraxis"), row=1, col=j + 1)
    fig.add_trace(go.Heatmap(z=np.asarray(ex["bias"]), coloraxis="coloraxis2"), row=1, col=4)
    lim = float(np.abs(ex["bias"]).max()) or 1.0
    fig.update_layout(
        title=f"Test patch {ex['index']}", template="plotly_white", width=1100, height=360,
        coloraxis={"colorscale": "Greys_r", "cmin": 0, "cmax": 1,
                   "colorbar": {"title": {"text": "intensity"}, "x": 0.735, "xanchor": "left", "thickness": 12,
                                "len": 0.8}},
        coloraxis2={"colorscale": "RdBu", "cmid": 0, "cmin": -lim, "cmax": lim,
                    "colorbar": {"title": {"text": "b(x)"}, "x": 1.01, "xanchor": "left", "thickness": 12,
                                 "len": 0.8}})
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    for i in range(4):
        fig.layout[f"yaxis{i + 1 if i else ''}"].scaleanchor = f"x{i + 1 if i else ''}"
    return fig


def _spread(n: int, m: int) -> list[int]:
    return sorted({int(round(v)) for v in np.linspace(1, n - 2, m)}) if n > 2 else list(range(n))


def rows_figure(res: SRAnalysisResult, per_side: int = 3):
    """Rows of A(x) for a grid of output pixels, each an LR image: how the input is weighed for that pixel."""
    A = np.asarray(res.example["matrix"])
    H, W = res.hr_shape
    pix = [(r, c) for r in _spread(H, per_side) for c in _spread(W, per_side)]
    imgs = [A[r * W + c].reshape(res.lr_shape) for r, c in pix]
    return heatmap_grid(imgs, [f"output ({r},{c})" for r, c in pix], per_side,
                        f"Rows of A(x), patch {res.example['index']}: each output pixel's weights on the LR input",
                        "∂y_out/∂x_in")


def columns_figure(res: SRAnalysisResult, per_side: int = 3):
    """Columns of A(x) for a grid of input pixels, each an HR image: what one input pixel paints."""
    A = np.asarray(res.example["matrix"])
    h, w = res.lr_shape
    pix = [(r, c) for r in _spread(h, per_side) for c in _spread(w, per_side)]
    imgs = [A[:, r * w + c].reshape(res.hr_shape) for r, c in pix]
    return heatmap_grid(imgs, [f"input ({r},{c})" for r, c in pix], per_side,
                        f"Columns of A(x), patch {res.example['index']}: the output painted by one input pixel",
                        "∂y_out/∂x_in")


def singular_vectors_figure(res: SRAnalysisResult, k: int | None = None):
    """Top left (HR) and right (LR) singular vectors of A(x) as images."""
    k = min(k or res.k_headline, 8)
    ex = res.example
    U, Vt, S = np.asarray(ex["left"]), np.asarray(ex["right"]), np.asarray(ex["singular_values"])
    imgs = [U[:, i].reshape(res.hr_shape) for i in range(k)] + [Vt[i].reshape(res.lr_shape) for i in range(k)]
    titles = [f"u{i + 1} (σ={S[i]:.2f})" for i in range(k)] + [f"v{i + 1}" for i in range(k)]
    return heatmap_grid(imgs, titles, k, f"Top {k} singular vectors of A(x), patch {ex['index']}: left (output, HR) "
                        "above, right (input, LR) below", "component", size=150)


def likeness_figure(res: SRAnalysisResult):
    """Detail fraction and effective support of each left singular vector by index, against references."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    idx = np.arange(1, res.sv_index_detail.shape[1] + 1)
    ci = lambda v: bootstrap_ci(v, n_boot=res.n_boot, seed=res.seed, unit="test patches")  # noqa: E731
    fig = make_subplots(rows=1, cols=2, subplot_titles=["oscillation: level-1 Haar detail fraction",
                                                        "localisation: effective support"])
    _band(fig, idx, [ci(res.sv_index_detail[:, i]) for i in range(len(idx))], "left singular vectors u_i", "#000000",
          row=1, col=1)
    _band(fig, idx, [ci(res.sv_index_support[:, i]) for i in range(len(idx))], "left singular vectors u_i",
          "#000000", row=1, col=2, showlegend=False)
    refs = [("random vectors", "random_hr_detail", "random_hr_support", "#7f7f7f"),
            ("output images", "image_detail", None, "#d62728")]
    for name, d_key, s_key, colour in refs:
        for key, col, what in ((d_key, 1, "detail"), (s_key, 2, "support")):
            if key is None:
                continue
            v = float(np.mean(res.likeness[key]))
            fig.add_trace(go.Scatter(x=[idx[0], idx[-1]], y=[v, v], mode="lines", name=f"{name}: {what} {v:.2f}",
                                     line={"color": colour, "dash": "dash"}), row=1, col=col)
    fig.update_layout(title=f"Wavelet-likeness of the singular vectors of A(x) by index (mean, 95% CI, n={res.n})",
                      template="plotly_white", width=1100, height=460)
    fig.update_xaxes(title_text="singular vector index i (by σ)")
    fig.update_yaxes(title_text="share of energy in finest details", range=[0, 1], row=1, col=1)
    fig.update_yaxes(title_text="(Σv²)² / (N Σv⁴)", range=[0, 1], row=1, col=2)
    return fig
