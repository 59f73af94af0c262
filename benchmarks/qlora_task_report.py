"""The default task trained as LoRA and as QLoRA: both loss curves in one PNG and a results table.

    lora-jax train recipes/smollm2_default.yaml logging_steps=1 output_dir=runs/lora
    lora-jax train recipes/smollm2_default.yaml logging_steps=1 model.quantize=nf4 output_dir=runs/qlora
    lora-jax train recipes/smollm2_default.yaml logging_steps=1 model.quantize=nf4 optim.name=adamw_8bit output_dir=runs/qlora8
    .venv/bin/python benchmarks/qlora_task_report.py runs/lora runs/qlora [runs/qlora8]
        # -> benchmarks/results/qlora_task.md, benchmarks/results/qlora_loss.png
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def history(run: str) -> tuple[list, list]:
    train, evals = [], []
    with open(os.path.join(run, "metrics.jsonl")) as fh:
        for line in fh:
            r = json.loads(line)
            (train if "loss" in r else evals).append(r)
    return train, evals


def main(runs: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    rows = ["| run | eval loss before | eval loss after | SQL exec accuracy before | after | s/step |", "|---|---:|---:|---:|---:|---:|"]
    for run in runs:
        name = os.path.basename(os.path.normpath(run))
        train, _ = history(run)
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label=name)
        res_path = os.path.join(run, "results.json")
        if os.path.isfile(res_path):
            res = json.load(open(res_path))
            fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
            rows.append(f"| {name} | {fmt(res['before']['eval_loss'])} | {fmt(res['after']['eval_loss'])} | "
                        f"{fmt(res['before']['metric'])} | {fmt(res['after']['metric'])} | {res['seconds_per_step']:.1f} |")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "results", "qlora_loss.png"), dpi=100)
    with open(os.path.join(HERE, "results", "qlora_task.md"), "w") as fh:
        fh.write("# The default task, LoRA vs QLoRA\n\n" + "\n".join(rows) + "\n\n![loss](qlora_loss.png)\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
