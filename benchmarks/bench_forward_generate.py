"""Forward and generation speed on SmolLM2-135M-Instruct (GGUF -> fp32), side by side in one run.

    python benchmarks/bench_forward_generate.py [--repeats 10] [--batch 4] [--seq 128] [--new 64]

1. Forward (jit, fp32, [batch, seq]): the base model vs the same model with LoRA r=8 *unmerged*
   (params carry lora_a/lora_b, model built with lora=config) vs *merged* (`lora_jax.merge`),
   for target_modules q,v and all-linear. The variants are timed round-robin (one call of each
   per round, the starting variant rotating) so that load drift on a shared machine hits them
   alike; medians over the rounds and ratios to the base. Targets: unmerged <= 1.10x, merged <= 1.02x.
2. Greedy generation of exactly `--new` tokens after the chat-templated question, ours
   (`lora_jax.generate`: KV cache, one compiled while_loop) vs transformers `generate` on the same
   GGUF (fp32, torch threads = 2); tokens/s = new tokens / wall time incl. prefill, after one
   warm-up call (compilation excluded), median over rounds. Target: ours >= 1.5x.

Prints a markdown table and writes it to benchmarks/results/forward_generate.md.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import time

import jax
import numpy as np

import lora_jax
from lora_jax.generation import chat_input_ids, generate
from lora_jax.models import from_pretrained
from lora_jax.models.gguf import default_model_path, load_tokenizer

QUESTION = "What equipment do I need for rock climbing?"
RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "forward_generate.md"


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def forward_rows(model, params, batch: int, seq: int, repeats: int) -> list[tuple[str, float, float]]:
    ids = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (batch, seq)).astype(np.int32)
    variants = {"base": (model, params)}
    for name, targets in (("q,v", ("q_proj", "v_proj")), ("all-linear", lora_jax.ALL_LINEAR)):
        cfg = lora_jax.LoraConfig(r=8, alpha=16, target_modules=targets)
        adapted = lora_jax.inject(params, cfg, jax.random.key(0))
        lora, frozen = lora_jax.split(adapted)
        lora = jax.tree.map(lambda x: x + 0.01, lora)  # B != 0, as after training
        adapted = lora_jax.combine(lora, frozen)
        variants[f"LoRA r=8 {name}, unmerged"] = (model.clone(lora=cfg), adapted)
        variants[f"LoRA r=8 {name}, merged"] = (model, lora_jax.merge(adapted, cfg))
    calls = {}
    for name, (m, p) in variants.items():
        f = jax.jit(lambda p, x, m=m: m.apply({"params": p}, x)[0])
        calls[name] = lambda f=f, p=p: f(p, ids).block_until_ready()
        calls[name]()  # compile
    times = {name: [] for name in calls}
    names = list(calls)
    for i in range(repeats):
        # Rotate who goes first: a fixed order lets a per-round effect (the first call after a
        # pause runs slower) land on one variant every time.
        for name in names[i % len(names):] + names[:i % len(names)]:
            times[name].append(_timed(calls[name]))
    base = statistics.median(times["base"])
    return [(name, statistics.median(t) * 1e3, statistics.median(t) / base) for name, t in times.items()]


def generation_rows(path: str, model, params, new: int, repeats: int) -> list[tuple[str, float, float]]:
    """Greedy tokens/s: ours unrolled and with scan_layers=True, transformers (see module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    tok = load_tokenizer(path)
    ids = chat_input_ids(tok, QUESTION)
    p = pathlib.Path(path)
    hf = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    tids = torch.tensor(ids, dtype=torch.long)

    scanned, sparams, _ = from_pretrained(path, scan_layers=True)

    def ours(m=model, p=params):
        out = generate(m, p, ids, max_new_tokens=new, eos_token_id=None)
        assert out.shape[1] == ids.shape[1] + new

    def theirs():
        with torch.no_grad():
            out = hf.generate(tids, attention_mask=torch.ones_like(tids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.shape[1] == ids.shape[1] + new

    fns = {"lora_jax.generate (greedy, KV cache)": ours,
           "lora_jax.generate, scan_layers=True": lambda: ours(scanned, sparams),
           "transformers generate (greedy, fp32, 2 threads)": theirs}
    for fn in fns.values():
        fn()  # warm-up (compilation)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_timed(fn))
    tps = {name: new / statistics.median(t) for name, t in times.items()}
    ref = tps["transformers generate (greedy, fp32, 2 threads)"]
    return [(name, v, v / ref) for name, v in tps.items()] + [("prompt tokens", ids.shape[1], float("nan"))]


def table(fwd, gen, args) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "# Forward and generation speed: SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32)",
        "",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} "
        f"({jax.default_backend()}), load average {load:.1f} at the end.",
        "",
        f"## Forward, jit, fp32, batch {args.batch} x seq {args.seq}, median of {args.repeats} rounds",
        "",
        "| variant | ms / forward | vs base | target |",
        "|---|---:|---:|---|",
    ]
    for name, ms, ratio in fwd:
        target = "<= 1.10x" if "unmerged" in name else "<= 1.02x" if "merged" in name else ""
        lines.append(f"| {name} | {ms:.1f} | {ratio:.3f}x | {target} |")
    lines += ["", f"## Greedy generation, {args.new} new tokens, batch 1, median of {args.gen_repeats} rounds", "",
              "| implementation | tokens / s | vs transformers |", "|---|---:|---:|"]
    for name, v, ratio in gen:
        if name == "prompt tokens":
            lines.append(f"| (prompt length: {int(v)} tokens, chat-templated) | | |")
        else:
            lines.append(f"| {name} | {v:.1f} | {ratio:.2f}x |")
    lines += ["", "Target: lora_jax >= 1.5x transformers.", ""]
    return "\n".join(lines)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--gen-repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    path = default_model_path()
    model, params, _ = from_pretrained(path)
    fwd = forward_rows(model, params, args.batch, args.seq, args.repeats)
    gen = generation_rows(path, model, params, args.new, args.gen_repeats)
    md = table(fwd, gen, args)
    print(md)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    return md


if __name__ == "__main__":
    main()
