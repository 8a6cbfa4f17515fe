"""Response-only fine-tuning on a tiny random-init Llama: loss definition, freezing, exact resume."""

from __future__ import annotations

import pytest
import torch

from probekit.finetune import FinetuneConfig, encode_pairs, finetune, response_loss

PROMPTS = ["say hi", "count to three", "name a colour", "what is 2+2?", "spell cat", "a b c"]
ANSWERS = ["hi!", "one two three", "blue", "4", "c a t", "d e f"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _hf(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(tiny_dir["llama"])
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_encode_pairs_marks_response_and_eos(tiny_dir):
    _, tok = _hf(tiny_dir)
    ex = encode_pairs(tok, ["ab"], ["xyz"], chat_template=False)
    ids, start = ex[0]
    assert ids[:start] == tok("ab")["input_ids"]  # BOS + the prompt
    assert ids[start:] == tok("xyz", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    cut = encode_pairs(tok, ["ab"], ["xyz"], chat_template=False, max_length=start + 2)[0][0]
    assert len(cut) == start + 2
    with pytest.raises(ValueError, match="no room for a response"):
        encode_pairs(tok, ["abcdef"], ["x"], chat_template=False, max_length=4)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        encode_pairs(tok, ["a", "b"], ["x"], chat_template=False)


def test_response_loss_matches_hf_masked_labels(tiny_dir):
    """Independent computation: HF's own loss with the prompt's labels set to -100, one example at a time."""
    model, tok = _hf(tiny_dir)
    per = response_loss(model, tok, PROMPTS, ANSWERS, chat_template=False, per_example=True, batch_size=4)
    ex = encode_pairs(tok, PROMPTS, ANSWERS, chat_template=False)
    tot, cnt = 0.0, 0
    for i, (ids, start) in enumerate(ex):
        x = torch.tensor([ids])
        labels = x.clone()
        labels[0, :start] = -100
        with torch.no_grad():
            ref = model(input_ids=x, labels=labels).loss
        assert abs(per[i].item() - ref.item()) < 1e-4
        tot, cnt = tot + ref.item() * (len(ids) - start), cnt + len(ids) - start
    batched = response_loss(model, tok, PROMPTS, ANSWERS, chat_template=False, batch_size=4)  # padded batches
    assert abs(batched - tot / cnt) < 1e-4


def test_finetune_lowers_loss(tiny_dir):
    model, tok = _hf(tiny_dir)
    before = response_loss(model, tok, PROMPTS, ANSWERS, chat_template=False)
    res = finetune(model, tok, PROMPTS, ANSWERS, FinetuneConfig(epochs=10, lr=3e-3, batch_size=3, warmup_steps=2,
                                                                freeze_embeddings=False, chat_template=False,
                                                                progress=False))
    after = response_loss(model, tok, PROMPTS, ANSWERS, chat_template=False)
    assert after < 0.6 * before
    assert res.steps == 20 and len(res.losses) == 20 and len(res.epoch_losses) == 10
    assert res.epoch_losses[-1] < res.epoch_losses[0]


def test_finetune_freezes_embeddings_and_restores_flags(tiny_dir):
    model, tok = _hf(tiny_dir)
    emb0 = model.get_input_embeddings().weight.clone()
    head0 = model.get_output_embeddings().weight.clone()
    q0 = model.model.layers[0].self_attn.q_proj.weight.clone()
    before = response_loss(model, tok, PROMPTS, ANSWERS, chat_template=False)
    res = finetune(model, tok, PROMPTS, ANSWERS, FinetuneConfig(epochs=10, lr=3e-3, batch_size=3, warmup_steps=2,
                                                                chat_template=False, progress=False))
    # random-init embeddings are tiny, so the frozen model learns slowly; it must still learn
    assert response_loss(model, tok, PROMPTS, ANSWERS, chat_template=False) < before - 0.3
    assert res.n_trainable == sum(p.numel() for p in model.parameters()) - emb0.numel() - head0.numel()
    assert torch.equal(model.get_input_embeddings().weight, emb0)
    assert torch.equal(model.get_output_embeddings().weight, head0)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, q0)
    assert not model.training and all(p.requires_grad for p in model.parameters())  # flags restored


class _Stop(Exception):
    pass


def test_interrupted_finetune_resumes_to_the_same_weights(tiny_dir, tmp_path):
    cfg = FinetuneConfig(epochs=3, lr=1e-3, batch_size=2, warmup_steps=1, chat_template=False, progress=False)
    ref, tok = _hf(tiny_dir)
    finetune(ref, tok, PROMPTS, ANSWERS, cfg)

    model, _ = _hf(tiny_dir)
    calls = {"n": 0}

    def bomb(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # second step of epoch 2 (3 steps per epoch)
            raise _Stop

    h = model.model.register_forward_pre_hook(bomb, with_kwargs=True)
    with pytest.raises(_Stop):
        finetune(model, tok, PROMPTS, ANSWERS, cfg, checkpoint_dir=tmp_path / "ck")
    h.remove()
    fresh, _ = _hf(tiny_dir)  # a new process would start from the original weights
    res = finetune(fresh, tok, PROMPTS, ANSWERS, cfg, checkpoint_dir=tmp_path / "ck")
    assert res.steps == 9 and len(res.losses) == 9
    for (k, a), b in zip(ref.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=k)
    again = finetune(fresh, tok, PROMPTS, ANSWERS, cfg, checkpoint_dir=tmp_path / "ck")  # finished: no steps
    assert again.steps == 9
    with pytest.raises(ValueError, match="different fine-tune"):
        finetune(fresh, tok, PROMPTS, ANSWERS, FinetuneConfig(epochs=4, chat_template=False, progress=False),
                 checkpoint_dir=tmp_path / "ck")
