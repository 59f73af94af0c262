"""Two adapters trained together on one SmolLM2 base, then served together in one mixed batch.

    python examples/multi_adapter.py                  # ~60 steps on CPU; --steps N for more
    python examples/multi_adapter.py --steps 200 --eval 40

Tasks (both shipped): data/sql (question -> SQL over data/sql/schema.sql) and data/domain (email
address -> its domain). Each optimizer step sees one mixed batch — half SQL rows with adapter "sql",
half domain rows with adapter "domain" — and `lora_jax.adapters.per_example.make_multi_train_step`
updates both adapters in one compiled step (each row's gradient reaches only its own adapter).
Serving decodes SQL and domain questions in ONE batch, each row with its adapter (one extra row uses
"__base__", the plain model), then prints each adapter's exact-match score on held-out examples.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from lora_jax.adapters import per_example as pe
from lora_jax.models.gguf import default_model_path, load_tokenizer

DATA = pathlib.Path(__file__).resolve().parents[1] / "data"
TASKS = ("sql", "domain")


def read(task: str, split: str) -> list[dict]:
    with open(DATA / task / f"{split}.jsonl") as f:
        return [json.loads(line) for line in f]


def encode(tok, prompt: str, response: str | None, seq: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids [seq], labels [seq] with -100 on the prompt and padding, prompt length)."""
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    else:  # a tokenizer without a chat template (the tiny test model): the train program's plain format
        text = f"<human>: {prompt}\n<assistant>:"
    p = tok(text, add_special_tokens=False)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"] + [_stop(tok)] if response is not None else []
    ids = (p + r)[:seq]
    out = np.full(seq, tok.pad_token_id or 0, np.int32)
    labels = np.full(seq, -100, np.int32)
    out[: len(ids)] = ids
    labels[len(p): len(ids)] = ids[len(p):]
    return out, labels, min(len(p), seq)


def _stop(tok) -> int:
    return tok.convert_tokens_to_ids("<|im_end|>") if getattr(tok, "chat_template", None) else tok.eos_token_id


def greedy(forward, frozen, bank, ids: np.ndarray, lengths: np.ndarray, adapter_ids, max_new: int, stop: int) -> list[list[int]]:
    """Greedy decoding of right-padded rows (full recompute each step, one compiled shape)."""
    ids, lengths = ids.copy(), lengths.copy()
    done = np.zeros(len(ids), bool)
    out: list[list[int]] = [[] for _ in ids]
    for _ in range(max_new):
        logits = np.asarray(forward(frozen, bank, ids, adapter_ids))
        nxt = logits[np.arange(len(ids)), lengths - 1].argmax(-1)
        for b, t in enumerate(nxt):
            if done[b] or lengths[b] >= ids.shape[1]:
                done[b] = True
                continue
            if t == stop:
                done[b] = True
                continue
            out[b].append(int(t))
            ids[b, lengths[b]] = t
            lengths[b] += 1
        if done.all():
            break
    return out


def main(steps: int = 60, batch: int = 8, seq: int = 96, lr: float = 1e-3, n_eval: int = 16, seed: int = 0,
         model_path: str | None = None) -> dict:
    """Train, serve, print; returns {"scores": {task: exact match}, "losses": last per-adapter losses}.
    model_path: an HF model directory instead of the shipped SmolLM2 GGUF (the smoke test uses a tiny one)."""
    path = model_path or default_model_path()
    model, frozen, _ = lora_jax.from_pretrained(path, scan_layers=True)
    if model_path is None:
        tok = load_tokenizer(path)
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_path)
    cfg = lora_jax.LoraConfig(r=8, alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    model = model.clone(lora=cfg)
    trees = [lora_jax.split(lora_jax.inject(frozen, cfg, jax.random.key(seed + i)))[0] for i in range(len(TASKS))]
    train = {t: [encode(tok, r["prompt"], r["response"], seq) for r in read(t, "train")] for t in TASKS}

    step = pe.make_multi_train_step(model, optax.adamw(lr), max_grad_norm=1.0)
    state = step.init(pe.stack_adapters(trees))
    rng = np.random.default_rng(seed)
    half = batch // 2
    start = time.perf_counter()
    for i in range(steps):
        rows = [train[t][j] for t in TASKS for j in rng.choice(len(train[t]), half, replace=False)]
        b = {"input_ids": np.stack([r[0] for r in rows]), "labels": np.stack([r[1] for r in rows]),
             "adapter_ids": np.repeat(np.arange(len(TASKS), dtype=np.int32), half)}
        state, metrics = step(state, frozen, b)
        if i == 0 or (i + 1) % 10 == 0 or i + 1 == steps:
            losses = np.asarray(metrics["loss"])
            print(f"step {i + 1:4d}  " + "  ".join(f"{t} loss {l:.3f}" for t, l in zip(TASKS, losses)), flush=True)
    print(f"trained both adapters in {time.perf_counter() - start:.0f} s ({steps} steps, one compiled step)")

    # ---- serve: one mixed batch, each row with its adapter (+ one "__base__" row)
    evals = {t: read(t, "eval")[:n_eval] for t in TASKS}
    rows = [(t, r) for t in TASKS for r in evals[t]] + [("__base__", evals["sql"][0])]
    enc = [encode(tok, r["prompt"], None, seq) for _, r in rows]
    ids = np.stack([e[0] for e in enc])
    lengths = np.array([e[2] for e in enc])
    aids = pe.adapter_ids([t for t, _ in rows], list(TASKS))
    stop = _stop(tok)
    answers = greedy(pe.forward(model), frozen, state["bank"], ids, lengths, aids, max_new=40, stop=stop)
    scores = {}
    for t in TASKS:
        hits = [" ".join(tok.decode(a).split()) == " ".join(r["response"].split())
                for (task, r), a in zip(rows, answers) if task == t]
        scores[t] = sum(hits) / len(hits)
        print(f"adapter {t!r}: exact match {sum(hits)}/{len(hits)} = {scores[t]:.2f} on held-out {t} examples")
    print(f"'__base__' row (plain SmolLM2) answered the SQL question with: {tok.decode(answers[-1])[:80]!r}")
    return {"scores": scores, "losses": np.asarray(metrics["loss"]).tolist()}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="two adapters trained together and served in one mixed batch")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--eval", type=int, default=16)
    a = ap.parse_args()
    main(steps=a.steps, batch=a.batch, n_eval=a.eval)
