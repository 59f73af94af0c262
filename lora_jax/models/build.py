"""`build_model`: the Flax module for a `ModelConfig`, and `param_shapes` (its param tree, no FLOPs).

>>> from lora_jax.models.config import ModelConfig
>>> model = build_model(ModelConfig("llama", 32, 16, 32, 2, 4, 2, 4), scan_layers=True)
>>> param_shapes(model)["model"]["layers"]["self_attn"]["q_proj"]["kernel"].shape
(2, 16, 16)
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.config import LoraConfig
from lora_jax.defaults import platform_defaults
from lora_jax.models.attn_dispatch import check_choice
from lora_jax.models import families
from lora_jax.models.causal_lm import CausalLM
from lora_jax.models.config import ModelConfig
from lora_jax.models.stack import remat_policy


def as_dtype(dtype: Any) -> Any:
    """'float32' / 'bfloat16' / 'float16' / a jnp dtype -> the jnp dtype.

    >>> as_dtype("bfloat16")
    dtype(bfloat16)
    """
    try:
        return jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"unknown dtype {dtype!r}; use 'float32', 'bfloat16' or 'float16'") from None


def build_model(
    cfg: ModelConfig,
    dtype: Any = "float32",
    param_dtype: Any = None,
    scan_layers: bool = False,
    remat: str | Callable | None = "auto",
    lora: LoraConfig | None = None,
    attention: str = "auto",
) -> nn.Module:
    """The causal LM for `cfg`: compute `dtype`, params in `param_dtype` (None = `dtype`).

    `remat`: "auto" (the platform's default, `lora_jax.defaults`), None, "full" or a policy name.
    `attention`: "auto" | "reference" | "xla" | "cudnn" | "splash" (`lora_jax.models.attn_dispatch`).

    >>> from lora_jax.models.config import ModelConfig
    >>> type(build_model(ModelConfig("llama", 32, 16, 32, 2, 4, 2, 4))).__name__
    'LlamaForCausalLM'
    """
    if isinstance(remat, str) and remat == "auto":
        remat = platform_defaults().remat
    remat_policy(remat)  # validate
    check_choice(attention)
    dtype = as_dtype(dtype)
    param_dtype = dtype if param_dtype is None else as_dtype(param_dtype)
    cls = families.of(cfg).causal_lm
    return cls(cfg, dtype=dtype, param_dtype=param_dtype, lora=lora, scan_layers=scan_layers, remat=remat,
               attention=attention)


def param_shapes(model: nn.Module) -> Any:
    """The model's param tree as `jax.ShapeDtypeStruct` leaves (traced, never materialised).

    >>> from lora_jax.models.config import ModelConfig
    >>> sorted(param_shapes(build_model(ModelConfig("llama", 32, 16, 32, 2, 4, 2, 4))))
    ['lm_head', 'model']
    """
    ids = jnp.zeros((1, 1), jnp.int32)
    if hasattr(model, "attention"):  # the params do not depend on it; a fused kernel may refuse 1 token
        model = model.clone(attention="reference")
    return jax.eval_shape(lambda: model.init(jax.random.key(0), ids))["params"]


def lm_head(model: nn.Module, params: Any) -> tuple[jax.Array, bool] | None:
    """(head weight, vocab_first) of one of our causal LMs, for a loss that applies the head itself.

    Tied embeddings give the embedding [V, D] (vocab_first=True), an untied head its kernel [D, V].
    None when the model is not one of ours (no `return_hidden`), its logits are soft-capped (Gemma 2)
    or the head carries LoRA leaves (explicitly targeted `lm_head`): the caller then uses the logits
    the model returns.

    >>> from lora_jax.models.config import ModelConfig
    >>> model = build_model(ModelConfig("llama", 32, 16, 32, 2, 4, 2, 4))
    >>> w, vocab_first = lm_head(model, model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"])
    >>> w.shape, vocab_first
    ((16, 32), False)
    """
    if not isinstance(model, CausalLM) or model.cfg.final_softcap is not None:  # soft-capped logits: the model's head
        return None
    if model.cfg.tie_word_embeddings:
        return params[model.decoder_name][model.embed_name]["embedding"], True
    head = params["lm_head"]
    if set(head) != {"kernel"}:  # LoRA leaves (or a bias): only the model's own head applies them
        return None
    return head["kernel"], False
