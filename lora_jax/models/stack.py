"""The decoder block stack: unrolled blocks "0", "1", … or one `nn.scan` over stacked params, with
optional rematerialisation.

Every block class takes the fields (cfg, dtype, param_dtype, lora) and is called as

    x, kv = block(x, cos, sin, mask, window, index, sliding, kv)

(cos/sin None for GPT-2, window None without sliding-window layers, kv None without a cache).
Unrolled, the container module `layers` (GPT-2: `h`) holds blocks named "0".."L-1", so the param
tree reads params['model']['layers']['0']['self_attn']['q_proj']['kernel'] and a module key is the
HF module name. With `scan_layers=True` the scanned block *is* `layers`: every leaf gains a leading
layer axis, params['model']['layers']['self_attn']['q_proj']['kernel'] is [L, in, out]. The cache's
k/v [L, ...] are scanned alongside (axis 0), so the same cache pytree serves both forms.

`remat`: None (store activations), "full" (recompute the whole block in the backward pass) or the
name of a `jax.checkpoint_policies` policy such as "dots_saveable" or
"dots_with_no_batch_dims_saveable" (keep matmul outputs, recompute the rest); a policy callable
is accepted too.

"save_projections" keeps only the values the blocks tag with `saved(...)`: the outputs of the
q/k/v and gate/up (GPT-2: c_attn, c_fc) projections and the residual stream after attention,
besides each block's input. Everything elementwise (norms, RoPE, activations) and the attention
core (scores, softmax, probs @ v: ~4% of a SmolLM2 block's FLOPs at 128 tokens) is recomputed in
the backward pass, but no projection matmul is: recomputing one costs as much as the matmul
itself, while the tagged outputs are only ~5.2k floats per token per SmolLM2 block (vs ~9k+ the
backward otherwise keeps). This suits LoRA and full fine-tuning alike: a frozen kernel's
backward (dx = dy Wᵀ) needs no saved input; the adapter (and full-FT weight) gradients need
the projection inputs, which are recomputed elementwise from the saved values.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from lora_jax.config import LoraConfig
from lora_jax.models.config import ModelConfig

_POLICIES = ("dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable", "everything_saveable",
             "checkpoint_dots", "checkpoint_dots_with_no_batch_dims")
SAVED = "block_saved"  # the checkpoint_name of the values remat="save_projections" keeps
OWN_POLICIES = ("save_projections",)


def saved(x: jax.Array) -> jax.Array:
    """Tag `x` as kept by remat="save_projections" (an identity outside `jax.checkpoint`).

    >>> saved(jnp.ones(2)).tolist()
    [1.0, 1.0]
    """
    return checkpoint_name(x, SAVED)


def remat_policy(remat: str | Callable | None) -> Callable | None:
    """The `jax.checkpoint` policy for a `remat` option ("full" -> None: save nothing).

    >>> remat_policy("full") is None, callable(remat_policy("dots_saveable"))
    (True, True)
    """
    if remat is None or remat == "full":
        return None
    if callable(remat):
        return remat
    if remat == "save_projections":
        return jax.checkpoint_policies.save_only_these_names(SAVED)
    if remat not in _POLICIES:
        raise ValueError(f"remat={remat!r} is not a known policy; use None, 'full' or one of "
                         f"{', '.join(OWN_POLICIES + _POLICIES)}")
    return getattr(jax.checkpoint_policies, remat)


def block_stack(
    block_cls: type[nn.Module],
    cfg: ModelConfig,
    *,
    dtype: Any,
    param_dtype: Any,
    lora: LoraConfig | None,
    scan: bool,
    remat: str | Callable | None,
    name: str,
) -> Callable:
    """A callable `(x, cos, sin, mask, window, index, kv) -> (x, kv)` running all blocks.

    Call it inside a parent's `@nn.compact` method; it creates the submodule `name`.
    """
    cls = block_cls
    if remat is not None:
        remat_policy(remat)  # validate early
        cls = nn.remat(block_cls, policy=remat_policy(remat), prevent_cse=not scan)
    kwargs = dict(cfg=cfg, dtype=dtype, param_dtype=param_dtype, lora=lora)
    sliding = cfg.sliding_layers or (False,) * cfg.num_layers
    if scan:
        scanned = nn.scan(
            cls,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * 5 + (0, 0),
            length=cfg.num_layers,
        )(**kwargs, name=name)

        def run_scanned(x, cos, sin, mask, window, index, kv):
            return scanned(x, cos, sin, mask, window, index, jnp.asarray(sliding), kv)

        return run_scanned
    container = Unrolled(cls, kwargs, sliding, name=name)
    return container


class Unrolled(nn.Module):
    """Container whose children are the blocks "0".."L-1" (HF's ModuleList)."""

    block: Any
    kwargs: dict
    sliding: tuple[bool, ...]

    @nn.compact
    def __call__(self, x, cos, sin, mask, window, index, kv):
        ks, vs = [], []
        for i, slides in enumerate(self.sliding):
            layer_kv = None if kv is None else (kv[0][i], kv[1][i])
            x, layer_kv = self.block(**self.kwargs, name=str(i))(x, cos, sin, mask, window, index, slides, layer_kv)
            if layer_kv is not None:
                ks.append(layer_kv[0])
                vs.append(layer_kv[1])
        return x, (None if kv is None else (jnp.stack(ks), jnp.stack(vs)))


def run_blocks(layers, x, cos, sin, mask, window, cache, new_cache):
    """Run a `block_stack` over x with this call's KV cache (None when not decoding): (x, the updated cache)."""
    kv = None if cache is None else (cache["k"], cache["v"])
    x, kv = layers(x, cos, sin, mask, window, None if cache is None else cache["index"], kv)
    if new_cache is not None:
        new_cache = dict(new_cache, k=kv[0], v=kv[1])
    return x, new_cache
