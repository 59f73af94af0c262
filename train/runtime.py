"""What the loop needs around the step: model/tokenizer resolution, the schedule, generation for
samples and the metric, and the loss plot (the output directory rules are in `train.rundir`).

Kept out of `train/loop.py` so that the loop reads top to bottom. Everything that can fail on user
input (paths, incompatible output_dir) fails here *before* the model is loaded or anything is
written.
"""

from __future__ import annotations

import math
import os

import numpy as np

from lora_jax.errors import MissingFileError, UserError


# -- model + tokenizer ----------------------------------------------------------------------------
def resolve_model_path(path: str) -> str:
    """'default' -> the embedded SmolLM2 GGUF; a Hub name (`Qwen/Qwen2.5-0.5B`) -> its local snapshot
    (`train.hub`); else the path, checked to exist.

    >>> resolve_model_path("/nonexistent/model")
    Traceback (most recent call last):
    ...
    lora_jax.errors.MissingFileError: model path '/nonexistent/model' not found; set model.path to an HF model directory, a .gguf file or 'default'
    """
    if path == "default":
        from lora_jax.models.gguf import default_model_path

        return default_model_path()
    if not os.path.exists(path):
        from .hub import looks_like_hub_name, model_snapshot

        if looks_like_hub_name(path) and not path.endswith(".gguf"):
            return model_snapshot(path)  # the Hub cache, or a download (a one-line error when out of reach)
        raise MissingFileError(f"model path {path!r} not found; set model.path to an HF model directory, a .gguf file or 'default'")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise MissingFileError(f"model directory {path!r} has no config.json; point model.path at a Hugging Face model directory")
    return os.path.abspath(path)


def check_model_files(path: str) -> None:
    """The model's config (architecture supported, named first), weight files present and whole
    (truncated .safetensors / GGUF named) — before any tokenizer is looked at."""
    from lora_jax.models.loading import check_checkpoint

    check_checkpoint(path)


def load_tokenizer(path: str):
    """The tokenizer of a GGUF file (embedded) or of an HF model directory."""
    if path.endswith(".gguf"):
        from lora_jax.models.gguf import load_tokenizer as gguf_tokenizer

        return gguf_tokenizer(path)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise MissingFileError(f"no usable tokenizer in {path!r} ({' '.join(str(e).split())[:120]}); save one with tokenizer.save_pretrained") from None


def check_positions(cfg, max_length: int, prompt_width: int, max_new_tokens: int) -> None:
    """Sequences fit the model's positions: learned ones (GPT-2) cannot extrapolate — JAX would clamp
    the lookup silently where PyTorch raises — and no prompt may exceed any model's.

    >>> from types import SimpleNamespace
    >>> check_positions(SimpleNamespace(family="gpt2", max_position_embeddings=64), 128, 0, 0)
    Traceback (most recent call last):
    ...
    lora_jax.errors.UserError: data.max_length=128 exceeds the model's 64 learned positions (n_positions); lower data.max_length
    """
    n_pos = getattr(cfg, "max_position_embeddings", None)
    if n_pos is None:
        return
    learned = getattr(cfg, "family", None) == "gpt2"
    if learned and max_length > n_pos:
        raise UserError(f"data.max_length={max_length} exceeds the model's {n_pos} learned positions (n_positions); lower data.max_length")
    if prompt_width > n_pos:
        raise UserError(f"a sample or metric prompt has {prompt_width} tokens, more than the model's {n_pos} positions; shorten it")
    if learned and prompt_width and prompt_width + max_new_tokens > n_pos:
        raise UserError(f"the longest sample or metric prompt ({prompt_width} tokens) + max_new_tokens={max_new_tokens} exceed the "
                        f"model's {n_pos} learned positions; lower max_new_tokens")


# -- schedule -------------------------------------------------------------------------------------
def make_schedule(optim, total_steps: int):
    """Warmup (linear from 0) then cosine / linear / constant, as an optax schedule: the same lr
    at every step as transformers' `get_scheduler("cosine" | "linear" | "constant_with_warmup")`
    (warmup_ratio rounds up as TrainingArguments does; a warmup longer than the run is kept as given).

    >>> from train.config import OptimSection
    >>> s = make_schedule(OptimSection(lr=1.0, warmup_steps=2, schedule="linear"), 4)
    >>> [round(float(s(i)), 2) for i in range(4)]
    [0.0, 0.5, 1.0, 0.5]
    """
    import optax

    warmup = optim.warmup_steps or math.ceil(total_steps * optim.warmup_ratio)  # as transformers' get_warmup_steps
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
                     batch_size: int = 16, stop: list[int] | None = None) -> list[str]:
    """Greedy answers (decoded, special tokens dropped) to already-encoded prompts, in batches;
    an answer ends at the first of `stop` (default: the tokenizer's EOS) or of the checkpoint's own
    EOS ids (generation_config.json's, as transformers' generate stops)."""
    from lora_jax.generation import generate

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = getattr(model.cfg, "eos_token_id", None)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    stop = list(dict.fromkeys([i for i in (list(stop) if stop else [tokenizer.eos_token_id]) + eos if i is not None]))
    width = max(len(p) for p in prompt_ids)  # one prompt width (and batch size): one compilation
    out = []
    for s in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[s:s + batch_size]
        chunk = chunk + [chunk[-1]] * (batch_size - len(chunk)) if len(prompt_ids) > batch_size else chunk
        ids, mask = left_pad(chunk, pad, width)
        full = np.asarray(generate(model, params, ids, mask, max_new_tokens=max_new_tokens,
                                   eos_token_id=stop, pad_token_id=pad))
        for row in full[: min(batch_size, len(prompt_ids) - s), ids.shape[1]:]:
            row = row.tolist()
            ends = [row.index(i) for i in stop if i in row]
            row = row[: min(ends)] if ends else row
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
