"""Data: load rows, format prompt/response, tokenize with a response-only loss, pack, batch.

Pipeline (all numpy, all deterministic from the seed):

1. `load_rows` — `datasets.load_dataset` on a local .json/.jsonl/.csv/.parquet file, a local
   dataset directory or a hub name; checks the prompt/response columns exist, rows remain, and
   every prompt and response is a string (a null or a number is an error naming the row).
2. `encode` — `prompt_text(template)` is tokenized (with the tokenizer's own BOS), the response
   follows, then EOS (under `chat`: the template's end of turn, as TRL's SFTTrainer trains it,
   plus EOS unless that is it). The loss mask is 1 only on response tokens and the EOS, so the model learns
   the answer and where to stop, never the prompt. Examples longer than `max_length` are dropped.
3. `pack` — examples are shuffled once (seed) and laid into rows of `max_length` tokens. With
   packing, several examples share a row: `segment_ids` (1, 2, …; 0 = padding) keep attention
   inside each example and `positions` restart at 0 for each one, so a packed row computes exactly
   what the examples would alone. Without packing, one example per row.
4. `Batches` — the rows in a fresh permutation per epoch (`default_rng([seed, epoch])`), taken
   `batch_size` at a time, running on into the next epoch. Its whole state is `(epoch, index)`:
   stored in every checkpoint, it makes a resumed run see exactly the batches it would have seen.

A row is the dict {input_ids, targets, loss_mask, segment_ids, positions}, each [T]; `targets[t]`
is the token at t + 1 within the same example (the loss at t predicts it) and `loss_mask[t]` says
whether that prediction counts.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterable

import numpy as np

from lora_jax.errors import MissingFileError, UserError

SEEDS_PROMPT = "<human>: {prompt}\n<assistant>:"
FIELDS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")
_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


# -- loading --------------------------------------------------------------------------------------
def load_rows(path: str, split: str = "train", name: str | None = None, columns: Iterable[str] = ()) -> list[dict]:
    """Rows of a dataset as plain dicts, with one-line errors for a missing path/column/empty set.

    >>> import tempfile, json, os
    >>> f = os.path.join(tempfile.mkdtemp(), "d.jsonl")
    >>> _ = open(f, "w").write(json.dumps({"prompt": "a", "response": "b"}) + "\\n")
    >>> load_rows(f, columns=["prompt", "response"])
    [{'prompt': 'a', 'response': 'b'}]
    """
    import datasets

    from . import hub

    datasets.disable_progress_bars()
    ext = os.path.splitext(path)[1].lower()
    if ext in _LOCAL_BUILDERS:
        if not os.path.isfile(path):
            raise MissingFileError(f"dataset file {path!r} not found; check data.path")
        if split != "train":
            raise UserError(f"a single file like {path!r} has only the split 'train', not {split!r}; use data.eval_path or data.eval_fraction for eval data")
        if name:
            raise UserError(f"data.name={name!r} names a configuration of a Hub dataset; a single file like {path!r} has none: drop data.name")
        if os.path.getsize(path) == 0:
            raise UserError(f"dataset {path!r} is empty")
    elif not os.path.isdir(path) and (path.startswith((".", "/", "~")) or os.sep in path and not hub.looks_like_hub_name(path)):
        raise MissingFileError(f"dataset {path!r} not found; check data.path")
    cut_off = ext not in _LOCAL_BUILDERS and not os.path.isdir(path) and not hub.reachable()
    try:
        with hub.quiet(), hub.offline() if cut_off else contextlib.nullcontext():
            if ext in _LOCAL_BUILDERS:
                ds = datasets.load_dataset(_LOCAL_BUILDERS[ext], data_files=path, split="train")
            else:  # a local dataset directory or a hub name (from the cache when the Hub is out of reach)
                ds = datasets.load_dataset(path, name, split=split)
    except Exception as e:  # datasets raises many types (DatasetNotFoundError, ConnectionError, ...)
        if isinstance(e, ValueError) and "no data" in str(e):  # e.g. a CSV with a header only
            raise UserError(f"dataset {path!r} (split {split!r}) is empty") from None
        if cut_off:
            raise MissingFileError(f"dataset {path!r} is not a local file or directory nor in the Hugging Face cache, and the "
                                   "Hub cannot be reached (no network?); point data.path at a local .jsonl/.csv/.parquet file") from None
        while e.__cause__ is not None:  # the root cause: a parse error names the file's problem, the wrapper does not
            e = e.__cause__
        msg = " ".join(str(e).split())[:200]
        raise MissingFileError(f"could not load dataset {path!r} (split {split!r}): {type(e).__name__}: {msg}") from None
    if hasattr(ds, "keys") and not hasattr(ds, "column_names"):  # a DatasetDict
        raise UserError(f"dataset {path!r} has splits {sorted(ds)}; set data.split")
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise UserError(f"dataset {path!r} has no column {missing[0]!r} (columns: {', '.join(ds.column_names)}); "
                        + _column_fix(list(columns), missing[0], ds.column_names))
    if len(ds) == 0:
        raise UserError(f"dataset {path!r} (split {split!r}) is empty")
    rows = [dict(r) for r in ds]
    check_text(rows, columns, path if ext in _LOCAL_BUILDERS else f"{path} (split {split})")
    return rows


_LIKELY = (("prompt", "instruction", "question", "input", "query"), ("completion", "response", "output", "answer"))


def _column_fix(columns: list[str], missing: str, present: list[str]) -> str:
    """What to set: the likely column (TRL's prompt/completion, Alpaca's instruction/output, ...), else both names.

    >>> _column_fix(["prompt", "response"], "response", ["prompt", "completion"])
    'set data.response_column=completion'
    """
    if "messages" in present or "conversations" in present:
        return "conversational rows (a list of messages) are not read: give one prompt and one response column"
    which = columns.index(missing) if missing in columns and len(columns) == 2 else None
    if which is not None:
        key = ("data.prompt_column", "data.response_column")[which]
        found = [c for c in _LIKELY[which] if c in present and c not in columns]
        if found:
            return f"set {key}={found[0]}"
    return "set data.prompt_column / data.response_column"


def check_text(rows: list[dict], columns: Iterable[str], where: str) -> None:
    """Every row's `columns` hold strings; else a one-line error naming the row (1 = the first).

    >>> check_text([{"prompt": "a", "response": "b"}, {"prompt": None, "response": "c"}], ["prompt", "response"], "d.jsonl")
    Traceback (most recent call last):
    ...
    lora_jax.errors.UserError: d.jsonl row 2: 'prompt' is null, not text; fix or drop that row
    """
    for i, row in enumerate(rows, start=1):
        for c in columns:
            v = row.get(c)
            if not isinstance(v, str):
                what = "missing" if c not in row else "null" if v is None else f"{type(v).__name__} {_clip(v)}"
                raise UserError(f"{where} row {i}: {c!r} is {what}, not text; fix or drop that row")


def _clip(v) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def split_eval(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval): a seeded random `fraction` of the rows held out (at least one each).

    >>> tr, ev = split_eval([{"i": i} for i in range(10)], 0.2, 0)
    >>> len(tr), len(ev)
    (8, 2)
    """
    if fraction <= 0:
        return rows, []
    order = np.random.default_rng([seed, 7]).permutation(len(rows))
    n_eval = min(max(1, int(round(fraction * len(rows)))), len(rows) - 1)
    if n_eval < 1:
        raise UserError(f"data.eval_fraction={fraction} leaves no training rows out of {len(rows)}")
    held = set(order[:n_eval].tolist())
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


# -- formatting and tokenizing --------------------------------------------------------------------
def prompt_text(template: str, prompt: str, tokenizer: Any = None) -> str:
    """The text the model sees before its answer.

    >>> prompt_text("seeds", "2+2?")
    '<human>: 2+2?\\n<assistant>:'
    >>> prompt_text("Q: {prompt}\\nA:", "2+2?"), prompt_text("Q: {prompt}\\nA: {response}", "2+2?")
    ('Q: 2+2?\\nA:', 'Q: 2+2?\\nA:')
    """
    if template == "seeds":
        return SEEDS_PROMPT.format(prompt=prompt)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise UserError("data.template=chat but the tokenizer has no chat template; use template=seeds or a format string")
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    head, tail = _around_response(template)
    text = head.format(prompt=prompt)
    return text.rstrip() if tail is not None else text


def _around_response(template: str) -> tuple[str, str | None]:
    """(the format string before `{response}`, the text after it) — (template, None) without one."""
    i = template.find("{response}")
    return (template, None) if i < 0 else (template[:i], template[i + len("{response}"):].replace("{{", "{").replace("}}", "}"))


def response_text(template: str, response: str, tokenizer: Any = None, prompt: str | None = None) -> str:
    """The answer as appended after `prompt_text`: seeds/format strings after one space; `chat`
    as TRL's SFTTrainer takes a prompt-completion pair: what the chat template renders after
    the prompt, i.e. the response and the template's own end of turn (`A<|im_end|>\\n`).
    """
    if template != "chat":
        head, tail = _around_response("seeds" if template == "seeds" else template)
        if tail is None:  # no {response}: after one space
            return " " + response.lstrip()
        lead = head.format(prompt="")  # the whitespace `prompt_text` moved out of the prompt goes before the answer
        return lead[len(lead.rstrip()):] + response + tail
    head = prompt_text(template, prompt, tokenizer)
    full = tokenizer.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                                         tokenize=False)
    if not full.startswith(head):
        raise UserError("data.template=chat: the tokenizer's chat template renders the prompt differently when an answer "
                        "follows it, so the answer cannot be split off; use data.template=seeds or a format string")
    return full[len(head):]


def stop_ids(tokenizer: Any, template: str) -> list[int]:
    """Token ids that end a generated answer: EOS, and under `chat` the template's end-of-turn
    token when it is another special token (`<|im_end|>` of a base model whose EOS is `<|endoftext|>`)."""
    ids = [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else []
    if template == "chat":
        tail = response_text(template, "x", tokenizer, "x")[1:]
        first = tokenizer(tail, add_special_tokens=False)["input_ids"][:1] if tail else []
        ids += [int(i) for i in first if i in set(tokenizer.all_special_ids) and i not in ids]
    return ids


def encode_prompt(tokenizer: Any, template: str, prompt: str) -> list[int]:
    """Token ids of the prompt part, as used both for training and for generation."""
    text = prompt_text(template, prompt, tokenizer)
    return list(tokenizer(text, add_special_tokens=template != "chat")["input_ids"])


def encode(tokenizer: Any, template: str, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(token ids, loss mask per token): prompt tokens 0, response tokens and the EOS 1.

    Under `chat` the answer ends as the template ends a turn (TRL's completion); EOS is appended
    only when that end is not already the EOS token, so the model always learns to stop.
    """
    p = encode_prompt(tokenizer, template, prompt)
    r = list(tokenizer(response_text(template, response, tokenizer, prompt), add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer defines no EOS token; the model could not learn to stop")
    if template != "chat" or int(tokenizer.eos_token_id) not in r:
        r.append(int(tokenizer.eos_token_id))
    return p + r, [0] * len(p) + [1] * len(r)


def encode_all(rows: list[dict], tokenizer: Any, template: str, prompt_col: str, response_col: str,
               max_length: int, what: str = "training") -> tuple[list[tuple[list[int], list[int]]], int]:
    """Encode every row; drop the ones longer than max_length. Returns (examples, n_dropped)."""
    out, lengths = [], []
    for row in rows:
        ids, mask = encode(tokenizer, template, row[prompt_col], row[response_col])
        lengths.append(len(ids))
        if len(ids) <= max_length:
            out.append((ids, mask))
    if not out:
        raise UserError(f"every {what} example is longer than data.max_length={max_length} tokens (shortest: {min(lengths)}); raise data.max_length")
    return out, len(rows) - len(out)


# -- packing --------------------------------------------------------------------------------------
def pack(examples: list[tuple[list[int], list[int]]], max_length: int, packing: bool = True,
         seed: int | None = 0, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Lay examples into rows of `max_length` tokens (see the module docstring for the fields).

    `seed` shuffles the examples first (None keeps their order). Examples are appended to the
    current row while they fit, else start a new one.

    >>> rows = pack([([5, 6, 7], [0, 1, 1]), ([8, 9], [0, 1])], 6, seed=None)
    >>> rows["segment_ids"].tolist(), rows["positions"].tolist()
    ([[1, 1, 1, 2, 2, 0]], [[0, 1, 2, 0, 1, 0]])
    >>> rows["targets"].tolist(), rows["loss_mask"].tolist()
    ([[6, 7, 0, 9, 0, 0]], [[1, 1, 0, 1, 0, 0]])
    """
    order = range(len(examples)) if seed is None else np.random.default_rng([seed, 1]).permutation(len(examples))
    groups: list[list[int]] = []
    used = max_length + 1
    for i in order:
        n = len(examples[i][0])
        if not packing or used + n > max_length:
            groups.append([])
            used = 0
        groups[-1].append(int(i))
        used += n
    T = max_length
    rows = {k: np.zeros((len(groups), T), np.int32) for k in FIELDS}
    for r, group in enumerate(groups):
        t = 0
        for seg, i in enumerate(group, start=1):
            ids, mask = examples[i]
            n = len(ids)
            rows["input_ids"][r, t:t + n] = ids
            rows["targets"][r, t:t + n - 1] = ids[1:]
            rows["loss_mask"][r, t:t + n - 1] = mask[1:]  # the loss at t predicts token t + 1
            rows["segment_ids"][r, t:t + n] = seg
            rows["positions"][r, t:t + n] = np.arange(n)
            t += n
        rows["input_ids"][r, t:] = pad_id
    return rows


# -- batching -------------------------------------------------------------------------------------
class Batches:
    """Rows in a seeded per-epoch order, `batch_size` at a time; state = (epoch, index).

    >>> rows = {"input_ids": np.arange(5)[:, None]}
    >>> b = Batches(rows, batch_size=2, seed=0)
    >>> [b.next()["input_ids"].ravel().tolist() for _ in range(3)], b.position
    ([[4, 2], [1, 0], [3, 1]], {'epoch': 1, 'index': 1})
    """

    def __init__(self, rows: dict[str, np.ndarray], batch_size: int, seed: int, epoch: int = 0, index: int = 0):
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.n = len(next(iter(rows.values())))
        self.epoch, self.index = int(epoch), int(index)

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 2, epoch]).permutation(self.n)

    def next(self) -> dict[str, np.ndarray]:
        picked = []
        while len(picked) < self.batch_size:
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
            take = min(self.batch_size - len(picked), self.n - self.index)
            picked.extend(self.order(self.epoch)[self.index:self.index + take].tolist())
            self.index += take
        return {k: v[picked] for k, v in self.rows.items()}


def eval_batches(rows: dict[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
    """Rows in order, the last batch padded with all-padding rows (loss_mask 0): static shapes.

    >>> len(eval_batches({"loss_mask": np.ones((5, 3))}, 2))
    3
    """
    n = len(next(iter(rows.values())))
    out = []
    for s in range(0, n, batch_size):
        b = {k: v[s:s + batch_size] for k, v in rows.items()}
        short = batch_size - len(next(iter(b.values())))
        if short:
            b = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)]) for k, v in b.items()}
        out.append(b)
    return out


def count_tokens(batch: dict[str, np.ndarray]) -> int:
    """Non-padding tokens in a batch (for tokens/s)."""
    return int((batch["segment_ids"] > 0).sum())
