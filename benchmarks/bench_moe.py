"""MoE train-step benchmark: LoRA on attention only vs LoRA on attention + every expert, one run.

    python benchmarks/bench_moe.py                       # defaults below, CPU
    python benchmarks/bench_moe.py --steps 10 --batch 8

Model: a Qwen3-MoE (`lora_jax.models.families.qwen3_moe`) at tiny-but-real proportions — hidden 256,
4 layers, 8 heads (4 KV) of 64, 16 experts of width 128, top-4 routing with renormalisation, vocab
8192 — random weights (timing does not depend on the values). Both sides: scanned layers, no remat,
AdamW, the library's train step (`lora_jax.training.make_train_step`, donated state), batch
`--batch` x `--seq` tokens, the same random batch every step.

- "attention": LoRA r=8, alpha=16 on q/k/v/o_proj.
- "attention + experts": the same plus PEFT-style `target_parameters` on `mlp.experts.gate_up_proj`
  and `mlp.experts.down_proj` (one r=8 A/B pair per expert, applied with grouped matmuls).

Times are medians over `--steps` after `--warmup` steps (the first call compiles), in one process,
both configurations interleaved step by step so machine load hits both alike. Writes a markdown table
to stdout and benchmarks/results/moe.md. GPU: not yet measured (no GPU was lent when this was written).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from lora_jax import sharding as shd
from lora_jax.models import ModelConfig, build_model
from lora_jax.training import init_train_state, make_train_step
from results_file import write_results  # benchmarks/ is the script's folder: sys.path[0]

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "moe.md")
SHAPE = dict(model_type="qwen3_moe", vocab_size=8192, hidden_size=256, intermediate_size=512, num_layers=4,
             num_heads=8, num_kv_heads=4, head_dim=64, qk_norm=True, num_experts=16, num_experts_per_tok=4,
             moe_intermediate_size=128, tie_word_embeddings=False)
ATTENTION = dict(r=8, alpha=16.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
EXPERTS = dict(ATTENTION, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])


def setup(lora_kwargs, batch, seq):
    """A ready-to-call (step, state, frozen, batch, n_trained) for one LoRA configuration."""
    cfg = ModelConfig(**SHAPE)
    lcfg = lora_jax.LoraConfig(**lora_kwargs)
    model = build_model(cfg, scan_layers=True, remat=None, lora=lcfg)
    ids = np.random.default_rng(0).integers(0, SHAPE["vocab_size"], (1, batch, seq)).astype(np.int32)
    params = build_model(cfg, scan_layers=True).init(jax.random.key(0), ids[0, :1, :8])["params"]
    params = lora_jax.inject(params, lcfg, jax.random.key(1))
    mesh = shd.make_mesh(devices=jax.devices()[:1])
    specs = shd.param_specs(params, shd.default_rules("qwen3_moe"), mesh)
    lora, frozen = lora_jax.split(params)
    tx = optax.adamw(1e-4)
    state = init_train_state(lora, tx, jax.random.key(2), mesh=mesh, lora_specs=lora_jax.split(specs)[0])
    step = make_train_step(model, tx, mesh, specs)
    n = sum(x.size for p, x in lora_jax.tree.iter_leaves(lora) if p[-1] in ("lora_a", "lora_b"))
    return step, state, frozen, {"input_ids": jnp.asarray(ids)}, n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--grouped", default="auto", choices=["auto", "ragged", "tiled"],
                    help="grouped-matmul implementation (lora_jax.models.moe.GROUPED); auto = tiled on CPU")
    args = ap.parse_args()
    from lora_jax.models import moe

    moe.GROUPED = args.grouped
    runs = {"attention": setup(ATTENTION, args.batch, args.seq), "attention + experts": setup(EXPERTS, args.batch, args.seq)}
    states = {k: v[1] for k, v in runs.items()}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(args.warmup + args.steps):
        for name, (step, _, frozen, batch, _) in runs.items():
            t0 = time.perf_counter()
            states[name], metrics = step(states[name], frozen, batch)
            jax.block_until_ready(metrics)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["attention"]
    device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, jax {jax.__version__})"
    lines = [
        "# MoE train step: LoRA on attention vs attention + experts",
        "",
        f"Command: `python benchmarks/bench_moe.py --batch {args.batch} --seq {args.seq} --steps {args.steps} "
        f"--warmup {args.warmup} --grouped {args.grouped}`  ",
        f"Model: Qwen3-MoE shapes {SHAPE}; batch {args.batch} x {args.seq} tokens; medians of {args.steps} steps.",
        "",
        "| device | LoRA targets | trained params | step time (median) | ratio vs attention only |",
        "|---|---|---|---|---|",
    ]
    for name, (_, _, _, _, n) in runs.items():
        lines.append(f"| {device} | {name} | {n:,} | {med[name] * 1e3:.1f} ms | {med[name] / base:.2f}x |")
    lines.append("| GPU | both | - | not yet measured on a GPU | - |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(RESULTS, text)


if __name__ == "__main__":
    main()
