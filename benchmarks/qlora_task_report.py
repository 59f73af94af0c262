"""The default task trained as LoRA / QLoRA with AdamW / 8-bit AdamW: loss curves in one PNG, a table.

    lora-jax train recipes/smollm2_default.yaml logging_steps=1 output_dir=runs/lora_adamw
    lora-jax train recipes/smollm2_default.yaml logging_steps=1 model.quantize=nf4 output_dir=runs/qlora_adamw
    lora-jax train recipes/smollm2_default.yaml logging_steps=1 optim.name=adamw_8bit output_dir=runs/lora_adamw8bit
    lora-jax train recipes/smollm2_default.yaml logging_steps=1 model.quantize=nf4 optim.name=adamw_8bit \\
        output_dir=runs/qlora_adamw8bit
    .venv/bin/python benchmarks/qlora_task_report.py runs/lora_adamw runs/qlora_adamw [...]
        # -> benchmarks/results/qlora_task.md, benchmarks/results/qlora_loss.png

Every finished run (results.json present) is compared with each other run whose recipe differs
only in `model.quantize` or only in `optim.name`: final eval loss (relative), SQL execution
accuracy (points), final train loss. Acceptance (issue 11): QLoRA's final eval loss within 10% of
LoRA's (checked as: at most 10% above it) and its accuracy within 3 points.
"""

from __future__ import annotations

import json
import os
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def load(run: str) -> dict:
    """A run directory -> name, recipe knobs, train/eval history, results (None while it runs)."""
    recipe = yaml.safe_load(open(os.path.join(run, "recipe.yaml")))
    train, evals = [], []
    with open(os.path.join(run, "metrics.jsonl")) as fh:
        for line in fh:
            r = json.loads(line)
            (train if "loss" in r else evals).append(r)
    res_path = os.path.join(run, "results.json")
    res = json.load(open(res_path)) if os.path.isfile(res_path) else None
    if res is not None:  # the eval losses before and after training live in results.json only
        evals = [{"step": 0, "eval_loss": res["before"]["eval_loss"]}] + evals
        evals.append({"step": res["steps"], "eval_loss": res["after"]["eval_loss"]})
    return {"name": os.path.basename(os.path.normpath(run)), "quantize": recipe["model"]["quantize"],
            "optim": recipe["optim"]["name"], "n_metric": recipe["data"]["metric_examples"],
            "train": train, "evals": evals, "res": res}


def plot(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        line = ax_t.plot([h["step"] for h in r["train"]], [h["loss"] for h in r["train"]], label=r["name"], lw=1)[0]
        ax_e.plot([h["step"] for h in r["evals"]], [h["eval_loss"] for h in r["evals"]], "o-", color=line.get_color(),
                  label=r["name"])
    ax_t.set_title("train loss (every step)")
    ax_e.set_title("eval loss (64 held-out examples)")
    for ax in (ax_t, ax_e):
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("SmolLM2-135M SQL task (recipes/smollm2_default.yaml): " + ", ".join(r["name"] for r in runs))
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    os.replace(path + ".tmp.png", path)


def main(paths: list[str]) -> None:
    runs = [load(p) for p in paths]
    done = [r for r in runs if r["res"] is not None]
    plot(runs, os.path.join(RESULTS, "qlora_loss.png"))
    acc = lambda r, k: round(r["res"][k]["metric"] * r["n_metric"])  # noqa: E731
    rows = ["| run | model.quantize | optim.name | eval loss before | eval loss after | SQL exec accuracy before | after | "
            "final train loss | s/step (incl. compile, evals) |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        if r["res"] is None:
            rows.append(f"| {r['name']} | {r['quantize']} | {r['optim']} | not finished (step {r['train'][-1]['step'] if r['train'] else 0}) "
                        "| | | | | |")
            continue
        res = r["res"]
        rows.append(f"| {r['name']} | {r['quantize']} | {r['optim']} | {res['before']['eval_loss']:.4f} | "
                    f"{res['after']['eval_loss']:.4f} | {acc(r, 'before')}/{r['n_metric']} | {acc(r, 'after')}/{r['n_metric']} | "
                    f"{r['train'][-1]['loss']:.4f} | {res['seconds_per_step']:.1f} |")
    cmp = ["| run | vs | what differs | final eval loss | SQL accuracy | final train loss | acceptance |",
           "|---|---|---|---:|---:|---:|---|"]
    for a in done:
        for b in done:
            differs = [k for k in ("quantize", "optim") if a[k] != b[k]]
            if len(differs) != 1 or a[differs[0]] in ("none", "adamw"):  # compare the new thing against the baseline
                continue
            la, lb = a["res"]["after"]["eval_loss"], b["res"]["after"]["eval_loss"]
            pa, pb = 100 * a["res"]["after"]["metric"], 100 * b["res"]["after"]["metric"]
            ta, tb = a["train"][-1]["loss"], b["train"][-1]["loss"]
            verdict = ""
            if differs == ["quantize"]:
                loss_ok, acc_ok = la <= 1.10 * lb, abs(pa - pb) <= 3.0
                verdict = (f"eval loss at most 10% above: {'met' if loss_ok else 'NOT met'}"
                           f"{' (it is lower)' if la < lb else ''}; accuracy within 3 points: {'met' if acc_ok else 'NOT met'}")
            cmp.append(f"| {a['name']} | {b['name']} | {differs[0]} | {la:.4f} vs {lb:.4f} ({(la - lb) / lb:+.1%}) | "
                       f"{pa:.1f} vs {pb:.1f} ({pa - pb:+.1f} points) | {ta:.4f} vs {tb:.4f} ({(ta - tb) / tb:+.1%}) | {verdict} |")
    text = ("# The default task: LoRA vs QLoRA, AdamW vs 8-bit AdamW\n\n"
            "`recipes/smollm2_default.yaml` (SmolLM2-135M-Instruct, fp32 compute, LoRA r=8 all-linear, 60 steps of 8x128, "
            "seed 0) on 2 shared CPU cores; the commands are in `benchmarks/qlora_task_report.py`. SQL execution accuracy on "
            "32 held-out questions (one question = 3.1 points).\n\n"
            + "\n".join(rows) + "\n\n" + "\n".join(cmp) + "\n\n![loss curves](qlora_loss.png)\n")
    with open(os.path.join(RESULTS, "qlora_task.md.tmp"), "w") as fh:
        fh.write(text)
    os.replace(os.path.join(RESULTS, "qlora_task.md.tmp"), os.path.join(RESULTS, "qlora_task.md"))
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
