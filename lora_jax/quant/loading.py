"""Quantize while reading: the hook `from_pretrained(..., quantize=...)` passes to the converter.

`quantizing_reader(tensors, hf_config, quantize)` returns the tensors as the converter should see
them and a `convert(path, tensor, transpose, dtype)` callback (`lora_jax.models.naming.
from_hf_state_dict`), called once per tensor as it is read from a lazy checkpoint:

* a kernel to quantize is cast to the param dtype, quantized (`quantize_kernel`) and the float
  tensor dropped at once — the full-precision model is never held whole;
* a bitsandbytes 4-bit weight (`lora_jax.quant.bnb`) becomes its `QuantizedKernel` as stored,
  whatever `quantize` says (its companion tensors are hidden from the converter);
* everything else is left to the converter (None).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from lora_jax.errors import UserError
from lora_jax.models.lazy_tensors import LazyTensors
from lora_jax.quant import bnb
from lora_jax.quant.quantize import QuantConfig, quantize_kernel
from lora_jax.targeting import KERNEL, module_key


class _Prequantized:
    """A bitsandbytes weight, read when the converter reaches it."""

    def __init__(self, tensors: Mapping[str, Any], weight: str):
        self.tensors, self.weight = tensors, weight


def as_config(quantize: Any) -> QuantConfig | None:
    """None / "none" / "nf4" / "int8" / a QuantConfig -> QuantConfig or None.

    >>> as_config("nf4").scheme, as_config("none")
    ('nf4', None)
    """
    if quantize is None or quantize == "none":
        return None
    if isinstance(quantize, QuantConfig):
        return quantize
    if isinstance(quantize, str):
        return QuantConfig(quantize)
    raise ValueError(f"quantize={quantize!r}: use None, 'nf4', 'int8' or a lora_jax.quant.QuantConfig")


def _refuse_unsupported(hf_config: Any, tensors: Mapping[str, Any]) -> None:
    qc = getattr(hf_config, "quantization_config", None)
    qc = qc if isinstance(qc, dict) else (qc.to_dict() if hasattr(qc, "to_dict") else {})
    if qc.get("load_in_8bit") or any(k.endswith(".SCB") for k in tensors):
        raise ValueError("this is a bitsandbytes 8-bit (LLM.int8) checkpoint, which is not supported; "
                         "load the full-precision model with quantize='int8' or a 4-bit NF4 checkpoint")
    if qc and qc.get("quant_method") not in (None, "bitsandbytes"):
        raise ValueError(f"checkpoint is quantized with {qc.get('quant_method')!r}, which is not supported; "
                         "load the full-precision model (optionally with quantize='nf4')")


def _refuse_other_settings(config: QuantConfig, state: dict, double_quant: bool) -> None:
    if state.get("quant_type") != "nf4":
        return  # FP4: bnb.read_weight refuses it by name
    stored = (int(state.get("blocksize", 0)), double_quant)
    if (config.block_size, config.double_quant) != stored:
        raise UserError(f"the checkpoint is already bitsandbytes NF4 with block_size={stored[0]}, double_quant={stored[1]}, "
                        f"which loads as stored (no re-quantization); quantize asks for block_size={config.block_size}, "
                        f"double_quant={config.double_quant}: pass the stored settings (recipe: model.quant_block_size, "
                        "model.double_quant) or quantize=None")


def quantizing_reader(tensors: Mapping[str, Any], hf_config: Any, quantize: Any) -> tuple[Mapping[str, Any], Callable | None]:
    """(tensors for the converter, convert callback or None); see the module docstring.

    >>> t, convert = quantizing_reader({"w": np.ones(2)}, None, None)
    >>> convert is None
    True
    """
    config = as_config(quantize)
    _refuse_unsupported(hf_config, tensors)
    prequantized = bnb.weight_names(tensors)
    if prequantized:
        if config is not None and config.scheme != "nf4":
            raise ValueError(f"the checkpoint is already NF4 (bitsandbytes); quantize={config.scheme!r} would round it "
                             "again: load it with quantize=None or 'nf4'")
        if isinstance(quantize, QuantConfig):  # explicit settings must be the stored ones: it is not re-quantized
            first = prequantized[0]
            _refuse_other_settings(quantize, bnb.read_state(tensors, first), f"{first}.nested_absmax" in tensors)
        hidden = {a for w in prequantized for a in bnb.aux_names(w)}
        stored = tensors
        loaders = {k: (lambda k=k: stored[k]) for k in stored if k not in hidden}
        loaders.update({w: (lambda w=w: _Prequantized(stored, w)) for w in prequantized})
        tensors = LazyTensors(loaders)
    elif config is None:
        return tensors, None

    def convert(path: tuple[str, ...], raw: Any, transpose: bool, dtype: Any) -> Any:
        if isinstance(raw, _Prequantized):
            return bnb.read_weight(raw.tensors, raw.weight)
        if config is None or path[-1] != KERNEL or config.skips(module_key(path)):
            return None
        arr = np.asarray(raw)
        kernel = (arr.T if transpose else arr).astype(dtype, copy=False)
        return quantize_kernel(kernel, config, ".".join(path))

    return tensors, convert
