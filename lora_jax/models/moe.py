"""Sparse mixture-of-experts MLP: the router and top-k as transformers computes them, experts as
grouped matmuls (`jax.lax.ragged_dot`), expert parallelism over an 'expert' mesh axis, and LoRA on
the stacked expert tensors with PEFT's `target_parameters` semantics.

Params of the MoE block (`mlp`), named as transformers >= 5 stores Qwen3-MoE in memory:

    {'gate':    {'weight': [E, D]},                     # the router, HF orientation; never a LoRA target
     'experts': {'gate_up_proj': {'kernel': [E, D, 2F], 'lora_a'?: [E, D, r], 'lora_b'?: [E, r, 2F], 'lora_scale'?: [E]},
                 'down_proj':    {'kernel': [E, F, D],  'lora_a'?: [E, F, r], 'lora_b'?: [E, r, D],  'lora_scale'?: [E]}}}

Routing (HF's Qwen3MoeTopKRouter): logits = x Wᵀ in the compute dtype, softmax in float32, top-k,
renormalised when norm_topk_prob, cast back. Experts: the T·k (token, expert) assignments are
sorted by expert, the tokens gathered in that order, and every expert's rows multiplied by its own
kernel in one `ragged_dot` (group sizes = assignments per expert); no dense loop over experts. Each
row's output is weighted by its router weight and scattered back (summed) to its token. On CPU,
where XLA lowers ragged_dot to a dense masked matmul over every expert (E times the FLOPs; see its
HLO), the same grouped product runs as `tiled_dot` (each expert's rows padded to
whole tiles, one batched matmul over tiles); `GROUPED` forces either.

LoRA on an expert tensor is per expert: row group e gets x A[e] B[e] · scale[e] (again two
ragged_dots), which is PEFT's ParamWrapper: ΔW[e] = B_e A_e · alpha/r. PEFT forbids dropout there,
so does this module.

Expert parallelism: under a mesh (`jax.set_mesh`, which the train/eval steps enter) whose 'expert'
axis has more than one device, the expert computation runs in a `jax.shard_map` manual over
'expert' only (the other axes stay automatic): each device holds E / n experts (their kernels and
LoRA leaves split on the leading axis, `lora_jax.sharding` rules), routes every token it sees,
computes the assignments that fall on its own experts and the partial outputs are summed over
'expert' (`psum`). Tokens are not exchanged (no all-to-all): the router and the gather are
replicated across the 'expert' axis, the expert FLOPs and weights are split.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lora_jax.config import LoraConfig
from lora_jax.errors import UserError
from lora_jax.models.blocks import activation
from lora_jax.models.config import ModelConfig
from lora_jax.quant.kernel import is_quantized
from lora_jax.tree import KERNEL, LORA_A, LORA_B, LORA_MAGNITUDE, LORA_SCALE

EXPERT_AXIS = "expert"


def route(x2d: jax.Array, weight: jax.Array, k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
    """(top-k weights [N, k] in x's dtype, expert ids [N, k]) as transformers' Qwen3MoeTopKRouter.

    >>> w, i = route(jnp.array([[1.0, 0.0]]), jnp.array([[2.0, 0.0], [0.0, 0.0], [1.0, 0.0]]), 2, True)
    >>> i.tolist(), [round(v, 3) for v in w[0].tolist()]
    ([[0, 2]], [0.731, 0.269])
    """
    logits = jnp.dot(x2d, weight.astype(x2d.dtype).T)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top, idx = jax.lax.top_k(probs, k)
    if norm_topk_prob:
        top = top / jnp.sum(top, axis=-1, keepdims=True)
    return top.astype(logits.dtype), idx


def tiled_dot(x: jax.Array, w: jax.Array, group_sizes: jax.Array, group_of_row: jax.Array) -> jax.Array:
    """`ragged_dot(x, w, group_sizes)` as a batched matmul over row tiles that each hold one group.

    Every group is padded to a multiple of the tile (about the mean group size), so FLOPs stay within
    ~2x of the grouped ideal, never G times it. Rows whose `group_of_row` is >= G (assignments to
    another device's experts) give zeros.

    >>> x = jnp.arange(6.0).reshape(3, 2); w = jnp.stack([jnp.eye(2), 2 * jnp.eye(2)])
    >>> tiled_dot(x, w, jnp.array([1, 2]), jnp.array([0, 1, 1])).tolist()
    [[0.0, 1.0], [4.0, 6.0], [8.0, 10.0]]
    """
    m, k = x.shape
    g, n = w.shape[0], w.shape[-1]
    tile = max(8, -(-m // g))
    n_tiles = -(-(m + g * (tile - 1)) // tile)
    padded = (group_sizes + tile - 1) // tile * tile
    pend = jnp.cumsum(padded)
    start, pstart = jnp.cumsum(group_sizes) - group_sizes, pend - padded
    grp = jnp.clip(group_of_row, 0, g - 1)
    dest = jnp.where(group_of_row < g, pstart[grp] + jnp.arange(m) - start[grp], n_tiles * tile)
    xp = jnp.zeros((n_tiles * tile, k), x.dtype).at[dest].set(x, mode="drop")
    tile_group = jnp.clip(jnp.searchsorted(pend, jnp.arange(n_tiles) * tile, side="right"), 0, g - 1)
    y = jnp.einsum("tbk,tkn->tbn", xp.reshape(n_tiles, tile, k), w[tile_group]).reshape(-1, n)
    return y.at[dest].get(mode="fill", fill_value=0)


# "ragged": jax.lax.ragged_dot (grouped GEMM kernels on TPU/GPU); "tiled": `tiled_dot`, for CPU,
# where XLA lowers ragged_dot to a dense masked matmul over all groups (G times the FLOPs).
GROUPED = "auto"


def grouped_dot(x: jax.Array, w: jax.Array, group_sizes: jax.Array, group_of_row: jax.Array) -> jax.Array:
    """Rows of x [M, in] sorted by group times their group's w [G, in, out] (see GROUPED)."""
    impl = GROUPED if GROUPED != "auto" else ("tiled" if jax.default_backend() == "cpu" else "ragged")
    if impl == "tiled":
        return tiled_dot(x, w, group_sizes, group_of_row)
    return jax.lax.ragged_dot(x, w, group_sizes)


def grouped(x: jax.Array, p: dict, group_sizes: jax.Array, expert_of_row: jax.Array) -> jax.Array:
    """Rows of x [M, in] sorted by expert times their expert's kernel [E, in, out] (+ per-expert LoRA)."""
    dtype = x.dtype
    y = grouped_dot(x, p[KERNEL].astype(dtype), group_sizes, expert_of_row)
    if LORA_A in p:
        h = grouped_dot(x, p[LORA_A].astype(dtype), group_sizes, expert_of_row)
        d = grouped_dot(h, p[LORA_B].astype(dtype), group_sizes, expert_of_row)
        scale = p[LORA_SCALE][jnp.clip(expert_of_row, 0, p[LORA_SCALE].shape[0] - 1)]
        y = y + d * scale[:, None].astype(dtype)
    return y


def experts_forward(x2d, top_w, top_i, gate_up: dict, down: dict, act: str, first_expert=0) -> jax.Array:
    """Σ_k w_k · expert_{i_k}(x) for every token, for the experts whose params are given (ids
    first_expert .. first_expert + E_local - 1; assignments to other experts contribute 0)."""
    n, k = top_i.shape
    e_local = gate_up[KERNEL].shape[0]
    local = top_i.reshape(-1) - first_expert
    valid = (local >= 0) & (local < e_local)
    key = jnp.where(valid, local, e_local)  # other experts' assignments sort to the end
    order = jnp.argsort(key, stable=True)
    sorted_e = key[order]
    group_sizes = jnp.bincount(key, length=e_local + 1)[:e_local].astype(jnp.int32)
    token = order // k
    xs = x2d[token]
    gu = grouped(xs, gate_up, group_sizes, sorted_e)
    g, u = jnp.split(gu, 2, axis=-1)
    y = grouped(activation(act)(g) * u, down, group_sizes, sorted_e)
    w = jnp.where(valid[order], top_w.reshape(-1)[order], 0).astype(y.dtype)
    y = jnp.where(valid[order][:, None], y, 0) * w[:, None]
    return jnp.zeros_like(x2d).at[token].add(y)


def _expert_mesh_size() -> int:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or getattr(mesh, "empty", True) or EXPERT_AXIS not in mesh.axis_names:
        return 1
    return dict(mesh.shape)[EXPERT_AXIS]


def expert_parallel(x2d, top_w, top_i, gate_up: dict, down: dict, act: str) -> jax.Array:
    """`experts_forward` over all experts, split over the mesh's 'expert' axis when it has one."""
    n_dev = _expert_mesh_size()
    if n_dev == 1:
        return experts_forward(x2d, top_w, top_i, gate_up, down, act)
    n_experts = gate_up[KERNEL].shape[0]
    if n_experts % n_dev:
        raise UserError(f"{n_experts} experts do not split over the 'expert' mesh axis of {n_dev} devices; "
                        "use an expert axis size that divides num_experts")

    def local(x2d, top_w, top_i, gate_up, down):
        first = jax.lax.axis_index(EXPERT_AXIS) * (n_experts // n_dev)
        return jax.lax.psum(experts_forward(x2d, top_w, top_i, gate_up, down, act, first), EXPERT_AXIS)

    split = lambda tree: jax.tree.map(lambda _: P(EXPERT_AXIS), tree)  # noqa: E731  leading expert axis
    return jax.shard_map(local, in_specs=(P(), P(), P(), split(gate_up), split(down)), out_specs=P(),
                         axis_names={EXPERT_AXIS}, check_vma=False)(x2d, top_w, top_i, gate_up, down)


class ExpertTensor(nn.Module):
    """One stacked expert tensor (`gate_up_proj` / `down_proj`): returns its params (kernel [E, in, out]
    and any LoRA leaves `lora_jax.inject` added) for the grouped matmul."""

    shape: tuple[int, int, int]
    param_dtype: Any = jnp.float32
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self) -> dict:
        stored = self.get_variable("params", KERNEL) if self.has_variable("params", KERNEL) else None
        if is_quantized(stored):
            raise UserError(f"{'.'.join(self.path)}: quantized MoE expert tensors are not supported; load the MoE "
                            "base unquantized")
        p = {KERNEL: self.param(KERNEL, nn.initializers.lecun_normal(batch_axis=(0,)), self.shape, self.param_dtype)}
        if self.has_variable("params", LORA_MAGNITUDE):
            raise UserError(f"{'.'.join(self.path)}: DoRA on expert tensors is not supported (PEFT's target_parameters "
                            "refuses it too)")
        if self.has_variable("params", LORA_A) and self.has_variable("params", LORA_B):
            if self.lora is not None and self.lora.dropout > 0:
                raise UserError(f"{'.'.join(self.path)}: LoRA on expert tensors (PEFT target_parameters) has no "
                                "dropout; set LoraConfig.dropout=0")
            p[LORA_A], p[LORA_B] = self.get_variable("params", LORA_A), self.get_variable("params", LORA_B)
            scale = self.get_variable("params", LORA_SCALE) if self.has_variable("params", LORA_SCALE) else None
            if scale is None:
                if self.lora is None:
                    raise UserError(f"{'.'.join(self.path)} holds LoRA leaves without lora_scale; build the model "
                                    "with lora=config")
                scale = jnp.full((self.shape[0],), self.lora.scale_for(".".join(self.path)), jnp.float32)
            p[LORA_SCALE] = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (self.shape[0],))
        return p


class SparseMoeBlock(nn.Module):
    """HF's Qwen3MoeSparseMoeBlock (`mlp`): router `gate`, experts `experts`."""

    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        b, t, d = x.shape
        x2d = x.reshape(b * t, d).astype(self.dtype)
        router = Router(c.num_experts, d, self.param_dtype, name="gate")()
        top_w, top_i = route(x2d, router, c.num_experts_per_tok, c.norm_topk_prob)
        e, f = c.num_experts, c.moe_intermediate_size
        experts = Experts(e, d, f, self.param_dtype, self.lora, name="experts")
        gate_up, down = experts()
        return expert_parallel(x2d, top_w, top_i, gate_up, down, c.hidden_act).reshape(b, t, d)


class Router(nn.Module):
    """The router's weight [E, D] (leaf 'weight', HF orientation: not a kernel, so never a LoRA target)."""

    num_experts: int
    hidden: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self):
        return self.param("weight", nn.initializers.normal(0.02), (self.num_experts, self.hidden), self.param_dtype)


class Experts(nn.Module):
    """HF's `experts` module: the stacked `gate_up_proj` [E, D, 2F] and `down_proj` [E, F, D] kernels."""

    num_experts: int
    hidden: int
    intermediate: int
    param_dtype: Any = jnp.float32
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self):
        e, d, f = self.num_experts, self.hidden, self.intermediate
        gate_up = ExpertTensor((e, d, 2 * f), self.param_dtype, self.lora, name="gate_up_proj")()
        down = ExpertTensor((e, f, d), self.param_dtype, self.lora, name="down_proj")()
        return gate_up, down
