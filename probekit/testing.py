"""Tiny random-init models that save as real Hugging Face folders, for tests and examples (no downloads).

>>> from probekit.testing import make_tiny_model
>>> path = make_tiny_model("/tmp/tiny-llama", arch="llama")   # doctest: +SKIP
>>> from probekit.models import load_model
>>> bridge, tok = load_model(path)                            # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import torch


def byte_tokenizer(*, bos: bool = True, name: str = "tiny-byte"):
    """A byte-level tokenizer (one token per UTF-8 byte) with BOS/EOS/PAD, built in memory."""
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
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   add_bos_token=bos, name_or_path=name)


def make_tiny_model(path: str | Path, *, arch: str = "llama", n_layers: int = 3, d_model: int = 64,
                    seed: int = 0) -> Path:
    """Save a random-init ``arch`` ("llama" | "qwen2" | "bert") model + byte tokenizer to ``path``."""
    from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    tok = byte_tokenizer(bos=arch != "bert")
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tok), hidden_size=d_model, intermediate_size=2 * d_model,
                  num_hidden_layers=n_layers, num_attention_heads=4, max_position_embeddings=512)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, pad_token_id=tok.pad_token_id, **common))
    elif arch == "bert":
        model = BertForMaskedLM(BertConfig(pad_token_id=tok.pad_token_id, **common))
    else:
        raise ValueError(f"arch must be 'llama', 'qwen2' or 'bert', got {arch!r}")
    model.eval().save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return path
