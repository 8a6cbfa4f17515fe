"""probekit's SAE loader against folders written by sae-lens 6.54 itself (tests/fixtures/saelens/make_fixtures.py).

Each fixture folder holds sae-lens's own ``encode(x)``, ``decode(f)`` and ``forward(x)`` for its inputs; probekit must
reproduce them from the folder alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from probekit.probes.sae import SAE, SAEConfig, load_sae, save_sae

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "saelens"
KINDS = sorted(p.name for p in FIXTURES.iterdir() if (p / "reference.safetensors").is_file())
# the kinds that loaded without error but computed something else before this loader honoured their fields
WRONG_BEFORE = ["standard_no_b_dec_in", "standard_layer_norm", "topk_rescale", "trainer_topk",
                "standard_constant_norm_rescale"]


def test_fixture_set_is_complete():
    expected = {"standard", "standard_no_b_dec_in", "standard_layer_norm", "standard_constant_norm_rescale", "topk",
                "topk_rescale", "jumprelu", "jumprelu_no_b_dec_in", "gated", "batchtopk", "trainer_topk"}
    assert expected <= set(KINDS)


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    # float32 on both sides; the differences are 0 on the 2-core CPU box, the margin allows other BLAS orders
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_saelens(kind):
    ref = load_file(str(FIXTURES / kind / "reference.safetensors"))
    sae = load_sae(FIXTURES / kind)
    with torch.no_grad():
        _close(sae(ref["x"]), ref["forward"], f"{kind} forward")


@pytest.mark.parametrize("kind", KINDS)
def test_encode_decode_match_saelens(kind):
    ref = load_file(str(FIXTURES / kind / "reference.safetensors"))
    sae = load_sae(FIXTURES / kind)
    with torch.no_grad():
        f = sae.encode(ref["x"])
        _close(f, ref["feature_acts"], f"{kind} encode")
        assert torch.equal(f != 0, ref["feature_acts"] != 0), f"{kind}: different active latents"
        _close(sae.decode(ref["feature_acts"], x=ref["x"]), ref["decode"], f"{kind} decode")


@pytest.mark.parametrize("kind", WRONG_BEFORE)
def test_reconstruction_of_formerly_misread_kinds(kind):
    """The headline check of issue #16: these loaded without error but reconstructed differently from sae-lens
    (max |x̂_probekit − x̂_saelens| 1.73 / 6.57 / 8.92 / 0.77 / 6.15 on these fixtures before the fix)."""
    ref = load_file(str(FIXTURES / kind / "reference.safetensors"))
    with torch.no_grad():
        err = (load_sae(FIXTURES / kind)(ref["x"]) - ref["forward"]).abs().max().item()
    assert err <= 1e-5 * float(ref["forward"].abs().max()), err


def test_per_token_normalisation_decode_needs_x():
    sae = load_sae(FIXTURES / "standard_layer_norm")
    f = sae.encode(torch.randn(3, sae.cfg.d_in))
    with pytest.raises(ValueError, match="normalize_activations.*layer_norm.*x="):
        sae.decode(f)


def test_trainer_scaling_factor_is_folded():
    sae = load_sae(FIXTURES / "trainer_topk")
    assert sae.cfg.normalize_activations == "none"
    assert sae.cfg.architecture == "topk" and sae.cfg.rescale_acts_by_decoder_norm


# ------------------------------------------------------------------------------------------ refusals


def _copy(kind: str, tmp_path: Path) -> Path:
    dest = tmp_path / kind
    shutil.copytree(FIXTURES / kind, dest)
    return dest


def _edit_cfg(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(changes)
    (folder / "cfg.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("field,value", [
    ("architecture", "matryoshka_batchtopk"),
    ("normalize_activations", "covariance_whitening"),
    ("normalize_activations", "something_new"),
    ("reshape_activations", "hook_z"),
])
def test_unsupported_field_values_are_refused_by_name(tmp_path, field, value):
    folder = _copy("standard", tmp_path)
    _edit_cfg(folder, **{field: value})
    with pytest.raises(ValueError) as e:
        load_sae(folder)
    assert field in str(e.value) and repr(value) in str(e.value) and "cfg.json" in str(e.value)


def test_expected_average_without_scaling_factor_is_refused(tmp_path):
    folder = _copy("standard", tmp_path)
    _edit_cfg(folder, normalize_activations="expected_average_only_in")
    with pytest.raises(ValueError, match="expected_average_only_in.*norm_scaling_factor"):
        load_sae(folder)
    with pytest.raises(ValueError, match="norm_scaling_factor.*expected_average_only_in' only"):
        load_sae(FIXTURES / "standard", norm_scaling_factor=2.0)
    # the factor given by hand is folded like the trainer's own
    ref = load_file(str(FIXTURES / "standard" / "reference.safetensors"))
    sae = load_sae(folder, norm_scaling_factor=2.0)
    with torch.no_grad():
        want = load_sae(FIXTURES / "standard")(2.0 * ref["x"]) / 2.0
        _close(sae(ref["x"]), want, "folded factor")


def test_unknown_weight_tensor_is_refused(tmp_path):
    folder = _copy("standard", tmp_path)
    t = load_file(str(folder / "sae_weights.safetensors"))
    t["finetuning_scaling_factor"] = torch.ones(t["b_enc"].shape)
    save_file(t, str(folder / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match="finetuning_scaling_factor"):
        load_sae(folder)


def test_cfg_that_is_not_json_names_the_file(tmp_path):
    folder = _copy("standard", tmp_path)
    (folder / "cfg.json").write_text("{'d_in': 16,")
    with pytest.raises(ValueError) as e:
        load_sae(folder)
    assert str(folder / "cfg.json") in str(e.value) and "JSON" in str(e.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weights_are_refused_naming_file_and_tensor(tmp_path, bad):
    folder = _copy("jumprelu", tmp_path)
    t = load_file(str(folder / "sae_weights.safetensors"))
    t["W_dec"][3, 5] = bad
    save_file(t, str(folder / "sae_weights.safetensors"))
    sae = load_sae(folder)  # a lazy read; the check comes before the first use of the weights
    x = load_file(str(folder / "reference.safetensors"))["x"]
    for use in (sae.encode, sae, lambda v: sae.decode(torch.zeros(len(v), sae.cfg.d_sae)), sae.pre_acts):
        with pytest.raises(ValueError) as e:
            use(x)
        msg = str(e.value)
        assert "'W_dec'" in msg and str(folder / "sae_weights.safetensors") in msg and "1 NaN/inf" in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without CUDA")
def test_folder_saved_on_gpu_loads_on_cpu(tmp_path):
    folder = _copy("topk", tmp_path)
    _edit_cfg(folder, device="cuda:0")
    with pytest.warns(UserWarning, match="cuda:0.*cpu"):
        sae = load_sae(folder)
    assert sae.W_enc.device.type == "cpu" and sae.cfg.device == "cpu"
    ref = load_file(str(folder / "reference.safetensors"))
    with torch.no_grad():
        _close(sae(ref["x"]), ref["forward"], "topk on cpu")


def test_load_does_no_random_init(tmp_path, monkeypatch):
    """The loader fills the module from the file: no random (or any) initialisation of a dense decoder first."""
    def boom(*a, **k):
        raise AssertionError("random init during load")

    for name in ("randn", "rand", "randint", "randperm"):
        monkeypatch.setattr(torch, name, boom)
    sae = load_sae(FIXTURES / "topk")
    t = load_file(str(FIXTURES / "topk" / "sae_weights.safetensors"))
    assert torch.equal(sae.W_dec, t["W_dec"]) and torch.equal(sae.W_enc, t["W_enc"])


def test_log_threshold_is_read_as_exp(tmp_path):
    folder = _copy("jumprelu", tmp_path)
    t = load_file(str(folder / "sae_weights.safetensors"))
    t["log_threshold"] = t.pop("threshold").log()
    save_file(t, str(folder / "sae_weights.safetensors"))
    ref = load_file(str(folder / "reference.safetensors"))
    with torch.no_grad():
        _close(load_sae(folder).encode(ref["x"]), ref["feature_acts"], "log_threshold")


# ------------------------------------------------------------------------------------------ Gemma Scope


def test_gemma_scope_params_npz(tmp_path):
    """Gemma Scope layout: params.npz with W_enc (d_in, d_sae), W_dec (d_sae, d_in), b_enc, b_dec, threshold;
    JumpReLU, the input is not shifted by b_dec. Checked against a hand computation in numpy (float64)."""
    rng = np.random.default_rng(0)
    d_in, d_sae = 6, 10
    p = {"W_enc": rng.normal(size=(d_in, d_sae)), "W_dec": rng.normal(size=(d_sae, d_in)),
         "b_enc": rng.normal(size=d_sae) * 0.3, "b_dec": rng.normal(size=d_in),
         "threshold": rng.uniform(0.2, 1.0, size=d_sae)}
    p = {k: v.astype(np.float32) for k, v in p.items()}
    folder = tmp_path / "layer_3" / "width_16k" / "average_l0_5"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **p)
    x = rng.normal(size=(7, d_in)).astype(np.float32)
    pre = x.astype(np.float64) @ p["W_enc"] + p["b_enc"]
    f = np.where(pre > p["threshold"], np.maximum(pre, 0), 0.0)
    x_hat = f @ p["W_dec"] + p["b_dec"]
    for where in (folder, folder / "params.npz"):
        sae = load_sae(where, hook_name="blocks.3.hook_resid_post")
        assert sae.cfg.architecture == "jumprelu" and not sae.cfg.apply_b_dec_to_input
        assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.hook_name) == (d_in, d_sae, "blocks.3.hook_resid_post")
        with torch.no_grad():
            got_f = sae.encode(torch.from_numpy(x))
            np.testing.assert_allclose(got_f.numpy(), f, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(got_f.numpy() != 0, f != 0)
            np.testing.assert_allclose(sae(torch.from_numpy(x)).numpy(), x_hat, rtol=1e-5, atol=1e-5)


def test_gemma_scope_npz_missing_key_is_named(tmp_path):
    np.savez(tmp_path / "params.npz", W_enc=np.zeros((4, 8), np.float32), W_dec=np.zeros((8, 4), np.float32),
             b_enc=np.zeros(8, np.float32), b_dec=np.zeros(4, np.float32))
    with pytest.raises(KeyError, match="threshold"):
        load_sae(tmp_path)


# ------------------------------------------------------------------------------------------ writing


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_saved_cfg_is_current_saelens_format(tmp_path, arch):
    cfg = SAEConfig(d_in=8, d_sae=16, architecture=arch, k=3, model_name="smollm2-135m",
                    hook_name="blocks.1.hook_resid_post")
    folder = save_sae(SAE(cfg), tmp_path / "s")
    raw = json.loads((folder / "cfg.json").read_text())
    meta = raw["metadata"]
    assert meta["sae_lens_version"].startswith("6.")  # read through sae-lens's current path, not the pre-6 one
    assert meta["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the Hub id, not the registry alias
    assert meta["hook_name"] == "blocks.1.hook_resid_post"
    assert raw["architecture"] == ("topk" if arch == "topk" else "standard")
    assert raw["apply_b_dec_to_input"] is True and raw["normalize_activations"] == "none"
    assert raw["probekit"]["model_name"] == "smollm2-135m"
    back = load_sae(folder)
    assert back.cfg.model_name == "smollm2-135m"  # the alias survives a round trip


def test_saved_cfg_keeps_unknown_model_names(tmp_path):
    folder = save_sae(SAE(SAEConfig(d_in=4, d_sae=8, k=2, model_name="/data/my-model")), tmp_path / "s")
    assert json.loads((folder / "cfg.json").read_text())["metadata"]["model_name"] == "/data/my-model"


@pytest.mark.parametrize("kind", ["jumprelu", "gated", "batchtopk", "topk_rescale", "standard_layer_norm",
                                  "standard_no_b_dec_in"])
def test_every_kind_round_trips_through_save(tmp_path, kind):
    ref = load_file(str(FIXTURES / kind / "reference.safetensors"))
    back = load_sae(save_sae(load_sae(FIXTURES / kind), tmp_path / kind))
    with torch.no_grad():
        _close(back(ref["x"]), ref["forward"], f"{kind} after save")


@pytest.mark.parametrize("kind", ["standard_layer_norm", "standard_constant_norm_rescale"])
def test_metrics_of_normalising_saes(kind):
    """sae_metrics decodes with the tokens' own normalisation: its FVU is that of the SAE's forward output."""
    from probekit.probes.sae import fvu, sae_metrics

    ref = load_file(str(FIXTURES / kind / "reference.safetensors"))
    m = sae_metrics(load_sae(FIXTURES / kind), ref["x"])
    assert m.fvu == pytest.approx(fvu(ref["x"], ref["forward"]), rel=1e-6)
