"""Qwen3-MoE: Qwen3 attention (per-head q/k norm, GQA) with a sparse mixture-of-experts MLP in every
block (`lora_jax.models.moe`), named as transformers' `Qwen3MoeForCausalLM`.

Why Qwen3-MoE: it is current and its routing is the plain form (softmax in float32 -> top-k ->
optional renormalisation, no shared experts, no capacity or jitter), and transformers >= 5 holds
its experts as the stacked 3-D parameters `mlp.experts.gate_up_proj` [E, 2F, D] and
`mlp.experts.down_proj` [E, D, F] — exactly what PEFT's `target_parameters` adapts per expert.
Checkpoints on disk (and what `save_pretrained` writes) keep one tensor per expert,
`mlp.experts.{e}.{gate,up,down}_proj.weight`; the family's codecs fuse them on load and split them
on export. Our kernels are input-major like every other kernel: gate_up_proj [E, D, 2F] (gate
columns first, then up), down_proj [E, F, D].

Supported: every layer sparse (decoder_sparse_step=1, mlp_only_layers=[]); others are refused.
The router auxiliary loss is not added (transformers adds it only with output_router_logits=True).

>>> FAMILY.is_parameter_module("model.layers.mlp.experts.gate_up_proj")
True
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from jax.sharding import PartitionSpec as P

from lora_jax.models.causal_lm import CausalLM
from lora_jax.models.config import ModelConfig
from lora_jax.models.families import Family, TensorCodec
from lora_jax.models.families.llama import RULES as LLAMA_RULES
from lora_jax.models.families.llama import LlamaDecoderLayer, LlamaModel
from lora_jax.models.families.llama import config_from_hf as llama_config_from_hf
from lora_jax.models.moe import SparseMoeBlock


class Qwen3MoeDecoderLayer(LlamaDecoderLayer):
    mlp_cls: Any = SparseMoeBlock


class Qwen3MoeModel(LlamaModel):
    block: Any = Qwen3MoeDecoderLayer


class Qwen3MoeForCausalLM(CausalLM):
    """Qwen3-MoE causal LM (see the module docstring and `lora_jax.models.moe` for the MLP's params).

    >>> import jax, jax.numpy as jnp
    >>> cfg = ModelConfig("qwen3_moe", 32, 16, 32, 1, 4, 2, 4, qk_norm=True, num_experts=4, num_experts_per_tok=2,
    ...                   moe_intermediate_size=8)
    >>> p = Qwen3MoeForCausalLM(cfg).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
    >>> p["model"]["layers"]["0"]["mlp"]["experts"]["gate_up_proj"]["kernel"].shape
    (4, 16, 16)
    """

    decoder = Qwen3MoeModel


def config_from_hf(hf_config: Any) -> ModelConfig:
    """ModelConfig of a transformers Qwen3MoeConfig."""
    g = lambda name, default=None: getattr(hf_config, name, default)  # noqa: E731
    if g("decoder_sparse_step", 1) != 1 or g("mlp_only_layers"):
        raise ValueError("qwen3_moe with dense layers (decoder_sparse_step != 1 or mlp_only_layers) is not supported")
    return dataclasses.replace(
        llama_config_from_hf(hf_config),
        num_experts=int(hf_config.num_experts),
        num_experts_per_tok=int(hf_config.num_experts_per_tok),
        moe_intermediate_size=int(hf_config.moe_intermediate_size),
        norm_topk_prob=bool(g("norm_topk_prob", True)),
    )


def _experts_prefix(module: str) -> str:
    return module.rsplit(".", 1)[0]  # model.layers.N.mlp.experts


def _gate_up_names(module: str, cfg: ModelConfig) -> list[str]:
    pre = _experts_prefix(module)
    return ([f"{pre}.{e}.gate_proj.weight" for e in range(cfg.num_experts)]
            + [f"{pre}.{e}.up_proj.weight" for e in range(cfg.num_experts)])


def _gate_up_join(arrays: list, cfg: ModelConfig) -> np.ndarray:
    e = cfg.num_experts
    gate, up = np.stack(arrays[:e]), np.stack(arrays[e:])  # [E, F, D] each
    return np.ascontiguousarray(np.concatenate([gate, up], axis=1).transpose(0, 2, 1))  # [E, D, 2F]


def _gate_up_split(kernel: np.ndarray, cfg: ModelConfig) -> list:
    fused = kernel.transpose(0, 2, 1)  # [E, 2F, D]
    f = fused.shape[1] // 2
    return [np.ascontiguousarray(x) for x in list(fused[:, :f]) + list(fused[:, f:])]


def _down_names(module: str, cfg: ModelConfig) -> list[str]:
    return [f"{_experts_prefix(module)}.{e}.down_proj.weight" for e in range(cfg.num_experts)]


def _down_join(arrays: list, cfg: ModelConfig) -> np.ndarray:
    return np.ascontiguousarray(np.stack(arrays).transpose(0, 2, 1))  # [E, D, F] -> [E, F, D]


def _down_split(kernel: np.ndarray, cfg: ModelConfig) -> list:
    return [np.ascontiguousarray(x.T) for x in kernel]


RULES = (
    # experts split over 'expert' (dropped where the mesh has no such axis), then FSDP / tensor as a dense MLP
    (r"experts\.gate_up_proj\.kernel$", P("expert", "fsdp", "tensor")),
    (r"experts\.down_proj\.kernel$", P("expert", "tensor", "fsdp")),
    (r"mlp\.gate\.weight$", P()),  # the router [E, D]: small, replicated
) + tuple(LLAMA_RULES)

FAMILY = Family(
    name="qwen3_moe",
    causal_lm=Qwen3MoeForCausalLM,
    model_types=("qwen3_moe",),
    config_from_hf=config_from_hf,
    layers=("model", "layers"),
    embedding=("model", "embed_tokens"),
    rules=RULES,
    codecs=(("mlp.experts.gate_up_proj", TensorCodec(_gate_up_names, _gate_up_join, _gate_up_split)),
            ("mlp.experts.down_proj", TensorCodec(_down_names, _down_join, _down_split))),
    peft_parameters=("mlp.experts", ("gate_up_proj", "down_proj")),
    ignored_suffixes=("rotary_emb.inv_freq",),
)
