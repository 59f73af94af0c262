"""QLoRA figures on SmolLM2-135M (CPU): param bytes per format, peak host memory while loading,
and the train step of QLoRA (NF4 + double quantization) vs LoRA over a bf16 base, same batch.

    .venv/bin/python benchmarks/bench_qlora.py [--steps 5]      # -> benchmarks/results/qlora.md

Every measurement that needs a clean process (peak RSS) runs in its own subprocess; the two train
steps run in the same process, alternating, medians reported. GPU: not yet measured on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "qlora.md")


def load_child(scheme: str) -> dict:
    """In a fresh process: from_pretrained(quantize=scheme) -> stored bytes and peak RSS."""
    code = f"""
import json, resource, time
import numpy as np
from lora_jax.models import from_pretrained
from lora_jax.models.gguf import default_model_path
from lora_jax.targeting import iter_leaves
from lora_jax.quant import is_quantized
q = {scheme!r}
t = time.time()
_, params, _ = from_pretrained(default_model_path(), param_dtype="bfloat16" if q == "bf16" else "float32",
                               scan_layers=True, host=True, quantize=None if q in ("fp32", "bf16") else q)
total = quantized = 0
for _, leaf in iter_leaves(params):
    total += leaf.nbytes
    quantized += leaf.nbytes if is_quantized(leaf) else 0
print(json.dumps({{"bytes": total, "kernel_bytes": quantized, "seconds": time.time() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_child(steps: int) -> dict:
    code = f"""
import json, resource, time
import jax, jax.numpy as jnp, numpy as np, optax
import lora_jax
from lora_jax import sharding as shd, training
from lora_jax.models import from_pretrained
from lora_jax.models.gguf import default_model_path
cfg = lora_jax.LoraConfig(r=8, alpha=16, target_modules="all-linear")
mesh = shd.make_mesh(devices=jax.devices()[:1])
rng = np.random.default_rng(0)
ids = rng.integers(0, 49152, (1, 4, 128)).astype(np.int32)
batch = {{"input_ids": ids, "labels": ids}}
runs = {{}}
for name, quantize in (("lora_bf16", None), ("qlora_nf4", "nf4")):
    model, params, _ = from_pretrained(default_model_path(), dtype="bfloat16", param_dtype="bfloat16", scan_layers=True,
                                       lora=cfg, host=True, quantize=quantize)
    lora, frozen = lora_jax.split(lora_jax.inject(params, cfg, jax.random.key(0)))
    specs = shd.param_specs(lora_jax.combine(lora, frozen), shd.default_rules("llama"), mesh)
    tx = optax.adamw(1e-3)
    state = training.init_train_state(lora, tx, jax.random.key(1), mesh=mesh, lora_specs=lora_jax.split(specs)[0])
    step = training.make_train_step(model, tx, mesh, specs, schedule=1e-3)
    frozen = jax.device_put(frozen)
    plan = step.lower(state, frozen, batch).compile().memory_analysis()
    state, m = step(state, frozen, batch); m["loss"].block_until_ready()
    runs[name] = [step, state, frozen, [], plan.temp_size_in_bytes, plan.argument_size_in_bytes]
for _ in range({steps}):
    for name, r in runs.items():
        t = time.perf_counter()
        r[1], m = r[0](r[1], r[2], batch)
        m["loss"].block_until_ready()
        r[3].append(time.perf_counter() - t)
print(json.dumps({{k: {{"step_s": float(np.median(r[3])), "temp_mb": r[4] / 1e6, "args_mb": r[5] / 1e6}}
                  for k, r in runs.items()}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    loads = {s: load_child(s) for s in ("fp32", "bf16", "int8", "nf4")}
    bf16 = loads["bf16"]["bytes"]
    lines = ["# QLoRA on SmolLM2-135M-Instruct (CPU)", "",
             "`.venv/bin/python benchmarks/bench_qlora.py` — 2 shared CPU cores, jax CPU. GPU: not yet measured on a GPU.", "",
             "## Param bytes and peak host memory while loading (from the GGUF, scan_layers=True, host=True)", "",
             "| format | all params MB | vs bf16 | quantized kernels MB | load s | peak RSS MB |", "|---|---:|---:|---:|---:|---:|"]
    for s, r in loads.items():
        label = {"fp32": "fp32", "bf16": "bf16", "int8": "int8 + double quant (embeddings fp32)",
                 "nf4": "NF4 + double quant (embeddings fp32)"}[s]
        lines.append(f"| {label} | {r['bytes'] / 1e6:.1f} | {r['bytes'] / bf16:.3f} | {r['kernel_bytes'] / 1e6:.1f} | "
                     f"{r['seconds']:.0f} | {r['peak_rss_mb']:.0f} |")
    steps = step_child(args.steps)
    lines += ["", f"## Train step, batch 4x128, LoRA r=8 all-linear, bf16 compute, medians of {args.steps} alternating steps", "",
              "| run | step s | XLA temp MB | XLA args MB |", "|---|---:|---:|---:|"]
    for k, r in steps.items():
        lines.append(f"| {k} | {r['step_s']:.2f} | {r['temp_mb']:.0f} | {r['args_mb']:.0f} |")
    q, b = steps["qlora_nf4"], steps["lora_bf16"]
    lines.append(f"\nQLoRA / LoRA: step time {q['step_s'] / b['step_s']:.2f}x, temp {q['temp_mb'] / b['temp_mb']:.2f}x, "
                 f"args {q['args_mb'] / b['args_mb']:.2f}x")
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT + ".tmp", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(OUT + ".tmp", OUT)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
