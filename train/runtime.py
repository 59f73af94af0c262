"""What the loop needs around the step: model/tokenizer resolution, the output directory rules,
the schedule, generation for samples and the metric, the loss plot and atomic writes.

Kept out of `train/loop.py` so that the loop reads top to bottom. Everything that can fail on user
input (paths, incompatible output_dir) fails here *before* the model is loaded or anything is
written.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np

from train.config import Recipe

RUN_FILE = "run.json"


# -- model + tokenizer ----------------------------------------------------------------------------
def resolve_model_path(path: str) -> str:
    """'default' -> the embedded SmolLM2 GGUF; else the path, checked to exist.

    >>> resolve_model_path("/nonexistent/model")
    Traceback (most recent call last):
    FileNotFoundError: model path '/nonexistent/model' not found; set model.path to an HF model directory, a .gguf file or 'default'
    """
    if path == "default":
        from lora_jax.models.gguf import default_model_path

        return default_model_path()
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} not found; set model.path to an HF model directory, a .gguf file or 'default'")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model directory {path!r} has no config.json; point model.path at a Hugging Face model directory")
    return os.path.abspath(path)


def load_tokenizer(path: str):
    """The tokenizer of a GGUF file (embedded) or of an HF model directory."""
    if path.endswith(".gguf"):
        from lora_jax.models.gguf import load_tokenizer as gguf_tokenizer

        return gguf_tokenizer(path)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"no usable tokenizer in {path!r} ({' '.join(str(e).split())[:120]}); save one with tokenizer.save_pretrained") from None


# -- output directory -----------------------------------------------------------------------------
def run_identity(recipe: Recipe, model_path: str) -> dict:
    """What must match for a run in output_dir to be continued: the model and the LoRA config."""
    lora = recipe.to_lora_config().to_peft_dict()
    return {"model": model_path, "lora": json.loads(json.dumps(lora))}


def prepare_output_dir(recipe: Recipe, model_path: str, resume: bool, overwrite: bool) -> bool:
    """Check output_dir against this run; returns whether there is a checkpoint to resume from.

    Nothing is created here (that happens once the inputs are known to be good). An existing run
    needs `--resume` (same model + LoRA config) or `--overwrite`.
    """
    out = recipe.output_dir
    if overwrite and resume:
        raise ValueError("--resume and --overwrite contradict each other; pick one")
    if not os.path.exists(out):
        return False
    if not os.path.isdir(out):
        raise NotADirectoryError(f"output_dir {out!r} is a file; choose a directory")
    entries = os.listdir(out)
    if not entries or overwrite:
        return False
    run_file = os.path.join(out, RUN_FILE)
    if not os.path.isfile(run_file):
        raise FileExistsError(f"output_dir {out!r} is not empty and holds no lora-jax run; choose another output_dir or pass --overwrite")
    with open(run_file) as fh:
        old = json.load(fh)
    new = run_identity(recipe, model_path)
    for key in ("model", "lora"):
        if old.get(key) != new[key]:
            what = "another model" if key == "model" else "another LoRA config"
            raise FileExistsError(f"output_dir {out!r} holds a run of {what} ({key}: {_short(old.get(key))}); use another output_dir or --overwrite")
    if not resume:
        raise FileExistsError(f"output_dir {out!r} already holds this run; pass --resume to continue it or --overwrite to start over")
    return os.path.isdir(os.path.join(out, "checkpoints"))


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) < 80 else s[:77] + "..."


def create_output_dir(recipe: Recipe, model_path: str, overwrite: bool, recipe_yaml: str) -> None:
    out = recipe.output_dir
    if overwrite and os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    write_atomic(os.path.join(out, RUN_FILE), json.dumps(run_identity(recipe, model_path), indent=2))
    write_atomic(os.path.join(out, "recipe.yaml"), recipe_yaml)


def write_atomic(path: str, text: str) -> None:
    """Write via a temporary file and rename: readers never see half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


# -- schedule -------------------------------------------------------------------------------------
def make_schedule(optim, total_steps: int):
    """Warmup (linear from 0) then cosine / linear / constant, as an optax schedule.

    >>> from train.config import OptimSection
    >>> s = make_schedule(OptimSection(lr=1.0, warmup_steps=2, schedule="linear"), 4)
    >>> [round(float(s(i)), 2) for i in range(4)]
    [0.0, 0.5, 1.0, 0.5]
    """
    import optax

    warmup = optim.warmup_steps or int(round(optim.warmup_ratio * total_steps))
    warmup = min(warmup, max(total_steps - 1, 0))
    decay = max(total_steps - warmup, 1)
    end = optim.lr * optim.min_lr_ratio
    if optim.schedule == "cosine":
        after = optax.cosine_decay_schedule(optim.lr, decay, alpha=optim.min_lr_ratio)
    elif optim.schedule == "linear":
        after = optax.linear_schedule(optim.lr, end, decay)
    else:
        after = optax.constant_schedule(optim.lr)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), after], [warmup])


# -- generation -----------------------------------------------------------------------------------
def left_pad(seqs: list[list[int]], pad_id: int, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids [B, P], mask [B, P]) with every prompt right-aligned (what `generate` expects).

    >>> left_pad([[1, 2], [3]], 0)[0].tolist()
    [[1, 2], [0, 3]]
    """
    n = width or max(len(s) for s in seqs)
    ids = np.full((len(seqs), n), pad_id, np.int32)
    mask = np.zeros((len(seqs), n), np.int32)
    for i, s in enumerate(seqs):
        ids[i, n - len(s):] = s
        mask[i, n - len(s):] = 1
    return ids, mask


def generate_answers(model, params, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int,
                     batch_size: int = 16) -> list[str]:
    """Greedy answers (decoded, special tokens dropped) to already-encoded prompts, in batches."""
    from lora_jax.generation import generate

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(p) for p in prompt_ids)  # one prompt width (and batch size): one compilation
    out = []
    for s in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[s:s + batch_size]
        chunk = chunk + [chunk[-1]] * (batch_size - len(chunk)) if len(prompt_ids) > batch_size else chunk
        ids, mask = left_pad(chunk, pad, width)
        full = np.asarray(generate(model, params, ids, mask, max_new_tokens=max_new_tokens,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=pad))
        for row in full[: min(batch_size, len(prompt_ids) - s), ids.shape[1]:]:
            row = row.tolist()
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return out


# -- end-of-run files -----------------------------------------------------------------------------
def plot_losses(history: list[dict], path: str) -> None:
    """Train loss per logged step and eval loss as points, to a PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    tr = [(h["step"], h["loss"]) for h in history if "loss" in h]
    ev = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if tr:
        ax.plot(*zip(*tr), label="train loss")
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (response tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def read_history(path: str, up_to_step: int) -> list[dict]:
    """metrics.jsonl entries up to `up_to_step` (a resumed run drops what it will redo)."""
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as fh:
        for line in fh:
            try:
                h = json.loads(line)
            except json.JSONDecodeError:  # a line cut by kill -9
                continue
            if h.get("step", 0) <= up_to_step:
                out.append(h)
    return out
