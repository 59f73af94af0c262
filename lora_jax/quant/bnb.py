"""bitsandbytes 4-bit checkpoints (transformers' `*-bnb-4bit` repositories) read as `QuantizedKernel`s.

A `Linear4bit` saved by transformers writes, for the module `X`:

    X.weight                                   uint8   [(out*in+1)//2, 1]  packed NF4 codes, high nibble first
    X.weight.absmax                            uint8 [n_blocks] (double quant) or float32 [n_blocks]
    X.weight.quant_map                         float32 [16]   the NF4 code book
    X.weight.nested_absmax                     float32 [ceil(n_blocks / 256)]      (double quant)
    X.weight.nested_quant_map                  float32 [256]  the 8-bit dynamic code book (double quant)
    X.weight.quant_state.bitsandbytes__nf4     uint8 bytes of a JSON dict: quant_type, blocksize, dtype,
                                               shape [out, in], nested_blocksize, nested_offset, ...

(`bitsandbytes.functional.QuantState.as_dict(packed=True)`). The blocks run over the flat
[out, in] weight, which is exactly `QuantizedKernel`'s layout when `in` is a multiple of the block
size, so the tensors are only reshaped: codes [out, in/2], absmax [out, in/blocksize], the stored
code book and offset kept as they are. Dequantizing them is bitsandbytes' `dequantize_4bit`, bit
for bit (tested against bitsandbytes itself). FP4 checkpoints and 8-bit (LLM.int8, `SCB`) ones are
refused by name.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np

from lora_jax.quant.codebooks import NF4
from lora_jax.quant.kernel import NESTED_BLOCK, QuantizedKernel

QUANT_STATE = ".quant_state.bitsandbytes__"
FIELDS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def weight_names(tensors: Mapping[str, Any]) -> list[str]:
    """Names of the 4-bit weights in a checkpoint (those with a packed quant state beside them).

    >>> weight_names({"a.weight": 0, "a.weight.quant_state.bitsandbytes__nf4": 0, "b.weight": 0})
    ['a.weight']
    """
    return [k.split(QUANT_STATE)[0] for k in tensors if QUANT_STATE in k]


def aux_names(weight: str) -> list[str]:
    """The tensors that belong to the 4-bit weight `weight` besides itself (present or not).

    >>> aux_names("m.weight")[:2]
    ['m.weight.absmax', 'm.weight.quant_map']
    """
    return [f"{weight}.{f}" for f in FIELDS] + [f"{weight}{QUANT_STATE}{t}" for t in ("nf4", "fp4")]


def read_state(tensors: Mapping[str, Any], weight: str) -> dict:
    """The JSON quant state stored beside a bitsandbytes 4-bit weight (quant_type, blocksize, shape, ...).

    >>> read_state({"m.weight": np.zeros((2, 1), np.uint8)}, "m.weight")
    Traceback (most recent call last):
    ...
    ValueError: m.weight has no bitsandbytes quant state (m.weight.quant_state.bitsandbytes__nf4)
    """
    state_key = next((f"{weight}{QUANT_STATE}{t}" for t in ("nf4", "fp4") if f"{weight}{QUANT_STATE}{t}" in tensors), None)
    if state_key is None:
        raise ValueError(f"{weight} has no bitsandbytes quant state ({weight}{QUANT_STATE}nf4)")
    return json.loads(bytes(np.asarray(tensors[state_key], np.uint8).reshape(-1)).decode("utf-8"))


def read_weight(tensors: Mapping[str, Any], weight: str) -> QuantizedKernel:
    """The `QuantizedKernel` (kernel orientation [in, out]) of one bitsandbytes 4-bit weight.

    >>> read_weight({"m.weight": np.zeros((2, 1), np.uint8)}, "m.weight")
    Traceback (most recent call last):
    ...
    ValueError: m.weight has no bitsandbytes quant state (m.weight.quant_state.bitsandbytes__nf4)
    """
    state = read_state(tensors, weight)
    if state.get("quant_type") != "nf4":
        raise ValueError(f"{weight} is bitsandbytes {state.get('quant_type')!r}; only NF4 checkpoints are supported "
                         "(load the full-precision model with quantize='nf4' instead)")
    out, n_in = (int(d) for d in state["shape"])
    bs = int(state["blocksize"])
    if n_in % bs or n_in % 2:
        fit = max((b for b in (16, 32, 64, 128) if n_in % b == 0), default=16)
        raise ValueError(f"{weight} [{out}, {n_in}] has blocks of {bs} that straddle rows; only input sizes that are "
                         f"multiples of the block size are supported: quantize the full-precision model instead with a "
                         f"block size that divides them (quantize=QuantConfig('nf4', {fit}); recipe: model.quantize=nf4 "
                         f"model.quant_block_size={fit})")
    quant_map = np.asarray(tensors[f"{weight}.quant_map"], np.float32)
    if not np.array_equal(quant_map, NF4):
        raise ValueError(f"{weight}.quant_map is not the NF4 code book; this checkpoint is not standard bitsandbytes NF4")
    codes = np.asarray(tensors[weight]).view(np.uint8).reshape(out, n_in // 2)
    absmax = np.asarray(tensors[f"{weight}.absmax"])
    fields: dict[str, Any] = {"codes": codes, "absmax": absmax.reshape(out, n_in // bs)}
    if f"{weight}.nested_absmax" in tensors:
        if int(state.get("nested_blocksize", NESTED_BLOCK)) != NESTED_BLOCK:
            raise ValueError(f"{weight}: nested_blocksize {state['nested_blocksize']} is not supported (only {NESTED_BLOCK})")
        fields.update(nested_absmax=np.asarray(tensors[f"{weight}.nested_absmax"], np.float32).reshape(-1),
                      nested_code=np.asarray(tensors[f"{weight}.nested_quant_map"], np.float32).reshape(256),
                      offset=np.asarray(state["nested_offset"], np.float32))
    else:
        fields["absmax"] = fields["absmax"].astype(np.float32)
    return QuantizedKernel("nf4", str(state.get("dtype", "float32")), bs, **fields)
