"""Tables of benchmarks/bench_train_step.py: per-setting details and the same-setting summary."""

from __future__ import annotations


def cpu_s(r: dict) -> float:
    return r.get("user_s_per_step", float("nan")) + r.get("sys_s_per_step", float("nan"))


def above(r: dict) -> float:
    return r["peak_rss_mb"] - r["rss_baseline_mb"]


def flop_ratio(r: dict) -> float:
    return r["flops"] / r["step_s"] / r["matmul"]


# (name, value(lora, full, peft), target)
RATIOS = [
    ("LoRA tokens/s / PEFT tokens/s", lambda lo, fu, pt: pt["step_s"] / lo["step_s"], "≥ 1.25×"),
    ("LoRA time / full FT time", lambda lo, fu, pt: lo["step_s"] / fu["step_s"], "≤ 0.70"),
    ("LoRA CPU time / full FT CPU time (load-independent)", lambda lo, fu, pt: cpu_s(lo) / cpu_s(fu), "≤ 0.70"),
    ("LoRA / full FT peak RSS", lambda lo, fu, pt: lo["peak_rss_mb"] / fu["peak_rss_mb"], "≤ 0.40"),
    ("LoRA / full FT peak RSS above runtime baseline", lambda lo, fu, pt: above(lo) / above(fu), "≤ 0.40"),
    ("LoRA / full FT XLA memory plan", lambda lo, fu, pt: lo["xla_mb"] / fu["xla_mb"], "≤ 0.40"),
    ("LoRA achieved FLOP/s / matmul rate", lambda lo, fu, pt: flop_ratio(lo), "≥ 0.8"),
]


def summary(out: dict, remats: list[str], pt: dict) -> list[str]:
    """One row per remat setting (the same on both JAX sides); best = meets the time (CPU) and memory
    (XLA plan) targets with the highest LoRA tokens/s, else the one closest to them."""
    rows, score = [], {}
    for remat in remats:
        lo, fu = out[remat]["lora"], out[remat]["full"]
        t, c, m = lo["step_s"] / fu["step_s"], cpu_s(lo) / cpu_s(fu), lo["xla_mb"] / fu["xla_mb"]
        score[remat] = (not (c <= 0.70 and m <= 0.40), max(c / 0.70, m / 0.40) if c > 0.70 or m > 0.40 else 0, lo["step_s"])
        rows.append((remat, lo, fu, t, c, m))
    best = min(score, key=score.get)
    lines = ["## Summary: LoRA vs full fine-tuning, same remat setting on both sides", "",
             "| remat | LoRA s | full FT s | LoRA CPU s | full FT CPU s | time ratio (≤ 0.70) | CPU ratio (≤ 0.70) | "
             "LoRA plan MB | full FT plan MB | plan ratio (≤ 0.40) | RSS-above-baseline ratio (≤ 0.40) | "
             "LoRA FLOP/s / matmul (≥ 0.8) | LoRA / PEFT tokens/s (≥ 1.25) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for remat, lo, fu, t, c, m in rows:
        mark = lambda v, ok: f"**{v:.2f}**" if ok else f"{v:.2f}"  # noqa: E731
        name = f"**{remat}** (best)" if remat == best else remat
        lines.append(f"| {name} | {lo['step_s']:.3f} | {fu['step_s']:.3f} | {cpu_s(lo):.2f} | {cpu_s(fu):.2f} | "
                     f"{mark(t, t <= 0.7)} | {mark(c, c <= 0.7)} | {lo['xla_mb']:.0f} | {fu['xla_mb']:.0f} | "
                     f"{mark(m, m <= 0.4)} | {mark(above(lo) / above(fu), above(lo) / above(fu) <= 0.4)} | "
                     f"{mark(flop_ratio(lo), flop_ratio(lo) >= 0.8)} | "
                     f"{mark(pt['step_s'] / lo['step_s'], pt['step_s'] / lo['step_s'] >= 1.25)} |")
    return lines + ["", "Bold = target met. Best setting: the one meeting the CPU-time and XLA-plan targets "
                    "together with the fastest LoRA step (else the closest to both).", ""]


def table(remat, lora, full, pt, best, args, tokens) -> list[str]:
    lines = [f"### remat = {remat} (both JAX steps; PEFT without gradient checkpointing)", "",
             "| step | time (s) | CPU s (user+sys) | tokens/s | achieved GFLOP/s | matmul GFLOP/s (same process) | / matmul rate "
             "| peak RSS (MB) | RSS above runtime baseline (MB) | XLA plan (MB) | notes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r, note in (("jax LoRA step", lora, f"malloc={best}, compile {lora['compile_s']:.0f} s"),
                          ("jax full fine-tuning step", full, f"malloc={best}, compile {full['compile_s']:.0f} s"),
                          ("HF PEFT + PyTorch LoRA step", pt, f"torch threads={args.threads}")):
        gf = r["flops"] / r["step_s"] / 1e9
        mm = r.get("matmul", float("nan"))
        lines.append(f"| {name} | {r['step_s']:.3f} | {cpu_s(r):.2f} | {tokens / r['step_s']:.0f} | {gf:.1f} | "
                     f"{mm / 1e9:.0f} | {gf * 1e9 / mm:.2f} | {r['peak_rss_mb']:.0f} | {above(r):.0f} | "
                     f"{r.get('xla_mb', float('nan')):.0f} | {note} |")
    lines += ["", "| ratio | value | target |", "|---|---:|---:|"]
    lines += [f"| {name} | {f(lora, full, pt):.2f} | {target} |" for name, f, target in RATIOS] + [""]
    return lines
