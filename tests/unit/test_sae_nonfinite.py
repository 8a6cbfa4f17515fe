"""NaN / inf in SAE training data are refused by name (issue #19): before, train_sae finished with every weight NaN."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probekit.probes.sae import SAE, SAEConfig, train_sae

HOOK = "blocks.0.hook_resid_post"


def _data(n=256, d=8, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _cfg(b_dec_init, **kw):
    kw.setdefault("init_sample_size", 64)
    return SAEConfig(d_in=8, d_sae=16, k=2, batch_size=32, epochs=1, b_dec_init=b_dec_init,
                     **kw)


@pytest.mark.parametrize("b_dec_init", ["zeros", "mean", "geometric_median"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_tensor_rows_with_nonfinite_values_are_named(b_dec_init, bad):
    x = _data()
    x[17, 3] = bad
    x[200, 0] = bad
    with pytest.raises(ValueError, match=r"NaN or inf in 2 row\(s\) \(row indices 17, 200\)"):
        train_sae(_cfg(b_dec_init), x, progress=False)


def test_rows_are_named_in_the_callers_numbering():
    x = _data()
    x[150] = float("nan")
    with pytest.raises(ValueError, match=r"row indices 150\)"):
        train_sae(_cfg("zeros"), x, rows=np.arange(100, 256), progress=False)
    # rows that leave the bad one out train normally, to finite weights
    sae = train_sae(_cfg("geometric_median"), x, rows=np.arange(0, 128), progress=False)
    assert all(bool(torch.isfinite(p).all()) for p in sae.parameters())


class _FakeRun:
    run_id = "fake-run"

    def __init__(self, x):
        self.x = x

    def shape(self, hook):
        return tuple(self.x.shape)

    def load(self, hook, rows):
        return self.x[torch.as_tensor(np.asarray(rows))]


class _FakeDeviceCache:
    """The two DeviceCache methods train_sae uses, over an in-memory tensor (rows as the real one reports them)."""

    def __init__(self, x):
        self.run = _FakeRun(x)

    def _rows(self, rows):
        return np.arange(len(self.run.x)) if rows is None else np.asarray(rows)

    def batches(self, hook, batch_size, *, shuffle, seed, epochs, rows, drop_last, dtype):
        sel = torch.as_tensor(self._rows(rows))
        sel = sel[torch.randperm(len(sel), generator=torch.Generator().manual_seed(seed))]
        for i in range(0, len(sel) - batch_size + 1, batch_size):
            r = sel[i : i + batch_size]
            yield {hook: self.run.x[r].to(dtype), "rows": r}


@pytest.mark.parametrize("b_dec_init", ["zeros", "geometric_median"])
def test_cache_rows_with_nan_are_named(b_dec_init):
    x = _data()
    x[42, 5] = float("nan")
    cfg = _cfg(b_dec_init, hook_name=HOOK, init_sample_size=256)
    with pytest.raises(ValueError, match=r"fake-run.*blocks\.0\.hook_resid_post.*row indices 42\)"):
        train_sae(cfg, _FakeDeviceCache(x), progress=False)


def test_divergence_is_reported_not_returned():
    """Finite rows but a learning rate that blows up: the NaN weights are refused, naming the parameter."""
    x = _data() * 1e18
    cfg = SAEConfig(d_in=8, d_sae=16, architecture="relu", lr=1e30, batch_size=32, epochs=2, b_dec_init="zeros")
    with pytest.raises(ValueError, match=r"SAE parameter \w+ holds \d+ NaN/inf"):
        train_sae(cfg, x, progress=False)


def test_only_trainable_architectures_train():
    with pytest.raises(ValueError, match="train_sae trains architectures.*'jumprelu'"):
        train_sae(SAEConfig(d_in=8, d_sae=16, architecture="jumprelu"), _data(), progress=False)
    with pytest.raises(ValueError, match="normalize_activations='none'"):
        train_sae(SAEConfig(d_in=8, d_sae=16, k=2, normalize_activations="layer_norm"), _data(), progress=False)


def test_new_config_fields_are_validated():
    with pytest.raises(ValueError, match="normalize_activations"):
        SAEConfig(d_in=8, d_sae=16, k=2, normalize_activations="covariance_whitening")
    with pytest.raises(ValueError, match="rescale_acts_by_decoder_norm"):
        SAEConfig(d_in=8, d_sae=16, architecture="relu", rescale_acts_by_decoder_norm=True)
    assert set(dict(SAE(SAEConfig(d_in=8, d_sae=16, architecture="gated")).named_parameters())) == {
        "W_enc", "W_dec", "b_dec", "b_gate", "r_mag", "b_mag"}


def test_row_check_is_exact_when_row_sums_overflow():
    from probekit.probes import sae as sae_mod

    x = _data(64)
    x[5] = 3e38  # finite entries whose row sum overflows to inf
    x[9, 1] = float("nan")
    x[11, 2] = -float("inf")
    want = (~torch.isfinite(x).all(dim=1)).nonzero().flatten()
    assert sae_mod._nonfinite_rows(x).tolist() == want.tolist() == [9, 11]
