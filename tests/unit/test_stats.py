"""probekit.stats against closed forms: normal-mean intervals, Wilson, paired differences, cluster resampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from probekit.stats import (Estimate, bootstrap_ci, bootstrap_clusters, bootstrap_ratio, cluster_sums,
                            paired_difference, proportion, wilson_interval)


def test_mean_of_normal_sample_matches_the_t_interval():
    x = np.random.default_rng(1).normal(3.0, 2.0, size=400)
    est = bootstrap_ci(x, n_boot=4000, unit="draws")
    half = sps.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    assert est.value == pytest.approx(x.mean())
    assert est.low == pytest.approx(x.mean() - half, abs=0.06 * half)
    assert est.high == pytest.approx(x.mean() + half, abs=0.06 * half)
    assert est.n == 400 and not est.too_small


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(7)
    covered = 0
    reps = 300
    for r in range(reps):
        x = rng.exponential(1.0, size=60)
        est = bootstrap_ci(x, n_boot=1000, seed=r)
        covered += est.low <= 1.0 <= est.high
    # percentile bootstrap on a skewed sample of 60 undercovers slightly; 300 reps give a ±2.5% s.e.
    assert 0.87 <= covered / reps <= 0.99


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (16, 32), (31, 40), (40, 40)])
def test_wilson_matches_scipy(k, n):
    ci = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(ci.low, abs=1e-12) and hi == pytest.approx(ci.high, abs=1e-12)


def test_proportion_bootstrap_agrees_with_wilson_at_moderate_n():
    x = np.array([1] * 60 + [0] * 40, dtype=float)
    w = proportion(x, unit="prompts")
    b = bootstrap_ci(x, n_boot=5000, unit="prompts")
    assert w.value == b.value == 0.6
    assert abs(w.low - b.low) < 0.03 and abs(w.high - b.high) < 0.03


def test_paired_difference_cancels_what_the_units_share():
    rng = np.random.default_rng(0)
    unit_effect = rng.normal(0, 5.0, size=80)          # large between-unit spread, shared by both conditions
    a = unit_effect + 0.5 + rng.normal(0, 0.1, size=80)
    b = unit_effect + rng.normal(0, 0.1, size=80)
    paired = paired_difference(a, b)
    unpaired_width = (bootstrap_ci(a).high - bootstrap_ci(a).low)
    assert paired.value == pytest.approx(0.5, abs=0.05)
    assert paired.excludes_zero
    assert paired.high - paired.low < 0.1 * unpaired_width
    # known case: a constant shift gives a degenerate interval at the shift
    exact = paired_difference(b + 0.25, b)
    assert exact.low == pytest.approx(0.25) and exact.high == pytest.approx(0.25)


def test_paired_difference_of_identical_series_does_not_exclude_zero():
    x = np.random.default_rng(3).normal(size=50)
    d = paired_difference(x, x + np.random.default_rng(4).normal(0, 1, size=50) * 0.0)
    assert d.value == 0 and not d.excludes_zero


def test_cluster_bootstrap_resamples_units_not_tokens():
    # 40 documents, 25 tokens each; tokens inside a document are perfectly correlated
    doc_vals = np.random.default_rng(5).normal(size=40)
    groups = np.repeat(np.arange(40), 25)
    tokens = np.repeat(doc_vals, 25)
    by_doc = bootstrap_ci(doc_vals, seed=11)
    clustered = bootstrap_clusters(tokens, groups, seed=11)
    naive = bootstrap_ci(tokens, seed=11)
    assert clustered.n == 40
    # equal cluster sizes: the pooled mean of resampled clusters is the mean of resampled document means
    assert clustered.low == pytest.approx(by_doc.low) and clustered.high == pytest.approx(by_doc.high)
    # resampling tokens would claim ~5x more certainty than the data holds
    assert (naive.high - naive.low) < 0.4 * (clustered.high - clustered.low)


def test_ratio_pools_sums_over_units():
    num = np.array([1.0, 2.0, 3.0, 4.0])
    den = np.array([2.0, 2.0, 2.0, 4.0])
    est = bootstrap_ratio(num, den, min_n=2)
    assert est.value == pytest.approx(10 / 10)
    ids, sums, counts = cluster_sums([1, 0, 1, 1], [7, 7, 3, 3])
    assert ids.tolist() == [3, 7] and sums.tolist() == [2, 1] and counts.tolist() == [2, 2]


def test_too_few_units_say_so():
    est = bootstrap_ci(np.ones(12), unit="snippets")
    assert est.too_small and "too few to conclude" in est.format()
    assert not bootstrap_ci(np.ones(30)).too_small
    d = est.to_dict()
    assert d["too_small"] is True and d["n"] == 12 and d["unit"] == "snippets"


@pytest.mark.parametrize("bad,match", [
    (np.array([1.0, np.nan, 2.0]), "NaN"),
    (np.array([]), "at least one unit"),
])
def test_bad_input_is_named(bad, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_ci(bad)


def test_proportion_refuses_non_binary_and_wilson_checks_counts():
    with pytest.raises(ValueError, match="0/1"):
        proportion([0.5, 1.0])
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(5, 3)


def test_same_seed_same_interval():
    x = np.random.default_rng(9).normal(size=64)
    assert bootstrap_ci(x, seed=2) == bootstrap_ci(x, seed=2)
    assert isinstance(bootstrap_ci(x), Estimate)
