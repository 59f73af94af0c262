"""Tiny, offline fixtures for the train tests and smoke runs: a random Llama + its own tokenizer.

`make_tiny_model(dir)` writes an HF model directory (config.json, safetensors, tokenizer) in a
second or two: a byte-level BPE tokenizer trained on the shipped SQL data (600 tokens)
and a 2-layer Llama with hidden size 32 saved with transformers' `save_pretrained` — exactly what
a user's `model.path` would be, only small.

>>> import tempfile
>>> d = make_tiny_model(tempfile.mkdtemp())        # doctest: +SKIP
"""

from __future__ import annotations

import json
import os

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sql", "train.jsonl")


def tiny_tokenizer(vocab_size: int = 600):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    with open(DATA) as fh:
        for line in fh:
            r = json.loads(line)
            texts += [f"<human>: {r['prompt']}\n<assistant>:", " " + r["response"]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<pad>")


def make_tiny_model(directory: str, seed: int = 0, layers: int = 2, hidden: int = 32) -> str:
    """Write a tiny random Llama + tokenizer to `directory` (an HF model dir, no torch needed)."""
    import numpy as np
    import transformers
    from safetensors.numpy import save_file

    tok = tiny_tokenizer()
    heads, kv, d_ff, v = 4, 2, 2 * hidden, len(tok)
    hd = hidden // heads
    cfg = transformers.LlamaConfig(vocab_size=v, hidden_size=hidden, intermediate_size=d_ff, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=256,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                                   tie_word_embeddings=False, torch_dtype="float32")
    rng = np.random.default_rng(seed)
    w = lambda *shape: (rng.standard_normal(shape) * 0.1).astype(np.float32)  # noqa: E731
    t = {"model.embed_tokens.weight": w(v, hidden), "model.norm.weight": np.ones(hidden, np.float32), "lm_head.weight": w(v, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": np.ones(hidden, np.float32), p + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
                  p + "self_attn.q_proj.weight": w(heads * hd, hidden), p + "self_attn.k_proj.weight": w(kv * hd, hidden),
                  p + "self_attn.v_proj.weight": w(kv * hd, hidden), p + "self_attn.o_proj.weight": w(hidden, heads * hd),
                  p + "mlp.gate_proj.weight": w(d_ff, hidden), p + "mlp.up_proj.weight": w(d_ff, hidden), p + "mlp.down_proj.weight": w(hidden, d_ff)})
    os.makedirs(directory, exist_ok=True)
    cfg.save_pretrained(directory)
    save_file(t, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(directory)
    return directory
