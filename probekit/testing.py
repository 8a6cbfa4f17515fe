"""Tiny random-init models that save as real Hugging Face folders, for tests and examples (no downloads).

>>> from probekit.testing import make_tiny_model
>>> path = make_tiny_model("/tmp/tiny-llama", arch="llama")   # doctest: +SKIP
>>> from probekit.models import load_model
>>> bridge, tok = load_model(path)                            # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import torch


def byte_tokenizer(*, bos: bool = True, pad: bool = True, name: str = "tiny-byte"):
    """A byte-level tokenizer (one token per UTF-8 byte) with BOS/EOS/PAD, built in memory.

    ``pad=False`` leaves the tokenizer without a pad token, like GPT-2's (the ``<pad>`` id still exists
    in the vocabulary as the unknown token).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    for s in ("<bos>", "<eos>", "<pad>"):
        vocab[s] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [ByteLevel(add_prefix_space=False, use_regex=False), pre_tokenizers.Split("", "isolated")]
    )
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>" if pad else None, add_bos_token=bos, name_or_path=name)


# family → (config class, model class, encoder?) for ``make_tiny_model``; the architectures of issue #16.
FAMILIES: dict[str, tuple[str, str, bool]] = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", False),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", False),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", False),
    "llama": ("LlamaConfig", "LlamaForCausalLM", False),
    "mistral": ("MistralConfig", "MistralForCausalLM", False),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", False),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", False),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", False),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", False),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", False),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", False),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", False),
    "bert": ("BertConfig", "BertForMaskedLM", True),
    "roberta": ("RobertaConfig", "RobertaForMaskedLM", True),
}


def tiny_config(family: str, *, vocab_size: int, n_layers: int = 3, d_model: int = 64, n_heads: int = 4,
                pad_token_id: int | None = None, bos_token_id: int | None = None,
                eos_token_id: int | None = None):
    """A small random-init transformers config of ``family`` (a key of ``FAMILIES``)."""
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    cfg_cls = getattr(transformers, FAMILIES[family][0])
    ids = dict(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    if family == "gpt2":
        kw = dict(n_layer=n_layers, n_embd=d_model, n_head=n_heads, n_positions=512, n_inner=4 * d_model)
    elif family == "gptj":
        kw = dict(n_layer=n_layers, n_embd=d_model, n_head=n_heads, n_positions=512,
                  rotary_dim=d_model // n_heads // 2)
    else:
        kw = dict(num_hidden_layers=n_layers, hidden_size=d_model, num_attention_heads=n_heads,
                  intermediate_size=2 * d_model, max_position_embeddings=512)
        if family not in ("gpt_neox", "bert", "roberta"):
            kw.update(num_key_value_heads=max(1, n_heads // 2))  # grouped-query attention where it exists
        if family in ("qwen3", "gemma", "gemma2", "gemma3"):
            kw.update(head_dim=d_model // n_heads)
        if family == "roberta":  # positions start after the pad id
            kw.update(max_position_embeddings=512 + (pad_token_id or 0) + 2)
    cfg = cfg_cls(vocab_size=vocab_size, **kw, **ids)
    cfg.architectures = [FAMILIES[family][1]]
    return cfg


def make_tiny_model(path: str | Path, *, arch: str = "llama", n_layers: int = 3, d_model: int = 64,
                    seed: int = 0, pad_token: bool | None = None) -> Path:
    """Save a random-init ``arch`` model (a key of ``FAMILIES``) + byte tokenizer to ``path``.

    ``pad_token`` : give the tokenizer a pad token (default: yes, except GPT-2, whose tokenizer has none).
    """
    import transformers

    if arch not in FAMILIES:
        raise ValueError(f"arch must be one of {sorted(FAMILIES)}, got {arch!r}")
    path = Path(path)
    encoder = FAMILIES[arch][2]
    pad = arch != "gpt2" if pad_token is None else pad_token
    tok = byte_tokenizer(bos=not encoder, pad=pad)
    pad_id = tok.convert_tokens_to_ids("<pad>")  # the config keeps a pad id even when the tokenizer has none
    torch.manual_seed(seed)
    cfg = tiny_config(arch, vocab_size=len(tok), n_layers=n_layers, d_model=d_model, pad_token_id=pad_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = getattr(transformers, FAMILIES[arch][1])(cfg)
    model.eval().save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return path
