"""Named adapters on one base: `Adapters`, one pytree holding the frozen base and N named LoRA trees.

The layout (a registered pytree: the arrays are its children, names/configs/active its static data):

    before (one adapter, `lora_jax.inject`):          after (`Adapters.from_params(params, cfg, "sql")`
                                                       .add("chat", chat_lora, chat_cfg)):
    {'model': {'layers': {'0': {'self_attn': {         Adapters(
        'q_proj': {'kernel': W,                          base={'model': {... 'q_proj': {'kernel': W}}},
                   'lora_a': A, 'lora_b': B,             adapters={'sql':  {'model': {... 'q_proj': {'lora_a', 'lora_b', 'lora_scale'}}},
                   'lora_scale': s}}}}}}                           'chat': {'model': {... 'q_proj': {...}, 'v_proj': {...}}}},
                                                         configs={'sql': LoraConfig(...), 'chat': LoraConfig(...)},
                                                         active='sql')

`adapters.params` is the ordinary param tree of the base plus the active adapter (what every forward,
`merge`, `save_peft_adapter` and training step take), or the base alone when disabled. Every method
returns a new `Adapters` (pure, as the rest of lora_jax); the base arrays are shared, never copied.

PEFT equivalents: add_adapter/load_adapter(adapter_name=) -> `add`/`load`; set_adapter -> `set_active`;
disable_adapter (context) -> `disable`; delete_adapter -> `delete` (the active one deleted: the first
remaining name in sorted order becomes active, as PEFT); merge_and_unload(adapter_names=) -> `merge_and_unload`;
unload -> `base`; add_weighted_adapter -> `add_weighted` (lora_jax.adapters.merging);
`adapter_names=` mixed batches -> `bank` (lora_jax.adapters.per_example).
On disk `save_all(dir)` writes PEFT's multi-adapter layout (`PeftModel.save_pretrained` with several
adapters): the adapter named "default" in `dir/`, every other one in `dir/<name>/`, so PEFT reads it
with `PeftModel.from_pretrained(base, dir)` + `load_adapter(f"{dir}/{name}", adapter_name=name)`.

>>> import jax, jax.numpy as jnp, lora_jax
>>> cfg = lora_jax.LoraConfig(r=2, target_modules=["q"])
>>> p = lora_jax.inject({"q": {"kernel": jnp.ones((4, 4))}}, cfg, jax.random.key(0))
>>> ad = Adapters.from_params(p, cfg, "sql").add("chat", lora_jax.split(p)[0], cfg)
>>> ad.names, ad.active, sorted(ad.disable().params["q"])
(('sql', 'chat'), 'sql', ['kernel'])
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from lora_jax.config import LoraConfig
from lora_jax.interop._files import atomic_dir
from lora_jax.interop.adapter import CONFIG_FILE, load_peft_adapter, save_peft_adapter
from lora_jax.transform import combine, has_lora, merge, split
from lora_jax.variants.inits import rewrites_base
from lora_jax.tree import KERNEL, LORA_A, LORA_B, LORA_MAGNITUDE, LORA_SCALE, copy_tree, get, has_path, is_param_leaf, iter_leaves

DEFAULT = "default"


def _dora_on_base_norm(lora: Any, base: Any, current: Any) -> Any:
    """`lora` with each DoRA magnitude m rescaled to m·||W' + ΔW|| / ||W + ΔW||, so that merging it into the
    `current` kernels W' gives m / ||W + ΔW|| · (W' + ΔW), the norm taken on the `base` kernels W (PEFT)."""
    from lora_jax.quant.quantize import dequantize_params
    from lora_jax.variants.dora import weight_norm

    out = None
    for path, _ in iter_leaves(lora):
        if path[-1] != LORA_MAGNITUDE:
            continue
        out = copy_tree(lora) if out is None else out
        mod = path[:-1]
        node = get(out, mod)
        a, b, s = node[LORA_A], node[LORA_B], node[LORA_SCALE]
        w, w_now = (dequantize_params({"k": get(t, mod + (KERNEL,))})["k"] for t in (base, current))
        two_d = a.shape[:-1] + b.shape[-1:]
        ratio = weight_norm(w_now.reshape(two_d), a, b, s) / weight_norm(w.reshape(two_d), a, b, s)
        node[LORA_MAGNITUDE] = node[LORA_MAGNITUDE].astype(jnp.float32) * ratio  # fp32, as merge computes
    return lora if out is None else out



@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class Adapters:
    """The frozen base and named LoRA adapters (see the module docstring)."""

    base: Any
    adapters: Mapping[str, Any]
    configs: Mapping[str, LoraConfig]
    active: str | None = None

    # -- pytree --------------------------------------------------------------------------------
    def tree_flatten(self):
        names = tuple(self.adapters)
        return (self.base, tuple(self.adapters[n] for n in names)), (names, tuple(self.configs[n] for n in names), self.active)

    @classmethod
    def tree_unflatten(cls, aux, children):
        names, configs, active = aux
        base, trees = children
        return cls(base, dict(zip(names, trees)), dict(zip(names, configs)), active)

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def from_params(cls, params: Any, config: LoraConfig | None = None, name: str = DEFAULT) -> "Adapters":
        """From a param tree; its LoRA leaves (if any) become adapter `name` (active), with `config`."""
        lora, frozen = split(params)
        if not lora:
            return cls(frozen, {}, {}, None)
        if config is None:
            raise ValueError("params hold an adapter: pass the LoraConfig it was made with (config=)")
        return cls(frozen, {name: lora}, {name: config}, name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.adapters)

    def _need(self, name: str) -> None:
        if name not in self.adapters:
            raise ValueError(f"no adapter named {name!r}; the adapters are {list(self.adapters)}")

    def add(self, name: str, lora: Any, config: LoraConfig, *, activate: bool = False) -> "Adapters":
        """A new adapter `name` (its LoRA tree, e.g. `lora_jax.split(params)[0]`); the first one added is active."""
        if not isinstance(name, str) or not name or name == "__base__":
            raise ValueError(f"adapter name must be a non-empty string other than '__base__', got {name!r}")
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} exists; delete it first or choose another name")
        lora, rest = split(lora)
        if rest or not has_lora(lora):
            raise ValueError(f"adapter {name!r}: pass its LoRA tree only (lora_jax.split(params)[0])")
        self._check_fits(name, lora)
        rewriting = [n for n, c in {**self.configs, name: config}.items() if rewrites_base(c.init)]
        if rewriting and self.adapters:
            raise ValueError(f"adapter {rewriting[0]!r} (init={({**self.configs, name: config})[rewriting[0]].init!r}) "
                             "rewrote the base kernels, so it cannot share a base with other adapters (PEFT warns the "
                             "same); convert it first: lora_jax.variants.convert_to_lora (a plain LoRA on the original base)")
        active = name if (activate or self.active is None and not self.adapters) else self.active
        return Adapters(self.base, {**self.adapters, name: lora}, {**self.configs, name: config}, active)

    def _check_fits(self, name: str, lora: Any) -> None:
        """Refuse an adapter on a module the base lacks (its LoRA would be silently ignored), or of another size."""
        for path, _ in iter_leaves(lora):
            if path[-1] != LORA_A:
                continue
            mod = path[:-1]
            key = ".".join(mod)
            if not has_path(self.base, mod + (KERNEL,)):
                raise ValueError(f"adapter {name!r} has LoRA at {key!r}, which is not a kernel of the base; "
                                 "it was made for another model (inject it into this base)")
            kernel, a, b = get(self.base, mod + (KERNEL,)), get(lora, path), get(lora, mod + (LORA_B,))
            if not is_param_leaf(kernel) and a.size // a.shape[-1] * b.shape[-1] != kernel.size:
                raise ValueError(f"adapter {name!r} at {key!r}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit "
                                 f"the base kernel {tuple(kernel.shape)}; it was made for another model")

    def set_active(self, name: str) -> "Adapters":
        """Make `name` the adapter `params` carries (PEFT's set_adapter)."""
        if not isinstance(name, str):
            raise ValueError(f"set_active takes one adapter name, got {name!r}; for PEFT's several active adapters at once "
                             "(their deltas summed) add one adapter: add_weighted(names, [1.0] * len(names), new_name, 'cat')")
        self._need(name)
        return dataclasses.replace(self, active=name)

    def disable(self) -> "Adapters":
        """No active adapter: `params` is the base model (PEFT's disable_adapter)."""
        return dataclasses.replace(self, active=None)

    def delete(self, name: str) -> "Adapters":
        """Remove `name`; if it was active, the first remaining name in sorted order becomes active.

        That is PEFT's rule (`BaseTunerLayer.delete_adapter` picks `sorted(remaining)[0]`), not the
        order the adapters were added in. (PEFT sorts the names held by its first LoRA layer; with
        adapters on different modules its pick can depend on that layer, ours never does.)
        """
        self._need(name)
        rest = {n: t for n, t in self.adapters.items() if n != name}
        configs = {n: c for n, c in self.configs.items() if n != name}
        active = self.active if self.active != name else min(rest, default=None)
        return Adapters(self.base, rest, configs, active)

    def replace_adapter(self, name: str, lora: Any) -> "Adapters":
        """Adapter `name` with new values (e.g. after training), same config."""
        self._need(name)
        lora = split(lora)[0]
        self._check_fits(name, lora)
        return dataclasses.replace(self, adapters={**self.adapters, name: lora})

    # -- using ---------------------------------------------------------------------------------
    @property
    def params(self) -> Any:
        """The param tree: base + active adapter (base alone when disabled)."""
        return self.base if self.active is None else combine(self.base, self.adapters[self.active])

    @property
    def config(self) -> LoraConfig | None:
        """The active adapter's LoraConfig (None when disabled)."""
        return None if self.active is None else self.configs[self.active]

    def merge_and_unload(self, names: Sequence[str] | None = None, **merge_kwargs) -> Any:
        """The base with adapters `names` folded into its kernels, one after another in that order
        (PEFT's merge_and_unload(adapter_names=)); by default the active one (the base when disabled).

        A DoRA adapter merged after others scales the kernel they left, W' + ΔW, by m / ||W + ΔW||: its
        norm is the one its forward sees, on the base W (PEFT 0.21 unmerges the earlier ones to take it).
        `merge_kwargs` go to `lora_jax.merge` (layouts=).
        """
        names = list(names) if names is not None else [self.active] if self.active is not None else []
        out = self.base
        for n in names:
            self._need(n)
            lora = self.adapters[n] if out is self.base else _dora_on_base_norm(self.adapters[n], self.base, out)
            out = merge(combine(out, lora), self.configs[n], **merge_kwargs)
        return out

    def add_weighted(self, names: Sequence[str], weights: Sequence[float], new_name: str,
                     combination_type: str = "svd", **kwargs) -> "Adapters":
        """PEFT's add_weighted_adapter: a new adapter merging `names` (`lora_jax.adapters.merging`)."""
        from lora_jax.adapters.merging import add_weighted_adapter

        for n in names:
            self._need(n)
        tree, cfg = add_weighted_adapter([(self.adapters[n], self.configs[n]) for n in names], weights,
                                         combination_type, **kwargs)
        return self.add(new_name, tree, cfg)

    def bank(self, names: Sequence[str] | None = None) -> Any:
        """The per-example bank of `names` (all by default), in that order (`lora_jax.adapters.per_example`)."""
        from lora_jax.adapters.per_example import stack_adapters

        names = list(names or self.names)
        for n in names:
            self._need(n)
        return stack_adapters([self.adapters[n] for n in names])

    # -- PEFT directories ----------------------------------------------------------------------
    def save(self, name: str, out_dir: str, **kwargs) -> str:
        """Adapter `name` as its own PEFT directory (kwargs: save_peft_adapter's, e.g. model_config=)."""
        self._need(name)
        return save_peft_adapter(self.adapters[name], self.configs[name], out_dir, **kwargs)

    def save_all(self, out_dir: str, *, overwrite: bool = False, **kwargs) -> str:
        """Every adapter in PEFT's multi-adapter layout ("default" at the root, others in subdirectories)."""
        clash = [n for n in self.adapters if n != DEFAULT and os.path.basename(n) != n]
        if clash:
            raise ValueError(f"adapter name {clash[0]!r} cannot be a directory name; rename it")
        with atomic_dir(out_dir, overwrite) as tmp:
            if DEFAULT in self.adapters:
                self.save(DEFAULT, tmp, overwrite=True, **kwargs)
            for n in self.adapters:
                if n != DEFAULT:
                    self.save(n, os.path.join(tmp, n), **kwargs)
        return os.path.abspath(out_dir)

    def load(self, adapter_dir: str, name: str = DEFAULT) -> "Adapters":
        """Add the PEFT adapter in `adapter_dir` as `name` (PEFT's load_adapter(dir, adapter_name=name))."""
        params, cfg = load_peft_adapter(self.base, adapter_dir)
        return self.add(name, split(params)[0], cfg)

    @classmethod
    def load_all(cls, base: Any, adapter_dir: str) -> "Adapters":
        """Every adapter of a PEFT multi-adapter directory: the root's as "default", subdirectories by name."""
        out = cls(split(base)[1], {}, {}, None)
        if os.path.isfile(os.path.join(adapter_dir, CONFIG_FILE)):
            out = out.load(adapter_dir, DEFAULT)
        for n in sorted(os.listdir(adapter_dir)):
            if os.path.isfile(os.path.join(adapter_dir, n, CONFIG_FILE)):
                out = out.load(os.path.join(adapter_dir, n), n)
        if not out.adapters:
            raise FileNotFoundError(f"{adapter_dir} holds no PEFT adapter (no adapter_config.json in it or its subdirectories)")
        return out
