"""`lora-jax export`: PEFT adapter dir / training output -> PEFT or merged, checked with PEFT and
transformers; user errors are one line on stderr with exit status 2."""

import json
import os
import shutil

import numpy as np
import pytest
import transformers

import lora_jax
from train.cli import main as lora_jax_main
from lora_jax.interop import save_peft_adapter
from parity import assert_close, hf_logits, load_hf, our_logits, ours, peft_logits


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tmp_path_factory):
    """(base dir with a tokenizer, training-style output dir holding adapter/, our logits)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    src, _ = tiny_checkpoint("llama")
    root = tmp_path_factory.mktemp("export_cli")
    base = root / "base"
    shutil.copytree(src, base)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(96)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(base)
    lcfg = lora_jax.LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "up_proj"))
    model, _, params = ours(str(base), lcfg)
    run = root / "run"
    save_peft_adapter(params, lcfg, run / "adapter", model_config=model.cfg)
    (run / "checkpoints").mkdir()
    return str(base), str(run), our_logits(model, params)


def test_peft_from_training_output(setup, tmp_path):
    base, run, mine = setup
    assert lora_jax_main(["export", "--base", base, "--adapter", run, "--format", "peft", "--out", str(tmp_path / "p")]) == 0
    assert json.load(open(tmp_path / "p" / "adapter_config.json"))["base_model_name_or_path"] == base
    assert_close(peft_logits(base, str(tmp_path / "p")), mine)


def test_merged_bf16_with_tokenizer(setup, tmp_path):
    base, run, mine = setup
    out = tmp_path / "m"
    assert lora_jax_main(["export", "--base", base, "--adapter", os.path.join(run, "adapter"), "--format", "merged",
                          "--out", str(out), "--dtype", "bf16"]) == 0
    assert json.load(open(out / "config.json"))["dtype"] == "bfloat16"
    assert transformers.AutoTokenizer.from_pretrained(out)("w3 w5")["input_ids"] == [3, 5]
    assert_close(hf_logits(load_hf(str(out), dtype="auto").float()), mine, 0.06)  # bf16 weights (tests/test_merged_export.py)
    # fp32 + --overwrite replaces it, exact to 1e-4
    assert lora_jax_main(["export", "--base", base, "--adapter", run, "--format", "merged", "--out", str(out), "--overwrite"]) == 0
    assert_close(hf_logits(load_hf(str(out))), mine)


@pytest.mark.parametrize("args,match", [
    (["--format", "zip"], "invalid choice: 'zip'"),
    (["--format", "merged", "--dtype", "int4"], "--dtype 'int4' is not supported"),
    (["--format", "peft", "--adapter", "/nonexistent"], "adapter path /nonexistent does not exist"),
    (["--format", "peft", "--base", "/nonexistent"], "checkpoint path /nonexistent does not exist"),
    (["--format", "peft", "--out", "EXISTING"], "exists and is not empty; pass --overwrite"),
    (["--format", "peft", "--adapter", "RUN_NO_ADAPTER"], "is a training run with no adapter yet"),
])
def test_user_errors(args, match, setup, tmp_path, capsys):
    base, run, _ = setup
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "f").write_text("x")
    (tmp_path / "run2" / "checkpoints").mkdir(parents=True)
    opts = {"--base": base, "--adapter": run, "--out": str(tmp_path / "o")}
    for i in range(0, len(args), 2):
        opts[args[i]] = args[i + 1]
    subst = {"EXISTING": str(tmp_path / "existing"), "RUN_NO_ADAPTER": str(tmp_path / "run2")}
    argv = ["export"] + [x for k, v in opts.items() for x in (k, subst.get(v, v))]
    assert lora_jax_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-jax export: error: ") and match in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_from_training_checkpoint_adapters(setup, tmp_path):
    """A run that stopped before its final export: the newest checkpoints/<step>/adapter (the program
    writes one at every save), never the training state; a corrupt one is named in one line."""
    base, _, _ = setup
    lcfg = lora_jax.LoraConfig(r=2, alpha=4, target_modules=("k_proj", "o_proj"))
    model, _, params = ours(base, lcfg, scan_layers=True, seed=3)
    run = tmp_path / "run"
    save_peft_adapter(jax_zeros_like(params), lcfg, run / "checkpoints" / "1" / "adapter", model_config=model.cfg)
    save_peft_adapter(params, lcfg, run / "checkpoints" / "7" / "adapter", model_config=model.cfg)
    (run / "checkpoints" / "9").mkdir()  # a newer step without an adapter (killed mid-save): skipped
    assert lora_jax_main(["export", "--base", base, "--adapter", str(run), "--format", "peft", "--out", str(tmp_path / "p")]) == 0
    assert_close(peft_logits(base, str(tmp_path / "p")), our_logits(model, params))
    weights = run / "checkpoints" / "7" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert lora_jax_main(["export", "--base", base, "--adapter", str(run), "--format", "peft", "--out", str(tmp_path / "q")]) == 2
    assert not (tmp_path / "q").exists()


def jax_zeros_like(params):
    import jax

    return jax.tree_util.tree_map_with_path(lambda p, x: 0 * x if "lora_b" in jax.tree_util.keystr(p) else x, params)


def test_merged_from_gguf_base(tmp_path):
    """A .gguf base: merged export loads in transformers and matches ours (no tokenizer to copy)."""
    from test_gguf import tiny_hf_llama, write_gguf

    gguf_path = str(write_gguf(tiny_hf_llama(), tmp_path / "tiny.gguf"))
    lcfg = lora_jax.LoraConfig(r=4, alpha=8, target_modules=("q_proj", "k_proj", "down_proj"))
    model, _, params = ours(gguf_path, lcfg)
    save_peft_adapter(params, lcfg, tmp_path / "a", model_config=model.cfg)
    out = tmp_path / "m"
    assert lora_jax_main(["export", "--base", gguf_path, "--adapter", str(tmp_path / "a"), "--format", "merged", "--out", str(out)]) == 0
    ids = np.random.default_rng(0).integers(0, 128, size=(2, 8)).astype(np.int32)
    assert_close(hf_logits(load_hf(str(out)), ids), our_logits(model, params, ids))
