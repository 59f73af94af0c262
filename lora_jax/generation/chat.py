"""Chat with a model through its tokenizer's chat template.

`chat(model, params, tokenizer, "What equipment do I need for rock climbing?")` renders the
conversation with `tokenizer.apply_chat_template(..., add_generation_prompt=True)` (the template
adds the default system turn if it has one), tokenizes the text without adding special tokens
again — as `transformers` pipelines do — generates with `lora_jax.generate` (greedy unless
sampling arguments are given) until the tokenizer's EOS or one of the checkpoint's EOS ids (its
generation_config.json may list several, e.g. Llama 3's <|eot_id|> and <|eom_id|>), and decodes
only the new tokens.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from lora_jax.generation.generate import generate

Messages = str | Sequence[Mapping[str, str]]


def _as_messages(messages: Messages) -> list[dict[str, str]]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    out = [dict(m) for m in messages]
    if not out or not all("role" in m and "content" in m for m in out):
        raise ValueError("messages must be a prompt string or a non-empty list of {'role': ..., 'content': ...} dicts")
    return out


def chat_input_ids(tokenizer: Any, messages: Messages) -> np.ndarray:
    """Token ids [1, T] of the chat-templated conversation, ending with the assistant prompt.

    >>> from lora_jax.models.gguf import load_tokenizer          # doctest: +SKIP
    >>> chat_input_ids(load_tokenizer(), "Hi").shape[0]          # doctest: +SKIP
    1
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat_template; pass a chat model's tokenizer or call generate() on plain ids")
    text = tokenizer.apply_chat_template(_as_messages(messages), tokenize=False, add_generation_prompt=True)
    return np.asarray([tokenizer(text, add_special_tokens=False)["input_ids"]], np.int32)


def _stop_ids(tokenizer: Any, model: Any) -> list[int] | None:
    """The tokenizer's EOS id followed by the checkpoint's (deduplicated); None when neither has one."""
    own = getattr(getattr(model, "cfg", None), "eos_token_id", None)
    ids = [tokenizer.eos_token_id] + ([own] if isinstance(own, int) else list(own or ()))
    out = list(dict.fromkeys(int(i) for i in ids if i is not None))
    return out or None


def chat(model: Any, params: Any, tokenizer: Any, messages: Messages, *, max_new_tokens: int = 256, **gen_kwargs) -> str:
    """The model's reply to `messages` (a prompt string or a list of role/content dicts).

    `gen_kwargs` go to `lora_jax.generate` (temperature, top_k, top_p, seed, eos_token_id, …);
    eos defaults to the tokenizer's EOS plus the checkpoint's (`model.cfg.eos_token_id`), pad to
    the tokenizer's pad (else its EOS).

    >>> from lora_jax.models import from_pretrained                       # doctest: +SKIP
    >>> from lora_jax.models.gguf import default_model_path, load_tokenizer  # doctest: +SKIP
    >>> model, params, _ = from_pretrained(default_model_path())             # doctest: +SKIP
    >>> chat(model, params, load_tokenizer(), "Say hi.", max_new_tokens=8)  # doctest: +SKIP
    'Hi! How can I help you today?'
    """
    ids = chat_input_ids(tokenizer, messages)
    gen_kwargs.setdefault("eos_token_id", _stop_ids(tokenizer, model))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen_kwargs.setdefault("pad_token_id", pad if pad is not None else 0)
    out = generate(model, params, ids, None, max_new_tokens=max_new_tokens, **gen_kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
