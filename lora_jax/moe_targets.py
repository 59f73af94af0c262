"""PEFT's rewrite of `target_modules` for mixture-of-experts models whose experts transformers >= 5 fuses.

`convert_moe_targets` turns targets naming the pre-fusion expert Linears (`gate_proj`, `up_proj`,
`down_proj`) into `target_parameters` on the fused expert tensors, as PEFT does when it loads
such a model; `lora_jax.targeting.plan_targets` and the PEFT writer apply it.

>>> convert_moe_targets(LoraConfig(target_modules=["q_proj"]), ["model.layers.0.self_attn.q_proj"]).target_modules
('q_proj',)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from lora_jax.config import ALL_LINEAR, LoraConfig
from lora_jax.target_rules import _matches, is_parameter_key


# transformers >= 5 fuses the experts of MoE models (Qwen3-MoE: `mlp.experts.gate_up_proj` / `down_proj`
# parameters, the router `mlp.gate` a custom module), so PEFT 0.21 rewrites target_modules that name the
# pre-fusion nn.Linear modules into target_parameters (peft/utils/transformers_weight_conversion.py,
# _convert_peft_config_moe): v4 name -> fused parameter; a fused pair needs both halves and gets rank and
# alpha doubled (same alpha/r) via a `.*\.gate_up_proj` pattern; the router becomes `gate.weight`.
MOE_V4_NAMES = {"gate": "gate.weight", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}
MOE_FUSED = {"gate_up_proj": ("gate_proj", "up_proj")}
_EXPLICIT = ("list the targets instead, e.g. target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj'], "
             "target_parameters=['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']")


def convert_moe_targets(config: LoraConfig, names: Any) -> LoraConfig:
    """`config` as PEFT (with transformers >= 5) rewrites it for a model with fused MoE expert tensors:
    `names` are the model's PEFT module/parameter names; without expert tensors `config` is returned.

    A regex or "all-linear" is first resolved to leaf names, as PEFT does; LoRA on the router
    (PEFT's `gate.weight`), which lora_jax does not implement, is refused in one line.

    >>> names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate",
    ...          "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"]
    >>> c = convert_moe_targets(LoraConfig(r=2, alpha=4, target_modules=["q_proj", "gate_proj", "up_proj"]), names)
    >>> c.target_modules, c.target_parameters, list(c.rank_pattern.values()), list(c.alpha_pattern.values())
    (('q_proj',), ('gate_up_proj',), [4], [8])
    """
    names = list(names)
    containers = sorted({n.rpartition(".")[0] for n in names if is_parameter_key(n)})
    targets = config.target_modules
    if not containers or targets is None or not targets:
        return config
    if targets == ALL_LINEAR:
        raise ValueError("target_modules='all-linear' on a mixture of experts: PEFT (transformers >= 5) then also adapts the "
                         f"expert tensors and the router (target_parameters gate.weight), which lora_jax cannot; {_EXPLICIT}")
    if isinstance(targets, str):  # PEFT resolves a regex to the leaf names it matches (v4 expert names probed)
        hit = lambda n: re.fullmatch(targets, n) and not (config.exclude_modules and _matches(config.exclude_modules, n))  # noqa: E731
        hits = {n.rsplit(".", 1)[-1] for n in names if hit(n)}
        hits |= {old for c in containers for old in MOE_V4_NAMES if old != "gate" and hit(f"{c}.{old}")}
        if not hits:
            return config
        targets = tuple(sorted(hits))
    mapped = {t: next((new for old, new in MOE_V4_NAMES.items() if t == old or t.endswith("." + old)), None) for t in targets}
    if not any(mapped.values()):
        return config if targets == config.target_modules else dataclasses.replace(config, target_modules=targets)
    if "gate.weight" in mapped.values():
        router = next(t for t, new in mapped.items() if new == "gate.weight")
        raise ValueError(f"target_modules names {router!r}, the MoE router: PEFT (transformers >= 5) adapts its weight "
                         "(target_parameters gate.weight), which lora_jax does not support; leave the router out")
    ranks, alphas = dict(config.rank_pattern), dict(config.alpha_pattern)
    for fused, parts in MOE_FUSED.items():
        present = {old for t, new in mapped.items() if new == fused for old in parts if t == old or t.endswith("." + old)}
        if present and present != set(parts):
            raise ValueError(f"Cannot convert PEFT target(s) {', '.join(sorted(present))} without also targeting "
                             f"{', '.join(sorted(set(parts) - present))} because they are fused into {fused} (PEFT's rule)")
        if present:
            ranks[rf".*\.{re.escape(fused)}"] = config.r * len(parts)
            alphas[rf".*\.{re.escape(fused)}"] = config.alpha * len(parts)
    params = tuple(sorted(set(config.target_parameters or ()) | {new for new in mapped.values() if new}))
    return dataclasses.replace(config, target_modules=tuple(t for t, new in mapped.items() if not new), target_parameters=params,
                               rank_pattern=ranks, alpha_pattern=alphas)
