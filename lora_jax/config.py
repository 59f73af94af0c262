"""`LoraConfig`: what to adapt, with which rank and scale — PEFT's `LoraConfig`, as a frozen dataclass.

The fields and their meaning follow `peft.LoraConfig` so that a config round-trips through PEFT's
`adapter_config.json` (`to_peft_dict` / `from_peft_dict`):

    r, alpha (PEFT: lora_alpha), dropout (lora_dropout), target_modules, exclude_modules,
    rank_pattern, alpha_pattern, use_rslora, init (init_lora_weights), use_dora

Scale of the update ΔW = A @ B · scale:  alpha / r, or alpha / sqrt(r) with rsLoRA — per module,
with `rank_pattern` / `alpha_pattern` overriding r / alpha where their regex matches the module key
(first pattern in insertion order wins, matched as PEFT does: `(.*\\.)?(pattern)$`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import jax.numpy as jnp

ALL_LINEAR = "all-linear"
_INITS = ("default", "gaussian", "pissa", "olora")  # and pissa_niter_N (lora_jax.variants.inits)
_DTYPES = ("float32", "bfloat16", "float16")


def _as_tuple(value: Any, field: str) -> str | tuple[str, ...] | None:
    if value is None or isinstance(value, str):
        return value
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"LoraConfig.{field} must be a string, a list of strings or None, got {value!r}") from None
    if not all(isinstance(v, str) and v for v in items):
        raise ValueError(f"LoraConfig.{field} must hold non-empty strings, got {value!r}")
    return tuple(sorted(set(items)))  # a set of names, as in PEFT: order carries no meaning


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
        or `"all-linear"` = every dense kernel except the LM head.
      exclude_modules: same forms as `target_modules`; excluded keys are never adapted.
      target_parameters: PEFT's `target_parameters`: names of HF *parameters* (not modules), matched as
        the full name or a `.`-suffix of it, e.g. `["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]`
        for the stacked MoE expert tensors (`lora_jax.models.moe`: one A/B per expert). PEFT allows no
        dropout with it.
      rank_pattern / alpha_pattern: {regex: value} overriding r / alpha for matching modules.
      use_rslora: rank-stabilised scale alpha / sqrt(r).
      init: "default" (A Kaiming-uniform as PEFT, B = 0) or "gaussian" (A ~ N(0, 1/r), B = 0), or one
        that rewrites the base weights: "pissa", "pissa_niter_N", "olora" (`lora_jax.variants.inits`).
      dtype: dtype of the A/B leaves (fp32 by default, even over a bf16 base).
      use_dora: DoRA (weight-decomposed LoRA, `lora_jax.variants.dora`): a trained magnitude per output.

    >>> cfg = LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj"))
    >>> cfg.scale_for("model.layers.0.self_attn.q_proj", 8)
    2.0
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] | None = ("q_proj", "v_proj")
    exclude_modules: str | tuple[str, ...] | None = None
    target_parameters: tuple[str, ...] | None = None
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    use_rslora: bool = False
    init: str = "default"
    dtype: str = "float32"
    use_dora: bool = False

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        set_("target_modules", _as_tuple(self.target_modules, "target_modules"))
        set_("exclude_modules", _as_tuple(self.exclude_modules, "exclude_modules"))
        if isinstance(self.target_parameters, str):
            raise ValueError("LoraConfig.target_parameters must be a list of parameter names, e.g. ['mlp.experts.down_proj']")
        set_("target_parameters", _as_tuple(self.target_parameters, "target_parameters") or None)
        set_("rank_pattern", dict(self.rank_pattern or {}))
        set_("alpha_pattern", dict(self.alpha_pattern or {}))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraConfig.r must be an integer >= 1, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"LoraConfig.alpha must be > 0, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.target_parameters and self.dropout:
            raise ValueError("LoraConfig.target_parameters does not work with dropout != 0 (PEFT refuses it too); set dropout=0")
        if not self.target_modules and not self.target_parameters:
            raise ValueError("LoraConfig.target_modules is empty; name modules (e.g. ['q_proj', 'v_proj']) or use 'all-linear'")
        if self.init not in _INITS and not re.fullmatch(r"pissa_niter_[1-9]\d*", str(self.init)):
            raise ValueError(f"LoraConfig.init must be one of {_INITS} or pissa_niter_N (N >= 1), got {self.init!r}")
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

    def __hash__(self):  # dict fields are unhashable; hash the canonical PEFT dict instead
        return hash(repr(sorted(self.to_peft_dict().items(), key=lambda kv: kv[0])))

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
        """The keys PEFT writes in `adapter_config.json` that this config determines.

        >>> LoraConfig(r=4, alpha=8).to_peft_dict()["lora_alpha"]
        8.0
        """
        targets = self.target_modules
        excludes = self.exclude_modules
        return {
            "peft_type": "LORA",
            "r": self.r,
            "lora_alpha": float(self.alpha),
            "lora_dropout": float(self.dropout),
            "target_modules": targets if targets is None or isinstance(targets, str) else list(targets),
            "exclude_modules": excludes if excludes is None or isinstance(excludes, str) else list(excludes),
            "target_parameters": None if not self.target_parameters else list(self.target_parameters),
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "use_rslora": self.use_rslora,
            "init_lora_weights": True if self.init == "default" else self.init,
            "use_dora": self.use_dora,
        }

    @classmethod
    def from_peft_dict(cls, d: Mapping[str, Any], **overrides) -> "LoraConfig":
        """Build from PEFT's `adapter_config.json` dict (unknown PEFT keys are the caller's to check).

        >>> LoraConfig.from_peft_dict({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}).scale_for("q_proj")
        2.0
        """
        init = d.get("init_lora_weights", True)
        kwargs = dict(
            r=d.get("r", 8),
            alpha=d.get("lora_alpha", 8),
            dropout=d.get("lora_dropout", 0.0) or 0.0,
            target_modules=d.get("target_modules") or (None if d.get("target_parameters") else ("q_proj", "v_proj")),
            target_parameters=d.get("target_parameters") or None,
            exclude_modules=d.get("exclude_modules"),
            rank_pattern=d.get("rank_pattern") or {},
            alpha_pattern=d.get("alpha_pattern") or {},
            use_rslora=bool(d.get("use_rslora", False)),
            init="gaussian" if init == "gaussian" else "default",
            use_dora=bool(d.get("use_dora", False)),
        )
        kwargs.update(overrides)
        return cls(**kwargs)
