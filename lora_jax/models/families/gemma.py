"""Gemma 2 and Gemma 3 (text) in Flax linen, named as transformers' `Gemma2ForCausalLM` /
`Gemma3ForCausalLM`.

Same tree as the Llama family (`model.embed_tokens`, `model.layers.N.self_attn.{q,k,v,o}_proj`,
`mlp.{gate,up,down}_proj`, `model.norm`; tied head) plus, per block, the sandwich norms
`post_attention_layernorm` (on the attention output), `pre_feedforward_layernorm` and
`post_feedforward_layernorm`; Gemma 3 adds `self_attn.q_norm` / `k_norm` over head_dim. What
differs from Llama, each exactly as transformers computes it:

    RMSNorm              x̂ · (1 + w), both in float32, then cast (weights initialised to zeros)
    embeddings           times sqrt(hidden_size), a constant in the compute dtype
    attention scale      query_pre_attn_scalar ** -0.5 (not head_dim ** -0.5)
    soft-capping         attention scores cap · tanh(s / cap) (attn_logit_softcapping), and the final
                         logits likewise (final_logit_softcapping; Gemma 2 sets both)
    layer types          config.layer_types: sliding_attention layers see the last sliding_window
                         tokens, full_attention layers everything (scan_layers passes the pattern
                         as a per-layer bool, so one scanned block serves both)
    rope                 Gemma 3: full layers use rope_parameters['full_attention'] (theta 1e6, and
                         e.g. linear scaling), sliding layers rope_parameters['sliding_attention']

>>> cfg = ModelConfig("gemma2", 32, 16, 32, 2, 4, 2, 4, norm_plus_one=True, embed_scale=True,
...                   tie_word_embeddings=True, attn_softcap=50.0, final_softcap=30.0, hidden_act="gelu_pytorch_tanh")
>>> import jax
>>> params = Gemma2ForCausalLM(cfg).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
>>> sorted(params["model"]["layers"]["0"])
['input_layernorm', 'mlp', 'post_attention_layernorm', 'post_feedforward_layernorm', 'pre_feedforward_layernorm', 'self_attn']
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lora_jax.config import LoraConfig
from lora_jax.models import attention
from lora_jax.models.blocks import Attention, GatedMLP, rms_norm
from lora_jax.models.causal_lm import CausalLM
from lora_jax.models.config import ModelConfig, decoder_fields, read_rope, rope_from_dict
from lora_jax.models.families import Family
from lora_jax.models.families.llama import RULES
from lora_jax.models.rope import cos_sin
from lora_jax.models.stack import block_stack, run_blocks, saved


def _pick(local: Any, pair: Any, sliding: Any) -> Any:
    """cos or sin of this layer: pair is (global, local) when sliding layers have their own rope."""
    if not local:
        return pair
    return jnp.where(sliding, pair[1], pair[0])


class GemmaDecoderLayer(nn.Module):
    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x, cos, sin, mask, window, index, sliding, kv):
        c, kw = self.cfg, dict(cfg=self.cfg, dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
        norm = lambda name: rms_norm(c, self.dtype, self.param_dtype, name)  # noqa: E731
        mask = attention.layer_mask(mask, window, sliding)
        cos, sin = _pick(c.has_local_rope, cos, sliding), _pick(c.has_local_rope, sin, sliding)
        h = norm("input_layernorm")(x)
        h, kv = Attention(**kw, name="self_attn")(h, cos, sin, mask, index, kv)
        x = saved(x + norm("post_attention_layernorm")(h))
        h = GatedMLP(**kw, name="mlp")(norm("pre_feedforward_layernorm")(x))
        return x + norm("post_feedforward_layernorm")(h), kv


class GemmaModel(nn.Module):
    """The decoder (HF's `model`): scaled embeddings, blocks, final (1 + w) norm."""

    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: LoraConfig | None = None
    scan_layers: bool = False
    remat: Any = None
    attention: str = "auto"

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None):
        c = self.cfg
        positions, mask, window, new_cache = attention.prepare(c, input_ids, attention_mask, positions, cache,
                                                               self.attention)
        x = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name="embed_tokens")(input_ids)
        if c.embed_scale:
            x = x * jnp.asarray(c.hidden_size**0.5, x.dtype)
        cos, sin = cos_sin(c, positions, self.dtype)
        if c.has_local_rope:
            cos_l, sin_l = cos_sin(c, positions, self.dtype, local=True)
            cos, sin = (cos, cos_l), (sin, sin_l)
        layers = block_stack(GemmaDecoderLayer, c, dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora,
                             scan=self.scan_layers, remat=self.remat, name="layers")
        x, new_cache = run_blocks(layers, x, cos, sin, mask, window, cache, new_cache)
        return rms_norm(c, self.dtype, self.param_dtype, "norm")(x), new_cache


class Gemma2ForCausalLM(CausalLM):
    """Gemma 2 / Gemma 3 text causal LM (one class; the config carries the differences)."""

    decoder = GemmaModel


Gemma3ForCausalLM = Gemma2ForCausalLM


def config_from_hf(hf_config: Any) -> ModelConfig:
    """ModelConfig of a transformers Gemma2Config / Gemma3TextConfig.

    >>> import transformers
    >>> hf = transformers.Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=16, sliding_window=4,
    ...     layer_types=["sliding_attention", "full_attention"])
    >>> c = config_from_hf(hf)
    >>> c.sliding_layers, c.rope_theta, c.rope_local_theta, c.attn_scale
    ((True, False), 1000000.0, 10000.0, 0.25)
    """
    g = lambda name, default=None: getattr(hf_config, name, default)  # noqa: E731
    model_type = hf_config.model_type
    if g("use_bidirectional_attention"):
        raise ValueError(f"{model_type} with use_bidirectional_attention=True (an encoder) is not supported; "
                         "lora_jax serves causal LMs")
    n_layers = hf_config.num_hidden_layers
    rope = dict(g("rope_parameters") or {})
    if "full_attention" in rope:  # Gemma 3: one rope dict per layer type
        theta, scaling = rope_from_dict(rope["full_attention"], g("rope_theta", 10000.0))
        local = rope_from_dict(rope.get("sliding_attention", rope["full_attention"]), g("rope_local_base_freq", 10000.0))
    else:
        theta, scaling = read_rope(g)
        local = (float(g("rope_local_base_freq")), None) if g("rope_local_base_freq") else None
    types = g("layer_types") or [("sliding_attention" if (i + 1) % 2 else "full_attention") for i in range(n_layers)]
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise ValueError(f"{model_type} layer_types {unknown} are not supported (only sliding_attention / full_attention)")
    sliding = tuple(t == "sliding_attention" for t in types)
    window = g("sliding_window")
    has_sliding = window is not None and any(sliding)
    softcap = lambda v: None if v is None else float(v)  # noqa: E731
    bias = bool(g("attention_bias", False))
    return ModelConfig(
        **decoder_fields(hf_config, tie_default=True, max_positions_default=8192),
        rope_theta=theta,
        rope_scaling=scaling,
        attention_bias=bias,
        o_bias=bias,
        qk_norm=model_type == "gemma3_text",
        sliding_window=int(window) if has_sliding else None,
        sliding_layers=sliding if has_sliding else (),
        hidden_act=g("hidden_activation") or g("hidden_act") or "gelu_pytorch_tanh",
        attn_scale=float(g("query_pre_attn_scalar")) ** -0.5,
        norm_plus_one=True,
        embed_scale=True,
        attn_softcap=softcap(g("attn_logit_softcapping")),
        final_softcap=softcap(g("final_logit_softcapping")),
        rope_local_theta=local[0] if local and has_sliding and local != (theta, scaling) else None,
        rope_local_scaling=local[1] if local and has_sliding and local != (theta, scaling) else None,
    )


FAMILY = Family(
    name="gemma",
    causal_lm=Gemma2ForCausalLM,
    model_types=("gemma2", "gemma3_text"),
    config_from_hf=config_from_hf,
    layers=("model", "layers"),
    embedding=("model", "embed_tokens"),
    rules=RULES,  # same module names as the Llama family
    ignored_suffixes=("rotary_emb.inv_freq",),
)
