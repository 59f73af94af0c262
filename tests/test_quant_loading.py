"""Quantized loading: quantize while reading, bitsandbytes 4-bit checkpoints as stored (fixture
written by transformers + bitsandbytes themselves), merged export and PEFT adapters of a QLoRA run."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax.quant import dequantize_t, is_quantized

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")
LORA = lora_jax.LoraConfig(r=4, alpha=8, target_modules="all-linear")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(full-precision dir, the same model saved by transformers as bitsandbytes NF4 + double quant)."""
    d = tmp_path_factory.mktemp("bnb")
    torch.manual_seed(0)
    hf = transformers.LlamaConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=96, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(hf)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model.save_pretrained(d / "fp")
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=torch.float32)
    qmodel = transformers.AutoModelForCausalLM.from_pretrained(d / "fp", quantization_config=q, device_map="cpu",
                                                               dtype=torch.float32)
    qmodel.save_pretrained(d / "bnb")
    return str(d / "fp"), str(d / "bnb"), qmodel


def test_quantize_while_loading_equals_quantizing_after(checkpoints):
    fp, _, _ = checkpoints
    _, streamed, _ = lora_jax.from_pretrained(fp, scan_layers=True, quantize="nf4")
    _, params, _ = lora_jax.from_pretrained(fp, scan_layers=True)
    after = lora_jax.quantize(params, "nf4")
    a, b = jax.tree.leaves(streamed), jax.tree.leaves(after)
    assert len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert is_quantized(streamed["model"]["layers"]["mlp"]["down_proj"]["kernel"])
    assert not is_quantized(streamed["lm_head"]["kernel"])


def test_bitsandbytes_checkpoint_loads_as_stored_and_dequantizes_bit_for_bit(checkpoints):
    _, bnb_dir, qmodel = checkpoints
    import bitsandbytes.functional as F

    with open(os.path.join(bnb_dir, "config.json")) as f:
        assert json.load(f)["quantization_config"]["bnb_4bit_use_double_quant"] is True
    model, params, _ = lora_jax.from_pretrained(bnb_dir, scan_layers=False)
    from safetensors.torch import load_file

    saved = load_file(os.path.join(bnb_dir, "model.safetensors"))
    for i in range(2):
        for mod in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj", "mlp.up_proj"):
            ours = params["model"]["layers"][str(i)]
            for part in mod.split("."):
                ours = ours[part]
            ours = ours["kernel"]
            assert is_quantized(ours) and ours.double_quant
            name = f"model.layers.{i}.{mod}.weight"  # bitsandbytes' own reading and dequantization of the file
            state = F.QuantState.from_dict({k[len(name) + 1:]: v for k, v in saved.items() if k.startswith(name + ".")},
                                           device=torch.device("cpu"))
            expected = F.dequantize_4bit(saved[name], state).float().numpy()
            got = jax.jit(lambda q: dequantize_t(q, jnp.float32))(ours)
            np.testing.assert_array_equal(np.asarray(got), expected)
    # and the model computes what transformers' 4-bit model computes (fp32 compute)
    ids = np.arange(12)[None] % 96
    ref = qmodel(torch.tensor(ids)).logits.detach().numpy()
    ours = model.apply({"params": params}, jnp.asarray(ids))[0]
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="already NF4"):
        lora_jax.from_pretrained(bnb_dir, quantize="int8")
    # explicit settings other than the stored ones are refused, not silently replaced by the checkpoint's
    from lora_jax.errors import UserError
    from lora_jax.quant import QuantConfig

    for other in (QuantConfig("nf4", double_quant=False), QuantConfig("nf4", block_size=128)):
        with pytest.raises(UserError, match="block_size=64, double_quant=True, which loads as stored"):
            lora_jax.from_pretrained(bnb_dir, quantize=other)
    same = lora_jax.from_pretrained(bnb_dir, quantize=QuantConfig("nf4", 64, True))[1]["model"]["layers"]["0"]
    assert np.array_equal(np.asarray(same["mlp"]["up_proj"]["kernel"].codes),
                          np.asarray(params["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"].codes))


def test_merged_export_and_peft_adapter_of_a_qlora_base(checkpoints, tmp_path):
    fp, _, qmodel = checkpoints
    peft = pytest.importorskip("peft")
    model, frozen, hf_config = lora_jax.from_pretrained(fp, scan_layers=True, quantize="nf4", lora=LORA)
    lora, frozen = lora_jax.split(lora_jax.inject(frozen, LORA, jax.random.key(0)))
    lora = jax.tree.map(lambda a: a + 0.02 * jax.random.normal(jax.random.key(3), a.shape), lora)
    ids = np.arange(10)[None] % 96

    with pytest.warns(UserWarning, match="merging into a nf4-quantized base"):
        merged = lora_jax.save_merged(lora_jax.combine(lora, frozen), LORA, str(tmp_path / "merged"), hf_config=hf_config)
    hf_merged = transformers.AutoModelForCausalLM.from_pretrained(merged)
    ours = model.apply({"params": lora_jax.combine(lora, frozen)}, jnp.asarray(ids))[0]
    np.testing.assert_allclose(hf_merged(torch.tensor(ids)).logits.detach().numpy(), np.asarray(ours), atol=1e-4)

    # the adapter is the same PEFT adapter as ever: PeftModel puts it on the full-precision base
    lora_jax.save_peft_adapter(jax.tree.map(np.asarray, lora), LORA, str(tmp_path / "adapter"), model_config=model.cfg)
    base = transformers.AutoModelForCausalLM.from_pretrained(fp)
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    _, fp_params, _ = lora_jax.from_pretrained(fp, scan_layers=True)
    on_fp = model.apply({"params": lora_jax.combine(lora, fp_params)}, jnp.asarray(ids))[0]
    np.testing.assert_allclose(peft_model(torch.tensor(ids)).logits.detach().numpy(), np.asarray(on_fp), atol=1e-4)
    # and onto bitsandbytes' own 4-bit base (PEFT's bnb.Linear4bit layers): the QLoRA model's logits
    on_bnb = peft.PeftModel.from_pretrained(qmodel, str(tmp_path / "adapter")).eval()
    try:
        got = on_bnb(torch.tensor(ids)).logits.detach().numpy()
    finally:
        on_bnb.unload()  # the module-scoped bnb model is shared
    np.testing.assert_allclose(got, np.asarray(ours), atol=1e-3)  # measured 1.8e-4; vs the fp base 3.8e-3


def test_merged_export_of_a_bitsandbytes_base_is_a_plain_full_precision_checkpoint(checkpoints, tmp_path):
    """The bnb checkpoint's quantization_config is not copied: transformers loads the merge as float weights."""
    _, bnb_dir, _ = checkpoints
    model, params, hf_config = lora_jax.from_pretrained(bnb_dir, scan_layers=True, lora=LORA)
    lora, frozen = lora_jax.split(lora_jax.inject(params, LORA, jax.random.key(0)))
    trained, scales = lora_jax.split_constants(lora)
    trained = jax.tree.map(lambda a: a + 0.02 * jax.random.normal(jax.random.key(3), a.shape), trained)
    params = lora_jax.combine(trained, scales, frozen)
    with pytest.warns(UserWarning, match="nf4-quantized base"):
        merged = lora_jax.save_merged(params, LORA, str(tmp_path / "merged"), hf_config=hf_config)
    with open(os.path.join(merged, "config.json")) as f:
        assert "quantization_config" not in json.load(f)
    hf_merged = transformers.AutoModelForCausalLM.from_pretrained(merged)
    ids = np.arange(10)[None] % 96
    ours = model.apply({"params": params}, jnp.asarray(ids))[0]
    np.testing.assert_allclose(hf_merged(torch.tensor(ids)).logits.detach().numpy(), np.asarray(ours), atol=1e-4)


def test_a_bitsandbytes_weight_with_blocks_across_rows_is_refused_with_the_block_size_that_fits():
    import bitsandbytes.functional as F

    from lora_jax.quant import bnb

    packed, state = F.quantize_4bit(torch.randn(8, 32), blocksize=64, compress_statistics=True, quant_type="nf4")
    tensors = {"m.weight": packed.numpy(), **{f"m.weight.{k}": v.numpy() for k, v in state.as_dict(packed=True).items()}}
    with pytest.raises(ValueError, match=r"straddle rows.*QuantConfig\('nf4', 32\).*model.quant_block_size=32\)$"):
        bnb.read_weight(tensors, "m.weight")


@pytest.mark.parametrize("storage", ["bfloat16", "float32", "uint8"])
def test_bitsandbytes_quant_storage_dtypes_read_bit_for_bit(storage):
    """bnb_4bit_quant_storage packs the same bytes into wider elements: they are read as bytes."""
    import bitsandbytes.functional as F
    import ml_dtypes

    from lora_jax.quant import bnb

    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4",
                                    quant_storage=getattr(torch, storage))
    as_np = {"bfloat16": lambda t: t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)}.get(storage, lambda t: t.numpy())
    tensors = {"m.weight": as_np(packed), **{f"m.weight.{k}": v.numpy() for k, v in state.as_dict(packed=True).items()}}
    got = np.asarray(dequantize_t(bnb.read_weight(tensors, "m.weight"), jnp.float32))
    np.testing.assert_array_equal(got, F.dequantize_4bit(packed, state).float().numpy())
