"""PEFT's `target_parameters` adapters (LoRA on stacked MoE expert tensors) <-> our per-expert leaves.

PEFT wraps the module that owns the parameter (`...mlp.experts`) in a `lora.ParamWrapper`; a second
targeted parameter of the same module wraps the wrapper, so the first one (in the module's
declaration order) moves under `base_layer.`. For E experts at rank r (peft/tuners/lora/layer.py):

    lora_A.weight [E·r, in]    row e·r + j      = A_e[j, :]     ours lora_a [E, in, r]:  a[e, :, j]
    lora_B.weight [out, r·E]   column j·E + e   = B_e[:, j]     ours lora_b [E, r, out]: b[e, j, :]
    ΔW_e = B_e A_e · alpha/r   (in, out: HF's gate_up_proj [E, 2F, D] has in = D, out = 2F)

>>> a = np.arange(12.0).reshape(2, 3, 2); b = np.arange(16.0).reshape(2, 2, 4)
>>> A, B = to_peft(a, b)
>>> A.shape, B.shape
((4, 3), (4, 4))
>>> all(np.array_equal(x, y) for x, y in zip(from_peft(A, B, 2), (a, b)))
True
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


def to_peft(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lora_A.weight [E·r, in], lora_B.weight [out, r·E]) from ours a [E, in, r], b [E, r, out]."""
    e, d_in, r = a.shape
    big_a = a.transpose(0, 2, 1).reshape(e * r, d_in)
    big_b = b.transpose(2, 1, 0).reshape(b.shape[2], r * e)
    return np.ascontiguousarray(big_a), np.ascontiguousarray(big_b)


def from_peft(big_a: np.ndarray, big_b: np.ndarray, n_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Ours a [E, in, r], b [E, r, out] from PEFT's lora_A [E·r, in], lora_B [out, r·E]."""
    r = big_a.shape[0] // n_experts
    a = big_a.reshape(n_experts, r, big_a.shape[1]).transpose(0, 2, 1)
    b = big_b.reshape(big_b.shape[0], r, n_experts).transpose(2, 1, 0)
    return np.ascontiguousarray(a), np.ascontiguousarray(b)


def wrapper_names(targeted: Iterable[str], declared: tuple[str, ...]) -> dict[str, str]:
    """Targeted parameter names (`<owner>.<param>`) -> the PEFT module name their LoRA weights sit under.

    >>> wrapper_names(["m.experts.gate_up_proj", "m.experts.down_proj"], ("gate_up_proj", "down_proj"))
    {'m.experts.gate_up_proj': 'm.experts.base_layer', 'm.experts.down_proj': 'm.experts'}
    >>> wrapper_names(["m.experts.down_proj"], ("gate_up_proj", "down_proj"))
    {'m.experts.down_proj': 'm.experts'}
    """
    by_owner: dict[str, list[str]] = {}
    for name in targeted:
        owner, _, param = name.rpartition(".")
        by_owner.setdefault(owner, []).append(param)
    out = {}
    for owner, params in by_owner.items():
        unknown = sorted(set(params) - set(declared))
        if unknown:
            raise ValueError(f"{owner}.{unknown[0]} is not one of the parameters {declared} PEFT can target there")
        order = [p for p in declared if p in params]  # PEFT nests in declaration order: first = innermost
        for k, p in enumerate(order):
            out[f"{owner}.{p}"] = owner + ".base_layer" * (len(order) - 1 - k)
    return out
