"""Data pipeline: response-only loss, EOS, packing (segments, positions), seeded order, errors, metric."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from train import data as D
from train.metrics import exact_match, extract_sql, sql_execution_accuracy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CharTok:
    """A byte tokenizer with the HF call surface the pipeline uses (ids = bytes + 3; EOS = 2)."""

    eos_token_id, pad_token_id, chat_template = 2, 0, None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [b + 3 for b in text.encode()]}

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i - 3 for i in ids if i >= 3).decode()


def test_encode_masks_prompt_and_appends_eos():
    ids, mask = D.encode(CharTok(), "seeds", "hi", "yo")
    prompt = D.prompt_text("seeds", "hi")
    assert prompt == "<human>: hi\n<assistant>:"
    assert CharTok().decode(ids) == prompt + " yo" and ids[-1] == 2
    assert mask == [0] * len(prompt) + [1] * 4  # " yo" + EOS
    fmt_ids, _ = D.encode(CharTok(), "Q: {prompt}\nA:", "hi", "yo")
    assert CharTok().decode(fmt_ids) == "Q: hi\nA: yo"


def test_format_string_with_response_field_renders_as_written():
    """'Q: {prompt}\\nA: {response}\\n' trains exactly that text (+ EOS), the loss from the space before the answer;
    the seeds template written out as a format string gives the same tokens as 'seeds'."""
    ids, mask = D.encode(CharTok(), "Q: {prompt}\nA: {response}\n", "hi", "yo")
    assert CharTok().decode(ids) == "Q: hi\nA: yo\n" and ids[-1] == 2
    assert mask == [0] * len("Q: hi\nA:") + [1] * len(" yo\n") + [1]
    assert D.encode_prompt(CharTok(), "Q: {prompt}\nA: {response}\n", "hi") == ids[: len("Q: hi\nA:")]
    assert D.encode(CharTok(), "<human>: {prompt}\n<assistant>: {response}", "hi", "yo") == D.encode(CharTok(), "seeds", "hi", "yo")
    from train.config import load_recipe

    for bad in ("Q: {prompt} {x}", "{response} {prompt}", "Q: {prompt", "Q: {prompt} {response:>9}"):
        with pytest.raises(ValueError, match="data.template"):
            load_recipe(None, [f"data.template={bad}"])


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("eos", ["<eos>", "<|im_end|>"])
def test_chat_template_trains_the_templates_end_of_turn_as_trl_does(eos):
    """TRL's prompt-completion split: the loss covers what the template renders after the prompt
    (the answer and `<|im_end|>\\n`); EOS is added only when the turn does not end with it, and
    generation stops at the end-of-turn token too."""
    from train.testing import tiny_tokenizer

    tok = tiny_tokenizer(vocab_size=300)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "eos_token": eos})
    tok.chat_template = CHATML
    ids, mask = D.encode(tok, "chat", "How many?", "SELECT 1;")
    split = mask.index(1)
    assert tok.decode(ids[:split]) == "<|im_start|>user\nHow many?<|im_end|>\n<|im_start|>assistant\n"
    assert ids[:split] == D.encode_prompt(tok, "chat", "How many?")  # the prompt generation sees
    want = "SELECT 1;<|im_end|>\n" + ("<eos>" if eos == "<eos>" else "")
    assert tok.decode(ids[split:]) == want and all(mask[split:])
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert D.stop_ids(tok, "chat") == list(dict.fromkeys([tok.eos_token_id, im_end]))


def test_pack_segments_positions_targets():
    exs = [([10, 11, 12], [0, 1, 1]), ([20, 21], [0, 1]), ([30, 31, 32, 33], [0, 0, 1, 1])]
    rows = D.pack(exs, 6, packing=True, seed=None)
    assert rows["input_ids"].tolist() == [[10, 11, 12, 20, 21, 0], [30, 31, 32, 33, 0, 0]]
    assert rows["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]]
    assert rows["positions"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]]
    # the loss at t predicts t+1 inside the same example; never across examples or into padding
    assert rows["targets"].tolist() == [[11, 12, 0, 21, 0, 0], [31, 32, 33, 0, 0, 0]]
    assert rows["loss_mask"].tolist() == [[1, 1, 0, 1, 0, 0], [0, 1, 1, 0, 0, 0]]
    unpacked = D.pack(exs, 6, packing=False, seed=None)
    assert unpacked["input_ids"].shape == (3, 6) and unpacked["segment_ids"].max() == 1


def test_pack_is_seeded():
    exs = [([i, i + 1], [0, 1]) for i in range(3, 60, 2)]
    a, b, c = (D.pack(exs, 8, seed=s) for s in (0, 0, 1))
    assert np.array_equal(a["input_ids"], b["input_ids"]) and not np.array_equal(a["input_ids"], c["input_ids"])
    assert sorted(a["input_ids"][a["segment_ids"] > 0].tolist()) == sorted(sum((e[0] for e in exs), []))


def test_batches_resume_from_position():
    rows = {"input_ids": np.arange(7)[:, None]}
    full = D.Batches(rows, 3, seed=5)
    seq = [full.next()["input_ids"].ravel().tolist() for _ in range(6)]
    part = D.Batches(rows, 3, seed=5)
    for _ in range(2):
        part.next()
    resumed = D.Batches(rows, 3, seed=5, **part.position)
    assert [resumed.next()["input_ids"].ravel().tolist() for _ in range(4)] == seq[2:]
    assert all(sorted(sum(seq, [])[i * 7:(i + 1) * 7]) == list(range(7)) for i in range(2))  # each epoch: every row once


def test_eval_batches_pad_to_static_shape():
    bs = D.eval_batches({"loss_mask": np.ones((5, 4)), "segment_ids": np.ones((5, 4), np.int32)}, 2)
    assert [b["loss_mask"].shape for b in bs] == [(2, 4)] * 3 and bs[-1]["loss_mask"][1].sum() == 0


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_load_rows_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        D.load_rows(str(tmp_path / "nope.jsonl"))
    f = _jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(ValueError, match="no column 'prompt' .*question, answer.*; set data.prompt_column=question$"):
        D.load_rows(f, columns=["prompt", "response"])
    trl = _jsonl(tmp_path / "trl.jsonl", [{"prompt": "a", "completion": "b"}])  # TRL's prompt-completion columns
    with pytest.raises(ValueError, match="no column 'response' .*; set data.response_column=completion$"):
        D.load_rows(trl, columns=["prompt", "response"])
    chat = _jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "a"}]}])
    with pytest.raises(ValueError, match="conversational rows .* are not read"):
        D.load_rows(chat, columns=["prompt", "response"])
    (tmp_path / "empty.csv").write_text("prompt,response\n")
    with pytest.raises(ValueError, match="is empty"):
        D.load_rows(str(tmp_path / "empty.csv"), columns=["prompt", "response"])
    with pytest.raises(ValueError, match="has only the split 'train'"):
        D.load_rows(f, split="test")
    with pytest.raises(ValueError, match="data.name='plain' names a configuration of a Hub dataset"):
        D.load_rows(f, name="plain")  # was ignored silently
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,response\nhi,yo\n")
    assert D.load_rows(str(csv), columns=["prompt"]) == [{"prompt": "hi", "response": "yo"}]


def test_malformed_jsonl_names_the_parse_error_and_prints_nothing_else(tmp_path, capfd):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl.*JSON parse error"):
        D.load_rows(str(bad), columns=["prompt", "response"])
    assert capfd.readouterr().err == ""  # datasets' own ERROR log line is not shown beside ours


def test_hub_dataset_out_of_reach_is_one_fast_line(monkeypatch):
    """No network: no ~25 s of huggingface_hub retries, one line naming the cause and the fix."""
    import time

    from train import hub

    monkeypatch.setattr(hub, "reachable", lambda: False)
    t = time.time()
    with pytest.raises(FileNotFoundError, match="'nobody/nothing' is not a local file .* the Hub cannot be reached"):
        D.load_rows("nobody/nothing", columns=["prompt", "response"])
    assert time.time() - t < 10


def test_every_example_too_long():
    rows = [{"p": "x" * 50, "r": "y"}]
    with pytest.raises(ValueError, match="every training example is longer than data.max_length=16"):
        D.encode_all(rows, CharTok(), "seeds", "p", "r", 16)
    exs, dropped = D.encode_all(rows + [{"p": "", "r": ""}], CharTok(), "Q{prompt}", "p", "r", 16)
    assert (len(exs), dropped) == (1, 1)


def test_split_eval_seeded():
    rows = [{"i": i} for i in range(20)]
    tr, ev = D.split_eval(rows, 0.25, seed=3)
    assert len(ev) == 5 and len(tr) == 15 and D.split_eval(rows, 0.25, seed=3) == (tr, ev)


def test_sql_metric_on_shipped_db():
    db = os.path.join(ROOT, "data", "sql", "schema.sql")
    rows = [json.loads(line) for line in open(os.path.join(ROOT, "data", "sql", "eval.jsonl"))][:40]
    refs = [r["response"] for r in rows]
    assert sql_execution_accuracy(refs, refs, db) == 1.0
    assert sql_execution_accuracy(["SELECT name FROM employees;"] * 40, refs, db) == 0.0
    assert extract_sql("```sql\nSELECT 1;\n```") == "SELECT 1;" and exact_match(["a"], ["a "]) == 1.0


def test_shipped_dataset_is_reproducible():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_dataset.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    size = sum(os.path.getsize(os.path.join(ROOT, "data", "sql", f)) for f in os.listdir(os.path.join(ROOT, "data", "sql")))
    assert size < 2_000_000


def test_packed_rows_compute_what_single_examples_do():
    """Segment-aware attention + restarting positions: a packed row's loss = the examples' alone."""
    import jax
    import jax.numpy as jnp

    from lora_jax.models import ModelConfig, build_model
    from lora_jax.training import default_model_inputs, masked_ce_sum

    model = build_model(ModelConfig("llama", 64, 16, 32, 2, 4, 2, 4))
    exs = [([5, 6, 7, 8], [0, 1, 1, 1]), ([9, 10, 11], [0, 0, 1]), ([12, 13, 14, 15, 16], [0, 1, 1, 1, 1])]
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]

    def loss(rows):
        batch = {k: jnp.asarray(v) for k, v in rows.items()}
        logits, _ = model.apply({"params": params}, **default_model_inputs(batch))
        s, n = masked_ce_sum(logits, batch)
        return float(s), float(n)

    packed = loss(D.pack(exs, 12, packing=True, seed=None))
    single = loss(D.pack(exs, 12, packing=False, seed=None))
    assert packed[1] == single[1] == 8
    np.testing.assert_allclose(packed[0], single[0], rtol=1e-5)
