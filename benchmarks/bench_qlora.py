"""QLoRA figures on SmolLM2-135M (CPU): param bytes per format, peak host memory while loading,
and the train step of QLoRA (NF4 + double quantization) vs LoRA over a bf16 base, same batch.

    .venv/bin/python benchmarks/bench_qlora.py [--steps 10]      # -> benchmarks/results/qlora.md

The quantized rows are what QLoRA users run: the linear kernels in 4 (or 8) bits, embeddings (tied
with the LM head in SmolLM2), norms and the LM head unquantized in bf16. Each load runs in its own
fresh subprocess and reports that process's peak RSS (`ru_maxrss`) and its RSS after the imports,
before loading. The step: one subprocess per run for its peak RSS (load + compile + steps), then
both runs in one process, alternating step by step, medians and ratios. GPU: not yet measured on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from results_file import write_results  # benchmarks/ is the script's folder: sys.path[0]

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "qlora.md")
FORMATS = {"fp32": ("float32", None), "bf16": ("bfloat16", None), "int8": ("bfloat16", "int8"), "nf4": ("bfloat16", "nf4")}
PRELUDE = """
import json, resource, time
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak so far, MB
import jax, jax.numpy as jnp, numpy as np, optax
import lora_jax
from lora_jax import sharding as shd, training
from lora_jax.models import from_pretrained
from lora_jax.models.gguf import default_model_path
from lora_jax.quant import is_quantized
from lora_jax.tree import KERNEL, iter_leaves
"""


def child(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PRELUDE + code], capture_output=True, text=True,
                         cwd=os.path.dirname(HERE))  # this checkout's lora_jax
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_child(fmt: str) -> dict:
    """In a fresh process: from_pretrained(quantize=...) -> bytes (all, the linear kernels) and peak RSS."""
    param_dtype, quantize = FORMATS[fmt]
    return child(f"""
base = rss()
t = time.time()
_, params, _ = from_pretrained(default_model_path(), param_dtype={param_dtype!r}, scan_layers=True, host=True,
                               quantize={quantize!r})
seconds, peak = time.time() - t, rss()
total = kernels = kernels_bf16 = 0
for path, leaf in iter_leaves(params):
    total += leaf.nbytes
    if path[-1] == KERNEL:  # the linear kernels: the ones NF4/int8 quantize (SmolLM2's LM head is the tied embedding)
        kernels += leaf.nbytes
        kernels_bf16 += leaf.size * 2
print(json.dumps({{"bytes": total, "kernel_bytes": kernels, "kernel_bf16_bytes": kernels_bf16, "seconds": seconds,
                  "import_rss_mb": base, "peak_rss_mb": peak}}))
""")


STEP = """
cfg = lora_jax.LoraConfig(r=8, alpha=16, target_modules="all-linear")
mesh = shd.make_mesh(devices=jax.devices()[:1])
ids = np.random.default_rng(0).integers(0, 49152, (1, 4, 128)).astype(np.int32)
batch = {"input_ids": ids, "labels": ids}

def build(quantize):
    model, params, _ = from_pretrained(default_model_path(), dtype="bfloat16", param_dtype="bfloat16", scan_layers=True,
                                       lora=cfg, host=True, quantize=quantize)
    lora, frozen = lora_jax.split(lora_jax.inject(params, cfg, jax.random.key(0)))
    specs = shd.param_specs(lora_jax.combine(lora, frozen), shd.default_rules("llama"), mesh)
    tx = optax.adamw(1e-3)
    state = training.init_train_state(lora, tx, jax.random.key(1), mesh=mesh, lora_specs=lora_jax.split(specs)[0])
    step = training.make_train_step(model, tx, mesh, specs, schedule=1e-3)
    frozen = jax.device_put(frozen)
    plan = step.lower(state, frozen, batch).compile().memory_analysis()
    state, m = step(state, frozen, batch)
    m["loss"].block_until_ready()
    return [step, state, frozen, [], plan.temp_size_in_bytes / 1e6, plan.argument_size_in_bytes / 1e6]
"""


def step_rss_child(quantize: str | None) -> dict:
    """In a fresh process: load, compile and run 3 steps of one run -> its peak RSS."""
    return child(STEP + f"""
base = rss()
r = build({quantize!r})
for _ in range(2):
    r[1], m = r[0](r[1], r[2], batch)
m["loss"].block_until_ready()
print(json.dumps({{"import_rss_mb": base, "peak_rss_mb": rss(), "temp_mb": r[4], "args_mb": r[5]}}))
""")


def step_time_child(steps: int) -> dict:
    """Both runs in one process, alternating step by step: median seconds per step."""
    return child(STEP + f"""
runs = {{"lora_bf16": build(None), "qlora_nf4": build("nf4")}}
for _ in range({steps}):
    for r in runs.values():
        t = time.perf_counter()
        r[1], m = r[0](r[1], r[2], batch)
        m["loss"].block_until_ready()
        r[3].append(time.perf_counter() - t)
print(json.dumps({{k: {{"step_s": float(np.median(r[3])), "min_s": min(r[3])}} for k, r in runs.items()}}))
""")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    loads = {s: load_child(s) for s in FORMATS}
    bf16 = loads["bf16"]
    lines = ["# QLoRA on SmolLM2-135M-Instruct (CPU)", "",
             f"`.venv/bin/python benchmarks/bench_qlora.py --steps {args.steps}` — 2 shared CPU cores, jax CPU. "
             "GPU: not yet measured on a GPU.", "",
             "## Param bytes and peak host memory while loading", "",
             "From the embedded GGUF (Q4_1, dequantized to fp32 as it is read), `scan_layers=True, host=True`; each "
             "load in its own process. Quantized rows: linear kernels in NF4/int8 with double quantization (block 64, "
             "scales of scales in blocks of 256), embeddings (tied LM head) and norms in bf16. The kernel columns count "
             "the 210 linear kernels (30 layers x 7), i.e. what quantization applies to.", "",
             "| format | all params MB | vs bf16 | linear kernels MB | kernels vs bf16 | load s | RSS after imports MB | "
             "peak RSS MB | peak − imports MB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s, r in loads.items():
        label = {"fp32": "fp32", "bf16": "bf16", "int8": "int8 + double quant, rest bf16",
                 "nf4": "NF4 + double quant, rest bf16"}[s]
        lines.append(f"| {label} | {r['bytes'] / 1e6:.1f} | {r['bytes'] / bf16['bytes']:.3f} | {r['kernel_bytes'] / 1e6:.1f} | "
                     f"{r['kernel_bytes'] / r['kernel_bf16_bytes']:.3f} | {r['seconds']:.0f} | {r['import_rss_mb']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['import_rss_mb']:.0f} |")
    rss = {"lora_bf16": step_rss_child(None), "qlora_nf4": step_rss_child("nf4")}
    times = step_time_child(args.steps)
    lines += ["", "## Train step: QLoRA (NF4 base) vs LoRA (bf16 base)", "",
              f"Batch 4x128, LoRA r=8 all-linear, bf16 compute, AdamW, `scan_layers=True`. Step time: both runs in one "
              f"process, {args.steps} steps each, alternating; peak RSS: each run in its own process (load, compile, "
              "3 steps); XLA temp/args: the compiled step's memory plan.", "",
              "| run | median step s | fastest step s | peak RSS MB | XLA temp MB | XLA args MB |",
              "|---|---:|---:|---:|---:|---:|"]
    for k in times:
        t, m = times[k], rss[k]
        lines.append(f"| {k} | {t['step_s']:.2f} | {t['min_s']:.2f} | {m['peak_rss_mb']:.0f} | {m['temp_mb']:.0f} | "
                     f"{m['args_mb']:.0f} |")
    q, b = "qlora_nf4", "lora_bf16"
    lines.append(f"\nQLoRA / LoRA: median step time {times[q]['step_s'] / times[b]['step_s']:.2f}x, peak RSS "
                 f"{rss[q]['peak_rss_mb'] / rss[b]['peak_rss_mb']:.2f}x, XLA temp {rss[q]['temp_mb'] / rss[b]['temp_mb']:.2f}x, "
                 f"XLA args {rss[q]['args_mb'] / rss[b]['args_mb']:.2f}x")
    write_results(OUT, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
