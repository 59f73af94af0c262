"""GPT-2 causal LM in Flax linen, named as transformers' `GPT2LMHeadModel`.

    {'transformer': {'wte': {'embedding': [V, D]}, 'wpe': {'embedding': [P, D]},
                     'h': {'0': {'ln_1': {'scale': [D], 'bias': [D]},
                                 'attn': {'c_attn': {'kernel': [D, 3D], 'bias': [3D]},
                                          'c_proj': {'kernel': [D, D], 'bias': [D]}},
                                 'ln_2': {'scale', 'bias'},
                                 'mlp': {'c_fc': {'kernel': [D, F], 'bias'}, 'c_proj': {'kernel': [F, D], 'bias'}}},
                           '1': ...},
                     'ln_f': {'scale', 'bias'}}}
    (+ 'lm_head': {'kernel': [D, V]} only when tie_word_embeddings is False)

HF's Conv1D stores weight [in, out] — already a Flax kernel, no transpose. Learned absolute
positions (wpe) use the same default positions as the RoPE models (cumsum of the mask), so left
padding works. Base-model dropout (attn/resid/embd pdrop) is not applied: fine-tuning here trains
only LoRA adapters, whose dropout is LoraConfig.dropout. scan_layers stacks 'h' like 'layers'.

>>> FAMILY.conv1d
('c_attn', 'c_proj', 'c_fc')
"""

from __future__ import annotations

from typing import Any

from jax.sharding import PartitionSpec as P

import flax.linen as nn
import jax.numpy as jnp

from lora_jax.config import LoraConfig
from lora_jax.layers import Dense
from lora_jax.models import attention
from lora_jax.models.blocks import activation
from lora_jax.models.causal_lm import CausalLM
from lora_jax.models.config import ModelConfig
from lora_jax.models.families import Family
from lora_jax.models.stack import block_stack, run_blocks, saved


def _layer_norm(cfg: ModelConfig, dtype, param_dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, name=name)


class GPT2Block(nn.Module):
    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x, cos, sin, mask, window, index, sliding, kv):
        c = self.cfg
        h = _layer_norm(c, self.dtype, self.param_dtype, "ln_1")(x)
        attn = _Attn(c, self.dtype, self.param_dtype, self.lora, name="attn")
        h, kv = attn(h, mask, index, kv)
        x = saved(x + h)  # checkpoint_name: kept by remat="save_projections" (lora_jax.models.stack)
        h = _layer_norm(c, self.dtype, self.param_dtype, "ln_2")(x)
        h = _MLP(c, self.dtype, self.param_dtype, self.lora, name="mlp")(h)
        return x + h, kv


class _Attn(nn.Module):
    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x, mask, index, kv):
        c = self.cfg
        b, t, d = x.shape
        qkv = saved(Dense(3 * d, dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora, name="c_attn")(x))
        q, k, v = (y.reshape(b, t, c.num_heads, c.head_dim) for y in jnp.split(qkv, 3, axis=-1))
        out, kv = attention.attend(q, k, v, mask, c.scale, kv, index)
        return Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora, name="c_proj")(out), kv


class _MLP(nn.Module):
    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        h = saved(Dense(c.intermediate_size, dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora, name="c_fc")(x))
        h = activation(c.hidden_act)(h)
        return Dense(c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora, name="c_proj")(h)


class GPT2Model(nn.Module):
    """HF's `transformer`: token + position embeddings, blocks `h`, final LayerNorm `ln_f`."""

    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: LoraConfig | None = None
    scan_layers: bool = False
    remat: Any = None
    attention: str = "auto"  # implementation (lora_jax.models.attn_dispatch)

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None):
        c = self.cfg
        if cache is None and input_ids.shape[-1] > c.max_position_embeddings:  # a gather would clamp: a silent wrong answer
            raise ValueError(f"GPT-2 has {c.max_position_embeddings} learned positions, got a sequence of {input_ids.shape[-1]} "
                             "tokens; shorten it (HF's GPT-2 refuses it too)")
        positions, mask, _, new_cache = attention.prepare(c, input_ids, attention_mask, positions, cache,
                                                          self.attention)
        wte = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name="wte")
        wpe = nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name="wpe")
        x = wte(input_ids) + wpe(positions)
        blocks = block_stack(GPT2Block, c, dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora,
                             scan=self.scan_layers, remat=self.remat, name="h")
        x, new_cache = run_blocks(blocks, x, None, None, mask, None, cache, new_cache)
        return _layer_norm(c, self.dtype, self.param_dtype, "ln_f")(x), new_cache


class GPT2LMHeadModel(CausalLM):
    """GPT-2 with its (normally tied) LM head.

    >>> import jax
    >>> cfg = ModelConfig("gpt2", 32, 16, 64, 2, 4, 4, 4, tie_word_embeddings=True, max_position_embeddings=8,
    ...                   attention_bias=True, o_bias=True, mlp_bias=True, hidden_act="gelu_new")
    >>> model = GPT2LMHeadModel(cfg)
    >>> ids = jnp.zeros((1, 3), jnp.int32)
    >>> params = model.init(jax.random.key(0), ids)["params"]
    >>> model.apply({"params": params}, ids)[0].shape
    (1, 3, 32)
    """

    decoder = GPT2Model
    decoder_name = "transformer"
    embed_name = "wte"


def config_from_hf(hf_config: Any) -> ModelConfig:
    """ModelConfig of a transformers GPT2Config."""
    g = lambda name, default=None: getattr(hf_config, name, default)  # noqa: E731
    if g("scale_attn_by_inverse_layer_idx", False):
        raise ValueError("GPT-2 with scale_attn_by_inverse_layer_idx=True is not supported")
    if g("add_cross_attention", False):
        raise ValueError("GPT-2 with add_cross_attention=True is not supported")
    n_embd, n_head = hf_config.n_embd, hf_config.n_head
    head_dim = n_embd // n_head
    return ModelConfig(
        model_type="gpt2",
        vocab_size=hf_config.vocab_size,
        hidden_size=n_embd,
        intermediate_size=g("n_inner") or 4 * n_embd,
        num_layers=hf_config.n_layer,
        num_heads=n_head,
        num_kv_heads=n_head,
        head_dim=head_dim,
        norm_eps=float(hf_config.layer_norm_epsilon),
        tie_word_embeddings=bool(g("tie_word_embeddings", True)),
        max_position_embeddings=hf_config.n_positions,
        attention_bias=True,
        o_bias=True,
        mlp_bias=True,
        hidden_act=g("activation_function", "gelu_new"),
        attn_scale=head_dim**-0.5 if g("scale_attn_weights", True) else 1.0,
    )


RULES = (
    (r"(c_attn|c_fc)\.kernel$", P("fsdp", "tensor")),  # column-parallel
    (r"c_proj\.kernel$", P("tensor", "fsdp")),  # row-parallel
    (r"wte\.embedding$", P("tensor", "fsdp")),  # [vocab, d]
    (r"wpe\.embedding$", P(None, "fsdp")),  # [positions, d]
    (r"lm_head\.kernel$", P("fsdp", "tensor")),
    (r"ln_(1|2|f)\.(scale|bias)$", P()),
    (r"\.bias$", P()),
)

FAMILY = Family(
    name="gpt2",
    causal_lm=GPT2LMHeadModel,
    model_types=("gpt2",),
    config_from_hf=config_from_hf,
    layers=("transformer", "h"),
    embedding=("transformer", "wte"),
    rules=RULES,
    conv1d=("c_attn", "c_proj", "c_fc"),
    # buffers and tied copies some checkpoints carry that have no param of their own
    ignored_suffixes=(".attn.bias", ".attn.masked_bias"),
)
