"""`ModelConfig`: the architecture facts our Flax models need, read from a transformers config.

One frozen (hashable) dataclass covers every supported family, so it can be a linen module
attribute and a `jit` static argument:

    family "llama"  (model_type llama / mistral / qwen2 / qwen3): pre-norm RMSNorm decoder, RoPE,
                    GQA, SwiGLU MLP; flags: attention_bias (q/k/v), o_bias, mlp_bias, qk_norm
                    (Qwen3's per-head RMSNorm on q and k), sliding_window + sliding_layers.
    family "gpt2"   (model_type gpt2): LayerNorm, learned positions, fused Conv1D c_attn, tied head.

RoPE: `rope_theta` and `rope_scaling` (the rope parameters besides theta as sorted (key, value)
pairs, e.g. (("factor", 8.0), ("high_freq_factor", 4.0), ..., ("rope_type", "llama3"))).
Supported rope types: default, linear, llama3 (others raise ValueError when the config is read).
"""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
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
    eos_token_id: int | tuple[int, ...] | None = None  # the checkpoint's EOS: lora_jax.generate's default

    def __post_init__(self):
        if self.model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(unsupported_message(self.model_type))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"activation {self.hidden_act!r} is not supported; supported: {', '.join(_ACTIVATIONS)}")
        if self.sliding_layers and len(self.sliding_layers) != self.num_layers:
            raise ValueError(f"sliding_layers has {len(self.sliding_layers)} entries for {self.num_layers} layers")
        if self.rope_scaling is not None:
            rope_type = dict(self.rope_scaling).get("rope_type", "default")
            if rope_type not in _ROPE_TYPES:
                raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {', '.join(_ROPE_TYPES)}")

    @property
    def family(self) -> str:
        return "gpt2" if self.model_type == "gpt2" else "llama"

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5 if self.attn_scale is None else self.attn_scale

    @property
    def rope(self) -> dict[str, Any]:
        """The rope parameters as a dict (rope_type 'default' when unscaled)."""
        return dict(self.rope_scaling or (("rope_type", "default"),))

    @classmethod
    def from_hf(cls, hf_config: Any) -> "ModelConfig":
        """Read a transformers `PretrainedConfig` (never executes remote code).

        >>> import transformers
        >>> hf = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        ...                               intermediate_size=128, num_hidden_layers=2, vocab_size=100)
        >>> ModelConfig.from_hf(hf).head_dim
        16
        """
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(unsupported_message(model_type, getattr(hf_config, "architectures", None)))
        g = lambda name, default=None: getattr(hf_config, name, default)  # noqa: E731
        if model_type == "gpt2":
            return _gpt2_from_hf(hf_config, g)
        n_layers = hf_config.num_hidden_layers
        n_heads = hf_config.num_attention_heads
        rope = dict(g("rope_parameters") or g("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", g("rope_theta", 10000.0)))
        if rope.get("rope_type", rope.get("type", "default")) == "default" and "factor" not in rope:
            scaling = None
        else:
            rope["rope_type"] = rope.pop("type", rope.get("rope_type"))
            scaling = tuple(sorted(rope.items()))
        if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported")
        window = g("sliding_window")
        if model_type in ("qwen2", "qwen3"):
            types = g("layer_types") or ["full_attention"] * n_layers
            sliding = tuple(t == "sliding_attention" for t in types)
            window = window if any(sliding) else None
        else:  # mistral: every layer slides when sliding_window is set
            sliding = (window is not None,) * n_layers
        attn_bias = bool(g("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=n_layers,
            num_heads=n_heads,
            num_kv_heads=g("num_key_value_heads") or n_heads,
            head_dim=g("head_dim") or hf_config.hidden_size // n_heads,
            norm_eps=float(hf_config.rms_norm_eps),
            tie_word_embeddings=bool(g("tie_word_embeddings", False)),
            max_position_embeddings=int(g("max_position_embeddings", 2048)),
            rope_theta=theta,
            rope_scaling=scaling,
            attention_bias=True if model_type == "qwen2" else attn_bias,
            o_bias=attn_bias if model_type in ("llama", "qwen3") else False,
            mlp_bias=bool(g("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=int(window) if window is not None and any(sliding) else None,
            sliding_layers=sliding if window is not None and any(sliding) else (),
            hidden_act=g("hidden_act", "silu"),
            eos_token_id=_eos(g("eos_token_id")),
        )


def _gpt2_from_hf(hf_config: Any, g) -> ModelConfig:
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
        eos_token_id=_eos(g("eos_token_id")),
    )


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
        f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama 2/3, SmolLM, Mistral, Qwen2, Qwen3, GPT-2)"
    )
