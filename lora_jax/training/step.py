"""The compiled LoRA train step: one `jax.jit` per run, explicit shardings, donation, accumulation.

    state  = {"lora": adapters, "opt_state": optax state of the trained leaves, "step": int32[], "rng": uint32[2]}
    step(state, frozen, batch) -> (new_state, {"loss", "grad_norm", "lr", "n_tokens"})

- Only the LoRA partition is differentiated: no gradient and no optimizer state ever exist for the
  frozen weights, which are an ordinary (not donated) argument. The adapters' `lora_scale` leaves
  ride along in `state["lora"]` as constants (no gradient, no optimizer state).
- `state` is donated: adapters and Adam moments are updated in place, no second copy.
- Gradient accumulation happens *inside* the compiled step: `batch` is [accum, micro_bsz, T] and
  a `lax.scan` runs the micro-batches, summing token-loss sums, token counts and gradients; the
  result is divided once by the total token count, so k micro-batches of m equal one batch of
  k·m exactly (the mean over response tokens of the whole accumulated batch).
- Shardings are explicit at the jit boundary: state by the LoRA specs (optimizer moments take
  their parameter's spec), frozen params by theirs, the batch split over ('data', 'fsdp') on
  its micro-batch axis, metrics replicated. GSPMD propagates them through the model.
- Clipping, weight decay and the schedule live in `tx` (`default_optimizer` builds the usual
  chain: global-norm clip -> AdamW); pass the same `schedule` to report `lr`. `grad_norm` is the
  norm before clipping.

Example — the whole sharded loop (what `train/` runs):

    from lora_jax import sharding as shd, training
    mesh = shd.make_mesh(shd.MeshConfig(fsdp=-1))
    specs = shd.param_specs(abstract_params_with_lora, shd.default_rules("llama"), mesh)
    lora_specs, frozen_specs = lora_jax.split(specs)
    frozen = shd.load_sharded(host_frozen, shd.named_shardings(frozen_specs, mesh))
    lora = shd.inject_sharded(frozen, lora_cfg, key, shd.named_shardings(lora_specs, mesh))
    schedule = optax.warmup_cosine_decay_schedule(0, 2e-4, 10, 1000)
    tx = training.default_optimizer(schedule, max_grad_norm=1.0)
    state = training.init_train_state(lora, tx, key, mesh=mesh, lora_specs=lora_specs)
    step = training.make_train_step(model, tx, mesh, specs, schedule=schedule)
    for host_batch in batches:                       # numpy, [accum, micro_bsz, T] per field
        state, metrics = step(state, frozen, shd.shard_batch(host_batch, mesh, batch_axis=1))
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lora_jax.defaults import PLATFORM_DEFAULTS, platform_defaults
from lora_jax.models.build import lm_head
from lora_jax.sharding.mesh import BATCH_AXES
from lora_jax.sharding.rules import named_shardings
from lora_jax.targeting import iter_leaves, path_key
from lora_jax.training.loss import chunked_ce_sum, masked_ce_sum
from lora_jax.transform import combine, split, split_constants, zero_padded_slots
from lora_jax.tree import get

State = dict[str, Any]
Schedule = Callable[[jax.Array], jax.Array] | float | None
LOSS_CHUNK = PLATFORM_DEFAULTS["cpu"].loss_chunk  # 256 tokens per LM-head/loss chunk: 256 x 49152 fp32 logits = 50 MB (SmolLM2) at a time;
# smaller chunks re-read the [V, D] head weight more often (128: +2-3% step time on 2 CPU cores).
# loss_chunk="auto" takes the platform's value (lora_jax.defaults; 256 on every platform today).


def default_optimizer(schedule: Callable | float, max_grad_norm: float | None = 1.0, weight_decay: float = 0.0,
                      b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """Global-norm clipping (optional) then AdamW at `schedule` (a float or an optax schedule).

    >>> tx = default_optimizer(1e-3, max_grad_norm=1.0)
    >>> sorted(tx.init({"w": jnp.zeros(2)})[1][0]._fields)
    ['count', 'mu', 'nu']
    """
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    return optax.chain(optax.clip_by_global_norm(max_grad_norm) if max_grad_norm else optax.identity(), adamw)


def _raw_key(rng: jax.Array) -> jax.Array:
    """Raw uint32 key data: checkpointable as a plain array, usable by every jax.random function."""
    return jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng


def state_specs(state: State, lora_specs: Any) -> State:
    """PartitionSpecs for a train state (arrays or shapes): LoRA leaves by `lora_specs`, every
    optimizer leaf that mirrors a LoRA leaf (same path suffix and shape: Adam's mu/nu) by that
    leaf's spec, everything else (counts, step, rng) replicated.

    >>> lora = {"q": {"lora_a": jnp.zeros((4, 2))}}
    >>> st = init_train_state(lora, optax.adam(1e-3), jax.random.key(0))
    >>> state_specs(st, {"q": {"lora_a": P("fsdp", None)}})["opt_state"][0].mu["q"]["lora_a"]
    P('fsdp', None)
    """
    by_path = {p: (tuple(leaf.shape), get(lora_specs, p)) for p, leaf in iter_leaves(state["lora"])}

    def opt_spec(path, leaf):
        keys = path_key(path)
        for i in range(len(keys)):
            hit = by_path.get(keys[i:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return P()

    return {
        "lora": jax.tree.map(lambda _, s: s, state["lora"], lora_specs, is_leaf=lambda x: isinstance(x, P)),
        "opt_state": jax.tree_util.tree_map_with_path(opt_spec, state["opt_state"]),
        "step": P(),
        "rng": P(),
    }


def init_train_state(lora: Any, tx: optax.GradientTransformation, rng: jax.Array, *,
                     mesh: Mesh | None = None, lora_specs: Any = None) -> State:
    """`{"lora", "opt_state", "step": 0, "rng"}`; with `mesh` + `lora_specs`, created sharded.

    The optimizer state covers the trained leaves only (not the adapters' `lora_scale`).

    >>> st = init_train_state({"q": {"lora_a": jnp.zeros((4, 2))}}, optax.adam(1e-3), jax.random.key(0))
    >>> sorted(st), int(st["step"])
    (['lora', 'opt_state', 'rng', 'step'], 0)
    """

    def build(lora, rng):
        return {"lora": lora, "opt_state": tx.init(split_constants(lora)[0]), "step": jnp.zeros((), jnp.int32),
                "rng": _raw_key(rng)}

    if mesh is None:
        return jax.jit(build)(lora, rng)
    if lora_specs is None:
        raise ValueError("init_train_state: mesh given without lora_specs; pass lora_jax.split(param_specs)[0]")
    shardings = named_shardings(state_specs(jax.eval_shape(build, lora, rng), lora_specs), mesh)
    return jax.jit(build, out_shardings=shardings)(lora, rng)


def default_model_inputs(batch: Mapping[str, jax.Array]) -> dict[str, Any]:
    """The model's keyword inputs from a batch: `attention_mask` (else `segment_ids`) and `positions`.

    `segment_ids` (packed rows: 1, 2, ... per example, 0 = padding) is passed as the attention
    mask; a model that only reads it as a padding mask lets packed examples attend across their
    boundary (positions still restart). Pass `model_inputs=` to map fields differently.

    >>> sorted(default_model_inputs({"input_ids": 1, "positions": 2, "segment_ids": 3}))
    ['attention_mask', 'input_ids', 'positions']
    """
    mask = batch.get("attention_mask", batch.get("segment_ids"))
    return {"input_ids": batch["input_ids"], "attention_mask": mask, "positions": batch.get("positions")}


def _loss_sum_fn(model, model_inputs, loss_chunk):
    if loss_chunk == "auto":
        loss_chunk = platform_defaults().loss_chunk
    def loss_sum(params, batch, key):
        rngs = {"dropout": key} if key is not None else {}
        head = lm_head(model, params) if loss_chunk else None
        if head is not None:  # our models: the head runs inside the chunked loss, no full logits
            h, _ = model.apply({"params": params}, **model_inputs(batch), rngs=rngs, return_hidden=True)
            return chunked_ce_sum(h, head[0], batch, chunk=loss_chunk, vocab_first=head[1])
        logits, _ = model.apply({"params": params}, **model_inputs(batch), rngs=rngs)
        return masked_ce_sum(logits, batch)  # (sum, count): count rides along as aux

    return loss_sum


class TrainStep:
    """The callable `make_train_step` returns: `step(state, frozen, batch) -> (state, metrics)`.

    Compiled on the first call (the state's tree structure fixes the optimizer-state shardings);
    `.lower(state, frozen, batch)` gives the lowered computation (cost analysis, HLO).
    """

    def __init__(self, fn, mesh, lora_specs, frozen_specs, batch_axis):
        self._fn, self.mesh, self.lora_specs, self.frozen_specs = fn, mesh, lora_specs, frozen_specs
        self._batch_axis, self._jitted = batch_axis, {}

    def _jit(self, state, frozen, batch):
        key = (jax.tree.structure(state), tuple(sorted((k, v.ndim) for k, v in batch.items())))
        if key not in self._jitted:  # one jit per state structure / batch fields (normally exactly one)
            rep = NamedSharding(self.mesh, P())
            st_sh = named_shardings(state_specs(state, self.lora_specs), self.mesh)
            fr_sh = named_shardings(self.frozen_specs, self.mesh)
            b_sh = {k: _batch_sharding(self.mesh, v.ndim, self._batch_axis) for k, v in batch.items()}
            self._jitted[key] = jax.jit(self._fn, in_shardings=(st_sh, fr_sh, b_sh), out_shardings=(st_sh, rep),
                                        donate_argnums=(0,))
        return self._jitted[key]

    def __call__(self, state: State, frozen: Any, batch: Mapping[str, jax.Array]):
        with mesh_context(self.mesh):
            return self._jit(state, frozen, batch)(state, frozen, dict(batch))

    def lower(self, state: State, frozen: Any, batch: Mapping[str, jax.Array]):
        with mesh_context(self.mesh):
            return self._jit(state, frozen, batch).lower(state, frozen, dict(batch))


def mesh_context(mesh: Mesh):
    """The mesh as jax's context mesh while a step traces and runs: kernels that GSPMD cannot split
    (Pallas splash attention) read it to `shard_map` themselves over batch and heads.

    >>> with mesh_context(jax.make_mesh((1,), ("data",))):
    ...     jax.sharding.get_abstract_mesh().axis_names
    ('data',)
    """
    set_mesh = getattr(jax, "set_mesh", None)
    return set_mesh(mesh) if set_mesh is not None and mesh is not None else contextlib.nullcontext()


def _batch_sharding(mesh: Mesh, ndim: int, axis: int) -> NamedSharding:
    spec = [None] * ndim
    spec[axis] = BATCH_AXES
    return NamedSharding(mesh, P(*spec))


def make_train_step(model: Any, tx: optax.GradientTransformation, mesh: Mesh, param_specs: Any, *,
                    schedule: Schedule = None, model_inputs: Callable = default_model_inputs,
                    dropout: bool = True, trainable: str = "lora", loss_chunk: int | str | None = "auto") -> TrainStep:
    """Build the jitted train step (module docstring). `param_specs`: specs of the combined tree.

    `trainable="all"` is full fine-tuning with the same machinery (state["lora"] then holds the
    whole param tree and `frozen` is `{}`) — the baseline our benchmarks compare against.
    `loss_chunk`: for our models, the LM head and the loss run `loss_chunk` tokens at a time
    (`training.loss.chunked_ce_sum`: the [tokens, vocab] logits never exist); None = plain logits;
    "auto" = the platform's chunk (`lora_jax.defaults`).

    >>> import flax.linen as nn, lora_jax
    >>> from lora_jax.sharding import make_mesh, param_specs as specs_of
    >>> class LM(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, input_ids, attention_mask=None, positions=None):
    ...         x = nn.Embed(16, 8, name="embed_tokens")(input_ids)
    ...         return lora_jax.Dense(16, name="q_proj", lora=cfg)(x), None
    >>> cfg = lora_jax.LoraConfig(r=2, target_modules=["q_proj"])
    >>> ids = jnp.ones((1, 2, 4), jnp.int32)
    >>> params = lora_jax.inject(LM().init(jax.random.key(0), ids[0])["params"], cfg, jax.random.key(1))
    >>> lora, frozen = lora_jax.split(params)
    >>> mesh = make_mesh(devices=jax.devices()[:1])
    >>> specs = specs_of(params, [(r".*", P())], mesh)
    >>> tx = optax.sgd(0.1)
    >>> state = init_train_state(lora, tx, jax.random.key(2), mesh=mesh, lora_specs=split(specs)[0])
    >>> state, metrics = make_train_step(LM(), tx, mesh, specs)(state, frozen, {"input_ids": ids})
    >>> int(state["step"]), float(metrics["n_tokens"])
    (1, 6.0)
    """
    if trainable not in ("lora", "all"):
        raise ValueError(f"trainable must be 'lora' or 'all', got {trainable!r}")
    lora_specs, frozen_specs = split(param_specs) if trainable == "lora" else (param_specs, {})
    lora_sh = named_shardings(split_constants(lora_specs)[0], mesh)  # of the trained leaves (the gradients)
    loss_sum = _loss_sum_fn(model, model_inputs, loss_chunk)

    def micro(lora, frozen, mb, key):
        (s, n), g = jax.value_and_grad(lambda lo: loss_sum(combine(lo, frozen), mb, key), has_aux=True)(lora)
        return s, n, jax.tree.map(lambda x: x.astype(jnp.float32), g)

    def step_fn(state, frozen, batch):
        lora, constants = split_constants(state["lora"])  # the scales: part of the model, never trained
        frozen = combine(frozen, constants)
        key = jax.random.fold_in(state["rng"], state["step"]) if dropout else None
        accum = batch["input_ids"].shape[0]
        if accum == 1:
            s, n, grads = micro(lora, frozen, jax.tree.map(lambda x: x[0], batch), key)
        else:
            def body(carry, xs):
                g_acc, s_acc, n_acc = carry
                mb, i = xs
                s, n, g = micro(lora, frozen, mb, None if key is None else jax.random.fold_in(key, i))
                g_acc = jax.lax.with_sharding_constraint(jax.tree.map(jnp.add, g_acc, g), lora_sh)
                return (g_acc, s_acc + s, n_acc + n), None

            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), lora)
            init = (jax.lax.with_sharding_constraint(zeros, lora_sh), jnp.zeros(()), jnp.zeros(()))
            (grads, s, n), _ = jax.lax.scan(body, init, (batch, jnp.arange(accum)))
        denom = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, lora)
        updates, opt_state = tx.update(grads, state["opt_state"], lora)
        new_state = {"lora": zero_padded_slots(combine(optax.apply_updates(lora, updates), constants)), "opt_state": opt_state,
                     "step": state["step"] + 1, "rng": state["rng"]}
        lr = schedule(state["step"]) if callable(schedule) else jnp.asarray(jnp.nan if schedule is None else schedule)
        metrics = {"loss": s / denom, "grad_norm": optax.global_norm(grads),
                   "lr": jnp.asarray(lr, jnp.float32), "n_tokens": n}
        return new_state, metrics

    return TrainStep(step_fn, mesh, lora_specs, frozen_specs, batch_axis=1)


def make_eval_step(model: Any, mesh: Mesh, param_specs: Any, *, model_inputs: Callable = default_model_inputs,
                   loss_chunk: int | str | None = "auto"):
    """`eval_step(lora, frozen, batch[B, T]) -> {"loss", "loss_sum", "n_tokens"}` (no dropout).

    Sum `loss_sum` and `n_tokens` over eval batches and divide for the dataset's token mean.

    >>> callable(make_eval_step(None, None, {}))
    True
    """
    loss_sum = _loss_sum_fn(model, model_inputs, loss_chunk)
    compiled = {}

    def eval_step(lora, frozen, batch):
        key = tuple(sorted((k, v.ndim) for k, v in batch.items()))
        if key not in compiled:
            lora_specs, frozen_specs = split(param_specs)
            b_sh = {k: _batch_sharding(mesh, v.ndim, 0) for k, v in batch.items()}
            compiled[key] = jax.jit(
                lambda lo, fr, b: _metrics(*loss_sum(combine(lo, fr), b, None)),
                in_shardings=(named_shardings(lora_specs, mesh), named_shardings(frozen_specs, mesh), b_sh),
                out_shardings=NamedSharding(mesh, P()))
        with mesh_context(mesh):
            return compiled[key](lora, frozen, dict(batch))

    return eval_step


def _metrics(s, n):
    return {"loss": s / jnp.maximum(n, 1.0), "loss_sum": s, "n_tokens": n}
