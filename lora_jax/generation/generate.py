"""Autoregressive generation with a KV cache: one prefill, then a compiled decode loop.

    out = lora_jax.generate(model, params, input_ids, attention_mask, max_new_tokens=64,
                            eos_token_id=2, pad_token_id=2)          # greedy
    out = lora_jax.generate(..., temperature=0.7, top_k=50, top_p=0.9, seed=0)  # sampled

Design:

* One `jax.jit` function does everything on device: `init_cache` of length prompt + new tokens,
  the prefill over the (left-padded) prompt, then a `lax.while_loop` that feeds one token per
  step and stops as soon as every row has produced an EOS (or after `max_new_tokens`). No Python
  runs per token, so the loop costs one device dispatch per call.
* Compilation happens once per (model, max_new_tokens, sampling mode) × (batch, prompt length,
  params structure): the jitted functions are cached in `_COMPILED`, `jit` caches the shapes.
  Temperature, top-k and top-p values are traced, so changing them does not recompile
  (see `lora_jax.generation.sampling`).
* Semantics follow `transformers.generate`: prompts are left-padded (positions count real tokens
  only — the models' cache does this), finished rows are filled with `pad_token_id`, the result
  is `[prompt | new tokens]` and is shorter than prompt + max_new_tokens when every row stopped
  early. Sampling is seeded: token t of a call draws from `fold_in(key(seed), t)`.
* LoRA: the params may hold unmerged `lora_a`/`lora_b` leaves (model built with `lora=config`)
  or be merged (`lora_jax.merge`); generation is the same call either way.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.generation.sampling import SamplingParams, mark_seen, select_next

_COMPILED: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()
_MAX_COMPILED = 32


def _init_cache(model, batch: int, max_len: int):
    from lora_jax.models import init_cache

    return init_cache(model.cfg, batch, max_len, getattr(model, "dtype", None) or jnp.float32)


def _generate_impl(model, max_new_tokens: int, mode, params, input_ids, attention_mask, eos, pad, min_new, values, key):
    b, p = input_ids.shape
    cache = _init_cache(model, b, p + max_new_tokens)
    logits, cache = model.apply({"params": params}, input_ids, attention_mask=attention_mask, cache=cache)
    is_eos = lambda tok: jnp.any(tok[..., None] == eos, axis=-1)  # noqa: E731
    eos_vocab = is_eos(jnp.arange(logits.shape[-1]))  # [V]
    # transformers' MinNewTokensLengthLogitsProcessor: no EOS before min_new tokens were generated
    last = lambda logits, step: jnp.where((step < min_new) & eos_vocab, -jnp.inf, logits[:, -1])  # noqa: E731
    # tokens in the sequence so far, for the repetition penalty (transformers skips the left padding)
    seen = jnp.zeros((b, logits.shape[-1] if mode[3] else 0), bool)
    seen = mark_seen(seen, input_ids, attention_mask) if mode[3] else seen
    tok = select_next(last(logits, 0), jax.random.fold_in(key, 0), mode, values, seen)
    out = jnp.full((b, max_new_tokens), pad, jnp.int32).at[:, 0].set(tok)
    ones = jnp.ones((b, 1), jnp.int32)

    def cond(state):
        step, _, done, _, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, tok, done, seen, cache, out = state
        logits, cache = model.apply({"params": params}, tok[:, None], attention_mask=ones, cache=cache)
        seen = mark_seen(seen, tok) if mode[3] else seen
        nxt = select_next(last(logits, step), jax.random.fold_in(key, step), mode, values, seen)
        nxt = jnp.where(done, pad, nxt)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, step))
        return step + 1, nxt, done | is_eos(nxt), seen, cache, out

    state = (jnp.asarray(1, jnp.int32), tok, is_eos(tok), seen, cache, out)
    steps, _, _, _, _, out = jax.lax.while_loop(cond, body, state)
    return out, steps


def compiled_generate(model, max_new_tokens: int, mode: tuple[bool, ...]):
    """The cached jitted generation function for (model, max_new_tokens, sampling mode).

    >>> from lora_jax.models import ModelConfig, build_model
    >>> model = build_model(ModelConfig("llama", 32, 16, 32, 2, 4, 2, 4))
    >>> compiled_generate(model, 4, (False,) * 4) is compiled_generate(model, 4, (False,) * 4)
    True
    """
    key = (model, int(max_new_tokens), tuple(mode))
    fn = _COMPILED.get(key)
    if fn is None:
        fn = jax.jit(functools.partial(_generate_impl, model, int(max_new_tokens), tuple(mode)))
        _COMPILED[key] = fn
        while len(_COMPILED) > _MAX_COMPILED:
            _COMPILED.popitem(last=False)
    else:
        _COMPILED.move_to_end(key)
    return fn


def _as_ids(input_ids, attention_mask):
    try:
        ids = np.asarray(input_ids)
    except ValueError:  # ragged rows
        raise ValueError("input_ids rows have different lengths; pad them on the left to one length "
                         "(tokenizer(..., padding=True) with padding_side='left') and pass the attention_mask") from None
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be a non-empty integer array [batch, prompt_len], got shape {ids.shape} {ids.dtype}")
    if attention_mask is None:
        mask = np.ones(ids.shape, np.int32)
    else:
        mask = np.asarray(attention_mask).reshape(ids.shape).astype(np.int32)
        if not mask[:, -1].all():
            raise ValueError("attention_mask has padding at the end of a prompt; pad prompts on the left "
                             "(tokenizer.padding_side = 'left') for generation")
    return ids.astype(np.int32), mask


def _eos_array(eos_token_id: int | Sequence[int] | None) -> np.ndarray:
    if eos_token_id is None:
        return np.full((1,), -1, np.int32)  # matches no token
    ids = [eos_token_id] if np.ndim(eos_token_id) == 0 else list(eos_token_id)
    return np.asarray(ids, np.int32)


def _temperature(do_sample: bool | None, temperature: float | None) -> float:
    """The temperature SamplingParams takes (0 = greedy) from transformers-style do_sample + temperature."""
    if do_sample is None:
        return 0.0 if temperature is None else temperature
    if do_sample:
        if temperature is not None and float(temperature) == 0.0:
            raise ValueError("do_sample=True needs a temperature > 0 (or none: 1.0); temperature=0 is greedy decoding")
        return 1.0 if temperature is None else temperature
    if temperature is not None and float(temperature) != 0.0:
        raise ValueError(f"temperature={temperature!r} only applies when sampling; drop it or do_sample=False")
    return 0.0


def generate(
    model,
    params,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    eos_token_id: int | Sequence[int] | None | str = "model",
    pad_token_id: int | None | str = "model",
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Continue left-padded prompts: `[B, prompt_len + n]` int32 ids, n <= max_new_tokens.

    Args:
      model: one of our causal LMs (`lora_jax.models`), built with `lora=config` if `params`
        hold unmerged LoRA leaves.
      params: its 'params' collection (base, with LoRA leaves, or merged).
      input_ids / attention_mask: [B, P] (or [P]); prompts left-padded, mask 1 on real tokens.
      max_new_tokens: tokens to add per row (the loop stops early once every row hit EOS).
      min_new_tokens: EOS ids are not generated before this many new tokens (transformers'
        MinNewTokensLengthLogitsProcessor); traced, so changing it does not recompile.
      eos_token_id: an id or a list of ids that end a row; "model" (the default) = the
        checkpoint's own EOS (`model.cfg.eos_token_id`: generation_config.json's when the checkpoint
        has one, else config.json's — the ids transformers' generate defaults to); None = never stop early.
      pad_token_id: written after a row's EOS; "model" (the default) = the checkpoint's pad id
        (`model.cfg.pad_token_id`) or, when it has none, the first EOS id — transformers' rule;
        None = the first EOS id.
      do_sample: transformers' switch: None (default) = sample iff temperature > 0; True = sample
        (temperature defaults to 1.0); False = greedy (a temperature > 0 with it is refused).
      temperature: None or 0 = greedy (the default, whatever generation_config.json says about sampling);
        > 0 samples after temperature, top_k, top_p (transformers' order). top_k / top_p without
        a temperature > 0 are refused (transformers would ignore them when not sampling).
      top_k: None = transformers' default 50 when sampling; 0 = no top-k filter.
      repetition_penalty: transformers' (> 1 discourages repeats; applied before the above,
        greedy included); None or 1.0 = off.
      seed: sampling seed (same seed, same tokens).

    >>> import jax, numpy as np
    >>> from lora_jax.models import ModelConfig, build_model
    >>> model = build_model(ModelConfig("llama", 32, 16, 32, 2, 4, 2, 4))
    >>> params = model.init(jax.random.key(0), np.zeros((1, 1), np.int32))["params"]
    >>> generate(model, params, np.array([[5, 6, 7]]), max_new_tokens=4).shape
    (1, 7)
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, (int, np.integer)) or min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be an integer >= 0, got {min_new_tokens!r}")
    ids, mask = _as_ids(input_ids, attention_mask)
    cfg = getattr(model, "cfg", None)
    vocab = getattr(cfg, "vocab_size", None)
    if vocab is not None and (ids.min() < 0 or ids.max() >= vocab):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise ValueError(f"input_ids holds token id {bad} outside the model's vocabulary (0..{vocab - 1}), padding "
                         "included; use the model's own tokenizer and an in-vocabulary pad id")
    n_pos = getattr(cfg, "max_position_embeddings", None)
    if n_pos is not None and ids.shape[1] > n_pos:
        raise ValueError(f"the prompt has {ids.shape[1]} tokens but the model has {n_pos} positions; shorten the prompt")
    if n_pos is not None and getattr(cfg, "family", None) == "gpt2" and ids.shape[1] + max_new_tokens > n_pos:
        raise ValueError(f"prompt ({ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceed the model's {n_pos} learned "
                         "positions; lower max_new_tokens or shorten the prompt")
    if isinstance(eos_token_id, str):
        if eos_token_id != "model":
            raise ValueError(f"eos_token_id must be an id, a list of ids, None or 'model', got {eos_token_id!r}")
        eos_token_id = getattr(cfg, "eos_token_id", None)
    sampling = SamplingParams.make(_temperature(do_sample, temperature), top_k, top_p, repetition_penalty)
    eos = _eos_array(eos_token_id)
    if isinstance(pad_token_id, str):
        if pad_token_id != "model":
            raise ValueError(f"pad_token_id must be an id, None or 'model', got {pad_token_id!r}")
        pad_token_id = getattr(cfg, "pad_token_id", None)
    pad = pad_token_id if pad_token_id is not None else max(int(eos[0]), 0) if eos.size else 0
    fn = compiled_generate(model, int(max_new_tokens), sampling.mode)
    out, steps = fn(params, ids, mask, eos, jnp.asarray(pad, jnp.int32), jnp.asarray(min_new_tokens, jnp.int32),
                    sampling.values(), jax.random.key(seed))
    new = np.asarray(out)[:, : int(steps)]
    return np.concatenate([ids, new], axis=1)
