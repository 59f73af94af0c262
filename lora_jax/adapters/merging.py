"""`add_weighted_adapter`: PEFT's ways of merging several LoRA adapters into one, on our trees.

Each input adapter is a LoRA tree (`lora_jax.split(params)[0]`: `lora_a` [*stack, in, r], `lora_b`
[*stack, r, out], `lora_scale`) with the `LoraConfig` it was made with. Per module (and per layer of
a stack), in PyTorch's orientation (A [r, in], B [out, r]) exactly as `LoraModel.add_weighted_adapter`:

    cat               A = [w_i·s_i·A_i stacked on r], B = [B_i side by side]   rank Σ r_i (zero-padded)
    linear, ties, dare_linear, dare_ties, magnitude_prune
                      the merge applied to the A's with weights sign(w_i s_i)·sqrt|w_i s_i| and to the
                      B's with sqrt|w_i s_i| (all ranks equal)
    svd               ΔW = Σ w_i·ΔW_i, truncated SVD: B = U_k S_k, A = Vh_k (rank svd_rank or max r_i),
                      optionally clamped to the svd_clamp quantile of |entries|
    ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd
                      as svd, with ΔW = that merge (ties, ...) of the w_i·ΔW_i instead of their sum
    ties / magnitude_prune keep the top `density` fraction of |entries| of each tensor; ties/dare_ties then
                      keep, per entry, the values agreeing with the majority sign ("total" or "frequency")
                      and average them; dare_* drop entries at random (keep prob. density) and rescale 1/density
                      (so density=0, which PEFT turns into NaN, is refused)

The new adapter's config is PEFT's: r = alpha = the new rank, no rank/alpha patterns, target modules
the union, use_rslora from the first adapter — so its scale is 1 (sqrt(r) with rsLoRA, as PEFT).
DARE's random masks: PEFT draws them with torch's global RNG; here they come from `rng` (a jax key),
or from `masks` (the exact masks, e.g. recorded from a PEFT run; see tests/test_merging.py), since
the two RNGs cannot give the same bits. svd: singular pairs are unique only up to sign, and numpy's
LAPACK and torch's (MKL) may pick different signs — the merged ΔW = B·A is the same, A and B may
differ by the sign of a rank-1 pair; with svd_clamp the threshold (a quantile of the signed entries)
follows those signs. DoRA adapters are refused (PEFT gives no merged magnitude).

>>> import jax, jax.numpy as jnp, lora_jax
>>> cfg = lora_jax.LoraConfig(r=2, alpha=4, target_modules=["q"])
>>> a1 = lora_jax.split(lora_jax.inject({"q": {"kernel": jnp.ones((4, 3))}}, cfg, jax.random.key(0)))[0]
>>> merged, mcfg = add_weighted_adapter([(a1, cfg), (a1, cfg)], [0.5, 0.5], "cat")
>>> merged["q"]["lora_a"].shape, mcfg.r, float(merged["q"]["lora_scale"])
((4, 4), 4, 1.0)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from lora_jax.config import LoraConfig
from lora_jax.tree import LORA_A, LORA_B, LORA_MAGNITUDE, LORA_SCALE, get, iter_leaves, put

COMBINATIONS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune",
                "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
_GTA = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


# -- PEFT's merge_utils, in numpy float32 ------------------------------------------------------
def _magnitude_prune_one(t: np.ndarray, density: float) -> np.ndarray:
    if density >= 1:
        return t
    k = int(density * t.size)
    keep = np.zeros(t.size, np.float32)
    keep[np.argsort(-np.abs(t).reshape(-1), kind="stable")[:k]] = 1
    return t * keep.reshape(t.shape)


def _random_prune_one(t: np.ndarray, density: float, mask: np.ndarray) -> np.ndarray:
    if density >= 1:
        return t
    return (t * mask) / np.float32(density)


def _majority_mask(stacked: np.ndarray, method: str) -> np.ndarray:
    sign = np.sign(stacked)
    magnitude = stacked.sum(0) if method == "total" else sign.sum(0)
    return sign == np.where(magnitude >= 0, 1, -1)


def _disjoint_merge(weighted: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return (weighted * mask).sum(0) / np.maximum(mask.sum(0), 1.0).astype(np.float32)


def _weighted(ts: list[np.ndarray], w: np.ndarray) -> np.ndarray:
    stacked = np.stack(ts)
    return stacked * w.reshape((-1,) + (1,) * (stacked.ndim - 1))


def combine_tensors(kind: str, ts: list[np.ndarray], w: np.ndarray, density: float | None, sign_method: str,
                    masks: list[np.ndarray] | None = None) -> np.ndarray:
    """PEFT's merge_utils function `kind` on task tensors `ts` with weights `w` (float32).

    >>> combine_tensors("ties", [np.array([1., -2.]), np.array([3., 1.])], np.ones(2, np.float32), 1.0, "total")
    array([ 2., -2.], dtype=float32)
    """
    ts = [np.asarray(t, np.float32) for t in ts]
    if kind == "linear":
        return _weighted(ts, w).sum(0)
    if kind in ("ties", "magnitude_prune"):
        ts = [_magnitude_prune_one(t, density) for t in ts]
    elif kind in ("dare_linear", "dare_ties"):
        ts = [_random_prune_one(t, density, m) for t, m in zip(ts, masks)]
    weighted = _weighted(ts, w)
    if kind in ("ties", "dare_ties"):
        return _disjoint_merge(weighted, _majority_mask(np.stack(ts), sign_method))
    return weighted.sum(0)


# -- the adapter-level merge ---------------------------------------------------------------------
def _config_rank(cfg: LoraConfig) -> int:
    return cfg.r if not cfg.rank_pattern else max(cfg.r, *cfg.rank_pattern.values())


def _modules(tree: Any) -> dict[tuple, dict]:
    out = {}
    for path, _ in iter_leaves(tree):
        if path[-1] == LORA_A:
            out[path[:-1]] = get(tree, path[:-1])
    return out


def _new_config(configs: Sequence[LoraConfig], rank: int) -> LoraConfig:
    for field in ("layers_to_transform", "layers_pattern", "exclude_modules"):
        values = [getattr(c, field) for c in configs]
        if any(v != values[0] for v in values[1:]):
            raise ValueError(f"add_weighted_adapter: the adapters differ in {field} ({values}); PEFT gives the merged "
                             f"adapter the first one's, which would drop or add modules of the others; give them the same")
    kinds = {isinstance(c.target_modules, str) for c in configs}
    if len(kinds) > 1:
        raise ValueError("add_weighted_adapter: the adapters mix string and list target_modules, which PEFT refuses; "
                         "give them the same kind")
    if kinds == {True}:
        targets: Any = "|".join(f"({c.target_modules})" for c in configs)
    else:
        targets = tuple(sorted(set().union(*(set(c.target_modules) for c in configs))))
    return dataclasses.replace(configs[0], r=rank, alpha=float(rank), target_modules=targets, rank_pattern={},
                               alpha_pattern={}, init="default")


def add_weighted_adapter(adapters: Sequence[tuple[Any, LoraConfig]], weights: Sequence[float], combination_type: str = "svd",
                         *, svd_rank: int | None = None, svd_clamp: float | None = None, svd_full_matrices: bool = True,
                         density: float | None = None,
                         majority_sign_method: str = "total", rng: Any = None,
                         masks: Mapping[tuple, list[np.ndarray]] | None = None) -> tuple[dict, LoraConfig]:
    """Merge `adapters` ((lora tree, LoraConfig) pairs) with `weights`: (new LoRA tree, its LoraConfig).

    Args:
      combination_type: one of COMBINATIONS (PEFT's names; see the module docstring).
      svd_rank / svd_clamp / svd_full_matrices: the "svd" merge's rank, clamp quantile and LAPACK mode (PEFT's
        arguments; singular vectors are unique up to sign, and LAPACK's sign choice depends on the mode).
      density: fraction kept by ties / dare_* / magnitude_prune, in [0, 1].
      majority_sign_method: "total" or "frequency" (ties, dare_ties).
      rng: jax key for DARE's masks; masks: {(module path, layer index or None, "lora_a"/"lora_b"; "delta"
        for the *_svd kinds): [mask per adapter, PyTorch orientation]} to use exact masks instead.
    """
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type must be one of {COMBINATIONS}, got {combination_type!r}")
    if len(adapters) != len(weights) or not adapters:
        raise ValueError(f"add_weighted_adapter needs one weight per adapter, got {len(adapters)} adapters and {len(weights)} weights")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    kind = "linear" if len(adapters) == 1 else combination_type
    needs_density = kind.removesuffix("_svd") in ("ties", "dare_linear", "dare_ties", "magnitude_prune")
    if needs_density and (density is None or not 0 <= density <= 1):
        raise ValueError(f"combination_type={kind!r} needs density in [0, 1], got {density!r}")
    if kind.startswith("dare") and density == 0:
        raise ValueError(f"combination_type={kind!r} with density=0 drops every entry and divides by 0 (NaN in PEFT); "
                         "use a density in (0, 1]")
    if kind.startswith("dare") and rng is None and masks is None:
        raise ValueError(f"combination_type={kind!r} drops entries at random; pass rng=jax.random.key(seed) (or masks=)")
    configs = [c for _, c in adapters]
    ranks = [_config_rank(c) for c in configs]
    if kind in _GTA and len(set(ranks)) != 1:
        raise ValueError(f"combination_type={kind!r} needs adapters of one rank, got {ranks}; use 'cat' or 'svd'")
    new_rank = ranks[0] if kind in _GTA else sum(ranks) if kind == "cat" else (svd_rank or max(ranks))
    if svd_rank is not None and kind.endswith("svd") and not (isinstance(svd_rank, int) and svd_rank > 0):
        raise ValueError(f"svd_rank must be a positive int, got {svd_rank!r}")
    new_cfg = _new_config(configs, new_rank)
    new_scale = new_cfg.scale_for("", new_rank)
    trees = [_modules(t) for t, _ in adapters]
    for t in trees:
        for mod, node in t.items():
            if LORA_MAGNITUDE in node:
                raise ValueError(f"add_weighted_adapter: {'.'.join(mod)!r} is a DoRA adapter; PEFT merges plain LoRA only")
    rng_np = None
    if kind.startswith("dare") and masks is None:
        import jax

        rng_np = np.random.default_rng(np.asarray(jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng))
    out: dict = {}
    for mod in sorted(set().union(*trees)):
        present = [(i, t[mod]) for i, t in enumerate(trees) if mod in t]
        a0 = np.asarray(present[0][1][LORA_A])
        stack = a0.shape[:-2]
        layers = list(np.ndindex(*stack)) if stack else [()]
        new_a = np.zeros(stack + (a0.shape[-2], new_rank), np.float32)
        new_b = None
        for idx in layers:
            lay = None if not stack else (idx[0] if len(idx) == 1 else idx)
            As = [np.asarray(n[LORA_A], np.float32)[idx].T for _, n in present]  # [r, in]
            Bs = [np.asarray(n[LORA_B], np.float32)[idx].T for _, n in present]  # [out, r]
            ss = [float(np.asarray(n[LORA_SCALE], np.float32)[idx]) for _, n in present]
            ws = [float(weights[i]) for i, _ in present]
            if kind in _GTA and len({a.shape for a in As}) > 1:
                raise ValueError(f"combination_type={kind!r}: at {'.'.join(mod)!r} the adapters have ranks "
                                 f"{[a.shape[0] for a in As]} (a rank_pattern), which cannot be combined entry by entry; "
                                 "use 'cat' or 'svd'")
            if new_b is None:
                new_b = np.zeros(stack + (new_rank, Bs[0].shape[0]), np.float32)
            a, b = _merge_one(kind, As, Bs, ss, ws, new_rank, density, majority_sign_method, svd_clamp,
                              masks, (mod, lay), rng_np, svd_full_matrices)
            new_a[idx][:, : a.shape[0]] = a.T
            new_b[idx][: b.shape[1], :] = b.T
        put(out, mod + (LORA_A,), jnp.asarray(new_a, configs[0].jnp_dtype))
        put(out, mod + (LORA_B,), jnp.asarray(new_b, configs[0].jnp_dtype))
        put(out, mod + (LORA_SCALE,), jnp.full(stack, new_scale, jnp.float32))
    return out, new_cfg


def _merge_one(kind, As, Bs, ss, ws, new_rank, density, sign_method, clamp, masks, key, rng_np, full=True):
    """(A [r', in], B [out, r']) for one module/layer, PyTorch orientation, exactly as PEFT."""
    if kind == "cat":
        return (np.concatenate([a * np.float32(w * s) for a, w, s in zip(As, ws, ss)], 0),
                np.concatenate(Bs, 1))
    if kind.endswith("svd"):
        deltas = [(b @ a) * np.float32(s) for a, b, s in zip(As, Bs, ss)]
        base_kind = "linear" if kind == "svd" else kind.removesuffix("_svd")
        m = None
        if base_kind.startswith("dare") and density < 1:
            m = masks[key + ("delta",)] if masks is not None else [(rng_np.random(d.shape) < density).astype(np.float32) for d in deltas]
        delta = combine_tensors(base_kind, deltas, np.asarray(ws, np.float32), density, sign_method, m)
        u, sv, vh = np.linalg.svd(delta, full_matrices=full)  # PEFT's svd_full_matrices (the signs LAPACK picks depend on it)
        u, vh = u[:, :new_rank] * sv[:new_rank], vh[:new_rank]
        if clamp is not None:
            hi = np.quantile(np.concatenate([u.reshape(-1), vh.reshape(-1)]), clamp).astype(np.float32)
            u, vh = np.clip(u, -hi, hi), np.clip(vh, -hi, hi)
        return vh, u
    wa, wb = [], []
    for w, s in zip(ws, ss):
        ws_ = w * s
        wa.append(math.sqrt(abs(ws_)) * (1 if ws_ >= 0 else -1))
        wb.append(math.sqrt(abs(ws_)))
    out = []
    for leaf, ts, w in ((LORA_A, As, wa), (LORA_B, Bs, wb)):
        m = None
        if kind.startswith("dare") and density < 1:
            m = masks[key + (leaf,)] if masks is not None else [(rng_np.random(t.shape) < density).astype(np.float32) for t in ts]
        out.append(combine_tensors(kind, ts, np.asarray(w, np.float32), density, sign_method, m))
    return out[0], out[1]
