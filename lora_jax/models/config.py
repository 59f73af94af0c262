"""`ModelConfig`: the architecture facts our Flax models need, read from a transformers config.

One frozen (hashable) dataclass covers every supported family, so it can be a linen module
attribute and a `jit` static argument. Which family serves a `model_type`, and how that family
reads its transformers config, is declared in the family's module (`lora_jax.models.families`):

    llama      (llama / mistral / qwen2 / qwen3): pre-norm RMSNorm decoder, RoPE, GQA, SwiGLU MLP;
               flags: attention_bias (q/k/v), o_bias, mlp_bias, qk_norm (Qwen3's per-head RMSNorm
               on q and k), sliding_window + sliding_layers.
    gpt2       (gpt2): LayerNorm, learned positions, fused Conv1D c_attn, tied head.
    gemma      (gemma2 / gemma3_text): (1 + w) RMSNorm (norm_plus_one), pre- and post-norms,
               embeddings scaled by sqrt(hidden) (embed_scale), attention and final
               logit soft-capping (attn_softcap, final_softcap), alternating sliding/global layers
               with their own rope base (rope_local_theta), query_pre_attn_scalar (attn_scale).
    qwen3_moe  (qwen3_moe): Qwen3 attention, sparse MoE MLP (num_experts, num_experts_per_tok,
               moe_intermediate_size, norm_topk_prob).

RoPE: `rope_theta` and `rope_scaling` (the rope parameters besides theta as sorted (key, value)
pairs, e.g. (("factor", 8.0), ("high_freq_factor", 4.0), ..., ("rope_type", "llama3"))).
Supported rope types: default, linear, llama3 (others raise ValueError when the config is read).
Sliding-window layers use `rope_local_theta` / `rope_local_scaling` when set (Gemma 3).
"""

from __future__ import annotations

import dataclasses
from typing import Any

_ROPE_TYPES = ("default", "linear", "llama3")
_ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one causal LM (see the module docstring).

    >>> cfg = ModelConfig(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4)
    >>> cfg.family, cfg.num_layers
    ('llama', 2)
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    attention_bias: bool = False  # bias on q/k/v projections
    o_bias: bool = False  # bias on the output projection
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()  # per layer: does it use the sliding window
    hidden_act: str = "silu"
    attn_scale: float | None = None  # None = head_dim ** -0.5
    # Gemma 2/3
    norm_plus_one: bool = False  # RMSNorm multiplies by (1 + w) in fp32
    embed_scale: bool = False  # embeddings times sqrt(hidden_size), in the compute dtype
    attn_softcap: float | None = None  # cap * tanh(scores / cap)
    final_softcap: float | None = None  # cap * tanh(logits / cap)
    rope_local_theta: float | None = None  # rope base of sliding-window layers (None: rope_theta)
    rope_local_scaling: tuple[tuple[str, Any], ...] | None = None
    # mixture of experts (qwen3_moe)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    eos_token_id: int | tuple[int, ...] | None = None  # the checkpoint's EOS: lora_jax.generate's default
    pad_token_id: int | None = None  # the checkpoint's pad id: what lora_jax.generate writes after a row's EOS

    def __post_init__(self):
        if self.model_type not in supported_model_types():
            raise ValueError(unsupported_message(self.model_type))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"activation {self.hidden_act!r} is not supported; supported: {', '.join(_ACTIVATIONS)}")
        if self.sliding_layers and len(self.sliding_layers) != self.num_layers:
            raise ValueError(f"sliding_layers has {len(self.sliding_layers)} entries for {self.num_layers} layers")
        for scaling in (self.rope_scaling, self.rope_local_scaling):
            rope_type = dict(scaling or ()).get("rope_type", "default")
            if rope_type not in _ROPE_TYPES:
                raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {', '.join(_ROPE_TYPES)}")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_experts={self.num_experts}")

    @property
    def family(self) -> str:
        """The name of the family that serves this model_type (`lora_jax.models.families`)."""
        from lora_jax.models.families import for_model_type

        return for_model_type(self.model_type).name

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5 if self.attn_scale is None else self.attn_scale

    @property
    def rope(self) -> dict[str, Any]:
        """The rope parameters as a dict (rope_type 'default' when unscaled)."""
        return dict(self.rope_scaling or (("rope_type", "default"),))

    @property
    def has_local_rope(self) -> bool:
        """Whether sliding-window layers rotate with their own rope base (Gemma 3)."""
        return self.rope_local_theta is not None and bool(self.sliding_layers)

    @classmethod
    def from_hf(cls, hf_config: Any) -> "ModelConfig":
        """Read a transformers `PretrainedConfig` (never executes remote code).

        >>> import transformers
        >>> hf = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        ...                               intermediate_size=128, num_hidden_layers=2, vocab_size=100)
        >>> ModelConfig.from_hf(hf).head_dim
        16
        """
        from lora_jax.models.families import for_model_type

        model_type = getattr(hf_config, "model_type", None)
        if model_type not in supported_model_types():
            raise ValueError(unsupported_message(model_type, getattr(hf_config, "architectures", None)))
        cfg = for_model_type(model_type).config_from_hf(hf_config)
        return with_special_ids(cfg, hf_config)


def with_special_ids(cfg: ModelConfig, source: Any) -> ModelConfig:
    """`cfg` with the eos/pad ids of `source` (a transformers config or GenerationConfig).

    >>> import transformers
    >>> cfg = ModelConfig("llama", 32, 16, 32, 2, 4, 2, 4)
    >>> with_special_ids(cfg, transformers.GenerationConfig(eos_token_id=[3, 7])).eos_token_id
    (3, 7)
    """
    pad = getattr(source, "pad_token_id", None)
    return dataclasses.replace(cfg, eos_token_id=_eos(getattr(source, "eos_token_id", None)),
                               pad_token_id=None if pad is None else int(pad))


def decoder_fields(hf_config: Any, *, tie_default: bool, max_positions_default: int) -> dict:
    """The ModelConfig fields every RMSNorm decoder config (Llama, Gemma, Qwen, ...) spells the same way.

    >>> import transformers
    >>> f = decoder_fields(transformers.LlamaConfig(num_attention_heads=8, num_key_value_heads=2), tie_default=False,
    ...                    max_positions_default=2048)
    >>> f["num_kv_heads"], f["head_dim"]
    (2, 512)
    """
    g = lambda name, default=None: getattr(hf_config, name, default)  # noqa: E731
    n_heads = hf_config.num_attention_heads
    return dict(
        model_type=hf_config.model_type,
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=n_heads,
        num_kv_heads=g("num_key_value_heads") or n_heads,
        head_dim=g("head_dim") or hf_config.hidden_size // n_heads,
        norm_eps=float(hf_config.rms_norm_eps),
        tie_word_embeddings=bool(g("tie_word_embeddings", tie_default)),
        max_position_embeddings=int(g("max_position_embeddings", max_positions_default)),
    )


def read_rope(g) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """(theta, rope_scaling) from a transformers rope dict getter (rope_parameters or rope_scaling)."""
    rope = dict(g("rope_parameters") or g("rope_scaling") or {})
    return rope_from_dict(rope, g("rope_theta", 10000.0))


def rope_from_dict(rope: dict, default_theta: Any = 10000.0) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """(theta, rope_scaling) from one transformers rope-parameters dict.

    >>> rope_from_dict({"rope_theta": 5.0, "rope_type": "default"})
    (5.0, None)
    """
    rope = dict(rope)
    theta = float(rope.pop("rope_theta", default_theta))
    if rope.get("rope_type", rope.get("type", "default")) == "default" and "factor" not in rope:
        scaling = None
    else:
        rope["rope_type"] = rope.pop("type", rope.get("rope_type"))
        scaling = tuple(sorted(rope.items()))
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    return theta, scaling


def supported_model_types() -> tuple[str, ...]:
    """Every HF model_type some family serves (`lora_jax.models.families`).

    >>> "llama" in supported_model_types()
    True
    """
    from lora_jax.models.families import model_types

    return model_types()


def __getattr__(name: str) -> Any:  # SUPPORTED_ARCHITECTURES is read from the registry when asked for
    if name == "SUPPORTED_ARCHITECTURES":
        return supported_model_types()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _eos(value: Any) -> int | tuple[int, ...] | None:
    """An HF config's eos_token_id (an id or a list), hashable."""
    if value is None or isinstance(value, int):
        return value
    return tuple(int(v) for v in value)


def unsupported_message(model_type: Any, architectures: Any = None) -> str:
    """The one-line error for an architecture we have no model for.

    >>> unsupported_message("phi")[:40]
    "unsupported architecture model_type='phi"
    """
    arch = f" ({', '.join(architectures)})" if architectures else ""
    return (
        f"unsupported architecture model_type={model_type!r}{arch}; supported model types: "
        f"{', '.join(supported_model_types())} (Llama 2/3, SmolLM, Mistral, Qwen2, Qwen3, GPT-2, Gemma 2/3, Qwen3-MoE)"
    )
