"""`LoraConfig`: what to adapt, with which rank and scale — PEFT's `LoraConfig`, as a frozen dataclass.

The fields and their meaning follow `peft.LoraConfig` so that a config round-trips through PEFT's
`adapter_config.json` (`to_peft_dict` / `from_peft_dict`):

    r, alpha (PEFT: lora_alpha), dropout (lora_dropout), target_modules, exclude_modules,
    rank_pattern, alpha_pattern, use_rslora, init (init_lora_weights), use_dora, layers_to_transform,
    layers_pattern

The constructor also takes PEFT's own spellings (`lora_alpha=`, `lora_dropout=`,
`init_lora_weights=`, and PEFT's metadata keys such as `task_type=`), so code moved from PEFT
runs unchanged; a PEFT feature lora_jax does not implement (`bias="all"`, ...)
is refused by name (those keyword tables and the dict mapping live in `lora_jax.config_peft`).
`target_modules=None` (PEFT's default) means PEFT's per-architecture default, resolved when the
model is known (`lora_jax.targeting.resolve_targets`); any capitalisation of "all-linear" is
`ALL_LINEAR`, as in PEFT.

Scale of the update ΔW = A @ B · scale:  alpha / r, or alpha / sqrt(r) with rsLoRA — per module,
with `rank_pattern` / `alpha_pattern` overriding r / alpha where their regex matches the module key
(first pattern in insertion order wins, matched as PEFT does: `(.*\\.)?(pattern)$`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Any, Mapping

import jax.numpy as jnp

from lora_jax.config_peft import (_HEAD_TASKS, _PEFT_KWARGS, _TASK_TYPES, _check_task_type,  # noqa: F401  (re-exported)
                                  check_peft_kwargs, init_from_peft, kwargs_from_peft_dict, peft_dict)

ALL_LINEAR = "all-linear"
# Inits that leave the base weights alone ("random" is PEFT's init_lora_weights=False: A and B both
# drawn as torch's nn.Linear default, so the adapter is not a no-op at step 0; "orthogonal" is PEFT's).
PLAIN_INITS = ("default", "gaussian", "random", "orthogonal")
_INITS = PLAIN_INITS + ("pissa", "olora")  # and pissa_niter_N (lora_jax.variants.inits)
_DTYPES = ("float32", "bfloat16", "float16")
_UNSET = object()


def _as_tuple(value: Any, field: str) -> str | tuple[str, ...] | None:
    if isinstance(value, str) and value.lower() == ALL_LINEAR:  # PEFT: target_modules.lower() == "all-linear"
        return ALL_LINEAR
    if value is None or isinstance(value, str):
        return value
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"LoraConfig.{field} must be a string, a list of strings or None, got {value!r}") from None
    if not all(isinstance(v, str) and v for v in items):
        raise ValueError(f"LoraConfig.{field} must hold non-empty strings, got {value!r}")
    return tuple(sorted(set(items)))  # a set of names, as in PEFT: order carries no meaning


def _plain_number(value: Any) -> Any:
    """numpy / other numbers.Number scalars as Python int / float (bools and non-numbers as they are)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _check_regex(pattern: str, field: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"LoraConfig.{field}: {pattern!r} is not a valid regex ({e}); fix or escape it") from None


def pattern_value(patterns: Mapping[str, Any], module_key: str, default: Any) -> Any:
    """Value of the first pattern matching `module_key` the way PEFT matches rank/alpha patterns.

    >>> pattern_value({"q_proj": 16}, "model.layers.0.self_attn.q_proj", 8)
    16
    """
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_key):
            return value
    return default


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which kernels get LoRA adapters and how they are scaled.

    Args:
      r: rank of the update.
      alpha: scale numerator (PEFT's `lora_alpha`); scale = alpha / r (alpha / sqrt(r) with rsLoRA).
      dropout: dropout on the adapter's input during training (PEFT's `lora_dropout`).
      target_modules: names matched against the end of a module key (`"q_proj"` matches
        `model.layers.0.self_attn.q_proj`), one string = a regex full-matched against the key,
        `"all-linear"` (any case) = every dense kernel except the model's output layer, or None =
        PEFT's default for the architecture (GPT-2: `c_attn`; Llama: `q_proj`, `v_proj`).
      exclude_modules: same forms as `target_modules`; excluded keys are never adapted.
      target_parameters: PEFT's `target_parameters`: names of HF *parameters* (not modules), matched as
        the full name or a `.`-suffix of it, e.g. `["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]`
        for the stacked MoE expert tensors (`lora_jax.models.moe`: one A/B per expert). PEFT allows no
        dropout with it.
      rank_pattern / alpha_pattern: {regex: value} overriding r / alpha for matching modules.
      use_rslora: rank-stabilised scale alpha / sqrt(r).
      init: "default" (A Kaiming-uniform as PEFT, B = 0), "gaussian" (A ~ N(0, 1/r), B = 0), "random"
        (PEFT's init_lora_weights=False: A and B as torch's nn.Linear default, U(±1/sqrt(fan_in)), so the
        adapter acts from step 0; for tests), "orthogonal" (PEFT's: A, B nonzero with A @ B = 0; even r),
        or one that rewrites the base weights: "pissa", "pissa_niter_N", "olora" (`lora_jax.variants.inits`).
      dtype: dtype of the A/B leaves (fp32 by default, even over a bf16 base).
      use_dora: DoRA (weight-decomposed LoRA, `lora_jax.variants.dora`): a trained magnitude per output.
      layers_to_transform: layer index or indices to adapt (PEFT's; 0 means layer 0), with
        layers_pattern naming the layer container (e.g. "layers", "h"); list targets only.

    PEFT's names are accepted as well: `lora_alpha`, `lora_dropout`, `init_lora_weights` (True, False,
    "gaussian", ...), and every other field of PEFT's LoraConfig at its "off" value or as metadata
    (`task_type`, `inference_mode`, `peft_version`, ...), so `LoraConfig(**adapter_config_dict)` works.

    >>> LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, task_type="CAUSAL_LM").alpha
    32
    >>> cfg = LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj"))
    >>> cfg.scale_for("model.layers.0.self_attn.q_proj", 8)
    2.0
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None
    target_parameters: tuple[str, ...] | None = None
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    use_rslora: bool = False
    init: str = "default"
    dtype: str = "float32"
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    use_dora: bool = False

    def __init__(self, r: int = 8, alpha: float | Any = _UNSET, dropout: float | Any = _UNSET,
                 target_modules: Any = None, exclude_modules: Any = None, target_parameters: Any = None,
                 rank_pattern: Mapping | None = None,
                 alpha_pattern: Mapping | None = None, use_rslora: bool = False, init: str | Any = _UNSET,
                 dtype: str = "float32", layers_to_transform: Any = None, layers_pattern: Any = None, use_dora: bool = False, *,
                 lora_alpha: Any = _UNSET, lora_dropout: Any = _UNSET, init_lora_weights: Any = _UNSET, **peft_kwargs):
        for ours, theirs, name in ((alpha, lora_alpha, "alpha"), (dropout, lora_dropout, "dropout"), (init, init_lora_weights, "init")):
            if ours is not _UNSET and theirs is not _UNSET:
                raise ValueError(f"LoraConfig got both {name}= and PEFT's spelling of it; pass one")
        if init_lora_weights is not _UNSET:
            init = init_from_peft(init_lora_weights)
        check_peft_kwargs(peft_kwargs)
        values = dict(r=r, alpha=8.0 if alpha is _UNSET and lora_alpha is _UNSET else alpha if alpha is not _UNSET else lora_alpha,
                      dropout=0.0 if dropout is _UNSET and lora_dropout is _UNSET else dropout if dropout is not _UNSET else lora_dropout,
                      target_modules=target_modules, exclude_modules=exclude_modules, target_parameters=target_parameters,
                      rank_pattern=rank_pattern,
                      alpha_pattern=alpha_pattern, use_rslora=use_rslora, init="default" if init is _UNSET else init,
                      dtype=dtype, layers_to_transform=layers_to_transform, layers_pattern=layers_pattern, use_dora=use_dora)
        for k, v in values.items():
            object.__setattr__(self, k, v)
        self.__post_init__()

    # PEFT's attribute names, for code that reads them.
    lora_alpha = property(lambda self: self.alpha)
    lora_dropout = property(lambda self: self.dropout)
    init_lora_weights = property(lambda self: {"default": True, "random": False}.get(self.init, self.init))

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        set_("target_modules", _as_tuple(self.target_modules, "target_modules"))
        set_("exclude_modules", _as_tuple(self.exclude_modules, "exclude_modules"))
        if isinstance(self.target_parameters, str):
            raise ValueError("LoraConfig.target_parameters must be a list of parameter names, e.g. ['mlp.experts.down_proj']")
        set_("target_parameters", _as_tuple(self.target_parameters, "target_parameters") or None)
        set_("rank_pattern", {k: _plain_number(v) for k, v in dict(self.rank_pattern or {}).items()})
        set_("alpha_pattern", {k: _plain_number(v) for k, v in dict(self.alpha_pattern or {}).items()})
        for field in ("r", "alpha", "dropout"):
            set_(field, _plain_number(getattr(self, field)))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraConfig.r must be an integer >= 1, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"LoraConfig.alpha must be > 0, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.target_parameters and self.dropout:
            raise ValueError("LoraConfig.target_parameters does not work with dropout != 0 (PEFT refuses it too); set dropout=0")
        if self.target_parameters and self.use_dora:
            raise ValueError("LoraConfig.target_parameters does not work with use_dora=True (PEFT refuses it too); "
                             "use plain LoRA on the expert tensors")
        if self.target_modules is not None and not self.target_modules and not self.target_parameters:
            raise ValueError("LoraConfig.target_modules is empty; name modules (e.g. ['q_proj', 'v_proj']) or use 'all-linear'")
        self._check_layers()
        if self.init not in _INITS and not re.fullmatch(r"pissa_niter_[1-9]\d*", str(self.init)):
            hint = {True: " (PEFT's init_lora_weights=True is 'default')", False: " (PEFT's init_lora_weights=False is 'random')",
                    "loftq": " (LoftQ: lora_jax.variants.loftq_init(params, config, rng) with the default init)"}
            raise ValueError(f"LoraConfig.init must be one of {_INITS} or pissa_niter_N (N >= 1), got {self.init!r}"
                             + (hint.get(self.init, "") if isinstance(self.init, (str, bool)) else ""))
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"LoraConfig.use_dora must be True or False, got {self.use_dora!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"LoraConfig.dtype must be one of {_DTYPES}, got {self.dtype!r}")
        for field in ("target_modules", "exclude_modules"):
            value = getattr(self, field)
            if isinstance(value, str) and value != ALL_LINEAR:
                _check_regex(value, field)
        for field, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
            for pattern, value in getattr(self, field).items():
                _check_regex(pattern, field)
                if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
                    raise ValueError(f"LoraConfig.{field}[{pattern!r}] must be a positive number, got {value!r}")

    def _check_layers(self) -> None:
        """PEFT's rules for layers_to_transform / layers_pattern (an int is one layer, 0 included)."""
        layers, pattern = _plain_number(self.layers_to_transform), self.layers_pattern
        if layers is not None and not isinstance(layers, int):
            layers = tuple(_plain_number(i) for i in layers)
        if isinstance(layers, bool) or not (layers is None or isinstance(layers, int) or all(
                isinstance(i, int) and not isinstance(i, bool) for i in layers)):
            raise ValueError(f"LoraConfig.layers_to_transform must be a layer index or a list of them, got {layers!r}")
        if layers is not None and (min((layers,) if isinstance(layers, int) else layers, default=0) < 0):
            raise ValueError(f"LoraConfig.layers_to_transform holds a negative index: {layers!r}")
        if pattern is not None and not isinstance(pattern, str):
            pattern = tuple(pattern)
        object.__setattr__(self, "layers_to_transform", layers)
        object.__setattr__(self, "layers_pattern", pattern)
        if isinstance(self.target_modules, str) and layers is not None:
            raise ValueError("LoraConfig: layers_to_transform cannot be used when target_modules is a str (PEFT's rule); "
                             "list the module names instead")
        if isinstance(self.target_modules, str) and pattern is not None:
            raise ValueError("LoraConfig: layers_pattern cannot be used when target_modules is a str (PEFT's rule)")
        if pattern and layers is None:
            raise ValueError("LoraConfig: when layers_pattern is given, layers_to_transform must be given too (PEFT's rule)")

    def layer_selected(self, module_key: str) -> bool:
        """Whether `module_key`'s layer index passes `layers_to_transform`, exactly as PEFT's
        `check_target_module_exists` reads it (a key with no layer index is never selected).

        >>> LoraConfig(target_modules=["q_proj"], layers_to_transform=0).layer_selected("model.layers.0.self_attn.q_proj")
        True
        """
        layers = self.layers_to_transform
        if layers is None or (isinstance(layers, tuple) and not layers):
            return True
        match = None
        if not self.layers_pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module_key)
        else:
            for pattern in (self.layers_pattern,) if isinstance(self.layers_pattern, str) else self.layers_pattern:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module_key)
                if match is not None:
                    break
        if match is None:
            return False
        index = int(match.group("idx"))
        return index == layers if isinstance(layers, int) else index in layers

    def __hash__(self):  # dict fields are unhashable; hash their sorted items instead
        return hash(tuple(tuple(sorted(v.items())) if isinstance(v, Mapping) else v
                          for v in (getattr(self, f.name) for f in dataclasses.fields(self))))

    # -- per-module values -------------------------------------------------------------------
    def rank_for(self, module_key: str) -> int:
        """Rank of the adapter at `module_key` (rank_pattern first, else r)."""
        return int(pattern_value(self.rank_pattern, module_key, self.r))

    def alpha_for(self, module_key: str) -> float:
        """Alpha of the adapter at `module_key` (alpha_pattern first, else alpha)."""
        return float(pattern_value(self.alpha_pattern, module_key, self.alpha))

    def scale_for(self, module_key: str, r: int | None = None) -> float:
        """PEFT's `scaling[adapter]` for the module: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        r = self.rank_for(module_key) if r is None else r
        alpha = self.alpha_for(module_key)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    # -- PEFT adapter_config.json ------------------------------------------------------------
    def to_peft_dict(self) -> dict[str, Any]:
        """The keys PEFT writes in `adapter_config.json` that this config determines (target_modules
        None, as in PEFT's own config before it sees the model, until `resolve_targets` fills it).

        >>> LoraConfig(r=4, alpha=8, target_modules=["q_proj"]).to_peft_dict()["lora_alpha"]
        8.0
        """
        return peft_dict(self)

    @classmethod
    def from_peft_dict(cls, d: Mapping[str, Any], **overrides) -> "LoraConfig":
        """Build from PEFT's `adapter_config.json` dict (unknown PEFT keys are the caller's to check).

        >>> LoraConfig.from_peft_dict({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}).scale_for("q_proj")
        2.0
        """
        kwargs = kwargs_from_peft_dict(d)
        kwargs.update(overrides)
        return cls(**kwargs)

    # PEFT's PeftConfig methods, for code moved from PEFT (lora_jax.interop.peft_config does the work).
    def to_dict(self) -> dict[str, Any]:
        """The full adapter_config.json dict PEFT would write for this config (`peft.LoraConfig.to_dict`).

        >>> LoraConfig(r=4, target_modules=["q_proj"]).to_dict()["peft_version"] is not None
        True
        """
        from lora_jax.interop.peft_config import peft_config_dict  # noqa: PLC0415  (interop builds on this module)

        return peft_config_dict(self)

    def save_pretrained(self, save_directory: str) -> None:
        """Write `save_directory/adapter_config.json` (only the config, as PEFT's `save_pretrained`)."""
        from lora_jax.interop.peft_config import write_peft_config  # noqa: PLC0415  (interop builds on this module)

        write_peft_config(self, save_directory)

    @classmethod
    def from_pretrained(cls, adapter_dir: str) -> "LoraConfig":
        """The config in `adapter_dir/adapter_config.json` (a local PEFT adapter directory), refusing the
        PEFT features lora_jax does not implement, as `load_peft_adapter` does.

        >>> import tempfile
        >>> d = tempfile.mkdtemp(); LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"]).save_pretrained(d)
        >>> LoraConfig.from_pretrained(d).scale_for("q_proj")
        4.0
        """
        from lora_jax.interop.peft_config import read_peft_config  # noqa: PLC0415

        return read_peft_config(adapter_dir)
