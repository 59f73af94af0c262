"""GPU train-step benchmark: our LoRA step (attention="auto"), our full fine-tuning step and HF PEFT +
transformers (sdpa attention), same GPU, each side in its own process.

    python benchmarks/bench_gpu.py                      # Llama-3.2-1B shapes 4x2048, Llama-3-8B shapes 2x2048
    python benchmarks/bench_gpu.py --models 1b --steps 20
    python benchmarks/bench_gpu.py --tiny               # tiny shapes on CPU: a smoke run of this script

Model: the architecture of Llama-3.2-1B (16 layers, d=2048, 32/8 heads of 64, vocab 128256, tied
head) or Llama-3-8B (32 layers, d=4096, 32/8 heads of 128, untied head), random weights (time and
memory do not depend on the values), bf16 compute and frozen weights. LoRA r=16, alpha=32 on
q/k/v/o/gate/up/down (fp32 adapters and AdamW state on both sides), AdamW, next-token loss on every
token of random rows (no padding: the causal mask).

- "jax lora": `lora_jax.training.make_train_step`, scanned layers, remat="auto" and loss chunk
  "auto" (the platform defaults, `lora_jax.defaults`), attention="auto" (its log line names the
  kernel used: cuDNN on an NVIDIA GPU with bf16).
- "jax full": the same step with trainable="all" (bf16 weights and AdamW state).
- "peft": transformers LlamaForCausalLM(attn_implementation="sdpa", bf16) + peft.get_peft_model,
  torch AdamW over the adapters, forward(labels) + backward + step + zero_grad.

Reported: median step time over --steps after --warmup, tokens/s, peak device memory (jax:
the device's peak_bytes_in_use; torch: max_memory_allocated; on CPU both are the process's peak
RSS), LoRA/full step-time ratio, and

    MFU = useful FLOPs / (step time x peak), peak = --peak_tflops (989: H100 SXM dense bf16)
    useful FLOPs = k x (2·N·tokens + 2·L·B·T²·H·d)     k = 2 for LoRA (forward + backward w.r.t.
                                                        activations, no frozen-weight gradients),
                                                        3 for full fine-tuning
    N = matmul parameters (attention and MLP projections + LM head); the attention term is causal
    QKᵀ and PV (half of 4·B·T²·H·d per layer). LoRA's own matmuls and remat recomputation are not
    counted (not useful work).

Targets (issue 10, one H100): 1B >= 2.3x PEFT tokens/s at <= 0.35x its peak memory; 8B >= 2.0x PEFT
tokens/s and MFU >= 0.50. Writes the table to stdout and (not --tiny) benchmarks/results/gpu.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from results_file import write_results  # benchmarks/ is the script's folder: sys.path[0]

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "gpu.md")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
MODELS = {  # name: (transformers LlamaConfig kwargs, batch, seq)
    "1b": (dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, max_position_embeddings=131072), 4, 2048),
    "8b": (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                rope_theta=500000.0, max_position_embeddings=8192), 2, 2048),
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=256, tie_word_embeddings=True,
                  max_position_embeddings=256), 2, 128),
}
SIDES = ("jax_lora", "jax_full", "peft")


def hf_config(name: str):
    import transformers

    return transformers.LlamaConfig(**MODELS[name][0], rms_norm_eps=1e-5)


def useful_flops(name: str, full: bool) -> float:
    """k x (2·N·tokens + causal attention), the formula of the module docstring."""
    cfg, b, t = MODELS[name]
    L, d, ff, V, h, kv, hd = (cfg[k] for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size",
                                               "num_attention_heads", "num_key_value_heads", "head_dim"))
    n = L * (d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * ff) + d * V
    fwd = 2 * n * b * t + 2 * L * b * t * t * h * hd
    return (3 if full else 2) * fwd


def peak_rss_bytes() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return float("nan")


def batch_np(name: str):
    import numpy as np

    cfg, b, t = MODELS[name]
    ids = np.random.default_rng(0).integers(0, cfg["vocab_size"], (b, t)).astype(np.int32)
    return ids


# -- children ---------------------------------------------------------------------------------------
def child_jax(name: str, full: bool, args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import lora_jax
    from lora_jax import sharding as shd
    from lora_jax import training
    from lora_jax.models import ModelConfig, build_model

    used = []

    class Grab(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("attention=auto"):  # the step's calls, not the shape-only init
                used.append(record.getMessage())

    logging.getLogger("lora_jax.attention").addHandler(Grab())
    logging.getLogger("lora_jax.attention").setLevel(logging.INFO)
    cfg = ModelConfig.from_hf(hf_config(name))
    lcfg = lora_jax.LoraConfig(r=16, alpha=32.0, target_modules=TARGETS)
    model = build_model(cfg, dtype="bfloat16", param_dtype="bfloat16", scan_layers=True, remat="auto",
                        attention="auto", lora=None if full else lcfg)
    mesh = shd.make_mesh(devices=jax.devices()[:1])
    params = jax.jit(model.clone(attention="reference").init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    tx = optax.adamw(1e-4)
    if full:
        specs = shd.param_specs(params, shd.default_rules("llama"), mesh)
        state = training.init_train_state(params, tx, jax.random.key(2), mesh=mesh, lora_specs=specs)
        frozen = {}
        step = training.make_train_step(model, tx, mesh, specs, dropout=False, trainable="all")
    else:
        params = lora_jax.inject(params, lcfg, jax.random.key(1))
        specs = shd.param_specs(params, shd.default_rules("llama"), mesh)
        lora, frozen = lora_jax.split(params)
        state = training.init_train_state(lora, tx, jax.random.key(2), mesh=mesh, lora_specs=lora_jax.split(specs)[0])
        step = training.make_train_step(model, tx, mesh, specs, dropout=False)
    del params
    ids = batch_np(name)
    batch = shd.shard_batch({"input_ids": ids[None], "targets": np.roll(ids, -1, -1)[None]}, mesh, batch_axis=1)
    times = []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        state, metrics = step(state, frozen, batch)
        jax.block_until_ready(metrics)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use") if dev.platform != "cpu" else None
    return {"step_s": statistics.median(times), "peak_bytes": peak if peak is not None else peak_rss_bytes(),
            "memory": "device peak_bytes_in_use" if peak is not None else "process peak RSS",
            "device": dev.device_kind, "loss": float(metrics["loss"]), "attention": used[:1],
            "remat": str(model.remat)}


def child_peft(name: str, args) -> dict:
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    with dev:  # random weights made on the device: an 8B model built on the host takes minutes
        model = transformers.LlamaForCausalLM._from_config(hf_config(name), attn_implementation="sdpa",
                                                          torch_dtype=torch.bfloat16)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.as_tensor(batch_np(name), dtype=torch.long, device=dev)
    times = []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    return {"step_s": statistics.median(times),
            "peak_bytes": torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes(),
            "memory": "torch max_memory_allocated" if cuda else "process peak RSS",
            "device": torch.cuda.get_device_name() if cuda else "cpu", "loss": float(loss),
            "adapter_dtype": str(next(p for p in model.parameters() if p.requires_grad).dtype)}


def run_child(side: str, name: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", side, "--models", name,
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    # The checkout's lora_jax without an install (a bare GPU machine), and jax may use all of the GPU
    # (its default 75% is not what PEFT gets); the peak reported is what was in use, not reserved.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(HERE), os.environ.get("PYTHONPATH")])))
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    if args.tiny:
        env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        oom = "RESOURCE_EXHAUSTED" in proc.stderr or "out of memory" in proc.stderr.lower()
        return {"error": "out of memory" if oom else f"failed: {tail[0][:200]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- report -----------------------------------------------------------------------------------------
def report(results: dict, args) -> str:
    peak = args.peak_tflops * 1e12
    lines = []
    for name, sides in results.items():
        _, b, t = MODELS[name]
        tokens = b * t
        dev = next((r["device"] for r in sides.values() if "device" in r), "?")
        lines += [f"### {name} shapes, batch {b}x{t}, {dev}", "",
                  "| step | ms | tokens/s | vs PEFT | peak memory GB | vs PEFT | MFU |", "|---|---:|---:|---:|---:|---:|---:|"]
        ref = sides.get("peft", {})
        for side in SIDES:
            r = sides[side]
            if "error" in r:
                lines.append(f"| {side} | {r['error']} | | | | | |")
                continue
            tps = tokens / r["step_s"]
            vs = f"{tps * ref['step_s'] / tokens:.2f}x" if "step_s" in ref and side != "peft" else ""
            mem = f"{r['peak_bytes'] / ref['peak_bytes']:.2f}x" if "peak_bytes" in ref and side != "peft" else ""
            mfu = "" if side == "peft" or args.tiny else f"{useful_flops(name, side == 'jax_full') / (r['step_s'] * peak):.2f}"
            lines.append(f"| {side} | {1e3 * r['step_s']:.1f} | {tps:,.0f} | {vs} | {r['peak_bytes'] / 1e9:.2f} | {mem} | {mfu} |")
        lora, full = sides["jax_lora"], sides["jax_full"]
        if "step_s" in lora and "step_s" in full:
            lines.append(f"\nLoRA / full step time: {lora['step_s'] / full['step_s']:.2f}")
        if "attention" in lora:
            lines.append(f"jax lora: remat={lora['remat']}; {'; '.join(lora['attention']) or 'attention log not captured'}")
        lines.append("")
    lines.append(f"MFU = useful FLOPs / (step time x {args.peak_tflops:g} TFLOP/s); useful = k x (2·N·tokens + "
                 "2·L·B·T²·H·d), k = 2 LoRA, 3 full (module docstring). Medians of "
                 f"{args.steps} steps after {args.warmup} warm-up.")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="1b,8b", help="comma-separated: 1b, 8b (tiny with --tiny)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak_tflops", type=float, default=989.0, help="the device's dense bf16 peak (H100 SXM: 989)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (a smoke run; no results file)")
    p.add_argument("--out", default=None, help="markdown output (default benchmarks/results/gpu.md; none with --tiny)")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = ["tiny"] if args.tiny else args.models.split(",")
    if args.child:
        name = names[0]
        r = child_peft(name, args) if args.child == "peft" else child_jax(name, args.child == "jax_full", args)
        print(json.dumps(r))
        return
    out = args.out or (None if args.tiny else RESULTS)
    results = {}
    for name in names:  # the file is rewritten after each model: a run cut short keeps what it measured
        results[name] = {side: run_child(side, name, args) for side in SIDES}
        text = report(results, args)
        if out:
            write_results(out, f"# GPU train step ({' '.join(sys.argv[1:]) or 'defaults'})\n\n{text}")
    print(text)


if __name__ == "__main__":
    main()
