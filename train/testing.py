"""Tiny, offline fixtures for the train tests and smoke runs: a random Llama + its own tokenizer.

`make_tiny_model(dir)` writes an HF model directory (config.json, safetensors, tokenizer) in a
second or two: a byte-level BPE tokenizer trained on the shipped SQL data (a few hundred tokens)
and a 2-layer Llama with hidden size 32 saved with transformers' `save_pretrained` — exactly what
a user's `model.path` would be, only small.

>>> import tempfile
>>> d = make_tiny_model(tempfile.mkdtemp())        # doctest: +SKIP
"""

from __future__ import annotations

import json
import os

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sql", "train.jsonl")


def tiny_tokenizer(vocab_size: int = 400):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    texts = []
    with open(DATA) as fh:
        for line in fh:
            r = json.loads(line)
            texts += [f"<human>: {r['prompt']}\n<assistant>:", " " + r["response"]]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, special_tokens=["<pad>", "<eos>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>", pad_token="<pad>")


def make_tiny_model(directory: str, seed: int = 0, layers: int = 2, hidden: int = 32) -> str:
    """Write a tiny random Llama + tokenizer to `directory` (an HF model dir); returns it."""
    import torch
    import transformers

    tok = tiny_tokenizer()
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id, bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
