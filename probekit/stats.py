"""Uncertainty for headline numbers: percentile bootstrap over independent units, paired differences, Wilson.

Every headline number probekit prints is an :class:`Estimate`: the value, a 95% interval, the number of
independent units ``n`` it rests on and what those units are (functions, prompts, documents, test images).
The unit of resampling is the unit of the claim: tokens of one document are not independent, so token-level
quantities are resampled by document (:func:`bootstrap_clusters`), never by token (METHODS.md §5).

Below ``min_n`` units (30 by default) an estimate is flagged :attr:`Estimate.too_small` and prints "too few to
conclude" next to the number instead of standing as a headline.

Example
-------
>>> import numpy as np
>>> acc = np.array([1, 0, 1, 1, 1, 0, 1, 1] * 5, dtype=float)       # one value per prompt
>>> est = bootstrap_ci(acc, unit="prompts")
>>> est.n, round(est.value, 3)
(40, 0.75)
>>> est.low < est.value < est.high
True
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Callable

import numpy as np

#: Fewer independent units than this and an estimate is reported as too few to conclude.
MIN_N = 30
#: Bootstrap resamples (METHODS.md §5 asks for at least 2,000).
N_BOOT = 2000


@dataclass(frozen=True)
class Estimate:
    """A number with its uncertainty: ``value`` and the ``level`` interval ``[low, high]`` over ``n`` units."""

    value: float
    low: float
    high: float
    n: int
    unit: str = "units"
    level: float = 0.95
    method: str = "percentile bootstrap"
    min_n: int = MIN_N

    @property
    def too_small(self) -> bool:
        """True when the estimate rests on fewer than ``min_n`` units: say so instead of concluding."""
        return self.n < self.min_n

    @property
    def excludes_zero(self) -> bool:
        """True when the interval lies wholly above or below 0 (a difference that carries a claim)."""
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["too_small"] = self.too_small
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Estimate:
        """The inverse of :meth:`to_dict` (derived keys such as ``too_small`` are recomputed, not read)."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def format(self, digits: int = 3) -> str:
        """``0.750 [0.625, 0.875] (n=40 prompts)``, with "too few to conclude" when ``n < min_n``."""
        f = f"{{:.{digits}f}}"
        s = f"{f.format(self.value)} [{f.format(self.low)}, {f.format(self.high)}] (n={self.n} {self.unit})"
        return s + " — too few to conclude" if self.too_small else s

    __str__ = format


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")


def _resample_index(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) indices drawn with replacement; one seed gives the same draws for every paired series."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _interval(boot: np.ndarray, level: float) -> tuple[float, float]:
    a = (1 - level) / 2
    lo, hi = np.quantile(boot, [a, 1 - a])
    return float(lo), float(hi)


def _as_units(values, name: str = "values") -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one unit, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        bad = int((~np.isfinite(x)).sum())
        raise ValueError(f"{name} holds {bad} NaN/inf value(s): a bootstrap over them would be NaN")
    return x


def bootstrap_ci(values, statistic: Callable[[np.ndarray], float] | None = None, *, n_boot: int = N_BOOT,
                 level: float = 0.95, seed: int = 0, unit: str = "units", min_n: int = MIN_N) -> Estimate:
    """Percentile bootstrap of ``statistic`` over the rows of ``values`` (one row per independent unit).

    Parameters
    ----------
    values : array (n_units,) or (n_units, ...)
        One entry per unit (a prompt's refusal 0/1, a snippet's F1, …).
    statistic : callable, optional
        Maps an array of rows to a number; default the mean (vectorised).
    """
    _check_level(level)
    x = _as_units(values)
    idx = _resample_index(len(x), n_boot, seed)
    if statistic is None:
        value = float(x.mean(axis=0)) if x.ndim == 1 else float(x.mean())
        boot = x[idx].reshape(n_boot, -1).mean(axis=1) if x.ndim > 1 else x[idx].mean(axis=1)
    else:
        value = float(statistic(x))
        boot = np.array([statistic(x[i]) for i in idx], dtype=np.float64)
    lo, hi = _interval(boot, level)
    return Estimate(value, lo, hi, len(x), unit, level, "percentile bootstrap", min_n)


def bootstrap_ratio(numerator, denominator, *, n_boot: int = N_BOOT, level: float = 0.95, seed: int = 0,
                    unit: str = "units", min_n: int = MIN_N) -> Estimate:
    """Bootstrap of ``Σ numerator / Σ denominator`` over units (a pooled rate, e.g. FVU summed over documents).

    Parameters
    ----------
    numerator, denominator : array (n_units,)
        Per-unit sums (e.g. a document's Σ‖x − x̂‖² and Σ‖x − x̄‖²; correct tokens and tokens).
    """
    _check_level(level)
    num, den = _as_units(numerator, "numerator"), _as_units(denominator, "denominator")
    if num.shape != den.shape or num.ndim != 1:
        raise ValueError(f"numerator and denominator must be 1-D and alike, got {num.shape} and {den.shape}")
    if den.sum() == 0:
        raise ValueError("denominator sums to 0: the ratio is undefined")
    idx = _resample_index(len(num), n_boot, seed)
    d = den[idx].sum(axis=1)
    boot = num[idx].sum(axis=1) / np.where(d == 0, np.nan, d)
    boot = boot[np.isfinite(boot)]
    lo, hi = _interval(boot, level)
    return Estimate(float(num.sum() / den.sum()), lo, hi, len(num), unit, level, "percentile bootstrap (ratio)",
                    min_n)


def cluster_sums(values, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-unit sums and counts of token-level ``values`` grouped by ``groups`` (e.g. doc_index).

    Returns ``(unit_ids, sums, counts)``, each (n_units,), in sorted unit order.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    g = np.asarray(groups).reshape(-1)
    if v.shape != g.shape:
        raise ValueError(f"values and groups must have one entry per token, got {v.shape} and {g.shape}")
    ids, inv = np.unique(g, return_inverse=True)
    sums = np.bincount(inv, weights=v, minlength=len(ids))
    counts = np.bincount(inv, minlength=len(ids)).astype(np.float64)
    return ids, sums, counts


def bootstrap_clusters(values, groups, **kw) -> Estimate:
    """Pooled token-level mean with a cluster bootstrap: whole units (documents, snippets) are resampled.

    Parameters
    ----------
    values : array (n_tokens,)
        Token-level quantity (a probe's 0/1 correctness, a squared error).
    groups : array (n_tokens,)
        The unit each token belongs to.
    """
    _, sums, counts = cluster_sums(values, groups)
    return bootstrap_ratio(sums, counts, **kw)


def paired_difference(a, b, statistic: Callable[[np.ndarray], float] | None = None, *, n_boot: int = N_BOOT,
                      level: float = 0.95, seed: int = 0, unit: str = "units", min_n: int = MIN_N) -> Estimate:
    """Paired bootstrap of ``statistic(a) − statistic(b)`` over the same units (best layer vs layer 0, …).

    ``a[i]`` and ``b[i]`` must be the same unit measured two ways; both series are resampled with the same
    indices, so what the units share cancels. The claim holds when :attr:`Estimate.excludes_zero`.
    """
    _check_level(level)
    xa, xb = _as_units(a, "a"), _as_units(b, "b")
    if xa.shape != xb.shape:
        raise ValueError(f"paired series must have one entry per unit each, got {xa.shape} and {xb.shape}")
    stat = statistic or (lambda v: float(v.mean()))
    idx = _resample_index(len(xa), n_boot, seed)
    if statistic is None:
        boot = xa[idx].mean(axis=1) - xb[idx].mean(axis=1)
    else:
        boot = np.array([stat(xa[i]) - stat(xb[i]) for i in idx], dtype=np.float64)
    lo, hi = _interval(boot, level)
    return Estimate(float(stat(xa) - stat(xb)), lo, hi, len(xa), unit, level, "paired percentile bootstrap", min_n)


def wilson_interval(successes: int, n: int, *, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (closed form; the check for few-prompt rates)."""
    _check_level(level)
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got successes={successes}, n={n}")
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(successes, *, level: float = 0.95, unit: str = "units", min_n: int = MIN_N) -> Estimate:
    """A rate over units (refusal on prompts) with its Wilson interval.

    Parameters
    ----------
    successes : array (n_units,) of 0/1 or bool
    """
    x = _as_units(successes, "successes")
    if not np.all((x == 0) | (x == 1)):
        raise ValueError("successes must be 0/1 per unit")
    k, n = int(x.sum()), len(x)
    lo, hi = wilson_interval(k, n, level=level)
    return Estimate(k / n, lo, hi, n, unit, level, "Wilson score", min_n)
