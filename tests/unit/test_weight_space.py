"""Weight-space safety analysis: projections, baselines, diagnostics and update-space overlap on small matrices."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from probekit.probes.weight_space import (
    WeightSpaceConfig,
    frob_cos,
    iter_projected,
    layer_of,
    matrix_keys,
    module_of,
    project_into,
    project_update,
    projected_state_dict,
    update_bases,
    update_diagnostics,
    update_space_overlap,
    weight_space_analysis,
)
from probekit.subspace import rank_fraction_k


pytestmark = pytest.mark.usefixtures("one_thread")


def _checkpoints(seed: int = 0, dtype=torch.float64):
    """base / aligned / fine-tuned state dicts of a 2-layer toy model (tall, wide and square matrices)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.layers.{}.self_attn.q_proj.weight": (12, 12), "model.layers.{}.mlp.up_proj.weight": (20, 12),
              "model.layers.{}.mlp.down_proj.weight": (12, 20)}
    base = {"model.embed_tokens.weight": torch.randn(30, 12, generator=g, dtype=dtype),
            "model.norm.weight": torch.ones(12, dtype=dtype)}
    for l in range(2):
        for k, s in shapes.items():
            base[k.format(l)] = torch.randn(*s, generator=g, dtype=dtype)
        base[f"model.layers.{l}.input_layernorm.weight"] = torch.ones(12, dtype=dtype)
    aligned = {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=dtype) for k, v in base.items()}
    tuned = {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=dtype) for k, v in aligned.items()}
    return base, aligned, tuned


KEY = "model.layers.1.mlp.up_proj.weight"


def test_keys_layers_modules():
    b, a, t = _checkpoints()
    keys = matrix_keys(b, a, t)
    assert len(keys) == 6 and all("embed" not in k and "norm" not in k for k in keys)
    assert "model.embed_tokens.weight" in matrix_keys(b, a, t, skip_embeddings=False)
    assert matrix_keys(b, a, t, include=r"mlp") == [k for k in keys if "mlp" in k]
    assert layer_of(KEY) == 1 and module_of(KEY) == "mlp.up_proj" and layer_of("model.norm.weight") is None


@pytest.mark.parametrize("basis", ["svd", "random", "randomk"])
def test_same_plus_orth_reassemble_and_opp(basis):
    b, a, t = _checkpoints()
    f = 0.25
    same = projected_state_dict(b, a, t, fraction=f, variant="same", basis=basis, seed=3)
    orth = projected_state_dict(b, a, t, fraction=f, variant="orth", basis=basis, seed=3)
    opp = projected_state_dict(b, a, t, fraction=f, variant="opp", basis=basis, seed=3)
    for k in matrix_keys(b, a, t):
        U = t[k] - a[k]
        Upar = same[k] - a[k]
        # W_aligned + U_par + (U - U_par) = W_finetuned
        torch.testing.assert_close(a[k] + Upar + (orth[k] - a[k]), t[k], atol=1e-12, rtol=0)
        torch.testing.assert_close(opp[k], 2 * a[k] - same[k], atol=1e-12, rtol=0)
        assert not torch.allclose(Upar, U)  # a real projection at f < 1
    assert torch.equal(same["model.norm.weight"], t["model.norm.weight"])  # other tensors: fine-tuned's
    full = dict(iter_projected(b, a, t, fraction=f, variant="full"))
    assert all(torch.allclose(full[k], t[k]) for k in t)


def test_energy_kept_is_one_at_full_rank_fraction():
    b, a, t = _checkpoints()
    res = weight_space_analysis(b, a, t, WeightSpaceConfig(fractions=(0.25, 1.0), progress=False))
    for p in res.projections:
        if p["fraction"] == 1.0:  # k = min(m, n): L spans the whole output space of a square/wide V
            assert p["k"] == min(*[m["shape"] for m in res.matrices if m["key"] == p["key"]][0])
            rows = [m["shape"][0] for m in res.matrices if m["key"] == p["key"]][0]
            if p["k"] == rows:
                assert p["energy_kept"] == pytest.approx(1.0, abs=1e-12)
                assert p["cos_u_upar"] == pytest.approx(1.0, abs=1e-12)
        assert p["cos_u_upar"] == pytest.approx(np.sqrt(p["energy_kept"]), abs=1e-12)
    # a tall matrix (20 x 12): k = 12 < 20, so only the top-12 output directions of V are kept
    tall = [p for p in res.projections if p["key"] == KEY and p["fraction"] == 1.0 and p["basis"] == "svd"][0]
    assert tall["k"] == 12 and tall["energy_kept"] < 1.0
    ek = res.energy_kept("svd")
    assert list(ek) == [0.25, 1.0] and ek[0.25] < ek[1.0] <= 1.0 + 1e-12
    json.dumps(res.to_dict())
    assert len(res.figures()) == 2


def test_energy_kept_full_rank_direct():
    g = torch.Generator().manual_seed(1)
    V, U = torch.randn(9, 14, generator=g, dtype=torch.float64), torch.randn(9, 14, generator=g, dtype=torch.float64)
    L = update_bases(V, [1.0], "svd")[1.0]
    assert L.shape == (9, 9)
    d = update_diagnostics(U, project_update(U, L))
    assert d["energy_kept"] == pytest.approx(1.0, abs=1e-12) and d["cos_u_upar"] == pytest.approx(1.0, abs=1e-12)


def test_cos_uv_matches_numpy_and_not_wrong_denominators():
    g = torch.Generator().manual_seed(2)
    V = torch.randn(8, 5, generator=g, dtype=torch.float64)
    U = 3.0 * V + torch.randn(8, 5, generator=g, dtype=torch.float64)  # correlated, different norms
    u, v = U.numpy(), V.numpy()
    want = float((u * v).sum() / (np.linalg.norm(u) * np.linalg.norm(v)))
    assert frob_cos(U, V) == pytest.approx(want, rel=1e-12)
    assert 0.5 < want < 1.0
    assert frob_cos(U, V) == pytest.approx(frob_cos(V, U), rel=1e-14)  # symmetric, scale-free
    assert frob_cos(5 * U, 0.1 * V) == pytest.approx(want, rel=1e-12)
    # the denominators that a cosine is often written with by mistake give different numbers here
    L = update_bases(V, [0.4], "svd")[0.4]
    Upar = project_update(U, L).numpy()
    wrong = {
        "||U||^2": (u * v).sum() / np.linalg.norm(u) ** 2,
        "||V||^2": (u * v).sum() / np.linalg.norm(v) ** 2,
        "||U|| ||U_par||": (u * v).sum() / (np.linalg.norm(u) * np.linalg.norm(Upar)),
        "spectral norms": (u * v).sum() / (np.linalg.norm(u, 2) * np.linalg.norm(v, 2)),
    }
    for name, w in wrong.items():
        assert abs(w - want) > 0.05, name
    assert np.isnan(frob_cos(U, torch.zeros_like(V)))


@pytest.mark.parametrize("shape", [(16, 10), (10, 16)])
def test_random_bases_orthonormal_with_right_k(shape):
    g = torch.Generator().manual_seed(4)
    V = torch.randn(*shape, generator=g, dtype=torch.float64)
    fr = [0.1, 0.5, 0.99]
    Uall = torch.linalg.svd(V, full_matrices=False)[0]
    for kind in ("svd", "random", "randomk"):
        bases = update_bases(V, fr, kind, seed=7, key="w")
        for f, L in bases.items():
            k = rank_fraction_k(shape, f)
            assert L.shape == (shape[0], k)
            torch.testing.assert_close(L.T @ L, torch.eye(k, dtype=torch.float64), atol=1e-10, rtol=0)
        if kind == "randomk":  # each column is (up to sign) one of V's left singular vectors
            L = bases[0.99]
            match = (Uall.T @ L).abs()
            assert torch.allclose(match.max(0).values, torch.ones(L.shape[1], dtype=torch.float64), atol=1e-8)
    # seeded per key: same key same draw, another key another draw
    r1 = update_bases(V, [0.5], "random", seed=7, key="w")[0.5]
    assert torch.equal(r1, update_bases(V, [0.5], "random", seed=7, key="w")[0.5])
    assert not torch.allclose(r1, update_bases(V, [0.5], "random", seed=7, key="w2")[0.5])
    svd = update_bases(V, [0.5], "svd")[0.5]
    torch.testing.assert_close((svd.T @ Uall[:, : svd.shape[1]]).abs(), torch.eye(svd.shape[1], dtype=torch.float64),
                               atol=1e-8, rtol=0)


def test_update_space_overlap_self_is_one_and_baseline():
    b, a, t = _checkpoints()
    res = update_space_overlap((a, t), (a, t), fractions=(0.1, 0.5), progress=False, names=("useful", "useful"))
    np.testing.assert_allclose(np.asarray(res.mso), 1.0, atol=1e-10)
    for k, row in zip(res.keys, res.baseline):
        m, n = a[k].shape
        assert row == [rank_fraction_k((m, n), f) / m for f in (0.1, 0.5)]
    assert res.layers == [0, 1] and np.asarray(res.layer_mso).shape == (2, 2)
    other = update_space_overlap((b, a), (a, t), fractions=(0.1, 0.5), progress=False)
    assert np.asarray(other.mso).max() < 0.99  # independent random updates: far from 1
    json.dumps(res.to_dict())
    assert len(res.figures()) == 1


def _svd_bank(before, after, keys, fractions, seed=0):
    return {k: update_bases(after[k] - before[k], fractions, "svd", seed=seed, key=k) for k in keys}


def test_update_space_overlap_with_precomputed_bases_equals_without():
    b, a, t = _checkpoints()
    fr = (0.1, 0.5, 1.0)
    keys = matrix_keys(b, a, t)
    plain = update_space_overlap((b, a), (a, t), fractions=fr, progress=False).to_dict()
    bank_a, bank_b = _svd_bank(b, a, keys, fr), _svd_bank(a, t, keys, fr)
    for kw in (dict(bases_a=bank_a), dict(bases_b=bank_b), dict(bases_a=bank_a, bases_b=bank_b)):
        banked = update_space_overlap((b, a), (a, t), fractions=fr, progress=False, **kw).to_dict()
        assert banked["keys"] == plain["keys"] and banked["baseline"] == plain["baseline"]
        np.testing.assert_allclose(banked["mso"], plain["mso"], rtol=0, atol=1e-12)
        np.testing.assert_allclose(banked["layer_mso"], plain["layer_mso"], rtol=0, atol=1e-12)
    # exactly equal here: the bank holds the very bases the function would compute
    banked = update_space_overlap((b, a), (a, t), fractions=fr, progress=False, bases_a=bank_a, bases_b=bank_b)
    assert banked.mso == plain["mso"]


def test_update_space_overlap_rejects_mismatched_bank():
    b, a, t = _checkpoints()
    fr = (0.1, 0.5)
    keys = matrix_keys(b, a, t)
    bank = _svd_bank(b, a, keys, fr)
    missing = {k: v for k, v in bank.items() if k != KEY}
    with pytest.raises(ValueError, match=rf"bases_a has no bases for matrix '{KEY}'"):
        update_space_overlap((b, a), (a, t), fractions=fr, progress=False, bases_a=missing)
    with pytest.raises(ValueError, match=rf"bases_b\['{KEY}'\] has no basis for rank fraction 0.5"):
        update_space_overlap((b, a), (a, t), fractions=fr, progress=False,
                             bases_b={**bank, KEY: {0.1: bank[KEY][0.1]}})
    # a bank for other fractions: right matrix, wrong k
    wrong_k = {**bank, KEY: {0.1: bank[KEY][0.5], 0.5: bank[KEY][0.5]}}
    with pytest.raises(ValueError, match=rf"bases_a\['{KEY}'\]\[0.1\] has shape \(20, 6\).*{KEY}.*\(20, 1\)"):
        update_space_overlap((b, a), (a, t), fractions=fr, progress=False, bases_a=wrong_k)
    # bases of another matrix (transposed shapes): wrong m
    swapped = {**bank, KEY: bank["model.layers.1.mlp.down_proj.weight"]}
    with pytest.raises(ValueError, match=rf"'{KEY}'.*needs \(20, "):
        update_space_overlap((b, a), (a, t), fractions=fr, progress=False, bases_a=swapped)


def test_weight_space_analysis_rejects_mismatched_bank():
    b, a, t = _checkpoints()
    fr = (0.1, 0.5)
    keys = matrix_keys(b, a, t)
    cfg = WeightSpaceConfig(fractions=fr, bases=("svd",), progress=False)
    bank = {"svd": _svd_bank(b, a, keys, fr)}
    assert (weight_space_analysis(b, a, t, cfg, bases=bank).projections
            == weight_space_analysis(b, a, t, cfg).projections)
    with pytest.raises(ValueError, match="no 'svd' kind"):
        weight_space_analysis(b, a, t, cfg, bases={"random": bank["svd"]})
    with pytest.raises(ValueError, match=rf"bases\['svd'\] has no bases for matrix '{KEY}'"):
        weight_space_analysis(b, a, t, cfg, bases={"svd": {k: v for k, v in bank["svd"].items() if k != KEY}})


def test_safetensors_and_project_into(tmp_path):
    from safetensors.torch import save_file

    b, a, t = _checkpoints(dtype=torch.float32)
    paths = []
    for name, sd in (("base", b), ("aligned", a), ("tuned", t)):
        p = tmp_path / f"{name}.safetensors"
        save_file(sd, str(p))
        paths.append(p)
    from_files = projected_state_dict(*paths, fraction=0.5, variant="orth")
    from_dicts = projected_state_dict(b, a, t, fraction=0.5, variant="orth")
    assert all(torch.equal(from_files[k], from_dicts[k]) for k in t)
    assert all(v.dtype == torch.float32 for v in from_dicts.values())

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.ParameterDict({k.replace(".", "_"): torch.nn.Parameter(v.clone()) for k, v in a.items()})

        def state_dict(self, *args, **kwargs):  # expose the checkpoint's key names
            return {k: self.p[k.replace(".", "_")].data for k in a}

    toy = project_into(Toy(), b, a, t, fraction=0.5, variant="orth")
    assert all(torch.equal(toy.state_dict()[k], from_dicts[k]) for k in t)
