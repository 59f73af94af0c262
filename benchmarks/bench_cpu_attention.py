"""CPU: the attention core (forward + backward) of attention="xla" vs "reference", medians.

    python benchmarks/bench_cpu_attention.py        # -> benchmarks/results/cpu_attention.md

fp32 q/k/v, GQA, scale 1/8; grad of sum(out²) w.r.t. q, k, v; both jitted, run interleaved (same
load for both), 15 rounds after one warm-up. Decides whether attention="auto" on CPU should pick
"xla" (it picks "reference" unless xla is clearly faster).
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp

from lora_jax.models.attn_reference import reference, xla
from lora_jax.models.masks import AttentionMask

SHAPES = [(4, 128, 9, 3, 64), (8, 256, 9, 3, 64), (2, 512, 32, 8, 64)]  # SmolLM2 heads; Llama-3.2-1B heads
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu_attention.md")


def main() -> None:
    rows = ["| B×T | heads | mask | reference ms | xla ms | xla / reference |", "|---|---|---|---:|---:|---:|"]
    for b, t, h, kv, d in SHAPES:
        ks = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(ks[0], (b, t, h, d))
        k, v = (jax.random.normal(x, (b, t, kv, d)) for x in ks[1:])
        seg = jnp.ones((b, t), jnp.int32).at[:, t // 2 :].set(2)
        for name, m in (("causal", AttentionMask()), ("packed", AttentionMask(segment_ids=seg))):
            fns = {n: jax.jit(jax.grad(lambda q, k, v, f=f: (f(q, k, v, m, 0.125) ** 2).sum(), argnums=(0, 1, 2)))
                   for n, f in (("reference", reference), ("xla", xla))}
            times = {n: [] for n in fns}
            for f in fns.values():
                jax.block_until_ready(f(q, k, v))
            for _ in range(15):
                for n, f in fns.items():
                    t0 = time.perf_counter()
                    jax.block_until_ready(f(q, k, v))
                    times[n].append(time.perf_counter() - t0)
            r, x = statistics.median(times["reference"]), statistics.median(times["xla"])
            rows.append(f"| {b}×{t} | {h}/{kv}, d={d} | {name} | {1e3 * r:.1f} | {1e3 * x:.1f} | {x / r:.2f} |")
    text = "\n".join(rows)
    print(text)
    with open(OUT, "w") as f:
        f.write(f"# CPU attention core: xla vs reference ({os.cpu_count()} CPUs, jax {jax.__version__})\n\n{text}\n")


if __name__ == "__main__":
    main()
